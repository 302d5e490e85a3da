"""example_workflows/*.json against a real ComfyUI's /object_info (this pack loaded).

Every node type exists (or is one of the frontend's own note nodes), every widget value is valid
for its input (numbers in range, exact combo membership; for model-file combos, that the input
really is a file list and the value a plain file name), every link type-checks at both ends, and
ComfyUI serves the workflows at /workflow_templates.
"""

from __future__ import annotations

import json
import urllib.parse
from pathlib import Path

import pytest

pytestmark = pytest.mark.comfyui

WORKFLOW_DIR = Path(__file__).resolve().parents[2] / "example_workflows"
WORKFLOWS = sorted(WORKFLOW_DIR.glob("*.json"))
FRONTEND_ONLY = {"Note", "MarkdownNote"}  # registered by the frontend, not the server
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
CONTROL_VALUES = {"fixed", "increment", "decrement", "randomize"}
PROBE = "oq_probe_file.safetensors"
FILE_FOLDERS = ("diffusion_models", "text_encoders", "vae", "loras", "checkpoints")
EXPECTED = {
    "Z-Image Turbo FP8 text to image": ("fp8_e4m3fn", 1),
    "Z-Image Turbo MXFP4 text to image": ("mxfp4", 1),
    "Wan 2.2 5B FP8 text to video": ("fp8_e4m3fn", 1),
    "Wan 2.2 A14B MXFP4 text to video": ("mxfp4", 2),
}


@pytest.fixture(scope="module")
def object_info(comfy_server):
    """/object_info with a probe file in each model folder, so file-list combos can be told apart."""
    probes = [comfy_server.models_dir / f / PROBE for f in FILE_FOLDERS]
    for p in probes:
        p.write_bytes(b"")
    try:
        info = comfy_server.get_json("/object_info")
    finally:
        for p in probes:
            p.unlink()
    return info


def _inputs(spec: dict) -> list[tuple[str, list, bool]]:
    """(name, spec, required) in the node's declared order."""
    out = []
    order = spec.get("input_order") or {k: list(v) for k, v in spec["input"].items()}
    for section in ("required", "optional"):
        for name in order.get(section, []):
            out.append((name, spec["input"][section][name], section == "required"))
    return out


def _type(s: list) -> str:
    return "COMBO" if isinstance(s[0], list) else s[0]


def _options(s: list) -> list:
    return s[0] if isinstance(s[0], list) else s[1].get("options", [])


def check_widget(node_type: str, name: str, s: list, value, errors: list[str]) -> None:
    t, opts = _type(s), (s[1] if len(s) > 1 else {})
    where = f"{node_type}.{name}={value!r}"
    if t == "INT":
        if not isinstance(value, int) or isinstance(value, bool):
            errors.append(f"{where}: not an int")
        elif not opts.get("min", -(2**63)) <= value <= opts.get("max", 2**64):
            errors.append(f"{where}: outside [{opts.get('min')}, {opts.get('max')}]")
    elif t == "FLOAT":
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            errors.append(f"{where}: not a number")
        elif not opts.get("min", float("-inf")) <= value <= opts.get("max", float("inf")):
            errors.append(f"{where}: outside [{opts.get('min')}, {opts.get('max')}]")
    elif t == "STRING":
        if not isinstance(value, str):
            errors.append(f"{where}: not a string")
    elif t == "BOOLEAN":
        if not isinstance(value, bool):
            errors.append(f"{where}: not a bool")
    elif t == "COMBO":
        options = _options(s)
        if PROBE in options:  # a model-file list: the user supplies the file
            if not (
                isinstance(value, str)
                and value.endswith(".safetensors")
                and "/" not in value
                and ".." not in value
            ):
                errors.append(f"{where}: not a plain .safetensors file name")
        elif value not in options:
            errors.append(f"{where}: not one of {options[:8]}")


def check_workflow(wf: dict, info: dict) -> list[str]:
    errors: list[str] = []
    nodes = {n["id"]: n for n in wf["nodes"]}
    if len(nodes) != len(wf["nodes"]):
        errors.append("duplicate node ids")
    links = {lk[0]: lk for lk in wf["links"]}
    for n in wf["nodes"]:
        t = n["type"]
        if t in FRONTEND_ONLY:
            if not (isinstance(n.get("widgets_values"), list) and isinstance(n["widgets_values"][0], str)):
                errors.append(f"{t} {n['id']}: a note needs its text")
            continue
        if t not in info:
            errors.append(f"node type {t!r} does not exist in this ComfyUI")
            continue
        spec = info[t]
        declared = {name: (s, req) for name, s, req in _inputs(spec)}
        linked = {i["name"] for i in n.get("inputs", []) if i.get("link") is not None}
        for i in n.get("inputs", []):
            if i["name"] not in declared:
                errors.append(f"{t}: input {i['name']!r} is not declared")
        # widget values, in declared order, with the seed's control value after it
        values = list(n.get("widgets_values", []))
        k = 0
        for name, s, required in _inputs(spec):
            if _type(s) not in WIDGET_TYPES:
                if required and name not in linked:
                    errors.append(f"{t} {n['id']}: required input {name!r} is not connected")
                continue
            if k >= len(values):
                errors.append(f"{t} {n['id']}: no widget value for {name!r}")
                break
            check_widget(t, name, s, values[k], errors)
            k += 1
            if len(s) > 1 and s[1].get("control_after_generate"):
                if k >= len(values) or values[k] not in CONTROL_VALUES:
                    errors.append(f"{t}.{name}: control_after_generate value missing")
                k += 1
        if k != len(values):
            errors.append(f"{t} {n['id']}: {len(values)} widget values for {k} widgets")
    for lid, origin, oslot, target, tslot, typ in wf["links"]:
        src, dst = nodes.get(origin), nodes.get(target)
        if src is None or dst is None:
            errors.append(f"link {lid}: missing node")
            continue
        out = src["outputs"][oslot]
        inp = dst["inputs"][tslot]
        if lid not in (out.get("links") or []) or inp.get("link") != lid:
            errors.append(f"link {lid}: not recorded on both ends")
        if src["type"] in info and info[src["type"]]["output"][oslot] != typ:
            errors.append(
                f"link {lid}: {src['type']} output {oslot} is {info[src['type']]['output'][oslot]}, not {typ}"
            )
        if dst["type"] in info:
            s = dict((nm, sp) for nm, sp, _ in _inputs(info[dst["type"]])).get(inp["name"])
            if s is None or _type(s) not in (typ, "*"):
                errors.append(f"link {lid}: {dst['type']}.{inp['name']} does not take {typ}")
    for n in wf["nodes"]:
        for i in n.get("inputs", []):
            if i.get("link") is not None and i["link"] not in links:
                errors.append(f"{n['type']}.{i['name']}: dangling link {i['link']}")
    if not any(info.get(n["type"], {}).get("output_node") for n in wf["nodes"]):
        errors.append("no output node")
    return errors


def test_the_four_workflows_exist():
    assert {p.stem for p in WORKFLOWS} == set(EXPECTED)


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_workflow_is_valid_for_this_comfyui(path, object_info):
    wf = json.loads(path.read_text())
    assert wf.get("version") == 0.4 and wf["last_node_id"] >= max(n["id"] for n in wf["nodes"])
    assert check_workflow(wf, object_info) == []
    fmt, n_loaders = EXPECTED[path.stem]
    loaders = [n for n in wf["nodes"] if n["type"] == "OnlineQuantDiffusionLoader"]
    assert len(loaders) == n_loaders and all(n["widgets_values"][1] == fmt for n in loaders)
    # the loaders start from the node's own default text (the builder keeps a copy of it)
    required = object_info["OnlineQuantDiffusionLoader"]["input"]["required"]
    assert all(n["widgets_values"][2] == required["ignored_layers"][1]["default"] for n in loaders)
    if "attention" in path.stem:
        assert sum(n["type"] == "OnlineQuantAttention" for n in wf["nodes"]) == n_loaders
    notes = [n for n in wf["nodes"] if n["type"] in FRONTEND_ONLY]
    # the note names every model file the workflow uses, with its folder
    files = [
        v
        for n in wf["nodes"]
        if n["type"] not in FRONTEND_ONLY
        for v in n["widgets_values"]
        if isinstance(v, str) and v.endswith(".safetensors")
    ]
    assert files and notes
    for f in files:
        assert any(f in n["widgets_values"][0] for n in notes), f


def test_checker_catches_broken_workflows(object_info):
    """The checker above must fail on the mistakes it claims to catch."""
    wf = json.loads((WORKFLOW_DIR / "Z-Image Turbo FP8 text to image.json").read_text())
    by_type = {n["type"]: n for n in wf["nodes"]}
    by_type["KSampler"]["widgets_values"][4] = "no_such_sampler"
    by_type["EmptySD3LatentImage"]["widgets_values"][0] = 8  # below min 16
    by_type["OnlineQuantDiffusionLoader"]["widgets_values"][0] = "../evil.safetensors"
    wf["links"][0][5] = "CLIP"  # wrong type on a MODEL link
    wf["nodes"].append({"id": 99, "type": "NoSuchNode", "inputs": [], "outputs": [], "widgets_values": []})
    errors = "\n".join(check_workflow(wf, object_info))
    for expected in ("no_such_sampler", "outside", "../evil", "does not take CLIP", "NoSuchNode"):
        assert expected in errors


def test_comfyui_lists_and_serves_the_workflows(comfy_server):
    listed = comfy_server.get_json("/workflow_templates")
    assert sorted(listed.get("ComfyUI-OnlineQuant", [])) == sorted(EXPECTED)
    for name in EXPECTED:
        # the file names are the template browser's titles (spaces included): quoted as the
        # browser's fetch sends them
        url = "/api/workflow_templates/ComfyUI-OnlineQuant/" + urllib.parse.quote(name)
        served = comfy_server.get_json(url + ".json")
        assert served == json.loads((WORKFLOW_DIR / f"{name}.json").read_text())
        # the thumbnail the browser asks for: <name>.jpg next to the JSON, a small JPEG
        status, body = comfy_server.request(url + ".jpg")
        assert status == 200 and body[:3] == b"\xff\xd8\xff", (name, status)
        assert body == (WORKFLOW_DIR / f"{name}.jpg").read_bytes() and len(body) < 100_000


def test_pack_loads_without_errors_in_the_log(comfy_server, object_info):
    """Installed as ComfyUI Manager does (a folder in custom_nodes/), on a CPU-only ComfyUI."""
    log = comfy_server.log_text()
    import_lines = [
        ln for ln in log.splitlines() if "custom_nodes/ComfyUI-OnlineQuant" in ln and "seconds" in ln
    ]
    assert import_lines and not any("IMPORT FAILED" in ln for ln in import_lines), import_lines
    lines = log.splitlines()
    for bad in ("Error while calling comfy_entrypoint", "Cannot import"):
        assert not any(bad in ln and "OnlineQuant" in ln for ln in lines), bad
    for i, ln in enumerate(lines):  # no traceback that runs through this pack's files
        if ln.startswith("Traceback"):
            assert not any("ComfyUI-OnlineQuant/" in x for x in lines[i : i + 40]), "\n".join(
                lines[i : i + 40]
            )
    assert {"OnlineQuantDiffusionLoader", "OnlineQuantAttention"} <= set(object_info)
    # the web extension's files are served where the frontend imports them from
    for js in ("plan_preview.js", "load_report.js", "oq_panel.js"):
        status, body = comfy_server.request(f"/extensions/ComfyUI-OnlineQuant/{js}")
        assert status == 200, js
        assert (b"app.registerExtension" in body) == (js != "oq_panel.js"), js
    listed = comfy_server.get_json("/extensions")
    assert "/extensions/ComfyUI-OnlineQuant/plan_preview.js" in listed
