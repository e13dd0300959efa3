"""What every `moelite` command shares: the common flags, finding and loading the model (a GGUF, a Hugging
Face directory converted on the fly, or the embedded demo), and the one status line."""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import signal
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..errors import BudgetError, UsageError
from ..runtime.args import INT32_MAX, MAX_LOOKAHEAD, MAX_THREADS, cli_float, cli_int
from ..runtime.files import DEFAULT_CONVERT_TYPE, resolve_model

# --- argparse value types: one clear message per bad value, the ranges of runtime/args.py (the API's checks) ------
positive_int = cli_int(1, INT32_MAX)
nonneg_int = cli_int(0, INT32_MAX)
nonneg_float = cli_float(0.0)  # finite: 'inf' and 'nan' are refused
port_number = cli_int(0, 65535)


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
    from ..runtime.planner import parse_size  # imported late: `moelite --help` stays fast

    parse_size(text)


def _policy_id(text: str) -> None:
    from ..cache_policies.registry import policy_id

    policy_id(text)


budget_arg = _checked(_parse_size)
policy_arg = _checked(_policy_id)


def add_model_arg(p: argparse.ArgumentParser, help: str) -> None:
    """MODEL as a positional argument or as -m/--model (llama.cpp's spelling)."""
    p.add_argument("model_pos", nargs="?", metavar="MODEL", help=help)
    p.add_argument("-m", "--model", dest="model_opt", metavar="MODEL", help="the same as MODEL")


def model_arg(args: argparse.Namespace) -> str | None:
    pos, opt = getattr(args, "model_pos", None), getattr(args, "model_opt", None)
    if pos is not None and opt is not None and pos != opt:
        raise UsageError(f"two models given: {pos!r} and -m {opt!r}")
    return pos if pos is not None else opt


def add_common(p: argparse.ArgumentParser, model: bool = True) -> None:
    """The flags every model-running command takes."""
    if model:
        add_model_arg(p, "a .gguf file or a Hugging Face model directory (default: the embedded demo model)")
    from ..runtime.planner import SIZE_RULE

    g = p.add_argument_group("model options")
    g.add_argument(
        "--memory-budget",
        "-M",
        type=budget_arg,
        metavar="SIZE",
        help=f"memory for everything (dense weights, KV cache, expert slots), e.g. 1.5GiB, 800MB ({SIZE_RULE}; "
        "default: all resident if it fits in free RAM)",
    )
    g.add_argument(
        "--policy",
        type=policy_arg,
        default=None,
        help="expert cache policy: lru, lfu, lfuda, consistency (default: the calibrated one, else lfuda)",
    )
    g.add_argument(
        "--prefetch-depth",
        type=cli_int(1, MAX_LOOKAHEAD),
        default=1,
        metavar="N",
        help=f"under a memory budget, read the experts the routers predict for the next N MoE layers ahead of need "
        f"(1-{MAX_LOOKAHEAD}, default 1; `moelite analyze` reports how precise each distance is for the model)",
    )
    g.add_argument("--threads", "-t", type=cli_int(1, MAX_THREADS), help="compute threads (default: cores, at most 8)")
    g.add_argument(
        "--ctx-size", "-c", type=cli_int(8, INT32_MAX), help="context size in tokens (default: min(model, 4096))"
    )
    g.add_argument(
        "--convert-type",
        default=DEFAULT_CONVERT_TYPE,
        metavar="TYPE",
        help=f"tensor type when MODEL is a Hugging Face directory (default {DEFAULT_CONVERT_TYPE})",
    )
    g.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default=None,
        help="where the dense part and the expert arena live (default auto: cuda when built and visible)",
    )
    g.add_argument(
        "--vram-budget",
        type=budget_arg,
        metavar="SIZE",
        help="on cuda: VRAM for dense weights, KV cache and the expert arena; --memory-budget is then the "
        "RAM tier between VRAM and disk",
    )
    g.add_argument(
        "--kv-type",
        "-ctk",
        "--cache-type-k",
        dest="kv_type",
        choices=("f16", "f32", "q8_0"),
        default="f16",
        help="KV cache type for K and V (default f16; q8_0 halves it and needs flash attention)",
    )
    g.add_argument(
        "-fa",
        "--flash-attn",
        choices=("on", "off", "auto"),
        default="auto",
        help="attention through ggml's flash attention (default auto = on, as llama.cpp)",
    )
    g.add_argument(
        "--no-repack",
        dest="repack",
        action="store_false",
        help="llama.cpp's flag: keep the CPU's weights in the file's layout instead of ggml's repacked one "
        "(interleaved rows for its AVX2/AVX-512/NEON kernels; default: repacked where ggml takes the type)",
    )
    g.add_argument(
        "--mlock",
        action="store_true",
        help="llama.cpp's flag: lock the dense weights and the KV cache in RAM (mlock) so that neither swap "
        "nor reclaim pages them out; where RLIMIT_MEMLOCK refuses, a warning says how much was not "
        "locked and the model runs unlocked (without swap, moelite's resident part is unevictable anyway)",
    )
    g.add_argument(
        "--swap-threshold",
        type=cli_float(0.0, 1.0, hi_open=True),
        default=0.0,
        metavar="X",
        help="faster than exact (lossy, default 0 = off): a routed expert that is not in memory is replaced "
        "by a resident one whose router probability is at least (1 - X) of it; counted in --stats",
    )
    g.add_argument(
        "--standins",
        action="store_true",
        help="faster than exact (lossy, off by default): a missing expert the router weighs little runs as "
        "its low-bit stand-in from MODEL.gguf.standins.gguf (written by `moelite convert MODEL.gguf "
        "--standins q2_k`) instead of being read; counted in --stats",
    )
    g.add_argument(
        "--standins-file",
        metavar="FILE",
        default=None,
        help="with --standins: the stand-ins' side file, if not MODEL.gguf.standins.gguf",
    )
    g.add_argument(
        "--standin-threshold",
        type=cli_float(0.0, 1.0, lo_open=True),
        default=0.5,
        metavar="X",
        help="with --standins: a missing expert whose weight is at most X times the token's top weight "
        "runs as its stand-in (0 < X <= 1, default 0.5; 1: every missing expert)",
    )
    g.add_argument(
        "-ngl",
        "--n-gpu-layers",
        "--gpu-layers",
        dest="n_gpu_layers",
        type=nonneg_int,
        metavar="N",
        help="llama.cpp's flag: 0 = --device cpu; any N > 0 = --device cuda (moelite keeps every layer "
        "on the GPU and streams experts; it does not split layers)",
    )


def add_sampling(p: argparse.ArgumentParser) -> None:
    """The sampling flags; their defaults are the API's (runtime/sampling.py), shown in --help."""
    from ..runtime.sampling import DEFAULT_MAX_TOKENS, RANGES, SamplerConfig

    d = SamplerConfig()
    r = RANGES  # each flag takes its option's range
    g = p.add_argument_group("sampling (defaults as in the Python API and the server)")
    g.add_argument(
        "-n",
        "--max-tokens",
        "--n-predict",
        dest="max_tokens",
        type=cli_int(**r["max_tokens"]),
        default=DEFAULT_MAX_TOKENS,
        help=f"tokens to generate at most (default {DEFAULT_MAX_TOKENS})",
    )
    g.add_argument(
        "--temp",
        "--temperature",
        dest="temperature",
        type=cli_float(**r["temperature"]),
        help=f"0 = greedy (default {d.temperature:g}); e.g. 0.8 for varied text",
    )
    g.add_argument(
        "--top-k", type=cli_int(**r["top_k"]), help=f"keep the k most likely tokens (default {d.top_k} = off)"
    )
    g.add_argument("--top-p", type=cli_float(**r["top_p"]), help=f"nucleus sampling mass (default {d.top_p:g} = off)")
    g.add_argument(
        "--min-p", type=cli_float(**r["min_p"]), help=f"drop tokens below min_p * p_max (default {d.min_p:g} = off)"
    )
    g.add_argument(
        "--repeat-penalty",
        dest="repetition_penalty",
        type=cli_float(**r["repetition_penalty"]),
        help=f"penalty for repeated tokens (default {d.repetition_penalty:g} = off)",
    )
    g.add_argument(
        "--seed", type=cli_int(-1, r["seed"]["hi"], why="-1: random"), help="random seed (default -1: fresh)"
    )
    g.add_argument("--stop", action="append", default=[], metavar="TEXT", help="stop at this text (repeatable)")
    g.add_argument("--ignore-eos", action="store_true", help="do not stop at end-of-text tokens")


def add_speculative(p: argparse.ArgumentParser) -> None:
    """Speculative decoding (runtime/speculative.py, docs/SPECULATIVE.md): draft source and window limits."""
    from ..runtime.speculative import DEFAULT_DRAFT_MAX, DEFAULT_DRAFT_MIN, MAX_DRAFT, MODES

    g = p.add_argument_group("speculative decoding (docs/SPECULATIVE.md; off by default)")
    g.add_argument(
        "--speculative",
        choices=list(MODES),
        default=None,
        help="draft source: ngram (look the last tokens up in the prompt and the text so far), draft (a small "
        "model, -md), mtp (the model's own MTP block: Hy3, GLM-4.x, DeepSeek-V3 files that keep it); default off, or draft when -md is "
        "given",
    )
    g.add_argument(
        "-md",
        "--model-draft",
        dest="model_draft",
        metavar="FILE",
        help="draft model: a small GGUF with the same vocabulary, held in memory within --memory-budget",
    )
    g.add_argument(
        "--draft-max",
        type=cli_int(1, MAX_DRAFT),
        default=DEFAULT_DRAFT_MAX,
        metavar="N",
        help=f"drafted tokens per window at most (default {DEFAULT_DRAFT_MAX})",
    )
    g.add_argument(
        "--draft-min",
        type=cli_int(0, MAX_DRAFT),
        default=DEFAULT_DRAFT_MIN,
        metavar="N",
        help=f"a window with fewer drafts is not verified (default {DEFAULT_DRAFT_MIN})",
    )


def speculative_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The load options of add_speculative's flags (none when the command has no such flags)."""
    if not hasattr(args, "draft_max"):
        return {}
    mode = args.speculative or ("draft" if args.model_draft else "off")
    return dict(speculative=mode, draft_max=args.draft_max, draft_min=args.draft_min, draft_model=args.model_draft)


# --- the model -------------------------------------------------------------------------------------------
def device_arg(args: argparse.Namespace) -> str:
    """--device and -ngl -> the Model's device."""
    ngl = getattr(args, "n_gpu_layers", None)
    device = getattr(args, "device", None)
    if ngl is not None:
        implied = "cuda" if ngl > 0 else "cpu"
        if device not in (None, implied):
            raise UsageError(f"-ngl {ngl} means --device {implied}, but --device {device} was given")
        device = implied
    return device or "auto"


def load_model(args: argparse.Namespace, **extra: Any):
    """Open the model named by the common flags."""
    import moelite

    path = resolve_model(model_arg(args), args.convert_type, progress=True)
    with native_stderr_hidden(args.verbose):
        model = moelite.load(
            path,
            memory_budget=args.memory_budget,
            policy=args.policy,
            n_threads=args.threads,
            n_ctx=args.ctx_size,
            device=device_arg(args),
            vram_budget=args.vram_budget,
            flash_attn=getattr(args, "flash_attn", "auto") != "off",
            repack=getattr(args, "repack", True),
            swap_threshold=getattr(args, "swap_threshold", 0.0),
            standins=(getattr(args, "standins_file", None) or True) if getattr(args, "standins", False) else False,
            standin_threshold=getattr(args, "standin_threshold", 0.5),
            kv_type=getattr(args, "kv_type", "f16"),
            mlock=getattr(args, "mlock", False),
            prefetch_depth=getattr(args, "prefetch_depth", 1),
            **speculative_kwargs(args),
            **extra,
        )
    if split_text(model):
        print(f"moelite: {model.path}: {split_text(model)}", file=sys.stderr)
    if model.calibration_file:
        print(f"moelite: using calibration {model.calibration_file} (policy {model.policy.name})", file=sys.stderr)
    return model


@contextlib.contextmanager
def native_stderr_hidden(show: bool = False) -> Iterator[None]:
    """Keep what C/C++ libraries (ggml's loaders, the CUDA runtime) write to file descriptor 2 off the terminal,
    so moelite's one-line error is the only line; Python's own stderr keeps going to the terminal. show=True
    (--verbose) prints the hidden lines afterwards."""
    sys.stderr.flush()
    try:
        real = os.dup(2)
    except OSError:  # no file descriptor 2 (a GUI's embedded interpreter): nothing to hide
        yield
        return
    py_stderr = sys.stderr
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        sys.stderr = open(real, "w", closefd=False, errors="backslashreplace")
        try:
            yield
        finally:
            sys.stderr.flush()
            sys.stderr = py_stderr
            os.dup2(real, 2)
            os.close(real)
            if show:
                sink.seek(0)
                sys.stderr.write(sink.read().decode(errors="replace"))
                sys.stderr.flush()


def model_name(model) -> str:
    """general.name, else the file name (a split set's without its -00001-of-0000N shard suffix)."""
    return str(model.kv.get("general.name") or re.sub(r"-\d{5}-of-\d{5}$", "", Path(model.path).stem))


def split_text(model) -> str | None:
    """'split set of 3 files, 12.4 GiB' for a model read from a split set, else None."""
    from ..runtime.planner import fmt_bytes

    files = model.table.files
    return f"split set of {len(files)} files, {fmt_bytes(model.table.size)}" if len(files) > 1 else None


# --- status ----------------------------------------------------------------------------------------------
def cache_counts(model) -> tuple[int, int]:
    t = model.stats()["total"]
    return t["hits"], t["misses"]


def accounted_bytes(model, memory: dict) -> int:
    """What the budget pays for: dense weights + KV cache and state + expert slots, full and stand-in (the core's
    buffers) + the graph scratch the plan reserves (as Model.info() and `moelite plan` count it)."""
    keys = ("dense_bytes", "kv_bytes", "arena_bytes", "standin_arena_bytes")
    return sum(int(memory.get(k) or 0) for k in keys) + model.plan.scratch_bytes


def memory_text(model, s: dict) -> str:
    """'model memory 4.21 MiB of budget 4.80 MiB · process RSS 55.1 MiB' (the budget covers the model's own
    buffers; RSS also counts Python, libraries and the page cache of the mapped file)."""
    from ..runtime.planner import fmt_bytes

    budget = model.plan.budget
    used = f"model memory {fmt_bytes(accounted_bytes(model, s['memory']))}"
    used += f" of budget {fmt_bytes(budget)}" if budget else " (all resident)"
    return f"{used} · process RSS {fmt_bytes(s['rss_bytes'])}"


def status_line(model, stream, before: tuple[int, int] = (0, 0)) -> str:
    """'12.3 tok/s · 17 prompt + 40 tok · cache 97.5 % hit · model memory 4.2 MiB of budget 4.8 MiB · process
    RSS 55 MiB' for one answer."""
    s = model.stats()
    hits, misses = s["total"]["hits"] - before[0], s["total"]["misses"] - before[1]
    rate = 100.0 * hits / (hits + misses) if hits + misses else 100.0
    parts = [
        f"{stream.decode_tok_s:.1f} tok/s",
        f"{stream.prompt_tokens} prompt + {stream.completion_tokens} tok",
        f"cache {rate:.1f} % hit",
        memory_text(model, s),
    ]
    if getattr(model, "swap_threshold", 0.0) > 0:  # lossy mode on: say how often it changed the routing
        parts.insert(
            3, f"{s['total']['substitutions']} experts swapped since load (--swap-threshold {model.swap_threshold:g})"
        )
    if getattr(model, "standin_threshold", 0.0) > 0:  # stand-ins on: how many experts ran as their low-bit copy
        parts.insert(
            3,
            f"{s['total']['standin_uses']} stand-in uses since load (--standin-threshold {model.standin_threshold:g})",
        )
    if split_text(model):  # the set, named: its files are read as one
        parts.append(split_text(model))
    if stream.finish_reason == "cancelled":
        parts.append("stopped")
    return " · ".join(parts)


def context_note(model, stream) -> str | None:
    """One line when the answer stopped because the context is full (not because of max_tokens)."""
    if stream.finish_reason == "length" and stream.completion_tokens < stream.max_tokens:
        return f"the context is full ({model.n_ctx} tokens; --ctx-size sets it): the answer was cut"
    return None


def restore_ctrl_c() -> None:
    """Make Ctrl-C raise KeyboardInterrupt again: a process started in the background of a non-interactive shell
    inherits SIGINT ignored (so do its children, e.g. a terminal app spawned by such a process), and Python then
    leaves it ignored."""
    signal.signal(signal.SIGINT, signal.default_int_handler)


class PrefillProgress:
    """Model.prefill_progress for a terminal: 'reading the prompt: 1024/4096 tokens' on stderr once the prompt
    has taken more than `after` seconds (default 1; the environment's MOELITE_PROGRESS_AFTER), erased when done."""

    def __init__(self, after: float | None = None, out=None) -> None:
        self.t0 = time.monotonic()
        self.after = after if after is not None else float(os.environ.get("MOELITE_PROGRESS_AFTER", "1"))
        self.out = out or sys.stderr
        self.shown = False

    def __call__(self, done: int, total: int) -> None:
        if not self.out.isatty():
            return
        if done >= total:
            if self.shown:
                self.out.write("\r\033[K")
                self.out.flush()
            return
        if self.shown or time.monotonic() - self.t0 > self.after:
            self.shown = True
            self.out.write(f"\rreading the prompt: {done}/{total} tokens (Ctrl-C stops)")
            self.out.flush()
