"""Render MODEL_CARD.md for the demo MoE from its train_log.json (issue 6; chat tuning: issue 19). Dev-only.

  python tools/demo_model_card.py build/demo_hf > MODEL_CARD.md
  python tools/demo_model_card.py build/demo_hf_qa --gguf src/moelite/data/demo.gguf \
      --qa-eval build/demo_qa_eval_before.json build/demo_qa_eval_after.json > MODEL_CARD.md

Values not known yet (training still running, GGUF not converted) are written as TBD.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

SOURCES = {
    "prose": "Jane Austen's six novels (Debian `r-cran-janeaustenr`), one document per chapter",
    "technical": "Python 3.11 documentation reST sources (Debian `python3.11-doc`), one document per file",
    "code_python": "the CPython 3.11 standard library `.py` files (tests excluded), one document per file",
    "code_go": "the Go 1.19 standard library (Debian `golang-1.19-src`, no tests/testdata), one document per file",
}

QA_SOURCES = {
    "stdlib": 'Python 3.11 standard library docstrings read with `ast`: "What does the function json.dumps do?", '
    '"What is the Python module json for?" -> the docstring\'s first sentence(s)',
    "foldoc": 'FOLDOC (Debian `dict-foldoc`): "What is Debian?" -> the entry\'s first sentence(s), markup removed',
    "debian": "Debian package descriptions (`apt-cache dumpavail`; long ones from `/var/lib/dpkg/status`): "
    '"What is the Debian package X for?" -> the short description (+ one sentence of the long one)',
    "man": 'man pages in sections 1 and 8: "What does the ls command do?" -> the NAME line as a sentence '
    "(+ the first sentence of DESCRIPTION)",
}
# The from-scratch run that made the pre-tuning demo (its HF checkpoint was not kept; the tuned model starts from
# the shipped GGUF). Numbers from its train_log.json, as the previous card showed them.
BASE = {
    "steps": 1981,
    "tokens": 4_057_088,
    "minutes": 79.1,
    "budget": 80,
    "srp": 0.6105,
    "note": "interrupted at step ~100 and resumed from the step-93 checkpoint; the machine's other core was busy",
}


def fmt(x, spec=".3f", none="TBD"):
    return none if x is None else format(x, spec)


def render(model_dir: str, gguf: str | None = None, qa_eval: tuple[str, str] | None = None) -> str:
    log = json.load(open(os.path.join(model_dir, "train_log.json")))
    tuned = bool(log["config"].get("qa_dir"))
    before, after = (json.load(open(p)) for p in qa_eval) if qa_eval else (None, None)
    parts = [intro(tuned), model_table(log, gguf), data_section(log)]
    if tuned:
        parts += [base_training(log), tuning_section(log), loss_section(log, tuned), quality_section(before, after)]
    else:
        parts += [training_section(log), loss_section(log, tuned)]
    parts += [routing_section(log, tuned), reproduce_section(log, tuned), limitations(tuned)]
    return "\n".join(parts)


def intro(tuned: bool) -> str:
    head = (
        "# moelite demo MoE\n\nA toy Mixture-of-Experts language model trained on one CPU thread, shipped with "
        "moelite "
        "so that every feature (expert cache, prefetch, routing analysis, chat) can be tried without downloading "
        "anything."
    )
    if tuned:
        return head + (
            " It was pretrained from scratch on domain text (Austen prose, Python documentation, Python "
            "and Go code), then tuned on question/answer pairs in its ChatML chat format: **asked a short "
            "question about a Python function or module, a computing term, a Debian package or a "
            "command, it answers in a sentence or two and usually ends its turn.** The answers have the "
            "right shape and share some words with the references, but a 22 M model knows few facts: "
            "most answers are wrong in substance. It is a demo, not an assistant.\n"
        )
    return head + (
        " **It writes domain-flavoured text (Austen-like prose, Python-docs-like reST, Python and Go-like "
        "code); it is not an assistant.** Its chat template is ChatML so the chat path runs end to end, "
        "but it was never trained on conversations and will not follow instructions.\n"
    )


def model_table(log: dict, gguf: str | None) -> str:
    c = log["config"]
    L = [
        "## Model\n",
        "| | |\n|---|---|",
        "| architecture | `qwen3moe` (transformers `Qwen3MoeForCausalLM`), all layers MoE, no shared expert |",
        f"| layers / hidden / heads (kv) / head_dim | {c['layers']} / {c['hidden']} / "
        f"{c['hidden'] // c['head_dim']} ({c['kv_heads']}) / {c['head_dim']} |",
        f"| routed experts / top-k / expert FFN | {c['experts']} / {c['top_k']} (norm_topk_prob) / {c['expert_ffn']} |",
        f"| vocabulary | {log['vocab_size']} byte-level BPE, Qwen2 pre-tokenizer split, "
        "`<|endoftext|>` `<|im_start|>` `<|im_end|>` |",
        f"| parameters | {log['params'] / 1e6:.2f} M total, {log['expert_params'] / 1e6:.2f} M in experts, "
        f"{log['active_params'] / 1e6:.2f} M active per token; embeddings tied |",
        f"| training context | {c['seq_len']} tokens (RoPE theta 10000; longer prompts are out of distribution) |",
    ]
    if gguf and os.path.exists(gguf):
        from moelite._core import read_gguf, type_name

        types = sorted({type_name(t[1]) for t in read_gguf(gguf)["tensors"]})
        L.append(
            f"| shipped GGUF | `src/moelite/data/{os.path.basename(gguf)}`, {os.path.getsize(gguf) / 1e6:.1f} MB "
            f"({', '.join(types)}), written by `moelite convert` |"
        )
    else:
        L.append("| shipped GGUF | TBD: type and size in MB, filled in after `moelite convert` |")
    return "\n".join(L) + "\n"


def data_section(log: dict) -> str:
    L = [
        "## Training data\n",
        "Free text from Debian packages (`apt-get download` + `dpkg-deb -x`, see `tools/train_demo.py`). "
        "Held-out text is split **by document** (hash of the document name), never by line.\n",
        "| domain | source | train MB | val MB | train tokens |",
        "|---|---|---|---|---|",
    ]
    for d in log["unigram_baseline"]:
        b = log["corpus_bytes"][d]
        L.append(
            f"| {d} | {SOURCES.get(d, d)} | {b['train'] / 1e6:.2f} | {b['val'] / 1e6:.2f} | "
            f"{log['tokens_per_domain']['train'][d]:,} |"
        )
    return "\n".join(L) + "\n"


def optimizer_line(c: dict) -> str:
    return (
        f"AdamW (betas 0.9/0.95, weight decay {c['weight_decay']}), peak LR {c['lr']}, {c['warmup_steps']} "
        f"warmup steps, cosine to {c['min_lr_frac']}x over the wall-clock budget; batch {c['batch_size']} x "
        f"{c['seq_len']} tokens; gradient clip 1.0; load-balancing aux loss coefficient {c['aux_coef']}; "
        f"seed {c['seed']}"
    )


def steps_line(log: dict) -> str:
    final, last = log.get("final"), (log["evals"][-1] if log["evals"] else None)
    if not final:
        return (
            f"- Steps / tokens / wall time: TBD (training in progress; last eval at step "
            f"{last['step'] if last else 0})."
        )
    return (
        f"- Steps: {final['step']:,}; training tokens seen: {final['tokens_seen']:,} "
        f"({final['tokens_seen'] / sum(log['tokens_per_domain']['train'].values()):.2f} epochs of the text); "
        f"wall time {final['train_wall_s'] / 60:.1f} min."
    )


def training_section(log: dict) -> str:
    c = log["config"]
    return (
        "\n".join(
            [
                "## Training\n",
                f"- {optimizer_line(c)}.",
                f"- {c['threads']} CPU thread, budget {c['budget_minutes']:.0f} min, torch {log.get('torch', '?')}, "
                f"experts computed with transformers' `{c['experts_impl']}` implementation.",
                steps_line(log),
            ]
        )
        + "\n"
    )


def base_training(log: dict) -> str:
    c = log["config"]
    return "\n".join(
        [
            "## Pretraining (from scratch)\n",
            f"- `tools/train_demo.py` defaults: AdamW, peak LR 0.002, 100 warmup steps, cosine to 0.1x, batch 8 x "
            f"{c['seq_len']} tokens, aux loss {c['aux_coef']}, seed {c['seed']}, 1 CPU thread, budget {BASE['budget']} min "
            f"({BASE['note']}).",
            f"- Steps: {BASE['steps']:,}; tokens seen: {BASE['tokens']:,}; wall time {BASE['minutes']} min. Its HF "
            "checkpoint was not kept: the tuning run below starts from the shipped q8_0 GGUF, dequantized to f32 "
            "(`--init-gguf`, names mapped back as `converters/families/qwen3_moe.py` maps them forward). The "
            "recovered model gives the previous card's held-out losses within 0.001 nats (step 0 below).\n",
        ]
    )


def tuning_section(log: dict) -> str:
    c, qa = log["config"], log.get("qa") or {}
    counts = pair_counts(c["qa_dir"])
    L = [
        "## Chat tuning (issue 19)\n",
        "Question/answer pairs built offline and deterministically by `tools/build_qa_pairs.py` (held-out pairs "
        "chosen by a hash of the question; at most 9,000 per source, also chosen by hash):\n",
        "| source | questions -> answers | train | held out |",
        "|---|---|---|---|",
    ]
    for s, desc in QA_SOURCES.items():
        n = counts.get(s, (0, 0))
        L.append(f"| {s} | {desc} | {n[0]:,} | {n[1]:,} |")
    L += [
        "",
        "Each pair is rendered with the model's chat template (`<|im_start|>user\\n...<|im_end|>\\n"
        "<|im_start|>assistant\\n...<|im_end|>`), 1-3 pairs per conversation, conversations packed whole into "
        f"{c['seq_len'] + 1}-token windows. The loss on chat rows is on the answer tokens and their `<|im_end|>` "
        f"only ({qa.get('train_answer_tokens', 0):,} answer tokens in {qa.get('train_windows', 0):,} windows). "
        f"Every batch mixes {round(c['qa_frac'] * c['batch_size'])} chat rows with "
        f"{c['batch_size'] - round(c['qa_frac'] * c['batch_size'])} rows of the original text (all tokens), so "
        "the text skills and the routing locality are kept.",
        f"- {optimizer_line(c)}.",
        f"- {c['threads']} CPU thread, budget {c['budget_minutes']:.0f} min on a machine shared with three other "
        f"jobs (load average 6-8 on 2 cores), torch {log.get('torch', '?')}.",
        tuning_steps_line(log),
    ]
    return "\n".join(L) + "\n"


def tuning_steps_line(log: dict) -> str:
    final, c = log.get("final"), log["config"]
    if not final:
        return steps_line(log)
    n_qa = round(c["qa_frac"] * c["batch_size"])
    text_tokens = final["step"] * (c["batch_size"] - n_qa) * c["seq_len"]
    qa_rows = final["step"] * n_qa
    return (
        f"- Steps: {final['step']:,} ({final['tokens_seen']:,} tokens through the model): {text_tokens:,} text "
        f"tokens ({text_tokens / sum(log['tokens_per_domain']['train'].values()):.2f} epochs of the text) and "
        f"{qa_rows:,} chat windows ({qa_rows / log['qa']['train_windows']:.2f} epochs of the pairs); wall time "
        f"{final['train_wall_s'] / 60:.1f} min, in one run."
    )


def pair_counts(qa_dir: str) -> dict[str, tuple[int, int]]:
    out: dict[str, list[int]] = {}
    for i, name in enumerate(("train.jsonl", "heldout.jsonl")):
        path = os.path.join(qa_dir, name)
        for line in open(path) if os.path.exists(path) else []:
            out.setdefault(json.loads(line)["source"], [0, 0])[i] += 1
    return {k: (v[0], v[1]) for k, v in out.items()}


def loss_section(log: dict, tuned: bool) -> str:
    final = log.get("final")
    val = final["val_loss"] if final else None
    uni = log["unigram_baseline"]
    L = [
        "## Held-out loss (nats/token)\n",
        "The unigram baseline is the cross-entropy of the (add-one) unigram distribution of the training "
        "tokens, scored on the same held-out tokens. Lower is better.\n",
    ]
    if tuned:
        first = log["evals"][0]
        L += [
            "| held-out set | tokens | before tuning (step 0) | after tuning | unigram baseline |",
            "|---|---|---|---|---|",
        ]
        for d in uni:
            L.append(
                f"| {d} | {log['val_tokens_per_domain'][d]:,} | {first['val_loss'][d]:.3f} | "
                f"{fmt(val[d] if val else None)} | {uni[d]:.3f} |"
            )
        last = log["evals"][-1] if final else None
        L.append(
            f"| chat answers (answer tokens only, held-out pairs) | {log['qa']['heldout_answer_tokens']:,} | "
            f"{first['qa_heldout_loss']:.3f} | {fmt(last['qa_heldout_loss'] if last else None)} | - |"
        )
        return "\n".join(L) + "\n"
    L += ["| domain | val tokens | model | unigram baseline | model perplexity |", "|---|---|---|---|---|"]
    for d in uni:
        v = val[d] if val else None
        L.append(
            f"| {d} | {log['val_tokens_per_domain'][d]:,} | {fmt(v)} | {uni[d]:.3f} | "
            f"{fmt(math.exp(v) if v is not None else None, '.1f')} |"
        )
    return "\n".join(L) + "\n"


def quality_section(before: dict | None, after: dict | None) -> str:
    L = [
        "## Answer quality on the held-out pairs\n",
        "`tools/eval_demo_qa.py`: every held-out question asked through moelite's chat path on the shipped "
        "GGUF, greedy, at most 64 tokens. Token F1 (bag of lower-cased words) and ROUGE-L F1 (longest common "
        'subsequence) against the reference answer; "stops" is the share of answers that end with '
        "`<|im_end|>` within the 64 tokens.\n",
    ]
    if not (before and after):
        return "\n".join(L + ["TBD: run tools/eval_demo_qa.py on the GGUF before and after tuning.\n"])
    L += [
        "| held-out pairs | n | token F1 before -> after | ROUGE-L before -> after | stops before -> after | "
        "mean tokens before -> after |",
        "|---|---|---|---|---|---|",
    ]
    rows = [("all", before["overall"], after["overall"])]
    rows += [(s, before["per_source"][s], after["per_source"][s]) for s in after["per_source"]]
    for name, b, a in rows:
        L.append(
            f"| {name} | {a['n']} | {b['token_f1']:.3f} -> **{a['token_f1']:.3f}** | {b['rouge_l']:.3f} -> "
            f"**{a['rouge_l']:.3f}** | {b['stopped']:.0%} -> **{a['stopped']:.0%}** | "
            f"{b['mean_tokens']:.1f} -> {a['mean_tokens']:.1f} |"
        )
    L += [
        "",
        "What this means: after tuning the model answers in the requested shape (one short sentence that "
        "ends the turn; answer styles match the question type) and shares about twice as many words with the "
        'reference, but most answers are still wrong in substance; even questions it was trained on ("What is '
        'Debian?") get generic answers. The README\'s question, `moelite run --chat -p "What is Python?"`, '
        'answers "A programming language for the Python interpreter."',
        "",
        "Examples (held-out, after tuning; the first of each source, not picked):\n",
    ]
    seen = set()
    for r in after["rows"]:
        if r["source"] in seen:
            continue
        seen.add(r["source"])
        answer = " ".join(r["answer"].split())
        answer = answer if len(answer) <= 200 else answer[:200] + " ..."
        L.append(f'- *{r["question"]}* -> "{answer}" (reference: "{r["reference"]}")')
    return "\n".join(L) + "\n"


def routing_section(log: dict, tuned: bool) -> str:
    srp, c = log.get("srp"), log["config"]
    L = [
        "## Routing consistency\n",
        "Model-level SRP at m = 16 (definition: `cache_policies/metrics.py`; computed by "
        "`tools/demo_routing_srp.py` from the HF router logits on held-out text, all layers pooled).\n",
    ]
    if not srp:
        floor = 2 * c["top_k"] / c["experts"] / (1 + c["top_k"] / c["experts"])
        return "\n".join(L + [f"- SRP(16) = TBD against the floor 2r/(1+r) = {floor:.4f}.\n"])
    after = " after tuning" if tuned else ""
    L += [
        f"- SRP(16){after} = **{srp['srp']:.4f}** (best alpha {srp['alpha']}, rho_hat {srp['rho_hat']:.2f}) against "
        f"the alpha = 0 floor 2r/(1+r) = {srp['floor']:.4f} (r = k/E = {srp['k']}/{srp['n_expert']}); "
        f"{srp['windows']:,} windows." + (f" Before tuning: {BASE['srp']:.4f}." if tuned else ""),
        "- Per layer: " + ", ".join(f"{x:.3f}" for x in srp["per_layer"]) + ".",
        "- Per domain: " + ", ".join(f"{d} {x:.3f}" for d, x in srp["per_domain"].items()) + ".",
        "- For scale, the paper's model-level SRP(16): Qwen3-30B-A3B 0.541, OLMoE 0.509, "
        "Mixtral-8x7B 0.494, DeepSeek-V2-Lite 0.379. A 22 M toy with 16 experts is not comparable in "
        "kind; the number says how cache-friendly this model's routing is, nothing about quality.",
    ]
    return "\n".join(L) + "\n"


def reproduce_section(log: dict, tuned: bool) -> str:
    c = log["config"]
    if tuned:
        cmds = (
            "git show 8121883:src/moelite/data/demo.gguf > build/demo_orig.gguf   # the pre-tuning demo\n"
            "python tools/build_qa_pairs.py --fetch --raw-dir build/demo_corpus/raw --out build/demo_qa\n"
            "python tools/train_demo.py --fetch --out build/demo_hf_qa --init-gguf build/demo_orig.gguf "
            f"--qa-dir build/demo_qa --qa-frac {c['qa_frac']} --lr {c['lr']} --warmup-steps {c['warmup_steps']} "
            f"--budget-minutes {c['budget_minutes']:.0f} --eval-every-minutes {c['eval_every_minutes']:.0f} "
            f"--threads {c['threads']}\n"
            "tools/ship_demo.sh build/demo_hf_qa   # convert, evaluate before/after, render this card\n"
        )
        pre = (
            "`build_qa_pairs.py --fetch` unpacks `dict-foldoc` into the raw dir; it reads this machine's man "
            "pages and apt lists, so another machine builds a different pair set.\n\n"
        )
    else:
        cmds = (
            "python tools/train_demo.py --fetch --out build/demo_hf "
            f"--budget-minutes {c['budget_minutes']:.0f} --threads {c['threads']}\n"
            "python tools/demo_model_card.py build/demo_hf > MODEL_CARD.md\n"
        )
        pre = ""
    return (
        "## Reproduce\n\n```\n"
        + cmds
        + "```\n\n"
        + pre
        + "The data order depends only on (seed, step); the learning-rate schedule follows the wall clock, so a "
        "rerun on another machine sees a different number of steps. Pass `--max-steps N` for a step-based, "
        "fully reproducible schedule.\n"
    )


def limitations(tuned: bool) -> str:
    L = [
        "## Limitations\n",
        "- Tiny and briefly trained: fluent-looking fragments, few facts, no reasoning, frequent repetition."
        + (
            " Chat answers are short and shaped like the references but are often wrong or generic; questions "
            "outside the four question styles, follow-ups and instructions are out of distribution."
            if tuned
            else ""
        ),
        "- English prose is 19th-century Austen; technical text is Python documentation; code is "
        "Python and Go standard library. Anything else is out of distribution.",
        "- Licences of the sources: Austen (public domain), Python documentation and standard library (PSF "
        "licence), Go (BSD-style)"
        + (", FOLDOC (GNU FDL), Debian package descriptions and man pages (their packages' licences)" if tuned else "")
        + ". The model is shipped for testing moelite only.",
    ]
    return "\n".join(L) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_dir", nargs="?", default="build/demo_hf", help="holds train_log.json")
    ap.add_argument("--gguf", help="the shipped GGUF (type and size)")
    ap.add_argument(
        "--qa-eval",
        nargs=2,
        metavar=("BEFORE", "AFTER"),
        help="tools/eval_demo_qa.py --json outputs of the model before and after chat tuning",
    )
    args = ap.parse_args(argv)
    sys.stdout.write(render(args.model_dir, args.gguf, tuple(args.qa_eval) if args.qa_eval else None))
    return 0


if __name__ == "__main__":
    sys.exit(main())
