"""cuDNN graphs of the `cudnn_fp8` attention (quant/attention/cudnn_fp8.py holds the scheme, the
pre-pass and the entry point): building and caching one FP8 SDPA graph per (shapes, strides,
dtype, device, descale shapes), and the variant pack it executes with.

The frontend's per-call host work is not what bounds the short Z-Image call: passing the pack as
bare device addresses, or replaying the cuDNN call from a CUDA graph, measured no faster (H200;
docs/benchmarks.md), so neither is kept.

`cudnn` is passed in by the caller (the seam in cudnn_fp8.py), never imported here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from ..constants import FP8_E4M3FN_MAX as FP8_MAX  # largest finite float8_e4m3fn

if TYPE_CHECKING:
    from .cudnn_fp8 import FP8QKV

SCALE_S = FP8_MAX  # P is in [0, 1]: its largest value maps to the top of the e4m3 range


@dataclass
class CudnnGraph:
    """One built cuDNN graph, its tensor handles by role, and its workspace."""

    graph: Any
    tensors: dict[str, Any]
    workspace: torch.Tensor


_GRAPHS: dict[tuple, CudnnGraph] = {}
_HANDLES: dict[str, Any] = {}
_CONSTS: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}


def clear_graph_cache() -> None:
    _GRAPHS.clear()
    _HANDLES.clear()
    _CONSTS.clear()


def graph_cache_size() -> int:
    return len(_GRAPHS)


def _layout(t: torch.Tensor) -> tuple:
    return tuple(t.shape), tuple(t.stride())


def graph_key(x: FP8QKV, o8: torch.Tensor, attn_scale: float) -> tuple:
    """What a built graph depends on: every shape and stride (the layout), the dtypes, the
    device, the descale shapes and the softmax scale baked into the graph."""
    tensors = (x.q, x.k, x.v, o8, x.descale_q, x.descale_k, x.descale_v)
    return (*(_layout(t) for t in tensors), x.q.dtype, o8.dtype, str(x.q.device), attn_scale)


def handle_for(cudnn: Any, device: torch.device) -> Any:
    h = _HANDLES.get(str(device))
    if h is None:
        h = _HANDLES[str(device)] = cudnn.create_handle()
    if device.type == "cuda":  # run on PyTorch's current stream, so no extra synchronisation
        cudnn.set_stream(handle=h, stream=torch.cuda.current_stream(device).cuda_stream)
    return h


def build_graph(cudnn: Any, x: FP8QKV, o8: torch.Tensor, attn_scale: float, handle: Any) -> CudnnGraph:
    """Build and plan the FP8 SDPA graph for these tensors' shapes and strides."""
    e4m3, f32 = cudnn.data_type.FP8_E4M3, cudnn.data_type.FLOAT
    graph = cudnn.pygraph(io_data_type=e4m3, intermediate_data_type=f32, compute_data_type=f32, handle=handle)

    def tensor(name: str, t: torch.Tensor, dtype: Any) -> Any:
        return graph.tensor(name=name, dim=list(t.shape), stride=list(t.stride()), data_type=dtype)

    one = torch.empty((1, 1, 1, 1))
    ts = {
        "q": tensor("q", x.q, e4m3),
        "k": tensor("k", x.k, e4m3),
        "v": tensor("v", x.v, e4m3),
        "descale_q": tensor("descale_q", x.descale_q, f32),
        "descale_k": tensor("descale_k", x.descale_k, f32),
        "descale_v": tensor("descale_v", x.descale_v, f32),
        "descale_s": tensor("descale_s", one, f32),
        "scale_s": tensor("scale_s", one, f32),
        "scale_o": tensor("scale_o", one, f32),
    }
    o, _stats, amax_s, amax_o = graph.sdpa_fp8(
        q=ts["q"], k=ts["k"], v=ts["v"],
        descale_q=ts["descale_q"], descale_k=ts["descale_k"], descale_v=ts["descale_v"],
        descale_s=ts["descale_s"], scale_s=ts["scale_s"], scale_o=ts["scale_o"],
        is_inference=True, attn_scale=attn_scale, use_causal_mask=False, name="sdpa_fp8",
    )  # fmt: skip
    o.set_output(True).set_dim(list(o8.shape)).set_stride(list(o8.stride())).set_data_type(e4m3)
    for a in (amax_s, amax_o):  # cuDNN computes them; we read neither but must give them memory
        a.set_output(True).set_dim([1, 1, 1, 1]).set_stride([1, 1, 1, 1]).set_data_type(f32)
    ts.update(o=o, amax_s=amax_s, amax_o=amax_o)
    graph.validate()
    graph.build_operation_graph()
    graph.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
    graph.check_support()
    graph.build_plans()
    workspace = torch.empty(graph.get_workspace_size(), dtype=torch.uint8, device=o8.device)
    return CudnnGraph(graph, ts, workspace)


def cached_graph(cudnn: Any, x: FP8QKV, o8: torch.Tensor, attn_scale: float) -> tuple[CudnnGraph, Any]:
    """(the graph for these tensors, built on first use, and the device's handle bound to
    PyTorch's current stream)."""
    key = graph_key(x, o8, attn_scale)
    handle = handle_for(cudnn, o8.device)
    g = _GRAPHS.get(key)
    if g is None:
        g = _GRAPHS[key] = build_graph(cudnn, x, o8, attn_scale, handle)
    return g, handle


def _softmax_consts(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    c = _CONSTS.get(str(device))
    if c is None:  # (descale_s, scale_s), made once per device: no host-to-device copy per call
        c = _CONSTS[str(device)] = (
            torch.full((1, 1, 1, 1), 1.0 / SCALE_S, device=device),
            torch.full((1, 1, 1, 1), SCALE_S, device=device),
        )
    return c


def make_pack(g: CudnnGraph, x: FP8QKV, o8: torch.Tensor, amax: torch.Tensor) -> dict:
    """The variant pack: graph tensor -> memory. FP8 goes in as uint8 views (same memory and
    strides): cudnn-frontend reads only the data pointer, and some torch versions can't export
    float8 through DLPack."""
    t, b8 = g.tensors, torch.uint8
    descale_s, scale_s = _softmax_consts(o8.device)
    return {
        t["q"]: x.q.view(b8), t["k"]: x.k.view(b8), t["v"]: x.v.view(b8),
        t["descale_q"]: x.descale_q, t["descale_k"]: x.descale_k, t["descale_v"]: x.descale_v,
        t["descale_s"]: descale_s, t["scale_s"]: scale_s, t["scale_o"]: x.scale_o,
        t["o"]: o8.view(b8), t["amax_s"]: amax[0], t["amax_o"]: amax[1],
    }  # fmt: skip
