"""Low-bit stand-ins (issue 17): a side file MODEL.gguf.standins.gguf holding a small copy of every routed
expert of MODEL.gguf (its `blk.N.ffn_{gate,up,gate_up,down}_exps.weight` tensors re-quantized to TYPE, same names
and shapes, nothing else). moelite.load(..., standins=True) computes a cache miss the router weighs little with
its stand-in instead of reading the full expert (runtime/model.py). The model file itself is not touched, so it
stays the file llama.cpp reads.

Keys: general.architecture (the model's), moelite.standins.type (the requested type), moelite.standins.source
(the model's file name) and moelite.standins.source_size (its size in bytes: a stand-in file made for another
file, or for an older version of this one, is refused at load).
"""

from __future__ import annotations

import os
from pathlib import Path

import gguf

from moelite.errors import ConversionError

from . import gguf_out, quant
from .convert import ConvertReport, gguf_counts, write_planned
from .sources import GGUFSource, open_source

SUFFIX = ".standins.gguf"
KEY = "moelite.standins."


def standins_path(model: str | os.PathLike) -> Path:
    return Path(str(model) + SUFFIX)


def is_expert_weight(name: str) -> bool:
    return name.startswith("blk.") and name.endswith("_exps.weight")


def write_standins(
    model: str | os.PathLike,
    type: str = "q2_k",
    out: str | os.PathLike | None = None,
    *,
    progress: bool = True,
    n_threads: int = 2,
) -> ConvertReport:
    """MODEL.gguf -> OUT (default MODEL.gguf.standins.gguf): every routed-expert tensor re-quantized to `type`
    (a type name `moelite convert` takes; q2_k is llama.cpp's Q2_K mix: down experts Q3_K). Written atomically
    (no file at OUT on failure). Raises ConversionError."""
    timer = gguf_out.Timer()
    type = quant.canonical_type(type)
    if type == "keep":
        raise ConversionError("stand-ins need a type to re-quantize the experts to, not 'keep'")
    source = open_source(model)
    if not isinstance(source, GGUFSource):
        raise ConversionError(f"{model}: stand-ins are made from a GGUF file (convert the checkpoint first)")
    model = source.path  # a split set: its first shard, which the runtime looks the side file up by
    arch, (n_layer, n_expert) = source.arch, gguf_counts(source)  # the model's keys are not copied: only its experts
    experts = [(n, t) for n, t in source.tensors().items() if is_expert_weight(n)]
    if not experts:
        raise ConversionError(f"{model}: no routed-expert tensors (blk.N.ffn_*_exps.weight): not a MoE model")
    planned = quant.plan(experts, type, n_layer, n_expert)
    w = gguf_out.new_writer(arch)
    gguf_out.add_kv(w, KEY + "type", type)
    gguf_out.add_kv(w, KEY + "source", model.name)
    gguf_out.add_kv(w, KEY + "source_size", source.size, gguf.GGUFValueType.UINT64)  # all shards
    out = Path(out) if out is not None else standins_path(model)
    return write_planned(
        out, w, planned, arch, type, timer, [f"stand-ins of {model.name}"], n_threads=n_threads, progress=progress
    )
