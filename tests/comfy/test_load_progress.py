"""A long load reports progress through ComfyUI's ProgressBar (by bytes) and the console (one line
per ~10%), and stops at ComfyUI's interrupt between layers, leaving nothing behind."""

from __future__ import annotations

import gc
import logging
import time

import helpers_models as hm
import pytest
import torch

pytestmark = pytest.mark.comfyui

comfy = None


@pytest.fixture(scope="module")
def mods(pack):
    global comfy
    import comfy.model_management
    import comfy.utils

    return hm.import_submodules(pack, "nodes.loader", "nodes.layouts", "nodes.progress")


@pytest.fixture(scope="module")
def wan_file(comfyui_path, tmp_path_factory):
    return hm.save_model(hm.wan_model(seed=1), tmp_path_factory.mktemp("wanp") / "wan_tiny.safetensors")


@pytest.fixture(scope="module")
def wan_big_file(comfyui_path, tmp_path_factory):
    """A Wan whose load takes seconds on a CPU (dim 1024, 6 blocks: ~0.2 GB of bf16)."""
    import comfy.ops
    from comfy.ldm.wan.model import WanModel

    cfg = hm.tiny_config(hm.WAN_CONFIG, dim=1024, ffn_dim=4096, num_heads=8, num_layers=6)
    m = WanModel(**cfg, operations=comfy.ops.disable_weight_init, dtype=torch.bfloat16)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    return hm.save_model(m, tmp_path_factory.mktemp("wanbig") / "wan_big.safetensors")


@pytest.fixture
def progress_hook():
    calls = []
    old = comfy.utils.PROGRESS_BAR_HOOK

    def hook(value, total, preview, prompt_id=None, node_id=None):
        calls.append((value, total))

    comfy.utils.set_progress_bar_global_hook(hook)
    yield calls
    comfy.utils.set_progress_bar_global_hook(old)


def _live_packed_tensors(mods) -> int:
    gc.collect()
    cls = mods.nodes.layouts.OnlineQuantTensor
    return sum(1 for o in gc.get_objects() if type(o) is cls)


def test_progress_bar_moves_by_bytes_and_logs_tenths(mods, wan_file, progress_hook, caplog):
    from safetensors.torch import load_file

    sd = load_file(str(wan_file))
    total = sum(v.nbytes for k, v in sd.items() if k.endswith(".weight") and v.ndim == 2)
    with caplog.at_level(logging.INFO):
        mp, rep = mods.nodes.loader.load_quantized(str(wan_file), "fp8_e4m3fn", "", compute_dtype="bf16")
    values = [v for v, _ in progress_hook]
    assert {t for _, t in progress_hook} == {total}
    assert values == sorted(values) and values[-1] == total
    assert len(values) >= len(rep.layers)  # one update per Linear layer (plus the final one)
    lines = [r.getMessage() for r in caplog.records if "% loaded" in r.getMessage()]
    pcts = [int(line.split("%")[0].split()[-1]) for line in lines]
    assert pcts == sorted(set(pcts)) and pcts[-1] == 100 and len(lines) <= 10


def test_interrupt_stops_the_load_between_layers_and_frees_it(mods, wan_big_file, progress_hook):
    mm = comfy.model_management
    with torch.inference_mode():
        mp, _ = mods.nodes.loader.load_quantized(str(wan_big_file), "fp8_e4m3fn", "", compute_dtype="bf16")
    n_total = len(progress_hook)
    del mp
    mm.unload_all_models()
    mm.cleanup_models_gc()
    progress_hook.clear()
    before = _live_packed_tensors(mods)

    asked = {}

    def hook(value, total, preview, prompt_id=None, node_id=None):
        progress_hook.append((value, total))
        if "t" not in asked and value > 0.3 * total:
            asked["t"] = time.perf_counter()
            mm.interrupt_current_processing(True)  # what POST /interrupt does

    comfy.utils.set_progress_bar_global_hook(hook)
    # ComfyUI keeps the exception (and its traceback) too
    with pytest.raises(mm.InterruptProcessingException) as kept, torch.inference_mode():
        mods.nodes.loader.load_quantized(str(wan_big_file), "fp8_e4m3fn", "", compute_dtype="bf16")
    latency = time.perf_counter() - asked["t"]  # printed below; speed is not asserted in tests
    assert len(progress_hook) < n_total / 2  # stopped early
    assert not mm.processing_interrupted()  # the flag is consumed: the next run is not cancelled
    assert _live_packed_tensors(mods) == before  # nothing of the partial model survives
    assert kept.value is not None

    with torch.inference_mode():
        mp, rep = mods.nodes.loader.load_quantized(str(wan_big_file), "fp8_e4m3fn", "", compute_dtype="bf16")
    assert len(rep.quantized()) > 0
    print(f"cancel latency {latency * 1000:.0f} ms")


def test_a_plain_load_moves_the_bar_and_can_be_cancelled(mods, wan_big_file, progress_hook):
    """quantization 'none': the reader reports each tensor it reads (all of the file's bytes), and
    ComfyUI's interrupt stops the load there, the flag consumed for the next run."""
    from safetensors import safe_open

    with safe_open(str(wan_big_file), "pt") as f:
        total = sum(f.get_tensor(k).nbytes for k in f.keys())  # noqa: SIM118  (not a dict)
    mp, rep = mods.nodes.loader.load_quantized(str(wan_big_file), "none", "", compute_dtype="bf16")
    values = [v for v, _ in progress_hook]
    assert {t for _, t in progress_hook} == {total}
    assert values == sorted(values) and values[-1] == total and len(values) > 10
    n_total = len(values)
    del mp
    mm = comfy.model_management
    progress_hook.clear()

    def hook(value, total, preview, prompt_id=None, node_id=None):
        progress_hook.append((value, total))
        if value > 0.3 * total:
            mm.interrupt_current_processing(True)

    comfy.utils.set_progress_bar_global_hook(hook)
    with pytest.raises(mm.InterruptProcessingException):
        mods.nodes.loader.load_quantized(str(wan_big_file), "none", "", compute_dtype="bf16")
    assert len(progress_hook) < n_total / 2 and not mm.processing_interrupted()

