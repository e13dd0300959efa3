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
#include <functional>

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

// the indexer's key of each token: LayerNorm(attn_k cur) (weight and bias, eps 1e-6) [d, T]
ggml_tensor * Model::indexer_key(ggml_context * ctx, Layer & L, ggml_tensor * cur) {
    return ggml_add(ctx, ggml_mul(ctx, ggml_norm(ctx, dense_mm(ctx, L.idx_wk, cur), 1e-6f), L.idx_k_norm),
                    L.idx_k_norm_b);
}

ggml_tensor * Model::dsa_scores(ggml_context * ctx, ggml_cgraph * gf, int il, ggml_tensor * cur, ggml_tensor * qr,
                                ggml_tensor * pos, int T) {
    const HParams & h = hp_;
    Layer & L = layers_[il];
    const int64_t d = h.indexer_head_size, H = h.indexer_n_head;
    const int n_kv = n_past_ + T;
    ggml_tensor * q = ggml_reshape_3d(ctx, dense_mm(ctx, L.idx_wq_b, qr), d, H, T);
    q = indexer_rope(ctx, il, q, pos);                                                                     // [d, H, T]
    ggml_tensor * k = indexer_rope(ctx, il, ggml_reshape_3d(ctx, indexer_key(ctx, L, cur), d, 1, T), pos); // [d, 1, T]
    ggml_tensor * dst =
        ggml_view_2d(ctx, L.idx_k_cache, d, T, L.idx_k_cache->nb[1], (size_t) n_past_ * L.idx_k_cache->nb[1]);
    ggml_build_forward_expand(gf, ggml_cpy(ctx, ggml_reshape_2d(ctx, k, d, T), dst));
    if (n_kv <= h.indexer_top_k) return nullptr;

    ggml_tensor * K = ggml_view_2d(ctx, L.idx_k_cache, d, n_kv, L.idx_k_cache->nb[1], 0); // [d, n_kv]
    return ggml_add(ctx, indexer_score(ctx, L, K, q, cur), mask_f32_input(ctx, n_kv, T)); // future: -inf
}

// sum_h w(t, h) relu(q(t, h) . k_j) for keys K [d, n] and the heads q [d, H, T], w = proj cur / sqrt(d H): [n, T]
ggml_tensor * Model::indexer_score(ggml_context * ctx, Layer & L, ggml_tensor * K, ggml_tensor * q, ggml_tensor * cur) {
    const int64_t d = q->ne[0], H = q->ne[1], T = q->ne[2], n = K->ne[1];
    ggml_tensor * s = ggml_mul_mat(ctx, K, ggml_reshape_2d(ctx, ggml_cont(ctx, q), d, H * T)); // [n, H * T]
    s = ggml_reshape_3d(ctx, ggml_relu(ctx, s), n, H, T);
    ggml_tensor * w = ggml_scale(ctx, dense_mm(ctx, L.idx_proj, cur), 1.f / std::sqrt((float) (d * H))); // [H, T]
    s = ggml_mul(ctx, s, ggml_reshape_3d(ctx, w, 1, H, T));                                              // [n, H, T]
    s = ggml_sum_rows(ctx, ggml_cont(ctx, ggml_permute(ctx, s, 1, 0, 2, 3)));                            // [1, n, T]
    return ggml_reshape_2d(ctx, s, n, T);
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
//   block b (complete for token t when (b + 1) r <= pos_t + 1): key_b = rope(k_norm(mean of its r raw keys), b r),
//   computed once, by the ubatch that completes the block, into the layer's pool-key cache (pool_keys)
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
    ggml_tensor * kb = pool_keys(ctx, gf, il, T, [&](ggml_tensor * raw, int n) { // raw [d, r, n] -> keys [d, n]
        ggml_tensor * m = ggml_sum_rows(ctx, ggml_cont(ctx, ggml_permute(ctx, raw, 1, 0, 2, 3))); // [1, d, n]
        m = ggml_scale(ctx, ggml_reshape_3d(ctx, m, d, 1, n), 1.f / (float) r);
        m = ggml_mul(ctx, ggml_rms_norm(ctx, m, h.norm_eps), L.idx_k_norm);
        return ggml_reshape_2d(ctx, rope(ctx, il, m, qsa_pos_input(ctx, n)), d, n);
    });
    if (n_blk <= K) return nullptr; // every token sees at most K complete blocks: all of them selected (dense)

    ggml_tensor * q = ggml_reshape_3d(ctx, dense_mm(ctx, L.idx_q_proj, cur), d, H, T);
    q = rope(ctx, il, ggml_mul(ctx, ggml_rms_norm(ctx, q, h.norm_eps), L.idx_q_norm), pos); // [d, H, T]
    ggml_tensor * s = ggml_mul_mat(ctx, kb, ggml_reshape_2d(ctx, q, d, H * T));             // [n_blk, H T]
    s = ggml_reshape_3d(ctx, ggml_relu(ctx, s), n_blk, H, T);
    s = ggml_sum_rows(ctx, ggml_cont(ctx, ggml_permute(ctx, s, 1, 0, 2, 3))); // [1, n_blk, T]
    s = ggml_scale(ctx, ggml_reshape_2d(ctx, s, n_blk, T), 1.f / std::sqrt((float) d));
    return block_mask(ctx, top_blocks(ctx, s, K, n_blk, T), r, n_kv, T);
}

// The keys of layer il's complete pools [d, n_blk] (a view of its pool-key cache). Pools complete before this
// ubatch (n_past_ / r of them) are cached; those it completes are computed once here, by key_of from their rows of
// the indexer's key cache (raw [row, r, n] as F32, n new pools), and written to the cache before anything reads it
// (graph order). Each pool's key depends on its own rows alone, so computing it once gives the bits that computing
// every pool at every step gave, for a cost per step that no longer grows with the context.
ggml_tensor * Model::pool_keys(ggml_context * ctx, ggml_cgraph * gf, int il, int T,
                               const std::function<ggml_tensor *(ggml_tensor *, int)> & key_of) {
    Layer & L = layers_[il];
    ggml_tensor *c = L.idx_k_cache, *pk = L.idx_pool_cache;
    const int r = hp_.plan[il].compress, b0 = n_past_ / r, n_blk = (n_past_ + T) / r;
    if (n_blk > b0) {
        const int n = n_blk - b0;
        ggml_tensor * raw = ggml_view_3d(ctx, c, c->ne[0], r, n, c->nb[1], r * c->nb[1], (size_t) b0 * r * c->nb[1]);
        if (raw->type != GGML_TYPE_F32) raw = ggml_cast(ctx, raw, GGML_TYPE_F32);
        ggml_build_forward_expand(
            gf, ggml_cpy(ctx, key_of(raw, n), ggml_view_2d(ctx, pk, pk->ne[0], n, pk->nb[1], (size_t) b0 * pk->nb[1])));
    }
    return ggml_view_2d(ctx, pk, pk->ne[0], n_blk, pk->nb[1], 0);
}

// The top K of each token's complete blocks by their scores s [n_blk, T] -> [K, T] I32
ggml_tensor * Model::top_blocks(ggml_context * ctx, ggml_tensor * s, int K, int n_blk, int T) {
    ggml_tensor *tail = nullptr, *complete = nullptr; // per (block, token): 0 where the block is complete, else -inf
    qsa_inputs(ctx, n_blk, T, &tail, &complete);
    return ggml_top_k(ctx, ggml_add(ctx, s, complete), K);
}

// The attention mask [n_kv, T] of the blocks (pools) of r positions a token attends to: its selected complete blocks
// topk [K, T] and its incomplete tail block; + the causal mask (F16 with flash attention)
ggml_tensor * Model::block_mask(ggml_context * ctx, ggml_tensor * topk, int64_t r, int n_kv, int T) {
    const int n_blk = n_kv / (int) r, K = (int) topk->ne[0];
    ggml_tensor *tail = nullptr, *complete = nullptr; // tail: 0 at the blocks not complete for the token, else -inf
    qsa_inputs(ctx, n_blk, T, &tail, &complete);
    ggml_tensor * zero = ggml_fill(ctx, ggml_new_tensor_3d(ctx, GGML_TYPE_F32, 1, K, T), 0.f);
    // a copy: set_rows writes into its destination, and the input is shared by the graph's layers
    ggml_tensor * blocks = ggml_set_rows(ctx, ggml_dup(ctx, ggml_reshape_3d(ctx, tail, 1, n_blk, T)), zero, topk);
    ggml_tensor * mask = ggml_reshape_2d(ctx, ggml_repeat_4d(ctx, blocks, r, n_blk, T, 1), r * n_blk, T);
    if (n_kv > r * n_blk) mask = ggml_pad(ctx, mask, (int) (n_kv - r * n_blk), 0, 0, 0); // the last partial block
    mask = ggml_add(ctx, mask, mask_f32_input(ctx, n_kv, T));
    return opt_.flash_attn ? ggml_cast(ctx, mask, GGML_TYPE_F16) : mask;
}

// KPool (GLM-5.3-Flash) on an MLA layer: the lightning indexer (dsa_scores' q, keys and head weights, no RoPE) scores
// pools of r consecutive positions instead of single ones; a pool's key is a per-channel softmax-weighted sum of its
// r keys, the weights from the gate logits g = kpool_gate cur plus a bias per slot in the pool (APE):
//   pool p: key_p = sum_i softmax_i(g_{pr+i} + ape_i) * k_{pr+i}    (per channel, over the pool's r slots)
//   score(t, p) = sum_h w(t, h) relu(q(t, h) . key_p) / sqrt(d H) -> top top_k / r complete pools + the tail pool
// IndexShare layers (INDEXER_SHARED with a pool size) reuse the pools of the last full layer. Null (dense) while no
// token sees more complete pools than it selects.
ggml_tensor * Model::kpool_mask(ggml_context * ctx, ggml_cgraph * gf, int il, ggml_tensor * cur, ggml_tensor * qr,
                                int T) {
    const HParams & h = hp_;
    const LayerPlan & p = h.plan[il];
    Layer & L = layers_[il];
    const int64_t d = h.indexer_head_size, H = h.indexer_n_head, r = p.compress;
    const int n_kv = n_past_ + T, n_blk = n_kv / (int) r, K = h.indexer_top_k / (int) r;
    if (p.indexer == INDEXER_SHARED) {
        if (n_blk <= K) return nullptr;
        ggml_tensor * topk = gin_.dsa_topk ? gin_.dsa_topk : ggml_view_2d(ctx, dsa_topk_, K, T, dsa_topk_->nb[1], 0);
        return block_mask(ctx, topk, r, n_kv, T);
    }
    ggml_tensor * c = L.idx_k_cache; // rows [2 d]: the normed key, then the gate logits
    ggml_tensor * row = ggml_concat(ctx, indexer_key(ctx, L, cur), dense_mm(ctx, L.idx_kpool_gate, cur), 0); // [2d, T]
    ggml_build_forward_expand(
        gf, ggml_cpy(ctx, row, ggml_view_2d(ctx, c, 2 * d, T, c->nb[1], (size_t) n_past_ * c->nb[1])));
    ggml_tensor * kp = pool_keys(ctx, gf, il, T, [&](ggml_tensor * raw, int n) { // raw [2 d, r, n] -> keys [d, n]
        // keys and gate logits, each with the r slots first: [r, d, n]
        const size_t f = ggml_element_size(raw);
        ggml_tensor * k = ggml_view_3d(ctx, raw, d, r, n, raw->nb[1], raw->nb[2], 0);
        ggml_tensor * g =
            ggml_add(ctx, ggml_view_3d(ctx, raw, d, r, n, raw->nb[1], raw->nb[2], d * f), L.idx_kpool_ape);
        ggml_tensor * w = ggml_soft_max(ctx, ggml_cont(ctx, ggml_permute(ctx, g, 1, 0, 2, 3))); // over a pool's slots
        ggml_tensor * m = ggml_mul(ctx, w, ggml_cont(ctx, ggml_permute(ctx, k, 1, 0, 2, 3)));   // [r, d, n]
        return ggml_reshape_2d(ctx, ggml_sum_rows(ctx, m), d, n);
    });
    if (n_blk <= K) return nullptr;

    ggml_tensor * q = ggml_reshape_3d(ctx, dense_mm(ctx, L.idx_wq_b, qr), d, H, T); // no RoPE (NoPE MLA)
    ggml_tensor * topk = top_blocks(ctx, indexer_score(ctx, L, kp, q, cur), K, n_blk, T);
    gin_.dsa_topk = topk;
    if (dsa_topk_) // for the shared layers after this one, in later graphs
        ggml_build_forward_expand(gf, ggml_cpy(ctx, topk, ggml_view_2d(ctx, dsa_topk_, K, T, dsa_topk_->nb[1], 0)));
    return block_mask(ctx, topk, r, n_kv, T);
}

} // namespace moelite
