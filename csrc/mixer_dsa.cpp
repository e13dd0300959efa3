// DSA (DeepSeek Sparse Attention, deepseek32 / glm-dsa) on top of the MLA mixer: a lightning indexer scores every
// cached position for each token and the top `indexer_top_k` of them are the only ones its attention sees.
//
//   qr [q_lora, T] (the MLA's normed q latent) -> q_idx = attn_q_b qr [d, n_idx, T], RoPE on the first n_rot dims
//   (Hy4: on the last n_rot)
//   cur [n_embd, T] -> k_idx = LayerNorm(attn_k cur) [d, T], RoPE -> the layer's indexer key cache, rows n_past..
//   score(t, j) = sum_h w(t, h) relu(q_idx(t, h) . k_idx(j)),  w = proj cur / sqrt(d n_idx)  [n_kv, T]
//   + the causal mask -> top_k per token -> mask: 0 at the selected positions, -inf elsewhere (+ causal)
// While n_kv <= top_k every position is selected: the mask is the plain causal one (dense attention, no scores).
// IndexShare (GLM-5.2) layers reuse the selection of the last full layer before them.
#include <cmath>

#include "model.h"

namespace moelite {

// RoPE of an indexer head t [d, heads, T]: on its first n_rot dims, or (indexer_rope_tail, Hy4) on its last
ggml_tensor * Model::indexer_rope(ggml_context * ctx, int il, ggml_tensor * t, ggml_tensor * pos) {
    const HParams & h = hp_;
    if (!h.indexer_rope_tail) return rope(ctx, il, t, pos, h.indexer_rope_type);
    const int64_t R = h.plan[il].n_rot, d = t->ne[0];
    ggml_tensor * pass = ggml_view_3d(ctx, t, d - R, t->ne[1], t->ne[2], t->nb[1], t->nb[2], 0);
    ggml_tensor * rot = ggml_view_3d(ctx, t, R, t->ne[1], t->ne[2], t->nb[1], t->nb[2], (d - R) * ggml_element_size(t));
    return ggml_concat(ctx, pass, rope(ctx, il, rot, pos, h.indexer_rope_type), 0);
}

ggml_tensor * Model::dsa_scores(ggml_context * ctx, ggml_cgraph * gf, int il, ggml_tensor * cur, ggml_tensor * qr,
                                ggml_tensor * pos, int T) {
    const HParams & h = hp_;
    Layer & L = layers_[il];
    const int64_t d = h.indexer_head_size, H = h.indexer_n_head;
    const int n_kv = n_past_ + T;
    ggml_tensor * q = ggml_reshape_3d(ctx, dense_mm(ctx, L.idx_wq_b, qr), d, H, T);
    q = indexer_rope(ctx, il, q, pos); // [d, H, T]
    ggml_tensor * k = ggml_mul(ctx, ggml_norm(ctx, dense_mm(ctx, L.idx_wk, cur), 1e-6f), L.idx_k_norm);
    k = ggml_add(ctx, k, L.idx_k_norm_b);                             // LayerNorm [d, T]
    k = indexer_rope(ctx, il, ggml_reshape_3d(ctx, k, d, 1, T), pos); // [d, 1, T]
    ggml_tensor * dst =
        ggml_view_2d(ctx, L.idx_k_cache, d, T, L.idx_k_cache->nb[1], (size_t) n_past_ * L.idx_k_cache->nb[1]);
    ggml_build_forward_expand(gf, ggml_cpy(ctx, ggml_reshape_2d(ctx, k, d, T), dst));
    if (n_kv <= h.indexer_top_k) return nullptr;

    ggml_tensor * K = ggml_view_2d(ctx, L.idx_k_cache, d, n_kv, L.idx_k_cache->nb[1], 0);      // [d, n_kv]
    ggml_tensor * s = ggml_mul_mat(ctx, K, ggml_reshape_2d(ctx, ggml_cont(ctx, q), d, H * T)); // [n_kv, H * T]
    s = ggml_reshape_3d(ctx, ggml_relu(ctx, s), n_kv, H, T);
    ggml_tensor * w = ggml_scale(ctx, dense_mm(ctx, L.idx_proj, cur), 1.f / std::sqrt((float) (d * H))); // [H, T]
    s = ggml_mul(ctx, s, ggml_reshape_3d(ctx, w, 1, H, T));                                              // [n_kv, H, T]
    s = ggml_sum_rows(ctx, ggml_cont(ctx, ggml_permute(ctx, s, 1, 0, 2, 3)));                            // [1, n_kv, T]
    return ggml_add(ctx, ggml_reshape_2d(ctx, s, n_kv, T), mask_f32_input(ctx, n_kv, T));                // future: -inf
}

ggml_tensor * Model::dsa_mask(ggml_context * ctx, ggml_cgraph * gf, int il, ggml_tensor * cur, ggml_tensor * qr,
                              ggml_tensor * pos, int T) {
    const HParams & h = hp_;
    const int n_kv = n_past_ + T, K = h.indexer_top_k;
    ggml_tensor * topk = nullptr; // [K, T] I32: selected positions of each token
    if (h.plan[il].indexer == INDEXER_FULL) {
        ggml_tensor * score = dsa_scores(ctx, gf, il, cur, qr, pos, T);
        if (!score) return nullptr;
        topk = ggml_top_k(ctx, score, K);
        gin_.dsa_topk = topk;
        if (dsa_topk_) // for the shared layers after this one, in later graphs
            ggml_build_forward_expand(gf, ggml_cpy(ctx, topk, ggml_view_2d(ctx, dsa_topk_, K, T, dsa_topk_->nb[1], 0)));
    } else {
        if (n_kv <= K) return nullptr;
        topk = gin_.dsa_topk ? gin_.dsa_topk : ggml_view_2d(ctx, dsa_topk_, K, T, dsa_topk_->nb[1], 0);
    }
    // -inf everywhere, 0 at the selected positions (rows of one element: set_rows writes per token)
    ggml_tensor * causal = mask_f32_input(ctx, n_kv, T);
    ggml_tensor * sel = ggml_reshape_3d(ctx, ggml_fill(ctx, causal, -INFINITY), 1, n_kv, T);
    ggml_tensor * zero = ggml_fill(ctx, ggml_new_tensor_3d(ctx, GGML_TYPE_F32, 1, K, T), 0.f);
    sel = ggml_set_rows(ctx, sel, zero, topk);
    // + causal: a token with fewer than K visible positions selected some future ones (scored -inf)
    ggml_tensor * mask = ggml_add(ctx, ggml_reshape_2d(ctx, sel, n_kv, T), causal); // [n_kv, T]
    return opt_.flash_attn ? ggml_cast(ctx, mask, GGML_TYPE_F16) : mask;
}

} // namespace moelite

namespace moelite {

// QSA (Qwen4-Exp) on a full-attention layer: the token indexer scores blocks of `compress` consecutive keys instead
// of single positions, and each token attends to the top top_k / compress complete blocks plus the incomplete tail
// block (every position of it it can see). Exact, not an approximation: identical to dense attention while a token
// sees at most top_k / compress complete blocks.
//
//   cur [n_embd, T] (the layer's normed input) -> q = q_norm(q_proj cur) [d, n_idx, T], roped as the attention's q
//                                              -> k = k_proj cur [d, T]: the indexer key cache (raw keys), rows n_past..
//   block b (complete for token t when (b + 1) r <= pos_t + 1): key_b = rope(k_norm(mean of its r raw keys), b r)
//   score(t, b) = sum_h relu(q(t, h) . key_b) / sqrt(d)  ->  top (top_k / r) blocks -> the mask over positions
ggml_tensor * Model::qsa_mask(ggml_context * ctx, ggml_cgraph * gf, int il, ggml_tensor * cur, ggml_tensor * pos,
                              int T) {
    const HParams & h = hp_;
    const LayerPlan & p = h.plan[il];
    Layer & L = layers_[il];
    const int64_t d = h.indexer_head_size, H = h.indexer_n_head, r = p.compress;
    const int n_kv = n_past_ + T, n_blk = n_kv / (int) r, K = h.indexer_top_k / (int) r;
    ggml_tensor * k = dense_mm(ctx, L.idx_wk, cur); // [d, T] raw keys
    ggml_tensor * dst =
        ggml_view_2d(ctx, L.idx_k_cache, d, T, L.idx_k_cache->nb[1], (size_t) n_past_ * L.idx_k_cache->nb[1]);
    ggml_build_forward_expand(gf, ggml_cpy(ctx, k, dst));
    if (n_blk <= K) return nullptr; // every token sees at most K complete blocks: all of them selected (dense)

    // block keys [d, n_blk]: the mean of each block's r raw keys, (1+w)-normed, roped at the block's first position
    ggml_tensor * raw =
        ggml_view_3d(ctx, L.idx_k_cache, d, r, n_blk, L.idx_k_cache->nb[1], r * L.idx_k_cache->nb[1], 0);
    if (raw->type != GGML_TYPE_F32) raw = ggml_cast(ctx, raw, GGML_TYPE_F32);
    ggml_tensor * kb = ggml_sum_rows(ctx, ggml_cont(ctx, ggml_permute(ctx, raw, 1, 0, 2, 3))); // [1, d, n_blk]
    kb = ggml_scale(ctx, ggml_reshape_3d(ctx, kb, d, 1, n_blk), 1.f / (float) r);
    kb = ggml_mul(ctx, ggml_rms_norm(ctx, kb, h.norm_eps), L.idx_k_norm);
    kb = rope(ctx, il, kb, qsa_pos_input(ctx, n_blk)); // [d, 1, n_blk]
    ggml_tensor * q = ggml_reshape_3d(ctx, dense_mm(ctx, L.idx_q_proj, cur), d, H, T);
    q = rope(ctx, il, ggml_mul(ctx, ggml_rms_norm(ctx, q, h.norm_eps), L.idx_q_norm), pos); // [d, H, T]
    ggml_tensor * s = ggml_mul_mat(ctx, ggml_reshape_2d(ctx, kb, d, n_blk), ggml_reshape_2d(ctx, q, d, H * T));
    s = ggml_reshape_3d(ctx, ggml_relu(ctx, s), n_blk, H, T);
    s = ggml_sum_rows(ctx, ggml_cont(ctx, ggml_permute(ctx, s, 1, 0, 2, 3))); // [1, n_blk, T]
    s = ggml_scale(ctx, ggml_reshape_2d(ctx, s, n_blk, T), 1.f / std::sqrt((float) d));
    // per (block, token): 0 / -inf where the block is the token's tail (incomplete) or not, and the reverse
    ggml_tensor *tail = nullptr, *complete = nullptr;
    qsa_inputs(ctx, n_blk, T, &tail, &complete);
    ggml_tensor * topk = ggml_top_k(ctx, ggml_add(ctx, s, complete), K); // among each token's complete blocks
    // the blocks a token attends to: the selected ones and its tail -> positions (x r) -> + causal
    ggml_tensor * zero = ggml_fill(ctx, ggml_new_tensor_3d(ctx, GGML_TYPE_F32, 1, K, T), 0.f);
    ggml_tensor * blocks = ggml_set_rows(ctx, ggml_reshape_3d(ctx, tail, 1, n_blk, T), zero, topk); // [1, n_blk, T]
    ggml_tensor * mask = ggml_reshape_2d(ctx, ggml_repeat_4d(ctx, blocks, r, n_blk, T, 1), r * n_blk, T);
    if (n_kv > r * n_blk) mask = ggml_pad(ctx, mask, (int) (n_kv - r * n_blk), 0, 0, 0); // the last partial block
    mask = ggml_add(ctx, mask, mask_f32_input(ctx, n_kv, T));
    return opt_.flash_attn ? ggml_cast(ctx, mask, GGML_TYPE_F16) : mask;
}

} // namespace moelite
