"""moelite plan MODEL --memory 4GiB: will the model run in that budget, what stays resident, what is read from
disk, the decode speed the bandwidth roofline allows on this machine, and a predicted decode speed.

Roofline of one decode token: every resident byte used by the token is read from memory once (dense weights
except the embedding table, K experts per MoE layer); each expert that misses the cache is also read from
disk. The range goes from no routing locality (hit rate = slots / experts, misses stall the token) to strong
locality (hit rate = sqrt(slots / experts), reads fully overlapped by prefetch).

Prediction (one number): a step costs layers x the per-layer overhead measured on this machine (apps/machine.py
step_overhead: the embedded demo's resident decode minus its bytes) + the token's resident bytes / memory
bandwidth + its misses' bytes / disk bandwidth (reads not overlapped). The hit rate per layer comes from the
calibration side file (`moelite analyze`) when there is one: its simulated hit rate when it was calibrated for
this many slots (within 10 %), else the hit rate of keeping each layer's most used experts (its expert
frequencies); without a side file, 1 - (1 - slots / experts)^LOCALITY (stated in the output).
"""
from __future__ import annotations

import argparse
import math
from pathlib import Path

from ..errors import BudgetError
from ..runtime.planner import SIZE_RULE
from .common import (add_model_arg, budget_arg, is_hf_dir, model_arg, native_stderr_hidden, positive_int,
                     resolve_model)

NAME = "plan"
HELP = "check whether a model fits a memory budget and predict its speed"
KV_ELSIZE = 2             # f16 KV cache, the runtime's default
# Hit rate without a calibration: 1 - (1 - f)^LOCALITY for a share f of a layer's experts in slots. Fit to the
# trained models measured here (bench/OFFLOAD.md, bench/RESULTS.md: the bench MoE 72-87 % at f = 0.25, 95-97 % at
# f = 0.5; the demo 80-84 % and 95-96 %), on the low side; sqrt(f), the roofline's optimistic bound, is below what
# trained routing gives (50 % and 71 %) and predicted the bench MoE 43-65 % too slow under a cap.
LOCALITY = 4


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arg(p, "a .gguf file or a Hugging Face directory (default: demo)")
    p.add_argument("--memory", "--memory-budget", "-M", dest="memory_budget", type=budget_arg, required=True,
                   metavar="SIZE", help=f"memory budget, e.g. 4GiB ({SIZE_RULE})")
    p.add_argument("--vram", type=budget_arg, metavar="SIZE",
                   help="plan a GPU run: SIZE of VRAM for dense weights, KV cache and the expert arena; --memory is "
                        "then the RAM tier between VRAM and disk")
    p.add_argument("--ctx-size", "-c", type=positive_int, help="context size in tokens (default: min(model, 4096))")
    p.add_argument("--convert-type", default="q8_0", metavar="TYPE",
                   help="type when MODEL is a HF directory (read, not converted: config, tokenizer, safetensors headers)")
    p.add_argument("--remeasure", action="store_true", help="measure memory and disk bandwidth again")
    p.add_argument("--threads", "-t", type=positive_int, default=None,
                   help="threads the prediction is for (default: as moelite.load picks them)")


def main(args: argparse.Namespace) -> int:
    from ..runtime.planner import fmt_bytes, parse_size, plan_memory
    from ..runtime.validate import load_hparams
    from .machine import bandwidths

    path, label, kv, tensors, limits = model_table(model_arg(args), args.convert_type, args.verbose)
    hp = load_hparams(path or label, kv, tensors, file_size=limits)
    n_ctx = args.ctx_size or min(int(hp["context_length"]), 4096)
    budget = parse_size(args.memory_budget)
    kw = dict(n_ctx=n_ctx, n_ubatch=None, kv_elsize=KV_ELSIZE)         # n_ubatch None: chosen for the budget, as Model does
    full = plan_memory(hp, tensors, budget=1 << 62, **kw)              # everything resident: expert sizes
    print(f"model     {label}: {hp['arch']}, {hp['n_layer']} layers, {full.n_expert} experts "
          f"({full.n_expert_used} used per token), n_ctx {n_ctx}")
    print(f"experts   {fmt_bytes(full.expert_bytes_total)} in {len(full.moe_layers)} MoE layers")
    if args.vram:
        return _plan_gpu(hp, tensors, parse_size(args.vram), budget, kw)
    try:
        plan = plan_memory(hp, tensors, budget=budget, **kw)
    except BudgetError as e:
        print(f"fits      NO: {e}")
        return 1
    state = f"recurrent state {fmt_bytes(plan.rs_bytes)} (live + snapshots) · " if plan.rs_bytes else ""
    print(f"resident  dense {fmt_bytes(plan.dense_bytes)} · KV cache {fmt_bytes(plan.kv_bytes)} · {state}"
          f"scratch {fmt_bytes(plan.scratch_bytes)} (prompt chunks of {getattr(plan, 'n_ubatch', '?')} tokens)")
    slots = plan.slots or [plan.n_expert if b else 0 for b in plan.expert_slot_bytes]
    resident = sum(s * b for s, b in zip(slots, plan.expert_slot_bytes))
    if plan.slots is None:
        print(f"fits      yes, everything resident ({fmt_bytes(plan.resident_bytes)} of {fmt_bytes(budget)})")
    else:
        moe = plan.moe_layers
        print(f"fits      yes, offloaded: {fmt_bytes(resident)} of experts resident "
              f"({_span([slots[i] for i in moe])} of {plan.n_expert} slots per layer), "
              f"{fmt_bytes(plan.expert_bytes_total - resident)} read from disk on demand")
    bw = bandwidths(args.remeasure)
    lo, hi = roofline(plan, slots, _embedding_bytes(tensors), bw["mem_bw"], bw["disk_bw"])
    print(f"machine   memory {fmt_bytes(bw['mem_bw'])}/s · disk {fmt_bytes(bw['disk_bw'])}/s ({bw['disk_method']}; "
          f"cached in {_machine_file()})")
    print(f"speed     {lo:.1f} - {hi:.1f} tok/s decode (bandwidth roofline, an upper bound; compute not counted)")
    pred = predict_decode(plan, slots, _embedding_bytes(tensors), bw, path,
                          args.threads, args.remeasure)
    print(f"predicted {pred['tok_s']:.1f} tok/s decode at hit rate {100 * pred['hit_rate']:.1f} % ({pred['source']}; "
          f"{pred['threads']} threads)")
    return 0


def predict_decode(plan, slots: list[int], embd_bytes: int, bw: dict, model_path: str | None,
                   n_threads: int | None = None, remeasure: bool = False) -> dict:
    """{'tok_s', 'hit_rate' (pooled), 'source', 'threads'}: see the module docstring."""
    import os
    from .machine import step_overhead
    threads = n_threads or max(1, min(os.cpu_count() or 1, 8))
    hits, source = layer_hit_rates(plan, slots, model_path)
    K = plan.n_expert_used
    miss = sum(K * b * (1 - h) for h, b in zip(hits, plan.expert_slot_bytes) if b)
    t = (len(plan.expert_slot_bytes) * step_overhead(threads, bw["mem_bw"], remeasure)
         + active_bytes(plan, embd_bytes) / bw["mem_bw"] + miss / bw["disk_bw"])
    moe = [h for h, b in zip(hits, plan.expert_slot_bytes) if b]
    return {"tok_s": 1 / t, "hit_rate": sum(moe) / max(len(moe), 1), "source": source, "threads": threads}


def layer_hit_rates(plan, slots: list[int], model_path: str | None) -> tuple[list[float], str]:
    """Per-layer hit rate for these slots and where it comes from."""
    E = plan.n_expert
    if plan.slots is None:
        return [1.0] * len(slots), "everything resident"
    calib = {}
    if model_path:
        from ..cache_policies.calibration import load_calibration
        from ..errors import MoeliteError
        try:
            calib = load_calibration(model_path, {})
        except MoeliteError:
            calib = {}
    moe = [i for i, b in enumerate(plan.expert_slot_bytes) if b]
    total = sum(slots[i] for i in moe)
    if calib.get("hit_rate") and abs(total - calib["budget_slots"]) <= 0.1 * calib["budget_slots"]:
        return ([calib["hit_rate"] if i in moe else 1.0 for i in range(len(slots))],
                f"simulated by `moelite analyze` for {calib['budget_slots']} slots")
    freq = calib.get("expert_freq")
    if freq and len(freq) == len(moe) * E:
        out = [1.0] * len(slots)
        for j, i in enumerate(moe):
            f = sorted(freq[j * E:(j + 1) * E], reverse=True)
            out[i] = min(1.0, sum(f[:slots[i]]) / max(sum(f), 1e-12))
        return out, "each layer's most used experts kept (expert frequencies of the calibration side file)"
    return ([1 - (1 - slots[i] / E) ** LOCALITY if i in moe else 1.0 for i in range(len(slots))],
            f"no calibration side file: assumed 1 - (1 - slots / experts)^{LOCALITY} (trained models measured here); "
            "run `moelite analyze` for a measured one")


def active_bytes(plan, embd_bytes: int) -> int:
    """Bytes a decode token reads from memory: dense weights but the embedding table (one row of it), and K
    experts per MoE layer."""
    return max(plan.dense_bytes - embd_bytes, 0) + sum(plan.n_expert_used * b for b in plan.expert_slot_bytes)


def model_table(arg: str | None, convert_type: str,
                verbose: bool) -> tuple[str | None, str, dict, dict, int | dict[str, int]]:
    """MODEL -> (GGUF path or None, what to call it, GGUF keys, tensor table, the bytes each tensor's range is checked
    against: of the data, or per tensor its file's size). A split set is read whole from any shard (the path is its
    first shard; the label names the set and its size). A Hugging Face directory is described as it would be
    converted (config.json, tokenizer files, safetensors headers), not converted."""
    from ..runtime.model import default_model_path, read_table
    if arg is not None and is_hf_dir(Path(arg).expanduser()):
        from ..converters.convert import describe
        path = str(Path(arg).expanduser())
        kv, tensors = describe(path, convert_type)
        return None, f"{path} (as {convert_type})", kv, tensors, sum(t[3] for t in tensors.values())
    path = resolve_model(arg, convert_type) or default_model_path()
    with native_stderr_hidden(verbose):
        table = read_table(path)
    return table.path, table.describe(), table.kv, table.tensors, table.limits


def _plan_gpu(hp: dict, tensors: dict, vram: int, ram: int, kw: dict) -> int:
    """VRAM (dense, KV cache, scratch, expert arena) -> RAM tier -> disk, as moelite.load(device="cuda",
    vram_budget=vram, memory_budget=ram) would place them (csrc/tiering.h)."""
    from ..runtime.planner import fmt_bytes, plan_host_tier, plan_memory
    try:
        vplan = plan_memory(hp, tensors, budget=vram, label="VRAM budget", **kw)
        host = plan_host_tier(vplan, ram)
    except BudgetError as e:
        print(f"fits      NO: {e}")
        return 1
    E, moe = vplan.n_expert, vplan.moe_layers
    arena = vplan.slots or [E if b else 0 for b in vplan.expert_slot_bytes]
    in_vram = sum(s * b for s, b in zip(arena, vplan.expert_slot_bytes))
    print(f"VRAM      dense {fmt_bytes(vplan.dense_bytes)} · KV cache {fmt_bytes(vplan.kv_bytes)} · scratch "
          f"{fmt_bytes(vplan.scratch_bytes)} · experts {fmt_bytes(in_vram)} ({_span([arena[i] for i in moe])} of {E} "
          f"slots per layer)")
    if host is None:
        print("RAM       no tier needed: VRAM holds every expert")
        return 0
    in_ram = sum(s * b for s, b in zip(host, vplan.expert_slot_bytes))
    print(f"RAM       expert tier {fmt_bytes(in_ram)} ({_span([host[i] for i in moe])} of {E} slots per layer, pinned)")
    print(f"disk      {fmt_bytes(max(vplan.expert_bytes_total - in_ram, 0))} of experts read on demand")
    print("speed     not predicted for a GPU: moelite measures the copy and CPU costs at load (Model.info()['tier_costs'])")
    return 0


def roofline(plan, slots: list[int], embd_bytes: int, mem_bw: float, disk_bw: float) -> tuple[float, float]:
    """(pessimistic, optimistic) decode tok/s."""
    E, K = plan.n_expert, plan.n_expert_used
    t_mem = active_bytes(plan, embd_bytes) / mem_bw
    miss_lo = sum(K * b * (1 - s / E) for s, b in zip(slots, plan.expert_slot_bytes) if b)
    miss_hi = sum(K * b * (1 - math.sqrt(s / E)) for s, b in zip(slots, plan.expert_slot_bytes) if b)
    lo = 1 / (t_mem + miss_lo / disk_bw)
    hi = 1 / max(t_mem, miss_hi / disk_bw)
    return lo, hi


def _span(xs: list[int]) -> str:
    return str(xs[0]) if min(xs) == max(xs) else f"{min(xs)}-{max(xs)}"


def _embedding_bytes(tensors: dict) -> int:
    """The embedding table, of which a token reads one row (unless it doubles as the output matrix)."""
    t = tensors.get("token_embd.weight")
    return t[3] if t and "output.weight" in tensors else 0


def _machine_file():
    from .machine import machine_file
    return machine_file()
