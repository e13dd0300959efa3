"""Decode-step attention alone (issue 34): moelite's CPU op vs ggml's flash attention and ggml's plain
softmax(K^T Q) V path (the kernels llama.cpp runs with and without flash attention: the same ggml sources) on one
layer's KV cache of Qwen3-30B-A3B's shape (32 query heads, 4 KV heads, head size 128), through _core.attn_check.

    PYTHONPATH=build/dev python bench/bench_attn.py [--ctx 128,4096,16384] [--kv f16,q8_0] [--threads 2]

Each (context, KV type) runs the paths interleaved (A B C A B C ...), --rounds rounds of --reps graph computes;
the table gives the median time per layer and its min-max, and each path's speed relative to the fastest ggml path.
The plain path needs a V cache stored transposed, so it has no q8_0 row (llama.cpp needs flash attention there too).
"""

from __future__ import annotations

import argparse
import statistics

import numpy as np

from moelite import _core

PATHS = ("cpu", "flash", "plain")


def simd_level() -> str:
    flags = open("/proc/cpuinfo").read().split()
    return "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "SSE/other"


def measure(ctxs: list[int], kvs: list[str], threads: int, rounds: int, reps: int, heads=(32, 4, 128)) -> list[str]:
    """The Markdown table: per (context, KV type) each path's ms per layer, median (min-max) of `rounds`
    interleaved rounds, each round's time the median of `reps` graph computes after a first one."""
    n_head, h_kv, d = heads
    rng = np.random.default_rng(0)
    lines = [
        f"SIMD: {simd_level()}, {threads} threads, {n_head} query heads / {h_kv} KV heads x {d}; ms per layer, "
        "median (min-max); cpu = moelite's op (the default), flash / plain = ggml's flash attention / "
        "softmax(K^T Q) V",
        "",
        "| context | KV | " + " | ".join(PATHS) + " | cpu vs best ggml |",
        "|---|---|" + "---|" * (len(PATHS) + 1),
    ]
    for n_kv in ctxs:
        q = rng.standard_normal((1, n_head, d), dtype=np.float32)
        k = rng.standard_normal((n_kv, h_kv, d), dtype=np.float32)
        v = rng.standard_normal((n_kv, h_kv, d), dtype=np.float32)
        mask = np.zeros((1, n_kv), np.float32)
        for kv in kvs:
            paths = [p for p in PATHS if not (p == "plain" and kv != "f16")]
            times: dict[str, list[float]] = {p: [] for p in paths}
            for _ in range(rounds):
                for p in paths:
                    _, s = _core.attn_check(
                        q, k, v, mask, None, d**-0.5, kv_type=kv, path=p, n_threads=threads, n_reps=reps + 1
                    )
                    times[p].append(statistics.median(s[1:]) * 1e3)
            med = {p: statistics.median(t) for p, t in times.items()}
            cells = [f"{med[p]:.3f} ({min(times[p]):.3f}-{max(times[p]):.3f})" for p in paths]
            cells += ["-"] * (len(PATHS) - len(paths))
            best = min(med[p] for p in paths if p != "cpu")
            lines.append(f"| {n_kv} | {kv} | " + " | ".join(cells) + f" | {best / med['cpu']:.2f}x |")
            print(lines[-1], flush=True)
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ctx", default="128,4096,16384")
    ap.add_argument("--kv", default="f16,q8_0")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--heads", default="32,4,128", help="n_head,n_head_kv,head size")
    a = ap.parse_args()
    heads = tuple(int(x) for x in a.heads.split(","))
    lines = measure([int(x) for x in a.ctx.split(",")], a.kv.split(","), a.threads, a.rounds, a.reps, heads)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
