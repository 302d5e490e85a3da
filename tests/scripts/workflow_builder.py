"""Builds example_workflows/*.json (the UI format the frontend saves, version 0.4).

The JSON files are committed; this script is how they were made, so a change of a node's inputs
is one edit here and a rerun:  python3 tests/scripts/workflow_builder.py
Sampler settings follow ComfyUI's own templates for these models (comfyui-workflow-templates);
model file names are the Comfy-Org repackaged ones. tests/e2e/test_workflows.py checks the result
against a real ComfyUI's /object_info.

ComfyUI's template browser shows a custom node's example workflow by its file name (as title and
as description) and `<name>.jpg` next to it as the thumbnail, so each file is named by a human
title; its one-line description opens the workflow's note. The thumbnails are rendered from the
workflows by tests/e2e/test_browser.py (ONLINEQUANT_UPDATE_THUMBNAILS=1 writes them here).

Layout: nodes sit in columns with a gap, and a loader has room below it for its panel opened all
the way (the per-layer list and the load report: nodes grow to LOADER_ROOM), so that nothing
overlaps in the editor; the browser test checks the bounding boxes.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

OUT = Path(__file__).resolve().parents[2] / "example_workflows"

# quant/selection/user_text.py AUTO_IGNORE_TEXT: the loader's default (the detected family's defaults);
# a test checks the two agree (this script runs without the package on its path).
AUTO_IGNORE = "# auto: this model's defaults; add patterns below\n"
HF = "https://huggingface.co/Comfy-Org"
ZIMAGE_REPO = f"{HF}/z_image_turbo/resolve/main/split_files"
WAN22_REPO = f"{HF}/Wan_2.2_ComfyUI_Repackaged/resolve/main/split_files"
WAN21_REPO = f"{HF}/Wan_2.1_ComfyUI_repackaged/resolve/main/split_files"
WAN_NEGATIVE = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，JPEG压缩残留，"
    "丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，手指融合，"
    "静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走"
)


# Room a loader takes with its panel fully open: 672 px measured in the browser test, as
# web/oq_panel.js caps the panel at 440 px.
LOADER_ROOM = 720
GAP = 40
# Nodes in a column are placed one below the other with 20 px between their boxes; a stock node
# here is 120 high (its `size`) under a 30 px title, so the next one starts 170 below it.
# Column x positions: loaders (400 wide), small loaders/patches, prompts (400), samplers, outputs.
COL = (40, 480, 860, 1300, 1660, 2100)


def model_entry(name: str, repo: str, directory: str) -> dict:
    return {"name": name, "url": f"{repo}/{directory}/{name}", "directory": directory}


class Graph:
    """A tiny builder of UI-format graphs: nodes with typed slots and links between them."""

    def __init__(self):
        self.nodes: list[dict] = []
        self.links: list[list] = []

    def node(self, type_, pos, widgets=None, inputs=(), outputs=(), size=(320, 120), title=None, models=None):
        n = {
            "id": len(self.nodes) + 1,
            "type": type_,
            "pos": list(pos),
            "size": list(size),
            "flags": {},
            "order": len(self.nodes),
            "mode": 0,
            "inputs": [{"name": nm, "type": t, "link": None} for nm, t in inputs],
            "outputs": [{"name": nm, "type": t, "links": []} for nm, t in outputs],
            "properties": {"Node name for S&R": type_},
            "widgets_values": list(widgets or []),
        }
        if title:
            n["title"] = title
        if models:
            n["properties"]["models"] = models
        self.nodes.append(n)
        return n

    def link(self, src: dict, out_slot: int, dst: dict, in_name: str) -> None:
        lid = len(self.links) + 1
        typ = src["outputs"][out_slot]["type"]
        slot = next(i for i, s in enumerate(dst["inputs"]) if s["name"] == in_name)
        dst["inputs"][slot]["link"] = lid
        src["outputs"][out_slot]["links"].append(lid)
        self.links.append([lid, src["id"], out_slot, dst["id"], slot, typ])

    def to_json(self) -> dict:
        return {
            "id": str(uuid.uuid5(uuid.NAMESPACE_URL, json.dumps([n["type"] for n in self.nodes]))),
            "revision": 0,
            "last_node_id": len(self.nodes),
            "last_link_id": len(self.links),
            "nodes": self.nodes,
            "links": self.links,
            "groups": [],
            "config": {},
            "extra": {"ds": {"scale": 0.75, "offset": [40, 40]}},
            "version": 0.4,
        }


def loader(g: Graph, pos, unet: str, repo: str, fmt: str, title=None) -> dict:
    return g.node(
        "OnlineQuantDiffusionLoader",
        pos,
        [unet, fmt, AUTO_IGNORE, 256, "auto", "none", False],
        outputs=[("MODEL", "MODEL"), ("report", "STRING")],
        size=(400, 404),
        title=title,
        models=[model_entry(unet, repo, "diffusion_models")],
    )


def attention(g: Graph, pos, title=None) -> dict:
    return g.node(
        "OnlineQuantAttention",
        pos,
        ["auto"],
        inputs=[("model", "MODEL")],
        outputs=[("MODEL", "MODEL")],
        size=(320, 60),
        title=title,
    )


def note(g: Graph, pos, text: str) -> dict:
    return g.node("Note", pos, [text], size=(420, 300))


# The stock ComfyUI nodes every workflow here uses, with their slots written once.
KSAMPLER_INPUTS = [
    ("model", "MODEL"),
    ("positive", "CONDITIONING"),
    ("negative", "CONDITIONING"),
    ("latent_image", "LATENT"),
]


def clip_loader(g: Graph, pos, name: str, clip_type: str, repo: str) -> dict:
    return g.node(
        "CLIPLoader",
        pos,
        [name, clip_type, "default"],
        outputs=[("CLIP", "CLIP")],
        models=[model_entry(name, repo, "text_encoders")],
    )


def vae_loader(g: Graph, pos, name: str, repo: str) -> dict:
    return g.node("VAELoader", pos, [name], outputs=[("VAE", "VAE")], models=[model_entry(name, repo, "vae")])


def model_sampling(g: Graph, type_: str, pos, shift: float) -> dict:
    return g.node(type_, pos, [shift], inputs=[("model", "MODEL")], outputs=[("MODEL", "MODEL")])


def text_encode(g: Graph, pos, text: str) -> dict:
    return g.node(
        "CLIPTextEncode",
        pos,
        [text],
        inputs=[("clip", "CLIP")],
        outputs=[("CONDITIONING", "CONDITIONING")],
        size=(400, 160),
    )


def vae_decode(g: Graph, pos) -> dict:
    return g.node(
        "VAEDecode", pos, [], inputs=[("samples", "LATENT"), ("vae", "VAE")], outputs=[("IMAGE", "IMAGE")]
    )


def create_video(g: Graph, pos, fps: int) -> dict:
    return g.node(
        "CreateVideo",
        pos,
        [fps],
        inputs=[("images", "IMAGE"), ("audio", "AUDIO")],
        outputs=[("VIDEO", "VIDEO")],
    )


def save_video(g: Graph, pos, prefix: str) -> dict:
    return g.node("SaveVideo", pos, [prefix, "auto", "auto"], inputs=[("video", "VIDEO")], size=(400, 440))


def where_files_go(description: str, files: dict[str, list[str]], extra: str = "") -> str:
    lines = [
        description,
        "",
        "Model files (Comfy-Org repackaged, bf16/fp16: the loader quantizes them as they load):",
        "",
    ]
    for folder, names in files.items():
        for n in names:
            lines.append(f"ComfyUI/models/{folder}/{n}")
    lines += [
        "",
        "Download links are in each loader node's properties (ComfyUI offers them when a file is missing).",
    ]
    if extra:
        lines += ["", extra]
    return "\n".join(lines)


def zimage(fmt: str, description: str) -> dict:
    g = Graph()
    unet = "z_image_turbo_bf16.safetensors"
    m = loader(g, (COL[0], 40), unet, ZIMAGE_REPO, fmt)
    clip = clip_loader(g, (COL[1], 40), "qwen_3_4b.safetensors", "lumina2", ZIMAGE_REPO)
    vae = vae_loader(g, (COL[1], 210), "ae.safetensors", ZIMAGE_REPO)
    ms = model_sampling(g, "ModelSamplingAuraFlow", (COL[1], 380), 3)
    pos = text_encode(
        g,
        (COL[2], 40),
        "A lighthouse on a rocky coast at golden hour, waves breaking, cinematic photo, sharp detail",
    )
    neg = g.node(
        "ConditioningZeroOut",
        (COL[2], 260),
        [],
        inputs=[("conditioning", "CONDITIONING")],
        outputs=[("CONDITIONING", "CONDITIONING")],
    )
    lat = g.node("EmptySD3LatentImage", (COL[2], 430), [1024, 1024, 1], outputs=[("LATENT", "LATENT")])
    ks = g.node(
        "KSampler",
        (COL[3], 40),
        [0, "randomize", 4, 1, "res_multistep", "simple", 1],
        inputs=KSAMPLER_INPUTS,
        outputs=[("LATENT", "LATENT")],
        size=(320, 260),
    )
    dec = vae_decode(g, (COL[3], 360))
    save = g.node(
        "SaveImage", (COL[4], 40), [f"z-image-{fmt}"], inputs=[("images", "IMAGE")], size=(400, 440)
    )
    g.link(m, 0, ms, "model")
    g.link(ms, 0, ks, "model")
    g.link(clip, 0, pos, "clip")
    g.link(pos, 0, neg, "conditioning")
    g.link(pos, 0, ks, "positive")
    g.link(neg, 0, ks, "negative")
    g.link(lat, 0, ks, "latent_image")
    g.link(ks, 0, dec, "samples")
    g.link(vae, 0, dec, "vae")
    g.link(dec, 0, save, "images")
    note(
        g,
        (COL[2], 600),
        where_files_go(
            description,
            {
                "diffusion_models": [unet],
                "text_encoders": ["qwen_3_4b.safetensors"],
                "vae": ["ae.safetensors"],
            },
            f"The loader quantizes Linear layers to {fmt} as the file loads; the panel under it previews "
            "which layers are quantized and kept, and shows the load report after a run.",
        ),
    )
    return g.to_json()


def wan22_5b(description: str) -> dict:
    g = Graph()
    unet = "wan2.2_ti2v_5B_fp16.safetensors"
    m = loader(g, (COL[0], 40), unet, WAN22_REPO, "fp8_e4m3fn")
    att = attention(g, (COL[1], 40))
    ms = model_sampling(g, "ModelSamplingSD3", (COL[1], 150), 8)
    clip = clip_loader(g, (COL[1], 320), "umt5_xxl_fp8_e4m3fn_scaled.safetensors", "wan", WAN21_REPO)
    vae = vae_loader(g, (COL[1], 490), "wan2.2_vae.safetensors", WAN22_REPO)
    pos = text_encode(
        g,
        (COL[2], 40),
        "A street musician plays guitar in a retro subway station, commuters pass by, the camera slowly "
        "moves right, warm dim light, film grain",
    )
    neg = text_encode(g, (COL[2], 280), WAN_NEGATIVE)
    lat = g.node(
        "Wan22ImageToVideoLatent",
        (COL[2], 500),
        [1280, 704, 121, 1],
        inputs=[("vae", "VAE"), ("start_image", "IMAGE")],
        outputs=[("LATENT", "LATENT")],
        size=(320, 160),
    )
    ks = g.node(
        "KSampler",
        (COL[3], 40),
        [0, "randomize", 20, 5, "uni_pc", "simple", 1],
        inputs=KSAMPLER_INPUTS,
        outputs=[("LATENT", "LATENT")],
        size=(320, 260),
    )
    dec = vae_decode(g, (COL[3], 360))
    cv = create_video(g, (COL[3], 530), 24)
    save = save_video(g, (COL[4], 40), "video/wan22_5b_fp8")
    g.link(m, 0, att, "model")
    g.link(att, 0, ms, "model")
    g.link(ms, 0, ks, "model")
    g.link(clip, 0, pos, "clip")
    g.link(clip, 0, neg, "clip")
    g.link(vae, 0, lat, "vae")
    g.link(pos, 0, ks, "positive")
    g.link(neg, 0, ks, "negative")
    g.link(lat, 0, ks, "latent_image")
    g.link(ks, 0, dec, "samples")
    g.link(vae, 0, dec, "vae")
    g.link(dec, 0, cv, "images")
    g.link(cv, 0, save, "video")
    note(
        g,
        (COL[4], 560),
        where_files_go(
            description,
            {
                "diffusion_models": [unet],
                "text_encoders": ["umt5_xxl_fp8_e4m3fn_scaled.safetensors"],
                "vae": ["wan2.2_vae.safetensors"],
            },
            "Text to video as set up. For image to video, add a Load Image node and connect it to "
            "'start_image' of Wan22ImageToVideoLatent. The attention node picks the attention backend "
            "for this model only ('auto': FA2 on ROCm when installed, cuDNN SDPA on Hopper).",
        ),
    )
    return g.to_json()


def wan22_14b_t2v(description: str) -> dict:
    g = Graph()
    high = "wan2.2_t2v_high_noise_14B_fp16.safetensors"
    low_y = 40 + LOADER_ROOM + GAP  # the low-noise row starts below the high-noise loader's room
    low = "wan2.2_t2v_low_noise_14B_fp16.safetensors"
    mh = loader(g, (COL[0], 40), high, WAN22_REPO, "mxfp4", title="High-noise expert (MXFP4)")
    ml = loader(g, (COL[0], low_y), low, WAN22_REPO, "mxfp4", title="Low-noise expert (MXFP4)")
    ah = attention(g, (COL[1], 40), title="Attention (high-noise)")
    al = attention(g, (COL[1], low_y), title="Attention (low-noise)")
    msh = model_sampling(g, "ModelSamplingSD3", (COL[1], 150), 8)
    msl = model_sampling(g, "ModelSamplingSD3", (COL[1], low_y + 110), 8)
    clip = clip_loader(g, (COL[1], 320), "umt5_xxl_fp8_e4m3fn_scaled.safetensors", "wan", WAN21_REPO)
    vae = vae_loader(g, (COL[1], 490), "wan_2.1_vae.safetensors", WAN22_REPO)
    pos = text_encode(
        g,
        (COL[2], 40),
        "A red fox trots through fresh snow in a birch forest at dawn, breath visible, soft light, "
        "slow tracking shot",
    )
    neg = text_encode(g, (COL[2], 280), WAN_NEGATIVE)
    lat = g.node("EmptyHunyuanLatentVideo", (COL[2], 500), [640, 640, 81, 1], outputs=[("LATENT", "LATENT")])
    ksh = g.node(
        "KSamplerAdvanced",
        (COL[3], 40),
        ["enable", 0, "randomize", 20, 3.5, "euler", "simple", 0, 10, "enable"],
        inputs=KSAMPLER_INPUTS,
        outputs=[("LATENT", "LATENT")],
        size=(320, 340),
        title="KSampler (high-noise, steps 0-10)",
    )
    ksl = g.node(
        "KSamplerAdvanced",
        (COL[3], low_y),
        ["disable", 0, "fixed", 20, 3.5, "euler", "simple", 10, 10000, "disable"],
        inputs=KSAMPLER_INPUTS,
        outputs=[("LATENT", "LATENT")],
        size=(320, 340),
        title="KSampler (low-noise, steps 10-20)",
    )
    dec = vae_decode(g, (COL[4], low_y))
    cv = create_video(g, (COL[4], low_y + 170), 16)
    save = save_video(g, (COL[4], 40), "video/wan22_14b_mxfp4")
    g.link(mh, 0, ah, "model")
    g.link(ml, 0, al, "model")
    g.link(ah, 0, msh, "model")
    g.link(al, 0, msl, "model")
    g.link(msh, 0, ksh, "model")
    g.link(msl, 0, ksl, "model")
    g.link(clip, 0, pos, "clip")
    g.link(clip, 0, neg, "clip")
    for ks in (ksh, ksl):
        g.link(pos, 0, ks, "positive")
        g.link(neg, 0, ks, "negative")
    g.link(lat, 0, ksh, "latent_image")
    g.link(ksh, 0, ksl, "latent_image")
    g.link(ksl, 0, dec, "samples")
    g.link(vae, 0, dec, "vae")
    g.link(dec, 0, cv, "images")
    g.link(cv, 0, save, "video")
    note(
        g,
        (COL[2], low_y),
        where_files_go(
            description,
            {
                "diffusion_models": [high, low],
                "text_encoders": ["umt5_xxl_fp8_e4m3fn_scaled.safetensors"],
                "vae": ["wan_2.1_vae.safetensors"],
            },
            "Both experts load through the quant loader as MXFP4 (about 27% of their bf16 size for the "
            "quantized layers; attention layers stay bf16 by the Wan defaults). The high-noise expert "
            "runs steps 0-10, the low-noise expert steps 10-20, as in ComfyUI's own Wan 2.2 template.",
        ),
    )
    return g.to_json()


# File name (the template browser's title) -> (one-line description, builder).
WORKFLOWS = {
    "Z-Image Turbo FP8 text to image": (
        "Z-Image Turbo in 4 steps, its Linear layers quantized to FP8 while the bf16 file loads.",
        lambda d: zimage("fp8_e4m3fn", d),
    ),
    "Z-Image Turbo MXFP4 text to image": (
        "Z-Image Turbo in 4 steps, its Linear layers quantized to MXFP4 (4.25 bits) while the file loads.",
        lambda d: zimage("mxfp4", d),
    ),
    "Wan 2.2 5B FP8 text to video": (
        "Wan 2.2 TI2V 5B quantized to FP8 on load, with the attention backend chosen for this model.",
        wan22_5b,
    ),
    "Wan 2.2 A14B MXFP4 text to video": (
        "Wan 2.2 T2V A14B: the high- and low-noise experts each quantized to MXFP4 on load, each with "
        "its attention backend.",
        wan22_14b_t2v,
    ),
}


def main() -> None:
    OUT.mkdir(exist_ok=True)
    for name, (description, build) in WORKFLOWS.items():
        path = OUT / f"{name}.json"
        path.write_text(json.dumps(build(description), indent=2, ensure_ascii=False) + "\n")
        print(path)


if __name__ == "__main__":
    main()
