"""The memory planner (runtime/planner.py) counts every family's per-layer shapes as the C++ core allocates them:
per-layer head counts and head sizes (KV cache), 2-matrix expert slots (Nemotron's ReLU² experts), latent and MLA
projections (dense weights), recurrent state; so at the smallest budget the model's own memory stays within it
(+ 10 %, the bound the README promises)."""
from __future__ import annotations

import pytest

import moelite
from fixture_models import RUNTIME_FAMILIES, fixture_gguf

ALIGN_SLACK = 64 * 16      # ggml pads each dense tensor to its buffer alignment: a few tensors' worth of bytes


@pytest.mark.parametrize("family", RUNTIME_FAMILIES)
def test_plan_equals_the_core_at_the_minimum_budget(family):
    _, path = fixture_gguf(family)
    opts = dict(n_threads=1, n_ubatch=64, kv_type="f32")
    with moelite.load(str(path), **opts) as m:
        minimum = m.plan.minimum_budget
    with moelite.load(str(path), memory_budget=minimum, **opts) as m:
        info, plan = m.info(), m.plan
        assert info["offloaded"]
        assert plan.kv_bytes == info["kv_bytes"]
        assert sum(s * b for s, b in zip(plan.slots, plan.expert_slot_bytes)) == info["arena_bytes"]
        assert abs(plan.dense_bytes - info["dense_bytes"]) <= ALIGN_SLACK
        held = info["dense_bytes"] + info["kv_bytes"] + info["state_bytes"] + info["arena_bytes"] + plan.scratch_bytes
        assert held <= 1.10 * minimum, f"{family}: {held} bytes held for a budget of {minimum}"
