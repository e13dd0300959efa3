"""This machine's memory and disk read bandwidth, measured once and cached in ~/.cache/moelite/machine.json
(the two numbers of the decode roofline)."""
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
