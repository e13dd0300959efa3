"""Where a model comes from and where moelite keeps its files: the cache directory ($XDG_CACHE_HOME/moelite, else
~/.cache/moelite), Hugging Face directories converted into it once, and the MODEL argument resolved to a GGUF path.
`moelite.load` and the command line share these (the runtime imports nothing from apps/)."""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

from ..errors import UsageError

DEFAULT_CONVERT_TYPE = "q8_0"


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "moelite"


def is_hf_dir(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").is_file()


def converted_path(src: Path, type: str) -> Path:
    """Cache file of a converted HF directory, keyed by its absolute path and newest mtime."""
    src = src.resolve()
    mtime = max([src.stat().st_mtime_ns] + [f.stat().st_mtime_ns for f in src.iterdir() if f.is_file()])
    key = hashlib.sha1(f"{src}\0{mtime}\0{type}".encode()).hexdigest()[:12]
    return cache_dir() / "converted" / f"{src.name}-{type}-{key}.gguf"


def resolve_model(arg: str | None, convert_type: str = DEFAULT_CONVERT_TYPE, progress: bool = True) -> str | None:
    """MODEL argument -> a GGUF path (None = the embedded demo). A HF directory is converted once."""
    if arg is None:
        return None
    path = Path(arg).expanduser()
    if is_hf_dir(path):
        out = converted_path(path, convert_type)
        if not out.exists():
            from ..converters import convert

            out.parent.mkdir(parents=True, exist_ok=True)
            if progress:
                print(f"moelite: converting {path} to {convert_type} (once) into {out}", file=sys.stderr)
            report = convert(path, out, type=convert_type, progress=progress)  # writes a temp name, then renames
            if progress:
                print(f"moelite: wrote {report.summary()}", file=sys.stderr)
        return str(out)
    if path.is_dir():
        raise UsageError(f"{arg}: a directory without config.json (expected a .gguf file or a Hugging Face model dir)")
    if not path.exists():
        raise UsageError(f"{arg}: no such file")
    return str(path)
