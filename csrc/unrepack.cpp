// Q4_K rows <-> ggml's repacked layout of them (block_q4_Kx8), both ways.
//
// Unpacking, for ggml's tiled K-quant GEMM in prompt ubatches on x86: ggml's x86 CPU backend has two GEMMs for Q4_K:
// the repacked one (block_q4_Kx8, 4 tokens per pass) and a tiled one on plain rows (AVX2/VNNI tiles of 16 tokens,
// from 8 rows of input on). On a Qwen3-30B-shaped 512-token prompt the tiled one is ~1.25x faster overall, while decode
// needs the repacked GEMV (and llama.cpp repacks by default too). So a matmul of a repacked Q4_K weight (a dense one in
// buf_rp_, or an expert's slot) over >= kTiledMinRows (32) tokens gets the weight unpacked into graph scratch first (a
// byte shuffle, a few % of a large GEMM, more than a small one gains) and ggml's mul_mat takes the tiled path on it.
// Which way runs depends on the token count and the weight's type alone: offloading changes no bit.
//
// Packing, for the expert cache (put_slot): every expert read from disk into a repacked arena is converted on the way
// in. ggml's own conversion (its buffer type's set_tensor) copies 8 or 4 bytes per call with a run-time length and
// took ~47 us per 72 KiB matrix here (hot cache, AVX-512 machine): at a 50 % cap on a Qwen3-30B-shaped model that was
// as long as the disk read itself, on the I/O threads the compute threads share the cores with. q4_K_to_q4_Kx8_rows
// writes the same bytes with fixed-size moves.
//
// block_q4_Kx8, ggml's CPU_REPACK layout of 8 rows x one 256-column block (interleave 8): d[8], dmin[8] (F16),
// scales[96]: per sub-block sb, 12 bytes packing the 8 rows' 6-bit scales and mins the way a Q4_K row packs its 8
// sub-blocks; qs[1024]: the rows' 128 qs bytes in 8-byte pieces, row after row per piece. Rows in groups of 8, each
// group its ne0 / 256 blocks in order. q4_Kx8_layout_check verifies both directions against the ggml build at load
// (pseudo-random bytes through ggml's repack): where it differs (another interleave, a future ggml), ggml's own
// conversion runs and nothing is unpacked.
#include <cstdlib>
#include <cstring>
#include <vector>

#include "ggml-cpu.h"
#include "graph_util.h"
#include "model.h"

namespace moelite {

// Unpacking costs a pass over the whole weight whatever the row count, so it pays later than ggml's own tiled floor
// (tiled.cpp: "profitable at rows >= 8", for weights that are plain already). Measured on the Qwen3-30B-shaped Q4_K_M
// file (2 threads, AVX-512 machine, interleaved runs): an 8-row step took 71-85 ms with the repacked GEMM against
// 82-121 ms unpacked and tiled, 16 rows 116-150 against 140-155, 32 rows 222-276 against 211-244; 512-token prompts
// at ubatches 64, 128 and 512 were as fast or faster with the floor at 32. Speculative verify windows are 2-17 rows.
static constexpr int64_t kTiledMinRows = 32;
static constexpr size_t kQ4K = 144, kQ4Kx8 = 8 * kQ4K; // bytes of block_q4_K, block_q4_Kx8

static void q4_Kx8_to_q4_K(const uint8_t * in, uint8_t * const out[8]) {
    const uint8_t *sc = in + 32, *qs = in + 128;
    for (int j = 0; j < 8; ++j) {
        uint8_t * o = out[j];
        std::memcpy(o, in + 2 * j, 2);          // d
        std::memcpy(o + 2, in + 16 + 2 * j, 2); // dmin
        uint8_t s[8], m[8];                     // row j's 6-bit scale and min of each sub-block
        for (int sb = 0; sb < 8; ++sb) {
            const uint8_t * g = sc + (sb < 4 ? 12 * sb : 48 + 12 * (sb - 4));
            if (j < 4) {
                s[sb] = g[j] & 63;
                m[sb] = g[j + 4] & 63;
            } else {
                s[sb] = (g[j + 4] & 15) | ((g[j - 4] >> 6) << 4);
                m[sb] = (g[j + 4] >> 4) | ((g[j] >> 6) << 4);
            }
        }
        uint8_t * q = o + 4; // Q4_K's 12 bytes of scales and mins
        for (int k = 0; k < 4; ++k) {
            q[k] = (uint8_t) ((s[k] & 63) | ((s[k + 4] >> 4) << 6));
            q[k + 4] = (uint8_t) ((m[k] & 63) | ((m[k + 4] >> 4) << 6));
            q[k + 8] = (uint8_t) ((s[k + 4] & 15) | ((m[k + 4] & 15) << 4));
        }
        for (int p = 0; p < 16; ++p) std::memcpy(o + 16 + 8 * p, qs + 8 * (8 * p + j), 8);
    }
}

// The inverse: 8 rows' block x (in[j] -> block_q4_K of row j) -> one block_q4_Kx8.
static void q4_K_to_q4_Kx8(const uint8_t * const in[8], uint8_t * out) {
    uint8_t s[8][8], m[8][8]; // [row][sub-block] 6-bit scale and min, unpacked from each row's 12 bytes
    for (int j = 0; j < 8; ++j) {
        std::memcpy(out + 2 * j, in[j], 2);          // d
        std::memcpy(out + 16 + 2 * j, in[j] + 2, 2); // dmin
        const uint8_t * q = in[j] + 4;
        for (int k = 0; k < 4; ++k) {
            s[j][k] = q[k] & 63;
            m[j][k] = q[k + 4] & 63;
            s[j][k + 4] = (q[k + 8] & 15) | ((q[k] >> 6) << 4);
            m[j][k + 4] = (q[k + 8] >> 4) | ((q[k + 4] >> 6) << 4);
        }
    }
    for (int sb = 0; sb < 8; ++sb) { // the 8 rows' pairs of sub-block sb packed as a Q4_K row packs its sub-blocks
        uint8_t * g = out + 32 + 12 * sb;
        for (int j = 0; j < 4; ++j) {
            g[j] = (uint8_t) (s[j][sb] | ((s[j + 4][sb] >> 4) << 6));
            g[j + 4] = (uint8_t) (m[j][sb] | ((m[j + 4][sb] >> 4) << 6));
            g[j + 8] = (uint8_t) ((s[j + 4][sb] & 15) | ((m[j + 4][sb] & 15) << 4));
        }
    }
    uint8_t * qs = out + 128;
    for (int p = 0; p < 16; ++p)
        for (int j = 0; j < 8; ++j) std::memcpy(qs + 8 * (8 * p + j), in[j] + 16 + 8 * p, 8);
}

void q4_K_to_q4_Kx8_rows(const void * src, void * dst, int64_t ne0, int64_t ne1) {
    const int64_t nb = ne0 / 256;
    for (int64_t g = 0; g < ne1 / 8; ++g)
        for (int64_t x = 0; x < nb; ++x) {
            const uint8_t * in[8];
            for (int i = 0; i < 8; ++i) in[i] = (const uint8_t *) src + ((g * 8 + i) * nb + x) * kQ4K;
            q4_K_to_q4_Kx8(in, (uint8_t *) dst + (g * nb + x) * kQ4Kx8);
        }
}

// dst [ne0, ne1] Q4_K (plain rows) from src, a 2-D view of a repacked slot; rows split in groups of 8 over threads
static void op_unrepack_q4_K(ggml_tensor * dst, int ith, int nth, void *) {
    const uint8_t * src = (const uint8_t *) dst->src[0]->data;
    const int64_t nb = dst->ne[0] / 256, groups = dst->ne[1] / 8;
    for (int64_t g = groups * ith / nth; g < groups * (ith + 1) / nth; ++g)
        for (int64_t x = 0; x < nb; ++x) {
            uint8_t * out[8];
            for (int i = 0; i < 8; ++i) out[i] = (uint8_t *) dst->data + ((g * 8 + i) * nb + x) * kQ4K;
            q4_Kx8_to_q4_K(src + (g * nb + x) * kQ4Kx8, out);
        }
}

// A Q4_K tensor of pseudo-random bytes through buft's repack: do q4_K_to_q4_Kx8_rows and q4_Kx8_to_q4_K give the
// same bytes as ggml, both ways? Every bit of every field is checked.
static bool layout_matches(ggml_backend_buffer_type_t buft) {
    if (ggml_type_size(GGML_TYPE_Q4_K) != kQ4K) return false;
    ggml_init_params ip = {ggml_tensor_overhead(), nullptr, true};
    ggml_context * ctx = ggml_init(ip);
    ggml_tensor * t = ggml_new_tensor_2d(ctx, GGML_TYPE_Q4_K, 512, 8);
    ggml_backend_buffer_t buf = ggml_backend_buft_alloc_buffer(buft, ggml_backend_buft_get_alloc_size(buft, t));
    bool ok = buf && ggml_backend_tensor_alloc(buf, t, ggml_backend_buffer_get_base(buf)) == GGML_STATUS_SUCCESS &&
              t->extra != nullptr; // ggml repacks it (else it is plain already)
    if (ok) {
        std::vector<uint8_t> plain(ggml_nbytes(t)), back(plain.size()), packed(plain.size());
        uint32_t x = 2463534242u; // xorshift bytes
        for (uint8_t & b : plain) {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            b = (uint8_t) x;
        }
        ggml_backend_tensor_set(t, plain.data(), 0, plain.size());
        for (int64_t xb = 0; xb < 2; ++xb) {
            uint8_t * out[8];
            for (int i = 0; i < 8; ++i) out[i] = back.data() + (i * 2 + xb) * kQ4K;
            q4_Kx8_to_q4_K((const uint8_t *) t->data + xb * kQ4Kx8, out);
        }
        q4_K_to_q4_Kx8_rows(plain.data(), packed.data(), 512, 8);
        ok = back == plain && std::memcmp(packed.data(), t->data, packed.size()) == 0;
    }
    if (buf) ggml_backend_buffer_free(buf);
    ggml_free(ctx);
    return ok;
}

bool q4_Kx8_layout_check(ggml_backend_buffer_type_t buft) {
    if (!buft) return false;
    static const bool ok = layout_matches(buft); // buft is the CPU backend's one CPU_REPACK type: once
    return ok;
}

bool unrepack_q4_K_check(ggml_backend_buffer_type_t buft) {
#if defined(__x86_64__) || defined(_M_X64)
    return ggml_cpu_has_avx2() && !std::getenv("MOELITE_NO_UNREPACK") && q4_Kx8_layout_check(buft);
#else
    (void) buft;
    return false; // ggml's tiled GEMM is x86-only
#endif
}

// The weight w [ne0, ne1] for a matmul over n tokens: a plain copy of it in graph scratch where it is repacked Q4_K
// and n is enough for ggml's tiled GEMM, else w itself.
ggml_tensor * Model::tiled_weight(ggml_context * ctx, ggml_tensor * w, bool repacked, int64_t n) const {
    if (!unrepack_q4_K_ || !repacked || w->type != GGML_TYPE_Q4_K || n < kTiledMinRows) return w;
    return ggml_custom_4d(ctx, GGML_TYPE_Q4_K, w->ne[0], w->ne[1], 1, 1, &w, 1, op_unrepack_q4_K, GGML_N_TASKS_MAX,
                          nullptr);
}

// A dense weight (in buf_rp_ when repacked) times x [ne0, n].
ggml_tensor * Model::dense_mm(ggml_context * ctx, ggml_tensor * w, ggml_tensor * x) const {
    return ggml_mul_mat(ctx, tiled_weight(ctx, w, buf_rp_ && w->buffer == buf_rp_, x->ne[1]), x);
}

} // namespace moelite
