"""Our GPT providers for Megatron-LM's ``pretrain()``: model, datasets, forward step, loss.

Megatron-LM's ``pretrain()`` (``megatron.training.training``) takes four things from its
``pretrain_gpt.py``: a model provider, a train/valid/test dataset provider, a forward step and
the loss that step returns. The megatron-core >= 0.17 wheels ship ``megatron.training`` but not
that script (nor its helpers ``gpt_builders.py`` / ``model_provider.py``), so
:mod:`.builtin_gpt` runs the loop with these instead. They read Megatron-LM's own parsed
arguments (``get_args()``), so every model, data and batch flag means what it means there.

Scope, chosen to be what this project tests: a decoder-only GPT (dense or MoE, local or
Transformer-Engine modules, tensor / data / expert parallelism), trained on Megatron's
``--mock-data`` or on indexed datasets (``--data-path``, e.g. from ``megatron-sso prepare-data``).
:data:`UNSUPPORTED` lists what Megatron-LM's script does beyond that; :func:`check_supported`
refuses it in one line rather than training something else than asked.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Callable, Optional, Sequence

import torch

BATCH_FIELDS = ("tokens", "labels", "loss_mask", "position_ids")
"""What a GPT sample holds for training (``megatron.core.datasets.gpt_dataset.GPTDataset.__getitem__``;
``attention_mask`` too with ``--create-attention-mask-in-dataloader``), all ``(micro_batch, seq)``."""

UNSUPPORTED = (
    ("pipeline_model_parallel_size", lambda v: v > 1, "--pipeline-model-parallel-size > 1"),
    ("context_parallel_size", lambda v: v > 1, "--context-parallel-size > 1"),
    ("mtp_num_layers", lambda v: v is not None, "--mtp-num-layers (multi-token prediction)"),
    ("sft", bool, "--sft"),
    ("fim_data", bool, "--fim-data"),
    ("spec", lambda v: v is not None, "--spec (a custom layer spec)"),
    ("yaml_cfg", lambda v: v is not None, "--yaml-cfg"),
    ("heterogeneous_layers_config_path", lambda v: v is not None, "--heterogeneous-layers-config-path"),
    ("experimental_attention_variant", lambda v: v is not None, "--experimental-attention-variant"),
    ("dataloader_inter_document_masking", bool, "--dataloader-inter-document-masking"),
    ("logits_load_dir", lambda v: v is not None, "--logits-load-dir (distillation)"),
)
"""``(argument, is_set, flag)``: what Megatron-LM's ``pretrain_gpt.py`` (core_v0.19.0) supports and
these providers do not; each needs batch plumbing (pipeline stages, context-parallel slicing,
packed sequences) or model builders (MTP, heterogeneous or experimental layers) we do not test.
Use a Megatron-LM checkout (``MEGATRON_LM_DIR``) for those."""


def check_supported(args: Any) -> None:
    """ValueError naming every :data:`UNSUPPORTED` flag set in ``args``."""
    found = [flag for name, is_set, flag in UNSUPPORTED if is_set(getattr(args, name, None))]
    if found:
        raise ValueError(f"the built-in GPT script does not support {', '.join(found)}; run Megatron-LM's own "
                         "pretrain_gpt.py (set MEGATRON_LM_DIR to a checkout of the matching tag)")


def gpt_model_provider(pre_process: bool = True, post_process: bool = True, vp_stage: Optional[int] = None,
                       config: Any = None, pg_collection: Any = None):
    """A megatron-core ``GPTModel`` from Megatron-LM's arguments (the signature ``get_model`` calls).

    Layers come from ``get_gpt_decoder_block_spec``, which builds dense and MoE layers by
    ``--moe-layer-freq`` (dense everywhere without ``--num-experts``) with local or Transformer
    Engine modules by ``--transformer-impl``; sizes, position embedding and tying are Megatron-LM's
    flags. ``config`` (a ``TransformerConfig``) overrides the one derived from the arguments.
    """
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec
    from megatron.training import get_args
    from megatron.training.arguments import core_transformer_config_from_args

    args = get_args()
    config = config if config is not None else core_transformer_config_from_args(args)
    spec = get_gpt_decoder_block_spec(config, use_transformer_engine=args.transformer_impl == "transformer_engine",
                                      normalization=args.normalization, qk_l2_norm=args.qk_l2_norm,
                                      vp_stage=vp_stage)
    return GPTModel(
        config=config, transformer_layer_spec=spec, vocab_size=args.padded_vocab_size,
        max_sequence_length=args.max_position_embeddings, pre_process=pre_process, post_process=post_process,
        fp16_lm_cross_entropy=args.fp16_lm_cross_entropy, parallel_output=True,
        share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights,
        position_embedding_type=args.position_embedding_type, rotary_percent=args.rotary_percent,
        rotary_base=args.rotary_base, rope_scaling=args.use_rope_scaling,
        seq_len_interpolation_factor=args.rotary_seq_len_interpolation_factor,
        vp_stage=vp_stage, pg_collection=pg_collection)


def gpt_dataset_config(args: Any, tokenizer: Any):
    """Megatron-core's ``GPTDatasetConfig`` from Megatron-LM's data flags (``--data-path`` /
    ``--train-data-path`` ..., ``--split``, ``--seq-length``, the mask and reset flags)."""
    from megatron.core.datasets.gpt_dataset import GPTDatasetConfig
    from megatron.training.utils import get_blend_and_blend_per_split

    blend, blend_per_split = get_blend_and_blend_per_split(args)
    return GPTDatasetConfig(
        random_seed=args.seed, sequence_length=args.seq_length, blend=blend, blend_per_split=blend_per_split,
        split=args.split, num_dataset_builder_threads=args.num_dataset_builder_threads,
        path_to_cache=args.data_cache_path, mmap_bin_files=args.mmap_bin_files, tokenizer=tokenizer,
        reset_position_ids=args.reset_position_ids, reset_attention_mask=args.reset_attention_mask,
        eod_mask_loss=args.eod_mask_loss, create_attention_mask=args.create_attention_mask_in_dataloader,
        mid_level_dataset_surplus=args.mid_level_dataset_surplus)


def gpt_datasets_provider(train_val_test_num_samples: Sequence[int], vp_stage: Optional[int] = None):
    """``(train, valid, test)`` datasets: Megatron's ``MockGPTDataset`` with ``--mock-data``,
    otherwise ``GPTDataset`` over the indexed files named by the data flags. Built on tensor
    rank 0 only (:func:`get_batch` broadcasts over the tensor group)."""
    from megatron.core import mpu
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, MockGPTDataset
    from megatron.training import get_args, get_tokenizer, print_rank_0

    args = get_args()
    kind = MockGPTDataset if args.mock_data else GPTDataset
    print_rank_0(f"> megatron_sso: building {kind.__name__} train/valid/test datasets ...")
    return BlendedMegatronDatasetBuilder(
        kind, train_val_test_num_samples, lambda: mpu.get_tensor_model_parallel_rank() == 0,
        gpt_dataset_config(args, get_tokenizer())).build()


gpt_datasets_provider.is_distributed = True
"""Megatron-LM builds the data loaders on every rank when the provider says so (the builder
then decides per rank): the same convention as its own script."""


def get_batch(data_iterator: Any) -> dict[str, Optional[torch.Tensor]]:
    """One micro-batch on this rank: tensor rank 0 reads it, then each field is broadcast over
    the tensor-parallel group (shapes ``(micro_batch, seq)``, known from the arguments, so no
    size exchange is needed). ``attention_mask`` is None unless the data loader makes one."""
    from megatron.core import mpu
    from megatron.training import get_args

    args = get_args()
    device = torch.cuda.current_device() if torch.cuda.is_available() else "cpu"
    fields = BATCH_FIELDS + (("attention_mask",) if args.create_attention_mask_in_dataloader else ())
    if mpu.get_tensor_model_parallel_rank() == 0:
        sample = next(data_iterator)
        batch = {key: sample[key].to(device, non_blocking=True) for key in fields}
    else:
        shape = (args.micro_batch_size, args.seq_length)
        batch = {key: torch.empty(shape, dtype=torch.int64, device=device) for key in BATCH_FIELDS}
        batch["loss_mask"] = torch.empty(shape, dtype=torch.float32, device=device)
        if "attention_mask" in fields:
            batch["attention_mask"] = torch.empty((args.micro_batch_size, 1, *shape[1:], shape[1]),
                                                  dtype=torch.bool, device=device)
    if mpu.get_tensor_model_parallel_world_size() > 1:
        for key in fields:
            torch.distributed.broadcast(batch[key], mpu.get_tensor_model_parallel_src_rank(),
                                        group=mpu.get_tensor_model_parallel_group())
    batch.setdefault("attention_mask", None)
    return batch


def gpt_loss(loss_mask: torch.Tensor, output_tensor: torch.Tensor):
    """``(summed masked loss, token count, {"lm loss": [sum, count]})``: the three-value form
    Megatron's schedules accept, which divides by the token count across micro-batches and
    data-parallel ranks (per-token loss). Refuses a NaN or Inf loss with Megatron's rerun state
    machine when ``--check-for-nan-in-loss-and-grad`` is on (its default)."""
    from megatron.core.rerun_state_machine import get_rerun_state_machine
    from megatron.training import get_args

    mask = loss_mask.view(-1).float()
    loss = torch.sum(output_tensor.view(-1).float() * mask)
    tokens = mask.sum().clone().detach().to(torch.int)
    if get_args().check_for_nan_in_loss_and_grad:
        machine = get_rerun_state_machine()
        for reject, what in ((torch.isnan, "NaN"), (torch.isinf, "Inf")):
            machine.validate_result(result=loss, rejection_func=reject, tolerance=0.0, fatal=True,
                                    message=f"found {what} in local forward loss calculation")
    return loss, tokens, {"lm loss": torch.cat([loss.clone().detach().view(1), tokens.view(1)])}


def gpt_forward_step(data_iterator: Any, model: Any) -> tuple[torch.Tensor, Callable]:
    """Megatron's forward-step contract: the per-token losses of one micro-batch and the function
    that reduces them (:func:`gpt_loss` bound to this batch's loss mask)."""
    from megatron.training import get_timers

    timers = get_timers()
    timers("batch-generator", log_level=2).start()
    batch = get_batch(data_iterator)
    timers("batch-generator").stop()
    output = model(batch["tokens"], batch["position_ids"], batch["attention_mask"], labels=batch["labels"],
                   loss_mask=batch["loss_mask"])
    return output, partial(gpt_loss, batch["loss_mask"])
