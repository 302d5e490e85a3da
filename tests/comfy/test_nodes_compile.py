"""torch.compile of online-quantized models on the CPU: the quantized forward is torch.library
ops with fake implementations, so Dynamo captures a Wan block in one graph (fullgraph=True)
once attention is PyTorch SDPA (ComfyUI's CPU default attention reads psutil, a graph break
of ComfyUI's own, unrelated to quantization), and Inductor compiles a quantized Linear."""

from __future__ import annotations

import helpers_models as hm
import pytest
import torch
from torch._dynamo.backends.common import aot_autograd

pytestmark = [pytest.mark.comfyui, pytest.mark.slow]


@pytest.fixture(scope="module")
def wan_file(comfyui_path, tmp_path_factory):
    return hm.save_model(hm.wan_model(seed=4), tmp_path_factory.mktemp("wanc") / "wan_tiny.safetensors")


def _compile_first_block(pack, mp):
    """Block 0 of a loaded Wan model run eagerly and compiled (fullgraph, PyTorch SDPA) through
    AOTAutograd: (eager output, compiled output, the call nodes of the graphs Inductor would get).
    The caller unloads the model and resets Dynamo."""
    import comfy.model_management

    comfy.model_management.load_models_gpu([mp])
    dm = mp.model.diffusion_model
    blk = dm.blocks[0]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 16, hm.WAN_DIM, generator=g).bfloat16()
    e = torch.randn(1, 6, hm.WAN_DIM, generator=g).bfloat16()
    ctx = torch.randn(1, 12, hm.WAN_DIM, generator=g).bfloat16()
    freqs = dm.rope_encode(1, 8, 8, device=x.device, dtype=x.dtype)
    topts = {"optimized_attention_override": pack.nodes.attention.AttentionOverride("sdpa")}
    kw = dict(e=e, freqs=freqs, context=ctx, transformer_options=topts)
    graphs = []

    def keep_graph(gm, example_inputs):
        graphs.append(gm)
        return gm

    torch._dynamo.reset()
    with torch.no_grad():
        ref = blk(x, **kw)
        out = torch.compile(blk, fullgraph=True, backend=aot_autograd(fw_compiler=keep_graph))(x, **kw)
    return ref, out, [n for gm in graphs for n in gm.graph.nodes if n.op == "call_function"]


# activations quantized (W8A8 / W4A8, emulated on the CPU): the graph shows whether the quantized
# matmul was traced, since only it converts activations to float8
@pytest.mark.parametrize("fmt,compute", [("fp8_e4m3fn", "w8a8"), ("mxfp4", "w4a8")])
def test_compile_quantized_block_fullgraph_and_linear_inductor(pack, wan_file, fmt, compute):
    import comfy.model_management

    hm.import_submodules(pack, "nodes.loader", "nodes.attention", "nodes.layouts")
    mp, _ = pack.nodes.loader.load_quantized(str(wan_file), fmt, "", compute_dtype="bf16", compute=compute)
    blk = mp.model.diffusion_model.blocks[0]
    assert pack.nodes.layouts.is_online_quant(blk.self_attn.q.weight)
    try:
        ref, out, nodes = _compile_first_block(pack, mp)
        # the traced graph decomposes ops (linear -> mm) as eager does not: equal up to rounding
        assert hm.rel_err(ref, out) < 1e-2
        # the quantized matmuls are plain ops in the graph (no opaque op), for Inductor to fuse
        assert nodes and not [n for n in nodes if "onlinequant" in str(n.target)]
        # ... and they are the quantized matmul, not a dequantize-then-matmul fallback: F.linear
        # on the weight decomposes to t + addmm before the weight's layout sees it, and those
        # dequantize it; only the quantized matmul converts activations to float8
        to_fp8 = [n for n in nodes if n.kwargs.get("dtype") == torch.float8_e4m3fn]
        assert len(to_fp8) >= 6, [str(n.target) for n in nodes]  # q, k, v, o, ffn.0, ffn.2 at least

        lin = blk.ffn[0]
        xx = torch.randn(3, 5, hm.WAN_DIM, generator=torch.Generator().manual_seed(1)).bfloat16()
        torch._dynamo.reset()
        with torch.no_grad():
            got = torch.compile(lin, fullgraph=True)(xx)
        assert hm.rel_err(lin(xx), got) < 1e-2
    finally:
        torch._dynamo.reset()
        comfy.model_management.unload_all_models()


@pytest.mark.parametrize("fmt", ["fp8_e4m3fn", "mxfp4"])
def test_compiled_weights_only_layers_are_one_dequantize_and_one_matmul(pack, wan_file, fmt, monkeypatch):
    """`weights-only:` layers (Wan's attention by default) in a compiled block: each is one whole-
    weight dequantize and one matmul in the graph Inductor gets. Row chunks written into one
    buffer (how the reference bounds its memory) become slice_scatter passes over the whole
    output there, which made a compiled Wan 2.2 5B step slower than eager on an H100. The chunk
    sizes are shrunk so that chunking would show at test size."""
    import comfy.model_management

    hm.import_submodules(pack, "nodes.loader", "nodes.attention", "nodes.layouts", "quant.matmul.reference")
    for module in (pack.quant.matmul.reference, pack.quant.formats.fp8, pack.quant.formats.mxfp4):
        monkeypatch.setattr(module, "_CHUNK_ELEMS", 64)
    plan = "weights-only: self_attn\nweights-only: cross_attn"
    mp, rep = pack.nodes.loader.load_quantized(str(wan_file), fmt, plan, compute_dtype="bf16")
    assert sum(r.compute.endswith("a16") for r in rep.quantized()) >= 6
    try:
        ref, out, nodes = _compile_first_block(pack, mp)
        assert hm.rel_err(ref, out) < 1e-2
        aten = torch.ops.aten
        names = [str(n.target) for n in nodes]
        matmuls = [n for n in nodes if n.target in (aten.mm.default, aten.addmm.default, aten.bmm.default)]
        assert len(matmuls) >= 10, names  # self and cross q, k, v, o; ffn.0 and ffn.2
        assert aten.slice_scatter.default not in [n.target for n in nodes], names
    finally:
        torch._dynamo.reset()
        comfy.model_management.unload_all_models()


def test_compiled_quantized_linear_passes_gradients_to_its_input(pack, wan_file):
    """Adapters trained in front of a quantized layer need d/dx through it, compiled too: the
    compiled forward's op has no backward, so with a gradient wanted the layer takes F.linear on
    the dequantized weight, and the gradient equals eager's (straight-through for activations)."""
    import comfy.model_management

    hm.import_submodules(pack, "nodes.loader", "nodes.layouts")
    mp, _ = pack.nodes.loader.load_quantized(str(wan_file), "fp8_e4m3fn", "", compute_dtype="bf16")
    comfy.model_management.load_models_gpu([mp])
    lin = mp.model.diffusion_model.blocks[0].ffn[0]
    assert pack.nodes.layouts.is_online_quant(lin.weight)
    x = torch.randn(3, 5, hm.WAN_DIM, generator=torch.Generator().manual_seed(1)).bfloat16()
    xc, xe = x.clone().requires_grad_(), x.clone().requires_grad_()
    torch._dynamo.reset()
    try:
        torch.compile(lin, fullgraph=True)(xc).float().square().sum().backward()
        lin(xe).float().square().sum().backward()
        assert xc.grad is not None and hm.rel_err(xe.grad, xc.grad) < 2e-2
    finally:
        torch._dynamo.reset()
        comfy.model_management.unload_all_models()


@pytest.mark.parametrize("family", ["zimage", "wan"])
def test_whole_quantized_model_compiles_to_one_graph(pack, comfyui_path, tmp_path, family):
    """The whole diffusion model (Z-Image / Wan at test size, FP8 W8A8 on its default layers) under
    torch.compile, inference mode, as ComfyUI samples: one graph, no graph break at the quantized
    layers or anywhere else once attention is SDPA, and the eager result."""
    import comfy.model_management
    from torch._dynamo.utils import counters

    hm.import_submodules(pack, "nodes.loader", "nodes.attention")
    models = {"zimage": (hm.zimage_model, hm.zimage_inputs), "wan": (hm.wan_model, hm.wan_inputs)}
    make, inputs = models[family]
    path = hm.save_model(make(seed=4), tmp_path / f"{family}.safetensors")
    with hm.zimage_detection():
        mp, rep = pack.nodes.loader.load_quantized(
            str(path), "fp8_e4m3fn", None, compute_dtype="bf16", compute="w8a8"
        )
    assert rep.quantized()
    comfy.model_management.load_models_gpu([mp])
    dm = mp.model.diffusion_model
    topts = {"optimized_attention_override": pack.nodes.attention.AttentionOverride("sdpa")}
    counters.clear()
    torch._dynamo.reset()
    try:
        with torch.inference_mode():
            ref = dm(**inputs(), transformer_options=topts)
            out = torch.compile(dm, backend="aot_eager")(**inputs(), transformer_options=topts)
        assert not counters["graph_break"], dict(counters["graph_break"])
        assert counters["stats"]["unique_graphs"] == 1
        assert hm.rel_err(ref, out) < 2e-2
    finally:
        torch._dynamo.reset()
        comfy.model_management.unload_all_models()
