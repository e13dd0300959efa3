"""moelite plan MODEL --memory 4GiB: will the model run in that budget, what stays resident, what is read from
disk, the decode speed the bandwidth roofline allows on this machine, and a predicted decode speed. The memory plan
is runtime/planner.py's, the roofline, the prediction and the machine measurements are runtime/speed.py's: this
module reads the model and prints."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import BudgetError
from ..runtime.files import is_hf_dir, resolve_model
from ..runtime.planner import SIZE_RULE
from .common import add_model_arg, budget_arg, model_arg, native_stderr_hidden, positive_int

NAME = "plan"
HELP = "check whether a model fits a memory budget and predict its speed"
KV_ELSIZE = 2  # f16 KV cache, the runtime's default


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arg(p, "a .gguf file or a Hugging Face directory (default: demo)")
    p.add_argument(
        "--memory",
        "--memory-budget",
        "-M",
        dest="memory_budget",
        type=budget_arg,
        required=True,
        metavar="SIZE",
        help=f"memory budget, e.g. 4GiB ({SIZE_RULE})",
    )
    p.add_argument(
        "--vram",
        type=budget_arg,
        metavar="SIZE",
        help="plan a GPU run: SIZE of VRAM for dense weights, KV cache and the expert arena; --memory is "
        "then the RAM tier between VRAM and disk",
    )
    p.add_argument("--ctx-size", "-c", type=positive_int, help="context size in tokens (default: min(model, 4096))")
    p.add_argument(
        "--convert-type",
        "--quant",
        default="q8_0",
        metavar="TYPE",
        help="type when MODEL is a HF directory (read, not converted: config, tokenizer, safetensors headers) "
        "or with --config",
    )
    p.add_argument(
        "--config",
        metavar="CONFIG",
        help="plan from a config.json (or a directory holding one) alone, without weights: the tensor table "
        "its converter family writes at --quant (converters/shapes.py)",
    )
    p.add_argument(
        "--mtp",
        action="store_true",
        help="plan with the model's MTP block loaded, as speculative='mtp' loads it (its dense weights, KV cache and "
        "expert slots count as one more layer)",
    )
    p.add_argument("--remeasure", action="store_true", help="measure memory and disk bandwidth again")
    p.add_argument(
        "--threads",
        "-t",
        type=positive_int,
        default=None,
        help="threads the prediction is for (default: as moelite.load picks them)",
    )


def main(args: argparse.Namespace) -> int:
    from ..runtime.planner import fmt_bytes, indexer_keys_per_token, parse_size, plan_memory
    from ..runtime.speed import bandwidths, embedding_bytes, machine_file, predict_decode, roofline
    from ..runtime.validate import load_hparams

    if args.config is not None:
        path, label, kv, tensors, limits = config_table(args.config, args.convert_type, model_arg(args))
    else:
        path, label, kv, tensors, limits = model_table(model_arg(args), args.convert_type, args.verbose)
    hp = load_hparams(path or label, kv, tensors, file_size=limits)
    if args.mtp:
        from ..runtime.hparams import planned, with_mtp

        hp = planned(with_mtp(hp, tensors, path or label))
    n_ctx = args.ctx_size or min(int(hp["context_length"]), 4096)
    budget = parse_size(args.memory_budget)
    kw = dict(n_ctx=n_ctx, n_ubatch=None, kv_elsize=KV_ELSIZE)  # n_ubatch None: chosen for the budget, as Model does
    full = plan_memory(hp, tensors, budget=1 << 62, **kw)  # everything resident: expert sizes
    print(
        f"model     {label}: {hp['arch']}, {hp['n_layer'] - hp.get('n_mtp', 0)} layers"
        f"{' + its MTP block' if hp.get('n_mtp') else ''}, {full.n_expert} experts "
        f"({full.n_expert_used} used per token), n_ctx {n_ctx}"
    )
    print(f"experts   {fmt_bytes(full.expert_bytes_total)} in {len(full.moe_layers)} MoE layers")
    if args.vram:
        return _plan_gpu(hp, tensors, parse_size(args.vram), budget, kw)
    try:
        plan = plan_memory(hp, tensors, budget=budget, **kw)
    except BudgetError as e:
        print(f"fits      NO: {e}")
        return 1
    state = f"recurrent state {fmt_bytes(plan.rs_bytes)} (live + snapshots) · " if plan.rs_bytes else ""
    idx = indexer_keys_per_token(hp) * n_ctx * KV_ELSIZE  # DSA's indexer key cache, part of the KV cache
    keys = f" (DSA indexer keys {fmt_bytes(idx)})" if idx else ""
    print(
        f"resident  dense {fmt_bytes(plan.dense_bytes)} · KV cache {fmt_bytes(plan.kv_bytes)}{keys} · {state}"
        f"scratch {fmt_bytes(plan.scratch_bytes)} (prompt chunks of {getattr(plan, 'n_ubatch', '?')} tokens)"
    )
    if plan.ple_table_bytes:  # Qwen4-Exp's n-gram table: read row by row from the file, never loaded whole
        print(
            f"ple       n-gram table {fmt_bytes(plan.ple_table_bytes)} in the file, read by rows on demand into a "
            f"{fmt_bytes(plan.ple_bytes)} row cache ({hp['ple_heads']} rows of "
            f"{fmt_bytes(plan.ple_table_bytes / max(tensors['per_layer_token_embd.weight'][1][1], 1))} per token)"
        )
    slots = plan.slots or [plan.n_expert if b else 0 for b in plan.expert_slot_bytes]
    resident = sum(s * b for s, b in zip(slots, plan.expert_slot_bytes))
    if plan.slots is None:
        print(f"fits      yes, everything resident ({fmt_bytes(plan.resident_bytes)} of {fmt_bytes(budget)})")
    else:
        moe = plan.moe_layers
        print(
            f"fits      yes, offloaded: {fmt_bytes(resident)} of experts resident "
            f"({_span([slots[i] for i in moe])} of {plan.n_expert} slots per layer), "
            f"{fmt_bytes(plan.expert_bytes_total - resident)} read from disk on demand"
        )
    bw = bandwidths(args.remeasure)
    lo, hi = roofline(plan, slots, embedding_bytes(tensors), bw["mem_bw"], bw["disk_bw"])
    print(
        f"machine   memory {fmt_bytes(bw['mem_bw'])}/s · disk {fmt_bytes(bw['disk_bw'])}/s ({bw['disk_method']}; "
        f"cached in {machine_file()})"
    )
    print(f"speed     {lo:.1f} - {hi:.1f} tok/s decode (bandwidth roofline, an upper bound; compute not counted)")
    pred = predict_decode(plan, slots, embedding_bytes(tensors), bw, path, args.threads, args.remeasure)
    print(
        f"predicted {pred['tok_s']:.1f} tok/s decode at hit rate {100 * pred['hit_rate']:.1f} % ({pred['source']}; "
        f"{pred['threads']} threads)"
    )
    return 0


def model_table(
    arg: str | None, convert_type: str, verbose: bool
) -> tuple[str | None, str, dict, dict, int | dict[str, int]]:
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


def config_table(config: str, convert_type: str, model: str | None) -> tuple[None, str, dict, dict, int]:
    """--config: model_table's answer for the GGUF a checkpoint with this config.json converts to."""
    from ..converters.shapes import describe_config
    from ..errors import UsageError

    if model is not None:
        raise UsageError(f"give either MODEL ({model!r}) or --config ({config!r}), not both")
    kv, tensors = describe_config(config, convert_type)
    return None, f"{config} (config only, as {convert_type})", kv, tensors, sum(t[3] for t in tensors.values())


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
    print(
        f"VRAM      dense {fmt_bytes(vplan.dense_bytes)} · KV cache {fmt_bytes(vplan.kv_bytes)} · scratch "
        f"{fmt_bytes(vplan.scratch_bytes)} · experts {fmt_bytes(in_vram)} ({_span([arena[i] for i in moe])} of {E} "
        f"slots per layer)"
    )
    if host is None:
        print("RAM       no tier needed: VRAM holds every expert")
        return 0
    in_ram = sum(s * b for s, b in zip(host, vplan.expert_slot_bytes))
    print(f"RAM       expert tier {fmt_bytes(in_ram)} ({_span([host[i] for i in moe])} of {E} slots per layer, pinned)")
    print(f"disk      {fmt_bytes(max(vplan.expert_bytes_total - in_ram, 0))} of experts read on demand")
    print(
        "speed     not predicted for a GPU: moelite measures the copy and CPU costs at load (Model.info()['tier_costs'])"
    )
    return 0


def _span(xs: list[int]) -> str:
    return str(xs[0]) if min(xs) == max(xs) else f"{min(xs)}-{max(xs)}"
