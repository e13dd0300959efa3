// Model: loading (dense weights resident, experts through the ExpertCache) and the forward pass.
//
// One evaluation step over T tokens, per layer il:
//   graph A (run_attn):    x -> attention (KV cache) -> ffn_inp = x + attn; h = ffn_norm(ffn_inp);
//                          dense layer: x = ffn_inp + ffn(h); MoE layer: router logits = W_gate_inp h
//   host (route):          top-k expert ids + weights per token (softmax / sigmoid+groups / sparsemixer)
//   cache (acquire):       expert ids -> slot ids, loading misses from disk
//   graph B (run_experts): x = ffn_inp + sum_k w_k * down_k(act(gate_k h, up_k h)) [+ shared expert]
// Experts are always computed by ggml_mul_mat_id over the slot arenas, resident or not.
#include "model.h"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cerrno>
#include <cmath>
#include <cstring>
#include <numeric>

#include "common.h"
#include "ggml-cpu.h"
#ifdef MOELITE_CUDA
#include "ggml-cuda.h"
#endif

namespace moelite {

static constexpr int kMaxNodes = 4096;

static std::string blk(int il, const char * name) { return "blk." + std::to_string(il) + "." + name; }

Model::Model(const std::string & path, const HParams & hp, const ModelOptions & opt) : path_(path), hp_(hp), opt_(opt) {
    idx_ = std::make_unique<GGUFIndex>(path);
    if (opt_.device == 1) {
#ifdef MOELITE_CUDA
        if (opt_.gpu < 0 || opt_.gpu >= ggml_backend_cuda_get_device_count())
            throw BudgetError("CUDA device " + std::to_string(opt_.gpu) + " is not available");
        backend_ = ggml_backend_cuda_init(opt_.gpu);
        if (!backend_) throw BudgetError("cannot initialize CUDA device " + std::to_string(opt_.gpu));
#else
        throw BudgetError("this build of moelite has no CUDA support (rebuild with -DMOELITE_CUDA=ON)");
#endif
    }
    // the CPU backend: the whole model on a CPU device; on a GPU, the experts the cost model keeps on the CPU
    cpu_backend_ = ggml_backend_cpu_init();
    ggml_threadpool_params tpp = ggml_threadpool_params_default(opt_.n_threads);
    cpu_threadpool_ = ggml_threadpool_new(&tpp);
    ggml_backend_cpu_set_threadpool(cpu_backend_, cpu_threadpool_);
    ggml_backend_cpu_set_n_threads(cpu_backend_, opt_.n_threads);
    if (!backend_) backend_ = cpu_backend_;

    const size_t n_tensors = idx_->tensors.size() + 16;
    ggml_init_params ip = {ggml_tensor_overhead() * n_tensors, nullptr, true};
    ctx_w_ = ggml_init(ip);
    build_layers();

    // read the dense tensors into one backend buffer
    buf_w_ = ggml_backend_alloc_ctx_tensors(ctx_w_, backend_);
    if (!buf_w_ && !to_read_.empty()) throw BudgetError("cannot allocate memory for the dense weights");
    dense_bytes_ = buf_w_ ? ggml_backend_buffer_get_size(buf_w_) : 0;
    int fd = open(path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) throw IOError(path + ": " + strerror(errno));
    const bool host = !buf_w_ || ggml_backend_buffer_is_host(buf_w_);
    std::vector<char> staging;                    // device weights: read on the host, then upload
    for (auto & [t, info] : to_read_) {
        char * dst = (char *) t->data;
        if (!host) { staging.resize(info->nbytes); dst = staging.data(); }
        uint64_t done = 0;
        while (done < info->nbytes) {
            ssize_t r = pread(fd, dst + done, info->nbytes - done, info->offset + done);
            if (r <= 0) {
                close(fd);
                throw FormatError(path + ": reading tensor '" + info->name + "' failed (truncated file?)");
            }
            done += (uint64_t) r;
        }
        if (!host) ggml_backend_tensor_set(t, staging.data(), 0, info->nbytes);
    }
    close(fd);

    // expert cache: quota per MoE layer (all experts when not given)
    std::vector<int> quota(hp_.n_layer, 0);
    for (int il = 0; il < hp_.n_layer; ++il)
        if (layers_[il].moe) {
            quota[il] = opt_.expert_slots.empty() ? hp_.n_expert : opt_.expert_slots[il];
            if (quota[il] < hp_.n_expert_used)
                throw BudgetError("layer " + std::to_string(il) + ": " + std::to_string(quota[il]) +
                                  " expert slots is fewer than n_expert_used = " + std::to_string(hp_.n_expert_used));
            quota[il] = std::min(quota[il], hp_.n_expert);
        }
    cache_->finalize(quota, backend_);
    cache_->set_policy((Policy) opt_.policy, opt_.window_m);
    if (tier2_) {                                 // RAM tier: quotas clamped like the arena's
        if ((int) opt_.host_slots.size() != hp_.n_layer)
            throw BudgetError("host_slots names " + std::to_string(opt_.host_slots.size()) + " layers, the model has " +
                              std::to_string(hp_.n_layer));
        std::vector<int> hq(hp_.n_layer, 0);
        for (int il = 0; il < hp_.n_layer; ++il)
            if (layers_[il].moe) hq[il] = std::min(std::max(opt_.host_slots[il], hp_.n_expert_used), hp_.n_expert);
        ggml_backend_buffer_type_t pinned = nullptr;
#ifdef MOELITE_CUDA
        if (opt_.device == 1) pinned = ggml_backend_cuda_host_buffer_type();
#endif
        tier2_->finalize(hq, cpu_backend_, pinned);
        tier2_->set_policy((Policy) opt_.policy, opt_.window_m);
        cache_->set_tier2(tier2_.get());
    }
    cpu_experts_.assign(hp_.n_layer, 0);
    // offloaded: I/O threads read misses in parallel (and prefetches when enabled)
    if (!opt_.expert_slots.empty() && opt_.n_io_threads > 0) cache_->start_io(opt_.n_io_threads);
    cache_->set_prefetch(opt_.prefetch);
    alloc_kv();
    galloc_ = ggml_gallocr_new(ggml_backend_get_default_buffer_type(backend_));
    graph_mem_.resize(ggml_tensor_overhead() * kMaxNodes + ggml_graph_overhead_custom(kMaxNodes, false));
    if (tier2_) {
        galloc_cpu_ = ggml_gallocr_new(ggml_backend_get_default_buffer_type(cpu_backend_));
        measure_costs();                          // before any expert is loaded: it writes into empty slots
    }

    // fully resident: load every expert now so that the first tokens do not pay for disk reads
    if (opt_.expert_slots.empty()) {
        std::vector<int32_t> ids(hp_.n_expert), slots(hp_.n_expert);
        std::iota(ids.begin(), ids.end(), 0);
        for (int il = 0; il < hp_.n_layer; ++il)
            if (layers_[il].moe) { cache_->acquire(il, ids.data(), hp_.n_expert, slots.data()); cache_->release(il); }
        reset_stats();
    }
}

Model::~Model() {
    cache_.reset();
    tier2_.reset();
    if (galloc_) ggml_gallocr_free(galloc_);
    if (galloc_cpu_) ggml_gallocr_free(galloc_cpu_);
    if (buf_kv_) ggml_backend_buffer_free(buf_kv_);
    if (ctx_kv_) ggml_free(ctx_kv_);
    if (buf_w_) ggml_backend_buffer_free(buf_w_);
    if (ctx_w_) ggml_free(ctx_w_);
    if (backend_ && backend_ != cpu_backend_) ggml_backend_free(backend_);
    if (cpu_backend_) ggml_backend_free(cpu_backend_);
    if (cpu_threadpool_) ggml_threadpool_free(cpu_threadpool_);
}

ggml_tensor * Model::load_tensor(const std::string & name, bool required, int n_dims_expect, std::vector<int64_t> shape) {
    const TensorInfo * t = idx_->find(name);
    if (!t) {
        if (required) throw FormatError(path_ + ": missing tensor '" + name + "' (required by architecture '" + hp_.arch + "')");
        return nullptr;
    }
    if (n_dims_expect > 0 && t->n_dims > n_dims_expect)
        throw FormatError(path_ + ": tensor '" + name + "' has " + std::to_string(t->n_dims) + " dims, expected " +
                          std::to_string(n_dims_expect));
    for (size_t d = 0; d < shape.size(); ++d)
        if (shape[d] > 0 && t->ne[d] != shape[d])
            throw FormatError(path_ + ": tensor '" + name + "' has ne[" + std::to_string(d) + "] = " + std::to_string(t->ne[d]) +
                              ", expected " + std::to_string(shape[d]));
    ggml_tensor * g = ggml_new_tensor(ctx_w_, t->type, std::max(1, t->n_dims), t->ne);
    ggml_set_name(g, name.c_str());
    to_read_.push_back({g, t});
    return g;
}

void Model::build_layers() {
    const HParams & h = hp_;
    const int64_t E = h.n_embd;
    tok_embd_ = load_tensor("token_embd.weight", true, 2, {E, h.n_vocab});
    out_norm_ = load_tensor("output_norm.weight", true, 1, {E});
    out_norm_b_ = load_tensor("output_norm.bias", false, 1, {E});
    output_ = load_tensor("output.weight", false, 2, {E, h.n_vocab});
    if (!output_) output_ = tok_embd_;   // tied embeddings
    output_b_ = load_tensor("output.bias", false, 1, {h.n_vocab});
    rope_factors_ = load_tensor("rope_factors_short.weight", false, 1, {});
    if (!rope_factors_) rope_factors_ = load_tensor("rope_freqs.weight", false, 1, {});

    cache_ = std::make_unique<ExpertCache>(path_, h.n_layer, h.n_expert);
    if (!opt_.host_slots.empty()) tier2_ = std::make_unique<ExpertCache>(path_, h.n_layer, h.n_expert);
    layers_.resize(h.n_layer);
    const bool mla = h.kv_lora_rank > 0;
    const int64_t q_dim = (int64_t) h.n_head * h.n_embd_head_k, kv_dim = (int64_t) h.n_head_kv * h.n_embd_head_k,
                  v_dim = (int64_t) h.n_head_kv * h.n_embd_head_v, o_dim = (int64_t) h.n_head * h.n_embd_head_v;
    for (int il = 0; il < h.n_layer; ++il) {
        Layer & L = layers_[il];
        L.attn_norm = load_tensor(blk(il, "attn_norm.weight"), true, 1, {E});
        L.attn_norm_b = load_tensor(blk(il, "attn_norm.bias"), false, 1, {E});
        if (mla) {
            const int64_t nope = h.n_embd_head_k - h.n_rot;
            if (h.q_lora_rank > 0) {
                L.wq_a = load_tensor(blk(il, "attn_q_a.weight"), true, 2, {E, h.q_lora_rank});
                L.q_a_norm = load_tensor(blk(il, "attn_q_a_norm.weight"), true, 1, {h.q_lora_rank});
                L.wq_b = load_tensor(blk(il, "attn_q_b.weight"), true, 2, {h.q_lora_rank, q_dim});
            } else {
                L.wq = load_tensor(blk(il, "attn_q.weight"), true, 2, {E, q_dim});
            }
            L.wkv_a = load_tensor(blk(il, "attn_kv_a_mqa.weight"), true, 2, {E, h.kv_lora_rank + h.n_rot});
            L.kv_a_norm = load_tensor(blk(il, "attn_kv_a_norm.weight"), true, 1, {h.kv_lora_rank});
            if (!idx_->find(blk(il, "attn_k_b.weight")) && idx_->find(blk(il, "attn_kv_b.weight")))
                throw FormatError(path_ + ": tensor '" + blk(il, "attn_kv_b.weight") +
                                  "' (pre-MLA DeepSeek GGUF layout) is not supported; re-convert with `moelite convert` "
                                  "to get attn_k_b / attn_v_b");
            L.wk_b = load_tensor(blk(il, "attn_k_b.weight"), true, 3, {nope, h.kv_lora_rank, h.n_head});
            L.wv_b = load_tensor(blk(il, "attn_v_b.weight"), true, 3, {h.kv_lora_rank, h.n_embd_head_v, h.n_head});
        } else {
            L.wq = load_tensor(blk(il, "attn_q.weight"), true, 2, {E, q_dim});
            L.wk = load_tensor(blk(il, "attn_k.weight"), true, 2, {E, kv_dim});
            L.wv = load_tensor(blk(il, "attn_v.weight"), true, 2, {E, v_dim});
            L.bq = load_tensor(blk(il, "attn_q.bias"), false, 1, {q_dim});
            L.bk = load_tensor(blk(il, "attn_k.bias"), false, 1, {kv_dim});
            L.bv = load_tensor(blk(il, "attn_v.bias"), false, 1, {v_dim});
        }
        L.wo = load_tensor(blk(il, "attn_output.weight"), true, 2, {o_dim, E});
        L.bo = load_tensor(blk(il, "attn_output.bias"), false, 1, {E});
        if (h.qk_norm == QK_NORM_HEAD) {
            L.q_norm = load_tensor(blk(il, "attn_q_norm.weight"), true, 1, {h.n_embd_head_k});
            L.k_norm = load_tensor(blk(il, "attn_k_norm.weight"), true, 1, {h.n_embd_head_k});
        } else if (h.qk_norm == QK_NORM_FULL) {
            L.q_norm = load_tensor(blk(il, "attn_q_norm.weight"), true, 1, {q_dim});
            L.k_norm = load_tensor(blk(il, "attn_k_norm.weight"), true, 1, {kv_dim});
        }
        L.sinks = load_tensor(blk(il, "attn_sinks.weight"), false, 1, {h.n_head});
        L.ffn_norm = load_tensor(blk(il, "ffn_norm.weight"), false, 1, {E});
        if (!L.ffn_norm) L.ffn_norm = load_tensor(blk(il, "post_attention_norm.weight"), true, 1, {E});
        L.ffn_norm_b = load_tensor(blk(il, "ffn_norm.bias"), false, 1, {E});

        const TensorInfo * ge = idx_->find(blk(il, "ffn_gate_exps.weight"));
        L.moe = il >= h.n_layer_dense_lead && ge != nullptr;
        if (!L.moe) {
            if (il >= h.n_layer_dense_lead)
                throw FormatError(path_ + ": missing tensor '" + blk(il, "ffn_gate_exps.weight") + "' (layer " +
                                  std::to_string(il) + " should be a MoE layer)");
            L.ffn_gate = load_tensor(blk(il, "ffn_gate.weight"), true, 2, {E});
            L.ffn_up = load_tensor(blk(il, "ffn_up.weight"), true, 2, {E});
            L.ffn_down = load_tensor(blk(il, "ffn_down.weight"), true, 2, {-1, E});
            continue;
        }
        const int64_t n_ff = ge->ne[1];
        auto expect_exps = [&](const char * name, int64_t ne0, int64_t ne1) -> const TensorInfo & {
            const TensorInfo * t = idx_->find(blk(il, name));
            if (!t) throw FormatError(path_ + ": missing tensor '" + blk(il, name) + "'");
            if (t->ne[0] != ne0 || t->ne[1] != ne1 || t->ne[2] != h.n_expert)
                throw FormatError(path_ + ": tensor '" + blk(il, name) + "' has shape [" + std::to_string(t->ne[0]) + ", " +
                                  std::to_string(t->ne[1]) + ", " + std::to_string(t->ne[2]) + "], expected [" +
                                  std::to_string(ne0) + ", " + std::to_string(ne1) + ", " + std::to_string(h.n_expert) + "]");
            return *t;
        };
        const TensorInfo & g = expect_exps("ffn_gate_exps.weight", E, n_ff);
        const TensorInfo & u = expect_exps("ffn_up_exps.weight", E, n_ff);
        const TensorInfo & d = expect_exps("ffn_down_exps.weight", n_ff, E);
        cache_->add_layer(il, g, u, d);
        if (tier2_) tier2_->add_layer(il, g, u, d);
        L.gate_inp = load_tensor(blk(il, "ffn_gate_inp.weight"), true, 2, {E, h.n_expert});
        L.gate_inp_b = load_tensor(blk(il, "ffn_gate_inp.bias"), false, 1, {h.n_expert});
        L.gate_exps_b = load_tensor(blk(il, "ffn_gate_exps.bias"), false, 2, {n_ff, h.n_expert});
        L.up_exps_b = load_tensor(blk(il, "ffn_up_exps.bias"), false, 2, {n_ff, h.n_expert});
        L.down_exps_b = load_tensor(blk(il, "ffn_down_exps.bias"), false, 2, {E, h.n_expert});
        L.gate_shexp = load_tensor(blk(il, "ffn_gate_shexp.weight"), false, 2, {E});
        if (L.gate_shexp) {
            L.up_shexp = load_tensor(blk(il, "ffn_up_shexp.weight"), true, 2, {E, L.gate_shexp->ne[1]});
            L.down_shexp = load_tensor(blk(il, "ffn_down_shexp.weight"), true, 2, {L.gate_shexp->ne[1], E});
            L.gate_inp_shexp = load_tensor(blk(il, "ffn_gate_inp_shexp.weight"), false, 2, {E});
        }
        if (const TensorInfo * pb = idx_->find(blk(il, "exp_probs_b.bias"))) {
            if (pb->type != GGML_TYPE_F32 || pb->ne[0] != h.n_expert)
                throw FormatError(path_ + ": tensor '" + pb->name + "' must be F32 [n_expert]");
            L.exp_probs_b.resize(h.n_expert);
            int fd = open(path_.c_str(), O_RDONLY | O_CLOEXEC);
            ssize_t r = fd >= 0 ? pread(fd, L.exp_probs_b.data(), pb->nbytes, pb->offset) : -1;
            if (fd >= 0) close(fd);
            if (r != (ssize_t) pb->nbytes) throw FormatError(path_ + ": cannot read '" + pb->name + "'");
        }
    }
}

void Model::alloc_kv() {
    const HParams & h = hp_;
    const bool mla = h.kv_lora_rank > 0;
    // MLA caches the compressed latent: K = [kv_lora + rope] per token (one shared head), V = the latent part
    const int64_t k_row = mla ? h.kv_lora_rank + h.n_rot : (int64_t) h.n_head_kv * h.n_embd_head_k;
    const int64_t v_row = mla ? h.kv_lora_rank : (int64_t) h.n_head_kv * h.n_embd_head_v;
    ggml_init_params ip = {ggml_tensor_overhead() * (2 * h.n_layer + 8), nullptr, true};
    ctx_kv_ = ggml_init(ip);
    for (auto & L : layers_) {
        L.k_cache = ggml_new_tensor_2d(ctx_kv_, opt_.kv_type, k_row, opt_.n_ctx);
        L.v_cache = ggml_new_tensor_2d(ctx_kv_, opt_.kv_type, opt_.n_ctx, v_row);
    }
    const int U = opt_.n_ubatch;
    x_ = ggml_new_tensor_2d(ctx_kv_, GGML_TYPE_F32, h.n_embd, U);
    ffn_inp_ = ggml_new_tensor_2d(ctx_kv_, GGML_TYPE_F32, h.n_embd, U);
    ffn_in_ = ggml_new_tensor_2d(ctx_kv_, GGML_TYPE_F32, h.n_embd, U);
    router_ = ggml_new_tensor_2d(ctx_kv_, GGML_TYPE_F32, std::max(h.n_expert, 1), U);
    lookahead_ = ggml_new_tensor_2d(ctx_kv_, GGML_TYPE_F32, std::max(h.n_expert, 1), U);
    ebuf_ = ggml_new_tensor_2d(ctx_kv_, GGML_TYPE_F32, h.n_embd, (int64_t) std::max(h.n_expert_used, 1) * U);
    buf_kv_ = ggml_backend_alloc_ctx_tensors(ctx_kv_, backend_);
    if (!buf_kv_) throw BudgetError("cannot allocate the KV cache");
    kv_bytes_ = ggml_backend_buffer_get_size(buf_kv_);
}

size_t Model::scratch_bytes() const { return galloc_ ? ggml_gallocr_get_buffer_size(galloc_, 0) : 0; }

// ---------------------------------------------------------------------------------------------------------
// graph helpers

ggml_context * Model::begin_graph() {
    ggml_init_params ip = {graph_mem_.size(), graph_mem_.data(), true};
    return ggml_init(ip);
}

void Model::compute(ggml_context * ctx, ggml_cgraph * gf, ggml_gallocr_t galloc) {
    (void) ctx;
    if (!ggml_gallocr_alloc_graph(galloc, gf)) throw BudgetError("cannot allocate graph scratch memory");
}

ggml_tensor * Model::norm(ggml_context * ctx, ggml_tensor * x, ggml_tensor * w, ggml_tensor * b) {
    x = hp_.layernorm ? ggml_norm(ctx, x, hp_.norm_eps) : ggml_rms_norm(ctx, x, hp_.norm_eps);
    x = ggml_mul(ctx, x, w);
    return b ? ggml_add(ctx, x, b) : x;
}

// SwiGLU FFN: down(act(gate x) * up x). x: [n_embd, T] -> [n_embd, T]
ggml_tensor * Model::ffn(ggml_context * ctx, ggml_tensor * x, ggml_tensor * gate, ggml_tensor * up, ggml_tensor * down) {
    ggml_tensor * g = ggml_mul_mat(ctx, gate, x);
    ggml_tensor * u = ggml_mul_mat(ctx, up, x);
    return ggml_mul_mat(ctx, down, ggml_swiglu_split(ctx, g, u));
}

// Causal (optionally sliding-window) attention over the KV cache of layer il.
// q: [dk, n_head, T], k: [dk, n_head_kv, T], v: [dv, n_head_kv, T] -> [dv, T, n_head] (before the head merge)
ggml_tensor * Model::attention(ggml_context * ctx, ggml_cgraph * gf, int il, ggml_tensor * q, ggml_tensor * k,
                               ggml_tensor * v, int T) {
    Layer & L = layers_[il];
    const int64_t dk = q->ne[0], dv = v->ne[0], n_head = q->ne[1], n_head_kv = k->ne[1];
    const int n_kv = n_past_ + T;
    const size_t ek = ggml_element_size(L.k_cache), ev = ggml_element_size(L.v_cache);
    // write the new K (rows) and V (transposed: columns) into the cache
    ggml_tensor * k_dst = ggml_view_2d(ctx, L.k_cache, dk * n_head_kv, T, L.k_cache->nb[1], (size_t) n_past_ * L.k_cache->nb[1]);
    if (!ggml_is_contiguous(k)) k = ggml_cont(ctx, k);
    if (!ggml_is_contiguous(v)) v = ggml_cont(ctx, v);
    ggml_build_forward_expand(gf, ggml_cpy(ctx, ggml_reshape_2d(ctx, k, dk * n_head_kv, T), k_dst));
    ggml_tensor * v_dst = ggml_view_2d(ctx, L.v_cache, T, dv * n_head_kv, L.v_cache->nb[1], (size_t) n_past_ * ev);
    ggml_build_forward_expand(
        gf, ggml_cpy(ctx, ggml_transpose(ctx, ggml_reshape_2d(ctx, v, dv * n_head_kv, T)), v_dst));

    ggml_tensor * K = ggml_view_3d(ctx, L.k_cache, dk, n_kv, n_head_kv, L.k_cache->nb[1], dk * ek, 0);   // [dk, n_kv, h_kv]
    ggml_tensor * V = ggml_view_3d(ctx, L.v_cache, n_kv, dv, n_head_kv, L.v_cache->nb[1], L.v_cache->nb[1] * dv, 0);  // [n_kv, dv, h_kv]
    ggml_tensor * Q = ggml_permute(ctx, q, 0, 2, 1, 3);                 // [dk, T, n_head]
    ggml_tensor * kq = ggml_mul_mat(ctx, K, Q);                         // [n_kv, T, n_head]
    ggml_tensor * mask = ggml_new_tensor_2d(ctx, GGML_TYPE_F32, n_kv, T);
    ggml_set_input(mask);
    ggml_set_name(mask, hp_.swa_layers.size() > (size_t) il && hp_.swa_layers[il] ? "mask_swa" : "mask");
    kq = ggml_soft_max_ext(ctx, kq, mask, hp_.kq_scale, 0.0f);
    if (L.sinks) ggml_soft_max_add_sinks(kq, L.sinks);
    (void) n_head;
    return ggml_mul_mat(ctx, V, kq);                                    // [dv, T, n_head]
}

static void set_input(ggml_tensor * t, const void * data, size_t n) {
    if (!t->buffer) throw std::logic_error(std::string("graph input '") + t->name + "' was not allocated");
    ggml_backend_tensor_set(t, data, 0, n);
}

void Model::run_embed(const int32_t * tokens, int T) {
    ggml_context * ctx = begin_graph();
    ggml_cgraph * gf = ggml_new_graph_custom(ctx, kMaxNodes, false);
    ggml_tensor * inp = ggml_new_tensor_1d(ctx, GGML_TYPE_I32, T);
    ggml_set_input(inp);
    ggml_tensor * x = ggml_get_rows(ctx, tok_embd_, inp);               // [n_embd, T]
    if (hp_.embd_scale != 1.f) x = ggml_scale(ctx, x, hp_.embd_scale);
    ggml_build_forward_expand(gf, ggml_cpy(ctx, x, ggml_view_2d(ctx, x_, hp_.n_embd, T, x_->nb[1], 0)));
    compute(ctx, gf, galloc_);
    set_input(inp, tokens, T * sizeof(int32_t));
    ggml_backend_graph_compute(backend_, gf);
    ggml_free(ctx);
}

static void set_inputs(ggml_cgraph * gf, const std::vector<int32_t> & pos, const std::vector<float> & mask,
                       const std::vector<float> & mask_swa) {
    if (ggml_tensor * t = ggml_graph_get_tensor(gf, "pos")) set_input(t, pos.data(), ggml_nbytes(t));
    if (ggml_tensor * t = ggml_graph_get_tensor(gf, "mask")) set_input(t, mask.data(), ggml_nbytes(t));
    if (ggml_tensor * t = ggml_graph_get_tensor(gf, "mask_swa")) set_input(t, mask_swa.data(), ggml_nbytes(t));
}

void Model::run_attn(int il, int T) {
    const HParams & h = hp_;
    Layer & L = layers_[il];
    ggml_context * ctx = begin_graph();
    ggml_cgraph * gf = ggml_new_graph_custom(ctx, kMaxNodes, false);
    ggml_tensor * pos = ggml_new_tensor_1d(ctx, GGML_TYPE_I32, T);
    ggml_set_input(pos);
    ggml_set_name(pos, "pos");
    auto rope = [&](ggml_tensor * t) {
        return ggml_rope_ext(ctx, t, pos, rope_factors_, h.n_rot, h.rope_type, h.n_ctx_orig, h.freq_base, h.freq_scale,
                             h.ext_factor, h.attn_factor, h.beta_fast, h.beta_slow);
    };
    ggml_tensor * x = ggml_view_2d(ctx, x_, h.n_embd, T, x_->nb[1], 0);   // [n_embd, T] residual stream
    ggml_tensor * cur = norm(ctx, x, L.attn_norm, L.attn_norm_b);
    ggml_tensor * attn;
    if (h.kv_lora_rank > 0) {
        // MLA with absorbed projections: attend in the compressed latent space, one shared KV head
        const int64_t nope = h.n_embd_head_k - h.n_rot, R = h.n_rot, C = h.kv_lora_rank;
        ggml_tensor * q = L.wq_a ? ggml_mul_mat(ctx, L.wq_b, norm(ctx, ggml_mul_mat(ctx, L.wq_a, cur), L.q_a_norm, nullptr))
                                 : ggml_mul_mat(ctx, L.wq, cur);      // [n_head * dk, T]
        q = ggml_reshape_3d(ctx, q, h.n_embd_head_k, h.n_head, T);
        ggml_tensor * q_nope = ggml_view_3d(ctx, q, nope, h.n_head, T, q->nb[1], q->nb[2], 0);
        ggml_tensor * q_pe = rope(ggml_view_3d(ctx, q, R, h.n_head, T, q->nb[1], q->nb[2], nope * ggml_element_size(q)));
        ggml_tensor * kv = ggml_mul_mat(ctx, L.wkv_a, cur);            // [C + R, T]
        ggml_tensor * c = norm(ctx, ggml_view_2d(ctx, kv, C, T, kv->nb[1], 0), L.kv_a_norm, nullptr);   // [C, T]
        ggml_tensor * k_pe = rope(ggml_view_3d(ctx, kv, R, 1, T, kv->nb[1], kv->nb[1], C * ggml_element_size(kv)));
        ggml_tensor * q_abs = ggml_mul_mat(ctx, L.wk_b, ggml_permute(ctx, q_nope, 0, 2, 1, 3));   // [C, T, n_head]
        q_abs = ggml_permute(ctx, q_abs, 0, 2, 1, 3);                                              // [C, n_head, T]
        ggml_tensor * q_cat = ggml_concat(ctx, q_abs, q_pe, 0);                                    // [C + R, n_head, T]
        ggml_tensor * c3 = ggml_reshape_3d(ctx, c, C, 1, T);
        ggml_tensor * k_cat = ggml_concat(ctx, c3, k_pe, 0);                                       // [C + R, 1, T]
        ggml_tensor * o = attention(ctx, gf, il, q_cat, k_cat, c3, T);                             // [C, T, n_head]
        o = ggml_mul_mat(ctx, L.wv_b, o);                                                          // [dv, T, n_head]
        o = ggml_cont(ctx, ggml_permute(ctx, o, 0, 2, 1, 3));                                      // [dv, n_head, T]
        attn = ggml_reshape_2d(ctx, o, h.n_embd_head_v * h.n_head, T);
    } else {
        ggml_tensor * q = ggml_mul_mat(ctx, L.wq, cur);
        ggml_tensor * k = ggml_mul_mat(ctx, L.wk, cur);
        ggml_tensor * v = ggml_mul_mat(ctx, L.wv, cur);
        if (L.bq) q = ggml_add(ctx, q, L.bq);
        if (L.bk) k = ggml_add(ctx, k, L.bk);
        if (L.bv) v = ggml_add(ctx, v, L.bv);
        if (h.qk_norm == QK_NORM_FULL) {                               // OLMoE: RMSNorm over all heads at once
            q = ggml_mul(ctx, ggml_rms_norm(ctx, q, h.norm_eps), L.q_norm);
            k = ggml_mul(ctx, ggml_rms_norm(ctx, k, h.norm_eps), L.k_norm);
        }
        q = ggml_reshape_3d(ctx, q, h.n_embd_head_k, h.n_head, T);
        k = ggml_reshape_3d(ctx, k, h.n_embd_head_k, h.n_head_kv, T);
        v = ggml_reshape_3d(ctx, v, h.n_embd_head_v, h.n_head_kv, T);
        if (h.qk_norm == QK_NORM_HEAD) {                               // Qwen3: RMSNorm per head
            q = ggml_mul(ctx, ggml_rms_norm(ctx, q, h.norm_eps), L.q_norm);
            k = ggml_mul(ctx, ggml_rms_norm(ctx, k, h.norm_eps), L.k_norm);
        }
        q = rope(q);
        k = rope(k);
        ggml_tensor * o = attention(ctx, gf, il, q, k, v, T);           // [dv, T, n_head]
        o = ggml_cont(ctx, ggml_permute(ctx, o, 0, 2, 1, 3));           // [dv, n_head, T]
        attn = ggml_reshape_2d(ctx, o, h.n_embd_head_v * h.n_head, T);
    }
    attn = ggml_mul_mat(ctx, L.wo, attn);                               // [n_embd, T]
    if (L.bo) attn = ggml_add(ctx, attn, L.bo);
    if (h.residual_scale != 1.f) attn = ggml_scale(ctx, attn, h.residual_scale);
    ggml_tensor * ffn_inp = ggml_add(ctx, attn, x);
    ggml_tensor * hn = norm(ctx, ffn_inp, L.ffn_norm, L.ffn_norm_b);    // [n_embd, T]
    if (!L.moe) {
        ggml_tensor * y = ffn(ctx, hn, L.ffn_gate, L.ffn_up, L.ffn_down);
        if (h.residual_scale != 1.f) y = ggml_scale(ctx, y, h.residual_scale);
        ggml_build_forward_expand(gf, ggml_cpy(ctx, ggml_add(ctx, y, ffn_inp), x));
    } else {
        ggml_tensor * logits = ggml_mul_mat(ctx, L.gate_inp, hn);       // [n_expert, T]
        if (L.gate_inp_b) logits = ggml_add(ctx, logits, L.gate_inp_b);
        ggml_build_forward_expand(gf, ggml_cpy(ctx, ffn_inp, ggml_view_2d(ctx, ffn_inp_, h.n_embd, T, ffn_inp_->nb[1], 0)));
        ggml_build_forward_expand(gf, ggml_cpy(ctx, hn, ggml_view_2d(ctx, ffn_in_, h.n_embd, T, ffn_in_->nb[1], 0)));
        ggml_build_forward_expand(gf, ggml_cpy(ctx, logits, ggml_view_2d(ctx, router_, h.n_expert, T, router_->nb[1], 0)));
        const int nl = next_moe(il);
        if (nl >= 0 && (opt_.prefetch || record_routes)) {
            // gate lookahead: layer nl's router on this layer's FFN input, normed with nl's ffn_norm
            Layer & N = layers_[nl];
            ggml_tensor * la = ggml_mul_mat(ctx, N.gate_inp, norm(ctx, ffn_inp, N.ffn_norm, N.ffn_norm_b));
            if (N.gate_inp_b) la = ggml_add(ctx, la, N.gate_inp_b);
            ggml_build_forward_expand(gf, ggml_cpy(ctx, la, ggml_view_2d(ctx, lookahead_, h.n_expert, T, lookahead_->nb[1], 0)));
        }
    }
    compute(ctx, gf, galloc_);
    set_inputs(gf, pos_, mask_, mask_swa_);
    ggml_backend_graph_compute(backend_, gf);
    ggml_free(ctx);
}

int Model::next_moe(int il) const {
    for (int j = il + 1; j < hp_.n_layer; ++j)
        if (layers_[j].moe) return j;
    return -1;
}

// Host-side routing of layer il for T tokens from router logits in logits_src [n_expert, >= T]:
// ids/w [T * k], ids in descending selection-score order.
void Model::route(int il, ggml_tensor * logits_src, int T, std::vector<int32_t> & ids, std::vector<float> & w,
                  std::vector<float> * score) {
    const HParams & h = hp_;
    const int E = h.n_expert, K = h.n_expert_used;
    std::vector<float> logits((size_t) E * T);
    ggml_backend_tensor_get(logits_src, logits.data(), 0, logits.size() * sizeof(float));
    ids.resize((size_t) T * K);
    w.resize((size_t) T * K);
    if (score) score->resize((size_t) T * K);
    std::vector<float> p(E), sel(E);
    std::vector<int> order(E);
    const std::vector<float> & bias = layers_[il].exp_probs_b;
    for (int t = 0; t < T; ++t) {
        const float * z = &logits[(size_t) t * E];
        int32_t * id = &ids[(size_t) t * K];
        float * wt = &w[(size_t) t * K];
        auto topk_by = [&](const std::vector<float> & s) {   // stable: ties to the lower expert id
            std::iota(order.begin(), order.end(), 0);
            std::partial_sort(order.begin(), order.begin() + K, order.end(),
                              [&](int a, int b) { return s[a] > s[b] || (s[a] == s[b] && a < b); });
            for (int j = 0; j < K; ++j) id[j] = order[j];
        };
        auto softmax = [&](const float * in, float * out, int n) {
            float m = -INFINITY;
            for (int i = 0; i < n; ++i) m = std::max(m, in[i]);
            double s = 0;
            for (int i = 0; i < n; ++i) { out[i] = std::exp(in[i] - m); s += out[i]; }
            for (int i = 0; i < n; ++i) out[i] = (float) (out[i] / s);
        };
        if (h.gating == GATING_SPARSEMIXER) {
            // PhiMoE inference routing (top-2): pick the max, mask logits far below it, softmax; repeat without it
            std::vector<float> masked(z, z + E);
            for (int j = 0; j < K; ++j) {
                int best = 0;
                for (int e = 1; e < E; ++e) if (masked[e] > masked[best]) best = e;
                const float thr = masked[best];
                std::vector<float> g(E);
                for (int e = 0; e < E; ++e) {
                    const float factor = std::max(std::fabs(z[e]), thr);
                    g[e] = ((thr - z[e]) / factor > 2 * h.jitter_eps) ? -INFINITY : masked[e];
                }
                softmax(g.data(), p.data(), E);
                id[j] = best;
                wt[j] = p[best];
                if (score) (*score)[(size_t) t * K + j] = z[best];
                masked[best] = -INFINITY;
            }
            continue;
        }
        if (h.gating == GATING_SOFTMAX_WEIGHT) {                // gpt-oss: top-k of logits, softmax over them
            sel.assign(z, z + E);
            topk_by(sel);
            float zz[64];
            for (int j = 0; j < K; ++j) zz[j] = z[id[j]];
            softmax(zz, wt, K);
            if (score) for (int j = 0; j < K; ++j) (*score)[(size_t) t * K + j] = zz[j];
        } else {
            if (h.gating == GATING_SIGMOID) for (int e = 0; e < E; ++e) p[e] = 1.f / (1.f + std::exp(-z[e]));
            else softmax(z, p.data(), E);
            for (int e = 0; e < E; ++e) sel[e] = p[e] + (bias.empty() ? 0.f : bias[e]);
            if (h.n_group > 1 && h.topk_group < h.n_group) {
                // group-limited routing: keep the topk_group groups with the best score (sum of top-2 with
                // sigmoid scoring as DeepSeek-V3, max with softmax as DeepSeek-V2), mask the rest
                const int gs = E / h.n_group;
                std::vector<std::pair<float, int>> gscore(h.n_group);
                for (int g = 0; g < h.n_group; ++g) {
                    std::vector<float> v(sel.begin() + g * gs, sel.begin() + (g + 1) * gs);
                    std::sort(v.begin(), v.end(), std::greater<float>());
                    gscore[g] = {h.gating == GATING_SIGMOID ? v[0] + (gs > 1 ? v[1] : 0.f) : v[0], g};
                }
                std::stable_sort(gscore.begin(), gscore.end(), [](auto & a, auto & b) { return a.first > b.first; });
                std::vector<char> keep(h.n_group, 0);
                for (int g = 0; g < h.topk_group; ++g) keep[gscore[g].second] = 1;
                for (int e = 0; e < E; ++e) if (!keep[e / gs]) sel[e] = -INFINITY;
            }
            topk_by(sel);
            if (score) for (int j = 0; j < K; ++j) (*score)[(size_t) t * K + j] = sel[id[j]];
            double s = 0;
            for (int j = 0; j < K; ++j) { wt[j] = p[id[j]]; s += wt[j]; }
            if (h.weights_norm) for (int j = 0; j < K; ++j) wt[j] = (float) (wt[j] / (s + (h.gating == GATING_SIGMOID ? 1e-20 : 0.0)));
        }
        for (int j = 0; j < K; ++j) wt[j] *= h.weights_scale;
    }
}

// Routed experts of layer il through the slot arenas: hb [n_embd, 1, T'] with slot ids / expert ids [K', T']
// -> per-expert outputs before weighting [n_embd, K', T']. Each output column depends only on its own
// token and expert, whatever else is in the batch: the single-pass and the expert-major paths agree bit for bit.
ggml_tensor * Model::expert_ffn(ggml_context * ctx, int il, const Pool & P, ggml_tensor * hb, ggml_tensor * slots,
                                ggml_tensor * eids) {
    const HParams & h = hp_;
    Layer & L = layers_[il];
    ggml_tensor * g = ggml_mul_mat_id(ctx, P.arena[0], hb, slots);     // [n_ff, K', T']
    ggml_tensor * u = ggml_mul_mat_id(ctx, P.arena[1], hb, slots);     // [n_ff, K', T']
    if (L.gate_exps_b) g = ggml_add_id(ctx, g, L.gate_exps_b, eids);
    if (L.up_exps_b) u = ggml_add_id(ctx, u, L.up_exps_b, eids);
    ggml_tensor * a = h.act == ACT_SWIGLU_OAI ? ggml_swiglu_oai(ctx, g, u, h.oai_alpha, h.oai_limit) : ggml_swiglu_split(ctx, g, u);
    ggml_tensor * d = ggml_mul_mat_id(ctx, P.arena[2], a, slots);      // [n_embd, K', T']
    if (L.down_exps_b) d = ggml_add_id(ctx, d, L.down_exps_b, eids);
    return d;
}

// x[:, t0:t0+T] = ffn_inp + residual_scale * (sum_k w_k d_k + shared expert(hn)); d: [n_embd, K, T]
void Model::combine(ggml_context * ctx, ggml_cgraph * gf, int il, ggml_tensor * d, ggml_tensor * weights, int t0, int T) {
    const HParams & h = hp_;
    Layer & L = layers_[il];
    const int K = h.n_expert_used;
    ggml_tensor * hn = ggml_view_2d(ctx, ffn_in_, h.n_embd, T, ffn_in_->nb[1], t0 * ffn_in_->nb[1]);
    ggml_tensor * ffn_inp = ggml_view_2d(ctx, ffn_inp_, h.n_embd, T, ffn_inp_->nb[1], t0 * ffn_inp_->nb[1]);
    ggml_tensor * x = ggml_view_2d(ctx, x_, h.n_embd, T, x_->nb[1], t0 * x_->nb[1]);
    d = ggml_mul(ctx, d, weights);
    ggml_tensor * moe = ggml_view_2d(ctx, d, h.n_embd, T, d->nb[2], 0);
    for (int j = 1; j < K; ++j) moe = ggml_add(ctx, moe, ggml_view_2d(ctx, d, h.n_embd, T, d->nb[2], j * d->nb[1]));
    if (L.gate_shexp) {
        ggml_tensor * s = ffn(ctx, hn, L.gate_shexp, L.up_shexp, L.down_shexp);
        if (L.gate_inp_shexp) s = ggml_mul(ctx, s, ggml_sigmoid(ctx, ggml_mul_mat(ctx, L.gate_inp_shexp, hn)));
        moe = ggml_add(ctx, moe, s);
    }
    if (h.residual_scale != 1.f) moe = ggml_scale(ctx, moe, h.residual_scale);
    ggml_build_forward_expand(gf, ggml_cpy(ctx, ggml_add(ctx, moe, ffn_inp), x));
}

// Single pass: every expert of tokens [t0, t1) is resident (slot_ids [K, t1 - t0]).
void Model::run_experts(int il, int t0, int t1, const std::vector<int32_t> & slot_ids, const std::vector<float> & w,
                        const std::vector<int32_t> & ids) {
    const HParams & h = hp_;
    const int T = t1 - t0, K = h.n_expert_used;
    ggml_context * ctx = begin_graph();
    ggml_cgraph * gf = ggml_new_graph_custom(ctx, kMaxNodes, false);
    ggml_tensor * slots = ggml_new_tensor_2d(ctx, GGML_TYPE_I32, K, T);
    ggml_set_input(slots);
    ggml_tensor * weights = ggml_new_tensor_3d(ctx, GGML_TYPE_F32, 1, K, T);
    ggml_set_input(weights);
    ggml_tensor * eids = ggml_new_tensor_2d(ctx, GGML_TYPE_I32, K, T);   // expert ids, for per-expert biases
    ggml_set_input(eids);
    ggml_tensor * hn = ggml_view_2d(ctx, ffn_in_, h.n_embd, T, ffn_in_->nb[1], t0 * ffn_in_->nb[1]);
    ggml_tensor * d = expert_ffn(ctx, il, cache_->pool_of(il), ggml_reshape_3d(ctx, hn, h.n_embd, 1, T), slots, eids);
    combine(ctx, gf, il, d, weights, t0, T);
    compute(ctx, gf, galloc_);
    set_input(slots, slot_ids.data(), ggml_nbytes(slots));
    set_input(weights, w.data() + (size_t) t0 * K, ggml_nbytes(weights));
    if (eids->buffer) set_input(eids, ids.data() + (size_t) t0 * K, ggml_nbytes(eids));
    ggml_backend_graph_compute(backend_, gf);
    ggml_free(ctx);
}

// Expert-major step for one group of resident experts: the P (token, k) pairs routed to them are gathered,
// computed, and their outputs scattered into ebuf_ rows t * K + k.
// on_cpu (tiering.h): the group sits in tier 2 (RAM) and the CPU backend runs it from there. The step's
// hidden states go to the host and the outputs come back into ebuf_ rows: device <-> host copies on a GPU,
// memcpys on a CPU device (so the CPU build runs this code path too).
void Model::run_expert_pairs(int il, int T, const std::vector<int32_t> & tok, const std::vector<int64_t> & rows,
                             const std::vector<int32_t> & slot_ids, const std::vector<int32_t> & eid, bool on_cpu) {
    const HParams & h = hp_;
    const int P = (int) tok.size(), K = h.n_expert_used;
    std::vector<float> hn_host;
    ggml_context * ctx = begin_graph();
    ggml_cgraph * gf = ggml_new_graph_custom(ctx, kMaxNodes, false);
    ggml_tensor * hn;
    if (on_cpu) {
        hn_host.resize((size_t) h.n_embd * T);
        ggml_backend_tensor_get(ffn_in_, hn_host.data(), 0, hn_host.size() * sizeof(float));
        hn = ggml_new_tensor_2d(ctx, GGML_TYPE_F32, h.n_embd, T);
        ggml_set_input(hn);
    } else {
        hn = ggml_view_2d(ctx, ffn_in_, h.n_embd, T, ffn_in_->nb[1], 0);
    }
    ggml_tensor * t_idx = ggml_new_tensor_1d(ctx, GGML_TYPE_I32, P);
    ggml_set_input(t_idx);
    ggml_tensor * slots = ggml_new_tensor_2d(ctx, GGML_TYPE_I32, 1, P);
    ggml_set_input(slots);
    ggml_tensor * eids = ggml_new_tensor_2d(ctx, GGML_TYPE_I32, 1, P);
    ggml_set_input(eids);
    ggml_tensor * xs = ggml_reshape_3d(ctx, ggml_get_rows(ctx, hn, t_idx), h.n_embd, 1, P);   // [n_embd, 1, P]
    const Pool & pool = on_cpu ? tier2_->pool_of(il) : cache_->pool_of(il);
    ggml_tensor * d = ggml_reshape_2d(ctx, expert_ffn(ctx, il, pool, xs, slots, eids), h.n_embd, P);
    ggml_tensor * r_idx = nullptr;
    if (on_cpu) {
        ggml_set_output(d);
        ggml_build_forward_expand(gf, d);
    } else {
        r_idx = ggml_new_tensor_1d(ctx, GGML_TYPE_I64, P);
        ggml_set_input(r_idx);
        ggml_tensor * dst = ggml_view_2d(ctx, ebuf_, h.n_embd, (int64_t) K * T, ebuf_->nb[1], 0);
        ggml_build_forward_expand(gf, ggml_set_rows(ctx, dst, d, r_idx));
    }
    compute(ctx, gf, on_cpu ? galloc_cpu_ : galloc_);
    if (on_cpu) set_input(hn, hn_host.data(), ggml_nbytes(hn));
    else set_input(r_idx, rows.data(), ggml_nbytes(r_idx));
    set_input(t_idx, tok.data(), ggml_nbytes(t_idx));
    set_input(slots, slot_ids.data(), ggml_nbytes(slots));
    if (eids->buffer) set_input(eids, eid.data(), ggml_nbytes(eids));
    ggml_backend_graph_compute(on_cpu ? cpu_backend_ : backend_, gf);
    if (on_cpu) {
        std::vector<float> out((size_t) h.n_embd * P);
        ggml_backend_tensor_get(d, out.data(), 0, out.size() * sizeof(float));
        for (int i = 0; i < P; ++i)
            ggml_backend_tensor_set(ebuf_, out.data() + (size_t) i * h.n_embd, (size_t) rows[i] * ebuf_->nb[1],
                                    (size_t) h.n_embd * sizeof(float));
    }
    ggml_free(ctx);
}

void Model::run_combine(int il, int T, const std::vector<float> & w) {
    const HParams & h = hp_;
    const int K = h.n_expert_used;
    ggml_context * ctx = begin_graph();
    ggml_cgraph * gf = ggml_new_graph_custom(ctx, kMaxNodes, false);
    ggml_tensor * weights = ggml_new_tensor_3d(ctx, GGML_TYPE_F32, 1, K, T);
    ggml_set_input(weights);
    ggml_tensor * d = ggml_view_3d(ctx, ebuf_, h.n_embd, K, T, ebuf_->nb[1], ebuf_->nb[1] * K, 0);
    combine(ctx, gf, il, d, weights, 0, T);
    compute(ctx, gf, galloc_);
    set_input(weights, w.data(), ggml_nbytes(weights));
    ggml_backend_graph_compute(backend_, gf);
    ggml_free(ctx);
}

// Distinct experts of this step (ids [n]) that miss the arena and that the cost model runs on the CPU.
std::vector<int32_t> Model::cpu_group(int il, const std::vector<int32_t> & ids, int n) {
    std::vector<int32_t> out;
    const Layer & L = layers_[il];
    if (!tier2_ || opt_.cpu_compute == (int) CpuCompute::NEVER) return out;
    // per-expert biases live with the dense weights: on a GPU they are not where the CPU could read them
    if (backend_ != cpu_backend_ && (L.gate_exps_b || L.up_exps_b || L.down_exps_b)) return out;
    std::vector<int> count(hp_.n_expert, 0);
    std::vector<int32_t> order;
    for (int i = 0; i < n; ++i)
        if (count[ids[i]]++ == 0) order.push_back(ids[i]);
    // reuse: the share of this layer's expert uses that found the expert in the arena
    const LayerStats st = cache_->stats(il);
    const double uses = (double) (st.hits + st.misses + cpu_experts_[il]);
    const double reuse = uses > 0 ? (double) st.hits / uses : 0.5;
    for (int32_t e : order)
        if (!cache_->resident(il, e) && run_on_cpu(costs_, (CpuCompute) opt_.cpu_compute, count[e], reuse))
            out.push_back(e);
    return out;
}

// Routed experts of layer il for T tokens. When their distinct experts fit the layer's slots and the CPU
// runs none of them: one pass. Otherwise expert-major: groups of at most `quota` experts, each made
// resident once (in the arena, or for the CPU's share in tier 2), then one combine.
void Model::moe_layer(int il, int T, const std::vector<int32_t> & ids, const std::vector<float> & w) {
    const int K = hp_.n_expert_used, n = T * K;
    const std::vector<int32_t> on_cpu = cpu_group(il, ids, n);
    if (on_cpu.empty() && cache_->distinct(ids.data(), n) <= cache_->quota(il)) {
        std::vector<int32_t> slots((size_t) n);
        cache_->acquire(il, ids.data(), n, slots.data());
        try { run_experts(il, 0, T, slots, w, ids); } catch (...) { cache_->release(il); throw; }
        cache_->release(il);
        return;
    }
    std::vector<char> seen(hp_.n_expert, 0);
    for (int32_t e : on_cpu) seen[e] = 1;
    std::vector<int32_t> experts;                 // the arena's share, in order of first use
    for (int i = 0; i < n; ++i)
        if (!seen[ids[i]]) { seen[ids[i]] = 1; experts.push_back(ids[i]); }
    auto run_groups = [&](ExpertCache & tier, const std::vector<int32_t> & list, bool cpu) {
        const int q = tier.quota(il);
        std::vector<int32_t> gslots, tok, sl, eid;
        std::vector<int64_t> rows;
        std::vector<int> slot_of(hp_.n_expert, -1);
        for (size_t g0 = 0; g0 < list.size(); g0 += q) {
            const int gn = (int) std::min<size_t>(q, list.size() - g0);
            gslots.resize(gn);
            std::fill(slot_of.begin(), slot_of.end(), -1);
            tier.acquire(il, &list[g0], gn, gslots.data());
            for (int i = 0; i < gn; ++i) slot_of[list[g0 + i]] = gslots[i];
            tok.clear(); rows.clear(); sl.clear(); eid.clear();
            for (int i = 0; i < n; ++i) {
                const int e = ids[i];
                if (slot_of[e] < 0) continue;     // not in this group
                tok.push_back(i / K);
                rows.push_back(i);                // row t * K + k of ebuf_
                sl.push_back(slot_of[e]);
                eid.push_back(e);
            }
            try { run_expert_pairs(il, T, tok, rows, sl, eid, cpu); } catch (...) { tier.release(il); throw; }
            tier.release(il);
        }
    };
    run_groups(*cache_, experts, false);
    if (!on_cpu.empty()) {
        run_groups(*tier2_, on_cpu, true);
        cpu_experts_[il] += on_cpu.size();
    }
    run_combine(il, T, w);
}

// Seconds for one expert's three matrices over n tokens on `backend` (weights from the first slot of
// layer il in pool P, which is empty: zeros), median of 3 after a warm-up.
double Model::time_expert(ggml_backend_t backend, ggml_gallocr_t galloc, const Pool & P, int slot0, int il, int n) {
    const HParams & h = hp_;
    ggml_context * ctx = begin_graph();
    ggml_cgraph * gf = ggml_new_graph_custom(ctx, kMaxNodes, false);
    ggml_tensor * x = ggml_new_tensor_3d(ctx, GGML_TYPE_F32, h.n_embd, 1, n);
    ggml_set_input(x);
    ggml_tensor * slots = ggml_new_tensor_2d(ctx, GGML_TYPE_I32, 1, n);
    ggml_set_input(slots);
    ggml_tensor * eids = ggml_new_tensor_2d(ctx, GGML_TYPE_I32, 1, n);
    ggml_set_input(eids);
    Layer & L = layers_[il];                      // time the matrices alone (biases may live on the other device)
    ggml_tensor * saved[3] = {L.gate_exps_b, L.up_exps_b, L.down_exps_b};
    L.gate_exps_b = L.up_exps_b = L.down_exps_b = nullptr;
    ggml_tensor * d = expert_ffn(ctx, il, P, x, slots, eids);
    L.gate_exps_b = saved[0]; L.up_exps_b = saved[1]; L.down_exps_b = saved[2];
    ggml_build_forward_expand(gf, d);
    compute(ctx, gf, galloc);
    std::vector<float> xv((size_t) h.n_embd * n, 0.01f);
    std::vector<int32_t> sv(n, slot0);
    set_input(x, xv.data(), ggml_nbytes(x));
    set_input(slots, sv.data(), ggml_nbytes(slots));
    std::vector<double> t;
    for (int rep = 0; rep < 4; ++rep) {
        const auto t0 = std::chrono::steady_clock::now();
        ggml_backend_graph_compute(backend, gf);
        ggml_backend_synchronize(backend);
        if (rep) t.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
    }
    ggml_free(ctx);
    std::sort(t.begin(), t.end());
    return t[t.size() / 2];
}

// The cost model's numbers, measured on this machine with the first MoE layer's shapes.
void Model::measure_costs() {
    int il = 0;
    while (il < hp_.n_layer && !layers_[il].moe) ++il;
    if (il == hp_.n_layer) return;
    const Pool & P1 = cache_->pool_of(il);
    const Pool & P2 = tier2_->pool_of(il);
    const int s1 = cache_->layers()[il].base, s2 = tier2_->layers()[il].base;
    const auto & src = cache_->layers()[il].src;
    costs_.expert_bytes = (double) (src[0].nbytes + src[1].nbytes + src[2].nbytes);
    // host -> device: tier-2 slot into the (still empty) first arena slot, both zeros
    std::vector<double> t;
    for (int rep = 0; rep < 4; ++rep) {
        const auto t0 = std::chrono::steady_clock::now();
        for (int r = 0; r < 3; ++r) {
            const char * from = (const char *) P2.mem[r] + (uint64_t) s2 * P2.slot_bytes[r];
            ggml_backend_tensor_set(P1.arena[r], from, (uint64_t) s1 * P1.slot_bytes[r], src[r].nbytes);
        }
        ggml_backend_synchronize(backend_);
        if (rep) t.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
    }
    std::sort(t.begin(), t.end());
    costs_.h2d_bytes_per_s = costs_.expert_bytes / std::max(t[t.size() / 2], 1e-9);
    const int nb = 32;                            // fixed part and per-token slope from 1 and nb tokens
    const double c1 = time_expert(cpu_backend_, galloc_cpu_, P2, s2, il, 1);
    const double cn = time_expert(cpu_backend_, galloc_cpu_, P2, s2, il, nb);
    const double g1 = time_expert(backend_, galloc_, P1, s1, il, 1);
    const double gn = time_expert(backend_, galloc_, P1, s1, il, nb);
    costs_.cpu_per_token_s = std::max(0.0, (cn - c1) / (nb - 1));
    costs_.cpu_fixed_s = std::max(0.0, c1 - costs_.cpu_per_token_s);
    costs_.gpu_per_token_s = std::max(0.0, (gn - g1) / (nb - 1));
    costs_.gpu_fixed_s = std::max(0.0, g1 - costs_.gpu_per_token_s);
}

void Model::reset_stats() {
    cache_->reset_stats();
    if (tier2_) tier2_->reset_stats();
    cpu_experts_.assign(hp_.n_layer, 0);
}

void Model::run_output(int T, int n_out, float * logits) {
    const HParams & h = hp_;
    ggml_context * ctx = begin_graph();
    ggml_cgraph * gf = ggml_new_graph_custom(ctx, kMaxNodes, false);
    ggml_tensor * x = ggml_view_2d(ctx, x_, h.n_embd, n_out, x_->nb[1], (size_t) (T - n_out) * x_->nb[1]);
    ggml_tensor * y = ggml_mul_mat(ctx, output_, norm(ctx, x, out_norm_, out_norm_b_));   // [n_vocab, n_out]
    if (output_b_) y = ggml_add(ctx, y, output_b_);
    if (h.logit_scale != 1.f) y = ggml_scale(ctx, y, 1.f / h.logit_scale);
    ggml_set_output(y);
    ggml_build_forward_expand(gf, y);
    compute(ctx, gf, galloc_);
    ggml_backend_graph_compute(backend_, gf);
    ggml_backend_tensor_get(y, logits, 0, ggml_nbytes(y));
    ggml_free(ctx);
}

void Model::eval(const int32_t * tokens, int n_tokens, int n_out, float * logits) {
    const HParams & h = hp_;
    if (n_past_ + n_tokens > opt_.n_ctx)
        throw BudgetError("context overflow: " + std::to_string(n_past_ + n_tokens) + " tokens exceed n_ctx = " +
                          std::to_string(opt_.n_ctx));
    for (int i = 0; i < n_tokens; ++i)
        if (tokens[i] < 0 || tokens[i] >= h.n_vocab)
            throw FormatError("token id " + std::to_string(tokens[i]) + " out of range [0, " + std::to_string(h.n_vocab) + ")");
    const int K = h.n_expert_used;
    for (int start = 0; start < n_tokens; start += opt_.n_ubatch) {
        const int T = std::min(opt_.n_ubatch, n_tokens - start);
        const int n_kv = n_past_ + T;
        pos_.resize(T);
        for (int t = 0; t < T; ++t) pos_[t] = n_past_ + t;
        mask_.assign((size_t) n_kv * T, -INFINITY);
        mask_swa_.assign((size_t) n_kv * T, -INFINITY);
        for (int t = 0; t < T; ++t)
            for (int j = 0; j <= pos_[t]; ++j) {
                mask_[(size_t) t * n_kv + j] = 0.f;
                if (h.n_swa <= 0 || pos_[t] - j < h.n_swa) mask_swa_[(size_t) t * n_kv + j] = 0.f;
            }
        run_embed(tokens + start, T);
        std::vector<int32_t> ids, slots, la_ids;
        std::vector<float> w, la_w, sc;
        for (int il = 0; il < h.n_layer; ++il) {
            run_attn(il, T);
            if (!layers_[il].moe) continue;
            route(il, router_, T, ids, w, record_routes ? &sc : nullptr);
            const int nl = next_moe(il);
            if (nl >= 0 && (opt_.prefetch || record_routes)) {
                route(nl, lookahead_, T, la_ids, la_w);
                if (opt_.prefetch) cache_->prefetch(nl, la_ids.data(), (int) la_ids.size());
                if (record_routes) {
                    route_la.resize(h.n_layer);
                    route_la[nl].insert(route_la[nl].end(), la_ids.begin(), la_ids.end());
                }
            }
            if (record_routes) {
                route_ids.resize(h.n_layer);
                route_w.resize(h.n_layer);
                route_ids[il].insert(route_ids[il].end(), ids.begin(), ids.end());
                route_w[il].insert(route_w[il].end(), sc.begin(), sc.end());
            }
            moe_layer(il, T, ids, w);
            for (int t = 0; t < T; ++t) cache_->note_token_experts(il, &ids[(size_t) t * K], K);
        }
        const int out_here = std::max(0, std::min(T, n_out - (n_tokens - start - T)));
        if (out_here > 0) {
            const int first_out_global = n_tokens - n_out;                  // index of the first wanted token
            const int offset_rows = std::max(0, start - first_out_global);
            run_output(T, out_here, logits + (size_t) offset_rows * h.n_vocab);
        }
        n_past_ += T;
    }
}

}  // namespace moelite
