"""Model level: one denoising step of ComfyUI's own Z-Image / Wan classes at full size with random
weights (no checkpoints can be downloaded), for bf16, ComfyUI's `fp8_e4m3fn_fast`, ours FP8 and
ours MXFP4, each also with the attention node's FP8 attention: step time, transformer weight
bytes, peak VRAM, output error against bf16, load(+quantize) time.

This is the one module under quant/ that imports ComfyUI and the pack's nodes/ (lazily, inside
functions): it is a benchmark of the pack inside ComfyUI, not library code. Quantized models are
built exactly as the loader node builds them: `nodes.ops.make_ops(plan)` as the model's
operations, the bf16 state dict loaded through `load_state_dict` (quantization happens in each
Linear's `_load_from_state_dict`), the plan from `quant.selection.plan.build_plan` with the family's
default ignored layers.
"""

from __future__ import annotations

import gc
import importlib.util
import logging
import math
import sys
import time
import types
from pathlib import Path

import torch

from ..models import REFERENCE_MODELS, get_reference
from .timing import rel_l2

log = logging.getLogger(__name__)
PACK = "comfyui_online_quant"

# ---------------------------------------------------------------- model configs
# The full-size configs are the reference models' (quant/models/): one name per model everywhere.
ZIMAGE = get_reference("zimage").comfy_config
WAN5B = get_reference("wan22_5b").comfy_config
WAN14B = get_reference("wan21_t2v_14b").comfy_config


def tiny_config(cfg: dict, **over) -> dict:
    """A copy of a model config with some fields replaced (the small CI versions; tests use it too)."""
    c = dict(cfg)
    c.update(over)
    return c


# The models this benchmark builds: every reference model with a ComfyUI class and example inputs
# (quant/models holds their configs, CI-size overrides and inputs: adding a family adds it here).
MODELS = {
    name: (
        ref.comfy_class,
        dict(ref.comfy_config),
        tiny_config(ref.comfy_config, **ref.tiny_overrides),
        ref.family,
        f"{ref.description} {ref.inputs_description}",
    )
    for name, ref in REFERENCE_MODELS.items()
    if ref.comfy_class and ref.example_inputs is not None
}


def _inputs(name: str, quick: bool, device, dtype=torch.bfloat16) -> dict:
    return get_reference(name).example_inputs(quick, device, dtype)


# ---------------------------------------------------------------- ComfyUI and the pack
def _comfy():
    from .comfyui_checkout import add_comfyui_to_path

    try:
        import comfy.cli_args
    except ModuleNotFoundError:
        add_comfyui_to_path()  # $COMFYUI_PATH, the custom_nodes layout or ~/comfy/ComfyUI
        import comfy.cli_args

    if not torch.cuda.is_available():
        comfy.cli_args.args.cpu = True
    import comfy.model_management  # noqa: F401
    import comfy.ops

    return comfy


def _pack(sub: str):
    """A module of this repo imported as a package, the way ComfyUI loads a custom node (by file
    location), e.g. _pack("nodes.ops")."""
    if PACK not in sys.modules:
        root = Path(__file__).resolve().parents[2]
        spec = importlib.util.spec_from_file_location(
            PACK, root / "__init__.py", submodule_search_locations=[str(root)]
        )
        mod = importlib.util.module_from_spec(spec)
        sys.modules[PACK] = mod
        try:
            spec.loader.exec_module(mod)
            importlib.import_module(f"{PACK}.nodes")
        except ImportError as e:
            # nodes/__init__ imports comfy_api (and through it PyAV), which a bare ComfyUI copy on a
            # benchmark machine may lack; the loader's ops module needs only comfy + comfy_kitchen.
            log.info("pack imported without nodes/__init__ (%s)", e)
            for name, path in ((PACK, root), (f"{PACK}.nodes", root / "nodes")):
                stub = types.ModuleType(name)
                stub.__path__ = [str(path)]
                sys.modules[name] = stub
            sys.modules.pop(f"{PACK}.quant", None)
    return importlib.import_module(f"{PACK}.{sub}")


def _cls(path: str):
    mod, name = path.split(":")
    return getattr(importlib.import_module(mod), name)


def init_random_(model: torch.nn.Module, seed: int) -> None:
    """ComfyUI's ops skip weight init: realistic random values (fan-in scaled matrices, small
    biases, norm/modulation tables near 1)."""
    g = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.device.type == "meta":
                continue
            if p.dim() >= 2:
                p.copy_(
                    torch.randn(p.shape, generator=g, device=p.device) / math.sqrt(math.prod(p.shape[1:]))
                )
            elif name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=g, device=p.device) * 0.02)
            else:
                p.copy_(1.0 + torch.randn(p.shape, generator=g, device=p.device) * 0.1)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _nbytes(model: torch.nn.Module, records=None) -> int:
    """Transformer weight bytes: packed bytes for quantized Linears (the loader's records),
    element bytes for every other parameter and buffer."""
    quant_names = set()
    total = 0
    for r in records or ():
        quant_names.add(r.name + ".weight")
        total += r.bytes_after
    for name, p in list(model.named_parameters()) + list(model.named_buffers()):
        if name in quant_names:
            continue
        total += p.numel() * p.element_size()
    return total


def _aliased(model: torch.nn.Module, src_ptrs: set[int]) -> int:
    """Bytes of the model's plain tensors that are the source state dict's own storage."""
    total = 0
    for p in list(model.parameters()) + list(model.buffers()):
        try:
            if type(p.data) is torch.Tensor and p.data_ptr() in src_ptrs:
                total += p.numel() * p.element_size()
        except (RuntimeError, NotImplementedError):  # packed tensor subclasses have no plain storage
            continue
    return total


def _attention_overrides(names: str) -> list[tuple[str, object]]:
    """[(row suffix, override)] for the attention node's backends named in `names` (comma list,
    e.g. "fp8,cudnn_fp8"), each the node's own AttentionOverride (nodes/attention.py): calls a
    backend can't take fall back to ComfyUI's attention as in a workflow. Unavailable backends
    are reported and left out."""
    out = []
    for backend in [b for b in names.split(",") if b]:
        try:
            attn = _pack("nodes.attention")
            why = attn.ATTENTION_BACKENDS[backend].available()
        except Exception as e:  # ComfyUI's attention module or the backend table missing
            why = f"{type(e).__name__}: {e}"
        if why is not None:
            log.warning("attention %s not available: %s", backend, why)
            continue
        out.append((f"+{backend}_attention", attn.AttentionOverride(backend, "bench")))
    return out


# ---------------------------------------------------------------- building the variants
def _build(name: str, quick: bool, ops, device) -> torch.nn.Module:
    path, cfg, qcfg, _, _ = MODELS[name]
    return _cls(path)(**(qcfg if quick else cfg), operations=ops, dtype=torch.bfloat16, device=device).eval()


def _plan(sd_shapes: dict, fmt: str, family: str, ignore):
    layers = _pack("quant.selection.layers").linears_from_shapes(sd_shapes)
    return _pack("quant.selection.plan").build_plan(layers, fmt, ignore, family=family)


# variant -> (format, compute, ignore text: None = the family's default ignored layers, "" = none)
OURS = {
    "ours_fp8": ("fp8_e4m3fn", "auto", None),
    "ours_mxfp4": ("mxfp4", "auto", None),
    "ours_mxfp4_w4a8": ("mxfp4", "w4a8", None),
    "ours_fp8_all_linears": ("fp8_e4m3fn", "auto", ""),
    "ours_mxfp4_all_linears": ("mxfp4", "auto", ""),
}
VARIANTS = ("bf16", "comfy_fp8_e4m3fn_fast", "ours_fp8", "ours_mxfp4")


def _variant(name, variant, quick, sd, shapes, device):
    """Build one variant and load the bf16 state dict into it; returns (model, load_s, records, note)."""
    comfy = _comfy()
    family = MODELS[name][3]
    note = ""
    records = None
    _sync(device)
    t0 = time.perf_counter()
    if variant == "bf16":
        model = _build(name, quick, comfy.ops.disable_weight_init, device)
        model.load_state_dict(sd, strict=False)
    elif variant == "comfy_fp8_e4m3fn_fast":
        # What ComfyUI's weight_dtype=fp8_e4m3fn_fast does: weights of its ops layers cast to fp8
        # without a scale, Linear through _scaled_mm with unit scales (comfy.ops.fp8_ops).
        model = _build(name, quick, comfy.ops.fp8_ops, device)
        model.load_state_dict(sd, strict=False)
        with torch.no_grad():
            for m in model.modules():
                if getattr(m, "comfy_cast_weights", None) is not None:
                    for pn, p in list(m.named_parameters(recurse=False)):
                        setattr(
                            m, pn, torch.nn.Parameter(p.data.to(torch.float8_e4m3fn), requires_grad=False)
                        )
    else:
        fmt, compute, ignore = OURS[variant]
        plan = _plan(shapes, fmt, family, ignore)
        ops = _pack("nodes.ops").make_ops(
            plan, fmt, torch.bfloat16, compute=compute, quantize_device=device, record_sqnr=False
        )
        model = _build(name, quick, ops, device)
        model.load_state_dict(dict(sd), strict=False)  # dict(): the loader pops the weights it quantizes
        records = ops.load_state.records
        every = _plan(shapes, fmt, family, "")  # "" = quantize every eligible Linear
        which = "family defaults" if ignore is None else "every eligible Linear"
        note = (
            f"{len(plan.quantized())}/{len(plan.decisions)} Linears quantized ({which}; "
            f"quantize {ops.load_state.quantize_seconds:.2f} s); Linear bytes "
            f"{plan.bytes_after() / plan.bytes_before():.1%} of bf16, "
            f"{every.bytes_after() / every.bytes_before():.1%} with every eligible Linear"
        )
    _sync(device)
    return model, time.perf_counter() - t0, records, note


def _step(model, inputs, transformer_options, device, steps: int):
    kw = dict(inputs)
    if transformer_options:
        kw["transformer_options"] = transformer_options
    with torch.inference_mode():
        t0 = time.perf_counter()
        out = model(**kw)  # warm-up (Triton compiles, cuBLAS heuristics; torch.compile's compile)
        _sync(device)
        first_s = time.perf_counter() - t0
        times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            out = model(**kw)
            _sync(device)
            times.append((time.perf_counter() - t0) * 1e3)
    return out, sorted(times)[len(times) // 2], first_s


def add_args(parser) -> None:
    parser.add_argument(
        "--models", default="zimage,wan22_5b", help="comma list of zimage, wan22_5b, wan21_t2v_14b"
    )
    parser.add_argument("--steps", type=int, default=3, help="timed steps per variant (median)")
    parser.add_argument("--no-attention", action="store_true", help="skip the attention combinations")
    parser.add_argument(
        "--attention",
        default="fp8",
        help="attention node backends to combine with each variant (comma list, e.g. fp8,cudnn_fp8)",
    )
    parser.add_argument(
        "--variants",
        default=",".join(VARIANTS),
        help=f"comma list of bf16, comfy_fp8_e4m3fn_fast, {', '.join(OURS)} (bf16 first)",
    )


def run(args, device: torch.device) -> list[dict]:
    comfy = _comfy()  # noqa: F841  (imported for its side: CPU mode when there is no GPU)
    rows = []
    backends = "" if getattr(args, "no_attention", False) else getattr(args, "attention", "fp8")
    attn = _attention_overrides(backends)
    for name in [m for m in getattr(args, "models", "zimage,wan22_5b").split(",") if m]:
        quick = args.quick
        src = _build(name, quick, _comfy().ops.disable_weight_init, device)
        init_random_(src, seed=0)
        sd = src.state_dict()
        shapes = {k: tuple(v.shape) for k, v in sd.items()}
        src_bytes = sum(v.numel() * v.element_size() for v in sd.values())
        src_ptrs = {v.data_ptr() for v in sd.values()}
        inputs = _inputs(name, quick, device)
        ref, bf16_ms, bf16_compiled_ms = None, None, None
        variants = [v for v in getattr(args, "variants", ",".join(VARIANTS)).split(",") if v]
        for variant in variants:
            row_base = dict(table="models", model=MODELS[name][4] if not quick else name + " (tiny)")
            try:
                model, load_s, records, note = _variant(name, variant, quick, sd, shapes, device)
            except Exception as e:
                log.exception("building %s %s failed", name, variant)
                rows.append(dict(row_base, variant=variant, error=f"{type(e).__name__}: {str(e)[:200]}"))
                continue
            wbytes = _nbytes(model, records)
            combos = [("", None)] + [(sfx, {"optimized_attention_override": o}) for sfx, o in attn]
            # --compiled: the model under torch.compile as ComfyUI's TorchCompileModel node applies
            # it (Inductor, default mode, inference mode), against compiled bf16
            combos += [("+compiled", None)] if getattr(args, "compiled", False) else []
            for suffix, topts in combos:
                row = dict(row_base, variant=variant + suffix)
                try:
                    gc.collect()
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                        torch.cuda.reset_peak_memory_stats(device)
                    stepped = model
                    if suffix == "+compiled":
                        torch._dynamo.reset()  # each variant compiles afresh, not on the last one's guards
                        stepped = torch.compile(model)
                    out, ms, first_s = _step(stepped, inputs, topts, device, 1 if quick else args.steps)
                    del stepped
                    # the source weights stay resident for the comparison: subtract them, but count
                    # the ones a variant shares with them (kept bf16 layers alias the state dict)
                    peak = None
                    if device.type == "cuda":
                        peak = torch.cuda.max_memory_allocated(device) - src_bytes + _aliased(model, src_ptrs)
                except Exception as e:
                    log.exception("step %s %s failed", name, variant + suffix)
                    rows.append(dict(row, error=f"{type(e).__name__}: {str(e)[:200]}"))
                    continue
                if variant == "bf16" and not suffix:
                    ref, bf16_ms = out.float(), ms
                if variant == "bf16" and suffix == "+compiled":
                    bf16_compiled_ms = ms
                base_ms = bf16_compiled_ms if suffix == "+compiled" else bf16_ms
                row.update(
                    step_ms=round(ms, 2),
                    # compiled rows against compiled bf16, the others against eager bf16
                    speedup_vs_bf16=round(base_ms / ms, 3) if base_ms else None,
                    weight_GiB=round(wbytes / 2**30, 3),
                    weight_vs_bf16=round(wbytes / src_bytes, 3),
                    peak_vram_GiB=round(peak / 2**30, 2) if peak is not None else None,
                    rel_err_vs_bf16=round(rel_l2(out.float(), ref), 4) if ref is not None else None,
                    finite=bool(torch.isfinite(out).all()),
                    load_s=round(load_s, 2),
                    first_step_s=round(first_s, 1),  # with +compiled: mostly the compile itself
                    note=note,
                )
                rows.append(row)
                log.info("models row: %s", {k: v for k, v in row.items() if k != "note"})
                del out
            del model
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        del src, sd, ref
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows
