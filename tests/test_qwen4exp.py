"""Qwen3.8-Flash-Next (`qwen4exp`), a tiny random instance against transformers 5.25's Qwen4ExpForCausalLM: Qwen3.5's
hybrid (Gated DeltaNet with a sigmoid output gate, gated attention) with gated hyper-connections (4 streams) instead
of every norm, QSA on the full-attention layer, and the PLE n-gram hash table on a Gated DeltaNet layer, whose rows
are read from the GGUF on demand (csrc/ple.cpp), never loaded whole:

- f32 logits within 1e-3 of transformers (F32 KV), with an EOS inside the prompt (it resets the n-grams), prompt +
  decode steps (the n-gram history and the dilated conv's state carried across steps), 32 greedy tokens; each with
  QSA's budget above the context (dense) and at 4 positions (blocks of 2: sparse from the 6th token on), where a
  test shows the selection changes transformers' result and moelite follows it;
- chunked prompts and prompt reuse (recurrent-state snapshots hold the PLE state too) equal a fresh recomputation;
- offloaded at the minimum budget, and with a PLE row cache of one ubatch: the resident logits, bit for bit; the
  rows come from the file (ple_stats), and the plan counts the row cache instead of the table;
- the converter keeps the 45-bit hash constants exact (u64 arrays) and refuses what llama.cpp cannot run.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from fixture_models import fixture_gguf, parse_edited
from hf_fixtures import edited_copy, hf_greedy, hf_logits

import moelite
from moelite import _core
from moelite.converters import convert

FAMILY = "qwen4_exp_text"
EOS = 2
SHORT = [(7 * i + 3) % 320 for i in range(12)]
LONG = [EOS if i == 20 else (11 * i + 5) % 317 + 3 for i in range(48)]  # an EOS at 20: the n-grams restart there


# QSA's token budget: the fixture's 512 (every block selected: dense attention) and 4 (2 blocks of 2 + the tail)
BUDGETS = (512, 4)


def load(path, **kw):
    return moelite.load(path, **{"kv_type": "f32", "n_threads": 1, **kw})


def fixture(budget: int):
    return fixture_gguf(FAMILY) if budget == 512 else fixture_gguf(FAMILY, indexer_budget=budget)


@pytest.mark.parametrize("budget", BUDGETS)
def test_prompts_match_transformers(budget):
    hf, path = fixture(budget)
    with load(path) as m:
        for ids in (SHORT, LONG):
            assert float(np.abs(m.logits(ids) - hf_logits(hf, ids)).max()) <= 1e-3


@pytest.mark.parametrize("budget", BUDGETS)
def test_prompt_then_decode_steps_match_transformers(budget):
    hf, path = fixture(budget)
    ref = hf_logits(hf, LONG[:32])
    with load(path) as m:
        rows = [m.eval(LONG[:10])] + [m.eval([t]) for t in LONG[10:32]]
    assert float(np.abs(np.stack(rows) - ref[9:]).max()) <= 1e-3


@pytest.mark.parametrize("budget", BUDGETS)
def test_greedy_32_tokens_equal_transformers(budget):
    hf, path = fixture(budget)
    with load(path) as m:
        assert m.generate(SHORT, max_tokens=32, stop_ids=[]) == hf_greedy(hf, SHORT, 32)


def test_the_ple_table_and_the_streams_matter():
    """The fixture's PLE rows and hyper-connection gates move the logits well past the 1e-3 bound: with the table
    zeroed transformers' logits change, and moelite follows both."""
    hf, path = fixture_gguf(FAMILY)

    def zero_table(ts):
        return {k: (v * 0 if ".ngram_embedding." in k else v) for k, v in ts.items()}

    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as d:
        zeroed = edited_copy(hf, Path(d) / "hf", zero_table)
        convert(zeroed, Path(d) / "z.gguf", "f32", progress=False)
        ref = hf_logits(zeroed, LONG)
        assert float(np.abs(ref - hf_logits(hf, LONG)).max()) > 1e-2
        with load(Path(d) / "z.gguf") as m:
            assert float(np.abs(m.logits(LONG) - ref).max()) <= 1e-3


@pytest.mark.parametrize("budget", BUDGETS)
def test_prompt_chunks_and_reuse_equal_a_fresh_recomputation(budget):
    """Ubatches of 3 and 7 tokens (the n-gram history and the PLE conv state cross their borders) give the one-ubatch
    logits; generate calls extending or diverging from the cached context (snapshots restore the PLE state with the
    rest of the recurrent state) give a fresh model's tokens."""
    _, path = fixture(budget)
    with load(path) as m:
        want = m.logits(LONG)
    for n_ubatch in (3, 7):
        with load(path, n_ubatch=n_ubatch) as m:
            assert float(np.abs(m.logits(LONG) - want).max()) <= 1e-5

    def fresh(ids):
        with load(path) as m:
            return m.generate(ids, max_tokens=8, stop_ids=[])

    with load(path, n_ubatch=5) as m:
        g1 = m.generate(LONG[:20], max_tokens=8, stop_ids=[])
        extended = LONG[:20] + g1 + LONG[20:30]
        g2 = m.generate(extended, max_tokens=8, stop_ids=[])
        diverged = LONG[:25]
        g3 = m.generate(diverged, max_tokens=8, stop_ids=[])
    assert [g1, g2, g3] == [fresh(LONG[:20]), fresh(extended), fresh(diverged)]


@pytest.mark.parametrize("budget", BUDGETS)
def test_offloaded_and_a_one_ubatch_row_cache_equal_resident(budget):
    """At the minimum budget (experts offloaded, the PLE row cache one ubatch of rows: 4 rows per token here) the
    logits are the resident ones bit for bit, the table's rows read from the file as the tokens need them."""
    _, path = fixture(budget)
    with load(path, n_ubatch=4) as m:
        want = m.logits(LONG)
        plan = m.plan
        minimum = plan.minimum_budget
    assert plan.ple_table_bytes == plan.ple_bytes == 512 * 16 * 4  # [512 rows, 16] F32: the cache holds it all
    with load(path, memory_budget=minimum, n_ubatch=4, ple_cache_bytes=0) as m:  # 0: one ubatch of rows, 16 of 512
        assert m.info()["offloaded"]
        got = m.logits(LONG)
        s = m._m.ple_stats()
    assert np.array_equal(got, want)
    assert s["cache_bytes"] == 16 * 16 * 4
    assert s["rows_read"] > 16 and s["rows_read"] + s["rows_hit"] == 4 * len(LONG)


def test_qsa_selection_differs_from_dense_and_follows_transformers():
    """Budget 4 in blocks of 2: a token sees more than 2 complete blocks from position 5 on. There transformers'
    sparse logits differ from its dense ones (the same weights, budget 512), before they agree; moelite matches each
    on its own file, far closer than the gap between them."""
    hf_s, sparse_path = fixture(4)
    hf_d, dense_path = fixture(512)
    sparse, dense = hf_logits(hf_s, LONG), hf_logits(hf_d, LONG)
    assert float(np.abs(sparse[:5] - dense[:5]).max()) <= 1e-6
    assert float(np.abs(sparse[5:] - dense[5:]).max()) > 2e-3
    for path, ref in ((sparse_path, sparse), (dense_path, dense)):
        with load(path) as m:
            assert float(np.abs(m.logits(LONG) - ref).max()) <= 1e-5


def test_the_plan_counts_the_indexer_keys_and_the_ple_state():
    """The KV cache the planner counts (with QSA's raw indexer keys, 16 per position) is what the core allocates; the
    recurrent state includes PLE's conv inputs and n-gram history."""
    _, path = fixture(4)
    for n_ctx in (256, 512):
        with load(path, n_ctx=n_ctx, n_ubatch=64) as m:
            assert m.plan.kv_bytes == m.info()["kv_bytes"]
            assert m.plan.rs_bytes == m._m.state_bytes * 3  # live + 2 snapshots


def test_hash_constants_are_exact_u64_keys():
    """The 45-bit multipliers reach the GGUF exactly (an F32 round trip would move them by thousands)."""
    hf, path = fixture_gguf(FAMILY)
    kv = _core.read_gguf(str(path))["kv"]
    from safetensors import safe_open

    want = {}
    for f in sorted(hf.glob("*.safetensors")):
        with safe_open(f, "np") as s:
            for k in s.keys():
                if k.endswith(("layer_multipliers", "ngram_heads_offsets", "ngram_heads_vocab_sizes")):
                    want[k.rsplit(".", 1)[1]] = [int(x) for x in s.get_tensor(k)]
    assert [int(x) for x in kv["qwen4exp.ple.layer_multipliers"]] == want["layer_multipliers"]
    assert max(want["layer_multipliers"]) > 1 << 40
    assert [int(x) for x in kv["qwen4exp.ple.head_offsets"]] == want["ngram_heads_offsets"]
    assert [int(x) for x in kv["qwen4exp.ple.head_vocab_sizes"]] == want["ngram_heads_vocab_sizes"]
    assert list(kv["qwen4exp.attention.compress_ratios"]) == [0, 0, 0, 2]


@pytest.mark.parametrize(
    "override, match",
    [
        ({"output_gate_type": "silu"}, "output_gate_type"),
        ({"ple_layer_ids": [4]}, "ple_layer_ids"),
        ({"ple_layer_ids": [1, 2]}, "ple_layer_ids"),
        ({"indexer_budget": 5}, "indexer_budget"),
    ],
)
def test_configs_llama_cpp_cannot_run_are_refused(override, match, tmp_path):
    from moelite.errors import ConversionError

    hf, _ = fixture_gguf(FAMILY)
    d = edited_copy(hf, tmp_path / "hf", lambda ts: ts)
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, **override}))
    with pytest.raises(ConversionError, match=match):
        convert(d, tmp_path / "bad.gguf", "f32", progress=False)
    assert not (tmp_path / "bad.gguf").exists()


@pytest.mark.parametrize(
    "key, value, match",
    [
        ("ple.layers", [3], "ple.layers"),  # the attention layer
        ("ple.head_vocab_sizes", [97, 101, 103], "ple"),  # 3 sizes for 4 heads
        ("ple.ngram_size", 1, "ple"),
        ("hyper_connection.count", 1, "hyper_connection.count"),
        ("attention.compress_ratios", [0, 0, 0, 3], "compress_ratios"),  # does not divide the budget
    ],
)
def test_bad_keys_are_format_errors(key, value, match):
    from moelite.errors import ModelFormatError

    with pytest.raises(ModelFormatError, match=match):
        parse_edited(FAMILY, {f"qwen4exp.{key}": value})


@pytest.mark.slow
@pytest.mark.parametrize("budget", BUDGETS)
def test_gguf_both_ways_with_llama_cpp(budget, tmp_path):
    """llama.cpp's runtime on moelite's GGUF, and moelite on llama.cpp's converter's GGUF.

    Past QSA's budget llama.cpp keeps the top budget + ratio - 1 positions (its comment: "whole blocks plus the
    tail"); when a token's tail is empty (it sees a whole number of blocks) that takes ratio - 1 positions of one more
    block, which transformers does not: there its logits differ, everywhere else they are moelite's (= transformers').
    llama.cpp's converter reads QSA's layers as `full_attention`, which transformers 5.25 saves as
    `indexed_attention`: on the config as saved it writes compress ratios of 0 (dense attention, silently); the release
    names and `--raw-config` give it the ratios."""
    import shutil

    from llama_cpp_ref import llama_cpp_logits, pinned_convert

    hf, ours = fixture(budget)
    with load(ours) as m:
        want = m.logits(LONG)
    theirs_rt = llama_cpp_logits(ours, LONG)
    whole = [p for p in range(len(LONG)) if (p + 1) % 2 == 0 and (p + 1) // 2 > budget // 2]  # empty tail, past it
    rest = [p for p in range(len(LONG)) if p not in whole]
    assert float(np.abs(theirs_rt[rest] - want[rest]).max()) <= 1e-3
    if whole:
        assert float(np.abs(theirs_rt[whole] - want[whole]).max()) > 1e-4
    src = tmp_path / "hf"
    shutil.copytree(hf, src)
    cfg = json.loads((src / "config.json").read_text())
    cfg["layer_types"] = ["full_attention" if t == "indexed_attention" else t for t in cfg["layer_types"]]
    (src / "config.json").write_text(json.dumps(cfg))
    theirs = pinned_convert(src, tmp_path / "theirs.gguf", "--raw-config")
    assert list(_core.read_gguf(str(theirs))["kv"]["qwen4exp.attention.compress_ratios"]) == [0, 0, 0, 2]
    with load(theirs) as m:
        assert float(np.abs(m.logits(LONG) - hf_logits(hf, LONG)).max()) <= 1e-3
