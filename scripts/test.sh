#!/usr/bin/env bash
# Install everything (torch 2.13.0 CPU, the pinned Megatron stack, the project) into .venv and
# run the test suite. Works on a fresh machine; re-running reuses the venv.
#   scripts/test.sh [pytest args...]
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$ROOT/.venv}"
bash "$ROOT/scripts/install.sh" --venv "$VENV"
cd "$ROOT"
exec "$VENV/bin/python" -m pytest -q -p no:cacheprovider "$@"
