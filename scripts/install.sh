#!/usr/bin/env bash
# Install megatron-sso and a pinned Megatron stack on a CPU machine (no GPU needed). The stack
# follows the interpreter's version:
#   Python 3.11: torch 2.13.0 (CPU build), megatron-core 0.16.1, megatron-bridge 0.3.1
#                (requirements/megatron-cpu.txt)
#   Python 3.12: torch 2.14.1 (default build; runs on the CPU), megatron-core 0.19.2,
#                megatron-bridge 0.6.2 (requirements/megatron-cpu312.txt)
# Idempotent: re-running it changes nothing.
#
#   scripts/install.sh                                 # into the current python (python3, or $PYTHON)
#   scripts/install.sh --venv .venv                    # create the venv if needed, install into it
#   scripts/install.sh --python 3.12 --venv .venv312   # find a Python 3.12 (PATH, pyenv), 3.12 stack
#   scripts/install.sh --python /usr/bin/python3.12    # or name the interpreter (also PYTHON=...)
#   scripts/install.sh --no-megatron                   # only torch and the project (pure-PyTorch use)
#   scripts/install.sh --log FILE                      # where pip's output goes (default: a new file in $TMPDIR)
#
# It prints one line per step with its time; pip's full output goes to the log file (its path is
# printed first), and the log's last lines are printed when a step fails.
#
# Order matters: torch (pinned by the lock's first line) first; then the exact, complete lock
# with --no-deps, because megatron-bridge's own metadata pulls transformer-engine and other CUDA
# builds; then the project, constrained by the lock so that nothing can replace that torch.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
WANT="${PYTHON:-python3}"
VENV=""
LOG=""
MEGATRON=1
CHECK=1

usage() { sed -n '2,22p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }
die() { echo "install.sh: $*" >&2; exit 1; }
while [[ $# -gt 0 ]]; do
  case "$1" in
    --venv) VENV="${2:?--venv needs a directory}"; shift 2 ;;
    --python) WANT="${2:?--python needs a version (3.12) or an interpreter}"; shift 2 ;;
    --log) LOG="${2:?--log needs a file}"; shift 2 ;;
    --no-megatron) MEGATRON=0; shift ;;
    --no-check) CHECK=0; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "install.sh: unknown argument $1" >&2; usage >&2; exit 2 ;;
  esac
done

version_of() {  # "3.12" for a working interpreter, nothing for a broken one (e.g. a pyenv shim)
  "$1" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null || true
}

find_python() {  # $1: a version (3.12) or an interpreter (path or command name)
  local want="$1" c v tried=()
  if [[ ! "$want" =~ ^3\.[0-9]+$ ]]; then
    c="$(command -v "$want" || true)"
    [[ -n "$c" && -n "$(version_of "$c")" ]] || die "--python $want: not a working Python interpreter"
    echo "$c"; return
  fi
  for c in "python$want" python3; do
    if command -v "$c" >/dev/null && [[ "$(version_of "$(command -v "$c")")" == "$want" ]]; then
      command -v "$c"; return
    fi
    tried+=("$c on PATH")
  done
  if command -v pyenv >/dev/null; then
    for v in $(pyenv versions --bare 2>/dev/null | grep -E "^${want//./\\.}\.[0-9]+$" | sort -t. -k3,3nr); do
      c="$(pyenv prefix "$v" 2>/dev/null)/bin/python$want"
      if [[ -x "$c" && "$(version_of "$c")" == "$want" ]]; then echo "$c"; return; fi
    done
    tried+=("pyenv versions $want.*")
  fi
  local IFS=,
  die "no Python $want interpreter found (tried: ${tried[*]}). Install one (e.g. 'pyenv install $want')" \
      "or name it: --python /path/to/python$want"
}

PY="$(find_python "$WANT")"
if [[ -n "$VENV" && -x "$VENV/bin/python" ]]; then
  have="$(version_of "$VENV/bin/python")"
  want_ver="$(version_of "$PY")"
  [[ "$have" == "$want_ver" ]] || die "$VENV is a Python $have venv, but Python $want_ver was asked for;" \
                                      "choose another --venv or remove that one"
fi
pyver="$(version_of "$PY")"
case "$pyver" in
  3.11) LOCK="$ROOT/requirements/megatron-cpu.txt" ;;
  3.12) LOCK="$ROOT/requirements/megatron-cpu312.txt" ;;
  *) die "$PY is Python $pyver; the supported stacks are Python 3.11 and 3.12" \
         "(--python 3.11 or --python 3.12)" ;;
esac
TORCH_PIN="$(grep -m1 -E '^torch==' "$LOCK")"
TORCH_VERSION="${TORCH_PIN#torch==}"

if [[ -z "$LOG" ]]; then
  LOG="$(mktemp "${TMPDIR:-/tmp}/megatron-sso-install.XXXXXX.log")"
fi
: > "$LOG"
echo "install.sh: Python $pyver stack (${LOCK#$ROOT/}); pip's full output: $LOG"

STEP=0
step() {  # step "what" command...: one line with the step's time; the log's tail if it fails
  local what="$1" t0=$SECONDS rc=0
  shift
  STEP=$((STEP + 1))
  printf "  [%d] %-80s " "$STEP" "$what"
  { echo; echo "==> [$STEP] $what"; echo "\$ $*"; } >> "$LOG"
  "$@" >> "$LOG" 2>&1 || rc=$?
  if [[ $rc -ne 0 ]]; then
    echo "FAILED after $((SECONDS - t0)) s (exit $rc)"
    echo "---- last 30 lines of $LOG ----" >&2
    tail -n 30 "$LOG" >&2
    echo "---- full output: $LOG ----" >&2
    exit "$rc"
  fi
  echo "$((SECONDS - t0)) s"
}

if [[ -n "$VENV" ]]; then
  if [[ ! -x "$VENV/bin/python" ]]; then
    step "create venv $VENV (Python $pyver: $PY)" "$PY" -m venv "$VENV"
  fi
  PY="$VENV/bin/python"
fi
PIP=("$PY" -m pip install --disable-pip-version-check)

TORCH_ONLY="$(mktemp)"
trap 'rm -f "$TORCH_ONLY"' EXIT
echo "$TORCH_PIN" > "$TORCH_ONLY"
CONSTRAINTS="$TORCH_ONLY"

step "$TORCH_PIN" "${PIP[@]}" "$TORCH_PIN"
if [[ "$MEGATRON" == 1 ]]; then
  step "Megatron stack: $(grep -c '==' "$LOCK") pins of ${LOCK#$ROOT/}, --no-deps" "${PIP[@]}" --no-deps -r "$LOCK"
  CONSTRAINTS="$LOCK"
fi
step "megatron-sso (editable, [test]), constrained by ${CONSTRAINTS#$ROOT/}" \
  "${PIP[@]}" -c "$CONSTRAINTS" -e "$ROOT[test]"

check_torch() {
  "$PY" - "$TORCH_VERSION" "$pyver" <<'PYEOF'
import sys
import torch
want, pyver = sys.argv[1], sys.argv[2]
assert torch.__version__.split("+")[0] == want, f"torch {torch.__version__} installed, {want} expected"
if pyver == "3.11":  # the local CPU wheel; a CUDA build here would mean the pin was bypassed
    assert torch.version.cuda is None, f"a CUDA build of torch got installed: {torch.__version__}"
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}, GPU available: {torch.cuda.is_available()})")
PYEOF
}

check_pip() {  # requirements the lock leaves out on purpose ("# absent:" line) are fine; nothing else
  local absent report problems
  absent="$(sed -n 's/^# absent: //p' "$LOCK" | tr ' ' '\n' | sed '/^$/d')"
  report="$("$PY" -m pip check 2>&1 || true)"
  echo "$report"
  problems="$(grep -v '^No broken requirements' <<< "$report" | while read -r line; do
    name="$(sed -n 's/^.* requires \([A-Za-z0-9._-]*\).*, which is not installed\.$/\1/p' <<< "$line")"
    if [[ -z "$name" ]] || ! grep -qxiF "$name" <<< "$absent"; then echo "$line"; fi
  done)"
  if [[ -n "$problems" ]]; then
    echo "pip check found problems the lock does not expect:"; echo "$problems"; return 1
  fi
}

check_imports() {
  "$PY" -W ignore - <<'PYEOF'
from megatron_sso.mcore.cpu.mode import enable_cpu_mode
enable_cpu_mode()
import megatron.core, megatron.bridge.training.pretrain  # noqa: E401,F401
from importlib.metadata import version
print("megatron-core", version("megatron-core"), "| megatron-bridge", version("megatron-bridge"),
      "| Bridge pretrain() imports in CPU mode")
PYEOF
}

if [[ "$CHECK" == 1 ]]; then
  step "check torch $TORCH_VERSION" check_torch
  if [[ "$MEGATRON" == 1 ]]; then
    step "check pip (only the lock's known absences)" check_pip
    step "check that Megatron-Bridge's pretrain() imports" check_imports
  fi
fi
summary="$("$PY" - <<'PYEOF'
from importlib.metadata import PackageNotFoundError, version
out = []
for name in ("torch", "megatron-core", "megatron-bridge"):
    try:
        out.append(f"{name} {version(name)}")
    except PackageNotFoundError:
        pass
print(", ".join(out))
PYEOF
)"
echo "install.sh: done in ${SECONDS} s: $summary ($PY)"
