#!/usr/bin/env bash
# Install both supported stacks and run the tests (the README's test command; .ci/run calls it).
# Works on a fresh machine; re-running reuses the venvs.
#   1. Python 3.11 in .venv (torch 2.13.0 CPU, megatron-core 0.16.1, megatron-bridge 0.3.1): the full suite;
#   2. Python 3.12 in .venv312 (torch 2.14.1, megatron-core 0.19.2, megatron-bridge 0.6.2): the
#      Megatron-facing tests (ON_312 below: Bridge pretrain on gloo, the factory, checkpoints, the
#      Megatron-LM loop, one CLI training run).
#
#   scripts/test.sh                                  # both stacks, as CI runs them
#   scripts/test.sh [pytest args...]                 # the 3.11 stack only, with these arguments
#   STACKS=3.12 scripts/test.sh [pytest args...]     # the 3.12 stack only (default args: ON_312)
# Env: VENV (default .venv), VENV312 (default .venv312), PYTHON312 (an interpreter or 3.12, for
# install.sh --python), STACKS ("3.11 3.12" without arguments, "3.11" with them).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$ROOT/.venv}"
VENV312="${VENV312:-$ROOT/.venv312}"
if [[ $# -gt 0 ]]; then STACKS="${STACKS:-3.11}"; else STACKS="${STACKS:-3.11 3.12}"; fi

ON_312=(
  tests/megatron
  tests/megatron_lm
  tests/cli/test_cli_megatron.py::test_dry_run_parameter_counts
  tests/cli/test_cli_megatron.py::test_input_errors_are_one_line
  tests/cli/test_cli_megatron.py::test_tiny_dense_sso_two_ranks
)
# What the 3.12 stack must pass: every test that drives Megatron itself, the CLI's recipe dry runs
# and input errors (one process), and one real CLI training run; the rest of tests/cli (~12 min of
# CPU) exercises the same code on both stacks and runs on 3.11 only.

run_pytest() {  # run_pytest VENV args...: pytest's exit code 5 ("no tests collected") is an error
  local venv="$1" rc=0
  shift
  (cd "$ROOT" && "$venv/bin/python" -m pytest -q -p no:cacheprovider "$@") || rc=$?
  if [[ $rc -eq 5 ]]; then
    echo "test.sh: pytest collected no tests from: $*" >&2
  fi
  return "$rc"
}

for stack in $STACKS; do
  case "$stack" in
    3.11)
      bash "$ROOT/scripts/install.sh" --python 3.11 --venv "$VENV"
      echo "test.sh: Python 3.11 stack: pytest ${*:-(the full suite)}"
      run_pytest "$VENV" "$@"
      ;;
    3.12)
      bash "$ROOT/scripts/install.sh" --python "${PYTHON312:-3.12}" --venv "$VENV312"
      if [[ $# -gt 0 ]]; then args=("$@"); else args=("${ON_312[@]}"); fi
      echo "test.sh: Python 3.12 stack: pytest ${args[*]}"
      run_pytest "$VENV312" "${args[@]}"
      ;;
    *) echo "test.sh: unknown stack '$stack' in STACKS (3.11, 3.12)" >&2; exit 2 ;;
  esac
done
