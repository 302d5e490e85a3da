"""The web extension in real Chromium against a real ComfyUI server (this pack loaded).

Debian's `chromium` driven headless by Playwright (`executable_path`, no browser download).
Checks: the live plan preview on the loader node (pick a model file, type patterns, a bad regex,
the "use defaults" button, the per-layer list), the load report after a real run of a tiny model,
and that every example workflow loads with no missing-node dialog and passes the server's
validation. Saves screenshots under test-artifacts/.

Frontend: the one ComfyUI serves (its pinned comfyui-frontend-package), or the one in
$ONLINEQUANT_FRONTEND_ROOT (passed as --front-end-root; e.g. a newer package's static/ folder).
"""

from __future__ import annotations

import json
import os
import shutil
import urllib.parse
from pathlib import Path

import pytest
from helpers_sparse import write_sparse_safetensors

from quant.models import reference_shapes

pytestmark = [pytest.mark.browser, pytest.mark.comfyui]

REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO / "test-artifacts"
WORKFLOWS = sorted((REPO / "example_workflows").glob("*.json"))
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
PREVIEW_MODEL = "oq_preview_zimage_bf16.safetensors"
TINY_MODEL = "oq_tiny_wan.safetensors"


def _skip_reason() -> str | None:
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "playwright is not installed (pip install -r requirements-test.txt)"
    if not os.path.exists(CHROMIUM):
        return "Debian chromium not found (apt-get install -y chromium)"
    return None


@pytest.fixture(scope="module")
def server(comfyui_path, tmp_path_factory):
    """The shared server, or a dedicated one on $ONLINEQUANT_FRONTEND_ROOT."""
    if reason := _skip_reason():
        pytest.skip(reason)
    from comfy_server import start_comfy_server

    root = os.environ.get("ONLINEQUANT_FRONTEND_ROOT")
    if not root:
        yield None  # use the session's comfy_server (see `app_page`)
        return
    srv = start_comfy_server(comfyui_path, tmp_path_factory.mktemp("comfy_fe"), front_end_root=Path(root))
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def srv(server, request):
    return server or request.getfixturevalue("comfy_server")


@pytest.fixture(scope="module")
def page(srv, comfyui_path, tmp_path_factory):
    from playwright.sync_api import sync_playwright

    # A returning user: no templates dialog on first start.
    settings = srv.base_dir / "user" / "default" / "comfy.settings.json"
    settings.parent.mkdir(parents=True, exist_ok=True)
    settings.write_text(json.dumps({"Comfy.TutorialCompleted": True}))
    write_sparse_safetensors(srv.models_dir / "diffusion_models" / PREVIEW_MODEL, reference_shapes("zimage"))
    # Placeholders with the workflows' official file names, there before the editor opens (as for a
    # user who has the files): the combos list them, nothing is loaded for real. The diffusion
    # models are real headers over sparse data, since the loader's queue-time validation reads them.
    for path in WORKFLOWS:
        for n in json.loads(path.read_text())["nodes"]:
            for m in n.get("properties", {}).get("models", []):
                f = srv.models_dir / m["directory"] / m["name"]
                if f.exists():
                    continue
                if m["directory"] == "diffusion_models":
                    model = (
                        "zimage"
                        if "z_image" in m["name"]
                        else "wan22_5b"
                        if "5B" in m["name"]
                        else "wan21_t2v_14b"
                    )
                    write_sparse_safetensors(f, reference_shapes(model))
                else:
                    f.write_bytes(b"")
    from helpers_models import save_model, wan_model

    save_model(wan_model(seed=0), srv.models_dir / "diffusion_models" / TINY_MODEL)
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as pw:
        ctx = pw.chromium.launch_persistent_context(
            str(tmp_path_factory.mktemp("chromium_profile")),
            executable_path=CHROMIUM,
            headless=True,
            args=FLAGS,
            viewport={"width": 1600, "height": 1000},
        )
        pg = ctx.new_page()
        pg.errors = []
        pg.on("pageerror", lambda e: pg.errors.append(str(e)))
        pg.goto(srv.base_url, wait_until="domcontentloaded")
        pg.wait_for_function(
            "window.app && window.app.graph && window.LiteGraph && window.app.canvas", timeout=90_000
        )
        pg.wait_for_timeout(1000)
        pg.keyboard.press("Escape")
        pg.frontend_version = pg.evaluate("window.__COMFYUI_FRONTEND_VERSION__ || 'unknown'")
        print(f"ComfyUI frontend {pg.frontend_version} at {srv.base_url}")
        yield pg
        ctx.close()


def plan(srv, ignore: str | None) -> dict:
    body = {"model": PREVIEW_MODEL, "format": "fp8_e4m3fn", "min_out": 256}
    if ignore is not None:
        body["ignore"] = ignore
    return srv.get_json("/api/onlinequant/plan?" + urllib.parse.urlencode(body))


def counts_text(data: dict) -> str:
    c = data["counts"]
    return f"{c['quantized']} of {c['layers']} Linear layers quantized, {c['kept']} kept"


def add_loader(page, model: str) -> int:
    """Clear the graph, add the loader node, pick `model` in its file combo (as a user pick does)."""
    return page.evaluate(
        """(model) => {
            app.graph.clear();
            // fresh node ids: the Vue nodes renderer keeps widget state by node id, and a cleared
            // graph would otherwise reuse id 1 from the graph a previous test loaded
            window.__oqNextId = (window.__oqNextId || 1000) + 10;
            app.graph.last_node_id = window.__oqNextId;
            const n = LiteGraph.createNode('OnlineQuantDiffusionLoader');
            n.pos = [80, 160];
            app.graph.add(n);
            const w = n.widgets.find(w => w.name === 'unet_name');
            w.value = model;
            w.callback?.(w.value);
            app.canvas.ds.offset = [0, 0]; app.canvas.ds.scale = 1; app.graph.setDirtyCanvas(true, true);
            return n.id;
        }""",
        model,
    )


def panel_text(page) -> str:
    return page.locator("[data-testid=onlinequant-panel]").inner_text()


def wait_counts(page, text: str) -> None:
    page.locator("[data-testid=oq-counts]").filter(has_text=text).wait_for(timeout=15_000)


def test_live_plan_preview(page, srv):
    add_loader(page, PREVIEW_MODEL)
    # the node's default ignore text is '# auto' = the family defaults
    defaults = plan(srv, None)
    wait_counts(page, counts_text(defaults))
    assert "zimage" in panel_text(page)
    kept_default = defaults["counts"]["kept_by_source"]["default"]
    assert f"{kept_default} kept by the model's defaults" in panel_text(page)

    textarea = page.locator("textarea.comfy-multiline-input").first
    typed = "layers.1\nno_such_layer"
    textarea.fill(typed)
    expected = plan(srv, typed)
    wait_counts(page, counts_text(expected))
    text = panel_text(page)
    assert f"{expected['counts']['kept_by_source']['pattern']} ignored by pattern" in text
    assert "no_such_layer" in text  # the pattern that matched nothing is a warning

    textarea.fill("re:(unclosed")
    err = page.locator("[data-testid=oq-error]")
    err.wait_for(timeout=15_000)
    assert "(unclosed" in err.inner_text()

    page.locator("[data-testid=oq-defaults]").click()
    wait_counts(page, counts_text(plan(srv, defaults["default_ignore"])))
    assert "x_embedder" in textarea.input_value()

    page.locator("[data-testid=onlinequant-panel] summary").click()
    rows = page.locator("[data-testid=onlinequant-panel] .oq-row")
    rows.first.wait_for(timeout=5_000)
    assert rows.count() == defaults["counts"]["layers"]
    page.wait_for_timeout(300)
    box = page.locator("[data-testid=onlinequant-panel]").bounding_box()
    page.screenshot(
        path=str(ARTIFACTS / f"loader_preview_fe{page.frontend_version}.png"),
        clip={
            "x": 60,
            "y": max(0, box["y"] - 420),
            "width": max(560, box["width"] + 60),
            "height": min(1000, box["height"] + 440),
        },
    )
    page.screenshot(path=str(ARTIFACTS / "editor.png"))
    # the panel is not part of the saved workflow nor of the prompt sent to the server
    saved = page.evaluate(
        """async () => {
            const n = app.graph._nodes.find(n => n.comfyClass === 'OnlineQuantDiffusionLoader');
            const p = await app.graphToPrompt();
            return {values: n.serialize().widgets_values, inputs: Object.keys(p.output[String(n.id)].inputs)};
        }"""
    )
    assert len(saved["values"]) == 6 and "x_embedder" in saved["values"][2]
    assert sorted(saved["inputs"]) == sorted(
        ["unet_name", "quantization", "ignored_layers", "min_out_features", "compute_dtype", "keep_sensitive"]
    )
    assert not page.errors, page.errors


def test_listeners_go_with_the_node(page, srv):
    add_loader(page, PREVIEW_MODEL)
    page.locator("[data-testid=oq-counts]").wait_for(timeout=15_000)
    requests = []
    page.on("request", lambda r: requests.append(r.url) if "onlinequant/plan" in r.url else None)
    # an edit schedules a (debounced) preview; removing the node right away must cancel it
    page.evaluate(
        """() => {
            const n = app.graph._nodes.find(n => n.comfyClass === 'OnlineQuantDiffusionLoader');
            const w = n.widgets.find(w => w.name === 'min_out_features');
            w.value = 512; w.callback?.(w.value);
            app.graph.remove(n);
        }"""
    )
    page.wait_for_timeout(1000)
    assert requests == []
    assert page.locator("[data-testid=onlinequant-panel]").count() == 0
    assert not page.errors, page.errors


def test_load_report_after_a_real_run(page, srv):
    name = TINY_MODEL  # a real (tiny) Wan, saved before the editor opened
    add_loader(page, name)
    page.evaluate(
        """() => {
            const loader = app.graph._nodes.find(n => n.comfyClass === 'OnlineQuantDiffusionLoader');
            const show = LiteGraph.createNode('PreviewAny');
            show.pos = [600, 160];
            app.graph.add(show);
            loader.connect(1, show, 0);
            loader.widgets.find(w => w.name === 'ignored_layers').value = '';
        }"""
    )
    page.locator("[data-testid=oq-counts]").wait_for(timeout=15_000)  # the preview is there first
    page.evaluate("app.queuePrompt(0, 1)")
    report = page.locator("[data-testid=oq-report]")
    report.wait_for(timeout=120_000)
    text = report.inner_text()
    assert name in text and "fp8_e4m3fn" in text
    assert page.locator("[data-testid=oq-counts]").count() == 1  # the preview stays above the report
    page.screenshot(path=str(ARTIFACTS / f"loader_report_fe{page.frontend_version}.png"))


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_example_workflow_loads_and_validates(page, srv, path):
    wf = json.loads(path.read_text())
    for _ in range(2):  # close what an earlier test left open (e.g. an execution-error dialog)
        page.keyboard.press("Escape")
    page.wait_for_timeout(300)
    result = page.evaluate(
        """async (wf) => {
            await app.loadGraphData(wf);
            await new Promise(r => setTimeout(r, 800));
            const dialogs = [...document.querySelectorAll('.p-dialog')]
                .filter(d => d.offsetParent !== null).map(d => d.innerText.slice(0, 300));
            const missing = app.graph._nodes.filter(n => n.has_errors).map(n => n.type);
            const p = await app.graphToPrompt();
            const types = Object.values(p.output).map(n => n.class_type);
            const res = await fetch('/api/prompt', {method: 'POST',
                headers: {'Content-Type': 'application/json'},
                body: JSON.stringify({prompt: p.output, client_id: 'onlinequant-test'})});
            return {dialogs, types, missing, status: res.status, body: await res.json()};
        }""",
        wf,
    )
    assert result["dialogs"] == [], result["dialogs"]
    assert result["missing"] == []
    expected_types = {n["type"] for n in wf["nodes"] if n["type"] not in ("Note", "MarkdownNote")}
    assert set(result["types"]) == expected_types
    # accepted by the server's validation (it then fails fast on the empty placeholder files)
    assert result["status"] == 200 and result["body"].get("node_errors") == {}, result["body"]
    page.screenshot(path=str(ARTIFACTS / f"workflow_{path.stem}.png"))
    srv.post_json("/api/queue", {"clear": True})
    srv.post_json("/api/interrupt", {})


def test_preview_in_vue_nodes_mode(page, srv):
    """The frontend's Vue-rendered nodes ('Nodes 2.0') show the same panel."""
    known = page.evaluate(
        """async () => {
            const s = app.extensionManager?.setting;
            if (!s || s.get('Comfy.VueNodes.Enabled') === undefined) return false;
            await s.set('Comfy.VueNodes.Enabled', true);
            return true;
        }"""
    )
    if not known:
        pytest.skip(f"frontend {page.frontend_version} has no Vue nodes mode")
    try:
        page.wait_for_timeout(500)
        add_loader(page, PREVIEW_MODEL)
        try:
            wait_counts(page, counts_text(plan(srv, None)))
        finally:
            page.screenshot(path=str(ARTIFACTS / f"loader_preview_vue_nodes_fe{page.frontend_version}.png"))
    finally:
        page.evaluate("app.extensionManager.setting.set('Comfy.VueNodes.Enabled', false)")
    assert not page.errors, page.errors
