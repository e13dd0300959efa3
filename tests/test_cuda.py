"""The CUDA path (build with -DMOELITE_CUDA=ON; skips without a visible GPU): dense weights, KV cache and the
expert arena in VRAM, misses read from disk through a host staging buffer. Greedy tokens equal the CPU
path's on every fixture family; logits agree to a tolerance (GPU reductions differ from the CPU's)."""

from __future__ import annotations

import numpy as np
import pytest
from fixture_models import RUNTIME_FAMILIES, fixture_gguf

import moelite
from moelite import _core

pytestmark = pytest.mark.skipif(
    not (_core.has_cuda and _core.cuda_device_count() > 0),
    reason="no CUDA device visible (or a build without MOELITE_CUDA)",
)
LOGIT_TOL = 2e-3  # measured max |CPU - CUDA| on the fixtures is reported by the test output


@pytest.mark.parametrize("family", RUNTIME_FAMILIES)
def test_cuda_matches_cpu(family):
    _, path = fixture_gguf(family)
    ids = [(7 * i + 3) % 300 for i in range(16)]
    with (
        moelite.load(path, kv_type="f32", device="cpu", n_threads=2) as c,
        moelite.load(path, kv_type="f32", device="cuda") as g,
    ):
        assert g.info()["device"] == "cuda"
        lc, lg = c.logits(ids), g.logits(ids)
        err = float(np.abs(lc - lg).max())
        print(f"{family}: max |CPU - CUDA logit| = {err:.2e}")
        assert err <= LOGIT_TOL
        assert c.generate(ids, max_tokens=32, stop_ids=[]) == g.generate(ids, max_tokens=32, stop_ids=[])


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3", "gpt_oss"])
def test_cuda_offloaded_equals_resident(family):
    _, path = fixture_gguf(family)
    ids = list(range(5, 37))
    with moelite.load(path, kv_type="f32", device="cuda", n_ubatch=64) as r:
        minimum = r.plan.minimum_budget
        want = r.generate(ids[:4], max_tokens=48, stop_ids=[])
        want_logits = r.logits(ids)
    with moelite.load(path, kv_type="f32", device="cuda", n_ubatch=64, vram_budget=minimum) as o:
        assert o.info()["offloaded"]
        assert o.generate(ids[:4], max_tokens=48, stop_ids=[]) == want
        assert float(np.abs(o.logits(ids) - want_logits).max()) <= LOGIT_TOL
        assert o.stats()["total"]["misses"] > 0


@pytest.mark.parametrize("mode", ["never", "auto", "always"])
def test_cuda_tiers_match_cpu(mode):
    """VRAM arena at its minimum, a small RAM tier: misses are copied or run by the CPU (cost model)."""
    _, path = fixture_gguf("qwen3_moe")
    ids = list(range(5, 37))
    with moelite.load(path, kv_type="f32", device="cpu", n_threads=2, n_ubatch=64) as c:
        want = c.generate(ids[:4], max_tokens=48, stop_ids=[])
        want_logits = c.logits(ids)
        k = c.info()["n_expert_used"]
    with moelite.load(path, kv_type="f32", device="cuda", n_ubatch=64) as r:
        minimum = r.plan.minimum_budget
    with moelite.load(
        path, kv_type="f32", device="cuda", n_ubatch=64, vram_budget=minimum, host_slots=k + 1, cpu_compute=mode
    ) as g:
        err = float(np.abs(g.logits(ids) - want_logits).max())
        print(f"tiers {mode}: max |CPU - CUDA logit| = {err:.2e}, costs {g.info()['tier_costs']}")
        assert err <= LOGIT_TOL
        assert g.generate(ids[:4], max_tokens=48, stop_ids=[]) == want
        st = g.stats()
        assert st["ram_tier"]["misses"] > 0
        if mode == "never":
            assert st["ram_tier"]["cpu_experts"] == 0
        if mode == "always":
            assert st["ram_tier"]["cpu_experts"] > 0
