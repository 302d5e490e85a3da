"""Markdown rendering of benchmark rows (generic tables, plus a compact pivot of the GEMM table)."""

from __future__ import annotations

import math


def fmt_db(x: float) -> str:
    """A dB figure for a table: one decimal, "inf" for an exact match, "n/a" for NaN."""
    return "inf" if x == math.inf else ("n/a" if not math.isfinite(x) else f"{x:.1f}")


def _fmt(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v).replace("|", "/")


def table(rows: list[dict], columns: list[str] | None = None) -> str:
    if not rows:
        return "_(no rows)_\n"
    if columns is None:
        columns = []
        for r in rows:
            for k in r:
                if k != "table" and k not in columns:
                    columns.append(k)
    out = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    out += ["| " + " | ".join(_fmt(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(out) + "\n"


def gemm_pivot(rows: list[dict]) -> str:
    """One line per (shape, M): each path's speed-up over bf16 and its error vs bf16."""
    keys, paths, cell = [], [], {}
    for r in rows:
        key = (r["model"], r["layer"], r["M"], r["K"], r["N"])
        if key not in keys:
            keys.append(key)
        if r["path"] in ("bf16", "act_quant_only"):
            continue
        if r["path"] not in paths:
            paths.append(r["path"])
        if "error" in r:
            cell[key, r["path"]] = "failed"
        else:
            cell[key, r["path"]] = f"{r['speedup_vs_bf16']:.2f}× / {100 * r['rel_err_vs_bf16']:.1f}%"
    bf16 = {
        (r["model"], r["layer"], r["M"], r["K"], r["N"]): r.get("ms") for r in rows if r["path"] == "bf16"
    }
    head = ["model", "layer", "M×K×N", "bf16 ms"] + paths
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key in keys:
        model, layer, m, k, n = key
        line = [model, layer, f"{m}×{k}×{n}", _fmt(bf16.get(key))] + [cell.get((key, p), "") for p in paths]
        out.append("| " + " | ".join(line) + " |")
    return "\n".join(out) + "\n"


def gemm_host_pivot(rows: list[dict]) -> str:
    """One line per small (shape, M): each path's host microseconds per call ("" when not timed)."""
    keys, paths, cell = [], [], {}
    for r in rows:
        if r.get("host_us") is None:
            continue
        key = (r["model"], r["layer"], f"{r['M']}×{r['K']}×{r['N']}")
        keys += [key] if key not in keys else []
        paths += [r["path"]] if r["path"] not in paths else []
        cell[key, r["path"]] = r["host_us"]
    if not keys:
        return ""
    head = ["model", "layer", "M×K×N"] + paths
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    out += ["| " + " | ".join([*key] + [_fmt(cell.get((key, p))) for p in paths]) + " |" for key in keys]
    return "\n".join(out) + "\n"


def render(env: dict, sections: dict[str, list[dict]], skipped: dict[str, str], command: str) -> str:
    parts = [
        "# quant.bench results",
        "",
        f"Command: `{command}`",
        "",
        "Environment: " + ", ".join(f"{k}={v}" for k, v in env.items() if v is not None),
        "",
        "Random weights (N(0, 0.02)) and N(0, 1) inputs at the real shapes; no checkpoints.",
        "",
    ]
    for name, rows in sections.items():
        by_table: dict[str, list[dict]] = {}
        for r in rows:
            by_table.setdefault(r.get("table", name), []).append(r)
        for tname, trows in by_table.items():
            parts.append(f"## {tname}")
            parts.append("")
            if tname == "gemm":
                parts.append("Speed-up over bf16 `F.linear` / relative L2 error against bf16 output:")
                parts.append("")
                parts.append(gemm_pivot(trows))
                host = gemm_host_pivot(trows)
                if host:
                    parts += ["Host time per call, µs (Python + launches, GPU not waited for):", "", host]
                parts.append("<details><summary>all GEMM rows</summary>\n")
                parts.append(table(trows))
                parts.append("</details>\n")
            else:
                parts.append(table(trows))
    if skipped:
        parts.append("## skipped sections")
        parts += [f"- {k}: {v}" for k, v in skipped.items()]
    return "\n".join(parts) + "\n"
