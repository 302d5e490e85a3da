"""Run the prompt of tests/support/model_nodes.py on a server and collect each node's outcome.

ComfyUI stops a prompt at the first node that raises. The failing node's case is recorded with
its error and taken out of the prompt, and the rest is queued again: ComfyUI's cache keeps what
already ran, so each failure costs only the cases that had not run yet.
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass
from pathlib import Path

import torch
from model_nodes import PLAIN, Case, Family, build_prompt


@dataclass
class Outcome:
    """What one case gave: a latent tensor, a float, or a file's tensors (dict); or an error."""

    value: object = None
    error: str = ""  # the exception's message (or the prompt validation's)
    error_type: str = ""  # e.g. "RuntimeError", or the pack's "...errors.CheckpointError"
    stage: str = ""  # class_type of the node that raised (the node itself or what ran after it)

    @property
    def ok(self) -> bool:
        return not self.error_type


def _saved(output_dir: Path, prefix: str) -> Path:
    """The one file a save node wrote for `prefix` (<prefix>_00001_.<ext>)."""
    folder, name = (output_dir / prefix).parent, Path(prefix).name
    files = [p for p in folder.glob(f"{name}_*") if re.fullmatch(rf"{re.escape(name)}_\d{{5}}_\.\w+", p.name)]
    assert len(files) == 1, (prefix, files)
    return files[0]


def _read(case: Case, output_dir: Path, ui: dict) -> object:
    from safetensors.torch import load_file

    if case.kind == "float":
        return float(ui[case.out]["text"][0])
    tensors = load_file(str(_saved(output_dir, case.out)))
    if case.kind == "latent":
        return tensors["latent_tensor"].float()
    # a checkpoint's CLIP and VAE are the test's own: only the diffusion model's tensors are judged
    model = {k: v.float() for k, v in tensors.items() if "diffusion_model." in k}
    return model or {k: v.float() for k, v in tensors.items()}


def _drop(prompt: dict, case: Case) -> None:
    for i in case.ids:
        prompt.pop(i, None)


def run_variant(server, info: dict, fam: Family, variant: str) -> tuple[dict[str, Outcome], dict[str, str]]:
    """(outcome per node, with the baseline under PLAIN; reason per node that is not run here)."""
    prompt, cases, skipped = build_prompt(info, fam, variant)
    owner = {i: c.node for c in cases.values() for i in c.ids}
    outcomes: dict[str, Outcome] = {}
    ui: dict = {}
    for _ in range(len(cases) + 1):
        status, body = server.post_json("/prompt", {"prompt": prompt, "client_id": uuid.uuid4().hex})
        # Inputs refused at queue time: ComfyUI runs the other outputs (200) or none (400).
        errors = (body or {}).get("node_errors") or {}
        nodes = {owner.get(i) for i in errors}
        assert None not in nodes and PLAIN not in nodes, f"/prompt refused a shared node: {body}"
        for i, e in errors.items():
            first = e["errors"][0]
            outcomes[owner[i]] = Outcome(
                error=f"{first['message']}: {first.get('details', '')}",
                error_type="prompt validation",
                stage=e.get("class_type", ""),
            )
            _drop(prompt, cases[owner[i]])
        if status != 200:
            assert errors, f"/prompt -> {status}: {body}"
            continue
        entry = server.wait_for(body["prompt_id"], timeout_s=300)
        ui.update(entry.get("outputs", {}))
        if entry["status"].get("status_str") == "success":
            break
        err = next(m[1] for m in entry["status"]["messages"] if m[0] == "execution_error")
        node = owner.get(err["node_id"])
        assert node not in (None, PLAIN), f"a shared node failed: {err}\n{server.log_tail()}"
        outcomes[node] = Outcome(
            error=err["exception_message"].strip(), error_type=err["exception_type"], stage=err["node_type"]
        )
        _drop(prompt, cases[node])
    else:
        raise AssertionError(f"{fam.key}/{variant}: the prompt never completed\n{server.log_tail()}")
    out_dir = server.base_dir / "output"
    for node, case in cases.items():
        if node not in outcomes:
            outcomes[node] = Outcome(value=_read(case, out_dir, ui))
    return outcomes, skipped


def _products(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A LoRA's `lora_up` @ `lora_down` pairs as one tensor each (the factors of an SVD are defined up
    to sign and rotation, their product is not); other tensors as they are."""
    out = {}
    for k, v in sd.items():
        if k.endswith(".lora_up.weight"):
            base = k[: -len(".lora_up.weight")]
            out[base + ".lora"] = v.flatten(1) @ sd[base + ".lora_down.weight"].flatten(1)
        elif not k.endswith(".lora_down.weight"):
            out[k] = v
    return out


def rel_err(ref, out) -> float:
    """Relative L2 error of a latent, a float, or a file's tensors (over all of them, LoRA factors
    multiplied out; a key missing on one side or a shape that differs counts as an error of 1)."""
    if isinstance(ref, dict):
        ref, out = _products(ref), _products(out)
        if set(ref) != set(out) or any(ref[k].shape != out[k].shape for k in ref):
            return 1.0
        num = sum(float((out[k] - ref[k]).square().sum()) for k in ref)
        den = sum(float(ref[k].square().sum()) for k in ref)
        return (num / max(den, 1e-24)) ** 0.5
    if isinstance(ref, float):
        return abs(out - ref) / max(abs(ref), 1e-12)
    if ref.shape != out.shape:
        return 1.0
    return float((out - ref).norm() / ref.norm().clamp_min(1e-12))


def finite(value) -> bool:
    if isinstance(value, dict):
        return all(bool(torch.isfinite(v).all()) for v in value.values())
    if isinstance(value, float):
        return value == value and abs(value) != float("inf")
    return bool(torch.isfinite(value).all())
