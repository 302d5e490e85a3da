"""Every core node of ComfyUI with a MODEL input, on a quantized tiny Wan and a quantized tiny
Z-Image, in a real server (main.py --cpu): the conformance table of docs/model_nodes.md.

For each family the same prompt runs three times: on the unquantized files (stock UNETLoader), and
through the pack's loader in FP8 and in MXFP4 (tests/support/model_nodes.py builds it). Each node
then works (its result against the unquantized one's: finite and no further off than quantization
puts the plain loader -> KSampler path), refuses with the pack's own error, or is not applicable
(it fails on the unquantized model too, has no effect on these models, or needs inputs that cannot
exist here); anything else is broken and fails the test.

    ONLINEQUANT_UPDATE_DOCS=1 bash tests/run.sh tests/e2e/test_model_nodes.py   # rewrites the table
"""

from __future__ import annotations

import os
from pathlib import Path

import helpers_models as hm
import pytest
import torch
from conftest import REPO_ROOT
from model_nodes import FORMATS, PLAIN, REFERENCE, VARIANTS, Family, core_model_nodes, model_node_cases
from model_nodes_run import rel_err, run_variant
from model_nodes_table import BROKEN, WORKS, classify, render, statuses
from test_e2e_server import LORA_NAME, _write_lora, server_base

from quant.models import default_ignore_text

pytestmark = [pytest.mark.comfyui, pytest.mark.slow]

ZIMAGE_LORA = "oq_test_lora_zimage.safetensors"
TAESD = "oq_tiny_taesd.safetensors"

# A tiny Z-Image is a NextDiT with Z-Image's options at width 256; ComfyUI detects Z-Image at width
# 3840 only (and the pack, as ComfyUI, calls other widths generic). This server-side node installs
# tests/support/zimage_detect.py in the server, as helpers_models.zimage_detection does in-process.
ZIMAGE_NODE = """
import sys

sys.path.insert(0, {support!r})
import zimage_detect

zimage_detect.install_in_server({config!r})
NODE_CLASS_MAPPINGS = {{}}
"""

# A CLIP for the nodes that take one beside the MODEL (LoraLoader, CheckpointSave): ComfyUI's own
# SD1 CLIP-L text model at a tiny width, random weights (no text encoder file exists here).
CLIP_NODE = """
import functools

import comfy.sd
import comfy.sd1_clip
import comfy.supported_models_base
import torch

TINY = {
    "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 2, "num_hidden_layers": 1,
    "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5, "max_position_embeddings": 77,
    "vocab_size": 49408, "projection_dim": 64, "bos_token_id": 0, "eos_token_id": 49407,
}


class OQTestCLIP:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {}}

    RETURN_TYPES = ("CLIP",)
    FUNCTION = "run"
    CATEGORY = "testing"

    def run(self):
        model = functools.partial(
            comfy.sd1_clip.SD1ClipModel, clip_model=comfy.sd1_clip.SDClipModel, textmodel_json_config=TINY
        )
        target = comfy.supported_models_base.ClipTarget(comfy.sd1_clip.SD1Tokenizer, model)
        clip = comfy.sd.CLIP(target)
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():  # ComfyUI's ops leave weights uninitialized
            for p in clip.cond_stage_model.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
        return (clip,)


NODE_CLASS_MAPPINGS = {"OQTestCLIP": OQTestCLIP}
"""


def _zimage_lora_layers(model: torch.nn.Module) -> dict[str, tuple[int, int]]:
    """Quantized Linear layers of the tiny Z-Image for its test LoRA: (out, in) features."""
    d = hm.ZIMAGE_DIM
    ffn = dict(model.named_modules())["layers.0.feed_forward.w1"].out_features
    return {
        "layers.0.attention.qkv": (3 * d, d),
        "layers.0.feed_forward.w2": (d, ffn),
        "layers.1.attention.out": (d, d),
        "noise_refiner.0.feed_forward.w1": (ffn, d),
    }


def _finetuned(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """`model` with every weight moved by 10% of its spread: a second model for the merges, related
    to the first as a fine-tune is to its base (two unrelated random models add up to a model whose
    outputs swing far more than a real merge's)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1 * p.std().nan_to_num())
    return model


def _write_taesd(path) -> None:
    """A TAESD (ComfyUI's tiny VAE, 16 latent channels) with random weights: a real VAE that
    stock VAELoader loads (it detects TAESD by its key names)."""
    from comfy.taesd.taesd import TAESD
    from safetensors.torch import save_file

    m = TAESD(latent_channels=16)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():  # ComfyUI's ops leave weights uninitialized
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(path))


FAMILIES = (
    Family(
        key="wan",
        title="Wan",
        files=("wan_tiny.safetensors", "wan_tiny_b.safetensors"),
        lora=LORA_NAME,
        latent={
            "class_type": "EmptyHunyuanLatentVideo",
            "inputs": {"width": 64, "height": 64, "length": 1, "batch_size": 1},
        },
        cond_width=4096,
        ignored_layers="# auto\n",
    ),
    Family(
        key="zimage",
        title="Z-Image",
        files=("zimage_tiny.safetensors", "zimage_tiny_b.safetensors"),
        lora=ZIMAGE_LORA,
        latent={"class_type": "EmptySD3LatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        cond_width=hm.ZIMAGE_CAP,
        # the pack detects Z-Image at width 3840 only: its defaults, written out
        ignored_layers=default_ignore_text("zimage"),
    ),
)


@pytest.fixture(scope="module")
def server(comfyui_path, tmp_path_factory):
    from comfy_server import start_comfy_server

    base = server_base(tmp_path_factory, "oq_nodes")
    models = base / "models"
    diffusion = models / "diffusion_models"
    hm.save_model(
        _finetuned(hm.wan_model(seed=11), 12), diffusion / "wan_tiny_b.safetensors"
    )  # as in server_base
    zimage = hm.zimage_model(seed=2)
    hm.save_model(zimage, diffusion / "zimage_tiny.safetensors")
    _write_lora(models / "loras" / ZIMAGE_LORA, _zimage_lora_layers(zimage))
    hm.save_model(_finetuned(zimage, 3), diffusion / "zimage_tiny_b.safetensors")
    _write_taesd(models / "vae" / TAESD)
    zimage_node = ZIMAGE_NODE.format(support=str(Path(hm.__file__).parent), config=hm.ZIMAGE_CONFIG)
    (base / "custom_nodes" / "oq_test_zimage.py").write_text(zimage_node)
    (base / "custom_nodes" / "oq_test_clip.py").write_text(CLIP_NODE)
    srv = start_comfy_server(comfyui_path, base)
    try:
        yield srv
    finally:
        srv.stop()


DOC = REPO_ROOT / "docs" / "model_nodes.md"
COMMAND = "ONLINEQUANT_UPDATE_DOCS=1 bash tests/run.sh tests/e2e/test_model_nodes.py"


@pytest.fixture(scope="module")
def table(server):
    """(rows, verdicts per family, plain path errors per family) of every core MODEL node."""
    info = server.get_json("/object_info")
    cases = model_node_cases(info)
    verdicts, plain_err = {}, {}
    for fam in FAMILIES:
        runs, skipped = {}, {}
        for variant in VARIANTS:
            runs[variant], skipped = run_variant(server, info, fam, variant)
        verdicts[fam.key] = {label: classify(label, runs, skipped.get(label)) for label in cases}
        ref = runs[REFERENCE][PLAIN].value
        plain_err[fam.key] = {f: rel_err(ref, runs[f][PLAIN].value) for f in FORMATS}
    rows = sorted(
        ((label, spec["category"]) for label, (_, spec) in cases.items()), key=lambda r: (r[1], r[0])
    )
    return rows, verdicts, plain_err


def test_every_core_model_node_has_a_verdict_that_says_why(server, table):
    rows, verdicts, _ = table
    info = server.get_json("/object_info")
    core = set(core_model_nodes(info))
    assert len(core) > 80 and core <= {label for label, _ in rows}  # ComfyUI 0.8.0 has 90
    assert "OnlineQuantAttention" in info and not any(n.startswith("OnlineQuant") for n in core)
    assert {"KSampler", "LoraLoaderModelOnly", "ModelMergeSimple", "ModelSave", "CFGGuider"} <= core
    for fam, by_label in verdicts.items():
        assert set(by_label) == {label for label, _ in rows}
        for label, v in by_label.items():
            assert v.status == WORKS or v.detail, (fam, label, v)  # n.a. and refusals give the reason


def test_no_node_is_broken(table):
    _, verdicts, _ = table
    broken = [
        f"{fam} {label}: {v.detail}"
        for fam, by in verdicts.items()
        for label, v in by.items()
        if v.status == BROKEN
    ]
    assert not broken, "\n".join(broken)


def test_the_nodes_that_matter_work(table):
    """The everyday nodes do run on both quantized families (the table cannot drift into n.a.)."""
    _, verdicts, _ = table
    for fam in verdicts:
        for label in (
            "KSampler",
            "SamplerCustom",
            "CFGGuider",
            "LoraLoaderModelOnly",
            "LoraLoader",
            "ModelMergeSimple",
            "ModelSamplingSD3",
            "ModelSave",
            "LoraSave",
        ):
            assert verdicts[fam][label].status == WORKS, (fam, label, verdicts[fam][label])


def test_the_committed_table_is_current(table):
    rows, verdicts, plain_err = table
    text = render(rows, verdicts, {f.key: f.title for f in FAMILIES}, plain_err, COMMAND)
    if os.environ.get("ONLINEQUANT_UPDATE_DOCS"):
        DOC.write_text(text)
    assert DOC.is_file(), f"docs/model_nodes.md is missing: run {COMMAND}"
    assert statuses(DOC.read_text(), len(FAMILIES)) == statuses(text, len(FAMILIES)), f"run {COMMAND}"
