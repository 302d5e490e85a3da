"""Attention section of `python -m quant.bench`: PyTorch SDPA as ComfyUI calls it
(cuDNN on Hopper), SDPA forced to FlashAttention-2, flash_attn if installed, and this pack's 8-bit
attention in its modes, side by side at Z-Image 30×4352, Wan 5B 24×27280 and Wan 14B 40×32760
(B=1, D=128, random inputs). Time (median, CUDA events), TFLOP/s, speed-up over default SDPA,
and relative L2 error against bf16 SDPA on three inputs:
- "gauss": q, k, v ~ N(0, 1);
- "outlier": 4 channels of Q and 4 other channels of K scaled ×20, K with a per-channel bias
  (N(0, 2)): the outlier pattern of real Q/K activations (logit std ≈ 5–10);
- "outlier_same": the same 4 channels ×20 in both Q and K (logit std ≈ 70: near-argmax
  softmax; a stress test).

Also runnable alone: `python -m quant.bench.attention [--tune] [--quick] [--out DIR]`.
Hook for model-level benches: `quant.attention.fp8.comfy_fp8_attention` has ComfyUI's attention
signature; set it as `transformer_options["optimized_attention_override"]` through
`override_for_bench()` below.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import sys
from pathlib import Path

import torch

from ..attention.fp8 import attention_flops, comfy_fp8_attention, fp8_attention
from ..kernels.fp8_attention import AttnConfig, default_config, fp8_attention_triton
from .timing import bench_ms, env_info, rel_l2

log = logging.getLogger(__name__)

# (model, heads, tokens); B=1, D=128
SHAPES = [("zimage", 30, 4352), ("wan22_5b", 24, 27280), ("wan21_t2v_14b", 40, 32760)]
QUICK_SHAPES = [("tiny", 2, 80)]
MODES = {  # name -> fp8_attention_triton kwargs (K scale per token, or per block of block_n)
    "int8qk_bf16pv_ktok": dict(qk_int8=True, v_fp8=False, k_per_token=True),
    "int8qk_bf16pv_kblk": dict(qk_int8=True, v_fp8=False, k_per_token=False),
    "fp8qk_bf16pv_kblk": dict(qk_int8=False, v_fp8=False, k_per_token=False),
    "int8qk_fp8pv_ktok": dict(qk_int8=True, v_fp8=True, k_per_token=True),
    "int8qk_fp8pv_kblk": dict(qk_int8=True, v_fp8=True, k_per_token=False),
    "fp8qk_fp8pv_kblk": dict(qk_int8=False, v_fp8=True, k_per_token=False),
}
# launch configs swept per P·V dtype (first H100 sweep: 128x64 w8 best for bf16 P·V, 64x128 w4
# for FP8 P·V; 4 warps at 128x128 and 2 stages were far behind)
TUNE_CONFIGS = {
    False: [AttnConfig(128, 64, 8, 3), AttnConfig(128, 128, 8, 3), AttnConfig(128, 64, 8, 4),
            AttnConfig(128, 64, 8, 3, True), AttnConfig(128, 128, 8, 3, True)],
    True: [AttnConfig(64, 128, 4, 3), AttnConfig(128, 128, 8, 3), AttnConfig(64, 128, 4, 4),
           AttnConfig(64, 64, 4, 3), AttnConfig(128, 128, 8, 3, True)],
}  # fmt: skip
PUBLIC_MODES = {  # path name -> fp8_attention kwargs
    "ours_int8qk_fp8pv": {},  # the default
    "ours_int8qk_bf16pv": dict(pv="bf16"),
    "ours_fp8qk_fp8pv": dict(qk="fp8"),
}
SWEPT = ("int8qk_bf16pv_kblk", "int8qk_fp8pv_kblk", "fp8qk_fp8pv_kblk")
CUDNN_MODES = {  # path name -> cudnn_fp8_attention kwargs (quant/attention/cudnn_fp8.py)
    "cudnn_fp8": {},  # what the attention node runs
    "cudnn_fp8_head": dict(granularity="head"),
    "cudnn_fp8_nosmooth": dict(smooth_k=False),
    "cudnn_fp8_balance": dict(balance=True),
    "cudnn_fp8_head_balance": dict(granularity="head", balance=True),
}
_TUNED: dict[str, AttnConfig] = {}  # mode -> fastest config of this run's sweep


def make_inputs(kind: str, heads: int, tokens: int, device, seed: int = 0, head_dim: int = 128):
    """q, k, v as [B, L, H·D] bf16 (Wan's layout; `.unflatten(-1, (H, D)).transpose(1, 2)` gives
    the [B,H,L,D] view Z-Image passes)."""
    g = torch.Generator(device=device).manual_seed(seed)
    shape = (1, tokens, heads, head_dim)
    q, k, v = (torch.randn(shape, generator=g, device=device) for _ in range(3))
    if kind != "gauss":
        ch = torch.randperm(head_dim, generator=torch.Generator().manual_seed(seed))[:8].to(device)
        qc, kc = (ch[:4], ch[:4]) if kind == "outlier_same" else (ch[:4], ch[4:])
        q[..., qc] *= 20.0
        k[..., kc] *= 20.0
        k += torch.randn(head_dim, generator=g, device=device) * 2.0
    return tuple(t.to(torch.bfloat16).flatten(2) for t in (q, k, v))


def _sdpa(q, k, v, heads, backend=None):
    qh, kh, vh = (t.unflatten(-1, (heads, -1)).transpose(1, 2) for t in (q, k, v))
    if backend is None:
        o = torch.nn.functional.scaled_dot_product_attention(qh, kh, vh)
    else:
        from torch.nn.attention import sdpa_kernel

        with sdpa_kernel([backend]):
            o = torch.nn.functional.scaled_dot_product_attention(qh, kh, vh)
    return o.transpose(1, 2).flatten(2)


def _paths(heads: int, device) -> dict:
    from torch.nn.attention import SDPBackend

    paths = {"sdpa_default_bf16": lambda q, k, v: _sdpa(q, k, v, heads)}
    if device.type == "cuda":
        paths["sdpa_flash_bf16"] = lambda q, k, v: _sdpa(q, k, v, heads, SDPBackend.FLASH_ATTENTION)
        paths["sdpa_cudnn_bf16"] = lambda q, k, v: _sdpa(q, k, v, heads, SDPBackend.CUDNN_ATTENTION)
    try:
        from flash_attn import flash_attn_func  # noqa: F401

        paths["flash_attn2_bf16"] = lambda q, k, v: flash_attn_func(
            *(t.unflatten(-1, (heads, -1)) for t in (q, k, v))
        ).flatten(2)
    except Exception:  # not installed (the H100 image has none)
        pass
    for name, kw in PUBLIC_MODES.items():  # what users get: fp8_attention, default configs
        paths[name] = lambda q, k, v, kw=kw: fp8_attention(q, k, v, layout="blhd", heads=heads, **kw)
    if device.type == "cuda":  # the default mode called directly: op overhead, stats variants

        def direct(q, k, v, stats):
            qh, kh, vh = (t.unflatten(-1, (heads, -1)).transpose(1, 2) for t in (q, k, v))
            out = torch.empty_like(q).unflatten(-1, (heads, -1)).transpose(1, 2)
            return fp8_attention_triton(qh, kh, vh, out, stats=stats).transpose(1, 2).flatten(2)

        paths["direct_int8qk_fp8pv_tritonstats"] = lambda q, k, v: direct(q, k, v, "triton")
        paths["direct_int8qk_fp8pv_torchstats"] = lambda q, k, v: direct(q, k, v, "torch")
    paths.update(_cudnn_paths(heads, device))
    for name, kw in MODES.items():
        if name not in _TUNED:
            continue  # with --tune: every mode at the fastest config of the sweep

        def fn(q, k, v, kw=kw, name=name):
            qh, kh, vh = (t.unflatten(-1, (heads, -1)).transpose(1, 2) for t in (q, k, v))
            out = torch.empty_like(q).unflatten(-1, (heads, -1)).transpose(1, 2)
            cfg = _TUNED.get(name) or default_config(qh.shape[-1], q.device)
            return fp8_attention_triton(qh, kh, vh, out, config=cfg, **kw).transpose(1, 2).flatten(2)

        paths[name] = fn
    return paths


def _cudnn_paths(heads: int, device) -> dict:
    """cuDNN's FP8 attention where it can run (Hopper+, nvidia-cudnn-frontend installed): each
    mode as the node calls it (pre-pass, kernel, O dequantization); the same call with Q/K/V
    quantized beforehand, which times the kernel and the dequantization alone; and with the
    plain-PyTorch pre-pass instead of the fused Triton one."""
    from ..attention import cudnn_fp8 as cf

    if device.type != "cuda" or cf.runtime_unavailable_reason() is not None:
        return {}

    def bhld(t):
        return t.unflatten(-1, (heads, -1)).transpose(1, 2)

    paths = {
        name: lambda q, k, v, kw=kw: (
            cf.cudnn_fp8_attention(bhld(q), bhld(k), bhld(v), **kw).transpose(1, 2).flatten(2)
        )
        for name, kw in CUDNN_MODES.items()
    }
    def patched(name, value):  # the node's call with one module attribute replaced
        def run(q, k, v):
            real = getattr(cf, name)
            setattr(cf, name, value)
            try:
                return cf.cudnn_fp8_attention(bhld(q), bhld(k), bhld(v)).transpose(1, 2).flatten(2)
            finally:
                setattr(cf, name, real)

        return run

    done: dict = {}
    kernel_only = patched("quantize_qkv", lambda *a, **kw: done["x"])

    def prequantized(q, k, v):  # Q/K/V quantized once per input set, outside the timing
        key = (id(q), id(k), id(v))
        if done.get("inputs") != key:  # `refs` keeps the ids from being reused meanwhile
            done.update(inputs=key, refs=(q, k, v), x=cf.quantize_qkv(bhld(q), bhld(k), bhld(v)))
        return kernel_only(q, k, v)

    paths["cudnn_fp8_prequantized"] = prequantized
    paths["cudnn_fp8_torch_prepass"] = patched("quantize_qkv", cf.quantize_qkv_reference)
    return paths


def _selected(names, wanted: str | None) -> list:
    """`names` filtered by a comma list (None or empty: all)."""
    keep = [w for w in (wanted or "").split(",") if w]
    return [n for n in names if not keep or n in keep]


def run(args, device: torch.device) -> list[dict]:
    """Rows of the attention table (and, with --attn-tune, of the tuning table)."""
    quick = getattr(args, "quick", False)
    shapes = QUICK_SHAPES if quick else SHAPES
    kinds = ("gauss", "outlier", "outlier_same")
    rows: list[dict] = []
    if getattr(args, "attn_check", False):
        modes = getattr(args, "check_modes", None)
        rows += check(device, modes.split(",") if modes else None)
    if getattr(args, "attn_tune", False) and device.type == "cuda":
        rows += tune(device)
    models = _selected([m for m, _, _ in shapes], getattr(args, "attn_models", None))
    shapes = [s for s in shapes if s[0] in models]
    for model, heads, tokens in [] if getattr(args, "no_bench", False) else shapes:
        flops = attention_flops(1, heads, tokens, tokens, 128)
        paths = _paths(heads, device)
        keep = _selected(list(paths), getattr(args, "attn_paths", None))
        paths = {n: f for n, f in paths.items() if n in keep or n == "sdpa_default_bf16"}  # the baseline
        base_ms = None
        for kind in kinds:
            q, k, v = make_inputs(kind, heads, tokens, device)
            ref = _sdpa(q, k, v, heads)
            for name, fn in paths.items():
                row = dict(table="attention", model=model, heads=heads, tokens=tokens, input=kind, path=name)
                out = None
                try:
                    out = fn(q, k, v)
                    row["rel_l2_vs_bf16_sdpa"] = round(rel_l2(out, ref), 5)
                    if kind == "gauss":  # timing on one input kind is enough
                        ms = bench_ms(lambda fn=fn, a=(q, k, v): fn(*a), device)
                        base_ms = ms if name == "sdpa_default_bf16" else base_ms
                        row.update(ms=round(ms, 4), tflops=round(flops / ms / 1e9, 1))
                        if base_ms:
                            row["speedup_vs_sdpa"] = round(base_ms / ms, 3)
                except Exception as e:  # a path that cannot run here is reported, not fatal
                    log.warning("attention %s %s failed: %s", name, model, e)
                    row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
                rows.append(row)
                log.info("%s", row)
                del out
            del q, k, v, ref
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return rows


def tune(device: torch.device, shapes=(("zimage", 30, 4352), ("wan22_5b", 24, 27280))) -> list[dict]:
    """Time each launch configuration of the forward (pre-pass included) per mode; the fastest
    at the largest shape is kept in _TUNED for the table that follows."""
    rows = []
    best: dict[str, tuple[float, AttnConfig]] = {}
    for model, heads, tokens in shapes:
        q, k, v = make_inputs("gauss", heads, tokens, device)
        qh, kh, vh = (t.unflatten(-1, (heads, -1)).transpose(1, 2) for t in (q, k, v))
        out = torch.empty_like(qh)
        flops = attention_flops(1, heads, tokens, tokens, 128)
        for mode, kw in MODES.items():
            # the full sweep for the per-block-K modes; the others at the sweep's first config
            configs = TUNE_CONFIGS[kw["v_fp8"]]
            configs = configs if mode in SWEPT else configs[:1]
            for cfg in configs:
                row = dict(table="attention_tune", model=model, mode=mode, config=str(cfg))
                try:
                    fn = lambda cfg=cfg, kw=kw, t=(qh, kh, vh, out): fp8_attention_triton(  # noqa: E731
                        *t, config=cfg, **kw
                    )
                    fn()
                    ms = bench_ms(fn, device)
                    row.update(ms=round(ms, 4), tflops=round(flops / ms / 1e9, 1))
                    if model == shapes[-1][0] and ms < best.get(mode, (1e9, None))[0]:
                        best[mode] = (ms, cfg)
                except Exception as e:
                    row["error"] = f"{type(e).__name__}: {str(e)[:160]}"
                rows.append(row)
                log.info("%s", row)
        # the pre-pass alone (stats + K/V quantization), to split the time
        from ..kernels.fp8_attention import attention_stats

        for v_fp8 in (False, True):
            fn = lambda v_fp8=v_fp8, t=(qh, kh, vh): _prepass_only(*t, v_fp8)  # noqa: E731
            rows.append(dict(table="attention_prepass", model=model, v_fp8=v_fp8,
                             ms=round(bench_ms(fn, device), 4),
                             stats_ms=round(bench_ms(lambda t=(qh, kh): attention_stats(
                                 *t, smooth_k=True, balance=True), device), 4)))  # fmt: skip
            log.info("%s", rows[-1])
        del q, k, v, qh, kh, vh, out
    _TUNED.update({m: c for m, (_, c) in best.items()})
    rows.append(dict(table="attention_tuned", **{m: str(c) for m, c in _TUNED.items()}))
    log.info("%s", rows[-1])
    return rows


def _prepass_only(q, k, v, v_fp8: bool):
    """Stats + K/V quantization kernel only (for the time split in the tune table)."""
    from ..kernels.fp8_attention import _kernels, attention_stats

    quant_kv_kernel, _ = _kernels()
    B, H, L, D = k.shape
    bn = 128
    nblk = -(-L // bn)
    kmean, qbal, kbal = attention_stats(q, k, smooth_k=True, balance=True)
    k8 = torch.empty(B * H, nblk * bn, D, device=q.device, dtype=torch.int8)
    ks = torch.empty(B * H, nblk, device=q.device)
    v8 = torch.empty(B * H, D, nblk * bn, device=q.device, dtype=torch.float8_e4m3fn)
    vs = torch.empty(B * H, nblk, D, device=q.device)
    quant_kv_kernel[(nblk, B * H)](
        k, v, kmean, kbal, k8, ks, v8, vs,
        k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
        H, L, nblk * bn, nblk, D=D, BLOCK_N=bn, QK_INT8=True, V_FP8=v_fp8, K_TOKEN=False,
        INTERP=False, num_warps=4,
    )  # fmt: skip


def check(device: torch.device, modes=None) -> list[dict]:
    """Kernel against its reference (fp32 emulation) on this device: every mode, both layouts,
    D 64/128/256, lengths that are not block multiples, LQ != LK. Also the fp32 SDPA error."""
    from ..attention.fp8 import fp8_attention_reference

    rows = []
    cases = [(128, mode) for mode in (modes or MODES)]
    cases += [(d, m) for d in (64, 256) for m in ("int8qk_fp8pv_kblk",)]
    g = torch.Generator(device=device).manual_seed(1)
    for d, mode in cases:
        kw = MODES[mode]
        B, H, LQ, LK = 2, 3, 333, 290
        q = torch.randn(B, LQ, H * d, generator=g, device=device).to(torch.bfloat16)
        k, v = (torch.randn(B, LK, H * d, generator=g, device=device).to(torch.bfloat16) for _ in range(2))
        k = k + 3 * torch.randn(H * d, generator=g, device=device).to(torch.bfloat16)
        views = [t.unflatten(-1, (H, d)).transpose(1, 2) for t in (q, k, v)]
        cfg = default_config(d, device, **kw)
        ref = fp8_attention_reference(*views, block_n=cfg.block_n, **kw)
        exact = torch.nn.functional.scaled_dot_product_attention(*(t.float() for t in views))
        o1 = torch.empty_like(q).unflatten(-1, (H, d))  # [B,L,H,D] memory, as Wan wants it
        fp8_attention_triton(*views, o1.transpose(1, 2), config=cfg, **kw)
        o1 = o1.flatten(2)
        o2 = fp8_attention_triton(*views, torch.empty_like(views[0]), config=cfg, **kw)
        row = dict(table="attention_check", head_dim=d, mode=mode,
                   kernel_vs_ref_blhd=rel_l2(o1.unflatten(-1, (H, d)).transpose(1, 2), ref),
                   kernel_vs_ref_bhld=rel_l2(o2, ref), ref_vs_fp32=rel_l2(ref, exact),
                   kernel_vs_fp32=rel_l2(o2, exact), finite=bool(torch.isfinite(o1).all()))  # fmt: skip
        rows.append(row)
        log.info("%s", row)
    from ..kernels.fp8_attention import attention_stats, attention_stats_triton

    q, k = (torch.randn(1, 1000, 4, 128, device=device).to(torch.bfloat16).transpose(1, 2) for _ in range(2))
    a = attention_stats(q, k, smooth_k=True, balance=True)
    b = attention_stats_triton(q, k, smooth_k=True, balance=True)
    diffs = [float((x - y).abs().max()) for x, y in zip(a, b, strict=True)]
    rows.append(dict(table="attention_check", stats_max_abs_diff=diffs))
    log.info("%s", rows[-1])
    return rows


def add_args(parser) -> None:
    parser.add_argument(
        "--attn-tune", action="store_true", help="also sweep the FP8 attention kernel's launch configs"
    )
    parser.add_argument("--attn-models", default=None, help="only these shapes (comma list of model names)")
    parser.add_argument(
        "--attn-paths", default=None, help="only these paths (comma list; SDPA's default always)"
    )


def override_for_bench(transformer_options: dict) -> dict:
    """Make a model use this pack's FP8 attention for a model-level benchmark: sets
    `optimized_attention_override` (ComfyUI's hook) on `transformer_options` and returns it.
    Calls the kernel can't take (masks...) run ComfyUI's own function."""

    def override(func, *args, **kwargs):
        out = comfy_fp8_attention(*args, **{k: v for k, v in kwargs.items() if k != "_inside_attn_wrapper"})
        return func(*args, **kwargs) if out is None else out

    transformer_options["optimized_attention_override"] = override
    return transformer_options


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m quant.bench.attention", description=__doc__)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default="bench_out")
    add_args(p)
    p.add_argument("--tune", dest="attn_tune", action="store_true")
    p.add_argument("--check", dest="attn_check", action="store_true", help="kernel vs reference first")
    p.add_argument("--no-bench", action="store_true", help="only --check/--tune")
    p.add_argument("--check-modes", default=None, help="comma list of MODES for --check (default all)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows = run(args, device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    payload = {
        "command": "python -m quant.bench.attention " + " ".join(argv or sys.argv[1:]),
        "env": env_info(device),
        "default_config": str(default_config(128, device)),
        "rows": rows,
    }
    (out / "attention.json").write_text(json.dumps(payload, indent=1))
    for r in rows:
        print({k: v for k, v in r.items() if k != "table"})
    return 0


if __name__ == "__main__":
    sys.exit(main())
