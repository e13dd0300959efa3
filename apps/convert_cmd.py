"""moelite convert SRC -o OUT --type T: a Hugging Face MoE checkpoint (or a GGUF) -> llama.cpp-compatible GGUF."""
from __future__ import annotations

import argparse

from .common import positive_int

NAME = "convert"
HELP = "convert a Hugging Face MoE checkpoint (or a GGUF) to GGUF"


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..converters import TYPES
    p.add_argument("src", metavar="SRC", help="Hugging Face model directory (config.json + safetensors) or a .gguf")
    p.add_argument("-o", "--out", required=True, metavar="OUT", help="output .gguf path")
    p.add_argument("--type", default="f32", choices=list(TYPES), metavar="TYPE",
                   help=f"output tensor type: {', '.join(TYPES)} (default f32)")
    p.add_argument("--threads", "-t", type=positive_int, default=2, help="quantization threads (default 2)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def main(args: argparse.Namespace) -> int:
    from ..converters import convert
    report = convert(args.src, args.out, args.type, progress=not args.no_progress, n_threads=args.threads)
    print(report.summary())
    return 0
