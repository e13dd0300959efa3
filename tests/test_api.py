"""The Python API as a new user meets it: one set of option names and defaults, load() of a HF directory and of
'~/...', dir(moelite), clear errors, one generation at a time per model (re-entry is an error, an abandoned
stream frees the model), prefill progress and cancel() during the prompt."""

from __future__ import annotations

import gc
import os
import threading
import warnings

import pytest

import moelite
from moelite.errors import BudgetError, ModelFormatError, UsageError
from moelite.runtime.sampling import DEFAULT_MAX_TOKENS

PROMPT = "It is a truth universally"


@pytest.fixture(scope="module")
def fixture():
    from fixture_models import fixture_gguf

    return fixture_gguf("qwen3_moe")  # (hf_dir, gguf)


@pytest.fixture(scope="module")
def model(fixture):
    with moelite.load(fixture[1], n_threads=1) as m:
        yield m


def test_load_and_model_are_in_dir_of_moelite():
    assert {"load", "Model", "errors"} <= set(dir(moelite))
    assert moelite.load is moelite.runtime.model.load


def test_the_api_takes_the_command_lines_names(model):
    ids = model.tokenizer.encode(PROMPT)
    base = model.generate(ids, max_tokens=12, repetition_penalty=1.3, ignore_eos=True)
    assert len(base) == 12  # ignore_eos: never stops early
    assert model.generate(ids, n_predict=12, repeat_penalty=1.3, ignore_eos=True) == base
    assert model.generate(ids, max_tokens=12, temp=0.9, seed=5, stop_ids=[]) == model.generate(
        ids, max_tokens=12, temperature=0.9, seed=5, stop_ids=[]
    )
    assert len(model.generate(ids, ignore_eos=True)) == DEFAULT_MAX_TOKENS  # the one default


@pytest.mark.parametrize("call", ["generate", "stream", "chat", "stream_tokens"])
def test_an_unknown_keyword_is_a_usage_error_listing_the_valid_ones(model, call):
    arg = [{"role": "user", "content": "hi"}] if call == "chat" else PROMPT
    with pytest.raises(UsageError, match=r"unknown option 'max_new_token'; valid options: max_tokens, temperature"):
        getattr(model, call)(arg, max_new_token=3)


def test_load_rejects_unknown_options(fixture):
    with pytest.raises(UsageError, match="unknown option 'budget'.*memory_budget"):
        moelite.load(fixture[1], budget="1GiB")


def test_load_of_a_hf_directory_converts_it_like_the_cli(fixture, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    hf, gguf = fixture
    with moelite.load(hf, convert_type="f32", n_threads=1) as m:
        assert str(tmp_path / "cache" / "moelite" / "converted") in m.path
        got = m.generate(PROMPT, max_tokens=8)
    with moelite.load(gguf, n_threads=1) as m:
        assert m.generate(PROMPT, max_tokens=8) == got
    with pytest.raises(ModelFormatError, match="is a directory"):
        moelite.load(tmp_path)  # a directory without config.json


def test_tilde_is_expanded(fixture, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    os.symlink(fixture[1], tmp_path / "m.gguf")
    with moelite.load("~/m.gguf", n_threads=1) as m:
        assert m.path == str(tmp_path / "m.gguf")


def test_n_ctx_above_the_trained_context_warns(fixture):
    with moelite.load(fixture[1], n_threads=1, n_ctx=64) as m:
        trained = int(m.hparams["context_length"])
    with pytest.warns(UserWarning, match=f"above the context the model was trained with \\({trained} tokens\\)"):
        moelite.load(fixture[1], n_threads=1, n_ctx=trained + 8).close()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        moelite.load(fixture[1], n_threads=1, n_ctx=trained).close()


def test_budget_error_rounds_the_minimum_up(fixture):
    with pytest.raises(BudgetError) as e:
        moelite.load(fixture[1], memory_budget="100KiB", n_threads=1)
    minimum = e.value.minimum
    shown = float(str(e.value).rsplit("at least ", 1)[1].split()[0])
    unit = {"KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30}[str(e.value).rsplit()[-1]]
    assert shown * unit >= minimum  # never less than what is needed
    with moelite.load(fixture[1], memory_budget=int(shown * unit), n_threads=1) as m:  # and it loads
        assert m.plan.budget == int(shown * unit)


def test_reentering_a_stream_in_the_same_thread_is_a_usage_error(model):
    it = model.stream(PROMPT, max_tokens=8, ignore_eos=True)
    first = next(it)
    with pytest.raises(UsageError, match="still open in this thread"):
        model.generate(PROMPT, max_tokens=4)
    with pytest.raises(UsageError, match="still open"):
        model.reset()
    rest = "".join(it)  # the open stream is intact
    assert first + rest == model.generate(PROMPT, max_tokens=8, ignore_eos=True)


def test_an_abandoned_stream_frees_the_model_for_other_threads(model):
    it = model.stream(PROMPT, max_tokens=30, ignore_eos=True)
    next(it)
    done = threading.Event()
    out: list[str] = []

    def other() -> None:
        out.append(model.generate(PROMPT, max_tokens=4))
        done.set()

    t = threading.Thread(target=other, daemon=True)
    t.start()
    assert not done.wait(0.3)  # waits: the stream holds the model
    del it  # abandoned: garbage-collected, closed
    gc.collect()
    t.join(60)
    assert done.is_set() and out[0] == model.generate(PROMPT, max_tokens=4)


def test_prefill_reports_progress_and_cancel_stops_it(fixture):
    with moelite.load(fixture[1], n_threads=1, n_ubatch=16) as m:
        ids = (m.tokenizer.encode(PROMPT * 20))[:100]
        want = m.generate(ids, max_tokens=6, stop_ids=[])
        m.reset()
        seen: list[tuple[int, int]] = []
        m.prefill_progress = lambda done, total: seen.append((done, total))
        assert m.generate(ids, max_tokens=6, stop_ids=[]) == want  # chunked prefill: the same answer
        assert seen == [(min(n, 100), 100) for n in range(16, 116, 16)]
        m.reset()
        m.prefill_progress = lambda done, total: m.cancel() if done >= 32 else None
        assert m.generate(ids, max_tokens=6, stop_ids=[]) == []
        assert m.last_stats.finish_reason == "cancelled"
        m.prefill_progress = None
        assert m.generate(ids, max_tokens=6, stop_ids=[]) == want  # the next request is unaffected


def test_eval_continues_the_context_like_generation(fixture):
    """Model.eval (teacher-forced decoding, bench/worker.py --teacher): eval(prompt) then eval([t]) per token gives
    the logits of a fresh run over the whole text, and under the smallest budget (experts read from disk) the very
    same bits as resident; past n_ctx it refuses and keeps the context."""
    import numpy as np

    ids = [3, 17, 5, 9, 30, 2, 11, 7]
    with moelite.load(fixture[1], n_threads=1, n_ctx=16) as m:
        whole = m.logits(ids)
        m.reset()
        steps = [m.eval(ids[:5])] + [m.eval([t]) for t in ids[5:]]
        np.testing.assert_allclose(np.stack(steps), whole[4:], atol=1e-4)
        with pytest.raises(UsageError, match="n_ctx=16"):
            m.eval(list(range(9)))
        after = m.eval([4])  # the refused call evaluated nothing
        assert m._ctx_ids == ids + [4]
    try:
        moelite.load(fixture[1], n_threads=1, n_ctx=16, memory_budget="1MiB")
    except BudgetError as e:
        small = e.minimum
    with moelite.load(fixture[1], n_threads=1, n_ctx=16, memory_budget=small) as m:
        assert m.plan.slots is not None
        tiny = [m.eval(ids[:5])] + [m.eval([t]) for t in ids[5:]] + [m.eval([4])]
    np.testing.assert_array_equal(np.stack(tiny), np.stack(steps + [after]))
