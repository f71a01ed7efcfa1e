#!/usr/bin/env bash
# awsfun: deploy, inspect or remove the pipeline (./deploy.sh --help).
#
# All the logic is in deploy.py (boto3, tested on moto); this wrapper only finds a
# Python 3 with boto3 and hands it every argument. Set PYTHON to choose the interpreter.
set -euo pipefail

on_exit() {
  local status=$?
  if ((status != 0)); then
    printf 'deploy.sh: stopped with status %s before deploy.py ran\n' "$status" >&2
  fi
}

# find_python: print $PYTHON if set, else the first of python3, python that is
# Python 3.9+ and can import boto3.
find_python() {
  local candidate
  local -a candidates=(python3 python)
  if [[ -n "${PYTHON:-}" ]]; then
    candidates=("$PYTHON")
  fi
  for candidate in "${candidates[@]}"; do
    command -v "$candidate" >/dev/null 2>&1 || continue
    if "$candidate" -c 'import sys, boto3; sys.exit(sys.version_info < (3, 9))' >/dev/null 2>&1; then
      printf '%s\n' "$candidate"
      return 0
    fi
  done
  return 1
}

main() {
  local here python
  here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
  if ! python="$(find_python)"; then
    printf 'deploy.sh: needs Python 3.9+ with boto3: pip install -r %s, or set PYTHON\n' \
      "$here/requirements.txt" >&2
    return 127
  fi
  # exec: deploy.py's exit status and signals reach the caller unchanged.
  exec "$python" "$here/deploy.py" "$@"
}

trap on_exit EXIT
main "$@"
