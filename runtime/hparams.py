"""GGUF metadata (llama.cpp keys) -> the generic hyperparameters of the C++ core (csrc/model.h HParams).

One table says what each llama.cpp architecture means; the C++ graph only knows generic switches
(norm kind, q/k norm, RoPE mode, gating function, activation, multipliers). Key names are llama.cpp's.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from ..errors import ModelFormatError

ROPE_NORM, ROPE_NEOX = 0, 2
GATING_SOFTMAX, GATING_SIGMOID, GATING_SOFTMAX_WEIGHT, GATING_SPARSEMIXER = 1, 2, 3, 4
QK_NORM_NONE, QK_NORM_HEAD, QK_NORM_FULL = 0, 1, 2
ACT_SILU, ACT_SWIGLU_OAI = 0, 1


@dataclass(frozen=True)
class ArchSpec:
    """What an architecture needs beyond the common keys (defaults follow llama.cpp's runtime)."""
    rope_type: int
    qk_norm: int = QK_NORM_NONE
    gating: int = GATING_SOFTMAX
    weights_norm: bool = False          # default when `{arch}.expert_weights_norm` is absent
    layernorm: bool = False
    act: int = ACT_SILU
    swa_period: int = 0                 # alternating sliding window: layer il is SWA iff il % period < period - 1


ARCHS: dict[str, ArchSpec] = {
    "qwen3moe": ArchSpec(ROPE_NEOX, qk_norm=QK_NORM_HEAD, weights_norm=True),
    "qwen2moe": ArchSpec(ROPE_NEOX),
    "olmoe": ArchSpec(ROPE_NEOX, qk_norm=QK_NORM_FULL),
    "llama": ArchSpec(ROPE_NORM, weights_norm=True),                       # Mixtral
    "deepseek2": ArchSpec(ROPE_NORM),
    "gpt-oss": ArchSpec(ROPE_NEOX, gating=GATING_SOFTMAX_WEIGHT, act=ACT_SWIGLU_OAI, swa_period=2),
    "granitemoe": ArchSpec(ROPE_NORM, weights_norm=True),
    "phimoe": ArchSpec(ROPE_NEOX, gating=GATING_SPARSEMIXER, layernorm=True),
}


@dataclass
class GGUFModelInfo:
    path: str
    kv: dict[str, Any]
    tensors: dict[str, tuple[int, tuple[int, ...], int, int]]   # name -> (ggml type, shape, offset, nbytes)
    alignment: int
    file_size: int
    hparams: dict[str, Any] = field(default_factory=dict)


def _key(kv: dict, path: str, key: str, default: Any = ..., *, kind: type | None = None) -> Any:
    if key not in kv:
        if default is ...:
            raise ModelFormatError(f"{path}: missing key '{key}'")
        return default
    v = kv[key]
    if hasattr(v, "__len__") and not isinstance(v, str):      # per-layer arrays: must be uniform here
        vals = set(int(x) for x in v)
        if len(vals) != 1:
            raise ModelFormatError(f"{path}: key '{key}' varies per layer ({sorted(vals)}); not supported")
        v = vals.pop()
    if kind is not None and not isinstance(v, (int, float, bool)) :
        raise ModelFormatError(f"{path}: key '{key}' should be a number, got {type(v).__name__}")
    return v


def parse_hparams(path: str, kv: dict[str, Any], tensors: dict[str, tuple]) -> dict[str, Any]:
    """Read llama.cpp keys of a MoE GGUF into the dict the C++ Model takes. Raises ModelFormatError."""
    arch = kv.get("general.architecture")
    if arch is None:
        raise ModelFormatError(f"{path}: missing key 'general.architecture'")
    if arch not in ARCHS:
        raise ModelFormatError(f"{path}: unknown architecture '{arch}' (key general.architecture); "
                               f"supported: {', '.join(sorted(ARCHS))}")
    spec = ARCHS[arch]
    a = arch

    def k(name: str, default: Any = ...) -> Any:
        return _key(kv, path, f"{a}.{name}", default, kind=float)

    n_expert = int(k("expert_count", 0))
    if n_expert <= 1 or not any(n.endswith("ffn_gate_exps.weight") for n in tensors):
        raise ModelFormatError(f"{path}: not a Mixture-of-Experts model (key '{a}.expert_count' = {n_expert}, "
                               f"no 'blk.N.ffn_gate_exps.weight' tensors)")
    if "token_embd.weight" not in tensors:
        raise ModelFormatError(f"{path}: missing tensor 'token_embd.weight'")
    n_embd = int(k("embedding_length"))
    n_layer = int(k("block_count"))
    n_head = int(k("attention.head_count"))
    n_head_kv = int(k("attention.head_count_kv", n_head))
    n_vocab = int(tensors["token_embd.weight"][1][1])
    head_k = int(k("attention.key_length", n_embd // n_head))
    head_v = int(k("attention.value_length", n_embd // n_head))
    kv_lora = int(k("attention.kv_lora_rank", 0))
    if kv_lora:       # MLA: per-head sizes of the decompressed heads
        head_k = int(k("attention.key_length_mla", head_k))
        head_v = int(k("attention.value_length_mla", head_v))
    n_rot = int(k("rope.dimension_count", head_k))
    eps = float(k("attention.layer_norm_rms_epsilon", k("attention.layer_norm_epsilon", 1e-5)))

    # RoPE scaling, as llama.cpp derives its ggml_rope_ext arguments (llama-context.cpp)
    scaling = kv.get(f"{a}.rope.scaling.type", "none")
    factor = float(k("rope.scaling.factor", 0.0) or 0.0)
    freq_scale = 1.0 / factor if (factor and scaling != "none") else 1.0
    ext_factor = 1.0 if scaling == "yarn" else 0.0
    attn_factor = 1.0
    log_mul = float(k("rope.scaling.yarn_log_multiplier", 0.0))
    if arch == "deepseek2" and log_mul:
        log_mul /= 0.1                 # llama.cpp's converter stores 0.1 * mscale_all_dim
    if ext_factor != 0.0:
        f = 1.0 / freq_scale

        def mscale(s: float, m: float) -> float:
            return 1.0 if s <= 1.0 else 0.1 * m * math.log(s) + 1.0
        if log_mul:
            m = log_mul if (arch == "deepseek2" and log_mul != 1.0) else 1.0
            attn_factor = mscale(f, m) / mscale(f, log_mul)
        else:
            attn_factor = mscale(f, 1.0)
        attn_factor *= 1.0 / (1.0 + 0.1 * math.log(f))
    attn_factor *= float(k("rope.scaling.attn_factor", 1.0))

    kq_scale = 1.0 / math.sqrt(head_k)
    if arch == "deepseek2":
        org = attn_factor * (1.0 + 0.1 * math.log(1.0 / freq_scale))
        ms = org * (1.0 + 0.1 * log_mul * math.log(1.0 / freq_scale))
        kq_scale = ms * ms / math.sqrt(head_k)
    if f"{a}.attention.scale" in kv:                     # granite: attention_multiplier
        kq_scale = float(kv[f"{a}.attention.scale"])

    n_swa = int(k("attention.sliding_window", 0))
    swa_layers = [0] * n_layer
    pattern = kv.get(f"{a}.attention.sliding_window_pattern")
    if n_swa:
        if pattern is not None and hasattr(pattern, "__len__"):
            swa_layers = [int(bool(x)) for x in pattern][:n_layer]
        else:
            period = int(pattern) if pattern is not None else spec.swa_period
            if period > 0:
                swa_layers = [int(il % period < period - 1) for il in range(n_layer)]

    gating = int(k("expert_gating_func", spec.gating))
    if arch == "gpt-oss":
        gating = GATING_SOFTMAX_WEIGHT
    if arch == "phimoe" and gating == GATING_SOFTMAX:
        gating = GATING_SPARSEMIXER
    n_expert_used = int(k("expert_used_count"))
    if not 0 < n_expert_used <= min(n_expert, 64):
        raise ModelFormatError(f"{path}: key '{a}.expert_used_count' = {n_expert_used}, expected 1..{min(n_expert, 64)}")
    qk_norm = spec.qk_norm if any(n.endswith("attn_q_norm.weight") for n in tensors) else QK_NORM_NONE

    return dict(
        arch=arch, n_vocab=n_vocab, n_embd=n_embd, n_layer=n_layer, n_head=n_head, n_head_kv=n_head_kv,
        n_embd_head_k=head_k, n_embd_head_v=head_v, norm_eps=eps, layernorm=spec.layernorm, qk_norm=qk_norm,
        n_rot=n_rot, rope_type=spec.rope_type,
        n_ctx_orig=int(k("rope.scaling.original_context_length", k("context_length", 4096))),
        freq_base=float(k("rope.freq_base", 10000.0)), freq_scale=freq_scale, ext_factor=ext_factor,
        attn_factor=attn_factor, beta_fast=float(k("rope.scaling.yarn_beta_fast", 32.0)),
        beta_slow=float(k("rope.scaling.yarn_beta_slow", 1.0)), kq_scale=kq_scale, n_swa=n_swa, swa_layers=swa_layers,
        q_lora_rank=int(k("attention.q_lora_rank", 0)), kv_lora_rank=kv_lora,
        n_expert=n_expert, n_expert_used=n_expert_used, n_layer_dense_lead=int(k("leading_dense_block_count", 0)),
        gating=gating, weights_norm=bool(k("expert_weights_norm", spec.weights_norm)),
        weights_scale=float(k("expert_weights_scale", 1.0) or 1.0),
        n_group=int(k("expert_group_count", 1) or 1), topk_group=int(k("expert_group_used_count", 1) or 1),
        jitter_eps=float(kv.get(f"{a}.expert_router_jitter", kv.get("moelite.router_jitter_eps", 0.01))),
        act=spec.act, oai_alpha=1.702, oai_limit=float(kv.get(f"{a}.expert_swiglu_limit", 7.0)),
        embd_scale=float(k("embedding_scale", 1.0)), residual_scale=float(k("residual_scale", 1.0)),
        logit_scale=float(k("logit_scale", 1.0)),
        context_length=int(k("context_length", 4096)),
    )
