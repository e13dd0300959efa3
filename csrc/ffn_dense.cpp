// FFN block: the dense gated MLP (leading dense layers, shared experts, Gemma-4's parallel MLP) and the gated
// activation every FFN of the family uses (SwiGLU, gpt-oss's clamped SwiGLU, GeGLU), or Nemotron-H's FFNs without a
// gate: down(relu(up x)^2).
#include <cmath>

#include "model.h"

namespace moelite {

// act(g) * u, elementwise; g, u: [n_ff, ...] of the same shape. No gate (ACT_RELU_SQR): relu(u)^2.
ggml_tensor * Model::glu(ggml_context * ctx, ggml_tensor * g, ggml_tensor * u, float limit) {
    const HParams & h = hp_;
    if (!g) return ggml_sqr(ctx, ggml_relu(ctx, u));
    if (limit > 0.f && h.act == ACT_SILU && h.clamp_gate) // Hy4's, before the SiLU: silu(min(g, L)) * clamp(u, +-L)
        return ggml_swiglu_clamp(ctx, g, u, limit);
    if (limit > 0.f && h.act == ACT_SILU) // Step-3.5's clamp, after the SiLU: min(silu(g), L) * clamp(u, +-L)
        return ggml_mul(ctx, ggml_clamp(ctx, ggml_silu(ctx, g), -INFINITY, limit), ggml_clamp(ctx, u, -limit, limit));
    if (h.act == ACT_SWIGLU_OAI) return ggml_swiglu_oai(ctx, g, u, h.oai_alpha, h.oai_limit);
    if (h.act == ACT_GELU) {
        // GELU (tanh form) in f32: 0.5 g (1 + tanh(sqrt(2/pi) (g + 0.044715 g^3))). ggml-cpu's own GELU reads an
        // fp16 table, which alone moves Gemma-4's logits by ~1e-3 against transformers.
        const float c = std::sqrt(2.0f / (float) M_PI);
        ggml_tensor * g3 = ggml_mul(ctx, ggml_mul(ctx, g, g), g);
        ggml_tensor * t = ggml_tanh(ctx, ggml_scale(ctx, ggml_add(ctx, g, ggml_scale(ctx, g3, 0.044715f)), c));
        ggml_tensor * gelu = ggml_mul(ctx, ggml_scale(ctx, g, 0.5f), ggml_scale_bias(ctx, t, 1.0f, 1.0f));
        return ggml_mul(ctx, gelu, u);
    }
    return ggml_swiglu_split(ctx, g, u);
}

// down(act(gate x) * up x), or down(relu(up x)^2) without a gate. x: [n_embd, T] -> [n_embd, T]
ggml_tensor * Model::ffn(ggml_context * ctx, ggml_tensor * x, ggml_tensor * gate, ggml_tensor * up, ggml_tensor * down,
                         float limit) {
    ggml_tensor * g = gate ? dense_mm(ctx, gate, x) : nullptr;
    ggml_tensor * u = dense_mm(ctx, up, x);
    return dense_mm(ctx, down, glu(ctx, g, u, limit));
}

// The dense block of layer il on the residual stream h [n_embd, T]: ffn(ffn_norm(h)) [-> post norm of the
// parallel dense path, Gemma-4]. The caller adds the residual (residual_out).
ggml_tensor * Model::dense_block(ggml_context * ctx, int il, ggml_tensor * h) {
    Layer & L = layers_[il];
    ggml_tensor * hn = L.ffn_norm ? norm(ctx, h, L.ffn_norm, L.ffn_norm_b) : h; // gated hyper-connections: normed
    ggml_tensor * y = ffn(ctx, hn, L.ffn_gate, L.ffn_up, L.ffn_down, hp_.plan[il].clamp_shexp);
    if (L.ffn_post_norm_dense) y = norm(ctx, y, L.ffn_post_norm_dense, nullptr);
    return y;
}

} // namespace moelite
