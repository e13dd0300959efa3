"""Core runtime acceptance: for every family, a tiny random transformers model converted to an F32 GGUF
gives the same logits as transformers (max-abs <= 1e-3) on a 16-token prompt, and 32 greedy tokens with the
KV cache equal transformers' greedy generate."""

from __future__ import annotations

import numpy as np
import pytest
from fixture_models import RUNTIME_FAMILIES, fixture_gguf
from hf_fixtures import hf_greedy, hf_logits

import moelite


def prompt(n_vocab: int, n: int = 16) -> list[int]:
    return [(7 * i + 3) % n_vocab for i in range(n)]


@pytest.mark.parametrize("family", RUNTIME_FAMILIES)
def test_logits_and_greedy_match_transformers(family):
    hf, path = fixture_gguf(family)
    with moelite.load(path, kv_type="f32", n_threads=1) as m:
        ids = prompt(m.n_vocab)
        ours = m.logits(ids)
        ref = hf_logits(hf, ids)
        assert ours.shape == ref.shape == (16, m.n_vocab)
        err = float(np.abs(ours - ref).max())
        assert err <= 1e-3, f"{family}: max |logit diff| = {err}"
        greedy = m.generate(ids, max_tokens=32, stop_ids=[])
        assert greedy == hf_greedy(hf, ids, 32)


def test_logits_fresh_context_and_incremental_decode_agree():
    _, path = fixture_gguf("qwen3_moe")
    with moelite.load(path, kv_type="f32", n_threads=1) as m:
        ids = prompt(m.n_vocab, 12)
        full = m.logits(ids)
        m.reset()
        step = [m._eval([t], 1)[0] for t in ids]  # one token at a time through the KV cache
        assert np.abs(full - np.stack(step)).max() < 1e-4
        again = m.logits(ids)  # fresh context: identical to the first call
        assert np.array_equal(full, again)


def test_prefill_in_small_ubatches_matches_one_batch():
    _, path = fixture_gguf("qwen2_moe")
    ids = prompt(300, 16)
    with (
        moelite.load(path, kv_type="f32", n_threads=1) as a,
        moelite.load(path, kv_type="f32", n_threads=1, n_ubatch=5) as b,
    ):
        assert np.abs(a.logits(ids) - b.logits(ids)).max() < 1e-4
