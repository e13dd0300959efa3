"""python -m moelite.converters SRC -o OUT --type T"""

from __future__ import annotations

import argparse
import sys

from moelite.errors import MoeliteError

from . import convert
from .quant import TYPES


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m moelite.converters",
        description="Convert a Hugging Face MoE checkpoint directory (or a GGUF) to GGUF.",
    )
    ap.add_argument("src", help="HF model directory (config.json + safetensors + tokenizer.json) or a .gguf file")
    ap.add_argument("-o", "--out", required=True, help="output .gguf path")
    ap.add_argument("--type", default="f32", choices=list(TYPES), help="output tensor type (default f32)")
    ap.add_argument("--threads", type=int, default=2, help="quantization threads (default 2)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    ap.add_argument(
        "--fuse-gate-up-exps",
        action="store_true",
        help="write gate and up experts fused as ffn_gate_up_exps (llama.cpp's option of that name)",
    )
    args = ap.parse_args(argv)
    try:
        report = convert(
            args.src,
            args.out,
            args.type,
            progress=not args.no_progress,
            n_threads=args.threads,
            fuse_gate_up=args.fuse_gate_up_exps,
        )
    except MoeliteError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(report.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
