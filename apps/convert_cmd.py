"""moelite convert SRC [-o OUT] [--type T] [--standins T]: a Hugging Face MoE checkpoint (or a GGUF) ->
llama.cpp-compatible GGUF. Without -o the output is `<name>-<type>.gguf` in the current directory, as llama.cpp's
converter names it. --standins T also writes OUT.standins.gguf (low-bit copies of the experts, converters/standins.py);
with a .gguf SRC and no -o it writes only SRC.standins.gguf, SRC untouched."""

from __future__ import annotations

import argparse
from pathlib import Path

from .common import budget_arg, nonneg_int, positive_int

NAME = "convert"
HELP = "convert a Hugging Face MoE checkpoint (or a GGUF) to GGUF"


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..converters import TYPES

    p.add_argument("src", metavar="SRC", help="Hugging Face model directory (config.json + safetensors) or a .gguf")
    p.add_argument(
        "-o",
        "--out",
        "--outfile",
        dest="out",
        metavar="OUT",
        help="output .gguf path (default: <name>-<type>.gguf in the current directory)",
    )
    p.add_argument(
        "--type",
        "--outtype",
        dest="type",
        default="f32",
        type=str.lower,
        choices=list(TYPES),
        metavar="TYPE",
        help=f"output tensor type, any case: {', '.join(TYPES)} (default f32)",
    )
    p.add_argument("--threads", "-t", type=positive_int, default=2, help="quantization threads (default 2)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--standins",
        metavar="TYPE",
        type=str.lower,
        default=None,
        help="also write MODEL.gguf.standins.gguf: every routed expert at TYPE (e.g. q2_k), for "
        "moelite's --standins (lossy, off by default); a .gguf SRC without -o: only the stand-ins",
    )
    p.add_argument(
        "--split-max-size",
        type=budget_arg,
        metavar="SIZE",
        default=None,
        help="write a split set OUT-00001-of-0000N.gguf ... of at most SIZE of tensor data per file, as "
        "llama.cpp's converter and gguf-split do (e.g. 50G; K M G are powers of 1024, KB MB GB of 1000)",
    )
    p.add_argument(
        "--split-max-tensors",
        type=nonneg_int,
        metavar="N",
        default=0,
        help="a split set of at most N tensors per file (0: no limit)",
    )
    p.add_argument(
        "--fuse-gate-up-exps",
        action="store_true",
        help="write gate and up experts fused as ffn_gate_up_exps (llama.cpp's option of that name)",
    )
    p.add_argument(
        "--no-mtp",
        "--no-nextn",
        dest="mtp",
        action="store_false",
        help="drop the checkpoint's MTP / nextn blocks (kept by default, as llama.cpp keeps them: speculative='mtp' "
        "drafts with them)",
    )


def default_out(src: str, type: str) -> Path:
    """'<name>-<type>.gguf' from SRC's directory or file name ('Qwen3-30B-A3B' -> 'Qwen3-30B-A3B-q4_k_m.gguf')."""
    path = Path(src).expanduser()
    name = path.stem if path.suffix.lower() == ".gguf" else path.resolve().name
    return Path(f"{name}-{type}.gguf")


def main(args: argparse.Namespace) -> int:
    from ..converters import convert
    from ..converters.standins import write_standins
    from ..runtime.planner import parse_size

    src = Path(args.src).expanduser()
    if args.standins and src.suffix.lower() == ".gguf" and not args.out:
        out = src  # stand-ins of an existing model only
    else:
        out = Path(args.out).expanduser() if args.out else default_out(args.src, args.type)
        report = convert(
            src,
            out,
            args.type,
            progress=not args.no_progress,
            n_threads=args.threads,
            fuse_gate_up=args.fuse_gate_up_exps,
            mtp=args.mtp,
            split_max_tensors=args.split_max_tensors,
            split_max_size=parse_size(args.split_max_size) if args.split_max_size else 0,
        )
        print(report.summary())
        out = report.out  # a split set: its first shard
    if args.standins:
        print(write_standins(out, args.standins, progress=not args.no_progress, n_threads=args.threads).summary())
    return 0
