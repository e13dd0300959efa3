"""One generation as run, chat and serve see it.

`sampling_kwargs` turns CLI flags or an HTTP request into validated Model sampling options (one place, so
the three commands accept the same names and give the same messages). `TextStream` yields text pieces and
keeps what belongs to *this* request: token ids, counts, finish reason and timings (Model.last_stats
belongs to whichever request ran last, which matters when the server shares one model).
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from ..errors import UsageError

MAX_STOP_STRINGS = 16


def sampling_kwargs(values: Mapping[str, Any]) -> dict[str, Any]:
    """The sampling options present (not None) in `values`, checked now (UsageError naming the option),
    not at the first token: a streaming answer cannot turn into an error after it started."""
    from ..runtime.sampling import SAMPLER_KEYS, SamplerConfig

    kw = {k: values[k] for k in SAMPLER_KEYS if values.get(k) is not None}
    SamplerConfig(**kw)
    return kw


def stop_list(stop: str | Sequence[str] | None) -> list[str]:
    """None, one string or a list of strings -> a list of non-empty stop strings."""
    if stop is None:
        return []
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) and s for s in stop):
        raise UsageError(f"stop: expected a non-empty string or a list of them, got {stop!r}")
    if len(stop) > MAX_STOP_STRINGS:
        raise UsageError(f"stop: at most {MAX_STOP_STRINGS} strings, got {len(stop)}")
    return list(stop)


def prompt_ids(model, prompt: str | None = None, messages: Sequence[Mapping[str, Any]] | None = None) -> list[int]:
    """Token ids of a plain prompt, or of chat messages rendered by the model's template (as Model.chat)."""
    if messages is not None:
        prompt = model.chat_template.render(messages, add_generation_prompt=True)
    if not prompt:
        raise UsageError("empty prompt")
    return model.tokenizer.encode(prompt, add_special=True)


class TextStream:
    """Iterate the text pieces of one generation (stop strings cut, complete UTF-8 only); afterwards
    `text`, `token_ids`, `prompt_tokens`, `completion_tokens`, `finish_reason` ('stop' | 'length' |
    'cancelled'), `decode_tok_s`."""

    def __init__(
        self,
        model,
        ids: Sequence[int],
        *,
        max_tokens: int,
        stop: Sequence[str] = (),
        ignore_eos: bool = False,
        logprobs: int | None = None,
        logits_processor: Any = None,
        **sampling: Any,
    ) -> None:
        from ..runtime.sampling import StopChecker

        self.model = model
        self.prompt_tokens = len(ids)
        self.max_tokens = max_tokens
        self.token_ids: list[int] = []
        self.pieces: list[str] = []
        # logprobs=N (the server's logprobs / top_logprobs): each generated token's TokenLogprob with its N most
        # likely alternatives, and per yielded piece the number of tokens recorded when it was yielded
        self.top_n = logprobs
        self.logprobs: list = []
        self.piece_ends: list[int] = []
        self.finish_reason: str | None = None
        self.cancelled = False
        self._stopper = StopChecker(list(stop))
        self._gen = model.stream_tokens(
            list(ids),
            max_tokens=max_tokens,
            stop_ids=() if ignore_eos else None,
            on_token=self._record if logprobs is not None else None,
            logits_processor=logits_processor,  # a grammar's mask (response_format, tool_choice), or None
            **sampling,
        )
        self._t_first = self._t_end = 0.0

    def _record(self, token: int, logits) -> None:
        from ..runtime.perplexity import step_logprob

        self.logprobs.append(step_logprob(logits, token, self.top_n or 0))

    def cancel(self) -> None:
        """Stop after the current token (safe from a signal handler or another thread)."""
        self.cancelled = True
        self.model.cancel()

    def __iter__(self) -> Iterator[str]:
        dec = self.model.tokenizer.stream_decoder()
        stopper = self._stopper
        try:
            for tok in self._gen if not self.cancelled else ():
                if self.cancelled:  # cancel() before the model's generation started
                    break
                if not self.token_ids:
                    self._t_first = time.perf_counter()
                self.token_ids.append(tok)
                piece = stopper.push(dec.push(tok))
                if piece:
                    self.pieces.append(piece)
                    self.piece_ends.append(len(self.logprobs))
                    yield piece
                if stopper.stopped:
                    break
            else:
                tail = stopper.push(dec.flush())
                tail += stopper.flush()
                if tail:
                    self.pieces.append(tail)
                    self.piece_ends.append(len(self.logprobs))
                    yield tail
        finally:
            self._gen.close()  # releases the model's lock at once
            self._t_end = time.perf_counter()
            self.finish_reason = self._finish(stopper.stopped)

    def _finish(self, stopped: bool) -> str:
        n = len(self.token_ids)
        if stopped:
            return "stop"
        if self.cancelled and n < self.max_tokens:
            return "cancelled"
        if n >= self.max_tokens or self.prompt_tokens + n >= self.model.n_ctx:
            return "length"
        return "stop"  # an end-of-text token

    @property
    def text(self) -> str:
        return "".join(self.pieces)

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def decode_tok_s(self) -> float:
        dt = self._t_end - self._t_first
        return (len(self.token_ids) - 1) / dt if len(self.token_ids) > 1 and dt > 0 else 0.0
