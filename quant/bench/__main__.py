"""`python -m quant.bench [--quick] [--sections gemm,models] [--out DIR]`: see quant/bench/__init__.py."""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
import time
from pathlib import Path

import torch

from . import DEFAULT_SECTIONS, SECTIONS
from .report import render
from .timing import env_info

log = logging.getLogger("quant.bench")


def _load_sections() -> tuple[dict[str, object], dict[str, str]]:
    mods, missing = {}, {}
    for name, modname in SECTIONS:
        try:
            mods[name] = importlib.import_module(modname, __package__)
        except ImportError as e:
            missing[name] = f"not available ({e})"
    return mods, missing


def main(argv: list[str] | None = None) -> int:
    mods, missing = _load_sections()
    p = argparse.ArgumentParser(prog="python -m quant.bench", description=__doc__)
    p.add_argument("--quick", action="store_true", help="tiny shapes, runs on the CPU (CI)")
    p.add_argument(
        "--sections",
        default=",".join(DEFAULT_SECTIONS),
        help=f"comma list of {', '.join(n for n, _ in SECTIONS)}",
    )
    p.add_argument("--out", default="bench_out", help="folder for results.json and results.md")
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    for mod in mods.values():
        if hasattr(mod, "add_args"):
            mod.add_args(p)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    env = env_info(device)
    log.info("environment: %s", env)

    results: dict[str, list[dict]] = {}
    skipped: dict[str, str] = {}
    for name in [s for s in args.sections.split(",") if s]:
        if name not in mods:
            skipped[name] = missing.get(name, "unknown section")
            continue
        t0 = time.perf_counter()
        try:
            results[name] = mods[name].run(args, device)
        except Exception as e:  # one broken section must not lose the others' numbers
            log.exception("section %s failed", name)
            skipped[name] = f"failed: {type(e).__name__}: {str(e)[:300]}"
        log.info("section %s: %.1f s", name, time.perf_counter() - t0)
        _write(args.out, argv, env, results, skipped)  # after each section: a timeout keeps the rest
    print(_write(args.out, argv, env, results, skipped))
    return 0


def _write(out_dir: str, argv, env: dict, results: dict, skipped: dict) -> str:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    command = "python -m quant.bench " + " ".join(argv if argv is not None else sys.argv[1:])
    payload = {"command": command, "env": env, "results": results, "skipped": skipped}
    (out / "results.json").write_text(json.dumps(payload, indent=1, default=str))
    md = render(env, results, skipped, command)
    (out / "results.md").write_text(md)
    return md


if __name__ == "__main__":
    sys.exit(main())
