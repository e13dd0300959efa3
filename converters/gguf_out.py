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
from pathlib import Path
from typing import Any, Callable

import gguf
import numpy as np

from moelite.errors import ConversionError

ALIGNMENT = 4096  # every tensor starts on a page: expert reads can use O_DIRECT


def new_writer(arch: str) -> gguf.GGUFWriter:
    w = gguf.GGUFWriter(path=None, arch=arch)
    w.add_custom_alignment(ALIGNMENT)
    return w


def add_kv(w: gguf.GGUFWriter, key: str, value: Any, vtype: Any = None, sub_type: Any = None) -> None:
    """Typed KV: bool -> BOOL, int -> UINT32, float -> FLOAT32, str -> STRING, list -> ARRAY."""
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


def write(out: Path, w: gguf.GGUFWriter, tensors: list[tuple[str, tuple[int, ...], int, int]],
          produce: Callable[[int], np.ndarray], *, progress: bool = True) -> int:
    """tensors: (name, byte_shape, ggml_type, nbytes) in file order; produce(i) -> uint8 array of
    tensor i. Returns the output file size."""
    out = Path(out)
    parent = out.parent if str(out.parent) else Path(".")
    if out.is_dir():
        raise ConversionError(f"{out}: output path is a directory")
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".part", dir=parent)
        os.close(fd)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp_name, 0o666 & ~umask)
    except OSError as e:
        raise ConversionError(f"{out}: cannot write the output file: {e.strerror or e}") from e
    tmp = Path(tmp_name)
    bar = None
    try:
        for name, byte_shape, ggml_type, nbytes in tensors:
            w.add_tensor_info(name, byte_shape, np.dtype(np.uint8), nbytes, raw_dtype=gguf.GGMLQuantizationType(ggml_type))
        w.open_output_file(tmp)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        total = sum(t[3] for t in tensors)
        bar = _progress(total, progress, out.name)
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
        os.replace(tmp, out)
        _fsync_dir(parent)
        return out.stat().st_size
    except BaseException as e:
        try:
            if w.fout:
                for f in w.fout:
                    f.close()
        except OSError:
            pass
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError):
            short = e.errno is None and "requested and" in str(e)  # numpy tofile's short write
            full = short or e.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)
            what = "disk full (or file size limit reached)" if full else "write failed"
            raise ConversionError(f"{out}: {what} while writing the output file: {e.strerror or e}") from e
        raise
    finally:
        if bar is not None:
            bar.close()


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
