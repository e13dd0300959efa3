// PLE: Qwen4-Exp's per-layer n-gram hash embeddings (issue 30). One Gated DeltaNet layer adds to every residual
// stream a value gathered from a huge table (51B parameters in the release) by hashing each token's 2- and 3-grams:
// each token reads (ngram - 1) x heads_per_ngram rows of a few hundred bytes. The table is never loaded: PleTable
// reads the rows a ubatch needs from the GGUF (pread) into a fixed LRU cache of rows, as soon as the tokens are known
// (before the ubatch's first layer), and dequantizes them to F32 for the graph.
//
//   host: ids (t - 2, t - 1, t; an EOS cuts the n-gram: earlier positions read as EOS) -> for n = 2..ngram:
//         h = XOR_j (ids[j] * mult[j]) (uint64), row = h % vocab[head] + offset[head]  ->  emb [heads * row_dim, T]
//   key   = grouped_norm(ple_key emb)                 [n_embd * hc, T]   (one group a stream, (1+w) folded)
//   value = ple_value emb                              [n_embd, T]
//   gate  = sigmoid(ssqrt(<key_s, grouped_norm(x)_s> / sqrt(n_embd)))   [1, hc, T]   ssqrt(v) = sign(v) sqrt(|v|)
//   g     = gate_s * value                             [n_embd, hc, T]
//   x    += g + silu(dilated_conv(grouped_norm(g)))    causal depthwise conv, kernel K, dilation ngram, state kept
#include <algorithm>
#include <cmath>
#include <future>

#include "graph_util.h"
#include "model.h"
#include "ple.h"

namespace moelite {

void Model::load_ple(int il, Layer & L) {
    const HParams & h = hp_;
    const int64_t E = h.n_embd, C = h.n_embd_res(), E_ple = (int64_t) h.ple_heads * h.ple_row_dim;
    L.ple_key = load_tensor(blk(il, "ple_key.weight"), true, 2, {E_ple, C});
    L.ple_value = load_tensor(blk(il, "ple_value.weight"), true, 2, {E_ple, E});
    L.ple_norm_key = load_tensor(blk(il, "ple_norm_key.weight"), true, -1, {});
    L.ple_norm_query = load_tensor(blk(il, "ple_norm_query.weight"), true, -1, {});
    L.ple_norm_conv = load_tensor(blk(il, "ple_norm_conv.weight"), true, -1, {});
    for (ggml_tensor * w : {L.ple_norm_key, L.ple_norm_query, L.ple_norm_conv})
        if (ggml_nelements(w) != C || w->type != GGML_TYPE_F32)
            throw FormatError(path_ + ": tensor '" + std::string(w->name) + "': expected " + std::to_string(C) +
                              " F32 values (a (1+w) gamma per stream and channel)");
    L.ple_conv = load_tensor(blk(il, "ple_conv1d.weight"), true, 2, {h.ple_conv_kernel, C});
    if (L.ple_conv->type != GGML_TYPE_F32) throw FormatError(path_ + ": tensor 'ple_conv1d.weight' must be F32");
    const TensorInfo * t = idx_->find("per_layer_token_embd.weight");
    if (!t || t->n_dims != 2 || t->ne[0] != h.ple_row_dim)
        throw FormatError(path_ + ": tensor 'per_layer_token_embd.weight': expected [" + std::to_string(h.ple_row_dim) +
                          ", rows] (embedding_length_per_layer_input)");
    for (int i = 0; i < h.ple_heads; ++i)
        if (h.ple_offsets[i] + h.ple_vocab[i] > (uint64_t) t->ne[1])
            throw FormatError(path_ + ": key ple.head_offsets / head_vocab_sizes: head " + std::to_string(i) +
                              " reaches past the table's " + std::to_string(t->ne[1]) + " rows");
    // at least one ubatch of rows, so a batch never evicts its own rows
    const size_t want = std::max<size_t>(opt_.ple_cache_bytes / std::max<size_t>(ggml_row_size(t->type, t->ne[0]), 1),
                                         (size_t) h.ple_heads * opt_.n_ubatch);
    ple_table_ = std::make_unique<PleTable>(*idx_, *t, std::min<size_t>(want, (size_t) t->ne[1]));
}

PleStats Model::ple_stats() const {
    PleStats s;
    if (!ple_table_) return s;
    s.bytes_read = ple_table_->bytes_read;
    s.rows_read = ple_table_->rows_read;
    s.rows_hit = ple_table_->rows_hit;
    s.cache_bytes = ple_table_->cache_bytes();
    return s;
}

// The ubatch's n-gram rows, hashed before its first layer runs and read from the file on a thread of their own
// (ple_wait() before the PLE layer), and the last ngram - 1 ids kept in the recurrent state for the next ubatch.
void Model::ple_prepare(const int32_t * tokens, int T) {
    const HParams & h = hp_;
    if (ple_pending_.valid()) { // a step that failed before its PLE layer left its read running: finish it first
        try {
            ple_pending_.get();
        } catch (const std::exception &) {}
    }
    Layer & L = layers_[h.ple_layer];
    const int n_prev = h.ple_ngram - 1, per = h.ple_heads / n_prev;
    std::vector<int32_t> hist(n_prev);
    ggml_backend_tensor_get(L.ple_hist, hist.data(), 0, hist.size() * sizeof(int32_t));
    std::vector<int64_t> seq(n_prev + T); // -1: no token (before the sequence start)
    for (int i = 0; i < n_prev; ++i) seq[i] = hist[i] - 1;
    for (int t = 0; t < T; ++t) seq[n_prev + t] = tokens[t];
    std::vector<int64_t> rows((size_t) T * h.ple_heads);
    std::vector<uint64_t> ctx_ids(h.ple_ngram);
    for (int t = 0; t < T; ++t) {
        const int64_t p = n_prev + t;
        ctx_ids[0] = (uint64_t) seq[p];
        bool cut = false; // an EOS (or the sequence start) before the token: everything at or before it reads as EOS
        for (int s = 1; s < h.ple_ngram; ++s) {
            const int64_t id = cut ? -1 : seq[p - s];
            cut = cut || id < 0 || id == h.ple_eos;
            ctx_ids[s] = (uint64_t) (cut ? h.ple_eos : id);
        }
        for (int n = 2; n <= h.ple_ngram; ++n) {
            uint64_t mixed = ctx_ids[0] * h.ple_mult[0];
            for (int j = 1; j < n; ++j) mixed ^= ctx_ids[j] * h.ple_mult[j];
            for (int g = 0; g < per; ++g) {
                const int head = (n - 2) * per + g;
                rows[(size_t) t * h.ple_heads + head] = (int64_t) (mixed % h.ple_vocab[head] + h.ple_offsets[head]);
            }
        }
    }
    for (int i = 0; i < n_prev; ++i) hist[i] = (int32_t) (seq[T + i] + 1);
    ggml_backend_tensor_set(L.ple_hist, hist.data(), 0, hist.size() * sizeof(int32_t));
    // the rows are read on their own thread while the embedding and the layers before the PLE layer run
    ple_rows_.resize(rows.size() * h.ple_row_dim);
    ple_pending_ = std::async(std::launch::async, [this, rows = std::move(rows)]() {
        ple_table_->gather(rows.data(), rows.size(), ple_rows_.data());
    });
}

// The ubatch's rows, once read (rethrows the reader's error)
void Model::ple_wait() {
    if (ple_pending_.valid()) ple_pending_.get();
}

ggml_tensor * Model::ple_block(ggml_context * ctx, ggml_cgraph * gf, int il, ggml_tensor * x, int T) {
    const HParams & h = hp_;
    Layer & L = layers_[il];
    const int64_t E = h.n_embd, hc = h.hc_mult, C = E * hc;
    if (!gin_.ple_emb) {
        gin_.ple_emb = ggml_new_tensor_2d(ctx, GGML_TYPE_F32, (int64_t) h.ple_heads * h.ple_row_dim, T);
        ggml_set_input(gin_.ple_emb);
        ggml_set_name(gin_.ple_emb, "ple_emb");
    }
    ggml_tensor * key = hc_norm(ctx, dense_mm(ctx, L.ple_key, gin_.ple_emb), L.ple_norm_key);        // [C, T]
    ggml_tensor * value = dense_mm(ctx, L.ple_value, gin_.ple_emb);                                  // [E, T]
    ggml_tensor * query = hc_norm(ctx, x, L.ple_norm_query);                                         // [C, T]
    ggml_tensor * s = ggml_sum_rows(ctx, ggml_reshape_3d(ctx, ggml_mul(ctx, key, query), E, hc, T)); // [1, hc, T]
    s = ggml_scale(ctx, s, 1.f / std::sqrt((float) E));
    ggml_tensor * mag = ggml_sqrt(ctx, ggml_clamp(ctx, ggml_abs(ctx, s), 1e-6f, INFINITY));
    ggml_tensor * gate = ggml_sigmoid(ctx, ggml_mul(ctx, ggml_sgn(ctx, s), mag));
    ggml_tensor * g = ggml_mul(ctx, ggml_repeat_4d(ctx, ggml_reshape_3d(ctx, value, E, 1, T), E, hc, T, 1), gate);
    g = ggml_reshape_2d(ctx, g, C, T);
    ggml_tensor * gn = hc_norm(ctx, g, L.ple_norm_conv); // [C, T]
    // causal depthwise conv with dilation `ngram` over [state | gn]: out[c, t] = sum_k w[k, c] x[c, t - (K-1-k) d]
    const int64_t K = h.ple_conv_kernel, d = h.ple_ngram, hist = (K - 1) * d;
    ggml_tensor * in = ggml_concat(ctx, L.ple_conv_state, ggml_transpose(ctx, gn), 0); // [hist + T, C]
    ggml_tensor * last = ggml_view_2d(ctx, in, hist, C, in->nb[1], (size_t) T * ggml_element_size(in));
    ggml_build_forward_expand(gf, ggml_cpy(ctx, last, L.ple_conv_state)); // after the taps below read the old state
    ggml_tensor * conv = nullptr;
    for (int64_t k = 0; k < K; ++k) {
        const int64_t start = hist - (K - 1 - k) * d;
        ggml_tensor * tap = ggml_view_2d(ctx, in, T, C, in->nb[1], (size_t) start * ggml_element_size(in)); // [T, C]
        ggml_tensor * wk = ggml_view_2d(ctx, L.ple_conv, 1, C, L.ple_conv->nb[1], (size_t) k * L.ple_conv->nb[0]);
        ggml_tensor * term =
            ggml_mul(ctx, ggml_cont(ctx, ggml_transpose(ctx, tap)), ggml_reshape_1d(ctx, ggml_cont(ctx, wk), C));
        conv = conv ? ggml_add(ctx, conv, term) : term;
    }
    return ggml_add(ctx, x, ggml_add(ctx, g, ggml_silu(ctx, conv))); // [C, T]
}

} // namespace moelite
