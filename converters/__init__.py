"""moelite.converters: Hugging Face MoE checkpoints (or GGUF files) -> llama.cpp-compatible GGUF.

    from moelite.converters import convert
    report = convert("Qwen3-30B-A3B/", "qwen3.gguf", type="q4_k_m")
    print(report.summary())

    python -m moelite.converters SRC -o OUT --type q4_k_m

See converters/README.md for the conventions (names, keys, MLA tensors, Q/K permutation, fallbacks).
"""

from __future__ import annotations

from .convert import ConvertReport, convert
from .quant import TYPES

# bumped whenever the bytes written for the same input change; put it in caches of converted files
FORMAT_VERSION = 4  # 4: absent config.json keys take the transformers class default

__all__ = ["convert", "ConvertReport", "TYPES", "FORMAT_VERSION"]
