"""bench/BENCH_MODEL.md: the card of the bench MoE (tools/train_bench_moe.py, issue 16).

Routing is measured through moelite on the bench's own GGUF (q4_k_m), on held-out text of every domain (the
training run's held-out documents, split by document hash), 256-token sequences (the training context), each
in a fresh context. Metrics as cache_policies/metrics.py defines them:
SRP(16) per layer against its floor 2r/(1+r), r = k/E, and SCH(16, 2) per layer against the same trace with
its tokens shuffled inside each sequence (same expert popularity, no locality): the floor SCH has to beat.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

SEQ = 256  # the training context
SEQS_PER_DOMAIN = 16


def heldout_sequences(corpus_dir: Path) -> dict[str, np.ndarray]:
    """{domain: [n, SEQ]} from the held-out token stream the training run evaluated on (demo tokenizer)."""
    with np.load(corpus_dir / "tokens_gguf_demo_8192.npz") as z:
        out = {}
        for key in sorted(z.files):
            split, domain = key.split("/")
            if split == "val":
                arr = z[key].astype(np.int64)
                n = min(SEQS_PER_DOMAIN, len(arr) // SEQ)
                out[domain] = arr[: n * SEQ].reshape(n, SEQ)
        return out


def record(gguf: Path, seqs: dict[str, np.ndarray]):
    import moelite

    with moelite.load(str(gguf), record_trace=True, prefetch=False, n_ctx=SEQ) as m:
        for domain in seqs:
            for row in seqs[domain]:
                m.logits(row.tolist())  # fresh context: one trace sequence per row
        return m.trace()


def shuffled(trace, within: bool = True, seed: int = 0):
    """The same routing rows in a random order, inside each sequence (the sequence's expert popularity kept,
    token-to-token locality removed) or across all sequences (only the global popularity kept)."""
    from moelite.cache_policies import Trace

    rng = np.random.default_rng(seed)
    ids = trace.ids.copy()
    spans = zip(trace.offsets[:-1], trace.offsets[1:]) if within else [(0, len(ids))]
    for a, b in spans:
        ids[a:b] = ids[a:b][rng.permutation(b - a)]
    return Trace(ids=ids, n_expert=trace.n_expert, offsets=trace.offsets)


def routing_metrics(trace) -> dict:
    from moelite.cache_policies import sch, srp

    r = trace.k / trace.n_expert
    flat, glob = shuffled(trace), shuffled(trace, within=False)
    return {
        "srp": srp(trace, 16).value,
        "srp_layer": srp(trace, 16, "layer").value.tolist(),
        "srp_floor": 2 * r / (1 + r),
        "srp_shuffled_layer": srp(flat, 16, "layer").value.tolist(),
        "sch": sch(trace, 16, 2.0),
        "sch_layer": sch(trace, 16, 2.0, "layer").tolist(),
        "srp_global_shuffled": srp(glob, 16).value,
        "sch_shuffled": sch(flat, 16, 2.0),
        "sch_shuffled_layer": sch(flat, 16, 2.0, "layer").tolist(),
        "sch_global_shuffled": sch(glob, 16, 2.0),
        "tokens": int(trace.ids.shape[0]),
        "k": trace.k,
        "n_expert": trace.n_expert,
    }


def gguf_shares(gguf: Path) -> dict:
    import gguf as gg

    r = gg.GGUFReader(str(gguf))
    expert = sum(int(t.n_bytes) for t in r.tensors if "_exps." in t.name)
    total = gguf.stat().st_size
    return {"file_bytes": total, "expert_bytes": expert, "types": sorted({t.tensor_type.name for t in r.tensors})}


def write_card(cache: Path, gguf: Path, card: Path, corpus_dir: Path | None = None) -> dict:
    log = json.loads((cache / "hf" / "train_log.json").read_text())
    cfg = log["config"]
    corpus_dir = Path(corpus_dir or cfg["corpus_dir"])
    metrics_path = cache / "routing_metrics.json"
    if metrics_path.exists():
        met = json.loads(metrics_path.read_text())
    else:
        met = routing_metrics(record(gguf, heldout_sequences(corpus_dir)))
        metrics_path.write_text(json.dumps(met, indent=1))
    sizes = gguf_shares(gguf)
    first, last = log["evals"][0], log["evals"][-1]
    uni = log["unigram_baseline"]
    domains = list(last["val_loss"])
    lines = [
        "# The bench MoE (learned routing)",
        "",
        "Built by `python tools/train_bench_moe.py` (issue 16; cached under `bench/out/bench_moe/`, never committed) "
        "so that the capped benchmarks run on routing a trained model produces. It is a benchmark object, not a "
        "useful language model: the point is its shape and its routing.",
        "",
        "## Shape (Qwen3-30B-A3B's proportions at small scale)",
        "",
        "| | bench MoE | Qwen3-30B-A3B |",
        "|---|---|---|",
        f"| layers / n_embd | {cfg['layers']} / {cfg['hidden']} | 48 / 2048 |",
        f"| heads (kv) x head_dim | {cfg['hidden'] // cfg['head_dim']} ({cfg['kv_heads']}) x {cfg['head_dim']} | 32 (4) x 128 |",
        f"| routed experts / top-k (k/E) | {cfg['experts']} / {cfg['top_k']} (1/{cfg['experts'] // cfg['top_k']}) | 128 / 8 (1/16) |",
        f"| expert FFN | {cfg['expert_ffn']} | 768 |",
        f"| parameters (in experts, active) | {log['params'] / 1e6:.1f} M ({log['expert_params'] / 1e6:.1f} M, "
        f"{log['active_params'] / 1e6:.1f} M) | 30.5 B (~29 B, 3.3 B) |",
        f"| GGUF (`{gguf.name}`) | {sizes['file_bytes'] / 1e6:.1f} MB, routed experts "
        f"{100 * sizes['expert_bytes'] / sizes['file_bytes']:.1f} % of the bytes | |",
        "",
        "## Training",
        "",
        f"- Sparse upcycling of the shipped demo model (16 experts x 256): expert j starts as demo expert j % 16 "
        f"(+1 % noise), widened to {cfg['expert_ffn']} with a zero-initialised second half; router rows copied with "
        "30 % noise (`tools/train_demo.py` `upcycle_state_dict`). Then continued training on the demo's corpora "
        "(Austen prose, Python docs, Python and Go code; held-out text split by document).",
        f"- AdamW, peak LR {cfg['lr']}, {cfg['warmup_steps']} warmup steps, cosine to {cfg['min_lr_frac']}x over "
        f"{cfg['max_steps']} steps of {cfg['batch_size']} x {cfg['seq_len']} tokens, aux loss {cfg['aux_coef']}, "
        f"seed {cfg['seed']}, {cfg['threads']} CPU thread(s), {log['torch']}.",
        f"- Tokens seen: {log['final']['tokens_seen']:,}; wall time {log['final']['train_wall_s'] / 60:.1f} min.",
        "",
        "## Held-out loss (nats/token)",
        "",
        "| held-out set | after upcycling (step 0) | after training | unigram baseline |",
        "|---|---|---|---|",
        *[f"| {d} | {first['val_loss'][d]:.3f} | {last['val_loss'][d]:.3f} | {uni[d]:.3f} |" for d in domains],
        "",
        "## Routing on held-out text (through moelite, on the GGUF)",
        "",
        f"{met['tokens']:,} tokens: {SEQS_PER_DOMAIN} sequences of {SEQ} tokens per domain, fresh context each. "
        f"SRP(16) floor = 2r/(1+r) with r = k/E = {met['k']}/{met['n_expert']}: {met['srp_floor']:.4f}. The SCH "
        "floors are the same metrics on the same trace with its tokens shuffled: inside each sequence (the "
        "sequence's expert popularity kept, token-to-token locality removed) and across all sequences (only the "
        "global popularity kept). Routing that beats the inside-sequence shuffle has short-range locality a "
        "window-based cache can use; the gap to the across-sequence shuffle is topic locality.",
        "",
        f"Model level: SRP(16) = **{met['srp']:.4f}** (floor {met['srp_floor']:.4f}; shuffled inside sequences "
        f"{np.mean(met['srp_shuffled_layer']):.4f} as the mean of layers, across sequences "
        f"{met['srp_global_shuffled']:.4f}); SCH(16, 2) = **{met['sch']:.4f}** (shuffled inside sequences "
        f"{met['sch_shuffled']:.4f}, across sequences {met['sch_global_shuffled']:.4f}).",
        "",
        "| layer | SRP(16) | SRP(16) shuffled | SCH(16, 2) | SCH(16, 2) shuffled |",
        "|---|---|---|---|---|",
        *[
            f"| {i} | {a:.4f} | {b:.4f} | {c:.4f} | {d:.4f} |"
            for i, (a, b, c, d) in enumerate(
                zip(met["srp_layer"], met["srp_shuffled_layer"], met["sch_layer"], met["sch_shuffled_layer"])
            )
        ],
        "",
    ]
    card.write_text("\n".join(lines))
    return met
