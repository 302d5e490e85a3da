"""Online FP8 / MXFP4 quantization for diffusion transformers, in plain PyTorch (+ Triton).

This package never imports ComfyUI (tests/unit/test_layering.py enforces it) and uses only
relative imports, so it works both as the top-level `quant` (CLI, tests) and as
`<pack>.quant` inside ComfyUI.
"""
