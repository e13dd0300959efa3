"""Streaming GGUF output with gguf-py's GGUFWriter: all tensor infos first, then header / KV / tensor
info, then tensor data one tensor at a time (each materialised, written, dropped).

Safety: the file is written under a temp name in the destination directory, fsync'd and renamed; any
error or Ctrl-C removes the temp file, so OUT is either complete or absent (an existing OUT is left
untouched on failure).
"""

from __future__ import annotations

import errno
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from moelite.errors import ConversionError

ALIGNMENT = 4096  # every tensor starts on a page: expert reads can use O_DIRECT


def new_writer(arch: str) -> gguf.GGUFWriter:
    w = gguf.GGUFWriter(path=None, arch=arch)
    w.add_custom_alignment(ALIGNMENT)
    return w


def add_kv(w: gguf.GGUFWriter, key: str, value: Any, vtype: Any = None, sub_type: Any = None) -> None:
    """Typed KV: bool -> BOOL, int -> UINT32, float -> FLOAT32, str -> STRING, list -> ARRAY, a uint64 numpy array
    -> ARRAY[UINT64]."""
    V = gguf.GGUFValueType
    if vtype is None:
        if isinstance(value, bool):
            vtype = V.BOOL
        elif isinstance(value, (int, np.integer)):
            vtype, value = V.UINT32, int(value)
            if value < 0:
                vtype = V.INT32
        elif isinstance(value, (float, np.floating)):
            vtype, value = V.FLOAT32, float(value)
        elif isinstance(value, str):
            vtype = V.STRING
        elif isinstance(value, np.ndarray) and value.dtype == np.uint64:  # exact 64-bit constants (PLE hashes)
            vtype, sub_type, value = V.ARRAY, V.UINT64, [int(v) for v in value]
        elif isinstance(value, (list, tuple)):
            vtype = V.ARRAY
            sub_type = V.BOOL if value and all(isinstance(v, bool) for v in value) else None
        else:
            raise TypeError(f"GGUF key {key}: unsupported value {value!r}")
    if vtype == V.ARRAY and sub_type is None and value:
        sub_type = V.get_type(value[0])
    w.add_key_value(key, value, vtype, sub_type)


def _progress(total: int, enabled: bool, label: str):
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        return None
    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=label, dynamic_ncols=True)


def split_names(out: Path, n: int) -> list[Path]:
    """llama.cpp's shard names: OUT = dir/NAME.gguf -> dir/NAME-00001-of-0000n.gguf ... (one file: OUT itself)."""
    return [out] if n == 1 else [out.with_name(f"{out.stem}-{i + 1:05d}-of-{n:05d}.gguf") for i in range(n)]


def plan_split(
    tensors: list[tuple[str, tuple[int, ...], int, int]], max_size: int = 0, max_tensors: int = 0
) -> list[int]:
    """How many tensors each shard takes, in file order, as llama.cpp's splitter fills them: a new shard starts
    when the current one holds max_tensors, or when the next tensor would take it past max_size bytes of tensor
    data (a tensor larger than max_size gets a shard of its own); 0 = no limit."""
    counts, size = [0], 0
    for _, _, _, nbytes in tensors:
        if counts[-1] and ((max_tensors and counts[-1] >= max_tensors) or (max_size and size + nbytes > max_size)):
            counts.append(0)
            size = 0
        counts[-1] += 1
        size += nbytes
    return counts


def _shard_writer(w: gguf.GGUFWriter, no: int, count: int, n_tensors: int) -> gguf.GGUFWriter:
    """Shard `no` of a split set: the first is w itself (all the keys), the others hold only the split keys; every
    shard also says general.alignment, so each is page-aligned on its own (llama.cpp reads it per file)."""
    if no == 0:
        sw = w
    else:
        sw = gguf.GGUFWriter(path=None, arch=w.arch)
        sw.kv_data[0].clear()  # gguf-split's later shards: no model keys
        sw.add_custom_alignment(ALIGNMENT)
    V = gguf.GGUFValueType
    sw.add_key_value(gguf.Keys.Split.LLM_KV_SPLIT_NO, no, V.UINT16)
    sw.add_key_value(gguf.Keys.Split.LLM_KV_SPLIT_COUNT, count, V.UINT16)
    sw.add_key_value(gguf.Keys.Split.LLM_KV_SPLIT_TENSORS_COUNT, n_tensors, V.INT32)
    return sw


def write(
    out: Path,
    w: gguf.GGUFWriter,
    tensors: list[tuple[str, tuple[int, ...], int, int]],
    produce: Callable[[int], np.ndarray],
    *,
    progress: bool = True,
    split_max_size: int = 0,
    split_max_tensors: int = 0,
) -> list[Path]:
    """tensors: (name, byte_shape, ggml_type, nbytes) in file order; produce(i) -> uint8 array of tensor i.
    With a split limit that the tensors exceed, a split set OUT-00001-of-0000N.gguf ... (plan_split, llama.cpp's
    names and split.* keys) instead of OUT. Atomic for the whole set: every file is written under a temp name and
    fsync'd, then all are renamed; on any failure (or Ctrl-C) none is left. Returns the files written."""
    out = Path(out)
    parent = out.parent if str(out.parent) else Path(".")
    if out.is_dir():
        raise ConversionError(f"{out}: output path is a directory")
    counts = plan_split(tensors, split_max_size, split_max_tensors)
    finals = split_names(out, len(counts))
    if len(counts) > 65535:
        raise ConversionError(f"{out}: {len(counts)} shards: a split set holds at most 65535 (raise --split-max-size)")
    tmps: list[Path] = []
    renamed: list[Path] = []
    bar = None
    try:
        umask = os.umask(0)
        os.umask(umask)
        for final in finals:
            try:
                fd, tmp_name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".part", dir=parent)
                os.close(fd)
                os.chmod(tmp_name, 0o666 & ~umask)
            except OSError as e:
                raise ConversionError(f"{final}: cannot write the output file: {e.strerror or e}") from e
            tmps.append(Path(tmp_name))
        bar = _progress(sum(t[3] for t in tensors), progress, out.name)
        first = 0
        for no, (tmp, n) in enumerate(zip(tmps, counts)):
            sw = _shard_writer(w, no, len(counts), len(tensors)) if len(counts) > 1 else w
            _write_file(tmp, sw, tensors[first : first + n], lambda i, f=first: produce(f + i), bar)
            first += n
        for tmp, final in zip(tmps, finals):
            os.replace(tmp, final)
            renamed.append(final)
        _fsync_dir(parent)
        return finals
    except BaseException as e:
        for p in tmps + renamed:  # a set is whole or absent: no shard of a failed write stays
            p.unlink(missing_ok=True)
        if isinstance(e, OSError):
            short = e.errno is None and "requested and" in str(e)  # numpy tofile's short write
            full = short or e.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)
            what = "disk full (or file size limit reached)" if full else "write failed"
            raise ConversionError(f"{out}: {what} while writing the output file: {e.strerror or e}") from e
        raise
    finally:
        if bar is not None:
            bar.close()


def rewrite_stock(
    src: str | os.PathLike, out: str | os.PathLike, *, split_max_tensors: int = 0, kv: dict[str, Any] | None = None
) -> list[Path]:
    """src re-written by gguf-py's GGUFWriter the way llama.cpp's converter writes the GGUFs people download: its
    default 32-byte alignment (most tensors then start off a page, so moelite reads their experts buffered), and with
    split_max_tensors a split set (the keys in the first shard, only the split keys in the others). `kv` replaces or
    adds keys (add_kv's types; e.g. another chat template). For tests, benchmarks and the fuzzer; not atomic (moelite's
    own files come from write()). Returns the files written."""
    r = gguf.GGUFReader(str(src))
    out = Path(out)
    w = gguf.GGUFWriter(out, str(r.get_field("general.architecture").contents()), split_max_tensors=split_max_tensors)
    kv = kv or {}
    for f in r.fields.values():
        skip = f.name.startswith("GGUF.") or f.name in ("general.architecture", "general.alignment") or f.name in kv
        if not skip:
            w.add_key_value(f.name, f.contents(), f.types[0], f.types[-1] if len(f.types) > 1 else None)
    for key, value in kv.items():
        add_kv(w, key, value)
    for t in r.tensors:
        w.add_tensor(t.name, np.asarray(t.data), raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return split_names(out, len(w.tensors))


def _write_file(
    path: Path,
    w: gguf.GGUFWriter,
    tensors: list[tuple[str, tuple[int, ...], int, int]],
    produce: Callable[[int], np.ndarray],
    bar: Any,
) -> None:
    """One GGUF file: w's keys, these tensors' infos, then each tensor's bytes; flushed and fsync'd."""
    try:
        for name, byte_shape, ggml_type, nbytes in tensors:
            w.add_tensor_info(
                name, byte_shape, np.dtype(np.uint8), nbytes, raw_dtype=gguf.GGMLQuantizationType(ggml_type)
            )
        w.open_output_file(path)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for i, (name, _, _, nbytes) in enumerate(tensors):
            data = produce(i)
            if data.nbytes != nbytes:
                raise AssertionError(f"{name}: produced {data.nbytes} bytes, planned {nbytes}")
            w.write_tensor_data(data)
            del data
            if bar is not None:
                bar.update(nbytes)
        assert w.fout is not None
        f = w.fout[0]
        f.flush()
        os.fsync(f.fileno())
        w.close()
    finally:
        for f in w.fout or []:
            try:
                f.close()
            except OSError:
                pass


def _fsync_dir(d: Path) -> None:
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class Timer:
    def __init__(self) -> None:
        self.t0 = time.perf_counter()

    def __call__(self) -> float:
        return time.perf_counter() - self.t0
