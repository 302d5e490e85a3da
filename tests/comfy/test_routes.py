"""GET /onlinequant/plan: the web preview's route (nodes/routes.py).

In-process through aiohttp's test server, with ComfyUI's real `folder_paths` pointed at a temp
diffusion_models folder holding sparse full-size safetensors files (header only, no weights);
one test also goes through a real ComfyUI server to check the route is registered there.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import os
import struct

import pytest
from helpers_sparse import write_sparse_safetensors

from quant.models import reference_shapes
from quant.selection.layers import reference_linears

pytestmark = pytest.mark.comfyui


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A diffusion_models folder: full-size Z-Image, Wan 2.2 5B and Wan 14B headers (sparse)."""
    d = tmp_path_factory.mktemp("diffusion_models")
    write_sparse_safetensors(d / "z_image_turbo_bf16.safetensors", reference_shapes("zimage"))
    write_sparse_safetensors(d / "wan2.2_ti2v_5B_fp16.safetensors", reference_shapes("wan22_5b"), "F16")
    write_sparse_safetensors(
        d / "wan2.2_t2v_high_noise_14B_fp16.safetensors", reference_shapes("wan21_t2v_14b")
    )
    sub = d / "sub"
    sub.mkdir()
    write_sparse_safetensors(sub / "tiny.safetensors", {"blocks.0.ffn.0.weight": (512, 256)})
    (d / "garbage.safetensors").write_bytes(os.urandom(4096))
    (d / "empty.safetensors").write_bytes(b"")
    (d / "model.ckpt").write_bytes(b"not a safetensors file")
    # header length 9 MiB (above the preview's cap), padded with whitespace
    write_sparse_safetensors(d / "huge_header.safetensors", {"a.weight": (4, 4)}, pad_header_to=9 * 2**20)
    outside = tmp_path_factory.mktemp("elsewhere")
    write_sparse_safetensors(outside / "linked.safetensors", reference_shapes("wan22_5b"))
    (d / "linked.safetensors").symlink_to(outside / "linked.safetensors")
    return d


@pytest.fixture
def routes(pack, models, monkeypatch):
    import folder_paths

    monkeypatch.setitem(
        folder_paths.folder_names_and_paths,
        "diffusion_models",
        ([str(models)], folder_paths.supported_pt_extensions),
    )
    folder_paths.filename_list_cache.clear()
    yield importlib.import_module(f"{pack.__name__}.nodes.routes")
    folder_paths.filename_list_cache.clear()


def fetch(routes, queries: list, post: bool = False) -> list[tuple[int, dict]]:
    """Run the route in a real aiohttp server and GET it once per query, concurrently."""
    from aiohttp import web
    from aiohttp.test_utils import TestClient, TestServer

    async def go():
        table = web.RouteTableDef()
        assert routes.register_routes(table)
        assert not routes.register_routes(table)  # a second registration is a no-op
        app = web.Application()
        app.add_routes(table)
        async with TestClient(TestServer(app)) as client:

            async def one(q):
                if post:  # the route is GET only: aiohttp answers other methods itself
                    r = await client.post(routes.ROUTE, json=q)
                    return r.status, (await r.json() if r.content_type == "application/json" else None)
                r = await client.get(routes.ROUTE, params=q)
                assert r.content_type == "application/json"
                return r.status, await r.json()

            return await asyncio.gather(*(one(q) for q in queries))

    return asyncio.run(go())


def get(routes, **q) -> tuple[int, dict]:
    return fetch(routes, [q])[0]


def test_get_only_with_long_ignore_texts(routes):
    # GET only, no side effects. A long ignore text (up to what a URL holds) still previews.
    long_text = "\n".join(f"layers.{i}.attention.out" for i in range(30)) + "\n" + "# " + "x" * 5000
    q = {"model": "z_image_turbo_bf16.safetensors", "format": "fp8_e4m3fn", "ignore": long_text}
    status, body = fetch(routes, [q])[0]
    assert status == 200, body
    assert body["counts"]["kept_by_source"]["pattern"] == 30
    status, body = fetch(routes, [q], post=True)[0]
    assert status == 405 and body is None


def test_zimage_defaults_match_build_plan(routes, pack):
    status, body = get(routes, model="z_image_turbo_bf16.safetensors", format="fp8_e4m3fn")
    assert status == 200, body
    assert body["family"] == "zimage"
    layers = reference_linears("zimage")
    # one source of truth: the same numbers as the selection module with the family defaults
    selection = importlib.import_module(f"{pack.__name__}.quant.selection.plan")
    plan = selection.build_plan(layers, "fp8_e4m3fn", None, "zimage", 256)
    assert body["counts"]["layers"] == len(layers)
    assert body["counts"]["quantized"] == len(plan.quantized())
    assert body["counts"]["kept"] == len(plan.kept()) > 0
    assert sum(body["counts"]["kept_by_source"].values()) == body["counts"]["kept"]
    assert body["counts"]["kept_by_source"].get("default", 0) > 0
    assert body["bytes_before"] == plan.bytes_before(2)
    assert body["bytes_after"] == plan.bytes_after(2) < body["bytes_before"]
    assert "x_embedder" in body["default_ignore"]
    assert body["uses_defaults"] is True
    assert len(body["decisions"]) == len(layers)
    assert {d["name"] for d in body["decisions"]} == {li.name for li in layers}


def test_empty_ignore_quantizes_everything_eligible(routes):
    status, body = get(routes, model="z_image_turbo_bf16.safetensors", format="mxfp4", ignore="")
    assert status == 200, body
    small = [li for li in reference_linears("zimage") if li.out_features < 256]
    assert body["counts"]["kept_by_source"] == {"size": len(small)}
    assert body["uses_defaults"] is False


def test_pattern_counts_and_min_out(routes):
    layers = reference_linears("zimage")
    in_layer_1 = [li for li in layers if li.name.startswith("layers.1.")]
    status, body = get(routes, model="z_image_turbo_bf16.safetensors", format="fp8_e4m3fn", ignore="layers.1")
    assert status == 200, body
    assert body["counts"]["kept_by_source"]["pattern"] == len(in_layer_1)
    kept = {d["name"] for d in body["decisions"] if not d["quantize"] and d["source"] == "pattern"}
    assert kept == {li.name for li in in_layer_1}
    # min_out above every out_features: nothing is quantized
    status, body = get(
        routes, model="z_image_turbo_bf16.safetensors", format="fp8_e4m3fn", ignore="", min_out=str(10**6)
    )
    assert status == 200 and body["counts"]["quantized"] == 0


def test_pattern_that_matches_nothing_is_a_warning(routes):
    status, body = get(
        routes, model="z_image_turbo_bf16.safetensors", format="fp8_e4m3fn", ignore="no_such_layer"
    )
    assert status == 200, body
    assert any("no_such_layer" in w for w in body["warnings"])


def test_wan_families_and_dtype(routes):
    status, body = get(routes, model="wan2.2_ti2v_5B_fp16.safetensors", format="fp8_e4m3fn")
    assert status == 200, body
    assert body["family"] == "wan22_5b"
    assert body["header"]["weight_dtype_bytes"] == 2
    status, body = get(routes, model="wan2.2_t2v_high_noise_14B_fp16.safetensors", format="mxfp4")
    assert status == 200, body
    assert body["family"] == "wan21"
    assert body["header"]["file_size"] > 28 * 10**9  # a full-size 14B file (sparse on disk)
    assert body["counts"]["layers"] == len(reference_linears("wan21_t2v_14b"))


def test_format_none_keeps_everything(routes):
    status, body = get(routes, model="wan2.2_ti2v_5B_fp16.safetensors", format="none")
    assert status == 200, body
    assert body["counts"]["quantized"] == 0 and body["bytes_after"] == body["bytes_before"]


def test_symlinked_and_subfolder_files_that_comfyui_lists(routes):
    assert get(routes, model="linked.safetensors", format="fp8_e4m3fn")[0] == 200
    status, body = get(routes, model=f"sub{os.sep}tiny.safetensors", format="fp8_e4m3fn", ignore="")
    assert status == 200, body
    assert body["counts"] == {**body["counts"], "layers": 1, "quantized": 1}


@pytest.mark.parametrize(
    "query,status,words",
    [
        ({}, 400, "model"),
        ({"model": "nope.safetensors"}, 404, "nope.safetensors"),
        ({"model": "../z_image_turbo_bf16.safetensors"}, 404, "not a file"),
        ({"model": "/etc/passwd"}, 404, "not a file"),
        ({"model": "sub/../z_image_turbo_bf16.safetensors"}, 404, "not a file"),
        ({"model": "model.ckpt"}, 415, "safetensors"),
        ({"model": "garbage.safetensors"}, 422, "garbage.safetensors"),
        ({"model": "empty.safetensors"}, 422, "empty.safetensors"),
        ({"model": "huge_header.safetensors"}, 413, "huge_header.safetensors"),
        ({"model": "z_image_turbo_bf16.safetensors", "min_out": "abc"}, 400, "min_out"),
        ({"model": "z_image_turbo_bf16.safetensors", "min_out": "-1"}, 400, "min_out"),
        ({"model": "z_image_turbo_bf16.safetensors", "format": "int3"}, 400, "int3"),
    ],
)
def test_bad_requests_are_json_4xx(routes, query, status, words):
    got, body = get(routes, **query)
    assert got == status, body
    assert words in body["error"]
    assert body["errors"] == [body["error"]]


def test_bad_regex_is_400_with_the_pattern_and_the_family(routes):
    status, body = get(
        routes, model="z_image_turbo_bf16.safetensors", format="fp8_e4m3fn", ignore="re:(unclosed"
    )
    assert status == 400
    assert body["kind"] == "pattern"
    assert "(unclosed" in body["error"]
    assert body["family"] == "zimage" and "x_embedder" in body["default_ignore"]  # UI offers defaults


def test_partial_fused_ignore_is_an_error(routes):
    status, body = get(
        routes, model="z_image_turbo_bf16.safetensors", format="fp8_e4m3fn", ignore="layers.0.attention.q"
    )
    assert status == 400, body
    assert "qkv" in body["error"]


def test_cache_follows_file_changes(routes, models):
    p = models / "changing.safetensors"
    write_sparse_safetensors(p, {"blocks.0.ffn.0.weight": (512, 256)})
    first = get(routes, model="changing.safetensors", format="fp8_e4m3fn", ignore="")[1]
    write_sparse_safetensors(p, {"blocks.0.ffn.0.weight": (512, 256), "blocks.0.ffn.2.weight": (256, 512)})
    st = p.stat()
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # a distinct mtime even on coarse clocks
    second = get(routes, model="changing.safetensors", format="fp8_e4m3fn", ignore="")[1]
    assert first["counts"]["layers"] == 1 and second["counts"]["layers"] == 2


def test_concurrent_requests_never_500(routes):
    queries = [
        {
            "model": "wan2.2_t2v_high_noise_14B_fp16.safetensors",
            "format": "fp8_e4m3fn",
            "ignore": f"blocks.{i}",
        }
        for i in range(24)
    ]
    queries += [{"model": "garbage.safetensors"}] * 4
    results = fetch(routes, queries)
    assert all(s in (200, 422, 429) for s, _ in results), [s for s, _ in results]
    assert sum(s == 200 for s, _ in results) >= 2
    per_block = sum(li.name.startswith("blocks.0.") for li in reference_linears("wan21_t2v_14b"))
    ok = [b for s, b in results if s == 200]
    assert all(b["counts"]["kept_by_source"]["pattern"] == per_block for b in ok)


def test_header_length_beyond_the_format_limit_is_refused_unread(routes, models):
    # a header length field of 1 TiB: a corrupt file (422), refused before any allocation
    p = models / "lying.safetensors"
    p.write_bytes(struct.pack("<Q", 2**40) + b"{}")
    status, body = get(routes, model="lying.safetensors")
    assert status == 422 and "header" in body["error"], body


def test_real_server_serves_the_route(comfy_server):
    d = comfy_server.models_dir / "diffusion_models"
    write_sparse_safetensors(d / "route_check.safetensors", reference_shapes("wan22_5b"))
    status, raw = comfy_server.request(
        "/api/onlinequant/plan?model=route_check.safetensors&format=fp8_e4m3fn"
    )
    body = json.loads(raw)
    assert status == 200, body
    assert body["family"] == "wan22_5b"
    status, raw = comfy_server.request("/api/onlinequant/plan?model=..%2Froute_check.safetensors")
    assert status == 404 and "error" in json.loads(raw)


# ---- hostile patterns and big answers --------------------------------------------------------


@pytest.mark.parametrize(
    "ignore", ["re:x{4294967296}", "re:(((a{1000}){1000}){1000}){1000}", "re:" + "a" * 2000]
)
def test_regexes_over_the_limits_are_pattern_errors(routes, ignore):
    status, body = get(routes, model="sub/tiny.safetensors", ignore=ignore)
    assert status == 400 and body["kind"] == "pattern" and "(line 1)" in body["error"], body


def test_backtracking_regex_is_a_pattern_error_not_a_hang(routes, models, monkeypatch):
    from quant.selection import regex_engine as patterns

    monkeypatch.setattr(patterns, "MATCH_BUDGET_S", 0.5)
    name = "a" * 60
    write_sparse_safetensors(
        models / "aaa.safetensors", {f"{name}.{i}.weight": (512, 256) for i in range(20)}
    )
    status, body = get(routes, model="aaa.safetensors", ignore="attention\nre:^(a|aa)+$")
    assert status == 400 and body["kind"] == "pattern", body
    assert "(line 2)" in body["error"] and "took more than" in body["error"], body


def _many_linears(n: int) -> dict:
    return {f"blocks.{i // 8}.ffn.{i % 8}.weight": (512, 256) for i in range(n)}


def test_big_answers_are_paginated_and_say_so(routes, models):
    write_sparse_safetensors(models / "many.safetensors", _many_linears(12_000))
    status, body = get(routes, model="many.safetensors", ignore="")
    assert status == 200, body
    assert body["counts"]["layers"] == 12_000
    assert len(body["decisions"]) == routes.MAX_LAYERS
    assert body["layers"] == {"total": 12_000, "offset": 0, "returned": routes.MAX_LAYERS, "truncated": True}
    status, page = get(routes, model="many.safetensors", ignore="", offset="11000", limit="2000")
    assert status == 200 and page["layers"]["returned"] == 1000 and page["layers"]["offset"] == 11000
    assert page["decisions"][0]["name"] == "blocks.1375.ffn.0"
    status, small = get(routes, model="sub/tiny.safetensors")
    assert status == 200 and small["layers"]["truncated"] is False
    assert get(routes, model="many.safetensors", limit="999999")[0] == 400


def test_preview_header_cap_is_near_real_headers(routes, models):
    """A real Wan 14B header is ~150 KB; a 3 MiB one is refused (413) before it is parsed."""
    write_sparse_safetensors(models / "pad3.safetensors", {"a.weight": (4, 4)}, pad_header_to=3 * 2**20)
    status, body = get(routes, model="pad3.safetensors")
    assert status == 413 and "cap" in body["error"], body
