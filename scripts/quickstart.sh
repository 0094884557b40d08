#!/usr/bin/env bash
# The main job on a fresh machine (CPU is enough): make .venv, install the FULL stack
# (torch 2.13.0 CPU, megatron-core 0.16.1, megatron-bridge 0.3.1), turn a real corpus that
# every machine has offline -- the Python standard library's own sources -- into a Megatron
# indexed dataset, and train configs/tiny_dense_cpu.yaml with SSO through Megatron-Bridge's
# real pretrain() for 300 steps, printing loss, lr, tokens/s and the spectral-norm summary.
# About 1-4 minutes of training on 2 cores; the loss falls from ~5.9 (ln 384: the 257 bytes padded) to ~1.5.
#   scripts/quickstart.sh [pretrain args...]   e.g. --optimizer sso_muon train.train_iters=100
# Env: VENV (default .venv), DATA (dataset prefix, default data/stdlib; data/stdlib_bpe4k with BPE=1),
# BPE=1: train a byte-level BPE of 4096 tokens on the same text (prepare-data --train-tokenizer 4096)
# and train configs/tiny_dense_bpe_cpu.yaml on those subword tokens instead of bytes.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$ROOT/.venv}"
BPE="${BPE:-0}"
if [[ "$BPE" == 1 ]]; then DATA="${DATA:-$ROOT/data/stdlib_bpe4k}"; else DATA="${DATA:-$ROOT/data/stdlib}"; fi
cd "$ROOT"
bash "$ROOT/scripts/install.sh" --venv "$VENV"
STDLIB="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["stdlib"])')"
if [[ "$BPE" == 1 ]]; then
  if [[ ! -f "$DATA.idx" || ! -d "$DATA.tokenizer" ]]; then
    echo "==> prepare-data: $STDLIB (*.py, first 20 MB) -> $DATA, with a 4096-token BPE trained on it"
    "$VENV/bin/megatron-sso" prepare-data --input "$STDLIB" --include '*.py' --max-bytes 20000000 --output "$DATA" \
      --train-tokenizer 4096
  fi
  echo "==> pretrain: configs/tiny_dense_bpe_cpu.yaml with SSO on $DATA"
  exec "$VENV/bin/megatron-sso" pretrain --config configs/tiny_dense_bpe_cpu.yaml --optimizer sso --data-path "$DATA" \
    tokenizer.tokenizer_model="$DATA.tokenizer" "$@"
fi
if [[ ! -f "$DATA.idx" ]]; then
  echo "==> prepare-data: $STDLIB (*.py, first 20 MB) -> $DATA"
  "$VENV/bin/megatron-sso" prepare-data --input "$STDLIB" --include '*.py' --max-bytes 20000000 --output "$DATA"
fi
echo "==> pretrain: configs/tiny_dense_cpu.yaml with SSO on $DATA"
exec "$VENV/bin/megatron-sso" pretrain --config configs/tiny_dense_cpu.yaml --optimizer sso --data-path "$DATA" "$@"
