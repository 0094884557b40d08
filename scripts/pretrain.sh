#!/usr/bin/env bash
# Single-node training with torchrun: one rank per GPU (NCCL). Prints the resolved command.
#   CONFIG=configs/dense_1p7b.yaml DATA=/data/qwen3_text_document bash scripts/pretrain.sh [overrides...]
# Env knobs: CONFIG (recipe), NGPU (default: all visible GPUs), OPTIMIZER (default: the
# recipe's), DATA (indexed-dataset prefix), TP / PP / EP (override the recipe's
# tensor / pipeline / expert parallel sizes), PYTHON (default: python), DRY_RUN=1 (print
# the resolved config and exit), MASTER_PORT (default 29500).
# Extra arguments are dotted Bridge overrides, e.g. train.train_iters=100 logger.log_interval=1.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python}"
CONFIG="${CONFIG:-configs/dense_1p7b.yaml}"
if [[ -z "${NGPU:-}" ]]; then
  NGPU="$("$PY" -c 'import torch; print(max(1, torch.cuda.device_count()))')"
fi
args=(pretrain --config "$CONFIG")
[[ -n "${OPTIMIZER:-}" ]] && args+=(--optimizer "$OPTIMIZER")
[[ -n "${DATA:-}" ]] && args+=(--data-path "$DATA")
[[ -n "${TP:-}" ]] && args+=("model.tensor_model_parallel_size=$TP")
[[ -n "${PP:-}" ]] && args+=("model.pipeline_model_parallel_size=$PP")
[[ -n "${EP:-}" ]] && args+=("model.expert_model_parallel_size=$EP")
args+=("$@")
cd "$ROOT"
if [[ "${DRY_RUN:-0}" == 1 ]]; then
  cmd=("$PY" -m megatron_sso "${args[@]}" --dry-run)
else
  cmd=("$PY" -m torch.distributed.run --standalone --nproc-per-node "$NGPU" -m megatron_sso "${args[@]}")
fi
echo "==> ${cmd[*]}"
exec "${cmd[@]}"
