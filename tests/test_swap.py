"""Cache-aware routing (issue 17, swap_threshold): off by default and then exact; on, a routed expert that is not
resident is replaced by a resident one of close router probability, which turns misses into hits, changes the
output (lossy, by the user's choice) and is counted."""

from __future__ import annotations

import numpy as np
import pytest

import moelite
from moelite.errors import BudgetError, UsageError

IDS = [3, 17, 5, 9, 30, 2, 11, 7, 21, 4, 8, 13]


@pytest.fixture(scope="module")
def gguf():
    from fixture_models import fixture_gguf

    return fixture_gguf("qwen3_moe")[1]


def _smallest_budget(path) -> int:
    try:
        moelite.load(path, n_threads=1, n_ctx=32, memory_budget="1MiB")
    except BudgetError as e:
        return e.minimum
    raise AssertionError("1 MiB holds the whole fixture")


def _decode(path, **opts):
    """Teacher-forced: eval(prompt), then one eval per token; logits of every step and the cache counters."""
    with moelite.load(path, n_threads=1, n_ctx=32, prefetch=False, **opts) as m:
        steps = [m.eval(IDS[:4])] + [m.eval([t]) for t in IDS[4:]]
        return np.stack(steps), m.stats()["total"]


def test_off_by_default_and_exact(gguf):
    budget = _smallest_budget(gguf)
    resident, st = _decode(gguf)
    assert st["substitutions"] == 0
    off, st = _decode(gguf, memory_budget=budget)
    np.testing.assert_array_equal(off, resident)  # offloaded, exact
    assert st["substitutions"] == 0 and st["misses"] > 0
    # everything resident: nothing to swap, whatever the threshold
    swapped_resident, st = _decode(gguf, swap_threshold=0.9)
    np.testing.assert_array_equal(swapped_resident, resident)
    assert st["substitutions"] == 0


def test_swaps_turn_misses_into_hits_and_are_counted(gguf):
    budget = _smallest_budget(gguf)
    exact, st0 = _decode(gguf, memory_budget=budget)
    approx, st1 = _decode(gguf, memory_budget=budget, swap_threshold=0.9)
    assert st1["substitutions"] > 0
    assert st1["misses"] < st0["misses"]
    assert np.isfinite(approx).all() and not np.array_equal(approx, exact)
    # a threshold too tight to find a substitute changes nothing
    tight, st2 = _decode(gguf, memory_budget=budget, swap_threshold=1e-9)
    np.testing.assert_array_equal(tight, exact)
    assert st2["substitutions"] == 0


@pytest.mark.parametrize("bad", [1.0, -0.1, float("nan"), 2])
def test_bad_thresholds_are_usage_errors(gguf, bad):
    with pytest.raises(UsageError, match="swap_threshold"):
        moelite.load(gguf, n_threads=1, n_ctx=32, swap_threshold=bad)


def test_cli_status_line_says_how_many_were_swapped(gguf, capsys):
    from moelite.apps.cli import main

    rc = main(
        [
            "run",
            str(gguf),
            "-p",
            "hello there",
            "-n",
            "8",
            "--temp",
            "0",
            "-t",
            "1",
            "--stats",
            "--ignore-eos",
            "-c",
            "32",
            "--memory-budget",
            str(_smallest_budget(gguf)),
            "--swap-threshold",
            "0.9",
        ]
    )
    assert rc == 0
    assert "swapped since load (--swap-threshold 0.9)" in capsys.readouterr().err
