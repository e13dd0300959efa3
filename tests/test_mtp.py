"""The MTP block as a draft source (csrc/mtp.cpp, speculative="mtp"), on Hy3 (hy_v3) as its release checkpoint
stores the block (model.layers.{n_layer} + eh_proj / enorm / hnorm / final_layernorm; test_wave3_families.with_mtp):

- its logits equal a reference built from transformers' own HYV3DecoderLayer (the block's weights loaded as one more
  layer) on the trunk's output-normed hidden states, F32, to 1e-3; the second draft chains on the block's own
  head-normed state. The rows are those the core runs one behind the trunk, across ubatches and single steps,
  and after a truncation (a rejected draft);
- greedy output with MTP speculation equals greedy output without it, resident and at the smallest budget
  (Q8_0: window rows are bit-identical to one-row steps, docs/SPECULATIVE.md);
- the budget counts the block (dense weights, KV, one more layer of expert slots); files and families whose MTP
  block does not run are refused by name.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from test_wave3_families import PROMPT, trunk_layers, with_mtp

import moelite
from moelite.converters import convert
from moelite.errors import UsageError

FAMILY = "hy_v3"
NXT = 123  # the token after the prompt


@pytest.fixture(scope="module")
def mtp_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("mtp")
    hf = with_mtp(FAMILY, d / "hf")
    out = {}
    for t in ("f32", "q8_0"):
        out[t] = d / f"mtp-{t}.gguf"
        convert(hf, out[t], t, progress=False)
    return hf, out


def _rms(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def reference(hf, ids: list[int], draft1: int) -> tuple[np.ndarray, np.ndarray]:
    """MTP logits of rows (h_i, ids[i + 1]) for every i, and of the chained row (g_last, draft1): transformers'
    trunk for h (output-normed), its HYV3DecoderLayer for the block (loaded as layer n_layer of a model one layer
    deeper, so its release names map as the trunk's do), eh_proj / norms read from the checkpoint."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = json.loads((hf / "config.json").read_text())
    n = trunk_layers(FAMILY, cfg)
    trunk = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
    c2 = AutoConfig.from_pretrained(hf)
    c2.num_hidden_layers = n + 1
    c2.mlp_layer_types = list(trunk.config.mlp_layer_types) + ["sparse"]
    deeper = AutoModelForCausalLM.from_pretrained(hf, config=c2, dtype=torch.float32).eval()
    block = deeper.model.layers[n]
    w = {}
    for f in hf.glob("*.safetensors"):
        w.update({k: v for k, v in load_file(f).items() if k.startswith(f"model.layers.{n}.")})
    eps = trunk.config.rms_norm_eps
    p = f"model.layers.{n}."
    with torch.no_grad():
        t = torch.tensor([ids])
        h = trunk.model(input_ids=t).last_hidden_state[0]  # [P, E], after the final norm

        def rows(hid, toks, pos0):
            e = trunk.model.embed_tokens(torch.tensor([toks]))[0]
            x = torch.cat([_rms(e, w[p + "enorm.weight"], eps), _rms(hid, w[p + "hnorm.weight"], eps)], -1)
            return (x @ w[p + "eh_proj.weight"].T)[None], torch.arange(pos0, pos0 + len(toks))[None]

        x, pos = rows(h[:-1], ids[1:], 0)
        T = x.shape[1]
        # the chained row sits after them: one sequence, causal
        g_mask = torch.full((T, T), float("-inf")).triu(1)[None, None]
        y = block(x, attention_mask=g_mask, position_ids=pos, position_embeddings=trunk.model.rotary_emb(x, pos))
        g = _rms(y[0], w[p + "final_layernorm.weight"], eps)
        logits = trunk.lm_head(g)
        x2, _ = rows(g[-1:], [draft1], T)
        x_all = torch.cat([x, x2], 1)
        pos_all = torch.arange(0, T + 1)[None]
        mask = torch.full((T + 1, T + 1), float("-inf")).triu(1)[None, None]
        y2 = block(
            x_all, attention_mask=mask, position_ids=pos_all, position_embeddings=trunk.model.rotary_emb(x_all, pos_all)
        )
        logits2 = trunk.lm_head(_rms(y2[0, -1:], w[p + "final_layernorm.weight"], eps))
    return logits.numpy(), logits2[0].numpy()


def test_mtp_logits_match_transformers_block(mtp_files):
    hf, files = mtp_files
    ids = PROMPT + [NXT]
    with moelite.load(files["f32"], kv_type="f32", n_threads=1, n_ubatch=8, speculative="mtp") as m:
        core = m._core()
        assert m.info()["n_layer"] == trunk_layers(FAMILY, json.loads((hf / "config.json").read_text()))
        # the prompt in pieces: a ubatch split (8 + 1), then single steps; the block's rows follow one behind
        core.eval(np.array(PROMPT[:9], np.int32), 1)
        for t in PROMPT[9:]:
            core.eval(np.array([t], np.int32), 1)
        drafts, l0 = core.mtp_draft(NXT, 2)
    ref, ref2 = reference(hf, ids, drafts[0])
    assert float(np.abs(l0 - ref[-1]).max()) <= 1e-3
    assert drafts[0] == int(np.argmax(ref[-1])) and drafts[1] == int(np.argmax(ref2))

    with moelite.load(files["f32"], kv_type="f32", n_threads=1, n_ubatch=64, speculative="mtp") as m:
        core = m._core()
        core.eval(np.array(ids, np.int32), 1)  # one ubatch
        _, a = core.mtp_draft(5, 1)
        core.reset()
        assert not core.mtp_ready and core.mtp_draft(NXT, 4) == ([], None)
        # a window of 3 rows whose first draft is rejected: truncate back to the prompt + NXT
        core.eval(np.array(PROMPT, np.int32), 1)
        core.eval(np.array([NXT, 7, 9], np.int32), 3)
        core.truncate(len(ids))
        assert core.mtp_ready
        _, b = core.mtp_draft(5, 1)
        # a truncation past the last ubatch: the state of the context's last token is gone, no draft
        core.truncate(len(PROMPT))
        assert not core.mtp_ready and core.mtp_draft(NXT, 4) == ([], None)
    assert float(np.abs(a - b).max()) <= 1e-4  # F32: one ubatch vs two differ in the last bits (tinyBLAS)


def _greedy(path, **opts):
    with moelite.load(path, n_threads=1, n_ubatch=64, **opts) as m:
        return m.generate(PROMPT, max_tokens=64, stop_ids=[]), m.stats(), m.plan


def test_mtp_greedy_equals_plain_greedy(mtp_files):
    _, files = mtp_files
    path = files["q8_0"]
    plain, _, plan = _greedy(path)
    with moelite.load(path, n_threads=1, n_ubatch=64, speculative="mtp") as m:
        least = m.plan.minimum_budget
        # the block is planned: its dense weights, one more layer of expert slots and its KV cache
        assert m.plan.dense_bytes > plan.dense_bytes and m.plan.kv_bytes > plan.kv_bytes
        assert len(m.plan.expert_slot_bytes) == len(plan.expert_slot_bytes) + 1
    for opts in ({}, {"memory_budget": least}):
        out, stats, _ = _greedy(path, speculative="mtp", draft_max=3, draft_rule="always", **opts)
        assert out == plain
        sp = stats["speculative"]
        assert sp["mode"] == "mtp" and sp["windows"] > 0 and sp["drafted"] > 0
        if opts:
            assert stats["total"]["bytes_read"] > 0
        # the cost rule on its own: still the same tokens
        out, stats, _ = _greedy(path, speculative="mtp", **opts)
        assert out == plain and stats["speculative"]["mode"] == "mtp"


def test_mtp_refusals(mtp_files):
    _, files = mtp_files
    path = files["q8_0"]
    with moelite.load(path, n_threads=1) as m:  # loaded without the block: a per-call mtp is refused
        with pytest.raises(UsageError, match="load the model with speculative='mtp'"):
            m.generate(PROMPT, max_tokens=4, speculative="mtp")
    with pytest.raises(UsageError, match="draft_model"):
        moelite.load(path, n_threads=1, speculative="mtp", draft_model=str(path))
    with pytest.raises(UsageError, match="host_slots"):
        moelite.load(path, n_threads=1, speculative="mtp", host_slots=4)
