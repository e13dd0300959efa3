"""Expert-cache benchmark: every policy x {with, without prefetch} at budgets of 25 %, 50 % and 100 % of
the expert bytes (plus the dense part, KV cache and scratch), on one GGUF.

    python bench/bench_offload.py MODEL.gguf [--tokens 64] [--prompt-file FILE] [--threads 2] [--out bench/out/offload.json]

Prints a table: decode tok/s, hit rate, prefetch precision (useful / issued) and recall (prefetched uses /
all non-resident uses), MB read per token, I/O stall per token. No thresholds: numbers for the report.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

import moelite
from moelite.runtime.planner import budget_for_fraction, fmt_bytes

POLICIES = ("lru", "lfu", "lfuda", "consistency")


def prompt_ids(m: moelite.Model, text: str | None, n: int) -> list[int]:
    if text:
        try:
            return m.tokenizer.encode(text, add_special=False)[:n] or [1]
        except moelite.errors.MoeliteError:
            pass
    return [(7 * i + 3) % m.n_vocab for i in range(n)]


def run_one(
    path: str, budget: int | None, policy: str, prefetch: bool, tokens: int, text: str | None, threads: int, n_ctx: int
) -> dict:
    with moelite.load(
        path, memory_budget=budget, policy=policy, prefetch=prefetch, n_threads=threads, n_ctx=n_ctx
    ) as m:
        ids = prompt_ids(m, text, 128)
        t0 = time.perf_counter()
        m.logits(ids)  # prefill (warms the cache)
        t_prefill = time.perf_counter() - t0
        m.reset_stats()
        t0 = time.perf_counter()
        out = m.generate(ids, max_tokens=tokens, stop_ids=[])
        dt = time.perf_counter() - t0
        s = m.stats()["total"]
        info = m.info()
    n = len(out)
    return {
        "policy": policy,
        "prefetch": prefetch,
        "budget": budget,
        "slots": info["expert_slots"],
        "decode_tok_s": n / dt,
        "prefill_tok_s": len(ids) / t_prefill,
        "hit_rate": s["hit_rate"],
        "prefetch_precision": s["prefetch_hits"] / s["prefetch_issued"] if s["prefetch_issued"] else None,
        "prefetch_recall": s["prefetch_hits"] / (s["prefetch_hits"] + s["misses"])
        if s["prefetch_hits"] + s["misses"]
        else None,
        "mb_read_per_token": s["bytes_read"] / n / 1e6,
        "stall_s_per_token": s["stall_s"] / n,
        "tokens": n,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", nargs="?", default=None, help="GGUF path (default: the embedded demo model)")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--prompt-file", default=None)
    ap.add_argument("--threads", type=int, default=min(os.cpu_count() or 1, 4))
    ap.add_argument("--ctx", type=int, default=1024)
    ap.add_argument("--fractions", default="0.25,0.5,1.0")
    ap.add_argument("--out", default="bench/out/offload.json")
    ap.add_argument("--md", default=None, help="also append the table as Markdown to this file")
    a = ap.parse_args()
    text = Path(a.prompt_file).read_text(errors="replace")[:4000] if a.prompt_file else None
    with moelite.load(a.model, n_ctx=a.ctx) as m:
        plan = m.plan
        path = m.path
        prompt_ids_used = prompt_ids(m, text, 128)
        hp, tensors = m.hparams, m.tensors
    rows = []
    for frac in (float(f) for f in a.fractions.split(",")):
        budget = budget_for_fraction(hp, tensors, n_ctx=a.ctx, kv_elsize=2, fraction=frac)
        for policy in POLICIES:
            for prefetch in (False, True):
                r = run_one(path, budget, policy, prefetch, a.tokens, text, a.threads, a.ctx)
                r["fraction"] = frac
                rows.append(r)
                print(json.dumps(r), file=sys.stderr, flush=True)
    t = Table(
        title=f"{Path(path).name}: expert bytes {fmt_bytes(plan.expert_bytes_total)}, dense {fmt_bytes(plan.dense_bytes)}"
    )
    for col in (
        "experts in RAM",
        "policy",
        "prefetch",
        "tok/s",
        "hit rate",
        "pf precision",
        "pf recall",
        "MB read/tok",
        "stall ms/tok",
    ):
        t.add_column(col)
    for r in rows:
        pct = lambda x: "-" if x is None else f"{100 * x:.1f}%"
        t.add_row(
            f"{100 * r['fraction']:.0f}%",
            r["policy"],
            "on" if r["prefetch"] else "off",
            f"{r['decode_tok_s']:.2f}",
            pct(r["hit_rate"]),
            pct(r["prefetch_precision"]),
            pct(r["prefetch_recall"]),
            f"{r['mb_read_per_token']:.1f}",
            f"{1000 * r['stall_s_per_token']:.1f}",
        )
    Console().print(t)
    if a.md:
        head = [c.header for c in t.columns]
        md = [
            f"### {t.title}",
            "",
            f"{a.tokens} generated tokens (greedy) after a {len(prompt_ids_used)}-token prompt "
            f"({'the start of ' + a.prompt_file if a.prompt_file else 'synthetic token ids'}), "
            f"{a.threads} threads; hit rate, prefetch and reads over the generated tokens only.",
            "",
            "| " + " | ".join(head) + " |",
            "|" + "---|" * len(head),
        ]
        cells = [list(c._cells) for c in t.columns]
        md += ["| " + " | ".join(col[i] for col in cells) + " |" for i in range(len(rows))]
        with open(a.md, "a") as f:
            f.write("\n".join(md) + "\n\n")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"model": path, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
