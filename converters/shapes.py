"""A model's GGUF from its config.json alone: the keys the converter family writes and the tensor table (names,
ggml types and byte sizes at a quantization type), without the weights. `moelite plan --config` plans a model
this way (the memory planner and speed model then run as on a file), e.g. a release checkpoint too big to fetch.

The tensors are those the family's converter declaration writes (`Family.tensors`' GGUF names), in the shapes
llama.cpp's loaders give them from the written keys: per layer its attention (standard or MLA, the per-layer head
counts, q/k norms, output gates, sinks on sliding layers), or a Mamba2 mixer (Nemotron-H), and its FFN (dense on
the leading / listed dense layers, else router, routed experts, shared experts, latent projections); MTP blocks as
the family keeps them. The runtime's loader checks (runtime/validate.py) run on the result, as on a real file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from moelite.errors import ConversionError

from . import quant
from .convert import _config_values, planned_table
from .families import SIGMOID, Config, Family, for_config, text_config
from .lazy import Lazy

# the model_types whose tables this module gives exactly (tests/test_plan_shapes.py compares each with the table of
# its converted checkpoint); others are refused by name (plan their Hugging Face directory instead)
CONFIG_FAMILIES = (
    "exaone_moe",
    "hy_v3",
    "mistral4",
    "afmoe",
    "nemotron_h",
    "cohere2_moe",
    "laguna",
    "mimo_v2_flash",
    "step3p5",
    "qwen3_moe",
    "deepseek_v2",
    "deepseek_v3",
    "glm4_moe_lite",
    "hunyuan_v1_moe",
    "mixtral",
    "granitemoe",
    "granitemoeshared",
    "dots1",
    "deepseek_v32",
    "glm_moe_dsa",
    "glm5_next_text",
)
# families whose routers select on a per-expert bias (exp_probs_b), and whose MTP blocks hold a dense MLP
ROUTER_BIAS = {
    "exaone-moe",
    "hy_v3",
    "afmoe",
    "nemotron_h_moe",
    "laguna",
    "mimo2",
    "step35",
    "deepseek2",
    "dots1",
    "deepseek32",
    "glm-dsa",
    "glm5-next",
}
MTP_DENSE = {"exaone-moe", "mimo2"}
GATE_PER_ELEMENT = {"afmoe"}  # the attention output gate: one per element (else one per head)


def read_config(src: str | Path) -> tuple[dict[str, Any], str]:
    """config.json (a file, or a directory holding one) -> (its text model's config, its path)."""
    p = Path(src).expanduser()
    p = p / "config.json" if p.is_dir() else p
    try:
        cfg = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConversionError(f"{p}: cannot read a config.json ({type(e).__name__}: {e})") from None
    if not isinstance(cfg, dict):
        raise ConversionError(f"{p}: config.json must hold a JSON object")
    return text_config(cfg), str(p)


def describe_config(src: str | Path, type: str = "q4_k_m") -> tuple[dict[str, Any], dict[str, tuple]]:
    """(GGUF key -> value, tensor name -> (ggml type, shape in ggml order, offset, nbytes)) of the GGUF that
    converting a checkpoint with this config.json at `type` writes, as moelite reads a GGUF (describe() of
    converters/convert.py, without the weights or the tokenizer)."""
    from moelite.runtime.validate import load_hparams

    cfg, where = read_config(src)
    with _config_values(where):  # a value of the wrong type or range: ConversionError naming the file
        kv, table = _describe(cfg, where, type)
    # the loader's own checks (ModelFormatError naming the key): the table is one it would run
    load_hparams(where, kv, table, file_size=sum(t[3] for t in table.values()))
    return kv, table


def _describe(cfg: dict[str, Any], where: str, type: str) -> tuple[dict[str, Any], dict[str, tuple]]:
    family = for_config(cfg, where)
    if cfg.get("model_type") not in CONFIG_FAMILIES:
        raise ConversionError(
            f"{where}: model_type {str(cfg.get('model_type'))[:40]!r}: a table from config.json alone is known for "
            f"{', '.join(CONFIG_FAMILIES)}; plan its Hugging Face directory (safetensors headers) instead"
        )
    c = Config(cfg, where, family.defaults)
    hp = {k: v for k, v in family.hparams(c).items() if v is not None}
    kv: dict[str, Any] = {"general.architecture": family.arch}
    for key, value in hp.items():
        full = key if key.split(".")[0] in ("general", "tokenizer", "moelite") else f"{family.arch}.{key}"
        kv[full] = value
    shapes = gguf_shapes(family, c, hp)
    lazies = [(n, Lazy(tuple(s), _no_data(n), where)) for n, s in shapes]
    return kv, planned_table(quant.plan(lazies, type, c.n_layer, c.n_expert))


def _no_data(name: str):
    def load() -> np.ndarray:
        raise ConversionError(f"tensor {name}: planned from config.json only, it has no data")

    return load


def _per_block(hp: dict, key: str, n_block: int, default: Any) -> list:
    v = hp.get(key, default)
    if isinstance(v, (list, tuple)):
        return list(v) + [v[-1]] * (n_block - len(v))  # trunk-only arrays: the MTP blocks as the last layer
    return [v] * n_block


def dense_layers(c: Config, hp: dict) -> set[int]:
    """Trunk layers with a dense FFN: the leading ones the GGUF states, else the config's own list."""
    if "leading_dense_block_count" in hp:
        return set(range(int(hp["leading_dense_block_count"])))
    types = c.get("mlp_layer_types", default=None)
    if isinstance(types, list):
        return {i for i, t in enumerate(types) if t == "dense"}
    return set(range(c.int("first_k_dense_replace", default=0)))


def gguf_shapes(family: Family, c: Config, hp: dict) -> list[tuple[str, tuple[int, ...]]]:
    """GGUF tensor names and shapes (numpy order: ne reversed) of the family's file, from its keys."""
    names = {n.replace("blk.{bid}.", "") for n in family.tensors.values()}
    H, V, n_layer = int(hp["embedding_length"]), c.int("vocab_size"), c.n_layer
    n_block = family.n_blocks(c)
    out: list[tuple[str, tuple[int, ...]]] = [("token_embd.weight", (V, H))]
    dense = dense_layers(c, hp)
    swa = _per_block(hp, "attention.sliding_window_pattern", n_block, False)
    single = family.arch == "nemotron_h_moe"  # one block kind per layer (0 arrays tell them apart)
    n_ff = _per_block(hp, "feed_forward_length", n_block, 0)
    n_kv = _per_block(hp, "attention.head_count_kv", n_block, None)
    for il in range(n_block):
        b = f"blk.{il}."
        mtp = il >= n_layer
        out.append((b + "attn_norm.weight", (H,)))
        if single and not n_kv[il] and not n_ff[il]:
            out += [(b + n, s) for n, s in _mamba2(hp, H)]
            continue
        if "kda.head_dim" in hp and not n_kv[il]:  # a KDA layer (GLM-5.3-Flash: head_count_kv 0)
            out += [(b + n, s) for n, s in _kda(hp, H)]
        elif not single or n_kv[il]:
            out += [(b + n, s) for n, s in _attention(family, c, hp, il, n_block, bool(swa[il]) and not mtp)]
        if single and not n_ff[il]:
            continue
        for norm in ("ffn_norm", "post_attention_norm", "post_ffw_norm"):
            if norm + ".weight" in names and (not single or mtp):
                out.append((b + norm + ".weight", (H,)))
        is_dense = il in dense if not mtp else family.arch in MTP_DENSE
        out += [(b + n, s) for n, s in (_dense_ffn(hp, H) if is_dense else _moe_ffn(family, hp, H))]
        if "hyper_connection.sinkhorn_iterations" in hp:  # mHC around the mixer and the FFN (GLM-5.3-Flash)
            n = int(hp["hyper_connection.count"])
            for sub in ("attn", "ffn"):
                out += [
                    (b + f"hc_{sub}_fn.weight", ((2 + n) * n, n * H)),
                    (b + f"hc_{sub}_base.weight", ((2 + n) * n,)),
                ]
                out.append((b + f"hc_{sub}_scale.weight", (3,)))
        if mtp:
            out.append((b + "nextn.eh_proj.weight", (H, 2 * H)))
            out += [(b + f"nextn.{n}.weight", (H,)) for n in ("enorm", "hnorm", "shared_head_norm")]
    out.append(("output_norm.weight", (H,)))
    if not c.bool("tie_word_embeddings", default=False):
        out.append(("output.weight", (V, H)))
    return out


def _attention(family: Family, c: Config, hp: dict, il: int, n_block: int, swa: bool) -> list:
    names = {n.replace("blk.{bid}.", "") for n in family.tensors.values()}
    H = int(hp["embedding_length"])
    nh = int(_per_block(hp, "attention.head_count", n_block, 1)[il])
    nkv = int(_per_block(hp, "attention.head_count_kv", n_block, nh)[il] or nh)
    hk = int(hp.get("attention.key_length", H // nh))
    hv = int(hp.get("attention.value_length", hk))
    if "attention.kv_lora_rank" in hp:  # MLA, as llama.cpp's deepseek2 loader shapes it
        lora, q_lora, rope = (
            int(hp["attention.kv_lora_rank"]),
            hp.get("attention.q_lora_rank"),
            int(hp["rope.dimension_count"]),
        )
        hk, hv = int(hp.get("attention.key_length_mla", hk)), int(hp.get("attention.value_length_mla", hv))
        q = [
            ("attn_q_a.weight", (q_lora, H)),
            ("attn_q_a_norm.weight", (q_lora,)),
            ("attn_q_b.weight", (nh * hk, q_lora)),
        ]
        return [
            *(q if q_lora else [("attn_q.weight", (nh * hk, H))]),
            ("attn_kv_a_mqa.weight", (lora + rope, H)),
            ("attn_kv_a_norm.weight", (lora,)),
            ("attn_k_b.weight", (nh, lora, hk - rope)),
            ("attn_v_b.weight", (nh, hv, lora)),
            ("attn_output.weight", (H, nh * hv)),
            *_indexer(hp, il, H),
        ]
    out = [
        ("attn_q.weight", (nh * hk, H)),
        ("attn_k.weight", (nkv * hk, H)),
        ("attn_v.weight", (nkv * hv, H)),
        ("attn_output.weight", (H, nh * hv)),
    ]
    if "attn_q_norm.weight" in names:
        out += [("attn_q_norm.weight", (hk,)), ("attn_k_norm.weight", (hk,))]
    if "attn_gate.weight" in names:
        per_element = family.arch in GATE_PER_ELEMENT or c.get("gating", default=None) == "per-element"
        out.append(("attn_gate.weight", (nh * hk if per_element else nh, H)))
    if "attn_sinks.weight" in names and swa:
        out.append(("attn_sinks.weight", (nh,)))
    return out


def _indexer(hp: dict, il: int, H: int) -> list:
    """DSA's lightning indexer on layer il (llama.cpp's deepseek32 / glm-dsa / glm5-next loaders, KPool's pooling
    gate and slot biases); IndexShare layers have none."""
    if "attention.indexer.head_count" not in hp or not _per_block(hp, "attention.indexer.types", il + 1, True)[il]:
        return []
    n, d, q_lora = (
        int(hp["attention.indexer.head_count"]),
        int(hp["attention.indexer.key_length"]),
        hp["attention.q_lora_rank"],
    )
    kpool = int(hp.get("attention.indexer.kpool") or 0)
    return [
        ("indexer.attn_q_b.weight", (n * d, q_lora)),
        ("indexer.attn_k.weight", (d, H)),
        ("indexer.k_norm.weight", (d,)),
        ("indexer.k_norm.bias", (d,)),
        ("indexer.proj.weight", (n, H)),
        *([("indexer_compressor_gate.weight", (d, H)), ("indexer_compressor_ape.weight", (kpool, d))] if kpool else []),
    ]


def _kda(hp: dict, H: int) -> list:
    """A KDA mixer (llama.cpp's kimi-linear / glm5-next loaders: low-rank decay and output gates)."""
    nh, S, K = int(hp["attention.head_count"]), int(hp["kda.head_dim"]), int(hp["ssm.conv_kernel"])
    C = nh * S
    return [
        *((f"attn_{x}.weight", (C, H)) for x in "qkv"),
        *((f"ssm_conv1d_{x}.weight", (C, 1, K)) for x in "qkv"),
        ("ssm_f_a.weight", (S, H)),
        ("ssm_f_b.weight", (C, S)),
        ("ssm_beta.weight", (nh, H)),
        ("ssm_a", (nh,)),
        ("ssm_dt.bias", (C,)),
        ("ssm_g_a.weight", (S, H)),
        ("ssm_g_b.weight", (C, S)),
        ("ssm_norm.weight", (S,)),
        ("attn_output.weight", (H, C)),
    ]


def _dense_ffn(hp: dict, H: int) -> list:
    n_ff = hp["feed_forward_length"]
    n_ff = int(max(n_ff) if isinstance(n_ff, (list, tuple)) else n_ff)
    return [("ffn_gate.weight", (n_ff, H)), ("ffn_up.weight", (n_ff, H)), ("ffn_down.weight", (H, n_ff))]


def _moe_ffn(family: Family, hp: dict, H: int) -> list:
    E, n_ff = int(hp["expert_count"]), int(hp.get("expert_feed_forward_length", hp.get("feed_forward_length")))
    L = int(hp.get("moe_latent_size") or H)  # latent MoE: the experts' width
    gated = family.arch != "nemotron_h_moe"  # ReLU² experts: up and down only
    out = [("ffn_gate_inp.weight", (E, H))]
    if family.arch in ROUTER_BIAS and int(hp.get("expert_gating_func", SIGMOID)) == SIGMOID:
        out.append(("exp_probs_b.bias" if family.arch != "hy_v3" else "exp_probs_b", (E,)))
    out += [("ffn_gate_exps.weight", (E, n_ff, L))] if gated else []
    out += [("ffn_up_exps.weight", (E, n_ff, L)), ("ffn_down_exps.weight", (E, L, n_ff))]
    if L != H:
        out += [("ffn_latent_down.weight", (L, H)), ("ffn_latent_up.weight", (H, L))]
    n_sh = int(hp.get("expert_shared_feed_forward_length") or n_ff * int(hp.get("expert_shared_count", 0)))
    if n_sh:
        out += [("ffn_gate_shexp.weight", (n_sh, H))] if gated else []
        out += [("ffn_up_shexp.weight", (n_sh, H)), ("ffn_down_shexp.weight", (H, n_sh))]
    return out


def _mamba2(hp: dict, H: int) -> list:
    """A Mamba2 mixer as llama.cpp stores it (see families.mamba2_mixer)."""
    d_inner, ng = int(hp["ssm.inner_size"]), int(hp["ssm.group_count"])
    ds, nh, K = int(hp["ssm.state_size"]), int(hp["ssm.time_step_rank"]), int(hp["ssm.conv_kernel"])
    conv = d_inner + 2 * ng * ds
    return [
        ("ssm_in.weight", (d_inner + conv + nh, H)),
        ("ssm_conv1d.weight", (conv, K)),
        ("ssm_conv1d.bias", (conv,)),
        ("ssm_dt.bias", (nh,)),
        ("ssm_a", (nh, 1)),
        ("ssm_d", (nh, 1)),
        ("ssm_norm.weight", (ng, d_inner // ng)),
        ("ssm_out.weight", (H, d_inner)),
    ]


def count_params(kv: dict[str, Any], table: dict[str, tuple]) -> dict[str, int]:
    """Parameters of a tensor table: total and active per token (the routed experts x used / count; embeddings and
    output included) of the trunk, and the MTP blocks' (blk.{n_layer}.., not run on the main path) apart."""
    arch = kv["general.architecture"]
    n_layer = int(kv[f"{arch}.block_count"]) - int(kv.get(f"{arch}.nextn_predict_layers", 0))
    used = int(kv[f"{arch}.expert_used_count"]) / int(kv[f"{arch}.expert_count"])
    total = active = mtp = 0
    for name, t in table.items():
        n = int(np.prod([int(d) for d in t[1]]))
        if name.startswith("blk.") and int(name.split(".")[1]) >= n_layer:
            mtp += n
            continue
        total += n
        active += n * used if "_exps." in name else n
    return {"total": total, "active": int(active), "mtp": mtp}
