"""Wave-2 families beyond parity (test_runtime_parity.py) and offload exactness (test_offload.py):

- real-shaped configs: each family's config.json written the way the real checkpoints write it (every key and
  flag of the published config, dimensions shrunk to the fixture's), with the real checkpoint's tensor layout
  (multimodal wrappers, MTP layers, fused qkv / up_gate), converts to a GGUF whose logits equal the fixture's
  bit for bit (same weights, same math);
- q8_0 keeps the greedy tokens of f32;
- variants moelite does not implement are a ConversionError naming the key, never a wrong file.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from fixture_models import fixture_gguf
from hf_fixtures import HYBRID_FAMILIES, WAVE2_FAMILIES, edited_copy

import moelite
from moelite import _core
from moelite.converters import convert
from moelite.errors import ConversionError

PROMPT = [(7 * i + 3) % 320 for i in range(12)]


def logits(path) -> np.ndarray:
    with moelite.load(path, kv_type="f32", n_threads=1) as m:
        return m.logits(PROMPT)


def config_of(hf: Path) -> dict:
    return json.loads((hf / "config.json").read_text())


def real_copy(family: str, out: Path, config: dict, edit=lambda ts: ts) -> Path:
    """The fixture's weights re-laid as the real checkpoint stores them, with a real-format config.json."""
    hf, _ = fixture_gguf(family)
    d = edited_copy(hf, out, edit)
    (d / "config.json").write_text(json.dumps(config))
    return d


def mtp_layer(ts: dict, last: int, n_layer: int, prefix: str = "model.layers") -> dict:
    """An MTP block as GLM-4.x / DeepSeek-V3 checkpoints keep it: one more decoder layer (a copy of the last)
    plus eh_proj / enorm / hnorm / shared_head.norm, at model.layers.{n_layer}."""
    out = dict(ts)
    for k, v in ts.items():
        if k.startswith(f"{prefix}.{last}."):
            out[k.replace(f"{prefix}.{last}.", f"{prefix}.{n_layer}.", 1)] = v
    H = ts["model.norm.weight"].shape[0]
    out[f"{prefix}.{n_layer}.eh_proj.weight"] = np.zeros((H, 2 * H), np.float32)
    for n in ("enorm", "hnorm", "shared_head.norm"):
        out[f"{prefix}.{n_layer}.{n}.weight"] = np.ones(H, np.float32)
    return out


def glm4_moe_config(c: dict) -> dict:
    # GLM-4.5-Air's config.json (transformers 4.54 era): legacy rope keys, eos list, one MTP layer
    return {
        "architectures": ["Glm4MoeForCausalLM"],
        "attention_bias": True,
        "attention_dropout": 0.0,
        "pad_token_id": 0,
        "eos_token_id": [2, 1],
        "head_dim": 16,
        "hidden_act": "silu",
        "hidden_size": 64,
        "partial_rotary_factor": 0.5,
        "initializer_range": 0.02,
        "intermediate_size": 128,
        "max_position_embeddings": 512,
        "model_type": "glm4_moe",
        "moe_intermediate_size": 32,
        "norm_topk_prob": True,
        "num_attention_heads": 4,
        "n_group": 2,
        "topk_group": 1,
        "n_routed_experts": 8,
        "n_shared_experts": 1,
        "routed_scaling_factor": 2.5,
        "num_experts_per_tok": 2,
        "first_k_dense_replace": 1,
        "num_hidden_layers": 3,
        "num_key_value_heads": 2,
        "num_nextn_predict_layers": 1,
        "rms_norm_eps": 1e-05,
        "rope_scaling": None,
        "rope_theta": c["rope_parameters"]["rope_theta"],
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.54.0",
        "use_cache": True,
        "use_qk_norm": False,
        "vocab_size": 320,
    }


def glm4_lite_config(c: dict) -> dict:
    # GLM-4.7-Flash's config.json: DeepSeek-V3 keys under model_type glm4_moe_lite, one MTP layer
    return {
        "architectures": ["Glm4MoeLiteForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": 0,
        "eos_token_id": [2],
        "pad_token_id": 0,
        "first_k_dense_replace": 1,
        "hidden_act": "silu",
        "hidden_size": 64,
        "intermediate_size": 128,
        "kv_lora_rank": 32,
        "max_position_embeddings": 512,
        "model_type": "glm4_moe_lite",
        "moe_intermediate_size": 32,
        "n_group": 1,
        "n_routed_experts": 8,
        "n_shared_experts": 1,
        "norm_topk_prob": True,
        "num_attention_heads": 4,
        "num_experts_per_tok": 2,
        "num_hidden_layers": 3,
        "num_key_value_heads": 4,
        "num_nextn_predict_layers": 1,
        "q_lora_rank": 48,
        "qk_nope_head_dim": 16,
        "qk_rope_head_dim": 8,
        "rms_norm_eps": 1e-05,
        "rope_interleave": True,
        "rope_scaling": None,
        "rope_theta": c["rope_parameters"]["rope_theta"],
        "routed_scaling_factor": 1.8,
        "scoring_func": "sigmoid",
        "tie_word_embeddings": False,
        "topk_group": 1,
        "topk_method": "noaux_tc",
        "torch_dtype": "bfloat16",
        "v_head_dim": 16,
        "vocab_size": 320,
    }


def dots1_config(c: dict) -> dict:
    return {
        "architectures": ["Dots1ForCausalLM"],
        "attention_bias": False,
        "first_k_dense_replace": 1,
        "head_dim": 16,
        "hidden_act": "silu",
        "hidden_size": 64,
        "intermediate_size": 128,
        "max_position_embeddings": 512,
        "max_window_layers": 3,
        "model_type": "dots1",
        "moe_intermediate_size": 32,
        "moe_layer_freq": 1,
        "n_group": 1,
        "n_routed_experts": 8,
        "n_shared_experts": 1,
        "norm_topk_prob": True,
        "num_attention_heads": 4,
        "num_experts_per_tok": 2,
        "num_hidden_layers": 3,
        "num_key_value_heads": 4,
        "rms_norm_eps": 1e-05,
        "rope_scaling": None,
        "rope_theta": c["rope_parameters"]["rope_theta"],
        "routed_scaling_factor": 2.5,
        "scoring_func": "sigmoid",
        "sliding_window": None,
        "tie_word_embeddings": False,
        "topk_group": 1,
        "topk_method": "noaux_tc",
        "use_sliding_window": False,
        "vocab_size": 320,
    }


def minimax_config(c: dict) -> dict:
    return {
        "architectures": ["MiniMaxM2ForCausalLM"],
        "attn_type_list": [1, 1],
        "head_dim": 16,
        "hidden_act": "silu",
        "hidden_size": 64,
        "intermediate_size": 32,
        "max_position_embeddings": 512,
        "model_type": "minimax_m2",
        "mtp_transformer_layers": 1,
        "num_attention_heads": 4,
        "num_experts_per_tok": 2,
        "num_hidden_layers": 2,
        "num_key_value_heads": 2,
        "num_local_experts": 8,
        "num_mtp_modules": 3,
        "output_router_logits": False,
        "qk_norm_type": "per_layer",
        "rms_norm_eps": 1e-06,
        "rope_theta": c["rope_parameters"]["rope_theta"],
        "rotary_dim": 8,
        "router_aux_loss_coef": 0.001,
        "router_jitter_noise": 0.0,
        "scoring_func": "sigmoid",
        "shared_intermediate_size": 0,
        "tie_word_embeddings": False,
        "use_mtp": True,
        "use_qk_norm": True,
        "use_routing_bias": True,
        "vocab_size": 320,
        "partial_rotary_factor": 0.5,
    }


def ernie_config(c: dict) -> dict:
    # ERNIE-4.5-21B-A3B: MoE from moe_layer_start_index to moe_layer_end_index, fused qkv / up_gate in this test
    return {
        "architectures": ["Ernie4_5_MoeForCausalLM"],
        "bos_token_id": 0,
        "eos_token_id": 2,
        "hidden_act": "silu",
        "hidden_size": 64,
        "intermediate_size": 64,
        "max_position_embeddings": 512,
        "model_type": "ernie4_5_moe",
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "num_hidden_layers": 3,
        "pad_token_id": 0,
        "rms_norm_eps": 1e-05,
        "use_cache": False,
        "vocab_size": 320,
        "rope_theta": c["rope_parameters"]["rope_theta"],
        "use_bias": False,
        "tie_word_embeddings": True,
        "moe_num_experts": 8,
        "moe_num_shared_experts": 1,
        "moe_layer_start_index": 1,
        "moe_layer_end_index": 2,
        "moe_layer_interval": 1,
        "moe_intermediate_size": 32,
        "moe_capacity": [8, 8, 8],
        "moe_gate": "topk",
        "moe_k": 2,
        "moe_use_aux_free": True,
        "torch_dtype": "bfloat16",
    }


def fuse_ernie(ts: dict) -> dict:
    """ERNIE's fused layout: qkv_proj [(n_head + 2 n_kv) hd, H], dense up_gate_proj [2I, H] (gate rows first), an
    MTP block that the converter drops."""
    out = {}
    for k, v in ts.items():
        if k.endswith("self_attn.q_proj.weight"):
            b = k[: -len("q_proj.weight")]
            out[b + "qkv_proj.weight"] = np.concatenate([v, ts[b + "k_proj.weight"], ts[b + "v_proj.weight"]])
        elif k.endswith(("self_attn.k_proj.weight", "self_attn.v_proj.weight")):
            continue
        elif k.endswith("mlp.gate_proj.weight") and ".experts." not in k and "shared" not in k:
            b = k[: -len("gate_proj.weight")]
            out[b + "up_gate_proj.weight"] = np.concatenate([v, ts[b + "up_proj.weight"]])
        elif k.endswith("mlp.up_proj.weight") and ".experts." not in k and "shared" not in k:
            continue
        else:
            out[k] = v
    out["model.mtp_block.0.input_layernorm.weight"] = np.ones(64, np.float32)
    out["model.mtp_linear_proj.0.weight"] = np.zeros((64, 128), np.float32)
    return out


def llama4_config(c: dict) -> dict:
    # Llama-4 Scout's config.json: Llama4ForConditionalGeneration with text_config and vision_config
    text = {k: v for k, v in c.items() if k not in ("architectures", "transformers_version", "dtype")}
    text.update(model_type="llama4_text", rope_theta=c["rope_parameters"]["rope_theta"], rope_scaling=None)
    text.pop("rope_parameters", None)
    return {
        "architectures": ["Llama4ForConditionalGeneration"],
        "model_type": "llama4",
        "boi_token_index": 200080,
        "eoi_token_index": 200081,
        "image_token_index": 200092,
        "tie_word_embeddings": False,
        "text_config": text,
        "vision_config": {
            "model_type": "llama4_vision_model",
            "hidden_size": 32,
            "num_hidden_layers": 1,
            "image_size": 28,
            "patch_size": 14,
        },
    }


def multimodal_llama4(ts: dict) -> dict:
    out = {("language_model." + k): v for k, v in ts.items()}
    out["vision_model.patch_embedding.linear.weight"] = np.zeros((32, 588), np.float32)
    out["multi_modal_projector.linear_1.weight"] = np.zeros((64, 32), np.float32)
    return out


def gemma4_config(c: dict) -> dict:
    # gemma-4-26B-A4B's config.json: Gemma4ForConditionalGeneration; the global layers' head size and kv heads as
    # top-level text_config keys (transformers folds them into per_layer_config when it saves)
    text = {
        k: v for k, v in c.items() if k not in ("architectures", "transformers_version", "dtype", "per_layer_config")
    }
    text.update(model_type="gemma4_text", global_head_dim=32, num_global_key_value_heads=1)
    return {
        "architectures": ["Gemma4ForConditionalGeneration"],
        "model_type": "gemma4",
        "text_config": text,
        "vision_config": {"model_type": "gemma4_vision", "hidden_size": 32},
        "audio_config": {"model_type": "gemma4_audio", "hidden_size": 32},
        "tie_word_embeddings": True,
    }


def multimodal_gemma4(ts: dict) -> dict:
    out = {k.replace("model.", "model.language_model.", 1): v for k, v in ts.items()}
    out["model.vision_tower.patch_embedder.weight"] = np.zeros((32, 48), np.float32)
    out["model.audio_tower.conv.weight"] = np.zeros((32, 8), np.float32)
    out["model.embed_vision.embedding_projection.weight"] = np.zeros((64, 32), np.float32)
    return out


def lfm2_config(c: dict) -> dict:
    # LFM2-8B-A1B's config.json: norm_eps (no rms_norm_eps), legacy rope_theta
    return {
        "architectures": ["Lfm2MoeForCausalLM"],
        "model_type": "lfm2_moe",
        "bos_token_id": 0,
        "eos_token_id": 2,
        "pad_token_id": 0,
        "conv_L_cache": 3,
        "conv_bias": False,
        "hidden_size": 64,
        "intermediate_size": 128,
        "layer_types": ["conv", "full_attention", "conv", "full_attention"],
        "max_position_embeddings": 512,
        "moe_intermediate_size": 32,
        "norm_eps": 1e-05,
        "norm_topk_prob": True,
        "num_attention_heads": 4,
        "num_dense_layers": 1,
        "num_experts": 8,
        "num_experts_per_tok": 2,
        "num_hidden_layers": 4,
        "num_key_value_heads": 2,
        "rope_theta": c["rope_parameters"]["rope_theta"],
        "routed_scaling_factor": 1.0,
        "tie_embedding": True,
        "tie_word_embeddings": True,
        "use_expert_bias": True,
        "vocab_size": 320,
        "torch_dtype": "bfloat16",
    }


def qwen35_config(c: dict) -> dict:
    # Qwen3.5-35B-A3B's config.json: Qwen3_5MoeForConditionalGeneration, the text model in text_config
    text = {k: v for k, v in c.items() if k not in ("architectures", "transformers_version", "dtype")}
    text.update(model_type="qwen3_5_moe_text", full_attention_interval=4, mtp_num_hidden_layers=1)
    return {
        "architectures": ["Qwen3_5MoeForConditionalGeneration"],
        "model_type": "qwen3_5_moe",
        "text_config": text,
        "vision_config": {"model_type": "qwen3_5_moe", "hidden_size": 32, "depth": 1},
        "image_token_id": 248056,
        "tie_word_embeddings": False,
    }


def multimodal_qwen35(ts: dict) -> dict:
    """The release layout: the text model under model.language_model, a vision tower, and the MTP block under mtp.*
    (a copy of the last, full-attention, layer + fc / pre_fc_norm_* / norm), which the converter keeps."""
    out = {(k.replace("model.", "model.language_model.", 1) if k.startswith("model.") else k): v for k, v in ts.items()}
    out["model.visual.patch_embed.proj.weight"] = np.zeros((32, 48), np.float32)
    for k, v in ts.items():
        if k.startswith("model.layers.3."):
            out[k.replace("model.layers.3.", "mtp.layers.0.", 1)] = v
    H = ts["model.norm.weight"].shape[0]
    out["mtp.fc.weight"] = np.zeros((H, 2 * H), np.float32)
    for n in ("pre_fc_norm_embedding", "pre_fc_norm_hidden", "norm"):
        out[f"mtp.{n}.weight"] = np.zeros(H, np.float32)  # zero-centred: a unit gamma
    return out


def granite_h_config(c: dict) -> dict:
    # granite-4.0-h-tiny's config.json: layer_types in IBM's vocabulary (transformers 5 re-saves it as
    # linear_attention / full_attention), NoPE attention
    out = {k: v for k, v in c.items() if k not in ("transformers_version", "dtype")}
    out["layer_types"] = ["mamba" if t == "linear_attention" else "attention" for t in c["layer_types"]]
    out.update(mamba_conv_bias=True, mamba_proj_bias=False, position_embedding_type="nope", torch_dtype="bfloat16")
    return out


REAL = {
    "granitemoehybrid": (granite_h_config, None),
    "lfm2_moe": (lfm2_config, None),
    "qwen3_5_moe_text": (qwen35_config, multimodal_qwen35),
    "glm4_moe": (glm4_moe_config, lambda ts: mtp_layer(ts, 2, 3)),
    "glm4_moe_lite": (glm4_lite_config, lambda ts: mtp_layer(ts, 2, 3)),
    "dots1": (dots1_config, None),
    "minimax_m2": (minimax_config, None),
    "ernie4_5_moe": (ernie_config, fuse_ernie),
    "llama4_text": (llama4_config, multimodal_llama4),
    "gemma4_text": (gemma4_config, multimodal_gemma4),
}


@pytest.mark.parametrize("family", list(REAL))
def test_real_shaped_config_converts_to_the_same_model(family, tmp_path):
    make_config, layout = REAL[family]
    hf, ref_gguf = fixture_gguf(family)
    src = real_copy(family, tmp_path / "hf", make_config(config_of(hf)), layout or (lambda ts: ts))
    out = tmp_path / "real.gguf"
    convert(src, out, "f32", progress=False)
    assert np.array_equal(logits(out), logits(ref_gguf))


def test_hunyuan_real_config_lists_and_ntk_alpha(tmp_path):
    """Hunyuan-A13B's config: per-layer lists for moe_topk / moe_intermediate_size / num_shared_expert and
    'dynamic' RoPE with NTK alpha, written as the scaled base theta * alpha^(d / (d - 2))."""
    hf, _ = fixture_gguf("hunyuan_v1_moe")
    cfg = config_of(hf)
    cfg.pop("rope_parameters", None)
    cfg.update(
        rope_theta=10000.0,
        rope_scaling={
            "alpha": 1000.0,
            "beta_fast": 32,
            "beta_slow": 1,
            "factor": 1.0,
            "mscale": 1.0,
            "mscale_all_dim": 1.0,
            "type": "dynamic",
        },
        use_cla=False,
        cla_share_factor=2,
        num_experts=8,
        moe_topk=[2, 2],
        num_shared_expert=[1, 1],
        moe_intermediate_size=[128, 128],
    )
    src = real_copy("hunyuan_v1_moe", tmp_path / "hf", cfg)
    out = tmp_path / "h.gguf"
    convert(src, out, "f32", progress=False)
    kv = _core.read_gguf(str(out))["kv"]
    assert math.isclose(kv["hunyuan-moe.rope.freq_base"], 10000.0 * 1000.0 ** (16 / 14), rel_tol=1e-6)
    assert kv["hunyuan-moe.expert_used_count"] == 2 and kv["hunyuan-moe.expert_shared_count"] == 1
    cfg["moe_topk"] = [2, 4]
    (src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConversionError, match="moe_topk"):
        convert(src, tmp_path / "bad.gguf", "f32", progress=False)
    assert not (tmp_path / "bad.gguf").exists()


@pytest.mark.parametrize("family", [f for f in WAVE2_FAMILIES + HYBRID_FAMILIES if f != "gemma4_text"])
def test_q8_0_keeps_the_greedy_tokens(family):
    """f32 greedy continuation, then both files teacher-forced on it: q8_0 moves logits by at most 0.05 and picks
    f32's token wherever f32's top-1 margin exceeds twice that move (tiny random models have near-ties of 1e-4,
    where either token is right). Gemma-4 is left out: its attention scale 1 over unit-RMS q/k makes the random
    fixture chaotic under any quantization (q8_0 moves its logits by 0.2-0.5, and llama.cpp's q8_0 of the same
    file differs from llama.cpp's f32 as much); its f32 parity and llama.cpp cross-check cover its math."""
    out = {}
    for type_name in ("f32", "q8_0"):
        _, path = fixture_gguf(family, type_name)
        with moelite.load(path, n_threads=1, kv_type="f32") as m:
            if type_name == "f32":
                seq = PROMPT + m.generate(PROMPT, max_tokens=16, stop_ids=[])
            out[type_name] = m.logits(seq)
    f32, q8 = out["f32"], out["q8_0"]
    moved = float(np.abs(f32 - q8).max())
    assert moved <= 0.05, f"{family}: q8_0 moves logits by {moved}"
    top2 = np.sort(f32, axis=-1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > 2 * moved
    assert clear.sum() >= len(seq) // 3, f"{family}: too few positions with a clear greedy choice"
    assert np.array_equal(q8.argmax(-1)[clear], f32.argmax(-1)[clear])


UNSUPPORTED = [
    ("llama4_text", {"attention_chunk_size": 16}, "attention_chunk_size"),
    ("llama4_text", {"no_rope_layers": [1, 0, 1, 0]}, "no_rope_layers"),
    ("gemma4_text", {"hidden_size_per_layer_input": 8}, "per-layer embeddings"),
    ("gemma4_text", {"enable_moe_block": False}, "enable_moe_block"),
    ("glm4_moe_lite", {"rope_interleave": False}, "rope_interleave"),
    ("ernie4_5_moe", {"moe_layer_end_index": 1}, "moe_layer_end_index"),
]


@pytest.mark.parametrize("family,change,needle", UNSUPPORTED)
def test_unsupported_variants_are_refused_by_name(family, change, needle, tmp_path):
    hf, _ = fixture_gguf(family)
    cfg = {**config_of(hf), **change}
    src = real_copy(family, tmp_path / "hf", cfg)
    with pytest.raises(ConversionError, match=needle):
        convert(src, tmp_path / "out.gguf", "f32", progress=False)
    assert not (tmp_path / "out.gguf").exists()


def test_vision_only_llama4_checkpoint_is_refused(tmp_path):
    """A Llama-4 checkpoint holding only the vision tower (no language model): no file, an error naming it."""
    hf, _ = fixture_gguf("llama4_text")
    src = real_copy(
        "llama4_text",
        tmp_path / "hf",
        llama4_config(config_of(hf)),
        lambda ts: {k: v for k, v in multimodal_llama4(ts).items() if not k.startswith("language_model.")},
    )
    with pytest.raises(ConversionError, match="embed_tokens"):
        convert(src, tmp_path / "out.gguf", "f32", progress=False)
    assert not (tmp_path / "out.gguf").exists()


def test_unknown_checkpoint_quantization_is_refused(tmp_path):
    """A quantized checkpoint format moelite cannot read (AWQ, GPTQ, ...) is refused naming the key."""
    hf, _ = fixture_gguf("glm4_moe")
    cfg = {**config_of(hf), "quantization_config": {"quant_method": "awq", "bits": 4, "group_size": 128}}
    src = real_copy("glm4_moe", tmp_path / "hf", cfg)
    with pytest.raises(ConversionError, match="quant_method"):
        convert(src, tmp_path / "out.gguf", "f32", progress=False)


@pytest.mark.parametrize(
    "family,tensor",
    [
        ("gemma4_text", "blk.0.post_ffw_norm_1.weight"),
        ("gemma4_text", "blk.0.layer_output_scale.weight"),
        ("qwen3_5_moe_text", "blk.0.ssm_a"),
        ("qwen3_5_moe_text", "blk.0.ssm_conv1d.weight"),
        ("granitemoehybrid", "blk.0.ssm_d"),
        ("lfm2_moe", "blk.0.shortconv.conv.weight"),
    ],
)
def test_f32_only_tensors_retyped_are_refused(family, tensor):
    """Norm weights, scales, conv kernels and A/D vectors feed ops that take F32 only (ggml aborts otherwise): a
    file holding them as F16 is a ModelFormatError naming the tensor, before the core sees it."""
    from moelite.errors import ModelFormatError
    from moelite.runtime.validate import load_hparams

    _, path = fixture_gguf(family)
    meta = _core.read_gguf(str(path))
    tensors = {n: (t, s, o, b) for n, t, s, o, b in meta["tensors"]}
    t, shape, off, nbytes = tensors[tensor]
    tensors[tensor] = (1, shape, off, nbytes // 2)  # F16
    with pytest.raises(ModelFormatError, match=tensor.replace(".", r"\.")):
        load_hparams(str(path), meta["kv"], tensors)
