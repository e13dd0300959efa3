"""Where a capped decode step's time goes (issue 34): Model.stats()['per_token'] splits the decode steps since
reset_stats() into waiting for expert reads, the expert cache's bookkeeping and the rest (compute, graphs), from
the runtime's own clocks; the cache's counters carry the same split per layer (wait_s, book_s) and count the
queued prefetches a step came to need and moved ahead of the other prefetches (promoted). None of it changes a
bit: the offloaded run with prefetch equals the resident one."""

from __future__ import annotations

import numpy as np
from fixture_models import fixture_gguf

import moelite

PROMPT = list(range(5, 37))
STEPS = list(range(40, 64))


def decode(path, **opts):
    with moelite.load(str(path), kv_type="f32", n_threads=1, n_ubatch=64, **opts) as m:
        m.eval(PROMPT)
        m.reset_stats()
        rows = np.stack([m.eval([t]) for t in STEPS])
        return rows, m.stats()


def test_per_token_breakdown_adds_up_and_changes_no_bit():
    _, path = fixture_gguf("qwen3_moe")
    full, st_full = decode(path)
    with moelite.load(str(path), kv_type="f32", n_threads=1, n_ubatch=64) as m:
        minimum = m.plan.minimum_budget
    capped, st = decode(path, memory_budget=minimum, prefetch=True)
    assert np.array_equal(capped, full)
    pt = st["per_token"]
    assert pt["steps"] == len(STEPS)
    parts = pt["io_wait_ms"] + pt["cache_ms"] + pt["compute_ms"]
    assert abs(parts - pt["step_ms"]) < 1e-6 * max(1.0, pt["step_ms"])
    assert pt["io_wait_ms"] >= 0 and pt["cache_ms"] > 0 and pt["compute_ms"] > 0
    total = st["total"]
    assert total["misses"] > 0 and total["book_s"] > 0 and total["promoted"] >= 0
    # the per-token split is the cache's own counters over the same steps
    assert abs(total["wait_s"] * 1e3 / len(STEPS) - pt["io_wait_ms"]) < 1e-6
    # resident: nothing to wait for
    assert st_full["per_token"]["io_wait_ms"] == 0.0 and st_full["total"]["wait_s"] == 0.0


def test_no_decode_steps_no_breakdown():
    _, path = fixture_gguf("qwen3_moe")
    with moelite.load(str(path), n_threads=1) as m:
        m.eval(PROMPT)
        m.reset_stats()
        assert m.stats()["per_token"] is None
