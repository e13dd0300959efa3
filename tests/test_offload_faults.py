"""Offloading under faults and concurrency: a GGUF truncated while the model is open raises
moelite.errors.ExpertIOError on the next miss, cache hits keep working, a reopened file works; two threads
generating on one Model are serialized (each gets the answer it would get alone)."""

from __future__ import annotations

import shutil
import threading

import numpy as np
import pytest
from fixture_models import fixture_gguf

import moelite


@pytest.fixture()
def model_copy(tmp_path):
    _, src = fixture_gguf("qwen3_moe")
    dst = tmp_path / "model.gguf"
    shutil.copy(src, dst)
    return dst


def smallest(path, **kw):
    with moelite.load(path, kv_type="f32", n_ubatch=64) as m:
        minimum = m.plan.minimum_budget
    return moelite.load(path, kv_type="f32", n_threads=1, n_ubatch=64, memory_budget=minimum, **kw)


@pytest.mark.parametrize("prefetch,host_slots", [(False, None), (True, None), (True, 3)])
def test_truncated_while_open(model_copy, prefetch, host_slots):
    original = model_copy.read_bytes()
    with moelite.load(model_copy, kv_type="f32", n_threads=1) as ref:
        want_a = ref.logits([11])
        want_b = ref.logits([40, 41, 42, 43, 44, 45])
    m = smallest(model_copy, prefetch=prefetch, host_slots=host_slots)  # host_slots: a RAM tier reads the file
    assert np.array_equal(m.logits([11]), want_a)  # its experts are now cached
    first_expert = min(off for name, (_, _, off, _) in m.tensors.items() if "_exps" in name)
    with open(model_copy, "r+b") as f:
        f.truncate(first_expert)  # every expert byte is gone
    assert np.array_equal(m.logits([11]), want_a)  # all hits: still served
    with pytest.raises(moelite.errors.ExpertIOError, match=str(model_copy)):
        m.logits([40, 41, 42, 43, 44, 45])  # misses need the disk
    assert np.array_equal(m.logits([11]), want_a)  # and the model is still usable
    model_copy.write_bytes(original)  # repaired in place
    m.reopen()
    assert np.array_equal(m.logits([40, 41, 42, 43, 44, 45]), want_b)
    m.close()


def test_two_threads_serialize(model_copy):
    m = smallest(model_copy, policy="lfuda")
    prompts = [[3, 4, 5, 6], [90, 80, 70]]
    alone = [m.generate(p, max_tokens=24, stop_ids=[]) for p in prompts]
    results: dict[int, list[int]] = {}
    errors: list[BaseException] = []

    def worker(i: int) -> None:
        try:
            for _ in range(3):
                out = m.generate(prompts[i], max_tokens=24, stop_ids=[])
                assert out == alone[i]
            results[i] = out
        except BaseException as e:  # noqa: BLE001 -- reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors
    assert results == {0: alone[0], 1: alone[1]}
    m.close()


def test_closed_model_refuses(model_copy):
    m = moelite.load(model_copy)
    m.close()
    with pytest.raises(moelite.errors.UsageError, match="closed"):
        m.logits([1, 2])
