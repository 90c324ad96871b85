#!/usr/bin/env bash
# Run every Python example in examples/ (sorted by name), stopping at the first failure.
#
#   examples/run_all.sh          run them all (quick mode: a few steps each)
#   examples/run_all.sh --list   print what would run (name and arguments), run nothing
#
# Quick mode: PENWATCH_EXAMPLE_QUICK=1 is exported (set PENWATCH_EXAMPLE_QUICK=0 for full
# runs); examples that train read it to use few steps. Examples with their own flags for
# long runs, ports or files get small values and temporary paths below. Every *.py file
# here runs: none is skipped.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$(dirname "$here")"
if [[ -n "${PYTHON:-}" ]]; then
  py="$PYTHON"
elif [[ -x .venv/bin/python ]]; then
  py=.venv/bin/python
else
  py=python3
fi
export PENWATCH_EXAMPLE_QUICK="${PENWATCH_EXAMPLE_QUICK:-1}"
export JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}"
export MPLBACKEND="${MPLBACKEND:-Agg}"

list=0
if [[ "${1:-}" == "--list" ]]; then
  list=1
elif [[ $# -gt 0 ]]; then
  echo "usage: $0 [--list]" >&2
  exit 2
fi

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

# A port p with p and p + 1 free on 127.0.0.1 (multiprocess_training uses port + index).
free_port_pair() {
  "$py" - <<'PY'
import socket
for _ in range(100):
    with socket.socket() as a:
        a.bind(("127.0.0.1", 0))
        port = a.getsockname()[1]
        try:
            with socket.socket() as b:
                b.bind(("127.0.0.1", port + 1))
        except OSError:
            continue
    print(port)
    break
PY
}

args_for() {
  case "$1" in
    live_training.py) echo "--steps 40 --db $tmp/live.db --metrics-port 0" ;;
    multiprocess_training.py) echo "--num-processes 2 --steps 20 --metrics-port $(free_port_pair)" ;;
    *) echo "" ;;
  esac
}

shopt -s nullglob
examples=("$here"/*.py)
if [[ ${#examples[@]} -eq 0 ]]; then
  echo "run_all.sh: no examples found in $here" >&2
  exit 1
fi

count=0
for path in "${examples[@]}"; do
  name="$(basename "$path")"
  args="$(args_for "$name")"
  if [[ $list -eq 1 ]]; then
    echo "$name${args:+ $args}"
    continue
  fi
  count=$((count + 1))
  echo "=== [$count/${#examples[@]}] $name${args:+ $args}"
  start=$SECONDS
  # shellcheck disable=SC2086  # args are simple words, split on purpose
  if ! "$py" "$path" $args; then
    echo "run_all.sh: FAILED: $name" >&2
    exit 1
  fi
  echo "=== ok: $name ($((SECONDS - start)) s)"
done
if [[ $list -eq 0 ]]; then
  echo "run_all.sh: all $count examples passed"
fi
