// Model: loading (dense weights resident, experts through the ExpertCache) and the step driver.
//
// One evaluation step over T tokens, per layer il (the layer plan says which mixer and FFN block):
//   graph A (run_layer_front): x -> mixer (attention: mixer_attention.cpp, MLA: mixer_mla.cpp) -> h = x + attn;
//                          dense layer: x = h + dense_block(h) (ffn_dense.cpp);
//                          MoE layer: router logits, expert input hn, h kept for graph B (ffn_moe.cpp)
//   host (route):          top-k expert ids + weights per token (router.cpp)
//   cache (acquire):       expert ids -> slot ids, loading misses from disk (expert_cache.cpp)
//   graph B (moe_layer):   x = h + sum_k w_k * down_k(act(gate_k hn) * up_k hn) [+ shared, + parallel dense]
// Experts are always computed by ggml_mul_mat_id over the slot arenas, resident or not.
#include "model.h"
#include "ple.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstring>
#include <numeric>

#include "common.h"
#include "ggml-cpu.h"
#include "graph_util.h"
#ifdef MOELITE_CUDA
#include "ggml-cuda.h"
#endif

namespace moelite {

Model::Model(const std::string & path, const HParams & hp, const ModelOptions & opt) : path_(path), hp_(hp), opt_(opt) {
    idx_ = std::make_unique<GGUFIndex>(path);
    path_ = idx_->path; // a split set opened from a later shard: named by its first
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

    // the dense tensors: backend buffers (repacked ones apart), read from the file; or, with the benchmark switch
    // MOELITE_DENSE_MMAP=1 on the CPU, views of the file mapped into the page cache (llama.cpp's way)
    repack_buft_ = opt_.repack && backend_ == cpu_backend_ ? cpu_repack_buft(cpu_backend_) : nullptr;
    unrepack_q4_K_ = opt_.expert_gemm && unrepack_q4_K_check(repack_buft_);
    const char * mm = std::getenv("MOELITE_DENSE_MMAP");
    dense_mmap_ = backend_ == cpu_backend_ && mm && *mm && std::strcmp(mm, "0") != 0;
    if (dense_mmap_) {
        map_weights();
    } else {
        alloc_weights();
        read_weights();
    }

    // expert cache: quota per MoE layer, the MTP block's included (all experts when not given)
    const int NB = hp_.n_blocks();
    if (!opt_.expert_slots.empty() && (int) opt_.expert_slots.size() != NB)
        throw BudgetError("expert_slots names " + std::to_string(opt_.expert_slots.size()) + " layers, the model has " +
                          std::to_string(NB));
    std::vector<int> quota(NB, 0);
    for (int il = 0; il < NB; ++il)
        if (layers_[il].moe) {
            quota[il] = opt_.expert_slots.empty() ? hp_.n_expert : opt_.expert_slots[il];
            if (quota[il] < hp_.n_expert_used)
                throw BudgetError("layer " + std::to_string(il) + ": " + std::to_string(quota[il]) +
                                  " expert slots is fewer than n_expert_used = " + std::to_string(hp_.n_expert_used));
            quota[il] = std::min(quota[il], hp_.n_expert);
        }
    cache_->finalize(quota, backend_, nullptr, repack_buft_);
    cache_->set_policy((Policy) opt_.policy, opt_.window_m);
    if (tier2_) { // RAM tier: quotas clamped like the arena's
        const std::vector<int> hq = tier_quotas(opt_.host_slots, "host_slots");
        ggml_backend_buffer_type_t pinned = nullptr;
#ifdef MOELITE_CUDA
        if (opt_.device == 1) pinned = ggml_backend_cuda_host_buffer_type();
#endif
        tier2_->finalize(hq, cpu_backend_, pinned, pinned ? nullptr : repack_buft_); // a GPU's RAM tier stays plain
        tier2_->set_policy((Policy) opt_.policy, opt_.window_m);
        cache_->set_tier2(tier2_.get());
    }
    cpu_experts_.assign(NB, 0);
    swaps_.assign(NB, 0);
    gemm_experts_.assign(NB, 0);
    standin_uses_.assign(NB, 0);
    decode_times_ = DecodeTimes{};
    if (standin_) { // its own slots (quota >= n_expert_used) and I/O threads
        standin_->finalize(tier_quotas(opt_.standin_slots, "standin_slots"), backend_, nullptr, repack_buft_);
        standin_->set_policy((Policy) opt_.policy, opt_.window_m);
        if (opt_.n_io_threads > 0) standin_->start_io(opt_.n_io_threads);
    }
    // offloaded: I/O threads read misses in parallel (and prefetches when enabled)
    if (!opt_.expert_slots.empty() && opt_.n_io_threads > 0) cache_->start_io(opt_.n_io_threads);
    cache_->set_prefetch(opt_.prefetch);
    alloc_kv();
    galloc_ = ggml_gallocr_new(ggml_backend_get_default_buffer_type(backend_));
    graph_mem_.resize(ggml_tensor_overhead() * kMaxNodes + ggml_graph_overhead_custom(kMaxNodes, false));
    if (backend_ == cpu_backend_ && opt_.scratch_reserve > 0) reserve_scratch(opt_.scratch_reserve);
    if (fused_ok()) { // one graph for the step: at most kLayerNodes per layer
        fused_nodes_ = kLayerNodes * (hp_.n_layer + 1);
        fused_mem_.resize(ggml_tensor_overhead() * fused_nodes_ + ggml_graph_overhead_custom(fused_nodes_, false));
    }
    if (tier2_) {
        galloc_cpu_ = ggml_gallocr_new(ggml_backend_get_default_buffer_type(cpu_backend_));
        measure_costs(); // before any expert is loaded: it writes into empty slots
    }

    // fully resident: load every expert now so that the first tokens do not pay for disk reads
    if (opt_.expert_slots.empty()) {
        std::vector<int32_t> ids(hp_.n_expert), slots(hp_.n_expert);
        std::iota(ids.begin(), ids.end(), 0);
        for (int il = 0; il < NB; ++il)
            if (layers_[il].moe) {
                cache_->acquire(il, ids.data(), hp_.n_expert, slots.data());
                cache_->release(il);
            }
        reset_stats();
    }
    if (opt_.mlock) lock_memory();
}

// Per-layer quotas of a second expert cache (the RAM tier, the stand-ins) from the caller's list: one entry per
// layer, MoE layers clamped to [n_expert_used, n_expert], 0 elsewhere.
std::vector<int> Model::tier_quotas(const std::vector<int> & per_layer, const char * what) const {
    if ((int) per_layer.size() != hp_.n_layer)
        throw BudgetError(std::string(what) + " names " + std::to_string(per_layer.size()) + " layers, the model has " +
                          std::to_string(hp_.n_layer));
    std::vector<int> q(hp_.n_layer, 0);
    for (int il = 0; il < hp_.n_layer; ++il)
        if (layers_[il].moe) q[il] = std::min(std::max(per_layer[il], hp_.n_expert_used), hp_.n_expert);
    return q;
}

Model::~Model() {
    for (auto & [p, n] : locked_) munlock(p, n);
    standin_.reset();
    cache_.reset();
    tier2_.reset();
    if (galloc_) ggml_gallocr_free(galloc_);
    if (galloc_cpu_) ggml_gallocr_free(galloc_cpu_);
    if (buf_kv_) ggml_backend_buffer_free(buf_kv_);
    if (ctx_kv_) ggml_free(ctx_kv_);
    if (buf_rs_) ggml_backend_buffer_free(buf_rs_);
    if (ctx_rs_) ggml_free(ctx_rs_);
    if (buf_w_) ggml_backend_buffer_free(buf_w_);
    if (buf_rp_) ggml_backend_buffer_free(buf_rp_);
    for (ggml_backend_buffer_t b : buf_maps_)
        if (b) ggml_backend_buffer_free(b); // a view: the mapping itself is unmapped below
    for (auto & [p, n] : maps_)
        if (p) munmap(p, n);
    if (ctx_w_) ggml_free(ctx_w_);
    if (backend_ && backend_ != cpu_backend_) ggml_backend_free(backend_);
    if (cpu_backend_) ggml_backend_free(cpu_backend_);
    if (cpu_threadpool_) ggml_threadpool_free(cpu_threadpool_);
}

// The weights the model reads through ggml_mul_mat only, as 2-D matrices: attention projections, dense FFN,
// shared experts, and output.weight unless it is the tied token_embd.weight (which get_rows reads). Norms, biases,
// routers, recurrent-mixer tensors and anything read back to the host are never in this list.
std::vector<ggml_tensor *> Model::matmul_weights() const {
    std::vector<ggml_tensor *> out;
    for (const Layer & L : layers_)
        for (ggml_tensor * t :
             {L.wq, L.wk, L.wv, L.wo, L.wq_a, L.wq_b, L.wkv_a, L.ffn_gate, L.ffn_up, L.ffn_down, L.gate_shexp,
              L.up_shexp, L.down_shexp, L.ffn_latent_down, L.ffn_latent_up, L.nextn_eh_proj, L.nextn_head})
            if (t) out.push_back(t);
    if (output_ && output_ != tok_embd_) out.push_back(output_);
    return out;
}

// Dense weights into backend memory: those the CPU_REPACK buffer type takes for ggml_mul_mat into one buffer of
// that type (same size: repacked bytes are as many as the file's), everything else into one buffer of the backend.
void Model::alloc_weights() {
    std::vector<ggml_tensor *> packed;
    for (ggml_tensor * t : matmul_weights())
        if (ggml_n_dims(t) == 2 && std::find(packed.begin(), packed.end(), t) == packed.end() &&
            repack_supports(repack_buft_, t->type, t->ne[0], t->ne[1], 0))
            packed.push_back(t);
    if (!packed.empty()) {
        const size_t align = ggml_backend_buft_get_alignment(repack_buft_);
        size_t size = align; // slack for the first tensor's alignment
        for (ggml_tensor * t : packed) size += GGML_PAD(ggml_backend_buft_get_alloc_size(repack_buft_, t), align);
        buf_rp_ = ggml_backend_buft_alloc_buffer(repack_buft_, size);
        if (!buf_rp_)
            throw BudgetError("cannot allocate " + std::to_string(size) + " bytes for the repacked dense weights");
        advise_huge_pages(buf_rp_);
        ggml_tallocr ta = ggml_tallocr_new(buf_rp_);
        for (ggml_tensor * t : packed) {
            if (ggml_tallocr_alloc(&ta, t) != GGML_STATUS_SUCCESS)
                throw BudgetError(std::string("cannot place the repacked tensor '") + ggml_get_name(t) + "'");
            repacked_bytes_ += ggml_nbytes(t);
        }
        repacked_tensors_ = packed.size();
    }
    bool rest = false; // anything left for the plain buffer?
    for (ggml_tensor * t = ggml_get_first_tensor(ctx_w_); t; t = ggml_get_next_tensor(ctx_w_, t)) rest |= !t->data;
    if (rest) {
        buf_w_ = ggml_backend_alloc_ctx_tensors(ctx_w_, backend_);
        if (!buf_w_) throw BudgetError("cannot allocate memory for the dense weights");
        advise_huge_pages(buf_w_);
    }
    for (ggml_backend_buffer_t b : {buf_w_, buf_rp_}) dense_bytes_ += b ? ggml_backend_buffer_get_size(b) : 0;
}

// MOELITE_DENSE_MMAP=1 (a benchmark switch): every dense tensor is a read-only view of its file, mapped MAP_SHARED
// whole, one CPU buffer over each mapping of a split set (a tensor's data = its shard's base + its file offset).
// The bytes live in the page cache, as llama.cpp holds them: a memory cap may evict them and a later step faults
// them back in from disk. Never repacked (ggml's repacked layouts are copies). Counted in dense_bytes() all the same.
void Model::map_weights() {
    const size_t n_files = idx_->files.size();
    maps_.assign(n_files, {nullptr, 0});
    buf_maps_.assign(n_files, nullptr);
    for (size_t f = 0; f < n_files; ++f) {
        bool used = false;
        for (auto & tr : to_read_) used |= tr.second->file == (int) f;
        if (!used) continue;
        const std::string & path = idx_->files[f].path;
        const int fd = open(path.c_str(), O_RDONLY | O_CLOEXEC);
        if (fd < 0) throw IOError(path + ": " + strerror(errno));
        struct stat st;
        void * p = MAP_FAILED;
        int err = 0;
        if (fstat(fd, &st) == 0 && st.st_size > 0) {
            p = mmap(nullptr, (size_t) st.st_size, PROT_READ, MAP_SHARED, fd, 0);
            err = errno;
        } else {
            err = errno ? errno : EINVAL;
        }
        close(fd);
        if (p == MAP_FAILED) throw IOError(path + ": cannot map the file (MOELITE_DENSE_MMAP): " + strerror(err));
        maps_[f] = {p, (size_t) st.st_size};
        buf_maps_[f] = ggml_backend_cpu_buffer_from_ptr(p, (size_t) st.st_size);
        if (!buf_maps_[f]) throw BudgetError(path + ": cannot make a buffer over the mapped file");
    }
    for (auto & [t, info] : to_read_) {
        auto [base, size] = maps_[info->file];
        if (info->offset + ggml_nbytes(t) > size) // the index checked the file's size when it opened it
            throw FormatError(idx_->files[info->file].path + ": tensor '" + info->name +
                              "' extends past the end of the file");
        if (ggml_backend_tensor_alloc(buf_maps_[info->file], t, (char *) base + info->offset) != GGML_STATUS_SUCCESS)
            throw BudgetError(std::string("cannot place the mapped tensor '") + ggml_get_name(t) + "'");
        dense_bytes_ += ggml_nbytes(t);
    }
}

// ModelOptions::mlock: the host memory of the dense weights (anonymous buffers, or the mapped tensors' pages) and of
// the KV cache / recurrent state, page-rounded, under mlock. A refusal (RLIMIT_MEMLOCK without CAP_IPC_LOCK: ENOMEM
// or EPERM; EAGAIN) leaves that range unlocked and is counted, never thrown: the caller reports it.
void Model::lock_memory() {
    lock_.requested = true;
    const uintptr_t page = (uintptr_t) sysconf(_SC_PAGESIZE);
    std::vector<std::pair<uintptr_t, uintptr_t>> r; // [lo, hi) page ranges
    auto add = [&](const void * p, size_t n) {
        if (!p || !n) return;
        r.push_back({(uintptr_t) p & ~(page - 1), ((uintptr_t) p + n + page - 1) & ~(page - 1)});
    };
    auto add_buf = [&](ggml_backend_buffer_t b, bool host) {
        if (b && host) add(ggml_backend_buffer_get_base(b), ggml_backend_buffer_get_size(b));
    };
    if (dense_mmap_) {
        for (auto & tr : to_read_) add(tr.first->data, ggml_nbytes(tr.first)); // not the experts' part of the file
    } else {
        add_buf(buf_w_, buf_w_ && ggml_backend_buffer_is_host(buf_w_));
        add_buf(buf_rp_, true); // CPU_REPACK: host memory that has no plain get/set
    }
    add_buf(buf_kv_, buf_kv_ && ggml_backend_buffer_is_host(buf_kv_));
    add_buf(buf_rs_, buf_rs_ && ggml_backend_buffer_is_host(buf_rs_));
    std::sort(r.begin(), r.end());
    std::vector<std::pair<uintptr_t, uintptr_t>> merged;
    for (auto & x : r) {
        if (!merged.empty() && x.first <= merged.back().second)
            merged.back().second = std::max(merged.back().second, x.second);
        else
            merged.push_back(x);
    }
    for (auto & [lo, hi] : merged) {
        if (mlock((void *) lo, hi - lo) == 0) {
            locked_.push_back({(void *) lo, hi - lo});
            lock_.locked_bytes += hi - lo;
        } else {
            if (!lock_.err) lock_.err = errno;
            lock_.failed_bytes += hi - lo;
        }
    }
}

// The file bytes of every dense tensor: straight into host memory, else through a staging buffer and
// ggml_backend_tensor_set (device memory: an upload; a repacked tensor: converted on the way in).
void Model::read_weights() {
    FileSet fds(*idx_);
    std::vector<char> staging;
    for (auto & [t, info] : to_read_) {
        const bool direct = ggml_backend_buffer_is_host(t->buffer);
        char * dst = (char *) t->data;
        if (!direct) {
            staging.resize(info->nbytes);
            dst = staging.data();
        }
        fds.read(*info, dst);
        if (!direct) ggml_backend_tensor_set(t, staging.data(), 0, info->nbytes);
    }
}

RepackInfo Model::repack_info() const {
    RepackInfo r;
    r.available = repack_buft_ != nullptr;
    r.dense_tensors = repacked_tensors_;
    r.dense_bytes = repacked_bytes_;
    r.arena_bytes = cache_ ? cache_->repacked_arena_bytes() : 0;
    r.tiled_prompts = unrepack_q4_K_;
    r.q4_K_packer = cache_ && cache_->packs_q4_K();
    return r;
}

ggml_tensor * Model::load_tensor(const std::string & name, bool required, int n_dims_expect,
                                 std::vector<int64_t> shape) {
    const TensorInfo * t = idx_->find(name);
    if (!t) {
        if (required)
            throw FormatError(path_ + ": missing tensor '" + name + "' (required by architecture '" + hp_.arch + "')");
        return nullptr;
    }
    if (n_dims_expect > 0 && t->n_dims > n_dims_expect)
        throw FormatError(path_ + ": tensor '" + name + "' has " + std::to_string(t->n_dims) + " dims, expected " +
                          std::to_string(n_dims_expect));
    for (size_t d = 0; d < shape.size(); ++d)
        if (shape[d] > 0 && t->ne[d] != shape[d])
            throw FormatError(path_ + ": tensor '" + name + "' has ne[" + std::to_string(d) +
                              "] = " + std::to_string(t->ne[d]) + ", expected " + std::to_string(shape[d]));
    ggml_tensor * g = ggml_new_tensor(ctx_w_, t->type, std::max(1, t->n_dims), t->ne);
    ggml_set_name(g, name.c_str());
    to_read_.push_back({g, t});
    return g;
}

void Model::build_layers() {
    const HParams & h = hp_;
    const int64_t E = h.n_embd;
    if ((int) h.plan.size() != h.n_blocks())
        throw FormatError(path_ + ": layer plan has " + std::to_string(h.plan.size()) + " layers, expected " +
                          std::to_string(h.n_blocks()));
    tok_embd_ = load_tensor("token_embd.weight", true, 2, {E, h.n_vocab});
    out_norm_ = load_tensor("output_norm.weight", false, 1, {E});
    if (!out_norm_ && h.hc_kind != HC_GATED) // LFM2's final norm name; Qwen4-Exp's last hyper-connection is its norm
        out_norm_ = load_tensor("token_embd_norm.weight", true, 1, {E});
    out_norm_b_ = load_tensor("output_norm.bias", false, 1, {E});
    output_ = load_tensor("output.weight", false, 2, {E, h.n_vocab});
    if (!output_) output_ = tok_embd_; // tied embeddings
    output_b_ = load_tensor("output.bias", false, 1, {h.n_vocab});
    rope_factors_ = load_tensor("rope_factors_short.weight", false, 1, {});
    if (!rope_factors_) rope_factors_ = load_tensor("rope_freqs.weight", false, 1, {});

    if (h.n_mtp < 0 || h.n_mtp > 1)
        throw FormatError(path_ + ": n_mtp " + std::to_string(h.n_mtp) + ", expected 0 or 1");
    if (h.hc_mult && h.hc_kind != HC_MHC) hc_head_ = load_hc("output_hc", 1); // mHC: the streams' mean
    if (h.ple_layer >= h.n_layer ||
        (h.ple_layer >= 0 && (h.hc_kind != HC_GATED || !is_recurrent(h.plan[h.ple_layer].mixer))))
        throw FormatError(path_ + ": key ple.layers: layer " + std::to_string(h.ple_layer) +
                          " (expected a recurrent layer of a model with gated hyper-connections)");
    if (h.n_mtp && (!opt_.host_slots.empty() || !opt_.standin_path.empty()))
        throw BudgetError("the MTP block does not run with a RAM tier (host_slots) or stand-ins yet");
    cache_ = std::make_unique<ExpertCache>(idx_->files, h.n_blocks(), h.n_expert);
    if (!opt_.host_slots.empty()) tier2_ = std::make_unique<ExpertCache>(idx_->files, h.n_layer, h.n_expert);
    if (!opt_.standin_path.empty()) {
        standin_idx_ = std::make_unique<GGUFIndex>(opt_.standin_path);
        standin_ = std::make_unique<ExpertCache>(standin_idx_->files, h.n_layer, h.n_expert);
    }
    layers_.resize(h.n_blocks());
    for (int il = 0; il < h.n_blocks(); ++il) {
        Layer & L = layers_[il];
        const LayerPlan & p = h.plan[il];
        // an FFN-only block's norm too; with gated hyper-connections the mixture is the normed input (Qwen4-Exp)
        L.attn_norm = load_tensor(blk(il, "attn_norm.weight"), h.hc_kind != HC_GATED, 1, {E});
        L.attn_norm_b = load_tensor(blk(il, "attn_norm.bias"), false, 1, {E});
        if (p.mixer == MIXER_KDA) {
            load_kda(il, L);
        } else if (is_recurrent(p.mixer)) {
            load_recurrent(il, L);
        } else if (p.mixer != MIXER_NONE) {
            if (p.mixer == MIXER_MLA)
                load_mla(il, L);
            else
                load_attention(il, L);
            L.wo = load_tensor(blk(il, "attn_output.weight"), true, 2, {(int64_t) p.n_head * p.head_v, E});
            L.bo = load_tensor(blk(il, "attn_output.bias"), false, 1, {E});
            L.sinks = load_tensor(blk(il, "attn_sinks.weight"), false, 1, {p.n_head});
            L.rope_freqs = p.rope_factors ? rope_factors_ : nullptr;
        }
        load_ffn(il, L);
        if (h.hc_mult) {
            L.hc_attn = load_hc(blk(il, "hc_attn"), 2);
            L.hc_ffn = load_hc(blk(il, "hc_ffn"), 2);
        }
        if (il == h.ple_layer) load_ple(il, L);
        if (il >= h.n_layer) load_mtp(il, L);
    }
}

void Model::load_attention(int il, Layer & L) {
    const HParams & h = hp_;
    const LayerPlan & p = h.plan[il];
    const int64_t E = h.n_embd, q_dim = (int64_t) p.n_head * p.head_k, kv_dim = (int64_t) p.n_head_kv * p.head_k,
                  v_dim = (int64_t) p.n_head_kv * p.head_v;
    L.wq = load_tensor(blk(il, "attn_q.weight"), true, 2, {E, (h.attn_output_gate ? 2 : 1) * q_dim}); // [+ gate]
    L.wk = load_tensor(blk(il, "attn_k.weight"), true, 2, {E, kv_dim});
    L.wv = load_tensor(blk(il, "attn_v.weight"), false, 2, {E, v_dim});
    if (!L.wv && kv_dim != v_dim) // K = V layers reuse the k projection as V
        throw FormatError(path_ + ": missing tensor '" + blk(il, "attn_v.weight") + "'");
    L.bq = load_tensor(blk(il, "attn_q.bias"), false, 1, {q_dim});
    L.bk = load_tensor(blk(il, "attn_k.bias"), false, 1, {kv_dim});
    L.bv = L.wv ? load_tensor(blk(il, "attn_v.bias"), false, 1, {v_dim}) : nullptr;
    L.wqkv_gate = load_attn_gate(il);
    if (h.qk_norm == QK_NORM_HEAD) {
        L.q_norm = load_tensor(blk(il, "attn_q_norm.weight"), true, 1, {p.head_k});
        L.k_norm = load_tensor(blk(il, "attn_k_norm.weight"), true, 1, {p.head_k});
    } else if (h.qk_norm == QK_NORM_FULL) {
        L.q_norm = load_tensor(blk(il, "attn_q_norm.weight"), true, 1, {q_dim});
        L.k_norm = load_tensor(blk(il, "attn_k_norm.weight"), true, 1, {kv_dim});
    }
    if (p.indexer == INDEXER_QSA) { // Qwen4-Exp's token indexer (mixer_dsa.cpp qsa_mask)
        const int64_t d = h.indexer_head_size, H = h.indexer_n_head;
        L.idx_q_proj = load_tensor(blk(il, "indexer.q_proj.weight"), true, 2, {E, H * d});
        L.idx_wk = load_tensor(blk(il, "indexer.k_proj.weight"), true, 2, {E, d});
        L.idx_q_norm = load_tensor(blk(il, "indexer.q_norm.weight"), true, 1, {d});
        L.idx_k_norm = load_tensor(blk(il, "indexer.k_norm.weight"), true, 1, {d});
    }
}

// An attention output gate from the normed input (Qwen3.5's gate rides in attn_q instead): per element (AFMoE,
// Laguna M.1, Hy4) or, a width of n_head, per head (Laguna XS.2, Ling-3.0): llama.cpp tells them apart by that
// width too. Optional.
ggml_tensor * Model::load_attn_gate(int il) {
    const LayerPlan & p = hp_.plan[il];
    const TensorInfo * g = idx_->find(blk(il, "attn_gate.weight"));
    const bool per_head = g && g->ne[1] == p.n_head;
    return load_tensor(blk(il, "attn_gate.weight"), false, 2,
                       {hp_.n_embd, per_head ? p.n_head : (int64_t) p.n_head * p.head_v});
}

void Model::load_mla(int il, Layer & L) {
    const HParams & h = hp_;
    const LayerPlan & p = h.plan[il];
    const int64_t E = h.n_embd, q_dim = (int64_t) p.n_head * p.head_k, nope = p.head_k - p.n_rot;
    if (h.q_lora_rank > 0) {
        L.wq_a = load_tensor(blk(il, "attn_q_a.weight"), true, 2, {E, h.q_lora_rank});
        L.q_a_norm = load_tensor(blk(il, "attn_q_a_norm.weight"), true, 1, {h.q_lora_rank});
        L.wq_b = load_tensor(blk(il, "attn_q_b.weight"), true, 2, {h.q_lora_rank, q_dim});
    } else {
        L.wq = load_tensor(blk(il, "attn_q.weight"), true, 2, {E, q_dim});
    }
    L.wkv_a = load_tensor(blk(il, "attn_kv_a_mqa.weight"), true, 2, {E, h.kv_lora_rank + p.n_rot});
    L.kv_a_norm = load_tensor(blk(il, "attn_kv_a_norm.weight"), true, 1, {h.kv_lora_rank});
    if (!idx_->find(blk(il, "attn_k_b.weight")) && idx_->find(blk(il, "attn_kv_b.weight")))
        throw FormatError(path_ + ": tensor '" + blk(il, "attn_kv_b.weight") +
                          "' (pre-MLA DeepSeek GGUF layout) is not supported; re-convert with `moelite convert` "
                          "to get attn_k_b / attn_v_b");
    L.wk_b = load_tensor(blk(il, "attn_k_b.weight"), true, 3, {nope, h.kv_lora_rank, p.n_head});
    L.wv_b = load_tensor(blk(il, "attn_v_b.weight"), true, 3, {h.kv_lora_rank, p.head_v, p.n_head});
    L.wqkv_gate = load_attn_gate(il);                              // Ling-3.0: per head; Hy4: per element
    if (p.indexer == INDEXER_FULL || p.indexer == INDEXER_KPOOL) { // DSA lightning indexer (mixer_dsa.cpp)
        const int64_t d = h.indexer_head_size, H = h.indexer_n_head;
        if (!L.wq_a) throw FormatError(path_ + ": the DSA indexer needs the q latent (attention.q_lora_rank)");
        L.idx_wq_b = load_tensor(blk(il, "indexer.attn_q_b.weight"), true, 2, {h.q_lora_rank, H * d});
        L.idx_wk = load_tensor(blk(il, "indexer.attn_k.weight"), true, 2, {E, d});
        L.idx_k_norm = load_tensor(blk(il, "indexer.k_norm.weight"), true, 1, {d});
        L.idx_k_norm_b = load_tensor(blk(il, "indexer.k_norm.bias"), true, 1, {d});
        L.idx_proj = load_tensor(blk(il, "indexer.proj.weight"), true, 2, {E, H});
    }
    if (p.indexer == INDEXER_KPOOL) { // the pooling gate and its per-slot bias (llama.cpp's glm5-next names)
        L.idx_kpool_gate = load_tensor(blk(il, "indexer_compressor_gate.weight"), true, 2, {E, h.indexer_head_size});
        L.idx_kpool_ape =
            load_tensor(blk(il, "indexer_compressor_ape.weight"), true, 2, {h.indexer_head_size, p.compress});
        if (L.idx_kpool_ape->type != GGML_TYPE_F32)
            throw FormatError(path_ + ": tensor '" + blk(il, "indexer_compressor_ape.weight") + "': expected F32");
    }
}

// Recurrent mixer weights (shapes: mixer_recurrent.cpp). Conv kernels and the DeltaNet gate vectors must be F32
// (ggml_ssm_conv and the elementwise ops take F32 only).
void Model::load_recurrent(int il, Layer & L) {
    const HParams & h = hp_;
    const int64_t E = h.n_embd, K = h.ssm_conv_kernel;
    if (h.plan[il].mixer == MIXER_SHORTCONV) {
        L.sc_conv = load_tensor(blk(il, "shortconv.conv.weight"), true, 2, {K, E});
        L.sc_in = load_tensor(blk(il, "shortconv.in_proj.weight"), true, 2, {E, 3 * E});
        L.sc_out = load_tensor(blk(il, "shortconv.out_proj.weight"), true, 2, {E, E});
    } else if (h.plan[il].mixer == MIXER_MAMBA2) {
        const int64_t nh = h.ssm_dt_rank, ng = h.ssm_n_group, di = h.ssm_d_inner, C = di + 2 * ng * h.ssm_d_state;
        L.ssm_in = load_tensor(blk(il, "ssm_in.weight"), true, 2, {E, di + C + nh});
        L.ssm_conv1d = load_tensor(blk(il, "ssm_conv1d.weight"), true, 2, {K, C});
        L.ssm_conv1d_b = load_tensor(blk(il, "ssm_conv1d.bias"), true, 1, {C});
        L.ssm_dt_b = load_tensor(blk(il, "ssm_dt.bias"), true, 1, {nh});
        L.ssm_a = load_tensor(blk(il, "ssm_a"), true, 2, {1, nh});
        L.ssm_d = load_tensor(blk(il, "ssm_d"), true, 2, {1, nh});
        L.ssm_norm = load_tensor(blk(il, "ssm_norm.weight"), true, 2, {di / ng, ng});
        L.ssm_out = load_tensor(blk(il, "ssm_out.weight"), true, 2, {di, E});
    } else {
        const int64_t Hv = h.ssm_dt_rank, C = 2 * (int64_t) h.ssm_n_group * h.ssm_d_state + h.ssm_d_inner;
        L.wqkv = load_tensor(blk(il, "attn_qkv.weight"), true, 2, {E, C});
        L.wqkv_gate = load_tensor(blk(il, "attn_gate.weight"), true, 2, {E, h.ssm_d_inner});
        L.ssm_conv1d = load_tensor(blk(il, "ssm_conv1d.weight"), true, 2, {K, C});
        L.ssm_dt_b = load_tensor(blk(il, "ssm_dt.bias"), true, 1, {Hv});
        L.ssm_a = load_tensor(blk(il, "ssm_a"), true, 1, {Hv});
        L.ssm_ba = load_tensor(blk(il, "ssm_ba.weight"), false, 2, {E, 2 * Hv});
        if (!L.ssm_ba) {
            L.ssm_beta = load_tensor(blk(il, "ssm_beta.weight"), true, 2, {E, Hv});
            L.ssm_alpha = load_tensor(blk(il, "ssm_alpha.weight"), true, 2, {E, Hv});
        }
        L.ssm_norm = load_tensor(blk(il, "ssm_norm.weight"), true, 1, {h.ssm_d_inner / Hv});
        L.ssm_out = load_tensor(blk(il, "ssm_out.weight"), true, 2, {h.ssm_d_inner, E});
    }
    for (ggml_tensor * t : {L.sc_conv, L.ssm_conv1d, L.ssm_conv1d_b, L.ssm_dt_b, L.ssm_a, L.ssm_d, L.ssm_norm})
        if (t && t->type != GGML_TYPE_F32)
            throw FormatError(path_ + ": tensor '" + ggml_get_name(t) + "' must be F32, it is " +
                              ggml_type_name(t->type));
}

// KDA weights (shapes: mixer_recurrent.cpp), as llama.cpp's kimi-linear loader takes them: conv kernels {K, 1, C, 1}
// (or with the trailing 1s dropped), A {1, H} or {1, H, 1, 1}; kernels, A, dt and the norm F32.
void Model::load_kda(int il, Layer & L) {
    const HParams & h = hp_;
    const int64_t E = h.n_embd, K = h.ssm_conv_kernel, S = h.ssm_d_state, H = h.ssm_dt_rank, C = S * H;
    L.wq = load_tensor(blk(il, "attn_q.weight"), true, 2, {E, C});
    L.wk = load_tensor(blk(il, "attn_k.weight"), true, 2, {E, C});
    L.wv = load_tensor(blk(il, "attn_v.weight"), true, 2, {E, C});
    L.wo = load_tensor(blk(il, "attn_output.weight"), true, 2, {C, E});
    auto conv = [&](const char * name) { // ne {K, 1, C, 1}, {K, 1, C} or {K, C}
        const TensorInfo * t = idx_->find(blk(il, name));
        const bool two = t && t->n_dims == 2;
        return two ? load_tensor(blk(il, name), true, 2, {K, C}) : load_tensor(blk(il, name), true, 4, {K, 1, C, 1});
    };
    L.ssm_conv_q = conv("ssm_conv1d_q.weight");
    L.ssm_conv_k = conv("ssm_conv1d_k.weight");
    L.ssm_conv_v = conv("ssm_conv1d_v.weight");
    L.ssm_f_b = load_tensor(blk(il, "ssm_f_b.weight"), false, 2, {S, C});
    L.ssm_f_a = load_tensor(blk(il, "ssm_f_a.weight"), true, 2, {E, L.ssm_f_b ? S : C}); // full rank without f_b
    L.ssm_g_b = load_tensor(blk(il, "ssm_g_b.weight"), false, 2, {S, C});
    L.ssm_g_a = load_tensor(blk(il, "ssm_g_a.weight"), true, 2, {E, L.ssm_g_b ? S : C});
    L.ssm_beta = load_tensor(blk(il, "ssm_beta.weight"), true, 2, {E, H});
    const TensorInfo * a = idx_->find(blk(il, "ssm_a")); // ne {1, H} (kimi-linear) or {H} (glm5-next)
    L.ssm_a = a && a->n_dims == 1 ? load_tensor(blk(il, "ssm_a"), true, 1, {H})
                                  : load_tensor(blk(il, "ssm_a"), true, 4, {1, H, 1, 1});
    L.ssm_dt_b = load_tensor(blk(il, "ssm_dt.bias"), true, 1, {C});
    L.ssm_norm = load_tensor(blk(il, "ssm_norm.weight"), true, 1, {S});
    for (ggml_tensor * t : {L.ssm_conv_q, L.ssm_conv_k, L.ssm_conv_v, L.ssm_a, L.ssm_dt_b, L.ssm_norm})
        if (t->type != GGML_TYPE_F32)
            throw FormatError(path_ + ": tensor '" + ggml_get_name(t) + "' must be F32, it is " +
                              ggml_type_name(t->type));
}

// An F32 vector tensor read to the host (router selection bias, per-expert scales).
std::vector<float> Model::read_f32(const TensorInfo & t, int64_t n) {
    if (t.type != GGML_TYPE_F32 || t.ne[0] != n || t.nbytes != (uint64_t) n * sizeof(float))
        throw FormatError(path_ + ": tensor '" + t.name + "' must be F32 [" + std::to_string(n) + "]");
    std::vector<float> v((size_t) n);
    FileSet(*idx_).read(t, v.data());
    return v;
}

// The three routed-expert matrices of MoE layer il in a GGUF (the model or its stand-ins' side file): gate and up
// separate, or llama.cpp's fused gate_up read as its two halves; shapes checked against n_embd and n_expert.
Model::ExpertTensors Model::expert_tensors(const GGUFIndex & idx, int il, int64_t E) const {
    const HParams & h = hp_;
    const std::string & file = idx.path;
    auto find_exps = [&](const char * name) -> const TensorInfo * {
        const TensorInfo * t = idx.find(blk(il, name));
        if (t && (t->n_dims != 3 || t->ne[2] != h.n_expert))
            throw FormatError(file + ": tensor '" + t->name + "' has shape [" + std::to_string(t->ne[0]) + ", " +
                              std::to_string(t->ne[1]) + ", " + std::to_string(t->ne[2]) +
                              "], expected 3 dims with ne[2] = " + std::to_string(h.n_expert) + " experts");
        return t;
    };
    const TensorInfo * d = find_exps("ffn_down_exps.weight");
    if (!d)
        throw FormatError(file + ": missing tensor '" + blk(il, "ffn_down_exps.weight") + "' (layer " +
                          std::to_string(il) + " should be a MoE layer)");
    const int64_t n_ff = d->ne[0];
    TensorInfo g, u;
    const int64_t ne = h.n_embd_exp(); // the experts' width: n_embd, or latent MoE's L
    const bool gated = h.act != ACT_RELU_SQR;
    if (!gated) { // ReLU² experts: up and down only (Nemotron-H)
        const TensorInfo * ut = find_exps("ffn_up_exps.weight");
        if (!ut)
            throw FormatError(file + ": missing tensor '" + blk(il, "ffn_up_exps.weight") + "' (layer " +
                              std::to_string(il) + " should be a MoE layer)");
        if (idx.find(blk(il, "ffn_gate_exps.weight")) || idx.find(blk(il, "ffn_gate_up_exps.weight")))
            throw FormatError(file + ": tensor '" + blk(il, "ffn_gate_exps.weight") + "': architecture '" + h.arch +
                              "' has experts without a gate (ReLU²)");
        g = u = *ut;
    } else if (const TensorInfo * gu = find_exps("ffn_gate_up_exps.weight")) {
        // fused [n_embd, 2 n_ff, n_expert]: expert e's gate rows then its up rows, one contiguous block;
        // the cache reads the two halves (stride = the whole block) into its gate and up arenas
        if (gu->ne[0] != ne || gu->ne[1] != 2 * n_ff || (gu->nb2() % 2) != 0 || ggml_blck_size(gu->type) > ne)
            throw FormatError(file + ": tensor '" + gu->name + "' must be [" + std::to_string(ne) + ", " +
                              std::to_string(2 * n_ff) + ", " + std::to_string(h.n_expert) + "]");
        g = u = *gu;
        g.ne[1] = u.ne[1] = n_ff;
        g.stride2 = u.stride2 = gu->nb2();
        g.nbytes = u.nbytes = gu->nbytes / 2; // nb2() = half an expert block
        u.offset = gu->offset + gu->nb2() / 2;
    } else {
        const TensorInfo * gt = find_exps("ffn_gate_exps.weight");
        const TensorInfo * ut = find_exps("ffn_up_exps.weight");
        if (!gt || !ut)
            throw FormatError(file + ": missing tensor '" +
                              blk(il, gt ? "ffn_up_exps.weight" : "ffn_gate_exps.weight") + "' (layer " +
                              std::to_string(il) + " should be a MoE layer)");
        g = *gt;
        u = *ut;
    }
    for (const TensorInfo * t : {&g, &u})
        if (t->ne[0] != ne || t->ne[1] != n_ff)
            throw FormatError(file + ": tensor '" + t->name + "' has shape [" + std::to_string(t->ne[0]) + ", " +
                              std::to_string(t->ne[1]) + ", " + std::to_string(t->ne[2]) + "], expected [" +
                              std::to_string(ne) + ", " + std::to_string(n_ff) + ", " + std::to_string(h.n_expert) +
                              "]");
    if (d->ne[1] != ne)
        throw FormatError(file + ": tensor '" + d->name + "' has ne[1] = " + std::to_string(d->ne[1]) + ", expected " +
                          std::to_string(ne));
    (void) E;
    return {g, u, *d, gated};
}

// FFN block of layer il: norms (pre, post, Gemma-4's sandwich set), a dense MLP (dense layers, or Gemma-4's
// MLP in parallel with the experts), and for MoE layers the router, the experts (described to the cache:
// separate gate/up or llama.cpp's fused gate_up, read as its two halves) and the shared expert.
void Model::load_ffn(int il, Layer & L) {
    const HParams & h = hp_;
    const LayerPlan & p = h.plan[il];
    const int64_t E = h.n_embd;
    if (p.ffn == FFN_NONE) return; // a mixer-only block (Nemotron-H)
    L.attn_post_norm = load_tensor(blk(il, "post_attention_norm.weight"), false, 1, {E});
    L.ffn_norm = p.mixer == MIXER_NONE ? L.attn_norm : load_tensor(blk(il, "ffn_norm.weight"), false, 1, {E});
    if (p.mixer == MIXER_NONE) L.ffn_norm_b = L.attn_norm_b; // an FFN-only block: its one norm
    if (!L.ffn_norm) {
        L.ffn_norm = L.attn_post_norm;
        L.attn_post_norm = nullptr;
    } // llama.cpp's alias
    // parallel blocks: the FFN reads attn_norm's output; gated hyper-connections: their grouped norm is the FFN's norm
    if (!L.ffn_norm && !h.parallel_residual && h.hc_kind != HC_GATED)
        throw FormatError(path_ + ": missing tensor '" + blk(il, "ffn_norm.weight") + "'");
    if (p.mixer != MIXER_NONE) L.ffn_norm_b = load_tensor(blk(il, "ffn_norm.bias"), false, 1, {E});
    L.ffn_post_norm = load_tensor(blk(il, "post_ffw_norm.weight"), false, 1, {E});
    L.out_scale = load_tensor(blk(il, "layer_output_scale.weight"), false, 1, {1});
    const bool gated = h.act != ACT_RELU_SQR; // ReLU² FFNs have up and down only
    const bool has_dense = idx_->find(blk(il, gated ? "ffn_gate.weight" : "ffn_up.weight")) != nullptr;
    L.moe = p.ffn == FFN_MOE;
    if (!L.moe || has_dense) {
        L.ffn_up = load_tensor(blk(il, "ffn_up.weight"), true, 2, {E});
        L.ffn_gate = gated ? load_tensor(blk(il, "ffn_gate.weight"), true, 2, {E, L.ffn_up->ne[1]}) : nullptr;
        L.ffn_down = load_tensor(blk(il, "ffn_down.weight"), true, 2, {L.ffn_up->ne[1], E});
    }
    if (!L.moe) return;
    L.ffn_exp_norm = load_tensor(blk(il, "pre_ffw_norm_2.weight"), false, 1, {E});
    L.ffn_post_norm_dense = load_tensor(blk(il, "post_ffw_norm_1.weight"), false, 1, {E});
    L.ffn_post_norm_exp = load_tensor(blk(il, "post_ffw_norm_2.weight"), false, 1, {E});

    const ExpertTensors x = expert_tensors(*idx_, il, E);
    const int64_t n_ff = x.down.ne[0];
    cache_->add_layer(il, x.gated ? &x.gate : nullptr, x.up, x.down);
    if (tier2_) tier2_->add_layer(il, x.gated ? &x.gate : nullptr, x.up, x.down);
    if (standin_) { // the side file: the same experts, other bytes
        const ExpertTensors sx = expert_tensors(*standin_idx_, il, E);
        const TensorInfo * pairs[3][2] = {{&x.gate, &sx.gate}, {&x.up, &sx.up}, {&x.down, &sx.down}};
        for (auto & pr : pairs)
            if (pr[0]->ne[0] != pr[1]->ne[0] || pr[0]->ne[1] != pr[1]->ne[1])
                throw FormatError(opt_.standin_path + ": stand-in '" + pr[1]->name +
                                  "' has another shape than the "
                                  "model's (made for another model?)");
        standin_->add_layer(il, sx.gated ? &sx.gate : nullptr, sx.up, sx.down);
    }
    if (h.moe_latent > 0) { // latent MoE: dense, resident projections around the experts
        L.ffn_latent_down = load_tensor(blk(il, "ffn_latent_down.weight"), true, 2, {E, h.moe_latent});
        L.ffn_latent_up = load_tensor(blk(il, "ffn_latent_up.weight"), true, 2, {h.moe_latent, E});
    }
    L.gate_inp = load_tensor(blk(il, "ffn_gate_inp.weight"), true, 2, {E, h.n_expert});
    L.gate_inp_b = load_tensor(blk(il, "ffn_gate_inp.bias"), false, 1, {h.n_expert});
    L.gate_inp_s = load_tensor(blk(il, "ffn_gate_inp.scale"), false, 1, {E});
    L.gate_exps_b = load_tensor(blk(il, "ffn_gate_exps.bias"), false, 2, {n_ff, h.n_expert});
    L.up_exps_b = load_tensor(blk(il, "ffn_up_exps.bias"), false, 2, {n_ff, h.n_expert});
    L.down_exps_b = load_tensor(blk(il, "ffn_down_exps.bias"), false, 2, {E, h.n_expert});
    L.up_shexp = load_tensor(blk(il, "ffn_up_shexp.weight"), false, 2, {E});
    if (L.up_shexp) {
        L.gate_shexp = gated ? load_tensor(blk(il, "ffn_gate_shexp.weight"), true, 2, {E, L.up_shexp->ne[1]}) : nullptr;
        L.down_shexp = load_tensor(blk(il, "ffn_down_shexp.weight"), true, 2, {L.up_shexp->ne[1], E});
        L.gate_inp_shexp = load_tensor(blk(il, "ffn_gate_inp_shexp.weight"), false, 2, {E});
    }
    const TensorInfo * pb = idx_->find(blk(il, "exp_probs_b.bias"));
    if (!pb) pb = idx_->find(blk(il, "exp_probs_b")); // llama.cpp's hy_v3 name (no suffix)
    if (pb) L.exp_probs_b = read_f32(*pb, h.n_expert);
    if (const TensorInfo * es = idx_->find(blk(il, "ffn_down_exps.scale"))) L.exp_scale = read_f32(*es, h.n_expert);
}

void Model::alloc_kv() {
    const HParams & h = hp_;
    ggml_init_params ip = {ggml_tensor_overhead() * (3 * h.n_blocks() + 10), nullptr, true};
    ctx_kv_ = ggml_init(ip);
    bool shared_indexer = false;
    bool any_recurrent = false;
    for (int il = 0; il < h.n_blocks(); ++il) { // the MTP block keeps its own KV
        // per layer: [n_head_kv * head_k] rows of K; V transposed. MLA caches the compressed latent:
        // K = [kv_lora + rope] per token (one shared head), V = the latent part
        const LayerPlan & p = h.plan[il];
        if (is_recurrent(p.mixer)) {
            any_recurrent = true;
            continue;
        }
        if (p.mixer == MIXER_NONE) continue; // an FFN-only block
        const bool mla = p.mixer == MIXER_MLA;
        const int64_t k_row = mla ? h.kv_lora_rank + p.n_rot : (int64_t) p.n_head_kv * p.head_k;
        const int64_t v_row = mla ? h.kv_lora_rank : (int64_t) p.n_head_kv * p.head_v;
        layers_[il].k_cache = ggml_new_tensor_2d(ctx_kv_, opt_.kv_type, k_row, opt_.n_ctx);
        layers_[il].v_cache = opt_.flash_attn ? ggml_new_tensor_2d(ctx_kv_, opt_.kv_type, v_row, opt_.n_ctx)
                                              : ggml_new_tensor_2d(ctx_kv_, opt_.kv_type, opt_.n_ctx, v_row);
        if (p.indexer == INDEXER_QSA) // QSA: the indexer's raw keys, one head per position (pooled per block later)
            layers_[il].idx_k_cache = ggml_new_tensor_2d(ctx_kv_, opt_.kv_type, h.indexer_head_size, opt_.n_ctx);
        if (p.indexer == INDEXER_FULL) // DSA: the indexer's roped keys, one head per position
            layers_[il].idx_k_cache = ggml_new_tensor_2d(ctx_kv_, opt_.kv_type, h.indexer_head_size, opt_.n_ctx);
        if (p.indexer == INDEXER_KPOOL) // KPool: a position's normed key and its pooling gate logits
            layers_[il].idx_k_cache = ggml_new_tensor_2d(ctx_kv_, opt_.kv_type, 2 * h.indexer_head_size, opt_.n_ctx);
        if (p.indexer == INDEXER_QSA || p.indexer == INDEXER_KPOOL) // their complete pools' keys, F32
            layers_[il].idx_pool_cache =
                ggml_new_tensor_2d(ctx_kv_, GGML_TYPE_F32, h.indexer_head_size, std::max(1, opt_.n_ctx / p.compress));
        shared_indexer = shared_indexer || p.indexer == INDEXER_SHARED;
    }
    const int U = opt_.n_ubatch;
    x_ = ggml_new_tensor_2d(ctx_kv_, GGML_TYPE_F32, h.n_embd_res(), U); // the residual stream (all hc streams)
    ffn_inp_ = ggml_new_tensor_2d(ctx_kv_, GGML_TYPE_F32, h.n_embd_res(), U);
    if (h.hc_mult) hc_post_ = ggml_new_tensor_2d(ctx_kv_, GGML_TYPE_F32, h.n_hc_post(), U);
    ffn_in_ = ggml_new_tensor_2d(ctx_kv_, GGML_TYPE_F32, h.n_embd, U);
    ffn_xe_ = h.moe_latent > 0 ? ggml_new_tensor_2d(ctx_kv_, GGML_TYPE_F32, h.moe_latent, U) : ffn_in_;
    router_ = ggml_new_tensor_2d(ctx_kv_, GGML_TYPE_F32, std::max(h.n_expert, 1), U);
    for (auto *& la : lookahead_) la = ggml_new_tensor_2d(ctx_kv_, GGML_TYPE_F32, std::max(h.n_expert, 1), U);
    ebuf_ = ggml_new_tensor_2d(ctx_kv_, GGML_TYPE_F32, h.n_embd_exp(), (int64_t) std::max(h.n_expert_used, 1) * U);
    if (shared_indexer) dsa_topk_ = ggml_new_tensor_2d(ctx_kv_, GGML_TYPE_I32, h.indexer_top_k, U);
    buf_kv_ = ggml_backend_alloc_ctx_tensors(ctx_kv_, backend_);
    if (!buf_kv_) throw BudgetError("cannot allocate the KV cache");
    advise_huge_pages(buf_kv_);
    kv_bytes_ = ggml_backend_buffer_get_size(buf_kv_);
    if (!any_recurrent) return;
    // recurrent state, one sequence: conv [K - 1, channels] (+ DeltaNet [S_v, S_v, H_v]) per recurrent layer
    ggml_init_params rp = {ggml_tensor_overhead() * (2 * h.n_layer + 4), nullptr, true};
    ctx_rs_ = ggml_init(rp);
    for (int il = 0; il < h.n_layer; ++il) {
        Layer & L = layers_[il];
        if (h.plan[il].mixer == MIXER_SHORTCONV) {
            L.conv_state = ggml_new_tensor_2d(ctx_rs_, GGML_TYPE_F32, h.ssm_conv_kernel - 1, h.n_embd);
        } else if (h.plan[il].mixer == MIXER_DELTANET) {
            const int64_t C = 2 * (int64_t) h.ssm_n_group * h.ssm_d_state + h.ssm_d_inner,
                          dv = h.ssm_d_inner / h.ssm_dt_rank;
            L.conv_state = ggml_new_tensor_2d(ctx_rs_, GGML_TYPE_F32, h.ssm_conv_kernel - 1, C);
            L.ssm_state = ggml_new_tensor_3d(ctx_rs_, GGML_TYPE_F32, dv, dv, h.ssm_dt_rank);
        } else if (h.plan[il].mixer == MIXER_KDA) { // conv over [q | k | v], state [S, S, H]
            L.conv_state =
                ggml_new_tensor_2d(ctx_rs_, GGML_TYPE_F32, h.ssm_conv_kernel - 1, 3 * (int64_t) h.ssm_d_inner);
            L.ssm_state = ggml_new_tensor_3d(ctx_rs_, GGML_TYPE_F32, h.ssm_d_state, h.ssm_d_state, h.ssm_dt_rank);
        } else if (h.plan[il].mixer == MIXER_MAMBA2) {
            const int64_t C = h.ssm_d_inner + 2 * (int64_t) h.ssm_n_group * h.ssm_d_state;
            L.conv_state = ggml_new_tensor_2d(ctx_rs_, GGML_TYPE_F32, h.ssm_conv_kernel - 1, C);
            L.ssm_state =
                ggml_new_tensor_3d(ctx_rs_, GGML_TYPE_F32, h.ssm_d_state, h.ssm_d_inner / h.ssm_dt_rank, h.ssm_dt_rank);
        }
    }
    if (h.ple_layer >= 0) { // PLE: the dilated conv's last (K - 1) x ngram inputs, the last ngram - 1 token ids
        Layer & L = layers_[h.ple_layer];
        L.ple_conv_state =
            ggml_new_tensor_2d(ctx_rs_, GGML_TYPE_F32, (int64_t) (h.ple_conv_kernel - 1) * h.ple_ngram, h.n_embd_res());
        L.ple_hist = ggml_new_tensor_1d(ctx_rs_, GGML_TYPE_I32, h.ple_ngram - 1);
    }
    buf_rs_ = ggml_backend_alloc_ctx_tensors(ctx_rs_, backend_);
    if (!buf_rs_) throw BudgetError("cannot allocate the recurrent state");
    ggml_backend_buffer_clear(buf_rs_, 0);
}

// The graph allocator grows its buffer to each graph larger than the last, and every growth is a new buffer
// whose pages fault in again: a Qwen-shaped model's first 512-token prompt faulted ~0.5 GB for a 70 MiB scratch
// (~10 % of that prompt's time). Sized once here to the planner's bound, it does not grow (a graph larger still
// would grow it as before); the allocation is virtual until graphs touch it, and advised onto huge pages. A graph
// of one leaf that size, placed at the buffer's start, sizes it and gives its address.
void Model::reserve_scratch(size_t bytes) {
    ggml_init_params ip = {ggml_tensor_overhead() * 4 + ggml_graph_overhead_custom(4, false), nullptr, true};
    ggml_context * ctx = ggml_init(ip);
    ggml_cgraph * gf = ggml_new_graph_custom(ctx, 4, false);
    ggml_tensor * t = ggml_new_tensor_1d(ctx, GGML_TYPE_I8, (int64_t) bytes);
    ggml_set_input(t);
    ggml_build_forward_expand(gf, ggml_view_1d(ctx, t, 1, 0));
    if (ggml_gallocr_alloc_graph(galloc_, gf) && t->data) advise_huge_pages(t->data, bytes);
    ggml_free(ctx);
}

size_t Model::scratch_bytes() const { return galloc_ ? ggml_gallocr_get_buffer_size(galloc_, 0) : 0; }

// ---------------------------------------------------------------------------------------------------------
// graph helpers

ggml_context * Model::begin_graph() {
    gin_ = GraphInputs{};
    ggml_init_params ip = {graph_mem_.size(), graph_mem_.data(), true};
    return ggml_init(ip);
}

ggml_tensor * Model::pos_input(ggml_context * ctx, int T) {
    if (!gin_.pos) {
        gin_.pos = ggml_new_tensor_1d(ctx, GGML_TYPE_I32, T);
        ggml_set_input(gin_.pos);
        ggml_set_name(gin_.pos, "pos");
    }
    return gin_.pos;
}

ggml_tensor * Model::mask_input(ggml_context * ctx, int kind, int n_kv, int T) {
    ggml_tensor *& m = gin_.mask[kind];
    if (!m) {
        m = ggml_new_tensor_2d(ctx, opt_.flash_attn ? GGML_TYPE_F16 : GGML_TYPE_F32, n_kv, T);
        ggml_set_input(m);
        ggml_set_name(m, kind == MASK_SWA ? "mask_swa" : kind == MASK_CHUNKED ? "mask_chunk" : "mask");
    }
    return m;
}

ggml_tensor * Model::mask_f32_input(ggml_context * ctx, int n_kv, int T) {
    if (!gin_.mask_f32) {
        gin_.mask_f32 = ggml_new_tensor_2d(ctx, GGML_TYPE_F32, n_kv, T);
        ggml_set_input(gin_.mask_f32);
        ggml_set_name(gin_.mask_f32, "mask_dsa");
    }
    return gin_.mask_f32;
}

ggml_tensor * Model::qsa_pos_input(ggml_context * ctx, int n) {
    if (!gin_.qsa_pos) {
        gin_.qsa_pos = ggml_new_tensor_1d(ctx, GGML_TYPE_I32, n);
        ggml_set_input(gin_.qsa_pos);
        ggml_set_name(gin_.qsa_pos, "qsa_pos");
    }
    return gin_.qsa_pos;
}

void Model::qsa_inputs(ggml_context * ctx, int n_blk, int T, ggml_tensor ** tail, ggml_tensor ** complete) {
    if (!gin_.qsa_tail) {
        gin_.qsa_tail = ggml_new_tensor_2d(ctx, GGML_TYPE_F32, n_blk, T);
        gin_.qsa_complete = ggml_new_tensor_2d(ctx, GGML_TYPE_F32, n_blk, T);
        ggml_set_input(gin_.qsa_tail);
        ggml_set_input(gin_.qsa_complete);
    }
    *tail = gin_.qsa_tail;
    *complete = gin_.qsa_complete;
}

ggml_tensor * Model::attn_temp_input(ggml_context * ctx, int T) {
    if (!gin_.attn_temp) {
        gin_.attn_temp = ggml_new_tensor_3d(ctx, GGML_TYPE_F32, 1, 1, T);
        ggml_set_input(gin_.attn_temp);
        ggml_set_name(gin_.attn_temp, "attn_temp");
    }
    return gin_.attn_temp;
}

// The host data of the shared inputs this graph uses (build_masks() made them for the ubatch). A NoPE-only graph
// leaves pos unallocated.
void Model::set_graph_inputs() {
    const std::vector<float> * masks[3] = {&mask_, &mask_swa_, &mask_chunk_};
    for (int k = 0; k < 3; ++k) {
        ggml_tensor * t = gin_.mask[k];
        if (!t) continue;
        if (t->type == GGML_TYPE_F16)
            set_input(t, mask16_[k].data(), ggml_nbytes(t)); // flash attention's masks
        else
            set_input(t, masks[k]->data(), ggml_nbytes(t));
    }
    if (gin_.attn_temp) set_input(gin_.attn_temp, attn_temp_.data(), ggml_nbytes(gin_.attn_temp));
    if (gin_.mask_f32) set_input(gin_.mask_f32, mask_dsa_.data(), ggml_nbytes(gin_.mask_f32));
    if (gin_.pos && gin_.pos->buffer) set_input(gin_.pos, pos_.data(), ggml_nbytes(gin_.pos));
    if (gin_.ple_emb && gin_.ple_emb->buffer) set_input(gin_.ple_emb, ple_rows_.data(), ggml_nbytes(gin_.ple_emb));
    if (gin_.qsa_pos && gin_.qsa_pos->buffer) set_input(gin_.qsa_pos, qsa_pos_.data(), ggml_nbytes(gin_.qsa_pos));
    // (a KPool layer sharing the selection reads only the tail input: the other is in no graph then)
    if (gin_.qsa_tail && gin_.qsa_tail->buffer) set_input(gin_.qsa_tail, qsa_tail_.data(), ggml_nbytes(gin_.qsa_tail));
    if (gin_.qsa_complete && gin_.qsa_complete->buffer)
        set_input(gin_.qsa_complete, qsa_complete_.data(), ggml_nbytes(gin_.qsa_complete));
}

ggml_tensor * Model::rows_of(ggml_context * ctx, ggml_tensor * t, int t0, int T) {
    return ggml_view_2d(ctx, t, t->ne[0], T, t->nb[1], (size_t) t0 * t->nb[1]);
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

// A block output y joins the residual stream h: (post norm) -> * residual_scale (Granite) -> + h, and at the
// end of the layer * layer_output_scale (Gemma-4).
ggml_tensor * Model::residual_out(ggml_context * ctx, int il, ggml_tensor * y, ggml_tensor * h, ggml_tensor * post_norm,
                                  bool layer_end, ggml_tensor * hc_w) {
    if (post_norm) y = norm(ctx, y, post_norm, nullptr);
    if (hp_.residual_scale != 1.f) y = ggml_scale(ctx, y, hp_.residual_scale);
    ggml_tensor * out = hc_w ? hc_post(ctx, h, y, hc_w) : ggml_add(ctx, y, h);
    if (layer_end && layers_[il].out_scale) out = ggml_mul(ctx, out, layers_[il].out_scale);
    return out;
}

void Model::run_embed(const int32_t * tokens, int T) {
    ggml_context * ctx = begin_graph();
    ggml_cgraph * gf = ggml_new_graph_custom(ctx, kMaxNodes, false);
    ggml_tensor * inp = ggml_new_tensor_1d(ctx, GGML_TYPE_I32, T);
    ggml_set_input(inp);
    ggml_tensor * x = ggml_get_rows(ctx, tok_embd_, inp); // [n_embd, T]
    if (hp_.embd_scale != 1.f) x = ggml_scale(ctx, x, hp_.embd_scale);
    ggml_build_forward_expand(gf, ggml_cpy(ctx, hc_streams(ctx, x), rows_of(ctx, x_, 0, T)));
    compute(ctx, gf, galloc_);
    set_input(inp, tokens, T * sizeof(int32_t));
    ggml_backend_graph_compute(backend_, gf);
    ggml_free(ctx);
}

// Host inputs of the graphs of one ubatch: the masks the layers use (causal, sliding window, chunk) and
// Llama-4's attention temperature. mask [n_kv, T]: 0 where token t sees position j, -inf elsewhere.
void Model::build_masks(int T) {
    const HParams & h = hp_;
    const int n_kv = n_past_ + T;
    bool want[3] = {false, false, false}, temp = false, dsa = false;
    for (const LayerPlan & p : h.plan) {
        want[p.mask] = true;
        temp = temp || p.attn_temp;
        dsa = dsa || p.indexer != INDEXER_NONE;
    }
    // flash attention takes F16 masks, the plain path F32: one copy per kind, in the type its graphs read
    std::vector<float> * masks[3] = {&mask_, &mask_swa_, &mask_chunk_};
    auto fill = [&](int kind, auto visible) {
        auto build = [&](auto & m, auto neg, auto zero) {
            m.assign((size_t) n_kv * T, neg);
            for (int t = 0; t < T; ++t)
                for (int j = 0; j <= pos_[t]; ++j)
                    if (visible(pos_[t], j)) m[(size_t) t * n_kv + j] = zero;
        };
        if (opt_.flash_attn)
            build(mask16_[kind], ggml_fp32_to_fp16(-INFINITY), ggml_fp32_to_fp16(0.f));
        else
            build(*masks[kind], -INFINITY, 0.f);
    };
    if (want[MASK_CAUSAL]) fill(MASK_CAUSAL, [](int, int) { return true; });
    for (const LayerPlan & p : h.plan)
        if (p.indexer == INDEXER_QSA || p.indexer == INDEXER_KPOOL) qsa_r_ = p.compress; // one pool size a model
    if (qsa_r_ > 0) { // the first positions of the pools this ubatch completes (their keys are cached then)
        qsa_pos_.clear();
        for (int b = n_past_ / qsa_r_; b < n_kv / qsa_r_; ++b) qsa_pos_.push_back(b * qsa_r_);
    }
    const bool qsa = qsa_r_ > 0 && n_kv / qsa_r_ > h.indexer_top_k / qsa_r_; // some token sees more blocks than kept
    if (qsa) {
        const int n_blk = n_kv / qsa_r_;
        qsa_tail_.assign((size_t) n_blk * T, -INFINITY);
        qsa_complete_.assign((size_t) n_blk * T, 0.f);
        for (int t = 0; t < T; ++t)
            for (int b = (pos_[t] + 1) / qsa_r_; b < n_blk; ++b) { // blocks not complete at token t
                qsa_tail_[(size_t) t * n_blk + b] = 0.f;
                qsa_complete_[(size_t) t * n_blk + b] = -INFINITY;
            }
    }
    if ((dsa && n_kv > h.indexer_top_k) || qsa) { // the indexer's scores / selection take the causal mask in F32
        mask_dsa_.assign((size_t) n_kv * T, -INFINITY);
        for (int t = 0; t < T; ++t)
            for (int j = 0; j <= pos_[t]; ++j) mask_dsa_[(size_t) t * n_kv + j] = 0.f;
    }
    if (want[MASK_SWA]) fill(MASK_SWA, [&](int i, int j) { return h.n_swa <= 0 || i - j < h.n_swa; });
    if (want[MASK_CHUNKED])
        fill(MASK_CHUNKED, [&](int i, int j) { return h.n_chunk <= 0 || i / h.n_chunk == j / h.n_chunk; });
    if (temp) { // llama.cpp: 1 + s * log(floor((pos + offset) / f) + 1)
        attn_temp_.resize(T);
        for (int t = 0; t < T; ++t)
            attn_temp_[t] = 1.f + h.attn_temp_scale *
                                      std::log(std::floor((pos_[t] + h.attn_temp_offset) / h.attn_temp_floor) + 1.f);
    }
}

// Layer il on the residual stream x [n_embd, T]: the mixer, the residual, and the FFN front. A dense layer's
// output is returned; a MoE layer returns nullptr and leaves h = x + mixer (f.res), the experts' input (f.hn) and the
// router logits (f.logits) for the routing and the experts.
ggml_tensor * Model::layer_front(ggml_context * ctx, ggml_cgraph * gf, int il, ggml_tensor * x, int T, MoeFront & f) {
    Layer & L = layers_[il];
    const LayerPlan & p = hp_.plan[il];
    const bool hc = hp_.hc_mult > 0; // x: the hyper-connection streams; each sublayer reads their mixture
    if (il == hp_.ple_layer) x = ple_block(ctx, gf, il, x, T); // Qwen4-Exp: n-gram embeddings into every stream
    ggml_tensor *res = x, *xn = nullptr, *post = nullptr;      // an FFN-only block: h = x
    if (p.mixer != MIXER_NONE) {
        ggml_tensor * cur = hc ? hc_pre(ctx, L.hc_attn, x, &post) : x;
        // [n_embd, T]; gated hyper-connections: their mixture is normed already (no attn_norm)
        cur = xn = L.attn_norm ? norm(ctx, cur, L.attn_norm, L.attn_norm_b) : cur;
        switch (p.mixer) {
        case MIXER_MLA: cur = mixer_mla(ctx, gf, il, cur, pos_input(ctx, T), T); break;
        case MIXER_SHORTCONV: cur = mixer_shortconv(ctx, gf, il, cur, T); break;
        case MIXER_DELTANET: cur = mixer_deltanet(ctx, gf, il, cur, T); break;
        case MIXER_MAMBA2: cur = mixer_mamba2(ctx, gf, il, cur, T); break;
        case MIXER_KDA: cur = mixer_kda(ctx, gf, il, cur, T); break;
        default: cur = mixer_attention(ctx, gf, il, cur, pos_input(ctx, T), T);
        }
        res = residual_out(ctx, il, cur, x, L.attn_post_norm, p.ffn == FFN_NONE, post); // h = x + attn
    }
    if (p.ffn == FFN_NONE) return res;                               // a mixer-only block
    ggml_tensor * in = hc ? hc_pre(ctx, L.hc_ffn, res, &post) : res; // the FFN's input [n_embd, T]
    const bool par = hp_.parallel_residual && xn; // Command-R: the FFN reads the mixer's input, x + attn + ffn(xn)
    if (!L.moe)
        return residual_out(
            ctx, il, par ? ffn(ctx, xn, L.ffn_gate, L.ffn_up, L.ffn_down, p.clamp_shexp) : dense_block(ctx, il, in),
            res, L.ffn_post_norm, true, hc ? post : nullptr);
    f.res = res;
    f.in = in;
    f.post = hc ? post : nullptr;
    f.hn = par ? xn : expert_input(ctx, il, in);                              // [n_embd, T]
    f.logits = router_logits(ctx, il, in, f.hn);                              // [n_expert, T]
    f.xe = L.ffn_latent_down ? dense_mm(ctx, L.ffn_latent_down, f.hn) : f.hn; // [n_embd_exp, T]
    return nullptr;
}

// Graph A of layer il: layer_front over the residual stream x_. A dense layer ends here (x_ updated); a MoE
// layer leaves h (ffn_inp_), the experts' input (ffn_in_) and the router logits (router_, and the next MoE
// layer's lookahead_ when prefetching) for the host and graph B.
void Model::run_layer_front(int il, int T) {
    ggml_context * ctx = begin_graph();
    ggml_cgraph * gf = ggml_new_graph_custom(ctx, kMaxNodes, false);
    ggml_tensor * x = rows_of(ctx, x_, 0, T); // [n_embd, T] residual stream
    MoeFront f;
    if (ggml_tensor * y = layer_front(ctx, gf, il, x, T, f)) {
        ggml_build_forward_expand(gf, ggml_cpy(ctx, y, x));
    } else {
        ggml_build_forward_expand(gf, ggml_cpy(ctx, f.res, rows_of(ctx, ffn_inp_, 0, T)));
        ggml_build_forward_expand(gf, ggml_cpy(ctx, f.hn, rows_of(ctx, ffn_in_, 0, T)));
        if (ffn_xe_ != ffn_in_) ggml_build_forward_expand(gf, ggml_cpy(ctx, f.xe, rows_of(ctx, ffn_xe_, 0, T)));
        if (f.post) ggml_build_forward_expand(gf, ggml_cpy(ctx, f.post, rows_of(ctx, hc_post_, 0, T)));
        ggml_build_forward_expand(gf, ggml_cpy(ctx, f.logits, rows_of(ctx, router_, 0, T)));
        // gate lookahead: the next MoE layers' routers applied to this layer's h (as if the layers between were
        // skipped; with hyper-connections, to the mixture this layer's FFN reads), d = 1 .. lookahead_depth()
        int nl = il;
        for (int d = 0; d < lookahead_depth() && (nl = next_moe(nl)) >= 0; ++d) {
            ggml_tensor * la = router_logits(ctx, nl, f.in, nullptr);
            ggml_build_forward_expand(gf, ggml_cpy(ctx, la, rows_of(ctx, lookahead_[d], 0, T)));
        }
    }
    compute(ctx, gf, galloc_);
    set_graph_inputs();
    if (ggml_tensor * t = ggml_graph_get_tensor(gf, "ssm_ids")) {
        const int32_t row = 0;
        set_input(t, &row, sizeof(row));
    }
    ggml_backend_graph_compute(backend_, gf);
    ggml_free(ctx);
}

int Model::next_moe(int il) const {
    for (int j = il + 1; j < hp_.n_layer; ++j)
        if (layers_[j].moe) return j;
    return -1;
}

int Model::lookahead_depth() const {
    return record_routes ? kMaxLookahead : opt_.prefetch && cache_->async() ? opt_.prefetch_depth : 0;
}

// Weights (or inputs) holding NaN/Inf must not pass silently: the residual stream's last row after the embedding
// and after every layer (NaN spreads to later positions through attention, so the last row catches it), named by
// layer. n_embd floats per layer: negligible next to the layer itself.
bool Model::last_row_finite(int T) const {
    std::vector<float> row(hp_.n_embd);
    ggml_backend_tensor_get(x_, row.data(), (size_t) (T - 1) * x_->nb[1], row.size() * sizeof(float));
    for (float v : row)
        if (!std::isfinite(v)) return false;
    return true;
}

void Model::check_finite(int il, int T) {
    if (!last_row_finite(T))
        throw FormatError(il < 0 ? std::string("the token embeddings (token_embd.weight) hold NaN or Inf values")
                                 : "layer " + std::to_string(il) + " produced NaN or Inf values: the weights of blk." +
                                       std::to_string(il) + ".* (or the layers before it) hold NaN/Inf or overflow");
}

void Model::reset() {
    n_past_ = 0;
    mtp_pending_pos_ = -1;
    mtp_forget_from(0);
    if (buf_rs_) ggml_backend_buffer_clear(buf_rs_, 0);
}

void Model::truncate(int n) {
    if (n >= n_past_) return;
    if (buf_rs_)
        throw std::logic_error("a recurrent state cannot be truncated (position " + std::to_string(n_past_) + " -> " +
                               std::to_string(n) + "): restore a snapshot (load_state) or reset");
    n_past_ = n;
    mtp_forget_from(n);
    // the MTP block's next row needs h of position n - 1: the last ubatch's, when it holds that position
    const int r = n - 1 - mtp_hidden_pos_;
    mtp_pending_pos_ = -1;
    if (hp_.n_mtp && n > 0 && r >= 0 && (size_t) (r + 1) * hp_.n_embd <= mtp_hidden_.size()) {
        mtp_pending_.assign(mtp_hidden_.begin() + (size_t) r * hp_.n_embd,
                            mtp_hidden_.begin() + (size_t) (r + 1) * hp_.n_embd);
        mtp_pending_pos_ = n - 1;
    }
}

std::vector<uint8_t> Model::save_state() const {
    std::vector<uint8_t> out(state_bytes());
    if (buf_rs_) {
        for (ggml_tensor * t = ggml_get_first_tensor(ctx_rs_); t; t = ggml_get_next_tensor(ctx_rs_, t))
            ggml_backend_tensor_get(t, out.data() + ((char *) t->data - (char *) ggml_backend_buffer_get_base(buf_rs_)),
                                    0, ggml_nbytes(t));
    }
    return out;
}

void Model::load_state(const uint8_t * data, size_t n, int n_past) {
    if (n != state_bytes())
        throw std::invalid_argument("state blob of " + std::to_string(n) + " bytes, expected " +
                                    std::to_string(state_bytes()));
    if (n_past < 0 || n_past > n_past_) throw std::invalid_argument("state position beyond the cached context");
    for (ggml_tensor * t = ggml_get_first_tensor(ctx_rs_); t; t = ggml_get_next_tensor(ctx_rs_, t))
        ggml_backend_tensor_set(t, data + ((char *) t->data - (char *) ggml_backend_buffer_get_base(buf_rs_)), 0,
                                ggml_nbytes(t));
    n_past_ = n_past; // KV rows past n_past are overwritten by the next eval
    mtp_pending_pos_ = -1;
    mtp_forget_from(n_past);
}

void Model::reset_stats() {
    cache_->reset_stats();
    if (tier2_) tier2_->reset_stats();
    cpu_experts_.assign(hp_.n_blocks(), 0);
    swaps_.assign(hp_.n_blocks(), 0);
    gemm_experts_.assign(hp_.n_blocks(), 0);
    standin_uses_.assign(hp_.n_blocks(), 0);
    decode_times_ = DecodeTimes{};
    if (standin_) standin_->reset_stats();
}

int Model::output_rows_per_graph() const {
    return (int) std::max<int64_t>(1, kOutputScratch / (4 * ((int64_t) hp_.n_vocab + 2 * hp_.n_embd)));
}

// x [n_embd, rows] -> output norm -> output projection (+ bias, / logit scale, Gemma-4's final softcap) ->
// logits [n_vocab, rows]
ggml_tensor * Model::output_head(ggml_context * ctx, ggml_tensor * x) {
    if (hp_.hc_mult) x = hc_head(ctx, x); // the hyper-connection streams' last mixture (Qwen4-Exp: also the norm)
    return head_logits(ctx, out_norm_ ? norm(ctx, x, out_norm_, out_norm_b_) : x, output_);
}

ggml_tensor * Model::head_logits(ggml_context * ctx, ggml_tensor * xn, ggml_tensor * proj) {
    const HParams & h = hp_;
    ggml_tensor * y = dense_mm(ctx, proj, xn);
    if (output_b_) y = ggml_add(ctx, y, output_b_);
    if (h.logit_scale != 1.f) y = ggml_scale(ctx, y, 1.f / h.logit_scale);
    if (h.final_softcap > 0.f) // Gemma-4: c * tanh(y / c)
        y = ggml_scale(ctx, ggml_tanh(ctx, ggml_scale(ctx, y, 1.f / h.final_softcap)), h.final_softcap);
    return y;
}

// Logits of the last n_out rows of x_ (of T), a block of rows per graph so that the output's scratch stays under
// kOutputScratch whatever the vocabulary (the planner counts that constant): [n_vocab, rows] per graph.
void Model::run_output(int T, int n_out, float * logits) {
    const HParams & h = hp_;
    const int per = output_rows_per_graph();
    for (int r0 = 0; r0 < n_out; r0 += per) {
        const int rows = std::min(per, n_out - r0);
        ggml_context * ctx = begin_graph();
        ggml_cgraph * gf = ggml_new_graph_custom(ctx, kMaxNodes, false);
        ggml_tensor * y = output_head(ctx, rows_of(ctx, x_, T - n_out + r0, rows)); // [n_vocab, rows]
        ggml_set_output(y);
        ggml_build_forward_expand(gf, y);
        compute(ctx, gf, galloc_);
        ggml_backend_graph_compute(backend_, gf);
        float * out = logits + (size_t) r0 * h.n_vocab;
        ggml_backend_tensor_get(y, out, 0, ggml_nbytes(y));
        ggml_free(ctx);
        for (size_t i = 0, n = (size_t) h.n_vocab * rows; i < n; ++i)
            if (!std::isfinite(out[i]))
                throw FormatError("the output layer (output_norm / output.weight) produced NaN or Inf logits");
    }
}

void Model::eval(const int32_t * tokens, int n_tokens, int n_out, float * logits) {
    if (n_tokens != 1) return eval_tokens(tokens, n_tokens, n_out, logits);
    const auto t0 = std::chrono::steady_clock::now();
    const ExpertCache::Times c0 = cache_->times();
    eval_tokens(tokens, n_tokens, n_out, logits);
    const ExpertCache::Times c1 = cache_->times();
    decode_times_.steps++;
    decode_times_.step_s += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    decode_times_.wait_s += c1.wait_s - c0.wait_s;
    decode_times_.book_s += c1.book_s - c0.book_s;
}

void Model::eval_tokens(const int32_t * tokens, int n_tokens, int n_out, float * logits) {
    const HParams & h = hp_;
    if (n_past_ + n_tokens > opt_.n_ctx)
        throw BudgetError("context overflow: " + std::to_string(n_past_ + n_tokens) +
                          " tokens exceed n_ctx = " + std::to_string(opt_.n_ctx));
    for (int i = 0; i < n_tokens; ++i)
        if (tokens[i] < 0 || tokens[i] >= h.n_vocab)
            throw FormatError("token id " + std::to_string(tokens[i]) + " out of range [0, " +
                              std::to_string(h.n_vocab) + ")");
    const int K = h.n_expert_used;
    step_ids.resize(h.n_layer);
    for (int start = 0; start < n_tokens; start += opt_.n_ubatch) {
        const int T = std::min(opt_.n_ubatch, n_tokens - start);
        pos_.resize(T);
        for (int t = 0; t < T; ++t) pos_[t] = n_past_ + t;
        build_masks(T);
        const int out_here = std::max(0, std::min(T, n_out - (n_tokens - start - T)));
        // the rows of logits this ubatch writes: from the first wanted token on
        float * out_rows = out_here ? logits + (size_t) std::max(0, start - (n_tokens - n_out)) * h.n_vocab : nullptr;
        if (fused_ok() && !any_expert_gemm(T) && eval_fused(tokens + start, T, out_here, out_rows)) {
            if (h.n_mtp) run_mtp_lagged(tokens + start, T);
            n_past_ += T;
            continue;
        }
        if (h.ple_layer >= 0) ple_prepare(tokens + start, T); // the ubatch's n-gram rows, read before its layers
        run_embed(tokens + start, T);
        check_finite(-1, T);
        std::vector<int32_t> ids, slots, la_ids;
        std::vector<float> w, la_w, sc;
        for (int il = 0; il < h.n_layer; ++il) {
            if (il == h.ple_layer) ple_wait();
            run_layer_front(il, T);
            if (!layers_[il].moe) {
                check_finite(il, T);
                continue;
            }
            route(il, router_, T, ids, w, record_routes ? &sc : nullptr, true);
            step_ids[il] = ids;
            int nl = il; // the next MoE layers' experts as predicted from this layer's h: nearest first in the queue
            for (int d = 0; d < lookahead_depth() && (nl = next_moe(nl)) >= 0; ++d) {
                route(nl, lookahead_[d], T, la_ids, la_w);
                if (opt_.prefetch && d < opt_.prefetch_depth)
                    cache_->prefetch(nl, la_ids.data(), (int) la_ids.size(), d + 1);
                if (record_routes) {
                    route_la[d].resize(h.n_layer);
                    route_la[d][nl].insert(route_la[d][nl].end(), la_ids.begin(), la_ids.end());
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
            check_finite(il, T);
        }
        if (out_here > 0) run_output(T, out_here, out_rows);
        if (h.n_mtp) run_mtp_lagged(tokens + start, T);
        n_past_ += T;
    }
}

} // namespace moelite
