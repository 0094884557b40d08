#!/usr/bin/env bash
# The main job on a fresh machine: make .venv, install the project, and train a tiny GPT on
# real text (the Python standard library's sources) on CPU with SSO, printing the loss.
#   scripts/quickstart.sh [megatron-sso demo args...]   e.g. --steps 300 --optimizer muon
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$ROOT/.venv}"
bash "$ROOT/scripts/install.sh" --venv "$VENV" --no-megatron
exec "$VENV/bin/megatron-sso" demo "$@"
