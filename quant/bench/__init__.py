"""`python -m quant.bench`: side-by-side speed, bytes and error of bf16, ComfyUI's unscaled FP8 and
this pack's FP8 / MXFP4 paths, at the real shapes of Z-Image and Wan (random weights).

Sections are modules listed in SECTIONS; each exposes `run(args, device) -> list[dict]` (one dict
per table row, with a "table" key naming the table the row belongs to) and may expose
`add_args(parser)`. A section whose module is missing or whose optional dependency does not import
is skipped with its reason recorded. To add one: drop `quant/bench/<name>.py` with `run` and append
its name here.
"""

from __future__ import annotations

# (name, module relative to this package). Order = order of the report.
SECTIONS: list[tuple[str, str]] = [
    ("gemm", ".gemm"),
    ("tune", ".tune"),
    ("models", ".models"),
    ("attention", ".attention"),
    ("memory", ".memory"),
]
DEFAULT_SECTIONS = ("gemm", "models", "attention", "memory")
