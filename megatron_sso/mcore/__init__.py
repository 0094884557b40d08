"""Megatron-Core / Megatron-Bridge integration.

Nothing heavy is imported here; import the submodule you need:

* :mod:`.cpu_mode` -- ``enable_cpu_mode()``: run Megatron-Core 0.16.1 / Megatron-Bridge 0.3.1
  on a CPU with gloo (a no-op when CUDA is available);
* :mod:`.bridge_runner` -- run Bridge's real ``pretrain()`` on a tiny GPT in N local ranks;
* :mod:`.factory` -- ``install()``: ``optimizer: sso | muon_sphere | muon`` through Megatron's
  optimizer factory (routing, wrapping, chaining); :mod:`.config` -- ``SSOOptimizerConfig``;
* :mod:`.layouts` -- atomic modules of Megatron's fused weights, as views;
* :mod:`.sphere_optimizer` -- the torch optimizer Megatron's wrappers hold (checkpointable state);
* :mod:`.sphere_logging` -- statistics for Megatron's logger / TensorBoard. See docs/megatron.md;
* :mod:`.spectra_factory`, :mod:`.spectra_optimizer`, :mod:`.spectra_logging` -- ``optimizer:
  adam | signum | ademamix`` with SPECTRA clipping (``spectra_*`` settings, docs/spectra.md);
* :mod:`.megatron_lm_args`, :mod:`.megatron_lm_hooks`, :mod:`.cpu_mode_megatron_lm` -- the
  ``--sso-*`` / ``--spectra-*`` flags, the launcher's hooks and CPU glue for Megatron-LM's
  ``pretrain_gpt.py`` (entry point: ``python -m megatron_sso.megatron_lm``);
* :mod:`.monitoring` -- opt-in per-iteration metrics (activations, spectral norms, router MaxVio).
"""
