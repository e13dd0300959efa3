"""Smoke test of tools/train_demo.py: a few steps of a tiny MoE on a tiny slice of the cached corpus,
then --resume. Needs no network; skips when the corpus cache (built by a real run) is absent."""

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT / "build" / "demo_corpus" / "corpus.jsonl"

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("tokenizers")


def _load(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _tiny_corpus(dst: Path, per_split: int = 3, chars: int = 6000) -> None:
    """First few documents of every (domain, split) of the cached corpus, truncated."""
    seen: dict[tuple[str, str], int] = {}
    with open(CORPUS) as f, open(dst / "corpus.jsonl", "w") as out:
        for line in f:
            d = json.loads(line)
            key = (d["domain"], d["split"])
            if seen.get(key, 0) < per_split:
                seen[key] = seen.get(key, 0) + 1
                d["text"] = d["text"][:chars]
                out.write(json.dumps(d) + "\n")
    assert len({k[0] for k in seen}) >= 3 and all(s in {k[1] for k in seen} for s in ("train", "val"))


TINY = [
    "--vocab-size",
    "512",
    "--layers",
    "2",
    "--hidden",
    "64",
    "--head-dim",
    "32",
    "--kv-heads",
    "1",
    "--experts",
    "4",
    "--top-k",
    "2",
    "--expert-ffn",
    "32",
    "--seq-len",
    "32",
    "--batch-size",
    "2",
    "--warmup-steps",
    "2",
    "--eval-tokens",
    "128",
    "--srp-tokens",
    "64",
    "--threads",
    "1",
]


@pytest.mark.skipif(not CORPUS.exists(), reason="demo corpus cache absent: run tools/train_demo.py --fetch once")
def test_train_demo_smoke_and_resume(tmp_path):
    train_demo = _load("train_demo")
    corpus_dir, out = tmp_path / "corpus", tmp_path / "hf"
    corpus_dir.mkdir()
    _tiny_corpus(corpus_dir)
    common = TINY + ["--corpus-dir", str(corpus_dir), "--out", str(out), "--budget-minutes", "2"]

    assert train_demo.main(common + ["--max-steps", "4"]) == 0
    for f in (
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
        "train_log.json",
    ):
        assert (out / f).exists(), f
    log = json.loads((out / "train_log.json").read_text())
    assert log["final"]["step"] == 4
    assert set(log["unigram_baseline"]) == set(log["evals"][-1]["val_loss"])
    assert len(log["unigram_baseline"]) >= 3
    assert log["srp"]["floor"] == pytest.approx(2 * 0.5 / 1.5)
    assert log["srp"]["floor"] - 1e-9 <= log["srp"]["srp"] <= 1.0
    tok_cfg = json.loads((out / "tokenizer_config.json").read_text())
    assert "<|im_start|>" in tok_cfg["chat_template"]
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "qwen3_moe" and cfg["num_experts"] == 4 and cfg["norm_topk_prob"]

    assert train_demo.main(common + ["--max-steps", "6", "--resume"]) == 0
    log = json.loads((out / "train_log.json").read_text())
    assert log["final"]["step"] == 6 and log["final"]["tokens_seen"] == 6 * 2 * 32


@pytest.mark.skipif(not CORPUS.exists(), reason="demo corpus cache absent: run tools/train_demo.py --fetch once")
def test_train_demo_with_chat_pairs(tmp_path):
    """--qa-dir: batches mix text rows and chat rows, the held-out answer loss is logged at every eval."""
    train_demo = _load("train_demo")
    corpus_dir, out, qa = tmp_path / "corpus", tmp_path / "hf", tmp_path / "qa"
    corpus_dir.mkdir()
    qa.mkdir()
    _tiny_corpus(corpus_dir)
    for name, n in (("train.jsonl", 30), ("heldout.jsonl", 6)):
        (qa / name).write_text(
            "".join(
                json.dumps({"source": "t", "question": f"What is item {i}?", "answer": f"Item {i} is a thing."}) + "\n"
                for i in range(n)
            )
        )
    args = TINY + [
        "--corpus-dir",
        str(corpus_dir),
        "--out",
        str(out),
        "--budget-minutes",
        "2",
        "--max-steps",
        "3",
        "--seq-len",
        "64",
        "--qa-dir",
        str(qa),
    ]
    assert train_demo.main(args) == 0
    log = json.loads((out / "train_log.json").read_text())
    assert log["config"]["qa_frac"] == 0.5 and log["qa"]["train_windows"] >= 1
    assert all(e["qa_heldout_loss"] > 0 for e in log["evals"]) and len(log["evals"]) == 2
    assert log["final"]["step"] == 3


def test_srp_matches_brute_force():
    """window_hist + srp_from_hist against the literal definition on a random trace."""
    np = pytest.importorskip("numpy")
    srp = _load("demo_routing_srp")
    rng = np.random.default_rng(0)
    E, k, m, T = 6, 2, 4, 23
    seqs = [np.stack([rng.choice(E, k, replace=False) for _ in range(T)]) for _ in range(3)]
    hist = sum(srp.window_hist(s, E, m) for s in seqs)
    fs = [sum(e in s[t] for t in range(p, p + m)) for s in seqs for e in range(E) for p in range(T - m + 1)]
    best = max(2 * sum(f for f in fs if f >= a) / (sum(m for f in fs if f >= a) + sum(fs)) for a in range(m + 1))
    assert srp.srp_from_hist(hist, m)["srp"] == pytest.approx(best)
    # alpha = 0 selects every pair: the floor 2r/(1+r)
    f = np.arange(m + 1)
    assert 2 * (hist * f).sum() / ((hist * m).sum() + (hist * f).sum()) == pytest.approx(2 * (k / E) / (1 + k / E))


DEMO = ROOT / "src" / "moelite" / "data" / "demo.gguf"


@pytest.mark.skipif(not DEMO.exists(), reason="demo model not shipped in this tree")
def test_chat_pairs_render_as_the_runtime_template(tmp_path):
    """Chat tuning (issue 19): a rendered conversation is exactly what moelite's chat template and tokenizer
    produce; the loss mask covers the answers and their <|im_end|>, nothing else; packing keeps conversations whole."""
    from tokenizers import Tokenizer

    import moelite

    train_demo = _load("train_demo")
    tok = Tokenizer.from_str(train_demo.gguf_field(str(DEMO), "tokenizer.huggingface.json"))
    turns = [
        ("What does the ls command do?", "ls is used to list directory contents."),
        ("What is Debian?", "A free operating system."),
    ]
    ids, mask = train_demo.render_turns(tok, turns)
    messages = [m for q, a in turns for m in ({"role": "user", "content": q}, {"role": "assistant", "content": a})]
    with moelite.Model(str(DEMO)) as m:
        rendered = m.chat_template.render(messages, add_generation_prompt=False)
        assert m.tokenizer.encode(rendered, add_special=False) == ids
    assert (
        tok.decode([i for i, k in zip(ids, mask) if k], skip_special_tokens=False)
        == "ls is used to list directory contents.<|im_end|>A free operating system.<|im_end|>"
    )

    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(
        "".join(
            json.dumps({"source": "t", "question": f"What is thing {i}?", "answer": f"Thing {i}."}) + "\n"
            for i in range(40)
        )
    )
    windows, wmask = train_demo.qa_windows(tok, str(pairs), 64, seed=1)
    eot = tok.token_to_id("<|endoftext|>")
    assert windows.shape == wmask.shape and windows.shape[1] == 65
    answers = tok.decode(windows[wmask == 1].tolist(), skip_special_tokens=False)
    assert sorted(answers.split("<|im_end|>")[:-1]) == sorted(f"Thing {i}." for i in range(40))
    assert all(row[-1] == eot for row in windows)  # padded with <|endoftext|>, never cut mid-conversation


@pytest.mark.skipif(not DEMO.exists(), reason="demo model not shipped in this tree")
def test_gguf_weights_load_back_into_transformers():
    """--init-gguf: the dequantized GGUF in Qwen3MoeForCausalLM predicts what moelite predicts from the GGUF."""
    np = pytest.importorskip("numpy")
    import torch

    import moelite

    train_demo = _load("train_demo")
    with moelite.Model(str(DEMO)) as m:
        ids = m.tokenizer.encode("It is a truth universally acknowledged, that a single man", add_special=False)
        ref = np.asarray(m.logits(ids))
        hp, ffn = m.hparams, m.kv["qwen3moe.expert_feed_forward_length"]
    args = train_demo.argparse.Namespace(
        hidden=hp["n_embd"],
        layers=hp["n_layer"],
        head_dim=hp["n_embd_head_k"],
        kv_heads=hp["n_head_kv"],
        expert_ffn=ffn,
        top_k=hp["n_expert_used"],
        experts=hp["n_expert"],
        aux_coef=0.0,
        seed=0,
        experts_impl="eager",
    )
    model = train_demo.make_model(args, ref.shape[-1], 0, 2)
    model.load_state_dict(train_demo.gguf_state_dict(str(DEMO), args.layers))
    with torch.no_grad():
        out = model(input_ids=torch.tensor([ids])).logits[0].numpy()
    assert out.shape == ref.shape
    assert (out.argmax(-1) == ref.argmax(-1)).all()
    assert np.abs(out - ref).max() < 0.5  # q8_0 activations in the runtime, f32 in torch
