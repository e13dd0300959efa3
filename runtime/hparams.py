"""GGUF metadata (llama.cpp keys) -> the hyperparameters and the per-layer plan of the C++ core (csrc/model.h).

One table says what each llama.cpp architecture means (`ARCHS`); the C++ graph only knows generic switches
(norm kind, q/k norm, RoPE mode, gating function, activation, multipliers) and a *layer plan*: per layer the
mixer (attention or MLA), the FFN block (dense or routed experts), the attention mask (causal, sliding window,
chunked) and the attention parameters that vary per layer (kv heads, head sizes, rotated dims, RoPE base, scale).
Key names are llama.cpp's; where llama.cpp hard-codes a value for an architecture (Llama-4's chunk size,
ERNIE's always-renormalised routing), the spec says so.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from ..errors import ModelFormatError, UsageError

ROPE_NORM, ROPE_NEOX = 0, 2
GATING_SOFTMAX, GATING_SIGMOID, GATING_SOFTMAX_WEIGHT, GATING_SPARSEMIXER = 1, 2, 3, 4
QK_NORM_NONE, QK_NORM_HEAD, QK_NORM_FULL, QK_NORM_L2 = 0, 1, 2, 3
ACT_SILU, ACT_SWIGLU_OAI, ACT_GELU, ACT_RELU_SQR = 0, 1, 2, 3  # RELU_SQR: no gate, down(relu(up x)^2)
MIXER_ATTN, MIXER_MLA, MIXER_SHORTCONV, MIXER_DELTANET, MIXER_MAMBA2, MIXER_NONE, MIXER_KDA = 0, 1, 2, 3, 4, 5, 6
HC_NONE, HC_IHC, HC_GATED, HC_MHC = 0, 1, 2, 3  # csrc HcKind
FFN_DENSE, FFN_MOE, FFN_NONE = 0, 1, 2  # MIXER_NONE / FFN_NONE: Nemotron-H's FFN-only / mixer-only blocks
RECURRENT_MIXERS = (MIXER_SHORTCONV, MIXER_DELTANET, MIXER_MAMBA2, MIXER_KDA)  # a fixed-size state, no KV
MASK_CAUSAL, MASK_SWA, MASK_CHUNKED = 0, 1, 2


@dataclass(frozen=True)
class ArchSpec:
    """What an architecture needs beyond the common keys (defaults follow llama.cpp's runtime)."""

    rope_type: int
    qk_norm: int = QK_NORM_NONE  # used when the file has attn_q_norm tensors (QK_NORM_L2 needs none)
    qk_norm_after_rope: bool = False
    gating: int = GATING_SOFTMAX
    weights_norm: bool | None = False  # default of `{arch}.expert_weights_norm`; None = always on (hard-coded)
    layernorm: bool = False
    act: int = ACT_SILU
    swa_period: int = 0  # alternating sliding window: layer il is SWA iff il % period < period - 1
    moe_step_key: bool = False  # MoE layers every `interleave_moe_layer_step` (ERNIE, Llama-4)
    sandwich: bool = False  # Gemma-4: per-layer head sizes, K=V, V norm, attention scale 1, softcap
    recurrent: int = 0  # the recurrent mixer of its non-attention layers (MIXER_SHORTCONV / _DELTANET / ...)
    recurrent_by_kv: bool = False  # recurrent layers are those with head_count_kv 0 (llama.cpp's LFM2 / Jamba rule)
    mla_nope: bool = False  # MLA's rope dims are kept (in kv_a_mqa and the cache) but never rotated (Kimi-Linear)
    kda_safe_gate: bool = False  # KDA's bounded decay when the file has no `kda.safe_gate` (llama.cpp's default)
    # KDA's bounded decay iff the file has `kda.gate_lower_bound`, with ssm_a = -exp(A_log) (llama.cpp's glm5-next)
    kda_lb_neg_a: bool = False
    nope_full: bool = False  # RoPE on sliding-window layers only, full-attention layers NoPE (EXAONE-4)
    ffn_by_tensors: bool = False  # dense or MoE decided per layer by which tensors exist (llama.cpp's hy_v3)
    mla_yarn: bool = False  # DeepSeek-2 MLA YaRN: log multiplier stored x 0.1, mscale^2 in the kq scale;
    # `attention.temperature_scale` / `_length` scale q (llama.cpp's deepseek2 graph)
    group_top2: bool = False  # expert groups scored by their top-2 sum under softmax too (Mistral-4)
    nope_step: int = 0  # NoPE on layers (il + 1) % nope_step == 0 (llama.cpp's n_no_rope_layer_step)
    mup_embd: bool = False  # embeddings x sqrt(n_embd), always (llama.cpp hardcodes it: AFMoE)
    # Nemotron-H: one block kind per layer (llama.cpp's rule: recurrent iff head_count_kv and feed_forward_length are
    # 0, attention iff only feed_forward_length is), every block x + block(attn_norm(x)); attention NoPE always
    single_blocks: bool = False
    # Command-R blocks (Cohere2-MoE): x + attn(n) + ffn(n), n = attn_norm(x), no ffn_norm; RMSNorm when the file has
    # `attention.layer_norm_rms_epsilon`, else LayerNorm without bias; logits x `logit_scale` (Granite divides)
    parallel: bool = False
    swa_dense_first: bool = False  # period fallback: layer il is SWA iff il % period != 0 (llama.cpp dense_first)
    rope_dense_lead: bool = False  # nope_full, but leading dense layers keep RoPE (llama.cpp's force_rope);
    # `moelite.rope_dense_lead` = false (moelite's converter): as transformers
    shexp_average: bool = False  # (routed + shared expert) / 2 (llama.cpp hardcodes `average`: Cohere2-MoE)
    # sliding layers rope with `rope.freq_base_swa` / `rope.dimension_count_swa` and without the model's RoPE scaling
    # (plain RoPE, attention factor 1), full layers with the scaling (YaRN): llama.cpp's laguna graph
    swa_rope: bool = False
    gate_softplus: bool = False  # attn_gate: o *= softplus(gate) (Laguna), else sigmoid (AFMoE, Step-3.5)
    rope_half_full: bool = False  # full-attention layers rotate rope.dimension_count / 2 (llama.cpp's step35)
    # per-layer SwiGLU limits `swiglu_clamp_exp` / `_shexp` (0 = none), applied after the SiLU: min(silu(g), L) *
    # clamp(u, -L, L) (llama.cpp's default order in build_moe_ffn / build_ffn; the shared limit also on dense layers)
    swiglu_clamp: bool = False
    dense_unclamped: bool = False  # the shared limit does not reach dense layers (transformers' Ling-3.0; llama.cpp's
    # build_ffn would clamp them with it)
    # DSA (DeepSeek Sparse Attention) on the MLA layers: the lightning indexer's RoPE mode (ROPE_NEOX: DeepSeek-V3.2,
    # ROPE_NORM: GLM-5), -1 = no indexer; keys `attention.indexer.{head_count, key_length, top_k, types}`
    indexer_rope: int = -1
    indexer_optional: bool = False  # the indexer keys may be absent: no DSA (Hy4's all-full-attention checkpoints)
    indexer_rope_tail: bool = False  # the indexer's RoPE on the last rope.dimension_count dims of its heads (Hy4)
    clamp_gate: bool = False  # swiglu_clamp limits clamp the gate before the SiLU (llama.cpp: ggml_swiglu_clamp)
    # hyper-connections (key `hyper_connection.count`, tensors `*hc_*`): HC_IHC, Hy4's (`.epsilon`, `.magnitude`);
    # HC_GATED, Qwen4-Exp's gated low-rank mix, whose grouped norms replace the layer norms and the output norm;
    # HC_MHC, GLM-5.3-Flash's Sinkhorn comb (`.epsilon`, `.sinkhorn_iterations`), the streams' mean as the head
    hyper_conn: int = 0
    # KPool (GLM-5.3-Flash): the DSA indexer on the MLA layers scores gated pools of `attention.indexer.kpool` keys
    indexer_kpool: bool = False
    rope_free: bool = False  # rope.dimension_count 0 is valid: no rope dims anywhere (GLM-5.3-Flash's NoPE MLA)


ARCHS: dict[str, ArchSpec] = {
    "qwen3moe": ArchSpec(ROPE_NEOX, qk_norm=QK_NORM_HEAD, weights_norm=True),
    "qwen2moe": ArchSpec(ROPE_NEOX),
    "olmoe": ArchSpec(ROPE_NEOX, qk_norm=QK_NORM_FULL),
    "llama": ArchSpec(ROPE_NORM, weights_norm=True),  # Mixtral
    "deepseek2": ArchSpec(ROPE_NORM, mla_yarn=True),  # DeepSeek-V2/V3, GLM-4.7-Flash
    "gpt-oss": ArchSpec(ROPE_NEOX, gating=GATING_SOFTMAX_WEIGHT, act=ACT_SWIGLU_OAI, swa_period=2),
    "granitemoe": ArchSpec(ROPE_NORM, weights_norm=True),
    "phimoe": ArchSpec(ROPE_NEOX, gating=GATING_SPARSEMIXER, layernorm=True),
    # wave 2, attention-only
    "glm4moe": ArchSpec(ROPE_NEOX, qk_norm=QK_NORM_HEAD, gating=GATING_SIGMOID),
    "dots1": ArchSpec(ROPE_NEOX, qk_norm=QK_NORM_HEAD),
    "minimax-m2": ArchSpec(ROPE_NEOX, qk_norm=QK_NORM_FULL, gating=GATING_SIGMOID, weights_norm=None),
    "ernie4_5-moe": ArchSpec(ROPE_NORM, weights_norm=None, moe_step_key=True),
    "hunyuan-moe": ArchSpec(ROPE_NEOX, qk_norm=QK_NORM_HEAD, qk_norm_after_rope=True, weights_norm=None),
    "llama4": ArchSpec(ROPE_NORM, qk_norm=QK_NORM_L2, gating=GATING_SIGMOID, moe_step_key=True),
    "gemma4": ArchSpec(ROPE_NEOX, qk_norm=QK_NORM_HEAD, weights_norm=None, act=ACT_GELU, sandwich=True),
    # wave 2, hybrid recurrent
    "lfm2moe": ArchSpec(
        ROPE_NEOX,
        qk_norm=QK_NORM_HEAD,
        gating=GATING_SIGMOID,
        weights_norm=None,
        recurrent=MIXER_SHORTCONV,
        recurrent_by_kv=True,
    ),
    "qwen35moe": ArchSpec(ROPE_NEOX, qk_norm=QK_NORM_HEAD, weights_norm=None, recurrent=MIXER_DELTANET),
    "qwen3next": ArchSpec(ROPE_NEOX, qk_norm=QK_NORM_HEAD, weights_norm=None, recurrent=MIXER_DELTANET),
    "granitehybrid": ArchSpec(ROPE_NORM, weights_norm=True, recurrent=MIXER_MAMBA2, recurrent_by_kv=True),
    # wave 3
    "exaone-moe": ArchSpec(ROPE_NEOX, qk_norm=QK_NORM_HEAD, gating=GATING_SIGMOID, swa_period=4, nope_full=True),
    "hy_v3": ArchSpec(ROPE_NEOX, qk_norm=QK_NORM_HEAD, gating=GATING_SIGMOID, ffn_by_tensors=True),
    "mistral4": ArchSpec(ROPE_NORM, mla_yarn=True, group_top2=True),  # llama.cpp: the deepseek2 model
    # DeepSeek-V3.2 / GLM-5: deepseek2's MLA + MoE with the DSA indexer (GLM: IndexShare layers, sigmoid by default)
    "deepseek32": ArchSpec(ROPE_NORM, gating=GATING_SIGMOID, mla_yarn=True, indexer_rope=ROPE_NEOX),
    "glm-dsa": ArchSpec(ROPE_NORM, gating=GATING_SIGMOID, mla_yarn=True, indexer_rope=ROPE_NORM),
    # Hy4: MLA with DSA (IndexShare; indexer RoPE on the heads' tail), iHC streams, sinks, a per-element output gate,
    # routed experts clamped on the gate before the SiLU (llama.cpp's hy_v4 graph: no YaRN scaling in the kq scale)
    "hy_v4": ArchSpec(
        ROPE_NORM,
        gating=GATING_SIGMOID,
        indexer_rope=ROPE_NORM,
        indexer_optional=True,
        indexer_rope_tail=True,
        swiglu_clamp=True,
        clamp_gate=True,
        hyper_conn=HC_IHC,
    ),
    # Qwen3.8-Flash-Next: Qwen3.5's hybrid with gated hyper-connections, QSA on the full-attention layers, the PLE
    # n-gram table on one Gated DeltaNet layer, a sigmoid DeltaNet output gate (llama.cpp's qwen4exp graph)
    "qwen4exp": ArchSpec(
        ROPE_NEOX, qk_norm=QK_NORM_HEAD, weights_norm=None, recurrent=MIXER_DELTANET, hyper_conn=HC_GATED
    ),
    # AFMoE: sandwich norms and the attention gate come with their tensors; SWA period 4 and NoPE step 4 hardcoded
    "afmoe": ArchSpec(ROPE_NEOX, qk_norm=QK_NORM_HEAD, gating=GATING_SIGMOID, swa_period=4, nope_step=4, mup_embd=True),
    # Nemotron 3 (Nano / Super): Mamba2, NoPE attention and ReLU² MoE blocks; sigmoid gating hardcoded by llama.cpp
    "nemotron_h_moe": ArchSpec(
        ROPE_NORM,
        gating=GATING_SIGMOID,
        act=ACT_RELU_SQR,
        recurrent=MIXER_MAMBA2,
        ffn_by_tensors=True,
        single_blocks=True,
    ),
    # Cohere North: sliding RoPE 3 : 1 full NoPE, the dense lead roped; sigmoid gating when the key is absent
    "cohere2moe": ArchSpec(
        ROPE_NORM,
        gating=GATING_SIGMOID,
        swa_period=4,
        swa_dense_first=True,
        nope_full=True,
        rope_dense_lead=True,
        parallel=True,
        shexp_average=True,
    ),
    # Laguna: query heads per layer (attention.head_count array), softplus attention gate per head (or per element:
    # the gate's width says which), sliding layers plain RoPE; pattern array, else full at il % 4 == 0
    "laguna": ArchSpec(
        ROPE_NEOX,
        qk_norm=QK_NORM_HEAD,
        gating=GATING_SIGMOID,
        swa_period=4,
        swa_dense_first=True,
        swa_rope=True,
        gate_softplus=True,
    ),
    # MiMo-V2-Flash: KV heads per layer (an array counting the MTP blocks), sinks on the SWA layers (their tensors),
    # sliding layers on their own RoPE theta, V x `attention.value_scale`; llama.cpp's graph hardcodes renormalised
    # sigmoid routing and tells dense from MoE layers by their tensors (its converter writes no dense-lead key)
    "mimo2": ArchSpec(ROPE_NEOX, gating=GATING_SIGMOID, weights_norm=None, swa_rope=True, ffn_by_tensors=True),
    # Step-3.5: query heads per layer, per-head sigmoid attention gate (its tensor's width), sliding layers full RoPE
    # on their own theta without the rope factors, full layers half (hardcoded); per-layer SwiGLU clamps; llama.cpp's
    # graph tells dense from MoE layers by their tensors and gates with sigmoid when the key is absent
    "step35": ArchSpec(
        ROPE_NEOX,
        qk_norm=QK_NORM_HEAD,
        gating=GATING_SIGMOID,
        swa_rope=True,
        ffn_by_tensors=True,
        rope_half_full=True,
        swiglu_clamp=True,
    ),
    # Kimi-Linear: KDA layers (head_count_kv 0) 3 : 1 NoPE MLA, DeepSeek-V3 routing; llama.cpp's graph always
    # renormalises the top-k weights (its converter writes no expert_weights_norm)
    "kimi-linear": ArchSpec(
        ROPE_NORM,
        gating=GATING_SIGMOID,
        weights_norm=None,
        recurrent=MIXER_KDA,
        recurrent_by_kv=True,
        mla_nope=True,
    ),
    # Ling-3.0: KDA layers (head_count_kv 0) with the bounded decay and full-rank gates, then one MLA layer (RoPE, a
    # per-head sigmoid output gate: its tensor); grouped sigmoid routing; per-layer SwiGLU clamps after the SiLU
    "bailingmoe3": ArchSpec(
        ROPE_NORM,
        gating=GATING_SIGMOID,
        recurrent=MIXER_KDA,
        recurrent_by_kv=True,
        kda_safe_gate=True,
        swiglu_clamp=True,
        dense_unclamped=True,
    ),
    # GLM-5.3-Flash: KDA layers (head_count_kv 0, the bounded decay) and NoPE MLA (no rope dims) with the KPool
    # indexer, mHC streams, DeepSeek-V3 routing; SwiGLU limits on the gate before the SiLU, dense layers too
    "glm5-next": ArchSpec(
        ROPE_NORM,
        gating=GATING_SIGMOID,
        recurrent=MIXER_KDA,
        recurrent_by_kv=True,
        kda_lb_neg_a=True,
        swiglu_clamp=True,
        clamp_gate=True,
        indexer_rope=ROPE_NORM,
        indexer_kpool=True,
        hyper_conn=HC_MHC,
        rope_free=True,
    ),
}

# Llama-4: llama.cpp hard-codes these (they are not in the GGUF): chunked attention on 3 of 4 layers, NoPE +
# attention temperature on every 4th
LLAMA4_CHUNK, LLAMA4_TEMP_FLOOR, LLAMA4_TEMP_SCALE, LLAMA4_NOPE_STEP = 8192, 8192.0, 0.1, 4


def _number(kv: dict, path: str, key: str, v: Any) -> Any:
    if isinstance(v, (bool, int, float)):
        return v
    if hasattr(v, "item") and not hasattr(v, "__len__"):  # numpy scalar
        return v.item()
    raise ModelFormatError(f"{path}: key '{key}' should be a number, got {type(v).__name__}")


def _per_layer(kv: dict, path: str, key: str, n_layer: int, default: Any = ..., n_block: int = 0) -> list:
    """A key that llama.cpp reads with get_key_or_arr: one value for every layer, or an array of n_layer (or of
    n_block: the trunk and its MTP blocks, as llama.cpp's mimo2 writes them; the trunk's entries are returned)."""
    if key not in kv:
        if default is ...:
            raise ModelFormatError(f"{path}: missing key '{key}'")
        return [default] * n_layer
    v = kv[key]
    if isinstance(v, str) or not hasattr(v, "__len__"):
        return [_number(kv, path, key, v)] * n_layer
    vals = [_number(kv, path, key, x) for x in v]
    if n_block > n_layer and len(vals) == n_block:
        vals = vals[:n_layer]
    if len(vals) != n_layer:
        raise ModelFormatError(f"{path}: key '{key}' has {len(vals)} entries, expected {n_layer} (one per layer)")
    return vals


def _key(kv: dict, path: str, key: str, default: Any = ...) -> Any:
    """A scalar key; a per-layer array must be uniform (the caller wants one value)."""
    if key not in kv:
        if default is ...:
            raise ModelFormatError(f"{path}: missing key '{key}'")
        return default
    v = kv[key]
    if hasattr(v, "__len__") and not isinstance(v, str):
        vals = {_number(kv, path, key, x) for x in v}
        if len(vals) != 1:
            raise ModelFormatError(f"{path}: key '{key}' varies per layer ({sorted(vals)}); expected one value")
        return vals.pop()
    return _number(kv, path, key, v)


def _rope_scaling(arch: str, k) -> dict[str, float]:
    """RoPE scaling, as llama.cpp derives its ggml_rope_ext arguments (llama-context.cpp)."""
    mla_yarn = ARCHS[arch].mla_yarn
    scaling = k.raw("rope.scaling.type", "none")
    factor = float(k("rope.scaling.factor", 0.0) or 0.0)
    freq_scale = 1.0 / factor if (factor and scaling != "none") else 1.0
    ext_factor = 1.0 if scaling == "yarn" else 0.0
    attn_factor = 1.0
    log_mul = float(k("rope.scaling.yarn_log_multiplier", 0.0))
    if mla_yarn and log_mul:
        log_mul /= 0.1  # llama.cpp's converter stores 0.1 * mscale_all_dim
    if ext_factor != 0.0:
        f = 1.0 / freq_scale

        def mscale(s: float, m: float) -> float:
            return 1.0 if s <= 1.0 else 0.1 * m * math.log(s) + 1.0

        if log_mul:
            m = log_mul if (mla_yarn and log_mul != 1.0) else 1.0
            attn_factor = mscale(f, m) / mscale(f, log_mul)
        else:
            attn_factor = mscale(f, 1.0)
        attn_factor *= 1.0 / (1.0 + 0.1 * math.log(f))
    attn_factor *= float(k("rope.scaling.attn_factor", 1.0))
    return dict(freq_scale=freq_scale, ext_factor=ext_factor, attn_factor=attn_factor, log_mul=log_mul)


def parse_hparams(path: str, kv: dict[str, Any], tensors: dict[str, tuple]) -> dict[str, Any]:
    """Read llama.cpp keys of a MoE GGUF into the dict the C++ Model takes. Raises ModelFormatError."""
    arch = kv.get("general.architecture")
    if arch is None:
        raise ModelFormatError(f"{path}: missing key 'general.architecture'")
    if arch not in ARCHS:
        raise ModelFormatError(
            f"{path}: unknown architecture '{arch}' (key general.architecture); supported: {', '.join(sorted(ARCHS))}"
        )
    spec = ARCHS[arch]

    def k(name: str, default: Any = ...) -> Any:
        return _key(kv, path, f"{arch}.{name}", default)

    k.raw = lambda name, default=None: kv.get(f"{arch}.{name}", default)
    k.path = path
    k.kv = kv

    n_expert = int(k("expert_count", 0))
    if n_expert <= 1 or not any(n.endswith("ffn_down_exps.weight") for n in tensors):
        raise ModelFormatError(
            f"{path}: not a Mixture-of-Experts model (key '{arch}.expert_count' = {n_expert}, "
            f"no 'blk.N.ffn_down_exps.weight' tensors)"
        )
    if "token_embd.weight" not in tensors:
        raise ModelFormatError(f"{path}: missing tensor 'token_embd.weight'")
    n_embd = int(k("embedding_length"))
    # MTP / next-token-prediction layers sit after the trunk (blk.{n_layer}..): never run, as llama.cpp
    n_layer = int(k("block_count")) - int(k("nextn_predict_layers", 0))
    if n_layer <= 0:
        raise ModelFormatError(
            f"{path}: key '{arch}.block_count' minus '{arch}.nextn_predict_layers' is {n_layer}, expected >= 1"
        )
    # query heads per layer (llama.cpp reads head_count with get_key_or_arr; Laguna stores an array), kv heads
    # default to them; n_head: the most of any layer (scratch bounds)
    heads = [
        int(x) for x in _per_layer(kv, path, f"{arch}.attention.head_count", n_layer, n_block=int(k("block_count")))
    ]
    n_head = max(heads)
    kv_heads = [
        h if v is None else int(v)
        for h, v in zip(
            heads, _per_layer(kv, path, f"{arch}.attention.head_count_kv", n_layer, None, int(k("block_count")))
        )
    ]
    heads = [h or n_head for h in heads]  # layers without attention (Nemotron-H's array): unused
    # MTP blocks with their own KV heads (MiMo-V2: SWA blocks after a full last layer): their shapes are checked
    # against the last trunk layer with as many (validate._check_nextn)
    kv_all = kv.get(f"{arch}.attention.head_count_kv")
    nextn_ref = []  # per MTP block (blk.{n_layer + i}): the trunk layer its shapes follow
    if hasattr(kv_all, "__len__") and not isinstance(kv_all, str) and len(kv_all) == int(k("block_count")) > n_layer:
        for ib in range(n_layer, len(kv_all)):
            want = _number(kv, path, f"{arch}.attention.head_count_kv", kv_all[ib])
            nextn_ref.append(max((il for il in range(n_layer) if kv_heads[il] == want), default=n_layer - 1))
    recurrent = _recurrent_layers(path, kv, arch, spec, n_layer, kv_heads)
    if any(recurrent):  # recurrent layers hold no KV: give them the attention layers' value (unused)
        attn_kv = [h for h, r in zip(kv_heads, recurrent) if not r and h > 0] or [max(max(kv_heads), 1)]
        kv_heads = [attn_kv[0] if r else h for h, r in zip(kv_heads, recurrent)]
    n_vocab = int(tensors["token_embd.weight"][1][1])
    head_k = int(k("attention.key_length", n_embd // max(heads[0], 1)))
    head_v = int(k("attention.value_length", n_embd // max(heads[0], 1)))
    kv_lora = int(k("attention.kv_lora_rank", 0))
    if kv_lora:  # MLA: per-head sizes of the decompressed heads
        head_k = int(k("attention.key_length_mla", head_k))
        head_v = int(k("attention.value_length_mla", head_v))
    n_rot = int(k("rope.dimension_count", head_k))
    eps = float(k("attention.layer_norm_rms_epsilon", k("attention.layer_norm_epsilon", 1e-5)))
    layernorm = spec.layernorm
    if spec.parallel and f"{arch}.attention.layer_norm_rms_epsilon" not in kv:  # Cohere: LayerNorm, no bias
        layernorm, eps = True, float(k("attention.layer_norm_epsilon"))
    rs = _rope_scaling(arch, k)
    freq_base = float(k("rope.freq_base", 10000.0))

    kq_scale = 1.0 / math.sqrt(head_k) if head_k > 0 else 1.0
    if spec.mla_yarn:
        org = rs["attn_factor"] * (1.0 + 0.1 * math.log(1.0 / rs["freq_scale"]))
        ms = org * (1.0 + 0.1 * rs["log_mul"] * math.log(1.0 / rs["freq_scale"]))
        kq_scale = ms * ms / math.sqrt(head_k)
    if f"{arch}.attention.scale" in kv:  # granite: attention_multiplier
        kq_scale = float(k("attention.scale"))

    # sliding window layers (gpt-oss, gemma4): a per-layer bool array or a period
    if spec.nope_full and f"{arch}.attention.sliding_window" not in kv:  # llama.cpp requires it too
        raise ModelFormatError(f"{path}: missing key '{arch}.attention.sliding_window'")
    n_swa = int(k("attention.sliding_window", 0))
    swa_layers = [0] * n_layer
    pattern = kv.get(f"{arch}.attention.sliding_window_pattern")
    if n_swa and arch != "llama4":
        if pattern is not None and hasattr(pattern, "__len__"):
            swa_layers = [int(bool(x)) for x in pattern][:n_layer]
            if len(swa_layers) != n_layer:
                raise ModelFormatError(
                    f"{path}: key '{arch}.attention.sliding_window_pattern' has "
                    f"{len(swa_layers)} entries, expected {n_layer}"
                )
        else:
            period = int(pattern) if pattern is not None else spec.swa_period
            if period > 0 and spec.swa_dense_first:
                swa_layers = [int(il % period != 0) for il in range(n_layer)]
            elif period > 0:
                swa_layers = [int(il % period < period - 1) for il in range(n_layer)]

    gating = int(k("expert_gating_func", spec.gating) or spec.gating)
    if (
        arch == "deepseek2"
        and not k("expert_gating_func", 0)
        and n_layer in (47, 48)
        and int(tensors["token_embd.weight"][1][1]) == 154880
    ):
        gating = GATING_SIGMOID  # GLM-4.7-Flash GGUFs without the key: llama.cpp's rule (by shape)
    if arch == "gpt-oss":
        gating = GATING_SOFTMAX_WEIGHT
    if arch == "phimoe" and gating == GATING_SOFTMAX:
        gating = GATING_SPARSEMIXER
    if arch in ("ernie4_5-moe", "hunyuan-moe", "gemma4"):  # llama.cpp's graphs hard-code softmax
        gating = GATING_SOFTMAX
    if arch == "nemotron_h_moe":  # and this one sigmoid
        gating = GATING_SIGMOID
    n_expert_used = int(k("expert_used_count"))
    if not 0 < n_expert_used <= min(n_expert, 64):
        raise ModelFormatError(
            f"{path}: key '{arch}.expert_used_count' = {n_expert_used}, expected 1..{min(n_expert, 64)}"
        )
    has_qk_norm = spec.qk_norm == QK_NORM_L2 or any(n.endswith("attn_q_norm.weight") for n in tensors)
    qk_norm = spec.qk_norm if has_qk_norm else QK_NORM_NONE
    weights_norm = True if spec.weights_norm is None else bool(k("expert_weights_norm", spec.weights_norm))
    dense_lead = int(k("leading_dense_block_count", 0))
    moe_step = int(k("interleave_moe_layer_step", 1) or 1) if spec.moe_step_key else 1

    hp: dict[str, Any] = dict(
        arch=arch,
        n_vocab=n_vocab,
        n_embd=n_embd,
        n_layer=n_layer,
        n_head=n_head,
        n_head_kv=max(kv_heads),
        n_embd_head_k=head_k,
        n_embd_head_v=head_v,
        norm_eps=eps,
        layernorm=layernorm,
        qk_norm=qk_norm,
        qk_norm_after_rope=spec.qk_norm_after_rope,
        n_rot=n_rot,
        rope_type=spec.rope_type,
        n_ctx_orig=int(k("rope.scaling.original_context_length", k("context_length", 4096))),
        freq_base=freq_base,
        freq_scale=rs["freq_scale"],
        ext_factor=rs["ext_factor"],
        attn_factor=rs["attn_factor"],
        beta_fast=float(k("rope.scaling.yarn_beta_fast", 32.0)),
        beta_slow=float(k("rope.scaling.yarn_beta_slow", 1.0)),
        kq_scale=kq_scale,
        n_swa=n_swa,
        swa_layers=swa_layers,
        q_lora_rank=int(k("attention.q_lora_rank", 0)),
        kv_lora_rank=kv_lora,
        n_expert=n_expert,
        n_expert_used=n_expert_used,
        n_layer_dense_lead=dense_lead,
        gating=gating,
        weights_norm=weights_norm,
        weights_scale=float(k("expert_weights_scale", 1.0) or 1.0),
        n_group=int(k("expert_group_count", 1) or 1),
        topk_group=int(k("expert_group_used_count", 1) or 1),
        jitter_eps=float(kv.get(f"{arch}.expert_router_jitter", kv.get("moelite.router_jitter_eps", 0.01))),
        act=spec.act,
        oai_alpha=1.702,
        oai_limit=float(k("expert_swiglu_limit", 7.0)),
        embd_scale=float(k("embedding_scale", 1.0)),
        residual_scale=float(k("residual_scale", 1.0)),
        logit_scale=float(k("logit_scale", 1.0)),
        final_softcap=float(k("final_logit_softcapping", 0.0) or 0.0),
        context_length=int(k("context_length", 4096)),
        n_layer_nextn=int(k("nextn_predict_layers", 0)),  # MTP blocks blk.{n_layer}..: checked, not run
        group_top2=spec.group_top2,
        parallel_residual=spec.parallel,
        shexp_average=spec.shexp_average,
        attn_gate_softplus=spec.gate_softplus,
        attn_value_scale=float(k("attention.value_scale", 1.0) or 1.0),  # V x this (MiMo-V2; 0: none, llama.cpp)
        nextn_ref=nextn_ref,
    )
    plan = dict(
        layer_mixer=[MIXER_MLA if kv_lora else MIXER_ATTN] * n_layer,
        layer_ffn=[FFN_DENSE] * n_layer,
        layer_mask=[MASK_SWA if s else MASK_CAUSAL for s in swa_layers],
        layer_n_head=heads,
        layer_n_head_kv=kv_heads,
        layer_rope_scaling=[1] * n_layer,
        layer_head_k=[head_k] * n_layer,
        layer_head_v=[head_v] * n_layer,
        layer_n_rot=[n_rot] * n_layer,
        layer_freq_base=[freq_base] * n_layer,
        layer_kq_scale=[kq_scale] * n_layer,
        layer_rope_factors=[1] * n_layer,
        layer_attn_temp=[0] * n_layer,
    )
    for il in range(n_layer):
        expected = il >= dense_lead and (moe_step <= 1 or (il + 1) % moe_step == 0)
        has = f"blk.{il}.ffn_gate_inp.weight" in tensors
        if expected and not has and not spec.sandwich and not spec.ffn_by_tensors:
            raise ModelFormatError(
                f"{path}: missing tensor 'blk.{il}.ffn_gate_inp.weight' (layer {il} should be a "
                f"MoE layer: leading_dense_block_count = {dense_lead}, MoE step {moe_step})"
            )
        plan["layer_ffn"][il] = FFN_MOE if has else FFN_DENSE
    if spec.nope_full:  # EXAONE-4 attention: the full-attention layers take no position (llama.cpp: the same)
        # Cohere2-MoE: leading dense layers keep it (llama.cpp's force_rope; transformers only with
        # prefix_dense_sliding_window_pattern 1, which moelite's converter writes as `moelite.rope_dense_lead`)
        keep = kv.get("moelite.rope_dense_lead", True)
        if not isinstance(keep, (bool, int)) and not (hasattr(keep, "item") and not hasattr(keep, "__len__")):
            raise ModelFormatError(f"{path}: key 'moelite.rope_dense_lead' should be a bool")
        lead = dense_lead if spec.rope_dense_lead and bool(keep) else 0
        plan["layer_n_rot"] = [n_rot if s or il < lead else 0 for il, s in enumerate(swa_layers)]
    if spec.nope_step:
        plan["layer_n_rot"] = [0 if (il + 1) % spec.nope_step == 0 else n_rot for il in range(n_layer)]
    if spec.mup_embd:
        hp["embd_scale"] = math.sqrt(n_embd)
    if spec.swa_rope:  # sliding layers: own theta and rotated dims (llama.cpp's defaults: the full layers')
        rot_swa, base_swa = int(k("rope.dimension_count_swa", n_rot)), float(k("rope.freq_base_swa", freq_base))
        for il in (i for i, s in enumerate(swa_layers) if s):
            plan["layer_n_rot"][il], plan["layer_freq_base"][il], plan["layer_rope_scaling"][il] = rot_swa, base_swa, 0
            if spec.rope_half_full:  # llama.cpp's step35: no rope factors on sliding layers
                plan["layer_rope_factors"][il] = 0
    if spec.rope_half_full:
        for il in (i for i, s in enumerate(swa_layers) if not s):
            plan["layer_n_rot"][il] = n_rot // 2
    if spec.swiglu_clamp:
        for name in ("exp", "shexp"):
            vals = [
                float(x)
                for x in _per_layer(kv, path, f"{arch}.swiglu_clamp_{name}", n_layer, 0.0, int(k("block_count")))
            ]
            if any(not 0.0 <= v < math.inf for v in vals):
                raise ModelFormatError(f"{path}: key '{arch}.swiglu_clamp_{name}': expected non-negative finite limits")
            plan[f"layer_clamp_{name}"] = vals
        if spec.dense_unclamped:
            shexp = plan["layer_clamp_shexp"]
            plan["layer_clamp_shexp"] = [0.0 if f == FFN_DENSE else v for f, v in zip(plan["layer_ffn"], shexp)]
    if spec.single_blocks:
        _single_block_plan(path, k, hp, plan, tensors, recurrent)
    if spec.parallel:  # Cohere multiplies the logits by logit_scale (0: none), the C++ head divides (Granite)
        scale = float(k("logit_scale", 0.0))
        hp["logit_scale"] = 1.0 / scale if scale else 1.0
    if any(recurrent):
        _recurrent_plan(arch, k, hp, plan, recurrent)
    if spec.sandwich:
        _gemma4_plan(path, k, hp, plan, n_layer)
    if arch == "llama4":
        _llama4_plan(k, hp, plan, n_layer, n_expert)
    if spec.mla_nope:
        plan["layer_rotate"] = [0] * n_layer
    if spec.indexer_rope >= 0 and not (spec.indexer_optional and k.raw("attention.indexer.top_k") is None):
        _indexer_plan(path, k, hp, plan, n_layer, spec.indexer_rope, spec.indexer_kpool)
        if spec.indexer_rope_tail and hp["indexer_head_size"] <= hp["n_rot"]:  # RoPE on the tail: dims before it
            raise ModelFormatError(
                f"{path}: key '{arch}.attention.indexer.key_length' = {hp['indexer_head_size']}: expected more than "
                f"rope.dimension_count = {hp['n_rot']} (llama.cpp refuses it too)"
            )
        hp["indexer_rope_tail"] = spec.indexer_rope_tail
    hp["clamp_gate"] = spec.clamp_gate
    if spec.hyper_conn:
        _hyper_conn(path, k, hp, spec.hyper_conn)
    if arch == "qwen4exp":
        hp["deltanet_gate_sigmoid"] = True
        _qsa_plan(path, k, hp, plan, n_layer)
        _ple_plan(path, k, hp, plan, n_layer)
    if spec.mla_yarn and float(k("attention.temperature_scale", 0.0) or 0.0) != 0.0:
        # Mistral-4 (and Mistral-Large): q *= 1 + s * log(1 + floor(pos / length)) on every layer, as llama.cpp's
        # deepseek2 graph; the key is what the HF converter of llama.cpp drops (moelite's writes it)
        hp.update(
            attn_temp_scale=float(k("attention.temperature_scale")),
            attn_temp_floor=float(k("attention.temperature_length")),
            attn_temp_offset=0.0,
        )
        plan["layer_attn_temp"] = [1] * n_layer
    hp.update(plan)
    return hp


INDEXER_NONE, INDEXER_FULL, INDEXER_SHARED, INDEXER_QSA, INDEXER_KPOOL = 0, 1, 2, 3, 4  # csrc LayerPlan::indexer


def _indexer_plan(path: str, k, hp: dict, plan: dict, n_layer: int, rope_type: int, kpool: bool = False) -> None:
    """DSA: the lightning indexer's sizes and, per MLA layer, whether it runs its own indexer (full) or reuses the
    selection of the last full layer before it (IndexShare: `attention.indexer.types`, true = full). Without the key
    every layer is full, as llama.cpp reads GLM-5 / 5.1 files (it assumes GLM-5.2's pattern from a 1M context on).
    kpool: the indexer scores pools of `attention.indexer.kpool` keys (GLM-5.3-Flash; always with the tail pool)."""
    n_idx, d_idx, top_k = (int(k(f"attention.indexer.{n}")) for n in ("head_count", "key_length", "top_k"))
    if n_idx < 1 or top_k < 1 or not hp["n_rot"] <= d_idx:
        raise ModelFormatError(
            f"{path}: keys '{hp['arch']}.attention.indexer.head_count' = {n_idx}, '.key_length' = {d_idx}, "
            f"'.top_k' = {top_k}: expected >= 1 heads, >= 1 positions and a key of >= rope.dimension_count dims"
        )
    raw = k.raw("attention.indexer.types")
    if raw is None:
        if hp["arch"] == "glm-dsa" and hp["context_length"] >= 1048576:
            raise ModelFormatError(
                f"{path}: missing key '{hp['arch']}.attention.indexer.types' (a GLM-5.2 file: llama.cpp assumes a "
                f"built-in IndexShare pattern there; re-convert to write it)"
            )
        full = [True] * n_layer
    else:
        full = [
            bool(x)
            for x in _per_layer(
                k.kv, path, f"{hp['arch']}.attention.indexer.types", n_layer, True, int(k("block_count"))
            )
        ]
    mla = [m == MIXER_MLA for m in plan["layer_mixer"]]
    first = mla.index(True) if any(mla) else 0
    if not full[first]:
        raise ModelFormatError(
            f"{path}: key '{hp['arch']}.attention.indexer.types': layer {first} shares the selection of no earlier "
            f"layer"
        )
    hp.update(indexer_n_head=n_idx, indexer_head_size=d_idx, indexer_top_k=top_k, indexer_rope_type=rope_type)
    own = INDEXER_FULL
    if kpool:
        r = k("attention.indexer.kpool")
        tail = k.raw("attention.indexer.kpool_select_tail", True)
        if isinstance(r, bool) or not isinstance(r, int) or not 2 <= r <= 4096 or top_k % r or tail is not True:
            raise ModelFormatError(
                f"{path}: keys '{hp['arch']}.attention.indexer.kpool' = {r!r}, '.kpool_select_tail' = {tail!r}, "
                f"'.top_k' = {top_k}: expected a pool of 2..4096 keys dividing top_k, with the tail pool selected"
            )
        own = INDEXER_KPOOL
        plan["layer_compress"] = [r if m else 0 for m in mla]
    plan["layer_indexer"] = [(own if f else INDEXER_SHARED) if m else INDEXER_NONE for f, m in zip(full, mla)]


def _hyper_conn(path: str, k, hp: dict, kind: int) -> None:
    """Hyper-connections: the residual stream as `hyper_connection.count` streams (csrc/hyper_conn.cpp); Hy4's iHC
    gates take an epsilon and the post gates a magnitude."""
    arch = hp["arch"]
    n = int(k("hyper_connection.count"))
    eps, mag = (
        (float(k("hyper_connection.epsilon")), float(k("hyper_connection.magnitude"))) if kind == HC_IHC else (0.0, 1.0)
    )
    if kind == HC_MHC:  # 2 sigmoid(..) post gates; the comb's Sinkhorn iterations (ggml's op takes 4 streams)
        eps, iters = float(k("hyper_connection.epsilon")), k("hyper_connection.sinkhorn_iterations")
        if n != 4 or isinstance(iters, bool) or not isinstance(iters, int) or not 1 <= iters <= 1000:
            raise ModelFormatError(
                f"{path}: keys '{arch}.hyper_connection.count' = {n}, '.sinkhorn_iterations' = {iters!r}: expected 4 "
                f"streams (as llama.cpp) and 1..1000 iterations"
            )
        hp["hc_sinkhorn_iters"] = iters
    if not 2 <= n <= 64 or not 0.0 <= eps < math.inf or not 0.0 < mag < math.inf:
        raise ModelFormatError(
            f"{path}: keys '{arch}.hyper_connection.count' = {n}, '.epsilon' = {eps}, '.magnitude' = {mag}: expected "
            f"2..64 streams, a finite epsilon >= 0 and a finite magnitude > 0"
        )
    hp.update(hc_mult=n, hc_kind=kind, hc_eps=eps, hc_magnitude=mag)


def _qsa_plan(path: str, k, hp: dict, plan: dict, n_layer: int) -> None:
    """QSA (Qwen4-Exp): the token indexer's sizes, its token budget (`attention.indexer.top_k`) and per layer the
    block size its keys are pooled over (`attention.compress_ratios`, 0: no indexer)."""
    arch = hp["arch"]
    n_idx, d_idx, budget = (int(k(f"attention.indexer.{n}")) for n in ("head_count", "key_length", "top_k"))
    ratios = [int(x) for x in _per_layer(k.kv, path, f"{arch}.attention.compress_ratios", n_layer, 0)]
    attn = [m == MIXER_ATTN for m in plan["layer_mixer"]]
    if (
        n_idx < 1
        or d_idx < max(plan["layer_n_rot"])
        or budget < 1
        or any(r < 0 or r > 4096 or (r and (not a or budget % r)) for r, a in zip(ratios, attn))
        or len({r for r in ratios if r}) > 1
    ):
        raise ModelFormatError(
            f"{path}: keys '{arch}.attention.indexer.head_count' = {n_idx}, '.key_length' = {d_idx}, '.top_k' = "
            f"{budget}, '{arch}.attention.compress_ratios' = {ratios}: expected >= 1 heads of >= the rotated dims, a "
            f"budget >= 1, and per attention layer one block size 0..4096 dividing the budget (0 elsewhere)"
        )
    hp.update(indexer_n_head=n_idx, indexer_head_size=d_idx, indexer_top_k=budget, indexer_rope_type=hp["rope_type"])
    plan["layer_indexer"] = [INDEXER_QSA if r else INDEXER_NONE for r in ratios]
    plan["layer_compress"] = ratios


def _ple_plan(path: str, k, hp: dict, plan: dict, n_layer: int) -> None:
    """PLE (Qwen4-Exp): one recurrent layer's n-gram hash embeddings; the hash constants come as u64 arrays."""
    arch = hp["arch"]
    layers = k.raw("ple.layers")
    if layers is None:
        return
    layers = [int(_number(k.kv, path, f"{arch}.ple.layers", x)) for x in layers] if hasattr(layers, "__len__") else []
    if len(layers) != 1 or not 0 <= layers[0] < n_layer or plan["layer_mixer"][layers[0]] != MIXER_DELTANET:
        raise ModelFormatError(
            f"{path}: key '{arch}.ple.layers' = {layers}: expected one Gated DeltaNet layer (as llama.cpp loads it)"
        )

    def u64s(name: str) -> list[int]:
        v = k.raw(name)
        if v is None or not hasattr(v, "__len__") or isinstance(v, str):
            raise ModelFormatError(f"{path}: key '{arch}.{name}': expected an array of unsigned integers")
        out = [_number(k.kv, path, f"{arch}.{name}", x) for x in v]
        if any(isinstance(x, (bool, float)) or not 0 <= x < 1 << 64 for x in out):
            raise ModelFormatError(f"{path}: key '{arch}.{name}': expected unsigned 64-bit integers")
        return [int(x) for x in out]

    ngram, per = int(k("ple.ngram_size")), int(k("ple.heads_per_ngram"))
    mult, offsets, vocab = u64s("ple.layer_multipliers"), u64s("ple.head_offsets"), u64s("ple.head_vocab_sizes")
    heads, row, eos = (ngram - 1) * per, int(k("embedding_length_per_layer_input")), int(k("ple.eos_token_id"))
    if (
        not 2 <= ngram <= 8
        or not 1 <= per <= 128
        or len(mult) != ngram
        or len(offsets) != heads
        or len(vocab) != heads
        or 0 in vocab
        or not 1 <= row <= 1 << 16
        or not 0 <= eos < hp["n_vocab"]
        or not 1 <= int(k("ple.conv_kernel")) <= 16
    ):
        raise ModelFormatError(
            f"{path}: keys '{arch}.ple.*': ngram_size {ngram}, heads_per_ngram {per}, {len(mult)} multipliers, "
            f"{len(offsets)} offsets, {len(vocab)} vocabulary sizes, row width {row}, eos {eos}: expected 2..8-grams, "
            f"a multiplier per n-gram position, an offset and a non-zero vocabulary per head ((ngram - 1) x "
            f"heads_per_ngram), rows of 1..65536 values, the EOS id in the vocabulary and a conv kernel of 1..16"
        )
    hp.update(
        ple_layer=layers[0],
        ple_ngram=ngram,
        ple_heads=heads,
        ple_conv_kernel=int(k("ple.conv_kernel")),
        ple_eos=eos,
        ple_row_dim=row,
        ple_mult=mult,
        ple_offsets=offsets,
        ple_vocab=vocab,
    )


def _single_block_plan(path: str, k, hp: dict, plan: dict, tensors: dict, recurrent: list[bool]) -> None:
    """Nemotron-H: each layer is one block: Mamba2 (recurrent), attention (head_count_kv > 0, feed_forward_length
    0; NoPE, as llama.cpp's graph) or an FFN (feed_forward_length > 0: routed experts where ffn_gate_inp exists, else
    a dense ReLU² MLP); no block has both. Latent MoE: `moe_latent_size` > 0, the experts' width."""
    n_layer = hp["n_layer"]
    n_block = n_layer + hp["n_layer_nextn"]  # the arrays count the MTP block too (llama.cpp's converter)
    n_ff = [int(x) for x in _per_layer(k.kv, path, f"{hp['arch']}.feed_forward_length", n_layer, 0, n_block)]
    heads = [int(x) for x in _per_layer(k.kv, path, f"{hp['arch']}.attention.head_count_kv", n_layer, 0, n_block)]
    for il in range(n_layer):
        if recurrent[il]:
            plan["layer_ffn"][il] = FFN_NONE
        elif n_ff[il] == 0:
            if heads[il] <= 0:
                raise ModelFormatError(
                    f"{path}: layer {il} is neither recurrent, attention nor FFN (keys "
                    f"'{hp['arch']}.attention.head_count_kv' and 'feed_forward_length')"
                )
            plan["layer_ffn"][il] = FFN_NONE
        else:
            plan["layer_mixer"][il] = MIXER_NONE
            plan["layer_n_head_kv"][il] = hp["n_head_kv"]  # unused: no KV
    plan["layer_n_rot"] = [0] * n_layer
    latent = k("moe_latent_size", 0)
    if (
        isinstance(latent, bool)
        or not isinstance(latent, (int, float))
        or latent != int(latent)
        or not 0 <= latent <= hp["n_embd"]
    ):
        raise ModelFormatError(
            f"{path}: key '{hp['arch']}.moe_latent_size' = {latent!r}: expected an integer in "
            f"0..{hp['n_embd']} (embedding_length)"
        )
    hp["moe_latent"] = int(latent)


def _recurrent_layers(path: str, kv: dict, arch: str, spec: ArchSpec, n_layer: int, kv_heads: list[int]) -> list[bool]:
    """Which layers are recurrent, as llama.cpp decides: LFM2 / Kimi-Linear by head_count_kv = 0; Qwen3.5 by the
    `attention.recurrent_layers` array, else every layer but each `full_attention_interval`-th (default 4)."""
    if not spec.recurrent:
        return [False] * n_layer
    if spec.recurrent_by_kv:
        return [h == 0 for h in kv_heads]
    if spec.single_blocks:  # Nemotron-H: no KV heads and no FFN width
        n_block = int(_key(kv, path, f"{arch}.block_count"))  # with its MTP block (an array entry each)
        n_ff = _per_layer(kv, path, f"{arch}.feed_forward_length", n_layer, 0, n_block)
        return [h == 0 and not f for h, f in zip(kv_heads, n_ff)]
    flags = kv.get(f"{arch}.attention.recurrent_layers")
    if flags is not None:
        n_block = int(_key(kv, path, f"{arch}.block_count"))  # llama.cpp's array covers the MTP blocks too
        flags = [bool(x) for x in _per_layer(kv, path, f"{arch}.attention.recurrent_layers", n_layer, n_block=n_block)]
        return flags
    n = int(_key(kv, path, f"{arch}.full_attention_interval", 4))
    if n <= 0:
        raise ModelFormatError(f"{path}: key '{arch}.full_attention_interval' = {n}, expected >= 1")
    return [(il + 1) % n != 0 for il in range(n_layer)]


def _recurrent_plan(arch: str, k, hp: dict, plan: dict, recurrent: list[bool]) -> None:
    """Recurrent layers: their mixer, and the sizes of their state (llama.cpp's ssm.* / shortconv.* keys)."""
    mixer = ARCHS[arch].recurrent
    for il, r in enumerate(recurrent):
        if r:
            plan["layer_mixer"][il] = mixer
    if mixer == MIXER_SHORTCONV:
        names: tuple[str, ...] = ("shortconv.l_cache",)
    elif mixer == MIXER_KDA:
        names = ("ssm.conv_kernel", "kda.head_dim")
    else:
        names = ("ssm.conv_kernel", "ssm.state_size", "ssm.group_count", "ssm.time_step_rank", "ssm.inner_size")
    for name in names:  # sizes the state is allocated from: checked before anything uses them
        v = k(name)
        if (
            isinstance(v, bool)
            or not isinstance(v, (int, float))
            or v != int(v)
            or not 1 <= v <= 1 << 20
            or (name.endswith(("l_cache", "conv_kernel")) and not 2 <= v <= 64)
        ):
            raise ModelFormatError(
                f"{k.path}: key '{arch}.{name}' = {v!r}: expected a positive integer (conv kernels 2..64)"
            )
    if mixer not in (MIXER_SHORTCONV, MIXER_KDA) and (
        int(k("ssm.inner_size")) % int(k("ssm.time_step_rank"))
        or int(k("ssm.time_step_rank")) % int(k("ssm.group_count"))
    ):
        raise ModelFormatError(
            f"{k.path}: keys '{arch}.ssm.inner_size' / 'time_step_rank' / 'group_count': expected "
            f"inner_size a multiple of time_step_rank, and time_step_rank of group_count"
        )
    if mixer == MIXER_SHORTCONV:
        hp.update(ssm_conv_kernel=int(k("shortconv.l_cache")))
    elif mixer == MIXER_KDA:
        # KDA (llama.cpp's kimi-linear): the model's query heads, each of kda.head_dim for q, k and v; the state
        # sizes in the DeltaNet fields (S = head_dim, H heads, inner H x S)
        d, n = int(k("kda.head_dim")), hp["n_head"]
        hp.update(
            ssm_conv_kernel=int(k("ssm.conv_kernel")), ssm_d_state=d, ssm_n_group=n, ssm_dt_rank=n, ssm_d_inner=n * d
        )
        spec = ARCHS[arch]
        safe = (
            k.raw("kda.gate_lower_bound") is not None
            if spec.kda_lb_neg_a
            else bool(k("kda.safe_gate", spec.kda_safe_gate))
        )
        hp["kda_neg_a"] = spec.kda_lb_neg_a
        if safe:  # lb * sigmoid(exp(A_log) (f + dt)), lb < 0
            lb = k("kda.gate_lower_bound")
            if isinstance(lb, bool) or not isinstance(lb, (int, float)) or not -1e30 < lb < 0:
                raise ModelFormatError(f"{k.path}: key '{arch}.kda.gate_lower_bound' = {lb!r}: expected a number < 0")
            hp["kda_gate_lb"] = float(lb)
    elif mixer == MIXER_MAMBA2:
        hp.update(
            ssm_conv_kernel=int(k("ssm.conv_kernel")),
            ssm_d_state=int(k("ssm.state_size")),
            ssm_n_group=int(k("ssm.group_count")),
            ssm_dt_rank=int(k("ssm.time_step_rank")),
            ssm_d_inner=int(k("ssm.inner_size")),
        )
        # Granite-4.0-H: `rope.scaling.finetuned` = false marks NoPE attention (llama.cpp's switch)
        if arch == "granitehybrid" and not bool(k.raw("rope.scaling.finetuned", True)):
            plan["layer_n_rot"] = [0] * len(recurrent)
    else:
        hp.update(
            ssm_conv_kernel=int(k("ssm.conv_kernel")),
            ssm_d_state=int(k("ssm.state_size")),
            ssm_n_group=int(k("ssm.group_count")),
            ssm_dt_rank=int(k("ssm.time_step_rank")),
            ssm_d_inner=int(k("ssm.inner_size")),
            attn_output_gate=True,
            deltanet_repeat_interleave=arch == "qwen3next",
        )


def _gemma4_plan(path: str, k, hp: dict, plan: dict, n_layer: int) -> None:
    """Gemma-4: sliding layers have their own head size, rotated dims and RoPE base, and no rope_freqs (the
    global layers' proportional RoPE is NeoX with factors 1e30 for the unrotated pairs); attention scale 1;
    V is RMS-normed without weight; embeddings scaled by sqrt(n_embd)."""
    head_swa = int(k("attention.key_length_swa", hp["n_embd_head_k"]))
    head_v_swa = int(k("attention.value_length_swa", head_swa))
    rot_swa = int(k("rope.dimension_count_swa", head_swa))
    base_swa = float(k("rope.freq_base_swa", hp["freq_base"]))
    if int(k("embedding_length_per_layer_input", 0) or 0):
        raise ModelFormatError(
            f"{path}: per-layer embeddings (key 'gemma4.embedding_length_per_layer_input', the "
            f"E2B/E4B models) are not supported; moelite runs the Gemma-4 MoE models"
        )
    if int(k("attention.shared_kv_layers", 0) or 0):
        raise ModelFormatError(f"{path}: key 'gemma4.attention.shared_kv_layers' (KV sharing) is not supported")
    for il in range(n_layer):
        if plan["layer_mask"][il] == MASK_SWA:
            plan["layer_head_k"][il], plan["layer_head_v"][il] = head_swa, head_v_swa
            plan["layer_n_rot"][il], plan["layer_freq_base"][il] = rot_swa, base_swa
            plan["layer_rope_factors"][il] = 0
    plan["layer_kq_scale"] = [1.0] * n_layer
    hp.update(v_norm=True, embd_scale=math.sqrt(hp["n_embd"]))


def _llama4_plan(k, hp: dict, plan: dict, n_layer: int, n_expert: int) -> None:
    """Llama-4 (llama.cpp's rules): unless `attention.sliding_window` is 0, layers 3 of 4 use RoPE with chunked
    attention (chunk 8192); every 4th is NoPE, full attention, with the attention temperature. The weightless
    q/k norm is on for RoPE layers unless the model has 128 experts (Maverick). The router's sigmoid weight
    scales the expert input."""
    hp.update(weights_before_ffn=True, gating=GATING_SIGMOID, weights_norm=False)
    if n_expert == 128:
        hp["qk_norm"] = QK_NORM_NONE
    if k.raw("attention.sliding_window") is not None and int(k("attention.sliding_window")) == 0:
        return  # no chunking: RoPE on every layer
    base_swa = float(k("rope.freq_base_swa", hp["freq_base"]))
    hp.update(n_chunk=LLAMA4_CHUNK, attn_temp_floor=LLAMA4_TEMP_FLOOR, attn_temp_scale=LLAMA4_TEMP_SCALE)
    for il in range(n_layer):
        if (il + 1) % LLAMA4_NOPE_STEP == 0:
            plan["layer_n_rot"][il], plan["layer_attn_temp"][il] = 0, 1
        else:
            plan["layer_mask"][il], plan["layer_freq_base"][il] = MASK_CHUNKED, base_swa


# families whose MTP block the runtime runs (csrc/mtp.cpp), each checked against a reference of the same block
# (tests/test_mtp.py): the block reads the trunk's output-normed hidden state and chains on its own head-normed state,
# as llama.cpp's hy_v3, glm4moe, deepseek2 and qwen35moe MTP graphs do. Other families keep their MTP blocks in the file,
# unrun, until their semantics are checked.
MTP_ARCHS = ("hy_v3", "glm4moe", "deepseek2", "qwen35moe", "qwen3next")


def with_mtp(hp: dict[str, Any], tensors: dict[str, tuple], path: str) -> dict[str, Any]:
    """hparams with the first MTP block (blk.{n_layer}) appended to the layer plan (`n_mtp` = 1): its plan entry
    is that of the trunk layer its shapes follow (`nextn_ref`), full attention, with routed experts where the
    block has them. A UsageError says why a file's MTP block cannot run."""
    n_layer, arch = hp["n_layer"], hp["arch"]
    if not hp.get("n_layer_nextn"):
        raise UsageError(f"speculative='mtp': {path} has no MTP blocks (nextn_predict_layers = 0)")
    if arch not in MTP_ARCHS:
        raise UsageError(
            f"speculative='mtp': {path} ({arch}) has {hp['n_layer_nextn']} MTP block(s), but this runtime runs the "
            f"MTP blocks of {', '.join(MTP_ARCHS)} only; use speculative='ngram' or 'draft'"
        )
    il = n_layer
    # the trunk layer the block's plan follows: as the file says (nextn_ref), else the last attention layer (Qwen3.5:
    # its MTP block is a full-attention layer after a hybrid trunk)
    attn = [i for i in range(n_layer) if hp["layer_mixer"][i] in (MIXER_ATTN, MIXER_MLA)] or [n_layer - 1]
    ref = (hp.get("nextn_ref") or [attn[-1]])[0]
    if hp["layer_mixer"][ref] not in (MIXER_ATTN, MIXER_MLA):
        raise UsageError(f"speculative='mtp': {path}: the MTP block follows a layer without attention")
    out = dict(hp, n_mtp=1)
    for k, v in hp.items():
        if (k.startswith("layer_") or k == "swa_layers") and isinstance(v, list) and len(v) == n_layer:
            out[k] = v + [v[ref]]
    out["layer_mask"][-1] = MASK_CAUSAL
    out["layer_ffn"][-1] = FFN_MOE if f"blk.{il}.ffn_down_exps.weight" in tensors else FFN_DENSE
    return out


def planned(hp: dict[str, Any]) -> dict[str, Any]:
    """The planner's view of hparams: a loaded MTP block (with_mtp) counted as one more layer (its dense weights,
    KV cache and expert slots)."""
    return dict(hp, n_layer=hp["n_layer"] + hp.get("n_mtp", 0)) if hp.get("n_mtp") else hp
