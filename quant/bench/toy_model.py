"""A small deterministic Z-Image-architecture transformer for the CLI's default run, the quality
bench and tests: the real width (3840) and ComfyUI's NextDiT layer names at reduced depth, with
seeded random weights (no weights can be downloaded). The full-size layer sets of the real models
live with their families in quant/models/.
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "ToyZImage",
    "build_toy_zimage",
    "toy_inputs",
]


# --- a small Z-Image-architecture transformer ------------------------------------------------
# Mirrors ComfyUI's comfy/ldm/lumina/model.py NextDiT with z_image_modulation=True (names and
# shapes of every Linear), without RoPE, masks or padding tokens: enough structure (attention
# with qk-norm, SwiGLU FFN, tanh-gated adaLN modulation, refiners, final layer) to measure how
# quantization errors propagate to the output.

ZIMAGE_DIM = 3840
ZIMAGE_HEADS = 30
ZIMAGE_FFN = 10240
ZIMAGE_CAP_DIM = 2560
ZIMAGE_ADALN = 256  # Z-Image's t_embedder output size (min(dim, 256))


class _RMSNorm(torch.nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5, **kw):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(dim, **kw))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


class _Attention(torch.nn.Module):
    def __init__(self, dim: int, heads: int, **kw):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.qkv = torch.nn.Linear(dim, 3 * dim, bias=False, **kw)
        self.out = torch.nn.Linear(dim, dim, bias=False, **kw)
        self.q_norm = _RMSNorm(self.head_dim, **kw)
        self.k_norm = _RMSNorm(self.head_dim, **kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, self.head_dim).unbind(2)
        q, k = self.q_norm(q), self.k_norm(k)
        o = torch.nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        )
        return self.out(o.transpose(1, 2).reshape(b, n, -1))


class _FeedForward(torch.nn.Module):
    def __init__(self, dim: int, hidden: int, **kw):
        super().__init__()
        self.w1 = torch.nn.Linear(dim, hidden, bias=False, **kw)
        self.w2 = torch.nn.Linear(hidden, dim, bias=False, **kw)
        self.w3 = torch.nn.Linear(dim, hidden, bias=False, **kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(torch.nn.functional.silu(self.w1(x)) * self.w3(x))


class _Block(torch.nn.Module):
    def __init__(self, dim: int, heads: int, ffn: int, modulation: bool, **kw):
        super().__init__()
        self.attention = _Attention(dim, heads, **kw)
        self.feed_forward = _FeedForward(dim, ffn, **kw)
        self.attention_norm1 = _RMSNorm(dim, **kw)
        self.ffn_norm1 = _RMSNorm(dim, **kw)
        self.attention_norm2 = _RMSNorm(dim, **kw)
        self.ffn_norm2 = _RMSNorm(dim, **kw)
        self.modulation = modulation
        if modulation:
            self.adaLN_modulation = torch.nn.Sequential(torch.nn.Linear(ZIMAGE_ADALN, 4 * dim, **kw))

    def forward(self, x: torch.Tensor, c: torch.Tensor | None) -> torch.Tensor:
        if not self.modulation:
            x = x + self.attention_norm2(self.attention(self.attention_norm1(x)))
            return x + self.ffn_norm2(self.feed_forward(self.ffn_norm1(x)))
        scale_msa, gate_msa, scale_mlp, gate_mlp = self.adaLN_modulation(c).unsqueeze(1).chunk(4, dim=-1)
        x = x + gate_msa.tanh() * self.attention_norm2(
            self.attention(self.attention_norm1(x) * (1 + scale_msa))
        )
        return x + gate_mlp.tanh() * self.ffn_norm2(self.feed_forward(self.ffn_norm1(x) * (1 + scale_mlp)))


class ToyZImage(torch.nn.Module):
    """Z-Image (NextDiT) with the real width and Linear names at reduced depth, random weights.

    ``forward(latent [B,16,H,W], t [B], caption [B,Lc,2560]) -> [B, (H/2)(W/2), 64]`` (patch
    tokens of the prediction, not unpatchified: the error metric does not need the image).
    """

    def __init__(
        self,
        layers: int = 1,
        refiners: int = 1,
        dim: int = ZIMAGE_DIM,
        heads: int = ZIMAGE_HEADS,
        ffn: int = ZIMAGE_FFN,
        cap_dim: int = ZIMAGE_CAP_DIM,
        **kw,
    ):
        super().__init__()
        lin = torch.nn.Linear
        self.x_embedder = lin(64, dim, **kw)
        self.noise_refiner = torch.nn.ModuleList(
            [_Block(dim, heads, ffn, True, **kw) for _ in range(refiners)]
        )
        self.context_refiner = torch.nn.ModuleList(
            [_Block(dim, heads, ffn, False, **kw) for _ in range(refiners)]
        )
        self.t_embedder = torch.nn.Module()
        self.t_embedder.mlp = torch.nn.Sequential(
            lin(256, min(dim, 1024), **kw), torch.nn.SiLU(), lin(min(dim, 1024), ZIMAGE_ADALN, **kw)
        )
        self.cap_embedder = torch.nn.Sequential(_RMSNorm(cap_dim, **kw), lin(cap_dim, dim, **kw))
        self.layers = torch.nn.ModuleList([_Block(dim, heads, ffn, True, **kw) for _ in range(layers)])
        self.final_layer = torch.nn.Module()
        self.final_layer.norm_final = torch.nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6, **kw)
        self.final_layer.linear = lin(dim, 64, **kw)
        self.final_layer.adaLN_modulation = torch.nn.Sequential(torch.nn.SiLU(), lin(ZIMAGE_ADALN, dim, **kw))

    @staticmethod
    def _timestep_embedding(t: torch.Tensor, dim: int = 256) -> torch.Tensor:
        half = dim // 2
        freqs = torch.exp(
            -math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half
        )
        args = t.float()[:, None] * 1000.0 * freqs[None]
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)

    def forward(self, latent: torch.Tensor, t: torch.Tensor, caption: torch.Tensor) -> torch.Tensor:
        b, c, h, w = latent.shape
        dtype = self.x_embedder.weight.dtype if hasattr(self.x_embedder, "weight") else latent.dtype
        x = (
            latent.view(b, c, h // 2, 2, w // 2, 2)
            .permute(0, 2, 4, 3, 5, 1)
            .reshape(b, (h // 2) * (w // 2), 4 * c)
        )
        x = self.x_embedder(x.to(dtype))
        temb = self.t_embedder.mlp(self._timestep_embedding(t).to(dtype))
        cap = self.cap_embedder(caption.to(dtype))
        for blk in self.noise_refiner:
            x = blk(x, temb)
        for blk in self.context_refiner:
            cap = blk(cap, None)
        n_img = x.shape[1]
        xc = torch.cat([x, cap], dim=1)
        for blk in self.layers:
            xc = blk(xc, temb)
        x = xc[:, :n_img]
        scale = self.final_layer.adaLN_modulation(temb).unsqueeze(1)
        return self.final_layer.linear(self.final_layer.norm_final(x) * (1 + scale))


def build_toy_zimage(
    layers: int = 1,
    refiners: int = 1,
    seed: int = 0,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.bfloat16,
) -> ToyZImage:
    """Deterministic toy Z-Image: seeded weights (Linear weights N(0, 1/in), like a trained DiT's
    scale; norms at 1), built on ``device`` in ``dtype``."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    with torch.device("meta"):
        model = ToyZImage(layers=layers, refiners=refiners, dtype=dtype)
    # Weights are drawn on the CPU with one generator (the same weights on every device), in
    # the model dtype directly: drawing 0.55 B fp32 values and converting takes twice as long.
    model = model.to_empty(device="cpu")
    with torch.no_grad():
        for name, p in model.named_parameters():
            module_name = name.rsplit(".", 1)[0]
            if "norm" in module_name.rsplit(".", 1)[-1]:
                p.fill_(1.0)
            elif p.dim() == 2:
                p.normal_(0.0, 1.0 / math.sqrt(p.shape[1]), generator=gen)
            else:
                p.normal_(0.0, 0.02, generator=gen)
    return model.to(device).eval()


def toy_inputs(
    seed: int = 1,
    batch: int = 1,
    size: int = 16,
    caption_tokens: int = 32,
    device: str | torch.device = "cpu",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Deterministic (latent [B,16,size,size], t [B], caption [B,Lc,2560]) in fp32."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    latent = torch.randn(batch, 16, size, size, generator=gen)
    t = torch.rand(batch, generator=gen)
    caption = torch.randn(batch, caption_tokens, ZIMAGE_CAP_DIM, generator=gen)
    return latent.to(device), t.to(device), caption.to(device)
