"""Model-level SRP(m) of the trained demo model, straight from its HF routing (issue 6, model card).

SRP as defined in cache_policies/metrics.py: for every layer l, expert e, sequence and stride-1
window of m tokens inside the sequence, f = tokens of the window whose top-k contains e. Pool all
(window, expert) pairs of all layers; SRP(m) = max over alpha in 0..m of
2 * sum f*[f>=alpha] / sum (m*[f>=alpha] + f). Floor (alpha = 0): 2r/(1+r), r = k/E.

Dev-only, self-contained (numpy + torch + transformers); never imported by the runtime.

  python tools/demo_routing_srp.py build/demo_hf [--corpus-dir build/demo_corpus] [--m 16]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np


def window_hist(topk: np.ndarray, n_expert: int, m: int) -> np.ndarray:
    """topk [T, k] ids of one sequence and layer -> histogram over f in 0..m of all (window, expert)."""
    T = topk.shape[0]
    if T < m:
        return np.zeros(m + 1, dtype=np.int64)
    onehot = np.zeros((T + 1, n_expert), dtype=np.int64)
    np.add.at(onehot, (np.repeat(np.arange(1, T + 1), topk.shape[1]), topk.reshape(-1)), 1)
    onehot = np.minimum(onehot, 1)  # an id listed twice in one row still counts once
    csum = np.cumsum(onehot, axis=0)  # [T+1, E], csum[t] = tokens < t using e
    f = csum[m:] - csum[:-m]  # [T-m+1, E] windows fully inside the sequence
    return np.bincount(f.reshape(-1), minlength=m + 1)


def srp_from_hist(hist: np.ndarray, m: int) -> dict:
    """Best threshold router over pooled (window, expert) pairs: SRP, its alpha, selected pairs."""
    f = np.arange(m + 1, dtype=np.float64)
    total_f = float((hist * f).sum())
    best = (-1.0, 0, 0.0)
    for alpha in range(m + 1):
        sel = f >= alpha
        num = 2.0 * float((hist * f * sel).sum())
        den = float((hist * m * sel).sum()) + total_f
        score = num / den if den > 0 else 0.0
        if score > best[0]:
            best = (score, alpha, float(hist[sel].sum()))
    return {"srp": best[0], "alpha": best[1], "selected_pairs": best[2]}


def routing_srp_report(
    model, windows: dict[str, np.ndarray], k: int, n_expert: int, m: int = 16, batch: int = 8
) -> dict:
    """windows: {domain: int array [n, T(+1)]} of held-out token sequences (each scored separately)."""
    import torch

    model.eval()
    hist_all = None
    per_layer: list[np.ndarray] = []
    per_domain = {}
    n_win_total = 0
    with torch.no_grad():
        for domain, w in windows.items():
            hist_dom = None
            for i in range(0, len(w), batch):
                x = torch.as_tensor(np.asarray(w[i : i + batch]), dtype=torch.long)
                out = model(input_ids=x, output_router_logits=True)
                B, T = x.shape
                for layer, logits in enumerate(out.router_logits):  # [B*T, E] per MoE layer
                    ids = torch.topk(logits.float(), k, dim=-1).indices.reshape(B, T, k).numpy()
                    h = sum(window_hist(ids[b], n_expert, m) for b in range(B))
                    while len(per_layer) <= layer:
                        per_layer.append(np.zeros(m + 1, dtype=np.int64))
                    per_layer[layer] += h
                    hist_dom = h if hist_dom is None else hist_dom + h
                n_win_total += B * max(0, T - m + 1)
            per_domain[domain] = hist_dom
            hist_all = hist_dom if hist_all is None else hist_all + hist_dom
    n_layers = len(per_layer)
    r = k / n_expert

    def summary(hist: np.ndarray, layers: int) -> dict:
        s = srp_from_hist(hist, m)
        windows_ = hist.sum() / n_expert / layers  # (window, expert) pairs / E / layers
        return {
            "srp": s["srp"],
            "alpha": s["alpha"],
            "rho_hat": s["selected_pairs"] / (k * windows_ * layers) if windows_ else 0.0,
        }

    top = summary(hist_all, n_layers)
    return {
        "m": m,
        "k": k,
        "n_expert": n_expert,
        "n_layers": n_layers,
        "windows": int(n_win_total),
        "srp": top["srp"],
        "alpha": top["alpha"],
        "rho_hat": top["rho_hat"],
        "floor": 2 * r / (1 + r),
        "per_layer": [summary(h, 1)["srp"] for h in per_layer],
        "per_domain": {d: summary(h, n_layers)["srp"] for d, h in per_domain.items()},
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_dir")
    ap.add_argument(
        "--corpus-dir",
        default=os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "build", "demo_corpus"),
    )
    ap.add_argument("--m", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--tokens", type=int, default=16384, help="held-out tokens per domain")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(args.threads)
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32)
    cfg = model.config
    npz = [f for f in os.listdir(args.corpus_dir) if f == f"tokens_{cfg.vocab_size}.npz"]
    if not npz:
        sys.exit(f"no tokens_{cfg.vocab_size}.npz in {args.corpus_dir}: run tools/train_demo.py first")
    windows = {}
    with np.load(os.path.join(args.corpus_dir, npz[0])) as z:
        for key in z.files:
            split, domain = key.split("/")
            if split == "val":
                arr = z[key]
                n = min(len(arr), args.tokens) // args.seq_len
                windows[domain] = arr[: n * args.seq_len].reshape(n, args.seq_len).astype(np.int64)
    rep = routing_srp_report(model, windows, cfg.num_experts_per_tok, cfg.num_experts, m=args.m)
    print(json.dumps(rep, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
