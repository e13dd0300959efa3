// The MTP (multi-token prediction, "nextn") block: one more decoder block after the trunk that predicts the token
// after next, the draft source of speculative decoding (runtime/speculative.py, speculative="mtp").
//
// Row i of the block reads the trunk's output-normed hidden state h_i of token i and the embedding of token i + 1:
//   x = eh_proj [enorm(embed(t_{i+1})) | hnorm(h_i)]         [2 n_embd] -> [n_embd]
//   x = decoder block (blk.{n_layer}: the layer plan's mixer and FFN, its own KV cache, its experts in the cache)
//   g = shared_head_norm(x); logits = head(g)                  the guess for t_{i+2}; g seeds the next draft row
// as llama.cpp's hy_v3 MTP graph and vLLM's MTP layers compute it. Its KV cache follows the trunk's one position
// behind: after a ubatch of the trunk at positions p..p+T-1, the block runs rows (h_{i-1}, t_i) at positions i - 1
// (run_mtp_lagged; they wait in a backlog until a draft needs them, mtp_backlog), so when the next token is sampled,
// the row (h_{last}, next) gives the first draft at once (mtp_draft). The drafts' own rows are written past the context and overwritten by the next ubatch's lagged rows
// (same inputs for the first, the trunk's h for the others). A position's K/V depends on the tokens and the trunk
// alone, so a truncation leaves the MTP cache valid up to the new end.
#include <algorithm>
#include <cmath>

#include "common.h"
#include "graph_util.h"
#include "model.h"

namespace moelite {

void Model::load_mtp(int il, Layer & L) {
    const int64_t E = hp_.n_embd, V = hp_.n_vocab;
    L.nextn_eh_proj = load_tensor(blk(il, "nextn.eh_proj.weight"), true, 2, {2 * E, E});
    L.nextn_enorm = load_tensor(blk(il, "nextn.enorm.weight"), true, 1, {E});
    L.nextn_hnorm = load_tensor(blk(il, "nextn.hnorm.weight"), true, 1, {E});
    L.nextn_head_norm = load_tensor(blk(il, "nextn.shared_head_norm.weight"), false, 1, {E});
    if (!L.nextn_head_norm) L.nextn_head_norm = out_norm_; // llama.cpp's fallback: the trunk's output norm
    L.nextn_embd = load_tensor(blk(il, "nextn.embed_tokens.weight"), false, 2, {E, V});
    L.nextn_head = load_tensor(blk(il, "nextn.shared_head_head.weight"), false, 2, {E, V});
}

void Model::mtp_rows(const float * hidden, const int32_t * tokens, int T, int pos0, int n_out, float * logits,
                     float * h_out) {
    const HParams & h = hp_;
    const int il = h.n_layer, E = h.n_embd;
    Layer & L = layers_[il];
    if (T <= 0) return;
    if (pos0 < 0 || pos0 + T > opt_.n_ctx) throw BudgetError("MTP rows past n_ctx");
    const int n_past = n_past_; // the block's rows sit at its own positions: the shared inputs follow them
    n_past_ = pos0;
    pos_.resize(T);
    for (int t = 0; t < T; ++t) pos_[t] = pos0 + t;
    build_masks(T);
    try {
        { // x_ = eh_proj [enorm(embed(t)) | hnorm(h)]
            ggml_context * ctx = begin_graph();
            ggml_cgraph * gf = ggml_new_graph_custom(ctx, kMaxNodes, false);
            ggml_tensor * tok = ggml_new_tensor_1d(ctx, GGML_TYPE_I32, T);
            ggml_set_input(tok);
            ggml_tensor * hin = ggml_new_tensor_2d(ctx, GGML_TYPE_F32, E, T);
            ggml_set_input(hin);
            ggml_tensor * e = ggml_get_rows(ctx, L.nextn_embd ? L.nextn_embd : tok_embd_, tok); // [E, T]
            ggml_tensor * cat = ggml_concat(ctx, norm(ctx, e, L.nextn_enorm, nullptr),
                                            norm(ctx, hin, L.nextn_hnorm, nullptr), 0); // [2E, T]
            ggml_tensor * x = dense_mm(ctx, L.nextn_eh_proj, cat);                      // [E, T]
            ggml_build_forward_expand(gf, ggml_cpy(ctx, x, rows_of(ctx, x_, 0, T)));
            compute(ctx, gf, galloc_);
            set_input(tok, tokens, (size_t) T * sizeof(int32_t));
            set_input(hin, hidden, (size_t) T * E * sizeof(float));
            ggml_backend_graph_compute(backend_, gf);
            ggml_free(ctx);
        }
        run_layer_front(il, T); // the decoder block: its mixer over its own KV cache, then its FFN
        if (L.moe) {
            std::vector<int32_t> ids;
            std::vector<float> w;
            route(il, router_, T, ids, w, nullptr, true);
            moe_layer(il, T, ids, w);
            for (int t = 0; t < T; ++t)
                cache_->note_token_experts(il, &ids[(size_t) t * h.n_expert_used], h.n_expert_used);
        }
        check_finite(il, T);
        if (n_out > 0) { // the head on the last n_out rows; the last row's normed state for the next draft
            n_out = std::min(n_out, T);
            ggml_context * ctx = begin_graph();
            ggml_cgraph * gf = ggml_new_graph_custom(ctx, kMaxNodes, false);
            ggml_tensor * x = rows_of(ctx, x_, T - n_out, n_out);
            ggml_tensor * g = norm(ctx, x, L.nextn_head_norm, nullptr);
            ggml_set_output(g);
            ggml_tensor * y = head_logits(ctx, g, L.nextn_head ? L.nextn_head : output_); // [n_vocab, n_out]
            ggml_set_output(y);
            ggml_build_forward_expand(gf, g);
            ggml_build_forward_expand(gf, y);
            compute(ctx, gf, galloc_);
            ggml_backend_graph_compute(backend_, gf);
            ggml_backend_tensor_get(y, logits, 0, ggml_nbytes(y));
            if (h_out) ggml_backend_tensor_get(g, h_out, (size_t) (n_out - 1) * g->nb[1], (size_t) E * sizeof(float));
            ggml_free(ctx);
        }
    } catch (...) {
        n_past_ = n_past;
        throw;
    }
    n_past_ = n_past;
}

// After the trunk's ubatch of T tokens at positions n_past_..: keep their output-normed hidden states, then run the
// rows (h_{i-1}, t_i) that became known: the first pairs the previous ubatch's last state with this ubatch's first
// token; a context's first token has no row (nothing before it), nor has a token whose predecessor's state is gone
// (after a truncation past the last ubatch: its position keeps the cached K/V of an earlier row).
void Model::run_mtp_lagged(const int32_t * tokens, int T) {
    const int E = hp_.n_embd;
    mtp_hidden_.resize((size_t) T * E);
    {
        ggml_context * ctx = begin_graph();
        ggml_cgraph * gf = ggml_new_graph_custom(ctx, kMaxNodes, false);
        ggml_tensor * hn = norm(ctx, rows_of(ctx, x_, 0, T), out_norm_, out_norm_b_); // [E, T]
        ggml_set_output(hn);
        ggml_build_forward_expand(gf, hn);
        compute(ctx, gf, galloc_);
        ggml_backend_graph_compute(backend_, gf);
        ggml_backend_tensor_get(hn, mtp_hidden_.data(), 0, mtp_hidden_.size() * sizeof(float));
        ggml_free(ctx);
    }
    mtp_hidden_pos_ = n_past_;
    const bool pending = n_past_ > 0 && mtp_pending_pos_ == n_past_ - 1;
    if (pending) {
        mtp_backlog(mtp_pending_.data(), tokens, 1, n_past_ - 1);
        mtp_backlog(mtp_hidden_.data(), tokens + 1, T - 1, n_past_);
    } else if (T > 1) {
        mtp_backlog(mtp_hidden_.data(), tokens + 1, T - 1, n_past_);
    }
    mtp_pending_.assign(mtp_hidden_.end() - E, mtp_hidden_.end());
    mtp_pending_pos_ = n_past_ + T - 1;
}

// The block's rows wait in a backlog until a draft needs them (mtp_draft), or a ubatch of them has gathered: while
// the cost rule declines to draft, the block costs nothing per step, and its rows run later as one ubatch (its
// dense weights read once for all). Rows must stay contiguous in position: a gap (after a truncation) runs the
// older ones first.
void Model::mtp_backlog(const float * hidden, const int32_t * tokens, int n, int pos0) {
    if (n <= 0) return;
    const int E = hp_.n_embd, count = (int) mtp_back_t_.size();
    if (count && mtp_back_pos_ + count != pos0) mtp_flush();
    if (mtp_back_t_.empty()) mtp_back_pos_ = pos0;
    mtp_back_h_.insert(mtp_back_h_.end(), hidden, hidden + (size_t) n * E);
    mtp_back_t_.insert(mtp_back_t_.end(), tokens, tokens + n);
    if ((int) mtp_back_t_.size() >= opt_.n_ubatch) mtp_flush();
}

void Model::mtp_flush() {
    const int E = hp_.n_embd, n = (int) mtp_back_t_.size();
    std::vector<float> h;
    std::vector<int32_t> t;
    h.swap(mtp_back_h_); // emptied first: a failing row leaves no backlog to rerun
    t.swap(mtp_back_t_);
    for (int i = 0; i < n; i += opt_.n_ubatch)
        mtp_rows(h.data() + (size_t) i * E, t.data() + i, std::min(opt_.n_ubatch, n - i), mtp_back_pos_ + i, 0, nullptr,
                 nullptr);
}

// The context now ends at position n: rows at positions >= n - 1 (their next token is gone) are forgotten.
void Model::mtp_forget_from(int n) {
    const int keep = std::max(0, std::min((int) mtp_back_t_.size(), n - 1 - mtp_back_pos_));
    mtp_back_t_.resize(keep);
    mtp_back_h_.resize((size_t) keep * hp_.n_embd);
}

int Model::mtp_draft(int32_t token, int n_max, int32_t * out, float * logits0) {
    const HParams & h = hp_;
    if (!mtp_ready() || n_max <= 0) return 0;
    if (token < 0 || token >= h.n_vocab)
        throw FormatError("token id " + std::to_string(token) + " out of range [0, " + std::to_string(h.n_vocab) + ")");
    mtp_flush();                                   // the block's cache up to the context's end
    n_max = std::min(n_max, opt_.n_ctx - n_past_); // row i sits at position n_past_ - 1 + i
    std::vector<float> hid = mtp_pending_, g(h.n_embd), logits(h.n_vocab);
    int32_t tok = token;
    int n = 0;
    for (; n < n_max; ++n) {
        mtp_rows(hid.data(), &tok, 1, n_past_ - 1 + n, 1, logits.data(), g.data());
        if (n == 0 && logits0) std::copy(logits.begin(), logits.end(), logits0);
        tok = (int32_t) (std::max_element(logits.begin(), logits.end()) - logits.begin());
        out[n] = tok;
        hid.swap(g);
    }
    return n;
}

} // namespace moelite
