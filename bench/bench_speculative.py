"""Speculative decoding (issue 31): decode speed with and without n-gram and MTP drafts, resident and capped, side by
side.

    python bench/bench_speculative.py [--model PATH] [--rounds 5] [--tokens 128] [--threads 2]

For each memory setting (resident; the smallest budgets holding 50 % and 25 % of the expert slots) and
each prompt (copy-heavy: a source file of this repository given in the prompt, then asked for again; free prose),
greedy decoding runs with speculation off, with n-gram drafts under the cost rule (the default), and with n-gram
drafts verified whenever there is one (`draft_rule="always"`: what the rule saves); on a file whose GGUF carries an MTP
block (nextn_predict_layers > 0) also with MTP drafts, under the cost rule and always verified. MTP needs the block
loaded (`speculative="mtp"` at load time, planned inside the same memory budget), so the MTP modes run on a second
load of the file with it; "off" is the plain load, what decoding without speculation costs. The runs of one round are
interleaved in a shuffled order (the machine is shared and noisy), each on a freshly loaded model; the report gives
per setting the median decode tok/s, the ratio to "off" of the same round (median, min, max over the rounds), the
acceptance rate, MB read from the file per generated token, and checks that every run produced off's tokens.
Writes bench/out/speculative.json and bench/SPECULATIVE.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import re
import statistics
import sys
import time
from pathlib import Path

import moelite
from moelite.runtime.planner import budget_for_fraction

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "out"
MODES = [  # per-call options of Model.generate
    ("off", {}),
    ("ngram", {"speculative": "ngram"}),
    ("ngram always", {"speculative": "ngram", "draft_rule": "always"}),
]
MTP_MODES = [  # only for files with an MTP block; run on a load with speculative="mtp"
    ("mtp", {"speculative": "mtp"}),
    ("mtp always", {"speculative": "mtp", "draft_rule": "always"}),
    # one draft per window, every one verified: the block is trained to guess one token ahead (releases draft 1)
    ("mtp 1 always", {"speculative": "mtp", "draft_rule": "always", "draft_max": 1}),
]
CAPS = (None, 50, 25)  # None: resident; else % of the expert slots
N_CTX = 2048
KEEP = "<!-- the text below is kept when the table above is rewritten -->"


def prompts() -> dict[str, str]:
    code = (ROOT / "runtime" / "sampling.py").read_text()[:2400]
    copy = f"Here is a Python file:\n\n{code}\n\nThe same file, with its comments kept:\n\n{code[:300]}"
    prose = (
        "It was a bright cold day in April, and the clocks were striking thirteen. The village lay quiet under the "
        "hills, and the road that wound past the church was empty save for a single cart. Mrs. Bennet had long "
        "wished to see her daughters settled, and she spoke of little else that spring."
    )
    return {"copy-heavy (code)": copy, "free prose": prose}


def budget_for(path: str, cap: int | None) -> int | None:
    """The smallest budget holding cap % of the expert slots (runtime/planner.py), as bench_offload.py caps. The
    same budget is given to the MTP load, whose block (dense weights, KV, a layer of expert slots) it then holds."""
    if cap is None:
        return None
    with moelite.load(path, n_threads=1, n_ctx=N_CTX) as m:
        hp, tensors = m.hparams, m.tensors
    return budget_for_fraction(hp, tensors, n_ctx=N_CTX, kv_elsize=2, fraction=cap / 100)


def modes_for(path: str) -> list[tuple[str, dict]]:
    """MODES, plus MTP_MODES when the file carries an MTP block (nextn_predict_layers > 0)."""
    with moelite.load(path, n_threads=1, n_ctx=N_CTX) as m:
        has_mtp = m.hparams.get("n_layer_nextn", 0) > 0
    return MODES + (MTP_MODES if has_mtp else [])


def load(path: str, threads: int, budget: int | None, opts: dict):
    """The file loaded for a mode: with the MTP block when the mode drafts with it."""
    spec = {"speculative": "mtp"} if opts.get("speculative") == "mtp" else {}
    return moelite.load(path, n_threads=threads, memory_budget=budget, n_ctx=N_CTX, **spec)


def one_run(path: str, text: str, budget: int | None, tokens: int, threads: int, opts: dict) -> dict:
    with load(path, threads, budget, opts) as m:
        return decode(m, text, tokens, opts)


def decode(m, text: str, tokens: int, opts: dict, fresh: bool = True) -> dict:
    """One greedy generation on model m with the per-call speculation options opts; the prompt is evaluated first
    (from a fresh context, or reusing the cached prefix when not fresh), so the timers and counters cover the
    decode."""
    ids = m.tokenizer.encode(text, add_special=True)
    if fresh:
        m.reset()
    m.generate(ids, max_tokens=0)
    m.reset_stats()
    t0, c0 = time.perf_counter(), time.process_time()
    out = m.generate(ids, max_tokens=tokens, stop_ids=[], **opts)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    s = m.stats()
    gen = s["last_generation"]
    sp = s["speculative"] if opts else {}
    return {
        "tokens": out,
        "decode_tok_s": gen["decode_tok_s"],
        "wall_s": wall,
        "cpu_s": cpu,  # the decode (the prompt is cached), every thread: less sensitive to a busy machine
        "generated": gen["generated_tokens"],
        "mb_per_token": s["total"]["bytes_read"] / 1e6 / max(gen["generated_tokens"], 1),
        "drafted": sp.get("drafted", 0),
        "accepted": sp.get("accepted", 0),
        "windows": sp.get("windows", 0),
        "declined": sp.get("declined", 0),
        "extra_mb": sp.get("extra_bytes_read", 0) / 1e6,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(ROOT / "src" / "moelite" / "data" / "demo.gguf"))
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=31)
    ap.add_argument(
        "--load-once",
        action="store_true",
        help="one load per memory setting, the runs through per-call options (large models: a load per run is slow)",
    )
    ap.add_argument("--render", action="store_true", help="rewrite SPECULATIVE.md from bench/out/speculative-*.json")
    args = ap.parse_args()
    if args.render:
        write_md()
        return 0
    rng = random.Random(args.seed)
    texts = prompts()
    budgets = {cap: budget_for(args.model, cap) for cap in CAPS}
    modes = modes_for(args.model)
    cells = [(cap, p, mode) for cap in CAPS for p in texts for mode, _ in modes]
    runs: dict[tuple, list[dict]] = {c: [] for c in cells}
    t_start = time.time()
    if args.load_once:  # per memory setting one model; per prompt (evaluated once, then reused) rounds of the modes
        for cap in CAPS:
            with contextlib.ExitStack() as stack:  # one load per distinct load setting (plain; with the MTP block)
                models: dict[bool, object] = {}
                for _, opts in modes:
                    key = opts.get("speculative") == "mtp"
                    if key not in models:
                        models[key] = stack.enter_context(load(args.model, args.threads, budgets[cap], opts))
                for p in texts:
                    for _ in range(args.rounds):
                        order = [mode for mode, _ in modes]
                        rng.shuffle(order)
                        for mode in order:
                            opts = dict(modes)[mode]
                            m = models[opts.get("speculative") == "mtp"]
                            runs[(cap, p, mode)].append(decode(m, texts[p], args.tokens, opts, False))
            print(f"memory {cap} done ({time.time() - t_start:.0f} s)", file=sys.stderr)
    for r in range(0 if args.load_once else args.rounds):
        order = list(cells)
        rng.shuffle(order)
        for cap, p, mode in order:
            opts = dict(modes)[mode]
            runs[(cap, p, mode)].append(one_run(args.model, texts[p], budgets[cap], args.tokens, args.threads, opts))
        print(f"round {r + 1}/{args.rounds} done ({time.time() - t_start:.0f} s)", file=sys.stderr)
    rows = []
    for cap in CAPS:
        for p in texts:
            base = runs[(cap, p, "off")]
            for mode, _ in modes:
                rs = runs[(cap, p, mode)]
                ratios = [a["decode_tok_s"] / b["decode_tok_s"] for a, b in zip(rs, base)]
                cpu = [b["cpu_s"] / a["cpu_s"] for a, b in zip(rs, base)]
                drafted = sum(x["drafted"] for x in rs)
                rows.append(
                    {
                        "memory": "resident" if cap is None else f"{cap} % of experts ({budgets[cap] / 1e6:.1f} MB)",
                        "prompt": p,
                        "mode": mode,
                        "tok_s": statistics.median(x["decode_tok_s"] for x in rs),
                        "ratio": statistics.median(ratios),
                        "ratio_min": min(ratios),
                        "ratio_max": max(ratios),
                        "cpu_ratio": statistics.median(cpu),
                        "cpu_ratio_min": min(cpu),
                        "cpu_ratio_max": max(cpu),
                        "acceptance": sum(x["accepted"] for x in rs) / drafted if drafted else None,
                        "windows_per_run": statistics.mean(x["windows"] for x in rs),
                        "mb_per_token": statistics.median(x["mb_per_token"] for x in rs),
                        "extra_mb_per_run": statistics.mean(x["extra_mb"] for x in rs),
                        "same_tokens_as_off": all(x["tokens"] == b["tokens"] for x, b in zip(rs, base)),
                    }
                )
    OUT.mkdir(parents=True, exist_ok=True)
    meta = {
        "model": Path(args.model).name,
        "rounds": args.rounds,
        "tokens": args.tokens,
        "threads": args.threads,
        "load_once": args.load_once,
    }
    (OUT / f"speculative-{Path(args.model).stem}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    write_md()
    print(report(meta, rows))
    return 0


def write_md() -> None:
    """bench/SPECULATIVE.md: a table per model measured (bench/out/speculative-MODEL.json; the section of a model
    measured elsewhere, with no JSON here, is kept as the file has it), then the text after KEEP as it was."""
    md = ROOT / "bench" / "SPECULATIVE.md"
    text = md.read_text() if md.exists() else ""
    head, kept = text.split(KEEP, 1) if KEEP in text else ("", "\n")
    sections = {}  # model name -> its section, in the file's order
    for sec in re.split(r"(?m)^(?=## )", head)[1:]:
        sections[sec.split("\n", 1)[0][3:].strip()] = sec.rstrip("\n") + "\n"
    for f in sorted(OUT.glob("speculative-*.json")):
        data = json.loads(f.read_text())
        sections[data["meta"]["model"]] = report(data["meta"], data["rows"])
    md.write_text(
        "# Speculative decoding: n-gram and MTP drafts, resident and capped\n\n"
        + "\n".join(sections.values())
        + "\n"
        + KEEP
        + kept
    )


def report(meta: dict, rows: list[dict]) -> str:
    lines = [
        f"## {meta['model']}",
        "",
        f"Written by `python bench/bench_speculative.py --rounds {meta['rounds']} --tokens {meta['tokens']} "
        f"--threads {meta['threads']}{' --load-once' if meta.get('load_once') else ''}` on `{meta['model']}` "
        f"(greedy, {meta['tokens']} tokens per run, "
        + (
            "one load per memory setting, each prompt evaluated once and reused, the modes of a round in a "
            "shuffled order"
            if meta.get("load_once")
            else "a fresh load per run, the runs of a round interleaved in a shuffled order"
        )
        + "). ratio: decode tok/s over the same round's "
        "run with speculation off; median [min, max] over the rounds. CPU ratio: off's CPU seconds of the decode "
        "(all threads) over this run's, the same way: the machine is shared, and CPU time is less sensitive to "
        "other processes than wall time. MB/token: bytes read from the file per generated token (the prompt is "
        "evaluated before the counters start). `ngram`: the cost rule decides each window (docs/SPECULATIVE.md); "
        "`ngram always`: every draft verified."
        + (
            " `mtp` / `mtp always`: drafts from the model's MTP block, on a load with the block (planned inside the "
            "same memory budget, so a capped MTP load holds fewer trunk expert slots), cost rule / every draft "
            "verified (up to draft_max 8 chained drafts); `mtp 1 always`: one MTP draft per step, always verified; "
            "off is the plain load."
            if any(r["mode"].startswith("mtp") for r in rows)
            else ""
        )
        + " same tokens: every run emitted the tokens of speculation off.",
        "",
        "| memory | prompt | mode | decode tok/s | ratio [min, max] | CPU ratio [min, max] | acceptance | windows/run "
        "| MB/token | same tokens |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        acc = f"{r['acceptance']:.2f}" if r["acceptance"] is not None else "-"
        lines.append(
            f"| {r['memory']} | {r['prompt']} | {r['mode']} | {r['tok_s']:.1f} | {r['ratio']:.2f} "
            f"[{r['ratio_min']:.2f}, {r['ratio_max']:.2f}] | {r['cpu_ratio']:.2f} "
            f"[{r['cpu_ratio_min']:.2f}, {r['cpu_ratio_max']:.2f}] | {acc} | {r['windows_per_run']:.1f} | "
            f"{r['mb_per_token']:.2f} | {'yes' if r['same_tokens_as_off'] else 'NO'} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
