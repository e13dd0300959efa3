"""The MTP block as a draft source (csrc/mtp.cpp, speculative="mtp"), on the families whose release checkpoints
store it as one more decoder layer at model.layers.{n_layer} plus eh_proj / enorm / hnorm / a head norm: Hy3
(hy_v3, `final_layernorm`; test_wave3_families.with_mtp), GLM-4.5 (glm4_moe: GQA + shared experts), DeepSeek-V3 and
GLM-4.7-Flash (deepseek_v3 / glm4_moe_lite: MLA; `shared_head.norm`):

- its logits equal a reference built from transformers' own decoder layer of the family (the block's weights loaded
  as one more layer) on the trunk's output-normed hidden states, F32, to 1e-3; the second draft chains on its own
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
from fixture_models import fixture_gguf
from hf_fixtures import edited_copy
from safetensors.torch import load_file
from test_wave3_families import PROMPT, hy_v3_mtp, with_mtp

import moelite
from moelite import _core
from moelite.converters import convert
from moelite.errors import ConversionError, UsageError

FAMILIES = ("hy_v3", "glm4_moe", "deepseek_v3", "glm4_moe_lite", "qwen3_5_moe_text", "qwen3_next")
HEAD_NORM = {"hy_v3": "final_layernorm"}  # the MTP block's norm before the head; else shared_head.norm
# Qwen3.5 stores its MTP block under mtp.* (mtp.layers.0 a full-attention MoE layer, mtp.fc / pre_fc_norm_* / norm),
# its norms zero-centred (x * (1 + w))
RELEASE_MTP = {
    "eh_proj": "fc",
    "enorm": "pre_fc_norm_embedding",
    "hnorm": "pre_fc_norm_hidden",
    "shared_head.norm": "norm",
}
ZERO_CENTRED = {"qwen3_5_moe_text", "qwen3_next"}
# Qwen3-Next's release config.json does not state its MTP block count: the converter counts the blocks it holds
COUNTED = {"qwen3_next"}
NXT = 123  # the token after the prompt


def mtp_checkpoint(family: str, out):
    """The family's fixture with an MTP block as its release stores it: the last layer's copy (+0.01) at
    model.layers.{n_layer}, a random eh_proj and random norms; num_nextn_predict_layers 1. Qwen3.5: the same block
    under mtp.* (mtp_num_hidden_layers 1), and beside it (`out`.reference) the model.layers.{n_layer} layout the
    reference loads into transformers."""
    if family == "hy_v3":
        return with_mtp(family, out)
    hf, _ = fixture_gguf(family)
    cfg = json.loads((hf / "config.json").read_text())
    n = cfg["num_hidden_layers"]
    d = edited_copy(hf, out, lambda ts: hy_v3_mtp(ts, n, "shared_head.norm", seed=7))
    if family not in ZERO_CENTRED:
        (d / "config.json").write_text(json.dumps({**cfg, "num_nextn_predict_layers": 1}, indent=2))
        return d
    ref = d.rename(d.with_name(d.name + ".reference"))
    # one layer deeper, the block a full-attention layer: transformers loads it as the model's last layer
    deeper = {"num_hidden_layers": n + 1, "layer_types": cfg["layer_types"] + ["full_attention"]}
    (ref / "config.json").write_text(json.dumps({**cfg, **deeper}))

    def release_name(k: str) -> str:  # model.layers.{n}.X -> mtp.fc / pre_fc_norm_* / norm, or mtp.layers.0.X
        rest = k[len(f"model.layers.{n}.") :]
        shared = RELEASE_MTP.get(rest.removesuffix(".weight"))
        return f"mtp.{shared}.weight" if shared else f"mtp.layers.0.{rest}"

    def release(ts):
        return {(release_name(k) if k.startswith(f"model.layers.{n}.") else k): v for k, v in ts.items()}

    d = edited_copy(ref, out, release)
    (d / "config.json").write_text(json.dumps({**cfg, **({} if family in COUNTED else {"mtp_num_hidden_layers": 1})}))
    return d


@pytest.fixture(scope="module", params=FAMILIES)
def mtp_files(request, tmp_path_factory):
    family = request.param
    d = tmp_path_factory.mktemp(family)
    hf = mtp_checkpoint(family, d / "hf")
    out = {}
    for t in ("f32", "q8_0"):
        out[t] = d / f"mtp-{t}.gguf"
        convert(hf, out[t], t, progress=False)
    return family, hf, out


def _rms(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def reference(family, hf, ids: list[int], draft1: int) -> tuple[np.ndarray, np.ndarray]:
    """MTP logits of rows (h_i, ids[i + 1]) for every i, and of the chained row (g_last, draft1): transformers'
    trunk for h (output-normed), its HYV3DecoderLayer for the block (loaded as layer n_layer of a model one layer
    deeper, so its release names map as the trunk's do), eh_proj / norms read from the checkpoint."""
    from transformers import AutoConfig, AutoModelForCausalLM

    trunk = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
    n = trunk.config.num_hidden_layers
    if family in ZERO_CENTRED:  # the block's weights at model.layers.{n}, where transformers loads a layer from
        hf = hf.with_name(hf.name + ".reference")
    c2 = AutoConfig.from_pretrained(hf)
    if family not in ZERO_CENTRED:  # (Qwen3.5's reference config is one layer deeper already)
        c2.num_hidden_layers = n + 1
    if isinstance(getattr(trunk.config, "mlp_layer_types", None), list):  # the block is a MoE layer
        c2.mlp_layer_types = list(trunk.config.mlp_layer_types) + ["sparse"]
    head_norm = f"model.layers.{n}.{HEAD_NORM.get(family, 'shared_head.norm')}.weight"
    deeper = AutoModelForCausalLM.from_pretrained(hf, config=c2, dtype=torch.float32).eval()
    block = deeper.model.layers[n]
    w = {}
    for f in hf.glob("*.safetensors"):
        w.update({k: v for k, v in load_file(f).items() if k.startswith(f"model.layers.{n}.")})
    eps = trunk.config.rms_norm_eps
    p = f"model.layers.{n}."
    if family in ZERO_CENTRED:  # x * (1 + w)
        w = {k: (v + 1.0 if k.endswith("norm.weight") else v) for k, v in w.items()}
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
        g = _rms(y[0], w[head_norm], eps)
        logits = trunk.lm_head(g)
        x2, _ = rows(g[-1:], [draft1], T)
        x_all = torch.cat([x, x2], 1)
        pos_all = torch.arange(0, T + 1)[None]
        mask = torch.full((T + 1, T + 1), float("-inf")).triu(1)[None, None]
        y2 = block(
            x_all, attention_mask=mask, position_ids=pos_all, position_embeddings=trunk.model.rotary_emb(x_all, pos_all)
        )
        logits2 = trunk.lm_head(_rms(y2[0, -1:], w[head_norm], eps))
    return logits.numpy(), logits2[0].numpy()


def test_mtp_logits_match_transformers_block(mtp_files):
    family, hf, files = mtp_files
    ids = PROMPT + [NXT]
    n_layer = json.loads((hf / "config.json").read_text())["num_hidden_layers"]
    r = _core.read_gguf(str(files["f32"]))
    arch = r["kv"]["general.architecture"]
    assert r["kv"][f"{arch}.block_count"] == n_layer + 1 and r["kv"][f"{arch}.nextn_predict_layers"] == 1
    with moelite.load(files["f32"], kv_type="f32", n_threads=1, n_ubatch=8, speculative="mtp") as m:
        core = m._core()
        assert m.info()["n_layer"] == n_layer
        # the prompt in pieces: a ubatch split (8 + 1), then single steps; the block's rows follow one behind
        core.eval(np.array(PROMPT[:9], np.int32), 1)
        for t in PROMPT[9:]:
            core.eval(np.array([t], np.int32), 1)
        drafts, l0 = core.mtp_draft(NXT, 2)
    ref, ref2 = reference(family, hf, ids, drafts[0])
    assert float(np.abs(l0 - ref[-1]).max()) <= 1e-3
    assert drafts[0] == int(np.argmax(ref[-1])) and drafts[1] == int(np.argmax(ref2))

    with moelite.load(files["f32"], kv_type="f32", n_threads=1, n_ubatch=64, speculative="mtp") as m:
        core = m._core()
        core.eval(np.array(ids, np.int32), 1)  # one ubatch
        _, a = core.mtp_draft(5, 1)
        core.reset()
        assert not core.mtp_ready and core.mtp_draft(NXT, 4) == ([], None)
        core.eval(np.array(PROMPT, np.int32), 1)
        if core.recurrent:  # Qwen3.5: a rejected window is undone by restoring the state saved before it
            snap = core.save_state()
            core.eval(np.array([NXT, 7, 9], np.int32), 3)
            core.load_state(snap, len(PROMPT))
            assert not core.mtp_ready and core.mtp_draft(NXT, 4) == ([], None)  # its rows are past the position
            core.eval(np.array([NXT], np.int32), 1)  # the accepted token, evaluated again: the block's row with it
            assert core.mtp_ready
            _, b = core.mtp_draft(5, 1)
        else:
            # a window of 3 rows whose first draft is rejected: truncate back to the prompt + NXT
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
    _, _, files = mtp_files
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
    _, _, files = mtp_files
    path = files["q8_0"]
    with moelite.load(path, n_threads=1) as m:  # loaded without the block: a per-call mtp is refused
        with pytest.raises(UsageError, match="load the model with speculative='mtp'"):
            m.generate(PROMPT, max_tokens=4, speculative="mtp")
    with pytest.raises(UsageError, match="draft_model"):
        moelite.load(path, n_threads=1, speculative="mtp", draft_model=str(path))
    with pytest.raises(UsageError, match="host_slots"):
        moelite.load(path, n_threads=1, speculative="mtp", host_slots=4)


@pytest.mark.slow
def test_mtp_files_both_ways_with_llama_cpp(mtp_files, tmp_path):
    """llama.cpp runs the trunk of moelite's file with its MTP block; moelite's MTP drafts on llama.cpp's own
    conversion of the checkpoint (--keep-mtp) equal those on its own file. llama.cpp's
    converter drops DeepSeek-V3's MTP layer (its deepseek2 class skips MTP; its loader and graph read one)."""
    from llama_cpp_ref import llama_cpp_logits, pinned_convert

    family, hf, files = mtp_files
    with moelite.load(files["f32"], kv_type="f32", n_threads=1) as m:
        ours = m.logits(PROMPT)
    assert float(np.abs(llama_cpp_logits(files["f32"], PROMPT) - ours).max()) <= 1e-3
    theirs = pinned_convert(hf, tmp_path / "theirs.gguf", "--keep-mtp")
    kv = _core.read_gguf(str(theirs))["kv"]
    if family == "deepseek_v3":
        assert not kv.get("deepseek2.nextn_predict_layers")
        return
    drafts = []
    for path in (files["f32"], theirs):
        with moelite.load(path, kv_type="f32", n_threads=1, speculative="mtp") as m:
            core = m._core()
            core.eval(np.array(PROMPT, np.int32), 1)
            drafts.append(core.mtp_draft(NXT, 3))
    assert drafts[0][0] == drafts[1][0]
    assert float(np.abs(drafts[0][1] - drafts[1][1]).max()) <= 1e-3


def test_convert_no_mtp_drops_the_blocks(mtp_files, tmp_path):
    """`moelite convert --no-mtp` (llama.cpp's option): the trunk alone, the same logits, no MTP key or tensor."""
    from moelite.apps.cli import main

    family, hf, files = mtp_files
    out = tmp_path / "trunk.gguf"
    assert main(["convert", str(hf), "-o", str(out), "--type", "f32", "--no-mtp", "--no-progress"]) == 0
    r = _core.read_gguf(str(out))
    arch = r["kv"]["general.architecture"]
    n_layer = json.loads((hf / "config.json").read_text())["num_hidden_layers"]
    assert r["kv"][f"{arch}.block_count"] == n_layer and not r["kv"].get(f"{arch}.nextn_predict_layers")
    assert not any(t[0].startswith(f"blk.{n_layer}.") for t in r["tensors"])
    with (
        moelite.load(out, kv_type="f32", n_threads=1) as a,
        moelite.load(files["f32"], kv_type="f32", n_threads=1) as b,
    ):
        assert np.array_equal(a.logits(PROMPT), b.logits(PROMPT))
        assert a.plan.dense_bytes == b.plan.dense_bytes  # the MTP block is planned only with speculative="mtp"
    with pytest.raises(ConversionError, match="mtp = 'no'"):
        convert(hf, tmp_path / "bad.gguf", "f32", progress=False, mtp="no")
    assert not (tmp_path / "bad.gguf").exists()


def test_plan_counts_the_mtp_block(mtp_files, capsys):
    """`moelite plan --mtp` plans what speculative='mtp' loads: the block's dense bytes, KV and expert slots."""
    from moelite.apps.cli import main

    _, _, files = mtp_files
    out = {}
    for flags in ([], ["--mtp"]):
        assert main(["plan", str(files["q8_0"]), "-M", "8GiB", "-c", "256", *flags]) == 0
        out[bool(flags)] = capsys.readouterr().out
    assert "+ its MTP block" in out[True] and "+ its MTP block" not in out[False]
    with moelite.load(files["q8_0"], n_threads=1, n_ctx=256, speculative="mtp") as m:
        dense = m.plan.dense_bytes
    from moelite.runtime.planner import fmt_bytes

    assert f"dense {fmt_bytes(dense)}" in out[True]
