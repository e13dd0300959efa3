// Attention on the CPU as ggml custom ops, for a KV cache in F16 or F32, and Q8_0 in decode steps of one token and
// in prompt ubatches
// (flash attention's layout: V untransposed):
//
// attn_decode, decode steps and ubatches below 64 tokens: for each KV head, one pass over its cached positions that
// serves every query head sharing it (GQA: 8 on Qwen3-30B-A3B, all of them with MLA), each K and V row converted to
// F32 once, the softmax online and the V sums in F32. ggml's flash attention runs those one query head at a time,
// converting the query to F16, dotting it with every F16 K row and summing V in F16, so each K/V row is read and
// converted once per query head (~20 % of a Qwen3-30B-shaped decode step at a 600-token context). At long contexts
// the KV range splits into parts (decode_splits: by the shapes, not the threads), each part a work item of its own,
// and attn_combine merges the parts' softmax sums; on AVX2 and AVX-512 CPUs a kernel with the heads across the
// vector lanes (the portable loops spill on AVX2's 16 registers and store each head's output once per position), and
// the next block's rows prefetched: a long context's decode reads the cache at the memory's speed (bench_attn.py).
//
// attn_prompt, ubatches of 64 tokens and more: tiles of 64 query rows x 64 KV positions, a row being one (token,
// query head) pair of one KV head's group, so each K/V tile is converted once for all the heads sharing it and the
// causal diagonal wastes at most a few tokens' rows. Scores as one GEMM (S^T = K_tile Q^T, the queries transposed
// once per item, K rows used as they lie), the online softmax down S^T's columns, O += P V as a second GEMM; both
// GEMMs by one register-blocked kernel (AVX-512 / AVX2+FMA / portable). ggml's tiled path runs a tile per query
// head: it converts and transposes the K tile (element by element), and converts the mask, once per head.
//
// Inputs as ggml_flash_attn_ext takes them, q unpermuted: q [dk, n_head, T] F32, K [dk, n_kv, h_kv] and
// V [dv, n_kv, h_kv] (F16, F32 or Q8_0 views of the cache), mask [n_kv, >= T] F16 (0 / -inf), sinks [n_head] F32 or none;
// out [dv, n_head, T] F32. Both sum in F32 and differ from ggml's op in rounding only; which op runs depends on the
// ubatch size alone, so offloading still changes no bit. A NaN score poisons its head's output, as in ggml.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <memory>
#include <vector>
#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#endif

#include "graph_util.h"
#include "model.h"

namespace moelite {

// The three inner loops, compiled for AVX-512, AVX2 and the baseline on x86-64 with GCC (ifunc picks one at load);
// elsewhere as the build targets (NEON is the aarch64 baseline).
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define MOELITE_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define MOELITE_CLONES
#endif

constexpr int kHeads = 8;  // query heads scored together: each K element loaded once feeds kHeads FMAs
constexpr int kBlock = 32; // KV positions per block: scores, one softmax update and one pass over V per block

// s[r * kBlock + j] = q_r . k_j for RH query rows q [RH, d] and n (<= kBlock) key rows k [n, d]: RH independent
// accumulator rows, so the FMAs do not wait on each other. One function per RH in {1, 2, 4, 8} (a group of R heads
// runs the next one up; qf's extra rows are zeros).
#define MOELITE_SCORES(NAME, RH)                                                                                       \
    MOELITE_CLONES static void NAME(const float * q, const float * k, int n, int64_t d, float * s) {                   \
        int j = 0;                                                                                                     \
        for (; j + 2 <= n; j += 2) { /* two keys per pass: each q load feeds two FMAs */                               \
            const float *k0 = k + j * d, *k1 = k0 + d;                                                                 \
            float a0[RH][16] = {}, a1[RH][16] = {};                                                                    \
            int64_t i = 0;                                                                                             \
            for (; i + 16 <= d; i += 16)                                                                               \
                for (int r = 0; r < RH; ++r)                                                                           \
                    for (int l = 0; l < 16; ++l) {                                                                     \
                        a0[r][l] += q[r * d + i + l] * k0[i + l];                                                      \
                        a1[r][l] += q[r * d + i + l] * k1[i + l];                                                      \
                    }                                                                                                  \
            for (int r = 0; r < RH; ++r) {                                                                             \
                float t0 = 0.f, t1 = 0.f;                                                                              \
                for (int l = 0; l < 16; ++l) {                                                                         \
                    t0 += a0[r][l];                                                                                    \
                    t1 += a1[r][l];                                                                                    \
                }                                                                                                      \
                for (int64_t e = i; e < d; ++e) {                                                                      \
                    t0 += q[r * d + e] * k0[e];                                                                        \
                    t1 += q[r * d + e] * k1[e];                                                                        \
                }                                                                                                      \
                s[r * kBlock + j] = t0;                                                                                \
                s[r * kBlock + j + 1] = t1;                                                                            \
            }                                                                                                          \
        }                                                                                                              \
        for (; j < n; ++j) {                                                                                           \
            const float * kj = k + j * d;                                                                              \
            float acc[RH][16] = {};                                                                                    \
            int64_t i = 0;                                                                                             \
            for (; i + 16 <= d; i += 16)                                                                               \
                for (int r = 0; r < RH; ++r)                                                                           \
                    for (int l = 0; l < 16; ++l) acc[r][l] += q[r * d + i + l] * kj[i + l];                            \
            for (int r = 0; r < RH; ++r) {                                                                             \
                float t = 0.f;                                                                                         \
                for (int l = 0; l < 16; ++l) t += acc[r][l];                                                           \
                for (int64_t e = i; e < d; ++e) t += q[r * d + e] * kj[e];                                             \
                s[r * kBlock + j] = t;                                                                                 \
            }                                                                                                          \
        }                                                                                                              \
    }
MOELITE_SCORES(scores1, 1)
MOELITE_SCORES(scores2, 2)
MOELITE_SCORES(scores4, 4)
MOELITE_SCORES(scores8, 8)
#undef MOELITE_SCORES

static void scores(const float * q, int R, const float * k, int n, int64_t d, float * s) {
    if (R <= 1)
        scores1(q, k, n, d, s);
    else if (R <= 2)
        scores2(q, k, n, d, s);
    else if (R <= 4)
        scores4(q, k, n, d, s);
    else
        scores8(q, k, n, d, s);
}

// e^x, x <= 0 (or -inf -> 0), branch-free so that it vectorizes: 2^(x log2 e) split into 2^n (exponent bits) and a
// degree-6 polynomial of 2^f, f in [-0.5, 0.5]; relative error ~2e-7 (about one float ulp), as ggml's SIMD exp.
static inline float exp_le0(float x) {
    const float t = std::max(x, -87.0f) * 1.44269504088896341f;
    const float fn = std::nearbyint(t), f = t - fn;
    float p = 1.535336188319500e-4f;
    p = p * f + 1.339887440266574e-3f;
    p = p * f + 9.618437357674640e-3f;
    p = p * f + 5.550332471162809e-2f;
    p = p * f + 2.402264791363012e-1f;
    p = p * f + 6.931472028550421e-1f;
    p = p * f + 1.0f;
    int32_t bits;
    std::memcpy(&bits, &p, 4);
    bits += (int32_t) fn * (1 << 23);
    float y;
    std::memcpy(&y, &bits, 4);
    return x == -INFINITY ? 0.f : x != x ? x : y; // NaN stays NaN
}

MOELITE_CLONES static void exp_block(float * x, int n) {
    for (int i = 0; i < n; ++i) x[i] = exp_le0(x[i]);
}

MOELITE_CLONES static void axpy_f32(float * y, const float * x, float a, int64_t n) {
    for (int64_t i = 0; i < n; ++i) y[i] += a * x[i];
}

MOELITE_CLONES static void scale_f32(float * y, float a, int64_t n) {
    for (int64_t i = 0; i < n; ++i) y[i] *= a;
}

// F16 -> F32: 8 at a time with F16C where the CPU has it (every x86-64-v3 CPU), else ggml's conversion
#if defined(__x86_64__) && defined(__GNUC__)
__attribute__((target("avx,f16c"))) static void row_to_f32_f16c(const ggml_fp16_t * x, float * y, int64_t n) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(y + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *) (x + i))));
    if (i < n) ggml_fp16_to_fp32_row(x + i, y + i, n - i);
}
// Q8_0 -> F32: per block of 32, the F16 scale times the 32 int8 as floats, 8 at a time
__attribute__((target("avx2,f16c"))) static void q8_0_to_f32_avx2(const void * x, float * y, int64_t n) {
    const uint8_t * b = (const uint8_t *) x; // blocks of [F16 d | 32 x int8]
    for (int64_t i = 0; i < n; i += 32, b += 34) {
        uint16_t d16;
        std::memcpy(&d16, b, 2);
        const __m256 d = _mm256_cvtph_ps(_mm_set1_epi16((short) d16));
        for (int u = 0; u < 4; ++u) {
            const __m256i q = _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *) (b + 2 + 8 * u)));
            _mm256_storeu_ps(y + i + 8 * u, _mm256_mul_ps(d, _mm256_cvtepi32_ps(q)));
        }
    }
}
static const bool kHasF16C = __builtin_cpu_supports("f16c");
static const bool kHasAvx2F16C = kHasF16C && __builtin_cpu_supports("avx2");
static void row_to_f32(const ggml_fp16_t * x, float * y, int64_t n) {
    if (kHasF16C)
        row_to_f32_f16c(x, y, n);
    else
        ggml_fp16_to_fp32_row(x, y, n);
}
#else
static void row_to_f32(const ggml_fp16_t * x, float * y, int64_t n) { ggml_fp16_to_fp32_row(x, y, n); }
#endif

// Row j of KV head g of a K or V view (F32, F16 or Q8_0), as F32 into dst.
static void kv_row(const ggml_tensor * t, int64_t j, int64_t g, float * dst) {
    const char * p = (const char *) t->data + j * t->nb[1] + g * t->nb[2];
    if (t->type == GGML_TYPE_F32)
        std::memcpy(dst, p, t->ne[0] * sizeof(float));
    else if (t->type == GGML_TYPE_F16)
        row_to_f32((const ggml_fp16_t *) p, dst, t->ne[0]);
#if defined(__x86_64__) && defined(__GNUC__)
    else if (kHasAvx2F16C)
        q8_0_to_f32_avx2(p, dst, t->ne[0]);
#endif
    else
        ggml_get_type_traits(t->type)->to_float(p, dst, t->ne[0]);
}

// Output row o [dv] from its accumulated V sum acc [dv], the running maximum M and sum S of its softmax: the sink
// of head h if sinks (gpt-oss: one more logit per head that takes softmax mass, no value), then acc / S (NaN if a
// score was NaN, 0 if every position was masked).
static void finish_row(float * o, int64_t dv, const ggml_tensor * sinks, int64_t h, float * acc, float M, float S,
                       bool nan) {
    if (sinks) {
        const float s = ((const float *) sinks->data)[h];
        float ms = 1.f, vs = 1.f;
        if (s > M)
            ms = std::exp(M - s);
        else
            vs = std::exp(s - M);
        S = S * ms + vs;
        scale_f32(acc, ms, dv);
    }
    const float inv = nan ? NAN : S == 0.f ? 0.f : 1.f / S;
    for (int64_t i = 0; i < dv; ++i) o[i] = acc[i] * inv;
}

// ---- attn_decode ----
//
// One work item: query heads [h0, h0 + R) of KV head g, token t, over the KV positions [j0, j1): the heads' V sums
// acc [R][dv] (unnormalized), softmax maxima M [R] and sums S [R], and whether a score was NaN.
struct DecodeItem {
    const ggml_tensor *q, *k, *v, *mask;
    float scale;
    int64_t g, t, h0, j0, j1;
    int R;
};

// Scratch of one thread: the queries qf [groups][kHeads][dk], K and V blocks kb [KV heads][kBlock][dk] and
// vb [KV heads][kBlock][dv], scores sc [groups][kBlock][kHeads]; with the AVX2 kernel per group its NaN flags and
// rescaling factors, bad and alpha [groups][kHeads].
struct DecodeScratch {
    float *qf, *kb, *vb, *sc, *bad, *alpha;
};

// The block's mask from position j0 on as F32 into mk [n]; false if every position is masked (causal future,
// outside a sliding window).
static bool block_mask(const DecodeItem & w, int64_t j0, int n, float * mk) {
    const ggml_fp16_t * mrow =
        w.mask ? (const ggml_fp16_t *) ((const char *) w.mask->data + w.t * w.mask->nb[1]) : nullptr;
    bool any = false;
    for (int j = 0; j < n; ++j) {
        mk[j] = mrow ? ggml_fp16_to_fp32(mrow[j0 + j]) : 0.f;
        any = any || mk[j] != -INFINITY;
    }
    return any;
}

static void load_queries(const DecodeItem & w, float * qf) {
    const int64_t dk = w.q->ne[0];
    std::fill(qf, qf + kHeads * dk, 0.f);
    for (int r = 0; r < w.R; ++r)
        std::memcpy(qf + r * dk, (const char *) w.q->data + (w.h0 + r) * w.q->nb[1] + w.t * w.q->nb[2],
                    dk * sizeof(float));
}

// Any SIMD level: heads kHeads at a time over blocks of kBlock positions: the block's K rows to F32, the scores
// (scores() above), one online-softmax update per head (the sums so far rescaled when the maximum grows), the block's
// V rows to F32 and their weighted sum.
static void decode_range(const DecodeItem & w, DecodeScratch & b, float * acc, float * M, float * S, bool * nan) {
    const int64_t dk = w.q->ne[0], dv = w.v->ne[0];
    float mk[kBlock];
    load_queries(w, b.qf);
    for (int r = 0; r < w.R; ++r) {
        M[r] = -INFINITY;
        S[r] = 0.f;
        nan[r] = false;
    }
    for (int64_t j0 = w.j0; j0 < w.j1; j0 += kBlock) {
        const int n = (int) std::min<int64_t>(kBlock, w.j1 - j0);
        if (!block_mask(w, j0, n, mk)) continue;
        for (int j = 0; j < n; ++j) kv_row(w.k, j0 + j, w.g, b.kb + j * dk);
        scores(b.qf, w.R, b.kb, n, dk, b.sc);
        bool converted = false;
        for (int r = 0; r < w.R; ++r) {
            float * s = b.sc + r * kBlock;
            float mb = -INFINITY;
            for (int j = 0; j < n; ++j) {
                s[j] = mk[j] == -INFINITY ? -INFINITY : s[j] * w.scale + mk[j];
                nan[r] = nan[r] || std::isnan(s[j]);
                mb = std::max(mb, s[j]);
            }
            if (mb == -INFINITY) continue;
            const float m_new = std::max(M[r], mb);
            if (m_new > M[r]) { // the maximum grew: rescale what was summed so far
                const float ms = M[r] == -INFINITY ? 0.f : std::exp(M[r] - m_new);
                S[r] *= ms;
                scale_f32(acc + r * dv, ms, dv);
                M[r] = m_new;
            }
            for (int j = 0; j < n; ++j) s[j] -= m_new;
            exp_block(s, n);
            if (!converted) {
                for (int j = 0; j < n; ++j) kv_row(w.v, j0 + j, w.g, b.vb + j * dv);
                converted = true;
            }
            for (int j = 0; j < n; ++j) {
                S[r] += s[j];
                if (s[j] != 0.f) axpy_f32(acc + r * dv, b.vb + j * dv, s[j], dv);
            }
        }
    }
}

#if defined(__x86_64__) && defined(__GNUC__)
// AVX2 + FMA, 1 to 8 heads sharing a KV head, head sizes multiples of 8: the heads lie across a vector's 8 lanes.
// AVX-512 CPUs run it too: on one (2 threads, Qwen3-30B-A3B's heads) it took 0.9-1.3 ms per layer at a 4096-token F16
// context where the AVX-512 clone of the portable loops took 2.8-3.1 ms (bench_attn.py A/B, bench/RESULTS.md): the
// portable loops load and store each head's output once per position, whatever the vector width. Fewer than 5 heads
// per KV head leave softmax lanes idle and it still wins (bench_attn.py, 4096-token F16 context, same machine: 32
// heads on 8 KV heads x 128, 1.46 against 2.32 ms; 16 on 8, 1.46 against 1.64; 16 on 16, 4.2 against 7.0; 4 on 2 x
// 64, 0.26 against 0.27, and 0.82 against 0.97 at 16384).
// Per block: the K rows to F32; per position, 8 accumulators (one per head) over dk, summed across into one vector
// of 8 scores, or with 4 heads or fewer 8 positions at a time per head (scores_by_position: no FMAs on idle lanes);
// the online softmax for the 8 heads at once; the V rows to F32 and, per head, 64 output columns at a time in
// registers over the block's positions. The portable loops above spill their 2 x 8 x 16 accumulators on AVX2's 16
// registers and load and store the output once per position and head.
#define MOELITE_AVX2 __attribute__((target("avx2,fma,f16c")))

// Rows [j0, j1) of KV heads [g0, g0 + n_g) of K and V into the caches: the next block's, while this one computes
// (one cache row holds every head of a position; the rows lie far apart, a stride the hardware prefetchers follow
// late)
static void prefetch_rows(const DecodeItem & w, int64_t g0, int64_t n_g, int64_t j0, int64_t j1) {
    for (const ggml_tensor * t : {w.k, w.v}) {
        const size_t span = (n_g - 1) * t->nb[2] + ggml_row_size(t->type, t->ne[0]);
        const char * p = (const char *) t->data + g0 * t->nb[2];
        for (int64_t j = j0; j < j1; ++j)
            for (size_t o = 0; o < span; o += 64) __builtin_prefetch(p + j * t->nb[1] + o);
    }
}

// lanes r = the sum of a[r]'s 8 lanes
MOELITE_AVX2 static inline __m256 sum_across8(const __m256 * a) {
    const __m256 s0123 = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
    const __m256 s4567 = _mm256_hadd_ps(_mm256_hadd_ps(a[4], a[5]), _mm256_hadd_ps(a[6], a[7]));
    return _mm256_add_ps(_mm256_permute2f128_ps(s0123, s4567, 0x20), _mm256_permute2f128_ps(s0123, s4567, 0x31));
}

// exp_le0 on 8 lanes: the same reduction and polynomial
MOELITE_AVX2 static inline __m256 exp_le0_8(__m256 x) {
    const __m256 t = _mm256_mul_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.0f)), _mm256_set1_ps(1.44269504088896341f));
    const __m256 fn = _mm256_round_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC), f = _mm256_sub_ps(t, fn);
    __m256 p = _mm256_set1_ps(1.535336188319500e-4f);
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.339887440266574e-3f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(9.618437357674640e-3f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(5.550332471162809e-2f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(2.402264791363012e-1f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(6.931472028550421e-1f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.0f));
    const __m256i e = _mm256_slli_epi32(_mm256_cvtps_epi32(fn), 23);
    __m256 y = _mm256_castsi256_ps(_mm256_add_epi32(_mm256_castps_si256(p), e));
    y = _mm256_blendv_ps(y, _mm256_setzero_ps(), _mm256_cmp_ps(x, _mm256_set1_ps(-INFINITY), _CMP_EQ_OQ));
    return _mm256_blendv_ps(y, x, _mm256_cmp_ps(x, x, _CMP_UNORD_Q)); // NaN stays NaN
}

// acc [dv] += sum_j p[j * kHeads] vb [j][dv] over n positions, NV x 8 columns from column i0
template <int NV>
MOELITE_AVX2 static inline void pv_cols(float * acc, const float * p, const float * vb, int n, int64_t dv, int64_t i0) {
    __m256 a[NV];
    for (int u = 0; u < NV; ++u) a[u] = _mm256_loadu_ps(acc + i0 + 8 * u);
    for (int j = 0; j < n; ++j) {
        const __m256 pj = _mm256_broadcast_ss(p + j * kHeads);
        const float * v = vb + j * dv + i0;
        for (int u = 0; u < NV; ++u) a[u] = _mm256_fmadd_ps(pj, _mm256_loadu_ps(v + 8 * u), a[u]);
    }
    for (int u = 0; u < NV; ++u) _mm256_storeu_ps(acc + i0 + 8 * u, a[u]);
}

MOELITE_AVX2 static void pv_row(float * acc, const float * p, const float * vb, int n, int64_t dv) {
    int64_t i0 = 0;
    for (; i0 + 64 <= dv; i0 += 64) pv_cols<8>(acc, p, vb, n, dv, i0);
    for (; i0 + 32 <= dv; i0 += 32) pv_cols<4>(acc, p, vb, n, dv, i0);
    for (; i0 < dv; i0 += 8) pv_cols<1>(acc, p, vb, n, dv, i0);
}

// Raw scores of 1 to 4 heads sharing a KV head, for n (<= kBlock) positions: sc [j][kHeads] = q_r . k_j for r < R,
// 0 in the other lanes. Eight positions at a time per head, their accumulators summed across into one vector: R x dk
// FMAs per position where the eight-head loop below runs 8 x dk (the idle heads' lanes) and loads a query vector for
// each. The same products in the same order (lane sums of each accumulator, then sum_across8), so the bits are the
// eight-head loop's.
MOELITE_AVX2 static void scores_by_position(const float * qf, int R, const float * kb, int n, int64_t dk, float * sc) {
    std::fill(sc, sc + n * kHeads, 0.f);
    for (int r = 0; r < R; ++r) {
        const float * q = qf + r * dk;
        for (int j0 = 0; j0 < n; j0 += 8) {
            const int np = std::min(8, n - j0);
            __m256 a[8];
            for (int p = 0; p < 8; ++p) a[p] = _mm256_setzero_ps();
            for (int64_t i = 0; i < dk; i += 8) {
                const __m256 qv = _mm256_loadu_ps(q + i);
                for (int p = 0; p < np; ++p) a[p] = _mm256_fmadd_ps(qv, _mm256_loadu_ps(kb + (j0 + p) * dk + i), a[p]);
            }
            float t[8];
            _mm256_storeu_ps(t, sum_across8(a));
            for (int p = 0; p < np; ++p) sc[(j0 + p) * kHeads + r] = t[p];
        }
    }
}

// Query-head groups [grp, grp + n_grp) of one token and KV range (DecodeItem: heads [h0, h0 + R) of KV head g, R <= 8;
// sorted by g, KV heads g0 = grp[0].g ... grp[n_grp - 1].g): per group its V sums acc [n_grp][kHeads][dv], maxima M,
// sums S and NaN flags [n_grp][kHeads]. Per block of positions: the K rows of every KV head to F32 (a cache row holds
// all KV heads of a position: read as it lies, where one KV head per item read a strided slice of each row; with
// 16 heads on 16 KV heads x 128 at 4096 positions, bench_attn.py, interleaved: 1.9-2.1 ms per layer against 3.9-4.2
// in one session's A/B, equal (2.1-2.5 both) in a later one on the same host, never slower), each group's scores and
// online softmax (the heads across a vector's 8 lanes), the V rows of every KV head, each group's weighted V sums.
// Per group the same operations in the same order as one group alone, so the bits do not depend on how groups are
// gathered into items. (Packing the heads of several KV heads into one group's lanes when a KV head has fewer than
// 8 was tried: bit-identical, no faster in bench_attn.py on 16/16 x 128 or 4/2 x 64, so not kept.)
MOELITE_AVX2 static void decode_groups_avx2(const DecodeItem * grp, int n_grp, DecodeScratch & b, float * acc,
                                            float * M, float * S, bool * nan) {
    const DecodeItem & w = grp[0];
    const int64_t dk = w.q->ne[0], dv = w.v->ne[0], g0 = w.g, n_g = grp[n_grp - 1].g - g0 + 1;
    float mk[kBlock];
    for (int u = 0; u < n_grp; ++u) {
        load_queries(grp[u], b.qf + u * kHeads * dk);
        for (int r = 0; r < kHeads; ++r) { // running maximum, sum and NaN flag per head: lanes of the group's vector
            M[u * kHeads + r] = -INFINITY;
            S[u * kHeads + r] = 0.f;
            b.bad[u * kHeads + r] = 0.f;
        }
    }
    const __m256 scale = _mm256_set1_ps(w.scale), neg_inf = _mm256_set1_ps(-INFINITY);
    for (int64_t j0 = w.j0; j0 < w.j1; j0 += kBlock) {
        const int n = (int) std::min<int64_t>(kBlock, w.j1 - j0);
        if (!block_mask(w, j0, n, mk)) continue;
        prefetch_rows(w, g0, n_g, j0 + kBlock, std::min<int64_t>(j0 + 2 * kBlock, w.j1));
        for (int j = 0; j < n; ++j)
            for (int64_t gi = 0; gi < n_g; ++gi) kv_row(w.k, j0 + j, g0 + gi, b.kb + (gi * kBlock + j) * dk);
        for (int u = 0; u < n_grp; ++u) {
            const DecodeItem & e = grp[u];
            const float *qf = b.qf + u * kHeads * dk, *kb = b.kb + (e.g - g0) * kBlock * dk;
            float * sc = b.sc + u * kBlock * kHeads;
            const bool by_position = e.R <= 4;
            if (by_position) scores_by_position(qf, e.R, kb, n, dk, sc);
            __m256 mb = neg_inf, bad = _mm256_loadu_ps(b.bad + u * kHeads);
            for (int j = 0; j < n; ++j) { // scores of position j: sc [j][kHeads]
                __m256 dot;
                if (by_position)
                    dot = _mm256_loadu_ps(sc + j * kHeads);
                else {
                    __m256 a[kHeads];
                    for (int r = 0; r < kHeads; ++r) a[r] = _mm256_setzero_ps();
                    const float * kj = kb + j * dk;
                    for (int64_t i = 0; i < dk; i += 8) {
                        const __m256 kv = _mm256_loadu_ps(kj + i);
                        for (int r = 0; r < kHeads; ++r)
                            a[r] = _mm256_fmadd_ps(_mm256_loadu_ps(qf + r * dk + i), kv, a[r]);
                    }
                    dot = sum_across8(a);
                }
                __m256 s = mk[j] == -INFINITY ? neg_inf : _mm256_fmadd_ps(dot, scale, _mm256_set1_ps(mk[j]));
                bad = _mm256_or_ps(bad, _mm256_cmp_ps(s, s, _CMP_UNORD_Q));
                mb = _mm256_max_ps(s, mb); // a NaN score is not a maximum
                _mm256_storeu_ps(sc + j * kHeads, s);
            }
            // online softmax for the 8 heads: the new maxima, the factor the sums so far are rescaled by (1 if the
            // maximum did not grow, 0 while a head saw only masked positions)
            const __m256 m = _mm256_loadu_ps(M + u * kHeads), m_new = _mm256_max_ps(mb, m);
            const __m256 grew = _mm256_cmp_ps(m_new, m, _CMP_GT_OQ);
            const __m256 a_ = _mm256_blendv_ps(exp_le0_8(_mm256_sub_ps(m, m_new)), _mm256_setzero_ps(),
                                               _mm256_cmp_ps(m, neg_inf, _CMP_EQ_OQ));
            const __m256 al = _mm256_blendv_ps(_mm256_set1_ps(1.f), a_, grew);
            const __m256 ms = _mm256_blendv_ps(m_new, _mm256_setzero_ps(), _mm256_cmp_ps(m_new, neg_inf, _CMP_EQ_OQ));
            __m256 bs = _mm256_setzero_ps();
            for (int j = 0; j < n; ++j) {
                const __m256 p = exp_le0_8(_mm256_sub_ps(_mm256_loadu_ps(sc + j * kHeads), ms));
                bs = _mm256_add_ps(bs, p);
                _mm256_storeu_ps(sc + j * kHeads, p);
            }
            _mm256_storeu_ps(M + u * kHeads, m_new);
            _mm256_storeu_ps(S + u * kHeads, _mm256_fmadd_ps(_mm256_loadu_ps(S + u * kHeads), al, bs));
            _mm256_storeu_ps(b.bad + u * kHeads, bad);
            _mm256_storeu_ps(b.alpha + u * kHeads, al);
        }
        for (int j = 0; j < n; ++j)
            for (int64_t gi = 0; gi < n_g; ++gi) kv_row(w.v, j0 + j, g0 + gi, b.vb + (gi * kBlock + j) * dv);
        for (int u = 0; u < n_grp; ++u) {
            const float * vb = b.vb + (grp[u].g - g0) * kBlock * dv;
            for (int r = 0; r < grp[u].R; ++r) {
                float * a = acc + (u * kHeads + r) * dv;
                if (b.alpha[u * kHeads + r] != 1.f) scale_f32(a, b.alpha[u * kHeads + r], dv);
                pv_row(a, b.sc + u * kBlock * kHeads + r, vb, n, dv);
            }
        }
    }
    for (int i = 0; i < n_grp * kHeads; ++i) nan[i] = b.bad[i] != 0.f; // all ones (a NaN pattern) where one was
}
static const bool kHasAvx2 =
    __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
#endif

// The KV range of a decode step splits into this many parts, each its own work item, when there are few (KV head,
// token) pairs: up to kSplitItems items in all, parts of kSplitLen positions at least. It depends on the shapes
// alone, not on the threads, so that a run gives the same bits on any number of threads.
constexpr int64_t kSplitLen = 512, kSplitItems = 32;
static int64_t decode_splits(int64_t n_kv, int64_t h_kv, int64_t T) {
    return std::max<int64_t>(1, std::min(n_kv / kSplitLen, kSplitItems / (h_kv * T)));
}

// Work items: (token t, part s of the KV range, chunk of G KV heads, chunk c of each KV head's query heads). An item
// reads its KV heads' slices of each cache row together (decode_groups_avx2): G as many as keep a block's F32 K rows
// within kKvBlockBytes, fewer where that leaves a thread without an item; a group's query heads split into chunks
// only when there are still fewer items than threads (MLA: one KV head). Each item runs its heads kHeads at a time
// (groups). Items of the same KV range lie next to each other, so the threads read the same rows at about the same
// time. dst: [dv, n_head, T] the output rows, or with a split range [dv + 2, n_head, T, n_split] each part's
// unnormalized V sums, maximum and sum for attn_combine.
constexpr int64_t kKvBlockBytes = 256 << 10;
static void op_attn_decode(ggml_tensor * dst, int ith, int nth, void * userdata) {
    const ggml_tensor *q = dst->src[0], *k = dst->src[1], *v = dst->src[2], *mask = dst->src[3];
    const int64_t dk = q->ne[0], n_head = q->ne[1], T = q->ne[2], dv = v->ne[0], n_kv = k->ne[1], h_kv = k->ne[2];
    const int64_t rk = n_head / h_kv, n_split = dst->ne[3], part = (n_kv + n_split - 1) / n_split;
    const int64_t G = std::max<int64_t>(
        1, std::min({h_kv, kKvBlockBytes / (kBlock * std::max(dk, dv) * 4), h_kv * T * n_split / nth}));
    const int64_t n_gc = (h_kv + G - 1) / G, pairs = T * n_split * n_gc;
    const int64_t n_chunk = std::min<int64_t>(rk, (nth + pairs - 1) / pairs), per = (rk + n_chunk - 1) / n_chunk;
    const int64_t max_grp = G * ((per + kHeads - 1) / kHeads);
    thread_local std::vector<float> buf; // this thread's, kept between steps (no allocation per step)
    buf.resize((size_t) (max_grp * kHeads * (dv + dk + kBlock + 4) + G * kBlock * (dk + dv)));
    float * acc = buf.data();
    DecodeScratch b;
    b.qf = acc + max_grp * kHeads * dv;
    b.kb = b.qf + max_grp * kHeads * dk;
    b.vb = b.kb + G * kBlock * dk;
    b.sc = b.vb + G * kBlock * dv;
    b.bad = b.sc + max_grp * kBlock * kHeads;
    b.alpha = b.bad + max_grp * kHeads;
    float *M = b.alpha + max_grp * kHeads, *S = M + max_grp * kHeads;
    thread_local std::vector<DecodeItem> grp;
    thread_local std::unique_ptr<bool[]> nan;
    thread_local int64_t nan_cap = 0;
    if (nan_cap < max_grp * kHeads) nan.reset(new bool[nan_cap = max_grp * kHeads]);
    for (int64_t it = ith; it < pairs * n_chunk; it += nth) {
        const int64_t c = it % n_chunk, gc = it / n_chunk % n_gc, s = it / (n_chunk * n_gc) % n_split;
        DecodeItem w{q, k, v, mask, *(const float *) userdata, 0, it / (n_chunk * n_gc * n_split), 0, 0, 0, 0};
        w.j0 = std::min(n_kv, s * part);
        w.j1 = std::min(n_kv, w.j0 + part);
        grp.clear();
        for (w.g = gc * G; w.g < std::min(h_kv, (gc + 1) * G); ++w.g) {
            const int64_t c0 = w.g * rk + c * per, c1 = std::min(c0 + per, (w.g + 1) * rk);
            for (w.h0 = c0; w.h0 < c1; w.h0 += kHeads) {
                w.R = (int) std::min<int64_t>(kHeads, c1 - w.h0);
                grp.push_back(w);
            }
        }
        const int n_grp = (int) grp.size();
        if (n_grp == 0) continue; // a last chunk past the group's heads (rk not a multiple of the chunks' size)
        std::fill(acc, acc + n_grp * kHeads * dv, 0.f);
#if defined(__x86_64__) && defined(__GNUC__)
        if (kHasAvx2 && dk % 8 == 0 && dv % 8 == 0)
            decode_groups_avx2(grp.data(), n_grp, b, acc, M, S, nan.get());
        else
#endif
            for (int u = 0; u < n_grp; ++u)
                decode_range(grp[u], b, acc + u * kHeads * dv, M + u * kHeads, S + u * kHeads, nan.get() + u * kHeads);
        for (int u = 0; u < n_grp; ++u)
            for (int r = 0; r < grp[u].R; ++r) {
                const int64_t h = grp[u].h0 + r, i = u * kHeads + r;
                if (n_split == 1) {
                    float * o = (float *) ((char *) dst->data + h * dst->nb[1] + w.t * dst->nb[2]);
                    finish_row(o, dv, dst->src[4], h, acc + i * dv, M[i], S[i], nan[i]);
                } else { // [acc | M | S], S NaN where a score was
                    float * o = (float *) ((char *) dst->data + h * dst->nb[1] + w.t * dst->nb[2] + s * dst->nb[3]);
                    std::memcpy(o, acc + i * dv, dv * sizeof(float));
                    o[dv] = M[i];
                    o[dv + 1] = nan[i] ? NAN : S[i];
                }
            }
    }
}

// The parts of a split decode: parts [dv + 2, n_head, T, n_split] -> dst [dv, n_head, T], per row the parts' sums
// rescaled to their common maximum, then finish_row.
static void op_attn_combine(ggml_tensor * dst, int ith, int nth, void *) {
    const ggml_tensor * parts = dst->src[0];
    const int64_t dv = dst->ne[0], n_head = dst->ne[1], T = dst->ne[2], n_split = parts->ne[3];
    thread_local std::vector<float> acc;
    acc.resize((size_t) dv);
    for (int64_t row = ith; row < n_head * T; row += nth) {
        const int64_t h = row % n_head, t = row / n_head;
        auto part = [&](int64_t s) {
            return (const float *) ((const char *) parts->data + h * parts->nb[1] + t * parts->nb[2] +
                                    s * parts->nb[3]);
        };
        float M = -INFINITY, S = 0.f;
        bool nan = false;
        for (int64_t s = 0; s < n_split; ++s) {
            M = std::max(M, part(s)[dv]);
            nan = nan || std::isnan(part(s)[dv + 1]);
        }
        std::fill(acc.begin(), acc.end(), 0.f);
        for (int64_t s = 0; s < n_split && M != -INFINITY; ++s) {
            const float * p = part(s);
            if (p[dv] == -INFINITY) continue; // every position of the part masked
            const float f = std::exp(p[dv] - M);
            S += p[dv + 1] * f;
            axpy_f32(acc.data(), p, f, dv);
        }
        float * o = (float *) ((char *) dst->data + h * dst->nb[1] + t * dst->nb[2]);
        finish_row(o, dv, dst->src[1], h, acc.data(), M, S, nan);
    }
}

// ---- attn_prompt ----

constexpr int kTile = 64; // KV positions per tile, and query rows (token, head) per work item at most

// C [M x N] = (acc ? C : 0) + A [M x K] B [K x N]: A read as A[i * asi + k * ask] (K rows as they lie, or the
// scores transposed), B and C row-major with leading dimensions ldb and ldc. M a multiple of 4 and N of 16 (the
// callers pad their tiles). Register blocks of 4 rows x 64 columns (AVX-512: 16 accumulators, 4 loads of B and 4
// broadcasts of A per 16 FMAs) or 4 x 16 (AVX2).
#if defined(__x86_64__) && defined(__GNUC__)
template <int RN, bool ACC>
__attribute__((target("avx512f"), always_inline)) inline void block_avx512(float * C, int64_t ldc, const float * A,
                                                                           int64_t asi, int64_t ask, const float * B,
                                                                           int64_t ldb, int64_t K) {
    __m512 c[4][RN];
    for (int i = 0; i < 4; ++i)
        for (int r = 0; r < RN; ++r) c[i][r] = ACC ? _mm512_loadu_ps(C + i * ldc + 16 * r) : _mm512_setzero_ps();
    for (int64_t k = 0; k < K; ++k) {
        __m512 b[RN];
        for (int r = 0; r < RN; ++r) b[r] = _mm512_loadu_ps(B + k * ldb + 16 * r);
        for (int i = 0; i < 4; ++i) {
            const __m512 a = _mm512_set1_ps(A[i * asi + k * ask]);
            for (int r = 0; r < RN; ++r) c[i][r] = _mm512_fmadd_ps(a, b[r], c[i][r]);
        }
    }
    for (int i = 0; i < 4; ++i)
        for (int r = 0; r < RN; ++r) _mm512_storeu_ps(C + i * ldc + 16 * r, c[i][r]);
}

template <bool ACC>
__attribute__((target("avx512f"))) static void gemm_avx512(float * C, int64_t ldc, const float * A, int64_t asi,
                                                           int64_t ask, const float * B, int64_t ldb, int64_t M,
                                                           int64_t N, int64_t K) {
    for (int64_t i = 0; i < M; i += 4, C += 4 * ldc, A += 4 * asi)
        for (int64_t j = 0; j < N; j += 64) {
            switch (std::min<int64_t>(4, (N - j) / 16)) {
            case 4: block_avx512<4, ACC>(C + j, ldc, A, asi, ask, B + j, ldb, K); break;
            case 3: block_avx512<3, ACC>(C + j, ldc, A, asi, ask, B + j, ldb, K); break;
            case 2: block_avx512<2, ACC>(C + j, ldc, A, asi, ask, B + j, ldb, K); break;
            default: block_avx512<1, ACC>(C + j, ldc, A, asi, ask, B + j, ldb, K); break;
            }
        }
}

template <bool ACC>
__attribute__((target("avx2,fma"))) static void gemm_avx2(float * C, int64_t ldc, const float * A, int64_t asi,
                                                          int64_t ask, const float * B, int64_t ldb, int64_t M,
                                                          int64_t N, int64_t K) {
    for (int64_t i = 0; i < M; i += 4, C += 4 * ldc, A += 4 * asi)
        for (int64_t j = 0; j < N; j += 16) {
            __m256 c[4][2];
            for (int r = 0; r < 4; ++r)
                for (int h = 0; h < 2; ++h)
                    c[r][h] = ACC ? _mm256_loadu_ps(C + r * ldc + j + 8 * h) : _mm256_setzero_ps();
            for (int64_t k = 0; k < K; ++k) {
                const __m256 b0 = _mm256_loadu_ps(B + k * ldb + j), b1 = _mm256_loadu_ps(B + k * ldb + j + 8);
                for (int r = 0; r < 4; ++r) {
                    const __m256 a = _mm256_set1_ps(A[r * asi + k * ask]);
                    c[r][0] = _mm256_fmadd_ps(a, b0, c[r][0]);
                    c[r][1] = _mm256_fmadd_ps(a, b1, c[r][1]);
                }
            }
            for (int r = 0; r < 4; ++r)
                for (int h = 0; h < 2; ++h) _mm256_storeu_ps(C + r * ldc + j + 8 * h, c[r][h]);
        }
}
static const int kGemmIsa = __builtin_cpu_supports("avx512f")                                 ? 2
                            : __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") ? 1
                                                                                              : 0;
#else
static const int kGemmIsa = 0;
#endif

template <bool ACC>
static void gemm_portable(float * C, int64_t ldc, const float * A, int64_t asi, int64_t ask, const float * B,
                          int64_t ldb, int64_t M, int64_t N, int64_t K) {
    for (int64_t i = 0; i < M; ++i) {
        float * c = C + i * ldc;
        if (!ACC) std::fill(c, c + N, 0.f);
        for (int64_t k = 0; k < K; ++k) {
            const float a = A[i * asi + k * ask];
            const float * b = B + k * ldb;
            for (int64_t j = 0; j < N; ++j) c[j] += a * b[j];
        }
    }
}

template <bool ACC>
static void gemm(float * C, int64_t ldc, const float * A, int64_t asi, int64_t ask, const float * B, int64_t ldb,
                 int64_t M, int64_t N, int64_t K) {
#if defined(__x86_64__) && defined(__GNUC__)
    if (kGemmIsa == 2) return gemm_avx512<ACC>(C, ldc, A, asi, ask, B, ldb, M, N, K);
    if (kGemmIsa == 1) return gemm_avx2<ACC>(C, ldc, A, asi, ask, B, ldb, M, N, K);
#endif
    gemm_portable<ACC>(C, ldc, A, asi, ask, B, ldb, M, N, K);
}

// One tile's online-softmax update, down the columns of the transposed scores st [kTile positions][rp rows]:
// each row's tile maximum, its new running maximum m (alpha: the factor its sums so far are rescaled by, 1 if the
// maximum did not grow), st <- e^(st - m) (0 where masked), the row sums into s. A NaN score is not a maximum but
// stays NaN through the exponential: its row's sum, and so its output, become NaN.
MOELITE_CLONES static void tile_softmax(float * st, int64_t rp, float * m, float * s, float * alpha) {
    float mx[kTile], ms[kTile], sum[kTile];
    for (int64_t r = 0; r < rp; ++r) {
        mx[r] = -INFINITY;
        sum[r] = 0.f;
    }
    for (int p = 0; p < kTile; ++p) // rp is a multiple of 16: fixed-length blocks vectorize
        for (int64_t r0 = 0; r0 < rp; r0 += 16)
            for (int r = 0; r < 16; ++r) {
                const float x = st[p * rp + r0 + r];
                mx[r0 + r] = x > mx[r0 + r] ? x : mx[r0 + r];
            }
    for (int64_t r = 0; r < rp; ++r) {
        const float mn = std::max(m[r], mx[r]);
        alpha[r] = mn > m[r] ? (m[r] == -INFINITY ? 0.f : std::exp(m[r] - mn)) : 1.f;
        m[r] = mn;
        ms[r] = mn == -INFINITY ? 0.f : mn; // a row masked so far: e^(-inf - 0) = 0
    }
    for (int p = 0; p < kTile; ++p) {
        float * x = st + p * rp;
        for (int64_t r = 0; r < rp; ++r) {
            x[r] = exp_le0(x[r] - ms[r]);
            sum[r] += x[r];
        }
    }
    for (int64_t r = 0; r < rp; ++r) s[r] = s[r] * alpha[r] + sum[r];
}

// Work items: (KV head g, chunk c of g's query heads, tile of tq tokens), rows = tq tokens x hc heads <= kTile
// (row tok * hc + h). Per item: its queries transposed and scaled, qt [dk][rp]; then per 64-position KV tile not
// masked for all its tokens: the K rows to F32 (kf [64][dk]), st = kf qt ([64][rp]: scores transposed), the mask
// added where not 0, the softmax update, the V rows to F32 (vf [64][dvp]) and o [rp][dvp] += st^T vf.
static void op_attn_prompt(ggml_tensor * dst, int ith, int nth, void * userdata) {
    const float scale = *(const float *) userdata;
    const ggml_tensor *q = dst->src[0], *k = dst->src[1], *v = dst->src[2], *mask = dst->src[3];
    const int64_t dk = q->ne[0], n_head = q->ne[1], T = q->ne[2], dv = v->ne[0], n_kv = k->ne[1], h_kv = k->ne[2];
    const int64_t rk = n_head / h_kv, hc = std::min<int64_t>(rk, kTile), n_hc = (rk + hc - 1) / hc;
    const int64_t tq = std::max<int64_t>(1, kTile / hc), n_tq = (T + tq - 1) / tq;
    const int64_t rp = (tq * hc + 15) / 16 * 16, dvp = (dv + 15) / 16 * 16;
    thread_local std::vector<float> buf;
    buf.resize((size_t) (dk * rp + kTile * dk + kTile * rp + kTile * dvp + rp * dvp + tq * kTile + 3 * rp));
    float *qt = buf.data(), *kf = qt + dk * rp, *st = kf + kTile * dk, *vf = st + kTile * rp;
    float *o = vf + kTile * dvp, *mt = o + rp * dvp, *M = mt + tq * kTile, *S = M + rp, *alpha = S + rp;
    std::fill(vf, vf + kTile * dvp, 0.f); // columns dv..dvp stay 0
    for (int64_t it = ith; it < h_kv * n_hc * n_tq; it += nth) {
        const int64_t ti = it / (h_kv * n_hc), g = it % (h_kv * n_hc) / n_hc, c = it % n_hc;
        const int64_t h0 = g * rk + c * hc, heads = std::min(hc, rk - c * hc), t0 = ti * tq,
                      toks = std::min(tq, T - t0);
        std::fill(qt, qt + dk * rp, 0.f);
        for (int64_t tok = 0; tok < toks; ++tok)
            for (int64_t h = 0; h < heads; ++h) {
                const float * x =
                    (const float *) ((const char *) q->data + (h0 + h) * q->nb[1] + (t0 + tok) * q->nb[2]);
                for (int64_t d = 0; d < dk; ++d) qt[d * rp + tok * hc + h] = x[d] * scale;
            }
        std::fill(o, o + rp * dvp, 0.f);
        std::fill(M, M + rp, -INFINITY);
        std::fill(S, S + rp, 0.f);
        for (int64_t j0 = 0; j0 < n_kv; j0 += kTile) {
            const int n = (int) std::min<int64_t>(kTile, n_kv - j0);
            // the tile's mask: all -inf for every token (skip it), all 0 (nothing to add), or else in mt as F32
            int all_inf = 1, all_zero = n == kTile && toks == tq;
            for (int64_t tok = 0; tok < toks && mask; ++tok) {
                const uint16_t * m = (const uint16_t *) ((const char *) mask->data + (t0 + tok) * mask->nb[1]) + j0;
                for (int j = 0; j < n; ++j) {
                    all_inf &= m[j] == 0xFC00; // F16 -inf
                    all_zero &= m[j] == 0;
                }
            }
            if (mask && all_inf) continue; // masked out (causal future, outside a sliding window)
            if (!all_zero)
                for (int64_t tok = 0; tok < tq; ++tok) {
                    float * m = mt + tok * kTile;
                    if (tok >= toks)
                        std::fill(m, m + n, -INFINITY);
                    else if (!mask)
                        std::fill(m, m + n, 0.f);
                    else
                        row_to_f32((const ggml_fp16_t *) ((const char *) mask->data + (t0 + tok) * mask->nb[1]) + j0, m,
                                   n);
                    std::fill(m + n, m + kTile, -INFINITY); // past the cache's end
                }
            for (int j = 0; j < n; ++j) kv_row(k, j0 + j, g, kf + j * dk);
            if (n < kTile) std::fill(kf + n * dk, kf + kTile * dk, 0.f);
            gemm<false>(st, rp, kf, dk, 1, qt, rp, kTile, rp, dk);
            if (!all_zero)
                for (int p = 0; p < kTile; ++p)
                    for (int64_t tok = 0; tok < tq; ++tok) {
                        const float mv = mt[tok * kTile + p];
                        if (mv != 0.f)
                            for (int64_t h = 0; h < hc; ++h) st[p * rp + tok * hc + h] += mv;
                    }
            tile_softmax(st, rp, M, S, alpha);
            for (int64_t r = 0; r < rp; ++r)
                if (alpha[r] != 1.f) scale_f32(o + r * dvp, alpha[r], dv);
            for (int j = 0; j < n; ++j) kv_row(v, j0 + j, g, vf + j * dvp);
            if (n < kTile) std::fill(vf + n * dvp, vf + kTile * dvp, 0.f);
            gemm<true>(o, dvp, st, 1, rp, vf, dvp, rp, dvp, kTile);
        }
        for (int64_t tok = 0; tok < toks; ++tok)
            for (int64_t h = 0; h < heads; ++h) {
                const int64_t r = tok * hc + h;
                float * out = (float *) ((char *) dst->data + (h0 + h) * dst->nb[1] + (t0 + tok) * dst->nb[2]);
                finish_row(out, dv, dst->src[4], h0 + h, o + r * dvp, M[r], S[r], false);
            }
    }
}

bool attn_cpu_supports(const ggml_tensor * K, const ggml_tensor * V, const ggml_tensor * mask, int64_t T) {
    // Q8_0 for single-token steps and prompt ubatches: between them (2..63 tokens, one decode work item per token)
    // each token would dequantize the cache again, where ggml's op dots the int8 rows as they are; a prompt tile is
    // dequantized once for its 8 tokens x heads, as an F16 one is converted
    auto ok = [T](const ggml_tensor * c) {
        return c->type == GGML_TYPE_F16 || c->type == GGML_TYPE_F32 ||
               (c->type == GGML_TYPE_Q8_0 && (T == 1 || T > kAttnDecodeMaxT));
    };
    return ok(K) && ok(V) && (!mask || mask->type == GGML_TYPE_F16);
}

// q [dk, n_head, T], K/V views of the cache, mask [n_kv, >= T] F16 or null, sinks or null, *scale (kq scale; the
// caller keeps it alive while the graph runs) -> [dv, n_head, T], by op.
// (n_split > 1: [dv + 2, n_head, T, n_split] parts).
static ggml_tensor * attn_node(ggml_context * ctx, ggml_custom_op_t op, ggml_tensor * q, ggml_tensor * K,
                               ggml_tensor * V, ggml_tensor * mask, ggml_tensor * sinks, const float * scale,
                               int64_t n_split = 1) {
    ggml_tensor * args[5] = {q, K, V, mask, sinks};
    return ggml_custom_4d(ctx, GGML_TYPE_F32, V->ne[0] + (n_split > 1 ? 2 : 0), q->ne[1], q->ne[2], n_split, args,
                          sinks ? 5 : 4, op, GGML_N_TASKS_MAX, (void *) scale);
}

ggml_tensor * attn_decode(ggml_context * ctx, ggml_tensor * q, ggml_tensor * K, ggml_tensor * V, ggml_tensor * mask,
                          ggml_tensor * sinks, const float * scale) {
    const int64_t n_split = decode_splits(K->ne[1], K->ne[2], q->ne[2]);
    if (n_split == 1) return attn_node(ctx, op_attn_decode, q, K, V, mask, sinks, scale);
    ggml_tensor * parts = attn_node(ctx, op_attn_decode, q, K, V, mask, nullptr, scale, n_split);
    ggml_tensor * args[2] = {parts, sinks};
    return ggml_custom_4d(ctx, GGML_TYPE_F32, V->ne[0], q->ne[1], q->ne[2], 1, args, sinks ? 2 : 1, op_attn_combine,
                          GGML_N_TASKS_MAX, nullptr);
}

ggml_tensor * attn_prompt(ggml_context * ctx, ggml_tensor * q, ggml_tensor * K, ggml_tensor * V, ggml_tensor * mask,
                          ggml_tensor * sinks, const float * scale) {
    return attn_node(ctx, op_attn_prompt, q, K, V, mask, sinks, scale);
}

} // namespace moelite
