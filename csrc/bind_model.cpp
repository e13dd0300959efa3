// pybind11 bindings of the Model (csrc/model.h): dict in, numpy out.
#include <cmath>
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "bindings.h"
#include "common.h"
#include "model.h"
#ifdef MOELITE_CUDA
#include "ggml-cuda.h"
#endif
#include "ggml-alloc.h"
#include "ggml-cpu.h"
#include <cstring>

namespace py = pybind11;
using namespace moelite;

template <typename T> static void get(const py::dict & d, const char * k, T & out) {
    if (d.contains(k) && !d[k].is_none()) out = d[k].cast<T>();
}

static HParams hparams_from(const py::dict & d) {
    HParams h;
    get(d, "arch", h.arch);
    get(d, "n_vocab", h.n_vocab);
    get(d, "n_embd", h.n_embd);
    get(d, "n_layer", h.n_layer);
    get(d, "n_mtp", h.n_mtp);
    if (h.n_mtp < 0 || h.n_mtp > 1) throw FormatError("n_mtp " + std::to_string(h.n_mtp) + ", expected 0 or 1");
    get(d, "n_head", h.n_head);
    get(d, "n_head_kv", h.n_head_kv);
    get(d, "n_embd_head_k", h.n_embd_head_k);
    get(d, "n_embd_head_v", h.n_embd_head_v);
    get(d, "norm_eps", h.norm_eps);
    get(d, "layernorm", h.layernorm);
    get(d, "qk_norm", h.qk_norm);
    get(d, "n_rot", h.n_rot);
    get(d, "rope_type", h.rope_type);
    get(d, "n_ctx_orig", h.n_ctx_orig);
    get(d, "freq_base", h.freq_base);
    get(d, "freq_scale", h.freq_scale);
    get(d, "ext_factor", h.ext_factor);
    get(d, "attn_factor", h.attn_factor);
    get(d, "beta_fast", h.beta_fast);
    get(d, "beta_slow", h.beta_slow);
    get(d, "kq_scale", h.kq_scale);
    get(d, "n_swa", h.n_swa);
    get(d, "q_lora_rank", h.q_lora_rank);
    get(d, "kv_lora_rank", h.kv_lora_rank);
    get(d, "n_expert", h.n_expert);
    get(d, "n_expert_used", h.n_expert_used);
    get(d, "n_layer_dense_lead", h.n_layer_dense_lead);
    get(d, "gating", h.gating);
    get(d, "weights_norm", h.weights_norm);
    get(d, "weights_scale", h.weights_scale);
    get(d, "n_group", h.n_group);
    get(d, "topk_group", h.topk_group);
    get(d, "jitter_eps", h.jitter_eps);
    get(d, "act", h.act);
    get(d, "moe_latent", h.moe_latent);
    get(d, "oai_alpha", h.oai_alpha);
    get(d, "oai_limit", h.oai_limit);
    get(d, "embd_scale", h.embd_scale);
    get(d, "residual_scale", h.residual_scale);
    get(d, "logit_scale", h.logit_scale);
    get(d, "qk_norm_after_rope", h.qk_norm_after_rope);
    get(d, "v_norm", h.v_norm);
    get(d, "weights_before_ffn", h.weights_before_ffn);
    get(d, "final_softcap", h.final_softcap);
    get(d, "attn_output_gate", h.attn_output_gate);
    get(d, "ssm_conv_kernel", h.ssm_conv_kernel);
    get(d, "ssm_d_state", h.ssm_d_state);
    get(d, "ssm_n_group", h.ssm_n_group);
    get(d, "ssm_dt_rank", h.ssm_dt_rank);
    get(d, "ssm_d_inner", h.ssm_d_inner);
    get(d, "deltanet_repeat_interleave", h.deltanet_repeat_interleave);
    get(d, "kda_gate_lb", h.kda_gate_lb);
    get(d, "kda_neg_a", h.kda_neg_a);
    get(d, "n_chunk", h.n_chunk);
    get(d, "attn_temp_scale", h.attn_temp_scale);
    get(d, "attn_temp_floor", h.attn_temp_floor);
    get(d, "attn_temp_offset", h.attn_temp_offset);
    get(d, "group_top2", h.group_top2);
    get(d, "parallel_residual", h.parallel_residual);
    get(d, "shexp_average", h.shexp_average);
    get(d, "attn_gate_softplus", h.attn_gate_softplus);
    get(d, "attn_value_scale", h.attn_value_scale);
    get(d, "indexer_n_head", h.indexer_n_head);
    get(d, "indexer_head_size", h.indexer_head_size);
    get(d, "indexer_top_k", h.indexer_top_k);
    get(d, "indexer_rope_type", h.indexer_rope_type);
    get(d, "indexer_rope_tail", h.indexer_rope_tail);
    get(d, "clamp_gate", h.clamp_gate);
    get(d, "hc_mult", h.hc_mult);
    get(d, "hc_kind", h.hc_kind);
    get(d, "hc_sinkhorn_iters", h.hc_sinkhorn_iters);
    get(d, "deltanet_gate_sigmoid", h.deltanet_gate_sigmoid);
    get(d, "ple_layer", h.ple_layer);
    get(d, "ple_ngram", h.ple_ngram);
    get(d, "ple_heads", h.ple_heads);
    get(d, "ple_conv_kernel", h.ple_conv_kernel);
    get(d, "ple_row_dim", h.ple_row_dim);
    get(d, "ple_eos", h.ple_eos);
    get(d, "ple_mult", h.ple_mult);
    get(d, "ple_offsets", h.ple_offsets);
    get(d, "ple_vocab", h.ple_vocab);
    if ((h.hc_mult == 0) != (h.hc_kind == HC_NONE) || h.hc_kind < HC_NONE || h.hc_kind > HC_MHC ||
        (h.hc_mult && h.n_mtp))
        throw FormatError("hyper-connections: kind " + std::to_string(h.hc_kind) + " with " +
                          std::to_string(h.hc_mult) + " streams (and no MTP block: its graph has no streams)");
    // mHC: ggml's comb op (ggml_dsv4_hc_comb) is built for 4 streams, as llama.cpp requires
    if (h.hc_kind == HC_MHC && (h.hc_mult != 4 || h.hc_sinkhorn_iters < 1 || h.hc_sinkhorn_iters > 1000))
        throw FormatError("mHC: hyper_connection.count " + std::to_string(h.hc_mult) + ", sinkhorn_iterations " +
                          std::to_string(h.hc_sinkhorn_iters) + ": expected 4 streams and 1..1000 iterations");
    if (h.ple_layer >= 0) {
        const int n_prev = h.ple_ngram - 1;
        bool ok = h.ple_ngram >= 2 && h.ple_ngram <= 8 && h.ple_heads > 0 && h.ple_heads <= 1024 &&
                  h.ple_heads % n_prev == 0 && h.ple_row_dim > 0 && h.ple_row_dim <= (1 << 16) &&
                  h.ple_conv_kernel >= 1 && h.ple_conv_kernel <= 16 && h.ple_eos >= 0 && h.ple_eos < h.n_vocab &&
                  (int) h.ple_mult.size() == h.ple_ngram && (int) h.ple_offsets.size() == h.ple_heads &&
                  (int) h.ple_vocab.size() == h.ple_heads;
        for (size_t i = 0; ok && i < h.ple_vocab.size(); ++i)
            ok = h.ple_vocab[i] > 0 && h.ple_offsets[i] < (1ull << 48);
        if (!ok)
            throw FormatError(
                "PLE: ple.ngram_size " + std::to_string(h.ple_ngram) + ", heads " + std::to_string(h.ple_heads) +
                ", row dim " + std::to_string(h.ple_row_dim) + ", conv kernel " + std::to_string(h.ple_conv_kernel) +
                ", eos " + std::to_string(h.ple_eos) +
                ": expected 2..8-grams, heads a multiple of ngram - 1 with an offset and a vocabulary > 0 "
                "each, ngram multipliers, a conv kernel of 1..16 and the EOS id in the vocabulary");
    }
    get(d, "hc_eps", h.hc_eps);
    get(d, "hc_magnitude", h.hc_magnitude);
    if (h.hc_mult < 0 || h.hc_mult == 1 || h.hc_mult > 64 || !std::isfinite(h.hc_eps) || h.hc_eps < 0.f ||
        !std::isfinite(h.hc_magnitude) || h.hc_magnitude <= 0.f)
        throw FormatError("hyper_connection.count " + std::to_string(h.hc_mult) + ", epsilon " +
                          std::to_string(h.hc_eps) + ", magnitude " + std::to_string(h.hc_magnitude) +
                          ": expected 0 or 2..64 streams, epsilon >= 0, magnitude > 0");
    if (h.n_expert_used > 64) throw FormatError("n_expert_used > 64 is not supported");
    if (h.act < ACT_SILU || h.act > ACT_RELU_SQR)
        throw FormatError("act " + std::to_string(h.act) + " is out of range");
    if (h.moe_latent < 0 || h.moe_latent > (1 << 20)) throw FormatError("moe_latent_size is out of range");
    // the layer plan: one list per field, [n_layer + n_mtp] each (runtime/hparams.py layer_plan, with_mtp)
    std::vector<int> mixer, ffn, mask, n_head_kv, head_k, head_v, n_rot, rope_factors, attn_temp;
    const size_t n = (size_t) std::max(h.n_layer, 0) + (size_t) h.n_mtp;
    std::vector<int> n_head(n, h.n_head), rope_scaling(n, 1), rotate(n, 1), indexer(n, INDEXER_NONE),
        compress(n, 0);                                                             // optional
    std::vector<float> freq_base, kq_scale, clamp_exp(n, 0.f), clamp_shexp(n, 0.f); // optional lists: no clamps
    get(d, "layer_mixer", mixer);
    get(d, "layer_ffn", ffn);
    get(d, "layer_mask", mask);
    get(d, "layer_n_head_kv", n_head_kv);
    get(d, "layer_head_k", head_k);
    get(d, "layer_head_v", head_v);
    get(d, "layer_n_rot", n_rot);
    get(d, "layer_rope_factors", rope_factors);
    get(d, "layer_attn_temp", attn_temp);
    get(d, "layer_freq_base", freq_base);
    get(d, "layer_kq_scale", kq_scale);
    get(d, "layer_n_head", n_head);
    get(d, "layer_rope_scaling", rope_scaling);
    get(d, "layer_rotate", rotate);
    get(d, "layer_clamp_exp", clamp_exp);
    get(d, "layer_clamp_shexp", clamp_shexp);
    get(d, "layer_indexer", indexer);
    get(d, "layer_compress", compress);
    for (auto * v : {&mixer, &ffn, &mask, &n_head, &n_head_kv, &head_k, &head_v, &n_rot, &rope_factors, &attn_temp,
                     &rope_scaling, &rotate, &indexer, &compress})
        if (v->size() != n) throw FormatError("layer plan: a per-layer list does not have n_layer + n_mtp entries");
    if (freq_base.size() != n || kq_scale.size() != n || clamp_exp.size() != n || clamp_shexp.size() != n)
        throw FormatError("layer plan: a per-layer list does not have n_layer + n_mtp entries");
    h.plan.resize(n);
    int pool = 0; // the pool size of the layers whose indexer keys are pooled (QSA, KPool)
    for (size_t i = 0; i < n; ++i) {
        LayerPlan & p = h.plan[i];
        p.mixer = mixer[i];
        p.ffn = ffn[i];
        p.mask = mask[i];
        p.n_head_kv = n_head_kv[i];
        p.head_k = head_k[i];
        p.head_v = head_v[i];
        p.n_rot = n_rot[i];
        p.rope_factors = rope_factors[i] != 0;
        p.attn_temp = attn_temp[i] != 0;
        p.freq_base = freq_base[i];
        p.kq_scale = kq_scale[i];
        p.n_head = n_head[i];
        p.rope_scaling = rope_scaling[i] != 0;
        p.rotate = rotate[i] != 0;
        p.clamp_exp = clamp_exp[i];
        p.clamp_shexp = clamp_shexp[i];
        p.indexer = indexer[i];
        p.compress = compress[i];
        const bool qsa = p.indexer == INDEXER_QSA;
        // pooled keys (QSA, KPool, KPool's shared layers): one pool size for the model, dividing top_k
        const bool pooled = qsa || p.indexer == INDEXER_KPOOL || (p.indexer == INDEXER_SHARED && p.compress);
        int src = -1; // a shared layer's source: the last layer before it that runs its own indexer
        for (size_t j = 0; j < i; ++j)
            if (indexer[j] != INDEXER_NONE && indexer[j] != INDEXER_SHARED) src = (int) j;
        const bool dsa_ok =
            h.indexer_n_head > 0 && h.indexer_head_size >= p.n_rot + (h.indexer_rope_tail ? 1 : 0) &&
            h.indexer_top_k > 0 && (qsa ? p.mixer == MIXER_ATTN : p.mixer == MIXER_MLA) &&
            (!pooled || (p.compress >= (qsa ? 1 : 2) && p.compress <= 4096 && h.indexer_top_k % p.compress == 0 &&
                         (pool == 0 || pool == p.compress))) &&
            (pooled || p.compress == 0) &&
            (p.indexer != INDEXER_SHARED ||
             (src >= 0 && indexer[src] == (p.compress ? INDEXER_KPOOL : INDEXER_FULL) && compress[src] == p.compress));
        if (pooled) pool = p.compress;
        if (p.indexer < INDEXER_NONE || p.indexer > INDEXER_KPOOL || (p.indexer != INDEXER_NONE && !dsa_ok))
            throw FormatError(
                "layer plan of layer " + std::to_string(i) + ": DSA indexer " + std::to_string(p.indexer) +
                " (pool size " + std::to_string(p.compress) +
                ") needs an MLA layer (QSA: an attention layer), indexer heads / key length >= n_rot / "
                "top_k > 0, one pool size of 1..4096 (KPool: 2..) dividing top_k where keys are pooled, and a layer "
                "with its own indexer of the same kind before a shared one");
        if (!(p.clamp_exp >= 0.f && p.clamp_exp < INFINITY && p.clamp_shexp >= 0.f && p.clamp_shexp < INFINITY))
            throw FormatError("layer plan of layer " + std::to_string(i) + ": a SwiGLU clamp is negative / not finite");
        if (p.mixer < MIXER_ATTN || p.mixer > MIXER_LAST || p.ffn < FFN_DENSE || p.ffn > FFN_NONE ||
            p.mask < MASK_CAUSAL || p.mask > MASK_CHUNKED || p.n_head_kv <= 0 || p.n_head <= 0 || p.n_head > h.n_head ||
            p.n_head % p.n_head_kv || p.head_k <= 0 || p.head_v <= 0 || p.n_rot < 0 || p.n_rot > p.head_k)
            throw FormatError("layer plan of layer " + std::to_string(i) + " is out of range");
    }
    bool shortconv = false, deltanet = false, mamba2 = false, kda = false;
    for (const LayerPlan & p : h.plan) {
        shortconv |= p.mixer == MIXER_SHORTCONV;
        deltanet |= p.mixer == MIXER_DELTANET;
        mamba2 |= p.mixer == MIXER_MAMBA2;
        kda |= p.mixer == MIXER_KDA;
    }
    if (!(h.kda_gate_lb <= 0.f && std::isfinite(h.kda_gate_lb)))
        throw FormatError("KDA layers: kda.gate_lower_bound " + std::to_string(h.kda_gate_lb) +
                          ", expected finite and < 0 (0: no bounded gate)");
    if (kda && (h.ssm_d_state <= 0 || h.ssm_d_state > 4096 || h.ssm_dt_rank <= 0 || h.ssm_dt_rank > 4096 ||
                h.ssm_d_inner != h.ssm_d_state * h.ssm_dt_rank))
        throw FormatError("KDA layers: kda.head_dim " + std::to_string(h.ssm_d_state) + ", heads " +
                          std::to_string(h.ssm_dt_rank) + ", inner " + std::to_string(h.ssm_d_inner) +
                          ": expected 1..4096 each, inner = heads x head_dim");
    if (mamba2 && (h.ssm_d_state <= 0 || h.ssm_n_group <= 0 || h.ssm_dt_rank <= 0 || h.ssm_d_inner <= 0 ||
                   h.ssm_d_inner % h.ssm_dt_rank || h.ssm_d_inner % h.ssm_n_group || h.ssm_dt_rank % h.ssm_n_group))
        throw FormatError("Mamba2 layers: ssm.state_size " + std::to_string(h.ssm_d_state) + ", group_count " +
                          std::to_string(h.ssm_n_group) + ", time_step_rank " + std::to_string(h.ssm_dt_rank) +
                          ", inner_size " + std::to_string(h.ssm_d_inner) +
                          ": expected positive, inner_size a multiple of the heads and of the groups");
    if ((shortconv || deltanet || mamba2 || kda) && (h.ssm_conv_kernel < 2 || h.ssm_conv_kernel > 64))
        throw FormatError("recurrent layers: conv kernel " + std::to_string(h.ssm_conv_kernel) + ", expected 2..64");
    if (deltanet &&
        (h.ssm_d_state <= 0 || h.ssm_n_group <= 0 || h.ssm_dt_rank <= 0 || h.ssm_dt_rank % h.ssm_n_group ||
         h.ssm_d_inner <= 0 || h.ssm_d_inner % h.ssm_dt_rank || h.ssm_d_inner / h.ssm_dt_rank != h.ssm_d_state))
        throw FormatError("Gated DeltaNet layers: ssm.state_size " + std::to_string(h.ssm_d_state) + ", group_count " +
                          std::to_string(h.ssm_n_group) + ", time_step_rank " + std::to_string(h.ssm_dt_rank) +
                          ", inner_size " + std::to_string(h.ssm_d_inner) +
                          ": expected v heads a multiple of k heads and inner_size = v heads x state_size");
    return h;
}

static ModelOptions options_from(const py::dict & d) {
    ModelOptions o;
    get(d, "n_ctx", o.n_ctx);
    get(d, "n_threads", o.n_threads);
    get(d, "n_ubatch", o.n_ubatch);
    int kv = (int) o.kv_type;
    get(d, "kv_type", kv);
    o.kv_type = (ggml_type) kv;
    get(d, "expert_slots", o.expert_slots);
    get(d, "policy", o.policy);
    get(d, "window_m", o.window_m);
    get(d, "prefetch", o.prefetch);
    get(d, "prefetch_depth", o.prefetch_depth);
    get(d, "n_io_threads", o.n_io_threads);
    get(d, "device", o.device);
    get(d, "gpu", o.gpu);
    get(d, "host_slots", o.host_slots);
    get(d, "cpu_compute", o.cpu_compute);
    get(d, "flash_attn", o.flash_attn);
    get(d, "repack", o.repack);
    get(d, "fused_graph", o.fused_graph);
    get(d, "expert_gemm", o.expert_gemm);
    get(d, "scratch_reserve", o.scratch_reserve);
    get(d, "decode_attn", o.decode_attn);
    get(d, "prompt_attn", o.prompt_attn);
    get(d, "overlap_reads", o.overlap_reads);
    get(d, "standin_path", o.standin_path);
    get(d, "standin_slots", o.standin_slots);
    get(d, "standin_threshold", o.standin_threshold);
    get(d, "swap_threshold", o.swap_threshold);
    get(d, "mlock", o.mlock);
    get(d, "ple_cache_bytes", o.ple_cache_bytes);
    if (o.prefetch_depth < 1 || o.prefetch_depth > kMaxLookahead)
        throw BudgetError("prefetch_depth must be in [1, " + std::to_string(kMaxLookahead) + "]");
    if (o.cpu_compute < 0 || o.cpu_compute > 2)
        throw BudgetError("cpu_compute must be 0 (never), 1 (auto) or 2 (always)");
    return o;
}

static py::dict layer_stats(const LayerStats & s) {
    py::dict d;
    d["hits"] = s.hits;
    d["misses"] = s.misses;
    d["prefetch_issued"] = s.prefetch_issued;
    d["prefetch_hits"] = s.prefetch_hits;
    d["prefetch_wasted"] = s.prefetch_wasted;
    d["prefetch_far_issued"] = s.prefetch_far_issued;
    d["prefetch_far_hits"] = s.prefetch_far_hits;
    d["bytes_read"] = s.bytes_read;
    d["overlapped"] = s.overlapped;
    d["loads"] = s.loads;
    d["evictions"] = s.evictions;
    d["stall_s"] = s.stall_s;
    d["wait_s"] = s.wait_s;
    d["book_s"] = s.book_s;
    d["promoted"] = s.promoted;
    return d;
}

void bind_model(py::module_ & m) {
    py::class_<Model>(m, "Model")
        .def(py::init([](const std::string & path, const py::dict & hp, const py::dict & opt) {
                 HParams h = hparams_from(hp);
                 ModelOptions o = options_from(opt);
                 py::gil_scoped_release nogil;
                 return new Model(path, h, o);
             }),
             py::arg("path"), py::arg("hparams"), py::arg("options"))
        .def(
            "eval",
            [](Model & m, py::array_t<int32_t, py::array::c_style | py::array::forcecast> tokens, int n_out) {
                const int n = (int) tokens.size();
                if (n_out < 0 || n_out > n) n_out = n;
                py::array_t<float> logits({(py::ssize_t) n_out, (py::ssize_t) m.hparams().n_vocab});
                const int32_t * tp = tokens.data();
                float * lp = logits.mutable_data();
                {
                    py::gil_scoped_release nogil;
                    m.eval(tp, n, n_out, lp);
                }
                return logits;
            },
            py::arg("tokens"), py::arg("n_out") = 1,
            "evaluate tokens after the cached context; returns logits [n_out, n_vocab] of the last n_out tokens")
        .def(
            "mtp_draft",
            [](Model & m, int32_t token, int n_max) {
                // -> (draft ids, logits of the first draft's row [n_vocab] or None)
                n_max = std::max(0, std::min(n_max, 64));
                std::vector<int32_t> out((size_t) n_max);
                py::array_t<float> l0((py::ssize_t) m.hparams().n_vocab);
                float * lp = l0.mutable_data();
                int n;
                {
                    py::gil_scoped_release nogil;
                    n = m.mtp_draft(token, n_max, out.data(), lp);
                }
                out.resize((size_t) n);
                return py::make_tuple(out, n ? py::object(l0) : py::object(py::none()));
            },
            py::arg("token"), py::arg("n_max"),
            "greedy MTP drafts after `token` (the token that follows the cached context), at most n_max (<= 64)")
        .def_property_readonly("mtp_ready", &Model::mtp_ready)
        .def("reset", &Model::reset)
        .def("truncate", &Model::truncate)
        .def_property_readonly("recurrent", &Model::recurrent)
        .def_property_readonly("state_bytes", &Model::state_bytes)
        .def("save_state",
             [](const Model & m) {
                 std::vector<uint8_t> s = m.save_state();
                 return py::bytes(reinterpret_cast<const char *>(s.data()), s.size());
             })
        .def("load_state",
             [](Model & m, py::bytes blob, int n_past) {
                 std::string s = blob;
                 m.load_state(reinterpret_cast<const uint8_t *>(s.data()), s.size(), n_past);
             })
        .def_property_readonly("n_past", &Model::n_past)
        .def_readwrite("record_routes", &Model::record_routes)
        .def(
            "take_routes",
            [](Model & m) {
                // -> ids [n_tokens, n_moe_layers, k] int32, weights (same shape) float32, moe layer indices
                const int K = m.hparams().n_expert_used;
                std::vector<int> layers;
                for (size_t il = 0; il < m.route_ids.size(); ++il)
                    if (!m.route_ids[il].empty()) layers.push_back((int) il);
                const size_t n_tok = layers.empty() ? 0 : m.route_ids[layers[0]].size() / K;
                py::array_t<int32_t> ids({(py::ssize_t) n_tok, (py::ssize_t) layers.size(), (py::ssize_t) K});
                py::array_t<float> w({(py::ssize_t) n_tok, (py::ssize_t) layers.size(), (py::ssize_t) K});
                for (size_t li = 0; li < layers.size(); ++li)
                    for (size_t t = 0; t < n_tok; ++t)
                        for (int j = 0; j < K; ++j) {
                            ids.mutable_at(t, li, j) = m.route_ids[layers[li]][t * K + j];
                            w.mutable_at(t, li, j) = m.route_w[layers[li]][t * K + j];
                        }
                // lookahead predictions [n_tokens, n_moe_layers, kMaxLookahead, k]: [t, l, d] = layer l's experts as
                // predicted d + 1 MoE layers before it (-1 where none: no MoE layer that far before)
                const py::ssize_t D = kMaxLookahead;
                py::array_t<int32_t> la({(py::ssize_t) n_tok, (py::ssize_t) layers.size(), D, (py::ssize_t) K});
                for (size_t li = 0; li < layers.size(); ++li)
                    for (int d = 0; d < D; ++d) {
                        const auto & src = m.route_la[d];
                        const bool have = (size_t) layers[li] < src.size() && src[layers[li]].size() == n_tok * K;
                        for (size_t t = 0; t < n_tok; ++t)
                            for (int j = 0; j < K; ++j)
                                la.mutable_at(t, li, d, j) = have ? src[layers[li]][t * K + j] : -1;
                    }
                m.route_ids.clear();
                m.route_w.clear();
                for (auto & v : m.route_la) v.clear();
                return py::make_tuple(ids, w, layers, la);
            },
            "routing recorded since the last call")
        .def(
            "step_routes",
            [](Model & m) {
                // -> per layer: int32 [T, k] expert ids of the last ubatch's rows, or None (no routed experts)
                const int K = m.hparams().n_expert_used;
                py::list out;
                for (int il = 0; il < m.hparams().n_layer; ++il) {
                    const std::vector<int32_t> * v = (size_t) il < m.step_ids.size() ? &m.step_ids[il] : nullptr;
                    if (!v || v->empty() || K <= 0) {
                        out.append(py::none());
                        continue;
                    }
                    py::array_t<int32_t> a({(py::ssize_t) (v->size() / K), (py::ssize_t) K});
                    std::memcpy(a.mutable_data(), v->data(), v->size() * sizeof(int32_t));
                    out.append(a);
                }
                return out;
            },
            "routing of the last evaluated ubatch, per layer")
        .def(
            "resident_mask",
            [](Model & m) {
                // -> uint8 [n_layer, n_expert]: 1 where the expert is held (or on its way) in the first tier
                const int L = m.hparams().n_layer, E = m.hparams().n_expert;
                py::array_t<uint8_t> a({(py::ssize_t) L, (py::ssize_t) E});
                uint8_t * p = a.mutable_data();
                for (int il = 0; il < L; ++il)
                    for (int e = 0; e < E; ++e)
                        p[(size_t) il * E + e] = m.cache().has_layer(il) && m.cache().resident(il, e) ? 1 : 0;
                return a;
            },
            "which (layer, expert) the expert cache holds now")
        .def("memory",
             [](Model & m) {
                 py::dict d;
                 d["dense_bytes"] = m.dense_bytes();
                 d["kv_bytes"] = m.kv_bytes();
                 d["arena_bytes"] = m.cache().arena_bytes();
                 d["standin_arena_bytes"] = m.standins() ? m.standins()->arena_bytes() : 0; // same budget
                 d["scratch_bytes"] = m.scratch_bytes();
                 const RepackInfo r = m.repack_info(); // what sits in ggml's CPU_REPACK buffers
                 d["repack_available"] = r.available;
                 d["fused_graph"] = m.fused_ok();
                 d["repacked_tensors"] = r.dense_tensors;
                 d["repacked_dense_bytes"] = r.dense_bytes;
                 d["repacked_arena_bytes"] = r.arena_bytes;
                 d["repack_tiled_prompts"] = r.tiled_prompts;
                 d["repack_q4_K_packer"] = r.q4_K_packer;
                 // mlock (ModelOptions::mlock): bytes locked, bytes refused and the first errno (0: none)
                 const LockInfo & lk = m.lock_info();
                 d["mlock"] = lk.requested;
                 d["locked_bytes"] = lk.locked_bytes;
                 d["lock_failed_bytes"] = lk.failed_bytes;
                 d["lock_errno"] = lk.err;
                 d["dense_mmap"] = m.dense_mapped(); // MOELITE_DENSE_MMAP=1: dense weights in the page cache
                 d["ple_cache_bytes"] = m.ple_stats().cache_bytes; // PLE table rows cached (Qwen4-Exp), 0: none
                 return d;
             })
        .def(
            "ple_stats",
            [](Model & m) {
                const PleStats s = m.ple_stats();
                py::dict d;
                d["bytes_read"] = s.bytes_read;
                d["rows_read"] = s.rows_read;
                d["rows_hit"] = s.rows_hit;
                d["cache_bytes"] = s.cache_bytes;
                return d;
            },
            "the PLE table's rows read from the file and found in the row cache since load")
        .def("cache_stats",
             [](Model & m) {
                 py::list out;
                 for (auto & L : m.cache().layers())
                     out.append(L.pool >= 0 ? py::object(layer_stats(L.stats)) : py::none());
                 return out;
             })
        .def("cache_quotas",
             [](Model & m) {
                 std::vector<int> q;
                 for (auto & L : m.cache().layers()) q.push_back(L.quota);
                 return q;
             })
        .def("tier2_stats",
             [](Model & m) {
                 // RAM tier (tiering.h) per layer: hits = served from RAM, misses = read from the file; None
                 // without a tier 2
                 py::list out;
                 if (!m.tier2()) return py::object(py::none());
                 for (auto & L : m.tier2()->layers())
                     out.append(L.pool >= 0 ? py::object(layer_stats(L.stats)) : py::none());
                 return py::object(out);
             })
        .def("tier2_quotas",
             [](Model & m) {
                 std::vector<int> q;
                 if (m.tier2())
                     for (auto & L : m.tier2()->layers()) q.push_back(L.quota);
                 return q;
             })
        .def("standin_stats",
             [](Model & m) {
                 // stand-in cache (standin_path) per layer: hits = stand-ins in memory, misses = read from the side
                 // file; None without stand-ins
                 if (!m.standins()) return py::object(py::none());
                 py::list out;
                 for (auto & L : m.standins()->layers())
                     out.append(L.pool >= 0 ? py::object(layer_stats(L.stats)) : py::none());
                 return py::object(out);
             })
        .def(
            "standin_uses", [](Model & m) { return m.standin_uses(); },
            "per layer: routed experts computed with their low-bit stand-in (standin_threshold > 0)")
        .def(
            "decode_times",
            [](Model & m) {
                const Model::DecodeTimes & t = m.decode_times();
                py::dict d;
                d["steps"] = t.steps;
                d["step_s"] = t.step_s;
                d["wait_s"] = t.wait_s;
                d["book_s"] = t.book_s;
                return d;
            },
            "decode steps since reset_stats(): their seconds, the cache's waits for reads and its bookkeeping")
        .def(
            "gemm_experts", [](Model & m) { return m.gemm_experts(); },
            "per layer: experts run as per-expert 2-D matmuls (expert_gemm, CPU prompt ubatches)")
        .def(
            "swaps", [](Model & m) { return m.swaps(); },
            "per layer: routed experts replaced by a resident one (cache-aware routing, swap_threshold > 0)")
        .def(
            "cpu_experts", [](Model & m) { return m.cpu_experts(); },
            "per layer: routed experts run by the CPU from the RAM tier instead of being copied to the arena")
        .def(
            "costs",
            [](Model & m) {
                const CostModel & c = m.costs();
                py::dict d;
                d["h2d_bytes_per_s"] = c.h2d_bytes_per_s;
                d["expert_bytes"] = c.expert_bytes;
                d["cpu_fixed_s"] = c.cpu_fixed_s;
                d["cpu_per_token_s"] = c.cpu_per_token_s;
                d["gpu_fixed_s"] = c.gpu_fixed_s;
                d["gpu_per_token_s"] = c.gpu_per_token_s;
                return d;
            },
            "the tiering cost model measured at load (zeros without a RAM tier)")
        .def("reset_stats", &Model::reset_stats)
        .def("reopen", [](Model & m) {
            m.cache().reopen();
            if (m.tier2()) m.tier2()->reopen();
        });
    // The tiering decision (tiering.h) on given numbers, for tests and `moelite plan`.
    m.def(
        "tier_costs",
        [](const py::dict & c, int n, double reuse) {
            CostModel cm;
            get(c, "h2d_bytes_per_s", cm.h2d_bytes_per_s);
            get(c, "expert_bytes", cm.expert_bytes);
            get(c, "cpu_fixed_s", cm.cpu_fixed_s);
            get(c, "cpu_per_token_s", cm.cpu_per_token_s);
            get(c, "gpu_fixed_s", cm.gpu_fixed_s);
            get(c, "gpu_per_token_s", cm.gpu_per_token_s);
            py::dict d;
            d["copy_s"] = cm.valid() ? copy_cost(cm, n, reuse) : 0.0;
            d["cpu_s"] = cpu_cost(cm, n);
            d["auto_on_cpu"] = run_on_cpu(cm, CpuCompute::AUTO, n, reuse);
            return d;
        },
        py::arg("costs"), py::arg("n_tokens"), py::arg("reuse"),
        "seconds to copy + run on the device vs run on the CPU, and the cost model's choice");
    m.def(
        "cuda_device_count",
        [] {
#ifdef MOELITE_CUDA
            return ggml_backend_cuda_get_device_count();
#else
            return 0;
#endif
        },
        "CUDA devices visible to this build (0 without MOELITE_CUDA)");
    // Kernel check hook: ggml_mul_mat_id over an arena built exactly like the expert cache builds its pools.
    // arena: uint8 [n_slots, slot_bytes] (each slot: ne1 rows of type, padded), x: f32 [T, ne0],
    // slot_ids: int32 [T, k] -> f32 [T, k, ne1]
    m.def("arena_mul_mat_id",
          [](py::array_t<uint8_t, py::array::c_style> arena, int type, int64_t ne0, int64_t ne1,
             py::array_t<float, py::array::c_style | py::array::forcecast> x,
             py::array_t<int32_t, py::array::c_style | py::array::forcecast> slot_ids, int n_threads) {
              if (!valid_ggml_type(type) || ne0 % ggml_blck_size((ggml_type) type) != 0)
                  throw FormatError("arena_mul_mat_id: bad type or row length");
              const int n_slots = (int) arena.shape(0);
              const uint64_t slot_bytes = (uint64_t) arena.shape(1);
              if (slot_bytes < ggml_row_size((ggml_type) type, ne0) * ne1)
                  throw FormatError("arena_mul_mat_id: slots too small");
              const int64_t T = x.shape(0), K = slot_ids.shape(1);
              if (x.shape(1) != ne0 || slot_ids.shape(0) != T) throw FormatError("arena_mul_mat_id: shape mismatch");
              for (py::ssize_t i = 0; i < slot_ids.size(); ++i)
                  if (slot_ids.data()[i] < 0 || slot_ids.data()[i] >= n_slots)
                      throw FormatError("arena_mul_mat_id: slot id out of range");
              ggml_init_params ip = {ggml_tensor_overhead() * 16 + ggml_graph_overhead(), nullptr, true};
              ggml_context * ctx = ggml_init(ip);
              void * mem = nullptr; // page-aligned copy, as the cache allocates its pools
              if (posix_memalign(&mem, 4096, (size_t) n_slots * slot_bytes) != 0) throw BudgetError("out of memory");
              std::memcpy(mem, arena.data(), (size_t) n_slots * slot_bytes);
              ggml_backend_buffer_t abuf = ggml_backend_cpu_buffer_from_ptr(mem, (size_t) n_slots * slot_bytes);
              ggml_tensor * as = make_arena_tensor(ctx, abuf, mem, (ggml_type) type, ne0, ne1, n_slots, slot_bytes);
              ggml_tensor * b = ggml_new_tensor_3d(ctx, GGML_TYPE_F32, ne0, 1, T);
              ggml_tensor * ids = ggml_new_tensor_2d(ctx, GGML_TYPE_I32, K, T);
              ggml_tensor * y = ggml_mul_mat_id(ctx, as, b, ids);
              ggml_cgraph * gf = ggml_new_graph(ctx);
              ggml_build_forward_expand(gf, y);
              ggml_backend_t be = ggml_backend_cpu_init();
              ggml_backend_cpu_set_n_threads(be, n_threads);
              ggml_gallocr_t ga = ggml_gallocr_new(ggml_backend_get_default_buffer_type(be));
              ggml_gallocr_alloc_graph(ga, gf);
              ggml_backend_tensor_set(b, x.data(), 0, ggml_nbytes(b));
              ggml_backend_tensor_set(ids, slot_ids.data(), 0, ggml_nbytes(ids));
              ggml_backend_graph_compute(be, gf);
              py::array_t<float> out({(py::ssize_t) T, (py::ssize_t) K, (py::ssize_t) ne1});
              ggml_backend_tensor_get(y, out.mutable_data(), 0, ggml_nbytes(y));
              ggml_gallocr_free(ga);
              ggml_backend_free(be);
              ggml_backend_buffer_free(abuf);
              free(mem);
              ggml_free(ctx);
              return out;
          });
    m.def(
        "expert_bytes",
        [](const std::string & path, int il) {
            GGUFIndex idx(path);
            auto f = [&](const char * n) {
                const TensorInfo * t = idx.find("blk." + std::to_string(il) + "." + n);
                if (!t) throw FormatError(path + ": missing tensor 'blk." + std::to_string(il) + "." + n + "'");
                return t;
            };
            const TensorInfo * gate = idx.find("blk." + std::to_string(il) + ".ffn_gate_exps.weight"); // none: ReLU²
            return ExpertCache::expert_bytes(gate, *f("ffn_up_exps.weight"), *f("ffn_down_exps.weight"));
        },
        "bytes one expert of layer il takes in a cache slot (3 matrices, or 2 without a gate, each padded to 4096)");
}
