"""Speculative decoding (runtime/speculative.py): greedy output with verify windows equals greedy output without,
token for token, resident and at the smallest budget (experts read from disk), on attention, MLA and recurrent
(Gated DeltaNet, Mamba2) families; the KV cache / recurrent state rolled back after a rejected draft; n-gram drafts
decline without a match; a draft model; the rejection-sampling step keeps the target's distribution; stats()
fields; bad arguments are UsageErrors.

Fixtures are Q8_0: a window row's logits then equal a one-row step's bit for bit (docs/SPECULATIVE.md says why
F32 weights differ in the last bits: tinyBLAS's GEMM for >= 2 rows); test_window_rows_equal_decode_rows checks it."""

from __future__ import annotations

import numpy as np
import pytest
from fixture_models import fixture_gguf

import moelite
from moelite.errors import BudgetError, UsageError
from moelite.runtime.sampling import Sampler, SamplerConfig
from moelite.runtime.speculative import NgramDraft, WindowPlanner, accept_token

# attention (GQA), MLA + shared experts + a dense lead layer, Gated DeltaNet hybrid, Mamba2 hybrid
FAMILIES = ("qwen3_moe", "deepseek_v3", "qwen3_5_moe_text", "nemotron_h")
# a prompt that repeats itself: n-gram drafts find matches from the first step
PROMPT = [(7 * i + 3) % 97 + 5 for i in range(12)] * 3
N = 64


def _path(family):
    return fixture_gguf(family, "q8_0")[1]


def _greedy(path, **opts):
    spec = {k: opts.pop(k) for k in ("speculative", "draft_max", "draft_rule", "draft_model") if k in opts}
    with moelite.load(path, n_threads=1, n_ubatch=64, **opts, **spec) as m:
        out = m.generate(PROMPT, max_tokens=N, stop_ids=[])
        return out, m.stats()


@pytest.fixture(scope="module")
def plain():
    return {f: _greedy(_path(f))[0] for f in FAMILIES}


def _minimum(path):
    with moelite.load(path, n_threads=1, n_ubatch=64) as m:
        return m.plan.minimum_budget


@pytest.mark.parametrize("family", FAMILIES)
def test_window_rows_equal_decode_rows(family):
    """The verify path's premise: evaluating tokens as one window gives each row the logits a one-row step gives."""
    path = _path(family)
    with moelite.load(path, n_threads=1) as m:
        gen = m.generate(PROMPT, max_tokens=6, stop_ids=[])
        m.reset()
        m.eval(PROMPT)
        rows = np.stack([m.eval([t]) for t in gen])
        m.reset()
        m.eval(PROMPT)
        window = m._eval(gen, len(gen))
    assert np.array_equal(rows, window)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("capped", [False, True], ids=["resident", "capped"])
def test_ngram_greedy_equals_plain_greedy(plain, family, capped):
    path = _path(family)
    opts = {"memory_budget": _minimum(path)} if capped else {}
    out, stats = _greedy(path, speculative="ngram", draft_max=4, draft_rule="always", **opts)
    assert out == plain[family]
    sp = stats["speculative"]
    assert sp["windows"] > 0 and sp["drafted"] > 0 and sp["accepted"] > 0
    assert sp["rollbacks"] > 0  # a rejected draft was rolled back (truncate / state restore) at least once
    if capped:
        assert stats["total"]["bytes_read"] > 0  # it really read experts from disk


@pytest.mark.parametrize("family", ["qwen3_moe", "qwen3_5_moe_text"])
def test_cost_rule_is_exact_and_reports_its_inputs(plain, family):
    path = _path(family)
    out, stats = _greedy(path, speculative="ngram", memory_budget=_minimum(path))
    assert out == plain[family]
    sp = stats["speculative"]
    assert sp["steps"] > 0 and sp["mode"] == "ngram"
    planner = sp["planner"]
    for key in ("acceptance_estimate", "t_step_s", "c_row", "s_per_byte", "bytes_per_row_estimate"):
        assert key in planner
    assert planner["t_step_s"] > 0
    assert sp["windows"] + sp["declined"] + sp["no_draft"] == sp["steps"]


def test_stats_fields_and_off_by_default():
    path = _path("qwen3_moe")
    with moelite.load(path, n_threads=1) as m:
        m.generate(PROMPT, max_tokens=8, stop_ids=[])
        assert m.stats()["speculative"] is None  # off unless asked
        m.generate(PROMPT, max_tokens=16, stop_ids=[], speculative="ngram", draft_max=3)  # per call
        sp = m.stats()["speculative"]
    keys = {"mode", "steps", "windows", "drafted", "accepted", "acceptance_rate", "extra_bytes_read", "planner"}
    assert keys <= set(sp)
    assert sp["mode"] == "ngram"
    assert 0.0 <= sp["acceptance_rate"] <= 1.0
    assert sp["accepted"] <= sp["drafted"]
    assert all(n <= 3 for n in sp["recent_draft_lengths"])


def test_stream_with_stop_and_max_tokens_matches_plain():
    """Accepted drafts past max_tokens are not emitted; a stop id inside an accepted window ends the text there
    and leaves the context as a plain loop would (a follow-up generation equals a fresh one)."""
    path = _path("qwen3_moe")
    with moelite.load(path, n_threads=1) as m:
        ref = m.generate(PROMPT, max_tokens=40, stop_ids=[])
    stop = ref[25]
    for n in (1, 2, 7, 33):
        with moelite.load(path, n_threads=1, speculative="ngram", draft_rule="always") as m:
            assert m.generate(PROMPT, max_tokens=n, stop_ids=[]) == ref[:n]
    with moelite.load(path, n_threads=1, speculative="ngram", draft_rule="always") as m:
        got = m.generate(PROMPT, max_tokens=40, stop_ids=[stop])
        assert got == ref[: ref.index(stop)]
        assert m.last_stats.finish_reason == "stop"
        assert m._ctx_ids == PROMPT + got and m._core().n_past == len(m._ctx_ids)


def test_ngram_declines_without_a_match():
    d = NgramDraft()
    assert d.propose(list(range(50)), 8) == []  # no n-gram repeats
    assert d.propose([1, 2, 3, 9, 1, 2, 3], 4) == [9, 1, 2, 3]  # the latest earlier "1 2 3" was followed by 9 ...
    assert d.propose([1, 2, 3, 9, 1, 2, 3, 9, 5], 8) == []
    assert d.propose([4, 4, 4, 4], 3) == [4, 4, 4]  # a loop: the text from the match on, repeated
    assert d.propose([7, 8, 7, 8], 5) == [7, 8, 7, 8, 7]  # a new context (not an extension) is indexed from scratch
    assert d.propose([7, 8, 7, 8, 5, 6, 7, 8], 3) == [5, 6, 7]
    path = _path("qwen3_moe")
    with moelite.load(path, n_threads=1, speculative="ngram", draft_rule="always") as m:
        m.generate(list(range(5, 29)), max_tokens=2, stop_ids=[])  # distinct tokens: the suffix occurs nowhere
        sp = m.stats()["speculative"]
        assert sp["steps"] == sp["no_draft"] == 1 and sp["windows"] == sp["drafted"] == 0


def test_draft_model_same_vocab():
    """A draft model: another model of the vocabulary (here a second seed of the family, and the target itself,
    whose drafts are always accepted); greedy output unchanged; its memory comes out of the budget."""
    path = _path("qwen3_moe")
    other = fixture_gguf("qwen3_moe", "q8_0", seed=1)[1]
    ref = _greedy(path)[0]
    out, stats = _greedy(path, speculative="draft", draft_model=other, draft_max=4, draft_rule="always")
    assert out == ref
    assert stats["speculative"]["drafted"] > 0
    out, stats = _greedy(path, speculative="draft", draft_model=path, draft_max=4, draft_rule="always")
    assert out == ref
    assert stats["speculative"]["acceptance_rate"] == 1.0
    minimum = _minimum(path)
    with moelite.load(path, n_threads=1, memory_budget=minimum) as m:
        alone = m.plan.budget
    with pytest.raises(BudgetError):  # the draft model's bytes leave the target below its minimum
        moelite.load(path, n_threads=1, memory_budget=alone, speculative="draft", draft_model=path)


def test_rejection_sampling_keeps_the_distribution():
    """accept_token with a point draft: the emitted token is distributed as the sampler's own draw, for a draft
    that is likely, unlikely, and outside top-k."""
    rng = np.random.default_rng(0)
    logits = rng.normal(size=12).astype(np.float32) * 2
    cfg = SamplerConfig(temperature=0.9, top_k=8, seed=123)
    ids, p = Sampler(cfg).distribution(logits, [])
    want = np.zeros(12)
    want[ids] = p / p.sum()
    trials = 20000
    for draft in (int(np.argmax(logits)), int(ids[np.argmin(p)]), int(np.argmin(logits))):
        s = Sampler(cfg)
        counts = np.bincount([accept_token(s, logits, [], draft)[1] for _ in range(trials)], minlength=12)
        assert np.abs(counts / trials - want).max() < 0.015, (draft, counts / trials, want)


def test_sampled_generation_runs_with_windows():
    """temperature > 0 through windows: the target itself as the draft model (its greedy drafts, accepted with
    probability p(draft): the fixture's logits are flat, hence top_k=2 and a low temperature); the context stays
    consistent after accepts and rejections."""
    path = _path("qwen3_moe")
    opts = dict(speculative="draft", draft_model=path, draft_max=3, draft_rule="always")
    with moelite.load(path, n_threads=1, **opts) as m:
        out = m.generate(PROMPT, max_tokens=32, stop_ids=[], temperature=0.02, top_k=2, seed=3)  # p(draft) ~ 1/2
        assert len(out) == 32
        sp = m.stats()["speculative"]
        assert sp["windows"] > 0 and 0 < sp["accepted"] < sp["drafted"]
        assert m._core().n_past == len(m._ctx_ids) and m._ctx_ids == PROMPT + out[: len(m._ctx_ids) - len(PROMPT)]


def test_planner_declines_a_window_that_reads_more_than_it_saves():
    """Resident: a cheap window is drafted. Offloaded with every expert missing and slow reads: not drafted."""
    p = WindowPlanner(expert_bytes=[0, 10_000_000], n_expert=8, n_expert_used=2)
    p.t_step = p.t_cmp = 0.01
    p.acceptance = 0.7
    assert p.choose(4, 0, None) > 0
    resident = np.zeros((2, 8), dtype=np.uint8)
    resident[1, :2] = 1
    p.s_byte = 1e-9  # 1 GB/s: each extra row reads ~ 2 experts of 10 MB = 20 ms, twice the step
    assert p.choose(4, 0, resident) == 0
    assert p.b_row > 0
    assert p.choose(4, 5, None) == 0  # draft_min above the draft: no window


def test_planner_learns_what_windows_really_read():
    """b_row assumes a draft row's new experts are random; windows whose rows route to cached experts (a draft
    copying earlier text) read less: the measured ratio (b_scale) brings the declined window back, and windows that
    read as predicted leave it at 1."""
    p = WindowPlanner(expert_bytes=[0, 10_000_000], n_expert=8, n_expert_used=2)
    p.t_step = p.t_cmp = 0.01
    p.acceptance = 0.7
    p.s_byte = 1e-9
    resident = np.zeros((2, 8), dtype=np.uint8)
    resident[1, :2] = 1
    assert p.choose(4, 0, resident) == 0
    b_row = p.b_row
    for _ in range(60):  # windows of 2 draft rows that read nothing the cache did not hold
        p.b_row = b_row
        p.observe_window_bytes(2, 0)
    assert p.b_scale < 0.01 and p.choose(4, 0, resident) > 0
    q = WindowPlanner(expert_bytes=[0, 10_000_000], n_expert=8, n_expert_used=2)
    q.b_row = b_row
    q.observe_window_bytes(3, int(3 * b_row))  # as predicted
    assert q.b_scale == pytest.approx(1.0)
    q.observe_window_bytes(0, 10**9)  # no draft rows: nothing to learn
    assert q.b_scale == pytest.approx(1.0)


def test_planner_is_kept_across_rules_of_one_source():
    """Switching the rule or the draft length per call keeps the planner's measurements of this model and draft
    source (the bench alternates them); another source starts from the priors."""
    path = _path("qwen3_moe")
    with moelite.load(path, n_threads=1, n_ubatch=64) as m:
        m.generate(PROMPT, max_tokens=N, stop_ids=[], speculative="ngram", draft_rule="always")
        first = m._speculator.planner
        assert first.t_step > 0
        m.generate(PROMPT, max_tokens=4, stop_ids=[], speculative="ngram", draft_max=3)
        assert m._speculator.planner is first and m._speculator.config.draft_max == 3
        assert "bytes_scale" in m.stats()["speculative"]["planner"]


@pytest.mark.parametrize(
    "opts",
    [
        {"speculative": "bogus"},
        {"speculative": 1},
        {"speculative": "ngram", "draft_max": 0},
        {"speculative": "ngram", "draft_max": 65},
        {"speculative": "ngram", "draft_max": True},
        {"speculative": "ngram", "draft_max": 2, "draft_min": 3},
        {"speculative": "ngram", "draft_min": -1},
        {"speculative": "ngram", "draft_rule": "sometimes"},
        {"speculative": "draft"},  # no draft model
        {"speculative": "mtp"},  # the fixture has no MTP blocks
    ],
)
def test_bad_load_arguments(opts):
    with pytest.raises(UsageError):
        moelite.load(_path("qwen3_moe"), n_threads=1, **opts)


def test_bad_call_arguments_and_vocab_mismatch():
    path = _path("qwen3_moe")
    with moelite.load(path, n_threads=1) as m:
        for bad in ({"speculative": "nope"}, {"speculative": "ngram", "draft_max": -2}, {"speculative": "draft"}):
            with pytest.raises(UsageError):
                m.generate(PROMPT, max_tokens=4, **bad)
    # a draft model with another vocabulary
    other = fixture_gguf("qwen3_moe", "q8_0", vocab_size=400)[1]
    with pytest.raises(UsageError, match="vocabulary"):
        moelite.load(path, n_threads=1, speculative="draft", draft_model=other)


@pytest.mark.parametrize("family", ["nemotron_h", "step3p5"])
def test_files_with_mtp_blocks(family, tmp_path):
    """A checkpoint with its MTP head kept (the release layout, Nemotron 3 / Step-3.5): n-gram speculation is exact
    on it, resident and capped; speculative='mtp' is refused, naming the MTP blocks it has (not run yet)."""
    from test_wave3_families import with_mtp

    from moelite.converters import convert

    path = tmp_path / "mtp.gguf"
    convert(with_mtp(family, tmp_path / "hf"), path, "q8_0", progress=False)
    ref = _greedy(path)[0]
    for opts in ({}, {"memory_budget": _minimum(path)}):
        out, stats = _greedy(path, speculative="ngram", draft_max=4, draft_rule="always", **opts)
        assert out == ref
        assert stats["speculative"]["drafted"] > 0
    with pytest.raises(UsageError, match="MTP block"):
        moelite.load(path, n_threads=1, speculative="mtp")


def test_cli_flags(capsys):
    """moelite run with --speculative ngram / -md prints the text of a run without; a bad --draft-max is refused."""
    import json

    from moelite.apps.cli import main

    path = str(_path("qwen3_moe"))
    base = ["run", path, "-p", "one two three one two three one two", "-n", "24", "--json", "-t", "1"]
    runs = []
    for extra in ([], ["--speculative", "ngram", "--draft-max", "4"], ["-md", path, "--draft-min", "2"]):
        assert main(base + extra) == 0
        runs.append(json.loads(capsys.readouterr().out))
    assert runs[1]["text"] == runs[0]["text"] and runs[2]["text"] == runs[0]["text"]
    assert runs[0]["stats"]["speculative"] is None
    assert runs[1]["stats"]["speculative"]["mode"] == "ngram" and runs[2]["stats"]["speculative"]["mode"] == "draft"
    assert main(base + ["--speculative", "ngram", "--draft-max", "0"]) == 2
    assert "argument --draft-max: '0' is not an integer in [1, 64]" in capsys.readouterr().err


def test_draft_model_under_the_cost_rule_is_exact():
    """The rule sizes a draft model's draft before it runs (declined: the draft model does not run); the counters
    add up and the text is the plain one."""
    path = _path("qwen3_moe")
    ref = _greedy(path)[0]
    out, stats = _greedy(path, speculative="draft", draft_model=fixture_gguf("qwen3_moe", "q8_0", seed=1)[1])
    assert out == ref
    sp = stats["speculative"]
    assert sp["windows"] + sp["declined"] + sp["no_draft"] == sp["steps"]


def test_server_with_ngram_speculation(tmp_path):
    """moelite serve --speculative ngram answers a completion with the text of a server without it."""
    import json
    import urllib.request

    from test_serve import running_server

    path = _path("qwen3_moe")
    body = json.dumps(
        {"model": "m", "prompt": "one two three one two three one two", "max_tokens": 24, "temperature": 0}
    ).encode()
    texts = []
    for i, extra in enumerate(((), ("--speculative", "ngram", "--draft-max", "4"))):
        (tmp_path / str(i)).mkdir()
        with running_server(tmp_path / str(i), *extra, model=path) as (base, _, _):
            req = urllib.request.Request(base + "/completions", body, {"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=120) as r:
                texts.append(json.loads(r.read())["choices"][0]["text"])
    assert texts[1] == texts[0] and texts[0]


def test_per_call_rule():
    """draft_rule per call: 'always' verifies every n-gram draft, 'cost' decides; both give the plain text."""
    path = _path("qwen3_moe")
    with moelite.load(path, n_threads=1, n_ubatch=64) as m:
        ref = m.generate(PROMPT, max_tokens=N, stop_ids=[])
        got = m.generate(PROMPT, max_tokens=N, stop_ids=[], speculative="ngram", draft_rule="always")
        sp = m.stats()["speculative"]
        assert got == ref and sp["declined"] == 0 and sp["windows"] > 0
        with pytest.raises(UsageError, match="draft_rule"):
            m.generate(PROMPT, max_tokens=4, speculative="ngram", draft_rule="never")
