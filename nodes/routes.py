"""Server route for the web preview: `GET /onlinequant/plan` (also `/api/onlinequant/plan`).

GET only: the preview reads and changes nothing but a small in-memory cache. Ignore texts
too long for a URL are not previewed (the web extension says so; the loader reads them whole).

It answers "what would the loader do with this file?" from the safetensors header alone: the
same `build_plan` the loader calls (one source of truth), never the weights. The model must be
one of ComfyUI's `diffusion_models` file names, exactly as `/object_info` lists them; nothing
else (paths, `..`, absolute names) reaches the filesystem.

Query: model=<diffusion_models name>, format=<the loader's `quantization` choice>,
ignore=<ignored-layers text, read as the loader reads it (quant/selection/checkpoint_plan.py)>,
min_out=<int, default 256>, offset=<int, default 0> and limit=<int, default and at most
MAX_LAYERS>: the slice of the per-layer list (`decisions`) to answer. The body is
`QuantPlan.to_dict()` plus model, family, default_ignore, counts.kept_by_source, header, errors and
`layers` = {total, offset, returned, truncated}: counts and bytes always cover every layer, the
list only the slice (truncated: true when layers were left out).
Every failure is a JSON body `{"error": ...}` with a 4xx status, never a 500: a preview must
not be able to take the server down or hang its event loop (headers are parsed in a worker
thread, at most `MAX_CONCURRENT` at a time, and cached by (path, mtime, size); the JSON text is
made in that thread too, so a big answer never stalls the loop; regexes run with a time budget
and release the GIL, see quant/selection/patterns.py).
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import os
import threading
from dataclasses import dataclass
from typing import Any

from aiohttp import web

log = logging.getLogger(__name__)

ROUTE = "/onlinequant/plan"
MAX_HEADER_BYTES = 2 * 1024 * 1024  # a 30 GB Wan 14B header is ~150 KB; 2 MiB is ~25,000 tensors
MAX_IGNORE_CHARS = 64 * 1024
MAX_CONCURRENT = 2  # header parses running at once
MAX_WAITING = 64  # requests queued behind them before 429 (32 concurrent previews must all answer)
CACHE_ENTRIES = 16
DEFAULT_MIN_OUT = 256
MAX_MIN_OUT = 1 << 20
MAX_LAYERS = 5000  # layers listed in one answer; the panel shows a few thousand at most


class RouteError(Exception):
    """An error answered as JSON with `status`."""

    def __init__(self, status: int, message: str, **extra: Any):
        super().__init__(message)
        self.status = status
        self.extra = extra


@dataclass(frozen=True)
class HeaderInfo:
    """What the preview needs from one file's header (cached)."""

    shapes: dict  # {tensor name: shape}
    kind: Any  # quant.checkpoint.CheckpointKind: already quantized or not
    dtype_bytes: int
    tensors: int
    file_size: int
    packed: Any = None  # quant.checkpoint.PackedFileInfo of a "Save Quantized Model" file, else None


_DTYPE_BYTES = {"F64": 8, "F32": 4, "BF16": 2, "F16": 2, "F8_E4M3": 1, "F8_E5M2": 1}
_cache: collections.OrderedDict[tuple, HeaderInfo] = collections.OrderedDict()
_cache_lock = threading.Lock()
_limits: dict[int, tuple[asyncio.Semaphore, list[int]]] = {}  # per event loop: (semaphore, [waiting])


def _model_path(name: str) -> str:
    """Resolve a `diffusion_models` name ComfyUI lists; anything else is a 4xx."""
    import folder_paths

    if not name:
        raise RouteError(400, "missing query parameter 'model' (a diffusion_models file name)")
    # Exact membership in ComfyUI's own list is the whole check: a name that is not listed
    # (a path, '..', an absolute name) never reaches the filesystem. Symlinked files that
    # ComfyUI lists are the user's choice and are fine.
    if name not in folder_paths.get_filename_list("diffusion_models"):
        raise RouteError(404, f"model {name!r} is not a file in ComfyUI's diffusion_models folders")
    path = folder_paths.get_full_path("diffusion_models", name)
    if path is None or not os.path.isfile(path):
        raise RouteError(404, f"model {name!r} is listed but its file is gone")
    if not path.endswith((".safetensors", ".sft")):
        raise RouteError(415, f"model {name!r} is not a .safetensors file; the preview reads only those")
    return path


def _read_header_info(path: str, name: str) -> HeaderInfo:
    """Parse the header (worker thread), capped at MAX_HEADER_BYTES; cached by (path, mtime, size)."""
    from ..quant.checkpoint import classify_checkpoint, read_header, read_packed_info
    from ..quant.errors import CheckpointError, HeaderTooLargeError

    st = os.stat(path)
    key = (os.path.realpath(path), st.st_mtime_ns, st.st_size)
    with _cache_lock:
        hit = _cache.get(key)
        if hit is not None:
            _cache.move_to_end(key)
            return hit
    try:
        header = read_header(path, max_header_bytes=MAX_HEADER_BYTES)
        packed = read_packed_info(header)  # the plan a saved quantized file carries
    except HeaderTooLargeError as e:
        raise RouteError(413, f"{name}: {e.reason}") from None
    except CheckpointError as e:
        # e.reason is the message without the server-side path (never echo paths to the page)
        raise RouteError(422, f"{name}: {e.reason}") from None
    weight_dtypes = collections.Counter(
        e.dtype for k, e in header.tensors.items() if k.endswith(".weight") and len(e.shape) == 2
    )
    dtype = weight_dtypes.most_common(1)[0][0] if weight_dtypes else "BF16"
    info = HeaderInfo(
        header.shapes(),
        classify_checkpoint(header),
        _DTYPE_BYTES.get(dtype, 2),
        len(header.tensors),
        header.file_size,
        packed,
    )
    with _cache_lock:
        _cache[key] = info
        while len(_cache) > CACHE_ENTRIES:
            _cache.popitem(last=False)
    return info


def _plan_json(
    info: HeaderInfo, name: str, fmt: str, ignore: str | None, min_out: int, offset: int = 0,
    limit: int = MAX_LAYERS,
) -> dict:
    """The plan as the loader would build it: the same `plan_checkpoint`, the same refusals."""
    from ..quant.errors import CheckpointError, PatternError
    from ..quant.models import default_ignore_text, detect_family
    from ..quant.selection.checkpoint_plan import plan_checkpoint
    from ..quant.selection.layers import linears_from_shapes

    family = detect_family(list(info.shapes), info.shapes)
    names = [li.name for li in linears_from_shapes(info.shapes)]
    extra = {
        "model": name,
        "family": family,
        "default_ignore": default_ignore_text(family, names),  # the panel offers them, errors included
        "header": {
            "tensors": info.tensors,
            "file_size": info.file_size,
            "weight_dtype_bytes": info.dtype_bytes,
        },
        "errors": [],
    }
    try:
        cp = plan_checkpoint(
            info.shapes, fmt, ignore, min_out_features=min_out, kind=info.kind, file=name, packed=info.packed
        )
    except CheckpointError as e:
        raise RouteError(422, f"{name}: {e.reason}", kind="checkpoint", format=fmt, **extra) from None
    except PatternError as e:
        raise RouteError(400, str(e), kind="pattern", format=fmt, **extra) from None
    except (ValueError, KeyError) as e:  # unknown format and other bad parameters
        raise RouteError(400, str(e).strip("'\""), kind="bad_request", format=fmt, **extra) from None
    body = cp.plan.to_dict(info.dtype_bytes)
    body.update(extra)
    body["format"] = fmt
    body["uses_defaults"] = cp.uses_defaults
    body["notes"] = cp.notes
    body["warnings"] = cp.warnings
    by_source = collections.Counter(d.source for d in cp.plan.kept())
    body["counts"]["kept_by_source"] = dict(sorted(by_source.items()))
    total = len(body["decisions"])
    body["decisions"] = body["decisions"][offset : offset + limit]
    body["layers"] = {
        "total": total,
        "offset": offset,
        "returned": len(body["decisions"]),
        "truncated": len(body["decisions"]) < total,
    }
    return body


def _int_param(q, key: str, default: int, hi: int) -> int:
    raw = q.get(key, str(default))
    try:
        v = int(raw)
    except ValueError:
        raise RouteError(400, f"{key} must be an integer, got {raw[:40]!r}") from None
    if not 0 <= v <= hi:
        raise RouteError(400, f"{key} must be between 0 and {hi}, got {v}")
    return v


def _parse_query(q) -> tuple[str, str, str | None, int]:
    name = q.get("model", "")
    fmt = q.get("format", "fp8_e4m3fn")
    ignore = q.get("ignore")  # absent -> family defaults; "" -> ignore nothing
    if ignore is not None and len(ignore) > MAX_IGNORE_CHARS:
        raise RouteError(413, f"ignore text is {len(ignore)} characters; at most {MAX_IGNORE_CHARS}")
    raw_min = q.get("min_out", str(DEFAULT_MIN_OUT))
    try:
        min_out = int(raw_min)
    except ValueError:
        raise RouteError(400, f"min_out must be an integer, got {raw_min[:40]!r}") from None
    if not 0 <= min_out <= MAX_MIN_OUT:
        raise RouteError(400, f"min_out must be between 0 and {MAX_MIN_OUT}, got {min_out}")
    return name, fmt, ignore, min_out


def _compute(
    path: str, name: str, fmt: str, ignore: str | None, min_out: int, offset: int, limit: int
) -> bytes:
    """The answer's JSON text (worker thread: a 20 MB text took the loop 0.5-1.3 s to make)."""
    info = _read_header_info(path, name)
    return json.dumps(_plan_json(info, name, fmt, ignore, min_out, offset, limit)).encode()


async def plan_handler(request: web.Request) -> web.Response:
    """`GET /onlinequant/plan`: the plan preview as JSON, or `{"error": ...}` with a 4xx."""
    try:
        name, fmt, ignore, min_out = _parse_query(request.query)
        offset = _int_param(request.query, "offset", 0, 1 << 30)
        limit = _int_param(request.query, "limit", MAX_LAYERS, MAX_LAYERS)
        path = _model_path(name)
        loop = asyncio.get_running_loop()
        sem, waiting = _limits.setdefault(id(loop), (asyncio.Semaphore(MAX_CONCURRENT), [0]))
        if waiting[0] >= MAX_WAITING:
            raise RouteError(429, "too many plan previews in flight; retry in a moment")
        waiting[0] += 1
        try:
            async with sem:
                text = await asyncio.to_thread(_compute, path, name, fmt, ignore, min_out, offset, limit)
        finally:
            waiting[0] -= 1
        return web.Response(body=text, content_type="application/json")
    except RouteError as e:
        return web.json_response({**e.extra, "error": str(e), "errors": [str(e)]}, status=e.status)
    except Exception as e:  # a preview must never answer 500: log it, say what failed
        log.exception("onlinequant plan preview failed for %r", request.query.get("model"))
        msg = f"could not preview this model: {type(e).__name__}: {e}"
        return web.json_response({"error": msg, "errors": [msg], "kind": "internal"}, status=422)


def register_routes(routes: web.RouteTableDef) -> bool:
    """Add the route to `routes` once (re-imports of the pack must not register it twice)."""
    for r in routes:
        if getattr(r, "path", None) == ROUTE:
            return False
    routes.get(ROUTE)(plan_handler)
    return True


def setup() -> bool:
    """Register on ComfyUI's PromptServer when one exists (not in plain-Python tests)."""
    try:
        from server import PromptServer
    except ImportError:
        return False
    instance = getattr(PromptServer, "instance", None)
    if instance is None:
        return False
    return register_routes(instance.routes)
