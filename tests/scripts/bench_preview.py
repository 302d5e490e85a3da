"""Latency of the web preview route on full-size headers (a real ComfyUI server, loopback HTTP).

    python3 tests/scripts/bench_preview.py

Five sparse Wan 2.1/2.2 14B files (28.6 GB each on paper, header only on disk; no weights) in a
temp models folder; each is asked once cold (header parse + plan) and once with a new ignore
text (header cached). Prints medians; no assertion (speed is measured, not tested).
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "support"))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from comfy_server import start_comfy_server  # noqa: E402
from conftest import find_comfyui  # noqa: E402
from helpers_sparse import write_sparse_safetensors  # noqa: E402

from quant.bench.toy_model import reference_shapes  # noqa: E402


def main(n: int = 5) -> None:
    path, how = find_comfyui()
    if path is None:
        sys.exit(how)
    srv = start_comfy_server(path, Path(tempfile.mkdtemp(prefix="oq-bench-")))
    try:
        d = srv.models_dir / "diffusion_models"
        for i in range(n):
            write_sparse_safetensors(d / f"wan14b_{i}.safetensors", reference_shapes("wan21_t2v_14b"))
        cold, warm = [], []
        for i in range(n):
            t = time.perf_counter()
            status, body = srv.request(f"/api/onlinequant/plan?model=wan14b_{i}.safetensors&format=mxfp4")
            cold.append(time.perf_counter() - t)
            assert status == 200, body
            t = time.perf_counter()
            status, body = srv.request(
                f"/api/onlinequant/plan?model=wan14b_{i}.safetensors&format=fp8_e4m3fn&ignore=blocks.3"
            )
            warm.append(time.perf_counter() - t)
            assert status == 200, body
        info = json.loads(body)
        print(
            f"Wan 14B header: file {info['header']['file_size'] / 1e9:.1f} GB, "
            f"{info['header']['tensors']} tensors, {info['counts']['layers']} Linear layers"
        )
        print(
            f"cold (read header + plan): median {statistics.median(cold) * 1000:.0f} ms, "
            f"max {max(cold) * 1000:.0f} ms"
        )
        print(f"cached header, new ignore text: median {statistics.median(warm) * 1000:.0f} ms")
    finally:
        srv.stop()


if __name__ == "__main__":
    main()
