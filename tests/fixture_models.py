"""Converted GGUF fixtures shared by the runtime tests: HF tiny model (tests/hf_fixtures.py) -> moelite
convert -> GGUF, cached per (family, type, seed, overrides) under tests/.fixtures/gguf/."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from hf_fixtures import DSA_FAMILIES, FAMILIES, HYBRID_FAMILIES, WAVE2_FAMILIES, WAVE3_FAMILIES, make_hf_model

CACHE = Path(__file__).resolve().parent / ".fixtures" / "gguf"

# every family the runtime runs, as hf_fixtures groups them (KDA families: tests/test_kda_families.py)
RUNTIME_FAMILIES = FAMILIES + WAVE2_FAMILIES + HYBRID_FAMILIES + WAVE3_FAMILIES + DSA_FAMILIES


def fixture_gguf(family: str, type: str = "f32", seed: int = 0, **overrides) -> tuple[Path, Path]:
    """-> (hf_dir, gguf_path)."""
    from moelite.converters import FORMAT_VERSION, convert

    hf = make_hf_model(family, seed=seed, **overrides)
    # the HF dir name hashes its full config; FORMAT_VERSION changes whenever the converter's bytes change
    key = hashlib.sha1(json.dumps([Path(hf).name, type, FORMAT_VERSION], default=str).encode()).hexdigest()[:10]
    out = CACHE / f"{family}-{type}-{key}.gguf"
    if not out.exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        convert(hf, out, type=type, progress=False)
    return Path(hf), out
