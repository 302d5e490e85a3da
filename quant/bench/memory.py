"""Memory while loading: peak host RAM (and peak VRAM on a GPU) of ComfyUI's plain loader against
this pack's loader with FP8 and MXFP4, on a synthetic Wan 2.2 TI2V 5B-shaped bf16 checkpoint.

    python -m quant.bench --sections memory [--memory-blocks 30] [--memory-dir /tmp]
    python -m quant.bench.memory --blocks 4          # the same, standalone

The checkpoint has the exact tensor names and shapes of ComfyUI's own WanModel (built on the meta
device with the Wan 2.2 5B config) with `--memory-blocks` of its 30 blocks (30 = the full 10 GB
file) and random values (no weights can be downloaded); it is written tensor by tensor into a
temporary folder and deleted afterwards. Each load runs in a fresh process (multiprocessing
"spawn"), so every number is that load's own peak:
- peak RSS: the kernel's high-water mark (ru_maxrss), which counts the pages of the memory-mapped
  checkpoint that were touched as well as the process's own memory;
- peak anonymous RSS: sampled from /proc/self/status every 5 ms (Linux): the process's own
  memory (model weights, copies), what actually competes with other programs for RAM;
- peak VRAM (CUDA only): torch.cuda.max_memory_allocated from the start of the load until the
  model sits on the GPU (ComfyUI's plain load builds it on the CPU, then it is moved; ours
  quantizes each layer on the GPU as it loads, so the bound is the quantized model + one bf16 weight).
This module imports ComfyUI and the pack's nodes lazily, inside the child processes only, as
quant/bench/models.py does.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import math
import multiprocessing as mp
import os
import resource
import struct
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

log = logging.getLogger(__name__)

WAN5B_BLOCKS = 30
# "comfyui" = ComfyUI's plain load_diffusion_model; "<format>_cached" = the loader with its quantized
# cache on, timed on a hit (a first, untimed load in the same process fills the cache)
LOADS = ("comfyui", "fp8_e4m3fn", "mxfp4", "fp8_e4m3fn_cached", "mxfp4_cached")


def add_args(parser) -> None:
    parser.add_argument(
        "--memory-blocks",
        type=int,
        default=None,
        help="Wan 5B blocks in the synthetic file (30 = full 10 GB; default 30, --quick 2)",
    )
    parser.add_argument("--memory-dir", default=None, help="where to write the temporary checkpoint")
    parser.add_argument(
        "--memory-file",
        default=None,
        help="keep the synthetic checkpoint at this path (written if missing, reused if there) "
        "instead of a temporary one, so several runs share one write",
    )
    parser.add_argument("--memory-loads", default=",".join(LOADS), help=f"comma list of {', '.join(LOADS)}")
    parser.add_argument(
        "--memory-cache",
        default="warm",
        help="page-cache states to time each load in: comma list of cold (the files read are evicted "
        "from the page cache first, as after a reboot) and warm (read before, as on a model switch)",
    )
    parser.add_argument(
        "--memory-profile",
        default=None,
        help="folder: each load also writes a cProfile summary there (where the time goes)",
    )


# ---------------------------------------------------------------- the synthetic checkpoint


def wan22_5b_shapes(blocks: int) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """{name: (shape, dtype)} of ComfyUI's WanModel with the Wan 2.2 5B config and `blocks` blocks."""
    from .models import WAN5B, _cls, _comfy

    comfy = _comfy()
    cls = _cls("comfy.ldm.wan.model:WanModel")
    cfg = dict(WAN5B, num_layers=blocks)
    with torch.device("meta"):
        model = cls(**cfg, device="meta", dtype=torch.bfloat16, operations=comfy.ops.disable_weight_init)
    return {k: (tuple(v.shape), v.dtype) for k, v in model.state_dict().items()}


_ST = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}


def write_checkpoint(path: Path, shapes: dict, seed: int = 0) -> int:
    """Write a bf16 safetensors file tensor by tensor (never the whole state dict in memory)."""
    header, pos = {}, 0
    for name, (shape, dtype) in shapes.items():
        dtype = torch.bfloat16 if dtype.is_floating_point else dtype
        n = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        header[name] = {"dtype": _ST[dtype], "shape": list(shape), "data_offsets": [pos, pos + n]}
        pos += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    g = torch.Generator().manual_seed(seed)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for name, (shape, _) in shapes.items():
            numel = math.prod(shape)
            # Weights ~U(-0.05, 0.05) (the scale of real DiT weights); norms/scales near 1.
            lo, hi = (0.9, 1.1) if ("norm" in name or name.endswith("modulation")) else (-0.05, 0.05)
            for start in range(0, numel, 1 << 26):  # 128 MB of bf16 at a time
                chunk = torch.empty(min(1 << 26, numel - start)).uniform_(lo, hi, generator=g)
                f.write(chunk.to(torch.bfloat16).view(torch.uint16).numpy().tobytes())
        f.flush()
        os.fsync(f.fileno())  # dirty pages can't be evicted: a cold load must find none
    return os.path.getsize(path)


def _has_shapes(path: Path, shapes: dict) -> bool:
    """Whether a kept checkpoint is whole and holds exactly these tensors (another --memory-blocks,
    or a file cut short by an interrupted write, is rewritten)."""
    from ..checkpoint.reader import read_header
    from ..errors import CheckpointError

    try:
        header = read_header(path)
    except CheckpointError:
        return False
    return {k: e.shape for k, e in header.tensors.items()} == {k: v[0] for k, v in shapes.items()}


CACHE_STATES = ("cold", "warm")


def evict_page_cache(*paths: str) -> None:
    """Drop these files' pages from the OS page cache (posix_fadvise DONTNEED: no root needed,
    unlike /proc/sys/vm/drop_caches), so the next read comes from the disk. Written pages are
    synced first; a file some process still maps keeps its mapped pages. No-op off POSIX."""
    if not hasattr(os, "posix_fadvise"):
        return
    os.sync()
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


# ---------------------------------------------------------------- measurement in a child


def _status_kib(fields=("VmRSS", "RssAnon", "RssFile")) -> dict[str, int]:
    out = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in fields:
                    out[key] = int(rest.split()[0])
    except OSError:
        pass
    return out


def _child(
    kind: str, path: str, device: str, queue, profile_dir: str | None = None, cache_state: str = "warm"
) -> None:
    peaks = {"RssAnon": 0, "RssFile": 0, "VmRSS": 0}
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            for k, v in _status_kib().items():
                peaks[k] = max(peaks[k], v)
            stop.wait(0.005)

    try:
        from .models import _comfy, _nbytes, _pack

        _comfy()
        import comfy.sd

        cached = kind.endswith("_cached")
        fmt = kind.removesuffix("_cached")
        qdev = "cuda" if device == "cuda" else None  # on a GPU, quantize there as layers arrive
        if cached:
            import tempfile

            folder = tempfile.mkdtemp(prefix="oq-cache-", dir=os.path.dirname(path))
            cache = _pack("nodes.load_cache")

            def load():
                return cache.load_cached(
                    path, fmt, None, compute_dtype="bf16", quantize_device=qdev, folder=folder
                )

            fill, _ = load()  # a miss: quantizes and writes the cache file (not timed)
            del fill
            gc.collect()
            if device == "cuda":
                torch.cuda.empty_cache()
        if cache_state == "cold":  # every file this load reads: the source, and a cache hit's file
            extra = [str(f) for f in Path(folder).rglob("*") if f.is_file()] if cached else []
            evict_page_cache(path, *extra)
        base = _status_kib()
        t = threading.Thread(target=sample, daemon=True)
        t.start()
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        prof = None
        if profile_dir:
            import cProfile

            prof = cProfile.Profile()
            prof.enable()
        t0 = time.perf_counter()
        records = None
        if kind == "comfyui":
            patcher = comfy.sd.load_diffusion_model(path, model_options={"dtype": torch.bfloat16})
        elif cached:
            patcher, report = load()
            if not any("no quantization" in n for n in report.notes):
                raise RuntimeError(f"the second load missed the cache: {report.notes}")
            records = report.layers
        else:
            loader = _pack("nodes.loader")
            patcher, report = loader.load_quantized(
                path, kind, None, compute_dtype="bf16", quantize_device=qdev
            )
            records = report.quantized()
        if device == "cuda":
            patcher.model.diffusion_model.to("cuda")
            torch.cuda.synchronize()
        load_s = time.perf_counter() - t0
        if prof is not None:
            import io
            import pstats

            prof.disable()
            buf = io.StringIO()
            pstats.Stats(prof, stream=buf).sort_stats("cumulative").print_stats(45)
            Path(profile_dir, f"profile_{kind}_{cache_state}.txt").write_text(buf.getvalue())
        stop.set()
        t.join()
        model = patcher.model.diffusion_model
        row = {
            "load": kind,
            "page_cache": cache_state,
            "weights_gib": _nbytes(model, records) / 2**30,
            # a cached row's first (filling) load is in the process's high-water mark: sampled peak
            "peak_rss_gib": (peaks["VmRSS"] if cached else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
            / 2**20,
            "peak_anon_gib": peaks["RssAnon"] / 2**20,
            "peak_file_gib": peaks["RssFile"] / 2**20,
            "anon_before_gib": base.get("RssAnon", 0) / 2**20,
            "load_s": load_s,
        }
        if device == "cuda":
            row["peak_vram_gib"] = torch.cuda.max_memory_allocated() / 2**30
        queue.put(row)
    except BaseException as e:  # report, don't hang the parent
        stop.set()
        queue.put({"load": kind, "page_cache": cache_state, "error": f"{type(e).__name__}: {str(e)[:300]}"})


def measure(
    path: str,
    kinds=LOADS,
    device: str = "cpu",
    profile_dir: str | None = None,
    cache_states=("warm",),
) -> list[dict]:
    """One fresh process per (load, page-cache state); a cold load evicts the files it reads
    first, a warm one follows a load that read them (the checkpoint was just written, or
    the cold run before it)."""
    ctx = mp.get_context("spawn")
    rows = []
    for kind in kinds:
        for state in cache_states:
            q = ctx.Queue()
            p = ctx.Process(target=_child, args=(kind, path, device, q, profile_dir, state))
            p.start()
            try:
                row = q.get(timeout=3600)
            except Exception as e:  # noqa: BLE001 - the child died (e.g. killed for memory)
                row = {"load": kind, "page_cache": state, "error": f"child exited with {p.exitcode} ({e!r})"}
            p.join(60)
            rows.append(row)
            log.info("memory %s (%s page cache): %s", kind, state, row)
            gc.collect()
    return rows


def run(args, device: torch.device) -> list[dict]:
    blocks = getattr(args, "memory_blocks", None) or (2 if getattr(args, "quick", False) else WAN5B_BLOCKS)
    kinds = [k for k in (getattr(args, "memory_loads", None) or ",".join(LOADS)).split(",") if k]
    states = [c for c in (getattr(args, "memory_cache", None) or "warm").split(",") if c]
    if bad := [c for c in states if c not in CACHE_STATES]:
        raise ValueError(f"--memory-cache {','.join(bad)}: choose from {', '.join(CACHE_STATES)}")
    keep = getattr(args, "memory_file", None)
    with tempfile.TemporaryDirectory(dir=getattr(args, "memory_dir", None)) as d:
        path = Path(keep or Path(d) / f"wan2.2_ti2v_5B_{blocks}blocks_synthetic_bf16.safetensors")
        shapes = wan22_5b_shapes(blocks)
        if keep and path.exists() and _has_shapes(path, shapes):
            size = path.stat().st_size
        else:
            t0 = time.perf_counter()
            size = write_checkpoint(path, shapes)
            log.info("memory: wrote %.2f GB in %.0f s", size / 1e9, time.perf_counter() - t0)
        profile = getattr(args, "memory_profile", None)
        if profile:
            Path(profile).mkdir(parents=True, exist_ok=True)
        rows = measure(str(path), kinds, device.type, profile, states)
    for r in rows:
        r.update(table="memory", file_gb=size / 1e9, blocks=blocks, device=device.type)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m quant.bench.memory", description=__doc__.split("\n\n")[0])
    ap.add_argument("--blocks", type=int, default=4)
    ap.add_argument("--dir", default=None)
    ap.add_argument("--loads", default=",".join(LOADS))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--cache", default="warm", help="comma list of cold, warm")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    ns = argparse.Namespace(
        memory_blocks=a.blocks, memory_dir=a.dir, memory_loads=a.loads, memory_cache=a.cache, quick=False
    )
    rows = run(ns, torch.device(a.device))
    keys = [
        "load",
        "page_cache",
        "file_gb",
        "weights_gib",
        "peak_rss_gib",
        "peak_anon_gib",
        "peak_file_gib",
        "load_s",
        "peak_vram_gib",
        "error",
    ]
    print("| " + " | ".join(keys) + " |")
    for r in rows:
        cells = [f"{r[k]:.2f}" if isinstance(r.get(k), float) else str(r.get(k, "")) for k in keys]
        print("| " + " | ".join(cells) + " |")
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
