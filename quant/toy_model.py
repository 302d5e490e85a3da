"""Reference layer sets of the real models (names + shapes, DESIGN.md §3) and a small
deterministic Z-Image-architecture transformer for the CLI's default run and tests.

The layer sets let tests and ``python -m quant plan --model zimage`` plan a full-size model
without its weights. The toy transformer uses the real width (3840) and ComfyUI's NextDiT layer
names at reduced depth, with seeded random weights (no weights can be downloaded).
"""

from __future__ import annotations

from .selection import LinearInfo

__all__ = ["reference_linears", "REFERENCE_MODELS"]


def _zimage() -> list[tuple[str, int, int]]:
    d, ffn = 3840, 10240
    out: list[tuple[str, int, int]] = [("x_embedder", d, 64)]

    def block(p: str, modulation: bool) -> None:
        out.extend(
            [
                (p + "attention.qkv", 3 * d, d),
                (p + "attention.out", d, d),
                (p + "feed_forward.w1", ffn, d),
                (p + "feed_forward.w2", d, ffn),
                (p + "feed_forward.w3", ffn, d),
            ]
        )
        if modulation:
            out.append((p + "adaLN_modulation.0", 4 * d, 256))

    for i in range(2):
        block(f"noise_refiner.{i}.", True)
    for i in range(2):
        block(f"context_refiner.{i}.", False)
    out += [("t_embedder.mlp.0", 1024, 256), ("t_embedder.mlp.2", 256, 1024), ("cap_embedder.1", d, 2560)]
    for i in range(30):
        block(f"layers.{i}.", True)
    out += [("final_layer.linear", 64, d), ("final_layer.adaLN_modulation.1", d, 256)]
    return out


def _wan(dim: int, ffn: int, blocks: int, head_out: int, i2v: bool) -> list[tuple[str, int, int]]:
    out: list[tuple[str, int, int]] = [
        ("text_embedding.0", dim, 4096),
        ("text_embedding.2", dim, dim),
        ("time_embedding.0", dim, 256),
        ("time_embedding.2", dim, dim),
        ("time_projection.1", 6 * dim, dim),
    ]
    for b in range(blocks):
        p = f"blocks.{b}."
        for a in ("self_attn", "cross_attn"):
            out += [(f"{p}{a}.{x}", dim, dim) for x in ("q", "k", "v", "o")]
        if i2v:
            out += [(p + "cross_attn.k_img", dim, dim), (p + "cross_attn.v_img", dim, dim)]
        out += [(p + "ffn.0", ffn, dim), (p + "ffn.2", dim, ffn)]
    out.append(("head.head", head_out, dim))
    if i2v:
        out += [("img_emb.proj.1", 1280, 1280), ("img_emb.proj.3", dim, 1280)]
    return out


REFERENCE_MODELS = {
    "zimage": _zimage,
    "wan21_t2v_14b": lambda: _wan(5120, 13824, 40, 64, False),
    "wan21_i2v_14b": lambda: _wan(5120, 13824, 40, 64, True),
    "wan21_t2v_1.3b": lambda: _wan(1536, 8960, 30, 64, False),
    "wan22_5b": lambda: _wan(3072, 14336, 30, 192, False),
}


def reference_linears(model: str) -> list[LinearInfo]:
    """Linear layers (ComfyUI names, [out, in]) of a full-size model; keys of REFERENCE_MODELS."""
    try:
        build = REFERENCE_MODELS[model]
    except KeyError:
        raise ValueError(f"unknown reference model {model!r}; known: {', '.join(REFERENCE_MODELS)}") from None
    return [LinearInfo(n, o, i) for n, o, i in build()]


def reference_shapes(model: str) -> dict[str, tuple[int, ...]]:
    """A header-like ``{tensor name: shape}`` for the model: Linear weights and biases plus the
    non-Linear tensors detection looks at (Wan's ``head.modulation``, norms)."""
    shapes: dict[str, tuple[int, ...]] = {}
    for li in reference_linears(model):
        shapes[f"{li.name}.weight"] = (li.out_features, li.in_features)
        shapes[f"{li.name}.bias"] = (li.out_features,)
    if model.startswith("wan"):
        dim = shapes["head.head.weight"][1]
        shapes["head.modulation"] = (1, 2, dim)
        shapes["patch_embedding.weight"] = (dim, 48 if model == "wan22_5b" else 16, 1, 2, 2)
        shapes["blocks.0.norm3.weight"] = (dim,)
    else:
        shapes["cap_embedder.0.weight"] = (2560,)
        shapes["x_pad_token"] = (1, 3840)
    return shapes
