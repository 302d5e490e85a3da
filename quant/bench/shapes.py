"""The token-wise Linear shapes of Z-Image-Turbo, Wan 2.2 TI2V 5B and Wan 14B,
as (model, layers, K = in_features, N = out_features). Layers that run on one timestep vector
(adaLN, time embeddings) or on the short text context are left out: their GEMMs are tiny."""

from __future__ import annotations

LINEAR_SHAPES: list[tuple[str, str, int, int]] = [
    ("zimage", "attention.qkv", 3840, 11520),
    ("zimage", "attention.out", 3840, 3840),
    ("zimage", "feed_forward.w1/w3", 3840, 10240),
    ("zimage", "feed_forward.w2", 10240, 3840),
    ("wan22_5b", "self_attn.q/k/v/o, cross_attn.q/o", 3072, 3072),
    ("wan22_5b", "ffn.0", 3072, 14336),
    ("wan22_5b", "ffn.2", 14336, 3072),
    ("wan21_t2v_14b", "self_attn.q/k/v/o, cross_attn.q/o", 5120, 5120),
    ("wan21_t2v_14b", "ffn.0", 5120, 13824),
    ("wan21_t2v_14b", "ffn.2", 13824, 5120),
]

# Tokens per step: Z-Image 1024x1024 is 4096 image + text tokens; Wan 5B 1280x704x121 is 27280;
# Wan 14B 1280x720x81 is 75600 (32760 = 720p-ish 14B at fewer frames).
DEFAULT_M = (4096, 32760)

QUICK_SHAPES: list[tuple[str, str, int, int]] = [
    ("tiny", "a", 256, 384),
    ("tiny", "b", 384, 256),
]
QUICK_M = (64,)
