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
//   mamba2 (Granite-4.0-H): in_proj -> z, xBC, dt; xBC = silu(conv(xBC) + bias) -> x, B, C; selective scan per head
//     (ggml_ssm_scan: dt = softplus(dt + dt_bias), A = -exp(A_log), B/C shared by groups); y += D x;
//     y = grouped rms_norm(y * silu(z)) * w; out_proj
#include <cmath>

#include "model.h"

namespace moelite {

ggml_tensor * Model::conv_with_state(ggml_context * ctx, ggml_cgraph * gf, int il, ggml_tensor * x, int T) {
    Layer & L = layers_[il];
    ggml_tensor * kernel = L.ssm_conv1d ? L.ssm_conv1d : L.sc_conv;      // [K, C]
    const int64_t K1 = kernel->ne[0] - 1, C = x->ne[0];
    ggml_tensor * in = ggml_concat(ctx, L.conv_state, ggml_transpose(ctx, x), 0);   // [K - 1 + T, C]
    ggml_tensor * last = ggml_view_2d(ctx, in, K1, C, in->nb[1], (in->ne[0] - K1) * ggml_element_size(in));
    ggml_build_forward_expand(gf, ggml_cpy(ctx, last, L.conv_state));   // runs after the concat read the old state
    ggml_tensor * y = ggml_ssm_conv(ctx, ggml_reshape_3d(ctx, in, K1 + T, C, 1), kernel);   // [C, T, 1]
    return ggml_reshape_2d(ctx, y, C, T);
}

ggml_tensor * Model::mixer_shortconv(ggml_context * ctx, ggml_cgraph * gf, int il, ggml_tensor * cur, int T) {
    Layer & L = layers_[il];
    const int64_t H = hp_.n_embd;
    ggml_tensor * bcx = dense_mm(ctx, L.sc_in, cur);                   // [3H, T]: b, c, x
    auto part = [&](int i) { return ggml_view_2d(ctx, bcx, H, T, bcx->nb[1], i * H * ggml_element_size(bcx)); };
    ggml_tensor * y = ggml_mul(ctx, part(1), conv_with_state(ctx, gf, il, ggml_mul(ctx, part(0), part(2)), T));
    return dense_mm(ctx, L.sc_out, y);                                  // [H, T]
}

ggml_tensor * Model::mixer_deltanet(ggml_context * ctx, ggml_cgraph * gf, int il, ggml_tensor * cur, int T) {
    const HParams & h = hp_;
    Layer & L = layers_[il];
    const int64_t dk = h.ssm_d_state, Hk = h.ssm_n_group, Hv = h.ssm_dt_rank, dv = h.ssm_d_inner / Hv;
    ggml_tensor * qkv = dense_mm(ctx, L.wqkv, cur);                     // [2 Hk dk + Hv dv, T]
    ggml_tensor * z = dense_mm(ctx, L.wqkv_gate, cur);                  // [Hv dv, T]
    ggml_tensor *b, *a;
    if (L.ssm_ba) {                                                     // Qwen3-Next: per k-head group [b_g, a_g]
        ggml_tensor * ba = ggml_reshape_3d(ctx, dense_mm(ctx, L.ssm_ba, cur), 2 * Hv / Hk, Hk, T);
        const int64_t r = Hv / Hk;
        b = ggml_cont_2d(ctx, ggml_view_3d(ctx, ba, r, Hk, T, ba->nb[1], ba->nb[2], 0), Hv, T);
        a = ggml_cont_2d(ctx, ggml_view_3d(ctx, ba, r, Hk, T, ba->nb[1], ba->nb[2], r * ggml_element_size(ba)), Hv, T);
    } else {
        b = dense_mm(ctx, L.ssm_beta, cur);                             // [Hv, T]
        a = dense_mm(ctx, L.ssm_alpha, cur);
    }
    ggml_tensor * beta = ggml_reshape_4d(ctx, ggml_sigmoid(ctx, b), 1, Hv, T, 1);
    ggml_tensor * g = ggml_mul(ctx, ggml_softplus(ctx, ggml_add(ctx, a, L.ssm_dt_b)), L.ssm_a);   // A = -exp(A_log)
    g = ggml_reshape_4d(ctx, g, 1, Hv, T, 1);

    ggml_tensor * conv = ggml_silu(ctx, conv_with_state(ctx, gf, il, qkv, T));   // [2 Hk dk + Hv dv, T]
    const size_t el = ggml_element_size(conv);
    ggml_tensor * q = ggml_view_4d(ctx, conv, dk, Hk, T, 1, dk * el, conv->nb[1], conv->nb[1] * T, 0);
    ggml_tensor * k = ggml_view_4d(ctx, conv, dk, Hk, T, 1, dk * el, conv->nb[1], conv->nb[1] * T, Hk * dk * el);
    ggml_tensor * v = ggml_view_4d(ctx, conv, dv, Hv, T, 1, dv * el, conv->nb[1], conv->nb[1] * T, 2 * Hk * dk * el);
    // L2 norm as transformers computes it: x / sqrt(sum x^2 + eps) = rms_norm(x, eps / d) / sqrt(d)
    auto l2 = [&](ggml_tensor * t) { return ggml_scale(ctx, ggml_rms_norm(ctx, t, h.norm_eps / dk), 1.0f / std::sqrt((float) dk)); };
    q = l2(q);
    k = l2(k);
    if (h.deltanet_repeat_interleave && Hv != Hk) {
        // v head j reads k head j / (Hv / Hk): interleave the repeats (ggml_gated_delta_net tiles j % Hk)
        auto rep = [&](ggml_tensor * t) {
            ggml_tensor * t5 = ggml_reshape_4d(ctx, t, dk, 1, Hk, T);                            // [dk, 1, Hk, T]
            t5 = ggml_repeat_4d(ctx, t5, dk, Hv / Hk, Hk, T);                                    // [dk, r, Hk, T]
            return ggml_reshape_4d(ctx, t5, dk, Hv, T, 1);
        };
        q = rep(q);
        k = rep(k);
    }
    ggml_tensor * state = ggml_reshape_4d(ctx, L.ssm_state, dv, dv, Hv, 1);
    ggml_tensor * r = ggml_gated_delta_net(ctx, q, k, v, g, beta, state, 1);
    ggml_tensor * o = ggml_view_4d(ctx, r, dv, Hv, T, 1, dv * el, dv * Hv * el, dv * Hv * T * el, 0);   // [dv, Hv, T]
    ggml_tensor * s_new = ggml_view_1d(ctx, r, dv * dv * Hv, dv * Hv * T * el);
    ggml_build_forward_expand(gf, ggml_cpy(ctx, s_new, ggml_reshape_1d(ctx, L.ssm_state, dv * dv * Hv)));
    // gated RMSNorm per v head (plain weight), then the output projection
    o = ggml_mul(ctx, ggml_mul(ctx, ggml_rms_norm(ctx, o, h.norm_eps), L.ssm_norm),
                 ggml_silu(ctx, ggml_reshape_3d(ctx, z, dv, Hv, T)));
    return dense_mm(ctx, L.ssm_out, ggml_reshape_2d(ctx, o, dv * Hv, T));       // [H, T]
}

ggml_tensor * Model::mixer_mamba2(ggml_context * ctx, ggml_cgraph * gf, int il, ggml_tensor * cur, int T) {
    const HParams & h = hp_;
    Layer & L = layers_[il];
    const int64_t d_inner = h.ssm_d_inner, ds = h.ssm_d_state, ng = h.ssm_n_group, nh = h.ssm_dt_rank;
    const int64_t hd = d_inner / nh, C = d_inner + 2 * ng * ds;
    ggml_tensor * zxbcdt = dense_mm(ctx, L.ssm_in, cur);               // [d_inner + C + nh, T]
    const size_t el = ggml_element_size(zxbcdt);
    ggml_tensor * z = ggml_view_3d(ctx, zxbcdt, hd, nh, T, hd * el, zxbcdt->nb[1], 0);
    ggml_tensor * xbc = ggml_view_2d(ctx, zxbcdt, C, T, zxbcdt->nb[1], d_inner * el);
    ggml_tensor * dt = ggml_view_2d(ctx, zxbcdt, nh, T, zxbcdt->nb[1], (d_inner + C) * el);
    xbc = ggml_silu(ctx, ggml_add(ctx, conv_with_state(ctx, gf, il, ggml_cont(ctx, xbc), T), L.ssm_conv1d_b));   // [C, T]
    ggml_tensor * x = ggml_view_4d(ctx, xbc, hd, nh, T, 1, hd * el, xbc->nb[1], xbc->nb[1] * T, 0);
    ggml_tensor * B = ggml_view_4d(ctx, xbc, ds, ng, T, 1, ds * el, xbc->nb[1], xbc->nb[1] * T, d_inner * el);
    ggml_tensor * Cm = ggml_view_4d(ctx, xbc, ds, ng, T, 1, ds * el, xbc->nb[1], xbc->nb[1] * T, (d_inner + ng * ds) * el);
    dt = ggml_add(ctx, ggml_cont(ctx, dt), L.ssm_dt_b);                // [nh, T]; the scan applies softplus
    ggml_tensor * ids = ggml_new_tensor_1d(ctx, GGML_TYPE_I32, 1);     // one sequence: state row 0
    ggml_set_input(ids);
    ggml_set_name(ids, "ssm_ids");
    ggml_tensor * s = ggml_reshape_4d(ctx, L.ssm_state, ds, hd, nh, 1);
    ggml_tensor * ys = ggml_ssm_scan(ctx, s, x, ggml_reshape_3d(ctx, dt, nh, T, 1), L.ssm_a, B, Cm, ids, 1);
    ggml_tensor * y = ggml_view_4d(ctx, ys, hd, nh, T, 1, hd * el, hd * nh * el, hd * nh * T * el, 0);
    ggml_build_forward_expand(gf, ggml_cpy(ctx, ggml_view_1d(ctx, ys, ds * d_inner, ggml_nelements(x) * el),
                                           ggml_reshape_1d(ctx, L.ssm_state, ds * d_inner)));
    y = ggml_add(ctx, y, ggml_mul(ctx, x, L.ssm_d));                   // + D x
    y = ggml_swiglu_split(ctx, ggml_cont(ctx, z), y);                  // y * silu(z)
    y = ggml_reshape_4d(ctx, y, d_inner / ng, ng, T, 1);
    y = ggml_mul(ctx, ggml_rms_norm(ctx, y, h.norm_eps), L.ssm_norm);  // grouped RMSNorm [d_inner / ng, ng]
    return dense_mm(ctx, L.ssm_out, ggml_reshape_2d(ctx, y, d_inner, T));       // [H, T]
}

}  // namespace moelite
