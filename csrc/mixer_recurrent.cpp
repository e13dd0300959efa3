// Recurrent mixers: a fixed-size state per layer instead of a KV cache (RecurrentState: Layer::conv_state,
// Layer::ssm_state, in their own buffer). Each graph reads the state, computes the chunk's T tokens and writes
// the state back, so prompt chunks (ubatches) carry it across exactly.
//
//   conv_with_state: x [C, T] -> causal depthwise conv over [state (K - 1 columns) | x] -> [C, T]; the last K - 1
//                    columns become the new state
//   shortconv (LFM2): in_proj [H -> 3H] = (b, c, x); y = c * conv(b * x); out_proj
//   deltanet (Qwen3.5, Qwen3-Next): qkv = conv(W_qkv x) -> silu -> q, k (L2-normed), v; beta = sigmoid(W_b x),
//     g = softplus(W_a x + dt) * A; S <- S exp(g) + k (beta (v - S^T k))^T per v head (ggml_gated_delta_net,
//     q/k heads tiled across v heads, q scaled by 1/sqrt(d)); o = rms_norm(S^T q) * w * silu(z); out_proj
//   kda (Kimi-Linear, Ling-3.0): q, k, v = silu(conv_q/k/v(W_q/k/v x)) (three short convs, one state [K - 1, 3C]);
//     q, k L2-normed; per-channel decay g = A softplus(f_b f_a x + dt) [S, H] (A = -exp(A_log) per head; Ling:
//     lb sigmoid(exp(A_log) (f x + dt))); beta = sigmoid(W_b x); S <- diag(exp(g)) S + k (beta (v - S^T k))^T per
//     head (ggml_gated_delta_net's vector gate, q scaled by 1/sqrt(S)); o = rms_norm(S^T q) * w * sigmoid(g_b g_a x)
//     (Ling: full-rank g x); W_o
//   mamba2 (Granite-4.0-H): in_proj -> z, xBC, dt; xBC = silu(conv(xBC) + bias) -> x, B, C; selective scan per head
//     (ggml_ssm_scan: dt = softplus(dt + dt_bias), A = -exp(A_log), B/C shared by groups); y += D x;
//     y = grouped rms_norm(y * silu(z)) * w; out_proj
#include <cmath>

#include "model.h"

namespace moelite {

ggml_tensor * Model::conv_with_state(ggml_context * ctx, ggml_cgraph * gf, ggml_tensor * state, ggml_tensor * kernel,
                                     ggml_tensor * x, int T) {
    const int64_t K1 = kernel->ne[0] - 1, C = x->ne[0];
    ggml_tensor * in = ggml_concat(ctx, state, ggml_transpose(ctx, x), 0); // [K - 1 + T, C]
    ggml_tensor * last = ggml_view_2d(ctx, in, K1, C, in->nb[1], (in->ne[0] - K1) * ggml_element_size(in));
    ggml_build_forward_expand(gf, ggml_cpy(ctx, last, state)); // runs after the concat read the old state
    ggml_tensor * y = ggml_ssm_conv(ctx, ggml_reshape_3d(ctx, in, K1 + T, C, 1), kernel); // [C, T, 1]
    return ggml_reshape_2d(ctx, y, C, T);
}

// L2 norm as transformers computes it over dim 0: x / sqrt(sum x^2 + eps) = rms_norm(x, eps / d) / sqrt(d)
static ggml_tensor * l2_norm(ggml_context * ctx, ggml_tensor * t, float eps) {
    const float d = (float) t->ne[0];
    return ggml_scale(ctx, ggml_rms_norm(ctx, t, eps / d), 1.0f / std::sqrt(d));
}

// The delta rule's output and new state: r = ggml_gated_delta_net(...) packs o [S, H, T] then the state [S, S, H];
// the state is copied back into ssm_state, o returned as [S, H, T]
static ggml_tensor * delta_net_out(ggml_context * ctx, ggml_cgraph * gf, ggml_tensor * r, ggml_tensor * ssm_state,
                                   int64_t S, int64_t H, int T) {
    const size_t el = ggml_element_size(r);
    ggml_tensor * s_new = ggml_view_1d(ctx, r, S * S * H, S * H * T * el);
    ggml_build_forward_expand(gf, ggml_cpy(ctx, s_new, ggml_reshape_1d(ctx, ssm_state, S * S * H)));
    return ggml_view_4d(ctx, r, S, H, T, 1, S * el, S * H * el, S * H * T * el, 0);
}

ggml_tensor * Model::mixer_shortconv(ggml_context * ctx, ggml_cgraph * gf, int il, ggml_tensor * cur, int T) {
    Layer & L = layers_[il];
    const int64_t H = hp_.n_embd;
    ggml_tensor * bcx = dense_mm(ctx, L.sc_in, cur); // [3H, T]: b, c, x
    auto part = [&](int i) { return ggml_view_2d(ctx, bcx, H, T, bcx->nb[1], i * H * ggml_element_size(bcx)); };
    ggml_tensor * y =
        ggml_mul(ctx, part(1), conv_with_state(ctx, gf, L.conv_state, L.sc_conv, ggml_mul(ctx, part(0), part(2)), T));
    return dense_mm(ctx, L.sc_out, y); // [H, T]
}

ggml_tensor * Model::mixer_deltanet(ggml_context * ctx, ggml_cgraph * gf, int il, ggml_tensor * cur, int T) {
    const HParams & h = hp_;
    Layer & L = layers_[il];
    const int64_t dk = h.ssm_d_state, Hk = h.ssm_n_group, Hv = h.ssm_dt_rank, dv = h.ssm_d_inner / Hv;
    ggml_tensor * qkv = dense_mm(ctx, L.wqkv, cur);    // [2 Hk dk + Hv dv, T]
    ggml_tensor * z = dense_mm(ctx, L.wqkv_gate, cur); // [Hv dv, T]
    ggml_tensor *b, *a;
    if (L.ssm_ba) { // Qwen3-Next: per k-head group [b_g, a_g]
        ggml_tensor * ba = ggml_reshape_3d(ctx, dense_mm(ctx, L.ssm_ba, cur), 2 * Hv / Hk, Hk, T);
        const int64_t r = Hv / Hk;
        b = ggml_cont_2d(ctx, ggml_view_3d(ctx, ba, r, Hk, T, ba->nb[1], ba->nb[2], 0), Hv, T);
        a = ggml_cont_2d(ctx, ggml_view_3d(ctx, ba, r, Hk, T, ba->nb[1], ba->nb[2], r * ggml_element_size(ba)), Hv, T);
    } else {
        b = dense_mm(ctx, L.ssm_beta, cur); // [Hv, T]
        a = dense_mm(ctx, L.ssm_alpha, cur);
    }
    ggml_tensor * beta = ggml_reshape_4d(ctx, ggml_sigmoid(ctx, b), 1, Hv, T, 1);
    ggml_tensor * g = ggml_mul(ctx, ggml_softplus(ctx, ggml_add(ctx, a, L.ssm_dt_b)), L.ssm_a); // A = -exp(A_log)
    g = ggml_reshape_4d(ctx, g, 1, Hv, T, 1);

    ggml_tensor * conv =
        ggml_silu(ctx, conv_with_state(ctx, gf, L.conv_state, L.ssm_conv1d, qkv, T)); // [2 Hk dk + Hv dv, T]
    const size_t el = ggml_element_size(conv);
    ggml_tensor * q = ggml_view_4d(ctx, conv, dk, Hk, T, 1, dk * el, conv->nb[1], conv->nb[1] * T, 0);
    ggml_tensor * k = ggml_view_4d(ctx, conv, dk, Hk, T, 1, dk * el, conv->nb[1], conv->nb[1] * T, Hk * dk * el);
    ggml_tensor * v = ggml_view_4d(ctx, conv, dv, Hv, T, 1, dv * el, conv->nb[1], conv->nb[1] * T, 2 * Hk * dk * el);
    q = l2_norm(ctx, q, h.norm_eps);
    k = l2_norm(ctx, k, h.norm_eps);
    if (h.deltanet_repeat_interleave && Hv != Hk) {
        // v head j reads k head j / (Hv / Hk): interleave the repeats (ggml_gated_delta_net tiles j % Hk)
        auto rep = [&](ggml_tensor * t) {
            ggml_tensor * t5 = ggml_reshape_4d(ctx, t, dk, 1, Hk, T); // [dk, 1, Hk, T]
            t5 = ggml_repeat_4d(ctx, t5, dk, Hv / Hk, Hk, T);         // [dk, r, Hk, T]
            return ggml_reshape_4d(ctx, t5, dk, Hv, T, 1);
        };
        q = rep(q);
        k = rep(k);
    }
    ggml_tensor * state = ggml_reshape_4d(ctx, L.ssm_state, dv, dv, Hv, 1);
    ggml_tensor * o = delta_net_out(ctx, gf, ggml_gated_delta_net(ctx, q, k, v, g, beta, state, 1), L.ssm_state, dv, Hv,
                                    T); // [dv, Hv, T]
    // gated RMSNorm per v head (plain weight), then the output projection
    z = ggml_reshape_3d(ctx, z, dv, Hv, T); // the output gate: silu, or sigmoid (Qwen4-Exp)
    o = ggml_mul(ctx, ggml_mul(ctx, ggml_rms_norm(ctx, o, h.norm_eps), L.ssm_norm),
                 h.deltanet_gate_sigmoid ? ggml_sigmoid(ctx, z) : ggml_silu(ctx, z));
    return dense_mm(ctx, L.ssm_out, ggml_reshape_2d(ctx, o, dv * Hv, T)); // [H, T]
}

ggml_tensor * Model::mixer_mamba2(ggml_context * ctx, ggml_cgraph * gf, int il, ggml_tensor * cur, int T) {
    const HParams & h = hp_;
    Layer & L = layers_[il];
    const int64_t d_inner = h.ssm_d_inner, ds = h.ssm_d_state, ng = h.ssm_n_group, nh = h.ssm_dt_rank;
    const int64_t hd = d_inner / nh, C = d_inner + 2 * ng * ds;
    ggml_tensor * zxbcdt = dense_mm(ctx, L.ssm_in, cur); // [d_inner + C + nh, T]
    const size_t el = ggml_element_size(zxbcdt);
    ggml_tensor * z = ggml_view_3d(ctx, zxbcdt, hd, nh, T, hd * el, zxbcdt->nb[1], 0);
    ggml_tensor * xbc = ggml_view_2d(ctx, zxbcdt, C, T, zxbcdt->nb[1], d_inner * el);
    ggml_tensor * dt = ggml_view_2d(ctx, zxbcdt, nh, T, zxbcdt->nb[1], (d_inner + C) * el);
    xbc = ggml_silu(ctx, ggml_add(ctx, conv_with_state(ctx, gf, L.conv_state, L.ssm_conv1d, ggml_cont(ctx, xbc), T),
                                  L.ssm_conv1d_b));
    ggml_tensor * x = ggml_view_4d(ctx, xbc, hd, nh, T, 1, hd * el, xbc->nb[1], xbc->nb[1] * T, 0);
    ggml_tensor * B = ggml_view_4d(ctx, xbc, ds, ng, T, 1, ds * el, xbc->nb[1], xbc->nb[1] * T, d_inner * el);
    ggml_tensor * Cm =
        ggml_view_4d(ctx, xbc, ds, ng, T, 1, ds * el, xbc->nb[1], xbc->nb[1] * T, (d_inner + ng * ds) * el);
    dt = ggml_add(ctx, ggml_cont(ctx, dt), L.ssm_dt_b);            // [nh, T]; the scan applies softplus
    ggml_tensor * ids = ggml_new_tensor_1d(ctx, GGML_TYPE_I32, 1); // one sequence: state row 0
    ggml_set_input(ids);
    ggml_set_name(ids, "ssm_ids");
    ggml_tensor * s = ggml_reshape_4d(ctx, L.ssm_state, ds, hd, nh, 1);
    ggml_tensor * ys = ggml_ssm_scan(ctx, s, x, ggml_reshape_3d(ctx, dt, nh, T, 1), L.ssm_a, B, Cm, ids, 1);
    ggml_tensor * y = ggml_view_4d(ctx, ys, hd, nh, T, 1, hd * el, hd * nh * el, hd * nh * T * el, 0);
    ggml_build_forward_expand(gf, ggml_cpy(ctx, ggml_view_1d(ctx, ys, ds * d_inner, ggml_nelements(x) * el),
                                           ggml_reshape_1d(ctx, L.ssm_state, ds * d_inner)));
    y = ggml_add(ctx, y, ggml_mul(ctx, x, L.ssm_d));  // + D x
    y = ggml_swiglu_split(ctx, ggml_cont(ctx, z), y); // y * silu(z)
    y = ggml_reshape_4d(ctx, y, d_inner / ng, ng, T, 1);
    y = ggml_mul(ctx, ggml_rms_norm(ctx, y, h.norm_eps), L.ssm_norm);     // grouped RMSNorm [d_inner / ng, ng]
    return dense_mm(ctx, L.ssm_out, ggml_reshape_2d(ctx, y, d_inner, T)); // [H, T]
}

ggml_tensor * Model::mixer_kda(ggml_context * ctx, ggml_cgraph * gf, int il, ggml_tensor * cur, int T) {
    const HParams & h = hp_;
    Layer & L = layers_[il];
    const int64_t S = h.ssm_d_state, H = h.ssm_dt_rank, C = S * H, K = h.ssm_conv_kernel;
    // one conv over [q | k | v] [3C, T] with the three kernels side by side [K, 3C]: the state is [K - 1, 3C]
    ggml_tensor * qkv = ggml_concat(ctx, ggml_concat(ctx, dense_mm(ctx, L.wq, cur), dense_mm(ctx, L.wk, cur), 0),
                                    dense_mm(ctx, L.wv, cur), 0);
    auto kernel = [&](ggml_tensor * w) { return ggml_reshape_2d(ctx, w, K, C); }; // {K, 1, C, 1} -> [K, C]
    ggml_tensor * kernels =
        ggml_concat(ctx, ggml_concat(ctx, kernel(L.ssm_conv_q), kernel(L.ssm_conv_k), 1), kernel(L.ssm_conv_v), 1);
    ggml_tensor * conv = ggml_silu(ctx, conv_with_state(ctx, gf, L.conv_state, kernels, qkv, T)); // [3C, T]
    const size_t el = ggml_element_size(conv);
    auto part = [&](int i) {
        return ggml_view_4d(ctx, conv, S, H, T, 1, S * el, conv->nb[1], conv->nb[1] * T, i * C * el);
    };
    // transformers' (FLA's) KDA normalises q and k with eps 1e-6 whatever the model's norm eps
    ggml_tensor * q = l2_norm(ctx, part(0), 1e-6f);
    ggml_tensor * k = l2_norm(ctx, part(1), 1e-6f);
    ggml_tensor * v = part(2);

    // per-channel decay from f + dt [S, H, T]: A softplus(f + dt), A = -exp(A_log) per head (the converter stores A);
    // Ling-3.0's bounded gate lb * sigmoid(A (f + dt)), A = exp(A_log)
    ggml_tensor * f = dense_mm(ctx, L.ssm_f_a, cur); // [S, T] (low rank) or [C, T]
    if (L.ssm_f_b) f = dense_mm(ctx, L.ssm_f_b, f);  // [C, T]
    f = ggml_reshape_4d(ctx, ggml_add(ctx, f, L.ssm_dt_b), S, H, T, 1);
    ggml_tensor * A = ggml_reshape_4d(ctx, L.ssm_a, 1, H, 1, 1);
    // (GLM-5.3-Flash's bounded gate with A = -exp(A_log) as llama.cpp's glm5-next stores it: sigmoid(-A (f + dt)))
    ggml_tensor * fa = h.kda_neg_a ? ggml_scale(ctx, ggml_mul(ctx, f, A), -1.f) : ggml_mul(ctx, f, A);
    ggml_tensor * g = h.kda_gate_lb < 0.f ? ggml_scale(ctx, ggml_sigmoid(ctx, fa), h.kda_gate_lb)
                                          : ggml_mul(ctx, ggml_softplus(ctx, f), A); // [S, H, T, 1]
    ggml_tensor * beta = ggml_reshape_4d(ctx, ggml_sigmoid(ctx, dense_mm(ctx, L.ssm_beta, cur)), 1, H, T, 1);

    ggml_tensor * state = ggml_reshape_4d(ctx, L.ssm_state, S, S, H, 1);
    ggml_tensor * o =
        delta_net_out(ctx, gf, ggml_gated_delta_net(ctx, q, k, v, g, beta, state, 1), L.ssm_state, S, H, T);
    // gated RMSNorm per head with a sigmoid gate from the low-rank pair, then the output projection
    ggml_tensor * gate = dense_mm(ctx, L.ssm_g_a, cur);   // [S, T] (low rank) or [C, T]
    if (L.ssm_g_b) gate = dense_mm(ctx, L.ssm_g_b, gate); // [C, T]
    gate = ggml_reshape_3d(ctx, gate, S, H, T);
    o = ggml_mul(ctx, ggml_mul(ctx, ggml_rms_norm(ctx, o, h.norm_eps), L.ssm_norm), ggml_sigmoid(ctx, gate));
    return dense_mm(ctx, L.wo, ggml_reshape_2d(ctx, o, C, T)); // [n_embd, T]
}

} // namespace moelite
