"""moelite run [MODEL] -p PROMPT: one prompt, the answer streamed to stdout (or one JSON object)."""

from __future__ import annotations

import argparse
import json
import sys

from ..errors import UsageError
from .common import (
    PrefillProgress,
    accounted_bytes,
    add_common,
    add_sampling,
    add_speculative,
    context_note,
    load_model,
    restore_ctrl_c,
    status_line,
)
from .textgen import TextStream, prompt_ids, sampling_kwargs, stop_list

NAME = "run"
HELP = "generate text for one prompt"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_common(p)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("-p", "--prompt", help="the prompt ('-' reads it from stdin)")
    src.add_argument("-f", "--file", metavar="FILE", help="read the prompt from FILE (UTF-8)")
    p.add_argument("--chat", action="store_true", help="send the prompt as a user message through the chat template")
    p.add_argument("--system", help="system message (with --chat)")
    p.add_argument("--json", action="store_true", help="print one JSON object: text, token ids, stats")
    p.add_argument("--stats", action="store_true", help="print a status line (tok/s, cache, memory) to stderr")
    add_sampling(p)
    add_speculative(p)


def main(args: argparse.Namespace) -> int:
    prompt = read_prompt(args)
    sampling = sampling_kwargs(vars(args))
    stop = stop_list(args.stop)
    if sys.stderr.isatty():  # on a terminal, Ctrl-C stops a long prompt or the answer
        restore_ctrl_c()
    with load_model(args) as model:
        if args.chat:
            messages = [{"role": "system", "content": args.system}] if args.system else []
            ids = prompt_ids(model, messages=messages + [{"role": "user", "content": prompt}])
        else:
            ids = prompt_ids(model, prompt)
        stream = TextStream(model, ids, max_tokens=args.max_tokens, stop=stop, ignore_eos=args.ignore_eos, **sampling)
        model.prefill_progress = PrefillProgress()
        for piece in stream:
            if not args.json:
                sys.stdout.write(piece)
                sys.stdout.flush()
        if args.json:
            json.dump(result_json(model, stream), sys.stdout, ensure_ascii=False)
        sys.stdout.write("\n")
        sys.stdout.flush()
        note = context_note(model, stream)
        if note:
            print(f"moelite: {note}", file=sys.stderr)
        if args.stats or args.verbose:
            print(status_line(model, stream), file=sys.stderr)
    return 0


def read_prompt(args: argparse.Namespace) -> str:
    if args.file is None:
        return sys.stdin.read() if args.prompt == "-" else args.prompt
    try:
        with open(args.file, encoding="utf-8") as f:
            return f.read()
    except FileNotFoundError:
        raise UsageError(f"{args.file}: no such prompt file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"{args.file}: cannot read the prompt file ({e})") from None


def result_json(model, stream: TextStream) -> dict:
    s = model.stats()
    return {
        "text": stream.text,
        "token_ids": stream.token_ids,
        "finish_reason": stream.finish_reason,
        "usage": {"prompt_tokens": stream.prompt_tokens, "completion_tokens": stream.completion_tokens},
        "stats": {
            "decode_tok_s": stream.decode_tok_s,
            "cache": s["total"],
            "rss_bytes": s["rss_bytes"],
            "memory_budget": model.plan.budget,
            "accounted_bytes": accounted_bytes(model, s["memory"]),
            "policy": s["policy"],
            "speculative": s["speculative"],  # None unless --speculative / -md
            "memory": s["memory"],
        },
        "model": {"path": model.path, "architecture": model.hparams["arch"]},
    }
