"""Tiny random Hugging Face MoE checkpoints for tests, one per family, built with transformers.

    make_hf_model("qwen3_moe", tmp)            -> Path of a cached HF directory (config.json, sharded
                                                  model-0000x-of-0000y.safetensors + index, tokenizer.json,
                                                  tokenizer_config.json with a chat template, generation_config.json)
    hf_logits(model_dir, [1, 2, 3])            -> np.ndarray [n_tokens, n_vocab] float32
    hf_greedy(model_dir, [1, 2, 3], n=8)       -> list[int] (the n generated ids)

Fixtures are cached under tests/.fixtures/ (git-ignored), keyed by family, seed and overrides, and built
atomically (temp dir + rename), so parallel test runs share them. `out_dir` is accepted for API symmetry
but the cache is what is returned: pass out_dir=None.

The configs follow real checkpoints and avoid the llama.cpp traps the families table of README.md notes (qwen3_moe
norm_topk_prob=True, qwen2_moe False + shared expert, olmoe n_kv_heads == n_heads, deepseek_v2 with
q_lora_rank, deepseek_v3 with groups and a non-zero e_score_correction_bias, gpt_oss sliding/full layers
with sinks and yarn, granitemoe non-trivial multipliers). All 1-D parameters (norm weights, biases, sinks)
are perturbed away from their 1/0 init so that a wrong norm or bias mapping shows up in logits.

config.json is what a checkpoint ships: each config class gets only the kwargs it defines (a key it would keep
as an unknown attribute is left out, so save_pretrained adds nothing), and the release-only keys of the real
config.json that the converter reads (RELEASE_KEYS) are written into it after save_pretrained.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

FIXTURE_ROOT = Path(__file__).resolve().parent / ".fixtures"
FAMILIES = (
    "mixtral",
    "qwen2_moe",
    "qwen3_moe",
    "olmoe",
    "deepseek_v2",
    "deepseek_v3",
    "gpt_oss",
    "granitemoe",
    "granitemoeshared",
    "phimoe",
)
# wave 2: attention-only families; configs carry the keys and flags of the real checkpoints
WAVE2_FAMILIES = (
    "glm4_moe",
    "glm4_moe_lite",
    "dots1",
    "minimax_m2",
    "ernie4_5_moe",
    "hunyuan_v1_moe",
    "llama4_text",
    "gemma4_text",
)
# hybrid recurrent: attention layers mixed with short-conv / Gated DeltaNet / Mamba2 layers (wave 2; nemotron_h wave 3)
HYBRID_FAMILIES = ("lfm2_moe", "qwen3_5_moe_text", "qwen3_next", "granitemoehybrid", "nemotron_h")
# wave 3, attention-only: the release configs' keys and flags
WAVE3_FAMILIES = ("exaone_moe", "hy_v3", "mistral4", "afmoe", "cohere2_moe", "laguna", "mimo_v2_flash", "step3p5")
# wave 3 with KDA linear attention (issue 30): tests/test_kda_families.py
KDA_FAMILIES = ("kimi_linear", "bailing_hybrid")
# DSA (DeepSeek Sparse Attention): MLA with a lightning indexer; the selection budget shrunk to 16 positions so that
# a prompt of a few dozen tokens exercises the sparse path, 16 indexer heads (with 2, relu'd scores tie at 0 and
# transformers' own cached decode picks other positions than its full forward), indexer keys of 64 (llama.cpp's
# Hadamard rotation of the indexer q / k takes a multiple of 64)
# Hy4 (hy_v4): DSA with IndexShare plus hyper-connections (4 residual streams), sinks and a per-element output gate
# GLM-5.3-Flash (glm5_next_text): KDA layers and NoPE MLA with the KPool indexer (pools of 2 keys here), IndexShare,
# mHC streams; its checkpoint is the multimodal wrapper (WRAPPED)
DSA_FAMILIES = ("deepseek_v32", "glm_moe_dsa", "hy_v4", "glm5_next_text")
# Qwen3.8-Flash-Next (qwen4exp): Qwen3.5's hybrid with gated hyper-connections, QSA on the full-attention layer and the
# PLE n-gram hash table on a Gated DeltaNet layer: tests/test_qwen4exp.py
QWEN4EXP_FAMILIES = ("qwen4_exp_text",)
# families whose checkpoints ship inside a multimodal wrapper that transformers builds (and llama.cpp's converter
# takes) only as such: family -> the wrapper's model_type; the fixture is the wrapper with a 1-layer vision tower
WRAPPED = {"mistral4": "mistral3", "step3p5": "step3p7", "glm5_next_text": "glm5_next"}
_FIXTURE_VERSION = 2  # bump when the generator changes, so stale caches are not reused

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 0, 1, 2
# families whose converter needs their own special tokens (llama.cpp's GLM vocab: BOS [gMASK], EOT <|user|>, ...)
GLM_SPECIALS = ["[gMASK]", "<sop>", "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>"]
FAMILY_SPECIALS = {
    "glm4_moe": GLM_SPECIALS,
    "glm4_moe_lite": GLM_SPECIALS,
    "glm_moe_dsa": GLM_SPECIALS,
    "glm5_next_text": GLM_SPECIALS,
}
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
VOCAB_SIZE = 320  # tokenizer size; configs use the same vocab_size

_COMMON = dict(
    vocab_size=VOCAB_SIZE,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    bos_token_id=0,
    eos_token_id=2,
    pad_token_id=0,
    tie_word_embeddings=False,
)

# DeepSeek-V3.2's tiny instance (MLA + the lightning indexer, budget 16, see DSA_FAMILIES); GLM-5's differs in a few keys
_DSA = dict(
    n_routed_experts=8,
    num_experts_per_tok=2,
    moe_intermediate_size=32,
    n_shared_experts=1,
    num_key_value_heads=4,
    first_k_dense_replace=1,
    kv_lora_rank=16,
    q_lora_rank=32,
    qk_nope_head_dim=16,
    qk_rope_head_dim=8,
    v_head_dim=16,
    n_group=2,
    topk_group=1,
    norm_topk_prob=True,
    routed_scaling_factor=2.5,
    num_hidden_layers=3,
    rms_norm_eps=1e-6,
    rope_theta=1e4,
    index_topk=16,
    index_head_dim=64,
    index_n_heads=16,
)

# Qwen3.5-MoE's tiny instance (3 Gated DeltaNet layers : 1 gated attention layer); Qwen4-Exp's builds on it
_QWEN35_MOE = dict(
    num_hidden_layers=4,
    head_dim=32,
    linear_num_key_heads=2,
    linear_num_value_heads=4,
    linear_key_head_dim=16,
    linear_value_head_dim=16,
    linear_conv_kernel_dim=4,
    num_experts=8,
    num_experts_per_tok=2,
    moe_intermediate_size=32,
    shared_expert_intermediate_size=48,
    rms_norm_eps=1e-6,
    rope_parameters={
        "rope_type": "default",
        "rope_theta": 1e6,
        "partial_rotary_factor": 0.25,
        "mrope_section": [2, 1, 1],
        "mrope_interleaved": True,
    },
)

# family -> transformers config kwargs (on top of _COMMON)
CONFIGS: dict[str, dict[str, Any]] = {
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2, rope_theta=1e6, rms_norm_eps=1e-5),
    "phimoe": dict(
        num_local_experts=4,
        num_experts_per_tok=2,
        rope_theta=1e4,
        rms_norm_eps=1e-5,
        attention_bias=True,
        lm_head_bias=True,
        router_jitter_noise=0.0,
        input_jitter_noise=0.0,
    ),
    "qwen2_moe": dict(
        num_experts=8,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        shared_expert_intermediate_size=64,
        norm_topk_prob=False,
        rms_norm_eps=1e-6,
        rope_theta=1e6,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        qkv_bias=True,
    ),
    "qwen3_moe": dict(
        num_experts=8,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        norm_topk_prob=True,
        rms_norm_eps=1e-6,
        rope_theta=1e6,
        decoder_sparse_step=1,
        mlp_only_layers=[],
    ),
    "olmoe": dict(
        num_experts=8,
        num_experts_per_tok=2,
        intermediate_size=32,
        num_key_value_heads=4,
        rms_norm_eps=1e-5,
        rope_theta=1e4,
        norm_topk_prob=False,
        pad_token_id=0,
    ),
    "deepseek_v2": dict(
        n_routed_experts=8,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        n_shared_experts=2,
        num_key_value_heads=4,
        first_k_dense_replace=1,
        kv_lora_rank=32,
        q_lora_rank=48,
        qk_nope_head_dim=16,
        qk_rope_head_dim=8,
        v_head_dim=16,
        head_dim=8,
        topk_method="greedy",
        n_group=1,
        topk_group=1,
        norm_topk_prob=False,
        routed_scaling_factor=1.0,
        rms_norm_eps=1e-6,
        num_hidden_layers=3,
        max_position_embeddings=40 * 128,
        rope_parameters=dict(
            rope_type="yarn",
            rope_theta=1e4,
            factor=40.0,
            beta_fast=32.0,
            beta_slow=1.0,
            mscale=0.707,
            mscale_all_dim=0.707,
            original_max_position_embeddings=128,
        ),
    ),
    "deepseek_v3": dict(
        n_routed_experts=8,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        n_shared_experts=1,
        num_key_value_heads=4,
        first_k_dense_replace=1,
        kv_lora_rank=32,
        q_lora_rank=48,
        qk_nope_head_dim=16,
        qk_rope_head_dim=8,
        v_head_dim=16,
        head_dim=8,
        n_group=4,
        topk_group=2,
        norm_topk_prob=True,
        routed_scaling_factor=2.5,
        rms_norm_eps=1e-6,
        num_hidden_layers=3,
        rope_interleave=True,
        rope_theta=1e4,
    ),
    "deepseek_v32": _DSA,
    # GLM-5.2: IndexShare (layer 1 reuses layer 0's selection), interleaved RoPE in the indexer
    "glm_moe_dsa": {**_DSA, "n_group": 1, "rms_norm_eps": 1e-5, "indexer_types": ["full", "shared", "full"]},
    # Hy4: the SwiGLU limit shrunk from 10 to bite on random weights (gate and up values of ~0.05 here)
    "hy_v4": {
        **{k: v for k, v in _DSA.items() if k not in ("first_k_dense_replace", "n_group", "topk_group", "rope_theta")},
        "rms_norm_eps": 1e-5,
        "indexer_types": ["full", "shared", "full"],
        "mlp_layer_types": ["dense", "sparse", "sparse"],
        "hc_mult": 4,
        "swiglu_limit": 0.03,
    },
    # GLM-5.3-Flash: KDA, MLA, MLA (the second sharing the first's pools), KDA; the SwiGLU limit shrunk as Hy4's
    "glm5_next_text": {
        **{k: v for k, v in _DSA.items() if k not in ("first_k_dense_replace", "n_group", "topk_group", "rope_theta")},
        "num_hidden_layers": 4,
        "qk_rope_head_dim": 0,
        "rms_norm_eps": 1e-5,
        "routed_scaling_factor": 2.5,
        "layer_types": ["linear_attention", "indexed_attention", "indexed_attention", "linear_attention"],
        "indexer_types": ["full", "full", "shared", "full"],
        "mlp_layer_types": ["dense", "sparse", "sparse", "sparse"],
        "index_kpool": 2,
        "linear_num_heads": 4,
        "linear_head_dim": 16,
        "linear_conv_kernel_dim": 4,
        "hc_mult": 4,
        "swiglu_limit": 0.03,
    },
    "gpt_oss": dict(
        num_local_experts=4,
        num_experts_per_tok=2,
        intermediate_size=48,
        head_dim=16,
        max_position_embeddings=32 * 128,
        num_attention_heads=4,
        num_key_value_heads=2,
        sliding_window=8,
        attention_bias=True,
        layer_types=["sliding_attention", "full_attention"],
        rms_norm_eps=1e-5,
        rope_parameters=dict(
            rope_type="yarn",
            rope_theta=150000.0,
            factor=32.0,
            beta_fast=32.0,
            beta_slow=1.0,
            truncate=False,
            original_max_position_embeddings=128,
        ),
    ),
    "granitemoe": dict(
        num_local_experts=4,
        num_experts_per_tok=2,
        intermediate_size=48,
        rope_theta=1e4,
        embedding_multiplier=12.0,
        logits_scaling=8.0,
        residual_multiplier=0.22,
        attention_multiplier=0.0078125,
        rms_norm_eps=1e-6,
    ),
    # --- wave 2 ---
    "glm4_moe": dict(
        n_routed_experts=8,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        n_shared_experts=1,
        first_k_dense_replace=1,
        num_hidden_layers=3,
        partial_rotary_factor=0.5,
        attention_bias=True,
        use_qk_norm=False,
        n_group=2,
        topk_group=1,
        norm_topk_prob=True,
        routed_scaling_factor=2.5,
        num_nextn_predict_layers=0,
        rms_norm_eps=1e-5,
        rope_theta=1e6,
    ),
    "glm4_moe_lite": dict(
        n_routed_experts=8,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        n_shared_experts=1,
        num_hidden_layers=3,
        num_key_value_heads=4,
        kv_lora_rank=32,
        q_lora_rank=48,
        qk_nope_head_dim=16,
        qk_rope_head_dim=8,
        v_head_dim=16,
        head_dim=8,
        n_group=1,
        topk_group=1,
        norm_topk_prob=True,
        routed_scaling_factor=1.8,
        rms_norm_eps=1e-5,
        rope_theta=1e6,
    ),
    "dots1": dict(
        n_routed_experts=8,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        n_shared_experts=1,
        first_k_dense_replace=1,
        num_hidden_layers=3,
        num_key_value_heads=4,
        n_group=1,
        topk_group=1,
        norm_topk_prob=True,
        routed_scaling_factor=2.5,
        rms_norm_eps=1e-5,
        rope_theta=1e6,
    ),
    "minimax_m2": dict(
        num_local_experts=8,
        num_experts_per_tok=2,
        intermediate_size=32,
        head_dim=16,
        partial_rotary_factor=0.5,
        rms_norm_eps=1e-6,
        rope_theta=5e6,
    ),
    "ernie4_5_moe": dict(
        moe_num_experts=8,
        moe_k=2,
        moe_intermediate_size=32,
        moe_num_shared_experts=1,
        moe_layer_start_index=1,
        moe_layer_interval=1,
        intermediate_size=64,
        num_hidden_layers=3,
        use_bias=False,
        rms_norm_eps=1e-5,
        rope_theta=5e5,
        tie_word_embeddings=True,
    ),
    "hunyuan_v1_moe": dict(num_experts=8, moe_topk=[2, 2], head_dim=16, rms_norm_eps=1e-5, rope_theta=1e4),
    "llama4_text": dict(
        num_local_experts=8,
        num_experts_per_tok=1,
        interleave_moe_layer_step=2,
        num_hidden_layers=4,
        intermediate_size=32,
        intermediate_size_mlp=128,
        head_dim=16,
        use_qk_norm=True,
        attention_chunk_size=8192,
        no_rope_layers=[1, 1, 1, 0],
        rms_norm_eps=1e-5,
        rope_theta=5e5,
    ),
    "gemma4_text": dict(
        num_experts=8,
        top_k_experts=2,
        moe_intermediate_size=32,
        enable_moe_block=True,
        head_dim=16,
        global_head_dim=32,
        num_global_key_value_heads=1,
        attention_k_eq_v=True,
        sliding_window=4,
        num_hidden_layers=4,
        hidden_size_per_layer_input=0,
        final_logit_softcapping=30.0,
        layer_types=["sliding_attention"] * 3 + ["full_attention"],
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        hidden_activation="gelu_pytorch_tanh",
        rope_parameters={
            "sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
            "full_attention": {"rope_type": "proportional", "rope_theta": 1e6, "partial_rotary_factor": 0.25},
        },
    ),
    # --- wave 2, hybrid recurrent ---
    "lfm2_moe": dict(
        num_hidden_layers=4,
        layer_types=["conv", "full_attention", "conv", "full_attention"],
        conv_L_cache=3,
        num_dense_layers=1,
        num_experts=8,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        use_expert_bias=True,
        norm_topk_prob=True,
        routed_scaling_factor=1.0,
        norm_eps=1e-5,
        rope_theta=1e6,
        tie_word_embeddings=True,
    ),
    "qwen3_5_moe_text": _QWEN35_MOE,
    # [L, L(PLE), L, Q]: 3-grams hashed into 2 heads each (prime vocabularies above 97, 2 shards), QSA with 8 indexer
    # heads of 16 over blocks of 2 keys and a budget of 512 positions (dense: make_hf_model(.., indexer_budget=4) for
    # the sparse path), 4 streams of rank 8; llama.cpp hardcodes the sigmoid output gate
    "qwen4_exp_text": dict(
        **_QWEN35_MOE,
        hc_count=4,
        hc_lowrank=8,
        ple_layer_ids=[2],
        ngram_size=3,
        heads_per_ngram=2,
        ngram_vocab_size_base=97,
        split_ngram_parts=2,
        indexer_n_heads=8,
        indexer_kv_heads=1,
        indexer_head_dim=16,
        indexer_budget=512,
        indexer_compress_ratio=2,
        output_gate_type="sigmoid",
    ),
    "qwen3_next": dict(  # Qwen3.5's instance with plain NeoX RoPE (no M-RoPE sections) and a dense-layer width
        **{k: v for k, v in _QWEN35_MOE.items() if k != "rope_parameters"},
        intermediate_size=96,
        partial_rotary_factor=0.25,
        norm_topk_prob=True,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        rope_theta=1e6,
    ),
    "granitemoehybrid": dict(
        num_hidden_layers=4,
        layer_types=["mamba", "mamba", "attention", "mamba"],
        num_local_experts=8,
        num_experts_per_tok=2,
        intermediate_size=32,
        shared_intermediate_size=64,
        mamba_n_heads=4,
        mamba_d_head=32,
        mamba_d_state=16,
        mamba_n_groups=1,
        mamba_d_conv=4,
        mamba_chunk_size=16,
        mamba_expand=2,
        position_embedding_type="nope",
        embedding_multiplier=12.0,
        residual_multiplier=0.22,
        logits_scaling=8.0,
        attention_multiplier=0.0078125,
        rms_norm_eps=1e-6,
    ),
    # --- wave 3 ---
    # K-EXAONE: 3 sliding (RoPE) : 1 full (NoPE) layers, QK-norm, DeepSeek-V3 routing (groups, bias, x 2.5)
    "exaone_moe": dict(
        num_hidden_layers=4,
        num_experts=8,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        num_shared_experts=1,
        first_k_dense_replace=1,
        n_group=2,
        topk_group=1,
        norm_topk_prob=True,
        routed_scaling_factor=2.5,
        sliding_window=5,
        sliding_window_pattern=4,
        rms_norm_eps=1e-5,
        rope_theta=1e6,
    ),
    # Hy3: QK-norm GQA, the first layer dense (mlp_layer_types), sigmoid + bias routing x 2.826, a shared expert
    "hy_v3": dict(
        num_hidden_layers=3,
        num_experts=8,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        num_shared_experts=1,
        head_dim=16,
        router_scaling_factor=2.826,
        rms_norm_eps=1e-5,
        initializer_range=0.02,
    ),  # the class default 0.006 leaves logits ~0.1: too weak a check
    # Mistral Small 4 (inside Mistral3ForConditionalGeneration): MLA, softmax routing over 2 groups, YaRN with
    # mscale and the Llama-4 attention temperature (from position 512 on: the tests stay below, as llama.cpp's HF
    # converter drops it; test_wave3_families checks it past its period)
    "mistral4": dict(
        n_routed_experts=8,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        n_shared_experts=1,
        num_key_value_heads=4,
        first_k_dense_replace=1,
        kv_lora_rank=16,
        q_lora_rank=32,
        qk_nope_head_dim=16,
        qk_rope_head_dim=8,
        v_head_dim=16,
        n_group=2,
        topk_group=1,
        norm_topk_prob=True,
        routed_scaling_factor=1.5,
        num_hidden_layers=3,
        rms_norm_eps=1e-6,
        max_position_embeddings=8 * 512,
        rope_parameters=dict(
            rope_type="yarn",
            rope_theta=1e4,
            factor=8.0,
            beta_fast=32.0,
            beta_slow=1.0,
            mscale=1.0,
            mscale_all_dim=1.0,
            original_max_position_embeddings=512,
            llama_4_scaling_beta=0.1,
        ),
    ),
    # Trinity: sandwich norms, QK-norm, per-element sigmoid attention gate, 3 sliding (RoPE) : 1 full (NoPE), muP
    # embedding scale, sigmoid + bias routing renormalised x route_scale, a shared expert, the first layer dense
    "afmoe": dict(
        num_hidden_layers=4,
        num_dense_layers=1,
        num_experts=8,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        num_shared_experts=1,
        head_dim=16,
        route_scale=2.5,
        sliding_window=5,
        global_attn_every_n_layers=4,
        mup_enabled=True,
        rms_norm_eps=1e-5,
        rope_theta=1e4,
    ),
    # Cohere North: parallel blocks, RMSNorm, 3 sliding (RoPE) : 1 full (NoPE) after a dense first layer (full, roped),
    # sigmoid routing without renormalisation, logit scale, tied embeddings (first_k_dense_replace: a kwarg the class
    # turns into mlp_layer_types / layer_types)
    "cohere2_moe": dict(
        num_hidden_layers=5,
        first_k_dense_replace=1,
        num_experts=8,
        num_experts_per_tok=2,
        intermediate_size=32,
        prefix_dense_intermediate_size=128,
        head_dim=16,
        sliding_window=5,
        expert_selection_fn="sigmoid",
        norm_topk_prob=False,
        logit_scale=0.25,
        rms_norm_eps=1e-5,
        rope_theta=5e4,
        tie_word_embeddings=True,
    ),
    # Nemotron 3: single-purpose blocks (Mamba2, NoPE GQA attention, ReLU² MoE with a ReLU² shared expert and no
    # gates), sigmoid + bias routing renormalised x routed_scaling_factor, latent MoE (Super's; Nano has none)
    "nemotron_h": dict(
        layers_block_type=["linear_attention", "moe", "full_attention", "moe", "linear_attention", "moe"],
        n_routed_experts=8,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        moe_shared_expert_intermediate_size=48,
        moe_latent_size=32,
        n_group=1,
        topk_group=1,
        norm_topk_prob=True,
        routed_scaling_factor=2.5,
        head_dim=16,
        mamba_num_heads=8,
        mamba_head_dim=16,
        n_groups=2,
        ssm_state_size=16,
        conv_kernel=4,
        chunk_size=16,
        layer_norm_epsilon=1e-5,
    ),
    # Laguna XS.2: query heads per layer, full layers at il % 4 == 0 (llama.cpp's fallback pattern) with partial YaRN
    # RoPE, sliding layers plain full RoPE on their own theta, QK-norm, per-head softplus output gate, sigmoid + bias
    # routing renormalised x 2.5, a shared expert of its own width, the first layer dense
    "laguna": dict(
        num_hidden_layers=5,
        num_attention_heads_per_layer=[4, 6, 6, 6, 4],
        head_dim=16,
        num_experts=8,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        shared_expert_intermediate_size=48,
        mlp_layer_types=["dense"] + ["sparse"] * 4,
        moe_routed_scaling_factor=2.5,
        gating=True,
        sliding_window=5,
        layer_types=["full_attention"] + ["sliding_attention"] * 3 + ["full_attention"],
        rms_norm_eps=1e-6,
        rope_parameters={
            "full_attention": {
                "rope_type": "yarn",
                "rope_theta": 5e5,
                "partial_rotary_factor": 0.5,
                "factor": 4.0,
                "original_max_position_embeddings": 128,
                "beta_fast": 32.0,
                "beta_slow": 1.0,
            },
            "sliding_attention": {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 1.0},
        },
    ),
    # MiMo-V2-Flash: full layers [F, S, S, F] (the last full, as the release's 48th), SWA layers with twice the KV heads
    # and sinks, q/k heads 24 / v heads 16, partial RoPE (0.334: 8 of 24 dims, class thetas), V x 0.707, sigmoid +
    # bias routing renormalised, no shared expert, the first layer dense; the window 5 + the query
    "mimo_v2_flash": dict(
        num_hidden_layers=4,
        num_key_value_heads=1,
        head_dim=24,
        v_head_dim=16,
        n_routed_experts=8,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        n_group=1,
        topk_group=1,
        sliding_window=6,
        layer_types=["full_attention", "sliding_attention", "sliding_attention", "full_attention"],
        rms_norm_eps=1e-5,
    ),
    # Step-3.5 (inside Step3p7ForConditionalGeneration, as Step-3.7-Flash ships): [F, S, S, F], sliding layers with
    # their own query heads (6), full layers half-rotated on theta 5e6, sliding full RoPE on 1e4; per-head sigmoid
    # gate, (1+w) norms, QK-norm; the first layer dense; sigmoid + bias routing renormalised x 2.5 + a shared expert;
    # SwiGLU clamps on the last layers (routed 0.5 / shared 0.4: they bite on these tiny activations)
    "step3p5": dict(
        num_hidden_layers=4,
        head_dim=16,
        n_routed_experts=8,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        share_expert_dim=48,
        moe_router_scaling_factor=2.5,
        sliding_window=5,
        layer_types=["full_attention", "sliding_attention", "sliding_attention", "full_attention"],
        num_sliding_attention_heads=6,
        mlp_layer_types=["dense", "sparse", "sparse", "sparse"],
        swiglu_limits=[0.0, 0.0, 0.5, 0.5],
        swiglu_limits_shared=[0.4, 0.0, 0.4, 0.4],
        rms_norm_eps=1e-5,
        rope_parameters={
            "full_attention": {"rope_type": "default", "rope_theta": 5e6, "partial_rotary_factor": 0.5},
            "sliding_attention": {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 1.0},
        },
    ),
    # Kimi-Linear: KDA, KDA, NoPE MLA, KDA; the first layer dense, then DeepSeek-V3 routing (sigmoid + bias, x 2.446)
    "kimi_linear": dict(
        num_hidden_layers=4,
        num_key_value_heads=4,
        layer_types=["linear_attention", "linear_attention", "full_attention", "linear_attention"],
        linear_num_heads=4,
        linear_head_dim=16,
        linear_conv_kernel_dim=4,
        kv_lora_rank=16,
        q_lora_rank=None,
        qk_rope_head_dim=8,
        qk_nope_head_dim=16,
        v_head_dim=16,
        num_local_experts=8,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        n_shared_experts=1,
        n_group=1,
        topk_group=1,
        routed_scaling_factor=2.446,
        rms_norm_eps=1e-5,
    ),
    # Ling-3.0: KDA x 3 (bounded decay, full-rank gates), then MLA with RoPE and a per-head gate; the first layer
    # dense, grouped sigmoid routing (2 groups, top 1), SwiGLU clamps on some routed / shared experts
    "bailing_hybrid": dict(
        num_hidden_layers=4,
        num_key_value_heads=4,
        layer_group_size=4,
        head_dim=16,
        short_conv_kernel_size=4,
        kv_lora_rank=16,
        q_lora_rank=None,
        qk_rope_head_dim=8,
        qk_nope_head_dim=16,
        v_head_dim=16,
        num_local_experts=8,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        n_shared_experts=1,
        n_group=2,
        topk_group=1,
        routed_scaling_factor=2.5,
        first_k_dense_replace=1,
        num_mtp_layers=0,
        swiglu_limits=[0.0, 0.06, 0.0, 0.05],
        swiglu_limits_shared=[0.05, 0.0, 0.06, 0.0],
        rms_norm_eps=1e-6,
        rope_theta=6e6,
    ),
    "granitemoeshared": dict(
        num_local_experts=4,
        num_experts_per_tok=2,
        intermediate_size=48,
        rope_theta=1e4,
        shared_intermediate_size=80,
        embedding_multiplier=12.0,
        logits_scaling=8.0,
        residual_multiplier=0.22,
        attention_multiplier=0.0078125,
        rms_norm_eps=1e-6,
    ),
}

# family -> keys the real release config.json carries that the transformers config class does not define (so
# save_pretrained cannot write them), written into config.json after save_pretrained; only keys a converter reads
# (moelite's, or llama.cpp's in test_llama_cpp_cross: without scoring_func it gates with softmax). An override of
# one of them (make_hf_model(family, key=...)) takes its place.
RELEASE_KEYS: dict[str, dict[str, Any]] = {
    # Kimi-Linear's release config.json states its layout in linear_attn_config (1-based full_attn_layers) and
    # first_k_dense_replace, and its router in moe_router_activation_func (llama.cpp's converter reads them all)
    "kimi_linear": {
        "moe_router_activation_func": "sigmoid",
        "first_k_dense_replace": 1,
        "linear_attn_config": {
            "full_attn_layers": [3],
            "kda_layers": [1, 2, 4],
            "head_dim": 16,
            "num_heads": 4,
            "short_conv_kernel_size": 4,
        },
    },
    # GLM-5.3-Flash's text_config: the KDA sizes, NoPE MLA and mHC as the release states them (transformers folds
    # linear_attn_config into its own keys and saves neither mla_use_nope nor mhc); llama.cpp's converter reads them
    "glm5_next_text": {
        "linear_attn_config": {"num_heads": 4, "head_dim": 16, "short_conv_kernel_size": 4, "gate_lower_bound": -5.0},
        "mla_use_nope": True,
        "mhc": True,
        "first_k_dense_replace": 1,
    },
    # Glm4MoeLiteConfig has mlp_layer_types instead (["dense", "sparse", "sparse"] here)
    "glm4_moe_lite": {"first_k_dense_replace": 1, "scoring_func": "sigmoid"},
    "dots1": {"scoring_func": "sigmoid"},
    # MiniMax-M2 states partial RoPE as rotary_dim (64 of 128); transformers turns it into partial_rotary_factor
    "minimax_m2": {"rotary_dim": 8},
    # Hunyuan-A13B stores these per layer; transformers' experts use intermediate_size (128 here)
    "hunyuan_v1_moe": {"moe_intermediate_size": [128, 128], "num_shared_expert": [1, 1]},
    # Gemma-4 (text_config); transformers folds them into per_layer_config (the class kwargs of CONFIGS)
    "gemma4_text": {"global_head_dim": 32, "num_global_key_value_heads": 1},
    # K-EXAONE's config.json says how its router scores (ExaoneMoeConfig has no such key; llama.cpp needs it)
    "exaone_moe": {"scoring_func": "sigmoid"},
    # Trinity's config.json says its router renormalises (AfmoeConfig always does and has no such key; llama.cpp's
    # converter writes expert_weights_norm only from it)
    "afmoe": {"route_norm": True},
    # MiMo-V2-Flash's release config.json states its layout in its own keys (transformers reads only
    # sliding_window_size of them, as sliding_window - 1, and hardcodes the rest); llama.cpp's converter reads them
    "mimo_v2_flash": {
        "hybrid_layer_pattern": [0, 1, 1, 0],
        "moe_layer_freq": [0, 1, 1, 1],
        "swa_num_key_value_heads": 2,
        "swa_num_attention_heads": 4,
        "swa_head_dim": 24,
        "swa_v_head_dim": 16,
        "topk_method": "noaux_tc",
        "scoring_func": "sigmoid",
        "sliding_window_size": 5,
        "rope_theta": 5e6,
        "swa_rope_theta": 1e4,
        "partial_rotary_factor": 0.334,
        "layernorm_epsilon": 1e-5,
    },
    # Step-3.5-Flash's config.json (text_config of Step-3.7-Flash) in its own keys, which transformers 5.25 consumes
    # (its class keys above say the same); llama.cpp's converter reads them (norm_expert_weight: else no renorm)
    "step3p5": {
        "attention_other_setting": {
            "attention_type": "sliding_attention",
            "num_attention_heads": 6,
            "num_attention_groups": 2,
            "head_dim": 16,
            "true_head_dim": 16,
        },
        "moe_layers_enum": "1,2,3",
        "rope_theta": [5e6, 1e4, 1e4, 5e6],
        "partial_rotary_factors": [0.5, 1.0, 1.0, 0.5],
        "norm_expert_weight": True,
    },
}


def _corpus() -> str:
    words = (
        "the of and to in is that expert router token layer cache memory disk model weight tensor "
        "mixture sparse dense gate up down shared attention key value head rope norm bias quant block "
        "a an it on for with as by from at be this are was not or we you they he she can will one two "
        "three hello world data file read write stream byte page align fast slow hit miss load store"
    ).split()
    rng = random.Random(1234)
    lines = []
    for _ in range(160):
        n = rng.randint(5, 14)
        s = " ".join(rng.choice(words) for _ in range(n))
        lines.append(s.capitalize() + rng.choice([".", "!", "?", ",", ";"]) + f" {rng.randint(0, 999)}")
    return "\n".join(lines) + "\n"


def _make_tokenizer(out: Path, extra_specials: list[str] = ()) -> None:
    """Byte-level BPE (GPT-2 pre-tokenizer) trained on a few KB of generated text; no hub download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    specials = SPECIAL_TOKENS + list(extra_specials)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=specials,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator([_corpus()] * 4, trainer=trainer)
    assert tok.get_vocab_size() == VOCAB_SIZE, tok.get_vocab_size()
    tok.save(str(out / "tokenizer.json"))
    added = {
        str(i): {
            "content": t,
            "lstrip": False,
            "rstrip": False,
            "normalized": False,
            "single_word": False,
            "special": True,
        }
        for i, t in enumerate(specials)
    }
    (out / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "added_tokens_decoder": added,
                "bos_token": "<|endoftext|>",
                "eos_token": "<|im_end|>",
                "pad_token": "<|endoftext|>",
                "model_max_length": 512,
                "clean_up_tokenization_spaces": False,
                "chat_template": CHAT_TEMPLATE,
            },
            indent=2,
        )
    )
    (out / "special_tokens_map.json").write_text(
        json.dumps({"bos_token": "<|endoftext|>", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}, indent=2)
    )


def _key(family: str, seed: int, overrides: dict[str, Any]) -> str:
    cfg = {**_COMMON, **CONFIGS[family]}  # the key follows the generator's config, not only the overrides
    spec = {"v": _FIXTURE_VERSION, "f": family, "s": seed, "c": cfg, "o": overrides}
    if family in FAMILY_SPECIALS:
        spec["t"] = FAMILY_SPECIALS[family]
    if family in RELEASE_KEYS:
        spec["r"] = RELEASE_KEYS[family]
    blob = json.dumps(spec, sort_keys=True, default=str)
    return f"{family}-s{seed}-{hashlib.sha256(blob.encode()).hexdigest()[:10]}"


def _config(family: str, overrides: dict[str, Any]):
    """The transformers config of `family`, given only the kwargs its class takes: a kwarg the class would keep
    as an unknown attribute (and so save_pretrained would write into config.json although the class does not
    define it) is left out; a kwarg the class consumes (Gemma-4's global_head_dim, partial_rotary_factor) is
    passed. Release-only keys are RELEASE_KEYS, written into config.json after save_pretrained. A test's own
    override is always passed: it stands for a key a real config.json carries and the modeling code reads as an
    attribute (Qwen3-MoE's head_dim: transformers' class does not define it, its attention reads it)."""
    from transformers import CONFIG_MAPPING

    cls = CONFIG_MAPPING[family]
    kw = {**_COMMON, **CONFIGS[family], **overrides}
    if "rope_theta" in kw and "rope_parameters" not in kw:
        kw["rope_parameters"] = {"rope_type": "default", "rope_theta": kw.pop("rope_theta")}
    kw.pop("rope_theta", None)
    own = class_keys(cls)
    kept = cls(**kw).to_dict()
    return cls(**{k: v for k, v in kw.items() if k in own or k not in kept or k in overrides})


def class_keys(cls) -> set[str]:
    """The config.json keys a transformers config class defines (its fields, the base class's, its aliases)."""
    return set(cls().to_dict()) | set(cls.default_config_fields()) | set(getattr(cls, "attribute_map", {}))


def _release_keys(family: str, overrides: dict[str, Any]) -> dict[str, Any]:
    """RELEASE_KEYS of `family`, an override of one of them taking its place."""
    return {k: overrides.get(k, v) for k, v in RELEASE_KEYS.get(family, {}).items()}


def _perturb(model, seed: int) -> None:
    """Move norm weights off 1, biases off 0, router correction bias off 0 (deterministic)."""
    import torch

    g = torch.Generator().manual_seed(seed + 7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
            elif name.endswith(("hc_fn", "attn_hc.fn", "ffn_hc.fn")):  # hyper-connection mixes (Hy4): init std 0.006
                p.mul_(50.0)  # makes the streams' gates all but constant; x50 lets them vary per token
            elif ".input_mix_weight_" in name:  # Qwen4-Exp's low-rank stream gates: the same, x20
                p.mul_(20.0)
            elif name.endswith("ple.conv1d.weight"):  # Qwen4-Exp's PLE conv starts at zero: make it count
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
            elif name.endswith("index_kpool_compress_gate"):  # GLM-5.3-Flash's KPool gate and slot biases start at
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)  # zero (a plain mean of a pool's keys)
            elif name.endswith("index_kpool_compress_ape"):
                p.copy_(torch.randn(p.shape, generator=g))
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(torch.rand(b.shape, generator=g) * 0.2)


def make_hf_model(
    family: str, out_dir: str | os.PathLike | None = None, *, seed: int = 0, **config_overrides: Any
) -> Path:
    """Build (or reuse) a tiny random HF checkpoint of `family`; returns its directory."""
    if family not in CONFIGS:
        raise ValueError(
            f"unknown family {family!r}; known: "
            f"{', '.join(FAMILIES + WAVE2_FAMILIES + HYBRID_FAMILIES + WAVE3_FAMILIES + KDA_FAMILIES + DSA_FAMILIES + QWEN4EXP_FAMILIES)}"
        )
    del out_dir  # the cache is the output
    FIXTURE_ROOT.mkdir(parents=True, exist_ok=True)
    final = FIXTURE_ROOT / _key(family, seed, config_overrides)
    if (final / "config.json").exists():
        return final

    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    torch.set_num_threads(1)
    tmp = Path(tempfile.mkdtemp(prefix=f".build-{family}-", dir=FIXTURE_ROOT))
    try:
        cfg = _config(family, config_overrides)
        torch.manual_seed(seed)
        if family in WRAPPED:
            cfg, model = _wrapped_model(family, cfg)
        else:
            model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32, attn_implementation="eager")
        _perturb(model, seed)
        model.eval()
        # ~2 shards so the index file and multi-shard reading are exercised
        n_bytes = sum(p.numel() * 4 for p in model.parameters())
        model.save_pretrained(tmp, safe_serialization=True, max_shard_size=max(n_bytes // 2 + 1, 50_000))
        release = _release_keys(family, config_overrides)
        if release:  # what the real release config.json carries beyond what transformers writes
            saved = json.loads((tmp / "config.json").read_text())
            if family in WRAPPED:  # the text model's own keys: in text_config
                saved = {**saved, "text_config": {**saved["text_config"], **release}}
            else:
                saved = {**saved, **release}
            (tmp / "config.json").write_text(json.dumps(saved, indent=2, sort_keys=True) + "\n")
        GenerationConfig(
            bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id, pad_token_id=cfg.pad_token_id, do_sample=False
        ).save_pretrained(tmp)
        _make_tokenizer(tmp, FAMILY_SPECIALS.get(family, []))
        try:
            tmp.rename(final)
        except OSError:  # another process won the race
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _wrapped_model(family: str, text_cfg):
    """The multimodal wrapper of `family` around its text config, with a tiny vision tower -> (config, model)."""
    import torch
    from transformers import AutoModelForImageTextToText, Mistral3Config, PixtralVisionConfig

    if WRAPPED[family] == "glm5_next":
        from transformers import Glm5NextConfig, Glm5NextVisionConfig

        vision = Glm5NextVisionConfig(
            depth=1,
            hidden_size=32,
            num_heads=2,
            intermediate_size=64,
            out_hidden_size=64,
            projection_intermediate_size=64,
            image_size=28,
            patch_size=14,
        )
        cfg = Glm5NextConfig(text_config=text_cfg.to_dict(), vision_config=vision.to_dict())
        return text_cfg, AutoModelForImageTextToText.from_config(cfg, dtype=torch.float32, attn_implementation="eager")
    if WRAPPED[family] == "step3p7":
        from transformers import Step3p7Config, Step3p7VisionConfig

        vision = Step3p7VisionConfig(width=32, layers=1, heads=2, image_size=28, patch_size=14)
        cfg = Step3p7Config(text_config=text_cfg, vision_config=vision, image_token_id=VOCAB_SIZE - 1)
        return text_cfg, AutoModelForImageTextToText.from_config(cfg, dtype=torch.float32, attn_implementation="eager")
    assert WRAPPED[family] == "mistral3"
    vision = PixtralVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        head_dim=16,
        image_size=28,
        patch_size=14,
    )
    cfg = Mistral3Config(
        text_config=text_cfg,
        vision_config=vision,
        image_token_index=VOCAB_SIZE - 1,
        tie_word_embeddings=text_cfg.tie_word_embeddings,
    )
    model = AutoModelForImageTextToText.from_config(cfg, dtype=torch.float32, attn_implementation="eager")
    return text_cfg, model


def _load(model_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    torch.set_num_threads(1)
    wrapped = json.loads((Path(model_dir) / "config.json").read_text()).get("model_type") in WRAPPED.values()
    auto = AutoModelForImageTextToText if wrapped else AutoModelForCausalLM
    model = auto.from_pretrained(str(model_dir), dtype=torch.float32, attn_implementation="eager")
    model.eval()
    return model


def hf_logits(model_dir, token_ids) -> np.ndarray:
    """Logits of transformers for one sequence: [n_tokens, n_vocab] float32."""
    import torch

    model = _load(model_dir)
    with torch.no_grad():
        out = model(torch.tensor([list(token_ids)], dtype=torch.long))
    return out.logits[0].float().numpy()


def hf_greedy(model_dir, token_ids, n: int) -> list[int]:
    """n greedily generated ids after `token_ids` (no EOS stop)."""
    import torch

    model = _load(model_dir)
    ids = torch.tensor([list(token_ids)], dtype=torch.long)
    with torch.no_grad():
        # eos_token_id=None: no stop and no EOS suppression (min_new_tokens would mask EOS logits)
        out = model.generate(
            ids,
            max_new_tokens=n,
            do_sample=False,
            eos_token_id=None,
            attention_mask=torch.ones_like(ids),
            pad_token_id=0,
        )
    return out[0, ids.shape[1] :].tolist()


# ---- raw safetensors helpers (no transformers): edited copies of fixtures, big synthetic checkpoints ----


def write_safetensors(path, tensors: dict[str, tuple[str, list[int], bytes]]) -> None:
    """Write a .safetensors file from {name: (dtype, shape, raw little-endian bytes)}; dtype is the
    safetensors name (F32, BF16, F8_E4M3, U8, ...), so formats numpy lacks (bf16, fp8) can be written."""
    header, offset = {}, 0
    for name, (dtype, shape, data) in tensors.items():
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(len(blob).to_bytes(8, "little"))
        f.write(blob)
        for _, _, data in tensors.values():
            f.write(data)


def read_fixture_tensors(model_dir) -> dict[str, np.ndarray]:
    """All tensors of a (float32) fixture as numpy arrays."""
    from safetensors.numpy import load_file

    out: dict[str, np.ndarray] = {}
    for p in sorted(Path(model_dir).glob("*.safetensors")):
        out.update(load_file(str(p)))
    return out


def edited_copy(model_dir, out_dir, edit) -> Path:
    """Copy a fixture into out_dir as one model.safetensors (no index), with
    edit(dict[name -> np.ndarray]) -> dict[name -> np.ndarray | (dtype, shape, bytes)] applied."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for p in Path(model_dir).iterdir():
        if p.suffix != ".safetensors" and p.name != "model.safetensors.index.json":
            shutil.copy(p, out_dir / p.name)
    ts = edit(read_fixture_tensors(model_dir))
    raw = {  # integer tensors (Qwen4-Exp's int64 hash constants) keep their type
        k: v
        if isinstance(v, tuple)
        else ("I64", list(v.shape), np.ascontiguousarray(v, np.int64).tobytes())
        if np.asarray(v).dtype == np.int64
        else ("F32", list(v.shape), np.ascontiguousarray(v, np.float32).tobytes())
        for k, v in ts.items()
    }
    write_safetensors(out_dir / "model.safetensors", raw)
    return out_dir


def hy_v4_release_names(ts: dict) -> dict:
    """Hy4's tensors under the release's names (`layers.N.hc_attn_layer.hc_pre.hc_fn`, `hc_head.hc_head_fn`, the MLP's
    gate as `gate_proj`) instead of where transformers 5.25's save_pretrained puts them (its reverse renaming misplaces
    those rules; llama.cpp's converter reads only the release's, transformers loads either)."""
    import re

    rules = (
        (r"^model\.layers\.(\d+)\.hc_pre\.(hc_attn_layer|hc_mlp_layer)\.", r"model.layers.\1.\2.hc_pre."),
        (r"^model\.hc_pre\.hc_head\.", "model.hc_head."),
        (r"^(model\.layers\.\d+\.mlp(?:\.shared_experts)?)\.linear_gate\.", r"\1.gate_proj."),
    )
    out = {}
    for k, v in ts.items():
        for rx, repl in rules:
            k = re.sub(rx, repl, k)
        out[k] = v
    return out


# family -> an edit of its fixture's tensors into its release layout, where save_pretrained writes another one
RELEASE_LAYOUT = {"hy_v4": hy_v4_release_names}


def release_copy(family: str, model_dir, out_dir) -> Path:
    """The fixture as its release checkpoint lays it out (a copy), or the fixture itself where the two agree."""
    edit = RELEASE_LAYOUT.get(family)
    return edited_copy(model_dir, out_dir, edit) if edit else Path(model_dir)
