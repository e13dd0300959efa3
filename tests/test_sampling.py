"""Sampler chain (penalty -> top-k -> top-p -> min-p -> temperature -> draw) and stop strings."""

from __future__ import annotations

import random

import numpy as np
import pytest

from moelite.errors import UsageError
from moelite.runtime.sampling import DEFAULT_MAX_TOKENS, Sampler, SamplerConfig, StopChecker, generation_options

PROBS = np.array([0.5, 0.3, 0.15, 0.05])
LOGITS = np.log(PROBS).astype(np.float32)  # [4]


def _draw(cfg: SamplerConfig, logits=LOGITS, n: int = 4000, history=()) -> np.ndarray:
    s = Sampler(cfg)
    return np.array([s.sample(logits, list(history)) for _ in range(n)])


def _freq(ids: np.ndarray, n_vocab: int = 4) -> np.ndarray:
    return np.bincount(ids, minlength=n_vocab) / ids.size


def test_greedy_is_argmax_with_lowest_id_on_ties() -> None:
    s = Sampler(SamplerConfig())
    assert s.sample(np.array([1, 3, 3, 2], np.float32), []) == 1
    assert s.sample(np.array([-np.inf, -5, -np.inf], np.float32), []) == 1
    assert all(s.sample(LOGITS, []) == 0 for _ in range(10))


def test_repetition_penalty_divides_positive_and_multiplies_negative() -> None:
    greedy = Sampler(SamplerConfig(repetition_penalty=1.1))
    assert greedy.sample(np.array([2.0, 1.9], np.float32), [0]) == 1  # 2 / 1.1 = 1.82 < 1.9
    assert greedy.sample(np.array([2.0, 1.7], np.float32), [0, 0]) == 0  # 1.82 > 1.7; repeats count once
    assert greedy.sample(np.array([-1.0, -1.05], np.float32), [0]) == 1  # -1 * 1.1 = -1.1 < -1.05
    assert greedy.sample(np.array([-1.0, -1.05], np.float32), [1]) == 0  # -1.155 pushed further down
    # with sampling too: a heavy penalty on the best token moves the mass away from it
    ids = _draw(SamplerConfig(temperature=1.0, repetition_penalty=50.0, seed=11), n=2000, history=[0])
    assert _freq(ids)[0] < 0.01
    with pytest.raises(UsageError, match="outside"):
        greedy.sample(np.array([1.0, 2.0], np.float32), [2])


def test_seed_makes_sampling_deterministic() -> None:
    cfg = SamplerConfig(temperature=1.0, seed=1234)
    a, b = _draw(cfg, n=300), _draw(cfg, n=300)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, _draw(SamplerConfig(temperature=1.0, seed=4321), n=300))


def test_temperature_one_follows_the_distribution() -> None:
    f = _freq(_draw(SamplerConfig(temperature=1.0, seed=0), n=20000))
    assert np.abs(f - PROBS).max() < 0.015  # binomial sd <= 0.0036


def test_temperature_flattens_and_sharpens() -> None:
    hot = _freq(_draw(SamplerConfig(temperature=100.0, seed=1), n=8000))
    assert np.abs(hot - 0.25).max() < 0.03
    cold = _freq(_draw(SamplerConfig(temperature=0.05, seed=2), n=2000))
    assert cold[0] > 0.999


def test_top_p_only_samples_the_nucleus() -> None:
    ids = _draw(SamplerConfig(temperature=1.0, top_p=0.75, seed=3), n=6000)
    assert set(ids.tolist()) == {0, 1}  # 0.5 + 0.3 >= 0.75: the smallest set reaching top_p
    f = _freq(ids)
    assert abs(f[0] - 0.5 / 0.8) < 0.025  # renormalised inside the nucleus
    # temperature comes after top-p: even a flat temperature cannot leave the nucleus
    hot = _draw(SamplerConfig(temperature=50.0, top_p=0.75, seed=4), n=3000)
    assert set(hot.tolist()) == {0, 1} and abs(_freq(hot)[0] - 0.5) < 0.04
    assert set(_draw(SamplerConfig(temperature=1.0, top_p=0.5, seed=5), n=500).tolist()) == {0}


def test_top_k_keeps_the_k_best_lowest_ids_on_ties() -> None:
    assert set(_draw(SamplerConfig(temperature=1.0, top_k=2, seed=6), n=3000).tolist()) == {0, 1}
    tied = np.array([0.0, 1.0, 1.0, 1.0, 0.5], np.float32)
    assert set(_draw(SamplerConfig(temperature=1.0, top_k=2, seed=7), logits=tied, n=2000).tolist()) == {1, 2}
    assert set(_draw(SamplerConfig(temperature=1.0, top_k=100, seed=8), n=3000).tolist()) == {0, 1, 2, 3}


def test_min_p_drops_tokens_below_fraction_of_best() -> None:
    ids = _draw(SamplerConfig(temperature=1.0, min_p=0.2, seed=9), n=6000)
    assert set(ids.tolist()) == {0, 1, 2}  # 0.05 < 0.2 * 0.5
    f = _freq(ids)
    assert abs(f[2] - 0.15 / 0.95) < 0.02


def test_large_vocab_chain() -> None:
    rng = np.random.default_rng(0)
    logits = rng.normal(size=50_000).astype(np.float32)
    best = set(np.argsort(-logits, kind="stable")[:40].tolist())
    s = Sampler(SamplerConfig(temperature=0.8, top_k=40, top_p=0.9, min_p=0.01, repetition_penalty=1.2, seed=10))
    history = list(range(100))
    for _ in range(50):
        assert s.sample(logits, history) in best | set(history)


@pytest.mark.parametrize("scale", [8.0, 0.5])  # peaked: the nucleus is found among a few candidates; flat: full sort
def test_top_p_nucleus_on_a_large_vocab(scale) -> None:
    logits = (np.random.default_rng(1).standard_normal(30_000) * scale).astype(np.float32)
    p = np.exp(logits.astype(np.float64) - logits.max())
    p /= p.sum()
    order = np.argsort(-p, kind="stable")
    nucleus = set(order[: int(np.searchsorted(np.cumsum(p[order]), 0.8)) + 1].tolist())
    ids = _draw(SamplerConfig(temperature=1.0, top_p=0.8, seed=12), logits=logits, n=300)
    assert set(ids.tolist()) <= nucleus
    if scale > 1:
        assert len(nucleus) < 1024
    else:
        assert len(nucleus) > 1024


@pytest.mark.parametrize(
    "kw",
    [
        {"temperature": -0.1},
        {"temperature": float("nan")},
        {"temperature": "1"},
        {"top_k": -1},
        {"top_k": 2.5},
        {"top_p": 0.0},
        {"top_p": 1.5},
        {"min_p": -0.1},
        {"min_p": 2.0},
        {"repetition_penalty": 0.0},
        {"repetition_penalty": float("inf")},
        {"seed": -2},
        {"seed": 1.5},
        {"top_k": True},
    ],
)
def test_config_validation(kw) -> None:
    name = next(iter(kw))
    with pytest.raises(UsageError, match=name):
        SamplerConfig(**kw)


def test_logits_validation() -> None:
    s = Sampler(SamplerConfig(temperature=1.0))
    with pytest.raises(UsageError, match="1-D"):
        s.sample(np.zeros((2, 3), np.float32), [])
    with pytest.raises(UsageError, match="1-D"):
        s.sample(np.zeros(0, np.float32), [])
    with pytest.raises(UsageError, match="NaN"):
        s.sample(np.array([0.0, np.nan], np.float32), [])
    with pytest.raises(UsageError, match="-inf"):
        s.sample(np.full(3, -np.inf, np.float32), [])


# --- stop strings ------------------------------------------------------------------------------------------


def test_stop_string_split_across_pieces() -> None:
    sc = StopChecker(["</stop>"])
    assert sc.push("Hello</s") == "Hello"  # "</s" may begin the stop string: held back
    assert not sc.stopped
    assert sc.push("top> and more") == ""
    assert sc.stopped and sc.stop_string == "</stop>"
    assert sc.push("later") == "" and sc.flush() == ""


def test_held_text_is_released_when_it_is_not_a_stop() -> None:
    sc = StopChecker(["<|end|>", "###"])
    assert sc.push("a <|en") == "a "
    assert sc.push("try") == "<|entry"
    assert sc.push("##") == ""
    assert sc.flush() == "##" and not sc.stopped


def test_earliest_stop_wins_and_text_before_it_is_returned() -> None:
    sc = StopChecker(["world", "lo w"])
    assert sc.push("hello world") == "hel" and sc.stop_string == "lo w"
    assert StopChecker([]).push("anything") == "anything"
    assert StopChecker("User:").push("ok\nUser: hi") == "ok\n"


def test_stop_checker_equals_one_shot_search_for_random_splits() -> None:
    rnd = random.Random(0)
    stops = ["\n\nUser:", "<|im_end|>", "aab"]
    for _ in range(300):
        text = "".join(rnd.choice(["a", "b", "\n", "User:", "<|im_", "end|>", "x"]) for _ in range(rnd.randint(0, 20)))
        cuts = sorted(rnd.sample(range(len(text) + 1), k=min(len(text) + 1, rnd.randint(0, 6))))
        pieces = [text[i:j] for i, j in zip([0] + cuts, cuts + [len(text)])]
        sc = StopChecker(stops)
        out = "".join(sc.push(p) for p in pieces) + sc.flush()
        hits = [i for i in (text.find(s) for s in stops) if i >= 0]
        assert out == (text[: min(hits)] if hits else text), (text, pieces)
        assert sc.stopped == bool(hits)


def test_bad_stop_strings() -> None:
    with pytest.raises(UsageError, match="non-empty"):
        StopChecker(["ok", ""])


# --- generation options: one set of names and defaults -----------------------------------------------------


def test_seed_minus_one_means_random_as_in_llama_cpp() -> None:
    assert SamplerConfig(seed=-1).seed is None


def test_generation_options_take_the_command_lines_names() -> None:
    o = generation_options({"repeat_penalty": 1.3, "temp": 0.5, "n_predict": 7, "ignore_eos": True, "stop": "##"})
    assert o.sampler.repetition_penalty == 1.3 and o.sampler.temperature == 0.5
    assert o.max_tokens == 7 and o.stop_ids == () and o.stop == ("##",)
    d = generation_options({})
    assert d.sampler == SamplerConfig() and d.max_tokens == DEFAULT_MAX_TOKENS and d.stop_ids is None


@pytest.mark.parametrize(
    "kw,needle",
    [
        ({"temprature": 1.0}, "unknown option 'temprature'; valid options: max_tokens, temperature"),
        ({"temp": 1.0, "temperature": 0.5}, "given twice"),
        ({"max_tokens": -1}, "max_tokens=-1"),
        ({"max_tokens": 2.5}, "max_tokens=2.5"),
        ({"stop": 5}, "stop strings must be"),
        ({"ignore_eos": True, "stop_ids": [1]}, "contradict"),
        ({"stop_ids": 5}, "stop_ids=5: expected a list"),
    ],
)
def test_generation_options_errors_name_the_option(kw, needle) -> None:
    with pytest.raises(UsageError, match=needle):
        generation_options(kw)
