"""moelite perplexity [MODEL] -f TEXT: llama-perplexity's measurement (runtime/perplexity.py) under the usual model
flags, so a model larger than RAM is measured with its experts offloaded (--memory-budget).

    moelite perplexity model-q8_0.gguf -f wiki.test.raw -c 512                          # PPL +/- its uncertainty
    moelite perplexity model-q8_0.gguf -f wiki.test.raw --kl-divergence-base base.kld   # ... and save the base
    moelite perplexity model-q4_k_m.gguf -f wiki.test.raw --kl-divergence-base base.kld --kl-divergence

Prints one line per chunk ([i] running PPL, and KL / same-top with --kl-divergence) on stderr, the final estimate on
stdout (or one JSON object with --json)."""

from __future__ import annotations

import argparse
import json
import os
import sys

from ..errors import UsageError
from .common import add_common, load_model, positive_int

NAME = "perplexity"
HELP = "measure perplexity (and KL divergence against a base model) on a text, as llama-perplexity"
DEFAULT_CTX = 512  # llama-perplexity's usual chunk size


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_common(p)
    p.add_argument("-f", "--file", required=True, metavar="TEXT", help="the text to score (UTF-8)")
    p.add_argument(
        "--chunks", type=positive_int, default=None, metavar="N", help="score at most N chunks (default: all)"
    )
    p.add_argument(
        "--kl-divergence-base",
        metavar="FILE",
        help="without --kl-divergence: save this model's log-probabilities to FILE as the base; with it: compare "
        "this model to the base saved in FILE",
    )
    p.add_argument(
        "--kl-divergence",
        action="store_true",
        help="compare to --kl-divergence-base FILE: mean KL divergence, same top token, per chunk",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object (totals and per-chunk values)")


def main(args: argparse.Namespace) -> int:
    from ..runtime.perplexity import KLBaseReader, KLBaseWriter, perplexity

    if args.kl_divergence and not args.kl_divergence_base:
        raise UsageError("--kl-divergence needs --kl-divergence-base FILE (the base model's saved log-probabilities)")
    text = _read_text(args.file)
    if args.ctx_size is None:
        args.ctx_size = DEFAULT_CTX
    base = None
    if args.kl_divergence:
        base = KLBaseReader(args.kl_divergence_base)
    elif args.kl_divergence_base:
        if os.path.isdir(args.kl_divergence_base):
            raise UsageError(f"--kl-divergence-base {args.kl_divergence_base}: is a directory")
        base = KLBaseWriter(args.kl_divergence_base)
    try:
        with load_model(args) as model:
            res = perplexity(model, text, args.ctx_size, args.chunks, base, progress=_progress)
    except BaseException:
        if isinstance(base, KLBaseWriter):
            base.abort()
        raise
    finally:
        if isinstance(base, KLBaseReader):
            base.close()
    if args.json:
        json.dump(res.to_json(), sys.stdout)
        sys.stdout.write("\n")
        return 0
    print(
        f"Final estimate: PPL = {res.ppl:.4f} +/- {res.ppl_uncertainty:.5f} "
        f"({res.n_chunk} chunks of {res.n_ctx} tokens, {res.count} scored)"
    )
    if isinstance(base, KLBaseReader):
        (k, dk), (p, dp) = res.kld, res.same_top
        print(f"Mean PPL(base) = {res.ppl_base:.4f}")
        print(f"Mean KLD = {k:.6f} +/- {dk:.6f}")
        print(f"Same top p = {100 * p:.3f} +/- {100 * dp:.3f} %")
    elif base is not None:
        print(f"saved the base log-probabilities to {args.kl_divergence_base}")
    return 0


def _progress(c) -> None:
    extra = f" KLD {c.kld:.6f} same-top {100 * c.same_top:.2f} %" if c.kld is not None else ""
    print(f"[{c.index + 1}] PPL {c.ppl:.4f}{extra}", file=sys.stderr, flush=True)


def _read_text(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except FileNotFoundError:
        raise UsageError(f"{path}: no such text file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"{path}: cannot read the text ({e})") from None
