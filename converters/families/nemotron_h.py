"""NVIDIA Nemotron 3 Nano / Super (model_type `nemotron_h` with experts) -> GGUF arch `nemotron_h_moe`.

The model is a list of single-purpose blocks, each x + mixer(RMSNorm(x)) (`layers_block_type`, or the release
configs' `hybrid_override_pattern` string: M Mamba2, * attention, E MoE):
- Mamba2 (`linear_attention` / `mamba`): as Granite-4.0-H (in_proj -> z, xBC, dt; causal conv with bias; selective
  scan, A = -exp(A_log), D skip; grouped gated RMSNorm; out_proj), d_inner = mamba_num_heads x mamba_head_dim;
- attention (`full_attention` / `attention`): GQA without positional encoding (llama.cpp's graph never ropes it);
- MoE (`moe`): sigmoid scores, top-k on score + e_score_correction_bias (groups), renormalised (norm_topk_prob) x
  routed_scaling_factor; routed experts and one shared expert are ReLU² MLPs without a gate, down(relu(up x)^2);
  latent MoE (`moe_latent_size`, Super): the routed experts run in L, x -> fc1_latent_proj (H -> L) -> experts ->
  fc2_latent_proj (L -> H), while router and shared expert see H.
GGUF: `attention.head_count_kv` and `feed_forward_length` per layer (0 where the block is not attention / not MoE:
llama.cpp tells the kinds apart by them), experts `ffn_up_exps` / `ffn_down_exps` only, `ffn_latent_down/up`.
A dense `mlp` block inside a MoE model is refused: llama.cpp's nemotron_h_moe loader takes every FFN block for MoE
(its converter would write the block as a recurrent one). `use_conv_bias` false is refused: llama.cpp's Mamba2
graph adds the conv bias unconditionally.
MTP (Super, 3.5 Lightning: `num_nextn_predict_layers` 1): the release holds it as `mtp.layers.0` (eh_proj / enorm /
hnorm and a NoPE attention sub-layer) and `mtp.layers.1` (a MoE sub-layer, its `norm` before it, `final_layernorm`
after); kept as llama.cpp's converter folds them, one block blk.{n_layer} (nextn.*, attn_*, post_attention_norm
before the MoE, nextn.shared_head_norm), counted in block_count and in the per-layer arrays (head_count_kv and
feed_forward_length both set: llama.cpp's MTP block is attention + MoE). Loaded, never run on the main path.
"""

from __future__ import annotations

from typing import Any

from moelite.errors import ConversionError

from . import MTP_NAMES, SIGMOID, Config, Family, mamba2_mixer, mamba2_names, stack_experts

B = "backbone.layers.{bid}"
M = B + ".mixer"
ATTENTION, MAMBA, MOE = {"attention", "full_attention"}, {"mamba", "linear_attention"}, {"moe"}
PATTERN = {"M": "linear_attention", "*": "full_attention", "E": "moe", "-": "mlp"}

# transformers' NemotronHConfig defaults: the value of a key read here that config.json omits
DEFAULTS = {
    "vocab_size": 131072,
    "hidden_size": 4096,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "max_position_embeddings": 4096,
    "ssm_state_size": 128,
    "mamba_num_heads": 128,
    "mamba_head_dim": 64,
    "n_groups": 8,
    "conv_kernel": 4,
    "use_conv_bias": True,
    "n_routed_experts": 8,
    "n_shared_experts": 1,
    "moe_intermediate_size": 7688,
    "moe_shared_expert_intermediate_size": 7688,
    "num_experts_per_tok": 2,
    "routed_scaling_factor": 1.0,
    "n_group": 1,
    "topk_group": 1,
    "norm_topk_prob": True,
    "layer_norm_epsilon": 1e-05,
    "mlp_hidden_act": "relu2",
}


def block_types(c: Config) -> list[str]:
    """Per layer: linear_attention / full_attention / moe (transformers' vocabulary), from `layers_block_type`
    (either vocabulary) or the release configs' `hybrid_override_pattern`."""
    types = c.get("layers_block_type", "hybrid_override_pattern")
    if isinstance(types, str):
        if set(types) - set(PATTERN):
            raise ConversionError(f"{c.src}: hybrid_override_pattern must be made of M, *, E and -")
        types = [PATTERN[t] for t in types]
    if not isinstance(types, list) or len(types) != c.n_layer or not all(isinstance(t, str) for t in types):
        raise ConversionError(f"{c.src}: layers_block_type must list {c.n_layer} block types")
    out = []
    for il, t in enumerate(types):
        if t in MAMBA:
            out.append("linear_attention")
        elif t in ATTENTION:
            out.append("full_attention")
        elif t in MOE:
            out.append("moe")
        elif t == "mlp":
            raise ConversionError(
                f"{c.src}: layers_block_type[{il}] = mlp: a dense block in a MoE Nemotron-H is not "
                f"supported (llama.cpp's nemotron_h_moe takes every FFN block for MoE)"
            )
        else:
            raise ConversionError(f"{c.src}: layers_block_type[{il}] = {t!r}: expected mamba / attention / moe")
    if "moe" not in out:
        raise ConversionError(
            f"{c.src}: a Nemotron-H without moe blocks is a dense (non-MoE) model; moelite converts "
            f"Mixture-of-Experts models only"
        )
    return out


def n_nextn(c: Config) -> int:
    """MTP blocks: 0 or 1 (llama.cpp's converter and graph take one)."""
    n = c.int("num_nextn_predict_layers", default=0)
    if n not in (0, 1):
        raise ConversionError(
            f"{c.src}: num_nextn_predict_layers = {n}: expected 0 or 1 (llama.cpp's nemotron_h_moe folds one MTP "
            f"head into one block)"
        )
    return n


def hparams(c: Config) -> dict[str, Any]:
    if c.get("mlp_hidden_act") != "relu2":
        raise ConversionError(
            f"{c.src}: mlp_hidden_act = {c.get('mlp_hidden_act')!r}: the nemotron_h_moe GGUF runs "
            f"relu2 (llama.cpp hardcodes it)"
        )
    if not c.bool("use_conv_bias"):
        raise ConversionError(
            f"{c.src}: use_conv_bias = false is not supported (llama.cpp's Mamba2 graph adds a conv bias)"
        )
    types = block_types(c)
    nextn = n_nextn(c)
    nh, dh = c.int("mamba_num_heads"), c.int("mamba_head_dim")
    n_kv, n_ff = c.int("num_key_value_heads"), c.int("moe_intermediate_size")
    latent = c.get("moe_latent_size", default=None)
    kv = {
        "block_count": c.n_layer + nextn,
        "context_length": c.int("max_position_embeddings"),
        "embedding_length": c.int("hidden_size"),
        # the MTP block (last) is attention and MoE at once
        "feed_forward_length": [n_ff if t == "moe" else 0 for t in types] + [n_ff] * nextn,
        "attention.head_count": c.int("num_attention_heads"),
        "attention.head_count_kv": [n_kv if t == "full_attention" else 0 for t in types] + [n_kv] * nextn,
        "attention.key_length": c.head_dim,
        "attention.value_length": c.head_dim,
        "attention.layer_norm_epsilon": c.float("layer_norm_epsilon"),
        "attention.layer_norm_rms_epsilon": c.float("layer_norm_epsilon"),
        "rope.scaling.finetuned": False,  # NoPE (llama.cpp's switch, as Granite-4.0-H)
        "ssm.conv_kernel": c.int("conv_kernel"),
        "ssm.state_size": c.int("ssm_state_size"),
        "ssm.group_count": c.int("n_groups"),
        "ssm.inner_size": nh * dh,
        "ssm.time_step_rank": nh,
        "expert_count": c.n_expert,
        "expert_used_count": c.int("num_experts_per_tok"),
        "expert_feed_forward_length": c.int("moe_intermediate_size"),
        "expert_shared_feed_forward_length": c.int("moe_shared_expert_intermediate_size"),
        "expert_shared_count": c.int("n_shared_experts"),
        "expert_weights_norm": c.bool("norm_topk_prob"),
        "expert_weights_scale": c.float("routed_scaling_factor"),
        "expert_group_count": c.int("n_group"),
        "expert_group_used_count": c.int("topk_group"),
        "expert_gating_func": SIGMOID,
    }
    if latent is not None:
        kv["moe_latent_size"] = int(latent)
    if nextn:
        kv["nextn_predict_layers"] = nextn
    return kv


TENSORS = {
    "backbone.embeddings.weight": "token_embd.weight",
    "backbone.norm_f.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
    B + ".norm.weight": "blk.{bid}.attn_norm.weight",  # every block's one norm
    **mamba2_names(M),
    M + ".q_proj.weight": "blk.{bid}.attn_q.weight",
    M + ".k_proj.weight": "blk.{bid}.attn_k.weight",
    M + ".v_proj.weight": "blk.{bid}.attn_v.weight",
    M + ".o_proj.weight": "blk.{bid}.attn_output.weight",
    M + ".gate.weight": "blk.{bid}.ffn_gate_inp.weight",  # [E, H]
    M + ".gate.e_score_correction_bias": "blk.{bid}.exp_probs_b.bias",  # [E]
    M + ".experts.up_proj.weight": "blk.{bid}.ffn_up_exps.weight",  # [E, I, L]
    M + ".experts.down_proj.weight": "blk.{bid}.ffn_down_exps.weight",  # [E, L, I]
    M + ".fc1_latent_proj.weight": "blk.{bid}.ffn_latent_down.weight",  # [L, H]
    M + ".fc2_latent_proj.weight": "blk.{bid}.ffn_latent_up.weight",  # [H, L]
    M + ".shared_experts.up_proj.weight": "blk.{bid}.ffn_up_shexp.weight",  # [I_sh, H]
    M + ".shared_experts.down_proj.weight": "blk.{bid}.ffn_down_shexp.weight",
    B + ".post_attention_layernorm.weight": "blk.{bid}.post_attention_norm.weight",  # MTP block: before its MoE
    **MTP_NAMES,  # MTP block: eh_proj [H, 2H], enorm / hnorm / shared_head_norm [H]
}

# the release's MTP names (mtp.layers.{0,1}.*) that are not a mixer's: as llama.cpp's converter renames them
MTP_RENAMES = {
    "mtp.layers.0.enorm.weight": "model.layers.{bid}.enorm.weight",
    "mtp.layers.0.hnorm.weight": "model.layers.{bid}.hnorm.weight",
    "mtp.layers.0.eh_proj.weight": "model.layers.{bid}.eh_proj.weight",
    "mtp.layers.1.norm.weight": B + ".post_attention_layernorm.weight",
    "mtp.layers.1.final_layernorm.weight": "model.layers.{bid}.shared_head.norm.weight",
}


def fold_mtp(w, c: Config) -> None:
    """The MTP head's two release blocks (mtp.layers.0: attention, mtp.layers.1: MoE) as one block n_layer."""
    bid = c.n_layer
    for name in [n for n in w if n.startswith("mtp.")]:
        if not n_nextn(c) or not name.startswith(("mtp.layers.0.", "mtp.layers.1.")):
            raise ConversionError(
                f"{c.src}: tensor {name}: expected mtp.layers.0.* / mtp.layers.1.* with num_nextn_predict_layers 1"
            )
        new = MTP_RENAMES.get(name) or B + "." + name.split(".", 3)[3]
        w[new.format(bid=bid)] = w.pop(name)


def sanitize(w, c: Config) -> None:
    ng = c.int("n_groups")
    fold_mtp(w, c)
    c_all = Config({**c.d, "num_hidden_layers": c.n_layer + n_nextn(c)}, c.src, c.defaults)  # trunk + MTP
    for bid in range(c_all.n_layer):
        m = M.format(bid=bid)
        for proj in ("up_proj", "down_proj"):  # transformers' in-memory stacked experts
            if f"{m}.experts.{proj}" in w:
                w[f"{m}.experts.{proj}.weight"] = w.pop(f"{m}.experts.{proj}")
        mamba2_mixer(w, m, ng)
    stack_experts(
        w, c_all, M + ".experts.{e}.{proj}.weight", M + ".experts.{proj}.weight", projs=("up_proj", "down_proj")
    )


FAMILY = Family(
    ("nemotron_h",),
    "nemotron_h_moe",
    hparams,
    TENSORS,
    sanitize,
    tokenizer_pre="default",
    defaults=DEFAULTS,
    keep_mtp=True,
)
