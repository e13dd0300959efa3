"""The GPU tiering logic (csrc/tiering.h), run on the CPU: an expert arena ("VRAM"), a RAM tier between it and
the file, and the cost model that lets the CPU run an arena miss from its RAM slot instead of copying it.

With device="cpu" and host_slots given, the arena and the RAM tier are both host memory, but every line of
the tiering code runs: arena misses copied from RAM slots (ggml_backend_tensor_set, a memcpy here, a PCIe
copy on a GPU), RAM misses read from the file, and the CPU share of a step computed from RAM slots with its
hidden states and outputs copied across like on a GPU. Results must not change, bit for bit.
The GPU itself is not exercised here (tests/test_cuda.py, skipped without a device)."""

from __future__ import annotations

import numpy as np
import pytest
from fixture_models import fixture_gguf

import moelite
from moelite import _core
from moelite.runtime.planner import plan_host_tier, plan_memory

FAMILIES = ("qwen3_moe", "deepseek_v3", "gpt_oss", "nemotron_h")  # plain; shared experts + a dense lead layer; expert
# biases; gateless (ReLU²) latent experts, two matrices per slot


def _run(path, ids, **opts):
    with moelite.load(path, kv_type="f32", n_threads=1, n_ubatch=64, **opts) as m:
        return m.logits(ids), m.generate(ids[:4], max_tokens=48, stop_ids=[]), m.stats(), m.info()


@pytest.fixture(scope="module")
def resident():
    return {fam: _run(fixture_gguf(fam)[1], list(range(5, 37))) for fam in FAMILIES}


def _minimum(path):
    with moelite.load(path, kv_type="f32", n_ubatch=64) as m:
        return m.plan.minimum_budget


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("mode", ["never", "auto", "always"])
def test_tiers_are_bit_exact(resident, family, mode):
    _, path = fixture_gguf(family)
    logits, greedy, _, _ = resident[family]
    k = resident[family][3]["n_expert_used"]
    lo, gr, st, info = _run(path, list(range(5, 37)), memory_budget=_minimum(path), host_slots=k + 1, cpu_compute=mode)
    assert info["offloaded"] and info["ram_tier_slots"] == [k + 1 if q else 0 for q in info["expert_slots"]]
    assert np.array_equal(lo, logits)
    assert gr == greedy
    ram = st["ram_tier"]
    assert ram["misses"] > 0 and ram["bytes_read"] > 0  # the RAM tier really read the file
    if mode == "never":
        assert ram["cpu_experts"] == 0
        assert st["total"]["misses"] > 0 and st["total"]["bytes_read"] > 0  # arena filled from RAM slots
    if mode == "always":
        assert ram["cpu_experts"] > 0
        assert st["total"]["misses"] == 0  # every arena miss ran on the CPU instead


def test_ram_tier_holding_everything_reads_each_expert_once():
    _, path = fixture_gguf("qwen3_moe")
    ids = list(range(5, 69))
    with moelite.load(path, kv_type="f32", n_threads=1, n_ubatch=64) as r:
        E = r.info()["n_expert"]
        want = r.logits(ids)
    with moelite.load(
        path, kv_type="f32", n_threads=1, n_ubatch=64, memory_budget=_minimum(path), host_slots=E, cpu_compute="never"
    ) as m:
        for _ in range(3):
            assert np.array_equal(m.logits(ids), want)
        st, info = m.stats(), m.info()
    n_moe = sum(1 for q in info["expert_slots"] if q)
    ram = st["ram_tier"]
    assert 0 < ram["misses"] <= E * n_moe  # each expert from the file at most once
    assert ram["bytes_read"] == ram["misses"] * (ram["bytes_read"] // ram["misses"])
    assert st["total"]["misses"] > ram["misses"]  # the small arena missed more: RAM served it


def test_cost_model_measured_at_load():
    _, path = fixture_gguf("qwen3_moe")
    with moelite.load(path, memory_budget=_minimum(path), host_slots=4, n_ubatch=64) as m:
        c = m.info()["tier_costs"]
    assert c["h2d_bytes_per_s"] > 0 and c["expert_bytes"] > 0
    assert c["cpu_fixed_s"] + c["cpu_per_token_s"] > 0 and c["gpu_fixed_s"] + c["gpu_per_token_s"] > 0


# --- the decision rule, on given numbers -------------------------------------------------------------------
PCIE = dict(
    h2d_bytes_per_s=25e9,
    expert_bytes=5e6,  # a 5 MB expert over ~25 GB/s: 200 us
    cpu_fixed_s=250e-6,
    cpu_per_token_s=60e-6,  # CPU: weights streamed once, then flops
    gpu_fixed_s=10e-6,
    gpu_per_token_s=1e-6,
)


def test_decode_runs_on_the_cpu_prefill_copies():
    one = _core.tier_costs(PCIE, 1, 0.0)
    assert one["copy_s"] == pytest.approx(5e6 / 25e9 + 10e-6 + 1e-6)
    assert one["cpu_s"] == pytest.approx(250e-6 + 60e-6)
    # 1 token: copy 211 us vs CPU 310 us -> copy; a slower link (8 GB/s: 625 us) -> CPU
    assert not one["auto_on_cpu"]
    slow = dict(PCIE, h2d_bytes_per_s=8e9)
    assert _core.tier_costs(slow, 1, 0.0)["auto_on_cpu"]
    # many tokens: the CPU's per-token flops dominate -> copy, whatever the link
    assert not _core.tier_costs(slow, 64, 0.0)["auto_on_cpu"]


def test_reuse_favours_the_copy():
    slow = dict(PCIE, h2d_bytes_per_s=12e9)  # copy 427 us vs CPU 310 us; 90 % reuse saves 269 us
    cold, hot = _core.tier_costs(slow, 1, 0.0), _core.tier_costs(slow, 1, 0.9)
    saved = 0.9 * ((250e-6 + 60e-6) - (10e-6 + 1e-6))
    assert hot["copy_s"] == pytest.approx(cold["copy_s"] - saved)
    assert cold["auto_on_cpu"] and not hot["auto_on_cpu"]


def test_unmeasured_costs_never_pick_the_cpu():
    assert not _core.tier_costs(dict(PCIE, h2d_bytes_per_s=0.0), 1, 0.0)["auto_on_cpu"]


# --- planning ------------------------------------------------------------------------------------------
def _plan(budget):
    _, path = fixture_gguf("qwen3_moe")
    with moelite.load(path, n_ubatch=64) as m:
        return plan_memory(m.hparams, m.tensors, n_ctx=m.n_ctx, n_ubatch=64, kv_elsize=2, budget=budget)


def test_host_tier_plan():
    p_all = _plan(None)
    assert plan_host_tier(p_all, 1 << 30) is None  # the arena holds everything: no tier
    p = _plan(p_all.minimum_budget)
    E, K = p.n_expert, p.n_expert_used
    assert plan_host_tier(p, 1 << 40) == [E if b else 0 for b in p.expert_slot_bytes]
    per_step = sum(b * K for b in p.expert_slot_bytes)
    with pytest.raises(moelite.errors.BudgetError, match="RAM tier") as e:
        plan_host_tier(p, per_step)
    assert e.value.minimum == per_step + p.scratch_bytes
    mid = plan_host_tier(p, p.scratch_bytes + per_step * 2)
    assert all(K <= s <= E for s, b in zip(mid, p.expert_slot_bytes) if b)
    assert sum(s * b for s, b in zip(mid, p.expert_slot_bytes)) <= per_step * 2


def test_bad_tier_options():
    _, path = fixture_gguf("qwen3_moe")
    with pytest.raises(moelite.errors.UsageError, match="cpu_compute"):
        moelite.load(path, cpu_compute="sometimes")
    with pytest.raises(moelite.errors.UsageError, match="host_slots"):
        moelite.load(path, host_slots=[4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4])
    with pytest.raises(moelite.errors.UsageError, match="host_slots"):
        moelite.load(path, host_slots=0)
