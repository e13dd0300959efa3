"""This machine's memory and disk read bandwidth (the two numbers of the decode roofline) and the cost of a
decode step that bandwidth does not explain (per-layer compute and synchronisation, measured on the embedded
demo model), measured once and cached in ~/.cache/moelite/machine.json."""
from __future__ import annotations

import json
import mmap
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from .common import cache_dir

MEM_BYTES = 128 << 20     # array copied for the memory bandwidth (x3, best taken)
DISK_BYTES = 64 << 20     # file read back for the disk bandwidth
CHUNK = 4 << 20
N_PROBE = 64              # decode steps of the step-overhead probe


def machine_file() -> Path:
    return cache_dir() / "machine.json"


def bandwidths(remeasure: bool = False) -> dict:
    """{'mem_bw': bytes/s, 'disk_bw': bytes/s, 'disk_method': 'o_direct' | 'buffered (page cache dropped)'}."""
    path = machine_file()
    if not remeasure and path.is_file():
        try:
            d = json.loads(path.read_text())
            if d.get("mem_bw", 0) > 0 and d.get("disk_bw", 0) > 0:
                return d
        except (OSError, ValueError):
            pass
    d = {"mem_bw": memory_bandwidth(), **disk_bandwidth(path.parent), "measured_at": time.time()}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(d, indent=1))
    os.replace(tmp, path)
    return d


def step_overhead(n_threads: int, mem_bw: float, remeasure: bool = False) -> float:
    """Seconds per layer of a resident decode step beyond moving its weights at mem_bw: the embedded demo model
    (resident) decodes N_PROBE tokens after 64; (mean step - active bytes / mem_bw) / layers. Cached per thread
    count; measure on a quiet machine (--remeasure)."""
    path = machine_file()
    key = f"step_overhead_t{n_threads}"
    try:
        d = json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, ValueError):
        d = {}
    if not remeasure and isinstance(d.get(key), (int, float)) and d[key] >= 0:
        return float(d[key])
    from ..runtime.model import default_model_path, load
    from .plan import active_bytes
    with load(default_model_path(), n_threads=n_threads, n_ctx=160, use_calibration=False) as m:
        m.eval([(7 * i + 3) % m.n_vocab for i in range(64)])
        t = time.perf_counter()
        for i in range(N_PROBE):                # mean step, as decode speed is measured everywhere else
            m.eval([(11 * i + 5) % m.n_vocab])
        step = (time.perf_counter() - t) / N_PROBE
        emb = m.tensors["token_embd.weight"][3] if "output.weight" in m.tensors else 0
        per_layer = (step - active_bytes(m.plan, emb) / mem_bw) / m.hparams["n_layer"]
    d[key] = max(per_layer, 0.0)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(d, indent=1))
    os.replace(tmp, path)
    return d[key]


def memory_bandwidth() -> float:
    """Bytes moved per second by a large numpy copy (read + write)."""
    src = np.ones(MEM_BYTES // 8)
    dst = np.empty_like(src)
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - t)
    return 2 * MEM_BYTES / best


def disk_bandwidth(directory: Path) -> dict:
    """Sequential read speed of a fresh temp file in `directory`, bypassing the page cache (O_DIRECT when
    the file system allows it, else buffered after asking the kernel to drop the file's pages)."""
    directory.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=".diskbench-", dir=directory)
    try:
        block = os.urandom(CHUNK)
        for _ in range(DISK_BYTES // CHUNK):
            os.write(fd, block)
        os.fsync(fd)
        os.close(fd)
        fd = -1
        try:
            return {"disk_bw": _read(name, os.O_DIRECT), "disk_method": "o_direct"}
        except (OSError, AttributeError):
            return {"disk_bw": _read(name, 0), "disk_method": "buffered (page cache dropped)"}
    finally:
        if fd >= 0:
            os.close(fd)
        os.unlink(name)


def _read(name: str, flags: int) -> float:
    fd = os.open(name, os.O_RDONLY | flags)
    try:
        if not flags and hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        buf = mmap.mmap(-1, CHUNK)              # page-aligned, as O_DIRECT needs
        n, t = 0, time.perf_counter()
        while True:
            got = os.readv(fd, [buf])
            if got <= 0:
                break
            n += got
        dt = time.perf_counter() - t
        buf.close()
        return n / dt if dt > 0 else float("inf")
    finally:
        os.close(fd)
