// Mixer: multi-head attention with a KV cache (GQA, per-layer head sizes and kv heads, q/k norms before or
// after RoPE, q/k/v/o biases, K = V layers, V norm, partial and per-layer RoPE, NoPE layers with Llama-4's
// attention temperature, sinks, output gates: sigmoid per head from q (Qwen3.5); from attn_gate on the input,
// sigmoid per element (AFMoE) or softplus per head or per element (Laguna)). Query heads per layer (p.n_head).
// MLA builds its q/k/v in mixer_mla.cpp and shares attention() below.
//
//   cur [n_embd, T] -> q [dk, n_head, T], k [dk, n_head_kv, T], v [dv, n_head_kv, T]
//   -> attention() -> [dv, T, n_head] -> merge heads [dv * n_head, T] -> W_o -> [n_embd, T]
#include "graph_util.h"
#include "model.h"

namespace moelite {

// RoPE of layer il (its rotated dims, base and factors; the model's scaling unless the layer runs plain RoPE);
// t: [d, n_heads, T]. NoPE layers return t.
ggml_tensor * Model::rope(ggml_context * ctx, int il, ggml_tensor * t, ggml_tensor * pos, int mode) {
    const HParams & h = hp_;
    const LayerPlan & p = h.plan[il];
    if (p.n_rot == 0 || !p.rotate) return t;
    const bool s = p.rope_scaling;
    return ggml_rope_ext(ctx, t, pos, layers_[il].rope_freqs, p.n_rot, mode < 0 ? h.rope_type : mode, h.n_ctx_orig,
                         p.freq_base, s ? h.freq_scale : 1.f, s ? h.ext_factor : 0.f, s ? h.attn_factor : 1.f,
                         h.beta_fast, h.beta_slow);
}

ggml_tensor * Model::mixer_attention(ggml_context * ctx, ggml_cgraph * gf, int il, ggml_tensor * cur, ggml_tensor * pos,
                                     int T) {
    const HParams & h = hp_;
    const LayerPlan & p = h.plan[il];
    Layer & L = layers_[il];
    ggml_tensor * q = dense_mm(ctx, L.wq, cur); // [n_head * dk, T]
    ggml_tensor * gate = nullptr;               // Qwen3.5: per head [q_h | gate_h]
    if (h.attn_output_gate) {
        const size_t el = ggml_element_size(q);
        gate =
            ggml_cont_2d(ctx, ggml_view_3d(ctx, q, p.head_k, p.n_head, T, 2 * p.head_k * el, q->nb[1], p.head_k * el),
                         p.head_k * p.n_head, T);
        q = ggml_cont_2d(ctx, ggml_view_3d(ctx, q, p.head_k, p.n_head, T, 2 * p.head_k * el, q->nb[1], 0),
                         p.head_k * p.n_head, T);
    } else if (L.wqkv_gate) {                   // attn_gate [n_embd -> n_head * dv or n_head]
        gate = dense_mm(ctx, L.wqkv_gate, cur); // [n_head * dv, T] or [n_head, T]
    }
    ggml_tensor * k = dense_mm(ctx, L.wk, cur);            // [n_head_kv * dk, T]
    ggml_tensor * v = L.wv ? dense_mm(ctx, L.wv, cur) : k; // K = V layers (Gemma-4 global): raw k
    if (L.bq) q = ggml_add(ctx, q, L.bq);
    if (L.bk) k = ggml_add(ctx, k, L.bk);
    if (L.bv) v = ggml_add(ctx, v, L.bv);
    if (h.qk_norm == QK_NORM_FULL) { // OLMoE, MiniMax-M2: over all heads at once
        q = ggml_mul(ctx, ggml_rms_norm(ctx, q, h.norm_eps), L.q_norm);
        k = ggml_mul(ctx, ggml_rms_norm(ctx, k, h.norm_eps), L.k_norm);
    }
    q = ggml_reshape_3d(ctx, q, p.head_k, p.n_head, T);
    k = ggml_reshape_3d(ctx, k, p.head_k, p.n_head_kv, T);
    v = ggml_reshape_3d(ctx, v, p.head_v, p.n_head_kv, T);
    const bool head_norm = h.qk_norm == QK_NORM_HEAD;
    if (head_norm && !h.qk_norm_after_rope) { // Qwen3 and most: per head, before RoPE
        q = ggml_mul(ctx, ggml_rms_norm(ctx, q, h.norm_eps), L.q_norm);
        k = ggml_mul(ctx, ggml_rms_norm(ctx, k, h.norm_eps), L.k_norm);
    }
    if (h.v_norm) v = ggml_rms_norm(ctx, v, h.norm_eps); // Gemma-4: no weight
    q = rope(ctx, il, q, pos);
    k = rope(ctx, il, k, pos);
    if (head_norm && h.qk_norm_after_rope) { // Hunyuan: after RoPE
        q = ggml_mul(ctx, ggml_rms_norm(ctx, q, h.norm_eps), L.q_norm);
        k = ggml_mul(ctx, ggml_rms_norm(ctx, k, h.norm_eps), L.k_norm);
    }
    if (h.qk_norm == QK_NORM_L2 && p.n_rot > 0) { // Llama-4: weightless, RoPE layers only
        q = ggml_rms_norm(ctx, q, h.norm_eps);
        k = ggml_rms_norm(ctx, k, h.norm_eps);
    }
    if (p.attn_temp) { // Llama-4 NoPE layers: per-position temperature
        q = ggml_mul(ctx, q, attn_temp_input(ctx, T));
    }
    // QSA (Qwen4-Exp): the indexer's block selection masks the attention past its budget (null: dense)
    ggml_tensor * sel = p.indexer == INDEXER_QSA ? qsa_mask(ctx, gf, il, cur, pos, T) : nullptr;
    ggml_tensor * o = attention(ctx, gf, il, q, k, v, T, sel);                 // [dv, n_head, T]
    if (h.attn_value_scale != 1.f) o = ggml_scale(ctx, o, h.attn_value_scale); // = V x scale (MiMo-V2)
    if (gate) {                                                                // gated attention output
        gate = h.attn_gate_softplus ? ggml_softplus(ctx, gate) : ggml_sigmoid(ctx, gate);
        if (gate->ne[0] == p.n_head)
            gate = ggml_reshape_3d(ctx, gate, 1, p.n_head, T); // per head: over dv
        else
            o = ggml_reshape_2d(ctx, o, p.head_v * p.n_head, T);
        o = ggml_mul(ctx, o, gate);
    }
    o = ggml_reshape_2d(ctx, o, p.head_v * p.n_head, T);
    o = dense_mm(ctx, L.wo, o); // [n_embd, T]
    return L.bo ? ggml_add(ctx, o, L.bo) : o;
}

// Causal attention over the KV cache of layer il (mask per the layer plan: full, sliding window, chunk; or the
// caller's, DSA's selection): the new k/v written into the cache, then attend() over the cache's first n_past + T
// positions: with flash_attn, V cached untransposed and on the CPU moelite's ops (attn_cpu.cpp) unless switched
// off, else ggml_flash_attn_ext; without,
// softmax(K^T Q + mask) V over a V cache stored transposed.
// q: [dk, n_head, T], k: [dk, n_head_kv, T], v: [dv, n_head_kv, T] -> [dv, n_head, T] (contiguous, heads unmerged)
ggml_tensor * Model::attention(ggml_context * ctx, ggml_cgraph * gf, int il, ggml_tensor * q, ggml_tensor * k,
                               ggml_tensor * v, int T, ggml_tensor * mask) {
    Layer & L = layers_[il];
    const int64_t dk = q->ne[0], dv = v->ne[0], n_head_kv = k->ne[1];
    const int n_kv = n_past_ + T;
    const size_t ev = ggml_element_size(L.v_cache);
    const bool flash = opt_.flash_attn;
    // write the new K (rows) and V (rows with flash attention, else transposed: columns) into the cache
    ggml_tensor * k_dst =
        ggml_view_2d(ctx, L.k_cache, dk * n_head_kv, T, L.k_cache->nb[1], (size_t) n_past_ * L.k_cache->nb[1]);
    if (!ggml_is_contiguous(k)) k = ggml_cont(ctx, k);
    if (!ggml_is_contiguous(v)) v = ggml_cont(ctx, v);
    ggml_build_forward_expand(gf, ggml_cpy(ctx, ggml_reshape_2d(ctx, k, dk * n_head_kv, T), k_dst));
    ggml_tensor * v2 = ggml_reshape_2d(ctx, v, dv * n_head_kv, T);
    if (flash)
        ggml_build_forward_expand(gf, ggml_cpy(ctx, v2,
                                               ggml_view_2d(ctx, L.v_cache, dv * n_head_kv, T, L.v_cache->nb[1],
                                                            (size_t) n_past_ * L.v_cache->nb[1])));
    else
        ggml_build_forward_expand(
            gf, ggml_cpy(ctx, ggml_transpose(ctx, v2),
                         ggml_view_2d(ctx, L.v_cache, T, dv * n_head_kv, L.v_cache->nb[1], (size_t) n_past_ * ev)));

    ggml_tensor * K = ggml_view_3d(ctx, L.k_cache, dk, n_kv, n_head_kv, L.k_cache->nb[1],
                                   ggml_row_size(L.k_cache->type, dk), 0); // [dk, n_kv, h_kv] (q8_0 rows too)
    ggml_tensor * V = flash ? ggml_view_3d(ctx, L.v_cache, dv, n_kv, n_head_kv, L.v_cache->nb[1],
                                           ggml_row_size(L.v_cache->type, dv), 0) // [dv, n_kv, h_kv]
                            : ggml_view_3d(ctx, L.v_cache, n_kv, dv, n_head_kv, L.v_cache->nb[1], L.v_cache->nb[1] * dv,
                                           0); // [n_kv, dv, h_kv]
    AttnPath path = !flash ? AttnPath::PLAIN : AttnPath::FLASH;
    if (flash && backend_ == cpu_backend_ && (T <= kAttnDecodeMaxT ? opt_.decode_attn : opt_.prompt_attn))
        path = AttnPath::CPU;
    if (!mask) mask = mask_input(ctx, hp_.plan[il].mask, n_kv, T);
    return attend(ctx, path, q, K, V, mask, L.sinks, &hp_.plan[il].kq_scale);
}

ggml_tensor * attend(ggml_context * ctx, AttnPath path, ggml_tensor * q, ggml_tensor * K, ggml_tensor * V,
                     ggml_tensor * mask, ggml_tensor * sinks, const float * scale) {
    const int64_t T = q->ne[2];
    if (path == AttnPath::CPU && attn_cpu_supports(K, V, mask, T))
        return T <= kAttnDecodeMaxT ? attn_decode(ctx, q, K, V, mask, sinks, scale)
                                    : attn_prompt(ctx, q, K, V, mask, sinks, scale);
    ggml_tensor * Q = ggml_permute(ctx, q, 0, 2, 1, 3); // [dk, T, n_head]
    if (path != AttnPath::PLAIN) {
        ggml_tensor * o = ggml_flash_attn_ext(ctx, Q, K, V, mask, *scale, 0.0f, 0.0f); // [dv, n_head, T]
        if (sinks) ggml_flash_attn_ext_add_sinks(o, sinks);
        return o;
    }
    ggml_tensor * kq = ggml_mul_mat(ctx, K, Q); // [n_kv, T, n_head]
    kq = ggml_soft_max_ext(ctx, kq, mask, *scale, 0.0f);
    if (sinks) ggml_soft_max_add_sinks(kq, sinks);
    return ggml_cont(ctx,
                     ggml_permute(ctx, ggml_mul_mat(ctx, V, kq), 0, 2, 1, 3)); // [dv, T, n_head] -> [dv, n_head, T]
}

} // namespace moelite
