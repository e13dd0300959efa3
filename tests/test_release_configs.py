"""Hugging Face directories as they ship (issue 28): the converter reads config.json itself, and a key that the
transformers config class defines with a default may be absent from a real checkpoint.

- every family's fixture config.json is what save_pretrained wrote, with nothing added beyond the class's own
  keys and the family's RELEASE_KEYS (the release-only keys the real config.json carries);
- "minimal" config.json: the same directory with every key whose value equals the class default left out
  converts to the same GGUF metadata and the same tensor bytes: each family applies the class defaults
  (converters/families/*.py DEFAULTS) instead of requiring the keys;
- each family's DEFAULTS are the transformers class's defaults;
- a Qwen3.5-MoE multimodal checkpoint (config under `text_config`, weights `model.language_model.*` +
  `model.visual.*`) written by save_pretrained with nothing added converts and matches transformers.
"""

from __future__ import annotations

import importlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from hf_fixtures import (
    FAMILIES,
    HYBRID_FAMILIES,
    RELEASE_KEYS,
    VOCAB_SIZE,
    WAVE2_FAMILIES,
    WAVE3_FAMILIES,
    WRAPPED,
    _config,
    _make_tokenizer,
    _perturb,
    class_keys,
    make_hf_model,
)

import moelite
from moelite import _core
from moelite.converters.convert import convert
from moelite.converters.families import FAMILY_MODULES, registry

ALL_FAMILIES = FAMILIES + WAVE2_FAMILIES + HYBRID_FAMILIES + WAVE3_FAMILIES
# written by save_pretrained for every config: what it is, not a model hyperparameter
METADATA = {"architectures", "model_type", "transformers_version", "dtype"}
PROMPT = [(7 * i + 3) % VOCAB_SIZE for i in range(16)]


def config_class(model_type: str):
    from transformers import CONFIG_MAPPING

    return CONFIG_MAPPING[model_type]


def as_json(v):
    return json.loads(json.dumps(v, default=list))


def read_config(d: Path) -> dict:
    return json.loads((d / "config.json").read_text())


def gguf_contents(path: Path) -> tuple[dict, dict]:
    """(metadata without general.name, {tensor name: (type, shape, bytes)}) of a single-file GGUF."""
    g = _core.read_gguf(str(path))
    kv = {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in g["kv"].items() if k != "general.name"}
    tensors = {}
    with open(path, "rb") as f:
        for name, ggml_type, shape, offset, nbytes in g["tensors"]:
            f.seek(offset)
            tensors[name] = (ggml_type, tuple(shape), f.read(nbytes))
    return kv, tensors


def text_part(family: str, cfg: dict) -> dict:
    """The family's own config: config.json, or its `text_config` when the family ships in a wrapper (WRAPPED)."""
    return cfg["text_config"] if family in WRAPPED else cfg


def minimal_copy(family: str, src: Path, out: Path) -> tuple[Path, list[str]]:
    """A copy of the fixture whose config.json keeps only the keys that differ from the class default (plus
    model_type, architectures and the release keys); -> (dir, the keys left out). A wrapped family's text_config
    is the part minimised."""
    shutil.copytree(src, out)
    outer = read_config(src)
    cfg = text_part(family, outer)
    defaults = as_json(config_class(family)().to_dict())
    keep = {"model_type", "architectures"} | set(RELEASE_KEYS.get(family, {}))
    # special token ids stay: gguf-py's SpecialVocab reads them from config.json as llama.cpp's converter does;
    # a class default there names a token of the original vocabulary (Hunyuan's sep_token_id 4), not a hyperparameter
    keep |= {k for k in cfg if k.endswith("_token_id")}
    dropped = [k for k, v in cfg.items() if k not in keep and k in defaults and v == defaults[k]]
    small = {k: v for k, v in cfg.items() if k not in dropped}
    (out / "config.json").write_text(
        json.dumps({**outer, "text_config": small} if family in WRAPPED else small, indent=2)
    )
    return out, dropped


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_fixture_config_is_what_save_pretrained_writes(family):
    outer = read_config(make_hf_model(family))
    if family in WRAPPED:
        assert not set(outer) - class_keys(config_class(WRAPPED[family])) - METADATA
    cfg = text_part(family, outer)
    added = set(cfg) - class_keys(config_class(family)) - METADATA - set(RELEASE_KEYS.get(family, {}))
    assert not added, f"{family}: config.json holds keys its transformers class does not define: {sorted(added)}"
    for k, v in RELEASE_KEYS.get(family, {}).items():
        assert cfg[k] == v


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_minimal_config_converts_to_the_same_gguf(family, tmp_path):
    full = make_hf_model(family)
    minimal, dropped = minimal_copy(family, full, tmp_path / family)
    assert dropped, f"{family}: no key of the fixture is at its class default; the test pins nothing"
    # transformers reads the minimal config to the same config (the keys left out are really defaults)
    cls = config_class(WRAPPED.get(family, family))
    loaded = [as_json(cls.from_pretrained(str(d)).to_dict()) for d in (minimal, full)]
    assert loaded[0] == loaded[1]
    convert(full, tmp_path / "full.gguf", "f32", progress=False)
    convert(minimal, tmp_path / "minimal.gguf", "f32", progress=False)
    kv_full, t_full = gguf_contents(tmp_path / "full.gguf")
    kv_min, t_min = gguf_contents(tmp_path / "minimal.gguf")
    diff = {k: (kv_full.get(k), kv_min.get(k)) for k in set(kv_full) | set(kv_min) if kv_full.get(k) != kv_min.get(k)}
    assert not diff, f"{family}: GGUF metadata differs without the keys {dropped}: {diff}"
    assert t_full.keys() == t_min.keys()
    for name in t_full:
        assert t_full[name] == t_min[name], f"{family}: tensor {name} differs without the keys {dropped}"


def test_family_defaults_are_the_transformers_class_defaults():
    """Each family file's DEFAULTS: the class's field defaults; rope_theta its default_theta; rope_parameters,
    partial_rotary_factor, full_attention_interval and global_head_dim what the class sets when they are absent."""
    from transformers import CONFIG_MAPPING

    checked = 0
    for mod in FAMILY_MODULES:
        module = importlib.import_module(f"moelite.converters.families.{mod}")
        for fam in getattr(module, "FAMILIES", (module.FAMILY,)):
            for mt in fam.model_types:
                if mt not in CONFIG_MAPPING:  # a release's own model_type (remote code: MiMo's mimo_v2) that
                    continue  # transformers knows under another name, also in model_types
                cls = config_class(mt)
                fields, made = as_json(cls.default_config_fields()), as_json(cls().to_dict())
                rope = made.get("rope_parameters") or {}  # NoPE classes (Nemotron-H) have none
                for k, v in fam.defaults.items():
                    if k == "rope_theta":
                        want = cls.default_theta
                    elif k == "rope_parameters":
                        want = rope
                    elif k == "partial_rotary_factor":
                        want = rope.get(k)
                    elif k == "full_attention_interval":  # the layer_types the class makes without it
                        want = made["layer_types"].index("full_attention") + 1
                    elif k == "global_head_dim":  # the head_dim of full layers without it
                        want = next(iter(made["per_layer_config"].values()))["head_dim"]
                    else:
                        want = fields.get(k, "not a key of the class")
                    assert v == want, f"{mt}: DEFAULTS[{k!r}] = {v!r}, transformers {cls.__name__}: {want!r}"
                    checked += 1
    assert set(registry()) >= set(ALL_FAMILIES) and checked > 200


# --- Qwen3.5-MoE as released: Qwen3_5MoeForConditionalGeneration, config nested under text_config ---------------


@pytest.fixture(scope="module")
def qwen35_multimodal(tmp_path_factory) -> Path:
    import torch
    from transformers import Qwen3_5MoeConfig, Qwen3_5MoeForConditionalGeneration

    torch.set_num_threads(1)
    text = _config("qwen3_5_moe_text", {}).to_dict()  # the fixture's text model, class kwargs only
    vision = dict(
        depth=1,
        hidden_size=32,
        intermediate_size=64,
        num_heads=2,
        patch_size=4,
        temporal_patch_size=2,
        spatial_merge_size=2,
        out_hidden_size=text["hidden_size"],
        num_position_embeddings=16,
    )
    cfg = Qwen3_5MoeConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=VOCAB_SIZE - 1,
        video_token_id=VOCAB_SIZE - 2,
        vision_start_token_id=VOCAB_SIZE - 3,
        vision_end_token_id=VOCAB_SIZE - 4,
    )
    torch.manual_seed(0)
    model = Qwen3_5MoeForConditionalGeneration(cfg).float().eval()
    _perturb(model, 0)
    out = tmp_path_factory.mktemp("qwen3_5_moe") / "ckpt"
    model.save_pretrained(out, safe_serialization=True)
    _make_tokenizer(out)
    return out


def test_qwen35_multimodal_checkpoint_converts_and_matches_transformers(qwen35_multimodal, tmp_path):
    import torch
    from transformers import Qwen3_5MoeForConditionalGeneration

    cfg = read_config(qwen35_multimodal)
    assert cfg["model_type"] == "qwen3_5_moe" and cfg["text_config"]["model_type"] == "qwen3_5_moe_text"
    assert "intermediate_size" not in cfg["text_config"]  # what broke: Qwen3_5MoeTextConfig has none
    for d, model_type in ((cfg, "qwen3_5_moe"), (cfg["text_config"], "qwen3_5_moe_text")):
        assert not set(d) - class_keys(config_class(model_type)) - METADATA, f"{model_type}: keys added"
    names = (
        json.loads((qwen35_multimodal / "model.safetensors.index.json").read_text())["weight_map"]
        if (qwen35_multimodal / "model.safetensors.index.json").exists()
        else None
    )
    if names is None:
        from safetensors import safe_open

        with safe_open(str(qwen35_multimodal / "model.safetensors"), "np") as f:
            names = list(f.keys())
    assert any(n.startswith("model.language_model.") for n in names)
    assert any(n.startswith("model.visual.") for n in names)

    out = tmp_path / "q35.gguf"
    convert(qwen35_multimodal, out, "f32", progress=False)
    kv = _core.read_gguf(str(out))["kv"]
    assert kv["general.architecture"] == "qwen35moe" and "qwen35moe.feed_forward_length" not in kv

    with moelite.load(out, kv_type="f32", n_threads=1) as m:
        ours = m.logits(PROMPT)
    model = Qwen3_5MoeForConditionalGeneration.from_pretrained(str(qwen35_multimodal), dtype=torch.float32)
    model.eval()
    with torch.no_grad():
        ref = model(input_ids=torch.tensor([PROMPT])).logits[0].float().numpy()
    assert ours.shape == ref.shape
    err = float(np.abs(ours - ref).max())
    assert err <= 1e-3, f"max |logit diff| = {err}"
