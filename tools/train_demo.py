"""Train the small demo MoE that ships with moelite (issue 6; chat tuning: issue 19).

Dev-only: never imported by the runtime. Needs torch, transformers, tokenizers, numpy and, for the
Austen corpus, the PyPI package `rdata`.

Pipeline (every stage is cached under --corpus-dir, so a rerun or --resume skips it):
  1. corpus: Debian packages (apt-get download + dpkg-deb -x, with --fetch) ->
     documents of four domains (prose, technical, code_python, code_go) -> held-out documents per
     domain (split by document hash, never by line) -> corpus.jsonl
  2. tokenizer: byte-level BPE (Qwen2 pre-tokenizer regex) with the ChatML special tokens
  3. tokens: uint16 arrays per (domain, split)
  4. model: transformers Qwen3MoeForCausalLM from scratch on CPU, load-balancing aux loss on,
     AdamW, linear warmup then cosine over the wall-clock budget (or --max-steps)
  5. out: HF checkpoint dir (config, safetensors, tokenizer, chat template) + train_log.json

Real run:
  nohup python tools/train_demo.py --out build/demo_hf --budget-minutes 95 --threads 1 \
      > build/demo_train.log 2>&1 &
Resume after an interruption: same command plus --resume.

Chat tuning (issue 19): continue a shipped model instead of starting from scratch, on a mix of the text and
question/answer pairs (tools/build_qa_pairs.py) in ChatML, loss on the answer tokens of the pairs:
  python tools/train_demo.py --out build/demo_hf_qa --init-gguf build/demo_orig.gguf --qa-dir build/demo_qa \
      --lr 6e-4 --warmup-steps 50 --budget-minutes 72 --threads 1
--init-gguf takes the GGUF's own tokenizer (byte for byte) and its weights dequantized to f32.
--export-only --resume writes a running job's last checkpoint as an HF dir (to convert and try it).
"""

from __future__ import annotations

import argparse
import glob
import gzip
import hashlib
import json
import math
import os
import random
import subprocess
import sys
import sysconfig
import time
import zlib

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
DOMAINS = ["prose", "technical", "code_python", "code_go"]
PACKAGES = ["r-cran-janeaustenr", "python3.11-doc", "golang-1.19-src"]
# Qwen2's pre-tokenizer split (llama.cpp `tokenizer.ggml.pre = qwen2`), so the GGUF tokenizes the same.
QWEN2_PRETOK = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def log(msg: str) -> None:
    print(time.strftime("%H:%M:%S"), msg, flush=True)


def stable_hash(s: str) -> int:
    return int.from_bytes(hashlib.sha1(s.encode()).digest()[:8], "little")


# ----------------------------------------------------------------------------------------------
# 1. corpus
# ----------------------------------------------------------------------------------------------


def fetch_packages(raw_dir: str) -> None:
    """apt-get download + dpkg-deb -x into raw_dir (network; skipped when already extracted)."""
    debs = os.path.join(raw_dir, "debs")
    os.makedirs(debs, exist_ok=True)
    subprocess.run(["apt-get", "update"], check=False, stdout=subprocess.DEVNULL)
    for pkg in PACKAGES:
        if not glob.glob(os.path.join(debs, pkg + "_*.deb")):
            subprocess.run(["apt-get", "download", pkg], cwd=debs, check=True)
    for deb in sorted(glob.glob(os.path.join(debs, "*.deb"))):
        subprocess.run(["dpkg-deb", "-x", deb, raw_dir], check=True)


def austen_documents(raw_dir: str) -> list[tuple[str, str]]:
    """Six Austen novels from the R lazy-load DB, one document per chapter."""
    import rdata

    data_dir = os.path.join(raw_dir, "usr/lib/R/site-library/janeaustenr/data")
    index = rdata.conversion.convert(
        rdata.parser.parse_data(gzip.decompress(open(os.path.join(data_dir, "Rdata.rdx"), "rb").read()))
    )
    rdb = open(os.path.join(data_dir, "Rdata.rdb"), "rb").read()
    docs = []
    for name, (off, length) in sorted(index["variables"].items()):
        blob = rdb[int(off) : int(off) + int(length)]  # 4-byte length + zlib stream
        lines = rdata.conversion.convert(rdata.parser.parse_data(zlib.decompress(blob[4:])))
        chapter, n = [], 0
        for line in [str(x) for x in lines] + ["CHAPTER END"]:
            if line.strip().upper().startswith("CHAPTER") and chapter:
                text = "\n".join(chapter).strip()
                if len(text) > 200:
                    docs.append((f"{name}/{n:03d}", text))
                chapter, n = [], n + 1
            chapter.append(line)
    return docs


def file_documents(root: str, patterns: list[str], exclude: tuple[str, ...] = ()) -> list[tuple[str, str]]:
    docs = []
    for pat in patterns:
        for path in sorted(glob.glob(os.path.join(root, pat), recursive=True)):
            rel = os.path.relpath(path, root)
            if any(x in rel for x in exclude) or not os.path.isfile(path):
                continue
            try:
                text = open(path, encoding="utf-8").read()
            except (UnicodeDecodeError, OSError):
                continue
            if 200 < len(text) < 400_000:
                docs.append((rel, text))
    return docs


def collect_domains(raw_dir: str) -> dict[str, list[tuple[str, str]]]:
    stdlib = sysconfig.get_paths()["stdlib"]
    return {
        "prose": austen_documents(raw_dir),
        "technical": file_documents(os.path.join(raw_dir, "usr/share/doc/python3.11/html/_sources"), ["**/*.rst.txt"]),
        "code_python": file_documents(stdlib, ["**/*.py"], ("site-packages", "test/", "tests/", "idlelib")),
        "code_go": file_documents(
            os.path.join(raw_dir, "usr/share/go-1.19/src"), ["**/*.go"], ("testdata", "vendor/", "_test.go")
        ),
    }


def build_corpus(args) -> str:
    """corpus.jsonl: one {domain, split, name, text} per document; capped per domain, val by doc hash."""
    path = os.path.join(args.corpus_dir, "corpus.jsonl")
    if os.path.exists(path):
        return path
    missing = [p for p in PACKAGES if not glob.glob(os.path.join(args.raw_dir, "debs", p + "_*.deb"))]
    if missing and args.fetch:  # (the raw dir may already hold other packages, e.g. build_qa_pairs.py's)
        fetch_packages(args.raw_dir)
    elif not os.path.isdir(os.path.join(args.raw_dir, "usr")):
        sys.exit(f"no extracted packages under {args.raw_dir}; rerun with --fetch (needs apt)")
    os.makedirs(args.corpus_dir, exist_ok=True)
    cap = int(args.max_domain_mb * 1e6)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        for domain, docs in collect_domains(args.raw_dir).items():
            docs.sort(key=lambda d: stable_hash(f"{args.seed}:{domain}:{d[0]}"))  # seeded shuffle
            size = {"train": 0, "val": 0}
            for name, text in docs:
                split = "val" if stable_hash(f"val:{domain}:{name}") % 100 < args.val_percent else "train"
                split_cap = cap * args.val_percent / 100 if split == "val" else cap
                if size[split] >= split_cap:
                    continue
                size[split] += len(text.encode())
                f.write(json.dumps({"domain": domain, "split": split, "name": name, "text": text}) + "\n")
            log(
                f"corpus {domain}: {len(docs)} docs available, train {size['train'] / 1e6:.2f} MB, "
                f"val {size['val'] / 1e6:.2f} MB"
            )
    os.replace(tmp, path)
    return path


def read_corpus(path: str):
    with open(path) as f:
        for line in f:
            yield json.loads(line)


# ----------------------------------------------------------------------------------------------
# 2. tokenizer, 3. tokens
# ----------------------------------------------------------------------------------------------


def train_tokenizer(args, corpus: str):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    if args.init_gguf:  # continue training a shipped model: its tokenizer, byte for byte
        return Tokenizer.from_str(gguf_field(args.init_gguf, "tokenizer.huggingface.json"))
    path = os.path.join(args.corpus_dir, f"tokenizer_{args.vocab_size}.json")
    if os.path.exists(path):
        return Tokenizer.from_file(path)
    tok = Tokenizer(models.BPE(byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_PRETOK), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=args.vocab_size,
        special_tokens=SPECIALS,
        min_frequency=2,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    t0 = time.time()
    tok.train_from_iterator((d["text"] for d in read_corpus(corpus) if d["split"] == "train"), trainer)
    tok.save(path)
    log(f"tokenizer: {tok.get_vocab_size()} tokens in {time.time() - t0:.1f}s")
    return tok


def tokenize_corpus(args, corpus: str, tok) -> dict[str, dict[str, np.ndarray]]:
    """{split: {domain: uint16 tokens}}; each document ends with <|endoftext|>."""
    tag = "gguf_" + os.path.basename(args.init_gguf).split(".")[0] + "_" if args.init_gguf else ""
    path = os.path.join(args.corpus_dir, f"tokens_{tag}{args.vocab_size}.npz")
    if not os.path.exists(path):
        eot = tok.token_to_id("<|endoftext|>")
        parts: dict[str, list[int]] = {}
        docs = list(read_corpus(corpus))
        for d, enc in zip(docs, tok.encode_batch([d["text"] for d in docs])):
            parts.setdefault(f"{d['split']}/{d['domain']}", []).extend(enc.ids + [eot])
        np.savez(path + ".tmp.npz", **{k: np.asarray(v, dtype=np.uint16) for k, v in parts.items()})
        os.replace(path + ".tmp.npz", path)
    out: dict[str, dict[str, np.ndarray]] = {"train": {}, "val": {}}
    with np.load(path) as z:
        for key in z.files:
            split, domain = key.split("/")
            out[split][domain] = z[key]
    return out


def unigram_baselines(train: dict[str, np.ndarray], val: dict[str, np.ndarray], vocab_size: int) -> dict[str, float]:
    """Cross-entropy (nats/token) of the add-one unigram distribution of all training tokens, on the
    same held-out target tokens the model is scored on."""
    counts = np.ones(vocab_size, dtype=np.float64)
    for arr in train.values():
        counts += np.bincount(arr, minlength=vocab_size)[:vocab_size]
    logp = np.log(counts / counts.sum())
    return {d: float(-logp[w[:, 1:].reshape(-1)].mean()) for d, w in val.items()}


# ----------------------------------------------------------------------------------------------
# continued training: weights from a shipped GGUF, question/answer pairs (issue 19)
# ----------------------------------------------------------------------------------------------


def gguf_field(path: str, key: str):
    import gguf

    return gguf.GGUFReader(path).fields[key].contents()


def gguf_state_dict(path: str, n_layers: int) -> dict:
    """HF Qwen3-MoE state dict from a moelite-converted GGUF: dequantized to f32, names mapped back the
    way converters/families/qwen3_moe.py maps them forward (experts stacked [E, I, H]; transformers fuses
    gate and up into gate_up_proj, gate first)."""
    import gguf
    import torch

    reader = gguf.GGUFReader(path)
    t = {
        x.name: torch.from_numpy(np.ascontiguousarray(gguf.quants.dequantize(x.data, x.tensor_type), dtype=np.float32))
        for x in reader.tensors
    }
    sd = {
        "model.embed_tokens.weight": t["token_embd.weight"],
        "model.norm.weight": t["output_norm.weight"],
        "lm_head.weight": t.get("output.weight", t["token_embd.weight"]),
    }
    names = {
        "input_layernorm": "attn_norm",
        "post_attention_layernorm": "ffn_norm",
        "self_attn.q_proj": "attn_q",
        "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output",
        "self_attn.q_norm": "attn_q_norm",
        "self_attn.k_norm": "attn_k_norm",
        "mlp.gate": "ffn_gate_inp",
    }
    for b in range(n_layers):
        for hf, gg in names.items():
            sd[f"model.layers.{b}.{hf}.weight"] = t[f"blk.{b}.{gg}.weight"]
        sd[f"model.layers.{b}.mlp.experts.gate_up_proj"] = torch.cat(
            [t[f"blk.{b}.ffn_gate_exps.weight"], t[f"blk.{b}.ffn_up_exps.weight"]], dim=1
        )
        sd[f"model.layers.{b}.mlp.experts.down_proj"] = t[f"blk.{b}.ffn_down_exps.weight"]
    return sd


def render_turns(tok, turns: list[tuple[str, str]]) -> tuple[list[int], list[int]]:
    """ChatML tokens of a conversation and a mask that is 1 on the answer tokens and their <|im_end|>
    (the tokens the model is trained to produce), 0 on the rest. Same text as CHAT_TEMPLATE renders."""
    ids, mask = [], []
    for q, a in turns:
        for text, m in (
            (f"<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n", 0),
            (f"{a}<|im_end|>", 1),
            ("\n", 0),
        ):
            enc = tok.encode(text).ids
            ids += enc
            mask += [m] * len(enc)
    return ids, mask


def qa_windows(tok, path: str, seq_len: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Pairs of a jsonl file -> conversations of 1-3 turns (seeded) packed whole into [n, seq_len + 1]
    windows, <|endoftext|> between conversations and as padding; and the matching answer-token mask."""
    pairs = [json.loads(line) for line in open(path)]
    rng = random.Random(seed)
    rng.shuffle(pairs)
    eot = tok.token_to_id("<|endoftext|>")
    width = seq_len + 1
    rows_ids, rows_mask, cur_ids, cur_mask = [], [], [], []
    i = 0
    while i < len(pairs):
        n = min(rng.choice([1, 1, 2, 3]), len(pairs) - i)
        while True:  # fewer turns when the conversation would not fit one window
            ids, mask = render_turns(tok, [(p["question"], p["answer"]) for p in pairs[i : i + n]])
            if len(ids) < width or n == 1:
                break
            n -= 1
        i += n
        ids, mask = ids + [eot], mask + [0]
        if len(ids) > width:
            continue  # one pair longer than a window
        if len(cur_ids) + len(ids) > width:
            rows_ids.append(cur_ids + [eot] * (width - len(cur_ids)))
            rows_mask.append(cur_mask + [0] * (width - len(cur_mask)))
            cur_ids, cur_mask = [], []
        cur_ids, cur_mask = cur_ids + ids, cur_mask + mask
    if cur_ids:
        rows_ids.append(cur_ids + [eot] * (width - len(cur_ids)))
        rows_mask.append(cur_mask + [0] * (width - len(cur_mask)))
    return np.asarray(rows_ids, dtype=np.int64), np.asarray(rows_mask, dtype=np.int64)


def qa_eval_loss(model, windows: np.ndarray, mask: np.ndarray, batch: int) -> float:
    """Mean cross-entropy (nats/token) of the held-out answer tokens given their questions."""
    import torch

    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(windows), batch):
            x = torch.from_numpy(windows[i : i + batch])
            m = torch.from_numpy(mask[i : i + batch, 1:]).bool()
            logits = model(input_ids=x[:, :-1], output_router_logits=False).logits
            ce = torch.nn.functional.cross_entropy(logits.float().transpose(1, 2), x[:, 1:], reduction="none")
            total += ce[m].sum().item()
            count += int(m.sum())
    model.train()
    return total / max(count, 1)


# ----------------------------------------------------------------------------------------------
# 4. model + training
# ----------------------------------------------------------------------------------------------


def upcycle_state_dict(
    sd: dict, n_layers: int, n_expert: int, n_ff: int, seed: int, router_noise: float = 0.3, weight_noise: float = 0.01
) -> dict:
    """Grow a trained MoE (E0 experts of width F0) into n_expert experts of width n_ff >= F0 ("sparse
    upcycling"): expert j is a copy of expert j % E0 (so each source expert has n_expert / E0 copies).
      - gate/up rows [0, F0) = the source rows + weight_noise * their std; rows [F0, n_ff) fresh N(0, 0.02);
      - down columns [0, F0) = the source columns + noise; columns [F0, n_ff) zero, so each copy starts as
        exactly its source expert's function (up to the noise), and the new half still gets gradients;
      - router row j = the source row + router_noise * its std: copies of the same expert score apart,
        so top-k spreads over copies of the best few source experts instead of all copies of one.
    Layout as gguf_state_dict returns it: gate_up_proj [E, 2F, H] (gate rows first), down_proj [E, H, F]."""
    import torch

    g = torch.Generator().manual_seed(seed)
    out = dict(sd)
    for b in range(n_layers):
        gu = sd[f"model.layers.{b}.mlp.experts.gate_up_proj"]  # [E0, 2*F0, H]
        down = sd[f"model.layers.{b}.mlp.experts.down_proj"]  # [E0, H, F0]
        router = sd[f"model.layers.{b}.mlp.gate.weight"]  # [E0, H]
        e0, f0, h = gu.shape[0], gu.shape[1] // 2, gu.shape[2]
        if n_expert % e0 or n_ff < f0:
            raise SystemExit(
                f"upcycling {e0} experts x {f0} into {n_expert} x {n_ff}: need a multiple and n_ff >= {f0}"
            )
        src = torch.arange(n_expert) % e0

        def noisy(t: torch.Tensor, rel: float) -> torch.Tensor:
            return t + rel * t.std() * torch.randn(t.shape, generator=g)

        gate, up = gu[:, :f0], gu[:, f0:]
        new_gu = torch.empty(n_expert, 2 * n_ff, h)
        new_gu[:, :f0] = noisy(gate[src], weight_noise)
        new_gu[:, n_ff : n_ff + f0] = noisy(up[src], weight_noise)
        new_gu[:, f0:n_ff] = 0.02 * torch.randn(n_expert, n_ff - f0, h, generator=g)
        new_gu[:, n_ff + f0 :] = 0.02 * torch.randn(n_expert, n_ff - f0, h, generator=g)
        new_down = torch.zeros(n_expert, h, n_ff)
        new_down[:, :, :f0] = noisy(down[src], weight_noise)
        out[f"model.layers.{b}.mlp.experts.gate_up_proj"] = new_gu
        out[f"model.layers.{b}.mlp.experts.down_proj"] = new_down
        out[f"model.layers.{b}.mlp.gate.weight"] = noisy(router[src], router_noise)
    return out


def val_windows(arr: np.ndarray, seq_len: int, max_tokens: int) -> np.ndarray:
    """Non-overlapping [n, seq_len + 1] windows from the start of the held-out stream."""
    n = max(1, min(len(arr) - 1, max_tokens) // seq_len)
    n = min(n, (len(arr) - 1) // seq_len)
    return np.stack([arr[i * seq_len : i * seq_len + seq_len + 1] for i in range(n)]).astype(np.int64)


def make_model(args, vocab_size: int, eot: int, im_end: int):
    import torch
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    config = Qwen3MoeConfig(
        vocab_size=vocab_size,
        hidden_size=args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=args.hidden // args.head_dim,
        num_key_value_heads=args.kv_heads,
        head_dim=args.head_dim,
        intermediate_size=args.expert_ffn * args.top_k,  # unused: all layers MoE
        moe_intermediate_size=args.expert_ffn,
        num_experts=args.experts,
        num_experts_per_tok=args.top_k,
        norm_topk_prob=True,
        output_router_logits=True,
        router_aux_loss_coef=args.aux_coef,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        max_position_embeddings=4096,
        rope_theta=10000.0,
        tie_word_embeddings=True,
        bos_token_id=eot,
        eos_token_id=im_end,
        pad_token_id=eot,
        initializer_range=0.02,
    )
    torch.manual_seed(args.seed)
    model = Qwen3MoeForCausalLM(config)
    set_experts_impl(model, args.experts_impl)
    return model


def set_experts_impl(model, impl: str) -> None:
    # grouped_mm: one batched matmul per projection instead of a Python loop over experts;
    # measured 1.36x tokens/s on 1 CPU thread at this size. Same math, same weights.
    if hasattr(model, "set_experts_implementation"):
        model.set_experts_implementation(impl)
    else:
        model.config._experts_implementation = impl


def adamw(model, args):
    """AdamW with weight decay on the matrices, none on norms and vectors."""
    import torch

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "norm" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "norm" not in n)]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.95),
    )


def lr_at(args, step: int, progress: float) -> float:
    if step < args.warmup_steps:
        return args.lr * (step + 1) / args.warmup_steps
    p = min(1.0, max(0.0, progress))
    return args.lr * (args.min_lr_frac + (1 - args.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * p)))


def evaluate(model, val: dict[str, np.ndarray], batch: int) -> dict[str, float]:
    import torch

    model.eval()
    out = {}
    with torch.no_grad():
        for domain, windows in val.items():
            total, count = 0.0, 0
            for i in range(0, len(windows), batch):
                x = torch.from_numpy(windows[i : i + batch])
                logits = model(input_ids=x[:, :-1], output_router_logits=False).logits
                loss = torch.nn.functional.cross_entropy(
                    logits.reshape(-1, logits.shape[-1]).float(), x[:, 1:].reshape(-1), reduction="sum"
                )
                total += loss.item()
                count += x[:, 1:].numel()
            out[domain] = total / count
    model.train()
    return out


def sample_batch(train: np.ndarray, starts_max: int, seq_len: int, batch: int, rng) -> np.ndarray:
    starts = rng.integers(0, starts_max, size=batch)
    return np.stack([train[s : s + seq_len + 1] for s in starts]).astype(np.int64)


def mixed_batch(train: np.ndarray, starts_max: int, qa, args, rng):
    """Token windows and labels: text rows learn every token; chat rows (round(qa_frac * batch) of them,
    when qa is given) learn only the answer tokens (labels -100 elsewhere)."""
    import torch

    n_qa = int(round(args.qa_frac * args.batch_size)) if qa is not None else 0
    x = sample_batch(train, starts_max, args.seq_len, args.batch_size - n_qa, rng)
    labels = x.copy()
    if n_qa:
        rows = rng.integers(0, len(qa[0]), size=n_qa)
        x = np.concatenate([x, qa[0][rows]])
        labels = np.concatenate([labels, np.where(qa[1][rows] == 1, qa[0][rows], -100)])
    return torch.from_numpy(x), torch.from_numpy(labels)


def save_hf(args, model, tok, out_dir: str) -> None:
    from transformers import GenerationConfig, PreTrainedTokenizerFast

    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    # config.json as stock Qwen3-MoE checkpoints spell it (converters read these keys); router
    # logits are a training-time output only.
    cfg_path = os.path.join(out_dir, "config.json")
    cfg = json.load(open(cfg_path))
    if model.config.model_type == "qwen3_moe":
        cfg["num_experts"] = model.config.num_experts
    cfg["rope_theta"] = float(cfg.get("rope_parameters", {}).get("rope_theta", 10000.0))
    cfg["output_router_logits"] = False
    json.dump(cfg, open(cfg_path, "w"), indent=2)
    eot, im_end = tok.token_to_id("<|endoftext|>"), tok.token_to_id("<|im_end|>")
    GenerationConfig(
        bos_token_id=eot,
        eos_token_id=[im_end, eot],
        pad_token_id=eot,
        do_sample=True,
        temperature=0.8,
        top_k=40,
        top_p=0.95,
    ).save_pretrained(out_dir)
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        bos_token=None,
        unk_token=None,
        additional_special_tokens=["<|im_start|>", "<|endoftext|>"],
    )
    hf_tok.chat_template = CHAT_TEMPLATE
    hf_tok.model_max_length = 4096
    hf_tok.save_pretrained(out_dir)
    # transformers 5 may put the template in chat_template.jinja only; keep the string in
    # tokenizer_config.json too (the converter and older loaders read it there).
    cfg_path = os.path.join(out_dir, "tokenizer_config.json")
    cfg = json.load(open(cfg_path))
    cfg["chat_template"] = CHAT_TEMPLATE
    cfg.setdefault("add_bos_token", False)
    json.dump(cfg, open(cfg_path, "w"), indent=2)


def save_ckpt(path: str, state: dict) -> None:
    import torch

    torch.save(state, path + ".tmp")
    os.replace(path + ".tmp", path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join(REPO, "build", "demo_hf"))
    ap.add_argument("--corpus-dir", default=os.path.join(REPO, "build", "demo_corpus"))
    ap.add_argument("--raw-dir", default=None, help="extracted .debs (default: <corpus-dir>/raw)")
    ap.add_argument("--ckpt-dir", default=None, help="resume checkpoints (default: <out>_ckpt)")
    ap.add_argument("--fetch", action="store_true", help="apt-get download the packages if missing")
    ap.add_argument("--max-domain-mb", type=float, default=6.0, help="train text cap per domain")
    ap.add_argument("--val-percent", type=int, default=4)
    ap.add_argument("--vocab-size", type=int, default=8192)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--expert-ffn", type=int, default=256)
    ap.add_argument("--aux-coef", type=float, default=0.01)
    ap.add_argument("--experts-impl", default="grouped_mm", choices=["eager", "grouped_mm", "batched_mm"])
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--min-lr-frac", type=float, default=0.1)
    ap.add_argument("--warmup-steps", type=int, default=100)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--budget-minutes", type=float, default=95.0, help="wall clock for the whole run")
    ap.add_argument("--max-steps", type=int, default=0, help="step-based schedule (reproducible); 0 = budget")
    ap.add_argument("--eval-every-minutes", type=float, default=10.0)
    ap.add_argument("--ckpt-every-minutes", type=float, default=4.0)
    ap.add_argument("--eval-tokens", type=int, default=32768, help="held-out tokens per domain per eval")
    ap.add_argument("--srp-tokens", type=int, default=16384, help="held-out tokens per domain for SRP")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--resume", action="store_true")
    ap.add_argument(
        "--init-gguf",
        default=None,
        help="start from this moelite GGUF (weights dequantized, its tokenizer) instead of from scratch",
    )
    ap.add_argument(
        "--upcycle",
        action="store_true",
        help="with --init-gguf: copy its experts into --experts experts of width --expert-ffn "
        "(a multiple of its expert count, at least its width), see upcycle_state_dict",
    )
    ap.add_argument(
        "--qa-dir",
        default=None,
        help="train.jsonl/heldout.jsonl of tools/build_qa_pairs.py: mix these chat pairs into training",
    )
    ap.add_argument("--qa-frac", type=float, default=0.5, help="share of each batch's rows that are chat pairs")
    ap.add_argument(
        "--export-only",
        action="store_true",
        help="with --resume: write the checkpoint's HF model to --out and stop (no training, no eval)",
    )
    args = ap.parse_args(argv)
    needed = ([args.init_gguf] if args.init_gguf else []) + (
        [os.path.join(args.qa_dir, f) for f in ("train.jsonl", "heldout.jsonl")] if args.qa_dir else []
    )
    for path in needed:
        if not os.path.isfile(path):
            sys.exit(f"{path}: no such file (--init-gguf takes a .gguf; --qa-dir is tools/build_qa_pairs.py's --out)")
    t_start = time.time()
    args.raw_dir = args.raw_dir or os.path.join(args.corpus_dir, "raw")
    args.ckpt_dir = args.ckpt_dir or args.out.rstrip("/") + "_ckpt"

    import torch

    torch.set_num_threads(args.threads)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)

    corpus = build_corpus(args)
    tok = train_tokenizer(args, corpus)
    vocab = tok.get_vocab_size()
    tokens = tokenize_corpus(args, corpus, tok)
    domains = [d for d in DOMAINS if d in tokens["train"] and d in tokens["val"]]
    corpus_bytes: dict[str, dict[str, int]] = {}
    for d in read_corpus(corpus):
        corpus_bytes.setdefault(d["domain"], {"train": 0, "val": 0})[d["split"]] += len(d["text"].encode())
    val = {d: val_windows(tokens["val"][d], args.seq_len, args.eval_tokens) for d in domains}
    unigram = unigram_baselines({d: tokens["train"][d] for d in domains}, val, vocab)
    train = np.concatenate([tokens["train"][d] for d in domains])
    starts_max = len(train) - args.seq_len - 1
    per_dom = ", ".join(f"{d} {len(tokens['train'][d]):,}" for d in domains)
    uni = ", ".join(f"{d} {unigram[d]:.3f}" for d in domains)
    log(f"tokens: train {len(train):,} ({per_dom}); unigram CE {uni}")

    eot, im_end = tok.token_to_id("<|endoftext|>"), tok.token_to_id("<|im_end|>")
    model = make_model(args, vocab, eot, im_end)
    if args.init_gguf:
        sd = gguf_state_dict(args.init_gguf, args.layers)
        if args.upcycle:
            sd = upcycle_state_dict(sd, args.layers, args.experts, args.expert_ffn, args.seed)
        model.load_state_dict(sd)
        log(
            f"weights from {args.init_gguf}"
            + (f" (upcycled to {args.experts} experts x {args.expert_ffn})" if args.upcycle else "")
        )
    qa = None
    if args.qa_dir:
        qa_train = qa_windows(tok, os.path.join(args.qa_dir, "train.jsonl"), args.seq_len, args.seed)
        qa_held = qa_windows(tok, os.path.join(args.qa_dir, "heldout.jsonl"), args.seq_len, args.seed)
        qa = {"train": qa_train, "heldout": qa_held}
        log(
            f"chat pairs: {len(qa_train[0])} train windows ({int(qa_train[1].sum()):,} answer tokens), "
            f"{len(qa_held[0])} held-out windows ({int(qa_held[1].sum()):,} answer tokens)"
        )
    n_params = sum(p.numel() for p in model.parameters())
    n_expert = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    n_active = n_params - n_expert + n_expert * args.top_k // args.experts
    log(f"model: {n_params / 1e6:.2f} M params ({n_expert / 1e6:.2f} M in experts, {n_active / 1e6:.2f} M active)")
    opt = adamw(model, args)

    ckpt_path = os.path.join(args.ckpt_dir, "ckpt.pt")
    step, tokens_seen, elapsed_before = 0, 0, 0.0
    log_data = {
        "config": {k: v for k, v in vars(args).items()},
        "params": n_params,
        "expert_params": n_expert,
        "active_params": n_active,
        "vocab_size": vocab,
        "corpus_bytes": corpus_bytes,
        "tokens_per_domain": {s: {d: int(len(tokens[s][d])) for d in domains} for s in ("train", "val")},
        "val_tokens_per_domain": {d: int(val[d][:, 1:].size) for d in domains},
        "unigram_baseline": unigram,
        "evals": [],
        "train_loss": [],
        "qa": (
            {
                "train_windows": int(len(qa["train"][0])),
                "train_answer_tokens": int(qa["train"][1].sum()),
                "heldout_answer_tokens": int(qa["heldout"][1].sum()),
            }
            if qa
            else None
        ),
        "torch": torch.__version__,
    }
    if args.resume and os.path.exists(ckpt_path):
        state = torch.load(ckpt_path, weights_only=False)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        step, tokens_seen, elapsed_before = state["step"], state["tokens_seen"], state["elapsed"]
        log_data["evals"], log_data["train_loss"] = state["evals"], state["train_loss"]
        log(f"resumed at step {step}, {tokens_seen:,} tokens, {elapsed_before / 60:.1f} min used")
    if args.export_only:
        if not (args.resume and os.path.exists(ckpt_path)):
            sys.exit(f"--export-only needs --resume and a checkpoint at {ckpt_path}")
        save_hf(args, model, tok, args.out)
        log(f"exported step {step} to {args.out}")
        return 0
    os.makedirs(args.ckpt_dir, exist_ok=True)
    os.makedirs(args.out, exist_ok=True)
    log_path = os.path.join(args.out, "train_log.json")

    def write_log():
        json.dump(log_data, open(log_path + ".tmp", "w"), indent=1)
        os.replace(log_path + ".tmp", log_path)

    def elapsed() -> float:  # wall clock of this run, accumulated over resumes
        return elapsed_before + time.time() - t_start

    def do_eval(train_loss):
        t0 = time.time()
        losses = evaluate(model, val, batch=max(args.batch_size, 8))
        qa_loss = qa_eval_loss(model, *qa["heldout"], batch=max(args.batch_size, 8)) if qa else None
        log_data["evals"].append(
            {
                "step": step,
                "tokens_seen": tokens_seen,
                "wall_s": round(elapsed(), 1),
                "train_loss": train_loss,
                "val_loss": losses,
                "qa_heldout_loss": qa_loss,
                "eval_s": round(time.time() - t0, 1),
            }
        )
        write_log()
        log(
            f"eval step {step}: "
            + ", ".join(f"{d} {losses[d]:.3f} (unigram {unigram[d]:.3f})" for d in domains)
            + (f", held-out answers {qa_loss:.3f}" if qa else "")
            + f"  [{time.time() - t0:.0f}s]"
        )
        return time.time() - t0

    budget_s = args.budget_minutes * 60
    eval_cost = do_eval(None) if step == 0 else log_data["evals"][-1].get("eval_s", 30.0)
    # reserve the end of the budget for the final eval, SRP and the HF save
    reserve = max(20.0, 2.5 * eval_cost + 15.0)
    train_end = budget_s - reserve
    last_eval, last_ckpt = time.time(), time.time()
    model.train()
    loss_acc, aux_acc, n_acc, t_rate, tok_rate = 0.0, 0.0, 0, time.time(), 0
    while True:
        if args.max_steps and step >= args.max_steps:
            break
        if elapsed() >= train_end:
            break
        progress = step / args.max_steps if args.max_steps else elapsed() / train_end
        lr = lr_at(args, step, progress)
        for g in opt.param_groups:
            g["lr"] = lr
        rng = np.random.default_rng([args.seed, step])  # batch depends only on (seed, step): resumable
        x, labels = mixed_batch(train, starts_max, qa["train"] if qa else None, args, rng)
        out = model(input_ids=x[:, :-1], labels=labels[:, :-1], output_router_logits=True)
        # HF shifts labels itself: feed the window without its last token, labels = inputs
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        tokens_seen += x[:, :-1].numel()
        tok_rate += x[:, :-1].numel()
        aux = out.aux_loss.item()
        loss_acc += out.loss.item() - args.aux_coef * aux
        aux_acc += aux
        n_acc += 1
        if step % 25 == 0:
            tl = loss_acc / n_acc
            rate = tok_rate / (time.time() - t_rate)
            log_data["train_loss"].append(
                {
                    "step": step,
                    "tokens_seen": tokens_seen,
                    "wall_s": round(elapsed(), 1),
                    "loss": round(tl, 4),
                    "aux": round(aux_acc / n_acc, 4),
                    "lr": lr,
                }
            )
            left_s = (
                (args.max_steps - step) * args.batch_size * args.seq_len / max(rate, 1e-9)
                if args.max_steps
                else train_end - elapsed()
            )
            log(
                f"step {step}{'/' + str(args.max_steps) if args.max_steps else ''} loss {tl:.3f} "
                f"aux {aux_acc / n_acc:.3f} lr {lr:.2e} {rate:.0f} tok/s tokens {tokens_seen:,} "
                f"elapsed {elapsed() / 60:.1f} min, ETA {max(0.0, left_s) / 60:.1f} min"
            )
            loss_acc, aux_acc, n_acc, t_rate, tok_rate = 0.0, 0.0, 0, time.time(), 0
        if time.time() - last_eval > args.eval_every_minutes * 60:
            do_eval(log_data["train_loss"][-1]["loss"] if log_data["train_loss"] else None)
            last_eval = time.time()
        if time.time() - last_ckpt > args.ckpt_every_minutes * 60:
            save_ckpt(
                ckpt_path,
                {
                    "model": model.state_dict(),
                    "opt": opt.state_dict(),
                    "step": step,
                    "tokens_seen": tokens_seen,
                    "elapsed": elapsed(),
                    "evals": log_data["evals"],
                    "train_loss": log_data["train_loss"],
                },
            )
            last_ckpt = time.time()

    final_train = log_data["train_loss"][-1]["loss"] if log_data["train_loss"] else None
    do_eval(final_train)
    save_ckpt(
        ckpt_path,
        {
            "model": model.state_dict(),
            "opt": opt.state_dict(),
            "step": step,
            "tokens_seen": tokens_seen,
            "elapsed": elapsed(),
            "evals": log_data["evals"],
            "train_loss": log_data["train_loss"],
        },
    )
    save_hf(args, model, tok, args.out)
    log_data["final"] = {
        "step": step,
        "tokens_seen": tokens_seen,
        "train_wall_s": round(elapsed(), 1),
        "val_loss": log_data["evals"][-1]["val_loss"],
        "below_unigram": all(log_data["evals"][-1]["val_loss"][d] < unigram[d] for d in domains),
    }
    write_log()
    try:  # model-level SRP at m = 16 on the held-out text (goes in the model card)
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from demo_routing_srp import routing_srp_report

        windows = {d: val_windows(tokens["val"][d], args.seq_len, args.srp_tokens) for d in domains}
        log_data["srp"] = routing_srp_report(model, windows, args.top_k, args.experts, m=16)
        log(f"SRP(m=16) model level {log_data['srp']['srp']:.4f}, floor {log_data['srp']['floor']:.4f}")
    except Exception as e:  # never lose the checkpoint over the metric
        log(f"SRP failed: {e!r}")
    log_data["final"]["total_wall_s"] = round(elapsed(), 1)
    write_log()
    log(f"done: {step} steps, {tokens_seen:,} tokens, {elapsed() / 60:.1f} min; HF checkpoint in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
