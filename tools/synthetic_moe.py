"""Write a random-weight Hugging Face MoE checkpoint with real layer shapes, for offloading tests and
benchmarks: the GGUF is then made by moelite's converter, the path users take.

    python tools/synthetic_moe.py OUT_DIR --preset qwen3-30b-a3b --layers 12
    python -m moelite.converters OUT_DIR -o model.gguf --type q4_k_m

Tensors are streamed one layer shard at a time (F16), so memory stays at one layer's experts.
"""

from __future__ import annotations

import argparse
import json
import random
import string
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

PRESETS = {
    # Qwen3-30B-A3B layer shapes (config.json of the real checkpoint); layers/vocab are chosen per use
    "qwen3-30b-a3b": dict(
        hidden_size=2048,
        num_attention_heads=32,
        num_key_value_heads=4,
        head_dim=128,
        num_experts=128,
        num_experts_per_tok=8,
        moe_intermediate_size=768,
        intermediate_size=6144,
        rope_theta=1e6,
        rms_norm_eps=1e-6,
    ),
}
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def _tokenizer(out: Path, vocab_size: int, seed: int) -> None:
    """A byte-level BPE of exactly vocab_size tokens, trained on random words (no download)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    rnd = random.Random(seed)
    words = ["".join(rnd.choices(string.ascii_lowercase, k=rnd.randint(2, 9))) for _ in range(4 * vocab_size)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator([" ".join(words[i : i + 64]) for i in range(0, len(words), 64)], trainer=trainer)
    if tok.get_vocab_size() != vocab_size:
        raise SystemExit(f"tokenizer reached {tok.get_vocab_size()} tokens, not {vocab_size}")
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "eos_token": "<|im_end|>",
                "pad_token": "<|endoftext|>",
                "bos_token": None,
                "chat_template": CHATML,
            },
            indent=1,
        )
    )


def make_synthetic_moe(
    out: str | Path,
    *,
    preset: str = "qwen3-30b-a3b",
    layers: int = 2,
    vocab_size: int = 4096,
    n_expert: int | None = None,
    seed: int = 0,
) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = dict(PRESETS[preset])
    if n_expert:
        cfg["num_experts"] = n_expert
    E, H, I = cfg["num_experts"], cfg["hidden_size"], cfg["moe_intermediate_size"]
    nh, nkv, hd = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
    config = dict(
        cfg,
        architectures=["Qwen3MoeForCausalLM"],
        model_type="qwen3_moe",
        num_hidden_layers=layers,
        vocab_size=vocab_size,
        max_position_embeddings=4096,
        norm_topk_prob=True,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        tie_word_embeddings=False,
        torch_dtype="float16",
        bos_token_id=None,
        eos_token_id=SPECIAL.index("<|im_end|>"),
    )
    (out / "config.json").write_text(json.dumps(config, indent=1))
    (out / "generation_config.json").write_text(json.dumps({"eos_token_id": config["eos_token_id"]}))
    _tokenizer(out, vocab_size, seed)
    rng = np.random.default_rng(seed)

    def w(*shape: int, scale: float | None = None) -> np.ndarray:
        s = scale if scale is not None else 1.0 / np.sqrt(shape[-1])
        return (rng.standard_normal(shape, dtype=np.float32) * s).astype(np.float16)

    index: dict[str, str] = {}

    def shard(name: str, tensors: dict[str, np.ndarray]) -> None:
        save_file(tensors, str(out / name))
        index.update({k: name for k in tensors})

    shard(
        "model-embed.safetensors",
        {
            "model.embed_tokens.weight": w(vocab_size, H, scale=0.02),
            "lm_head.weight": w(vocab_size, H),
            "model.norm.weight": np.ones(H, np.float16),
        },
    )
    for il in range(layers):
        p = f"model.layers.{il}."
        t = {
            p + "input_layernorm.weight": np.ones(H, np.float16),
            p + "post_attention_layernorm.weight": np.ones(H, np.float16),
            p + "self_attn.q_proj.weight": w(nh * hd, H),
            p + "self_attn.k_proj.weight": w(nkv * hd, H),
            p + "self_attn.v_proj.weight": w(nkv * hd, H),
            p + "self_attn.o_proj.weight": w(H, nh * hd),
            p + "self_attn.q_norm.weight": np.ones(hd, np.float16),
            p + "self_attn.k_norm.weight": np.ones(hd, np.float16),
            p + "mlp.gate.weight": w(E, H),
        }
        for e in range(E):
            q = f"{p}mlp.experts.{e}."
            t[q + "gate_proj.weight"] = w(I, H)
            t[q + "up_proj.weight"] = w(I, H)
            t[q + "down_proj.weight"] = w(H, I)
        shard(f"model-layer{il:03d}.safetensors", t)
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": index}, indent=1))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out")
    ap.add_argument("--preset", default="qwen3-30b-a3b", choices=sorted(PRESETS))
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--experts", type=int, default=None, help="override the preset's expert count")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    print(
        make_synthetic_moe(a.out, preset=a.preset, layers=a.layers, vocab_size=a.vocab, n_expert=a.experts, seed=a.seed)
    )


if __name__ == "__main__":
    main()
