"""Speed of the routing-consistency tools on synthetic traces (numbers go into the issue-5 report).

    PYTHONPATH=build/dev python bench/bench_metrics.py            # all
    PYTHONPATH=build/dev python bench/bench_metrics.py srp sch    # some

srp: model-level SRP over 1 M tokens x 16 layers x 64 experts (k = 8, 8 sequences) at m = 4, 16, 64, 256.
sch: model-level SCH of one 512-token sequence, L*E = 16 x 64 = 1024, k = 8 (512 x 128 ids), rho = 2, m = 16.
sim: simulator, 2048 tokens x 16 layers x k = 8 (262 144 accesses), every policy at 2x the active experts.
"""

from __future__ import annotations

import sys
import time

import numpy as np

from moelite.cache_policies.metrics import sch, srp, srp_many
from moelite.cache_policies.simulator import SIM_POLICIES, simulate
from moelite.cache_policies.trace import Trace


def sticky_trace(
    n_tok: int, n_layers: int, n_expert: int, k: int, n_seq: int = 1, stick: float = 0.6, seed: int = 0
) -> Trace:
    """Each (token, layer) row repeats the previous token's row with probability `stick`, else is random."""
    rng = np.random.default_rng(seed)
    ids = np.empty((n_tok, n_layers, k), dtype=np.int32)
    for lo in range(0, n_tok, 1 << 16):  # random top-k rows, in chunks to bound memory
        hi = min(n_tok, lo + (1 << 16))
        ids[lo:hi] = np.argpartition(rng.random((hi - lo, n_layers, n_expert), dtype=np.float32), k, axis=-1)[..., :k]
    keep = rng.random((n_tok, n_layers)) < stick
    keep[0] = False
    # index of the row each row copies: the latest non-kept row at or before it, per layer
    src = np.where(keep, 0, np.arange(n_tok)[:, None])
    np.maximum.accumulate(src, axis=0, out=src)
    ids = np.take_along_axis(ids, src[:, :, None], axis=0)
    offsets = np.linspace(0, n_tok, n_seq + 1).astype(np.int64)
    return Trace(ids=ids, n_expert=n_expert, offsets=offsets, model="synthetic")


def timed(label: str, fn):
    """Run fn, print wall and CPU seconds (the machine is shared: CPU time is the steadier number)."""
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    print(f"{label:60s} {time.perf_counter() - t0:8.2f} s wall {time.process_time() - c0:8.2f} s cpu", flush=True)
    return out


def bench_srp() -> None:
    trace = timed("build 1M x 16 x 64 trace (k=8)", lambda: sticky_trace(1 << 20, 16, 64, 8, n_seq=8))
    timed(
        "validate it (Trace construction, as load_trace does)",
        lambda: Trace(ids=trace.ids, n_expert=64, offsets=trace.offsets),
    )
    t0, c0 = time.perf_counter(), time.process_time()
    for m in (4, 16, 64, 256):
        r = timed(f"srp model m={m}", lambda m=m: srp(trace, m))
        print(f"   value={r.value:.4f} alpha={r.alpha} rho_hat={r.rho_hat:.3f}")
    print(
        f"{'srp model, all four m, one call each':60s} {time.perf_counter() - t0:8.2f} s wall "
        f"{time.process_time() - c0:8.2f} s cpu"
    )
    timed("srp_many model, m = 4, 16, 64, 256 in one pass", lambda: srp_many(trace, (4, 16, 64, 256)))


def bench_sch() -> None:
    trace = sticky_trace(512, 16, 64, 8)
    for level in ("model", "layer"):
        val = timed(
            f"sch {level} level, 512 tok, L*E=1024, k=8, rho=2, m=16", lambda level=level: sch(trace, 16, 2.0, level)
        )
        print("   value", np.round(val, 4))


def bench_sim() -> None:
    trace = sticky_trace(2048, 16, 64, 8)
    n = trace.ids.size
    for policy in SIM_POLICIES:
        for prefetch in (False, True):
            t0 = time.perf_counter()
            r = simulate(trace, policy, 2 * 16 * 8, prefetch=prefetch, precision=0.8 if prefetch else None)
            dt = time.perf_counter() - t0
            print(
                f"sim {policy:12s} prefetch={prefetch!s:5s} hit={r.hit_rate:.4f} {dt:6.2f} s "
                f"({1e6 * dt / n:.2f} us/access)"
            )


if __name__ == "__main__":
    which = sys.argv[1:] or ["srp", "sch", "sim"]
    for name in which:
        globals()[f"bench_{name}"]()
