#!/usr/bin/env python3
"""Structure-aware fuzzing of moelite's input borders (issue 15).

    python tools/fuzz.py --cases 1000 --seed 1 --target all --out fuzz-out

Targets and what a case does with its mutated input:
  gguf         a GGUF (seeds: the demo model and converted test fixtures) mutated in its header, KV types and
               values, tensor infos (type, shape, offset, name), data and length -> moelite.load, logits of
               3 tokens (must be finite), tokenizer, chat template
  hf           a Hugging Face directory (tiny test checkpoints) mutated in config.json, safetensors headers,
               the index, tokenizer files and shard bytes -> moelite convert; a file it writes must load and
               give finite logits
  trace        a routing trace .npz mutated in arrays (dtypes, shapes, values, keys) and bytes -> load_trace,
               srp, sch, static_sch, simulate
  calibration  a MODEL.gguf.calibration.json side file mutated as JSON -> moelite.load of the model
  split        a split GGUF set (the GGUF seeds written as 3-4 shards by gguf-py's writer and by moelite convert)
               with shards dropped, swapped, renamed, duplicated, truncated, split.* keys changed / retyped /
               deleted, a tensor moved or in two shards, a shard of another set, or one shard mutated as in
               `gguf` -> moelite.load from a random shard (resident or at the minimum budget), logits of 3 tokens
  api          one public numeric argument (issue 33) given a hostile value (NaN, +-inf, 0, negatives, 2^31, 2^63,
               huge and tiny floats, numpy scalars, bool, str, None, lists) -> the real call on the fixture model or
               on a trace it recorded: moelite.load options (then 2 greedy tokens), generate options, token ids,
               srp / srp_many / sch / static_sch / simulate / calibrate arguments, or `moelite run`'s flags (as text)

Each case runs in a forked child with RLIMIT_AS (--mem above the parent's address space) and a wall-clock
timeout, and is classified:
  ok        ran to the end          moelite   a moelite.errors exception (the wanted refusal)
  other     any other exception      signal    killed by a signal (SIGSEGV, SIGABRT from GGML_ASSERT, ...)
  hang      past --timeout           memory    MemoryError / allocation failure under the limit
  silent    accepted but corrupt: non-finite logits, or a converted file that moelite refuses; split: a set
            whose mutations changed nothing that matters loaded with logits not bit-identical to the unsplit
            model (or was refused), or a set that must be refused (a missing, foreign, renamed or truncated
            shard, split keys that disagree, a tensor in two shards) loaded; trace: a file that loaded with ids
            (or lookahead ids) other than the ones it stores (an int64 wrapped to int32); api: an accepted value
            that gave a result out of its range (a hit rate outside [0, 1], a token id outside the vocabulary,
            more tokens than max_tokens) or, for an option that must not change greedy decoding (budget, window,
            shares, RAM slots, I/O threads, snapshots, top-k/p, min-p, seed at temperature 0), other tokens than
            the default load's; a CLI run ending in a traceback or an internal error instead of one error line
  skipped   the mutator itself failed to build the case (a harness bug: no input reached moelite)
Reproducers of every class but ok and moelite are kept under OUT/TARGET/CLASS/ with a .txt of the error;
OUT/summary.json holds seed, commit and counts. Seeds come from tests/ (built once, cached there).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import io
import json
import math
import os
import random
import re
import resource
import select
import shutil
import signal
import struct
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # forked children: no BLAS thread pools to inherit
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
CLASSES = ("ok", "moelite", "other", "signal", "hang", "memory", "silent", "skipped")
TARGETS = ("gguf", "hf", "trace", "calibration", "split", "api")
GGUF_FAMILIES = (
    ("qwen3_moe", "f32"),
    ("deepseek_v3", "q8_0"),
    ("gpt_oss", "q8_0"),
    ("mixtral", "q8_0"),
    ("qwen4_exp_text", "f32"),  # hyper-connections, QSA, the PLE table and its u64 hash keys
    ("hy_v4", "q8_0"),  # iHC, DSA with IndexShare
    ("glm5_next_text", "f32"),  # mHC, KPool with IndexShare, NoPE MLA, KDA
)
HF_FAMILIES = ("qwen3_moe", "deepseek_v3", "gpt_oss", "glm5_next_text")  # glm5: a multimodal wrapper, text_config

# interesting integers and floats (boundaries of the C++ types and of the checks)
INTS = [
    0,
    1,
    2,
    3,
    7,
    8,
    16,
    63,
    64,
    65,
    255,
    256,
    4095,
    65535,
    65536,
    2**31 - 1,
    2**31,
    2**32 - 1,
    2**32,
    2**32 + 3,
    2**63 - 1,
    2**63,
    2**64 - 1,
    6 * 10**18,
    -1,
    -2,
    -(2**31),
    -(2**63),
]
FLOATS = [
    0.0,
    -0.0,
    1.0,
    -1.0,
    0.5,
    -0.5,
    1e-45,
    1e-30,
    1e30,
    3.4e38,
    1e300,
    float("nan"),
    float("inf"),
    float("-inf"),
    2.0**31,
    10000.0,
    1e-6,
]


# ==== GGUF: parse, mutate, write ==============================================================================
# value types: 0 u8, 1 i8, 2 u16, 3 i16, 4 u32, 5 i32, 6 f32, 7 bool, 8 string, 9 array, 10 u64, 11 i64, 12 f64
SCALAR = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<B", 10: "<Q", 11: "<q", 12: "<d"}
FLOAT_T, INT_T = (6, 12), (0, 1, 2, 3, 4, 5, 10, 11)


@dataclass
class KV:
    key: bytes
    vtype: int
    payload: bytes  # the value as stored after the type tag


@dataclass
class TInfo:
    name: bytes
    dims: list[int]
    ttype: int
    offset: int


@dataclass
class GGUF:
    version: int
    kvs: list[KV]
    tensors: list[TInfo]
    alignment: int
    data: bytes
    magic: bytes = b"GGUF"
    n_tensors: int | None = None  # header counts, when a mutation makes them lie
    n_kv: int | None = None


def _value_end(buf: bytes, pos: int, vtype: int) -> int:
    if vtype in SCALAR:
        return pos + struct.calcsize(SCALAR[vtype])
    if vtype == 8:
        (n,) = struct.unpack_from("<Q", buf, pos)
        return pos + 8 + n
    if vtype == 9:
        etype, n = struct.unpack_from("<IQ", buf, pos)
        pos += 12
        if etype in SCALAR:
            return pos + n * struct.calcsize(SCALAR[etype])
        for _ in range(n):
            pos = _value_end(buf, pos, etype)
        return pos
    raise ValueError(f"value type {vtype}")


def parse_gguf(buf: bytes) -> GGUF:
    """A valid GGUF (the seeds) as a structure."""
    magic, version, n_t, n_kv = struct.unpack_from("<4sIQQ", buf, 0)
    pos, kvs = 24, []
    for _ in range(n_kv):
        (n,) = struct.unpack_from("<Q", buf, pos)
        key = buf[pos + 8 : pos + 8 + n]
        (vtype,) = struct.unpack_from("<I", buf, pos + 8 + n)
        start = pos + 12 + n
        pos = _value_end(buf, start, vtype)
        kvs.append(KV(key, vtype, buf[start:pos]))
    tensors = []
    for _ in range(n_t):
        (n,) = struct.unpack_from("<Q", buf, pos)
        name = buf[pos + 8 : pos + 8 + n]
        pos += 8 + n
        (nd,) = struct.unpack_from("<I", buf, pos)
        dims = list(struct.unpack_from(f"<{nd}Q", buf, pos + 4))
        ttype, offset = struct.unpack_from("<IQ", buf, pos + 4 + 8 * nd)
        pos += 4 + 8 * nd + 12
        tensors.append(TInfo(name, dims, ttype, offset))
    align = 32
    for kv in kvs:
        if kv.key == b"general.alignment" and kv.vtype == 4:
            (align,) = struct.unpack("<I", kv.payload)
    start = pos + (-pos % align)
    return GGUF(version, kvs, tensors, align, buf[start:], magic)


def write_gguf(g: GGUF) -> bytes:
    out = io.BytesIO()
    out.write(
        struct.pack(
            "<4sIQQ",
            g.magic,
            g.version,
            len(g.tensors) if g.n_tensors is None else g.n_tensors,
            len(g.kvs) if g.n_kv is None else g.n_kv,
        )
    )
    for kv in g.kvs:
        out.write(struct.pack("<Q", len(kv.key)) + kv.key + struct.pack("<I", kv.vtype) + kv.payload)
    for t in g.tensors:
        out.write(struct.pack("<Q", len(t.name)) + t.name + struct.pack("<I", len(t.dims)))
        out.write(struct.pack(f"<{len(t.dims)}Q", *(d % 2**64 for d in t.dims)))
        out.write(struct.pack("<IQ", t.ttype % 2**32, t.offset % 2**64))
    pad = -out.tell() % max(g.alignment, 1) if g.alignment > 0 else 0
    out.write(b"\0" * pad)
    out.write(g.data)
    return out.getvalue()


def encode_scalar(vtype: int, v: Any) -> bytes:
    fmt = SCALAR[vtype]
    if vtype in FLOAT_T:
        return (
            struct.pack(fmt, float(v))
            if vtype == 12 or abs(float(v)) <= 3.4e38 or not math.isfinite(v)
            else struct.pack(fmt, math.copysign(float("inf"), v))
        )
    bits = struct.calcsize(fmt) * 8
    v = int(v) % 2**bits
    if fmt[1].islower() and v >= 2 ** (bits - 1):
        v -= 2**bits
    return struct.pack(fmt, v)


def encode_string(b: bytes, claimed: int | None = None) -> bytes:
    return struct.pack("<Q", len(b) if claimed is None else claimed) + b


def tensor_nbytes(ttype: int, dims: list[int]) -> int | None:
    from moelite import _core

    try:
        if not dims or dims[0] % _core.block_size(ttype):
            return None
        return _core.row_size(ttype, dims[0]) * math.prod(dims[1:])
    except Exception:  # noqa: BLE001 - an unknown type: no layout
        return None


def relayout(g: GGUF, rng: random.Random, fresh: set[int]) -> None:
    """Re-pack the data section after tensor infos changed: every tensor gets its ggml size at an aligned
    offset; tensors in `fresh` (indices) get new bytes (random or zero), the others keep theirs."""
    old = {i: g.data[t.offset : t.offset + (tensor_nbytes(t.ttype, t.dims) or 0)] for i, t in enumerate(g.tensors)}
    out, pos = bytearray(), 0
    for i, t in enumerate(g.tensors):
        n = tensor_nbytes(t.ttype, t.dims)
        if n is None or n > 64 << 20:
            t.offset = pos
            continue
        pos += -pos % g.alignment
        out += b"\0" * (pos - len(out))
        t.offset = pos
        if i in fresh or len(old[i]) != n:
            blob = rng.randbytes(n) if rng.random() < 0.5 else bytes(n)
        else:
            blob = old[i]
        out += blob
        pos += n
    g.data = bytes(out)


def random_int_value(rng: random.Random, old: int | None) -> int:
    if old is not None and rng.random() < 0.4:
        return rng.choice([old + 1, old - 1, old * 2, old // 2, -old, old * 1000, old + 2**32])
    return rng.choice(INTS)


def mutate_kv_value(rng: random.Random, kv: KV) -> None:
    if kv.vtype in INT_T or kv.vtype == 7:
        old = struct.unpack(SCALAR[kv.vtype], kv.payload)[0]
        kv.payload = encode_scalar(kv.vtype, random_int_value(rng, old) if kv.vtype != 7 else rng.choice([2, 255]))
    elif kv.vtype in FLOAT_T:
        old = struct.unpack(SCALAR[kv.vtype], kv.payload)[0]
        kv.payload = encode_scalar(kv.vtype, rng.choice(FLOATS + [old * 2, -old, old * 1e30]))
    elif kv.vtype == 8:
        s = kv.payload[8:]
        choice = rng.randrange(5)
        if choice == 0:
            kv.payload = encode_string(
                s[: rng.randrange(len(s) + 1)] + bytes([rng.choice([0x80, 0xFF, 0xC3, 0xED])]) + s
            )
        elif choice == 1:
            kv.payload = encode_string(s, claimed=rng.choice([len(s) + 1, 2**40, 2**64 - 1]))
        elif choice == 2:
            kv.payload = encode_string(b"")
        elif choice == 3:
            kv.payload = encode_string(
                rng.choice(
                    [
                        b"{% set x = 'a' * 100000000 %}{{ x }}",
                        b"\xed\xa0\x80",
                        b"{% for i in range(99999) %}{% for j in range(99999) %}{% endfor %}{% endfor %}",
                        b"yarn",
                        b"none",
                        b"llama",
                        b"deepseek2",
                        b"gpt2",
                        b"bert",
                    ]
                )
            )
        else:
            kv.payload = encode_string(s * rng.choice([2, 100]))
    elif kv.vtype == 9:
        etype, n = struct.unpack_from("<IQ", kv.payload)
        body = kv.payload[12:]
        choice = rng.randrange(4)
        if choice == 0:
            kv.payload = struct.pack("<IQ", etype, rng.choice([0, n + 1, n * 2, 2**40, 2**64 - 1])) + body
        elif choice == 1:
            kv.payload = struct.pack("<IQ", rng.choice([0, 4, 5, 6, 8, 9, 10, 12, 13, 100]), n) + body
        elif choice == 2 and etype in SCALAR and n:
            size = struct.calcsize(SCALAR[etype])
            i = rng.randrange(n)
            v = rng.choice(FLOATS) if etype in FLOAT_T else rng.choice(INTS)
            kv.payload = kv.payload[: 12 + i * size] + encode_scalar(etype, v) + kv.payload[12 + (i + 1) * size :]
        else:
            kv.payload = struct.pack("<IQ", etype, n // 2) + body[: len(body) // 2]


def retype_kv(rng: random.Random, kv: KV) -> None:
    new = rng.choice([0, 1, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13])
    if new in SCALAR:
        v = rng.choice(FLOATS) if new in FLOAT_T else rng.choice(INTS)
        kv.vtype, kv.payload = new, encode_scalar(new, v if new != 7 else 1)
    elif new == 8:
        kv.vtype, kv.payload = 8, encode_string(rng.choice([b"12", b"x", b"", b"nan"]))
    elif new == 9:
        et = rng.choice([4, 6, 8, 10])
        n = rng.choice([0, 1, 2, 6, 1000])
        body = b"".join(encode_string(b"7") if et == 8 else encode_scalar(et, rng.choice(INTS[:8])) for _ in range(n))
        kv.vtype, kv.payload = 9, struct.pack("<IQ", et, n) + body
    else:
        kv.vtype = new  # an unknown type tag, payload kept


def arch_of(g: GGUF) -> bytes:
    for kv in g.kvs:
        if kv.key == b"general.architecture":
            return kv.payload[8:]
    return b"qwen3moe"


ARCH_KEYS = [
    b"block_count",
    b"context_length",
    b"embedding_length",
    b"feed_forward_length",
    b"attention.head_count",
    b"attention.head_count_kv",
    b"attention.key_length",
    b"attention.value_length",
    b"attention.layer_norm_rms_epsilon",
    b"rope.dimension_count",
    b"rope.freq_base",
    b"expert_count",
    b"expert_used_count",
    b"expert_group_count",
    b"expert_group_used_count",
    b"leading_dense_block_count",
    b"rope.scaling.type",
    b"rope.scaling.factor",
    b"attention.sliding_window",
    b"expert_gating_func",
    b"attention.kv_lora_rank",
    b"attention.q_lora_rank",
    b"expert_weights_scale",
    b"logit_scale",
    b"attention.sliding_window_pattern",
    b"rope.scaling.yarn_log_multiplier",
    b"embedding_scale",
]


def m_header(rng, g: GGUF) -> None:
    c = rng.randrange(4)
    if c == 0:
        g.magic = rng.choice([b"GGUG", b"FUGG", b"\0\0\0\0"])
    elif c == 1:
        g.version = rng.choice([0, 1, 2, 4, 2**31, 2**32 - 1])
    elif c == 2:
        g.n_tensors = rng.choice([0, len(g.tensors) + 1, len(g.tensors) - 1, 2**40, 2**64 - 1])
    else:
        g.n_kv = rng.choice([0, len(g.kvs) + 1, len(g.kvs) - 1, 2**40, 2**63])


def m_kv(rng, g: GGUF) -> None:
    c = rng.randrange(10)
    arch = arch_of(g)
    if c < 4:
        mutate_kv_value(rng, rng.choice(g.kvs))
    elif c < 6:
        retype_kv(rng, rng.choice(g.kvs))
    elif c == 6:
        g.kvs.pop(rng.randrange(len(g.kvs)))
    elif c == 7:
        g.kvs.insert(rng.randrange(len(g.kvs) + 1), replace(rng.choice(g.kvs)))
    elif c == 8:
        key = arch + b"." + rng.choice(ARCH_KEYS)
        g.kvs = [kv for kv in g.kvs if kv.key != key]
        kv = KV(key, 4, encode_scalar(4, 1))
        retype_kv(rng, kv)
        if rng.random() < 0.5 and kv.vtype in SCALAR:
            mutate_kv_value(rng, kv)
        g.kvs.append(kv)
    else:
        kv = rng.choice(g.kvs)
        kv.key = rng.choice([kv.key + b"\xff", b"\xc3\x28" + kv.key, b"", kv.key.upper(), kv.key[:3]])
    # the arch-keyed numbers matter most: bias towards them
    if rng.random() < 0.5:
        nums = [kv for kv in g.kvs if kv.key.startswith(arch + b".") and kv.vtype in INT_T + FLOAT_T]
        if nums:
            mutate_kv_value(rng, rng.choice(nums))


ALL_TYPES = list(range(0, 43)) + [43, 100, 2**31]


def m_tensor(rng, g: GGUF) -> None:
    i = rng.randrange(len(g.tensors))
    t = g.tensors[i]
    c = rng.randrange(8)
    if c < 3:  # type (re-laid out, so the check sees the type itself)
        t.ttype = rng.choice(ALL_TYPES if rng.random() < 0.5 else [24, 25, 26, 27, 28, 15, 9, 0, 1, 30, 8, 12])
        if rng.random() < 0.8:
            relayout(g, rng, {i})
    elif c < 5:  # shape
        d = rng.randrange(len(t.dims))
        k = rng.randrange(5)
        if k == 0:
            t.dims[d] = rng.choice([0, 1, 2, t.dims[d] + 1, t.dims[d] - 1, t.dims[d] * 2, 2**31, 2**40])
        elif k == 1:
            t.dims = t.dims[:-1] or [1]
        elif k == 2:
            t.dims = t.dims + [rng.choice([1, 2])]
        elif k == 3:
            t.dims = list(reversed(t.dims))
        else:
            t.dims = [math.prod(t.dims)]
        if rng.random() < 0.8:
            relayout(g, rng, {i})
    elif c == 5:  # offset
        t.offset = rng.choice(
            [
                t.offset + 1,
                t.offset + g.alignment,
                len(g.data),
                len(g.data) + 32,
                2**63,
                g.tensors[rng.randrange(len(g.tensors))].offset,
            ]
        )
    elif c == 6:  # name
        names = [x.name for x in g.tensors]
        t.name = rng.choice(
            [
                t.name + b"\xff",
                b"\xe2\x82" + t.name,
                rng.choice(names),
                t.name.replace(b"blk.1", b"blk.9"),
                b"",
                t.name + b"x" * 70000,
            ]
        )
    else:  # drop or duplicate a tensor
        if rng.random() < 0.5:
            g.tensors.pop(i)
        else:
            g.tensors.append(replace(t, dims=list(t.dims)))
        if rng.random() < 0.5:
            relayout(g, rng, set())


def m_data(rng, g: GGUF) -> None:
    data = bytearray(g.data)
    if rng.random() < 0.5:  # NaN / inf into an F32 tensor
        f32 = [t for t in g.tensors if t.ttype == 0 and t.offset + 4 <= len(data)]
        if f32:
            t = rng.choice(f32)
            n = (tensor_nbytes(0, t.dims) or 4) // 4
            j = t.offset + 4 * rng.randrange(max(n, 1))
            data[j : j + 4] = struct.pack("<f", rng.choice([float("nan"), float("inf"), -float("inf"), 3e38]))
    else:
        for _ in range(rng.choice([1, 8, 64])):
            if data:
                data[rng.randrange(len(data))] = rng.randrange(256)
    g.data = bytes(data)


GGUF_MUTATORS: list[tuple[float, Callable]] = [(0.06, m_header), (0.42, m_kv), (0.36, m_tensor), (0.10, m_data)]


def mutate_gguf(rng: random.Random, seed: bytes) -> bytes:
    g = parse_gguf(seed)
    for _ in range(rng.choice([1, 1, 1, 2, 3])):
        r, acc = rng.random(), 0.0
        for w, fn in GGUF_MUTATORS:
            acc += w
            if r < acc:
                fn(rng, g)
                break
    out = write_gguf(g)
    r = rng.random()
    if r < 0.05:  # truncation
        out = out[: rng.randrange(len(out))]
    elif r < 0.08:  # raw byte flips in the metadata
        b = bytearray(out)
        for _ in range(rng.choice([1, 4, 16])):
            b[rng.randrange(min(len(b), 24 + 64 * 1024))] = rng.randrange(256)
        out = bytes(b)
    return out


# ==== JSON (config.json, tokenizer files, index, safetensors headers, calibration) =========================
JSON_VALUES: list[Any] = [
    0,
    -1,
    1,
    2,
    2**31,
    2**63,
    2**64,
    10**30,
    -0.5,
    0.5,
    1e-9,
    float("nan"),
    float("inf"),
    "",
    "x",
    "\ud800",
    None,
    True,
    False,
    [],
    {},
    [1, 2],
    {"a": 1},
    "1e400",
    10**400,
]


def _paths(node: Any, prefix: tuple = ()) -> list[tuple]:
    out = [prefix]
    if isinstance(node, dict):
        for k, v in node.items():
            out += _paths(v, prefix + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node[:50]):
            out += _paths(v, prefix + (i,))
    return out


def _get(node: Any, path: tuple) -> Any:
    for p in path:
        node = node[p]
    return node


def _nest(depth: int) -> str:
    """A placeholder that dump_json expands to `depth` nested lists (json.dumps itself would recurse)."""
    return f"\0NEST{depth}\0"


_NEST = re.compile(r'"\\u0000NEST(\d+)\\u0000"')


def mutate_json_value(rng: random.Random, doc: Any, focus: Callable[[tuple], bool] | None = None) -> Any:
    """One structural mutation somewhere in a JSON document (biased to paths `focus` accepts)."""
    paths = _paths(doc)
    if focus is not None and rng.random() < 0.7:
        paths = [p for p in paths if focus(p)] or paths
    path = rng.choice(paths)
    if not path:
        return rng.choice([[doc], _nest(100000), "x", 1, None, list(doc) if isinstance(doc, dict) else {"a": doc}])
    parent, last = _get(doc, path[:-1]), path[-1]
    old = parent[last]
    c = rng.randrange(6)
    if c == 0 and isinstance(parent, dict):
        del parent[last]
    elif c == 1:
        parent[last] = _nest(rng.choice([50, 5000, 200000]))
    elif c == 2 and isinstance(old, (int, float)) and not isinstance(old, bool):
        parent[last] = rng.choice([old + 1, old - 1, old * 2, -old, old * 10**12, old / 3, str(old), [old]])
    elif c == 3 and isinstance(old, str):
        parent[last] = rng.choice([old + "\ud800", old * 1000, "", old[::-1], 5])
    else:
        # a fresh copy: a shared object inserted twice could later be mutated into a cycle
        parent[last] = copy.deepcopy(rng.choice(JSON_VALUES))
    return doc


def dump_json(doc: Any, rng: random.Random) -> bytes:
    text = json.dumps(doc, allow_nan=True, ensure_ascii=rng.random() < 0.5)
    text = text.replace('"1e400"', "1e400") if rng.random() < 0.5 else text
    text = _NEST.sub(lambda m: "[" * int(m.group(1)) + "1" + "]" * int(m.group(1)), text)
    data = text.encode("utf-8", "surrogatepass")
    r = rng.random()
    if r < 0.05:
        data = data[: rng.randrange(len(data) + 1)]
    elif r < 0.08:
        data = data[: len(data) // 2] + b"\xff\xfe" + data[len(data) // 2 :]
    return data


# ==== HF directories ============================================================================================
def _st_split(raw: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def _st_join(header: Any, data: bytes, rng: random.Random, delta: int = 0) -> bytes:
    blob = dump_json(header, rng) if not isinstance(header, bytes) else header
    blob += b" " * (-len(blob) % 8)
    return struct.pack("<Q", (len(blob) + delta) % 2**64) + blob + data


def _json_file(p: Path) -> Any:
    """A JSON file's document, or None when an earlier mutation already broke it."""
    try:
        return json.loads(p.read_bytes())
    except (ValueError, RecursionError):
        return None


def mutate_hf(rng: random.Random, d: Path) -> None:
    """Mutate the HF directory d in place."""
    shards = sorted(d.glob("*.safetensors"))
    c = rng.randrange(10)
    if c < 3:
        p = d / "config.json"
        cfg = _json_file(p)
        if cfg is None:
            return
        counts = (
            "num_hidden_layers",
            "num_experts",
            "num_local_experts",
            "n_routed_experts",
            "num_experts_per_tok",
            "hidden_size",
            "num_attention_heads",
            "num_key_value_heads",
            "vocab_size",
            "head_dim",
            "rms_norm_eps",
            "rope_theta",
            "moe_intermediate_size",
            "intermediate_size",
            "n_group",
            "topk_group",
            "first_k_dense_replace",
            "sliding_window",
            "kv_lora_rank",
            "q_lora_rank",
        )
        p.write_bytes(dump_json(mutate_json_value(rng, cfg, lambda path: bool(path) and path[0] in counts), rng))
    elif c < 6 and shards:
        p = rng.choice(shards)
        try:
            header, data = _st_split(p.read_bytes())
        except (ValueError, RecursionError, struct.error):
            return
        k = rng.randrange(6)
        if k == 0:
            p.write_bytes(_st_join(header, data, rng, delta=rng.choice([-1, 1, -8, 8, 2**40])))
        elif k == 1:
            p.write_bytes(_st_join(header, data[: rng.randrange(len(data) + 1)], rng))
        elif k == 2:
            p.write_bytes(_st_join(header, data + rng.randbytes(rng.choice([1, 8, 100])), rng))
        elif k == 3:  # data bytes (NaN weights and the like)
            b = bytearray(data)
            for _ in range(rng.choice([1, 16])):
                if b:
                    b[rng.randrange(len(b))] = rng.randrange(256)
            p.write_bytes(_st_join(header, bytes(b), rng))
        else:

            def focus(path: tuple) -> bool:
                return len(path) >= 2 and path[1] in ("data_offsets", "shape", "dtype")

            p.write_bytes(_st_join(mutate_json_value(rng, header, focus), data, rng))
    elif c < 8:
        p = d / rng.choice(
            ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"]
        )
        doc = _json_file(p) if p.exists() else None
        if doc is not None:
            p.write_bytes(dump_json(mutate_json_value(rng, doc), rng))
    else:
        p = d / "model.safetensors.index.json"
        doc = _json_file(p) if p.exists() else None
        if doc is not None:
            p.write_bytes(
                dump_json(mutate_json_value(rng, doc, lambda path: bool(path) and path[0] == "weight_map"), rng)
            )
        elif shards and not p.exists():
            shards[0].unlink()


# ==== traces ======================================================================================================
def seed_trace_arrays(rng: random.Random) -> dict[str, np.ndarray]:
    n_layers, k, n_expert = rng.choice([(2, 2, 8), (3, 2, 16), (1, 1, 4)])
    lens = [rng.randint(1, 40) for _ in range(rng.randint(1, 3))]
    n = sum(lens)
    ids = np.stack([np.stack([np.array(rng.sample(range(n_expert), k)) for _ in range(n_layers)]) for _ in range(n)])
    scores = -np.sort(-np.random.default_rng(rng.randrange(2**32)).random(ids.shape), axis=-1)
    arrays = {
        "ids": ids.astype(np.int32),
        "offsets": np.cumsum([0] + lens).astype(np.int64),
        "layers": np.arange(n_layers, dtype=np.int32),
        "n_expert": np.int64(n_expert),
        "model": np.str_("fuzz"),
        "format_version": np.int64(1),
        "scores": scores.astype(np.float32),
    }
    if rng.random() < 0.5:
        arrays["lookahead_ids"] = np.concatenate([ids[:, 1:], np.full((n, 1, k), -1)], axis=1).astype(np.int32)
        if rng.random() < 0.5:  # distances 2 .. depth + 1: [N, L, depth, k], -1 past the last layer
            depth = rng.randint(1, 2)
            far = np.full((n, n_layers, depth, k), -1, np.int32)
            for j in range(depth):
                far[:, : max(n_layers - 2 - j, 0), j] = ids[:, 2 + j :]
            arrays["lookahead_far"] = far
    if rng.random() < 0.4:  # the per-sequence layout: ids_0, scores_0, lookahead_ids_0, ids_1, ... without offsets
        off = arrays.pop("offsets")
        for name in ("ids", "scores", "lookahead_ids", "lookahead_far"):
            if name in arrays:
                whole = arrays.pop(name)
                for s in range(len(lens)):
                    arrays[f"{name}_{s}"] = whole[off[s] : off[s + 1]]
    return arrays


def shift_ids(rng: random.Random, a: np.ndarray) -> np.ndarray:
    """Integer ids moved by k * 2^32 (int64) or stored as uint64 past 2^32: an int32 cast would give them back
    unchanged, so a loader that casts before it checks reads them as valid ids."""
    k = rng.choice([1, -1, 2, 3, -2, 2**30])
    if rng.random() < 0.3 and k > 0:
        return a.astype(np.uint64) + np.uint64(k << 32)
    b = a.astype(np.int64)
    if b.size and rng.random() < 0.5:  # one id only
        b.flat[rng.randrange(b.size)] += np.int64(k << 32)
        return b
    return b + np.int64(k << 32)


def mutate_trace_arrays(rng: random.Random, arrays: dict[str, Any]) -> dict[str, Any]:
    key = rng.choice(list(arrays))
    a = np.asarray(arrays[key])
    c = rng.randrange(9)
    if c == 0:
        del arrays[key]
    elif c == 1 and a.dtype.kind in "iufb":  # dtype
        arrays[key] = a.astype(rng.choice([np.int64, np.uint64, np.float32, np.float64, np.uint8, np.int16, np.bool_]))
    elif c == 2 and a.dtype.kind in "iu":  # wrap-around bait (an ids key most of the time)
        ids_keys = [k for k in arrays if re.fullmatch(r"(lookahead_)?(ids|far)(_\d+)?", k)]
        key = rng.choice(ids_keys) if ids_keys and rng.random() < 0.8 else key
        a = np.asarray(arrays[key])
        if a.dtype.kind in "iu":
            arrays[key] = shift_ids(rng, a)
    elif c == 3 and a.size and a.dtype.kind in "iufb":  # one value
        b = a.astype(np.float64 if a.dtype.kind == "f" else np.int64).copy()
        b.flat[rng.randrange(b.size)] = rng.choice(
            [v for v in INTS if -(2**63) <= v < 2**63] if b.dtype.kind == "i" else FLOATS
        )
        arrays[key] = b
    elif c == 4:  # shape
        arrays[key] = rng.choice(
            [a.reshape(-1), a[..., :0] if a.ndim else a, a[None], a.T if a.ndim else a, a[:1] if a.ndim else a]
        )
    elif c == 5:
        arrays["n_expert"] = rng.choice(
            [np.int64(v) for v in (0, 1, 10**9, 2**62, 65536, 65537)]
            + [np.float64(8.0), np.array([8, 8]), np.str_("8")]
        )
    elif c == 6 and np.ndim(arrays.get("ids")) >= 1:  # per-sequence layout
        ids = np.asarray(arrays.pop("ids"))
        cut = rng.randrange(len(ids) + 1)
        arrays["ids_0"], arrays["ids_1"] = ids[:cut], ids[cut:]
        arrays.pop("offsets", None)
    elif c == 7:
        arrays[key] = np.array([{"x": 1}], dtype=object)
    else:
        arrays[key] = np.str_("x" * rng.choice([1, 1000]))
    return arrays


def write_trace_file(rng: random.Random, arrays: dict[str, Any], path: Path) -> None:
    c = rng.random()
    buf = io.BytesIO()
    with contextlib.suppress(Exception):
        (np.savez_compressed if rng.random() < 0.3 else np.savez)(buf, **arrays)
    data = buf.getvalue()
    if c < 0.08 and data:
        data = data[: rng.randrange(len(data))]
    elif c < 0.16 and data:
        b = bytearray(data)
        for _ in range(rng.choice([1, 8])):
            b[rng.randrange(len(b))] = rng.randrange(256)
        data = bytes(b)
    elif c < 0.20:
        b = io.BytesIO()
        np.save(b, np.asarray(arrays.get("ids", [1])))
        data = b.getvalue()
    elif c < 0.24:  # a header claiming a huge shape
        b = io.BytesIO()
        np.lib.format.write_array_header_1_0(
            b, {"descr": "<i4", "fortran_order": False, "shape": (rng.choice([10**6, 10**12]), 2, 2)}
        )
        import zipfile

        z = io.BytesIO()
        with zipfile.ZipFile(z, "w") as zf:
            zf.writestr("ids.npy", b.getvalue() + bytes(64))
            zf.writestr("n_expert.npy", _npy(np.int64(8)))
        data = z.getvalue()
    path.write_bytes(data)


def _npy(a: Any) -> bytes:
    b = io.BytesIO()
    np.save(b, a)
    return b.getvalue()


# ==== split GGUF sets ==========================================================================================
# A case is a folder of shards plus case.json: which file to open, the budget, and what must happen. Each mutation
# says what the set has become: "same" (nothing that matters changed: the load must give the unsplit model's logits
# bit for bit and name the shards in order), "broken" (a set the loader must refuse: a missing, foreign, renamed or
# truncated shard, split keys that disagree, a tensor in two shards) or "any" (a shard mutated as in `gguf`, or a
# shard that now reads as a whole model: refused, or finite logits).
SPLIT_KEYS = (b"split.no", b"split.count", b"split.tensors.count")
INT_RANGE = {
    0: (0, 2**8 - 1),
    1: (-(2**7), 2**7 - 1),
    2: (0, 2**16 - 1),
    3: (-(2**15), 2**15 - 1),
    4: (0, 2**32 - 1),
    5: (-(2**31), 2**31 - 1),
    10: (0, 2**64 - 1),
    11: (-(2**63), 2**63 - 1),
}
RANK = {"same": 0, "broken": 1, "any": 2}


def kv_int(g: GGUF, key: bytes) -> int | str | None:
    """An integer key as the core reads it (None: absent, 'bad': not an integer; u64 above int64 reads as -1)."""
    for kv in g.kvs:
        if kv.key == key:
            if kv.vtype not in INT_T:
                return "bad"
            v = struct.unpack(SCALAR[kv.vtype], kv.payload)[0]
            return -1 if kv.vtype == 10 and v > 2**63 - 1 else v
    return None


def set_kv(g: GGUF, key: bytes, vtype: int | None, payload: bytes = b"") -> None:
    """Replace (or add, at the end) key; vtype None deletes it."""
    kvs = [kv for kv in g.kvs if kv.key != key]
    old = [i for i, kv in enumerate(g.kvs) if kv.key == key]
    if vtype is not None:
        kvs.insert(old[0] if old else len(kvs), KV(key, vtype, payload))
    g.kvs = kvs


def tensor_blob(g: GGUF, t: TInfo) -> bytes:
    return g.data[t.offset : t.offset + (tensor_nbytes(t.ttype, t.dims) or 0)]


@dataclass
class SplitCase:
    prefix: str
    n: int  # the count in the shard names
    files: dict[str, bytes]  # file name -> bytes (shards and any extra files)
    open_idx: int  # open the shard of this index (0-based) ...
    open_name: str | None = None  # ... or this file
    expect: str = "same"
    why: list[str] = field(default_factory=list)

    def name(self, i: int) -> str:
        return f"{self.prefix}-{i + 1:05d}-of-{self.n:05d}.gguf"

    def shard(self, i: int) -> GGUF:
        return parse_gguf(self.files[self.name(i)])

    def put(self, i: int, g: GGUF) -> None:
        self.files[self.name(i)] = write_gguf(g)

    def mark(self, expect: str, why: str) -> None:
        self.why.append(f"{why} ({expect})")
        if RANK[expect] > RANK[self.expect]:
            self.expect = expect


def _shape(b: bytes) -> tuple | None:
    """What decides whether a shard can stand in for another: its split keys and tensor names (None: unparsable)."""
    try:
        g = parse_gguf(b)
    except Exception:  # noqa: BLE001
        return None
    return tuple(kv_int(g, k) for k in SPLIT_KEYS), frozenset(t.name for t in g.tensors)


# -- mutations that change nothing that matters (applied first) --
def sm_rename_set(rng, s: SplitCase, seed: dict) -> None:
    old = {s.name(i): i for i in range(s.n)}
    s.prefix = rng.choice(["model", "Qwen3-30B-A3B-Q8_0", "a.b-c", "x" * 100, "m-00001-of-00002"])
    s.files = {(s.name(old[k]) if k in old else k): v for k, v in s.files.items()}
    s.mark("same", f"set renamed to {s.prefix}-*")


def sm_extra_file(rng, s: SplitCase, seed: dict) -> None:
    i = rng.randrange(s.n)
    extra = rng.choice(
        [
            s.name(i) + ".part",
            f"{s.prefix}-{s.n + 1:05d}-of-{s.n:05d}.gguf",
            f"{s.prefix}-{i + 1:05d}-of-{s.n + 1:05d}.gguf",
            "other.gguf",
            f"{s.prefix}.gguf",
        ]
    )
    s.files[extra] = s.files[s.name(i)]
    s.mark("same", f"a copy of shard {i + 1} beside the set as {extra}")


def sm_move_tensor(rng, s: SplitCase, seed: dict) -> None:
    i, j = rng.sample(range(s.n), 2)
    gi, gj = s.shard(i), s.shard(j)
    if not gi.tensors:
        return
    t = gi.tensors.pop(rng.randrange(len(gi.tensors)))
    blob = tensor_blob(gi, t)
    relayout(gi, rng, set())
    pos = len(gj.data) + (-len(gj.data) % gj.alignment)
    gj.data = gj.data + bytes(pos - len(gj.data)) + blob
    gj.tensors.insert(rng.randrange(len(gj.tensors) + 1), replace(t, dims=list(t.dims), offset=pos))
    relayout(gj, rng, set())
    s.put(i, gi)
    s.put(j, gj)
    s.mark("same", f"tensor {t.name!r} moved from shard {i + 1} to shard {j + 1}")


def sm_retype_same(rng, s: SplitCase, seed: dict) -> None:
    i = rng.randrange(s.n)
    g = s.shard(i)
    key = rng.choice(SPLIT_KEYS)
    v = kv_int(g, key)
    if not isinstance(v, int) or v < 0:
        return
    vt = rng.choice([t for t, (lo, hi) in INT_RANGE.items() if lo <= v <= hi])
    set_kv(g, key, vt, encode_scalar(vt, v))
    s.put(i, g)
    s.mark("same", f"shard {i + 1}: {key.decode()} = {v} stored as type {vt}")


def sm_drop_tensor_count(rng, s: SplitCase, seed: dict) -> None:
    for i in range(s.n):
        g = s.shard(i)
        set_kv(g, b"split.tensors.count", None)
        s.put(i, g)
    s.mark("same", "split.tensors.count deleted from every shard")


SPLIT_SAME = [sm_rename_set, sm_extra_file, sm_move_tensor, sm_retype_same, sm_drop_tensor_count]


# -- the last mutation: a broken set, or a shard mutated as in `gguf` --
def sm_drop(rng, s: SplitCase, seed: dict) -> None:
    k = rng.randrange(s.n)
    del s.files[s.name(k)]
    s.mark("broken", f"shard {k + 1} deleted")


def sm_swap(rng, s: SplitCase, seed: dict) -> None:
    i, j = rng.sample(range(s.n), 2)
    a, b = s.name(i), s.name(j)
    s.files[a], s.files[b] = s.files[b], s.files[a]
    s.mark("broken", f"shards {i + 1} and {j + 1} swapped")


def sm_rename_one(rng, s: SplitCase, seed: dict) -> None:
    k = rng.randrange(s.n)
    new = rng.choice(
        [
            "renamed.gguf",
            f"{s.prefix}-{k + 1:05d}-of-{s.n + 1:05d}.gguf",
            f"{s.prefix}-{s.n + 1:05d}-of-{s.n:05d}.gguf",
            f"other-{k + 1:05d}-of-{s.n:05d}.gguf",
            f"{s.prefix}-{k + 1:05d}-of-{s.n:05d}.GGUF",
        ]
    )
    s.files[new] = s.files.pop(s.name(k))
    if rng.random() < 0.5:
        s.open_name = new
    s.mark("broken", f"shard {k + 1} renamed {new}")


def sm_dup_over(rng, s: SplitCase, seed: dict) -> None:
    i, j = rng.sample(range(s.n), 2)
    s.files[s.name(j)] = s.files[s.name(i)]
    s.mark("broken", f"shard {i + 1} copied over shard {j + 1}")


def sm_truncate(rng, s: SplitCase, seed: dict) -> None:
    k = rng.randrange(s.n)
    b = s.files[s.name(k)]
    g = parse_gguf(b)
    start = len(b) - len(g.data)
    need = start + max((t.offset + (tensor_nbytes(t.ttype, t.dims) or 0) for t in g.tensors), default=0)
    r = rng.random()
    if r < 0.3 or need <= start:
        cut = rng.randrange(start)  # in the header, KVs or tensor infos
    elif r < 0.9 or need >= len(b):
        cut = rng.randrange(start, need)  # in the data
    else:
        cut = rng.randrange(need, len(b))  # only the padding after the last tensor
    s.files[s.name(k)] = b[:cut]
    s.mark(
        "same" if cut >= need else "broken",
        f"shard {k + 1} truncated to {cut} of {len(b)} bytes (tensor data ends at {need})",
    )


def sm_key_value(rng, s: SplitCase, seed: dict) -> None:
    key = rng.choice(SPLIT_KEYS)
    every = rng.random() < 0.2
    shards = range(s.n) if every else [rng.randrange(s.n)]
    new = None
    for i in shards:
        g = s.shard(i)
        old = kv_int(g, key)
        vt = next((kv.vtype for kv in g.kvs if kv.key == key), 5)
        if vt not in INT_T:
            vt = 5
        if new is None:
            v = random_int_value(rng, old if isinstance(old, int) else None)
            new = struct.unpack(SCALAR[vt], encode_scalar(vt, v))[0]  # as stored: wrapped to the type
        set_kv(g, key, vt, encode_scalar(vt, new))
        s.put(i, g)
    where = "every shard" if every else f"shard {shards[0] + 1}"
    _judge_keys(s, key, seed, f"{where}: {key.decode()} = {new}")


def _judge_keys(s: SplitCase, key: bytes, seed: dict, what: str) -> None:
    """After `key` changed in some shards: a set the loader must take as before, one it must refuse, or one whose
    opened shard now reads as a whole model (split.count 1 or absent there)."""
    vals = [kv_int(s.shard(i), key) for i in range(s.n)]
    if key == b"split.count" and vals[s.open_idx] in (1, None):
        s.mark("any", f"{what} (the opened shard reads as a whole model)")
    elif key == b"split.count":
        s.mark("same" if all(v == s.n for v in vals) else "broken", what)
    elif key == b"split.no":
        s.mark("same" if vals == list(range(s.n)) else "broken", what)
    else:
        s.mark("same" if vals in ([None] * s.n, [seed["n_tensors"]] * s.n) else "broken", what)


def sm_key_retype(rng, s: SplitCase, seed: dict) -> None:
    k = rng.randrange(s.n)
    g = s.shard(k)
    key = rng.choice(SPLIT_KEYS)
    vt = rng.choice([6, 12, 8, 7, 9])
    payload = {
        6: encode_scalar(6, 2.0),
        12: encode_scalar(12, 1.0),
        8: encode_string(b"3"),
        7: encode_scalar(7, 1),
        9: struct.pack("<IQ", 2, 1) + encode_scalar(2, 1),
    }[vt]
    set_kv(g, key, vt, payload)
    s.put(k, g)
    s.mark("broken", f"shard {k + 1}: {key.decode()} of type {vt}")


def sm_key_delete(rng, s: SplitCase, seed: dict) -> None:
    key = rng.choice(SPLIT_KEYS)
    every = rng.random() < 0.25
    shards = list(range(s.n)) if every else [rng.randrange(s.n)]
    for i in shards:
        g = s.shard(i)
        set_kv(g, key, None)
        s.put(i, g)
    _judge_keys(s, key, seed, f"{'every shard' if every else f'shard {shards[0] + 1}'}: {key.decode()} deleted")


def sm_tensor_twice(rng, s: SplitCase, seed: dict) -> None:
    i, j = rng.sample(range(s.n), 2)
    gi, gj = s.shard(i), s.shard(j)
    if not gi.tensors:
        return
    t = rng.choice(gi.tensors)
    pos = len(gj.data) + (-len(gj.data) % gj.alignment)
    gj.data = gj.data + bytes(pos - len(gj.data)) + tensor_blob(gi, t)
    gj.tensors.insert(rng.randrange(len(gj.tensors) + 1), replace(t, dims=list(t.dims), offset=pos))
    relayout(gj, rng, set())
    s.put(j, gj)
    c = rng.random()
    for k in range(s.n) if c < 0.6 else []:  # the count kept in step, or deleted, or left alone
        g = s.shard(k)
        v = kv_int(g, b"split.tensors.count")
        if isinstance(v, int):
            set_kv(g, b"split.tensors.count", 5, encode_scalar(5, v + 1)) if c < 0.3 else set_kv(
                g, b"split.tensors.count", None
            )
            s.put(k, g)
    s.mark("broken", f"tensor {t.name!r} of shard {i + 1} also in shard {j + 1}")


def _foreign(s: SplitCase, k: int, b: bytes, what: str) -> None:
    same = _shape(b) is not None and _shape(b) == _shape(s.files[s.name(k)])
    s.files[s.name(k)] = b
    s.mark("same" if same else "broken", f"shard {k + 1} replaced by {what}")


def sm_foreign(rng, s: SplitCase, seed: dict) -> None:
    kind = rng.choice([x for x in seed["sets"] if x != seed["kind"]])
    other = seed["sets"][kind]
    k = rng.randrange(min(s.n, len(other)))
    _foreign(s, k, Path(other[k]).read_bytes(), f"shard {k + 1} of the model's {kind} set")


def sm_foreign_model(rng, s: SplitCase, seed: dict) -> None:
    other = rng.choice(seed["others"])
    k = rng.randrange(min(s.n, len(other)))
    _foreign(s, k, Path(other[k]).read_bytes(), f"shard {k + 1} of another model's set ({Path(other[k]).parent})")


def sm_gguf(rng, s: SplitCase, seed: dict) -> None:
    k = rng.randrange(s.n)
    s.files[s.name(k)] = mutate_gguf(rng, s.files[s.name(k)])
    s.mark("any", f"shard {k + 1} mutated as in the gguf target")


SPLIT_LAST: list[tuple[float, Callable]] = [
    (0.07, sm_drop),
    (0.06, sm_swap),
    (0.07, sm_rename_one),
    (0.05, sm_dup_over),
    (0.12, sm_truncate),
    (0.14, sm_key_value),
    (0.05, sm_key_retype),
    (0.08, sm_key_delete),
    (0.08, sm_tensor_twice),
    (0.10, sm_foreign),
    (0.03, sm_foreign_model),
    (0.15, sm_gguf),
]


def make_split_case(rng: random.Random, seeds: dict[str, Any], d: Path) -> Path:
    models = seeds["split"]
    m = rng.randrange(len(models))
    model = models[m]
    kind = rng.choice(list(model["sets"]))
    shards = model["sets"][kind]
    seed = {
        "sets": model["sets"],
        "kind": kind,
        "n_tensors": model["n_tensors"],
        "others": [o["sets"][kind] for j, o in enumerate(models) if j != m],
    }
    s = SplitCase(
        "m",
        len(shards),
        {f"m-{i + 1:05d}-of-{len(shards):05d}.gguf": Path(p).read_bytes() for i, p in enumerate(shards)},
        rng.randrange(len(shards)),
    )
    s.why.append(f"{Path(model['model']).name} as the {kind} set of {len(shards)} shards")
    for _ in range(rng.choice([0, 0, 1, 1, 2])):
        rng.choice(SPLIT_SAME)(rng, s, seed)
    if rng.random() < 0.85:
        r, acc = rng.random(), 0.0
        for w, fn in SPLIT_LAST:
            acc += w
            if r < acc:
                fn(rng, s, seed)
                break
    out = d / "set"
    out.mkdir()
    for name, b in s.files.items():
        (out / name).write_bytes(b)
    opened = s.open_name if s.open_name in s.files else s.name(s.open_idx)
    if opened not in s.files:
        opened = rng.choice(sorted(s.files))
    budget = rng.random() < 0.25
    (out / "case.json").write_text(
        json.dumps(
            {
                "open": opened,
                "expect": s.expect,
                "why": s.why,
                "files": [s.name(i) for i in range(s.n)],
                "budget": model["minimum"] if budget else None,
                "ref": model["ref"]["minimum" if budget else "resident"],
            },
            indent=1,
        )
    )
    return out


SPLIT_LOAD = {"n_ctx": 16, "n_threads": 1, "prefetch": False}  # the reference and every case load alike
SPLIT_IDS = [1, 2, 3]


def build_split_seed_sets(cache: Path, models: list[str]) -> list[dict[str, Any]]:
    """(In a subprocess.) Each model as three split sets (gguf-py's writer and moelite's with the same tensors per
    shard, moelite's with 4+ shards), its logits resident and at the minimum budget; every set checked to give
    them bit for bit."""
    import moelite
    from moelite import _core
    from moelite.converters import convert
    from moelite.converters.gguf_out import rewrite_stock

    out = []
    for model in models:
        d = cache / "split" / Path(model).stem
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
        n = len(_core.read_gguf(model)["tensors"])
        for kind in ("py", "ml", "ml4"):
            (d / kind).mkdir()
        sets = {
            "py": rewrite_stock(model, d / "py" / "m.gguf", split_max_tensors=n // 3 + 1),
            "ml": convert(model, d / "ml" / "m.gguf", "keep", progress=False, split_max_tensors=n // 3 + 1).files,
            "ml4": convert(model, d / "ml4" / "m.gguf", "keep", progress=False, split_max_tensors=n // 4 + 1).files,
        }
        with moelite.load(model, **SPLIT_LOAD) as m:
            minimum = int(m.plan.minimum_budget)
        ref = {}
        for name, budget in (("resident", None), ("minimum", minimum)):
            with moelite.load(model, memory_budget=budget, **SPLIT_LOAD) as m:
                logits = np.asarray(m.logits(SPLIT_IDS))
            np.save(d / f"ref-{name}.npy", logits)
            ref[name] = str(d / f"ref-{name}.npy")
            for kind, shards in sets.items():
                with moelite.load(shards[-1], memory_budget=budget, **SPLIT_LOAD) as m:
                    got = np.asarray(m.logits(SPLIT_IDS))
                if got.tobytes() != logits.tobytes():
                    raise SystemExit(f"seed set {kind} of {model} ({name}) does not give the unsplit logits")
        out.append(
            {
                "model": model,
                "n_tensors": n,
                "minimum": minimum,
                "ref": ref,
                "sets": {k: [str(p) for p in v] for k, v in sets.items()},
            }
        )
    return out


# ==== case actions (run in the forked child) =================================================================
class Silent(Exception):
    """Accepted input that produced corrupt output (non-finite logits, a converted file moelite refuses)."""


# ==== public numeric arguments (issue 33) ======================================================================
# A case is case.json: which call, which argument, and the hostile value in a tagged form (JSON has no NaN-safe,
# numpy or bytes values): ["int", "123"], ["float", "nan"], ["np", "float32", "1e30"], ["bool", true], ["none"],
# ["str", "5"], ["list", [tag, ...]], ["dict"], ["bytes"], ["complex"]; CLI cases carry the flag's text.
BATCHED = ("trace", "api")  # cheap cases: many per forked child (run_batch), the fork and wake-ups cost more
API_ADDRESS_SPACE = 64 << 30  # the api target's RLIMIT_AS above the harness: thread stacks, not memory
API_LOAD = {"n_ctx": 16, "n_threads": 1, "prefetch": False}  # every load case starts from these (the reference too)
API_PROMPT = [1, 2, 3]
# (call, argument): the loaded model's options, generate's options, then the routing analyses on a recorded trace
API_ARGS = [
    *(
        ("load", a)
        for a in (
            "memory_budget",
            "vram_budget",
            "policy_window",
            "cache_shares",
            "n_ctx",
            "n_threads",
            "n_ubatch",
            "n_io_threads",
            "prefetch_depth",
            "gpu",
            "host_slots",
            "state_snapshots",
            "swap_threshold",
            "standin_threshold",
        )
    ),
    *(
        ("generate", a)
        for a in (
            "max_tokens",
            "temperature",
            "top_k",
            "top_p",
            "min_p",
            "repetition_penalty",
            "repeat_penalty",
            "seed",
            "stop_ids",
            "prompt",
        )
    ),
    ("logits_blocks", "first"),
    ("srp", "m"),
    ("srp_many", "ms"),
    ("sch", "m"),
    ("sch", "rho"),
    ("static_sch", "m"),
    ("static_sch", "rho"),
    ("simulate", "total_slots"),
    ("simulate", "m"),
    ("simulate", "precision"),
    ("simulate", "seed"),
    ("simulate", "shares"),
    ("calibrate", "budget"),
    ("calibrate", "ms"),
    ("calibrate", "precision"),
]
# options that must not change greedy decoding: an accepted value gives the reference tokens
API_NEUTRAL = {
    "memory_budget",
    "vram_budget",
    "policy_window",
    "cache_shares",
    "n_ctx",
    "n_io_threads",
    "prefetch_depth",
    "gpu",
    "host_slots",
    "state_snapshots",
    "standin_threshold",
    "top_k",
    "top_p",
    "min_p",
    "seed",
}
# `moelite run` flags and the option they map to; values are the text a shell would pass
CLI_FLAGS = (
    "--threads",
    "--ctx-size",
    "--memory-budget",
    "--swap-threshold",
    "--standin-threshold",
    "--prefetch-depth",
    "--n-gpu-layers",
    "--max-tokens",
    "--temp",
    "--top-k",
    "--top-p",
    "--min-p",
    "--repeat-penalty",
    "--seed",
)
CLI_TEXTS = (
    "nan",
    "inf",
    "-inf",
    "NaN",
    "1e400",
    "-1e400",
    "1e-400",
    "0",
    "-0",
    "-1",
    "1",
    "2",
    "16",
    "0.5",
    "1.0",
    "0.99",
    "2147483647",
    "2147483648",
    "4294967296",
    "9223372036854775807",
    "9223372036854775808",
    "1e30",
    "5e-324",
    "",
    " ",
    "abc",
    "0x10",
    "1_000",
    "5.0",
    "1,5",
    "١",
    "16MiB",
    "1GiB",
    "+3",
    "1e3",
    "true",
)
NP_TYPES = ("int64", "int32", "uint64", "uint8", "float32", "float64", "float16", "bool_")


def hostile_tag(rng: random.Random, depth: int = 0) -> list:
    """One value for a numeric argument, tagged (see above): boundaries of int32 / int64 / float, wrong types."""
    c = rng.random()
    if c < 0.35:
        return ["int", str(rng.choice(INTS + [2**64, 10**30, -(2**64), 4, 5, 12, 24]))]
    if c < 0.65:
        v = rng.choice(FLOATS + [5e-324, 1.7976931348623157e308, 0.999999, 1.0000001, 0.25, 2.5, 0.9, 1e-9])
        return ["float", repr(v)]
    if c < 0.82:
        t = rng.choice(NP_TYPES)
        if t.startswith("float"):
            return ["np", t, repr(rng.choice(FLOATS + [1.0, 2.0, 4.0]))]
        if t == "bool_":
            return ["np", t, rng.choice(["0", "1"])]
        info = np.iinfo(getattr(np, t))
        return ["np", t, str(rng.choice([v for v in INTS + [1, 2, 4] if info.min <= v <= info.max]))]
    if c < 0.87:
        return ["bool", rng.random() < 0.5]
    if c < 0.90:
        return ["none"]
    if c < 0.94:
        return ["str", rng.choice(["5", "0.5", "nan", "", "1GiB"])]
    if c < 0.97 and depth == 0:
        return ["list", [hostile_tag(rng, 1) for _ in range(rng.choice([0, 1, 2]))]]
    return [rng.choice(["dict", "bytes", "complex"])]


def decode_tag(tag: list) -> Any:
    kind = tag[0]
    if kind == "int":
        return int(tag[1])
    if kind == "float":
        return float(tag[1])
    if kind == "np":
        t = getattr(np, tag[1])
        with np.errstate(all="ignore"):  # 1e30 as float16 is inf: as numpy makes it
            return t(float(tag[2])) if tag[1].startswith("float") else t(int(tag[2]))
    if kind == "bool":
        return bool(tag[1])
    if kind == "str":
        return tag[1]
    if kind == "list":
        return [decode_tag(x) for x in tag[1]]
    return {"none": None, "dict": {"a": 1}, "bytes": b"4", "complex": complex(1, 1)}[kind]


def make_api_case(rng: random.Random, seeds: dict[str, Any], d: Path) -> Path:
    if rng.random() < 0.15:
        case = {"call": "cli", "arg": rng.choice(CLI_FLAGS), "text": rng.choice(CLI_TEXTS)}
    else:
        call, arg = rng.choice(API_ARGS)
        tag = hostile_tag(rng)
        decode_tag(tag)  # a tag the child cannot rebuild is a mutator bug (skipped), not a finding
        # wrap: the value inside a list argument; offload: a load case at the smallest budget (experts offloaded)
        case = {"call": call, "arg": arg, "value": tag, "wrap": rng.random() < 0.3, "offload": rng.random() < 0.5}
    p = d / "case.json"
    p.write_text(json.dumps({**case, "seed": seeds["api"]}))
    return p


def _api_value(case: dict, n_layers: int) -> Any:
    """The hostile value as the call takes it: list arguments get it as an item (or the whole value when wrap is
    off and it is itself a list)."""
    v = decode_tag(case["value"])
    arg = case["arg"]
    if arg in ("cache_shares", "shares") and case["wrap"]:
        return [v] + [0.5] * (n_layers - 1) if n_layers > 1 else [v]
    if arg in ("stop_ids", "ms") and case["wrap"]:
        return [4, v]
    if arg == "host_slots" and case["wrap"]:
        return [v] * n_layers
    if arg == "prompt":
        return [1, v, 3] if case["wrap"] or not isinstance(v, list) else v
    return v


def _expect(ok: bool, what: str) -> None:
    if not ok:
        raise Silent(what)


def _rate(x: Any) -> bool:
    a = np.asarray(x, dtype=np.float64)
    return bool(np.all(np.isnan(a) | ((a >= 0) & (a <= 1))))


def run_api_model(case: dict, seed: dict) -> None:
    import moelite

    call, arg = case["call"], case["arg"]
    value = _api_value(case, seed["n_layers"])
    opts = dict(API_LOAD)
    gen: dict[str, Any] = {"max_tokens": 2, "stop_ids": []}
    prompt: Any = API_PROMPT
    if call == "load":
        opts[arg] = value
        if arg == "policy_window":
            opts["policy"] = "consistency"
        if case.get("offload") and arg != "memory_budget":  # experts read from the file: the cache's knobs at work
            opts["memory_budget"] = seed["min_budget"]
    elif arg == "prompt":
        prompt = value
    elif call == "generate":
        gen[arg] = value
    with moelite.load(seed["model"], **opts) as m:
        if call == "logits_blocks":
            rows = sum(len(b) for _, b in m.logits_blocks(API_PROMPT, value))
            _expect(rows == len(API_PROMPT) - int(value), f"logits_blocks(first={value!r}) gave {rows} rows")
            return
        toks = m.generate(prompt, **gen)
    _expect(all(isinstance(t, int) and 0 <= t < seed["n_vocab"] for t in toks), f"token ids {toks[:8]}")
    if call == "generate" and arg == "max_tokens":
        _expect(len(toks) <= int(value), f"{len(toks)} tokens for max_tokens={value!r}")
    elif arg != "stop_ids":
        _expect(len(toks) == 2, f"{len(toks)} tokens for max_tokens=2")
    ref = seed["ref"]
    if arg == "stop_ids":  # stops at the first reference token it names: a prefix of the reference
        _expect(toks == ref[: len(toks)], f"stop_ids={value!r}: {toks}, reference {ref}")
    elif arg in API_NEUTRAL and arg != "prompt":
        _expect(toks == ref, f"{arg}={value!r} changed greedy decoding: {toks}, reference {ref}")


def run_api_trace(case: dict, seed: dict) -> None:
    from moelite.cache_policies import calibrate, load_trace, sch, simulate, srp, srp_many, static_sch

    t = load_trace(seed["trace"])
    call, arg = case["call"], case["arg"]
    value = _api_value(case, t.n_layers)
    accesses = t.n_tokens * t.n_layers * t.k
    if call == "srp":
        r = srp(t, value)
        _expect(_rate(r.value) and 0 <= r.alpha <= int(value) or np.isnan(r.value), f"srp -> {r}")
    elif call == "srp_many":
        out = srp_many(t, value)
        _expect(all(_rate(r.value) for r in out.values()), f"srp_many -> {out}")
    elif call in ("sch", "static_sch"):
        fn = sch if call == "sch" else static_sch
        r = fn(t, value, 2.0) if arg == "m" else fn(t, 4, value)
        _expect(_rate(r), f"{call} -> {r}")
    elif call == "simulate":
        kw: dict[str, Any] = {"prefetch": arg in ("precision", "seed"), "precision": 0.5}
        total = t.n_layers * t.k * 2
        if arg == "total_slots":
            total = value
        else:
            kw[arg] = value
        r = simulate(t, "consistency" if arg == "m" else "lru", total, **kw)
        _expect(_rate(r.hit_rate) and int(r.hits.sum() + r.misses.sum()) == accesses, f"simulate -> {r.to_dict()}")
    else:
        kw = {"ms": (4, 16)}
        budget = t.n_layers * t.k * 2
        if arg == "budget":
            budget = value
        else:
            kw[arg] = value
        cal = calibrate(t, budget, **kw)
        p = "moelite.calibration."
        _expect(_rate(cal[p + "hit_rate"]) and sum(cal[p + "layer_slots"]) == int(budget), f"calibrate -> {cal}")


def run_api_cli(case: dict, seed: dict) -> None:
    """`moelite run` with one flag's text: exit 0, or one 'moelite: error:' line (usage 2, model 1); a traceback or
    an 'internal error' line is a failure."""
    import moelite
    from moelite.apps import cli

    argv = ["run", seed["model"], "-p", "hi", "--max-tokens=2", "--threads=1", "--ctx-size=16", "--ignore-eos"]
    argv = [a for a in argv if not a.startswith(case["arg"] + "=")] + [f"{case['arg']}={case['text']}"]
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = cli.main(argv)
    text = err.getvalue()
    if "internal error" in text or "Traceback" in text:
        raise RuntimeError(f"{case['arg']}={case['text']!r}: {text[-2000:]}")
    lines = [x for x in text.splitlines() if x.startswith("moelite: error:")]
    if rc != 0:
        _expect(len(lines) == 1, f"{case['arg']}={case['text']!r}: exit {rc} with {text[-500:]!r}")
        raise moelite.errors.UsageError(lines[0])


def run_api(path: Path) -> None:
    case = json.loads(path.read_text())
    seed = case["seed"]
    if case["call"] == "cli":
        run_api_cli(case, seed)
    elif case["call"] in ("load", "generate", "logits_blocks"):
        run_api_model(case, seed)
    else:
        run_api_trace(case, seed)


def build_api_seed(cache: Path, model: str) -> dict[str, Any]:
    """The api target's seed: the reference greedy tokens of the model under API_LOAD and a routing trace it
    recorded (3 sequences of 24 tokens), saved under cache."""
    import moelite
    from moelite.cache_policies import save_trace

    with moelite.load(model, **API_LOAD) as m:
        ref = m.generate(API_PROMPT, max_tokens=2, stop_ids=[])
        n_vocab, n_layers = m.n_vocab, m.hparams["n_layer"]
    try:
        moelite.load(model, **API_LOAD, memory_budget=1)
    except moelite.errors.BudgetError as e:
        min_budget = e.minimum
    rng = np.random.default_rng(33)
    with moelite.load(model, n_ctx=32, n_threads=1, prefetch=False, record_trace=True) as m:
        for _ in range(3):
            m.logits(rng.integers(0, n_vocab, 24).tolist())
        trace = m.trace()
    save_trace(trace, cache / "api-trace.npz")
    return {
        "model": model,
        "ref": ref,
        "n_vocab": n_vocab,
        "n_layers": n_layers,
        "min_budget": min_budget,
        "trace": str(cache / "api-trace.npz"),
    }


def check_model(path: Path, converted: bool = False) -> None:
    """Load, 3 tokens of logits (finite), tokenizer and chat template. converted: the file came out of a
    successful conversion, so any refusal here is a silent corruption of the converter."""
    import moelite

    try:
        with moelite.load(path, n_ctx=16, n_threads=1, prefetch=False) as m:
            logits = m.logits([1, 2, 3])
            if not np.isfinite(logits).all():
                raise Silent(f"logits not finite ({int((~np.isfinite(logits)).sum())} values)")
            m.tokenizer.encode("hello world")
            m.chat_template.render([{"role": "user", "content": "hi"}])
    except moelite.errors.MoeliteError as e:
        if converted:
            raise Silent(f"convert wrote a file moelite refuses: {type(e).__name__}: {e}") from None
        raise


def run_gguf(path: Path) -> None:
    check_model(path)


def run_hf(path: Path) -> None:
    from moelite.converters import convert

    out = path.parent / "out.gguf"
    convert(path, out, random.Random(str(path)).choice(["f32", "q8_0"]), progress=False)
    check_model(out, converted=True)


def stored_ids(path: Path, name: str) -> np.ndarray | None:
    """The `name` ids the file stores (flat key or the per-sequence keys concatenated), as exact int64 values;
    a stored value outside int64's range (uint64 past 2^63) comes back as int64's maximum, still no int32 id."""
    try:
        with np.load(path, allow_pickle=False) as z:
            n_seq = 0  # the per-sequence layout has as many sequences as consecutive ids_0, ids_1, ...
            while f"ids_{n_seq}" in z.files:
                n_seq += 1
            keys = [f"{name}_{s}" for s in range(n_seq)] if n_seq else [name]
            parts = [np.asarray(z[k]) for k in keys if k in z.files]
    except Exception:  # noqa: BLE001 - numpy cannot read what moelite read: no oracle for this file
        return None
    if not parts or any(p.dtype.kind not in "iu" for p in parts):
        return None
    out = [
        np.minimum(p, np.uint64(2**63 - 1)).astype(np.int64) if p.dtype == np.uint64 else p.astype(np.int64)
        for p in parts
    ]
    return np.concatenate(out) if len(out) > 1 else out[0]


def run_trace(path: Path) -> None:
    from moelite.cache_policies import load_trace, sch, simulate, srp, static_sch
    from moelite.cache_policies.metrics import lookahead_precision

    t = load_trace(path)
    stored = (("ids", t.ids), ("lookahead_ids", t.lookahead_ids), ("lookahead_far", t.lookahead_far))
    for name, got in stored:  # loaded = stored, no wrapped id
        want = stored_ids(path, name) if got is not None else None
        if want is not None and (want.shape != got.shape or not np.array_equal(want, got.astype(np.int64))):
            bad = want[(want < -(2**31)) | (want >= 2**31)]
            raise Silent(f"{name} loaded other values than the file stores ({bad[:3].tolist()} outside int32)")
    m = min(4, t.n_tokens)
    srp(t, m)
    sch(t, m, 2.0)
    static_sch(t, m, 2.0)
    budget = t.n_layers * t.k * 2
    for policy in ("lru", "lfuda", "belady", "consistency"):
        simulate(t, policy, budget)
    if t.lookahead_ids is not None:
        simulate(t, "lru", budget, prefetch=True)
        lookahead_precision(t)


def run_calibration(path: Path) -> None:
    import moelite

    with moelite.load(path, n_ctx=16, n_threads=1, prefetch=False):
        pass


def run_split(path: Path) -> None:
    """Open the set from case.json's shard: a refusal (moelite.errors) or finite logits; bit-identical to the
    unsplit model's, over the shards in order, when no mutation changed what matters; a refusal when one broke it."""
    import moelite

    case = json.loads((path / "case.json").read_text())
    why = "; ".join(case["why"])
    opts = dict(SPLIT_LOAD, memory_budget=case["budget"]) if case["budget"] else dict(SPLIT_LOAD)
    try:
        with moelite.load(path / case["open"], **opts) as m:
            logits = np.asarray(m.logits(SPLIT_IDS))
            files = m.info()["files"]
    except moelite.errors.MoeliteError as e:
        if case["expect"] == "same":
            raise Silent(f"a valid set refused ({why}): {type(e).__name__}: {e}") from None
        raise
    if not np.isfinite(logits).all():
        raise Silent(f"logits not finite ({int((~np.isfinite(logits)).sum())} values; {why})")
    if case["expect"] == "broken":
        raise Silent(f"a broken set loaded from {case['open']} ({why})")
    if case["expect"] == "same":
        ref = np.load(case["ref"])
        if logits.shape != ref.shape or logits.tobytes() != ref.tobytes():
            diff = float(np.abs(logits - ref).max()) if logits.shape == ref.shape else float("nan")
            raise Silent(f"logits differ from the unsplit model's (max |diff| {diff}; {why})")
        if files != [str(path / f) for f in case["files"]]:
            raise Silent(f"info()['files'] = {files}, expected the {len(case['files'])} shards in order ({why})")


RUNNERS = {
    "gguf": run_gguf,
    "hf": run_hf,
    "trace": run_trace,
    "calibration": run_calibration,
    "split": run_split,
    "api": run_api,
}


def classify(target: str, path: Path) -> dict[str, str]:
    """Run one case in this (child) process: {"class", "detail"}."""
    import moelite

    try:
        RUNNERS[target](path)
        return {"class": "ok", "detail": ""}
    except Silent as e:
        return {"class": "silent", "detail": str(e)}
    except moelite.errors.MoeliteError as e:
        return {"class": "moelite", "detail": f"{type(e).__name__}: {e}"}
    except MemoryError as e:
        return {"class": "memory", "detail": f"MemoryError: {e}"}
    except BaseException as e:  # noqa: BLE001 - classified, not handled
        return {"class": "other", "detail": f"{type(e).__name__}: {e}\n" + traceback.format_exc()[-3000:]}


def child_main(target: str, paths: list[Path], wfd: int, mem: int, err_path: Path) -> None:
    """In the forked child: limits, then each case in turn, one JSON line {"class", "detail"} per case on the
    pipe; _exit."""
    try:
        fd = os.open(err_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(fd, 2)
        os.dup2(fd, 1)
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
        import warnings

        warnings.simplefilter("ignore")
        results = (classify(target, path) for path in paths)
        for res in results:
            os.write(wfd, (json.dumps(res)[:60000] + "\n").encode())
    except BaseException as e:  # noqa: BLE001
        with contextlib.suppress(Exception):
            os.write(
                wfd, (json.dumps({"class": "other", "detail": f"harness: {type(e).__name__}: {e}"}) + "\n").encode()
            )
    os._exit(0)


def rss(pid: int) -> int:
    """Resident set size of a process in bytes (0 once it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def run_case(target: str, path: Path, timeout: float, mem: int, rss_limit: int = 0) -> tuple[str, str]:
    """One case in a forked child: RLIMIT_AS `mem`, killed past `timeout` seconds (hang) or, with rss_limit, as soon
    as its resident memory passes rss_limit bytes (memory; polled every 20 ms)."""
    return run_batch(target, [path], timeout, mem, rss_limit)[0]


def run_batch(target: str, paths: list[Path], timeout: float, mem: int, rss_limit: int = 0) -> list[tuple[str, str]]:
    """Cases one after the other in forked children: (class, detail) per path. The first child runs them all (no
    fork, no scheduler wake-up between cheap cases); when it dies, hangs (`timeout` seconds without a result) or
    passes rss_limit, the case it was running gets that class and a fresh child goes on with the next one. With
    several paths, any case not ok or moelite is run again alone in a fresh child and that run decides (a batch
    child's state, such as memory grown over earlier cases, never convicts a case)."""
    out: list[tuple[str, str]] = []
    while len(out) < len(paths):
        out += _run_children(target, paths[len(out) :], timeout, mem, rss_limit)
    if len(paths) > 1:
        for i, (cls, _) in enumerate(out):
            if cls not in ("ok", "moelite"):
                out[i] = _run_children(target, paths[i : i + 1], timeout, mem, rss_limit)[0]
    return out


def _run_children(target: str, paths: list[Path], timeout: float, mem: int, rss_limit: int) -> list[tuple[str, str]]:
    """One forked child over paths: the results it reported, plus the class of the case it stopped in if it did."""
    err_path = paths[0].parent / "stderr.txt"
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        child_main(target, paths, w, mem, err_path)
    os.close(w)
    got: list[tuple[str, str]] = []
    buf, deadline, status, hung, peak = b"", time.monotonic() + timeout, None, False, 0
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            os.kill(pid, signal.SIGKILL)
            hung = True
            break
        if rss_limit:
            peak = max(peak, rss(pid))
            if peak > rss_limit:
                os.kill(pid, signal.SIGKILL)
                break
        ready, _, _ = select.select([r], [], [], min(left, 0.02 if rss_limit else 0.5))
        if ready:
            b = os.read(r, 65536)
            if not b:
                break
            buf += b
            *lines, buf = buf.split(b"\n")
            for line in lines:
                try:
                    res = json.loads(line)
                    got.append((res["class"], res["detail"]))
                except ValueError:
                    got.append(("other", f"unreadable result line {line[:200]!r}"))
                deadline = time.monotonic() + timeout  # each case has its own timeout
                peak = 0
    _, status = os.waitpid(pid, 0)
    os.close(r)
    if len(got) >= len(paths):
        return got[: len(paths)]
    stderr_tail = err_path.read_text(errors="replace")[-1500:] if err_path.exists() else ""
    if hung:
        return got + [("hang", f"no result after {timeout:.0f} s\n{stderr_tail}")]
    if rss_limit and peak > rss_limit:
        return got + [
            ("memory", f"resident memory {peak >> 20} MiB, past the limit of {rss_limit >> 20} MiB\n{stderr_tail}")
        ]
    if os.WIFSIGNALED(status):
        sig = signal.Signals(os.WTERMSIG(status)).name
        mem_words = ("failed to allocate", "out of memory", "bad_alloc", "Cannot allocate")
        cls = "memory" if any(wd in stderr_tail for wd in mem_words) else "signal"
        return got + [(cls, f"{sig}\n{stderr_tail}")]
    return got + [("other", f"no result (exit status {os.WEXITSTATUS(status)})\n{stderr_tail}")]


# ==== seeds and the campaign ================================================================================
def build_seeds(cache: Path) -> dict[str, Any]:
    """Seed files (built once by tests/ helpers in a subprocess, cached under `cache`)."""
    manifest = cache / "seeds.json"
    if manifest.exists():
        seeds = json.loads(manifest.read_text())
        if all(Path(p).exists() for p in seeds["gguf"] + seeds["hf"] + [seeds["model"]]):
            return seeds
    cache.mkdir(parents=True, exist_ok=True)
    code = f"""
import json, sys
sys.path.insert(0, {str(ROOT / "tests")!r})
from fixture_models import fixture_gguf
from hf_fixtures import make_hf_model
gg = [str(fixture_gguf(f, t)[1]) for f, t in {list(GGUF_FAMILIES)!r}]
hf = [str(make_hf_model(f)) for f in {list(HF_FAMILIES)!r}]
print(json.dumps({{"gguf": gg, "hf": hf}}))
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    if r.returncode != 0:
        raise SystemExit(f"building fuzz seeds failed:\n{r.stderr[-3000:]}")
    built = json.loads(r.stdout.strip().splitlines()[-1])
    demo = ROOT / "src" / "moelite" / "data" / "demo.gguf"
    seeds = {
        "gguf": ([str(demo)] if demo.exists() else []) + built["gguf"],
        "hf": built["hf"],
        "model": built["gguf"][0],
    }
    seeds["calibration"] = calibration_seed(Path(seeds["model"]))
    manifest.write_text(json.dumps(seeds))
    return seeds


def calibration_seed(model: Path) -> dict[str, Any]:
    """What `moelite analyze` writes for `model`, from a synthetic trace of the model's shape."""
    from moelite import _core
    from moelite.cache_policies.calibration import calibrate
    from moelite.cache_policies.trace import Trace

    meta = _core.read_gguf(str(model))
    kv = meta["kv"]
    arch = kv["general.architecture"]
    n_layers = sum(1 for name, *_ in meta["tensors"] if name.endswith("ffn_gate_exps.weight"))
    n_expert, k = int(kv[f"{arch}.expert_count"]), int(kv[f"{arch}.expert_used_count"])
    rng = np.random.default_rng(0)
    ids = np.stack([np.stack([rng.choice(n_expert, k, replace=False) for _ in range(n_layers)]) for _ in range(64)])
    calib = calibrate(Trace(ids=ids, n_expert=n_expert), n_layers * k * 2)
    return {key: (v.tolist() if isinstance(v, np.ndarray) else v) for key, v in calib.items()}


@functools.cache
def core_identity() -> str:
    """A digest of the compiled core the cases will run (found without importing it): cached reference logits were
    computed by one build, and a change of kernels may change their last bits, so a cache from another build is
    rebuilt rather than reported as a silent mismatch."""
    import hashlib
    import importlib.util

    spec = importlib.util.find_spec("moelite")
    folder = Path(spec.origin).parent if spec and spec.origin else None
    libs = sorted(folder.glob("_core*")) if folder else []
    return hashlib.sha256(b"".join(p.read_bytes() for p in libs)).hexdigest()[:16] if libs else "none"


def split_seeds(cache: Path, seeds: dict[str, Any]) -> list[dict[str, Any]]:
    """The split target's seed sets (the GGUF seeds but the demo, built once in a subprocess, cached for one build
    of the core)."""
    manifest = cache / "split.json"
    models = [p for p in seeds["gguf"] if Path(p).parent.name != "data"]
    core = core_identity()
    if manifest.exists():
        doc = json.loads(manifest.read_text())
        built = doc.get("sets", []) if isinstance(doc, dict) else []
        if (
            isinstance(doc, dict)
            and doc.get("core") == core
            and [b["model"] for b in built] == models
            and all(
                Path(p).exists()
                for b in built
                for shards in b["sets"].values()
                for p in shards + list(b["ref"].values())
            )
        ):
            return built
    built = built_in_subprocess(f"build_split_seed_sets(Path({str(cache)!r}), {models!r})", "split seed sets")
    manifest.write_text(json.dumps({"core": core, "sets": built}, indent=1))
    return built


def built_in_subprocess(call: str, what: str) -> Any:
    """fuzz.CALL's JSON result, computed in a fresh interpreter (seed models are loaded there, never in the harness
    that forks the cases)."""
    code = f"""
import json, sys
from pathlib import Path
sys.path.insert(0, {str(ROOT / "tools")!r})
import fuzz
print(json.dumps(fuzz.{call}))
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    if r.returncode != 0:
        raise SystemExit(f"building {what} failed:\n{r.stderr[-3000:]}{r.stdout[-1000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def api_seeds(cache: Path, seeds: dict[str, Any]) -> dict[str, Any]:
    """The api target's seed (build_api_seed in a subprocess, cached next to the other seeds for one build of the
    core: its reference greedy tokens are that build's)."""
    manifest = cache / "api.json"
    core = core_identity()
    if manifest.exists():
        built = json.loads(manifest.read_text())
        if (
            built.get("core") == core
            and built["model"] == seeds["model"]
            and Path(built["trace"]).exists()
            and "min_budget" in built
        ):
            return built
    built = built_in_subprocess(f"build_api_seed(Path({str(cache)!r}), {seeds['model']!r})", "the api seed")
    built["core"] = core
    manifest.write_text(json.dumps(built, indent=1))
    return built


def make_case(target: str, rng: random.Random, seeds: dict[str, Any], d: Path) -> Path:
    """Write one mutated input under the empty folder d; returns the path the runner takes."""
    if target == "split":
        return make_split_case(rng, seeds, d)
    if target == "api":
        return make_api_case(rng, seeds, d)
    if target == "gguf":
        src = Path(rng.choice(seeds["gguf"]))
        p = d / "case.gguf"
        p.write_bytes(mutate_gguf(rng, src.read_bytes()))
        return p
    if target == "hf":
        p = d / "hf"
        shutil.copytree(rng.choice(seeds["hf"]), p)
        for _ in range(rng.choice([1, 1, 2])):
            mutate_hf(rng, p)
        return p
    if target == "trace":
        arrays = seed_trace_arrays(rng)
        for _ in range(rng.choice([0, 1, 1, 2])):
            if arrays:
                arrays = mutate_trace_arrays(rng, arrays)
        p = d / "case.npz"
        write_trace_file(rng, arrays, p)
        return p
    p = d / "model.gguf"
    os.symlink(seeds["model"], p)
    doc = json.loads(json.dumps(seeds["calibration"]))
    for _ in range(rng.choice([1, 1, 2])):
        doc = mutate_json_value(
            rng,
            doc,
            lambda path: bool(path) and str(path[0]).rsplit(".", 1)[-1] in ("policy", "m", "layer_shares", "policy_id"),
        )
    (d / "model.gguf.calibration.json").write_bytes(dump_json(doc, rng))
    return p


def address_space() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    return 0


def commit() -> str:
    r = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(
        ["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True
    ).stdout.strip()
    return r.stdout.strip() + ("+dirty" if dirty else "")


@dataclass
class Campaign:
    out: Path
    seed: int
    timeout: float
    mem: int
    rss: int = 0  # resident memory a case may add to the harness's (0: unwatched; the api target: 1 GiB at least)
    batch: int = 1  # cases per forked child for the BATCHED targets (run_batch)
    counts: dict[str, dict[str, int]] = field(default_factory=dict)
    examples: list[dict[str, str]] = field(default_factory=list)
    commit: str = field(default_factory=commit)  # of the tree the campaign starts on

    def run(self, target: str, n: int, seeds: dict[str, Any], progress: bool) -> None:
        counts = self.counts.setdefault(target, {c: 0 for c in CLASSES})
        work = self.out / "work"
        batch = self.batch if target in BATCHED else 1
        for start in range(0, n, batch):
            cases: list[tuple[int, Path, tuple[str, str] | None]] = []  # (i, path, result when not run)
            for i in range(start, min(n, start + batch)):
                rng = random.Random(f"{self.seed}:{target}:{i}")  # case i is the same whatever the batch size
                d = work / f"{target}-{i}"
                shutil.rmtree(d, ignore_errors=True)
                d.mkdir(parents=True)
                try:
                    cases.append((i, make_case(target, rng, seeds, d), None))
                except Exception as e:  # noqa: BLE001 - a mutator bug: count it apart, keep going
                    detail = f"mutator: {type(e).__name__}: {e}\n" + traceback.format_exc()[-2000:]
                    cases.append((i, d, ("skipped", detail)))
            todo = [path for _, path, res in cases if res is None]
            results = iter(run_batch(target, todo, *self.limits(target)) if todo else [])
            for i, path, res in cases:
                cls, detail = res or next(results)
                counts[cls] += 1
                if cls not in ("ok", "moelite"):
                    self.keep(target, cls, i, path, detail)
                shutil.rmtree(work / f"{target}-{i}", ignore_errors=True)
                if progress and (i + 1) % 50 == 0:
                    done = " ".join(f"{c}={v}" for c, v in counts.items() if v)
                    print(f"  {target}: {i + 1}/{n} {done}", flush=True)

    def limits(self, target: str) -> tuple[float, int, int]:
        """timeout, RLIMIT_AS and resident-memory limit of a case. The api target measures resident memory (--rss above
        the harness's, issue 33) and leaves address space loose: a legal n_threads = 512 reserves 512 thread stacks
        of virtual memory that are never touched."""
        if target == "api":
            return self.timeout, API_ADDRESS_SPACE + address_space(), max(self.rss, 1 << 30) + rss(os.getpid())
        return self.timeout, self.mem + address_space(), self.rss + rss(os.getpid()) if self.rss else 0

    def keep(self, target: str, cls: str, i: int, path: Path, detail: str) -> None:
        dst_dir = self.out / target / cls
        dst_dir.mkdir(parents=True, exist_ok=True)
        name = f"s{self.seed}-{i}"
        src = path if target != "calibration" else path.parent / "model.gguf.calibration.json"
        if src.is_dir():
            shutil.copytree(src, dst_dir / name, dirs_exist_ok=True)
        elif src.exists():
            shutil.copy(src, dst_dir / (name + "".join(src.suffixes[-1:])))
        (dst_dir / f"{name}.txt").write_text(detail)
        self.examples.append(
            {"target": target, "class": cls, "case": name, "detail": detail.splitlines()[0][:300] if detail else ""}
        )

    def summary(self) -> dict[str, Any]:
        return {
            "seed": self.seed,
            "commit": self.commit,
            "timeout_s": self.timeout,
            "mem_limit": self.mem,
            "rss_limit": self.rss,
            "counts": self.counts,
            "kept": self.examples,
        }


def table(counts: dict[str, dict[str, int]]) -> str:
    rows = [f"{'target':<12}" + "".join(f"{c:>9}" for c in CLASSES) + f"{'total':>9}"]
    for t, cs in counts.items():
        rows.append(f"{t:<12}" + "".join(f"{cs[c]:>9}" for c in CLASSES) + f"{sum(cs.values()):>9}")
    return "\n".join(rows)


def parse_size(s: str) -> int:
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    s = s.strip().lower().removesuffix("ib").removesuffix("b")
    return int(float(s[:-1]) * units[s[-1]]) if s and s[-1] in units else int(s)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--cases", type=int, default=100, help="cases per target")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--target", choices=(*TARGETS, "all"), default="all")
    ap.add_argument("--out", type=Path, default=Path("fuzz-out"), help="summary.json and reproducers go here")
    ap.add_argument("--timeout", type=float, default=20.0, help="seconds per case before it counts as a hang")
    ap.add_argument("--mem", default="2GiB", help="address space a case may add to the harness's own")
    ap.add_argument(
        "--rss", default="1GiB", help="resident memory a case may add to the harness's own (polled; 0: unwatched)"
    )
    ap.add_argument(
        "--batch",
        type=int,
        default=50,
        help="trace and api: cases per forked child (a failing case is re-run alone to be classified; 1: one each)",
    )
    ap.add_argument("--seeds-cache", type=Path, default=ROOT / "tests" / ".fixtures" / "fuzz")
    ap.add_argument("--quiet", action="store_true")
    a = ap.parse_args(argv)
    sys.path.insert(0, str(ROOT / "tests"))
    import moelite  # noqa: F401 - imported before forking, so each case starts warm

    seeds = build_seeds(a.seeds_cache)
    if a.target in ("split", "all"):
        seeds["split"] = split_seeds(a.seeds_cache, seeds)
    if a.target in ("trace", "api", "all"):
        import moelite.cache_policies  # noqa: F401 - imported once before forking: 0.3 s a case otherwise
    if a.target in ("api", "all"):
        seeds["api"] = api_seeds(a.seeds_cache, seeds)
        import moelite.apps.cli

        moelite.apps.cli.build_parser()  # imports every command's module (a CLI case in a fresh child: 0.2 s)
    a.out.mkdir(parents=True, exist_ok=True)
    camp = Campaign(a.out, a.seed, a.timeout, parse_size(a.mem), parse_size(a.rss), batch=max(1, a.batch))
    for target in TARGETS if a.target == "all" else (a.target,):
        camp.run(target, a.cases, seeds, not a.quiet)
    shutil.rmtree(a.out / "work", ignore_errors=True)
    summary = camp.summary()
    (a.out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(f"seed {a.seed}, commit {summary['commit']}, {a.cases} cases per target\n{table(camp.counts)}")
    bad = sum(cs[c] for cs in camp.counts.values() for c in ("other", "signal", "hang", "memory", "silent", "skipped"))
    if bad:
        print(f"{bad} case(s) kept under {a.out}/<target>/<class>/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
