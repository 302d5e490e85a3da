"""Reuse a loader node's model when a run asks it for the same effective plan again.

ComfyUI re-runs the loader whenever any input text changes, a comment in `ignored_layers`
included, and drops the node's previous output before it does; the load would then quantize the
whole file again. Each loader node keeps its last model here: a run whose file (same path, size
and modification time), format, compute dtype, sensitivity rule and resolved per-layer decisions
are those of that model gets it back. When the plan changed, the node's entry is dropped BEFORE
the new load, so a node never holds two models (no second copy of any model is kept alive), and a
queued prompt without the node lets go of it (`on_prompt`).
"""

from __future__ import annotations

import os
from collections.abc import Callable

from ..quant.selection.checkpoint_plan import NO_QUANTIZATION, plan_file

_entries: dict[str, tuple[tuple, object, object]] = {}  # node id -> (key, model, report)


def plan_key(
    path: str,
    quantization: str,
    ignore_text: str | None,
    min_out_features: int,
    compute_dtype: str,
    keep_sensitive: str | None,
) -> tuple | None:
    """What makes two loads the same, or None when it cannot be known from the header alone."""
    if not path.lower().endswith((".safetensors", ".sft")):
        return None
    st = os.stat(path)
    cp = plan_file(path, quantization, ignore_text, min_out_features=min_out_features)
    decisions = tuple((d.name, d.quantize, d.precision) for d in cp.plan.decisions)
    fmt = quantization if cp.quantize else NO_QUANTIZATION
    return (
        os.path.realpath(path),
        st.st_size,
        st.st_mtime_ns,
        fmt,
        compute_dtype,
        (keep_sensitive or "none").strip().lower(),
        decisions,
    )


def load_or_reuse(
    node_id: str | None, key: tuple | None, load: Callable[[], tuple], live_nodes: set[str] | None = None
) -> tuple[object, object, bool]:
    """(model, report, reused): the node's last model when `key` is the same, else `load()`.
    `live_nodes` (the node ids of the prompt being run): models kept for loader nodes that are no
    longer in the workflow are let go of here."""
    if live_nodes is not None:
        for gone in [n for n in _entries if n not in live_nodes]:
            del _entries[gone]
    if node_id is None or key is None:
        model, report = load()
        return model, report, False
    last = _entries.pop(node_id, None)  # a changed plan lets go of the old model before the load
    if last is not None and last[0] == key:
        _entries[node_id] = last
        return last[1], last[2], True
    del last
    model, report = load()
    _entries[node_id] = (key, model, report)
    return model, report, False


def on_prompt(json_data: dict) -> dict:
    """ComfyUI's on-prompt hook (every queued prompt): let go of the models kept for loader nodes
    that the new workflow does not have, so a model is not held after its node was removed."""
    prompt = json_data.get("prompt") if isinstance(json_data, dict) else None
    if isinstance(prompt, dict):
        for gone in [n for n in _entries if n not in prompt]:
            del _entries[gone]
    return json_data


def setup() -> bool:
    """Register `on_prompt` on ComfyUI's server when one runs (once)."""
    try:
        from server import PromptServer
    except ImportError:
        return False
    instance = getattr(PromptServer, "instance", None)
    if instance is None or on_prompt in instance.on_prompt_handlers:
        return False
    instance.add_on_prompt_handler(on_prompt)
    return True


def forget(node_id: str | None = None) -> None:
    """Drop the kept model of one node (or of all): e.g. when ComfyUI frees its models."""
    if node_id is None:
        _entries.clear()
    else:
        _entries.pop(node_id, None)


__all__ = ["forget", "load_or_reuse", "on_prompt", "plan_key", "setup"]
