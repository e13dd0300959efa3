"""Next-token sampling, the generation options and their defaults, and stop strings.

`Sampler.sample(logits, history)` runs llama.cpp's chain order:
repetition penalty -> top-k -> top-p -> min-p -> temperature -> draw from a seeded numpy Generator.
Temperature 0 is greedy: argmax after the repetition penalty, lowest id on ties.

The defaults of every generation option live here, once: `SamplerConfig`'s field defaults and
`DEFAULT_MAX_TOKENS`. The Python API, `moelite run`/`chat` and `moelite serve` all read them, so the same
request gives the same answer everywhere (greedy unless a temperature is given, as in mlx-lm).
`generation_options` accepts the API's names and the command line's (`repeat_penalty`, `temp`, `n_predict`,
`ignore_eos`) and turns an unknown one into a UsageError that lists the valid names.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np

from moelite.errors import UsageError

from .args import INT32_MAX, INT64_MAX, finite_float, int_in, ints_in, is_int

DEFAULT_MAX_TOKENS = 256  # tokens generated when the caller does not say

# The accepted range of every numeric generation option (runtime/args.py checks them; the command line's flags in
# apps/common.py take the same ranges). seed -1 means None (fresh entropy), as in llama.cpp.
RANGES: dict[str, dict[str, Any]] = {
    "temperature": dict(lo=0.0),  # 0: greedy
    "top_k": dict(lo=0, hi=INT64_MAX),  # 0: off
    "top_p": dict(lo=0.0, hi=1.0, lo_open=True),
    "min_p": dict(lo=0.0, hi=1.0),
    "repetition_penalty": dict(lo=0.0, lo_open=True),
    "seed": dict(lo=0, hi=INT64_MAX),
    "max_tokens": dict(lo=0, hi=INT64_MAX),
}
INT_OPTIONS = ("top_k", "seed", "max_tokens")


@dataclass(frozen=True)
class SamplerConfig:
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off; keep the smallest set of most likely tokens with mass >= top_p
    min_p: float = 0.0  # 0: off; keep tokens with p >= min_p * p_max
    repetition_penalty: float = 1.0  # 1: off; for ids in history: logit / rp if > 0 else logit * rp
    seed: int | None = None  # None (or -1, as in llama.cpp): fresh OS entropy

    def __post_init__(self) -> None:
        if is_int(self.seed) and self.seed == -1:
            object.__setattr__(self, "seed", None)
        for name, rng in RANGES.items():  # each value as its checked int / float (numpy scalars become Python's)
            if name != "max_tokens":
                check = int_in if name in INT_OPTIONS else finite_float
                value = check(f"sampler option {name}", getattr(self, name), **rng, optional=name == "seed")
                object.__setattr__(self, name, value)


SAMPLER_KEYS = tuple(f.name for f in fields(SamplerConfig))
# the command line's (and llama.cpp's) spellings of the same options
ALIASES = {
    "temp": "temperature",
    "repeat_penalty": "repetition_penalty",
    "n_predict": "max_tokens",
    "max_new_tokens": "max_tokens",
}
# speculative decoding per call (runtime/speculative.py); None: the model's load settings
SPEC_KEYS = ("speculative", "draft_max", "draft_min", "draft_rule")
OPTION_KEYS = ("max_tokens", *SAMPLER_KEYS, "stop", "ignore_eos", "stop_ids", *SPEC_KEYS)


@dataclass(frozen=True)
class GenerationOptions:
    """One generation's options, checked: sampler settings, token limit, stop strings and stop tokens."""

    sampler: SamplerConfig
    max_tokens: int = DEFAULT_MAX_TOKENS
    stop: tuple[str, ...] = ()
    stop_ids: tuple[int, ...] | None = None  # None: the tokenizer's end-of-text ids
    speculative: dict[str, Any] = field(default_factory=dict)  # SPEC_KEYS given for this call (checked at use)


def generation_options(options: Mapping[str, Any], where: str = "generate") -> GenerationOptions:
    """Keyword arguments of Model.generate / stream / chat / stream_tokens -> GenerationOptions. Aliases are
    mapped to their option; an unknown keyword or a bad value is a UsageError naming it."""
    kw: dict[str, Any] = {}
    for key, value in options.items():
        name = ALIASES.get(key, key)
        if name not in OPTION_KEYS:
            raise UsageError(
                f"{where}(): unknown option {key!r}; valid options: {', '.join(OPTION_KEYS + tuple(ALIASES))}"
            )
        if name in kw:
            raise UsageError(f"{where}(): {key!r} given twice (it is {name!r})")
        kw[name] = value
    max_tokens = int_in("max_tokens", kw.pop("max_tokens", DEFAULT_MAX_TOKENS), **RANGES["max_tokens"])
    stop = kw.pop("stop", ())
    if isinstance(stop, str):
        stop = (stop,)
    StopChecker(stop)  # validates
    stop_ids = kw.pop("stop_ids", None)
    if kw.pop("ignore_eos", False):
        if stop_ids:
            raise UsageError(f"{where}(): ignore_eos=True and stop_ids={stop_ids!r} contradict each other")
        stop_ids = ()
    if stop_ids is not None:
        stop_ids = tuple(ints_in("stop_ids", stop_ids, 0, INT32_MAX))  # token ids: int32 in the core
    spec = {k: kw.pop(k) for k in SPEC_KEYS if k in kw}
    return GenerationOptions(SamplerConfig(**kw), max_tokens, tuple(stop), stop_ids, spec)


class Sampler:
    """Stateful only through its random generator: the same seed and inputs give the same ids."""

    def __init__(self, config: SamplerConfig | None = None) -> None:
        self.config = config or SamplerConfig()
        self.rng = np.random.default_rng(self.config.seed)

    def sample(self, logits: np.ndarray, history: Sequence[int] = ()) -> int:
        """logits: [n_vocab] scores of the next token; history: ids so far (prompt + generated)."""
        ids, p = self.distribution(logits, history)
        if self.config.temperature == 0.0:
            return int(ids[0])  # greedy: no draw, the random stream is untouched
        cdf = np.cumsum(p)
        i = int(np.searchsorted(cdf, self.rng.random() * cdf[-1], side="right"))
        return int(ids[min(i, ids.size - 1)])

    def distribution(self, logits: np.ndarray, history: Sequence[int] = ()) -> tuple[np.ndarray, np.ndarray]:
        """What `sample` draws from: candidate ids [n] and their unnormalized probabilities [n] (greedy: the argmax
        alone, probability 1). Speculative decoding's rejection step (runtime/speculative.py) reads it."""
        cfg = self.config
        logits = np.asarray(logits)
        if logits.ndim != 1 or logits.size == 0:
            raise UsageError(f"logits must be a non-empty 1-D array [n_vocab], got shape {logits.shape}")
        if np.isnan(logits).any():
            raise UsageError("logits contain NaN")
        x = logits.astype(np.float64)  # [n_vocab], a copy

        if cfg.repetition_penalty != 1.0 and len(history):
            seen = np.unique(np.asarray(history, dtype=np.int64))
            if seen.min() < 0 or seen.max() >= x.size:
                raise UsageError(f"history holds ids outside [0, {x.size}); vocab size is {x.size}")
            s = x[seen]
            # a tiny penalty may push a positive logit past float64: the largest double keeps it the favourite
            x[seen] = np.minimum(np.where(s > 0, s / cfg.repetition_penalty, s * cfg.repetition_penalty), _F64_MAX)

        if cfg.temperature == 0.0:
            return np.array([int(np.argmax(x))]), np.ones(1)  # first maximum: lowest id on ties

        ids = _top_k(x, cfg.top_k) if 0 < cfg.top_k < x.size else np.arange(x.size)  # [n_cand]
        z = x[ids]
        if not np.isfinite(z.max()):
            raise UsageError("all logits are -inf: nothing to sample")
        if cfg.top_p < 1.0:
            total = np.exp(z - z.max()).sum()
            for probe in _NUCLEUS_PROBES:  # sort only the best few when they already hold top_p of the mass
                if ids.size <= probe:
                    break
                best = _top_k(z, probe)
                if np.exp(z[best] - z.max()).sum() >= cfg.top_p * total:
                    ids, z = ids[best], z[best]
                    break
            order = np.lexsort((ids, -z))  # most likely first, lowest id first on ties
            ids, z = ids[order], z[order]
            cum = np.cumsum(np.exp(z - z[0])) / total
            keep = int(np.searchsorted(cum, cfg.top_p, side="left")) + 1  # smallest prefix with mass >= top_p
            ids, z = ids[:keep], z[:keep]
        if cfg.min_p > 0.0:
            mask = z >= z.max() + math.log(cfg.min_p)  # p_i >= min_p * p_max, in logit space
            ids, z = ids[mask], z[mask]

        with np.errstate(over="ignore"):  # <= 0 before the division: a tiny temperature gives -inf, never NaN
            z = (z - z.max()) / cfg.temperature
        return ids, np.exp(z)


_F64_MAX = float(np.finfo(np.float64).max)
# top-p first tries the 1024, then 16384 most likely tokens: O(n_vocab) selection instead of a full sort
_NUCLEUS_PROBES = (1024, 16384)


def _top_k(x: np.ndarray, k: int) -> np.ndarray:
    """Ids of the k largest logits; at the boundary value the lowest ids win."""
    kth = np.partition(x, x.size - k)[x.size - k]  # the k-th largest value
    above = np.flatnonzero(x > kth)
    at = np.flatnonzero(x == kth)[: k - above.size]
    return np.concatenate([above, at])


class StopChecker:
    """Finds stop strings in streamed text. `push(piece)` returns the text that is safe to show: text that
    could still be the start of a stop string is held back until the next piece decides. When a stop
    string completes, `stopped` turns True and `push` returns the text before it (then only "")."""

    def __init__(self, stop_strings: Sequence[str] = ()) -> None:
        if isinstance(stop_strings, str):
            stop_strings = [stop_strings]
        if not isinstance(stop_strings, (list, tuple)) or any(not isinstance(s, str) or not s for s in stop_strings):
            raise UsageError(f"stop strings must be non-empty strings, got {stop_strings!r}")
        self.stop_strings = tuple(stop_strings)
        self.stopped = False
        self.stop_string: str | None = None  # the one that matched
        self._held = ""

    def push(self, piece: str) -> str:
        if self.stopped:
            return ""
        text = self._held + piece
        hits = [(text.find(s), s) for s in self.stop_strings]
        hits = [(i, s) for i, s in hits if i >= 0]
        if hits:
            i, s = min(hits, key=lambda h: (h[0], -len(h[1])))
            self.stopped, self.stop_string, self._held = True, s, ""
            return text[:i]
        hold = self._partial_suffix(text)
        self._held = text[len(text) - hold :] if hold else ""
        return text[: len(text) - hold]

    def flush(self) -> str:
        """At the end of generation: the held-back text (it did not become a stop string)."""
        text, self._held = self._held, ""
        return "" if self.stopped else text

    def _partial_suffix(self, text: str) -> int:
        """Length of the longest suffix of `text` that is a proper prefix of a stop string."""
        best = 0
        for s in self.stop_strings:
            for n in range(min(len(s) - 1, len(text)), best, -1):
                if text.endswith(s[:n]):
                    best = n
                    break
        return best


__all__ = ["DEFAULT_MAX_TOKENS", "SamplerConfig", "GenerationOptions", "generation_options", "Sampler", "StopChecker"]
