"""Differential fuzzing of the safetensors header reader (and the ignore-pattern parser).

    python -m quant.fuzz --iterations 100000 [--seed 0] [--patterns 20000]

Inputs are built from a seeded `random.Random` (the same seed gives the same inputs): valid
files with random tensors/dtypes/shapes/metadata/whitespace, then mutated at the byte level
(flips, truncation, extension, forged length fields, random bytes) and at the JSON level
(negative/float/boolean/huge dimensions, wrong offsets, unknown dtypes, missing fields,
duplicate keys, deep nesting, lone surrogates, NaN literals...). Each input goes to
`read_header_bytes` and to the safetensors library (`safetensors.deserialize`), and the run
counts a *finding* when:
- our reader raises anything but `CheckpointError` (a crash);
- the verdicts differ (one accepts, the other rejects), except the documented difference:
  duplicate keys, which we reject and the library accepts (last one wins);
- both accept but the tensor names, dtypes or shapes differ.
The pattern parser gets random pattern text: `parse_patterns` may only raise `PatternError`, and
a `PatternSet` built from what parsed must match random names without raising.

Exit status 1 when there are findings (each printed with a reproducer), else 0.
"""

from __future__ import annotations

import argparse
import json
import random
import struct
import sys
import time
from collections import Counter
from dataclasses import dataclass, field

from .checkpoint import DTYPE_BITS, read_header_bytes
from .errors import CheckpointError, PatternError

_NAME_PARTS = ["blocks", "0", "1", "17", "self_attn", "q", "k", "ffn", "weight", "bias", "norm",
               "layers", "attention", "qkv", "w1", "__metadata__", "", "é", "\u0000", "名", "a b", "💥"]


@dataclass
class FuzzStats:
    inputs: int = 0
    accepted: int = 0
    rejected: int = 0
    expected_differences: int = 0  # duplicate keys: we reject, the library accepts
    findings: list[str] = field(default_factory=list)
    kinds: Counter = field(default_factory=Counter)


# --- generation -------------------------------------------------------------------------------


def _name(rng: random.Random) -> str:
    return ".".join(rng.choice(_NAME_PARTS) for _ in range(rng.randint(1, 5)))


def random_valid(rng: random.Random) -> bytes:
    """A valid safetensors file (header + data) with a few small random tensors."""
    header: dict = {}
    if rng.random() < 0.4:
        header["__metadata__"] = {_name(rng): _name(rng) for _ in range(rng.randint(0, 3))}
    pos = 0
    chunks = []
    # dict.fromkeys, not a set: set order depends on PYTHONHASHSEED, and runs must repeat exactly
    names = [n for n in dict.fromkeys(_name(rng) for _ in range(rng.randint(0, 6))) if n != "__metadata__"]
    for name in names:
        dtype = rng.choice(list(DTYPE_BITS))
        bits = DTYPE_BITS[dtype]
        shape = [rng.choice([0, 1, 1, 2, 3, 4, 8]) for _ in range(rng.randint(0, 3))]
        numel = 1
        for d in shape:
            numel *= d
        if numel * bits % 8:
            shape = shape + [2] if bits == 4 else shape + [4]
            numel *= shape[-1]
        nbytes = numel * bits // 8
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [pos, pos + nbytes]}
        chunks.append(bytes(rng.getrandbits(8) for _ in range(nbytes)))
        pos += nbytes
    items = list(header.items())
    rng.shuffle(items)
    text = json.dumps(dict(items), ensure_ascii=rng.random() < 0.5,
                      separators=(",", ":") if rng.random() < 0.5 else (", ", ": "))
    if rng.random() < 0.3:
        text = rng.choice([" ", "\n", "\t", "\r\n"]) * rng.randint(1, 3) + text
    if rng.random() < 0.5:
        text += " " * rng.randint(0, 7)
    raw = text.encode()
    return struct.pack("<Q", len(raw)) + raw + b"".join(chunks)


_BAD_VALUES = [-1, -0.0, 2.5, True, False, None, "2", [], {}, 2**64, 2**64 - 1, 2**63, 10**30, 1e400,
               10**400, "\ud800", ["\udc00"], {"\ud83d\udca5": "ok"}]


def _json_mutation(rng: random.Random, data: bytes) -> bytes:
    try:
        return _json_mutation_inner(rng, data)
    except (TypeError, KeyError, IndexError, AttributeError, ValueError, RecursionError):
        return data  # an earlier mutation left something this one cannot edit: keep the input


def _json_mutation_inner(rng: random.Random, data: bytes) -> bytes:
    if len(data) < 8:
        return data
    n = struct.unpack("<Q", data[:8])[0]
    try:
        obj = json.loads(data[8 : 8 + n])
    except (ValueError, RecursionError):
        return data
    body = data[8 + n :]
    keys = [k for k in obj if k != "__metadata__"]
    op = rng.randrange(12)
    if keys:
        k = rng.choice(keys)
        info = obj[k]
    if op == 0 and keys and info["shape"]:
        info["shape"][rng.randrange(len(info["shape"]))] = rng.choice(_BAD_VALUES)
    elif op == 1 and keys:
        info["data_offsets"][rng.randrange(2)] += rng.choice([-1, 1, 7, -(2**20)])
    elif op == 2 and keys:
        info["dtype"] = rng.choice(["F8_E4M3FN", "bf16", "", "C128", 3, None, rng.choice(list(DTYPE_BITS))])
    elif op == 3 and keys:
        del info[rng.choice(["dtype", "shape", "data_offsets"])]
    elif op == 4:
        obj["__metadata__"] = rng.choice([{"a": 1}, {"a": None}, ["x"], "x", None, {"a": {"b": "c"}}, {}])
    elif op == 5 and keys:
        info["data_offsets"] = rng.choice([[0], [0, 1, 2], "0,1", None, [0.0, 1]])
    elif op == 6 and keys:
        info["shape"] = rng.choice([None, 3, "3", [[1]], [2**32, 2**32], [2**62, 4], [0, 2**64 - 1]])
    elif op == 7:
        obj = rng.choice([[obj], "x", 1, None])
    elif op == 8 and keys:
        info["extra"] = rng.choice(_BAD_VALUES)
    elif op == 9:  # duplicate key, textually
        text = json.dumps(obj)
        if keys:
            dup = json.dumps(k) + ":" + json.dumps(info)
            text = text[:-1] + ("," if len(obj) else "") + dup + "}"
        raw = text.encode()
        return struct.pack("<Q", len(raw)) + raw + body
    elif op == 10:  # textual nasties
        text = json.dumps(obj)
        nasty = rng.choice(['"\\ud800"', "NaN", "Infinity", "[" * 5000 + "]" * 5000, "1" * 400, "-0", "1e5"])
        text = text.replace("0", nasty, 1) if "0" in text else nasty
        raw = text.encode()
        return struct.pack("<Q", len(raw)) + raw + body
    else:  # reorder offsets among tensors
        if len(keys) >= 2:
            a, b = rng.sample(keys, 2)
            obj[a]["data_offsets"], obj[b]["data_offsets"] = obj[b]["data_offsets"], obj[a]["data_offsets"]
    try:
        raw = json.dumps(obj, allow_nan=True).encode()
    except (TypeError, ValueError):
        return data
    return struct.pack("<Q", len(raw)) + raw + body


def mutate(rng: random.Random, data: bytes) -> bytes:
    op = rng.randrange(8)
    if op <= 2:
        return _json_mutation(rng, data)
    b = bytearray(data)
    if op == 3 and b:  # flip bytes
        for _ in range(rng.randint(1, 4)):
            i = rng.randrange(len(b))
            b[i] = rng.getrandbits(8)
        return bytes(b)
    if op == 4:  # truncate or extend
        if rng.random() < 0.6:
            return bytes(b[: rng.randrange(len(b) + 1)])
        return bytes(b) + b"\0" * rng.randint(1, 9)
    if op == 5:  # forge the length field
        n = rng.choice([0, 1, 7, 100_000_001, 2**64 - 1, len(b), max(0, len(b) - 8), rng.getrandbits(32)])
        return struct.pack("<Q", n) + bytes(b[8:])
    if op == 6:  # splice random bytes into the header
        i = rng.randrange(8, max(9, len(b)))
        return bytes(b[:i]) + bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 8))) + bytes(b[i:])
    return bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 64)))


# --- the oracle -------------------------------------------------------------------------------


def _library_verdict(data: bytes):
    """(accepted, {name: (dtype, shape)}) from the safetensors library."""
    from safetensors import SafetensorError, deserialize

    try:
        out = deserialize(data)
    except SafetensorError:
        return False, None
    return True, {name: (str(v["dtype"]), tuple(v["shape"])) for name, v in out}


def check_header_input(data: bytes, stats: FuzzStats) -> None:
    stats.inputs += 1
    try:
        h = read_header_bytes(data)
        ours, err = True, None
    except CheckpointError as e:
        ours, err, h = False, e, None
    except Exception as e:  # noqa: BLE001 - exactly what a fuzzer looks for
        stats.findings.append(f"crash {type(e).__name__}: {e!s:.200} on input {data[:300]!r}")
        return
    lib, lib_tensors = _library_verdict(data)
    if ours:
        stats.accepted += 1
    else:
        stats.rejected += 1
        stats.kinds[_kind(str(err))] += 1
    if ours != lib:
        if not ours and "appears twice" in str(err):
            stats.expected_differences += 1
            return
        stats.findings.append(
            f"verdict differs: ours={'accept' if ours else 'reject: ' + str(err)[:200]} library="
            f"{'accept' if lib else 'reject'} on input {data[:300]!r}"
        )
        return
    if ours:
        mine = {n: (e.dtype, e.shape) for n, e in h.tensors.items()}
        theirs = {n: (_lib_dtype(d), s) for n, (d, s) in lib_tensors.items()}
        if mine != theirs:
            stats.findings.append(f"content differs: ours={mine!r:.200} library={theirs!r:.200}")


_LIB_DTYPES = {"float8_e4m3fn": "F8_E4M3", "float8_e5m2": "F8_E5M2"}


def _lib_dtype(d: str) -> str:
    return _LIB_DTYPES.get(d, d).upper() if d.upper() not in DTYPE_BITS else d.upper()


def _kind(msg: str) -> str:
    """A coarse bucket of a rejection message, for the run's summary."""
    for key in ("appears twice", "not valid JSON", "not valid UTF-8", "header length", "unknown dtype",
                "shape", "data_offsets", "bytes short", "after the last tensor", "too short", "empty",
                "__metadata__", "overflows", "missing field", "nested", "surrogate", "JSON text",
                "HTML", "pickle", "GGUF", "entry must", "do not fill", "need"):
        if key in msg:
            return key
    return "other"


# --- patterns ---------------------------------------------------------------------------------

_PATTERN_ATOMS = ["blocks", "*", "?", "[0-9]", "[!a]", "[", "]", ".", "..", ",", "#", "re:", "(", ")",
                  "\\", "^", "$", "+", "{2}", "ffn", "0", "diffusion_model.", " ", "\n", "|", "é", "[]"]


def random_pattern_text(rng: random.Random) -> str:
    return "".join(rng.choice(_PATTERN_ATOMS) for _ in range(rng.randint(0, 12)))


def check_pattern_input(text: str, names: list[str], stats: FuzzStats) -> None:
    from .selection.patterns import PatternSet, parse_patterns

    stats.inputs += 1
    try:
        pats = parse_patterns(text)
    except PatternError:
        stats.rejected += 1
        return
    except Exception as e:  # noqa: BLE001
        stats.findings.append(f"pattern crash {type(e).__name__}: {e!s:.200} on {text!r}")
        return
    stats.accepted += 1
    try:
        ps = PatternSet(pats)
        for n in names:
            ps.match(n)
    except Exception as e:  # noqa: BLE001
        stats.findings.append(f"pattern match crash {type(e).__name__}: {e!s:.200} on {text!r}")


# --- driver -----------------------------------------------------------------------------------


def fuzz_headers(iterations: int, seed: int = 0) -> FuzzStats:
    rng = random.Random(seed)
    stats = FuzzStats()
    for i in range(iterations):
        data = random_valid(rng)
        if i % 5:  # 1 in 5 stays valid, the rest get 1-3 mutations
            for _ in range(rng.randint(1, 3)):
                data = mutate(rng, data)
        check_header_input(data, stats)
    return stats


def fuzz_patterns(iterations: int, seed: int = 0) -> FuzzStats:
    rng = random.Random(seed)
    names = [_name(rng).replace("\u0000", "") for _ in range(50)] + [
        "blocks.0.self_attn.q", "layers.3.attention.qkv", "head.head"]
    stats = FuzzStats()
    for _ in range(iterations):
        check_pattern_input(random_pattern_text(rng), names, stats)
    return stats


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m quant.fuzz", description=__doc__.split("\n\n")[0])
    ap.add_argument("--iterations", type=int, default=100_000, help="header inputs (default 100000)")
    ap.add_argument("--patterns", type=int, default=20_000, help="pattern-text inputs (default 20000)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    out = []
    for label, fn, n in (("safetensors header", fuzz_headers, args.iterations),
                         ("ignore patterns", fuzz_patterns, args.patterns)):
        if n <= 0:
            continue
        t0 = time.perf_counter()
        st = fn(n, args.seed)
        dt = time.perf_counter() - t0
        out.append(st)
        print(f"{label}: {st.inputs} inputs in {dt:.1f} s ({st.inputs / dt:.0f}/s), seed {args.seed}: "
              f"{st.accepted} accepted, {st.rejected} rejected, "
              f"{st.expected_differences} duplicate-key rejections (documented), {len(st.findings)} findings")
        if st.kinds:
            print("  rejections by kind: " + ", ".join(f"{k} {v}" for k, v in st.kinds.most_common()))
        for f in st.findings[:20]:
            print("  FINDING: " + f)
    return 1 if any(s.findings for s in out) else 0


if __name__ == "__main__":
    sys.exit(main())
