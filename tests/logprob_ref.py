"""Shared by the log-probability tests (test_serve_logprobs, test_lm_eval, test_perplexity): an independent float64
log_softmax (not runtime/perplexity.py's) and the embedded demo model, loaded once per module."""

from __future__ import annotations

import numpy as np


def log_softmax64(logits: np.ndarray) -> np.ndarray:
    """log p = x - logsumexp(x) over the last axis, in float64."""
    x = logits.astype(np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - (m + np.log(np.sum(np.exp(x - m), axis=-1, keepdims=True)))


def demo_model():
    """The embedded demo model, one thread (as the test servers run it): `yield from demo_model()` in a fixture."""
    import moelite
    from moelite.runtime.model import default_model_path

    with moelite.load(default_model_path(), n_threads=1) as m:
        yield m
