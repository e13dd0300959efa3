"""convert(): HF directory or GGUF -> llama.cpp-compatible GGUF, one tensor at a time.

Data flow: source (Lazy tensors, nothing read) -> family.sanitize (stack / split / permute, still lazy)
-> family.map_names (GGUF names) -> shape checks against config.json -> quant.plan (ggml type per
tensor) -> gguf_out.write (header, KV, tensor infos, then each tensor materialised and written).
"""

from __future__ import annotations

import contextlib
import os
import re
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf

from moelite.errors import ConversionError

from . import gguf_out, quant
from .families import Config, for_config, text_config
from .lazy import Lazy, concat_rows
from .sources import GGUFSource, HFSource, open_source
from .vocab import add_vocab


@dataclass
class ConvertReport:
    out: Path
    arch: str
    type: str
    n_tensors: int
    file_size: int
    seconds: float
    files: list[Path] = field(default_factory=list)  # out, or every shard of a split set (out = the first)
    tensor_types: dict[str, str] = field(default_factory=dict)  # GGUF name -> ggml type name
    fallbacks: dict[str, tuple[str, str]] = field(default_factory=dict)  # name -> (wanted, written)
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        counts: dict[str, int] = {}
        for t in self.tensor_types.values():
            counts[t] = counts.get(t, 0) + 1
        mix = ", ".join(f"{k}: {v}" for k, v in sorted(counts.items()))
        where = f"{self.out} (split set of {len(self.files)} files)" if len(self.files) > 1 else f"{self.out}"
        s = (
            f"{where}: {self.arch}, {self.n_tensors} tensors ({mix}), {self.file_size / 2**20:.1f} MiB "
            f"in {self.seconds:.1f} s"
        )
        if self.fallbacks:
            s += f"\n{len(self.fallbacks)} tensor(s) fell back to another type (rows not a multiple of the block):"
            for n, (a, b) in list(self.fallbacks.items())[:8]:
                s += f"\n  {n}: {a} -> {b}"
            if len(self.fallbacks) > 8:
                s += f"\n  ... and {len(self.fallbacks) - 8} more"
        return s


def _tname(t: int) -> str:
    return gguf.GGMLQuantizationType(t).name.lower()


def convert(
    src: str | os.PathLike,
    out: str | os.PathLike,
    type: str = "f32",
    *,
    progress: bool = True,
    n_threads: int = 2,
    fuse_gate_up: bool = False,
    split_max_size: int = 0,
    split_max_tensors: int = 0,
    mtp: bool = True,
) -> ConvertReport:
    """Convert a Hugging Face MoE checkpoint directory (or an existing GGUF) to GGUF at `out`.

    type: f32, f16, bf16, q8_0, q4_0, q4_k, q5_k, q6_k, q5_k_m, q4_k_m, q3_k_m, q2_k (any case), or keep (GGUF
    input only: re-align, keep types).
    fuse_gate_up: write each layer's gate and up experts as one `ffn_gate_up_exps` [n_embd, 2 n_ff, n_expert]
    (llama.cpp's --fuse-gate-up-exps; llama.cpp loads it for the families whose loader knows the tensor).
    split_max_size (bytes of tensor data) / split_max_tensors: write a split set OUT-00001-of-0000N.gguf ... as
    llama.cpp's converter and gguf-split do (0 = no limit; one file when everything fits in one shard); the
    report's `out` is then the first shard. A GGUF input may itself be a split set, opened from any shard.
    mtp: keep the checkpoint's MTP / nextn blocks where the family keeps them (llama.cpp's default); False drops
    them (llama.cpp's --no-mtp), for a smaller file that cannot draft with speculative="mtp".
    Raises moelite.errors.ConversionError; on any failure no file (no shard) is left at `out`."""
    if not isinstance(mtp, bool):
        raise ConversionError(f"mtp = {mtp!r}: expected True or False")
    timer = gguf_out.Timer()
    type = quant.canonical_type(type)  # case-insensitive; ConversionError if unknown
    out = Path(out)
    source = open_source(src)
    if isinstance(source, GGUFSource):
        w, tensors, arch, n_layer, n_expert, notes = _from_gguf(source)
    else:
        if type == "keep":
            raise ConversionError(f"{src}: type 'keep' applies to GGUF input only")
        w, tensors, arch, n_layer, n_expert, notes = _from_hf(source, mtp=mtp)
    if fuse_gate_up:
        tensors = _fuse_gate_up(tensors)
    planned = quant.plan(tensors, type, n_layer, n_expert)
    _check_loadable(out, w, planned)
    if type != "keep":
        w.add_file_type(int(quant.FILE_TYPES[type]))
    elif isinstance(source, GGUFSource) and source.file_type is not None:
        w.add_file_type(source.file_type)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    return write_planned(
        out,
        w,
        planned,
        arch,
        type,
        timer,
        notes,
        n_threads=n_threads,
        progress=progress,
        split_max_size=split_max_size,
        split_max_tensors=split_max_tensors,
    )


def write_planned(
    out: Path,
    w: gguf.GGUFWriter,
    planned: list,
    arch: str,
    type: str,
    timer: gguf_out.Timer,
    notes: list[str],
    *,
    n_threads: int,
    progress: bool,
    split_max_size: int = 0,
    split_max_tensors: int = 0,
) -> ConvertReport:
    """Write the planned tensors after w's keys (gguf_out.write: atomic, split where asked) and report it."""
    for what, v in (("split_max_size", split_max_size), ("split_max_tensors", split_max_tensors)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ConversionError(f"{what} = {v!r}: expected an integer >= 0 (0 = no limit)")
    infos = [(p.name, p.byte_shape, p.type, p.nbytes) for p in planned]
    files = gguf_out.write(
        out,
        w,
        infos,
        lambda i: quant.encode(planned[i], n_threads),
        progress=progress,
        split_max_size=split_max_size,
        split_max_tensors=split_max_tensors,
    )
    return ConvertReport(
        out=files[0],
        arch=arch,
        type=type,
        n_tensors=len(planned),
        file_size=sum(f.stat().st_size for f in files),
        seconds=timer(),
        files=files,
        tensor_types={p.name: _tname(p.type) for p in planned},
        fallbacks={p.name: (_tname(p.wanted), _tname(p.type)) for p in planned if p.wanted != p.type},
        notes=notes,
    )


def describe(src: str | os.PathLike, type: str = "q8_0") -> tuple[dict[str, Any], dict[str, tuple]]:
    """What converting the Hugging Face directory `src` at `type` would write, from config.json, the tokenizer files
    and the safetensors headers only (nothing is converted): (GGUF key -> value, tensor name -> (ggml type, shape
    in ggml order, offset, nbytes)), as moelite reads a GGUF. `moelite plan` uses it on a HF directory."""
    type = quant.canonical_type(type)
    source = open_source(src)
    if isinstance(source, GGUFSource) or type == "keep":
        raise ConversionError(f"{src}: describe() takes a Hugging Face directory and an output type")
    w, tensors, _, n_layer, n_expert, _ = _from_hf(source)
    return _kv_and_table(w, quant.plan(tensors, type, n_layer, n_expert))


def _kv_and_table(w: gguf.GGUFWriter, planned: list) -> tuple[dict[str, Any], dict[str, tuple]]:
    return {k: v.value for k, v in w.kv_data[0].items()}, planned_table(planned)


def planned_table(planned: list) -> dict[str, tuple]:
    """quant.plan's tensors as moelite reads a GGUF's table: name -> (ggml type, shape in ggml order, offset,
    nbytes), laid out one after the other."""
    table, pos = {}, 0
    for p in planned:
        table[p.name] = (p.type, (p.n_per_row, *reversed(p.lazy.shape[:-1])), pos, p.nbytes)
        pos += p.nbytes
    return table


def _check_loadable(out: Path, w: gguf.GGUFWriter, planned: list) -> None:
    """The loader's own checks (runtime/validate.py) on the keys and tensor table about to be written: a file
    moelite would refuse (or crash on) is never written."""
    from moelite.errors import ModelFormatError
    from moelite.runtime.validate import load_hparams

    kv, table = _kv_and_table(w, planned)
    try:
        load_hparams(str(out), kv, table, file_size=sum(t[3] for t in table.values()))
    except ModelFormatError as e:
        raise ConversionError(f"{e} (the converted model would not load; nothing written)") from None


READABLE_QUANT = ("fp8", "mxfp4")  # DeepSeek-V3 style FP8 blocks (dequantized), gpt-oss MXFP4 (kept)


@contextlib.contextmanager
def _config_values(cfg_src: str) -> Iterator[None]:
    """config.json values missing, of the wrong type or range (a list where a count belongs): ConversionError."""
    try:
        yield
    except ConversionError:
        raise
    except (TypeError, ValueError, ArithmeticError, LookupError) as e:
        what = f"missing key {e}" if isinstance(e, KeyError) else f"{type(e).__name__}: {e}"
        raise ConversionError(f"{cfg_src}: a value missing, of the wrong type or range ({what})") from None


def _from_hf(source: HFSource, mtp: bool = True):
    cfg_src = str(source.dir / "config.json")
    cfg = text_config(source.config)  # multimodal checkpoints: the text model's config
    with _config_values(cfg_src):
        family = for_config(cfg, cfg_src)
        c = Config(cfg, cfg_src)
    qc = source.config.get("quantization_config") or cfg.get("quantization_config")
    if isinstance(qc, dict) and qc.get("quant_method") not in READABLE_QUANT:
        raise ConversionError(
            f"{cfg_src}: quantization_config.quant_method = {qc.get('quant_method')!r} is not a "
            f"format moelite reads ({', '.join(READABLE_QUANT)}); convert the unquantized checkpoint"
        )
    weights = source.tensors()
    w = gguf_out.new_writer(family.arch)
    w.add_name(source.dir.name)
    c = _with_checkpoint_mtp(family, c, weights)
    with _config_values(cfg_src):
        hp = family.hparams(c)  # checks the config as given first
        if (c_held := _without_absent_mtp(family, c, weights, mtp)) is not c:
            c, hp = c_held, family.hparams(c_held)
    for key, value in hp.items():
        if value is None:
            continue
        full = key if key.split(".")[0] in ("general", "tokenizer", "moelite") else f"{family.arch}.{key}"
        gguf_out.add_kv(w, full, value)
    n_vocab = c.int("vocab_size")
    add_vocab(w, source.dir, n_vocab, family.tokenizer_pre)
    if family.tensor_hparams:  # keys stored as tensors (hash constants): read before sanitize drops them
        for key, value in family.tensor_hparams(weights, c).items():
            gguf_out.add_kv(w, f"{family.arch}.{key}", value)
    family.sanitize(weights, c)
    tensors = family.map_names(weights, c)
    if not tensors or "token_embd.weight" not in dict(tensors):
        raise ConversionError(f"{source.dir}: no model.embed_tokens.weight found among the checkpoint tensors")
    _check_shapes(tensors, hp, c, n_vocab, str(source.dir))
    return w, tensors, family.arch, c.n_layer, c.n_expert, []


MTP_TENSOR = re.compile(r"(?:^|\.)(?:mtp\.|layers\.(\d+)\.)")  # mtp.* / model.mtp.* / model.layers.{i}.*


def _with_checkpoint_mtp(family, c: Config, weights: dict[str, Lazy]) -> Config:
    """The config with `mtp_num_hidden_layers` = the MTP blocks the checkpoint holds (`mtp.layers.{i}.*`), for a
    family whose config.json never says (Qwen3-Next; llama.cpp's converter counts them the same way)."""
    if not family.mtp_from_checkpoint or any(k in c.d for k in ("num_nextn_predict_layers", "mtp_num_hidden_layers")):
        return c
    held = [int(m.group(1)) for n in weights if (m := re.match(r"(?:model\.)?mtp\.layers\.(\d+)\.", n))]
    return Config({**c.d, "mtp_num_hidden_layers": max(held) + 1}, c.src, c.defaults) if held else c


def _without_absent_mtp(family, c: Config, weights: dict[str, Lazy], keep: bool = True) -> Config:
    """The config with num_nextn_predict_layers 0 when the MTP blocks are not written: dropped on request (keep
    False: their tensors are removed from `weights`), or promised by config.json but absent from the checkpoint (one
    written by transformers' save_pretrained, whose classes drop them: DeepSeek-V3's config says 1), so that the
    file says what it has."""
    if family.n_blocks(c) == c.n_layer:
        return c
    mtp = [n for n in weights if (m := MTP_TENSOR.search(n)) and (m.group(1) is None or int(m.group(1)) >= c.n_layer)]
    if not keep:
        for name in mtp:
            del weights[name]
    elif mtp:
        return c
    else:
        warnings.warn(
            f"{c.src}: num_nextn_predict_layers = {family.n_blocks(c) - c.n_layer}, but the checkpoint holds no MTP "
            "tensors (transformers' save_pretrained drops them): written without MTP blocks",
            UserWarning,
            stacklevel=3,
        )
    return Config({**c.d, "num_nextn_predict_layers": 0, "mtp_num_hidden_layers": 0}, c.src, c.defaults)


def _check_shapes(tensors: list[tuple[str, Lazy]], hp: dict[str, Any], c: Config, n_vocab: int, src: str) -> None:
    """A tensor whose shape contradicts config.json would load in neither llama.cpp nor moelite."""
    H, E = hp["embedding_length"], hp["expert_count"]
    I_exp = hp.get("expert_feed_forward_length", hp.get("feed_forward_length"))
    He = hp.get("moe_latent_size") or H  # latent MoE: the experts' width
    want: dict[str, tuple[int, ...]] = {
        "token_embd.weight": (n_vocab, H),
        "output.weight": (n_vocab, H),
        "output_norm.weight": (H,),
        "ffn_gate_inp.weight": (E, H),
        "ffn_gate_exps.weight": (E, I_exp, He),
        "ffn_up_exps.weight": (E, I_exp, He),
        "ffn_down_exps.weight": (E, He, I_exp),
        "attn_norm.weight": (H,),
        "ffn_latent_down.weight": (He, H),
        "ffn_latent_up.weight": (H, He),
    }
    for name, t in tensors:
        key = re.sub(r"^blk\.\d+\.", "", name)
        if key in want and tuple(t.shape) != want[key]:
            raise ConversionError(
                f"{t.src}: tensor {name} has shape {list(t.shape)} but config.json ({src}) implies "
                f"{list(want[key])} (hidden_size={H}, experts={E}, expert intermediate={I_exp}, vocab={n_vocab})"
            )


def _fuse_gate_up(tensors: list[tuple[str, Lazy]]) -> list[tuple[str, Lazy]]:
    """blk.N.ffn_gate_exps + blk.N.ffn_up_exps -> blk.N.ffn_gate_up_exps (gate rows first), in the gate's place."""
    by_name = dict(tensors)
    out = []
    for name, t in tensors:
        if name.endswith(".ffn_up_exps.weight") and name.replace("_up_", "_gate_") in by_name:
            continue
        up = name.replace("_gate_exps.", "_up_exps.")
        if name.endswith(".ffn_gate_exps.weight") and up in by_name:
            fused = name.replace("_gate_exps.", "_gate_up_exps.")
            t = concat_rows(t, by_name[up], fused)
            name = fused
        out.append((name, t))
    return out


def _from_gguf(source: GGUFSource):
    w = gguf_out.new_writer(source.arch)
    for key, value, vtype, sub in source.kv():
        if key in ("general.quantization_version",):
            continue
        gguf_out.add_kv(w, key, value, vtype, sub)
    n_layer, n_expert = gguf_counts(source)
    return w, list(source.tensors().items()), source.arch, n_layer, n_expert, ["re-written from GGUF input"]


def gguf_counts(source: GGUFSource) -> tuple[int, int]:
    """(block_count, expert_count) of a GGUF input, 0 where absent: the quantization mixes depend on them."""
    kv = {k: v for k, v, _, _ in source.kv()}

    def geti(key: str) -> int:
        v = kv.get(f"{source.arch}.{key}")
        return int(v) if v is not None else 0

    return geti("block_count"), geti("expert_count")
