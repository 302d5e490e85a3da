#!/usr/bin/env bash
# Installs the requirements of the ComfyUI checkout the tests will use (found as tests/conftest.py
# finds it: COMFYUI_PATH, the custom_nodes layout, ~/comfy/ComfyUI), torch and torchvision held at
# requirements-test.txt's pins, so the ComfyUI tests run instead of skipping. Does nothing when no
# checkout is found, or when ONLINEQUANT_NO_INSTALL=1. Used by tests/run.sh and .ci/run.
# ONLINEQUANT_PINS names another constraints file (.ci/run's older-torch run holds its own torch).
set -euo pipefail
cd "$(dirname "$0")/../.."
[ "${ONLINEQUANT_NO_INSTALL:-0}" = 1 ] && exit 0
comfy="${COMFYUI_PATH:-}"
if [ -z "$comfy" ] && [ "$(basename "$(dirname "$PWD")")" = custom_nodes ]; then comfy="$(dirname "$(dirname "$PWD")")"; fi
if [ -z "$comfy" ] && [ -f "$HOME/comfy/ComfyUI/comfy/ops.py" ]; then comfy="$HOME/comfy/ComfyUI"; fi
[ -n "$comfy" ] && [ -f "$comfy/requirements.txt" ] || exit 0
req="$(mktemp)"
trap 'rm -f "$req"' EXIT
grep -v -E '^\s*(torch|torchvision|torchaudio)\s*$' "$comfy/requirements.txt" > "$req"
# ComfyUI 0.8.0's server (app/frontend_management.py) imports requests without listing it
echo requests >> "$req"
# a no-op (a few seconds) once they are there
if ! PIP_ROOT_USER_ACTION=ignore python3 -m pip install -q -r "$req" -c "${ONLINEQUANT_PINS:-requirements-test.txt}"; then
  echo "could not install the requirements of ComfyUI at $comfy: the ComfyUI tests will skip, saying why" >&2
fi
