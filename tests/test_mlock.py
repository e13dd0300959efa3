"""Where the dense (non-expert) weights live: anonymous memory (the default), mlock'ed on request (mlock=True /
--mlock), or, behind the benchmark switch MOELITE_DENSE_MMAP=1, the model file's pages in the page cache as llama.cpp
holds them (bench/DENSE.md measures the difference under a memory cap).

- mlock=True locks the dense weights and the KV cache: VmLck grows by at least their bytes, info() says how much,
  closing the model unlocks it; logits are bit-identical with and without.
- A refused mlock (RLIMIT_MEMLOCK 0, no CAP_IPC_LOCK) is a RuntimeWarning naming the errno, the limit and the bytes
  not locked; the model loads and runs.
- A non-bool mlock is a UsageError naming the option.
- MOELITE_DENSE_MMAP=1 (in a subprocess, as the switch is read at load) gives logits bit-identical to the default
  with repack=False: resident, offloaded at the minimum budget, and for a split set (each tensor in its shard).
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import moelite
from moelite.errors import BudgetError, UsageError

TESTS = Path(__file__).resolve().parent
IDS = [3, 17, 42, 99, 7, 250, 11, 5]


@pytest.fixture(scope="module")
def gguf():
    from fixture_models import fixture_gguf

    return fixture_gguf("qwen3_moe")[1]


def vm_locked() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("VmLck:"):
            return int(line.split()[1]) * 1024
    pytest.skip("no VmLck in /proc/self/status")


def logits(path, **opts) -> np.ndarray:
    with moelite.load(path, n_threads=1, n_ctx=64, **opts) as m:
        return m._eval(IDS, n_out=len(IDS))


def min_budget(path) -> int:
    try:
        moelite.load(path, n_threads=1, n_ctx=64, memory_budget=1)
    except BudgetError as e:
        return e.minimum
    raise AssertionError("a 1-byte budget was accepted")


def test_mlock_locks_the_dense_weights_and_kv_cache(gguf):
    before = vm_locked()
    m = moelite.load(gguf, n_threads=1, n_ctx=64, mlock=True)
    info = m.info()
    assert info["mlock"] is True
    assert info["locked_bytes"] >= info["dense_bytes"] + info["kv_bytes"]
    assert vm_locked() - before == info["locked_bytes"]
    m.close()
    del m
    gc.collect()
    assert vm_locked() == before  # unlocked (and freed) at close


def test_mlock_off_locks_nothing(gguf):
    before = vm_locked()
    with moelite.load(gguf, n_threads=1, n_ctx=64) as m:
        assert m.info()["mlock"] is False and m.info()["locked_bytes"] == 0
        assert vm_locked() == before


@pytest.mark.parametrize("offloaded", [False, True])
def test_mlock_is_bit_identical(gguf, offloaded):
    opts = {"memory_budget": min_budget(gguf)} if offloaded else {}
    assert np.array_equal(logits(gguf, **opts), logits(gguf, mlock=True, **opts))


@pytest.mark.parametrize("bad", ["yes", 1, None, 0.0])
def test_mlock_must_be_a_bool(gguf, bad):
    with pytest.raises(UsageError, match="mlock"):
        moelite.load(gguf, n_threads=1, n_ctx=64, mlock=bad)


def test_cli_has_mlock_flag():
    import argparse

    from moelite.apps.common import add_common

    p = argparse.ArgumentParser()
    add_common(p)
    assert p.parse_args(["m.gguf", "--mlock"]).mlock is True
    assert p.parse_args(["m.gguf"]).mlock is False


# The child drops what lets it lock past RLIMIT_MEMLOCK: the limit goes to 0 and, as root, CAP_IPC_LOCK leaves its
# effective and permitted sets (capget/capset, version 3).
REFUSED = textwrap.dedent("""
    import ctypes, json, os, resource, sys, warnings
    resource.setrlimit(resource.RLIMIT_MEMLOCK, (0, 0))
    if os.geteuid() == 0:
        class Header(ctypes.Structure):
            _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]
        class Data(ctypes.Structure):
            _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]
        libc = ctypes.CDLL(None, use_errno=True)
        h, d = Header(0x20080522, 0), (Data * 2)()
        assert libc.capget(ctypes.byref(h), d) == 0
        CAP_IPC_LOCK = 14
        d[0].effective &= ~(1 << CAP_IPC_LOCK)
        d[0].permitted &= ~(1 << CAP_IPC_LOCK)
        assert libc.capset(ctypes.byref(h), d) == 0, ctypes.get_errno()
    import numpy as np
    import moelite
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        m = moelite.load(sys.argv[1], n_threads=1, n_ctx=64, mlock=True)
    out = m._eval([3, 17, 42, 99], n_out=4)
    print(json.dumps({"warnings": [(c.category.__name__, str(c.message)) for c in w], "info": m.info()["locked_bytes"],
                      "finite": bool(np.isfinite(out).all())}))
""")


def test_refused_mlock_is_a_warning_not_an_error(gguf):
    r = subprocess.run(
        [sys.executable, "-c", REFUSED, str(gguf)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout.strip().splitlines()[-1])
    mine = [msg for cat, msg in got["warnings"] if cat == "RuntimeWarning" and msg.startswith("mlock")]
    assert len(mine) == 1, got["warnings"]
    msg = mine[0]
    assert "not locked" in msg and "RLIMIT_MEMLOCK is 0 bytes" in msg
    assert "EPERM" in msg or "ENOMEM" in msg or "EAGAIN" in msg
    assert got["info"] == 0 and got["finite"]


# --- MOELITE_DENSE_MMAP=1: the benchmark's "without" (dense weights in the page cache) ------------------------------
MAPPED = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    import moelite
    opts = json.loads(sys.argv[2])
    with moelite.load(sys.argv[1], n_threads=1, n_ctx=64, repack=False, **opts) as m:
        info = m.info()
        np.save(sys.argv[3], m._eval(%r, n_out=%d))
    print(json.dumps({"dense_mmap": info["dense_mmap"], "dense_bytes": info["dense_bytes"],
                      "locked_bytes": info["locked_bytes"]}))
"""
    % (IDS, len(IDS))
)


def mapped_logits(path, tmp_path, **opts) -> tuple[np.ndarray, dict]:
    out = tmp_path / "mapped.npy"
    r = subprocess.run(
        [sys.executable, "-c", MAPPED, str(path), json.dumps(opts), str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "MOELITE_DENSE_MMAP": "1", "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    assert r.returncode == 0, r.stderr
    return np.load(out), json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("offloaded", [False, True])
def test_dense_mmap_is_bit_identical_without_repack(gguf, tmp_path, offloaded):
    opts = {"memory_budget": min_budget(gguf)} if offloaded else {}
    with moelite.load(gguf, n_threads=1, n_ctx=64, repack=False, **opts) as m:
        assert m.info()["dense_mmap"] is False  # the default: anonymous memory
        dense = m.info()["dense_bytes"]
        ref = m._eval(IDS, n_out=len(IDS))
    got, info = mapped_logits(gguf, tmp_path, **opts)
    assert info["dense_mmap"] is True
    assert info["dense_bytes"] <= dense  # the tensors' bytes, without buffer padding
    assert np.array_equal(ref, got)


def test_dense_mmap_with_mlock_locks_the_mapped_tensors(gguf, tmp_path):
    _, info = mapped_logits(gguf, tmp_path, mlock=True)
    assert info["dense_mmap"] is True and info["locked_bytes"] >= info["dense_bytes"]


def test_dense_mmap_of_a_split_set(gguf, tmp_path):
    import gguf as gguf_py

    from moelite.converters import convert

    n_tensors = len(gguf_py.GGUFReader(gguf).tensors)
    shards = convert(gguf, tmp_path / "m.gguf", "keep", progress=False, split_max_tensors=n_tensors // 3 + 1).files
    assert len(shards) >= 3
    ref = logits(gguf, repack=False)
    got, info = mapped_logits(shards[-1], tmp_path)  # opened from a later shard: the whole set
    assert info["dense_mmap"] is True
    assert np.array_equal(ref, got)
