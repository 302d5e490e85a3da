// Shared helpers of the OnlineQuant web extension: one info panel per loader node (a DOM widget
// holding the plan preview and the last load report), text-only DOM building, byte formatting.
// Everything file-derived goes in through textContent, never innerHTML.

export const LOADER_NODE = "OnlineQuantDiffusionLoader";
// The loader node's input names (nodes/loader_node.py).
export const INPUTS = {
  model: "unet_name",
  format: "quantization",
  ignore: "ignored_layers",
  minOut: "min_out_features",
};

const STYLE_ID = "onlinequant-style";
const CSS = `
.oq-panel { font: 12px/1.35 sans-serif; color: var(--input-text, #ddd); padding: 4px 6px;
  overflow: auto; box-sizing: border-box; background: var(--comfy-input-bg, #222); border-radius: 6px; }
.oq-panel .oq-title { font-weight: bold; margin-bottom: 2px; }
.oq-panel .oq-muted { opacity: 0.7; }
.oq-panel .oq-warn { color: #e8b84a; }
.oq-panel .oq-err { color: #ff6b6b; white-space: pre-wrap; }
.oq-panel ul { margin: 2px 0 2px 16px; padding: 0; }
.oq-panel button { font-size: 11px; margin: 3px 0; cursor: pointer; }
.oq-panel details { margin-top: 3px; }
.oq-panel .oq-layers { max-height: 200px; overflow: auto; font-family: monospace; font-size: 11px; }
.oq-panel .oq-row.oq-q { color: #8fd18f; }
.oq-panel .oq-row.oq-k { color: #c8c8c8; }
.oq-panel .oq-report { border-top: 1px solid #555; margin-top: 4px; padding-top: 3px; }
.oq-panel .oq-report summary { cursor: pointer; white-space: nowrap; overflow: hidden; text-overflow: ellipsis; }
.oq-panel .oq-report-body { max-height: 140px; overflow: auto; white-space: pre-wrap; }
`;

export function ensureStyle() {
  if (document.getElementById(STYLE_ID)) return;
  const s = document.createElement("style");
  s.id = STYLE_ID;
  s.textContent = CSS;
  document.head.appendChild(s);
}

/** Create an element; children are nodes or strings (inserted as text). */
export function el(tag, attrs = {}, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") e.className = v;
    else if (k === "text") e.textContent = v;
    else e.setAttribute(k, v);
  }
  for (const c of children) {
    if (c === null || c === undefined) continue;
    e.appendChild(typeof c === "string" ? document.createTextNode(c) : c);
  }
  return e;
}

export function formatBytes(n) {
  if (typeof n !== "number" || !isFinite(n)) return "?";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (Math.abs(n) >= 1024 && i < units.length - 1) {
    n /= 1024;
    i++;
  }
  return `${n.toFixed(i === 0 ? 0 : 2)} ${units[i]}`;
}

export function isLoaderNode(node) {
  return (node?.comfyClass ?? node?.constructor?.comfyClass) === LOADER_NODE;
}

export function findWidget(node, name) {
  return node.widgets?.find((w) => w.name === name);
}

const panels = new WeakMap();
const MIN_PANEL_HEIGHT = 60;
// The most the panel ever takes: with the layer list and the load report both open, the node stays
// within the room the example workflows leave under a loader; past it the panel scrolls.
export const MAX_PANEL_HEIGHT = 440;

/**
 * The node's info panel, created on first use: a non-serialized DOM widget with two sections,
 * `preview` (plan_preview.js) and `report` (load_report.js). Removed with the node.
 */
export function ensurePanel(node) {
  let p = panels.get(node);
  if (p) return p;
  ensureStyle();
  const preview = el("div", { class: "oq-preview" });
  const report = el("div", { class: "oq-report", style: "display:none" });
  const root = el("div", { class: "oq-panel", "data-testid": "onlinequant-panel" }, preview, report);
  // Stop wheel events from zooming the canvas while the user scrolls the layer list.
  root.addEventListener("wheel", (e) => e.stopPropagation(), { passive: true });
  // Height follows the content (the layer list and the report scroll inside their own boxes).
  // Measured from the sections, not root.scrollHeight: that never drops below the height the node
  // currently gives the panel, so a collapsed list would keep its room.
  const contentHeight = () => {
    const h = preview.offsetHeight + (report.style.display === "none" ? 0 : report.offsetHeight + 4) + 12;
    return Math.min(MAX_PANEL_HEIGHT, Math.max(MIN_PANEL_HEIGHT, h));
  };
  const widget = node.addDOMWidget("onlinequant_info", "onlinequant_info", root, {
    serialize: false,
    hideOnZoom: false,
    getMinHeight: contentHeight,
    getMaxHeight: () => MAX_PANEL_HEIGHT,
  });
  widget.serialize = false; // keep it out of widgets_values (saved workflows) and the prompt
  p = { root, preview, report, widget };
  panels.set(node, p);
  return p;
}

/** Ask the canvas to redraw/resize after panel content changed. */
export function relayout(node) {
  // After the browser laid out the new content: grow the node to fit it, and when the content
  // shrinks again (a list collapsed), give back only what was grown here, so that opening and
  // closing a list leaves the node as it was and a size the user set by hand is kept.
  requestAnimationFrame(() => {
    try {
      const p = panels.get(node);
      const min = node.computeSize?.();
      if (!min || !node.size) return;
      if (node.size[1] < min[1]) {
        if (p && p.grownFrom === undefined) p.grownFrom = node.size[1];
        node.setSize([node.size[0], min[1]]);
      } else if (p && p.grownFrom !== undefined && node.size[1] > min[1]) {
        const h = Math.max(p.grownFrom, min[1]);
        if (h === p.grownFrom) p.grownFrom = undefined;
        node.setSize([node.size[0], h]);
      }
      node.setDirtyCanvas?.(true, true);
    } catch {
      // layout is cosmetic: never break the editor over it
    }
  });
}

/** Chain a per-instance callback (not the prototype): `fn` runs after the original. */
export function chain(obj, key, fn) {
  const orig = obj[key];
  obj[key] = function (...args) {
    const r = orig?.apply(this, args);
    fn.apply(this, args);
    return r;
  };
}
