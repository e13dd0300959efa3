"""The decode-speed model `moelite plan` prints, next to the memory planner whose Plan it reads, and the machine
measurements it needs.

Machine: memory and disk read bandwidth (the two numbers of the decode roofline) and the cost of a decode step that
bandwidth does not explain (per-layer compute and synchronisation, measured on the embedded demo model), measured
once and cached in machine.json in the cache directory (runtime/files.py cache_dir).

Roofline of one decode token: every resident byte used by the token is read from memory once (dense weights
except the embedding table, K experts per MoE layer); each expert that misses the cache is also read from disk. The
range goes from no routing locality (hit rate = slots / experts, misses stall the token) to strong locality (hit
rate = sqrt(slots / experts), reads fully overlapped by prefetch).

Prediction (one number): a step costs layers x the per-layer overhead measured on this machine (step_overhead: the
embedded demo's resident decode minus its bytes) + the token's resident bytes / memory bandwidth + its misses'
bytes / disk bandwidth (reads not overlapped). The hit rate per layer comes from the calibration side file
(`moelite analyze`) when there is one: its simulated hit rate when it was calibrated for this many slots (within
10 %), else the hit rate of keeping each layer's most used experts (its expert frequencies); without a side file,
1 - (1 - slots / experts)^LOCALITY (stated in the output).
"""

from __future__ import annotations

import json
import math
import mmap
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from .files import cache_dir

MEM_BYTES = 128 << 20  # array copied for the memory bandwidth (x3, best taken)
DISK_BYTES = 64 << 20  # file read back for the disk bandwidth
CHUNK = 4 << 20
N_PROBE = 64  # decode steps of the step-overhead probe
# Hit rate without a calibration: 1 - (1 - f)^LOCALITY for a share f of a layer's experts in slots. Fit to the
# trained models measured here (bench/OFFLOAD.md, bench/RESULTS.md: the bench MoE 72-87 % at f = 0.25, 95-97 % at
# f = 0.5; the demo 80-84 % and 95-96 %), on the low side; sqrt(f), the roofline's optimistic bound, is below what
# trained routing gives (50 % and 71 %) and predicted the bench MoE 43-65 % too slow under a cap.
LOCALITY = 4


# --- the speed model ---------------------------------------------------------------------------------------------
def predict_decode(
    plan,
    slots: list[int],
    embd_bytes: int,
    bw: dict,
    model_path: str | None,
    n_threads: int | None = None,
    remeasure: bool = False,
) -> dict:
    """{'tok_s', 'hit_rate' (pooled), 'source', 'threads'}: see the module docstring."""
    threads = n_threads or max(1, min(os.cpu_count() or 1, 8))
    hits, source = layer_hit_rates(plan, slots, model_path)
    K = plan.n_expert_used
    miss = sum(K * b * (1 - h) for h, b in zip(hits, plan.expert_slot_bytes) if b)
    t = (
        len(plan.expert_slot_bytes) * step_overhead(threads, bw["mem_bw"], remeasure)
        + active_bytes(plan, embd_bytes) / bw["mem_bw"]
        + miss / bw["disk_bw"]
    )
    moe = [h for h, b in zip(hits, plan.expert_slot_bytes) if b]
    return {"tok_s": 1 / t, "hit_rate": sum(moe) / max(len(moe), 1), "source": source, "threads": threads}


def layer_hit_rates(plan, slots: list[int], model_path: str | None) -> tuple[list[float], str]:
    """Per-layer hit rate for these slots and where it comes from."""
    E = plan.n_expert
    if plan.slots is None:
        return [1.0] * len(slots), "everything resident"
    calib = {}
    if model_path:
        from ..cache_policies.calibration import load_calibration
        from ..errors import MoeliteError

        try:
            calib = load_calibration(model_path, {})
        except MoeliteError:
            calib = {}
    moe = [i for i, b in enumerate(plan.expert_slot_bytes) if b]
    total = sum(slots[i] for i in moe)
    if calib.get("hit_rate") and abs(total - calib["budget_slots"]) <= 0.1 * calib["budget_slots"]:
        return (
            [calib["hit_rate"] if i in moe else 1.0 for i in range(len(slots))],
            f"simulated by `moelite analyze` for {calib['budget_slots']} slots",
        )
    freq = calib.get("expert_freq")
    if freq and len(freq) == len(moe) * E:
        out = [1.0] * len(slots)
        for j, i in enumerate(moe):
            f = sorted(freq[j * E : (j + 1) * E], reverse=True)
            out[i] = min(1.0, sum(f[: slots[i]]) / max(sum(f), 1e-12))
        return out, "each layer's most used experts kept (expert frequencies of the calibration side file)"
    return (
        [1 - (1 - slots[i] / E) ** LOCALITY if i in moe else 1.0 for i in range(len(slots))],
        f"no calibration side file: assumed 1 - (1 - slots / experts)^{LOCALITY} (trained models measured here); "
        "run `moelite analyze` for a measured one",
    )


def roofline(plan, slots: list[int], embd_bytes: int, mem_bw: float, disk_bw: float) -> tuple[float, float]:
    """(pessimistic, optimistic) decode tok/s."""
    E, K = plan.n_expert, plan.n_expert_used
    t_mem = active_bytes(plan, embd_bytes) / mem_bw
    miss_lo = sum(K * b * (1 - s / E) for s, b in zip(slots, plan.expert_slot_bytes) if b)
    miss_hi = sum(K * b * (1 - math.sqrt(s / E)) for s, b in zip(slots, plan.expert_slot_bytes) if b)
    lo = 1 / (t_mem + miss_lo / disk_bw)
    hi = 1 / max(t_mem, miss_hi / disk_bw)
    return lo, hi


def active_bytes(plan, embd_bytes: int) -> int:
    """Bytes a decode token reads from memory: dense weights but the embedding table (one row of it), and K
    experts per MoE layer."""
    return max(plan.dense_bytes - embd_bytes, 0) + sum(plan.n_expert_used * b for b in plan.expert_slot_bytes)


def embedding_bytes(tensors: dict) -> int:
    """The embedding table, of which a token reads one row (unless it doubles as the output matrix)."""
    t = tensors.get("token_embd.weight")
    return t[3] if t and "output.weight" in tensors else 0


# --- the machine -------------------------------------------------------------------------------------------------
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
    _write_machine(path, d)
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
    from .model import default_model_path, load

    with load(default_model_path(), n_threads=n_threads, n_ctx=160, use_calibration=False) as m:
        m.eval([(7 * i + 3) % m.n_vocab for i in range(64)])
        t = time.perf_counter()
        for i in range(N_PROBE):  # mean step, as decode speed is measured everywhere else
            m.eval([(11 * i + 5) % m.n_vocab])
        step = (time.perf_counter() - t) / N_PROBE
        per_layer = (step - active_bytes(m.plan, embedding_bytes(m.tensors)) / mem_bw) / m.hparams["n_layer"]
    d[key] = max(per_layer, 0.0)
    _write_machine(path, d)
    return d[key]


def _write_machine(path: Path, d: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(d, indent=1))
    os.replace(tmp, path)


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
        buf = mmap.mmap(-1, CHUNK)  # page-aligned, as O_DIRECT needs
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
