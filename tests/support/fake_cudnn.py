"""A stand-in for the `cudnn` module of nvidia-cudnn-frontend, enough of its Python graph API
for quant/attention/cudnn_fp8.py: it records every graph built (tensor descriptors, the
sdpa_fp8 arguments, the build steps) and every execute (the variant pack), and executes the FP8
attention in PyTorch from the variant pack the way cuDNN is documented to (dequantize Q, K, V
with their descales, softmax, P quantized with scale_s, O written in FP8 with scale_o), so a
test on the CPU checks the scale conventions end to end."""

from __future__ import annotations

import types

import torch

FP8_MAX = 448.0


def _fp8(x: torch.Tensor) -> torch.Tensor:
    return x.clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).float()


class FakeTensor:
    def __init__(self, name="", dim=None, stride=None, data_type=None):
        self.name, self.dim, self.stride, self.data_type = name, dim, stride, data_type
        self.is_output = False

    def set_output(self, flag):
        self.is_output = flag
        return self

    def set_dim(self, dim):
        self.dim = list(dim)
        return self

    def set_stride(self, stride):
        self.stride = list(stride)
        return self

    def set_data_type(self, dtype):
        self.data_type = dtype
        return self


class FakeGraph:
    def __init__(self, module, **kwargs):
        self.module, self.kwargs = module, kwargs
        self.tensors: list[FakeTensor] = []
        self.steps: list[str] = []
        self.sdpa_kwargs: dict = {}
        self.outputs: tuple = ()
        self.executions: list[dict] = []
        module.graphs.append(self)

    def tensor(self, name, dim, stride, data_type):
        t = FakeTensor(name, list(dim), list(stride), data_type)
        self.tensors.append(t)
        return t

    def sdpa_fp8(self, **kwargs):
        self.sdpa_kwargs = kwargs
        self.outputs = tuple(FakeTensor(n) for n in ("o", "stats", "amax_s", "amax_o"))
        return self.outputs

    def _step(name):  # noqa: N805  (builds methods that only record their call)
        def f(self, *args):
            self.steps.append(name)

        return f

    validate = _step("validate")
    build_operation_graph = _step("build_operation_graph")
    check_support = _step("check_support")
    build_plans = _step("build_plans")

    def create_execution_plans(self, modes):
        self.steps.append("create_execution_plans")
        self.heur_modes = list(modes)

    def get_workspace_size(self):
        return 16

    def execute(self, pack, workspace, handle=None):
        self.executions.append(dict(pack))
        for t, x in pack.items():  # the descriptor the graph holds must describe the memory it gets
            assert list(x.shape) == t.dim and list(x.stride()) == t.stride, (t.name, x.shape, x.stride())
            # cuDNN takes only the pointer: FP8 memory may come as uint8 (or float8) tensors
            fp8 = t.data_type == "FP8_E4M3"
            assert x.dtype in ((torch.uint8, torch.float8_e4m3fn) if fp8 else (torch.float32,)), t.name
        pack = {t: x.view(torch.float8_e4m3fn) if x.dtype == torch.uint8 else x for t, x in pack.items()}
        kw = {k: pack[v] if isinstance(v, FakeTensor) else v for k, v in self.sdpa_kwargs.items()}
        o_t, _, amax_s_t, amax_o_t = self.outputs
        q = kw["q"].float() * kw["descale_q"]
        k = kw["k"].float() * kw["descale_k"]
        v = kw["v"].float() * kw["descale_v"]
        p = torch.softmax(q @ k.transpose(-1, -2) * kw["attn_scale"], dim=-1)
        p = _fp8(p * kw["scale_s"]) * kw["descale_s"]
        o = p @ v
        pack[o_t].copy_((o * kw["scale_o"]).clamp(-FP8_MAX, FP8_MAX))  # saturating conversion
        pack[amax_s_t].fill_(float(p.abs().amax()))
        pack[amax_o_t].fill_(float(o.abs().amax()))


def make() -> types.SimpleNamespace:
    """A fresh fake module: `graphs` lists the graphs built, `handles` the handles created."""
    m = types.SimpleNamespace(graphs=[], handles=[], streams=[])
    m.data_type = types.SimpleNamespace(FP8_E4M3="FP8_E4M3", FLOAT="FLOAT", BFLOAT16="BFLOAT16", HALF="HALF")
    m.heur_mode = types.SimpleNamespace(A="A", FALLBACK="FALLBACK")
    m.pygraph = lambda **kw: FakeGraph(m, **kw)

    def create_handle():
        m.handles.append(object())
        return m.handles[-1]

    m.create_handle = create_handle
    m.set_stream = lambda handle, stream: m.streams.append(stream)
    return m
