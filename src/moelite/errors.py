"""moelite's exceptions. Every user-facing failure is one of these, naming the file, tensor or key and
what was expected. All derive from MoeliteError, so an app can catch one type."""

from __future__ import annotations


class MoeliteError(Exception):
    """Base of all moelite errors."""


class ModelFormatError(MoeliteError, ValueError):
    """A model file (GGUF) is invalid: not GGUF, truncated, unknown architecture, missing or mis-shaped
    tensor, missing or bad key, not a Mixture-of-Experts model."""


class ConversionError(MoeliteError, ValueError):
    """A Hugging Face checkpoint (or GGUF input) cannot be converted: missing shard, truncated safetensors,
    unknown model_type, dense model, tensor shape contradicting config.json, unwritable output."""


class BudgetError(MoeliteError, ValueError):
    """A memory budget that cannot hold the dense part plus the minimum expert slots, or a bad budget string.
    `minimum` is the smallest budget (bytes) that would work, when known."""

    def __init__(self, message: str, minimum: int | None = None) -> None:
        super().__init__(message)
        self.minimum = minimum


class ExpertIOError(MoeliteError, OSError):
    """Reading expert weights from disk failed while the model is open (file truncated, removed, unreadable)."""


class TraceError(MoeliteError, ValueError):
    """A routing trace is malformed (wrong dtype, ids out of range, ragged rows, empty)."""


class TokenizerError(MoeliteError, ValueError):
    """No usable tokenizer in a model file, or an unsupported tokenizer kind."""


class UsageError(MoeliteError, ValueError):
    """A bad argument from the user (unknown policy, bad option value, busy model)."""
