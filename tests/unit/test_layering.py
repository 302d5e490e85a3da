"""quant/ is plain PyTorch: it never imports ComfyUI or nodes/, and uses only relative imports
inside the package (it is imported both as `quant` and as `<pack>.quant`). AST scan, no import.

One exception, kept visible here: benchmarks under quant/bench/ that measure the pack inside
ComfyUI may import ComfyUI *inside functions* (so `import quant.bench.x` still needs no
ComfyUI). Module-level imports of ComfyUI are forbidden everywhere in quant/.
"""

from __future__ import annotations

import ast
from pathlib import Path

QUANT = Path(__file__).resolve().parents[2] / "quant"
FORBIDDEN_ROOTS = {"comfy", "comfy_api", "comfy_extras", "comfy_execution", "folder_paths", "nodes", "server"}
FORBIDDEN_ROOTS |= {"comfy_kitchen", "execution", "node_helpers", "latent_preview", "comfyui_online_quant"}
LAZY_COMFY_ALLOWED = ("bench",)  # first path part under quant/ where function-level imports are allowed


def _imports(path: Path):
    """(line, level, module, inside_function) for every import of a file."""
    tree = ast.parse(path.read_text(), filename=str(path))
    in_func: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            for sub in ast.walk(node):
                in_func.add(id(sub))
    for node in ast.walk(tree):
        lazy = id(node) in in_func
        if isinstance(node, ast.Import):
            for a in node.names:
                yield node.lineno, 0, a.name, lazy
        elif isinstance(node, ast.ImportFrom):
            yield node.lineno, node.level, node.module or "", lazy


def _quant_files() -> list[Path]:
    return sorted(p for p in QUANT.rglob("*.py") if "__pycache__" not in p.parts)


def _violations(path: Path, root_dir: Path) -> list[str]:
    bad = []
    rel = path.relative_to(root_dir)
    for line, level, mod, lazy in _imports(path):
        root = mod.split(".")[0]
        if level == 0 and (root in FORBIDDEN_ROOTS or root == "quant"):
            if lazy and root != "quant" and rel.parts[0] in LAZY_COMFY_ALLOWED:
                continue
            bad.append(f"quant/{rel}:{line}: import {mod}" + (" (in a function)" if lazy else ""))
        if level > 0 and level - 1 > len(rel.parts) - 1:  # climbs above quant/
            bad.append(f"quant/{rel}:{line}: relative import out of quant/ ({mod})")
    return bad


def test_quant_has_files():
    assert len(_quant_files()) >= 5


def test_quant_imports_no_comfyui_and_no_nodes():
    bad = [v for p in _quant_files() for v in _violations(p, QUANT)]
    assert not bad, "quant/ must stay plain PyTorch:\n" + "\n".join(bad)


def test_scan_catches_violations(tmp_path):
    """The scan itself works: top-level ComfyUI, climbing relative imports and lazy imports
    outside bench/ are all reported; lazy ones inside bench/ are not."""
    (tmp_path / "bench").mkdir()
    src = "import torch\nfrom comfy import ops\nfrom ...nodes import loader\ndef f():\n    import comfy.sd\n"
    (tmp_path / "x.py").write_text(src)
    (tmp_path / "bench" / "y.py").write_text(src)
    bad_x = _violations(tmp_path / "x.py", tmp_path)
    bad_y = _violations(tmp_path / "bench" / "y.py", tmp_path)
    assert len(bad_x) == 3 and any("in a function" in b for b in bad_x)
    assert len(bad_y) == 2 and not any("in a function" in b for b in bad_y)
