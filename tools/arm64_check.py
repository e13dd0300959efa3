"""The demo model on another CPU (aarch64 under qemu, or an x86-64 CPU variant) against a reference run.

    python tools/arm64_check.py dump OUT.npz          # run with the moelite on PYTHONPATH, on this CPU
    python tools/arm64_check.py compare REF.npz OTHER.npz [OTHER.npz ...]

`dump` loads the shipped demo model (src/moelite/data/demo.gguf) twice, fully resident and at the planner's
minimum memory budget (n_expert_used slots per MoE layer: every other expert is read from disk on use),
and for a few short prompts records the logits and the routing (experts chosen per layer) of every prompt
position and GREEDY greedy tokens. It fails unless the offloaded run equals the resident one bit for bit
on this CPU. It also records which ggml CPU backend ran (moelite.cpu_backend(): variant and features).

`compare` checks each OTHER against REF: the same greedy tokens, the same top-1 token at every prompt
position, and logits within the quantized kernels' tolerance: at every position the normalized mean
squared error sum (a - b)^2 / sum a^2 <= NMSE = 5e-4, the bound ggml's own test-backend-ops puts on
quantized matrix products (MUL_MAT) between backends. The demo model's weights are Q8_0; ggml multiplies
them with Q8_0-quantized activations in integer SIMD dot products (x86: scalar / AVX2 / AVX-512; aarch64:
NEON, dotprod, i8mm, SVE) whose integer block sums are exact but whose float scale-and-accumulate order
differs per kernel, as does the summation order of the f32 ops (norms, softmax, RoPE). So most positions
agree to a few float32 ulps (NMSE ~1e-14); a few positions move more (NMSE up to ~1e-5 seen, same experts
chosen), as when an activation lies within that rounding of a Q8_0 rounding boundary and the two CPUs
quantize it one step apart (the likely cause; not traced per activation). tools/arm64_check.sh and
tools/portable_check.sh run this; docs/ARM64.md has their output.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time

import numpy as np

PROMPTS = ["It is a truth universally", "Once upon a time", "def fib(n):"]
GREEDY = 12
NMSE = 5e-4  # per position: sum (a - b)^2 / sum a^2 of the logits; ggml's test-backend-ops bound for
# quantized matrix products. Measured here: 1e-14 typical, 7e-6 at worst (docs/ARM64.md)


def run(budget: str | int | None, prompts: list[list[int]]) -> tuple[list[np.ndarray], list[list[int]], np.ndarray]:
    """Logits of every prompt position, greedy continuations, and the routing of the prompt positions
    ([n_positions, n_moe_layers, k] expert ids, each row sorted)."""
    import moelite

    with moelite.load(memory_budget=budget, kv_type="f32", n_threads=1, record_trace=True) as m:
        logits = [m.logits(ids) for ids in prompts]
        routes = np.sort(m.trace().ids, axis=-1)
        greedy = [list(m.stream_tokens(ids, max_tokens=GREEDY, stop_ids=[])) for ids in prompts]
    return logits, greedy, routes


def dump(out: str) -> None:
    import moelite
    from moelite._cpu import cpu_backend

    t0 = time.monotonic()
    with moelite.load(kv_type="f32", n_threads=1) as m:
        prompts = [m.tokenizer.encode(p, add_special=True) for p in PROMPTS]
        minimum = m.plan.minimum_budget
    logits, greedy, routes = run(None, prompts)
    off_logits, off_greedy, off_routes = run(minimum, prompts)
    same = (
        all(np.array_equal(a, b) for a, b in zip(logits, off_logits))
        and greedy == off_greedy
        and np.array_equal(routes, off_routes)
    )
    cpu = cpu_backend()
    feats = ",".join(k for k, v in cpu["features"].items() if v == "1")
    print(
        f"{platform.machine()}: CPU backend {cpu['variant']} ({feats}); minimum budget {minimum} B; "
        f"offloaded == resident bit for bit: {same}; {time.monotonic() - t0:.0f} s"
    )
    for p, g in zip(PROMPTS, greedy):
        print(f"  {p!r} -> {g}")
    arrays = {f"logits{i}": a for i, a in enumerate(logits)}
    np.savez(
        out,
        machine=platform.machine(),
        variant=cpu["variant"],
        features=feats,
        greedy=np.array(greedy, dtype=np.int32),
        offload_exact=same,
        routes=routes,
        **arrays,
    )
    if not same:
        sys.exit("FAIL: offloading at the minimum budget changed the logits or the greedy tokens")


def drift(ref: np.lib.npyio.NpzFile, got: np.lib.npyio.NpzFile) -> tuple[float, float, bool]:
    """Worst per-position NMSE of the logits, worst max |dlogit| / max |logit| of a prompt, and whether
    every position's top-1 token agrees."""
    nmse, rel, top1 = 0.0, 0.0, True
    for i in range(len(PROMPTS)):
        a, b = ref[f"logits{i}"].astype(np.float64), got[f"logits{i}"].astype(np.float64)
        nmse = max(nmse, float(np.max(((a - b) ** 2).sum(axis=1) / (a**2).sum(axis=1))))
        rel = max(rel, float(np.max(np.abs(a - b)) / np.max(np.abs(a))))
        top1 &= bool(np.array_equal(a.argmax(axis=1), b.argmax(axis=1)))
    return nmse, rel, top1


def compare(ref_path: str, others: list[str]) -> None:
    ref = np.load(ref_path)
    failed = False
    for path in others:
        got = np.load(path)
        nmse, rel, top1 = drift(ref, got)
        tokens = bool(np.array_equal(ref["greedy"], got["greedy"]))
        ok = tokens and top1 and nmse <= NMSE and bool(got["offload_exact"])
        failed |= not ok
        print(
            f"{'PASS' if ok else 'FAIL'} {got['machine']} {got['variant']} vs {ref['machine']} {ref['variant']}: "
            f"greedy tokens equal: {tokens}; top-1 of every position equal: {top1}; "
            f"worst NMSE {nmse:.1e} (tolerance {NMSE:.0e}); max |dlogit| / max |logit| {rel:.1e}; "
            f"same experts chosen: {bool(np.array_equal(ref['routes'], got['routes']))}; "
            f"offloaded == resident: {bool(got['offload_exact'])}"
        )
    if failed:
        sys.exit(1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("dump").add_argument("out")
    c = sub.add_parser("compare")
    c.add_argument("ref")
    c.add_argument("others", nargs="+")
    a = ap.parse_args()
    if a.cmd == "dump":
        dump(a.out)
    else:
        compare(a.ref, a.others)


if __name__ == "__main__":
    main()
