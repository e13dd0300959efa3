// FFN block: routed experts (+ shared expert, + Gemma-4's parallel dense MLP), graph B of a MoE layer.
//
//   router_logits:  h [n_embd, T] -> [n_embd -> n_expert] logits (graph A; routing itself is on the host)
//   expert_ffn:     hb [n_embd, 1 or K, T'] -> per-expert outputs [n_embd, K', T'] via mul_mat_id over slots
//                   (latent MoE, Nemotron-3 Super: n_embd_exp = L wide, hb = ffn_latent_down hn, computed in graph A)
//   combine:        weighted sum (-> ffn_latent_up) + shared expert + parallel dense -> residual -> x
// Two ways to run a layer's experts, bit-identical: one pass when its distinct experts fit the layer's slots
// (run_experts), else expert-major groups (run_expert_pairs per group, then run_combine).
// Prompt ubatches on the CPU (expert_gemm(T)) take a third way in every case: each expert's tokens gathered into
// one 2-D matmul per matrix (expert_ffn_rows), so ggml's repacked GEMM runs 4 tokens per pass over the weights
// (mul_mat_id runs one GEMV per token); which way runs depends on T alone, so offloading still changes no bit.
#include <algorithm>
#include <cmath>

#include "graph_util.h"
#include "model.h"

namespace moelite {

// Router logits of layer il for the residual stream h [n_embd, T]; hn = the experts' (normed) input when the
// caller has it already. Gemma-4's router has its own input: rms_norm(h) / sqrt(n_embd) * scale.
ggml_tensor * Model::router_logits(ggml_context * ctx, int il, ggml_tensor * h, ggml_tensor * hn) {
    Layer & L = layers_[il];
    ggml_tensor * in;
    if (L.gate_inp_s) {
        in = ggml_scale(ctx, ggml_rms_norm(ctx, h, hp_.norm_eps), 1.0f / std::sqrt((float) hp_.n_embd));
        in = ggml_mul(ctx, in, L.gate_inp_s);
    } else {
        in = hn ? hn : expert_input(ctx, il, h);
    }
    ggml_tensor * logits = ggml_mul_mat(ctx, L.gate_inp, in); // [n_expert, T]
    if (L.gate_inp_b) logits = ggml_add(ctx, logits, L.gate_inp_b);
    return logits;
}

// The experts' input: ffn_norm(h), or Gemma-4's separate pre-norm of the expert path. Parallel blocks (Command-R)
// norm the layer's input with attn_norm: what the next layer's gate lookahead applies to h.
ggml_tensor * Model::expert_input(ggml_context * ctx, int il, ggml_tensor * h) {
    Layer & L = layers_[il];
    if (hp_.parallel_residual) return norm(ctx, h, L.attn_norm, L.attn_norm_b);
    if (!L.ffn_norm && !L.ffn_exp_norm) return h; // gated hyper-connections: their mixture is normed (Qwen4-Exp)
    return L.ffn_exp_norm ? norm(ctx, h, L.ffn_exp_norm, nullptr) : norm(ctx, h, L.ffn_norm, L.ffn_norm_b);
}

// Routed experts of layer il through the slot arenas: hb [n_embd, 1, T'] with slot ids / expert ids [K', T']
// -> per-expert outputs before weighting [n_embd, K', T']. Each output column depends only on its own
// token and expert, whatever else is in the batch: the single-pass and the expert-major paths agree bit for bit.
ggml_tensor * Model::expert_ffn(ggml_context * ctx, int il, const Pool & P, ggml_tensor * hb, ggml_tensor * slots,
                                ggml_tensor * eids) {
    Layer & L = layers_[il];
    ggml_tensor * g = P.arena[0] ? ggml_mul_mat_id(ctx, P.arena[0], hb, slots) : nullptr; // [n_ff, K', T'] or none
    ggml_tensor * u = ggml_mul_mat_id(ctx, P.arena[1], hb, slots);                        // [n_ff, K', T']
    if (g && L.gate_exps_b) g = ggml_add_id(ctx, g, L.gate_exps_b, eids);
    if (L.up_exps_b) u = ggml_add_id(ctx, u, L.up_exps_b, eids);
    ggml_tensor * a = glu(ctx, g, u, hp_.plan[il].clamp_exp);     // [n_ff, K', T']
    ggml_tensor * d = ggml_mul_mat_id(ctx, P.arena[2], a, slots); // [n_embd, K', T']
    if (L.down_exps_b) d = ggml_add_id(ctx, d, L.down_exps_b, eids);
    return d;
}

// One expert on its own tokens: x [n_embd, n] (the rows routed to expert e, held in slot `slot` of pool P) ->
// [n_embd, n], with 2-D views of the slot's matrices. A view of a repacked arena is a repacked tensor (its buffer's
// init_tensor picks the layout again), so ggml's repacked GEMM runs on it, unless tiled_weight unpacks it for the
// tiled GEMM (unrepack.cpp: Q4_K, >= 32 tokens); plain arenas take ggml's mul_mat.
ggml_tensor * Model::expert_ffn_rows(ggml_context * ctx, int il, const Pool & P, int slot, int e, ggml_tensor * x) {
    Layer & L = layers_[il];
    auto mat = [&](int r) {
        ggml_tensor * m =
            ggml_view_2d(ctx, P.arena[r], P.ne0[r], P.ne1[r], P.arena[r]->nb[1], (size_t) slot * P.arena[r]->nb[2]);
        return tiled_weight(ctx, m, P.repacked[r], x->ne[1]);
    };
    auto bias = [&](ggml_tensor * y, ggml_tensor * b) { // b [ne0, n_expert]: its row e, broadcast over tokens
        return b ? ggml_add(ctx, y, ggml_view_1d(ctx, b, b->ne[0], (size_t) e * b->nb[1])) : y;
    };
    ggml_tensor * g = P.arena[0] ? bias(ggml_mul_mat(ctx, mat(0), x), L.gate_exps_b) : nullptr;    // [n_ff, n]
    ggml_tensor * u = bias(ggml_mul_mat(ctx, mat(1), x), L.up_exps_b);                             // [n_ff, n]
    return bias(ggml_mul_mat(ctx, mat(2), glu(ctx, g, u, hp_.plan[il].clamp_exp)), L.down_exps_b); // [n_embd, n]
}

// Prompt ubatches: the grouped way (see the top of this file) for a pool the CPU computes, when the ubatch gives its
// experts a few tokens each on average (below that, per-expert graph nodes cost more than they save). Repacked
// slots run ggml's repacked GEMMs; plain ones its 2-D mul_mat, which tiles Q8_0/Q4_0/F16/F32 through tinyBLAS
// (GGML_LLAMAFILE) where mul_mat_id runs one dot product per row and token (Q8_0 demo prompts: 1.25x). With T the
// pool decides the way, never the cache's state. A host pool is one the CPU computes (a GPU's arenas are device
// memory; its RAM tier is plain).
bool Model::expert_gemm(int T, const Pool & P) const {
    return opt_.expert_gemm && P.host && T > 1 &&
           (int64_t) T * hp_.n_expert_used >= (int64_t) kGemmMinRows * hp_.n_expert;
}

// moe [n_embd, T] = sum_k w[k, t] d[:, k, t], k in order, from d [n_embd, K, T] (src 0) and the weights [1, K, T]
// (src 1; absent when the weights scaled the experts' input: Llama-4). One pass over d on every thread, where
// ggml_mul's broadcast of a [1, K, T] tensor runs one element per inner call, then K - 1 ggml_adds.
static void op_weighted_sum(ggml_tensor * dst, int ith, int nth, void *) {
    const ggml_tensor * d = dst->src[0];
    const ggml_tensor * w = dst->src[1];
    const int64_t n = d->ne[0], K = d->ne[1], T = d->ne[2];
    const int64_t t0 = T * ith / nth, t1 = T * (ith + 1) / nth;
    for (int64_t t = t0; t < t1; ++t) {
        float * out = (float *) ((char *) dst->data + t * dst->nb[1]);
        for (int64_t k = 0; k < K; ++k) {
            const float * x = (const float *) ((const char *) d->data + k * d->nb[1] + t * d->nb[2]);
            const float wk = w ? *(const float *) ((const char *) w->data + k * w->nb[1] + t * w->nb[2]) : 1.0f;
            if (k == 0)
                for (int64_t i = 0; i < n; ++i) out[i] = x[i] * wk;
            else
                for (int64_t i = 0; i < n; ++i) out[i] += x[i] * wk;
        }
    }
}

// The layer's new residual stream from the expert outputs d [n_embd, K, T] (before weighting), with f.hn the
// experts' input and f.res = h:
//   moe = sum_k w_k d_k (-> post norm, Gemma-4) [+ shared expert(hn)] [+ parallel dense block(h), Gemma-4]
//   out = residual_out(moe, h): post norm, residual scale, + h, layer output scale
// Llama-4 applies the weights to the expert input instead (weights_before_ffn): d is summed unweighted.
ggml_tensor * Model::combine(ggml_context * ctx, int il, ggml_tensor * d, ggml_tensor * weights, const MoeFront & f) {
    const HParams & h = hp_;
    Layer & L = layers_[il];
    const int K = h.n_expert_used;
    const int64_t T = d->ne[2], ne = d->ne[0]; // n_embd, or the latent width
    ggml_tensor * moe;
    if (backend_ == cpu_backend_) { // custom ops run on the CPU backend only
        ggml_tensor * args[2] = {d, weights};
        moe = ggml_custom_4d(ctx, GGML_TYPE_F32, ne, T, 1, 1, args, h.weights_before_ffn ? 1 : 2, op_weighted_sum,
                             GGML_N_TASKS_MAX, nullptr);
    } else {
        if (!h.weights_before_ffn) d = ggml_mul(ctx, d, weights);
        moe = ggml_view_2d(ctx, d, ne, T, d->nb[2], 0);
        for (int j = 1; j < K; ++j) moe = ggml_add(ctx, moe, ggml_view_2d(ctx, d, ne, T, d->nb[2], j * d->nb[1]));
    }
    if (L.ffn_latent_up) moe = dense_mm(ctx, L.ffn_latent_up, moe); // [L, T] -> [n_embd, T]
    if (L.ffn_post_norm_exp) moe = norm(ctx, moe, L.ffn_post_norm_exp, nullptr);
    if (L.up_shexp) {
        ggml_tensor * s = ffn(ctx, f.hn, L.gate_shexp, L.up_shexp, L.down_shexp, h.plan[il].clamp_shexp);
        if (L.gate_inp_shexp) s = ggml_mul(ctx, s, ggml_sigmoid(ctx, ggml_mul_mat(ctx, L.gate_inp_shexp, f.hn)));
        moe = ggml_add(ctx, moe, s);
        if (h.shexp_average) moe = ggml_scale(ctx, moe, 0.5f); // Cohere2-MoE: the mean of the two
    }
    if (L.ffn_up) moe = ggml_add(ctx, dense_block(ctx, il, f.res), moe); // parallel dense MLP (Gemma-4)
    return residual_out(ctx, il, moe, f.res, L.ffn_post_norm, true, f.post);
}

// Routed experts of T tokens, every one resident in the layer's slots, then combine(): one pass.
// slots / eids [K, T] (slot ids, expert ids for per-expert biases), weights [1, K, T].
ggml_tensor * Model::moe_block(ggml_context * ctx, int il, const MoeFront & f, ggml_tensor * slots,
                               ggml_tensor * weights, ggml_tensor * eids, int T) {
    const HParams & h = hp_;
    ggml_tensor * hb = ggml_reshape_3d(ctx, f.xe, h.n_embd_exp(), 1, T); // [n_embd_exp, 1, T]
    if (h.weights_before_ffn)                                            // [n_embd, K, T], scaled per (t, k)
        hb = ggml_mul(ctx, ggml_repeat(ctx, hb, ggml_new_tensor_3d(ctx, GGML_TYPE_F32, h.n_embd, h.n_expert_used, T)),
                      weights);
    return combine(ctx, il, expert_ffn(ctx, il, cache_->pool_of(il), hb, slots, eids), weights, f);
}

// Single pass: every expert of tokens [t0, t1) is resident (slot_ids [K, t1 - t0]); graph A's state tensors
// are the block's input and x_ its output.
void Model::run_experts(int il, int t0, int t1, const std::vector<int32_t> & slot_ids, const std::vector<float> & w,
                        const std::vector<int32_t> & ids) {
    const HParams & h = hp_;
    const int T = t1 - t0, K = h.n_expert_used;
    ggml_context * ctx = begin_graph();
    ggml_cgraph * gf = ggml_new_graph_custom(ctx, kMaxNodes, false);
    ggml_tensor * slots = ggml_new_tensor_2d(ctx, GGML_TYPE_I32, K, T);
    ggml_set_input(slots);
    ggml_tensor * weights = ggml_new_tensor_3d(ctx, GGML_TYPE_F32, 1, K, T);
    ggml_set_input(weights);
    ggml_tensor * eids = ggml_new_tensor_2d(ctx, GGML_TYPE_I32, K, T); // expert ids, for per-expert biases
    ggml_set_input(eids);
    const MoeFront f{rows_of(ctx, ffn_inp_, t0, T), rows_of(ctx, ffn_in_, t0, T), nullptr, rows_of(ctx, ffn_xe_, t0, T),
                     hc_post_ ? rows_of(ctx, hc_post_, t0, T) : nullptr};
    ggml_build_forward_expand(gf,
                              ggml_cpy(ctx, moe_block(ctx, il, f, slots, weights, eids, T), rows_of(ctx, x_, t0, T)));
    compute(ctx, gf, galloc_);
    set_input(slots, slot_ids.data(), ggml_nbytes(slots));
    set_input(weights, w.data() + (size_t) t0 * K, ggml_nbytes(weights));
    if (eids->buffer) set_input(eids, ids.data() + (size_t) t0 * K, ggml_nbytes(eids));
    ggml_backend_graph_compute(backend_, gf);
    ggml_free(ctx);
}
// Expert-major step for one group of resident experts: the P (token, k) pairs routed to them are gathered,
// computed, and their outputs scattered into ebuf_ rows t * K + k.
// on_cpu (tiering.h): the group sits in tier 2 (RAM) and the CPU backend runs it from there. The step's
// hidden states go to the host and the outputs come back into ebuf_ rows: device <-> host copies on a GPU,
// memcpys on a CPU device (so the CPU build runs this code path too).
// expert_gemm(T) with host slots: the pairs grouped by expert (tokens ascending), one expert_ffn_rows per expert,
// at most kMaxNodes / kGemmExpertNodes experts per graph; else one mul_mat_id pass (expert_ffn) over them all.
void Model::run_expert_pairs(int il, int T, const ExpertPairs & pairs, bool on_cpu, const Pool * pool_in) {
    const HParams & h = hp_;
    const int P = (int) pairs.tok.size(), K = h.n_expert_used;
    if (P == 0) return;
    const Pool & pool = pool_in ? *pool_in : on_cpu ? tier2_->pool_of(il) : cache_->pool_of(il);
    const bool gemm = expert_gemm(T, pool);
    std::vector<int> order(P); // the pairs in the order they are computed
    for (int i = 0; i < P; ++i) order[i] = i;
    if (gemm) std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return pairs.eid[a] < pairs.eid[b]; });
    // [i0, i1) ranges of `order` computed by one graph: all of them, or (gemm) whole experts, at most per_graph each
    std::vector<std::pair<int, int>> parts;
    const int per_graph = (kMaxNodes - 64) / kGemmExpertNodes;
    for (int i = 0, n_e = 0, start = 0; i < P; ++i) {
        const bool new_expert = i == 0 || pairs.eid[order[i]] != pairs.eid[order[i - 1]];
        if (gemm && new_expert && n_e == per_graph) {
            parts.emplace_back(start, i);
            start = i;
            n_e = 0;
        }
        n_e += new_expert;
        if (i == P - 1) parts.emplace_back(start, P);
    }
    const int64_t ne = h.n_embd_exp(); // the experts' input and output width
    std::vector<float> hn_host;
    if (on_cpu) {
        hn_host.resize((size_t) ne * T);
        ggml_backend_tensor_get(ffn_xe_, hn_host.data(), 0, hn_host.size() * sizeof(float));
    }
    std::vector<float> out; // on_cpu: the outputs of a part, row i - i0 for pair order[i]
    for (const auto & [i0, i1] : parts) {
        const int n = i1 - i0;
        std::vector<int32_t> tok(n), slot(n), eid(n);
        std::vector<int64_t> dst_row(n); // its row of ebuf_, or (on_cpu) of the part's output
        std::vector<float> pw(n);
        for (int i = 0; i < n; ++i) {
            const int j = order[i0 + i];
            tok[i] = pairs.tok[j];
            slot[i] = pairs.slot[j];
            eid[i] = pairs.eid[j];
            pw[i] = pairs.w[j];
            dst_row[i] = on_cpu ? i : pairs.rows[j];
        }
        ggml_context * ctx = begin_graph();
        ggml_cgraph * gf = ggml_new_graph_custom(ctx, kMaxNodes, false);
        ggml_tensor * hn;
        if (on_cpu) {
            hn = ggml_new_tensor_2d(ctx, GGML_TYPE_F32, ne, T);
            ggml_set_input(hn);
        } else {
            hn = rows_of(ctx, ffn_xe_, 0, T);
        }
        ggml_tensor * t_idx = ggml_new_tensor_1d(ctx, GGML_TYPE_I32, n);
        ggml_set_input(t_idx);
        ggml_tensor * r_idx = ggml_new_tensor_1d(ctx, GGML_TYPE_I64, n);
        ggml_set_input(r_idx);
        ggml_tensor * xs = ggml_get_rows(ctx, hn, t_idx); // [ne, n]
        ggml_tensor * pwt = nullptr;                      // pair weights [1, n] (Llama-4: scale the expert input)
        if (h.weights_before_ffn) {
            pwt = ggml_new_tensor_2d(ctx, GGML_TYPE_F32, 1, n);
            ggml_set_input(pwt);
            xs = ggml_mul(ctx, xs, pwt);
        }
        ggml_tensor * dst; // the outputs land in its rows r_idx
        if (on_cpu) {
            dst = ggml_new_tensor_2d(ctx, GGML_TYPE_F32, ne, n);
            ggml_set_input(dst); // allocated first, and kept: the set_rows below write into it
            ggml_set_output(dst);
        } else {
            dst = ggml_view_2d(ctx, ebuf_, ne, (int64_t) K * T, ebuf_->nb[1], 0);
        }
        ggml_tensor *slots = nullptr, *eids = nullptr;
        if (gemm) {
            for (int a = 0, b; a < n; a = b) { // one expert: pairs [a, b)
                for (b = a + 1; b < n && eid[b] == eid[a]; ++b) {}
                ggml_tensor * x = ggml_view_2d(ctx, xs, ne, b - a, xs->nb[1], (size_t) a * xs->nb[1]);
                ggml_tensor * d = expert_ffn_rows(ctx, il, pool, slot[a], eid[a], x);
                gemm_experts_[il]++;
                dst = ggml_set_rows(ctx, dst, d, ggml_view_1d(ctx, r_idx, b - a, (size_t) a * r_idx->nb[0]));
            }
        } else {
            slots = ggml_new_tensor_2d(ctx, GGML_TYPE_I32, 1, n);
            ggml_set_input(slots);
            eids = ggml_new_tensor_2d(ctx, GGML_TYPE_I32, 1, n);
            ggml_set_input(eids);
            ggml_tensor * d = expert_ffn(ctx, il, pool, ggml_reshape_3d(ctx, xs, ne, 1, n), slots, eids);
            dst = ggml_set_rows(ctx, dst, ggml_reshape_2d(ctx, d, ne, n), r_idx);
        }
        ggml_build_forward_expand(gf, dst);
        compute(ctx, gf, on_cpu ? galloc_cpu_ : galloc_);
        if (on_cpu) set_input(hn, hn_host.data(), ggml_nbytes(hn));
        set_input(t_idx, tok.data(), ggml_nbytes(t_idx));
        set_input(r_idx, dst_row.data(), ggml_nbytes(r_idx));
        if (slots) set_input(slots, slot.data(), ggml_nbytes(slots));
        if (eids && eids->buffer) set_input(eids, eid.data(), ggml_nbytes(eids));
        if (pwt) set_input(pwt, pw.data(), ggml_nbytes(pwt));
        ggml_backend_graph_compute(on_cpu ? cpu_backend_ : backend_, gf);
        if (on_cpu) {
            out.resize((size_t) ne * n);
            ggml_backend_tensor_get(dst, out.data(), 0, out.size() * sizeof(float));
            for (int i = 0; i < n; ++i)
                ggml_backend_tensor_set(ebuf_, out.data() + (size_t) i * ne,
                                        (size_t) pairs.rows[order[i0 + i]] * ebuf_->nb[1], (size_t) ne * sizeof(float));
        }
        ggml_free(ctx);
    }
}

void Model::run_combine(int il, int T, const std::vector<float> & w) {
    const HParams & h = hp_;
    const int K = h.n_expert_used;
    ggml_context * ctx = begin_graph();
    ggml_cgraph * gf = ggml_new_graph_custom(ctx, kMaxNodes, false);
    ggml_tensor * weights = ggml_new_tensor_3d(ctx, GGML_TYPE_F32, 1, K, T);
    ggml_set_input(weights);
    ggml_tensor * d = ggml_view_3d(ctx, ebuf_, h.n_embd_exp(), K, T, ebuf_->nb[1], ebuf_->nb[1] * K, 0);
    const MoeFront f{rows_of(ctx, ffn_inp_, 0, T), rows_of(ctx, ffn_in_, 0, T), nullptr, rows_of(ctx, ffn_xe_, 0, T),
                     hc_post_ ? rows_of(ctx, hc_post_, 0, T) : nullptr};
    ggml_build_forward_expand(gf, ggml_cpy(ctx, combine(ctx, il, d, weights, f), rows_of(ctx, x_, 0, T)));
    compute(ctx, gf, galloc_);
    if (weights->buffer) set_input(weights, w.data(), ggml_nbytes(weights)); // unused when weights_before_ffn
    ggml_backend_graph_compute(backend_, gf);
    ggml_free(ctx);
}

ExpertPairs::ExpertPairs(const std::vector<int32_t> & ids, const std::vector<float> & weights, int K,
                         const std::vector<int> & slot_of) {
    for (size_t i = 0; i < ids.size(); ++i) {
        const int s = slot_of[ids[i]];
        if (s < 0) continue; // not in this group
        tok.push_back((int32_t) (i / K));
        rows.push_back((int64_t) i); // row t * K + k of ebuf_
        slot.push_back(s);
        eid.push_back(ids[i]);
        w.push_back(weights[i]);
    }
}

// Routed experts of layer il for T tokens. When their distinct experts fit the layer's slots and the CPU runs
// none of them: one pass (run_experts), or, when some are being read from disk by the I/O threads, the experts
// ready now first (expert-major, while the reads go on), then the rest, then one combine. Otherwise expert-major:
// groups of at most `quota` experts, each made resident once (in the arena, or for the CPU's share in tier 2),
// then one combine. Every way gives the same bits (expert_ffn).
// Stand-ins (opt_.standin_threshold, one-token steps): the routed experts that are not in memory (nor on their way)
// and that the router weighs at most standin_threshold x the token's top weight run as their low-bit stand-ins
// (the stand-in cache: hit, or read from the side file), the others as always; two expert-major groups, one
// combine. When every stand-in is in memory the full experts are then read for later tokens (prefetch); under a
// tight budget (stand-ins read on a miss) never. Returns false (nothing done) when no expert of this step qualifies.
bool Model::moe_layer_standins(int il, const std::vector<int32_t> & ids, const std::vector<float> & w) {
    const int K = hp_.n_expert_used;
    float wmax = 0.f;
    for (int k = 0; k < K; ++k) wmax = std::max(wmax, std::fabs(w[k]));
    std::vector<int32_t> full, low;
    for (int k = 0; k < K; ++k)
        (!cache_->resident(il, ids[k]) && std::fabs(w[k]) <= opt_.standin_threshold * wmax ? low : full)
            .push_back(ids[k]);
    if (low.empty()) return false;
    std::vector<int> slot_full(hp_.n_expert, -1), slot_low(hp_.n_expert, -1);
    std::vector<int32_t> slots(K);
    try {
        standin_->acquire(il, low.data(), (int) low.size(), slots.data());
        for (size_t i = 0; i < low.size(); ++i) slot_low[low[i]] = slots[i];
        if (!full.empty()) {
            cache_->acquire(il, full.data(), (int) full.size(), slots.data());
            for (size_t i = 0; i < full.size(); ++i) slot_full[full[i]] = slots[i];
            run_expert_pairs(il, 1, ExpertPairs(ids, w, K, slot_full), false);
        }
        run_expert_pairs(il, 1, ExpertPairs(ids, w, K, slot_low), false, &standin_->pool_of(il));
    } catch (...) {
        standin_->release(il);
        cache_->release(il);
        throw;
    }
    standin_->release(il);
    cache_->release(il);
    run_combine(il, 1, w);
    standin_uses_[il] += low.size();
    // stand-ins all in memory (the budget is not tight): the full experts are read for later tokens, as prefetches
    if (standin_->quota(il) == hp_.n_expert) cache_->prefetch(il, low.data(), (int) low.size());
    return true;
}

void Model::moe_layer(int il, int T, const std::vector<int32_t> & ids, const std::vector<float> & w) {
    const int K = hp_.n_expert_used, n = T * K;
    if (standin_ && T == 1 && opt_.standin_threshold > 0.f && !tier2_ && moe_layer_standins(il, ids, w)) return;
    const std::vector<int32_t> on_cpu = cpu_group(il, ids, n);
    const int n_distinct = cache_->distinct(ids.data(), n);
    if (on_cpu.empty() && n_distinct <= cache_->quota(il)) {
        std::vector<int32_t> slots((size_t) n);
        try {
            const int ready = opt_.overlap_reads ? cache_->begin_acquire(il, ids.data(), n, slots.data()) : -1;
            if (ready > 0 && ready < n_distinct) { // compute the ready ones while the misses are read
                std::vector<int> early(hp_.n_expert, -1), late(hp_.n_expert, -1);
                for (int i = 0; i < n; ++i) early[ids[i]] = slots[i];
                run_expert_pairs(il, T, ExpertPairs(ids, w, K, early), false);
                cache_->acquire(il, ids.data(), n, slots.data());
                for (int i = 0; i < n; ++i) late[ids[i]] = early[ids[i]] < 0 ? slots[i] : -1;
                run_expert_pairs(il, T, ExpertPairs(ids, w, K, late), false);
                cache_->release(il);
                run_combine(il, T, w);
                return;
            }
            cache_->acquire(il, ids.data(), n, slots.data());
            if (!expert_gemm(T, cache_->pool_of(il))) {
                run_experts(il, 0, T, slots, w, ids);
            } else { // per-expert GEMMs: the expert-major path, one group
                std::vector<int> slot_of(hp_.n_expert, -1);
                for (int i = 0; i < n; ++i) slot_of[ids[i]] = slots[i];
                run_expert_pairs(il, T, ExpertPairs(ids, w, K, slot_of), false);
                run_combine(il, T, w);
            }
        } catch (...) {
            cache_->release(il);
            throw;
        }
        cache_->release(il);
        return;
    }
    std::vector<char> seen(hp_.n_expert, 0);
    for (int32_t e : on_cpu) seen[e] = 1;
    std::vector<int32_t> experts; // the arena's share, in order of first use
    for (int i = 0; i < n; ++i)
        if (!seen[ids[i]]) {
            seen[ids[i]] = 1;
            experts.push_back(ids[i]);
        }
    // Groups of the distinct experts, each made resident, computed and unpinned in turn. With I/O threads (the
    // arena of an offloaded CPU model, overlap_reads) a group is half the quota, so that the next group's misses are
    // read (ahead of prefetches) while this one computes, and the experts already resident go first, so that the
    // first group computes while the reads start: a prompt under a cap costs about max(reads, compute) per layer
    // instead of their sum. Which group computes an expert changes no bit (expert_ffn).
    auto run_groups = [&](ExpertCache & tier, std::vector<int32_t> list, bool cpu) {
        const int q = tier.quota(il);
        const bool pipe = !cpu && !tier2_ && opt_.overlap_reads && tier.async() && q >= 2;
        const int g = pipe ? q / 2 : q;
        if (pipe) std::stable_partition(list.begin(), list.end(), [&](int32_t e) { return tier.resident(il, e); });
        std::vector<int32_t> gslots, next;
        std::vector<int> slot_of(hp_.n_expert, -1);
        try {
            for (size_t g0 = 0; g0 < list.size(); g0 += g) {
                const int gn = (int) std::min<size_t>(g, list.size() - g0);
                gslots.resize(gn);
                std::fill(slot_of.begin(), slot_of.end(), -1);
                tier.acquire(il, &list[g0], gn, gslots.data()); // a begun acquire: waits for its reads
                if (pipe && g0 + gn < list.size()) {            // the next group's reads start now
                    next.resize(std::min<size_t>(g, list.size() - g0 - gn));
                    tier.begin_acquire(il, &list[g0 + gn], (int) next.size(), next.data());
                }
                for (int i = 0; i < gn; ++i) slot_of[list[g0 + i]] = gslots[i];
                run_expert_pairs(il, T, ExpertPairs(ids, w, K, slot_of), cpu);
                if (pipe)
                    tier.unpin(il, gslots.data(), gn);
                else
                    tier.release(il);
            }
        } catch (...) {
            tier.release(il);
            throw;
        }
        tier.release(il);
    };
    run_groups(*cache_, experts, false);
    if (!on_cpu.empty()) {
        run_groups(*tier2_, on_cpu, true);
        cpu_experts_[il] += on_cpu.size();
    }
    run_combine(il, T, w);
}

} // namespace moelite
