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
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any, Sequence

import numpy as np

from moelite.errors import UsageError


DEFAULT_MAX_TOKENS = 256           # tokens generated when the caller does not say


@dataclass(frozen=True)
class SamplerConfig:
    temperature: float = 0.0         # 0: greedy
    top_k: int = 0                   # 0: off
    top_p: float = 1.0               # 1: off; keep the smallest set of most likely tokens with mass >= top_p
    min_p: float = 0.0               # 0: off; keep tokens with p >= min_p * p_max
    repetition_penalty: float = 1.0  # 1: off; for ids in history: logit / rp if > 0 else logit * rp
    seed: int | None = None          # None (or -1, as in llama.cpp): fresh OS entropy

    def __post_init__(self) -> None:
        if _is_int(self.seed) and self.seed == -1:
            object.__setattr__(self, "seed", None)

        def bad(name: str, want: str) -> UsageError:
            return UsageError(f"sampler option {name}={getattr(self, name)!r}: expected {want}")

        if not _is_real(self.temperature) or self.temperature < 0:
            raise bad("temperature", "a finite number >= 0")
        if not _is_int(self.top_k) or self.top_k < 0:
            raise bad("top_k", "an integer >= 0 (0 = off)")
        if not _is_real(self.top_p) or not 0 < self.top_p <= 1:
            raise bad("top_p", "a number in (0, 1]")
        if not _is_real(self.min_p) or not 0 <= self.min_p <= 1:
            raise bad("min_p", "a number in [0, 1]")
        if not _is_real(self.repetition_penalty) or self.repetition_penalty <= 0:
            raise bad("repetition_penalty", "a finite number > 0 (1 = off)")
        if self.seed is not None and (not _is_int(self.seed) or self.seed < 0):
            raise bad("seed", "None, -1 (random) or an integer >= 0")


SAMPLER_KEYS = tuple(f.name for f in fields(SamplerConfig))
# the command line's (and llama.cpp's) spellings of the same options
ALIASES = {"temp": "temperature", "repeat_penalty": "repetition_penalty", "n_predict": "max_tokens",
           "max_new_tokens": "max_tokens"}
OPTION_KEYS = ("max_tokens", *SAMPLER_KEYS, "stop", "ignore_eos", "stop_ids")


@dataclass(frozen=True)
class GenerationOptions:
    """One generation's options, checked: sampler settings, token limit, stop strings and stop tokens."""
    sampler: SamplerConfig
    max_tokens: int = DEFAULT_MAX_TOKENS
    stop: tuple[str, ...] = ()
    stop_ids: tuple[int, ...] | None = None          # None: the tokenizer's end-of-text ids


def generation_options(options: Mapping[str, Any], where: str = "generate") -> GenerationOptions:
    """Keyword arguments of Model.generate / stream / chat / stream_tokens -> GenerationOptions. Aliases are
    mapped to their option; an unknown keyword or a bad value is a UsageError naming it."""
    kw: dict[str, Any] = {}
    for key, value in options.items():
        name = ALIASES.get(key, key)
        if name not in OPTION_KEYS:
            raise UsageError(f"{where}(): unknown option {key!r}; valid options: "
                             f"{', '.join(OPTION_KEYS + tuple(ALIASES))}")
        if name in kw:
            raise UsageError(f"{where}(): {key!r} given twice (it is {name!r})")
        kw[name] = value
    max_tokens = kw.pop("max_tokens", DEFAULT_MAX_TOKENS)
    if not _is_int(max_tokens) or max_tokens < 0:
        raise UsageError(f"max_tokens={max_tokens!r}: expected an integer >= 0")
    stop = kw.pop("stop", ())
    if isinstance(stop, str):
        stop = (stop,)
    StopChecker(stop)                                # validates
    stop_ids = kw.pop("stop_ids", None)
    if kw.pop("ignore_eos", False):
        if stop_ids:
            raise UsageError(f"{where}(): ignore_eos=True and stop_ids={stop_ids!r} contradict each other")
        stop_ids = ()
    if stop_ids is not None:
        try:
            stop_ids = tuple(int(t) for t in stop_ids)
        except (TypeError, ValueError):
            raise UsageError(f"stop_ids={stop_ids!r}: expected a list of token ids") from None
    return GenerationOptions(SamplerConfig(**kw), int(max_tokens), tuple(stop), stop_ids)


def _is_real(x: object) -> bool:
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool) and math.isfinite(x)


def _is_int(x: object) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


class Sampler:
    """Stateful only through its random generator: the same seed and inputs give the same ids."""

    def __init__(self, config: SamplerConfig | None = None) -> None:
        self.config = config or SamplerConfig()
        self.rng = np.random.default_rng(self.config.seed)

    def sample(self, logits: np.ndarray, history: Sequence[int] = ()) -> int:
        """logits: [n_vocab] scores of the next token; history: ids so far (prompt + generated)."""
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
            x[seen] = np.where(s > 0, s / cfg.repetition_penalty, s * cfg.repetition_penalty)

        if cfg.temperature == 0.0:
            return int(np.argmax(x))  # first maximum: lowest id on ties

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

        z = z / cfg.temperature
        p = np.exp(z - z.max())
        cdf = np.cumsum(p)
        i = int(np.searchsorted(cdf, self.rng.random() * cdf[-1], side="right"))
        return int(ids[min(i, ids.size - 1)])


# top-p first tries the 1024, then 16384 most likely tokens: O(n_vocab) selection instead of a full sort
_NUCLEUS_PROBES = (1024, 16384)


def _top_k(x: np.ndarray, k: int) -> np.ndarray:
    """Ids of the k largest logits; at the boundary value the lowest ids win."""
    kth = np.partition(x, x.size - k)[x.size - k]  # the k-th largest value
    above = np.flatnonzero(x > kth)
    at = np.flatnonzero(x == kth)[:k - above.size]
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
        self._held = text[len(text) - hold:] if hold else ""
        return text[:len(text) - hold]

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
