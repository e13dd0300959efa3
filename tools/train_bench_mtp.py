"""Build the MTP bench model (issue 31): the bench MoE's proportions in the GLM-4.5 format (glm4_moe) with one
MTP block trained jointly, so that speculative="mtp" acceptance is measured on a trained model.

Dev/bench-only (torch, transformers): never imported by the runtime.

    python tools/train_bench_mtp.py                 # ~70 min on 1 CPU thread; resumable (--resume)
    python tools/train_bench_mtp.py --eval-only     # only the held-out evaluation of the saved checkpoint
    python tools/train_bench_mtp.py --card-only     # rewrite bench/BENCH_MTP_MODEL.md from the cached outputs

Shape (tools/train_bench_moe.py's SHAPE): 6 layers, n_embd 256, 4 heads (2 kv) x 64, 128 routed experts, top-8,
expert FFN 512, all layers MoE, the demo's 8192-token vocabulary; GLM-4.5's MoE: sigmoid router scores, selection
on score + e_score_correction_bias (an aux-loss-free balancer moves it: +-1e-3 per step toward equal load),
renormalised top-8 weights, one shared expert (FFN 512); q/k norm, full NeoX RoPE (partial_rotary_factor 1.0).

The MTP block (one, as GLM-4.5 releases store it at model.layers.{n_layer}): the row of position i is
    x_i = eh_proj [enorm(embed(t_{i+1})) ; hnorm(h_i)]      h_i: the trunk's output-normed state (csrc/mtp.cpp)
then one Glm4Moe decoder layer (causal over the rows), shared_head.norm, and the model's tied head; it predicts
t_{i+2}. Loss = trunk CE + MTP_WEIGHT x MTP CE (DeepSeek-V3's 0.3).

How it is trained:
  1. the trunk is upcycled from the shipped demo model exactly as the bench MoE is (tools/train_demo.py
     gguf_state_dict + upcycle_state_dict; Qwen3-MoE and GLM-4.5 name attention, norms, router and experts the
     same); the shared expert starts with a zero down projection, the correction bias at zero; the MTP layer
     starts as a copy of the trunk's last layer, eh_proj as [N(0, 0.02) | identity] (the h half passes through);
  2. continued training on the demo's corpora, batches depending on (seed, step) only, checkpoints every
     10 min (--resume);
  3. HF checkpoint (save_pretrained, num_hidden_layers 6) + the MTP tensors under model.layers.6.* and
     num_nextn_predict_layers 1 in config.json, as GLM-4.5 checkpoints store them; then
     `moelite convert --type q4_k_m` -> bench/out/bench_mtp/bench-mtp-q4_k_m.gguf;
  4. held-out evaluation: trunk CE, MTP CE, MTP top-1 accuracy against the text (t_{i+2}) and agreement with the
     trunk's own greedy choice at i+1 given t_{i+1} (the acceptance a greedy first draft reaches) -> train_log.json.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
import train_bench_moe as bench_moe  # noqa: E402
import train_demo as td  # noqa: E402

CACHE = ROOT / "bench" / "out" / "bench_mtp"
QUANT = "q4_k_m"
MTP_WEIGHT = 0.3
BIAS_RATE = 1e-3  # aux-loss-free balancing: the correction bias step per training step (DeepSeek-V3's gamma)
DEFAULT_STEPS = 200
CARD = ROOT / "bench" / "BENCH_MTP_MODEL.md"


def gguf_path(cache: Path = CACHE) -> Path:
    return cache / f"bench-mtp-{QUANT}.gguf"


def parse(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", type=Path, default=CACHE)
    ap.add_argument("--corpus-dir", type=Path, default=ROOT / "build" / "demo_corpus")
    ap.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    ap.add_argument("--eval-only", action="store_true", help="evaluate the last checkpoint, no training")
    ap.add_argument("--no-convert", action="store_true")
    ap.add_argument("--card-only", action="store_true", help="only rewrite the card from the cached outputs")
    ap.add_argument("--eval-tokens", type=int, default=16384, help="held-out tokens per domain")
    ap.add_argument("--ckpt-every-minutes", type=float, default=10.0)
    # the bench MoE's shape and schedule (tools/train_bench_moe.py), parsed with the names train_demo uses
    for name, typ in [
        ("--layers", int),
        ("--hidden", int),
        ("--head-dim", int),
        ("--kv-heads", int),
        ("--experts", int),
        ("--top-k", int),
        ("--expert-ffn", int),
        ("--seq-len", int),
        ("--batch-size", int),
        ("--lr", float),
        ("--warmup-steps", int),
        ("--min-lr-frac", float),
        ("--aux-coef", float),
        ("--seed", int),
    ]:
        ap.add_argument(name, type=typ)
    a = ap.parse_args([*bench_moe.SHAPE, *bench_moe.SCHEDULE, *(argv if argv is not None else sys.argv[1:])])
    a.max_steps, a.weight_decay, a.vocab_size, a.experts_impl = a.steps, 0.1, 8192, "grouped_mm"
    a.init_gguf, a.fetch, a.max_domain_mb, a.val_percent = str(bench_moe.DEMO), True, 6.0, 4
    a.raw_dir = str(a.corpus_dir / "raw")
    a.corpus_dir = str(a.corpus_dir)
    return a


def make_model(a, vocab: int, eot: int, im_end: int):
    """Glm4MoeForCausalLM trunk + the MTP block (a Glm4MoeDecoderLayer with eh_proj / enorm / hnorm /
    shared_head.norm, so its state dict keys are the release checkpoint's names under model.layers.{n})."""
    import torch
    from transformers import Glm4MoeConfig, Glm4MoeForCausalLM
    from transformers.models.glm4_moe.modeling_glm4_moe import Glm4MoeDecoderLayer, Glm4MoeRMSNorm

    config = Glm4MoeConfig(
        vocab_size=vocab,
        hidden_size=a.hidden,
        num_hidden_layers=a.layers,
        num_attention_heads=a.hidden // a.head_dim,
        num_key_value_heads=a.kv_heads,
        intermediate_size=a.expert_ffn * a.top_k,  # unused: all layers MoE
        moe_intermediate_size=a.expert_ffn,
        n_routed_experts=a.experts,
        num_experts_per_tok=a.top_k,
        n_shared_experts=1,
        first_k_dense_replace=0,
        routed_scaling_factor=1.0,
        n_group=1,
        topk_group=1,
        norm_topk_prob=True,
        use_qk_norm=True,
        attention_bias=False,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 1.0},
        max_position_embeddings=4096,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        bos_token_id=eot,
        eos_token_id=im_end,
        pad_token_id=eot,
        initializer_range=0.02,
    )
    assert config.hidden_size // config.num_attention_heads == a.head_dim

    class MtpBlock(Glm4MoeDecoderLayer):
        def __init__(self):
            super().__init__(config, layer_idx=a.layers)
            h = config.hidden_size
            self.eh_proj = torch.nn.Linear(2 * h, h, bias=False)
            self.enorm = Glm4MoeRMSNorm(h, eps=config.rms_norm_eps)
            self.hnorm = Glm4MoeRMSNorm(h, eps=config.rms_norm_eps)
            self.shared_head = torch.nn.Module()
            self.shared_head.norm = Glm4MoeRMSNorm(h, eps=config.rms_norm_eps)

    class WithMtp(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lm = Glm4MoeForCausalLM(config)
            self.mtp = MtpBlock()

        def forward(self, x):
            """x [B, S + 1] -> (trunk CE over S targets, MTP CE over S - 1, and their logits)."""
            ce = torch.nn.functional.cross_entropy
            inp = x[:, :-1]
            h = self.lm.model(input_ids=inp).last_hidden_state  # output-normed, [B, S, H]
            logits = self.lm.lm_head(h)
            trunk = ce(logits.flatten(0, 1).float(), x[:, 1:].flatten())
            m = self.mtp
            e = self.lm.model.embed_tokens(x[:, 1:-1])  # t_{i+1} for rows i = 0 .. S-2
            rows = m.eh_proj(torch.cat([m.enorm(e), m.hnorm(h[:, :-1])], -1))
            t = rows.shape[1]
            pos = torch.arange(t)[None]
            mask = torch.full((t, t), float("-inf")).triu(1)[None, None]
            y = m(rows, attention_mask=mask, position_ids=pos, position_embeddings=self.lm.model.rotary_emb(rows, pos))
            mlogits = self.lm.lm_head(m.shared_head.norm(y))
            mtp = ce(mlogits.flatten(0, 1).float(), x[:, 2:].flatten())
            return trunk, mtp, logits, mlogits

    torch.manual_seed(a.seed)
    model = WithMtp()
    td.set_experts_impl(model.lm, a.experts_impl)
    rot = model.lm.model.rotary_emb.inv_freq.numel() * 2
    assert rot == a.head_dim, f"rotary dims {rot} != head_dim {a.head_dim}: partial_rotary_factor not 1.0"
    return model


def init_weights(model, a) -> None:
    """Trunk upcycled from the demo (as the bench MoE is); shared experts add nothing at first; the MTP layer a
    copy of the trunk's last layer; eh_proj passes the trunk state through."""
    import torch

    sd = td.upcycle_state_dict(td.gguf_state_dict(a.init_gguf, a.layers), a.layers, a.experts, a.expert_ffn, a.seed)
    missing, unexpected = model.lm.load_state_dict(sd, strict=False)
    expected = (".mlp.shared_experts.", ".mlp.gate.e_score_correction_bias")
    assert not unexpected and all(any(s in k for s in expected) for k in missing), (missing, unexpected)
    with torch.no_grad():
        for layer in model.lm.model.layers:
            layer.mlp.shared_experts.down_proj.weight.zero_()
        m = model.mtp
        m.load_state_dict(model.lm.model.layers[-1].state_dict(), strict=False)
        h = a.hidden
        g = torch.Generator().manual_seed(a.seed + 1)
        m.eh_proj.weight[:, :h] = 0.02 * torch.randn(h, h, generator=g)
        m.eh_proj.weight[:, h:] = torch.eye(h)


def routers(model):
    return [layer.mlp.gate for layer in model.lm.model.layers] + [model.mtp.mlp.gate]


def balance(model, loads: list) -> None:
    """Aux-loss-free balancing: each layer's correction bias moves BIAS_RATE toward equal expert load."""
    import torch

    with torch.no_grad():
        for gate, counts in zip(routers(model), loads):
            gate.e_score_correction_bias += BIAS_RATE * torch.sign(counts.float().mean() - counts.float())


def evaluate(model, val: dict[str, np.ndarray], batch: int = 8) -> dict:
    """Per domain: trunk CE, MTP CE, MTP top-1 vs the text (t_{i+2}) and vs the trunk's greedy token at i+1."""
    import torch

    model.eval()
    out = {}
    with torch.no_grad():
        for domain, windows in val.items():
            s = {"trunk": 0.0, "mtp": 0.0, "top1_text": 0, "top1_trunk": 0, "n": 0, "n_mtp": 0}
            for i in range(0, len(windows), batch):
                x = torch.from_numpy(windows[i : i + batch])
                trunk, mtp, logits, mlogits = model(x)
                n, n_mtp = x[:, 1:].numel(), x[:, 2:].numel()
                s["trunk"] += trunk.item() * n
                s["mtp"] += mtp.item() * n_mtp
                draft = mlogits.argmax(-1)  # [B, S-1]: row i's guess at t_{i+2}
                s["top1_text"] += int((draft == x[:, 2:]).sum())
                s["top1_trunk"] += int((draft == logits[:, 1:].argmax(-1)).sum())
                s["n"], s["n_mtp"] = s["n"] + n, s["n_mtp"] + n_mtp
            out[domain] = {
                "trunk_loss": s["trunk"] / s["n"],
                "mtp_loss": s["mtp"] / s["n_mtp"],
                "mtp_top1_text": s["top1_text"] / s["n_mtp"],
                "mtp_top1_trunk_greedy": s["top1_trunk"] / s["n_mtp"],
            }
    model.train()
    return out


def save(model, a, tok, hf: Path) -> None:
    """save_pretrained for the trunk, the MTP block's tensors added as model.layers.{n}.*, and
    num_nextn_predict_layers 1 in config.json."""
    from safetensors.torch import load_file, save_file

    td.save_hf(a, model.lm, tok, str(hf))
    files = sorted(hf.glob("*.safetensors"))
    if len(files) != 1:
        raise SystemExit(f"expected one safetensors file in {hf}, found {len(files)}")
    tensors = load_file(files[0])
    prefix = f"model.layers.{a.layers}."
    for k, v in model.mtp.state_dict().items():
        if k == "mlp.experts.gate_up_proj":  # per expert, as save_pretrained writes the trunk's (and releases do)
            f = v.shape[1] // 2
            for e in range(v.shape[0]):
                tensors[f"{prefix}mlp.experts.{e}.gate_proj.weight"] = v[e, :f].contiguous()
                tensors[f"{prefix}mlp.experts.{e}.up_proj.weight"] = v[e, f:].contiguous()
        elif k == "mlp.experts.down_proj":
            for e in range(v.shape[0]):
                tensors[f"{prefix}mlp.experts.{e}.down_proj.weight"] = v[e].contiguous()
        else:
            tensors[prefix + k] = v.detach().contiguous()
    save_file(tensors, files[0], metadata={"format": "pt"})
    cfg_path = hf / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["num_nextn_predict_layers"] = 1
    cfg_path.write_text(json.dumps(cfg, indent=2))


def trunk_only_losses() -> dict[str, float]:
    """The Qwen3-MoE bench model's held-out losses after training, from its card (bench/BENCH_MODEL.md: the same
    held-out windows, 16,384 tokens per domain)."""
    text = bench_moe.CARD.read_text() if bench_moe.CARD.exists() else ""
    rows = re.findall(r"(?m)^\| (\w+) \| [\d.]+ \| ([\d.]+) \| [\d.]+ \|$", text)
    return {d: float(v) for d, v in rows}


def write_card(cache: Path = CACHE, card: Path = CARD) -> None:
    log = json.loads((cache / "hf" / "train_log.json").read_text())
    gguf = gguf_path(cache)
    cfg = {k: v for k, v in log["config"].items()}
    ref = trunk_only_losses()
    ev, mean = log["heldout"], log["heldout_mean"]
    lines = [
        "# The MTP bench model (GLM-4.5 format, one MTP block)",
        "",
        "Built by `python tools/train_bench_mtp.py` (issue 31; cached under `bench/out/bench_mtp/`, never "
        'committed) so that MTP drafting (`speculative="mtp"`) is measured on a trained MTP block. The bench MoE '
        "(bench/BENCH_MODEL.md) is a Qwen3-MoE, a family without an MTP format; this one has its proportions in the "
        "GLM-4.5 format (`glm4_moe`, GGUF arch `glm4moe`), whose releases carry an MTP block. A benchmark object, "
        "not a useful language model. Card written by `python tools/train_bench_mtp.py --card-only` from the "
        "run's `train_log.json`.",
        "",
        "## Shape",
        "",
        f"- {cfg['layers']} layers, n_embd {cfg['hidden']}, {int(cfg['hidden']) // int(cfg['head_dim'])} heads "
        f"({cfg['kv_heads']} kv) x {cfg['head_dim']}, q/k norm, full NeoX RoPE; all layers MoE: {cfg['experts']} "
        f"routed experts top-{cfg['top_k']} of FFN {cfg['expert_ffn']}, sigmoid scores, selection on score + "
        "correction bias, renormalised weights, one shared expert (FFN 512); the demo's 8192-token vocabulary, tied "
        "embeddings.",
        f"- One MTP block at `model.layers.{cfg['layers']}` (GGUF `blk.{cfg['layers']}`, `nextn_predict_layers` 1): "
        "eh_proj / enorm / hnorm, one decoder layer of the trunk's kind (MoE), `shared_head.norm`, the tied head.",
        f"- {log['params'] / 1e6:.1f} M parameters, trunk and MTP block together"
        + (f"; GGUF `{gguf.name}` {gguf.stat().st_size / 1e6:.1f} MB." if gguf.exists() else "."),
        "",
        "## Training",
        "",
        "- Trunk upcycled from the shipped demo model exactly as the bench MoE is (`tools/train_demo.py` "
        "`upcycle_state_dict`); shared experts start with a zero down projection, the correction biases at zero; "
        "the MTP layer starts as a copy of the trunk's last layer, eh_proj as [N(0, 0.02) | identity].",
        f"- Loss: trunk CE + {log['mtp_weight']} x MTP CE (t_{{i+2}} from h_i and t_{{i+1}}). Aux-loss-free "
        f"balancing: each correction bias moves {log['bias_rate']:g} per step toward equal expert load.",
        f"- AdamW, peak LR {cfg['lr']}, {cfg['warmup_steps']} warmup steps, cosine to {cfg['min_lr_frac']}x over "
        f"{log['steps']} steps of {cfg['batch_size']} x {cfg['seq_len']} tokens, seed {cfg['seed']}, "
        f"{cfg['threads']} CPU thread(s), torch {log['torch']}.",
        f"- Tokens seen: {log['tokens_seen']:,}; training wall time {log['train_wall_s'] / 60:.1f} min.",
        "",
        "## Held-out evaluation (PyTorch, F32, before conversion)",
        "",
        f"{next(iter(log['eval_tokens_per_domain'].values())):,} tokens per domain (the first 256-token windows of "
        "the held-out documents, as the bench MoE's card). Trunk-only Qwen3 bench MoE: its card's loss after "
        "training (200 steps, same windows). MTP top-1: the block's argmax at row i (h_i, t_{i+1}) against the "
        "text's t_{i+2}, and against the trunk's own greedy token after t_{i+1}, which is what greedy verification "
        "accepts as a first draft.",
        "",
        "| held-out set | trunk loss | trunk-only bench MoE | MTP loss | MTP top-1 vs text | MTP top-1 vs trunk greedy |",
        "|---|---|---|---|---|---|",
    ]
    for d, r in ev.items():
        lines.append(
            f"| {d} | {r['trunk_loss']:.3f} | {ref[d]:.3f} | {r['mtp_loss']:.3f} | {r['mtp_top1_text']:.3f} | "
            f"{r['mtp_top1_trunk_greedy']:.3f} |"
            if d in ref
            else f"| {d} | {r['trunk_loss']:.3f} | - | {r['mtp_loss']:.3f} | {r['mtp_top1_text']:.3f} | "
            f"{r['mtp_top1_trunk_greedy']:.3f} |"
        )
    ref_mean = f"{sum(ref.values()) / len(ref):.3f}" if ref else "-"
    lines += [
        f"| mean | {mean['trunk_loss']:.3f} | {ref_mean} | {mean['mtp_loss']:.3f} | {mean['mtp_top1_text']:.3f} | "
        f"{mean['mtp_top1_trunk_greedy']:.3f} |",
        "",
        "Decode speed with MTP drafts, resident and capped: bench/SPECULATIVE.md (`bench-mtp-q4_k_m.gguf`).",
    ]
    card.write_text("\n".join(lines) + "\n")


def main(argv=None) -> int:
    a = parse(argv)
    if a.card_only:
        write_card(a.cache)
        return 0
    import torch

    torch.set_num_threads(a.threads)
    np.random.seed(a.seed)
    torch.manual_seed(a.seed)
    hf, ckpt_dir = a.cache / "hf", a.cache / "ckpt"
    ckpt = ckpt_dir / "ckpt.pt"
    corpus = td.build_corpus(a)
    tok = td.train_tokenizer(a, corpus)
    tokens = td.tokenize_corpus(a, corpus, tok)
    domains = [d for d in td.DOMAINS if d in tokens["train"] and d in tokens["val"]]
    val = {d: td.val_windows(tokens["val"][d], a.seq_len, a.eval_tokens) for d in domains}
    train = np.concatenate([tokens["train"][d] for d in domains])
    starts_max = len(train) - a.seq_len - 1
    model = make_model(a, tok.get_vocab_size(), tok.token_to_id("<|endoftext|>"), tok.token_to_id("<|im_end|>"))
    init_weights(model, a)
    n_params = sum(p.numel() for p in model.parameters())
    td.log(f"model: {n_params / 1e6:.1f} M parameters (trunk + MTP block)")
    opt = td.adamw(model, a)
    state = {"step": 0, "elapsed": 0.0, "train_loss": []}
    if (a.resume or a.eval_only) and ckpt.exists():
        saved = torch.load(ckpt, weights_only=False)
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["opt"])
        state = saved["state"]
        td.log(f"resumed at step {state['step']}, {state['elapsed'] / 60:.1f} min used")

    loads: list = []

    def count(_module, _inp, output):  # router forward -> (logits, weights, indices)
        loads.append(torch.bincount(output[2].flatten(), minlength=a.experts))

    hooks = [g.register_forward_hook(count) for g in routers(model)]
    t0 = time.time()

    def checkpoint():
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        state["elapsed"] = state.get("elapsed_before", state["elapsed"]) + time.time() - t0
        td.save_ckpt(str(ckpt), {"model": model.state_dict(), "opt": opt.state_dict(), "state": state})

    state["elapsed_before"] = state["elapsed"]
    last_ckpt, acc, t_log = time.time(), [0.0, 0.0, 0], time.time()
    model.train()
    while not a.eval_only and state["step"] < a.steps:
        step = state["step"]
        lr = td.lr_at(a, step, step / a.steps)
        for grp in opt.param_groups:
            grp["lr"] = lr
        x = torch.from_numpy(
            td.sample_batch(train, starts_max, a.seq_len, a.batch_size, np.random.default_rng([a.seed, step]))
        )
        loads.clear()
        trunk, mtp, _, _ = model(x)
        (trunk + MTP_WEIGHT * mtp).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        balance(model, loads)
        state["step"] += 1
        acc = [acc[0] + trunk.item(), acc[1] + mtp.item(), acc[2] + 1]
        if state["step"] % 5 == 0 or state["step"] == a.steps:
            per = (time.time() - t_log) / acc[2]
            row = {"step": state["step"], "trunk": acc[0] / acc[2], "mtp": acc[1] / acc[2], "lr": lr, "s_per_step": per}
            state["train_loss"].append(row)
            td.log(
                f"step {state['step']}/{a.steps} trunk {row['trunk']:.3f} mtp {row['mtp']:.3f} lr {lr:.2e} "
                f"{per:.1f} s/step, ETA {(a.steps - state['step']) * per / 60:.1f} min"
            )
            acc, t_log = [0.0, 0.0, 0], time.time()
        if time.time() - last_ckpt > a.ckpt_every_minutes * 60:
            checkpoint()
            last_ckpt = time.time()
    for hk in hooks:
        hk.remove()
    if not a.eval_only:
        checkpoint()
    t_eval = time.time()
    ev = evaluate(model, val)
    td.log("held-out: " + json.dumps({d: {k: round(v, 4) for k, v in r.items()} for d, r in ev.items()}))
    mean = {k: float(np.mean([r[k] for r in ev.values()])) for k in next(iter(ev.values()))}
    hf.mkdir(parents=True, exist_ok=True)
    save(model, a, tok, hf)
    log = {
        "config": {k: str(v) for k, v in vars(a).items()},
        "params": n_params,
        "mtp_weight": MTP_WEIGHT,
        "bias_rate": BIAS_RATE,
        "steps": state["step"],
        "tokens_seen": state["step"] * a.batch_size * a.seq_len,
        "train_wall_s": round(state["elapsed"], 1),
        "train_loss": state["train_loss"],
        "eval_tokens_per_domain": {d: int(val[d][:, 1:].size) for d in domains},
        "heldout": ev,
        "heldout_mean": mean,
        "eval_s": round(time.time() - t_eval, 1),
        "torch": torch.__version__,
    }
    (hf / "train_log.json").write_text(json.dumps(log, indent=1))
    td.log(f"saved {hf}; mean held-out " + ", ".join(f"{k} {v:.4f}" for k, v in mean.items()))
    if not a.no_convert:
        out = gguf_path(a.cache)
        if out.exists():
            out.unlink()
        bench_moe.convert(hf, out)
        td.log(f"converted -> {out}")
    if a.cache == CACHE:
        write_card(a.cache)
    return 0


if __name__ == "__main__":
    sys.exit(main())
