#!/usr/bin/env bash
# The GPU check in one command (scripts/gpu/check.py: correctness, Megatron-Core GPT training with
# adam / our muon / muon_sphere / sso, Newton-Schulz throughput; results.md + results.json).
#   On the GPU machine:  bash scripts/gpu/check.sh [check.py args]    (carry gpu-wheels/ from prepare.sh)
#   Here, on the CPU:    bash scripts/gpu/check.sh --cpu-dry-run [check.py args]
# Results go to $OUT when set (the device tool's folder), else runs/gpu-check/. On the GPU it
# installs the carried wheels (--no-index --no-deps, into /tmp/gpu-site) and the project, then runs
# the driver under a hard timeout of its budget + 90 s; the dry run uses the current Python as is.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
PY="${PYTHON:-python3}"
OUT_DIR="${OUT:-$ROOT/runs/gpu-check}"
WHEELS="${WHEELS:-$ROOT/gpu-wheels}"
BUDGET="${BUDGET_S:-360}"
mkdir -p "$OUT_DIR"
cd "$ROOT"

if [ "${1:-}" = "--cpu-dry-run" ]; then
  shift
  export OMP_NUM_THREADS=1 PYTHONUNBUFFERED=1
  exec "$PY" scripts/gpu/check.py --cpu-dry-run --out "$OUT_DIR" "$@"
fi

shopt -s nullglob
wheels=("$WHEELS"/*.whl)
if [ ${#wheels[@]} -eq 0 ]; then
  echo "check.sh: no wheels in $WHEELS: run scripts/gpu/prepare.sh on the CPU machine and carry gpu-wheels" >&2
  exit 2
fi
{
  echo "== $(date -u) $(uname -m) $("$PY" -V 2>&1)"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv 2>&1 || true
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/gpu-site \
    "${wheels[@]}" && echo "installed: ${wheels[*]##*/}"
  "$PY" -m pip install -q --no-index --no-deps --no-build-isolation -e "$ROOT" && echo "installed: megatron-sso (editable)" \
    || echo "editable install failed; the project is on PYTHONPATH instead"
} > "$OUT_DIR/install.log" 2>&1
cat "$OUT_DIR/install.log"
export PYTHONPATH="/tmp/gpu-site:$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 CUDA_DEVICE_MAX_CONNECTIONS=1
timeout --kill-after=10 $((BUDGET + 90)) "$PY" scripts/gpu/check.py --out "$OUT_DIR" --budget-s "$BUDGET" "$@" \
  2>&1 | tee "$OUT_DIR/check.log"
exit "${PIPESTATUS[0]}"
