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


def parse_edited(family: str, edits: dict) -> dict:
    """parse_hparams on `family`'s fixture GGUF with keys edited as the loader reads them ({full key: value}, None
    removes the key): where a test checks that a bad key is refused by name."""
    from moelite import _core
    from moelite.runtime.hparams import parse_hparams

    _, path = fixture_gguf(family)
    r = _core.read_gguf(str(path))
    kv, tensors = dict(r["kv"]), {t[0]: (t[1], list(t[2])) for t in r["tensors"]}
    for k, v in edits.items():
        if v is None:
            kv.pop(k, None)
        else:
            kv[k] = v
    return parse_hparams(str(path), kv, tensors)
