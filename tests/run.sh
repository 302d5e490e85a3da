#!/usr/bin/env bash
# The README's test command. Triton kernels run on the CPU through the interpreter.
set -euo pipefail
cd "$(dirname "$0")/.."
export TRITON_INTERPRET=1
exec python3 -m pytest -q "$@"
