"""Start and stop a real ComfyUI server with this pack installed, for end-to-end tests.

The server runs `main.py --cpu` on a free loopback port with every directory ComfyUI writes to
(models, custom_nodes, input, output, temp, user, its sqlite database) inside a temporary base
directory, so the ComfyUI checkout itself is never written to. This repo is symlinked into
`<base>/custom_nodes/ComfyUI-OnlineQuant`, the name a `git clone` by ComfyUI Manager gives it.
The server is stopped by its PID (terminate, then kill).

Used by the route, workflow, browser and end-to-end tests through the `comfy_server` fixture in
tests/conftest.py; usable by hand too:

    python3 tests/support/comfy_server.py   # starts one, prints its URL, stops on Ctrl-C
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
PACK_DIR_NAME = "ComfyUI-OnlineQuant"
# Model folders created empty under <base>/models (ComfyUI's own names).
MODEL_FOLDERS = ("diffusion_models", "text_encoders", "vae", "loras", "checkpoints", "clip_vision")


def free_port() -> int:
    """A TCP port that was free a moment ago on 127.0.0.1."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_base_dir(base: Path) -> Path:
    """Lay out an isolated ComfyUI base directory with this pack linked in as a custom node."""
    base = Path(base)
    for sub in ("custom_nodes", "input", "output", "temp", "user"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    for sub in MODEL_FOLDERS:
        (base / "models" / sub).mkdir(parents=True, exist_ok=True)
    link = base / "custom_nodes" / PACK_DIR_NAME
    if not link.exists():
        link.symlink_to(REPO_ROOT, target_is_directory=True)
    return base


@dataclass
class ComfyServer:
    """A running ComfyUI process; `stop()` ends it by PID."""

    proc: subprocess.Popen
    port: int
    base_dir: Path
    log_path: Path
    startup_s: float = 0.0
    _log_file: object = field(default=None, repr=False)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def models_dir(self) -> Path:
        return self.base_dir / "models"

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, n: int = 60) -> str:
        return "\n".join(self.log_text().splitlines()[-n:])

    def request(self, path: str, data: dict | None = None, timeout: float = 30.0) -> tuple[int, bytes]:
        """GET (or POST JSON when `data` is given); returns (status, body) for any HTTP status."""
        body = None if data is None else json.dumps(data).encode()
        req = urllib.request.Request(self.base_url + path, data=body)
        if body is not None:
            req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def get_json(self, path: str, timeout: float = 30.0):
        status, body = self.request(path, timeout=timeout)
        if status != 200:
            raise RuntimeError(f"GET {path} -> {status}: {body[:500]!r}")
        return json.loads(body)

    def post_json(self, path: str, data: dict, timeout: float = 30.0):
        status, body = self.request(path, data=data, timeout=timeout)
        return status, (json.loads(body) if body else None)

    def wait_for(self, prompt_id: str, timeout_s: float = 120.0) -> dict:
        """The /history entry of a queued prompt once it completed, succeeded or failed (its
        status_str says which); AssertionError with the log's tail if the server died or the
        prompt did not finish in `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            hist = self.get_json(f"/history/{prompt_id}")
            if prompt_id in hist and hist[prompt_id].get("status", {}).get("completed") is not None:
                return hist[prompt_id]
            assert self.alive(), self.log_tail()
            time.sleep(0.2)
        raise AssertionError(f"prompt {prompt_id} did not finish in {timeout_s}s\n{self.log_tail()}")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, grace_s: float = 10.0) -> None:
        """Terminate the server by PID; kill it if it has not exited after `grace_s`."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=grace_s)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None


def start_comfy_server(
    comfy_path: Path,
    base_dir: Path,
    *,
    port: int | None = None,
    front_end_root: Path | None = None,
    extra_args: tuple[str, ...] = (),
    timeout_s: float = 150.0,
    python: str = sys.executable,
) -> ComfyServer:
    """Start ComfyUI from `comfy_path` on `base_dir` (see `make_base_dir`) and wait for /object_info.

    Raises RuntimeError with the log's tail if the process exits or does not answer in `timeout_s`.
    """
    comfy_path = Path(comfy_path)
    base_dir = make_base_dir(Path(base_dir))
    port = port or free_port()
    log_path = base_dir / "comfyui.log"
    args = [
        python,
        "main.py",
        "--cpu",
        "--listen",
        "127.0.0.1",
        "--port",
        str(port),
        "--base-directory",
        str(base_dir),
        # The default database lives inside the ComfyUI checkout: keep it in the base dir.
        "--database-url",
        f"sqlite:///{base_dir / 'user' / 'comfyui.db'}",
        "--disable-auto-launch",
        *extra_args,
    ]
    if front_end_root is not None:
        args += ["--front-end-root", str(front_end_root)]
    env = dict(os.environ)
    env["PYTHONDONTWRITEBYTECODE"] = "1"  # no __pycache__ written into the checkout
    env.setdefault("TRITON_INTERPRET", "1")
    env["HF_HUB_OFFLINE"] = "1"
    log_file = open(log_path, "wb")  # noqa: SIM115 - closed by ComfyServer.stop
    t0 = time.monotonic()
    proc = subprocess.Popen(
        args, cwd=comfy_path, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env
    )
    server = ComfyServer(proc=proc, port=port, base_dir=base_dir, log_path=log_path, _log_file=log_file)
    deadline = t0 + timeout_s
    while True:
        if proc.poll() is not None:
            server.stop()
            raise RuntimeError(f"ComfyUI exited with {proc.returncode} while starting:\n{server.log_tail()}")
        try:
            status, _ = server.request("/object_info", timeout=10)
            if status == 200:
                break
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            pass
        if time.monotonic() > deadline:
            server.stop()
            raise RuntimeError(
                f"ComfyUI did not answer /object_info in {timeout_s:.0f}s:\n{server.log_tail()}"
            )
        time.sleep(0.5)
    server.startup_s = time.monotonic() - t0
    return server


if __name__ == "__main__":  # manual use: start one and keep it until Ctrl-C
    import tempfile

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from conftest import find_comfyui

    path, how = find_comfyui()
    if path is None:
        sys.exit(how)
    tmp = Path(tempfile.mkdtemp(prefix="oq-comfy-"))
    srv = start_comfy_server(path, tmp)
    print(f"ComfyUI at {srv.base_url} (pid {srv.pid}, base {tmp}, log {srv.log_path}); Ctrl-C stops it")
    try:
        while srv.alive():
            time.sleep(1)
    except KeyboardInterrupt:
        pass
    finally:
        srv.stop()
