"""Megatron-Core / Megatron-Bridge integration.

Nothing heavy is imported here; import the submodule you need:

* :mod:`.cpu_mode` -- ``enable_cpu_mode()``: run Megatron-Core 0.16.1 / Megatron-Bridge 0.3.1
  on a CPU with gloo (a no-op when CUDA is available);
* :mod:`.bridge_runner` -- run Bridge's real ``pretrain()`` on a tiny GPT in N local ranks.
"""
