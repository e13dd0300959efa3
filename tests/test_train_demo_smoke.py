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


TINY = ["--vocab-size", "512", "--layers", "2", "--hidden", "64", "--head-dim", "32", "--kv-heads", "1",
        "--experts", "4", "--top-k", "2", "--expert-ffn", "32", "--seq-len", "32", "--batch-size", "2",
        "--warmup-steps", "2", "--eval-tokens", "128", "--srp-tokens", "64", "--threads", "1"]


@pytest.mark.skipif(not CORPUS.exists(), reason="demo corpus cache absent: run tools/train_demo.py --fetch once")
def test_train_demo_smoke_and_resume(tmp_path):
    train_demo = _load("train_demo")
    corpus_dir, out = tmp_path / "corpus", tmp_path / "hf"
    corpus_dir.mkdir()
    _tiny_corpus(corpus_dir)
    common = TINY + ["--corpus-dir", str(corpus_dir), "--out", str(out), "--budget-minutes", "2"]

    assert train_demo.main(common + ["--max-steps", "4"]) == 0
    for f in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
              "generation_config.json", "train_log.json"):
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
