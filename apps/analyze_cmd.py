"""moelite analyze: run a model over text, record its routing, measure local routing consistency (SRP,
SCH), simulate every cache policy against Belady, and calibrate the expert cache for a budget.

Outputs: a terminal summary, `report.json` + PNG plots in --out, and the calibration (moelite.calibration.*
keys: policy, m, per-layer shares, ...) in a side file next to the model, `MODEL.gguf.calibration.json`,
written atomically. `moelite.load` reads it by default (GGUF keys of the same names win if present), so the
multi-GB model file is never rewritten."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from ..errors import UsageError
from ..runtime.args import INT32_MAX, cli_float, cli_int
from .common import add_common, load_model, model_name, positive_int

NAME = "analyze"
HELP = "measure routing consistency (SRP/SCH) and calibrate the expert cache"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_common(p)
    p.add_argument("--text", required=True, metavar="FILE", help="calibration text (UTF-8)")
    p.add_argument("--tokens", type=positive_int, default=4096, help="tokens of the text to run (default 4096)")
    p.add_argument(
        "--seq-len",
        type=cli_int(16, INT32_MAX),
        default=512,
        help="tokens per sequence (fresh context each, 16 at least; default 512)",
    )
    p.add_argument(
        "--budget-fraction",
        type=cli_float(0.0, 1.0, lo_open=True),
        default=0.5,
        help="calibrate for this fraction of all expert slots when no --memory-budget is given (default 0.5)",
    )
    p.add_argument("--out", default=None, metavar="DIR", help="report folder (default: ./analyze-<model>)")
    p.add_argument("--no-write", action="store_true", help="do not write the calibration side file")
    p.add_argument("--trace", default=None, metavar="FILE.npz", help="also save the routing trace here")


def record_trace(model, text: str, tokens: int, seq_len: int):
    ids = model.tokenizer.encode(text, add_special=False)[:tokens]
    if len(ids) < 16:
        raise UsageError(f"calibration text gives only {len(ids)} tokens; need at least 16")
    from tqdm import tqdm

    model.clear_trace()
    seq_len = min(seq_len, model.n_ctx)
    with tqdm(total=len(ids), unit="tok", desc="recording routing", disable=None, leave=False) as bar:
        for i in range(0, len(ids), seq_len):
            chunk = ids[i : i + seq_len]
            if len(chunk) >= 16:
                model.logits(chunk)  # fresh context: one trace sequence per chunk
            bar.update(len(chunk))
    return model.trace()


def main(args: argparse.Namespace) -> int:
    from ..cache_policies.calibration import calibrate
    from ..cache_policies.report import build_report, print_summary, write_json, write_report
    from ..cache_policies.trace import save_trace

    text = Path(args.text).read_text(encoding="utf-8", errors="replace") if Path(args.text).is_file() else None
    if text is None:
        raise UsageError(f"{args.text}: no such text file")
    # routing does not depend on the cache: record with everything resident when it fits (fastest)
    model = load_model(args, record_trace=True, prefetch=False)
    with model:
        trace = record_trace(model, text, args.tokens, args.seq_len)
        plan = model.plan
        if args.memory_budget:
            slots = sum(plan.slots) if plan.slots else trace.n_layers * trace.n_expert
        else:
            slots = int(args.budget_fraction * trace.n_layers * trace.n_expert)
        slots = max(slots, trace.n_layers * trace.k)
        name = model_name(model)
        path = model.path
    if args.trace:
        save_trace(trace, args.trace)
    rep = build_report(trace)
    calib = calibrate(trace, slots)
    rep["calibration"] = {
        k.split("moelite.calibration.", 1)[1]: v for k, v in calib.items() if k != "moelite.calibration.expert_freq"
    }
    out = Path(args.out or f"analyze-{name}")
    files = write_report(rep, out)
    print_summary(rep)
    c = rep["calibration"]
    print(
        f"recommended for {slots} expert slots ({100 * slots / (trace.n_layers * trace.n_expert):.0f} % of all): "
        f"policy={c['policy']} m={c['m']} shares={c['shares_method']}  simulated hit rate {100 * c['hit_rate']:.1f} % "
        f"(uniform LRU {100 * c['hit_rate_lru_uniform']:.1f} %, Belady {100 * c['hit_rate_belady']:.1f} %)"
    )
    if not args.no_write:
        side = Path(str(path) + ".calibration.json")
        write_json({k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in calib.items()}, side)
        print(f"calibration written to {side} (moelite.load uses it by default)")
    print("report: " + ", ".join(str(f) for f in files))
    return 0
