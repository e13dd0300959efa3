// The expert cache: slot arenas, the slot table (layer, expert) -> slot, replacement policies, disk reads.
//
// An expert of layer l is three byte ranges of the GGUF file (gate, up, down rows of the fused
// ffn_*_exps tensors: offset + e * nb2), or two where the experts have no gate (ReLU² up -> down: Nemotron-H;
// the pool then holds matrices 1 and 2 only, Pool::first = 1). Layers whose three expert matrices share types and shapes share a
// Pool: three ggml tensors [ne0, ne1, n_slots] (gate, up, down) over memory we own, slots padded to 4096
// bytes so reads can use O_DIRECT. Each layer owns a contiguous range of its pool's slots (its quota);
// the policy picks victims inside that range. The math never knows where an expert lives: routing ids
// go through slot_of[] into ggml_mul_mat_id over the pool tensors.
//
// Repacked arenas (CPU): where ggml's CPU backend has its "CPU_REPACK" buffer type (llama.cpp's --repack,
// interleaved rows for its AVX2/AVX-512/NEON GEMMs) and it takes a pool's type and shape, a host pool's arena
// lives in that buffer type: each slot is filled by reading the file bytes into a staging buffer and setting a
// 2-D tensor that lies exactly on the slot, which converts them in place. Repacked bytes are as many as the
// original ones (block_q4_Kx8 = 8 x block_q4_K, ...), so slots keep their size; the repacked MUL_MAT_ID kernel
// steps through slots by nb[2], the padded stride. Rows interleave in groups of 8 inside one expert (ne1 % 8 ==
// 0), so one slot repacked alone holds the same bytes as its part of the whole 3-D tensor repacked at once.
#pragma once
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "ggml-backend.h"
#include "ggml.h"
#include "gguf_index.h"

namespace moelite {

enum class Policy : int { LRU = 0, LFU = 1, LFUDA = 2, CONSISTENCY = 3 };

// Gate lookahead distances: at MoE layer l the routers of the next d = 1..kMaxLookahead MoE layers are applied to
// l's hidden state, predicting their experts d layers ahead (prefetch, traces).
constexpr int kMaxLookahead = 3;

struct ExpertSource { // where one expert matrix of one layer lives in the file (set)
    int file;         // which file of the model's set (a split set's shard; 0 for one file)
    uint64_t offset;  // absolute offset of expert 0 in that file
    uint64_t stride;  // bytes per expert (nb2 in the file)
    uint64_t nbytes;  // bytes to read per expert (== stride for GGUF)
};

struct Pool {
    ggml_type type[3]; // gate, up, down
    int first = 0;     // first matrix held: 1 when the experts have no gate (arena[0] stays nullptr)
    int64_t ne0[3], ne1[3];
    uint64_t slot_bytes[3]; // padded to 4096
    int n_slots = 0;
    void * mem[3] = {nullptr, nullptr, nullptr}; // host arenas: our memory; device arenas: nullptr
    bool host = true;
    bool own_mem[3] = {false, false, false}; // mem[r] from posix_memalign (freed by us), not from a backend buffer
    ggml_backend_buffer_t buf[3] = {nullptr, nullptr, nullptr};
    ggml_tensor * arena[3] = {nullptr, nullptr, nullptr}; // [ne0, ne1, n_slots]
    bool repacked[3] = {false, false, false};             // arena in the CPU_REPACK buffer type (see above)
    bool fast_q4_K[3] = {false, false, false}; // repacked Q4_K converted by q4_K_to_q4_Kx8_rows (unrepack.cpp)
};

struct LayerStats {
    uint64_t hits = 0, misses = 0, prefetch_issued = 0, prefetch_hits = 0, prefetch_wasted = 0, bytes_read = 0,
             loads = 0, evictions = 0, prefetch_far_issued = 0,
             prefetch_far_hits = 0, // of the prefetches, those from distances >= 2
        overlapped = 0,             // steps that computed their ready experts while their misses were read
        promoted = 0;               // queued prefetches a step came to need, moved ahead as demand reads
    double stall_s = 0.0;           // seconds of acquire() calls that read or waited for a read (bookkeeping included)
    // the compute thread's seconds in the cache's calls, split: waiting for reads (the condition variable, reads
    // done in the calling thread) and the rest (slot table, victims, queueing, pins: bookkeeping)
    double wait_s = 0.0, book_s = 0.0;
};

enum SlotState : uint8_t { SLOT_EMPTY = 0, SLOT_LOADING = 1, SLOT_READY = 2 };

struct Slot {
    int expert = -1; // expert id held (-1: empty)
    uint8_t state = SLOT_EMPTY;
    int pins = 0;           // > 0 while a graph may read it or a read is in flight
    uint64_t last = 0;      // tick of last access (LRU)
    uint64_t count = 0;     // accesses since insert (LFU)
    double prio = 0.0;      // LFUDA priority
    uint8_t prefetched = 0; // loaded by a prefetch of this lookahead distance (1..) and not yet used; 0: not
};

struct CacheLayer {
    int pool = -1;
    int base = 0, quota = 0; // slots [base, base + quota) of the pool
    ExpertSource src[3];
    std::vector<int> slot_of; // [n_expert] -> slot index in pool, or -1
    double lfuda_age = 0.0;
    // running precision of this layer's prefetches per lookahead distance (1 = used, 0 = evicted unused)
    double prefetch_ema[kMaxLookahead] = {0.5, 0.5, 0.5};
    uint64_t prefetch_calls[kMaxLookahead] = {};
    std::deque<std::vector<int>> recent; // consistency policy: experts of the last m tokens
    std::vector<uint8_t> begun;          // [n_expert] begin_acquire() of this step: BEGUN_READ / BEGUN_PINNED
    int transient = 0;                   // slots pinned by with_expert() copies in flight (another thread's)
    LayerStats stats;
};

// A 3-D arena tensor [ne0, ne1, n_slots] over `mem`, with a padded slot stride (nb[2] = slot_bytes).
ggml_tensor * make_arena_tensor(ggml_context * ctx, ggml_backend_buffer_t buf, void * mem, ggml_type type, int64_t ne0,
                                int64_t ne1, int n_slots, uint64_t slot_bytes);

// ggml's CPU_REPACK buffer type, asked from the CPU device's registry entry ("ggml_backend_dev_get_extra_bufts":
// a portable build loads its CPU variant at run time); nullptr when `backend` is not a CPU backend or its ggml
// CPU build has no repack buffer type.
ggml_backend_buffer_type_t cpu_repack_buft(ggml_backend_t backend);
// Does `buft` repack a weight of this type and shape for ggml_mul_mat (n_mat == 0: 2-D [ne0, ne1]) or for
// ggml_mul_mat_id over n_mat matrices (3-D [ne0, ne1, n_mat])? Asked like llama.cpp asks it: the buffer type's
// device supports_op on a dummy op whose weight sits in a (zero-size) buffer of that type.
bool repack_supports(ggml_backend_buffer_type_t buft, ggml_type type, int64_t ne0, int64_t ne1, int64_t n_mat);

class ExpertCache {
  public:
    // files: the model's file, or every shard of its split set (TensorInfo::file indexes them)
    ExpertCache(const std::vector<GGUFFile> & files, int n_layer, int n_expert);
    ~ExpertCache();

    // Set up: describe a MoE layer (its fused tensors; gate nullptr: gateless experts) before finalize().
    void add_layer(int il, const TensorInfo * gate, const TensorInfo & up, const TensorInfo & down);
    // Allocate pools. slots_per_layer[il] = quota (>= n_expert_used), 0 for non-MoE layers. host_buft: for a
    // host (RAM) tier, the buffer type of its arenas (CUDA pinned memory); nullptr: our own aligned memory, or
    // repack_buft (CPU_REPACK) for each matrix of a host pool that it repacks.
    void finalize(const std::vector<int> & slots_per_layer, ggml_backend_t backend,
                  ggml_backend_buffer_type_t host_buft = nullptr, ggml_backend_buffer_type_t repack_buft = nullptr);
    size_t arena_bytes() const;
    size_t repacked_arena_bytes() const; // the part of arena_bytes() in repacked arenas
    bool packs_q4_K() const;             // some repacked Q4_K arena is filled by q4_K_to_q4_Kx8_rows (Pool::fast_q4_K)
    // Write n bytes of matrix r of an expert into `slot` of pool P: file bytes (src_packed false) or the bytes of
    // a slot of a pool with the same layout (src_packed == P.repacked[r]). Repacks into a repacked host arena,
    // copies to a device arena (ggml_backend_tensor_set), memcpy otherwise.
    static void put_slot(const Pool & P, int r, int slot, const void * src, uint64_t n, bool src_packed);
    static uint64_t expert_bytes(const TensorInfo * gate, const TensorInfo & up, const TensorInfo & down);

    void set_policy(Policy p, int window_m) {
        policy_ = p;
        window_m_ = window_m < 1 ? 1 : window_m;
    }
    void set_prefetch(bool on) { prefetch_ = on; }
    // Start n_io I/O threads for asynchronous prefetch (0: prefetch disabled).
    void start_io(int n_io);

    // Asynchronous: start reading ids[0..n) of layer il into free or evictable slots of that layer.
    // Never evicts a pinned or loading slot; returns at once. A failed read leaves the slot empty and
    // the next acquire() of that expert reads it synchronously (raising the error there). distance: how many MoE
    // layers ahead the prediction was made (1..kMaxLookahead); each distance keeps its own running precision.
    void prefetch(int il, const int32_t * ids, int n, int distance = 1);

    // Make ids[0..n) (expert ids of one layer, possibly repeated) resident and pinned; write slot ids.
    // Returns false (pinning nothing) if the distinct ids exceed the layer's quota: the caller splits.
    bool acquire(int il, const int32_t * ids, int n, int32_t * slots_out);
    // acquire() in two halves, so that a step computes its resident experts while its misses are read: queue the
    // misses' reads on the I/O threads (counted as acquire() counts them), pin the experts ready now and write
    // their slots (-1 for the others); returns how many distinct experts are ready, or -1 (doing nothing) when
    // there are no I/O threads or the distinct ids exceed the quota. The acquire() that follows, for the same ids,
    // waits for the rest and counts, pins and touches nothing twice.
    int begin_acquire(int il, const int32_t * ids, int n, int32_t * slots_out);
    void release(int il); // unpin everything acquire() pinned for this layer
    // unpin the slots of one acquire() of layer il (slots[0..n) as it wrote them), leaving the layer's other pins
    // and a begun acquire of other experts as they are (expert groups of a prompt ubatch, ffn_moe.cpp)
    void unpin(int il, const int32_t * slots, int n);
    bool async() const { return !io_threads_.empty(); }          // I/O threads read misses and prefetches
    void note_token_experts(int il, const int32_t * ids, int k); // consistency window update (one token)
    int distinct(const int32_t * ids, int n) const;
    int quota(int il) const { return layers_[il].quota; }

    const Pool & pool_of(int il) const { return pools_[layers_[il].pool]; }
    bool has_layer(int il) const { return layers_[il].pool >= 0; }

    // Tiering (tiering.h). A cache with a tier 2 fills its slots from that cache's slots instead of
    // from the file: this cache is VRAM, tier 2 is RAM, tier 2 reads the file.
    void set_tier2(ExpertCache * t2) { tier2_ = t2; }
    // Tier-2 side: make expert e of layer il ready in this (host) cache, pinned while fn(gate, up, down)
    // (gate nullptr for gateless experts)
    // reads it. Thread-safe; misses are read from the file in the calling thread.
    void with_expert(int il, int e, const std::function<void(const void * const src[3])> & fn);
    bool resident(int il, int e); // held or on its way (ready or loading)
    LayerStats stats(int il);     // a consistent copy of one layer's counters
    // wait_s and book_s (LayerStats) summed over the layers since the last reset_stats()
    struct Times {
        double wait_s = 0.0, book_s = 0.0;
    };
    Times times();
    const std::vector<CacheLayer> & layers() const { return layers_; }
    void reset_stats();
    void reopen(); // reopen the files (after one was replaced or repaired)

  private:
    int choose_victim(CacheLayer & L, Pool & P, const std::vector<char> & needed_now);
    int victim_for(std::unique_lock<std::mutex> & lock, CacheLayer & L, Pool & P, const std::vector<char> & needed,
                   int e);
    void load(CacheLayer & L, Pool & P, int slot, int expert); // sync; mu_ held
    int start_misses(std::unique_lock<std::mutex> & lock, int il, const std::vector<int> & distinct,
                     const std::vector<char> & needed, bool mark); // acquire's step 1; mu_ held
    void pin(int il, int slot);                                    // mu_ held
    std::vector<int> distinct_of(const int32_t * ids, int n, std::vector<char> & needed) const;
    void begin_load(CacheLayer & L, int slot, int expert, int prefetched);        // mark; mu_ held
    void read_expert(const CacheLayer & L, const Pool & P, int slot, int expert); // no lock: slot is LOADING
    void io_loop();
    void check_on_disk(const CacheLayer & L, int expert); // IOError if the file no longer holds it
    void read_range(int file, void * dst, uint64_t off, uint64_t n, uint64_t cap);
    void touch(Slot & s, CacheLayer & L);
    void copy_from_tier2(const CacheLayer & L, const Pool & P, int il, int slot, int expert);

    struct File { // one file of the set, opened for expert reads
        std::string path;
        int fd = -1, fd_direct = -1; // fd_direct: O_DIRECT, -1 where the filesystem refuses it
        uint64_t size = 0;
    };
    std::vector<File> files_;
    void close_files();
    int n_layer_, n_expert_;
    std::vector<CacheLayer> layers_;
    std::vector<Pool> pools_;
    std::vector<std::vector<Slot>> slots_; // per pool
    std::vector<std::vector<int>> pinned_; // per layer: slots pinned by acquire()
    ggml_context * ctx_ = nullptr;
    Policy policy_ = Policy::LFUDA;
    int window_m_ = 16;
    uint64_t tick_ = 0;
    std::mutex mu_;
    std::condition_variable loaded_; // a slot left the LOADING state
    // I/O pool: tasks (layer, slot, expert); the I/O threads take demand reads (a step's misses, FIFO) before
    // prefetches (FIFO)
    struct IOTask {
        int il, slot, expert;
    };
    std::deque<IOTask> io_demand_, io_queue_;
    bool promote(int il, int expert); // a queued prefetch of (il, expert) to the end of io_demand_; mu_ held
    std::condition_variable io_cv_;
    std::vector<std::thread> io_threads_;
    bool io_stop_ = false;
    bool prefetch_ = true;
    ExpertCache * tier2_ = nullptr; // not owned
};

} // namespace moelite
