"""Prompts that run every core ComfyUI node with a MODEL input on one model family (the
conformance table of docs/model_nodes.md; tests/e2e/test_model_nodes.py drives them).

The node list comes from a running server's /object_info: every node not from custom_nodes with
a MODEL input. Each node becomes one *case*: a small subgraph built from its declared inputs
(widgets at their defaults, a few overrides below; every other input from a shared provider node)
and followed by what makes the model run and leaves a result on disk or in the history:

- a node that returns a MODEL: KSampler (2 steps, CFG 2 so CFG patches act) -> SaveLatent;
- LATENT (samplers): SaveLatent; GUIDER: SamplerCustomAdvanced; SIGMAS or SAMPLER: SamplerCustom
  with them; FLOAT: PreviewAny (the value is read from the history);
- no output (ModelSave, CheckpointSave, LoraSave): the file it writes.

One prompt per family and variant holds every case (plus a plain loader -> KSampler baseline):
`REFERENCE` loads the files with stock ComfyUI's UNETLoader, the quantized variants with the
pack's loader. A node that cannot be built here (an input no node can make without files that
do not exist for these families) is not run and is reported with the reason.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from model_nodes_settings import (
    EXTRA_CASES,
    FAMILY_MERGES,
    NO_FILES,
    OVERRIDES,
    SAME_AS_PLAIN,
    UNAVAILABLE,
)

REFERENCE = "unquantized"  # the bf16 files as stock UNETLoader loads them (weight_dtype default)
FORMATS = ("fp8_e4m3fn", "mxfp4")
VARIANTS = (REFERENCE, *FORMATS)
WIDGETS = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
# Two steps: with one, a sampling node that only moves the schedule (a shift) changes nothing, as
# the single step always goes from sigma 1 to 0.
SAMPLER_STEPS = 2
OUT_DIR = "conformance"  # under the server's output/


@dataclass(frozen=True)
class Family:
    key: str
    title: str
    files: tuple[str, str]  # model1, model2 (merges take both)
    lora: str
    latent: dict  # the empty-latent node
    cond_width: int  # text width of the test conditioning
    ignored_layers: str  # the loader's ignored_layers text


class NotApplicable(Exception):
    """A case that cannot be built here; the message says why."""


@dataclass
class Case:
    """One node's subgraph in a prompt. kind: "latent" (a SaveLatent under `out`), "float" (the
    PreviewAny node `out`'s text) or "file" (a .safetensors file under `out`)."""

    node: str
    ids: set[str] = field(default_factory=set)
    kind: str = "latent"
    out: str = ""


def all_inputs(spec: dict) -> dict[str, tuple[list, bool]]:
    """name -> (spec, required), required first, in declared order."""
    out = {n: (s, True) for n, s in spec["input"].get("required", {}).items()}
    out.update({n: (s, False) for n, s in spec["input"].get("optional", {}).items()})
    return out


def input_type(s: list) -> str:
    return "COMBO" if isinstance(s[0], list) else s[0]


def core_model_nodes(info: dict) -> dict[str, dict]:
    """Every node of ComfyUI itself (not custom_nodes) with a MODEL input, by category then name."""
    found = {
        name: spec
        for name, spec in info.items()
        if not spec.get("python_module", "").startswith("custom_nodes")
        and any(input_type(s) == "MODEL" for s, _ in all_inputs(spec).values())
    }
    return dict(sorted(found.items(), key=lambda kv: (kv[1]["category"], kv[0])))


def model_node_cases(info: dict) -> dict[str, tuple[str, dict]]:
    """label -> (class_type, spec): each core node with a MODEL input, then EXTRA_CASES."""
    cases = {name: (name, spec) for name, spec in core_model_nodes(info).items()}
    cases.update({label: (c, info[c]) for label, (c, _) in EXTRA_CASES.items() if c in cases})
    return cases


def make_node(info: dict, class_type: str, **given) -> dict:
    """A prompt node: `given` inputs, every other required widget at its default."""
    inputs = {}
    for name, (s, required) in all_inputs(info[class_type]).items():
        opts = s[1] if len(s) > 1 and isinstance(s[1], dict) else {}
        if name not in given and required and input_type(s) in WIDGETS and "default" in opts:
            inputs[name] = opts["default"]
    return {"class_type": class_type, "inputs": {**inputs, **given}}


def _loader(fam: Family, variant: str, file: str) -> dict:
    if variant == REFERENCE:
        return {"class_type": "UNETLoader", "inputs": {"unet_name": file, "weight_dtype": "default"}}
    inputs = {
        "unet_name": file,
        "quantization": variant,
        "ignored_layers": fam.ignored_layers,
        "min_out_features": 256,
        "compute_dtype": "auto",
        "keep_sensitive": "none",
    }
    return {"class_type": "OnlineQuantDiffusionLoader", "inputs": inputs}


def _cond(fam: Family, seed: int) -> dict:
    return {
        "class_type": "OQTestConditioning",
        "inputs": {"tokens": 8, "seed": seed, "width": fam.cond_width},
    }


def shared_nodes(info: dict, fam: Family, variant: str) -> dict:
    """The nodes every case links to (ComfyUI runs only those an output needs)."""
    return {
        "m1": _loader(fam, variant, fam.files[0]),
        "m2": _loader(fam, variant, fam.files[1]),
        "pos": _cond(fam, 1),
        "neg": _cond(fam, 2),
        "empty": _cond(fam, 3),
        "lat": fam.latent,
        "noise": {"class_type": "RandomNoise", "inputs": {"noise_seed": 3}},
        "smp": {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}},
        "sig": {
            "class_type": "BasicScheduler",
            "inputs": {"model": ["m1", 0], "scheduler": "simple", "steps": SAMPLER_STEPS, "denoise": 1.0},
        },
        "img": {
            "class_type": "EmptyImage",
            "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": 0},
        },
        "mask": {"class_type": "SolidMask", "inputs": {"value": 1.0, "width": 64, "height": 64}},
        "vae": {"class_type": "VAELoader", "inputs": {"vae_name": "oq_tiny_taesd.safetensors"}},
        "clip": {"class_type": "OQTestCLIP", "inputs": {}},
        "lop": make_node(info, "LatentOperationTonemapReinhard"),
    }


def _provider(info: dict, kind: str, name: str, model: list, prefix: str, prompt: dict) -> list | None:
    """A link for a non-widget input of type `kind` (None: nothing here can make one)."""
    if kind == "CONDITIONING":
        return [{"negative": "neg", "empty_conditioning": "empty"}.get(name, "pos"), 0]
    if kind == "LORA_MODEL":  # only TrainLoraNode makes one: train one step on the same model
        given = {"model": model, "latents": ["lat", 0], "positive": ["pos", 0]}
        prompt[f"{prefix}.lora"] = make_node(info, "TrainLoraNode", **given, **OVERRIDES["TrainLoraNode"])
        return [f"{prefix}.lora", 1]
    shared = {
        "LATENT": "lat",
        "NOISE": "noise",
        "SAMPLER": "smp",
        "SIGMAS": "sig",
        "IMAGE": "img",
        "MASK": "mask",
        "VAE": "vae",
        "CLIP": "clip",
        "LATENT_OPERATION": "lop",
    }.get(kind)
    return None if shared is None else [shared, 0]


def _file_name(fam: Family, node: str) -> str:
    return f"{fam.key}_{re.sub(r'[^A-Za-z0-9_]+', '_', node).strip('_')}"


def _widget(name: str, s: list, fam: Family, node: str, variant: str):
    """The value of a widget input (NotApplicable when none can be given)."""
    opts = s[1] if len(s) > 1 and isinstance(s[1], dict) else {}
    over = {**OVERRIDES.get(node, {}), **EXTRA_CASES.get(node, ("", {}))[1]}
    if name in over:
        return over[name]
    if name == "lora_name":
        return fam.lora
    if name == "filename_prefix":
        return f"{OUT_DIR}/{variant}/{_file_name(fam, node)}"
    if name == "steps" and input_type(s) == "INT":
        return SAMPLER_STEPS
    if node.startswith("ModelMerge") and input_type(s) == "FLOAT" and name != "multiplier":
        return 0.5  # block ratios default to 1.0: all of model1, nothing merged
    if input_type(s) == "COMBO":
        options = s[0] if isinstance(s[0], list) else opts.get("options", [])
        if not options:
            raise NotApplicable(NO_FILES.get(name, f"needs a file for {name!r} (none exists here)"))
        return opts.get("default", options[0])
    if "default" not in opts:
        if input_type(s) == "BOOLEAN":  # a toggle without a default shows as off
            return False
        raise NotApplicable(f"widget {name!r} has no default")
    return opts["default"]


def _case_latent(prompt: dict, prefix: str, fam: Family, node: str) -> list:
    """The latent a case samples: the shared one, or one its OVERRIDES ask for."""
    over = OVERRIDES.get(node, {})
    if "latent_length" in over and "length" in fam.latent["inputs"]:
        latent = {**fam.latent, "inputs": {**fam.latent["inputs"], "length": over["latent_length"]}}
        prompt[f"{prefix}.lat"] = latent
        return [f"{prefix}.lat", 0]
    if "noise_mask" in over:
        prompt[f"{prefix}.mask"] = {
            "class_type": "SolidMask",
            "inputs": {"value": over["noise_mask"], "width": 64, "height": 64},
        }
        prompt[f"{prefix}.lat"] = {
            "class_type": "SetLatentNoiseMask",
            "inputs": {"samples": ["lat", 0], "mask": [f"{prefix}.mask", 0]},
        }
        return [f"{prefix}.lat", 0]
    return ["lat", 0]


def _sampler(model: list, latent: list, node: str) -> dict:
    steps = OVERRIDES.get(node, {}).get("sampler_steps", SAMPLER_STEPS)
    inputs = {
        "model": model,
        "seed": 3,
        "steps": steps,
        "cfg": 2.0,
        "sampler_name": "euler",
        "scheduler": "simple",
        "positive": ["pos", 0],
        "negative": ["neg", 0],
        "latent_image": latent,
        "denoise": 1.0,
    }
    return {"class_type": "KSampler", "inputs": inputs}


def _custom(sampler: list, sigmas: list) -> dict:
    inputs = {
        "model": ["m1", 0],
        "add_noise": True,
        "noise_seed": 3,
        "cfg": 2.0,
        "positive": ["pos", 0],
        "negative": ["neg", 0],
        "sampler": sampler,
        "sigmas": sigmas,
        "latent_image": ["lat", 0],
    }
    return {"class_type": "SamplerCustom", "inputs": inputs}


def add_case(
    info: dict, prompt: dict, node: str, class_type: str, fam: Family, variant: str, idx: int
) -> Case:
    """Add the subgraph of case `node` (a label: the class_type or a key of EXTRA_CASES) to `prompt`.
    Raises NotApplicable (prompt possibly half-changed) when it cannot be run here."""
    p = f"c{idx}"
    spec = info[class_type]
    if spec["category"].endswith("model_specific") and FAMILY_MERGES.get(class_type) != fam.key:
        raise NotApplicable(
            f"merges by the block names of {node.removeprefix('ModelMerge')} models: for those only"
        )
    inputs: dict = {}
    second = ["m2", 0]
    if OVERRIDES.get(node, {}).get("model2_diff"):
        prompt[f"{p}.diff"] = {
            "class_type": "ModelMergeSubtract",
            "inputs": {"model1": ["m2", 0], "model2": ["m1", 0], "multiplier": 1.0},
        }
        second = [f"{p}.diff", 0]
    models = iter((["m1", 0], second))
    for name, (s, required) in all_inputs(spec).items():
        kind = input_type(s)
        if kind == "MODEL":
            inputs[name] = next(models)
        elif not required:
            continue
        elif kind in WIDGETS:
            inputs[name] = _widget(name, s, fam, node, variant)
        else:
            link = _provider(info, kind, name, ["m1", 0], p, prompt)
            if link is None:
                raise NotApplicable(
                    UNAVAILABLE.get(kind, f"needs a {kind} input, which no node here can make")
                )
            inputs[name] = link
    case = Case(node)
    prompt[f"{p}.n"] = {"class_type": class_type, "inputs": inputs}
    outputs = spec["output"]
    save = f"{OUT_DIR}/{variant}/{_file_name(fam, node)}"
    first = lambda t: [f"{p}.n", outputs.index(t)]  # noqa: E731
    if "MODEL" in outputs:
        prompt[f"{p}.k"] = _sampler(first("MODEL"), _case_latent(prompt, p, fam, node), node)
        result = [f"{p}.k", 0]
    elif "LATENT" in outputs:
        result = first("LATENT")
    elif "GUIDER" in outputs:
        prompt[f"{p}.k"] = {
            "class_type": "SamplerCustomAdvanced",
            "inputs": {
                "noise": ["noise", 0],
                "guider": first("GUIDER"),
                "sampler": ["smp", 0],
                "sigmas": ["sig", 0],
                "latent_image": ["lat", 0],
            },
        }
        result = [f"{p}.k", 0]
    elif "SIGMAS" in outputs or "SAMPLER" in outputs:
        sampler = first("SAMPLER") if "SAMPLER" in outputs else ["smp", 0]
        sigmas = first("SIGMAS") if "SIGMAS" in outputs else ["sig", 0]
        prompt[f"{p}.k"] = _custom(sampler, sigmas)
        result = [f"{p}.k", 0]
    elif "FLOAT" in outputs:
        prompt[f"{p}.s"] = {"class_type": "PreviewAny", "inputs": {"source": first("FLOAT")}}
        case.kind, case.out = "float", f"{p}.s"
    elif not outputs and spec.get("output_node"):
        case.kind, case.out = "file", save
    else:
        raise NotApplicable(
            f"returns {', '.join(outputs)}, which only nodes needing files that do not exist here take"
        )
    if case.kind == "latent":
        prompt[f"{p}.s"] = {
            "class_type": "SaveLatent",
            "inputs": {"samples": result, "filename_prefix": save},
        }
        case.out = save
    case.ids = {k for k in prompt if k.startswith(p + ".")}
    return case


PLAIN = "(plain)"  # the baseline case: loader -> KSampler, no node between


def build_prompt(info: dict, fam: Family, variant: str) -> tuple[dict, dict[str, Case], dict[str, str]]:
    """(prompt, cases by node, reasons by node for the nodes that cannot be run here)."""
    prompt = shared_nodes(info, fam, variant)
    prompt["plain.k"] = _sampler(["m1", 0], ["lat", 0], PLAIN)
    save = f"{OUT_DIR}/{variant}/{_file_name(fam, 'plain')}"
    prompt["plain.s"] = {
        "class_type": "SaveLatent",
        "inputs": {"samples": ["plain.k", 0], "filename_prefix": save},
    }
    cases = {PLAIN: Case(PLAIN, {"plain.k", "plain.s"}, "latent", save)}
    skipped: dict[str, str] = {}
    for idx, (node, (class_type, _)) in enumerate(model_node_cases(info).items()):
        if variant == REFERENCE and node in SAME_AS_PLAIN:
            continue
        before = dict(prompt)
        try:
            cases[node] = add_case(info, prompt, node, class_type, fam, variant, idx)
        except NotApplicable as e:
            prompt.clear()
            prompt.update(before)
            skipped[node] = str(e)
    return prompt, cases, skipped
