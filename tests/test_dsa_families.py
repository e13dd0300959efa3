"""DSA (DeepSeek Sparse Attention) families: DeepSeek-V3.2 (`deepseek32`) and GLM-5 (`glm-dsa`, with GLM-5.2's
IndexShare), tiny random instances against transformers 5.25's DeepseekV32ForCausalLM / GlmMoeDsaForCausalLM.

DSA equals dense MLA attention until the context outgrows the indexer's budget (index_topk, 2048 in the releases):
the fixtures shrink it to 16 positions, so that prompts of a few dozen tokens run the sparse path. A test shows that
transformers' sparse result differs from its dense one there, and that moelite follows the sparse one:
- f32 logits within 1e-3 of transformers (F32 KV): a prompt under the budget, one past it, prompt + decode steps;
- 32 greedy tokens equal transformers' (the context passes the budget on the way);
- prompt chunks (n_ubatch 3, 7) and prompt reuse (generate calls sharing a prefix) equal a fresh recomputation;
- offloaded at the minimum budget: the logits of the resident model, bit for bit;
- the indexer key cache is in the KV cache and the plan (`moelite plan` counts it);
- llama.cpp both ways (its runtime on moelite's GGUF, moelite on its converter's GGUF).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from fixture_models import fixture_gguf, parse_edited
from hf_fixtures import (
    DSA_FAMILIES,
    edited_copy,
    hf_greedy,
    hf_logits,
    make_hf_model,
    read_fixture_tensors,
    release_copy,
)

import moelite
from moelite import _core
from moelite.converters import convert

SHORT = [(7 * i + 3) % 320 for i in range(12)]  # under the budget of 16: dense
LONG = [(11 * i + 5) % 317 + 3 for i in range(48)]  # 3x the budget
BUDGET = 16
# sparse and dense attention differ by more than this past the budget: 5x the 1e-3 bound the matches are held to
# (Hy4's fixture has the smallest logits, ~0.2 at most: its sparse / dense gap is ~6e-3)
DIFFERS = 5e-3


def load(path, **kw):
    return moelite.load(path, **{"kv_type": "f32", "n_threads": 1, **kw})


@pytest.mark.parametrize("family", DSA_FAMILIES)
def test_prompts_under_and_past_the_budget_match_transformers(family):
    hf, path = fixture_gguf(family)
    with load(path) as m:
        for ids in (SHORT, LONG):
            assert float(np.abs(m.logits(ids) - hf_logits(hf, ids)).max()) <= 1e-3


@pytest.mark.parametrize("family", DSA_FAMILIES)
def test_prompt_then_decode_steps_match_transformers(family):
    """A prompt under the budget, then single-token steps through the F32 KV cache and the indexer key cache past
    it: each step's logits are transformers' for the whole sequence at that position."""
    hf, path = fixture_gguf(family)
    ids = LONG[:30]
    ref = hf_logits(hf, ids)
    with load(path) as m:
        rows = [m.eval(ids[:12])] + [m.eval([t]) for t in ids[12:]]
    assert float(np.abs(np.stack(rows) - ref[11:]).max()) <= 1e-3


@pytest.mark.parametrize("family", DSA_FAMILIES)
def test_sparse_attention_differs_from_dense_and_follows_transformers(family):
    """The same weights with a budget of 512 (every position selected: dense MLA): transformers' two models agree
    on the first 16 positions and differ after; moelite matches each of them on its own GGUF."""
    hf, path = fixture_gguf(family)
    hf_dense, path_dense = fixture_gguf(family, index_topk=512)
    sparse, dense = hf_logits(hf, LONG), hf_logits(hf_dense, LONG)
    assert float(np.abs(sparse[:BUDGET] - dense[:BUDGET]).max()) <= 1e-5
    assert float(np.abs(sparse[BUDGET:] - dense[BUDGET:]).max()) > DIFFERS  # the selection changes the result
    with load(path) as m:
        ours = m.logits(LONG)
    with load(path_dense) as m:
        ours_dense = m.logits(LONG)
    assert float(np.abs(ours - sparse).max()) <= 1e-3
    assert float(np.abs(ours_dense - dense).max()) <= 1e-3
    assert float(np.abs(ours[BUDGET:] - ours_dense[BUDGET:]).max()) > DIFFERS


@pytest.mark.parametrize("family", DSA_FAMILIES)
def test_greedy_32_tokens_equal_transformers(family):
    hf, path = fixture_gguf(family)
    with load(path) as m:
        ours = m.generate(SHORT, max_tokens=32, stop_ids=[])
    assert ours == hf_greedy(hf, SHORT, 32)


@pytest.mark.parametrize("family", DSA_FAMILIES)
def test_prompt_chunks_and_reuse_equal_a_fresh_recomputation(family):
    """The prompt in ubatches of 3 and 7 tokens (each chunk's selection over the keys cached before it) gives the
    one-ubatch logits; generate calls that extend or diverge from the cached context (the KV and indexer key caches
    kept up to the common prefix) give the tokens of a fresh model, with and without flash attention."""
    _, path = fixture_gguf(family)
    with load(path) as m:
        want = m.logits(LONG)
    for n_ubatch in (3, 7):
        with load(path, n_ubatch=n_ubatch) as m:
            assert float(np.abs(m.logits(LONG) - want).max()) <= 1e-4
    for flash in (True, False):

        def fresh(ids, flash=flash):
            with load(path, flash_attn=flash) as m:
                return m.generate(ids, max_tokens=8, stop_ids=[])

        with load(path, flash_attn=flash, n_ubatch=5) as m:
            g1 = m.generate(LONG[:20], max_tokens=8, stop_ids=[])
            extended = LONG[:20] + g1 + LONG[20:30]
            g2 = m.generate(extended, max_tokens=8, stop_ids=[])
            diverged = LONG[:25]  # shares 20 tokens with the cached context, then differs
            g3 = m.generate(diverged, max_tokens=8, stop_ids=[])
        assert [g1, g2, g3] == [fresh(LONG[:20]), fresh(extended), fresh(diverged)]


@pytest.mark.parametrize("family", DSA_FAMILIES)
def test_offloaded_at_the_minimum_budget_equals_resident(family):
    _, path = fixture_gguf(family)
    opts = dict(n_ubatch=64)
    with load(path, **opts) as m:
        want = m.logits(LONG)
        minimum = m.plan.minimum_budget
    with load(path, memory_budget=minimum, **opts) as m:
        assert m.info()["offloaded"]
        assert np.array_equal(m.logits(LONG), want)


@pytest.mark.parametrize("family", DSA_FAMILIES)
def test_indexer_key_cache_is_in_the_kv_cache_and_the_plan(family):
    """The indexer's keys (key_length per position on each full indexer layer; KPool: the key and its gate logits,
    and each complete pool's key, F32, once computed) are counted by the planner as the core allocates them: GLM's
    shared layers hold none."""
    _, path = fixture_gguf(family)
    kv = _core.read_gguf(str(path))["kv"]
    arch = kv["general.architecture"]
    n_layer = kv[f"{arch}.block_count"]
    d = kv[f"{arch}.attention.indexer.key_length"] * (2 if f"{arch}.attention.indexer.kpool" in kv else 1)
    full = list(kv.get(f"{arch}.attention.indexer.types", [True] * n_layer))
    n_kv = kv[f"{arch}.attention.head_count_kv"]  # GLM-5.3-Flash: 0 on its KDA layers
    mla = [bool(x) for x in n_kv] if isinstance(n_kv, (list, np.ndarray)) else [True] * n_layer
    for n_ctx in (256, 512):
        with load(path, n_ctx=n_ctx, n_ubatch=64) as m:
            assert m.plan.kv_bytes == m.info()["kv_bytes"]
            kv_bytes = m.info()["kv_bytes"]
        if n_ctx == 256:
            kv256 = kv_bytes
    # per position: each MLA layer's latent K (kv_lora + rope) and V (kv_lora), + the indexer keys, f32
    latent = 2 * kv[f"{arch}.attention.kv_lora_rank"] + kv[f"{arch}.rope.dimension_count"]
    keys = sum(f and m for f, m in zip(full, mla)) * d
    pool = kv.get(f"{arch}.attention.indexer.kpool", 0)  # 256 more positions: 256 / pool more pool keys per layer
    n_full = sum(f and m for f, m in zip(full, mla))
    pool_keys = 4 * (256 // pool) * n_full * kv[f"{arch}.attention.indexer.key_length"] if pool else 0
    assert kv_bytes - kv256 == 256 * 4 * (sum(mla) * latent + keys) + pool_keys


def test_glm_index_share_reuses_the_previous_selection(tmp_path):
    """GLM-5.2's IndexShare: the GGUF has no indexer tensors on the shared layer (it reuses layer 0's selection).
    The same checkpoint with layer 1 running an indexer of its own (layer 0's weights copied, indexer_types all
    'full') selects from layer 1's input instead: the logits change past the budget only, and moelite follows
    transformers on both."""
    hf, path = fixture_gguf("glm_moe_dsa")
    names = {t[0] for t in _core.read_gguf(str(path))["tensors"]}
    assert "blk.0.indexer.proj.weight" in names and not any(n.startswith("blk.1.indexer.") for n in names)

    def own_indexer(ts):
        pre = "model.layers.{}.self_attn.indexer."
        return {
            **ts,
            **{k.replace(pre.format(0), pre.format(1)): v for k, v in ts.items() if k.startswith(pre.format(0))},
        }

    full = edited_copy(hf, tmp_path / "hf", own_indexer)
    cfg = json.loads((full / "config.json").read_text())
    (full / "config.json").write_text(json.dumps({**cfg, "indexer_types": ["full"] * 3}))
    convert(full, tmp_path / "full.gguf", "f32", progress=False)
    with load(tmp_path / "full.gguf") as m:
        own = m.logits(LONG)
    with load(path) as m:
        shared = m.logits(LONG)
    assert float(np.abs(own - hf_logits(full, LONG)).max()) <= 1e-3
    assert float(np.abs(shared - hf_logits(hf, LONG)).max()) <= 1e-3
    assert float(np.abs(shared[:BUDGET] - own[:BUDGET]).max()) <= 1e-5
    assert float(np.abs(shared[BUDGET:] - own[BUDGET:]).max()) > 1e-3


@pytest.mark.slow
@pytest.mark.parametrize("family", DSA_FAMILIES)
def test_gguf_both_ways_with_llama_cpp(family, tmp_path):
    """llama.cpp's runtime on moelite's GGUF and moelite on llama.cpp's converter's GGUF, under and past the
    budget (llama.cpp computes the indexer after a Hadamard rotation of q and k: the same scores up to rounding)."""
    from llama_cpp_ref import llama_cpp_logits, pinned_convert

    hf, ours = fixture_gguf(family)
    for ids in (SHORT, LONG):
        with load(ours) as m:
            assert float(np.abs(llama_cpp_logits(ours, ids) - m.logits(ids)).max()) <= 1e-3
    theirs = pinned_convert(release_copy(family, hf, tmp_path / "release"), tmp_path / "theirs.gguf")
    with load(theirs) as m:
        for ids in (SHORT, LONG):
            assert float(np.abs(m.logits(ids) - hf_logits(hf, ids)).max()) <= 1e-3


def test_make_hf_model_dense_budget_shares_the_weights():
    """The dense-budget twin used above is the same model: index_topk changes no parameter."""
    a = make_hf_model("deepseek_v32")
    b = make_hf_model("deepseek_v32", index_topk=512)
    ta, tb = read_fixture_tensors(a), read_fixture_tensors(b)
    assert ta.keys() == tb.keys() and all(np.array_equal(ta[k], tb[k]) for k in ta)


@pytest.mark.parametrize(
    "key, value, match",
    [
        ("attention.indexer.head_count", 0, "indexer.head_count"),
        ("attention.indexer.key_length", 4, "indexer.head_count"),  # shorter than the rotated dims (8)
        ("attention.indexer.types", [False, True, True], "layer 0 shares"),
        ("attention.indexer.types", [True, False], "indexer.types"),
    ],
)
def test_bad_indexer_keys_are_format_errors(key, value, match):
    """The indexer's keys are checked at the border, naming the key (a GGUF edited in memory, as the loader reads
    it)."""
    from moelite.errors import ModelFormatError

    with pytest.raises(ModelFormatError, match=match):
        parse_edited("glm_moe_dsa", {f"glm-dsa.{key}": value})


@pytest.mark.parametrize(
    "override, match",
    [
        ({"indexer_types": ["shared", "full", "full"]}, "indexer_types"),
        ({"indexer_types": ["full", "full"]}, "indexer_types"),
        ({"index_n_heads": 0}, "index_n_heads"),
    ],
)
def test_bad_indexer_configs_are_refused_by_the_converter(override, match, tmp_path):
    from moelite.errors import ConversionError

    hf, _ = fixture_gguf("glm_moe_dsa")
    d = edited_copy(hf, tmp_path / "hf", lambda ts: ts)
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, **override}))
    with pytest.raises(ConversionError, match=match):
        convert(d, tmp_path / "bad.gguf", "f32", progress=False)
    assert not (tmp_path / "bad.gguf").exists()


def test_moelite_plan_names_the_indexer_key_cache():
    """`moelite plan` shows the indexer's keys inside the KV cache: 2 full indexer layers x 64 x n_ctx, F16."""
    import subprocess
    import sys

    _, path = fixture_gguf("glm_moe_dsa")
    r = subprocess.run(
        [sys.executable, "-m", "moelite.apps.cli", "plan", str(path), "--memory", "1G", "--ctx-size", "4096"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    assert "(DSA indexer keys 1.00 MiB)" in r.stdout  # 2 x 64 x 4096 x 2 bytes


def test_q8_0_cache_holds_the_indexer_keys_too():
    """kv_type q8_0 (flash attention): the indexer's keys are q8_0 blocks like the latent cache (head sizes of 32
    multiples here: latent 32 + rope 32, keys 64); under the budget the logits stay near the F32 cache's, past it the
    run goes through (a quantized key may select another near-tied position, so no bound is claimed there)."""
    _, path = fixture_gguf("deepseek_v32", kv_lora_rank=32, qk_rope_head_dim=32)
    with load(path) as m:
        want = m.logits(LONG)
    with load(path, kv_type="q8_0") as m:
        got = m.logits(LONG)
    assert float(np.abs(got[:BUDGET] - want[:BUDGET]).max()) <= 1e-2
    assert np.isfinite(got).all()


@pytest.mark.parametrize("family", DSA_FAMILIES)
def test_release_layout_per_expert_tensors_convert_to_the_same_model(family, tmp_path):
    """The releases store experts one by one (`mlp.experts.{e}.{gate,up,down}_proj.weight`; transformers 5.25 fuses
    them on load and saves them stacked): both layouts give the same GGUF model, bit for bit."""
    hf, path = fixture_gguf(family)

    def per_expert(ts):
        out = {}
        for k, v in ts.items():
            if k.endswith("mlp.experts.gate_up_proj"):  # [E, 2I, H]: gate rows, then up rows
                pre, half = k[: -len("gate_up_proj")], v.shape[1] // 2
                for e in range(v.shape[0]):
                    out[f"{pre}{e}.gate_proj.weight"], out[f"{pre}{e}.up_proj.weight"] = v[e, :half], v[e, half:]
            elif k.endswith("mlp.experts.down_proj"):  # [E, H, I]
                for e in range(v.shape[0]):
                    out[f"{k[: -len('down_proj')]}{e}.down_proj.weight"] = v[e]
            else:
                out[k] = v
        return out

    release = edited_copy(hf, tmp_path / "hf", per_expert)
    assert any(".experts.7.down_proj.weight" in k for k in read_fixture_tensors(release))
    convert(release, tmp_path / "release.gguf", "f32", progress=False)
    with load(path) as m:
        want = m.logits(LONG)
    with load(tmp_path / "release.gguf") as m:
        assert np.array_equal(m.logits(LONG), want)


def test_hy4_release_and_save_pretrained_layouts_convert_to_the_same_model(tmp_path):
    """Hy4's release names three tensors differently from what transformers 5.25's save_pretrained writes (the
    hyper-connections' `hc_pre` placement, the head's, the MLP's gate): transformers loads both into the same model,
    and moelite's converter writes the same GGUF tensors from both."""
    hf, path = fixture_gguf("hy_v4")
    release = release_copy("hy_v4", hf, tmp_path / "release")
    names = set(read_fixture_tensors(release))
    assert "model.layers.0.hc_attn_layer.hc_pre.hc_fn" in names and "model.hc_head.hc_head_fn" in names
    assert "model.layers.0.mlp.gate_proj.weight" in names
    assert not any(".hc_pre.hc_attn_layer." in n or ".hc_pre.hc_head." in n for n in names)
    assert np.array_equal(hf_logits(release, SHORT), hf_logits(hf, SHORT))
    convert(release, tmp_path / "release.gguf", "f32", progress=False)
    a, b = _core.read_gguf(str(path)), _core.read_gguf(str(tmp_path / "release.gguf"))
    assert sorted(t[:3] for t in a["tensors"]) == sorted(t[:3] for t in b["tensors"])  # names, types, shapes
    with load(path) as m:
        want = m.logits(LONG)
    with load(tmp_path / "release.gguf") as m:
        assert np.array_equal(m.logits(LONG), want)


def test_hy4_hyper_connections_are_in_the_file_and_the_plan():
    """The GGUF carries llama.cpp's hyper-connection keys and tensors (the mixing matrices F32, as its converter keeps
    them); the residual stream's 4 streams are in the state the planner counts, which is what the core allocates."""
    _, path = fixture_gguf("hy_v4")
    r = _core.read_gguf(str(path))
    kv, tensors = r["kv"], {t[0]: t for t in r["tensors"]}
    assert (kv["hy_v4.hyper_connection.count"], kv["hy_v4.hyper_connection.magnitude"]) == (4, 2.0)
    for name, shape in (
        ("blk.1.hc_attn_fn.weight", [256, 8]),
        ("blk.2.hc_ffn_base.weight", [8]),
        ("output_hc_fn.weight", [256, 4]),
        ("output_hc_scale.weight", [1]),
    ):
        assert list(tensors[name][2]) == shape
    with load(path, n_ctx=256, n_ubatch=64) as m:
        assert m.plan.kv_bytes == m.info()["kv_bytes"]


@pytest.mark.parametrize(
    "key, value, match",
    [
        ("hyper_connection.count", 1, "hyper_connection.count"),
        ("hyper_connection.count", 65, "hyper_connection.count"),
        ("hyper_connection.epsilon", float("nan"), "hyper_connection.count"),
        ("hyper_connection.magnitude", 0.0, "hyper_connection.count"),
        ("attention.indexer.key_length", 8, "key_length"),  # the indexer's RoPE on its tail needs dims before it
    ],
)
def test_bad_hyper_connection_keys_are_format_errors(key, value, match):
    from moelite.errors import ModelFormatError

    with pytest.raises(ModelFormatError, match=match):
        parse_edited("hy_v4", {f"hy_v4.{key}": value})
    with pytest.raises(ModelFormatError, match=key):
        parse_edited("hy_v4", {f"hy_v4.{key}": None})


# ---- GLM-5.3-Flash (glm5-next): mHC, KPool, NoPE MLA, its checkpoint layouts ----------------------------------------
GLM5 = "glm5_next_text"


def test_glm5_next_mhc_kpool_and_nope_mla_are_in_the_file_and_the_plan():
    """llama.cpp's glm5-next keys and tensors: mHC's mixes [(2 + 4) 4, 4 H] with base and 3 scales (F32), no output
    head tensors (the streams' mean), KPool's gate and slot biases (F32), rope dims 0 (the MLA cache holds the latent
    alone), the KDA decay's A as a [H] vector; the core allocates what the planner counts."""
    _, path = fixture_gguf(GLM5)
    r = _core.read_gguf(str(path))
    kv, tensors = r["kv"], {t[0]: t for t in r["tensors"]}
    assert kv["glm5-next.hyper_connection.count"] == 4 and kv["glm5-next.hyper_connection.sinkhorn_iterations"] == 20
    assert (kv["glm5-next.attention.indexer.kpool"], kv["glm5-next.attention.indexer.kpool_select_tail"]) == (2, True)
    assert kv["glm5-next.rope.dimension_count"] == 0 and kv["glm5-next.kda.gate_lower_bound"] == -5.0
    assert list(kv["glm5-next.attention.head_count_kv"]) == [0, 1, 1, 0]
    for name, shape in (
        ("blk.0.hc_attn_fn.weight", [256, 24]),
        ("blk.3.hc_ffn_base.weight", [24]),
        ("blk.1.hc_ffn_scale.weight", [3]),
        ("blk.1.indexer_compressor_gate.weight", [64, 64]),
        ("blk.1.indexer_compressor_ape.weight", [64, 2]),
        ("blk.1.attn_kv_a_mqa.weight", [64, 16]),
        ("blk.0.ssm_a", [4]),
    ):
        assert list(tensors[name][2]) == shape, name
    assert tensors["blk.1.indexer_compressor_ape.weight"][1] == 0  # F32
    assert not any(n.startswith(("output_hc", "blk.2.indexer")) for n in tensors)  # layer 2 shares layer 1's pools
    with load(path, n_ctx=256, n_ubatch=64) as m:
        assert m.plan.kv_bytes == m.info()["kv_bytes"]


def test_glm5_next_in_memory_layout_converts_to_the_same_model(tmp_path):
    """transformers holds GLM-5.3-Flash's weights under other names than it saves (fused q/k/v conv, fused experts,
    `attn_hc.fn`, `forget_gate.*`); a checkpoint written from its state_dict converts to the same model, bit for
    bit."""
    hf, path = fixture_gguf(GLM5)

    def in_memory(ts):
        out = {}
        for k, v in ts.items():
            if k.endswith("self_attn.k_conv1d.weight") or k.endswith("self_attn.v_conv1d.weight"):
                continue
            if k.endswith("self_attn.q_conv1d.weight"):
                pre = k[: -len("q_conv1d.weight")]
                out[pre + "conv1d.weight"] = np.concatenate([ts[f"{pre}{x}_conv1d.weight"] for x in "qkv"])
            elif ".mlp.experts." in k:
                pre = k[: k.index(".mlp.experts.") + len(".mlp.experts.")]
                if pre + "gate_up_proj" not in out:
                    n = 1 + max(int(x.split(".")[-3]) for x in ts if x.startswith(pre))
                    out[pre + "gate_up_proj"] = np.stack(
                        [
                            np.concatenate([ts[f"{pre}{e}.gate_proj.weight"], ts[f"{pre}{e}.up_proj.weight"]])
                            for e in range(n)
                        ]
                    )
                    out[pre + "down_proj"] = np.stack([ts[f"{pre}{e}.down_proj.weight"] for e in range(n)])
            else:
                for a, b in (
                    (".self_attn.f_", ".self_attn.forget_gate.f_"),
                    (".self_attn.A_log", ".self_attn.forget_gate.A_log"),
                    (".self_attn.dt_bias", ".self_attn.forget_gate.dt_bias"),
                    (".hc_attn_", ".attn_hc."),
                    (".hc_ffn_", ".ffn_hc."),
                ):
                    k = k.replace(a, b)
                out[k] = v
        return out

    held = edited_copy(hf, tmp_path / "hf", in_memory)
    names = set(read_fixture_tensors(held))
    assert "model.language_model.layers.0.self_attn.conv1d.weight" in names
    assert "model.language_model.layers.1.attn_hc.fn" in names
    assert "model.language_model.layers.1.mlp.experts.gate_up_proj" in names
    convert(held, tmp_path / "held.gguf", "f32", progress=False)
    with load(path) as m:
        want = m.logits(LONG)
    with load(tmp_path / "held.gguf") as m:
        assert np.array_equal(m.logits(LONG), want)


@pytest.mark.parametrize(
    "key, value, match",
    [
        ("hyper_connection.count", 3, "hyper_connection.count"),  # ggml's mHC ops take 4 streams
        ("hyper_connection.sinkhorn_iterations", 0, "sinkhorn_iterations"),
        ("attention.indexer.kpool", 3, "kpool"),  # does not divide top_k (16)
        ("attention.indexer.kpool", 1, "kpool"),
        ("attention.indexer.kpool_select_tail", False, "kpool_select_tail"),
        ("attention.indexer.types", [True, False, True, True], "layer 1 shares"),  # the first MLA layer
    ],
)
def test_bad_glm5_next_keys_are_format_errors(key, value, match):
    from moelite.errors import ModelFormatError

    with pytest.raises(ModelFormatError, match=match):
        parse_edited(GLM5, {f"glm5-next.{key}": value})


@pytest.mark.parametrize(
    "override, match",
    [
        ({"hc_mult": 2}, "hc_mult"),
        ({"index_kpool": 3}, "index_kpool"),
        ({"index_kpool_always_select_tail": False}, "index_kpool_always_select_tail"),
        (  # an MLA layer sharing the pools of a layer that is not the MLA layer right before it
            {
                "layer_types": ["linear_attention", "indexed_attention", "linear_attention", "indexed_attention"],
                "indexer_types": ["full", "full", "full", "shared"],
            },
            "indexer_types",
        ),
        ({"qk_rope_head_dim": 8}, "qk_rope_head_dim"),
        ({"linear_attn_config": {"num_heads": 2, "head_dim": 16, "short_conv_kernel_size": 4}}, "KDA heads"),
        (
            {
                "linear_attn_config": {
                    "num_heads": 4,
                    "head_dim": 16,
                    "short_conv_kernel_size": 4,
                    "gate_lower_bound": 1.0,
                }
            },
            "gate_lower_bound",
        ),
    ],
)
def test_bad_glm5_next_configs_are_refused_by_the_converter(override, match, tmp_path):
    from moelite.errors import ConversionError

    hf, _ = fixture_gguf(GLM5)
    d = edited_copy(hf, tmp_path / "hf", lambda ts: ts)
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "text_config": {**cfg["text_config"], **override}}))
    with pytest.raises(ConversionError, match=match):
        convert(d, tmp_path / "bad.gguf", "f32", progress=False)
    assert not (tmp_path / "bad.gguf").exists()
