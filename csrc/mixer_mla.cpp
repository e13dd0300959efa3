// Mixer: DeepSeek multi-head latent attention (MLA) with absorbed projections, llama.cpp's GGUF layout
// (attn_k_b / attn_v_b). The KV cache holds the compressed latent: K = [kv_lora + rope] per token (one
// shared head), V = the latent part; attention() is shared with mixer_attention.cpp. With DSA (deepseek32,
// glm-dsa) the indexer's selection (mixer_dsa.cpp) is the attention mask.
//
//   cur [n_embd, T] -> q [dk, n_head, T] (dk = nope + rope) -> q_nope absorbed by W_kb -> [C + R, n_head, T]
//   kv_a [C + R, T] -> latent c [C, T] (normed) + k_pe (roped) -> attention in latent space -> W_vb -> W_o
#include "model.h"

namespace moelite {

ggml_tensor * Model::mixer_mla(ggml_context * ctx, ggml_cgraph * gf, int il, ggml_tensor * cur, ggml_tensor * pos,
                               int T) {
    const HParams & h = hp_;
    const LayerPlan & p = h.plan[il];
    Layer & L = layers_[il];
    const int64_t R = p.n_rot, nope = p.head_k - R, C = h.kv_lora_rank;
    ggml_tensor * qr = L.wq_a ? norm(ctx, dense_mm(ctx, L.wq_a, cur), L.q_a_norm, nullptr) : nullptr; // [q_lora, T]
    ggml_tensor * q = qr ? dense_mm(ctx, L.wq_b, qr) : dense_mm(ctx, L.wq, cur); // [n_head * dk, T]
    q = ggml_reshape_3d(ctx, q, p.head_k, p.n_head, T);
    ggml_tensor * q_nope = ggml_view_3d(ctx, q, nope, p.n_head, T, q->nb[1], q->nb[2], 0);
    ggml_tensor * kv = dense_mm(ctx, L.wkv_a, cur);                                               // [C + R, T]
    ggml_tensor * c = norm(ctx, ggml_view_2d(ctx, kv, C, T, kv->nb[1], 0), L.kv_a_norm, nullptr); // [C, T]
    ggml_tensor * q_abs = ggml_mul_mat(ctx, L.wk_b, ggml_permute(ctx, q_nope, 0, 2, 1, 3));       // [C, T, n_head]
    q_abs = ggml_permute(ctx, q_abs, 0, 2, 1, 3);                                                 // [C, n_head, T]
    ggml_tensor * c3 = ggml_reshape_3d(ctx, c, C, 1, T);
    ggml_tensor *q_cat = nullptr, *k_cat = nullptr; // [C + R, n_head, T], [C + R, 1, T]
    if (R > 0) {
        ggml_tensor * q_pe =
            rope(ctx, il, ggml_view_3d(ctx, q, R, p.n_head, T, q->nb[1], q->nb[2], nope * ggml_element_size(q)), pos);
        ggml_tensor * k_pe =
            rope(ctx, il, ggml_view_3d(ctx, kv, R, 1, T, kv->nb[1], kv->nb[1], C * ggml_element_size(kv)), pos);
        q_cat = ggml_concat(ctx, q_abs, q_pe, 0);
        k_cat = ggml_concat(ctx, c3, k_pe, 0);
    } else { // NoPE MLA without rope dims (GLM-5.3-Flash): the latent alone
        q_cat = ggml_cont(ctx, q_abs);
        k_cat = c3;
    }
    if (p.attn_temp) q_cat = ggml_mul(ctx, q_cat, attn_temp_input(ctx, T)); // Mistral-4 temperature
    // DSA: the indexer's selection masks the attention past its budget (null: dense); KPool: over pools of keys
    ggml_tensor * sel = nullptr;
    if (p.indexer == INDEXER_KPOOL || (p.indexer == INDEXER_SHARED && p.compress))
        sel = kpool_mask(ctx, gf, il, cur, qr, T);
    else if (p.indexer != INDEXER_NONE)
        sel = dsa_mask(ctx, gf, il, cur, qr, pos, T);
    ggml_tensor * o = attention(ctx, gf, il, q_cat, k_cat, c3, T, sel); // [C, n_head, T]
    o = ggml_mul_mat(ctx, L.wv_b, ggml_permute(ctx, o, 0, 2, 1, 3));    // [dv, T, n_head]
    o = ggml_cont(ctx, ggml_permute(ctx, o, 0, 2, 1, 3));               // [dv, n_head, T]
    if (L.wqkv_gate) { // o *= sigmoid(attn_gate x): per head (Ling-3.0) or per element (Hy4)
        ggml_tensor * g = ggml_sigmoid(ctx, dense_mm(ctx, L.wqkv_gate, cur)); // [n_head or n_head * dv, T]
        o = ggml_mul(ctx, o, ggml_reshape_3d(ctx, g, g->ne[0] == p.n_head ? 1 : p.head_v, p.n_head, T));
    }
    o = dense_mm(ctx, L.wo, ggml_reshape_2d(ctx, o, p.head_v * p.n_head, T)); // [n_embd, T]
    return L.bo ? ggml_add(ctx, o, L.bo) : o;
}

} // namespace moelite
