#!/usr/bin/env bash
# The main job on a fresh machine (CPU is enough): make .venv, install the FULL stack
# (torch 2.13.0 CPU, megatron-core 0.16.1, megatron-bridge 0.3.1), turn a real corpus that
# every machine has offline -- the Python standard library's own sources -- into a Megatron
# indexed dataset, and train configs/tiny_dense_cpu.yaml with SSO through Megatron-Bridge's
# real pretrain() for 300 steps, printing loss, lr, tokens/s and the spectral-norm summary.
# About 1-4 minutes of training on 2 cores; the loss falls from ~5.6 to ~1.5.
#   scripts/quickstart.sh [pretrain args...]   e.g. --optimizer muon train.train_iters=100
# Env: VENV (default .venv), DATA (dataset prefix, default data/stdlib).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$ROOT/.venv}"
DATA="${DATA:-$ROOT/data/stdlib}"
cd "$ROOT"
bash "$ROOT/scripts/install.sh" --venv "$VENV"
export PYTHONWARNINGS=ignore
STDLIB="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["stdlib"])')"
if [[ ! -f "$DATA.idx" ]]; then
  echo "==> prepare-data: $STDLIB (*.py, first 20 MB) -> $DATA"
  "$VENV/bin/megatron-sso" prepare-data --input "$STDLIB" --include '*.py' --max-bytes 20000000 --output "$DATA"
fi
echo "==> pretrain: configs/tiny_dense_cpu.yaml with SSO on $DATA"
exec "$VENV/bin/megatron-sso" pretrain --config configs/tiny_dense_cpu.yaml --optimizer sso --data-path "$DATA" "$@"
