"""The Linear layers a model has, from a module, from a checkpoint's tensor shapes, or from a
full-size reference model: names without the ``diffusion_model.`` prefix, [out, in] shapes."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from ..models import reference_linear_shapes
from .patterns import strip_prefix

# 2-D ".weight" tensors that are lookup tables, not Linear weights (never quantized).
_EMBEDDING_TABLES = frozenset(
    {"embed_tokens", "wte", "wpe", "word_embeddings", "position_embeddings", "token_embedding", "shared"}
)


@dataclass(frozen=True)
class LinearInfo:
    name: str  # without "diffusion_model." prefix, without ".weight"
    out_features: int
    in_features: int


def linears_from_module(module: torch.nn.Module) -> list[LinearInfo]:
    """Every ``nn.Linear`` (ComfyUI's ops Linear classes subclass it) of a module, in order."""
    out = []
    for name, m in module.named_modules():
        if isinstance(m, torch.nn.Linear):
            out.append(LinearInfo(strip_prefix(name), int(m.out_features), int(m.in_features)))
    return out


def reference_linears(model: str) -> list[LinearInfo]:
    """The Linear layers of a full-size reference model (quant.models.REFERENCE_MODELS)."""
    return [LinearInfo(n, o, i) for n, o, i in reference_linear_shapes(model)]


def linears_from_shapes(shapes: Mapping[str, Sequence[int]]) -> list[LinearInfo]:
    """Linear layers of a state dict or safetensors header: ``<name>.weight`` tensors with 2 dims.

    Norms (1-D), convolutions (3-D+), biases and embedding tables (by module name) are left out.
    Known prefixes (``diffusion_model.``, ``model.diffusion_model.``) are stripped.
    """
    out = []
    seen = set()
    for key, shape in shapes.items():
        if not key.endswith(".weight") or len(shape) != 2:
            continue
        name = strip_prefix(key[: -len(".weight")])
        if name.rsplit(".", 1)[-1] in _EMBEDDING_TABLES or name in seen:
            continue
        seen.add(name)
        out.append(LinearInfo(name, int(shape[0]), int(shape[1])))
    return out


__all__ = ["LinearInfo", "linears_from_module", "linears_from_shapes", "reference_linears"]
