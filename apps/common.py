"""What every `moelite` command shares: the common flags, finding and loading the model (a GGUF, a Hugging
Face directory converted on the fly, or the embedded demo), and the one status line."""
from __future__ import annotations

import argparse
import hashlib
import os
from pathlib import Path
from typing import Any

from ..errors import BudgetError, UsageError

DEFAULT_CONVERT_TYPE = "q8_0"


# --- argparse value types: one clear message per bad value -------------------------------------------------
def _number(kind: type, lo: float | None, what: str, hi: float | None = None):
    def parse(text: str):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
        if v != v or (lo is not None and v < lo) or (hi is not None and v > hi):   # NaN or out of range
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}")
        return v
    parse.__name__ = what
    return parse


positive_int = _number(int, 1, "an integer >= 1")
nonneg_int = _number(int, 0, "an integer >= 0")
nonneg_float = _number(float, 0, "a number >= 0")
port_number = _number(int, 0, "a port number (0-65535)", 65535)


def _checked(check):
    """An argparse type that keeps the text when check(text) passes and turns its moelite error into a usage error."""
    def parse(text: str) -> str:
        try:
            check(text)
        except (BudgetError, UsageError) as e:
            raise argparse.ArgumentTypeError(str(e)) from None
        return text
    return parse


def _parse_size(text: str) -> None:
    from ..runtime.planner import parse_size      # imported late: `moelite --help` stays fast
    parse_size(text)


def _policy_id(text: str) -> None:
    from ..cache_policies.registry import policy_id
    policy_id(text)


budget_arg = _checked(_parse_size)
policy_arg = _checked(_policy_id)


def add_common(p: argparse.ArgumentParser, model: bool = True) -> None:
    """The flags every model-running command takes."""
    if model:
        p.add_argument("model", nargs="?", metavar="MODEL",
                       help="a .gguf file or a Hugging Face model directory (default: the embedded demo model)")
    g = p.add_argument_group("model options")
    g.add_argument("--memory-budget", "-m", type=budget_arg, metavar="SIZE",
                   help="memory for everything (dense weights, KV cache, expert slots), e.g. 1.5GiB, 800MB "
                        "(default: all resident if it fits in free RAM)")
    g.add_argument("--policy", type=policy_arg, default=None,
                   help="expert cache policy: lru, lfu, lfuda, consistency (default: the calibrated one, else lru)")
    g.add_argument("--threads", "-t", type=positive_int, help="compute threads (default: cores, at most 8)")
    g.add_argument("--ctx-size", "-c", type=positive_int, help="context size in tokens (default: min(model, 4096))")
    g.add_argument("--convert-type", default=DEFAULT_CONVERT_TYPE, metavar="TYPE",
                   help=f"tensor type when MODEL is a Hugging Face directory (default {DEFAULT_CONVERT_TYPE})")


def add_sampling(p: argparse.ArgumentParser, *, temperature: float = 0.8, top_p: float = 0.95) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--temp", "--temperature", dest="temperature", type=nonneg_float, default=temperature,
                   help=f"0 = greedy (default {temperature})")
    g.add_argument("--top-k", type=nonneg_int, default=0, help="keep the k most likely tokens (default 0 = off)")
    g.add_argument("--top-p", type=nonneg_float, default=top_p, help=f"nucleus sampling mass (default {top_p})")
    g.add_argument("--min-p", type=nonneg_float, default=0.0, help="drop tokens below min_p * p_max (default 0 = off)")
    g.add_argument("--repeat-penalty", dest="repetition_penalty", type=nonneg_float, default=1.0,
                   help="penalty for repeated tokens (default 1.0 = off)")
    g.add_argument("--seed", type=nonneg_int, help="random seed (default: fresh)")
    g.add_argument("--stop", action="append", default=[], metavar="TEXT", help="stop at this text (repeatable)")
    g.add_argument("--ignore-eos", action="store_true", help="do not stop at end-of-text tokens")


# --- the model -------------------------------------------------------------------------------------------
def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "moelite"


def is_hf_dir(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").is_file()


def converted_path(src: Path, type: str) -> Path:
    """Cache file of a converted HF directory, keyed by its absolute path and newest mtime."""
    src = src.resolve()
    mtime = max([src.stat().st_mtime_ns] + [f.stat().st_mtime_ns for f in src.iterdir() if f.is_file()])
    key = hashlib.sha1(f"{src}\0{mtime}\0{type}".encode()).hexdigest()[:12]
    return cache_dir() / "converted" / f"{src.name}-{type}-{key}.gguf"


def resolve_model(arg: str | None, convert_type: str = DEFAULT_CONVERT_TYPE, progress: bool = True) -> str | None:
    """MODEL argument -> a GGUF path (None = the embedded demo). A HF directory is converted once."""
    if arg is None:
        return None
    path = Path(arg).expanduser()
    if is_hf_dir(path):
        out = converted_path(path, convert_type)
        if not out.exists():
            from ..converters import convert
            out.parent.mkdir(parents=True, exist_ok=True)
            convert(path, out, type=convert_type, progress=progress)   # writes a temp name, then renames
        return str(out)
    if path.is_dir():
        raise UsageError(f"{arg}: a directory without config.json (expected a .gguf file or a Hugging Face model dir)")
    if not path.exists():
        raise UsageError(f"{arg}: no such file")
    return str(path)


def load_model(args: argparse.Namespace, **extra: Any):
    """Open the model named by the common flags."""
    import moelite
    path = resolve_model(args.model, args.convert_type, progress=True)
    return moelite.load(path, memory_budget=args.memory_budget, policy=args.policy, n_threads=args.threads,
                        n_ctx=args.ctx_size, **extra)


def model_name(model) -> str:
    return str(model.kv.get("general.name") or Path(model.path).stem)


# --- status ----------------------------------------------------------------------------------------------
def cache_counts(model) -> tuple[int, int]:
    t = model.stats()["total"]
    return t["hits"], t["misses"]


def status_line(model, stream, before: tuple[int, int] = (0, 0)) -> str:
    """'12.3 tok/s · 17 prompt tok · cache 97.5 % hit · RSS 120 MiB / budget 1.50 GiB' for one answer."""
    from ..runtime.planner import fmt_bytes
    s = model.stats()
    hits, misses = s["total"]["hits"] - before[0], s["total"]["misses"] - before[1]
    rate = 100.0 * hits / (hits + misses) if hits + misses else 100.0
    budget = model.plan.budget
    parts = [f"{stream.decode_tok_s:.1f} tok/s", f"{stream.prompt_tokens} prompt + {stream.completion_tokens} tok",
             f"cache {rate:.1f} % hit", f"RSS {fmt_bytes(s['rss_bytes'])}"
             + (f" / budget {fmt_bytes(budget)}" if budget else " (all resident)")]
    if stream.finish_reason == "cancelled":
        parts.append("stopped")
    return " · ".join(parts)
