#include "expert_cache.h"
#include "graph_util.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <stdexcept>

#include "common.h"
#include "ggml-cpu.h"
#include <memory>

namespace moelite {

static constexpr uint64_t kPage = 4096;
static constexpr double kMinPrefetchPrecision = 0.3;
static uint64_t round_up(uint64_t x, uint64_t a) { return (x + a - 1) / a * a; }

ggml_tensor * make_arena_tensor(ggml_context * ctx, ggml_backend_buffer_t buf, void * mem, ggml_type type, int64_t ne0,
                                int64_t ne1, int n_slots, uint64_t slot_bytes) {
    ggml_tensor * t = ggml_new_tensor_3d(ctx, type, ne0, ne1, n_slots);
    t->nb[2] = slot_bytes; // padded slot stride: slots start on pages
    t->nb[3] = slot_bytes * n_slots;
    ggml_backend_tensor_alloc(buf, t, mem);
    return t;
}

// ggml's repack logs a debug line per tensor it converts (here: every expert load). Once per process, ggml's
// debug lines are dropped and the rest passed on to the callback set before.
static void drop_ggml_debug_log() {
    static std::once_flag once;
    std::call_once(once, [] {
        static ggml_log_callback prev = nullptr;
        static void * prev_ud = nullptr;
        ggml_log_get(&prev, &prev_ud);
        ggml_log_set(
            [](ggml_log_level level, const char * text, void *) {
                if (level == GGML_LOG_LEVEL_DEBUG) return;
                if (prev)
                    prev(level, text, prev_ud);
                else
                    std::fputs(text, stderr);
            },
            nullptr);
    });
}

ggml_backend_buffer_type_t cpu_repack_buft(ggml_backend_t backend) {
    ggml_backend_dev_t dev = backend ? ggml_backend_get_device(backend) : nullptr;
    if (!dev || ggml_backend_dev_type(dev) != GGML_BACKEND_DEVICE_TYPE_CPU) return nullptr;
    auto extra_bufts = (ggml_backend_dev_get_extra_bufts_t) ggml_backend_reg_get_proc_address(
        ggml_backend_dev_backend_reg(dev), "ggml_backend_dev_get_extra_bufts");
    if (!extra_bufts) return nullptr;
    for (ggml_backend_buffer_type_t * b = extra_bufts(dev); b && *b; ++b)
        if (std::strcmp(ggml_backend_buft_name(*b), "CPU_REPACK") == 0) {
            drop_ggml_debug_log();
            return *b;
        }
    return nullptr;
}

bool repack_supports(ggml_backend_buffer_type_t buft, ggml_type type, int64_t ne0, int64_t ne1, int64_t n_mat) {
    if (!buft || ne0 % ggml_blck_size(type) != 0) return false;
    ggml_init_params ip = {ggml_tensor_overhead() * 4, nullptr, true};
    ggml_context * ctx = ggml_init(ip);
    const int64_t T = 8; // a few tokens: the op's shape, never computed
    ggml_tensor * op;
    if (n_mat > 0) { // the kernel handles one matrix too; the check wants 3 dims
        ggml_tensor * w = ggml_new_tensor_3d(ctx, type, ne0, ne1, std::max<int64_t>(n_mat, 2));
        op = ggml_mul_mat_id(ctx, w, ggml_new_tensor_3d(ctx, GGML_TYPE_F32, ne0, 1, T),
                             ggml_new_tensor_2d(ctx, GGML_TYPE_I32, 1, T));
    } else {
        op = ggml_mul_mat(ctx, ggml_new_tensor_2d(ctx, type, ne0, ne1), ggml_new_tensor_2d(ctx, GGML_TYPE_F32, ne0, T));
    }
    ggml_backend_buffer_t dummy = ggml_backend_buft_alloc_buffer(buft, 0);
    op->src[0]->buffer = dummy;
    const bool ok = ggml_backend_dev_supports_op(ggml_backend_buft_get_device(buft), op);
    ggml_backend_buffer_free(dummy);
    ggml_free(ctx);
    return ok;
}

// A page-aligned staging buffer of at least `size` bytes, one per thread (reads that do not land in the arena)
static char * staging(uint64_t size) {
    thread_local std::unique_ptr<char, decltype(&free)> buf(nullptr, &free);
    thread_local uint64_t have = 0;
    if (have < size) {
        void * p = nullptr;
        if (posix_memalign(&p, kPage, size) != 0) throw BudgetError("out of host memory for staging");
        buf.reset((char *) p);
        have = size;
    }
    return buf.get();
}

void ExpertCache::put_slot(const Pool & P, int r, int slot, const void * src, uint64_t n, bool src_packed) {
    const uint64_t off = (uint64_t) slot * P.slot_bytes[r];
    if (!P.host) {
        ggml_backend_tensor_set(P.arena[r], src, off, n); // host -> device
    } else if (P.fast_q4_K[r] && !src_packed) {           // ggml's layout, written without its per-call conversion cost
        q4_K_to_q4_Kx8_rows(src, (char *) P.mem[r] + off, P.ne0[r], P.ne1[r]);
    } else if (P.repacked[r] && !src_packed) {
        // a 2-D tensor exactly on the slot, in the arena's buffer (its init_tensor picks the repack layout);
        // setting it whole converts the file bytes into the slot
        ggml_init_params ip = {ggml_tensor_overhead(), nullptr, true};
        ggml_context * ctx = ggml_init(ip);
        ggml_tensor * t = ggml_new_tensor_2d(ctx, P.type[r], P.ne0[r], P.ne1[r]);
        if (n != ggml_nbytes(t) ||
            ggml_backend_tensor_alloc(P.buf[r], t, (char *) P.mem[r] + off) != GGML_STATUS_SUCCESS) {
            ggml_free(ctx);
            throw std::logic_error("expert cache: a repacked slot takes one whole matrix");
        }
        ggml_backend_tensor_set(t, src, 0, n);
        ggml_free(ctx);
    } else if (P.repacked[r] == src_packed) {
        std::memcpy((char *) P.mem[r] + off, src, n);
    } else {
        throw std::logic_error("expert cache: repacked bytes cannot fill a plain arena");
    }
}

ExpertCache::ExpertCache(const std::vector<GGUFFile> & files, int n_layer, int n_expert)
    : n_layer_(n_layer), n_expert_(n_expert), layers_(n_layer), pinned_(n_layer) {
    for (const GGUFFile & f : files) files_.push_back({f.path});
    reopen();
}

ExpertCache::~ExpertCache() {
    {
        std::lock_guard<std::mutex> lock(mu_);
        io_stop_ = true;
    }
    io_cv_.notify_all();
    for (auto & t : io_threads_) t.join();
    close_files();
    for (auto & p : pools_)
        for (int r = 0; r < 3; ++r) {
            if (p.buf[r]) ggml_backend_buffer_free(p.buf[r]);
            if (p.own_mem[r]) free(p.mem[r]);
        }
    if (ctx_) ggml_free(ctx_);
}

void ExpertCache::reopen() {
    std::unique_lock<std::mutex> lock(mu_);
    // no read may be in flight on the descriptors we are about to replace: queued reads are dropped (their
    // slots become empty again), running ones are waited for
    for (auto * q : {&io_demand_, &io_queue_}) {
        for (const IOTask & t : *q) {
            CacheLayer & L = layers_[t.il];
            Slot & sl = slots_[L.pool][t.slot];
            sl.state = SLOT_EMPTY;
            sl.expert = -1;
            sl.prefetched = 0;
            L.slot_of[t.expert] = -1;
        }
        q->clear();
    }
    loaded_.wait(lock, [this] {
        for (auto & pool : slots_)
            for (auto & sl : pool)
                if (sl.state == SLOT_LOADING) return false;
        return true;
    });
    close_files();
    for (File & f : files_) {
        f.fd = open(f.path.c_str(), O_RDONLY | O_CLOEXEC);
        if (f.fd < 0) throw IOError(f.path + ": cannot open for expert reads: " + strerror(errno));
#ifdef O_DIRECT
        f.fd_direct = open(f.path.c_str(), O_RDONLY | O_CLOEXEC | O_DIRECT); // -1 where the filesystem refuses it
#endif
        struct stat st;
        fstat(f.fd, &st);
        f.size = (uint64_t) st.st_size;
    }
}

void ExpertCache::close_files() {
    for (File & f : files_) {
        if (f.fd >= 0) close(f.fd);
        if (f.fd_direct >= 0) close(f.fd_direct);
        f.fd = f.fd_direct = -1;
    }
}

uint64_t ExpertCache::expert_bytes(const TensorInfo * g, const TensorInfo & u, const TensorInfo & d) {
    return (g ? round_up(g->nb2(), kPage) : 0) + round_up(u.nb2(), kPage) + round_up(d.nb2(), kPage);
}

void ExpertCache::add_layer(int il, const TensorInfo * gate, const TensorInfo & up, const TensorInfo & down) {
    const TensorInfo * t[3] = {gate, &up, &down};
    const int first = gate ? 0 : 1; // gateless experts: matrices 1 (up) and 2 (down) only
    int pool = -1;
    for (size_t p = 0; p < pools_.size() && pool < 0; ++p) {
        bool same = pools_[p].first == first;
        for (int r = first; r < 3; ++r)
            same = same && pools_[p].type[r] == t[r]->type && pools_[p].ne0[r] == t[r]->ne[0] &&
                   pools_[p].ne1[r] == t[r]->ne[1];
        if (same) pool = (int) p;
    }
    if (pool < 0) {
        Pool P;
        P.first = first;
        P.type[0] = GGML_TYPE_F32;
        P.ne0[0] = P.ne1[0] = 0;
        P.slot_bytes[0] = 0;
        for (int r = first; r < 3; ++r) {
            P.type[r] = t[r]->type;
            P.ne0[r] = t[r]->ne[0];
            P.ne1[r] = t[r]->ne[1];
            P.slot_bytes[r] = round_up(t[r]->nb2(), kPage);
        }
        pools_.push_back(P);
        pool = (int) pools_.size() - 1;
    }
    CacheLayer & L = layers_[il];
    L.pool = pool;
    L.src[0] = {0, 0, 0, 0}; // no gate: nothing to read
    for (int r = first; r < 3; ++r) L.src[r] = {t[r]->file, t[r]->offset, t[r]->expert_stride(), t[r]->nb2()};
    L.slot_of.assign(n_expert_, -1);
    L.begun.assign(n_expert_, 0);
}

void ExpertCache::finalize(const std::vector<int> & slots_per_layer, ggml_backend_t backend,
                           ggml_backend_buffer_type_t host_buft, ggml_backend_buffer_type_t repack_buft) {
    for (int il = 0; il < n_layer_; ++il) {
        CacheLayer & L = layers_[il];
        if (L.pool < 0) continue;
        Pool & P = pools_[L.pool];
        L.base = P.n_slots;
        L.quota = slots_per_layer[il];
        P.n_slots += L.quota;
    }
    ggml_init_params ip = {ggml_tensor_overhead() * (pools_.size() * 3 + 1), nullptr, true};
    ctx_ = ggml_init(ip);
    slots_.resize(pools_.size());
    for (size_t p = 0; p < pools_.size(); ++p) {
        Pool & P = pools_[p];
        slots_[p].assign(P.n_slots, Slot{});
        P.host = ggml_backend_is_cpu(backend);
        for (int r = P.first; r < 3; ++r) {
            const size_t bytes = P.slot_bytes[r] * (size_t) std::max(P.n_slots, 1);
            void * base = nullptr;
            if (P.host && host_buft) { // a RAM tier in pinned memory (fast host -> device copies)
                P.buf[r] = ggml_backend_buft_alloc_buffer(host_buft, bytes);
                if (!P.buf[r])
                    throw BudgetError("cannot allocate " + std::to_string(bytes) +
                                      " bytes of pinned host memory for the RAM tier");
                ggml_backend_buffer_clear(P.buf[r], 0);
                base = P.mem[r] = ggml_backend_buffer_get_base(P.buf[r]);
            } else if (P.host && repack_supports(repack_buft, P.type[r], P.ne0[r], P.ne1[r], P.n_slots)) {
                P.buf[r] = ggml_backend_buft_alloc_buffer(repack_buft, bytes); // reads repack through staging
                if (!P.buf[r])
                    throw BudgetError("cannot allocate " + std::to_string(bytes) + " bytes for the expert arena");
                advise_huge_pages(P.buf[r]);
                ggml_backend_buffer_clear(P.buf[r], 0); // zero blocks compute zeros
                base = P.mem[r] = ggml_backend_buffer_get_base(P.buf[r]);
                P.repacked[r] = true;
                P.fast_q4_K[r] = P.type[r] == GGML_TYPE_Q4_K && P.ne0[r] % 256 == 0 && P.ne1[r] % 8 == 0 &&
                                 q4_Kx8_layout_check(repack_buft) && !std::getenv("MOELITE_GGML_REPACK");
            } else if (P.host) { // our own page-aligned memory: disk reads land in place
                if (posix_memalign(&P.mem[r], kPage, bytes) != 0)
                    throw BudgetError("cannot allocate " + std::to_string(bytes) + " bytes for the expert arena");
                P.own_mem[r] = true;
                advise_huge_pages(P.mem[r], bytes);
                std::memset(P.mem[r], 0, bytes); // empty slots compute zeros, never garbage
                P.buf[r] = ggml_backend_cpu_buffer_from_ptr(P.mem[r], bytes);
                base = P.mem[r];
            } else { // device memory (VRAM): reads go through a host staging buffer
                P.buf[r] = ggml_backend_buft_alloc_buffer(ggml_backend_get_default_buffer_type(backend), bytes);
                if (!P.buf[r])
                    throw BudgetError("cannot allocate " + std::to_string(bytes) +
                                      " bytes of device memory for the expert arena");
                ggml_backend_buffer_clear(P.buf[r], 0);
                base = ggml_backend_buffer_get_base(P.buf[r]);
            }
            P.arena[r] = make_arena_tensor(ctx_, P.buf[r], base, P.type[r], P.ne0[r], P.ne1[r], std::max(P.n_slots, 1),
                                           P.slot_bytes[r]);
        }
    }
}

size_t ExpertCache::arena_bytes() const {
    size_t b = 0;
    for (auto & P : pools_) b += (P.slot_bytes[0] + P.slot_bytes[1] + P.slot_bytes[2]) * P.n_slots;
    return b;
}

bool ExpertCache::packs_q4_K() const {
    for (const Pool & P : pools_)
        for (int r = P.first; r < 3; ++r)
            if (P.fast_q4_K[r]) return true;
    return false;
}

size_t ExpertCache::repacked_arena_bytes() const {
    size_t b = 0;
    for (auto & P : pools_)
        for (int r = 0; r < 3; ++r) b += P.repacked[r] ? P.slot_bytes[r] * P.n_slots : 0;
    return b;
}

int ExpertCache::distinct(const int32_t * ids, int n) const {
    std::vector<char> seen;
    return (int) distinct_of(ids, n, seen).size();
}

void ExpertCache::touch(Slot & s, CacheLayer & L) {
    s.last = ++tick_;
    s.count += 1;
    s.prio = (double) s.count + L.lfuda_age;
    if (s.prefetched) {
        double & ema = L.prefetch_ema[s.prefetched - 1];
        ema = 0.9 * ema + 0.1;
        L.stats.prefetch_hits++;
        if (s.prefetched > 1) L.stats.prefetch_far_hits++;
        s.prefetched = 0;
    }
}

// Victim among the layer's slots: empty first; never a pinned or loading slot, never one needed now.
int ExpertCache::choose_victim(CacheLayer & L, Pool & P, const std::vector<char> & needed_now) {
    auto & S = slots_[L.pool];
    (void) P;
    int best = -1;
    std::vector<int> recent_uses; // consistency: uses by the last m tokens
    if (policy_ == Policy::CONSISTENCY) {
        recent_uses.assign(n_expert_, 0);
        for (auto & tok : L.recent)
            for (int e : tok) recent_uses[e]++;
    }
    auto better = [&](const Slot & a, const Slot & b) { // is a a better victim than b? ties: LRU
        switch (policy_) {
        case Policy::LRU: return a.last < b.last;
        case Policy::LFU: return a.count != b.count ? a.count < b.count : a.last < b.last;
        case Policy::LFUDA: return a.prio != b.prio ? a.prio < b.prio : a.last < b.last;
        case Policy::CONSISTENCY: {
            const int ua = recent_uses[a.expert], ub = recent_uses[b.expert];
            return ua != ub ? ua < ub : a.last < b.last;
        }
        }
        return false;
    };
    for (int s = L.base; s < L.base + L.quota; ++s) {
        Slot & c = S[s];
        if (c.state == SLOT_EMPTY) return s;
        if (c.pins > 0 || c.state == SLOT_LOADING || needed_now[c.expert]) continue;
        if (best < 0 || better(c, S[best])) best = s;
    }
    return best;
}

// A victim slot for expert e of layer L, waiting while every evictable slot is still being read; -1 when e
// itself became resident meanwhile (a prefetch or another thread brought it). mu_ held (through lock).
int ExpertCache::victim_for(std::unique_lock<std::mutex> & lock, CacheLayer & L, Pool & P,
                            const std::vector<char> & needed, int e) {
    const auto & S = slots_[L.pool];
    for (;;) {
        if (L.slot_of[e] >= 0) return -1;
        const int v = choose_victim(L, P, needed);
        if (v >= 0) return v;
        bool loading = false;
        for (int q = L.base; q < L.base + L.quota; ++q) loading |= S[q].state == SLOT_LOADING;
        // slots an I/O thread pins while it copies them to the tier above come free in a moment: wait for them
        if (!loading && L.transient == 0)
            throw BudgetError("expert cache: no evictable slot in layer " + std::to_string(&L - layers_.data()));
        loaded_.wait(lock);
    }
}

void ExpertCache::read_range(int file, void * dst, uint64_t off, uint64_t n, uint64_t cap) {
    const File & f = files_[file];
    // O_DIRECT when offset is page aligned and the rounded read stays inside the file and the slot
    const uint64_t n_up = round_up(n, kPage);
    if (f.fd_direct >= 0 && off % kPage == 0 && n_up <= cap && off + n_up <= f.size) {
        uint64_t done = 0;
        bool ok = true;
        while (done < n_up) {
            ssize_t r = pread(f.fd_direct, (char *) dst + done, n_up - done, off + done);
            if (r <= 0) {
                ok = false;
                break;
            }
            done += (uint64_t) r;
        }
        if (ok) return;
    }
    uint64_t done = 0;
    while (done < n) {
        ssize_t r = pread(f.fd, (char *) dst + done, n - done, off + done);
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0)
            throw IOError(
                f.path + ": expert read of " + std::to_string(n) + " bytes at offset " + std::to_string(off) +
                " failed: " + (r == 0 ? std::string("unexpected end of file (truncated?)") : strerror(errno)));
        done += (uint64_t) r;
    }
}

void ExpertCache::begin_load(CacheLayer & L, int slot, int expert, int prefetched) {
    Slot & S = slots_[L.pool][slot];
    if (S.expert >= 0) {
        L.slot_of[S.expert] = -1;
        L.stats.evictions++;
        if (S.prefetched) {
            L.stats.prefetch_wasted++;
            L.prefetch_ema[S.prefetched - 1] *= 0.9;
        }
        if (policy_ == Policy::LFUDA) L.lfuda_age = S.prio;
    }
    S.expert = expert;
    S.state = SLOT_LOADING;
    S.count = 0;
    S.last = ++tick_;     // a fresh entry is the most recent (a prefetch too: not the next victim)
    S.prio = L.lfuda_age; // LFUDA: count 0 + age until its first use
    S.prefetched = (uint8_t) prefetched;
    L.slot_of[expert] = slot;
}

void ExpertCache::copy_from_tier2(const CacheLayer & L, const Pool & P, int il, int slot, int expert) {
    const Pool & from = tier2_->pool_of(il);
    tier2_->with_expert(il, expert, [&](const void * const src[3]) {
        for (int r = P.first; r < 3; ++r) put_slot(P, r, slot, src[r], L.src[r].nbytes, from.repacked[r]);
    });
}

void ExpertCache::read_expert(const CacheLayer & L, const Pool & P, int slot, int expert) {
    if (tier2_) {
        copy_from_tier2(L, P, (int) (&L - layers_.data()), slot, expert);
        return;
    }
    for (int r = P.first; r < 3; ++r) {
        const ExpertSource & src = L.src[r];
        const uint64_t off = src.offset + (uint64_t) expert * src.stride;
        if (P.host && !P.repacked[r]) {
            read_range(src.file, (char *) P.mem[r] + (uint64_t) slot * P.slot_bytes[r], off, src.nbytes,
                       P.slot_bytes[r]);
        } else {
            // the file bytes into this thread's staging buffer, then repacked into the slot (or copied to the device)
            char * buf = staging(P.slot_bytes[r]);
            read_range(src.file, buf, off, src.nbytes, P.slot_bytes[r]);
            put_slot(P, r, slot, buf, src.nbytes, false);
        }
    }
}

void ExpertCache::load(CacheLayer & L, Pool & P, int slot, int expert) {
    begin_load(L, slot, expert, 0);
    Slot & S = slots_[L.pool][slot];
    try {
        read_expert(L, P, slot, expert);
    } catch (...) {
        S.state = SLOT_EMPTY;
        S.expert = -1;
        L.slot_of[expert] = -1;
        throw;
    }
    S.state = SLOT_READY;
    L.stats.bytes_read += L.src[0].nbytes + L.src[1].nbytes + L.src[2].nbytes;
    L.stats.loads++;
}

void ExpertCache::check_on_disk(const CacheLayer & L, int expert) {
    for (int r = pools_[L.pool].first; r < 3; ++r) {
        const File & f = files_[L.src[r].file];
        struct stat st;
        if (fstat(f.fd, &st) != 0) throw IOError(f.path + ": cannot stat the model file: " + strerror(errno));
        const uint64_t end = L.src[r].offset + (uint64_t) expert * L.src[r].stride + L.src[r].nbytes;
        if (end > (uint64_t) st.st_size)
            throw IOError(f.path + ": truncated while open: expert " + std::to_string(expert) + " needs bytes up to " +
                          std::to_string(end) + " but the file now has " + std::to_string((uint64_t) st.st_size));
    }
}

void ExpertCache::start_io(int n_io) {
    for (int i = 0; i < n_io; ++i) io_threads_.emplace_back([this] { io_loop(); });
}

void ExpertCache::io_loop() {
    std::unique_lock<std::mutex> lock(mu_);
    for (;;) {
        io_cv_.wait(lock, [this] { return io_stop_ || !io_demand_.empty() || !io_queue_.empty(); });
        if (io_stop_) return;
        auto & q = io_demand_.empty() ? io_queue_ : io_demand_;
        IOTask t = q.front();
        q.pop_front();
        CacheLayer & L = layers_[t.il];
        Pool & P = pools_[L.pool];
        Slot & S = slots_[L.pool][t.slot];
        lock.unlock();
        bool ok = true;
        try {
            read_expert(L, P, t.slot, t.expert); // slot is LOADING: nobody else touches it
        } catch (...) { ok = false; }
        lock.lock();
        if (ok) {
            S.state = SLOT_READY;
            L.stats.bytes_read += L.src[0].nbytes + L.src[1].nbytes + L.src[2].nbytes;
            L.stats.loads++;
        } else { // the next acquire reads it synchronously and reports
            S.state = SLOT_EMPTY;
            S.expert = -1;
            S.prefetched = 0;
            L.slot_of[t.expert] = -1;
        }
        loaded_.notify_all();
    }
}

namespace {
struct Stopwatch { // seconds since construction
    std::chrono::steady_clock::time_point t0 = std::chrono::steady_clock::now();
    double s() const { return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count(); }
};
struct Booked { // a call's time since `call` added to `book_s` however it returns (declared under mu_)
    double & book_s;
    const Stopwatch & call;
    ~Booked() { book_s += call.s(); }
};
} // namespace

void ExpertCache::prefetch(int il, const int32_t * ids, int n, int distance) {
    if (io_threads_.empty() || !prefetch_ || distance < 1 || distance > kMaxLookahead) return;
    const Stopwatch call;
    std::lock_guard<std::mutex> lock(mu_);
    CacheLayer & L = layers_[il];
    if (L.pool < 0) return;
    const Booked book{L.stats.book_s, call};
    // adaptive: a layer whose predictions are mostly wasted stops prefetching (it would evict useful
    // experts and double the disk traffic), but probes every 16th step to notice when they improve
    const int d = distance - 1;
    if (L.prefetch_ema[d] < kMinPrefetchPrecision && (L.prefetch_calls[d]++ % 16) != 0) return;
    Pool & P = pools_[L.pool];
    std::vector<char> wanted(n_expert_, 0);
    for (int i = 0; i < n; ++i) wanted[ids[i]] = 1;
    int issued = 0;
    for (int i = 0; i < n && issued < L.quota; ++i) {
        const int e = ids[i];
        if (L.slot_of[e] >= 0) continue; // cached or already on its way
        try {
            check_on_disk(L, e);
        } catch (const IOError &) { continue; }    // acquire() will report it
        const int s = choose_victim(L, P, wanted); // never a pinned, loading or wanted slot
        if (s < 0) break;
        begin_load(L, s, e, distance);
        io_queue_.push_back({il, s, e});
        L.stats.prefetch_issued++;
        if (distance > 1) L.stats.prefetch_far_issued++;
        ++issued;
    }
    if (issued) io_cv_.notify_all();
}

enum : uint8_t { BEGUN_READ = 1, BEGUN_PINNED = 2 }; // CacheLayer::begun: counted / counted, pinned, touched

// Step 1 of acquire: misses get a victim slot each (never a pinned, loading or needed one) and are read in parallel
// by the I/O threads, ahead of queued prefetches; with no I/O threads they are read here, one by one. Experts a
// begin_acquire() of this step handled are skipped (counted once); mark: this is begin_acquire (BEGUN_READ).
int ExpertCache::start_misses(std::unique_lock<std::mutex> & lock, int il, const std::vector<int> & distinct,
                              const std::vector<char> & needed, bool mark) {
    CacheLayer & L = layers_[il];
    Pool & P = pools_[L.pool];
    auto & S = slots_[L.pool];
    int n_missed = 0;
    for (int e : distinct) {
        if (L.begun[e]) continue;
        if (L.slot_of[e] >= 0) { // cached, or a prefetch is reading it (or queued to: now a demand read)
            if (S[L.slot_of[e]].state == SLOT_READY)
                L.stats.hits++;
            else if (promote(il, e))
                ++n_missed;
            continue;
        }
        check_on_disk(L, e); // fail before evicting anything
        const int v = victim_for(lock, L, P, needed, e);
        if (v < 0) continue; // a prefetch brought it meanwhile
        L.stats.misses++;
        ++n_missed;
        if (mark) L.begun[e] = BEGUN_READ;
        begin_load(L, v, e, 0);
        if (io_threads_.empty()) {
            const Stopwatch read;
            try {
                read_expert(L, P, v, e);
            } catch (...) {
                S[v].state = SLOT_EMPTY;
                S[v].expert = -1;
                L.slot_of[e] = -1;
                throw;
            }
            S[v].state = SLOT_READY;
            L.stats.bytes_read += L.src[0].nbytes + L.src[1].nbytes + L.src[2].nbytes;
            L.stats.loads++;
            L.stats.wait_s += read.s();
        } else {
            io_demand_.push_back({il, v, e});
        }
    }
    if (n_missed) io_cv_.notify_all(); // the step's reads queued together, then the I/O threads woken once
    return n_missed;
}

bool ExpertCache::promote(int il, int expert) {
    for (auto it = io_queue_.begin(); it != io_queue_.end(); ++it)
        if (it->il == il && it->expert == expert) {
            io_demand_.push_back(*it);
            io_queue_.erase(it);
            layers_[il].stats.promoted++;
            return true;
        }
    return false; // already being read, or a demand read
}

void ExpertCache::pin(int il, int slot) {
    Slot & sl = slots_[layers_[il].pool][slot];
    sl.pins++;
    pinned_[il].push_back(slot);
    touch(sl, layers_[il]); // one access per distinct expert per step
}

// The distinct expert ids of ids[0..n), in order of first use; needed[e] = 1 for each of them.
std::vector<int> ExpertCache::distinct_of(const int32_t * ids, int n, std::vector<char> & needed) const {
    needed.assign(n_expert_, 0);
    std::vector<int> distinct;
    for (int i = 0; i < n; ++i)
        if (!needed[ids[i]]) {
            needed[ids[i]] = 1;
            distinct.push_back(ids[i]);
        }
    return distinct;
}

int ExpertCache::begin_acquire(int il, const int32_t * ids, int n, int32_t * slots_out) {
    const Stopwatch call;
    std::unique_lock<std::mutex> lock(mu_);
    CacheLayer & L = layers_[il];
    const Booked book{L.stats.book_s, call};
    auto & S = slots_[L.pool];
    std::vector<char> needed;
    const std::vector<int> distinct = distinct_of(ids, n, needed);
    if (io_threads_.empty() || (int) distinct.size() > L.quota) return -1;
    int ready = 0;
    for (int e : distinct) // ready now: counted, pinned and touched here
        if (L.slot_of[e] >= 0 && S[L.slot_of[e]].state == SLOT_READY) {
            L.stats.hits++;
            pin(il, L.slot_of[e]);
            L.begun[e] = BEGUN_PINNED;
            ++ready;
        }
    if (start_misses(lock, il, distinct, needed, true) > 0 && ready > 0) L.stats.overlapped++;
    for (int i = 0; i < n; ++i) slots_out[i] = L.begun[ids[i]] == BEGUN_PINNED ? L.slot_of[ids[i]] : -1;
    return ready;
}

bool ExpertCache::acquire(int il, const int32_t * ids, int n, int32_t * slots_out) {
    const Stopwatch call;
    std::unique_lock<std::mutex> lock(mu_);
    CacheLayer & L = layers_[il];
    Pool & P = pools_[L.pool];
    auto & S = slots_[L.pool];
    std::vector<char> needed;
    const std::vector<int> distinct = distinct_of(ids, n, needed);
    if ((int) distinct.size() > L.quota) return false;
    const auto t0 = std::chrono::steady_clock::now();
    const double wait0 = L.stats.wait_s;
    // 1. read the misses (see start_misses)
    const int n_missed = start_misses(lock, il, distinct, needed, false);
    // 2. wait for every needed expert still being read (ours or an earlier prefetch)
    auto pending = [&] {
        for (int e : distinct)
            if (L.slot_of[e] >= 0 && S[L.slot_of[e]].state == SLOT_LOADING) return true;
        return false;
    };
    const bool waited = pending();
    if (waited) {
        const Stopwatch wait;
        loaded_.wait(lock, [&] { return !pending(); });
        L.stats.wait_s += wait.s();
    }
    // 3. a failed asynchronous read is retried here, synchronously, so that its error is raised to the caller
    for (int e : distinct)
        if (L.slot_of[e] < 0) {
            check_on_disk(L, e);
            const int v = choose_victim(L, P, needed);
            if (v < 0) throw BudgetError("expert cache: no evictable slot in layer " + std::to_string(il));
            const Stopwatch read;
            load(L, P, v, e);
            L.stats.wait_s += read.s();
        }
    for (int e : distinct) {
        if (L.begun[e] != BEGUN_PINNED) pin(il, L.slot_of[e]);
        L.begun[e] = 0;
    }
    for (int i = 0; i < n; ++i) slots_out[i] = L.slot_of[ids[i]]; // slot index inside the pool tensors
    if (n_missed || waited)
        L.stats.stall_s += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    L.stats.book_s += call.s() - (L.stats.wait_s - wait0);
    return true;
}

void ExpertCache::with_expert(int il, int e, const std::function<void(const void * const src[3])> & fn) {
    std::unique_lock<std::mutex> lock(mu_);
    CacheLayer & L = layers_[il];
    Pool & P = pools_[L.pool];
    auto & S = slots_[L.pool];
    const auto t0 = std::chrono::steady_clock::now();
    bool stalled = false, missed = false;
    for (;;) {
        const int s = L.slot_of[e];
        if (s >= 0 && S[s].state == SLOT_READY) break;
        if (s >= 0) {
            stalled = true;
            loaded_.wait(lock);
            continue;
        } // another thread is reading it
        check_on_disk(L, e);
        std::vector<char> needed(n_expert_, 0);
        needed[e] = 1;
        stalled = true;
        const int v = victim_for(lock, L, P, needed, e);
        if (v < 0) continue; // another thread brought it meanwhile
        L.stats.misses++;
        begin_load(L, v, e, 0);
        lock.unlock();
        std::exception_ptr err;
        try {
            read_expert(L, P, v, e);
        } catch (...) { err = std::current_exception(); }
        lock.lock();
        if (err) { // the slot is empty again; the caller gets the read's error
            S[v].state = SLOT_EMPTY;
            S[v].expert = -1;
            L.slot_of[e] = -1;
            loaded_.notify_all();
            std::rethrow_exception(err);
        }
        S[v].state = SLOT_READY;
        L.stats.bytes_read += L.src[0].nbytes + L.src[1].nbytes + L.src[2].nbytes;
        L.stats.loads++;
        loaded_.notify_all();
        missed = true;
        break;
    }
    const int s = L.slot_of[e];
    Slot & sl = S[s];
    if (!missed) L.stats.hits++;
    sl.pins++;
    L.transient++;
    touch(sl, L);
    if (stalled) L.stats.stall_s += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    lock.unlock();
    const void * src[3] = {nullptr, nullptr, nullptr};
    for (int r = P.first; r < 3; ++r) src[r] = (const char *) P.mem[r] + (uint64_t) s * P.slot_bytes[r];
    auto unpin = [&] {
        lock.lock();
        sl.pins--;
        L.transient--;
        loaded_.notify_all(); // a victim_for() may be waiting for this slot
    };
    try {
        fn(src);
    } catch (...) {
        unpin();
        throw;
    }
    unpin();
}

bool ExpertCache::resident(int il, int e) {
    std::lock_guard<std::mutex> lock(mu_);
    return layers_[il].pool >= 0 && layers_[il].slot_of[e] >= 0;
}

LayerStats ExpertCache::stats(int il) {
    std::lock_guard<std::mutex> lock(mu_);
    return layers_[il].stats;
}

void ExpertCache::release(int il) {
    std::lock_guard<std::mutex> lock(mu_);
    auto & S = slots_[layers_[il].pool];
    for (int s : pinned_[il]) S[s].pins--;
    if (!pinned_[il].empty()) loaded_.notify_all(); // slots another thread's victim_for() may wait for
    pinned_[il].clear();
    std::fill(layers_[il].begun.begin(), layers_[il].begun.end(), 0); // a step given up between the halves
}

void ExpertCache::unpin(int il, const int32_t * slots, int n) {
    std::lock_guard<std::mutex> lock(mu_);
    auto & S = slots_[layers_[il].pool];
    std::vector<int> & pins = pinned_[il];
    for (int i = 0; i < n; ++i) {
        auto it = std::find(pins.begin(), pins.end(), slots[i]);
        if (it == pins.end()) continue; // a repeated id: its slot was pinned once
        S[*it].pins--;
        pins.erase(it);
    }
    loaded_.notify_all(); // slots another thread's victim_for() may wait for
}

void ExpertCache::note_token_experts(int il, const int32_t * ids, int k) {
    CacheLayer & L = layers_[il];
    L.recent.emplace_back(ids, ids + k);
    while ((int) L.recent.size() > window_m_) L.recent.pop_front();
}

ExpertCache::Times ExpertCache::times() {
    std::lock_guard<std::mutex> lock(mu_);
    Times t;
    for (const CacheLayer & L : layers_) {
        t.wait_s += L.stats.wait_s;
        t.book_s += L.stats.book_s;
    }
    return t;
}

void ExpertCache::reset_stats() {
    for (auto & L : layers_) L.stats = LayerStats{};
}

} // namespace moelite
