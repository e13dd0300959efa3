"""Checkpoint readers: a Hugging Face directory (safetensors, sharded or not) and a GGUF file, both as a
dict of Lazy tensors. No tensor data is read until the writer asks for it.

safetensors is parsed here (8-byte header length, JSON header, raw data) rather than with the
`safetensors` numpy API because that API has no bfloat16 or float8; the header also lets us detect
truncated shards before writing anything.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
from pathlib import Path
from typing import Any

import numpy as np

from moelite.errors import ConversionError

from .lazy import OPAQUE, Lazy

_ST_DTYPES = {  # safetensors dtype -> (numpy storage dtype, itemsize)
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": np.uint16,
    "F8_E4M3": np.uint8,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}
_RAW_DTYPES = {"U8", "I8", "I64"}  # packed data (MXFP4 blocks / E8M0 scales), integer constants (Qwen4-Exp's
# 45-bit hash multipliers): never converted to float


def _fp8_e4m3_table() -> np.ndarray:
    """float32 value of each of the 256 float8 e4m3fn codes (bias 7, no inf, 0x7f/0xff = NaN)."""
    c = np.arange(256)
    sign = np.where(c & 0x80, -1.0, 1.0)
    exp, man = (c >> 3) & 0xF, c & 0x7
    val = np.where(exp == 0, man / 8.0 * 2.0**-6, (1 + man / 8.0) * 2.0 ** (exp - 7.0))
    val = np.where((exp == 15) & (man == 7), np.nan, val)
    return (sign * val).astype(np.float32)


_FP8_TABLE = _fp8_e4m3_table()


def to_f32(raw: np.ndarray, st_dtype: str) -> np.ndarray:
    if st_dtype == "BF16":
        return (raw.astype(np.uint32) << 16).view(np.float32)
    if st_dtype == "F8_E4M3":
        return _FP8_TABLE[raw]
    return raw.astype(np.float32, copy=False)


def read_json(path: Path, kind: type) -> Any:
    """A JSON file whose top level is `kind`; ConversionError naming the file otherwise (bad UTF-8, syntax,
    nesting deeper than Python's recursion limit)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as e:
        raise ConversionError(f"{path}: invalid JSON: {type(e).__name__}: {e}") from None
    if not isinstance(data, kind):
        raise ConversionError(f"{path}: top level is a JSON {type(data).__name__}, expected {kind.__name__}")
    return data


def _plain_name(fn: str) -> bool:
    return fn not in ("", ".", "..") and len(fn.encode("utf-8", "replace")) <= 255 and not any(c in fn for c in "/\\\0")


# config.json values the converter turns into counts, shapes and GGUF keys: key -> (lo, hi). A count beyond
# int32 or a layer count above the layers the checkpoint holds would allocate or loop without bound.
INT32_MAX = 2**31 - 1
_CONFIG_INTS = {
    "num_hidden_layers": (1, INT32_MAX),
    "hidden_size": (1, INT32_MAX),
    "intermediate_size": (1, INT32_MAX),
    "moe_intermediate_size": (1, INT32_MAX),
    "shared_expert_intermediate_size": (0, INT32_MAX),
    "num_attention_heads": (1, INT32_MAX),
    "num_key_value_heads": (1, INT32_MAX),
    "head_dim": (1, INT32_MAX),
    "vocab_size": (1, INT32_MAX),
    "max_position_embeddings": (1, INT32_MAX),
    "num_experts": (1, 1 << 16),
    "num_local_experts": (1, 1 << 16),
    "n_routed_experts": (1, 1 << 16),
    "num_experts_per_tok": (1, 1 << 16),
    "n_shared_experts": (0, 1 << 16),
    "n_group": (1, 1 << 16),
    "topk_group": (1, 1 << 16),
    "first_k_dense_replace": (0, INT32_MAX),
    "kv_lora_rank": (0, INT32_MAX),
    "q_lora_rank": (0, INT32_MAX),
    "qk_rope_head_dim": (0, INT32_MAX),
    "qk_nope_head_dim": (0, INT32_MAX),
    "v_head_dim": (0, INT32_MAX),
    "sliding_window": (0, INT32_MAX),
    "decoder_sparse_step": (1, INT32_MAX),
}
_CONFIG_SCALARS = {
    "num_hidden_layers",
    "hidden_size",
    "vocab_size",
    "num_attention_heads",
    "head_dim",
    "max_position_embeddings",
}
_CONFIG_POSITIVE = ("rms_norm_eps", "layer_norm_eps", "rope_theta")
# keys a config class writes as 0 by design: GLM-5.3-Flash's head_dim is its qk_rope_head_dim (0: NoPE MLA)
_ZERO_OK = {"glm5_next_text": {"head_dim"}}
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def check_config(path: Path, cfg: dict[str, Any], weight_map: dict[str, str]) -> None:
    """Types and ranges of the config.json values above (at the top level and in nested text_config-like
    objects); num_hidden_layers at most the layers the checkpoint's tensors hold."""
    for scope, values in [("", cfg), *((f"{k}.", v) for k, v in cfg.items() if isinstance(v, dict))]:
        model_type = values.get("model_type")
        if model_type is not None and not isinstance(model_type, str):
            raise ConversionError(f"{path}: key '{scope}model_type' = {str(model_type)[:40]}: expected a string")
        zero_ok = _ZERO_OK.get(model_type, ())
        for key, (lo, hi) in _CONFIG_INTS.items():
            v = values.get(key)
            # real checkpoints hold some of these per layer (Hunyuan's moe_intermediate_size): each item checked;
            # the model-wide sizes are scalars
            per_layer = key not in _CONFIG_SCALARS and isinstance(v, list) and 0 < len(v) <= 1 << 16
            items = v if per_layer else [v]
            lo = 0 if key in zero_ok else lo
            if v is not None and any(not isinstance(x, int) or isinstance(x, bool) or not lo <= x <= hi for x in items):
                raise ConversionError(
                    f"{path}: key '{scope}{key}' = {str(v)[:40]}: expected an integer in [{lo}, {hi}]"
                )
        for key in _CONFIG_POSITIVE:
            v = values.get(key)
            # rope_theta per layer: Step-3.5's release config.json
            items = v if key == "rope_theta" and isinstance(v, list) and 0 < len(v) <= 1 << 16 else [v]
            if v is not None and any(
                isinstance(x, bool) or not isinstance(x, (int, float)) or not 0 < x < math.inf for x in items
            ):
                raise ConversionError(f"{path}: key '{scope}{key}' = {str(v)[:40]}: expected a finite number > 0")
    n_layer = cfg.get("num_hidden_layers")
    held = len({m.group(1) for name in weight_map if (m := _LAYER.search(name))})
    if isinstance(n_layer, int) and held and n_layer > held:
        raise ConversionError(
            f"{path}: key 'num_hidden_layers' = {n_layer} but the checkpoint holds tensors for {held} layers"
        )


_SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token")


def check_tokenizer_config(path: Path) -> None:
    """The tokenizer_config.json fields the converter copies: chat_template a string or a list of {name,
    template} strings; special tokens strings or {content: string}; added_tokens_decoder {id: {content}}."""
    if not path.is_file():
        return
    cfg = read_json(path, dict)

    def bad(key: str, expected: str) -> ConversionError:
        return ConversionError(f"{path}: key '{key}' = {str(cfg[key])[:60]}: expected {expected}")

    ct = cfg.get("chat_template")
    if (
        ct is not None
        and not isinstance(ct, str)
        and not (
            isinstance(ct, list)
            and all(
                isinstance(x, dict) and isinstance(x.get("name"), str) and isinstance(x.get("template"), str)
                for x in ct
            )
        )
    ):
        raise bad("chat_template", 'a string or a list of {"name": string, "template": string}')
    for key in _SPECIAL_TOKEN_KEYS:
        v = cfg.get(key)
        if v is not None and not isinstance(v, str) and not (isinstance(v, dict) and isinstance(v.get("content"), str)):
            raise bad(key, 'a string or {"content": string}')
    added = cfg.get("added_tokens_decoder")
    if added is not None and not (
        isinstance(added, dict)
        and all(isinstance(v, dict) and isinstance(v.get("content"), str) and k.isdigit() for k, v in added.items())
    ):
        raise bad("added_tokens_decoder", '{"<id>": {"content": string, ...}}')


def check_tokenizer_json(path: Path) -> None:
    """tokenizer.json must load in the `tokenizers` library (the runtime loads the copy the converter embeds)."""
    if not path.is_file():
        return
    from tokenizers import Tokenizer

    read_json(path, dict)  # the nesting / type errors, named
    try:
        Tokenizer.from_str(path.read_text(encoding="utf-8"))
    except Exception as e:  # noqa: BLE001 - the library raises its own Exception type
        raise ConversionError(f"{path}: not a valid tokenizer.json: {e}") from None


class SafetensorsFile:
    """One .safetensors shard: header parsed and checked exactly against the file (see _check_header)."""

    def __init__(self, path: Path):
        self.path = path
        try:
            size = path.stat().st_size
            with open(path, "rb") as f:
                head = f.read(8)
                if len(head) < 8:
                    raise ConversionError(f"{path}: truncated safetensors file ({size} bytes, no header)")
                (n,) = struct.unpack("<Q", head)
                if n > size - 8 or n > 100 << 20:
                    raise ConversionError(
                        f"{path}: truncated or corrupt safetensors file: header says "
                        f"{n} bytes of JSON, the file has {size} bytes"
                    )
                header = json.loads(f.read(n))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
            raise ConversionError(f"{path}: cannot read safetensors header: {type(e).__name__}: {e}") from None
        if not isinstance(header, dict):
            raise ConversionError(f"{path}: safetensors header is a JSON {type(header).__name__}, expected an object")
        header.pop("__metadata__", None)
        self.data_start = 8 + n
        self.tensors: dict[str, dict[str, Any]] = header
        _check_header(path, header, size - self.data_start)

    def lazy(self, name: str) -> Lazy:
        info = self.tensors[name]
        dt, shape = info["dtype"], tuple(info["shape"])
        return self._lazy(name, dt, shape, self.data_start + info["data_offsets"][0])

    def _lazy(self, name: str, dt: str, shape: tuple[int, ...], offset: int) -> Lazy:
        np_dt = np.dtype(_ST_DTYPES[dt])
        count = math.prod(shape)
        path = self.path

        def load() -> np.ndarray:
            try:
                raw = np.fromfile(path, dtype=np_dt, count=count, offset=offset)
            except OSError as e:
                raise ConversionError(f"{path}: cannot read tensor {name}: {e}") from e
            if raw.size != count:
                raise ConversionError(f"{path}: truncated while reading tensor {name}")
            raw = raw.reshape(shape)
            return raw if dt in _RAW_DTYPES else _finite(to_f32(raw, dt), path, name)

        parter = None
        if len(shape) >= 2:
            stride = math.prod(shape[1:]) * np_dt.itemsize
            parter = lambda e: self._lazy(f"{name}[{e}]", dt, shape[1:], offset + e * stride)  # noqa: E731
        return Lazy(
            shape,
            load,
            f"{path.name}:{name}",
            parter,
            raw_type=OPAQUE if dt in _RAW_DTYPES else None,
            f32_exact=dt in ("F32", "F64"),
        )


def _check_header(path: Path, header: dict[str, Any], data_size: int) -> None:
    """Every entry {dtype, shape, data_offsets} well typed; dtype x shape == its byte range; the ranges, sorted,
    tile the data section exactly (from 0, no gap, no overlap, ending at the file's end), as the safetensors
    format requires: a header length one byte off shifts every range and is refused here."""
    spans = []
    for name, info in header.items():
        if not isinstance(info, dict):
            raise ConversionError(f"{path}: tensor {name}: header entry is a {type(info).__name__}, expected an object")
        dt, shape, offs = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if not isinstance(dt, str) or dt not in _ST_DTYPES:
            raise ConversionError(f"{path}: tensor {name}: unsupported dtype {dt!r}")
        if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
            raise ConversionError(f"{path}: tensor {name}: shape {shape!r}, expected a list of integers >= 0")
        if not (isinstance(offs, list) and len(offs) == 2 and all(_is_count(o) for o in offs) and offs[0] <= offs[1]):
            raise ConversionError(
                f"{path}: tensor {name}: data_offsets {offs!r}, expected [begin, end] with 0 <= begin <= end"
            )
        begin, end = offs
        expect = math.prod(shape) * np.dtype(_ST_DTYPES[dt]).itemsize
        if end - begin != expect:
            raise ConversionError(
                f"{path}: tensor {name}: {end - begin} bytes for shape {shape} {dt}, expected {expect}"
            )
        if end > data_size:
            raise ConversionError(
                f"{path}: truncated safetensors file: tensor {name} ends at byte "
                f"{end} of the data section, which has {data_size} bytes"
            )
        spans.append((begin, end, name))
    pos, prev = 0, "the header"
    for begin, end, name in sorted(spans):
        if begin != pos:
            what = "overlaps" if begin < pos else "leaves a gap after"
            raise ConversionError(
                f"{path}: tensor {name} (data_offsets [{begin}, {end}]) {what} {prev}: corrupt safetensors header"
            )
        pos, prev = end, f"tensor {name}"
    if pos != data_size:
        raise ConversionError(
            f"{path}: the tensors cover {pos} bytes but the data section has {data_size} "
            "(wrong header length or trailing bytes): corrupt safetensors file"
        )


def _is_count(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2**62


MAX_WEIGHT = 1e10  # |w| above this in a checkpoint is corruption (real weights stay below ~1e4): logits overflow


def _finite(a: np.ndarray, path: Path, name: str) -> np.ndarray:
    """A weight with NaN, inf or absurd magnitudes converts into a model whose logits are not finite."""
    flat = a.reshape(-1)
    for start in range(0, flat.size, 1 << 20):  # in chunks: no second copy of a large tensor
        bad = ~(np.abs(flat[start : start + (1 << 20)]) <= MAX_WEIGHT)
        if bad.any():
            i = np.unravel_index(start + int(np.argmax(bad)), a.shape)
            raise ConversionError(
                f"{path}: tensor {name} holds {a[i]} at {list(map(int, i))} (expected finite "
                f"values of magnitude <= {MAX_WEIGHT:g}): corrupt checkpoint"
            )
    return a


class HFSource:
    """A Hugging Face checkpoint directory."""

    def __init__(self, src: Path):
        self.dir = src
        cfg_path = src / "config.json"
        if not cfg_path.is_file():
            raise ConversionError(f"{src}: no config.json (expected a Hugging Face model directory or a .gguf file)")
        self.config: dict[str, Any] = read_json(cfg_path, dict)
        self.shards = self._open_shards()
        check_config(cfg_path, self.config, self.weight_map)
        check_tokenizer_config(src / "tokenizer_config.json")
        check_tokenizer_json(src / "tokenizer.json")

    def _open_shards(self) -> dict[str, SafetensorsFile]:
        index = self.dir / "model.safetensors.index.json"
        if index.is_file():
            weight_map: dict[str, str] = read_json(index, dict).get("weight_map")
            if not isinstance(weight_map, dict) or not all(
                isinstance(v, str) and _plain_name(v) for v in weight_map.values()
            ):
                raise ConversionError(
                    f"{index}: key 'weight_map' must map tensor names to shard file names in this directory"
                )
            files = sorted(set(weight_map.values()))
            for fn in files:
                if not (self.dir / fn).is_file():
                    first = next(k for k, v in weight_map.items() if v == fn)
                    raise ConversionError(
                        f"{self.dir / fn}: missing shard (listed in {index.name} for tensor {first} and others)"
                    )
        else:
            files = sorted(p.name for p in self.dir.glob("*.safetensors"))
            if not files:
                raise ConversionError(f"{self.dir}: no *.safetensors files and no model.safetensors.index.json")
            weight_map = {}
        shards = {fn: SafetensorsFile(self.dir / fn) for fn in files}
        for fn, sf in shards.items():
            for name in sf.tensors:
                weight_map.setdefault(name, fn)
        self.weight_map = {k: v for k, v in weight_map.items() if k in shards[v].tensors}
        missing = sorted(set(weight_map) - set(self.weight_map))
        if missing:
            raise ConversionError(
                f"{self.dir / weight_map[missing[0]]}: tensor {missing[0]} is listed in the index but not in the shard"
            )
        return shards

    def tensors(self) -> dict[str, Lazy]:
        """HF name -> Lazy float32 tensor. FP8 weights with `*.weight_scale_inv` come back dequantized;
        uint8 tensors (MXFP4 `*_blocks` / `*_scales`) come back raw."""
        out = {name: self.shards[fn].lazy(name) for name, fn in sorted(self.weight_map.items())}
        block = (self.config.get("quantization_config") or {}).get("weight_block_size", [128, 128])
        for name in [n for n in out if n.endswith(".weight_scale_inv")]:
            wname = name[: -len("_scale_inv")]
            if wname not in out:
                raise ConversionError(f"{self.dir}: {name} has no matching {wname}")
            out[wname] = _dequant_fp8_blocks(out[wname], out.pop(name), tuple(block))
        return out


def _dequant_fp8_blocks(w: Lazy, s: Lazy, block: tuple[int, int]) -> Lazy:
    """DeepSeek-V3 FP8: w [out, in] e4m3 (already mapped to float) * scale_inv [ceil(out/b0), ceil(in/b1)]."""
    rows_, cols = w.shape[-2:]
    want = (math.ceil(rows_ / block[0]), math.ceil(cols / block[1]))
    if tuple(s.shape[-2:]) != want:
        raise ConversionError(
            f"{s.src}: FP8 scale shape {list(s.shape)}, expected {list(want)} for weight "
            f"{list(w.shape)} with {block[0]}x{block[1]} blocks"
        )

    def load() -> np.ndarray:
        sc = s.load()
        sc = np.repeat(np.repeat(sc, block[0], axis=-2), block[1], axis=-1)[..., :rows_, :cols]
        return w.load() * sc

    return Lazy(w.shape, load, f"{w.src}(fp8*scale_inv)", None, None, False)


class GGUFSource:
    """An existing GGUF file, or a split set opened from any of its shards (re-quantize, re-align, re-split).
    Tensors keep their ggml type (raw_type) and are dequantized only when the output type differs."""

    def __init__(self, path: Path):
        import gguf

        from moelite import _core

        try:  # the C++ reader finds a split set's shards and checks that they belong together
            meta = _core.read_gguf(str(path))
        except (_core.FormatError, _core.IOError) as e:
            raise ConversionError(f"{path}: not a readable GGUF file: {e}") from None
        self.files = [Path(p) for p, _ in meta["files"]]
        self.size = int(meta["file_size"])
        self.readers = []
        for f in self.files:
            try:
                self.readers.append(gguf.GGUFReader(str(f), "r"))
            except Exception as e:  # noqa: BLE001 - the reader raises ValueError/struct.error/OSError
                raise ConversionError(f"{f}: not a readable GGUF file: {e}") from e
        self.reader = self.readers[0]  # the metadata
        self.path = self.files[0]
        arch = self.reader.get_field("general.architecture")
        if arch is None:
            raise ConversionError(f"{self.path}: GGUF has no general.architecture key")
        self.arch = str(arch.contents())
        ft = self.reader.get_field("general.file_type")
        self.file_type: int | None = None if ft is None else int(ft.contents())

    def kv(self) -> list[tuple[str, Any, Any, Any]]:
        """(key, value, GGUFValueType, sub type) for every key except those the writer sets itself."""
        out = []
        for f in self.reader.fields.values():
            if f.name.startswith(("GGUF.", "split.")) or f.name in (
                "general.alignment",
                "general.architecture",
                "general.file_type",
            ):
                continue
            vtype = f.types[0]
            sub = f.types[-1] if len(f.types) > 1 else None
            out.append((f.name, f.contents(), vtype, sub))
        return out

    def tensors(self) -> dict[str, Lazy]:
        """GGUF name -> Lazy: F32 tensors as float32, every other type as its packed bytes (raw_type)."""
        out: dict[str, Lazy] = {}
        for t in (t for r in self.readers for t in r.tensors):
            shape = tuple(int(d) for d in reversed(t.shape.tolist()))  # ggml ne -> numpy order
            ttype = int(t.tensor_type)
            if ttype == 0:
                out[t.name] = Lazy(
                    shape, lambda d=t.data, s=shape: np.array(d, np.float32).reshape(s), f"{self.path.name}:{t.name}"
                )
            else:
                out[t.name] = Lazy(
                    shape,
                    lambda d=t.data: np.array(d).view(np.uint8),
                    f"{self.path.name}:{t.name}",
                    raw_type=ttype,
                    f32_exact=False,
                )
        return out


def open_source(src: str | os.PathLike) -> HFSource | GGUFSource:
    p = Path(src)
    if not p.exists():
        raise ConversionError(f"{p}: no such file or directory")
    if p.is_dir():
        return HFSource(p)
    with open(p, "rb") as f:
        magic = f.read(4)
    if magic == b"GGUF":
        return GGUFSource(p)
    raise ConversionError(f"{p}: not a Hugging Face model directory and not a GGUF file (magic {magic!r})")
