"""quant/ is plain PyTorch: it never imports ComfyUI or nodes/, and uses only relative imports
inside the package (it is imported both as `quant` and as `<pack>.quant`). AST scan, no import.

One exception, kept visible here: benchmarks under quant/bench/ that measure the pack inside
ComfyUI may import ComfyUI *inside functions* (so `import quant.bench.x` still needs no
ComfyUI). Module-level imports of ComfyUI are forbidden everywhere in quant/.
"""

from __future__ import annotations

import ast
import re
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


# --- the layout's own rules ---------------------------------------------------------------------

MAX_LINES = 400  # small modules with one job each; a file past this wants splitting


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(QUANT.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _resolve(module: str, is_pkg: bool, level: int, target: str) -> str:
    base = module.split(".") if is_pkg else module.split(".")[:-1]
    base = base[: len(base) - (level - 1)] if level > 1 else base
    return ".".join([*base, *([target] if target else [])])


def _import_graph(root: Path) -> dict[str, set[str]]:
    """Module-level imports between the modules under `root` (an edge to a package is an edge to
    its __init__; `from . import x` with x a module is an edge to x)."""
    files = {(_module_name(p)): p for p in root.rglob("*.py") if "__pycache__" not in p.parts}
    graph: dict[str, set[str]] = {m: set() for m in files}
    for mod, path in files.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in tree.body:  # module level only; function-level imports are deliberate and lazy
            if isinstance(node, ast.If):  # `if TYPE_CHECKING:` blocks import nothing at run time
                continue
            if not isinstance(node, ast.ImportFrom) or node.level == 0:
                continue
            target = _resolve(mod, path.name == "__init__.py", node.level, node.module or "")
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                dep = sub if sub in files else target
                if dep in files and dep != mod:
                    graph[mod].add(dep)
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                return stack[stack.index(d) :] + [d]
            if d not in state and (found := visit(d)):
                return found
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (found := visit(m)):
            return found
    return None


def test_quant_imports_go_one_way():
    """No import cycle anywhere in quant/ (module-level imports, the whole package)."""
    cycle = _cycle(_import_graph(QUANT))
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_cycle_check_catches_a_cycle(tmp_path):
    pkg = tmp_path / "quant"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from .sub import b\n")
    (pkg / "sub" / "b.py").write_text("from ..c import x\n")
    (pkg / "c.py").write_text("from .a import y\n")
    global QUANT
    real, QUANT = QUANT, pkg
    try:
        assert _cycle(_import_graph(pkg)) == ["quant.a", "quant.sub.b", "quant.c", "quant.a"]
    finally:
        QUANT = real


def test_modules_stay_small():
    root = QUANT.parent
    big = [
        f"{p.relative_to(root)}: {n} lines"
        for d in ("quant", "nodes")
        for p in sorted((root / d).rglob("*.py"))
        if (n := len(p.read_text().splitlines())) > MAX_LINES
    ]
    assert not big, f"modules over {MAX_LINES} lines:\n" + "\n".join(big)


# Text that points at what a reader of the repository does not have: people by letter, internal
# issue numbers, design notes kept outside the repository.
_NOWHERE = re.compile(
    r"\b[A-H]'s (module|tests?|strict|lazy|per-weight|toy|compare)|\bDESIGN(\.md)? §|\bissue \d+\b"
)


def test_text_points_only_inside_the_project():
    root = QUANT.parent
    files = [
        p
        for d in ("quant", "nodes", "web", "tests")
        for p in (root / d).rglob("*")
        if p.suffix in (".py", ".js")
    ]
    files += [root / "README.md", *sorted((root / "docs").glob("*.md"))]
    bad = [
        f"{p.relative_to(root)}:{i}: {line.strip()[:100]}"
        for p in files
        if p != Path(__file__)
        for i, line in enumerate(p.read_text().splitlines(), 1)
        if _NOWHERE.search(line)
    ]
    assert not bad, "text that points outside the project:\n" + "\n".join(bad)


def test_one_name_per_reference_model():
    """Benchmarks name models by the reference-model names of quant/models, nothing else."""
    from quant.bench import models as bench_models
    from quant.bench.quality_inputs import MODELS as QUALITY_MODELS
    from quant.bench.shapes import LINEAR_SHAPES
    from quant.models import REFERENCE_MODELS

    used = set(bench_models.MODELS) | set(QUALITY_MODELS) | {m for m, *_ in LINEAR_SHAPES}
    assert used <= set(REFERENCE_MODELS), used - set(REFERENCE_MODELS)
