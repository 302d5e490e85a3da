// After a run, show the OnlineQuant loader's load report (what was quantized, bytes, time,
// backend) under its plan preview. The node sends it in its UI message: `text` (the report's
// to_text()) and, when present, `onlinequant_report` (its to_dict() as JSON).
import { app } from "../../scripts/app.js";
import { chain, el, ensurePanel, formatBytes, isLoaderNode, relayout } from "./oq_panel.js";

function first(v) {
  return Array.isArray(v) ? v[0] : v;
}

// The collapsed report's one line: the counts and the bytes (from the JSON form's lines, or the
// "Linear layers:" / "Linear weights:" lines of the text form), else the text's first line.
function summary(lines) {
  const counted = lines.find((l) => / layers quantized, /.test(l));
  if (counted) return counted;
  const text = lines.join("\n");
  const counts = /^Linear layers: (\d+ quantized, \d+ kept)/m.exec(text);
  const bytes = /^Linear weights: (.+?) \(/m.exec(text);
  if (counts) return `${counts[1]}${bytes ? ", " + bytes[1] : ""}`;
  return text.split("\n")[0];
}

function reportLines(output) {
  let rep = first(output?.onlinequant_report);
  if (typeof rep === "string") {
    try {
      rep = JSON.parse(rep);
    } catch {
      rep = null;
    }
  }
  const text = first(output?.text);
  const lines = [];
  if (rep && typeof rep === "object") {
    const n = rep.counts || {};
    const b = rep.bytes || {};
    const be = rep.backend || {};
    lines.push(`Last load: ${rep.model_file ?? ""} (${rep.family ?? "?"}, ${rep.format ?? "?"})`);
    if (n.quantized !== undefined) lines.push(`${n.quantized} layers quantized, ${n.kept} kept`);
    if (b.linear_before !== undefined) lines.push(`Linear weights ${formatBytes(b.linear_before)} → ${formatBytes(b.linear_after)}`);
    if (rep.load_seconds !== undefined) lines.push(`load ${rep.load_seconds}s (quantize ${rep.quantize_seconds ?? "?"}s)`);
    if (be.name) lines.push(`backend: ${be.name}${be.reason ? " — " + be.reason : ""}`);
    for (const w of rep.warnings || []) lines.push(`⚠ ${w}`);
  } else if (typeof text === "string" && text) {
    lines.push(text);
  }
  return lines;
}

app.registerExtension({
  name: "OnlineQuant.LoadReport",
  async nodeCreated(node) {
    if (!isLoaderNode(node)) return;
    chain(node, "onExecuted", (output) => {
      const lines = reportLines(output);
      if (!lines.length) return;
      const { report } = ensurePanel(node);
      // Collapsed to its first line by default: the full report would grow the node over its
      // neighbours after every run. Open, it scrolls inside a capped box.
      const wasOpen = report.querySelector("details")?.open ?? false;
      const details = el(
        "details",
        { "data-testid": "oq-report-details" },
        el("summary", { "data-testid": "oq-report-summary" }, `Load report: ${summary(lines)}`),
        el("div", { class: "oq-report-body", "data-testid": "oq-report" }, lines.join("\n"))
      );
      details.open = wasOpen;
      details.addEventListener("toggle", () => relayout(node));
      report.replaceChildren(details);
      report.style.display = "";
      relayout(node);
    });
  },
});
