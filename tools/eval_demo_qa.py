"""Answer quality of a demo GGUF on held-out question/answer pairs (issue 19). Dev-only.

Each held-out question of tools/build_qa_pairs.py is asked through moelite's own chat path (the model's
chat template, greedy, at most --max-tokens tokens, generation ends only at <|im_end|>). Scores against the
reference answer, on lower-cased word tokens: token F1 (bag of words, as SQuAD) and ROUGE-L F1 (longest
common subsequence); plus the share of answers that end at <|im_end|> within the limit, and their mean length.

  python tools/eval_demo_qa.py src/moelite/data/demo.gguf --pairs build/demo_qa/heldout.jsonl --json out.json
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import sys


def words(text: str) -> list[str]:
    return re.findall(r"\w+", text.lower())


def token_f1(pred: list[str], ref: list[str]) -> float:
    common = sum((collections.Counter(pred) & collections.Counter(ref)).values())
    if not common:
        return 0.0
    p, r = common / len(pred), common / len(ref)
    return 2 * p * r / (p + r)


def lcs_len(a: list[str], b: list[str]) -> int:
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(pred: list[str], ref: list[str]) -> float:
    n = lcs_len(pred, ref)
    if not n:
        return 0.0
    p, r = n / len(pred), n / len(ref)
    return 2 * p * r / (p + r)


def ask(model, question: str, max_tokens: int) -> tuple[str, bool, int]:
    """Greedy answer, whether it ended at <|im_end|>, generated tokens."""
    im_end = model.tokenizer.encode("<|im_end|>", add_special=False)
    answer = model.chat([{"role": "user", "content": question}], temperature=0, max_tokens=max_tokens, stop_ids=im_end)
    st = model.last_stats
    return answer, st.finish_reason == "stop", st.generated_tokens


def evaluate(gguf: str, pairs: list[dict], max_tokens: int) -> dict:
    import moelite

    rows = []
    with moelite.Model(gguf, n_threads=1) as model:
        for p in pairs:
            answer, stopped, n = ask(model, p["question"], max_tokens)
            pw, rw = words(answer), words(p["answer"])
            rows.append(
                {
                    "source": p["source"],
                    "question": p["question"],
                    "reference": p["answer"],
                    "answer": answer,
                    "stopped": stopped,
                    "tokens": n,
                    "token_f1": token_f1(pw, rw),
                    "rouge_l": rouge_l(pw, rw),
                }
            )
    return {
        "gguf": gguf,
        "max_tokens": max_tokens,
        "overall": summarize(rows),
        "per_source": {
            s: summarize([r for r in rows if r["source"] == s]) for s in sorted({r["source"] for r in rows})
        },
        "rows": rows,
    }


def summarize(rows: list[dict]) -> dict:
    n = len(rows)
    return {
        "n": n,
        "token_f1": sum(r["token_f1"] for r in rows) / n,
        "rouge_l": sum(r["rouge_l"] for r in rows) / n,
        "stopped": sum(r["stopped"] for r in rows) / n,
        "mean_tokens": sum(r["tokens"] for r in rows) / n,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("gguf")
    ap.add_argument("--pairs", default="build/demo_qa/heldout.jsonl")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--json", help="write the summary and every answer here")
    args = ap.parse_args(argv)
    if not os.path.isfile(args.pairs):
        sys.exit(f"{args.pairs}: no such file (held-out pairs: tools/build_qa_pairs.py writes <out>/heldout.jsonl)")
    pairs = [json.loads(line) for line in open(args.pairs)]
    res = evaluate(args.gguf, pairs, args.max_tokens)
    for name, s in [("all", res["overall"]), *res["per_source"].items()]:
        print(
            f"{name:8s} n={s['n']:4d} token-F1 {s['token_f1']:.3f} ROUGE-L {s['rouge_l']:.3f} "
            f"stops at <|im_end|> {s['stopped']:.1%} mean {s['mean_tokens']:.1f} tokens"
        )
    if args.json:
        json.dump(res, open(args.json, "w"), indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
