"""moelite: run large Mixture-of-Experts models on machines that cannot hold them.

import moelite
with moelite.load("model.gguf", memory_budget="2GiB") as model:
    print(model.generate("Once upon a time", max_tokens=32))
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from . import _cpu, errors
from ._cpu import cpu_backend

if TYPE_CHECKING:
    from .runtime.model import Model, load

__all__ = ["Model", "load", "errors", "cpu_backend"]
_cpu.preload()  # a portable build (the wheels): load ggml's CPU variant for this CPU before _core needs it
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    # lazy: `import moelite.errors` or the converter must not pay for the runtime's imports
    if name in ("Model", "load"):
        from .runtime import model as _model

        return getattr(_model, name)
    raise AttributeError(f"module 'moelite' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
