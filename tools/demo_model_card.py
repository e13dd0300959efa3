"""Render MODEL_CARD.md for the demo MoE from its train_log.json (issue 6). Dev-only.

  python tools/demo_model_card.py build/demo_hf > MODEL_CARD.md

Values not known yet (training still running, GGUF not converted) are written as TBD.
"""
from __future__ import annotations

import json
import os
import sys

SOURCES = {
    "prose": "Jane Austen's six novels (Debian `r-cran-janeaustenr`), one document per chapter",
    "technical": "Python 3.11 documentation reST sources (Debian `python3.11-doc`), one document per file",
    "code_python": "the CPython 3.11 standard library `.py` files (tests excluded), one document per file",
    "code_go": "the Go 1.19 standard library (Debian `golang-1.19-src`, no tests/testdata), one document per file",
}


def fmt(x, spec=".3f", none="TBD"):
    return none if x is None else format(x, spec)


def render(model_dir: str, gguf: str | None = None) -> str:
    log = json.load(open(os.path.join(model_dir, "train_log.json")))
    c = log["config"]
    final = log.get("final")
    last = log["evals"][-1] if log["evals"] else None
    val = final["val_loss"] if final else None
    srp = log.get("srp")
    uni = log["unigram_baseline"]
    domains = list(uni)
    mb = 1e6
    L = []
    w = L.append
    w("# moelite demo MoE\n")
    w("A toy Mixture-of-Experts language model trained from scratch on one CPU thread, shipped with moelite "
      "so that every feature (expert cache, prefetch, routing analysis, chat) can be tried without "
      "downloading anything. **It writes domain-flavoured text (Austen-like prose, Python-docs-like reST, "
      "Python and Go-like code); it is not an assistant.** Its chat template is ChatML so the chat path "
      "runs end to end, but it was never trained on conversations and will not follow instructions.\n")
    w("## Model\n")
    w("| | |\n|---|---|")
    w(f"| architecture | `qwen3moe` (transformers `Qwen3MoeForCausalLM`), all layers MoE, no shared expert |")
    w(f"| layers / hidden / heads (kv) / head_dim | {c['layers']} / {c['hidden']} / "
      f"{c['hidden'] // c['head_dim']} ({c['kv_heads']}) / {c['head_dim']} |")
    w(f"| routed experts / top-k / expert FFN | {c['experts']} / {c['top_k']} (norm_topk_prob) / {c['expert_ffn']} |")
    w(f"| vocabulary | {log['vocab_size']} byte-level BPE, Qwen2 pre-tokenizer split, "
      "`<|endoftext|>` `<|im_start|>` `<|im_end|>` |")
    w(f"| parameters | {log['params']/1e6:.2f} M total, {log['expert_params']/1e6:.2f} M in experts, "
      f"{log['active_params']/1e6:.2f} M active per token; embeddings tied |")
    w(f"| training context | {c['seq_len']} tokens (RoPE theta 10000; longer prompts are out of distribution) |")
    if gguf and os.path.exists(gguf):
        from moelite._core import read_gguf, type_name
        types = sorted({type_name(t[1]) for t in read_gguf(gguf)["tensors"]})
        w(f"| shipped GGUF | `src/moelite/data/{os.path.basename(gguf)}`, {os.path.getsize(gguf) / 1e6:.1f} MB "
          f"({', '.join(types)}), written by `moelite convert` |")
    else:
        w("| shipped GGUF | TBD: type and size in MB, filled in after `moelite convert` |")
    w("")
    w("## Training data\n")
    w("Free text from Debian packages (`apt-get download` + `dpkg-deb -x`, see `tools/train_demo.py`). "
      "Held-out text is split **by document** (hash of the document name), never by line.\n")
    w("| domain | source | train MB | val MB | train tokens |")
    w("|---|---|---|---|---|")
    for d in domains:
        b = log["corpus_bytes"][d]
        w(f"| {d} | {SOURCES.get(d, d)} | {b['train']/mb:.2f} | {b['val']/mb:.2f} | "
          f"{log['tokens_per_domain']['train'][d]:,} |")
    w("")
    w("## Training\n")
    w(f"- AdamW (betas 0.9/0.95, weight decay {c['weight_decay']}), peak LR {c['lr']}, {c['warmup_steps']} "
      f"warmup steps, cosine to {c['min_lr_frac']}x over the wall-clock budget; batch {c['batch_size']} x "
      f"{c['seq_len']} tokens; gradient clip 1.0; load-balancing aux loss coefficient {c['aux_coef']}; seed {c['seed']}.")
    w(f"- {c['threads']} CPU thread, budget {c['budget_minutes']:.0f} min, torch {log.get('torch', '?')}, "
      f"experts computed with transformers' `{c['experts_impl']}` implementation.")
    if final:
        w(f"- Steps: {final['step']:,}; training tokens seen: {final['tokens_seen']:,} "
          f"({final['tokens_seen'] / sum(log['tokens_per_domain']['train'].values()):.2f} epochs); "
          f"wall time {final['train_wall_s']/60:.1f} min.")
    else:
        w(f"- Steps / tokens / wall time: TBD (training in progress; last eval at step "
          f"{last['step'] if last else 0}).")
    w("")
    w("## Held-out loss (nats/token) vs the unigram baseline\n")
    w("The unigram baseline is the cross-entropy of the (add-one) unigram distribution of the training "
      "tokens, scored on the same held-out tokens. Lower is better.\n")
    w("| domain | val tokens | model | unigram baseline | model perplexity |")
    w("|---|---|---|---|---|")
    import math
    for d in domains:
        v = val[d] if val else None
        w(f"| {d} | {log['val_tokens_per_domain'][d]:,} | {fmt(v)} | {uni[d]:.3f} | "
          f"{fmt(math.exp(v) if v is not None else None, '.1f')} |")
    w("")
    w("## Routing consistency\n")
    w("Model-level SRP at m = 16 (definition: `shared/ROUTING_METRICS.md`; computed by "
      "`tools/demo_routing_srp.py` from the HF router logits on held-out text, all layers pooled).\n")
    if srp:
        w(f"- SRP(16) = **{srp['srp']:.4f}** (best alpha {srp['alpha']}, rho_hat {srp['rho_hat']:.2f}) against the "
          f"alpha = 0 floor 2r/(1+r) = {srp['floor']:.4f} (r = k/E = {srp['k']}/{srp['n_expert']}); "
          f"{srp['windows']:,} windows.")
        w("- Per layer: " + ", ".join(f"{x:.3f}" for x in srp["per_layer"]) + ".")
        w("- Per domain: " + ", ".join(f"{d} {x:.3f}" for d, x in srp["per_domain"].items()) + ".")
        w("- For scale, the paper's model-level SRP(16): Qwen3-30B-A3B 0.541, OLMoE 0.509, "
          "Mixtral-8x7B 0.494, DeepSeek-V2-Lite 0.379. A 22 M toy with 16 experts is not comparable in "
          "kind; the number says how cache-friendly this model's routing is, nothing about quality.")
    else:
        w("- SRP(16) = TBD against the floor 2r/(1+r) = "
          f"{2 * c['top_k'] / c['experts'] / (1 + c['top_k'] / c['experts']):.4f}.")
    w("")
    w("## Reproduce\n")
    w("```\npython tools/train_demo.py --fetch --out build/demo_hf "
      f"--budget-minutes {c['budget_minutes']:.0f} --threads {c['threads']}\n"
      "python tools/demo_model_card.py build/demo_hf > MODEL_CARD.md\n```\n")
    w("The data order depends only on (seed, step); the learning-rate schedule follows the wall clock, so a "
      "rerun on another machine sees a different number of steps. Pass `--max-steps N` for a step-based, "
      "fully reproducible schedule.\n")
    w("## Limitations\n")
    w("- Tiny and briefly trained: fluent-looking fragments, no facts, no reasoning, frequent repetition.")
    w("- English prose is 19th-century Austen; technical text is Python documentation; code is "
      "Python and Go standard library. Anything else is out of distribution.")
    w("- Licences of the sources: Austen (public domain), Python documentation and standard library (PSF "
      "licence), Go (BSD-style). The model is shipped for testing moelite only.")
    return "\n".join(L) + "\n"


if __name__ == "__main__":
    args = sys.argv[1:]
    gguf = args[args.index("--gguf") + 1] if "--gguf" in args else None
    args = [a for i, a in enumerate(args) if a != "--gguf" and (i == 0 or args[i - 1] != "--gguf")]
    sys.stdout.write(render(args[0] if args else "build/demo_hf", gguf))
