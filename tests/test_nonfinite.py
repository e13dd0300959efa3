"""Weights holding NaN/Inf never pass silently: the first layer whose output (or router logits) goes non-finite is
named in a ModelFormatError, for attention, MoE and recurrent layers; the model stays usable afterwards."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from fixture_models import fixture_gguf

import moelite
from moelite import _core
from moelite.errors import ModelFormatError

PROMPT = [5, 17, 42, 99, 123, 7, 250, 33]


def poisoned(tmp_path, family: str, tensor: str, value: float = np.nan):
    _, src = fixture_gguf(family)
    dst = tmp_path / f"{family}-bad.gguf"
    shutil.copy(src, dst)
    meta = {t[0]: t for t in _core.read_gguf(str(dst))["tensors"]}
    name, typ, shape, off, nbytes = meta[tensor]
    assert typ == 0  # F32 fixture
    with open(dst, "r+b") as f:
        f.seek(off)
        f.write(np.full(nbytes // 4, value, np.float32).tobytes())
    return dst


@pytest.mark.parametrize(
    "family,tensor,needle",
    [
        ("qwen3_moe", "blk.1.attn_q.weight", "layer 1"),
        ("qwen3_moe", "blk.1.ffn_gate_inp.weight", "layer 1: router logits"),
        ("qwen3_moe", "token_embd.weight", "token_embd"),
        ("deepseek_v3", "blk.0.ffn_up.weight", "layer 0"),
        ("qwen3_5_moe_text", "blk.0.ssm_out.weight", "layer 0"),
    ],
)
def test_nan_weights_name_the_layer(tmp_path, family, tensor, needle):
    path = poisoned(tmp_path, family, tensor)
    with moelite.load(path, kv_type="f32", n_threads=1) as m:
        with pytest.raises(ModelFormatError, match=needle):
            m.logits(PROMPT)
        with pytest.raises(ModelFormatError, match=needle):  # and again: the failed step left nothing behind
            m.generate(PROMPT, max_tokens=4, stop_ids=[])


def test_inf_output_weights_are_named(tmp_path):
    path = poisoned(tmp_path, "qwen3_moe", "output.weight", np.inf)
    with moelite.load(path, kv_type="f32", n_threads=1) as m, pytest.raises(ModelFormatError, match="output"):
        m.logits(PROMPT)
