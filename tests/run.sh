#!/usr/bin/env bash
# The README's test command. Triton kernels run on the CPU through the interpreter.
set -euo pipefail
cd "$(dirname "$0")/.."
export TRITON_INTERPRET=1
# where a ComfyUI checkout is found, its requirements (torch pinned) so its tests run, not skip
bash tests/scripts/comfy_requirements.sh
exec python3 -m pytest -q "$@"
