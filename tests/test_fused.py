"""One graph per step (issue 21, csrc/model_fused.cpp): with every expert resident on the CPU, the embedding, every
layer (routing as a ggml custom op) and the logits run as one ggml graph. Same builders, same ops, same order as the
per-layer graphs: logits and tokens are bit-identical, for every family, prompt and decode, one ubatch or several;
the cache counters are the same; where the step cannot be one graph (experts offloaded, recurrent layers, a routing
trace) the model says so and runs per layer."""

from __future__ import annotations

import numpy as np
import pytest
from fixture_models import RUNTIME_FAMILIES, fixture_gguf

import moelite
from moelite.runtime.hparams import RECURRENT_MIXERS

PROMPT = list(range(3, 40))


def _run(path, **opts):
    with moelite.load(path, kv_type="f32", n_threads=2, **opts) as m:
        full = m.logits(PROMPT)  # one ubatch, every row's logits
        m.reset()
        m.eval(PROMPT[:20])
        steps = np.stack([m.eval([t]) for t in PROMPT[20:26]])  # decode: one token per step
        recurrent = any(x in RECURRENT_MIXERS for x in m.hparams["layer_mixer"])
        return full, steps, m.stats(), m.info(), recurrent


@pytest.mark.parametrize("family", RUNTIME_FAMILIES)
def test_fused_step_is_bit_identical(family):
    _, path = fixture_gguf(family)
    fused = _run(path)
    layered = _run(path, fused_graph=False)
    assert fused[3]["fused_graph"] is not fused[4]  # recurrent layers (the hybrid families, KDA): per layer
    assert layered[3]["fused_graph"] is False
    np.testing.assert_array_equal(fused[0], layered[0])
    np.testing.assert_array_equal(fused[1], layered[1])
    counts = ("hits", "misses", "loads", "bytes_read")  # counted as the per-layer step counts them
    assert [[s[k] for k in counts] for s in fused[2]["per_layer"]] == [
        [s[k] for k in counts] for s in layered[2]["per_layer"]
    ]
    assert fused[2]["total"]["hits"] > 0


@pytest.mark.parametrize("ubatch", [1, 7, 64])
def test_fused_ubatches_and_quantized(ubatch):
    """Several ubatches per call (the logits rows of each land in place) on a quantized model."""
    _, path = fixture_gguf("qwen3_moe", type="q8_0")
    outs = []
    for fused in (True, False):
        with moelite.load(path, n_threads=2, n_ubatch=ubatch, fused_graph=fused) as m:
            outs.append((m.logits(PROMPT), m.generate(PROMPT[:5], max_tokens=12, stop_ids=[])))
    np.testing.assert_array_equal(outs[0][0], outs[1][0])
    assert outs[0][1] == outs[1][1]


def test_fused_only_where_every_expert_is_resident():
    _, path = fixture_gguf("qwen3_moe")
    with moelite.load(path, n_ubatch=64) as m:
        minimum = m.plan.minimum_budget
        assert m.info()["fused_graph"] is True
    with moelite.load(path, n_ubatch=64, memory_budget=minimum) as m:  # experts offloaded: per layer
        assert m.info()["offloaded"] and m.info()["fused_graph"] is False
    with moelite.load(path, record_trace=True) as m:  # the trace needs each layer's scores on the host
        assert m.info()["fused_graph"] is False
