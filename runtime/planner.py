"""Memory planning: how a budget splits into dense weights, KV cache, scratch and expert slots.

budget = dense (resident: attention, embeddings, norms, routers, shared experts)
       + KV cache + graph scratch + expert slots x bytes per expert slot
A budget that cannot hold the dense part plus n_expert_used slots per MoE layer is an error that names the
minimum. Without a budget, everything stays resident when it fits in available RAM, else 70 % of it is used.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import psutil

from ..errors import BudgetError
from .args import MAX_LOOKAHEAD

# One rule, case-insensitive: B = bytes; KB MB GB TB = powers of 1000; K M G T and KiB MiB GiB TiB = powers of 1024
# (as llama.cpp's and most tools' bare suffixes). A number alone is bytes.
_UNITS = {
    "": 1,
    "B": 1,
    "KB": 1000,
    "MB": 1000**2,
    "GB": 1000**3,
    "TB": 1000**4,
    "K": 1024,
    "M": 1024**2,
    "G": 1024**3,
    "T": 1024**4,
    "KIB": 1024,
    "MIB": 1024**2,
    "GIB": 1024**3,
    "TIB": 1024**4,
}
SIZE_RULE = "B bytes; KB/MB/GB decimal; K/M/G and KiB/MiB/GiB binary; any case"
_MAX_SIZE = 1 << 60


def parse_size(value: str | int | float | None, what: str = "memory budget") -> int | None:
    """'1.5GiB', '800MB', '512m', 1073741824 -> bytes (see SIZE_RULE). None -> None. Bad values raise BudgetError
    naming `what`."""
    if value is None:
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        n = value
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(value))
        if not m or m.group(2).upper() not in _UNITS:
            raise BudgetError(
                f"bad {what} size {value!r}: expected a number with a unit, e.g. '1.5GiB', '800MB', "
                f"'512m' ({SIZE_RULE})"
            )
        n = float(m.group(1)) * _UNITS[m.group(2).upper()]
    if not 0 < n < _MAX_SIZE:  # also NaN and infinities
        raise BudgetError(f"{what} must be a positive size below {fmt_bytes(_MAX_SIZE)}, got {value!r}")
    return int(n)


def fmt_bytes(n: float, round_up: bool = False) -> str:
    """Bytes in binary units with 2 decimals; round_up for a minimum (never show less than is needed)."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            if unit == "B":
                return f"{math.ceil(n) if round_up else n:.0f} B"
            return f"{math.ceil(n * 100) / 100 if round_up else n:.2f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


@dataclass
class Plan:
    dense_bytes: int
    kv_bytes: int
    scratch_bytes: int
    expert_slot_bytes: list[int]  # per layer: bytes of one expert slot (0 for dense layers)
    n_expert: int
    n_expert_used: int
    slots: list[int] | None  # per layer quota; None = everything resident
    budget: int | None
    n_ubatch: int = 512  # prompt tokens per graph (smaller under a tight budget: less scratch)
    rs_bytes: int = 0  # recurrent state: the live one + its snapshots for prompt reuse
    ple_bytes: int = 0  # the PLE table's rows cached in RAM (Qwen4-Exp; the table itself stays in the file)
    ple_table_bytes: int = 0  # the PLE table in the file

    @property
    def moe_layers(self) -> list[int]:
        return [i for i, b in enumerate(self.expert_slot_bytes) if b]

    @property
    def expert_bytes_total(self) -> int:
        return sum(b * self.n_expert for b in self.expert_slot_bytes)

    @property
    def minimum_budget(self) -> int:
        return (
            self.dense_bytes
            + self.kv_bytes
            + self.rs_bytes
            + self.ple_bytes
            + self.scratch_bytes
            + sum(b * self.n_expert_used for b in self.expert_slot_bytes)
        )

    @property
    def resident_bytes(self) -> int:
        slots = self.slots or [self.n_expert if b else 0 for b in self.expert_slot_bytes]
        return (
            self.dense_bytes
            + self.kv_bytes
            + self.rs_bytes
            + self.ple_bytes
            + self.scratch_bytes
            + sum(s * b for s, b in zip(slots, self.expert_slot_bytes))
        )


def _page(n: int) -> int:
    return (n + 4095) // 4096 * 4096


def indexer_keys_per_token(hp: dict) -> int:
    """DSA / QSA / KPool: elements of the indexer's key cache per position, one key of indexer_head_size on each layer
    that runs its own indexer (KPool: the key and its gate logits; IndexShare layers hold none); part of
    kv_bytes_per_token."""
    per = {1: 1, 3: 1, 4: 2}  # csrc IndexerKind -> keys per position
    return sum(per.get(x, 0) for x in hp.get("layer_indexer", [])) * hp.get("indexer_head_size", 0)


def pool_key_bytes(hp: dict, n_ctx: int) -> int:
    """QSA / KPool: each full indexer layer's cache of its complete pools' keys, indexer_head_size F32 values per pool
    of r positions (csrc alloc_kv idx_pool_cache), part of the KV cache's bytes."""
    d = hp.get("indexer_head_size", 0)
    kinds = zip(hp.get("layer_indexer", []), hp.get("layer_compress", []))
    return sum(4 * d * max(1, n_ctx // r) for x, r in kinds if x in (3, 4) and r > 0)


def kv_bytes_per_token(hp: dict) -> int:
    """KV cache elements per token, summed over layers (per-layer kv heads and head sizes from the layer plan;
    MLA caches the compressed latent: kv_lora + rope for K, kv_lora for V)."""
    n_layer = hp["n_layer"]
    attn = [m in (0, 1) for m in hp.get("layer_mixer", [0] * n_layer)]  # recurrent layers hold no KV
    idx = indexer_keys_per_token(hp)
    if hp["kv_lora_rank"]:
        return sum(attn) * ((hp["kv_lora_rank"] + hp["n_rot"]) + hp["kv_lora_rank"]) + idx
    heads = hp.get("layer_n_head_kv", [hp["n_head_kv"]] * n_layer)
    hk = hp.get("layer_head_k", [hp["n_embd_head_k"]] * n_layer)
    hv = hp.get("layer_head_v", [hp["n_embd_head_v"]] * n_layer)
    return sum(h * (a + b) for h, a, b, on in zip(heads, hk, hv, attn) if on) + idx


DEFAULT_SNAPSHOTS = 2  # recurrent-state snapshots kept for prompt reuse (Model(state_snapshots=...))


def recurrent_state_bytes(hp: dict) -> int:
    """Bytes of one sequence's recurrent state (f32), as csrc/model.cpp allocates it: per short-conv layer the
    last K - 1 inputs [K - 1, n_embd]; per Gated DeltaNet layer its conv inputs [K - 1, 2 Hk dk + Hv dv] and the
    state [dv, dv, Hv]; per KDA layer the q / k / v conv inputs [K - 1, 3 H S] and the state [S, S, H]."""
    mixers = hp.get("layer_mixer", [])
    K = hp.get("ssm_conv_kernel", 0)
    total = mixers.count(2) * (K - 1) * hp["n_embd"] * 4
    if mixers.count(3):
        hv, inner = hp["ssm_dt_rank"], hp["ssm_d_inner"]
        channels = 2 * hp["ssm_n_group"] * hp["ssm_d_state"] + inner
        dv = inner // hv
        total += mixers.count(3) * 4 * ((K - 1) * channels + dv * dv * hv)
    if mixers.count(4):  # Mamba2: conv over [d_inner + 2 groups d_state], state [d_state, d_inner]
        inner, ds = hp["ssm_d_inner"], hp["ssm_d_state"]
        total += mixers.count(4) * 4 * ((K - 1) * (inner + 2 * hp["ssm_n_group"] * ds) + ds * inner)
    if mixers.count(6):  # KDA: S = head_dim, inner = H S
        inner, ds = hp["ssm_d_inner"], hp["ssm_d_state"]
        total += mixers.count(6) * 4 * ((K - 1) * 3 * inner + ds * inner)
    if hp.get("ple_layer", -1) >= 0:  # PLE: its dilated conv's inputs [(K - 1) ngram, n_embd hc], ngram - 1 ids
        ng = hp["ple_ngram"]
        total += 4 * (hp["ple_conv_kernel"] - 1) * ng * hp["n_embd"] * hp["hc_mult"]
        total += -(-4 * (ng - 1) // 32) * 32  # the ids, in ggml's 32-byte tensor alignment
    return total


PLE_TABLE = "per_layer_token_embd.weight"
PLE_CACHE_BYTES = 64 << 20  # the PLE row cache by default (csrc ModelOptions::ple_cache_bytes)


def ple_cache_bytes(hp: dict, tensors: dict, n_ubatch: int) -> int:
    """The PLE table's row cache (Qwen4-Exp): PLE_CACHE_BYTES, at least one ubatch of rows, at most the table."""
    if hp.get("ple_layer", -1) < 0 or PLE_TABLE not in tensors:
        return 0
    table = tensors[PLE_TABLE][3]
    row = table // max(tensors[PLE_TABLE][1][1], 1)
    return min(table, max(PLE_CACHE_BYTES, row * hp["ple_heads"] * n_ubatch))


STANDIN_SHARE = 0.25  # stand-ins all in memory when they cost at most this share of the expert budget


def expert_slots_of(hp: dict, tensors: dict) -> tuple[list[int], set[str], int]:
    """Bytes of one cache slot per layer (0: not a MoE layer), the routed-expert tensor names and the largest
    expert FFN width, from a tensor table (the model's, or its stand-ins' side file: the same names)."""
    n_layer, E = hp["n_layer"], hp["n_expert"]
    slot_bytes = [0] * n_layer
    expert_names: set[str] = set()
    n_ff = 0
    for il in range(n_layer):
        if hp.get("layer_ffn", [1] * n_layer)[il] != 1:
            continue
        fused = f"blk.{il}.ffn_gate_up_exps.weight"
        # gateless (ReLU²) experts hold up and down only (hparams act 3): 2 matrices per slot
        projs = ("up",) if hp.get("act") == 3 else ("gate", "up")
        names = [fused] if fused in tensors else [f"blk.{il}.ffn_{r}_exps.weight" for r in projs]
        names.append(f"blk.{il}.ffn_down_exps.weight")
        if all(n in tensors for n in names) and il >= hp["n_layer_dense_lead"]:
            # the cache keeps gate and up in separate slots (a fused tensor's halves): page-padded each
            per = [tensors[n][3] // E for n in names]
            halves = [per[0] // 2, per[0] // 2, per[1]] if names[0] == fused else per
            slot_bytes[il] = sum(_page(b) for b in halves)
            expert_names.update(names)
            n_ff = max(n_ff, tensors[names[-1]][1][0])  # down_exps [n_ff, n_embd, E]
    return slot_bytes, expert_names, n_ff


def plan_standins(
    p: Plan, standin_slot_bytes: list[int], shares: list[float] | None = None, label: str = "memory budget"
) -> tuple[list[int], list[int]]:
    """(full-expert slots, stand-in slots) per layer for an offloaded plan with stand-ins. Every stand-in of a layer
    stays in memory when all of them cost at most STANDIN_SHARE of the expert slots' bytes; otherwise each layer
    keeps n_expert_used stand-in slots, a buffer for the ones read on a miss (measured in bench/LOSSY.md: on a
    disk-bound machine every full slot given up costs more reads than the stand-ins save). The full copies get the
    rest, at least n_expert_used per layer."""
    assert p.slots is not None
    K, E, moe = p.n_expert_used, p.n_expert, p.moe_layers
    free = sum(s * b for s, b in zip(p.slots, p.expert_slot_bytes))
    every = sum(E * standin_slot_bytes[i] for i in moe) <= STANDIN_SHARE * free
    st = [0] * len(p.slots)
    for i in moe:
        st[i] = E if every else K
    rest = free - sum(st[i] * standin_slot_bytes[i] for i in moe)
    need = sum(K * (p.expert_slot_bytes[i] + standin_slot_bytes[i]) for i in moe)
    if rest < sum(K * p.expert_slot_bytes[i] for i in moe):
        raise BudgetError(
            f"{label} {fmt_bytes(p.budget)} is too small for stand-ins: {K} full and {K} stand-in expert "
            f"slots per MoE layer need {fmt_bytes(need, round_up=True)} besides the rest of the plan",
            minimum=p.budget - free + need,
        )
    return _split_slots(p, rest, shares), st


def _mtp_block(name: str, n_layer: int) -> bool:
    return name.startswith("blk.") and int(name.split(".", 2)[1]) >= n_layer


def plan_memory(
    hp: dict,
    tensors: dict,
    *,
    n_ctx: int,
    n_ubatch: int | None,
    kv_elsize: float,
    budget: int | None,
    shares: list[float] | None = None,
    label: str = "memory budget",
    n_snapshots: int = DEFAULT_SNAPSHOTS,
    flash_attn: bool = True,
) -> Plan:
    """n_ubatch None: 512, halved (down to 16) while its scratch exceeds 10 % of the budget. `label` names the
    budget in errors ('VRAM budget' for a GPU's arena). n_snapshots: recurrent-state snapshots kept for prompt
    reuse (each as large as the live state)."""
    rs = recurrent_state_bytes(hp) * (1 + n_snapshots)
    n_layer, E, K = hp["n_layer"], hp["n_expert"], hp["n_expert_used"]
    slot_bytes, expert_names, n_ff = expert_slots_of(hp, tensors)
    # MTP blocks (blk.{n_layer}.., nextn_predict_layers) are not loaded: the main path never runs them
    # the PLE table (Qwen4-Exp) stays in the file: its rows are cached (Plan.ple_bytes), never loaded whole
    dense = sum(
        t[3] for n, t in tensors.items() if n not in expert_names and not _mtp_block(n, n_layer) and n != PLE_TABLE
    )
    kv = int(kv_bytes_per_token(hp) * n_ctx * kv_elsize) + pool_key_bytes(hp, n_ctx)

    head = max(hp.get("layer_head_k", [hp["n_embd_head_k"]]) + hp.get("layer_head_v", [hp["n_embd_head_v"]]))

    # the residual stream's row: hyper-connections keep hc_mult streams of n_embd (csrc HParams::n_embd_res)
    res = hp["n_embd"] * max(hp.get("hc_mult") or 1, 1)

    def scratch_for(t: int) -> int:
        # graph scratch for t tokens, upper bound: attention scores [n_kv, t, n_head] (x2, softmax) or the
        # expert activations [n_ff, K, t] x 3 + [n_embd, K, t] x 2, plus a few [n_embd, t] temporaries
        # flash attention never materializes the scores: its q/k/v/output rows per token instead
        n_head = max(hp.get("layer_n_head", [hp["n_head"]]))  # query heads of the widest layer
        attn = 4 * n_head * head if flash_attn else 2 * n_head * n_ctx
        experts = 3 * n_ff * K + 2 * hp["n_embd"] * K
        # KDA layers: ~20 [H S] temporaries per token (q / k / v and their conv, gates, norms) and, once per graph,
        # the delta rule's output state [S, S, H] and the conv over [K - 1 + t, 3 H S]
        kda = 6 in hp.get("layer_mixer", [])
        mixer = 20 * hp["ssm_d_inner"] if kda else 0
        kda_once = 4 * (hp["ssm_d_state"] + 3 * hp["ssm_conv_kernel"]) * hp["ssm_d_inner"] if kda else 0
        # + the output graph's logits, a block of rows at a time (csrc kOutputScratch = 8 MiB)
        row = 4 * (hp["n_vocab"] + 2 * hp["n_embd"])
        output = max(row, min(8 << 20, row * t))
        # + the host's attention masks of a ubatch, [n_kv, t] per mask kind in use (causal, sliding, chunked):
        # F16 for flash attention, F32 otherwise (csrc Model::build_masks); 4 MiB at 32k x 64 tokens in F16
        kinds = len({m for m, x in zip(hp.get("layer_mask", [0]), hp.get("layer_mixer", [0] * n_layer)) if x in (0, 1)})
        masks = max(kinds, 1) * n_ctx * t * (2 if flash_attn else 4)
        # + DSA past its budget: the indexer's per-head scores [n_kv, n_idx, t] (3 live: relu'd, weighted,
        # permuted) and its selection mask [n_kv, t] (F32 causal input, filled, summed + the F16 copy)
        if any(hp.get("layer_indexer", [])):
            masks += 4 * t * n_ctx * (3 * hp["indexer_n_head"] + 4)
        return 4 * t * (max(attn, experts, mixer) + 8 * res) + (4 << 20) + output + masks + kda_once

    def ubatch_for(b: int | None) -> int:
        t = n_ubatch or 512
        if n_ubatch is None and b is not None:  # a tight budget prefers smaller prompt chunks over fewer slots
            while t > 16 and scratch_for(t) > 0.1 * b:
                t //= 2
        return t

    def plan_for(b: int | None) -> Plan:
        t = ubatch_for(b)
        # state between the layer graphs; latent MoE: the experts' input [L, t] and outputs [L, K t] (csrc alloc_kv)
        ee = hp.get("moe_latent") or 0
        # + x and h as the residual stream's rows, the experts' input; hyper-connections: a MoE layer's gates [hc, t]
        # (mHC: + its comb [hc, hc, t])
        hc = hp.get("hc_mult") or 0
        hc_post = hc * (hc + 1) if hp.get("hc_kind") == 3 else hc
        # + the router logits [E, t] and the gate lookahead's, one per distance (csrc kMaxLookahead)
        state = 4 * t * (2 * res + hp["n_embd"] + (1 + MAX_LOOKAHEAD) * E + K * (ee or hp["n_embd"]) + ee + hc_post)
        if 2 in hp.get("layer_indexer", []):  # DSA IndexShare: the last full layer's selection [top_k, t] I32
            state += 4 * t * hp["indexer_top_k"]
        return Plan(
            dense,
            kv + state,
            scratch_for(t),
            slot_bytes,
            E,
            K,
            None,
            b,
            t,
            rs,
            ple_cache_bytes(hp, tensors, t),
            tensors[PLE_TABLE][3] if PLE_TABLE in tensors else 0,
        )

    p = plan_for(budget)
    if budget is None:
        avail = psutil.virtual_memory().available
        if p.resident_bytes <= 0.85 * avail:
            return p
        budget = int(0.7 * avail)
        p.budget = budget
        label = f"the default budget (no {label} given: 70 % of the available RAM),"
    if budget < p.minimum_budget:
        # the least budget that plans: a larger budget may pick a larger n_ubatch, which needs more scratch
        least = plan_for(p.minimum_budget)
        while least.minimum_budget > least.budget:
            least = plan_for(least.minimum_budget)
        # least.minimum_budget (<= least.budget) plans too (n_ubatch never grows as the budget shrinks) and is the
        # exact sum of the parts named here
        need = least.minimum_budget
        state = f"recurrent state ({fmt_bytes(rs)}: live + {n_snapshots} snapshots), " if rs else ""
        raise BudgetError(
            f"{label} {fmt_bytes(budget)} is too small: the dense part ({fmt_bytes(dense)}), "
            f"KV cache ({fmt_bytes(least.kv_bytes)}), {state}scratch ({fmt_bytes(least.scratch_bytes)}) and {K} "
            f"expert slots per MoE layer need at least {fmt_bytes(need, round_up=True)}",
            minimum=need,
        )
    free = budget - dense - p.kv_bytes - p.rs_bytes - p.scratch_bytes
    if sum(slot_bytes[i] * E for i in p.moe_layers) <= free:
        return p  # everything fits: fully resident
    p.slots = _split_slots(p, free, shares)
    return p


def _split_slots(p: Plan, free: int, shares: list[float] | None) -> list[int]:
    """Per-layer slot quotas for `free` bytes: each MoE layer its share (default equal), at least k, at most E."""
    moe, E, K = p.moe_layers, p.n_expert, p.n_expert_used
    w = shares if shares is not None else [1.0 / len(moe)] * len(moe)
    if len(w) != len(moe):
        raise BudgetError(f"cache shares name {len(w)} layers, the model has {len(moe)} MoE layers")
    slots = [0] * len(p.expert_slot_bytes)
    for share, il in zip(w, moe):
        slots[il] = max(K, min(E, int(free * share // p.expert_slot_bytes[il])))
    # the per-layer floor of K may overshoot: take slots back from the largest quotas
    while sum(slots[i] * p.expert_slot_bytes[i] for i in moe) > free:
        il = max((i for i in moe if slots[i] > K), key=lambda i: slots[i], default=None)
        if il is None:
            break
        slots[il] -= 1
    return slots


def plan_host_tier(p: Plan, budget: int | None, shares: list[float] | None = None) -> list[int] | None:
    """The RAM tier of a GPU run (csrc/tiering.h): per-layer host slots from `budget` bytes of RAM (None: 70 %
    of available RAM), or None when the VRAM arena already holds every expert. The CPU graphs that run
    experts from RAM need scratch too: the plan's scratch bound is kept aside."""
    if p.slots is None:
        return None
    if budget is None:
        budget = int(0.7 * psutil.virtual_memory().available)
    minimum = p.scratch_bytes + sum(b * p.n_expert_used for b in p.expert_slot_bytes)
    if budget < minimum:
        raise BudgetError(
            f"memory budget {fmt_bytes(budget)} is too small for the RAM tier: scratch "
            f"({fmt_bytes(p.scratch_bytes)}) and {p.n_expert_used} expert slots per MoE layer need at "
            f"least {fmt_bytes(minimum, round_up=True)}",
            minimum=minimum,
        )
    free = budget - p.scratch_bytes
    if sum(b * p.n_expert for b in p.expert_slot_bytes) <= free:
        return [p.n_expert if b else 0 for b in p.expert_slot_bytes]
    return _split_slots(p, free, shares)


def budget_for_fraction(hp: dict, tensors: dict, *, n_ctx: int, kv_elsize: int, fraction: float) -> int:
    """The smallest memory budget whose plan (n_ubatch chosen as for that budget) holds at least `fraction` of
    all expert slots; the minimum budget when that already does. For benchmarks and `moelite plan`."""

    def plan(b: int) -> Plan:
        return plan_memory(hp, tensors, n_ctx=n_ctx, n_ubatch=None, kv_elsize=kv_elsize, budget=b)

    def held(p: Plan) -> float:
        slots = p.slots or [p.n_expert if b else 0 for b in p.expert_slot_bytes]
        return sum(slots) / (p.n_expert * len(p.moe_layers))

    try:
        lo = 1
        p = plan(lo)
    except BudgetError as e:
        lo = e.minimum
        p = plan(lo)
    if held(p) >= fraction:
        return lo
    hi = lo + p.dense_bytes + p.kv_bytes + p.scratch_bytes + p.expert_bytes_total
    while hi - lo > 4096:  # held() grows with the budget
        mid = (lo + hi) // 2
        if held(plan(mid)) >= fraction:
            hi = mid
        else:
            lo = mid
    return hi
