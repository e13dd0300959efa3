"""Converted GGUF fixtures shared by the runtime tests: HF tiny model (tests/hf_fixtures.py) -> moelite
convert -> GGUF, cached per (family, type, seed, overrides) under tests/.fixtures/gguf/."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from hf_fixtures import make_hf_model

CACHE = Path(__file__).resolve().parent / ".fixtures" / "gguf"

RUNTIME_FAMILIES = (
    "qwen3_moe",
    "qwen2_moe",
    "olmoe",
    "mixtral",
    "deepseek_v2",
    "deepseek_v3",
    "gpt_oss",
    "granitemoe",
    "granitemoeshared",
    "phimoe",
    # wave 2 (attention-only)
    "glm4_moe",
    "glm4_moe_lite",
    "dots1",
    "minimax_m2",
    "ernie4_5_moe",
    "hunyuan_v1_moe",
    "llama4_text",
    "gemma4_text",
    # wave 2 (hybrid recurrent)
    "lfm2_moe",
    "qwen3_5_moe_text",
    "qwen3_next",
    "granitemoehybrid",
    "nemotron_h",
    # wave 3 (attention-only)
    "exaone_moe",
    "hy_v3",
    "mistral4",
    "afmoe",
    "cohere2_moe",
    "laguna",
    "mimo_v2_flash",
    "step3p5",
    # wave 3 (DSA: MLA + the lightning indexer; budget 16 in the fixtures, tests/test_dsa_families.py)
    "deepseek_v32",
    "glm_moe_dsa",
)


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
