"""moelite chat [MODEL]: an interactive conversation in the terminal.

Answers stream token by token; the history goes through the model's chat template each turn (the runtime
reuses the cached prefix, so only the new turn is evaluated). Ctrl-C stops the answer, not the app.
"""

from __future__ import annotations

import argparse
import signal
import sys

from rich.markup import escape

from ..errors import MoeliteError
from .common import (
    PrefillProgress,
    add_common,
    add_sampling,
    add_speculative,
    cache_counts,
    context_note,
    load_model,
    memory_text,
    model_name,
    restore_ctrl_c,
    status_line,
)
from .textgen import TextStream, prompt_ids, sampling_kwargs, stop_list

NAME = "chat"
HELP = "chat with a model in the terminal"
# C0/C1 control characters (escape sequences) from a model must not drive the terminal; keep \t and \n
_CONTROL = {c: None for c in [*range(0, 9), *range(11, 32), *range(127, 160)]}
COMMANDS = {
    "/help": "show this help",
    "/reset": "forget the conversation",
    "/stats": "expert cache statistics",
    "/exit": "quit (or Ctrl-D)",
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_common(p)
    p.add_argument("--system", help="system message")
    add_sampling(p)
    add_speculative(p)


def main(args: argparse.Namespace) -> int:
    from rich.console import Console

    console = Console(highlight=False, stderr=False)
    sampling = sampling_kwargs(vars(args))
    stop = stop_list(args.stop)
    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:
        pass
    restore_ctrl_c()  # Ctrl-C is part of this app's interface (stop an answer; a hint at the prompt)
    with load_model(args) as model:
        budget = model.plan.budget
        console.print(
            f"[bold]{escape(model_name(model))}[/] · policy {model.policy.name} · "
            f"{'budget ' + _fmt(budget) if budget else 'all experts resident'} · type /help for commands",
            style="dim",
        )
        history = _initial(args)
        while True:
            try:
                line = input(">>> ")
            except EOFError:
                console.print()
                return 0
            except KeyboardInterrupt:
                console.print("\n(type /exit or press Ctrl-D to quit)", style="dim")
                continue
            text = line.strip()
            if not text:
                continue
            if text.startswith("/"):
                if _command(text, model, console, history, args) == "exit":
                    return 0
                continue
            history.append({"role": "user", "content": line})
            try:
                dropped = _fit(model, history)
                if dropped:
                    console.print(
                        f"(the {dropped} oldest message{'s' if dropped > 1 else ''} no longer fit the "
                        f"context of {model.n_ctx} tokens and were dropped)",
                        style="dim",
                    )
                answer = _answer(model, history, console, args, sampling, stop)
            except MoeliteError as e:  # e.g. a message longer than the context: say so, keep chatting
                history.pop()
                console.print(f"error: {escape(str(e))}", style="red")
                continue
            history.append({"role": "assistant", "content": answer})


def _initial(args: argparse.Namespace) -> list[dict]:
    return [{"role": "system", "content": args.system}] if args.system else []


def _fit(model, history: list[dict]) -> int:
    """Drop the oldest messages (never the system message or the new question) until the prompt leaves at least
    a quarter of the context for the answer; how many were dropped."""
    first = 1 if history and history[0]["role"] == "system" else 0
    n = len(history)
    while len(prompt_ids(model, messages=history)) > 0.75 * model.n_ctx and len(history) - first > 1:
        del history[first]
    return n - len(history)


def _answer(model, history: list[dict], console, args, sampling: dict, stop: list[str]) -> str:
    """Stream one answer; Ctrl-C (SIGINT) cancels it after the current token."""
    before = cache_counts(model)
    stream = TextStream(
        model,
        prompt_ids(model, messages=history),
        max_tokens=args.max_tokens,
        stop=stop,
        ignore_eos=args.ignore_eos,
        **sampling,
    )
    old = signal.signal(signal.SIGINT, lambda signum, frame: stream.cancel())
    model.prefill_progress = PrefillProgress()
    try:
        for piece in stream:
            sys.stdout.write(piece.translate(_CONTROL))
            sys.stdout.flush()
    finally:
        signal.signal(signal.SIGINT, old)
    sys.stdout.write("\n")
    if stream.finish_reason == "cancelled":
        console.print("^C answer stopped", style="yellow")
    note = context_note(model, stream)
    if note:
        console.print(f"({note})", style="yellow")
    console.print(status_line(model, stream, before), style="dim", soft_wrap=True)  # one line, however long
    return stream.text


def _command(text: str, model, console, history: list[dict], args) -> str | None:
    cmd = text.split()[0].lower()
    if cmd in ("/exit", "/quit", "/bye"):
        return "exit"
    if cmd == "/help":
        for name, what in COMMANDS.items():
            console.print(f"  {name:8} {what}")
        console.print("  Ctrl-C   stop the current answer")
    elif cmd == "/reset":
        history[:] = _initial(args)
        model.reset()
        console.print("conversation cleared", style="dim")
    elif cmd == "/stats":
        print_stats(model, console)
    else:
        console.print(f"unknown command {cmd}; type /help", style="yellow")
    return None


def print_stats(model, console) -> None:
    from rich.table import Table

    s = model.stats()
    t = s["total"]
    console.print(
        f"cache: policy {s['policy']} · {t['hits']} hits · {t['misses']} misses · "
        f"hit rate {100 * t['hit_rate']:.1f} % · {_fmt(t['bytes_read'])} read · "
        f"stall {t['stall_s']:.3f} s · {t['substitutions']} swapped · {t['standin_uses']} stand-ins · "
        f"{memory_text(model, s)}"
    )
    table = Table("layer", "slots", "hits", "misses", "hit rate", "read", "stall s", "swapped", "stand-ins")
    slots = model.info()["expert_slots"]
    for row in s["per_layer"]:
        n = row["hits"] + row["misses"]
        quota = slots[row["layer"]] if row["layer"] < len(slots) else "-"
        table.add_row(
            str(row["layer"]),
            str(quota),
            str(row["hits"]),
            str(row["misses"]),
            f"{100 * row['hits'] / n:.1f} %" if n else "-",
            _fmt(row["bytes_read"]),
            f"{row['stall_s']:.3f}",
            str(row.get("substitutions", 0)),
            str(row.get("standin_uses", 0)),
        )
    console.print(table)


def _fmt(n: float | None) -> str:
    from ..runtime.planner import fmt_bytes

    return fmt_bytes(n or 0)
