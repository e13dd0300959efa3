"""Which ggml CPU backend runs moelite: a portable build's variant picked for this CPU, or the built-in one.

A portable build (CMake option MOELITE_PORTABLE, the wheels) ships ggml's CPU backend once per SIMD level as
moelite/ggml/libggml-cpu-<variant>.so (x64 .. skylakex .. sapphirerapids; armv8.0_1 .. armv9.2_2), and _core
leaves the CPU backend's symbols undefined. `preload()` asks every variant's ggml_backend_score() (ggml's
own CPUID / HWCAP check, built without the variant's flags: 0 when this CPU lacks a feature the variant
needs, else higher for more features) and loads the best one RTLD_GLOBAL, so that the dynamic linker binds
_core's undefined symbols to it when _core is imported. MOELITE_CPU_VARIANT=<name> forces a variant.
A native build (`pip install .`, tools/dev_build.sh) has its one CPU backend inside _core: nothing to pick.
See docs/ARM64.md.
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path
from typing import Any

from .errors import MoeliteError, UsageError

GGML_DIR = Path(__file__).parent / "ggml"  # no resolve(): dev trees are symlink farms
PREFIX, SUFFIX = "libggml-cpu-", ".so"
_chosen: dict[str, Any] = {}  # variant, library, scores: what preload() picked


class _Feature(ctypes.Structure):  # struct ggml_backend_feature (ggml-backend.h)
    _fields_ = [("name", ctypes.c_char_p), ("value", ctypes.c_char_p)]


def variants() -> dict[str, Path]:
    """The CPU variants a portable build ships, by name; empty for a native build."""
    if not GGML_DIR.is_dir():
        return {}
    return {p.name[len(PREFIX) : -len(SUFFIX)]: p for p in sorted(GGML_DIR.glob(PREFIX + "*" + SUFFIX))}


def _score(path: Path) -> int:
    """ggml_backend_score() of one variant: 0 where this CPU cannot run it."""
    lib = ctypes.CDLL(str(path), mode=os.RTLD_LOCAL)
    try:
        fn = lib.ggml_backend_score
        fn.restype = ctypes.c_int
        return int(fn())
    finally:
        import _ctypes

        _ctypes.dlclose(lib._handle)


def preload() -> None:
    """Load the best CPU variant of a portable build, before _core; a no-op for a native build or a 2nd call."""
    found = variants()
    if not found or _chosen:
        return
    forced = os.environ.get("MOELITE_CPU_VARIANT")
    if forced and forced not in found:
        raise UsageError(f"MOELITE_CPU_VARIANT={forced!r}: this build has the CPU variants {', '.join(found)}")
    scores = {name: _score(path) for name, path in found.items()}
    best = forced or max(scores, key=lambda name: scores[name])
    if scores[best] <= 0 and forced:  # it would die of SIGILL
        raise UsageError(
            f"MOELITE_CPU_VARIANT={forced!r}: this CPU lacks features that variant needs; "
            f"ggml's scores of this build's variants (0: cannot run): {scores}"
        )
    if scores[best] <= 0:
        raise MoeliteError(
            f"{GGML_DIR}: this CPU lacks the features of every CPU variant built; ggml's scores: {scores}"
        )
    ctypes.CDLL(str(found[best]), mode=os.RTLD_GLOBAL)
    _chosen.update(variant=best, library=str(found[best]), scores=scores)


def _features(lib: ctypes.CDLL) -> dict[str, str]:
    """The CPU backend's feature list (ggml_backend_get_features of ggml_backend_cpu_reg)."""
    lib.ggml_backend_cpu_reg.restype = ctypes.c_void_p
    get = lib.ggml_backend_reg_get_proc_address
    get.restype, get.argtypes = ctypes.c_void_p, [ctypes.c_void_p, ctypes.c_char_p]
    reg = lib.ggml_backend_cpu_reg()
    addr = get(reg, b"ggml_backend_get_features")
    feats = ctypes.CFUNCTYPE(ctypes.POINTER(_Feature), ctypes.c_void_p)(addr)(reg)
    out: dict[str, str] = {}
    for f in feats:  # the array ends with a {NULL, NULL} entry
        if f.name is None:
            break
        out[f.name.decode()] = f.value.decode()
    return out


def cpu_backend() -> dict[str, Any]:
    """{"variant": the portable build's variant name or "built-in", "features": ggml's CPU feature list
    (e.g. AVX2, AVX512, NEON, DOTPROD, MATMUL_INT8, SVE), "library": the file, "scores": ggml's scores}."""
    preload()
    from . import _core

    path = _chosen.get("library", _core.__file__)
    return {
        "variant": _chosen.get("variant", "built-in"),
        "library": path,
        "features": _features(ctypes.CDLL(path)),
        "scores": _chosen.get("scores"),
    }
