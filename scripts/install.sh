#!/usr/bin/env bash
# Install megatron-sso and the Megatron stack (megatron-core 0.16.1, megatron-bridge 0.3.1) on a
# CPU machine (Python 3.11, no GPU). Idempotent: re-running it changes nothing.
#
#   scripts/install.sh                      # into the current python (python3, or $PYTHON)
#   scripts/install.sh --venv /tmp/venv     # create the venv if needed, install into it
#   scripts/install.sh --no-megatron        # only torch and the project (pure-PyTorch use)
#
# Order matters: torch==2.13.0 (the CPU wheel) first; then the exact, complete lock
# requirements/megatron-cpu.txt with --no-deps, because megatron-bridge's own metadata pulls
# transformer-engine[core_cu13] and other CUDA builds; then the project, constrained by the
# lock so that nothing can replace the CPU torch.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
LOCK="$ROOT/requirements/megatron-cpu.txt"
TORCH_PIN="torch==2.13.0"
PY="${PYTHON:-python3}"
VENV=""
MEGATRON=1
CHECK=1

usage() { sed -n '2,13p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }
while [[ $# -gt 0 ]]; do
  case "$1" in
    --venv) VENV="$2"; shift 2 ;;
    --python) PY="$2"; shift 2 ;;
    --no-megatron) MEGATRON=0; shift ;;
    --no-check) CHECK=0; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "install.sh: unknown argument $1" >&2; usage >&2; exit 2 ;;
  esac
done

if [[ -n "$VENV" ]]; then
  if [[ ! -x "$VENV/bin/python" ]]; then
    echo "==> creating venv $VENV"
    "$PY" -m venv "$VENV"
  fi
  PY="$VENV/bin/python"
fi
PIP=("$PY" -m pip install --disable-pip-version-check)
pyver="$("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
if [[ "$MEGATRON" == 1 && "$pyver" != "3.11" ]]; then
  echo "install.sh: ${LOCK#$ROOT/} is locked for Python 3.11 (megatron-core 0.16.1," \
       "megatron-bridge 0.3.1); this python is $pyver. Use --no-megatron or Python 3.11." >&2
  exit 1
fi
step() { echo "==> [${SECONDS}s] $*"; }

TORCH_ONLY="$(mktemp)"
trap 'rm -f "$TORCH_ONLY"' EXIT
echo "$TORCH_PIN" > "$TORCH_ONLY"
CONSTRAINTS="$TORCH_ONLY"

step "torch ($TORCH_PIN, CPU build) with $("$PY" -c 'import sys; print(sys.executable, sys.version.split()[0])')"
"${PIP[@]}" "$TORCH_PIN"

if [[ "$MEGATRON" == 1 ]]; then
  step "Megatron stack from ${LOCK#$ROOT/} (--no-deps: the lock is the complete closure)"
  "${PIP[@]}" --no-deps -r "$LOCK"
  CONSTRAINTS="$LOCK"
fi

step "megatron-sso (editable, [test]), constrained by ${CONSTRAINTS#$ROOT/}"
"${PIP[@]}" -c "$CONSTRAINTS" -e "$ROOT[test]"

if [[ "$CHECK" == 1 ]]; then
  step "checks"
  "$PY" - <<'EOF'
import torch
assert torch.__version__.split("+")[0] == "2.13.0", torch.__version__
assert torch.version.cuda is None, f"a CUDA build of torch got installed: {torch.__version__}"
print(f"torch {torch.__version__} (CPU build)")
EOF
  if [[ "$MEGATRON" == 1 ]]; then
    # megatron-bridge's unmet CUDA-only requirements are expected; anything else is an error.
    problems="$("$PY" -m pip check 2>&1 | grep -v -E '^megatron-bridge 0\.3\.1 requires ' | grep -v '^No broken requirements' || true)"
    if [[ -n "$problems" ]]; then
      echo "pip check found unexpected problems:" >&2
      echo "$problems" >&2
      exit 1
    fi
    "$PY" -W ignore - <<'EOF'
from megatron_sso.mcore.cpu.mode import enable_cpu_mode
enable_cpu_mode()
import megatron.core, megatron.bridge.training.pretrain  # noqa: E401,F401
from importlib.metadata import version
print("megatron-core", version("megatron-core"), "| megatron-bridge", version("megatron-bridge"),
      "| Bridge pretrain() imports in CPU mode")
EOF
  fi
fi
step "done"
