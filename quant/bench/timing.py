"""Timing helpers: CUDA events through triton.testing.do_bench (median) on a GPU, a host clock
on the CPU (`--quick` CI runs only; CPU numbers mean nothing)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def bench_ms(fn: Callable[[], object], device: torch.device, warmup_ms: int = 25, rep_ms: int = 100) -> float:
    """Median milliseconds of fn() on `device`."""
    if device.type == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))
    fn()
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def host_us(fn: Callable[[], object], device: torch.device, calls: int = 200) -> float:
    """Microseconds of host (Python + launch) time per fn() call, the GPU not waited for: small
    layers are host-bound, and this is the time the host spends before the GPU can start the next
    layer. `calls` stays below the launch queue's depth, so a slower GPU never blocks the host."""
    fn()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    t1 = time.perf_counter()
    sync(device)
    return (t1 - t0) * 1e6 / calls


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def rel_l2(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in fp64 (what the issue calls error against bf16)."""
    o = out.double()
    r = ref.double()
    return float((o - r).norm() / r.norm().clamp_min(1e-30))


def env_info(device: torch.device) -> dict:
    info = {"torch": torch.__version__, "device": str(device)}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        info.update(
            gpu=p.name,
            sms=p.multi_processor_count,
            gpu_mem_gib=round(p.total_memory / 2**30, 1),
            cuda=torch.version.cuda,
            hip=torch.version.hip,
            capability=".".join(map(str, torch.cuda.get_device_capability(device))),
        )
    else:
        info["gpu"] = None
    return info
