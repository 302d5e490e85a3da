"""The inputs of the per-layer quality bench: one representative Linear of each layer family of each
model (published shapes, full size or CI-tiny), and random weights and activations for it."""

from __future__ import annotations

from dataclasses import dataclass

import torch

WEIGHT_PROFILES = ("normal", "structured")
ACT_PROFILES = ("normal", "outliers")


@dataclass(frozen=True)
class LayerSpec:
    model: str
    family: str  # qkv, attn_out, cross_attn, ffn_up, ffn_down, modulation, embedder, time_embed, head
    name: str  # one real layer of the family (ComfyUI's name, no prefix)
    out_features: int
    in_features: int
    count: int  # Linear layers of this family and shape in the model


def _zimage(dim=3840, ffn=10240, layers=30, mod=256, cap=2560, patch=64) -> tuple[LayerSpec, ...]:
    blocks = layers + 4  # + 2 noise_refiner + 2 context_refiner
    return (
        LayerSpec("zimage", "qkv", "layers.0.attention.qkv", 3 * dim, dim, blocks),
        LayerSpec("zimage", "attn_out", "layers.0.attention.out", dim, dim, blocks),
        LayerSpec("zimage", "ffn_up", "layers.0.feed_forward.w1", ffn, dim, 2 * blocks),
        LayerSpec("zimage", "ffn_down", "layers.0.feed_forward.w2", dim, ffn, blocks),
        LayerSpec("zimage", "modulation", "layers.0.adaLN_modulation.0", 4 * dim, mod, layers + 2),
        LayerSpec("zimage", "embedder", "cap_embedder.1", dim, cap, 1),
        LayerSpec("zimage", "embedder", "x_embedder", dim, patch, 1),
        LayerSpec("zimage", "time_embed", "t_embedder.mlp.0", min(dim, 1024), 256, 1),
        LayerSpec("zimage", "head", "final_layer.linear", patch, dim, 1),
    )


def _wan(model: str, dim: int, ffn: int, blocks: int, head_out: int, text=4096, freq=256):
    return (
        LayerSpec(model, "qkv", "blocks.0.self_attn.q", dim, dim, 3 * blocks),
        LayerSpec(model, "attn_out", "blocks.0.self_attn.o", dim, dim, 2 * blocks),
        LayerSpec(model, "cross_attn", "blocks.0.cross_attn.k", dim, dim, 3 * blocks),
        LayerSpec(model, "ffn_up", "blocks.0.ffn.0", ffn, dim, blocks),
        LayerSpec(model, "ffn_down", "blocks.0.ffn.2", dim, ffn, blocks),
        LayerSpec(model, "modulation", "time_projection.1", 6 * dim, dim, 1),
        LayerSpec(model, "embedder", "text_embedding.0", dim, text, 1),
        LayerSpec(model, "time_embed", "time_embedding.0", dim, freq, 1),
        LayerSpec(model, "head", "head.head", head_out, dim, 1),
    )


MODELS: dict[str, tuple[LayerSpec, ...]] = {
    "zimage": _zimage(),
    "wan22_5b": _wan("wan22_5b", 3072, 14336, 30, 192),
    "wan21_t2v_14b": _wan("wan21_t2v_14b", 5120, 13824, 40, 64),
}
# CI scale: same families and layer names, tiny widths (all K multiples of 32).
QUICK_MODELS: dict[str, tuple[LayerSpec, ...]] = {
    "zimage": _zimage(dim=128, ffn=352, layers=2, mod=64, cap=96, patch=64),
    "wan22_5b": _wan("wan22_5b", 128, 384, 2, 192, text=96, freq=64),
}


def make_weight(spec: LayerSpec, profile: str, gen: torch.Generator) -> torch.Tensor:
    """Random [out, in] fp32 weight. "normal": N(0, 0.02). "structured": the same times a
    log-normal scale per output row and per input column (sigma 0.5 each) with 0.05% of the
    weights x10, which is closer to trained layers (uneven rows, a few large weights)."""
    n, k = spec.out_features, spec.in_features
    w = torch.randn(n, k, generator=gen).mul_(0.02)
    if profile == "structured":
        w.mul_(torch.randn(n, 1, generator=gen).mul_(0.5).exp_())
        w.mul_(torch.randn(1, k, generator=gen).mul_(0.5).exp_())
        hits = torch.randint(0, n * k, (max(1, n * k // 2000),), generator=gen)
        w.view(-1)[hits] *= 10.0
    elif profile != "normal":
        raise ValueError(f"unknown weight profile {profile!r}; known: {WEIGHT_PROFILES}")
    return w


def make_activation(tokens: int, k: int, profile: str, gen: torch.Generator) -> torch.Tensor:
    """Random [tokens, k] activations. "outliers": N(0, 1) with max(2, k // 512) channels scaled
    x20 .. x100 (the massive-activation channels DiT and LLM text-encoder inputs show)."""
    x = torch.randn(tokens, k, generator=gen)
    if profile == "outliers":
        n_out = max(2, k // 512)
        idx = torch.randperm(k, generator=gen)[:n_out]
        x[:, idx] *= torch.linspace(20.0, 100.0, n_out)
    elif profile != "normal":
        raise ValueError(f"unknown activation profile {profile!r}; known: {ACT_PROFILES}")
    return x


