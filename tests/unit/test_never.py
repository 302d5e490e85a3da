"""Things the pack never does (ComfyUI Manager's scanner and the Registry flag
them): pickle, eval/exec, subprocess/os.system, pip, downloads at run time, `torch.load` without
`weights_only=True`. An AST scan of every shipped .py file (tests/ are not shipped: the server
helper legitimately starts ComfyUI with subprocess)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
NOT_SHIPPED = {"tests", ".dev", ".carry", ".whl", ".ci", ".git", "node_modules", "__pycache__", ".venv"}

BANNED_MODULES = {
    "pickle": "unpickling runs code",
    "cPickle": "unpickling runs code",
    "_pickle": "unpickling runs code",
    "dill": "unpickling runs code",
    "cloudpickle": "unpickling runs code",
    "marshal": "loads code objects",
    "shelve": "pickle underneath",
    "subprocess": "starts programs",
    "pty": "starts programs",
    "pip": "installs packages at run time",
    "ensurepip": "installs packages at run time",
    "urllib.request": "downloads",
    "http.client": "downloads",
    "requests": "downloads",
    "httpx": "downloads",
    "urllib3": "downloads",
    "socket": "opens network connections",
    "ftplib": "downloads",
    "huggingface_hub": "downloads",
    "wget": "downloads",
}
BANNED_CALLS = {
    "eval": "runs text as code",
    "exec": "runs text as code",
    "compile": "builds code from text",
    "__import__": "imports by computed name",
    "os.system": "starts programs",
    "os.popen": "starts programs",
    "os.execv": "starts programs",
    "os.execvp": "starts programs",
    "os.spawnv": "starts programs",
    "os.startfile": "starts programs",
    "torch.hub.load": "downloads and runs code",
    "torch.hub.download_url_to_file": "downloads",
    "hf_hub_download": "downloads",
    "aiohttp.ClientSession": "opens network connections",
}


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = _dotted(node.value)
        return f"{base}.{node.attr}" if base else ""
    return ""


def findings(source: str, filename: str = "<src>") -> list[str]:
    """Every banned use in `source`, as 'file:line: what (why)'."""
    tree = ast.parse(source, filename)
    out: list[str] = []

    def hit(node: ast.AST, what: str, why: str) -> None:
        out.append(f"{filename}:{getattr(node, 'lineno', 0)}: {what} ({why})")

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                for mod, why in BANNED_MODULES.items():
                    if a.name == mod or a.name.startswith(mod + "."):
                        hit(node, f"import {a.name}", why)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            for mod, why in BANNED_MODULES.items():
                if any(n == mod or n.startswith(mod + ".") for n in names):
                    hit(node, f"from {node.module} import ...", why)
                    break
        elif isinstance(node, ast.Call):
            name = _dotted(node.func)
            if name in BANNED_CALLS:
                hit(node, f"{name}()", BANNED_CALLS[name])
            elif name.endswith(".hf_hub_download") or name.endswith("snapshot_download"):
                hit(node, f"{name}()", "downloads")
            elif name == "torch.load" or name.endswith(".torch.load"):
                ok = any(
                    k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
                    for k in node.keywords
                )
                if not ok:
                    hit(node, "torch.load() without weights_only=True", "unpickles arbitrary objects")
            elif (name.endswith("numpy.load") or name == "np.load") and any(
                k.arg == "allow_pickle" and not (isinstance(k.value, ast.Constant) and k.value.value is False)
                for k in node.keywords
            ):
                hit(node, f"{name}(allow_pickle=...)", "unpickles arbitrary objects")
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            s = node.value
            if "pip install" in s and ("subprocess" in s or "os.system" in s):
                hit(node, "pip install command", "installs packages at run time")
    return out


def shipped_files() -> list[Path]:
    files = []
    for p in sorted(REPO.rglob("*.py")):
        rel = p.relative_to(REPO)
        if any(part in NOT_SHIPPED or part.startswith(".") for part in rel.parts[:-1]):
            continue
        files.append(p)
    return files


def test_scanner_finds_every_kind_of_banned_use():
    bad = """
import pickle
import subprocess as sp
from urllib.request import urlopen
from huggingface_hub import hf_hub_download
import torch, os
eval("1")
exec("x = 1")
os.system("ls")
torch.load("x.pt")
torch.load("x.pt", weights_only=False)
torch.hub.load("a", "b")
"""
    found = findings(bad)
    for what in ("import pickle", "import subprocess", "from urllib.request", "from huggingface_hub",
                 "eval()", "exec()", "os.system()", "torch.hub.load()"):
        assert any(what in f for f in found), what
    assert sum("torch.load() without weights_only=True" in f for f in found) == 2
    assert findings("import torch\ntorch.load('x', weights_only=True)\nimport re\nre.compile('a')\n") == []


def test_shipped_files_exist():
    files = {str(p.relative_to(REPO)) for p in shipped_files()}
    assert "__init__.py" in files and "quant/checkpoint/reader.py" in files
    assert not any(f.startswith("tests/") for f in files)


@pytest.mark.parametrize("path", shipped_files(), ids=lambda p: str(p.relative_to(REPO)))
def test_pack_never_does_these(path):
    assert findings(path.read_text(encoding="utf-8"), str(path.relative_to(REPO))) == []


HTML_SINKS = ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "new Function(")


def test_web_code_never_builds_html_from_strings():
    """File-derived strings (tensor names, errors) reach the page as text: the frontend
    never uses an HTML sink. A comment that names one is fine."""
    found = []
    for p in sorted((REPO / "web").rglob("*.js")):
        for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
            code = line.split("//", 1)[0]
            found += [f"{p.relative_to(REPO)}:{i}: {s}" for s in HTML_SINKS if s in code]
    assert found == []
