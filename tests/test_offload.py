"""Expert offloading never changes a result: with the smallest legal memory budget (n_expert_used slots per
MoE layer, experts read from disk on every miss) logits and 64 greedy tokens equal the fully resident model
bit for bit, for every policy, with and without prefetch."""

from __future__ import annotations

import numpy as np
import pytest
from fixture_models import RUNTIME_FAMILIES, fixture_gguf

import moelite

POLICIES = ("lru", "lfu", "lfuda", "consistency")


def run(path, ids, **opts):
    with moelite.load(path, kv_type="f32", n_threads=1, **opts) as m:
        logits = m.logits(ids)
        greedy = m.generate(ids[:4], max_tokens=64, stop_ids=[])
        return logits, greedy, m.stats(), m.info()


@pytest.fixture(scope="module")
def resident():
    out = {}
    for fam in RUNTIME_FAMILIES:
        _, path = fixture_gguf(fam)
        out[fam] = (path, run(path, list(range(5, 37))))
    return out


@pytest.mark.parametrize("family", RUNTIME_FAMILIES)
@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("prefetch", [True, False])
def test_smallest_budget_is_bit_exact(resident, family, policy, prefetch):
    path, (logits, greedy, _, info) = resident[family]
    with moelite.load(path, kv_type="f32", n_threads=1, n_ubatch=64) as m:
        minimum = m.plan.minimum_budget
    lo, gr, stats, info_small = run(
        path, list(range(5, 37)), memory_budget=minimum, policy=policy, n_ubatch=64, prefetch=prefetch
    )
    k = info_small["n_expert_used"]
    assert info_small["offloaded"] and all(q in (0, k) for q in info_small["expert_slots"])
    assert np.array_equal(lo, logits)
    assert gr == greedy
    assert stats["total"]["misses"] > 0 and stats["total"]["bytes_read"] > 0  # it really went to disk


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3", "olmoe", "gemma4_text"])
def test_ready_experts_computed_while_misses_are_read(resident, family):
    """A step with some experts cached and some on disk computes the cached ones while the I/O threads read the
    rest (expert-major: ready group, then the late group, then one combine): the same bits as the resident run."""
    path, (logits, greedy, _, _) = resident[family]
    with moelite.load(path, kv_type="f32", n_threads=1, n_ubatch=64) as m:
        minimum, per_slot = m.plan.minimum_budget, max(m.plan.expert_slot_bytes)
        k, E = m.plan.n_expert_used, m.plan.n_expert
    budget = minimum + (E // 2 - k) * per_slot * sum(1 for b in m.plan.expert_slot_bytes if b)
    lo, gr, stats, info = run(path, list(range(5, 37)), memory_budget=budget, n_ubatch=64, prefetch=False)
    assert info["offloaded"] and np.array_equal(lo, logits) and gr == greedy
    assert stats["total"]["overlapped"] > 0 and stats["total"]["misses"] > 0
    lo2, gr2, stats2, _ = run(
        path, list(range(5, 37)), memory_budget=budget, n_ubatch=64, prefetch=False, overlap_reads=False
    )  # waits for every read first: same bits
    assert np.array_equal(lo2, logits) and gr2 == greedy and stats2["total"]["overlapped"] == 0


def test_budget_too_small_names_the_minimum():
    _, path = fixture_gguf("qwen3_moe")
    with moelite.load(path, kv_type="f32", n_ubatch=64) as m:
        minimum = m.plan.minimum_budget
    with pytest.raises(moelite.errors.BudgetError, match="at least"):
        moelite.load(path, kv_type="f32", n_ubatch=64, memory_budget=minimum - 1)


@pytest.mark.parametrize("bad", ["lots", "12 parsecs", "-1GiB", "0"])
def test_bad_budget_strings(bad):
    _, path = fixture_gguf("qwen3_moe")
    with pytest.raises(moelite.errors.BudgetError):
        moelite.load(path, memory_budget=bad)


def test_unknown_policy():
    _, path = fixture_gguf("qwen3_moe")
    with pytest.raises(moelite.errors.UsageError, match="lfuda"):
        moelite.load(path, policy="fifo")


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3", "gpt_oss", "gemma4_text"])
@pytest.mark.parametrize("n_ubatch", [7, 64])
def test_prompt_expert_groups_read_ahead(family, n_ubatch):
    """A prompt ubatch routed to more experts than a layer's slots runs them in groups; with I/O threads each group
    is half the slots and the next group's misses are read while it computes (csrc/ffn_moe.cpp run_groups): the
    same bits as resident and as groups that wait for their own reads (overlap_reads=False), at a few budgets."""
    _, path = fixture_gguf(family)
    ids = list(range(5, 37))
    logits, greedy, _, _ = run(path, ids, n_ubatch=n_ubatch)
    with moelite.load(path, kv_type="f32", n_threads=1, n_ubatch=n_ubatch) as m:
        minimum, per_slot = m.plan.minimum_budget, max(m.plan.expert_slot_bytes)
        k, E = m.plan.n_expert_used, m.plan.n_expert
        n_moe = sum(1 for b in m.plan.expert_slot_bytes if b)
    quotas = sorted({q for q in (k + 1, 2 * k, E // 2) if k < q < E})  # slots per layer (groups of q / 2)
    assert quotas
    for q in quotas:
        budget = minimum + (q - k) * per_slot * n_moe
        for overlap in (True, False):
            lo, gr, stats, info = run(
                path, ids, memory_budget=budget, n_ubatch=n_ubatch, prefetch=False, overlap_reads=overlap
            )
            assert info["offloaded"] and stats["total"]["misses"] > 0
            assert np.array_equal(lo, logits), (q, overlap)
            assert gr == greedy


def test_info_names_the_ubatch():
    """info() says how many prompt tokens a graph takes: under a budget the planner may choose fewer than the
    resident default, and a prompt's last bits depend on it, so a capped run is compared with a resident one at the
    same n_ubatch (the tests above pass it explicitly)."""
    _, path = fixture_gguf("qwen3_moe")
    with moelite.load(path) as m:
        assert m.info()["n_ubatch"] == m.plan.n_ubatch == 512
    with moelite.load(path, n_ubatch=64) as m:
        minimum = m.plan.minimum_budget
    with moelite.load(path, n_ubatch=64, memory_budget=minimum) as m:
        assert m.info()["n_ubatch"] == 64 and m.info()["offloaded"]


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3"])
def test_prefetch_further_ahead_is_bit_exact(family):
    """Prefetching the experts predicted 2 and 3 MoE layers ahead (prefetch_depth, each distance with its own running
    precision) reads ahead and never changes a result: logits and greedy tokens equal the resident run's."""
    _, path = fixture_gguf(family, num_hidden_layers=5)
    ids = list(range(5, 37))
    logits, greedy, _, _ = run(path, ids, n_ubatch=64)
    with moelite.load(path, kv_type="f32", n_threads=1, n_ubatch=64) as m:
        minimum, per_slot = m.plan.minimum_budget, max(m.plan.expert_slot_bytes)
        k, E, moe = m.plan.n_expert_used, m.plan.n_expert, len(m.plan.moe_layers)
    budget = minimum + moe * (E - k) // 2 * per_slot  # about half the experts of each layer
    for depth in (1, 2, 3):
        lo, gr, stats, info = run(path, ids, memory_budget=budget, n_ubatch=64, prefetch_depth=depth)
        assert info["offloaded"] and info["prefetch_depth"] == depth
        assert np.array_equal(lo, logits) and gr == greedy, depth
        far = stats["total"]["prefetch_far_issued"]
        assert (far > 0) if depth > 1 else (far == 0), (depth, far)
        assert stats["total"]["prefetch_far_hits"] <= far
    with pytest.raises(moelite.errors.UsageError, match="prefetch_depth"):
        moelite.load(path, prefetch_depth=4)
