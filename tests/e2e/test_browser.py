"""The web extension in real Chromium against a real ComfyUI server (this pack loaded).

Debian's `chromium` driven headless by Playwright (`executable_path`, no browser download).
Checks: the live plan preview on the loader node (pick a model file, type patterns, a bad regex,
the "use defaults" button, the per-layer list), the load report after a real run of a tiny model
(collapsed to one line until opened), that every example workflow loads with no missing-node
dialog and passes the server's validation, that no two nodes of an example workflow overlap with
the loader panels opened all the way, node search by format and model names, and the template
browser's titles and thumbnails. Saves screenshots under test-artifacts/.

The example workflows' thumbnails are rendered here from the workflows themselves (into
test-artifacts/thumbnails/); ONLINEQUANT_UPDATE_THUMBNAILS=1 also writes them next to the JSON
files, where ComfyUI serves them to the template browser.

Frontend: the one ComfyUI serves (its pinned comfyui-frontend-package), or the one in
$ONLINEQUANT_FRONTEND_ROOT (passed as --front-end-root; e.g. a newer package's static/ folder).
"""

from __future__ import annotations

import json
import os
import re
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
LOADER_NAME = "Load Diffusion Model FP8/MXFP4 (Online Quant)"
PACK_DIR = "ComfyUI-OnlineQuant"  # the folder name the server lists the templates under
THUMB_SIZE = (400, 300)  # 4:3, the template cards' shape
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
    assert len(saved["values"]) == 7 and "x_embedder" in saved["values"][2] and saved["values"][6] is False
    assert sorted(saved["inputs"]) == sorted(
        [
            "unet_name",
            "quantization",
            "ignored_layers",
            "min_out_features",
            "compute_dtype",
            "keep_sensitive",
            "quantized_cache",
        ]
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
    summary = page.locator("[data-testid=oq-report-summary]")
    summary.wait_for(timeout=120_000)
    # collapsed by default: one line, the counts; the full report is not shown until opened
    assert re.search(r"Load report: \d+ quantized, \d+ kept, .+ -> ", summary.inner_text())
    report = page.locator("[data-testid=oq-report]")
    assert not report.is_visible()
    page.wait_for_timeout(300)  # the node resizes on the next animation frame
    collapsed_h = page.evaluate(
        "app.graph._nodes.find(n => n.comfyClass === 'OnlineQuantDiffusionLoader').size[1]"
    )
    summary.click()
    report.wait_for(timeout=5_000)
    text = report.inner_text()
    assert name in text and "fp8_e4m3fn" in text
    assert page.locator("[data-testid=oq-counts]").count() == 1  # the preview stays above the report
    page.wait_for_timeout(300)
    page.screenshot(path=str(ARTIFACTS / f"loader_report_fe{page.frontend_version}.png"))
    # closed again, the node gives back the room the open report took
    summary.click()
    page.wait_for_timeout(300)
    assert page.evaluate(
        "app.graph._nodes.find(n => n.comfyClass === 'OnlineQuantDiffusionLoader').size[1]"
    ) == pytest.approx(collapsed_h, abs=2)


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
    page.screenshot(path=str(ARTIFACTS / f"workflow_{path.stem}_fe{page.frontend_version}.png"))
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


# A load report as long as a real one (the loader's to_text(): a header, counts, one line per kept
# layer, the backend, the five worst layers).
FAKE_REPORT = "\n".join(
    ["OnlineQuant: example.safetensors", "Linear layers: 240 quantized, 12 kept"]
    + [f"kept blocks.{i}.attn.o: pattern 'attention' (line 2)" for i in range(30)]
    + ["backend: torch._scaled_mm (fp8 tensor cores)", "worst layers: blocks.0.ffn.0 31.2 dB"]
)

# Every node's box in graph units (title bar included), and each loader panel's box on screen
# next to its node's box on screen, after opening each loader's layer list and load report.
MEASURE_JS = """async ([report]) => {
    const frames = async (k) => {
        for (let i = 0; i < k; i++) await new Promise(r => requestAnimationFrame(r));
    };
    const loaders = app.graph._nodes.filter(n => n.comfyClass === 'OnlineQuantDiffusionLoader');
    for (const n of loaders) {
        n.onExecuted?.({text: [report]});
    }
    await frames(2);
    for (const d of document.querySelectorAll('[data-testid=onlinequant-panel] details')) d.open = true;
    for (let i = 0; i < 6; i++) { await frames(2); app.canvas.draw(true, true); }
    const titleH = LiteGraph.NODE_TITLE_HEIGHT;
    const boxes = app.graph._nodes.map(n => ({
        id: n.id, type: n.type, title: n.title,
        box: [n.pos[0], n.pos[1] - titleH, n.size[0], n.size[1] + titleH],
    }));
    const c = app.canvas.canvas.getBoundingClientRect();
    const ds = app.canvas.ds;
    const panels = loaders.map(n => {
        const mine = n.widgets.find(w => w.name === 'onlinequant_info').element;
        const r = mine.getBoundingClientRect();
        const [x0, y0] = ds.convertOffsetToCanvas([n.pos[0], n.pos[1]]);
        const [x1, y1] = ds.convertOffsetToCanvas([n.pos[0] + n.size[0], n.pos[1] + n.size[1]]);
        return {id: n.id, panel: [r.left, r.top, r.right, r.bottom],
                node: [c.left + x0, c.top + y0, c.left + x1, c.top + y1],
                layers: mine.querySelectorAll('.oq-row').length,
                report: mine.querySelector('[data-testid=oq-report]')?.offsetHeight ?? 0};
    });
    return {boxes, panels};
}"""

# Show the graph rectangle `rect` (x, y, w, h in graph units; null: every node) inside the screen
# rectangle `area`, centred; the canvas's own info text is hidden.
FIT_JS = """([area, rect]) => {
    const [x, y, w, h] = area;
    const titleH = LiteGraph.NODE_TITLE_HEIGHT;
    let [x0, y0, x1, y1] = rect ? [rect[0], rect[1], rect[0] + rect[2], rect[1] + rect[3]]
                                : [Infinity, Infinity, -Infinity, -Infinity];
    if (!rect) for (const n of app.graph._nodes) {
        x0 = Math.min(x0, n.pos[0] - 10); y0 = Math.min(y0, n.pos[1] - titleH - 10);
        x1 = Math.max(x1, n.pos[0] + n.size[0] + 10); y1 = Math.max(y1, n.pos[1] + n.size[1] + 10);
    }
    const scale = Math.min(w / (x1 - x0), h / (y1 - y0));
    const c = app.canvas.canvas.getBoundingClientRect();
    const ds = app.canvas.ds;
    ds.scale = scale;
    // screen = (graph + offset) * scale
    ds.offset = [(x - c.left + (w - (x1 - x0) * scale) / 2) / scale - x0,
                 (y - c.top + (h - (y1 - y0) * scale) / 2) / scale - y0];
    app.canvas.show_info = false;
    app.canvas.setDirty(true, true);
    app.canvas.draw(true, true);
}"""
# Screen areas clear of the editor's menus, tabs, toasts and minimap at a 1600x1000 viewport.
LAYOUT_AREA = [64, 96, 1520, 880]
THUMB_AREA = [64, 96, 1160, 870]  # 4:3
# The part of a workflow a thumbnail shows: the loader column and its neighbours, readable.
THUMB_RECT = [20, -10, 1280, 960]


def overlaps(a, b) -> bool:
    ax, ay, aw, ah = a
    bx, by, bw, bh = b
    return ax < bx + bw and bx < ax + aw and ay < by + bh and by < ay + ah


def load_workflow(page, wf: dict) -> None:
    for _ in range(2):
        page.keyboard.press("Escape")
    page.evaluate("async (wf) => { await app.loadGraphData(wf); }", wf)
    n = sum(1 for node in wf["nodes"] if node["type"] == "OnlineQuantDiffusionLoader")
    page.wait_for_function(
        "(n) => document.querySelectorAll('[data-testid=oq-counts]').length === n", arg=n, timeout=30_000
    )


def render_thumbnail(page, name: str) -> Path:
    """The workflow as it opens (panels closed): its loader corner at a readable scale, as a
    small JPEG in the template cards' 4:3 shape."""
    from PIL import Image

    page.evaluate(FIT_JS, [THUMB_AREA, THUMB_RECT])
    page.wait_for_timeout(400)  # DOM widgets follow the canvas on its next frames
    out = ARTIFACTS / "thumbnails"
    out.mkdir(exist_ok=True)
    png = out / f"{name}.png"
    page.screenshot(path=str(png), clip=dict(zip(("x", "y", "width", "height"), THUMB_AREA, strict=True)))
    jpg = out / f"{name}.jpg"
    Image.open(png).convert("RGB").resize(THUMB_SIZE, Image.LANCZOS).save(jpg, "JPEG", quality=80)
    png.unlink()
    return jpg


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_example_workflow_nodes_do_not_overlap(page, srv, path):
    """Each example workflow, with every loader's layer list and a long load report open: no two
    nodes overlap and each panel stays inside its own node (the node grew to hold it)."""
    wf = json.loads(path.read_text())
    load_workflow(page, wf)
    thumb = render_thumbnail(page, path.stem)
    if os.environ.get("ONLINEQUANT_UPDATE_THUMBNAILS"):
        shutil.copyfile(thumb, path.with_suffix(".jpg"))
    m = page.evaluate(MEASURE_JS, [FAKE_REPORT])
    page.evaluate(FIT_JS, [LAYOUT_AREA, None])
    page.wait_for_timeout(400)
    heights = [b["box"][3] for b in m["boxes"] if b["type"] == "OnlineQuantDiffusionLoader"]
    print(f"{path.stem}: loader boxes fully open {heights} px high")
    page.screenshot(path=str(ARTIFACTS / f"layout_{path.stem}_fe{page.frontend_version}.png"))
    for p in m["panels"]:
        # the panel really is open all the way: its layer list drawn, its report shown
        assert p["layers"] > 0 and p["report"] > 0, p
        x0, y0, x1, y1 = p["panel"]
        nx0, ny0, nx1, ny1 = p["node"]
        assert nx0 - 2 <= x0 and x1 <= nx1 + 2 and ny0 - 2 <= y0 and y1 <= ny1 + 2, p
    boxes = m["boxes"]
    clashes = [
        (a["title"], a["box"], b["title"], b["box"])
        for i, a in enumerate(boxes)
        for b in boxes[i + 1 :]
        if overlaps(a["box"], b["box"])
    ]
    assert clashes == [], clashes
    assert not page.errors, page.errors


def test_example_workflow_thumbnails_are_committed():
    """Each example workflow has its small JPEG thumbnail next to it (as ComfyUI serves it)."""
    from PIL import Image

    for path in WORKFLOWS:
        jpg = path.with_suffix(".jpg")
        assert jpg.is_file(), f"{jpg.name} missing: run this file with ONLINEQUANT_UPDATE_THUMBNAILS=1"
        assert jpg.stat().st_size < 100_000
        with Image.open(jpg) as im:
            assert im.format == "JPEG" and im.size == THUMB_SIZE


def search_node(page, words: str) -> bool:
    """Type `words` in the node search box (opened by a double click on the empty canvas); pick the
    loader when it is listed. True when that added a loader node."""
    page.evaluate("app.graph.clear()")
    for _ in range(2):
        page.keyboard.press("Escape")
    box = page.locator("input:focus")
    for _ in range(3):  # a double click the editor took for something else (a closing popup) is retried
        page.locator("#graph-canvas").dblclick(position={"x": 700, "y": 500})
        try:
            box.wait_for(timeout=5_000)
            break
        except Exception:
            page.keyboard.press("Escape")
    else:
        page.screenshot(path=str(ARTIFACTS / f"search_{words}_no_box_fe{page.frontend_version}.png"))
        raise AssertionError("the node search box did not open")
    page.keyboard.type(words)
    option = page.locator("[role=option]").filter(has_text=LOADER_NAME)
    try:
        option.first.wait_for(timeout=5_000)
    except Exception:
        page.screenshot(path=str(ARTIFACTS / f"search_{words}_fe{page.frontend_version}.png"))
        page.keyboard.press("Escape")
        return False
    page.screenshot(path=str(ARTIFACTS / f"search_{words}_fe{page.frontend_version}.png"))
    option.first.click()
    page.wait_for_timeout(300)
    return page.evaluate("app.graph._nodes.some(n => n.comfyClass === 'OnlineQuantDiffusionLoader')")


def frontend_at_least(page, version: tuple[int, int]) -> bool:
    try:
        return tuple(int(x) for x in page.frontend_version.split(".")[:2]) >= version
    except ValueError:
        return False


def test_node_search_finds_the_loader(page, srv):
    # format names: in the display name, which every frontend searches
    for words in ("fp8", "mxfp4"):
        assert search_node(page, words), f"'{words}' did not list {LOADER_NAME}"
    # model names and verbs: the search aliases, indexed by newer frontends (1.58 here)
    if frontend_at_least(page, (1, 58)):
        for words in ("quantize", "z-image", "wan"):
            assert search_node(page, words), f"'{words}' did not list {LOADER_NAME}"
    assert not page.errors, page.errors


def test_template_browser_shows_titles_and_thumbnails(page, srv):
    fetched = {}  # the thumbnails the dialog asked the server for, by file name

    def on_response(r):
        if f"/workflow_templates/{PACK_DIR}/" in r.url and r.url.endswith(".jpg"):
            fetched[urllib.parse.unquote(r.url.rsplit("/", 1)[1])] = (r.status, r.headers.get("content-type"))

    page.on("response", on_response)
    page.keyboard.press("Escape")
    page.evaluate("app.extensionManager.command.execute('Comfy.BrowseTemplates')")
    # the pack's category (named after its folder) in the dialog's navigation
    page.get_by_text(PACK_DIR, exact=True).first.click(timeout=15_000)
    names = [p.stem for p in WORKFLOWS]
    for name in names:
        page.get_by_text(name, exact=True).first.wait_for(timeout=15_000)
    # the cards' images drawn from our thumbnails (a missing one falls back to the frontend's
    # placeholder, of another size); the frontend shows them through blob: URLs
    page.wait_for_function(
        "([w, h, n]) => [...document.querySelectorAll('img')]"
        ".filter(i => i.naturalWidth === w && i.naturalHeight === h).length >= n",
        arg=[*THUMB_SIZE, len(names)],
        timeout=15_000,
    )
    page.screenshot(path=str(ARTIFACTS / f"templates_fe{page.frontend_version}.png"))
    page.remove_listener("response", on_response)
    for name in names:
        assert fetched.get(f"{name}.jpg") == (200, "image/jpeg"), (name, fetched)
    page.keyboard.press("Escape")
