"""Build the bench MoE (issue 16): a Qwen3-MoE with Qwen3-30B-A3B's proportions at small scale, with routing a
trained model produces, for the capped benchmarks.

Dev/bench-only (torch, transformers): never imported by the runtime.

    python tools/train_bench_moe.py                 # ~75 min on 1 CPU thread (200 steps); resumable (--resume)
    python tools/train_bench_moe.py --card-only     # rewrite bench/BENCH_MODEL.md from the cached outputs

Shape (Qwen3-30B-A3B: 128 experts, top-8, all layers MoE, no shared expert, GQA with q/k norm):
  6 layers, n_embd 256, 4 heads (2 kv) x 64, 128 routed experts, top-8 (k/E = 1/16), expert FFN 512,
  vocabulary 8192. 305 M parameters, 302 M in experts (98.9 %), 22 M active per token.
  Q4_K_M GGUF: ~190 MB, routed experts ~97 % of the bytes.

How it is trained (compute per token follows the 22 M active parameters, not the 305 M):
  1. sparse upcycling of the shipped demo model (src/moelite/data/demo.gguf, 16 experts x 256, trained
     on the offline corpora): expert j starts as demo expert j % 16 (+1 % noise) widened to 512 with a
     zero-initialised second half, router rows copied with 30 % noise (tools/train_demo.py
     upcycle_state_dict); the tokenizer is the demo's, byte for byte;
  2. continued training on the demo's corpora (Austen prose, Python docs, Python and Go code;
     tools/train_demo.py --fetch), step-based schedule (deterministic: batches depend on (seed, step) only),
     checkpoints every 10 min, --resume continues a stopped run;
  3. `moelite convert --type q4_k_m` of the HF checkpoint -> <cache>/bench-moe-q4_k_m.gguf;
  4. the card: held-out loss vs the unigram baseline, and SRP(16) / SCH(16, 2) per layer vs the floor,
     measured through moelite on the GGUF (the same routing the bench runs).

Outputs are cached under bench/out/bench_moe/ (git-ignored: too large to commit); bench/run_bench.py calls
build() on first use, the way it builds the synthetic model.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / "bench" / "out" / "bench_moe"
DEMO = ROOT / "src" / "moelite" / "data" / "demo.gguf"
CARD = ROOT / "bench" / "BENCH_MODEL.md"
QUANT = "q4_k_m"

# Everything that decides the model; the command in the module docstring runs exactly this.
SHAPE = [
    "--layers",
    "6",
    "--hidden",
    "256",
    "--head-dim",
    "64",
    "--kv-heads",
    "2",
    "--experts",
    "128",
    "--top-k",
    "8",
    "--expert-ffn",
    "512",
]
SCHEDULE = [
    "--seq-len",
    "256",
    "--batch-size",
    "16",
    "--lr",
    "1e-3",
    "--warmup-steps",
    "20",
    "--min-lr-frac",
    "0.1",
    "--aux-coef",
    "0.01",
    "--seed",
    "1234",
]
DEFAULT_STEPS = 200
EVAL = ["--eval-every-minutes", "30", "--ckpt-every-minutes", "10", "--eval-tokens", "16384", "--srp-tokens", "16384"]


def gguf_path(cache: Path = CACHE) -> Path:
    return cache / f"bench-moe-{QUANT}.gguf"


def train(cache: Path, steps: int, threads: int, resume: bool, corpus_dir: Path) -> Path:
    sys.path.insert(0, str(ROOT / "tools"))
    import train_demo

    hf = cache / "hf"
    log = hf / "train_log.json"
    if log.exists() and "final" in json.loads(log.read_text()):
        return hf
    argv = [
        "--out",
        str(hf),
        "--ckpt-dir",
        str(cache / "ckpt"),
        "--corpus-dir",
        str(corpus_dir),
        "--init-gguf",
        str(DEMO),
        "--upcycle",
        *SHAPE,
        *SCHEDULE,
        *EVAL,
        "--max-steps",
        str(steps),
        "--budget-minutes",
        "240",
        "--threads",
        str(threads),
    ]
    if resume:
        argv.append("--resume")
    if not (corpus_dir / "corpus.jsonl").exists():
        argv.append("--fetch")  # apt-get download of the corpora (Debian packages), once
    if train_demo.main(argv) != 0:
        raise SystemExit("training failed")
    return hf


def convert(hf: Path, out: Path) -> Path:
    if not out.exists():
        from moelite.converters import convert as convert_hf

        convert_hf(hf, out, type=QUANT, progress=True)
    return out


def build(
    cache: Path = CACHE,
    steps: int = DEFAULT_STEPS,
    threads: int = 1,
    resume: bool = True,
    corpus_dir: Path = ROOT / "build" / "demo_corpus",
) -> Path:
    """The bench MoE's GGUF, trained and converted on first use (cached)."""
    out = gguf_path(cache)
    if out.exists():
        return out
    return convert(train(cache, steps, threads, resume, corpus_dir), out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", type=Path, default=CACHE)
    ap.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--corpus-dir", type=Path, default=ROOT / "build" / "demo_corpus")
    ap.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    ap.add_argument("--card-only", action="store_true", help="only rewrite the card from the cached outputs")
    a = ap.parse_args(argv)
    if not a.card_only:
        build(a.cache, a.steps, a.threads, a.resume, a.corpus_dir)
    from bench_model_card import write_card

    write_card(a.cache, gguf_path(a.cache), CARD)
    return 0


if __name__ == "__main__":
    sys.exit(main())
