"""The GGUF border: every hyperparameter and tensor a model file gives the C++ core is checked here, once,
before anything is allocated, so that file content can never reach a GGML_ASSERT, a hang or a huge allocation.

`load_hparams(path, kv, tensors)` is what `Model` calls: raw-key checks that `parse_hparams` relies on (a zero
head count, an array or NaN where a count belongs, a block count of 6e18), then `parse_hparams`, then
`validate_hparams` (ranges and consistency of its dict, table-driven: unknown keys get the generic rules, and
a key holding a list has each item checked) and `validate_tensors` (ggml types each consuming op supports,
F32 where ggml's binary ops need it, shapes the graph uses, byte sizes and data ranges), plus the types of the
tokenizer and chat template keys (`check_tokenizer_keys`). Every failure is a ModelFormatError naming the file,
the key or tensor, the value and what was expected. The converter runs the same checks on the keys and tensor
table it is about to write (converters/convert.py `_check_loadable`), so it never writes a file moelite refuses.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import ModelFormatError
from .hparams import ARCHS, MIXER_MLA, parse_hparams

INT32_MAX = 2**31 - 1
FLOAT32_MAX = float(np.finfo(np.float32).max)  # the C++ core keeps floats as float32


@dataclass(frozen=True)
class Rule:
    """What one value may be: an integer in [lo, hi] (and within +-int_max), or a finite float32 >= lo (> lo
    unless closed) and <= hi. kind "int" or "real" demands that kind; "any" takes either (and bools, strings)."""

    kind: str = "any"
    lo: float = -math.inf
    hi: float = math.inf
    closed: bool = True
    int_max: int = INT32_MAX  # the C++ core takes int32
    allow_none: bool = False

    def problem(self, v: Any) -> str | None:
        """None when v satisfies the rule, else what was expected."""
        if v is None and self.allow_none:
            return None
        if isinstance(v, (bool, np.bool_, str)):
            return None if self.kind == "any" else f"expected {'an integer' if self.kind == 'int' else 'a number'}"
        if isinstance(v, (int, np.integer)):
            lo, hi = max(self.lo, -self.int_max - 1), min(self.hi, self.int_max)
            return None if lo <= int(v) <= hi else f"expected an integer in [{_num(lo)}, {_num(hi)}]"
        if isinstance(v, (float, np.floating)):
            if self.kind == "int":
                return "expected an integer"
            f = float(v)
            if not (math.isfinite(f) and abs(f) <= FLOAT32_MAX):
                return "expected a finite float32"
            if (f >= self.lo if self.closed else f > self.lo) and f <= self.hi:
                return None
            return f"expected {'>=' if self.closed else '>'} {_num(self.lo)}" + (
                f" and <= {_num(self.hi)}" if self.hi < math.inf else ""
            )
        return f"expected a number, got {type(v).__name__}"


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(x)


COUNT, COUNT0, REAL, POSITIVE = Rule("int", 1), Rule("int", 0), Rule("real"), Rule("real", 0.0, closed=False)
GENERIC = Rule(allow_none=True)  # hparams the table does not know: plain values, ints in int32, finite
RAW_NUMBER = Rule(int_max=2**64)  # any stored integer, a finite float

# hparams field -> (rule, GGUF key suffix under '{arch}.' it comes from, or None)
HP_RULES: dict[str, tuple[Rule, str | None]] = {
    "n_embd": (COUNT, "embedding_length"),
    "n_layer": (COUNT, "block_count"),
    "n_head": (COUNT, "attention.head_count"),
    "n_head_kv": (COUNT, "attention.head_count_kv"),
    "n_embd_head_k": (COUNT, "attention.key_length"),
    "n_embd_head_v": (COUNT, "attention.value_length"),
    "n_rot": (COUNT, "rope.dimension_count"),
    "n_expert": (Rule("int", 2), "expert_count"),
    "n_expert_used": (COUNT, "expert_used_count"),
    "n_layer_dense_lead": (COUNT0, "leading_dense_block_count"),
    "n_layer_nextn": (COUNT0, "nextn_predict_layers"),
    "q_lora_rank": (COUNT0, "attention.q_lora_rank"),
    "kv_lora_rank": (COUNT0, "attention.kv_lora_rank"),
    "n_swa": (COUNT0, "attention.sliding_window"),
    "n_group": (COUNT, "expert_group_count"),
    "topk_group": (COUNT, "expert_group_used_count"),
    "context_length": (COUNT, "context_length"),
    "n_ctx_orig": (COUNT, "rope.scaling.original_context_length"),
    "n_vocab": (COUNT, None),
    "norm_eps": (POSITIVE, "attention.layer_norm_rms_epsilon"),
    "freq_base": (POSITIVE, "rope.freq_base"),
    "freq_scale": (POSITIVE, "rope.scaling.factor"),
    "swa_layers": (Rule("int", 0, 1), "attention.sliding_window_pattern"),
    "qk_norm": (COUNT0, None),
    "rope_type": (COUNT0, None),
    "gating": (COUNT0, "expert_gating_func"),
    "act": (COUNT0, None),
    "jitter_eps": (Rule("real", 0.0), "expert_router_jitter"),
    # the per-layer plan (lists of n_layer entries)
    "layer_n_head": (COUNT, "attention.head_count"),
    "layer_n_head_kv": (COUNT, "attention.head_count_kv"),
    "layer_head_k": (COUNT, "attention.key_length"),
    "layer_head_v": (COUNT, "attention.value_length"),
    "layer_n_rot": (COUNT0, "rope.dimension_count"),  # 0: a NoPE layer (llama4)
    "layer_freq_base": (POSITIVE, "rope.freq_base"),
    # Qwen4-Exp's PLE hash constants: unsigned 64-bit (the core takes uint64)
    "ple_mult": (Rule("int", 0, int_max=2**64 - 1), "ple.layer_multipliers"),
    "ple_offsets": (Rule("int", 0, int_max=2**64 - 1), "ple.head_offsets"),
    "ple_vocab": (Rule("int", 1, int_max=2**64 - 1), "ple.head_vocab_sizes"),
}

# raw GGUF keys parse_hparams computes with (divides by, takes the log of, allocates per layer)
RAW_RULES: dict[str, Rule] = {
    # head_count_kv 0 marks a recurrent layer (LFM2); an attention layer's 0 is refused by layer_n_head_kv
    "embedding_length": COUNT,
    "block_count": COUNT,
    "attention.head_count": COUNT,
    "attention.head_count_kv": COUNT0,
    "attention.key_length": COUNT,
    "attention.value_length": COUNT,
    "attention.key_length_mla": COUNT,
    "attention.value_length_mla": COUNT,
    "expert_count": COUNT0,
    "expert_used_count": COUNT0,
    "rope.scaling.factor": Rule("real", 0.0),
    "rope.scaling.yarn_log_multiplier": Rule("real", 0.0),
    "attention.layer_norm_rms_epsilon": POSITIVE,
    "attention.layer_norm_epsilon": POSITIVE,
    "nextn_predict_layers": COUNT0,
    "attention.temperature_scale": REAL,
    "attention.temperature_length": COUNT,  # Mistral-4: divides positions
}

# ggml types with a CPU vec_dot kernel (ggml/src/ggml-cpu/ggml-cpu.c, type_traits_cpu[].vec_dot): the types
# ggml_mul_mat / ggml_mul_mat_id accept as weights; get_rows dequantizes the same types. Absent on purpose:
# Q8_1 (9), Q8_K (15), I8..I64 (24..27), F64 (28): no vec_dot, the CPU backend crashes on them.
VEC_DOT_TYPES = {
    0: "F32",
    1: "F16",
    2: "Q4_0",
    3: "Q4_1",
    6: "Q5_0",
    7: "Q5_1",
    8: "Q8_0",
    10: "Q2_K",
    11: "Q3_K",
    12: "Q4_K",
    13: "Q5_K",
    14: "Q6_K",
    16: "IQ2_XXS",
    17: "IQ2_XS",
    18: "IQ3_XXS",
    19: "IQ1_S",
    20: "IQ4_NL",
    21: "IQ3_S",
    22: "IQ2_S",
    23: "IQ4_XS",
    29: "IQ1_M",
    30: "BF16",
    34: "TQ1_0",
    35: "TQ2_0",
    39: "MXFP4",
    40: "NVFP4",
    41: "Q1_0",
    42: "Q2_0",
}
F32 = 0
# tensors ggml adds / multiplies elementwise or reads as float arrays: must be F32 (binary ops assert on others)
# F32 only: ggml's binary ops (norm weights, biases, scales), ggml_ssm_conv's kernels, the recurrent A / D vectors
_F32_NAME = re.compile(
    r"(norm(_\d+)?\.weight|\.bias|\.scale|attn_sinks\.weight|rope_freqs\.weight|rope_factors_\w+\.weight"
    r"|layer_output_scale\.weight|ssm_a|ssm_d|ssm_conv1d(_[qkv])?\.weight|shortconv\.conv\.weight"
    r"|exp_probs_b)$"
)
_BLK = re.compile(r"blk\.(\d+)\.")


def _fail(path: str, what: str, v: Any, expected: str) -> ModelFormatError:
    return ModelFormatError(f"{path}: {what} = {_short(v)}: {expected}")


def _short(v: Any) -> str:
    s = repr(v.tolist() if isinstance(v, np.ndarray) else v)
    return s if len(s) <= 80 else s[:77] + "..."


def _check_value(path: str, what: str, v: Any, rule: Rule) -> None:
    """v or, for a list / array, each of its items satisfies rule."""
    items = list(np.asarray(v).ravel()) if isinstance(v, (list, tuple, np.ndarray)) else [v]
    for i, x in enumerate(items):
        problem = rule.problem(x.item() if isinstance(x, np.generic) else x)
        if problem:
            where = f"{what}[{i}]" if len(items) > 1 or isinstance(v, (list, tuple, np.ndarray)) else what
            raise _fail(path, where, x, problem)


def n_blocks(tensors: dict[str, tuple]) -> int:
    """Number of distinct `blk.N.` indices among the tensors."""
    return len({m.group(1) for name in tensors if (m := _BLK.match(name))})


def check_raw_keys(path: str, kv: dict[str, Any], tensors: dict[str, tuple]) -> None:
    """The keys parse_hparams computes with, before it runs (it divides by head counts, allocates per layer)."""
    arch = kv.get("general.architecture")
    if not isinstance(arch, str) or arch not in ARCHS:
        return  # parse_hparams names the problem
    for suffix, rule in RAW_RULES.items():
        key = f"{arch}.{suffix}"
        if key in kv:
            _check_value(path, f"key '{key}'", kv[key], rule)
    for key, v in kv.items():  # every number of the architecture is finite
        if key.startswith(arch + ".") and not isinstance(v, str):
            _check_value(path, f"key '{key}'", v, RAW_NUMBER)
    blocks, nextn = kv.get(f"{arch}.block_count"), kv.get(f"{arch}.nextn_predict_layers", 0)
    held = n_blocks(tensors)
    if _numeric(blocks) and _numeric(nextn) and np.max(blocks) - np.min(nextn) > held:
        raise _fail(
            path,
            f"key '{arch}.block_count'",
            blocks,
            f"expected at most {held} layers (the file has tensors for {held} blocks 'blk.N')",
        )
    emb = tensors.get("token_embd.weight")
    if emb is not None and len(emb[1]) != 2:
        raise ModelFormatError(
            f"{path}: tensor 'token_embd.weight' has shape {list(emb[1])}, expected 2-D [n_embd, n_vocab]"
        )


def _numeric(v: Any) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) or (
        isinstance(v, np.ndarray) and v.size > 0 and v.dtype.kind in "iuf"
    )


def validate_hparams(path: str, hp: dict[str, Any], tensors: dict[str, tuple] | None = None) -> None:
    """Ranges and consistency of the dict parse_hparams returns (see module docstring)."""
    arch = hp.get("arch", "?")

    def name(field: str) -> str:
        key = HP_RULES.get(field, (None, None))[1]
        return f"hyperparameter '{field}'" + (f" (key '{arch}.{key}')" if key else "")

    rope_free = arch in ARCHS and ARCHS[arch].rope_free  # rope.dimension_count may be 0
    for field, v in hp.items():
        rule = COUNT0 if field == "n_rot" and rope_free else HP_RULES.get(field, (GENERIC, None))[0]
        _check_value(path, name(field), v, rule)

    def need(ok: bool, field: str, expected: str) -> None:
        if not ok:
            raise _fail(path, name(field), hp[field], expected)

    n_layer, n_head = hp["n_layer"], hp["n_head"]
    need(n_head % hp["n_head_kv"] == 0, "n_head_kv", f"expected a divisor of n_head = {n_head}")
    need(
        hp["n_rot"] % 2 == 0 and hp["n_rot"] <= hp["n_embd_head_k"],
        "n_rot",
        f"expected an even number <= the head size {hp['n_embd_head_k']}",
    )
    need(hp["n_expert_used"] <= hp["n_expert"], "n_expert_used", f"expected <= n_expert = {hp['n_expert']}")
    need(hp["n_expert"] % hp["n_group"] == 0, "n_group", f"expected a divisor of n_expert = {hp['n_expert']}")
    need(hp["topk_group"] <= hp["n_group"], "topk_group", f"expected <= n_group = {hp['n_group']}")
    need(
        hp["n_expert_used"] <= hp["topk_group"] * (hp["n_expert"] // hp["n_group"]),
        "n_expert_used",
        f"expected <= the experts of topk_group = {hp['topk_group']} groups",
    )
    need(hp["n_layer_dense_lead"] < n_layer, "n_layer_dense_lead", f"expected < n_layer = {n_layer}")
    for field, v in hp.items():  # the per-layer plan: one entry per layer
        if (field.startswith("layer_") or field == "swa_layers") and isinstance(v, (list, tuple, np.ndarray)):
            need(len(v) == n_layer, field, f"expected {n_layer} entries (one per layer)")
    for il in range(n_layer if "layer_n_head_kv" in hp else 0):
        kv_heads, head_k, n_rot = hp["layer_n_head_kv"][il], hp["layer_head_k"][il], hp["layer_n_rot"][il]
        q_heads = hp.get("layer_n_head", [n_head] * n_layer)[il]
        if q_heads > n_head:
            raise _fail(path, name("layer_n_head") + f"[{il}]", q_heads, f"expected <= n_head = {n_head}")
        if q_heads % kv_heads:
            raise _fail(
                path,
                name("layer_n_head_kv") + f"[{il}]",
                kv_heads,
                f"expected a divisor of the layer's query heads {q_heads}",
            )
        if n_rot % 2 or n_rot > head_k:
            raise _fail(
                path, name("layer_n_rot") + f"[{il}]", n_rot, f"expected an even number <= the head size {head_k}"
            )
    if tensors is not None:
        need(
            n_layer <= n_blocks(tensors),
            "n_layer",
            f"expected at most {n_blocks(tensors)} (the file has tensors for {n_blocks(tensors)} blocks)",
        )


def validate_tensors(
    path: str,
    tensors: dict[str, tuple],
    hp: dict[str, Any] | None = None,
    file_size: int | Mapping[str, int] | None = None,
) -> None:
    """Types, byte sizes, data ranges (within file_size, by default the size of the file at path; a mapping gives
    each tensor the size of its own file, a split set's shard) and, with hp, the shapes the graph uses."""
    from .. import _core

    if file_size is None:
        file_size = os.path.getsize(path)
    for name, (typ, shape, offset, nbytes) in tensors.items():
        limit = file_size[name] if isinstance(file_size, Mapping) else file_size
        if any(int(d) < 1 for d in shape):
            raise ModelFormatError(f"{path}: tensor '{name}' has shape {list(shape)}, expected every dimension >= 1")
        n = math.prod(int(d) for d in shape)
        blck = _core.block_size(typ)
        if shape[0] % blck or _core.row_size(typ, shape[0]) * (n // shape[0]) != nbytes:
            raise ModelFormatError(
                f"{path}: tensor '{name}' of type {_core.type_name(typ).upper()} and shape {list(shape)} "
                f"claims {nbytes} bytes"
            )
        if offset < 0 or offset + nbytes > limit:
            raise ModelFormatError(
                f"{path}: tensor '{name}' data [{offset}, {offset + nbytes}) lies outside the file ({limit} bytes)"
            )
        if _F32_NAME.search(name):
            if typ != F32:
                raise ModelFormatError(f"{path}: tensor '{name}' has type {_core.type_name(typ).upper()}, expected F32")
        elif typ not in VEC_DOT_TYPES:
            raise ModelFormatError(
                f"{path}: tensor '{name}' has type {_core.type_name(typ).upper()}, which ggml's matrix "
                f"multiply does not support; expected one of {', '.join(VEC_DOT_TYPES.values())}"
            )
    if hp is not None:
        _check_shapes(path, tensors, hp)


def _check_shapes(path: str, tensors: dict[str, tuple], hp: dict[str, Any]) -> None:
    """The shapes the graph uses (ggml order), for the tensors present; the C++ core checks most of them again
    at load, but the converter (which has no C++ model to ask) relies on this before it writes a file."""

    def shape(name: str) -> list[int] | None:
        t = tensors.get(name)
        return None if t is None else [int(d) for d in t[1]]

    def expect(name: str, want: list[int]) -> None:
        got = shape(name)
        if got is not None and got != want:
            raise ModelFormatError(f"{path}: tensor '{name}' has shape {got}, expected {want}")

    E, V, n_exp = hp["n_embd"], hp["n_vocab"], hp["n_expert"]
    for name, want in (
        ("token_embd.weight", [E, V]),
        ("output.weight", [E, V]),
        ("output_norm.weight", [E]),
        ("output_norm.bias", [E]),
        ("output.bias", [V]),
        ("rope_freqs.weight", [hp["n_rot"] // 2]),
        *((n, [hp["n_rot"] // 2]) for n in tensors if n.startswith("rope_factors_")),
    ):
        expect(name, want)
    n_layer = hp["n_layer"]
    _check_nextn(path, tensors, hp, expect)
    # per-layer attention sizes from the layer plan (Gemma-4 mixes head sizes and kv heads across layers)
    heads_kv = hp.get("layer_n_head_kv", [hp["n_head_kv"]] * n_layer)
    heads_k = hp.get("layer_head_k", [hp["n_embd_head_k"]] * n_layer)
    heads_v = hp.get("layer_head_v", [hp["n_embd_head_v"]] * n_layer)
    heads_q = hp.get("layer_n_head", [hp["n_head"]] * n_layer)  # Laguna: query heads per layer
    for il in range(n_layer):
        b = f"blk.{il}."
        q_dim, o_dim = heads_q[il] * heads_k[il], heads_q[il] * heads_v[il]
        kv_dim, v_dim = heads_kv[il] * heads_k[il], heads_kv[il] * heads_v[il]
        per_layer = {
            "attn_norm.weight": [E],
            "attn_norm.bias": [E],
            "ffn_norm.weight": [E],
            "ffn_norm.bias": [E],
            "post_attention_norm.weight": [E],
            "attn_output.weight": [o_dim, E],
            "attn_output.bias": [E],
            "attn_sinks.weight": [heads_q[il]],
            "ffn_gate_inp.weight": [E, n_exp],
            "ffn_gate_inp.bias": [n_exp],
            "exp_probs_b.bias": [n_exp],
            "ffn_gate_inp.scale": [E],
            "exp_probs_b": [n_exp],  # llama.cpp's hy_v3 name
            "ffn_down_exps.scale": [n_exp],
            "layer_output_scale.weight": [1],
            **{f"{n}.weight": [E] for n in ("post_ffw_norm", "pre_ffw_norm_2", "post_ffw_norm_1", "post_ffw_norm_2")},
        }
        if not (hp["layer_mixer"][il] if "layer_mixer" in hp else hp.get("kv_lora_rank")):  # not MLA
            q_rows = 2 * q_dim if hp.get("attn_output_gate") else q_dim  # Qwen3.5: [q_h | gate_h] per head
            per_layer.update(
                {
                    "attn_q.weight": [E, q_rows],
                    "attn_k.weight": [E, kv_dim],
                    "attn_v.weight": [E, v_dim],
                    "attn_q.bias": [q_dim],
                    "attn_k.bias": [kv_dim],
                    "attn_v.bias": [v_dim],
                    # output gate per element (AFMoE), or per head (Laguna: llama.cpp's rule, by width)
                    "attn_gate.weight": [
                        E,
                        heads_q[il] if (shape(b + "attn_gate.weight") or [0, 0])[1] == heads_q[il] else o_dim,
                    ],
                }
            )
        if (hp["layer_mixer"][il] if "layer_mixer" in hp else int(bool(hp.get("kv_lora_rank")))) == MIXER_MLA:
            per_layer.update(_mla_shapes(path, b, hp, heads_k[il], heads_v[il], tensors))
        down = shape(b + "ffn_down_exps.weight")
        if down is not None and len(down) == 3:
            per_layer["ffn_gate_up_exps.weight"] = [E, 2 * down[0], n_exp]  # fused gate + up (Gemma-4)
        for name, want in per_layer.items():
            expect(b + name, want)
        # the experts' width: n_embd, or latent MoE's moe_latent_size (ffn_latent_down / up around them)
        Ee = hp.get("moe_latent") or E
        if hp.get("moe_latent"):
            expect(b + "ffn_latent_down.weight", [E, Ee])
            expect(b + "ffn_latent_up.weight", [Ee, E])
        # gateless (ReLU²) experts and FFNs have up and down only: sized from up
        gate_exps = shape(b + "ffn_gate_exps.weight") or shape(b + "ffn_up_exps.weight")
        if gate_exps is not None and len(gate_exps) == 3:
            n_ff = gate_exps[1]
            for name, want in (
                ("ffn_gate_exps.weight", [Ee, n_ff, n_exp]),
                ("ffn_up_exps.weight", [Ee, n_ff, n_exp]),
                ("ffn_down_exps.weight", [n_ff, Ee, n_exp]),
                ("ffn_gate_exps.bias", [n_ff, n_exp]),
                ("ffn_up_exps.bias", [n_ff, n_exp]),
                ("ffn_down_exps.bias", [Ee, n_exp]),
            ):
                expect(b + name, want)
        for kind in ("", "_shexp"):
            gate = shape(f"{b}ffn_gate{kind}.weight") or shape(f"{b}ffn_up{kind}.weight")
            if gate is not None and len(gate) == 2:
                expect(f"{b}ffn_gate{kind}.weight", [E, gate[1]])
                expect(f"{b}ffn_up{kind}.weight", [E, gate[1]])
                expect(f"{b}ffn_down{kind}.weight", [gate[1], E])


def _check_nextn(path: str, tensors: dict[str, tuple], hp: dict[str, Any], expect) -> None:
    """MTP blocks blk.{n_layer + i} (`nextn_predict_layers`; loaded for speculative decoding, never run on the
    main path): their projections have llama.cpp's shapes, eh_proj / enorm / hnorm are there when the block is,
    and their decoder block has the trunk's shapes (norms, attention, the FFN kinds it holds)."""
    E, V, n_layer = hp["n_embd"], hp["n_vocab"], hp["n_layer"]
    # the MTP blocks the file holds (declared ones may live in another file, as llama.cpp allows); iterating the
    # tensors, not the key, bounds the work whatever nextn_predict_layers says
    held = sorted({int(m.group(1)) for n in tensors if (m := _BLK.match(n))})
    for il in (i for i in held if n_layer <= i < n_layer + hp.get("n_layer_nextn", 0)):
        b = f"blk.{il}."
        for n in ("nextn.eh_proj.weight", "nextn.enorm.weight", "nextn.hnorm.weight"):
            if b + n not in tensors:
                raise ModelFormatError(
                    f"{path}: missing tensor '{b}{n}' of MTP block {il} (key "
                    f"'{hp['arch']}.nextn_predict_layers' = {hp['n_layer_nextn']})"
                )
        for n, want in (
            ("nextn.eh_proj.weight", [2 * E, E]),
            ("nextn.enorm.weight", [E]),
            ("nextn.hnorm.weight", [E]),
            ("nextn.shared_head_norm.weight", [E]),
            ("nextn.embed_tokens.weight", [E, V]),
            ("nextn.shared_head_head.weight", [E, V]),
        ):
            expect(b + n, want)
        # the block itself: what the trunk's last layer of its kind has (MiMo-V2: the last SWA layer), same shapes
        ref = hp.get("nextn_ref") or []
        last = f"blk.{ref[il - n_layer] if il - n_layer < len(ref) else n_layer - 1}."
        for n in tensors:
            if (
                n.startswith(b)
                and not n.startswith(b + "nextn.")
                and last + n[len(b) :] in tensors
                and not n.endswith(
                    ("_exps.weight", "_shexp.weight", "ffn_gate.weight", "ffn_up.weight", "ffn_down.weight")
                )
            ):
                expect(n, [int(d) for d in tensors[last + n[len(b) :]][1]])
        for kind in ("", "_shexp"):
            gate = tensors.get(f"{b}ffn_gate{kind}.weight")
            if gate is not None:
                n_ff = int(gate[1][-1])
                expect(f"{b}ffn_gate{kind}.weight", [E, n_ff])
                expect(f"{b}ffn_up{kind}.weight", [E, n_ff])
                expect(f"{b}ffn_down{kind}.weight", [n_ff, E])
        down = tensors.get(b + "ffn_down_exps.weight")
        if down is not None:
            n_ff, Ex = int(down[1][0]), hp.get("moe_latent") or E  # latent MoE: the experts' width (Nemotron 3)
            for n, want in (
                ("ffn_gate_exps.weight", [Ex, n_ff, hp["n_expert"]]),
                ("ffn_up_exps.weight", [Ex, n_ff, hp["n_expert"]]),
                ("ffn_down_exps.weight", [n_ff, Ex, hp["n_expert"]]),
            ):
                expect(b + n, want)


def _mla_shapes(
    path: str, b: str, hp: dict[str, Any], head_k: int, head_v: int, tensors: dict[str, tuple]
) -> dict[str, list[int]]:
    """An MLA layer (csrc/model.cpp load_mla): its tensors must be there (the converter writes what the
    checkpoint holds, the keys decide what the core reads) and have these shapes."""
    if b + "attn_kv_b.weight" in tensors:  # the pre-MLA layout: the core names it
        return {}
    il = int(b.split(".")[1])
    E, q_lora, kv_lora = hp["n_embd"], hp["q_lora_rank"], hp["kv_lora_rank"]
    n_head = hp["layer_n_head"][il] if "layer_n_head" in hp else hp["n_head"]
    n_rot = hp["layer_n_rot"][il] if "layer_n_rot" in hp else hp["n_rot"]
    q_dim = n_head * head_k
    want = {
        "attn_kv_a_mqa.weight": [E, kv_lora + n_rot],
        "attn_kv_a_norm.weight": [kv_lora],
        "attn_k_b.weight": [head_k - n_rot, kv_lora, n_head],
        "attn_v_b.weight": [kv_lora, head_v, n_head],
    }
    if q_lora > 0:
        want.update(
            {"attn_q_a.weight": [E, q_lora], "attn_q_a_norm.weight": [q_lora], "attn_q_b.weight": [q_lora, q_dim]}
        )
    else:
        want["attn_q.weight"] = [E, q_dim]
    missing = [n for n in want if b + n not in tensors]
    if missing:
        why = f" (key '{hp['arch']}.attention.q_lora_rank' = {q_lora})" if missing[0].startswith("attn_q") else ""
        raise ModelFormatError(f"{path}: missing tensor '{b}{missing[0]}' of an MLA layer{why}")
    return want


# tokenizer / chat template keys the runtime reads (runtime/tokenizer.py, chat_template.py): key -> kind
TOKENIZER_KEYS = {
    "tokenizer.ggml.model": "str",
    "tokenizer.ggml.pre": "str",
    "tokenizer.huggingface.json": "str",
    "tokenizer.ggml.tokens": "str_list",
    "tokenizer.ggml.merges": "str_list",
    "tokenizer.ggml.scores": "num_array",
    "tokenizer.ggml.token_type": "int_array",
    "tokenizer.ggml.add_bos_token": "bool",
    "tokenizer.ggml.add_eos_token": "bool",
    "tokenizer.ggml.add_space_prefix": "bool",
}
_KINDS = {
    "str": "a string",
    "bool": "a boolean",
    "id": "a token id (an integer in [0, 2^31))",
    "str_list": "an array of strings",
    "num_array": "an array of finite numbers",
    "int_array": "an array of integers",
}


def _kind_of(key: str) -> str | None:
    if key in TOKENIZER_KEYS:
        return TOKENIZER_KEYS[key]
    if key.startswith("tokenizer.ggml.") and key.endswith("_token_id"):
        return "id"
    if key == "tokenizer.chat_template" or key.startswith("tokenizer.chat_template."):
        return "str"
    return None


def _is_kind(kind: str, v: Any) -> bool:
    if kind == "str":
        return isinstance(v, str)
    if kind == "bool":
        return isinstance(v, (bool, np.bool_))
    if kind == "id":
        return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_)) and 0 <= int(v) <= INT32_MAX
    if kind == "str_list":
        return isinstance(v, list) and all(isinstance(x, str) for x in v)
    if isinstance(v, list):  # the converter's writer holds arrays as lists
        v = np.asarray(v) if all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v) else None
    if not isinstance(v, np.ndarray) or v.ndim != 1:
        return False
    return v.dtype.kind in "iu" if kind == "int_array" else (v.dtype.kind in "iuf" and bool(np.isfinite(v).all()))


QUANT_VEC_DOT_TYPES = {k: v for k, v in VEC_DOT_TYPES.items() if v not in ("F32", "F16", "BF16")}
STANDINS_SUFFIX = ".standins.gguf"  # converters/standins.py writes MODEL.gguf + this


def check_standins(
    path: str,
    kv: dict[str, Any],
    tensors: dict[str, tuple],
    model_path: str,
    model_tensors: dict[str, tuple],
    model_size: int,
) -> None:
    """A stand-in side file (converters/standins.py) against its model: made from this very file (its recorded size:
    model_size, all shards of a split set), every routed-expert tensor of the model present with the same shape, in
    a type the CPU multiplies."""
    size = kv.get("moelite.standins.source_size")
    if not isinstance(size, int) or isinstance(size, bool):
        raise ModelFormatError(f"{path}: not a stand-in file (no integer moelite.standins.source_size)")
    if size != model_size:
        raise ModelFormatError(
            f"{path}: made for a file of {size} bytes, {model_path} has {model_size}"
            f" (another model, or an older version of it): write it again with `moelite convert "
            f"{model_path} --standins TYPE`"
        )
    for name, (_typ, shape, _off, _nb) in model_tensors.items():
        if not (name.startswith("blk.") and name.endswith("_exps.weight")):
            continue
        t = tensors.get(name)
        if t is None:
            raise ModelFormatError(f"{path}: missing stand-in tensor '{name}'")
        if list(t[1]) != list(shape):
            raise ModelFormatError(f"{path}: tensor '{name}' has shape {list(t[1])}, the model's is {list(shape)}")
        if t[0] not in QUANT_VEC_DOT_TYPES:
            raise ModelFormatError(
                f"{path}: tensor '{name}' has ggml type {t[0]}: expected a quantized type the CPU "
                f"multiplies ({', '.join(QUANT_VEC_DOT_TYPES.values())})"
            )


def check_tokenizer_keys(path: str, kv: dict[str, Any]) -> None:
    """Types of the tokenizer and chat template keys; tokens, scores and token types of one length."""
    for key, v in kv.items():
        kind = _kind_of(key)
        if kind is not None and not _is_kind(kind, v):
            raise _fail(
                path,
                f"key '{key}'",
                v if not isinstance(v, (list, np.ndarray)) or len(v) < 8 else f"<{type(v).__name__} of {len(v)}>",
                f"expected {_KINDS[kind]}",
            )
    tokens = kv.get("tokenizer.ggml.tokens")
    for key in ("tokenizer.ggml.scores", "tokenizer.ggml.token_type"):
        if tokens is not None and key in kv and len(kv[key]) != len(tokens):
            raise ModelFormatError(
                f"{path}: key '{key}' has {len(kv[key])} entries, 'tokenizer.ggml.tokens' has {len(tokens)}"
            )


def load_hparams(
    path: str, kv: dict[str, Any], tensors: dict[str, tuple], file_size: int | Mapping[str, int] | None = None
) -> dict[str, Any]:
    """parse_hparams behind the checks of this module: a valid dict for the C++ core or a ModelFormatError.
    file_size: of the data the tensors' offsets point into (default: the file at path), or per tensor (split sets)."""
    check_raw_keys(path, kv, tensors)
    check_tokenizer_keys(path, kv)
    try:
        hp = parse_hparams(path, kv, tensors)
    except ModelFormatError:
        raise
    except (ArithmeticError, ValueError, TypeError, IndexError, KeyError) as e:
        raise ModelFormatError(f"{path}: invalid hyperparameters ({type(e).__name__}: {e})") from None
    validate_hparams(path, hp, tensors)
    validate_tensors(path, tensors, hp, file_size)
    return hp
