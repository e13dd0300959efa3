"""Does calibration raise the runtime's hit rate? `moelite analyze` on one text, then the runtime's measured
hit rate on other text, calibrated vs uniform LRU, at the same budgets.

    python bench/bench_calibration.py [MODEL] [--fractions 0.25,0.5] [--tokens 4096] [--md bench/CALIBRATION.md]

Text (offline, on every machine): the Python standard library's own modules, split by file name:
calibration on modules a-m, measurement on modules n-z. Sequences of 512 tokens, each in a fresh context,
teacher-forced (one forward pass over the prompt, the expert-major path) and then 32 greedy tokens (the
decode path). Demand loads only (prefetch off) so that the policy and the per-layer shares are what is
compared; with prefetch on as a second row.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import moelite
from moelite.runtime.planner import budget_for_fraction

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "out" / "calibration"


def stdlib_text(first: str, last: str, limit: int = 2_000_000) -> str:
    lib = Path(sysconfig.get_paths()["stdlib"])
    parts, n = [], 0
    for p in sorted(lib.glob("*.py")):
        if first <= p.name[0].lower() <= last:
            t = p.read_text(errors="replace")
            parts.append(t)
            n += len(t)
            if n >= limit:
                break
    return "\n\n".join(parts)


def measure(path: str, budget: int, ids: list[int], seq: int, calibrated: bool, prefetch: bool) -> dict:
    with moelite.load(
        path,
        memory_budget=budget,
        n_threads=2,
        n_ctx=seq + 40,
        prefetch=prefetch,
        use_calibration=calibrated,
        policy=None if calibrated else "lru",
    ) as m:
        for s in range(0, len(ids) - seq + 1, seq):
            m.reset()
            m.generate(ids[s : s + seq], max_tokens=32, stop_ids=[])
        st = m.stats()["total"]
        return {
            "policy": m.policy.name,
            "hit_rate": st["hit_rate"],
            "slots": m.info()["expert_slots"],
            "mb_read": st["bytes_read"] / 1e6,
        }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", nargs="?", default=None)
    ap.add_argument("--fractions", default="0.25,0.5")
    ap.add_argument("--tokens", type=int, default=4096, help="tokens of calibration text and of measured text")
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--md", default=None)
    a = ap.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    calib_txt, eval_txt = OUT / "calibration.txt", OUT / "measured.txt"
    calib_txt.write_text(stdlib_text("a", "m"))
    eval_txt.write_text(stdlib_text("n", "z"))
    with moelite.load(a.model, n_ctx=a.seq + 40) as m:
        path, hp, tensors = m.path, m.hparams, m.tensors
        ids = m.tokenizer.encode(eval_txt.read_text(), add_special=False)[: a.tokens]
    name = Path(path).stem
    rows = []
    for frac in (float(f) for f in a.fractions.split(",")):
        budget = budget_for_fraction(hp, tensors, n_ctx=a.seq + 40, kv_elsize=2, fraction=frac)
        # calibrate a symlink of the model, so the side file lands in bench/out, not beside the model
        link = OUT / f"{name}-{int(100 * frac)}.gguf"
        if not link.exists():
            link.symlink_to(os.path.abspath(path))
        subprocess.run(
            [
                sys.executable,
                "-m",
                "moelite.apps.cli",
                "analyze",
                str(link),
                "--text",
                str(calib_txt),
                "--tokens",
                str(a.tokens),
                "--seq-len",
                str(a.seq),
                "--memory-budget",
                str(budget),
                "--ctx-size",
                str(a.seq + 40),
                "--out",
                str(OUT / f"analyze-{name}-{int(100 * frac)}"),
            ],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        for prefetch in (False, True):
            lru = measure(str(link), budget, ids, a.seq, False, prefetch)
            cal = measure(str(link), budget, ids, a.seq, True, prefetch)
            rows.append((frac, prefetch, lru, cal))
            print(
                f"{100 * frac:.0f}% of expert bytes, prefetch {'on' if prefetch else 'off'}: uniform LRU "
                f"{100 * lru['hit_rate']:.2f}% -> calibrated ({cal['policy']}, slots {cal['slots']}) "
                f"{100 * cal['hit_rate']:.2f}%",
                flush=True,
            )
    if a.md:
        lines = [
            f"### Calibration on {name}: runtime hit rate, uniform LRU vs `moelite analyze`'s settings",
            "",
            f"Calibrated on stdlib modules a-m, measured on modules n-z ({len(ids)} tokens, sequences of "
            f"{a.seq} + 32 greedy tokens). Generated by `python bench/bench_calibration.py`.",
            "",
            "| experts in RAM | prefetch | uniform LRU hit rate | calibrated | calibrated policy, slots per layer | MB read (LRU -> calibrated) |",
            "|---|---|---|---|---|---|",
        ]
        for frac, pf, lru, cal in rows:
            lines.append(
                f"| {100 * frac:.0f}% | {'on' if pf else 'off'} | {100 * lru['hit_rate']:.2f}% | "
                f"{100 * cal['hit_rate']:.2f}% | {cal['policy']}, {cal['slots']} | "
                f"{lru['mb_read']:.0f} -> {cal['mb_read']:.0f} |"
            )
        Path(a.md).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
