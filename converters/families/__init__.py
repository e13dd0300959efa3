"""Model families: one declare-only module per Hugging Face `model_type`.

Each family module defines `FAMILY = Family(...)` (and `FAMILIES = (...)` when it declares siblings that
share its code, e.g. GLM-4.7-Flash beside DeepSeek-V3):
  model_types   HF config `model_type` values it handles
  arch          GGUF `general.architecture` (llama.cpp's name)
  hparams(c)    config.json -> {GGUF key: value}; keys without a "general."/"tokenizer." prefix get
                "{arch}." prepended. Python types pick the GGUF type: bool -> BOOL, int -> UINT32,
                float -> FLOAT32, str -> STRING, list[bool] -> ARRAY[BOOL] (llama.cpp's own choices).
  tensors       {HF name after sanitize: GGUF name}; "{bid}" stands for the layer index
  sanitize(w,c) rewrites the dict of Lazy tensors in place: stack per-expert tensors, split fused ones,
                permute Q/K. Uses only the helpers below (no I/O, no numpy on data except through Lazy).
  skip          regexes of HF names that are dropped on purpose (e.g. DeepSeek-V3's MTP layer)
  tensor_hparams(w, c)  keys whose values are tensors of the checkpoint (read before sanitize)
  tokenizer_pre llama.cpp `tokenizer.ggml.pre` of the real checkpoints of this family

  defaults      {config.json key: transformers config class default}: what a key absent from config.json
                means (real release configs omit keys their class defines with a default). Static defaults only;
                a default computed from other keys (head_dim = hidden_size / heads) is computed where it is read.

Everything shared by several families lives here: Config access, the common hyperparameters, the
llama-style tensor names, and the one expert-stacking routine.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from moelite.errors import ConversionError

from ..lazy import Lazy, rows, stack

SOFTMAX, SIGMOID = 1, 2  # llama.cpp LLAMA_EXPERT_GATING_FUNC_TYPE_*

_MISSING = object()


class Config:
    """config.json with alias-aware, typed, error-naming access. A key absent from the file takes the default of
    the family's transformers config class (`Family.defaults`, found by model_type), then the reader's `default`."""

    def __init__(self, d: dict[str, Any], src: str = "config.json", defaults: dict[str, Any] | None = None):
        self.d, self.src = d, src
        if defaults is None:
            fam = registry().get(d.get("model_type")) if isinstance(d.get("model_type"), str) else None
            defaults = fam.defaults if fam else {}
        self.defaults = defaults

    def get(self, *keys: str, default: Any = _MISSING) -> Any:
        """The first of `keys` (aliases of one value) that the file holds, else (none of them in the file) the
        first with a class default, else `default`; ConversionError when none applies. An explicit null in the
        file is no value, as in transformers (DeepSeek-V2-Lite's `"q_lora_rank": null`): no class default."""
        for k in keys:
            if self.d.get(k) is not None:
                return self.d[k]
        if not any(k in self.d for k in keys):
            for k in keys:
                if self.defaults.get(k) is not None:
                    return self.defaults[k]
        if default is _MISSING:
            raise ConversionError(f"{self.src}: missing key {' / '.join(keys)}")
        return default

    def int(self, *keys: str, default: Any = _MISSING) -> int:
        return self._number(int, keys, default)

    def float(self, *keys: str, default: Any = _MISSING) -> float:
        return self._number(float, keys, default)

    def _number(self, kind: type, keys: tuple[str, ...], default: Any) -> Any:
        v = self.get(*keys, default=default)
        if v is None:
            return v
        if isinstance(v, bool) or not isinstance(v, (int, float)) or (kind is int and v != int(v)) or v != v:
            key = next((k for k in keys if self.d.get(k) is not None), keys[0])
            raise ConversionError(
                f"{self.src}: key {key} = {str(v)[:40]}: expected {'an integer' if kind is int else 'a number'}"
            )
        return kind(v)

    def bool(self, *keys: str, default: Any = _MISSING) -> bool:
        v = self.get(*keys, default=default)
        return v if v is None else bool(v)

    def has(self, key: str) -> bool:
        """The file or (the key absent from it) the class default gives `key` a value."""
        return self.d.get(key) is not None or (key not in self.d and self.defaults.get(key) is not None)

    @property
    def n_layer(self) -> int:
        # transformers' Nemotron-H config has no such key: the length of its block list (as the class derives it)
        blocks = self.get("layers_block_type", "hybrid_override_pattern", default=None)
        if self.get("num_hidden_layers", default=None) is None and isinstance(blocks, (list, str)):
            return len(blocks)
        return self.int("num_hidden_layers")

    @property
    def n_expert(self) -> int:
        return self.int("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")

    @property
    def head_dim(self) -> int:
        hd = self.get("head_dim", default=None)
        return int(hd) if hd else self.int("hidden_size") // self.int("num_attention_heads")

    def rope(self) -> dict[str, Any]:
        """transformers 5 `rope_parameters` or legacy `rope_theta` + `rope_scaling`, one dict; absent, the class's
        default rope_parameters (gpt-oss: yarn) and default theta (`rope_theta` in defaults, transformers'
        `default_theta`)."""
        rp = dict(
            self.d.get("rope_parameters") or self.d.get("rope_scaling") or self.defaults.get("rope_parameters") or {}
        )
        rp = dict(rp.get("full_attention", rp))
        if "rope_type" not in rp and "type" in rp:
            rp["rope_type"] = rp["type"]
        if "rope_theta" not in rp and self.has("rope_theta"):
            rp["rope_theta"] = self.get("rope_theta")
        return rp


# MTP / nextn blocks, kept as llama.cpp keeps them: blk.{n_layer + i} is the block's decoder layer under the trunk's
# names plus these projections (the block's own embeddings and LM head are optional: most releases share the trunk's)
MTP_NAMES = {
    "model.layers.{bid}.eh_proj.weight": "blk.{bid}.nextn.eh_proj.weight",  # [H, 2H]
    "model.layers.{bid}.enorm.weight": "blk.{bid}.nextn.enorm.weight",  # [H]
    "model.layers.{bid}.hnorm.weight": "blk.{bid}.nextn.hnorm.weight",
    "model.layers.{bid}.shared_head.norm.weight": "blk.{bid}.nextn.shared_head_norm.weight",
    "model.layers.{bid}.shared_head.head.weight": "blk.{bid}.nextn.shared_head_head.weight",  # [V, H], optional
    "model.layers.{bid}.embed_tokens.weight": "blk.{bid}.nextn.embed_tokens.weight",  # [V, H], optional
}


def n_nextn(c: Config, default: int = 0) -> int:
    """MTP blocks after the trunk (`num_nextn_predict_layers`; Qwen3.5's `mtp_num_hidden_layers`)."""
    return c.int("num_nextn_predict_layers", "mtp_num_hidden_layers", default=default)


# the release's shared MTP tensors `mtp.{name}.weight` (EXAONE-MoE, Qwen3.5) -> the names MTP_NAMES maps
_RELEASE_MTP_SHARED = {
    "fc": "eh_proj",
    "pre_fc_norm_embedding": "enorm",
    "pre_fc_norm_hidden": "hnorm",
    "norm": "shared_head.norm",
}


def release_mtp_layers(w: dict[str, Lazy], c: Config, arch: str) -> None:
    """MTP blocks stored under `mtp.*` (`mtp.layers.{i}.*` a decoder layer, `mtp.fc` / `pre_fc_norm_*` / `norm` shared
    by all) renamed to model.layers.{n_layer + i}.* with eh_proj / enorm / hnorm / shared_head.norm, as llama.cpp's
    converters do; without MTP blocks in config.json they are dropped, as llama.cpp drops them."""
    n_layer, nextn = c.n_layer, n_nextn(c)
    for name in [n for n in w if n.startswith("mtp.")]:
        t = w.pop(name)
        if nextn == 0:
            continue
        m = re.match(r"mtp\.layers\.(\d+)\.(.+)\Z", name)
        if m:
            i = int(m.group(1))
            if i >= nextn:
                raise ConversionError(f"{t.src}: tensor {name}: config.json says {nextn} MTP block(s)")
            w[f"model.layers.{n_layer + i}.{m.group(2)}"] = t
            continue
        m = re.match(r"mtp\.(\w+)\.weight\Z", name)
        if not m or m.group(1) not in _RELEASE_MTP_SHARED:
            raise ConversionError(f"{t.src}: tensor {name} has no GGUF name in family {arch}")
        for i in range(nextn):  # one set shared by every MTP block, written to each
            w[f"model.layers.{n_layer + i}.{_RELEASE_MTP_SHARED[m.group(1)]}.weight"] = t


def mtp_hparams(c: Config) -> dict[str, Any]:
    """llama.cpp's keys of the kept MTP blocks: block_count counts them, nextn_predict_layers says how many."""
    return {"block_count": c.n_layer + n_nextn(c), "nextn_predict_layers": n_nextn(c) or None}


def with_mtp_layers(c: Config) -> Config:
    """The config seen as trunk + MTP blocks (num_hidden_layers counts both), so that the per-layer sanitizers
    (expert stacking, MLA splits) reach the MTP blocks too."""
    return Config({**c.d, "num_hidden_layers": c.n_layer + n_nextn(c)}, c.src, c.defaults)


def common_hparams(c: Config) -> dict[str, Any]:
    """Keys llama.cpp's converter writes for every text model (TextModel.set_gguf_parameters)."""
    rp = c.rope()
    kv: dict[str, Any] = {
        "block_count": c.n_layer,
        "context_length": c.int("max_position_embeddings"),
        "embedding_length": c.int("hidden_size"),
        # as llama.cpp: only when the class has it (Qwen3.5-MoE's experts use moe_intermediate_size, no dense FFN)
        "feed_forward_length": c.int("intermediate_size") if c.has("intermediate_size") else None,
        "attention.head_count": c.int("num_attention_heads"),
        # absent with no class default: transformers sets it to num_attention_heads (MHA)
        "attention.head_count_kv": c.int("num_key_value_heads", default=c.int("num_attention_heads")),
        "rope.freq_base": float(rp.get("rope_theta", 10000.0)),
        "attention.layer_norm_rms_epsilon": c.float("rms_norm_eps", "norm_eps"),  # norm_eps: LFM2
        "expert_count": c.n_expert,
        "expert_used_count": c.int("num_experts_per_tok", "top_k_experts", "moe_k", default=None),
    }
    if c.has("head_dim"):
        kv["attention.key_length"] = kv["attention.value_length"] = c.int("head_dim")
    kv.update(rope_scaling_hparams(rp))
    return kv


def rope_scaling_hparams(rp: dict[str, Any]) -> dict[str, Any]:
    kind, factor = rp.get("rope_type"), rp.get("factor")
    if kind == "linear" and factor:
        return {"rope.scaling.type": "linear", "rope.scaling.factor": float(factor)}
    if kind != "yarn" or not factor:
        return {}
    kv: dict[str, Any] = {
        "rope.scaling.type": "yarn",
        "rope.scaling.factor": float(factor),
        "rope.scaling.original_context_length": int(rp["original_max_position_embeddings"]),
    }
    for hf, gg in (
        ("beta_fast", "yarn_beta_fast"),
        ("beta_slow", "yarn_beta_slow"),
        ("extrapolation_factor", "yarn_ext_factor"),
        ("attention_factor", "yarn_attn_factor"),
    ):
        if rp.get(hf) is not None:
            kv[f"rope.scaling.{gg}"] = float(rp[hf])
    return kv


# HF -> GGUF names shared by the llama-style families ({bid} = layer index)
LLAMA_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
    "model.layers.{bid}.input_layernorm.weight": "blk.{bid}.attn_norm.weight",
    "model.layers.{bid}.post_attention_layernorm.weight": "blk.{bid}.ffn_norm.weight",
    "model.layers.{bid}.self_attn.q_proj.weight": "blk.{bid}.attn_q.weight",
    "model.layers.{bid}.self_attn.k_proj.weight": "blk.{bid}.attn_k.weight",
    "model.layers.{bid}.self_attn.v_proj.weight": "blk.{bid}.attn_v.weight",
    "model.layers.{bid}.self_attn.o_proj.weight": "blk.{bid}.attn_output.weight",
}
# the qwen2_moe-style MoE block (also qwen3_moe, olmoe, deepseek); names after stack_experts
MOE_NAMES = {
    "model.layers.{bid}.mlp.gate.weight": "blk.{bid}.ffn_gate_inp.weight",  # [E, H]
    "model.layers.{bid}.mlp.experts.gate_proj.weight": "blk.{bid}.ffn_gate_exps.weight",  # [E, I, H]
    "model.layers.{bid}.mlp.experts.up_proj.weight": "blk.{bid}.ffn_up_exps.weight",  # [E, I, H]
    "model.layers.{bid}.mlp.experts.down_proj.weight": "blk.{bid}.ffn_down_exps.weight",  # [E, H, I]
}


def stack_experts(
    w: dict[str, Lazy],
    c: Config,
    per_expert: str,
    fused: str,
    projs: tuple[str, ...] = ("gate_proj", "up_proj", "down_proj"),
) -> None:
    """The one stacking routine: for every layer that has them, replace the per-expert tensors
    `per_expert.format(bid=, e=, proj=)` by one [E, ...] tensor named `fused.format(bid=, proj=)`."""
    n_expert = c.n_expert
    for bid in range(c.n_layer):
        for proj in projs:
            names = [per_expert.format(bid=bid, e=e, proj=proj) for e in range(n_expert)]
            present = [n for n in names if n in w]
            if not present:
                continue
            if len(present) != n_expert:
                missing = next(n for n in names if n not in w)
                raise ConversionError(
                    f"tensor {missing} is missing: config.json says {n_expert} experts "
                    f"and layer {bid} has {len(present)}"
                )
            out = fused.format(bid=bid, proj=proj)
            w[out] = stack([w.pop(n) for n in names], out)


def leading_dense_layers(c: Config, types: Any = _MISSING, default: Any = _MISSING) -> int:
    """Leading dense layers (a GGUF's leading_dense_block_count) from transformers' `mlp_layer_types` (the dense
    layers first, then sparse; `types` overrides the lookup), else the release key `first_k_dense_replace`."""
    types = c.get("mlp_layer_types", default=None) if types is _MISSING else types
    if types is None:
        return c.int("first_k_dense_replace", default=default)
    n = next((i for i, t in enumerate(types) if t != "dense"), len(types)) if isinstance(types, list) else -1
    if not isinstance(types, list) or len(types) != c.n_layer or set(types[n:]) - {"sparse"}:
        raise ConversionError(
            f"{c.src}: key mlp_layer_types must list {c.n_layer} entries, the dense layers first "
            f"then sparse (what the GGUF's leading_dense_block_count expresses)"
        )
    return n


def sliding_layers(c: Config) -> list[bool] | None:
    """transformers 5's per-layer `layer_types` (sliding_attention / full_attention) as 'is sliding' per layer; None
    when the config has none (the family derives the pattern from its own keys, as its config class does)."""
    types = c.get("layer_types", default=None)
    if types is None:
        return None
    if (
        not isinstance(types, list)
        or len(types) != c.n_layer
        or not set(types) <= {"sliding_attention", "full_attention"}
    ):
        raise ConversionError(
            f"{c.src}: key layer_types must list {c.n_layer} entries of 'sliding_attention' / 'full_attention'"
        )
    return [t == "sliding_attention" for t in types]


def unfuse_experts(w: dict[str, Lazy], c: Config, experts: str) -> None:
    """Experts as transformers holds them in memory (`experts.gate_up_proj` [E, 2I, H] gate rows first, and
    `experts.down_proj`), if a checkpoint was saved that way, renamed / split into the per-matrix stacked names
    `experts.{gate,up,down}_proj.weight`; experts: the prefix with "{bid}" for the layer."""
    for bid in range(c.n_layer):
        e = experts.format(bid=bid) + "."
        if e + "gate_up_proj" in w:
            split_halves(w, e + "gate_up_proj", e + "gate_proj.weight", e + "up_proj.weight", axis=-2)
        if e + "down_proj" in w:
            w[e + "down_proj.weight"] = w.pop(e + "down_proj")


def drop_layers_beyond(w: dict[str, Lazy], c: Config) -> None:
    """Drop the layers after num_hidden_layers: the MTP / next-token-prediction block some checkpoints keep
    as `model.layers.{n_layer}` (GLM-4.x, DeepSeek-V3), dropped on purpose as llama.cpp's `--no-mtp` does."""
    for name in list(w):
        m = re.search(r"(?:^|\.)layers\.(\d+)\.", name)
        if m and int(m.group(1)) >= c.n_layer:
            del w[name]


def text_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """The text model's config of a multimodal checkpoint (`text_config` of Llama-4 / Gemma-4
    ...ForConditionalGeneration); moelite converts the text part only."""
    sub = cfg.get("text_config")
    if isinstance(sub, dict) and sub.get("model_type"):
        return {**{k: v for k, v in cfg.items() if k in ("tie_word_embeddings",)}, **sub}
    return cfg


def strip_prefix(w: dict[str, Lazy], renames: tuple[tuple[str, str], ...], drop: tuple[str, ...] = ()) -> None:
    """Rename checkpoint prefixes (multimodal wrappers: `model.language_model.` -> `model.`) and drop the
    towers moelite does not run (vision, audio, projectors)."""
    for name in list(w):
        if name.startswith(drop):
            del w[name]
            continue
        for old, new in renames:
            if name.startswith(old):
                w[new + name[len(old) :]] = w.pop(name)
                break


def mamba2_names(m: str) -> dict[str, str]:
    """HF -> GGUF names of a Mamba2 mixer at prefix m ("{bid}" for the layer), as llama.cpp names them; the shapes
    after mamba2_mixer."""
    return {
        m + ".in_proj.weight": "blk.{bid}.ssm_in.weight",  # [d_inner + C + nh, H]
        m + ".conv1d.weight": "blk.{bid}.ssm_conv1d.weight",  # [C, 1, K] -> [C, K]
        m + ".conv1d.bias": "blk.{bid}.ssm_conv1d.bias",
        m + ".dt_bias": "blk.{bid}.ssm_dt.bias",  # [nh]
        m + ".A_log": "blk.{bid}.ssm_a",  # [nh] -> [nh, 1] = -exp(A_log)
        m + ".D": "blk.{bid}.ssm_d",  # [nh] -> [nh, 1]
        m + ".norm.weight": "blk.{bid}.ssm_norm.weight",  # [d_inner] -> [ng, d_inner / ng]
        m + ".out_proj.weight": "blk.{bid}.ssm_out.weight",
    }


def mamba2_mixer(w: dict[str, Lazy], m: str, n_groups: int) -> None:
    """A Mamba2 mixer at prefix m as llama.cpp stores it (mixer_recurrent.cpp reads it so): conv1d [C, 1, K] ->
    [C, K], A_log -> A = -exp(A_log) [nh, 1], D [nh] -> [nh, 1], the gated norm's weight [d_inner] -> [n_groups,
    d_inner / n_groups]. Nothing when the layer has no mixer (m.in_proj absent)."""
    if f"{m}.in_proj.weight" not in w:
        return
    squeeze_conv(w, f"{m}.conv1d.weight")
    neg_exp(w, f"{m}.A_log", (w[f"{m}.A_log"].shape[0], 1))
    d = w[f"{m}.D"]
    w[f"{m}.D"] = d.map(lambda a: a.reshape(-1, 1), (d.shape[0], 1), "")
    norm = w[f"{m}.norm.weight"]
    n = norm.shape[0]
    w[f"{m}.norm.weight"] = norm.map(lambda a: a.reshape(n_groups, n // n_groups), (n_groups, n // n_groups), "")


def squeeze_conv(w: dict[str, Lazy], name: str) -> None:
    """A depthwise conv1d weight [C, 1, K] -> [C, K] (ggml ne {K, C}: ggml_ssm_conv's kernel)."""
    t = w[name]
    w[name] = t.map(lambda a: a.reshape(a.shape[0], a.shape[-1]), (t.shape[0], t.shape[-1]), "")


def neg_exp(w: dict[str, Lazy], name: str, shape: tuple[int, ...] | None = None) -> None:
    """A_log -> A = -exp(A_log), what llama.cpp stores as ssm_a (optionally reshaped, e.g. Mamba2's [nh, 1])."""
    t = w[name]
    shape = shape or t.shape
    w[name] = t.map(lambda a: -np.exp(a.astype(np.float32)).reshape(shape), shape, ".-exp")


def fold_zero_centred_norms(w: dict[str, Lazy], keep: tuple[str, ...] = ()) -> None:
    """RMSNorms computing x * (1 + w) (Qwen3.5, Qwen3-Next): +1 folded into every *norm.weight but `keep`."""
    for name in list(w):
        if name.endswith("norm.weight") and not name.endswith(keep):
            t = w[name]
            w[name] = t.map(lambda a: a + 1.0, t.shape, "+1")


def split_halves(w: dict[str, Lazy], name: str, first: str, second: str, axis: int = -2) -> None:
    """[.., 2I, ..] -> first half, second half (Granite input_linear: gate, up)."""
    t = w.pop(name)
    n = t.shape[axis] // 2
    w[first], w[second] = rows(t, slice(0, n), axis), rows(t, slice(n, 2 * n), axis)


def split_interleaved(w: dict[str, Lazy], name: str, even: str, odd: str, axis: int = -1) -> None:
    """[.., 2I] interleaved -> [..., ::2], [..., 1::2] (GPT-OSS gate_up: gate even, up odd)."""
    t = w.pop(name)
    w[even], w[odd] = rows(t, slice(0, None, 2), axis), rows(t, slice(1, None, 2), axis)


@dataclass(frozen=True)
class Family:
    model_types: tuple[str, ...]
    arch: str
    hparams: Callable[[Config], dict[str, Any]]
    tensors: dict[str, str]
    sanitize: Callable[[dict[str, Lazy], Config], None] = lambda w, c: None
    skip: tuple[str, ...] = ()
    tokenizer_pre: str = "default"
    defaults: dict[str, Any] = field(default_factory=dict)  # transformers class defaults (module docstring)
    keep_mtp: bool = False  # MTP blocks kept, as blk.{n_layer + i} (`num_nextn_predict_layers`), as llama.cpp
    n_mtp: int = 0  # MTP blocks when config.json does not say (MiMo-V2: 3, as llama.cpp hardcodes)
    # config.json never says how many MTP blocks the checkpoint holds (Qwen3-Next): `mtp.layers.{i}` counted
    mtp_from_checkpoint: bool = False
    # keys read from the checkpoint's tensors rather than config.json (Qwen4-Exp's int64 hash constants), called on
    # the weights before sanitize; the same {key: value} form as hparams
    tensor_hparams: Callable[[dict[str, Lazy], Config], dict[str, Any]] | None = None

    def n_blocks(self, c: Config) -> int:
        """Blocks written: the trunk, plus the MTP blocks of a family that keeps them."""
        return c.n_layer + (n_nextn(c, default=self.n_mtp) if self.keep_mtp else 0)

    def map_names(self, w: dict[str, Lazy], c: Config) -> list[tuple[str, Lazy]]:
        """Sanitized HF names -> GGUF names, in llama.cpp's order; unknown names are an error."""
        table = []
        for hf, gg in self.tensors.items():
            rx = re.compile(re.escape(hf).replace(re.escape("{bid}"), r"(?P<bid>\d+)") + r"\Z")
            table.append((rx, gg))
        skips = [re.compile(s) for s in self.skip]
        out: list[tuple[tuple[int, int], str, Lazy]] = []
        n_blocks = self.n_blocks(c)
        for i, (name, t) in enumerate(w.items()):
            if any(s.search(name) for s in skips):
                continue
            for rx, gg in table:
                m = rx.match(name)
                if m:
                    bid = int(m.group("bid")) if "bid" in rx.groupindex else -1
                    if bid >= n_blocks:
                        break
                    key = (bid if bid >= 0 else (-1 if gg.startswith("token_embd") else 1 << 30), i)
                    out.append((key, gg.format(bid=bid), t))
                    break
            else:
                raise ConversionError(
                    f"{t.src}: tensor {name} has no GGUF name in family {self.arch} "
                    f"(model_type {'/'.join(self.model_types)})"
                )
        out.sort(key=lambda x: x[0])
        return [(g, t) for _, g, t in out]


FAMILY_MODULES = (
    "mixtral",
    "qwen2_moe",
    "qwen3_moe",
    "olmoe",
    "deepseek_v2",
    "deepseek_v3",
    "deepseek_v32",
    "gpt_oss",
    "granitemoe",
    "phimoe",
    "glm4_moe",
    "dots1",
    "minimax_m2",
    "ernie4_5_moe",
    "hunyuan_v1_moe",
    "llama4",
    "gemma4",
    "lfm2_moe",
    "qwen3_5_moe",
    "qwen3_next",
    "granitemoehybrid",
    "exaone_moe",
    "hy_v3",
    "hy_v4",
    "qwen4_exp",
    "mistral4",
    "afmoe",
    "cohere2_moe",
    "nemotron_h",
    "laguna",
    "mimo_v2_flash",
    "step3p5",
    "kimi_linear",
    "bailing_hybrid",
    "glm5_next",
)
DENSE_MODEL_TYPES = {
    "llama",
    "mistral",
    "qwen2",
    "qwen3",
    "olmo",
    "olmo2",
    "granite",
    "phi3",
    "phi",
    "gemma",
    "gemma2",
    "gemma3",
    "deepseek",
    "gpt2",
    "gpt_neox",
    "falcon",
    "starcoder2",
    "stablelm",
}
_EXPERT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")


def registry() -> dict[str, Family]:
    reg: dict[str, Family] = {}
    for mod in FAMILY_MODULES:
        try:
            module = importlib.import_module(f"{__name__}.{mod}")
        except ModuleNotFoundError as e:
            if e.name != f"{__name__}.{mod}":
                raise
            continue
        for fam in getattr(module, "FAMILIES", (module.FAMILY,)):  # a module may declare sibling families
            for mt in fam.model_types:
                reg[mt] = fam
    return reg


def for_config(cfg: dict[str, Any], src: str = "config.json") -> Family:
    mt = cfg.get("model_type")
    reg = registry()
    defaults = reg[mt].defaults if isinstance(mt, str) and mt in reg else {}
    n_expert = next((v[k] for v in (cfg, defaults) for k in _EXPERT_KEYS if v.get(k) is not None), None)
    if isinstance(mt, str) and mt in reg:
        if not n_expert or int(n_expert) < 2:
            raise ConversionError(
                f"{src}: model_type {mt!r} with {n_expert or 0} experts is a dense (non-MoE) "
                f"model; moelite converts Mixture-of-Experts models only"
            )
        return reg[mt]
    if mt in DENSE_MODEL_TYPES or (mt is not None and not n_expert):
        raise ConversionError(
            f"{src}: model_type {mt!r} is a dense (non-MoE) model; moelite converts "
            f"Mixture-of-Experts models only ({', '.join(sorted(reg))})"
        )
    raise ConversionError(f"{src}: unknown model_type {mt!r}; expected one of {', '.join(sorted(reg))}")
