"""torch.library ops and backend selection (CPU; GPU capabilities monkeypatched)."""

from __future__ import annotations

import importlib.util
import sys

import pytest
import torch

from quant.errors import BackendUnavailableError
from quant.formats import get_format
from quant.matmul import op as ops
from quant.matmul import registry as backends
from quant.matmul.backends import scaled_mm
from quant.matmul.linear import quantized_linear
from quant.matmul.reference import reference_linear
from quant.matmul.registry import Backend, BackendChoice, choose_backend, register_backend, unregister_backend


class TinyQuantModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.a = get_format("fp8").quantize(torch.randn(64, 32, generator=g))
        self.b = get_format("mxfp4").quantize(torch.randn(32, 64, generator=g))
        self.bias = torch.randn(32, generator=g)

    def forward(self, x):
        h = torch.nn.functional.gelu(quantized_linear(x, self.a, compute="w8a8"))
        return quantized_linear(h, self.b, self.bias)


def test_ops_registered_and_fake():
    assert ops.linear_op("fp8") is torch.ops.onlinequant.fp8_linear
    assert ops.linear_op("mxfp4") is torch.ops.onlinequant.mxfp4_linear
    qw = get_format("mxfp4").quantize(torch.randn(16, 64))
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        x = torch.empty(3, 4, 64, dtype=torch.bfloat16)
        out = torch.ops.onlinequant.mxfp4_linear(
            x, mode.from_tensor(qw.qdata), mode.from_tensor(qw.scale), None, "mxfp4", "auto", ""
        )
        assert out.shape == (3, 4, 16) and out.dtype == torch.bfloat16


def test_opcheck():
    x = torch.randn(4, 64)
    qm = get_format("mxfp4").quantize(torch.randn(16, 64))
    torch.library.opcheck(
        torch.ops.onlinequant.mxfp4_linear, (x, qm.qdata, qm.scale, None, "mxfp4", "w4a4", "")
    )
    # opcheck's schema test compares fp8 inputs with allclose, which CPU fp8 lacks: fake + AOT only
    qw = get_format("fp8").quantize(torch.randn(16, 64))
    torch.library.opcheck(
        torch.ops.onlinequant.fp8_linear,
        (x, qw.qdata, qw.scale, torch.randn(16), "fp8_e4m3fn", "w8a8", ""),
        test_utils=("test_faketensor", "test_aot_dispatch_dynamic"),
    )


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph(backend):
    m = TinyQuantModel()
    x = torch.randn(2, 5, 32)
    eager = m(x)
    torch._dynamo.reset()
    compiled = torch.compile(m, fullgraph=True, backend=backend)
    torch.testing.assert_close(compiled(x), eager)


def test_double_import_reuses_ops():
    """The package imported again under another name must not re-register."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[2] / "quant"
    name = "oq_second_copy_quant"
    spec = importlib.util.spec_from_file_location(
        name, root / "__init__.py", submodule_search_locations=[str(root)]
    )
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    try:
        spec.loader.exec_module(mod)
        ops2 = importlib.import_module(f"{name}.matmul.op")
        lin2 = importlib.import_module(f"{name}.matmul.linear")
        fmt2 = importlib.import_module(f"{name}.formats")
        assert ops2.linear_op("fp8") is torch.ops.onlinequant.fp8_linear
        qw = fmt2.get_format("fp8").quantize(torch.randn(8, 32))
        assert lin2.quantized_linear(torch.randn(2, 32), qw).shape == (2, 8)
    finally:
        for k in [k for k in sys.modules if k == name or k.startswith(name + ".")]:
            del sys.modules[k]


# --- backend selection ------------------------------------------------------------------------


@pytest.fixture
def builtin_only(monkeypatch):
    """Only the built-in backends (the Triton plug-ins register above them)."""
    monkeypatch.setattr(
        backends, "_BACKENDS", {b.name: b for b in (*backends.BUILTIN_BACKENDS, *scaled_mm.BACKENDS)}
    )
    monkeypatch.setattr(backends, "_plugins_loaded", True)
    backends.clear_cache()
    yield
    backends.clear_cache()


@pytest.fixture
def fake_gpu(monkeypatch, builtin_only):
    """Pretend cuda:0 is a GPU of the given kind: fake('nvidia', (9, 0)) / fake('amd', (9, 4), 'gfx942')."""

    def fake(vendor: str, cap: tuple[int, int], arch: str = ""):
        monkeypatch.setattr(backends, "_is_rocm", lambda: vendor == "amd")
        monkeypatch.setattr(backends, "_cuda_capability", lambda index: cap)
        monkeypatch.setattr(backends, "_rocm_arch", lambda index: arch)
        backends.clear_cache()
        return torch.device("cuda", 0)

    yield fake
    backends.clear_cache()


def test_cpu_uses_reference_with_reason(builtin_only):
    c = choose_backend("fp8_e4m3fn", "cpu")
    assert isinstance(c, BackendChoice)
    assert c.name == "reference" and c.compute == "w8a16"
    assert "cpu" in c.describe() and "scaled_mm" in c.describe()
    c = choose_backend("mxfp4", torch.device("cpu"), "w4a4")
    assert c.name == "reference" and c.compute == "w4a4" and "emulation" in c.reason


def test_forced_backend_unavailable_names_package(builtin_only):
    with pytest.raises(BackendUnavailableError, match="scaled_mm.*install"):
        choose_backend("fp8", "cpu", backend="scaled_mm")
    with pytest.raises(ValueError, match="unknown backend"):
        choose_backend("fp8", "cpu", backend="nope")
    with pytest.raises(ValueError, match="compute mode"):
        choose_backend("fp8", "cpu", "w4a4")


@pytest.mark.parametrize(
    "vendor,cap,arch,fmt,expected",
    [
        ("nvidia", (9, 0), "", "fp8_e4m3fn", ("scaled_mm", "w8a8")),
        ("nvidia", (8, 9), "", "fp8_e4m3fn", ("scaled_mm", "w8a8")),
        ("nvidia", (12, 0), "", "fp8_e4m3fn_tensor", ("scaled_mm", "w8a8")),
        ("nvidia", (8, 0), "", "fp8_e4m3fn", ("reference", "w8a16")),  # A100: no FP8 cores
        ("nvidia", (9, 0), "", "fp8_e4m3fnuz", ("reference", "w8a16")),
        ("nvidia", (9, 0), "", "mxfp4", ("reference", "w4a16")),
        ("amd", (9, 4), "gfx942", "fp8_e4m3fnuz", ("scaled_mm", "w8a8")),
        ("amd", (9, 4), "gfx942", "fp8_e4m3fn", ("reference", "w8a16")),
        ("amd", (9, 5), "gfx950", "fp8_e4m3fn", ("scaled_mm", "w8a8")),
        ("amd", (9, 0), "gfx90a", "fp8_e4m3fn", ("reference", "w8a16")),
    ],
)
def test_gpu_dispatch(fake_gpu, vendor, cap, arch, fmt, expected):
    dev = fake_gpu(vendor, cap, arch)
    c = choose_backend(fmt, dev)
    assert (c.name, c.compute) == expected, c.reason
    if c.name == "reference":
        assert "scaled_mm" in c.describe()  # says why the faster path was not taken
        assert any(b.startswith("scaled_mm") for b, _ in c.skipped)  # as data, not only as text


def test_gpu_forced_compute_falls_back_with_reason(fake_gpu):
    dev = fake_gpu("nvidia", (9, 0))
    c = choose_backend("fp8", dev, "w8a16")
    assert c.name == "reference" and "runs w8a8, not w8a16" in c.describe()
    dev = fake_gpu("nvidia", (8, 0))
    c = choose_backend("fp8", dev, "w8a8")
    assert c.name == "reference" and c.compute == "w8a8" and "sm_89" in dict(c.skipped)["scaled_mm"]


def test_preferred_fp8_format(fake_gpu):
    assert backends.preferred_fp8_format("cpu") == "fp8_e4m3fn"
    assert backends.preferred_fp8_format(fake_gpu("amd", (9, 4), "gfx942")) == "fp8_e4m3fnuz"


def test_register_backend_plugs_in_by_priority(fake_gpu):
    calls = []

    def run(x, qw, bias, compute):
        calls.append(compute)
        return torch.zeros(*x.shape[:-1], qw.shape[0], dtype=x.dtype)

    plug = Backend(
        "test_gfx950_a4w4",
        ("mxfp4",),
        ("w4a4",),
        run,
        lambda info, fmt: (
            info.arch == "gfx950",
            "AITER gemm_a4w4" if info.arch == "gfx950" else "needs gfx950",
        ),
        priority=100,
        package="amd-aiter",
    )
    register_backend(plug)
    try:
        assert choose_backend("mxfp4", fake_gpu("amd", (9, 5), "gfx950")) == BackendChoice(
            "test_gfx950_a4w4", "w4a4", "AITER gemm_a4w4"
        )
        assert choose_backend("mxfp4", fake_gpu("amd", (9, 4), "gfx942")).name == "reference"
        with pytest.raises(BackendUnavailableError, match="amd-aiter"):
            choose_backend("mxfp4", "cpu", backend="test_gfx950_a4w4")
        with pytest.raises(ValueError, match="already registered"):
            register_backend(Backend("test_gfx950_a4w4", ("mxfp4",), ("w4a4",), run, plug.check))
        # a CPU backend registered with top priority is actually run by quantized_linear
        cpu_plug = Backend(
            "test_cpu", ("mxfp4",), ("w4a4",), run, lambda i, f: (i.type == "cpu", "test"), 200
        )
        register_backend(cpu_plug)
        backends.clear_cache()
        qw = get_format("mxfp4").quantize(torch.randn(8, 64))
        y = quantized_linear(torch.randn(3, 64), qw)
        assert calls == ["w4a4"] and y.eq(0).all()
    finally:
        unregister_backend("test_gfx950_a4w4")
        unregister_backend("test_cpu")
        backends.clear_cache()


def test_scaled_mm_arguments_layout():
    from quant.formats import fp8

    for fmt in ("fp8_e4m3fn", "fp8_e4m3fn_tensor"):
        qw = get_format(fmt).quantize(torch.randn(48, 64))
        xq, xs = fp8.quantize_activation(torch.randn(5, 64))
        a = scaled_mm.scaled_mm_args(xq, xs, qw)
        assert a["mat1"].shape == (5, 64) and a["mat1"].is_contiguous()
        assert a["mat2"].shape == (64, 48) and a["mat2"].stride() == (1, 64)  # column-major
        assert a["scale_a"].shape == (5, 1) and a["scale_a"].dtype == torch.float32
        assert a["scale_b"].shape == (1, 48) and a["scale_b"].dtype == torch.float32
        assert a["scale_b"].is_contiguous() and a["out_dtype"] == torch.bfloat16
        # the arguments describe the same product as the reference emulation
        prod = (a["mat1"].float() * a["scale_a"]) @ (a["mat2"].float() * a["scale_b"])
        ref = (xq.float() * xs) @ get_format(fmt).dequantize(qw, torch.float32).t()
        torch.testing.assert_close(prod, ref)


def test_scaled_mm_run_on_cpu_with_fake_scaled_mm(monkeypatch):
    """The scaled_mm backend's glue (reshape, bias, dtype) against the reference, with a CPU
    stand-in for torch._scaled_mm that does the row-wise-scaled product in fp32."""

    def fake_scaled_mm(a, b, scale_a, scale_b, out_dtype):
        assert a.dtype == b.dtype == torch.float8_e4m3fn and b.stride(0) == 1
        return ((a.float() @ b.float()) * scale_a * scale_b).to(out_dtype)

    monkeypatch.setattr(torch, "_scaled_mm", fake_scaled_mm)
    qw = get_format("fp8").quantize(torch.randn(48, 64))
    x = torch.randn(2, 3, 64, dtype=torch.float16)
    bias = torch.randn(48, dtype=torch.float16)
    y = backends.get_backend("scaled_mm").run(x, qw, bias, "w8a8")
    ref = quantized_linear(x, qw, bias, compute="w8a8")
    assert y.shape == (2, 3, 48) and y.dtype == torch.float16
    torch.testing.assert_close(y, ref, rtol=2e-2, atol=2e-2)


def test_scaled_mm_falls_back_when_rowwise_is_missing(monkeypatch):
    """Builds without row-wise scaling (pre-12.9 cuBLASLt off sm_90) raise: the backend then runs a
    unit-scale GEMM with fp32 output and applies both scales itself, with the same result."""
    calls = []

    def tensorwise_only(a, b, scale_a, scale_b, out_dtype):
        calls.append((scale_a.numel(), scale_b.numel(), out_dtype))
        if scale_a.numel() != 1 or scale_b.numel() != 1:
            raise RuntimeError("scaled_gemm with rowwise scaling is only supported for CUDA 12.9 and above")
        return ((a.float() @ b.float()) * scale_a * scale_b).to(out_dtype)

    monkeypatch.setattr(torch, "_scaled_mm", tensorwise_only)
    monkeypatch.setattr(scaled_mm, "_ROWWISE_UNSUPPORTED", set())
    qw = get_format("fp8").quantize(torch.randn(32, 64))
    x = torch.randn(5, 64, dtype=torch.bfloat16)
    run = backends.get_backend("scaled_mm").run
    y1 = run(x, qw, None, "w8a8")
    y2 = run(x, qw, None, "w8a8")  # remembered: no second row-wise attempt
    assert [c[0] for c in calls] == [5, 1, 1] and calls[1][2] == torch.float32
    ref = quantized_linear(x, qw, compute="w8a8")
    torch.testing.assert_close(y1, ref)
    torch.testing.assert_close(y2, ref)


@pytest.mark.parametrize("fmt,compute", [("fp8", "w8a8"), ("mxfp4", "w4a16"), ("mxfp4", "w4a4")])
def test_backward_to_input_and_bias(fmt, compute):
    """Adapters before a frozen quantized Linear can train: grads w.r.t. x and bias are those of
    a plain Linear with the dequantized weight (straight-through for activation quantization)."""
    qw = get_format(fmt).quantize(torch.randn(24, 64))
    w = get_format(fmt).dequantize(qw, torch.float32)
    x = torch.randn(3, 5, 64, requires_grad=True)
    b = torch.randn(24, requires_grad=True)
    g = torch.randn(3, 5, 24)
    quantized_linear(x, qw, b, compute=compute).backward(g)
    x2 = x.detach().clone().requires_grad_()
    b2 = b.detach().clone().requires_grad_()
    torch.nn.functional.linear(x2, w, b2).backward(g)
    torch.testing.assert_close(x.grad, x2.grad)
    torch.testing.assert_close(b.grad, b2.grad)


# --- per-call host cost: the choice is made once, the eager path skips nothing it needs ---------


def test_backend_chosen_once_per_format_device_compute(builtin_only, monkeypatch):
    """Repeated Linear calls reuse the cached choice: the selection function runs once per
    (format, device, compute), whether the call goes through the op or the eager shortcut."""
    chosen = []
    real = backends._choose

    def counting(fmt, info, compute, forced):
        chosen.append((fmt.name, info.type, compute))
        return real(fmt, info, compute, forced)

    monkeypatch.setattr(backends, "_choose", counting)
    fp8w = get_format("fp8").quantize(torch.randn(16, 64))
    mxw = get_format("mxfp4").quantize(torch.randn(16, 64))
    x = torch.randn(3, 64)
    for _ in range(5):
        with torch.inference_mode():
            quantized_linear(x, fp8w)
            quantized_linear(x, fp8w, compute="w8a8")
            quantized_linear(x, mxw)
        quantized_linear(x, fp8w)  # grad mode, nothing needs a gradient: eager shortcut
        quantized_linear(x.requires_grad_(), fp8w).sum().backward()  # autograd: through the op
        x = x.detach()
        torch.ops.onlinequant.mxfp4_linear(x, mxw.qdata, mxw.scale, None, "mxfp4", "auto", "")
        choose_backend("fp8_e4m3fn", "cpu")
        choose_backend("fp8_e4m3fn", torch.device("cpu"))
    assert sorted(chosen) == [
        ("fp8_e4m3fn", "cpu", "auto"),
        ("fp8_e4m3fn", "cpu", "w8a8"),
        ("mxfp4", "cpu", "auto"),
    ]
    backends.clear_cache()  # a new registration or a cleared cache chooses again
    quantized_linear(x, fp8w)
    assert len(chosen) == 4


def test_device_queried_once_per_device(builtin_only, monkeypatch):
    queries = []

    def capability(index):
        queries.append(index)
        return (9, 0)

    monkeypatch.setattr(backends, "_is_rocm", lambda: False)
    monkeypatch.setattr(backends, "_cuda_capability", capability)
    backends.clear_cache()
    for _ in range(4):
        for fmt in ("fp8_e4m3fn", "mxfp4"):
            assert backends.resolve_run(fmt, torch.device("cuda", 0))[1] in ("w8a8", "w4a16")
    assert queries == [0]


def test_eager_shortcut_only_where_the_op_is_not_needed():
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils.flop_counter import FlopCounterMode

    qw = get_format("fp8").quantize(torch.randn(16, 64))
    x = torch.randn(3, 64)
    assert ops.eager_ok(x, None, qw.scale)
    with torch.inference_mode():
        assert ops.eager_ok(x.requires_grad_(False), None, qw.scale)
    assert not ops.eager_ok(x.clone().requires_grad_(), None, qw.scale)
    with torch.no_grad():
        assert ops.eager_ok(x.clone().requires_grad_(), None, qw.scale)
    assert not ops.eager_ok(x, torch.zeros(16, requires_grad=True), qw.scale)
    with FlopCounterMode(display=False):
        assert not ops.eager_ok(x, None, qw.scale)
    with FakeTensorMode() as mode:
        assert not ops.eager_ok(mode.from_tensor(x), None, qw.scale)
    # tracing below Dynamo records the backend's plain-PyTorch traced_run (the reference's here),
    # so a compiler can fuse it; a backend without one stays one opaque op in the graph
    from torch.fx.experimental.proxy_tensor import make_fx

    g = make_fx(lambda t: quantized_linear(t, qw), tracing_mode="real")(x)
    assert torch.ops.onlinequant.fp8_linear.default not in [n.target for n in g.graph.nodes]
    torch.testing.assert_close(g(x), quantized_linear(x, qw), rtol=0, atol=0)
    opaque = Backend(
        "opaque_for_test", ("fp8",), ("w8a8",), reference_linear, lambda i, f: (True, "test"), priority=1000
    )
    register_backend(opaque)
    try:
        g = make_fx(lambda t: quantized_linear(t, qw), tracing_mode="real")(x)
        assert torch.ops.onlinequant.fp8_linear.default in [n.target for n in g.graph.nodes]
    finally:
        unregister_backend("opaque_for_test")
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    with torch.inference_mode():
        torch.compile(lambda t: quantized_linear(t, qw), backend=capture, fullgraph=True)(x)
    targets = [n.target for n in graphs[0].graph.nodes]
    assert any("onlinequant.fp8_linear" in str(t) for t in targets), targets


@pytest.mark.parametrize("fmt,compute", [("fp8", "w8a16"), ("fp8_e4m3fn_tensor", "w8a16"), ("mxfp4", "auto")])
def test_traced_weights_only_is_one_dequantize_and_one_matmul(fmt, compute, monkeypatch):
    """A weights-only layer traced below Dynamo (how a compiled model's quantized weights reach
    the graph) dequantizes the whole weight and runs one matmul with the bias: no row chunks
    written into the output or the weight, which a functional graph turns into slice_scatter
    passes over the whole buffer. The chunk size is shrunk so that chunking would show here."""
    from torch.fx.experimental.proxy_tensor import make_fx

    from quant.formats import fp8, mxfp4
    from quant.matmul import reference

    for module in (reference, fp8, mxfp4):
        monkeypatch.setattr(module, "_CHUNK_ELEMS", 64)
    f = get_format(fmt)
    qw = f.quantize(torch.randn(24, 64) * 0.05)
    assert torch.equal(f.dequantize_unchunked(qw, torch.bfloat16), f.dequantize(qw, torch.bfloat16))
    x = torch.randn(2, 5, 64, dtype=torch.bfloat16)
    bias = torch.randn(24, dtype=torch.bfloat16)
    g = make_fx(lambda t: quantized_linear(t, qw, bias, compute=compute), tracing_mode="real")(x)
    aten = torch.ops.aten
    calls = [n for n in g.graph.nodes if n.op == "call_function"]
    matmuls = [n for n in calls if n.target in (aten.mm.default, aten.addmm.default, aten.linear.default)]
    assert len(matmuls) == 1, g.code
    # a chunk written into a buffer: copy_ into a slice (MXFP4's 256-entry scale table sets one
    # element, a select: not a chunk)
    chunk_writes = [
        n for n in calls if n.target == aten.copy_.default and n.args[0].target == aten.slice.Tensor
    ]
    assert not chunk_writes and aten.slice_scatter.default not in [n.target for n in calls], g.code
    torch.testing.assert_close(g(x), reference_linear(x, qw, bias, compute), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize(
    "fmt,compute", [("fp8", "w8a8"), ("fp8", "w8a16"), ("fp8_e4m3fn_tensor", "auto"), ("mxfp4", "w4a4"),
                    ("mxfp4", "w4a8"), ("mxfp4", "auto")]
)
def test_eager_shortcut_equals_op(fmt, compute):
    qw = get_format(fmt).quantize(torch.randn(24, 64))
    x = torch.randn(2, 5, 64, dtype=torch.bfloat16)
    bias = torch.randn(24, dtype=torch.bfloat16)
    with torch.inference_mode():
        eager = quantized_linear(x, qw, bias, compute=compute)
    op = ops.linear_op(get_format(fmt).kind)(x, qw.qdata, qw.scale, bias, qw.format, compute, "")
    assert eager.dtype == op.dtype and torch.equal(eager, op)
