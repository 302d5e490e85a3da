// Live plan preview on the OnlineQuant loader node: as the user picks the model file or the
// format, or edits ignored_layers / min_out_features, ask GET /onlinequant/plan (header only,
// same selection code as the loader) and show what would be quantized, kept (by reason), the
// weight bytes before -> after, warnings and pattern errors, and an expandable per-layer list.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";
import { INPUTS, chain, el, ensurePanel, findWidget, formatBytes, isLoaderNode, relayout } from "./oq_panel.js";

const DEBOUNCE_MS = 350;
const MAX_ROWS = 3000; // rows drawn in the expanded list (a Wan 14B has ~410 Linear layers)
const SOURCE_LABEL = {
  pattern: "ignored by pattern",
  default: "kept by the model's defaults",
  size: "too small (out < min_out_features)",
  format: "shape unsupported by the format",
  none: "not quantized (quantization: none)",
};

// aiohttp refuses request lines over 8190 bytes; keep a margin for the /api prefix and headers.
const MAX_URL_CHARS = 7000;

function currentParams(node) {
  const get = (n) => findWidget(node, n)?.value;
  const model = get(INPUTS.model);
  if (!model) return null;
  const body = { model: String(model) };
  const fmt = get(INPUTS.format);
  if (fmt !== undefined && fmt !== null) body.format = String(fmt);
  const ignore = get(INPUTS.ignore);
  if (ignore !== undefined && ignore !== null) body.ignore = String(ignore);
  const minOut = get(INPUTS.minOut);
  if (minOut !== undefined && minOut !== null && minOut !== "") body.min_out = String(minOut);
  return body;
}

function renderLayers(box, layers) {
  box.replaceChildren();
  for (const l of layers.slice(0, MAX_ROWS)) {
    // W: quantized weights with activations in the compute dtype (a `weights-only:` line)
    const mark = l.quantize ? (l.precision === "weights-only" ? "W" : "Q") : "-";
    const why = l.quantize ? "" : `: ${l.reason || l.source}`;
    const shape = `${l.out_features}x${l.in_features}`;
    box.appendChild(el("div", { class: `oq-row ${l.quantize ? "oq-q" : "oq-k"}` }, `${mark} ${l.name}  ${shape}${why}`));
  }
  if (layers.length > MAX_ROWS) box.appendChild(el("div", { class: "oq-muted" }, `… ${layers.length - MAX_ROWS} more`));
}

function render(node, state, data, status) {
  const { preview } = ensurePanel(node);
  const parts = [];
  if (!data) {
    parts.push(el("div", { class: "oq-muted" }, status || "Pick a model file to preview the plan."));
  } else if (data.error) {
    parts.push(el("div", { class: "oq-title" }, "OnlineQuant plan"));
    if (data.family) parts.push(el("div", { class: "oq-muted" }, `model family: ${data.family}`));
    parts.push(el("div", { class: "oq-err", "data-testid": "oq-error" }, `Error: ${data.error}`));
  } else {
    const c = data.counts;
    parts.push(el("div", { class: "oq-title" }, `OnlineQuant plan: ${data.family}, ${data.format}`));
    parts.push(
      el(
        "div",
        { "data-testid": "oq-counts" },
        `${c.quantized} of ${c.layers} Linear layers quantized` +
          (c.weights_only ? ` (${c.weights_only} weights only)` : "") +
          `, ${c.kept} kept`
      )
    );
    const reasons = Object.entries(c.kept_by_source || {});
    if (reasons.length) {
      parts.push(el("ul", {}, ...reasons.map(([src, n]) => el("li", {}, `${n} ${SOURCE_LABEL[src] || src}`))));
    }
    parts.push(
      el(
        "div",
        { "data-testid": "oq-bytes" },
        `Linear weights: ${formatBytes(data.bytes_before)} → ${formatBytes(data.bytes_after)}`
      )
    );
    for (const w of data.warnings || []) parts.push(el("div", { class: "oq-warn" }, `⚠ ${w}`));
    for (const n of data.notes || []) parts.push(el("div", { class: "oq-muted" }, n));
    for (const e of data.errors || []) parts.push(el("div", { class: "oq-err" }, e));
    const layers = data.decisions || [];
    const total = data.layers?.total ?? layers.length;
    const title = total > layers.length ? `Layers (first ${layers.length} of ${total})` : `Layers (${layers.length})`;
    const details = el("details", {}, el("summary", {}, title));
    const box = el("div", { class: "oq-layers" });
    details.appendChild(box);
    details.addEventListener("toggle", () => {
      if (details.open) renderLayers(box, layers); // draw only when opened
      relayout(node);
    }, { signal: state.abort.signal });
    parts.push(details);
  }
  if (data && data.uses_defaults) {
    parts.push(el("div", { class: "oq-muted" }, "ignored_layers: using this model's defaults (# auto)"));
  }
  if (data && typeof data.default_ignore === "string") {
    const btn = el("button", { type: "button", "data-testid": "oq-defaults" }, `Use ${data.family} defaults`);
    btn.title = "Replace ignored_layers with this model family's recommended ignore list";
    btn.addEventListener("click", () => {
      const w = findWidget(node, INPUTS.ignore);
      if (!w) return;
      w.value = data.default_ignore; // the widget's setter fires its callback -> refresh
      w.callback?.(w.value);
      schedule(node, state, 0);
    }, { signal: state.abort.signal });
    parts.push(btn);
  }
  preview.replaceChildren(...parts);
  relayout(node);
}

async function refresh(node, state) {
  const params = currentParams(node);
  if (!params) return render(node, state, null);
  state.inflight?.abort();
  const ctl = new AbortController();
  state.inflight = ctl;
  const seq = ++state.seq;
  let data;
  try {
    // GET only (the route has no side effects); a URL has a length limit, so an ignore text too long
    // for one is not previewed (the loader still reads it whole).
    const url = `/onlinequant/plan?${new URLSearchParams(params)}`;
    if (url.length > MAX_URL_CHARS) {
      state.inflight = null;
      const error = `ignored_layers is too long to preview here (${params.ignore.length} characters); the loader still uses all of it`;
      if (state.disposed || seq !== state.seq) return;
      state.last = { error };
      return render(node, state, state.last);
    }
    const res = await api.fetchApi(url, { signal: ctl.signal });
    try {
      data = await res.json();
    } catch {
      data = { error: `server answered ${res.status} without JSON` };
    }
  } catch (e) {
    if (e?.name === "AbortError") return;
    data = { error: `preview request failed: ${e?.message || e}` };
  }
  if (state.disposed || seq !== state.seq) return; // a newer request superseded this one
  state.last = data;
  render(node, state, data);
}

function schedule(node, state, delay = DEBOUNCE_MS) {
  if (state.disposed) return;
  clearTimeout(state.timer);
  state.timer = setTimeout(() => refresh(node, state), delay);
}

function attach(node) {
  const state = { seq: 0, timer: null, inflight: null, disposed: false, last: null, abort: new AbortController() };
  node.onlineQuantPreview = { refresh: () => refresh(node, state), state };
  ensurePanel(node);
  render(node, state, null, "Preview loads when a model file is picked…");
  for (const name of Object.values(INPUTS)) {
    const w = findWidget(node, name);
    if (w) chain(w, "callback", () => schedule(node, state));
  }
  chain(node, "onRemoved", () => {
    state.disposed = true;
    clearTimeout(state.timer);
    state.inflight?.abort();
    state.abort.abort(); // removes every DOM listener this file added
  });
  schedule(node, state); // fires after a loaded workflow has set the widget values
}

app.registerExtension({
  name: "OnlineQuant.PlanPreview",
  async nodeCreated(node) {
    if (isLoaderNode(node)) attach(node);
  },
  loadedGraphNode(node) {
    if (isLoaderNode(node)) node.onlineQuantPreview?.refresh();
  },
});
