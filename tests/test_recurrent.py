"""Hybrid recurrent families (LFM2-MoE short conv, Qwen3.5-MoE Gated DeltaNet, Granite-4.0-H and Nemotron 3
Mamba2): the state carried across prompt
chunks, and prompt reuse through state snapshots giving exactly the tokens of a fresh recomputation.

(f32 parity with transformers, prompt and single-token decode, and offload exactness run for these families in
test_runtime_parity.py and test_offload.py; llama.cpp both ways in test_llama_cpp_cross.py.)"""

from __future__ import annotations

import numpy as np
import pytest
from fixture_models import fixture_gguf
from hf_fixtures import HYBRID_FAMILIES, hf_logits

import moelite
from moelite.errors import BudgetError

PROMPT = [(7 * i + 3) % 320 for i in range(16)]


@pytest.mark.parametrize("family", HYBRID_FAMILIES)
def test_prompt_in_chunks_matches_transformers(family):
    hf, path = fixture_gguf(family)
    ref = hf_logits(hf, PROMPT)
    for n_ubatch in (3, 7):
        with moelite.load(path, kv_type="f32", n_threads=1, n_ubatch=n_ubatch) as m:
            assert float(np.abs(m.logits(PROMPT) - ref).max()) <= 1e-3


def fresh(path, prompt, **kw):
    with moelite.load(path, kv_type="f32", n_threads=1) as m:
        return m.generate(prompt, max_tokens=8, stop_ids=[], **kw)


@pytest.mark.parametrize("family", HYBRID_FAMILIES)
def test_generate_calls_sharing_a_prefix_equal_fresh_runs(family):
    """Three prompts against one model: an extension of the cached context (no rewind), one that diverges from
    the generated tokens (restores the end-of-prefill snapshot), one that diverges mid-prompt (restores a snapshot
    taken inside the prefill, every 4 tokens here). Each gives the tokens of a fresh model."""
    _, path = fixture_gguf(family)
    a = PROMPT
    with moelite.load(path, kv_type="f32", n_threads=1, n_ubatch=4, state_snapshots=8) as m:
        m.snapshot_interval = 4
        g1 = m.generate(a, max_tokens=8, stop_ids=[])
        assert m.info()["state_snapshots"] >= 2
        extended = a + g1 + [11, 12]  # the cached context plus new tokens: no rewind
        g2 = m.generate(extended, max_tokens=8, stop_ids=[])
        assert m.snapshot_restores == 0
        diverged = a + [5, 6, 7]  # drops the generated tokens: back to the prefill's end
        g3 = m.generate(diverged, max_tokens=8, stop_ids=[])
        assert m.snapshot_restores == 1
        assert m._core().n_past < len(a) + 8 + len(g1) + 8  # it did not recompute from 0 and keep everything
        mid = a[:10] + [9, 9, 9]  # diverges inside the prompt: the snapshot at 8
        g4 = m.generate(mid, max_tokens=8, stop_ids=[])
        assert m.snapshot_restores == 2
    assert g1 == fresh(path, a)
    assert g2 == fresh(path, extended)
    assert g3 == fresh(path, diverged)
    assert g4 == fresh(path, mid)


@pytest.mark.parametrize("family", HYBRID_FAMILIES)
def test_three_turn_chat_equals_recomputing_each_turn(family):
    _, path = fixture_gguf(family)
    turns = ["hello world", "the expert cache", "read write stream"]
    with moelite.load(path, kv_type="f32", n_threads=1) as m:
        messages, reused = [], []
        for text in turns:
            messages.append({"role": "user", "content": text})
            answer = m.chat(messages, max_tokens=6)
            reused.append(answer)
            messages.append({"role": "assistant", "content": answer})
    with moelite.load(path, kv_type="f32", n_threads=1) as m:
        messages, again = [], []
        for text in turns:
            messages.append({"role": "user", "content": text})
            m.reset()  # recompute every turn from scratch
            answer = m.chat(messages, max_tokens=6)
            again.append(answer)
            messages.append({"role": "assistant", "content": answer})
    assert reused == again


@pytest.mark.parametrize("family", HYBRID_FAMILIES)
def test_state_is_counted_in_the_budget(family):
    _, path = fixture_gguf(family)
    with moelite.load(path, kv_type="f32", n_threads=1, n_ubatch=64) as m:
        state = m.info()["state_bytes"]
        minimum = m.plan.minimum_budget
        assert state > 0 and m.plan.rs_bytes == state * (1 + m.state_snapshots)
    with pytest.raises(BudgetError, match="recurrent state"):
        moelite.load(path, kv_type="f32", n_threads=1, n_ubatch=64, memory_budget=minimum - 1)


@pytest.mark.parametrize(
    "family,key,value",
    [
        ("qwen3_5_moe_text", "qwen35moe.ssm.time_step_rank", 0),
        ("qwen3_5_moe_text", "qwen35moe.ssm.inner_size", 7),
        ("qwen3_next", "qwen3next.ssm.conv_kernel", 1),
        ("lfm2_moe", "lfm2moe.shortconv.l_cache", 100),
        ("granitemoehybrid", "granitehybrid.ssm.group_count", 3),
        ("nemotron_h", "nemotron_h_moe.ssm.inner_size", 7),
        ("nemotron_h", "nemotron_h_moe.moe_latent_size", 1 << 30),
    ],
)
def test_bad_state_sizes_are_format_errors(family, key, value):
    """The keys the recurrent state is sized from are checked at the border (a zero once reached the planner's
    division as a raw ZeroDivisionError)."""
    from moelite import _core
    from moelite.errors import ModelFormatError
    from moelite.runtime.validate import load_hparams

    _, path = fixture_gguf(family)
    meta = _core.read_gguf(str(path))
    tensors = {n: (t, s, o, b) for n, t, s, o, b in meta["tensors"]}
    with pytest.raises(ModelFormatError, match=key.split(".", 1)[1].split(".")[0]):
        load_hparams(str(path), {**meta["kv"], key: value}, tensors)
