// Hyper-connections (Hy4's iHC, "independent hyper-connections"; issue 30): the residual stream is hc copies of
// the hidden state per token instead of one, x [n_embd * hc, T] (stream s = rows s * n_embd .. of a column). Every
// sublayer (the mixer, the FFN) reads one mixture of the streams and writes its output back into each stream with
// its own weight; the output head reads one last mixture. Weights per sublayer: fn [n_embd * hc, 2 hc], base [2 hc],
// scale [2] (the head: fn [n_embd * hc, hc], base [hc], scale [1]), F32 as the reference keeps them.
//
//   m    = fn . rms_norm(x)                                          [2 hc, T]  (weightless norm over all streams)
//   pre  = sigmoid(m[:hc] * scale[0] + base[:hc]) + eps                [hc, T]
//   post = magnitude * sigmoid(m[hc:] * scale[1] + base[hc:]) + eps    [hc, T]
//   in   = sum_s pre_s x_s                                             [n_embd, T]  -> the sublayer (its own norm)
//   x_s  = x_s + post_s y                                              y: the sublayer's output
// No comb matrix between the streams (mHC below has one): they mix only through this reduce / distribute round trip.
// Every kind reduces and distributes with ggml's own hyper-connection ops (ggml_dsv4_hc_pre / _pre_gated / _post,
// which the CUDA and Metal backends have too).
//
// HC_GATED (Qwen4-Exp): the streams' grouped RMSNorm (one group a stream, (1+w) gamma) is the sublayer's norm:
//   xn   = grouped_norm(x)                                              [n_embd * hc, T]
//   in   = mean_s(sigmoid(up(silu(down(xn) / hc)))_s * xn_s)            [n_embd, T]  (low-rank gate per element)
//   post = 2 sigmoid(inject(xn) / hc)                                   [hc, T]      (none in the output head,
//                                                                                    whose mixture is the output norm)
//
// HC_MHC (GLM-5.3-Flash, DeepSeek-V4's "manifold-constrained" mHC): the iHC gates (post x 2, no epsilon on post) plus a
// comb matrix per token that mixes the streams themselves; fn [n_embd * hc, (2 + hc) hc], base, scale [3]:
//   comb = Sinkhorn(softmax over dst (m[2hc:] * scale[2] + base[2hc:]) + eps)       [hc dst, hc src, T]
//   x_d  = post_d y + sum_s comb[d, s] x_s                                            (ggml_dsv4_hc_comb / _post)
// The sublayer's post weights and comb travel as one [hc + hc^2, T] tensor (hc_post_ across graphs). The output head
// is the streams' plain mean.
#include "common.h"
#include "model.h"

namespace moelite {

// One hyper-connection's tensors (n_coef: 2 around a sublayer, 1 in the output head): iHC's
// blk.N.hc_{attn,ffn}_{fn,base,scale}.weight / output_hc_*.weight, or the gated mix's (below)
HcWeights Model::load_hc(const std::string & prefix, int n_coef) {
    const int64_t hc = hp_.hc_mult, C = hp_.n_embd * hc;
    HcWeights w;
    if (hp_.hc_kind == HC_GATED) { // blk.N.hc_{attn,ffn}_{norm,down,up,inject}.weight, output_hc_{norm,down,up}
        w.norm = load_tensor(prefix + "_norm.weight", true, 2, {});
        if (ggml_nelements(w.norm) != C || w.norm->type != GGML_TYPE_F32)
            throw FormatError(path_ + ": tensor '" + prefix + "_norm.weight': expected " + std::to_string(C) +
                              " F32 values (a (1+w) gamma per stream and channel)");
        w.down = load_tensor(prefix + "_down.weight", true, 2, {C, 0});
        w.up = load_tensor(prefix + "_up.weight", true, 2, {w.down->ne[1], C});
        if (n_coef == 2) w.inject = load_tensor(prefix + "_inject.weight", true, 2, {C, hc});
        return w;
    }
    const int64_t n_mix = hp_.hc_kind == HC_MHC ? (2 + hc) * hc : n_coef * hc,
                  n_scale = hp_.hc_kind == HC_MHC ? 3 : n_coef;
    w.fn = load_tensor(prefix + "_fn.weight", true, 2, {hp_.n_embd * hc, n_mix});
    w.base = load_tensor(prefix + "_base.weight", true, 1, {n_mix});
    w.scale = load_tensor(prefix + "_scale.weight", true, 1, {n_scale});
    if (w.base->type != GGML_TYPE_F32 || w.scale->type != GGML_TYPE_F32) // ggml's hc ops read them as F32
        throw FormatError(path_ + ": tensors '" + prefix + "_base.weight' / '" + prefix +
                          "_scale.weight': expected F32 (as llama.cpp's converter keeps them)");
    return w;
}

static ggml_tensor * contiguous(ggml_context * ctx, ggml_tensor * t) {
    return ggml_is_contiguous(t) ? t : ggml_cont(ctx, t);
}

// x [n_embd * hc, T] as ggml's hyper-connection ops take the streams: [n_embd, hc, T]
static ggml_tensor * streams3(ggml_context * ctx, ggml_tensor * x, int64_t E, int64_t hc) {
    return ggml_reshape_3d(ctx, contiguous(ctx, x), E, hc, x->ne[1]);
}

// The hc streams of x [n_embd * hc, T] weighted by w [hc, T] and summed: [n_embd, T] (ggml_dsv4_hc_pre)
ggml_tensor * Model::hc_reduce(ggml_context * ctx, ggml_tensor * x, ggml_tensor * w) {
    return ggml_dsv4_hc_pre(ctx, streams3(ctx, x, hp_.n_embd, hp_.hc_mult), contiguous(ctx, w));
}

// sigmoid(m * scale[i] + base[i * hc ..]) + eps for coefficient block i of m [n_coef * hc, T] -> [hc, T]
static ggml_tensor * hc_gate(ggml_context * ctx, const HcWeights & w, ggml_tensor * m, int i, int64_t hc,
                             float magnitude, float eps) {
    const size_t f = ggml_element_size(m);
    ggml_tensor * g = ggml_view_2d(ctx, m, hc, m->ne[1], m->nb[1], (size_t) i * hc * f);
    g = ggml_mul(ctx, g, ggml_view_1d(ctx, w.scale, 1, (size_t) i * ggml_element_size(w.scale)));
    g = ggml_add(ctx, g, ggml_view_1d(ctx, w.base, hc, (size_t) i * hc * ggml_element_size(w.base)));
    g = ggml_sigmoid(ctx, g);
    return ggml_scale_bias(ctx, g, magnitude, eps);
}

ggml_tensor * Model::hc_pre(ggml_context * ctx, const HcWeights & w, ggml_tensor * x, ggml_tensor ** post) {
    const HParams & h = hp_;
    if (h.hc_kind == HC_GATED) {
        ggml_tensor * xn = hc_norm(ctx, x, w.norm); // [n_embd * hc, T]
        ggml_tensor * lo = ggml_silu(ctx, ggml_scale(ctx, dense_mm(ctx, w.down, xn), 1.f / h.hc_mult));
        ggml_tensor * gate = streams3(ctx, dense_mm(ctx, w.up, lo), h.n_embd, h.hc_mult); // before its sigmoid
        if (post)
            *post =
                ggml_scale(ctx, ggml_sigmoid(ctx, ggml_scale(ctx, dense_mm(ctx, w.inject, xn), 1.f / h.hc_mult)), 2.f);
        // the streams' mean of sigmoid(gate) * xn
        return ggml_dsv4_hc_pre_gated(ctx, streams3(ctx, xn, h.n_embd, h.hc_mult), gate, 1.f / h.hc_mult);
    }
    ggml_tensor * m = ggml_mul_mat(ctx, w.fn, ggml_rms_norm(ctx, x, h.norm_eps)); // [2 hc, T] (mHC: [(2 + hc) hc, T])
    if (h.hc_kind == HC_MHC) {
        ggml_tensor * comb = ggml_dsv4_hc_comb(ctx, m, w.scale, w.base, h.hc_eps, h.hc_sinkhorn_iters); // [hc, hc, T]
        *post = ggml_concat(ctx, hc_gate(ctx, w, m, 1, h.hc_mult, 2.f, 0.f),
                            ggml_reshape_2d(ctx, comb, (int64_t) h.hc_mult * h.hc_mult, m->ne[1]), 0);
    } else {
        *post = hc_gate(ctx, w, m, 1, h.hc_mult, h.hc_magnitude, h.hc_eps);
    }
    return hc_reduce(ctx, x, hc_gate(ctx, w, m, 0, h.hc_mult, 1.f, h.hc_eps));
}

// x_d = post_d y + x_d, or with mHC's comb post_d y + sum_s comb[d, s] x_s (ggml_dsv4_hc_post); post [hc, T], mHC's
// [hc + hc^2, T]: the output's weights, then comb [hc dst, hc src]
ggml_tensor * Model::hc_post(ggml_context * ctx, ggml_tensor * x, ggml_tensor * y, ggml_tensor * post) {
    const int64_t E = hp_.n_embd, hc = hp_.hc_mult, T = y->ne[1];
    const size_t f = ggml_element_size(post);
    ggml_tensor * pw = ggml_cont(ctx, ggml_view_2d(ctx, post, hc, T, post->nb[1], 0));
    ggml_tensor * comb = hp_.hc_kind == HC_MHC
                             ? ggml_cont(ctx, ggml_view_3d(ctx, post, hc, hc, T, hc * f, post->nb[1], hc * f))
                             : nullptr; // identity: each stream keeps its own residual
    ggml_tensor * out = ggml_dsv4_hc_post(ctx, contiguous(ctx, y), streams3(ctx, x, E, hc), pw, comb);
    return ggml_reshape_2d(ctx, out, E * hc, T); // [n_embd * hc, T]
}

// grouped RMSNorm of the streams x [n_embd * hc, T] with a (1+w) gamma w [n_embd * hc]
ggml_tensor * Model::hc_norm(ggml_context * ctx, ggml_tensor * x, ggml_tensor * w) {
    const int64_t E = hp_.n_embd, hc = hp_.hc_mult, T = x->ne[1];
    ggml_tensor * x3 =
        ggml_rms_norm(ctx, ggml_reshape_3d(ctx, ggml_is_contiguous(x) ? x : ggml_cont(ctx, x), E, hc, T), hp_.norm_eps);
    return ggml_reshape_2d(ctx, ggml_mul(ctx, x3, ggml_reshape_2d(ctx, w, E, hc)), E * hc, T);
}

// the streams' mean of x [n_embd * hc, T] -> [n_embd, T]
ggml_tensor * Model::hc_mean(ggml_context * ctx, ggml_tensor * x) {
    const int64_t E = hp_.n_embd, T = x->ne[1];
    ggml_tensor * out = nullptr;
    for (int s = 0; s < hp_.hc_mult; ++s) {
        ggml_tensor * xs = ggml_view_2d(ctx, x, E, T, x->nb[1], (size_t) s * E * x->nb[0]);
        out = out ? ggml_add(ctx, out, xs) : ggml_cont(ctx, xs);
    }
    return ggml_scale(ctx, out, 1.f / hp_.hc_mult);
}

ggml_tensor * Model::hc_head(ggml_context * ctx, ggml_tensor * x) {
    const HParams & h = hp_;
    if (h.hc_kind == HC_GATED) return hc_pre(ctx, hc_head_, x, nullptr);
    if (h.hc_kind == HC_MHC) return hc_mean(ctx, x); // GLM-5.3-Flash: the plain mean, no weights
    ggml_tensor * m = ggml_mul_mat(ctx, hc_head_.fn, ggml_rms_norm(ctx, x, h.norm_eps)); // [hc, T]
    return hc_reduce(ctx, x, hc_gate(ctx, hc_head_, m, 0, h.hc_mult, 1.f, h.hc_eps));
}

// The residual stream of embeddings e [n_embd, T]: hc copies of each ([n_embd * hc, T]), or e itself
ggml_tensor * Model::hc_streams(ggml_context * ctx, ggml_tensor * e) {
    const int64_t E = hp_.n_embd, hc = hp_.hc_mult, T = e->ne[1];
    if (hc <= 1) return e;
    return ggml_reshape_2d(ctx, ggml_repeat_4d(ctx, ggml_reshape_3d(ctx, e, E, 1, T), E, hc, T, 1), E * hc, T);
}

} // namespace moelite
