// Attention on the CPU as ggml custom ops, for a KV cache in F16 or F32 (flash attention's layout: V untransposed):
//
// attn_decode, decode steps and ubatches below 64 tokens: for each KV head, one pass over its cached positions that
// serves every query head sharing it (GQA: 8 on Qwen3-30B-A3B, all of them with MLA), each K and V row converted to
// F32 once, the softmax online and the V sums in F32. ggml's flash attention runs those one query head at a time,
// converting the query to F16, dotting it with every F16 K row and summing V in F16, so each K/V row is read and
// converted once per query head (~20 % of a Qwen3-30B-shaped decode step at a 600-token context).
//
// attn_prompt, ubatches of 64 tokens and more: tiles of 64 query rows x 64 KV positions, a row being one (token,
// query head) pair of one KV head's group, so each K/V tile is converted once for all the heads sharing it and the
// causal diagonal wastes at most a few tokens' rows. Scores as one GEMM (S^T = K_tile Q^T, the queries transposed
// once per item, K rows used as they lie), the online softmax down S^T's columns, O += P V as a second GEMM; both
// GEMMs by one register-blocked kernel (AVX-512 / AVX2+FMA / portable). ggml's tiled path runs a tile per query
// head: it converts and transposes the K tile (element by element), and converts the mask, once per head.
//
// Inputs as ggml_flash_attn_ext takes them, q unpermuted: q [dk, n_head, T] F32, K [dk, n_kv, h_kv] and
// V [dv, n_kv, h_kv] (F16 or F32 views of the cache), mask [n_kv, >= T] F16 (0 / -inf), sinks [n_head] F32 or none;
// out [dv, n_head, T] F32. Both sum in F32 and differ from ggml's op in rounding only; which op runs depends on the
// ubatch size alone, so offloading still changes no bit. A NaN score poisons its head's output, as in ggml.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>
#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#endif

#include "model.h"

namespace moelite {

// The three inner loops, compiled for AVX-512, AVX2 and the baseline on x86-64 with GCC (ifunc picks one at load);
// elsewhere as the build targets (NEON is the aarch64 baseline).
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define MOELITE_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define MOELITE_CLONES
#endif

constexpr int kHeads = 8;      // query heads scored together: each K element loaded once feeds kHeads FMAs
constexpr int kBlock = 32;     // KV positions per block: scores, one softmax update and one pass over V per block

// s[r * kBlock + j] = q_r . k_j for RH query rows q [RH, d] and n (<= kBlock) key rows k [n, d]: RH independent
// accumulator rows, so the FMAs do not wait on each other. One function per RH in {1, 2, 4, 8} (a group of R heads
// runs the next one up; qf's extra rows are zeros).
#define MOELITE_SCORES(NAME, RH)                                                                        \
    MOELITE_CLONES static void NAME(const float * q, const float * k, int n, int64_t d, float * s) {     \
        int j = 0;                                                                                      \
        for (; j + 2 <= n; j += 2) {          /* two keys per pass: each q load feeds two FMAs */      \
            const float * k0 = k + j * d, * k1 = k0 + d;                                               \
            float a0[RH][16] = {}, a1[RH][16] = {};                                                     \
            int64_t i = 0;                                                                              \
            for (; i + 16 <= d; i += 16)                                                                \
                for (int r = 0; r < RH; ++r)                                                            \
                    for (int l = 0; l < 16; ++l) {                                                      \
                        a0[r][l] += q[r * d + i + l] * k0[i + l];                                       \
                        a1[r][l] += q[r * d + i + l] * k1[i + l];                                       \
                    }                                                                                   \
            for (int r = 0; r < RH; ++r) {                                                              \
                float t0 = 0.f, t1 = 0.f;                                                               \
                for (int l = 0; l < 16; ++l) { t0 += a0[r][l]; t1 += a1[r][l]; }                        \
                for (int64_t e = i; e < d; ++e) { t0 += q[r * d + e] * k0[e]; t1 += q[r * d + e] * k1[e]; } \
                s[r * kBlock + j] = t0;                                                                 \
                s[r * kBlock + j + 1] = t1;                                                             \
            }                                                                                           \
        }                                                                                               \
        for (; j < n; ++j) {                                                                            \
            const float * kj = k + j * d;                                                               \
            float acc[RH][16] = {};                                                                     \
            int64_t i = 0;                                                                              \
            for (; i + 16 <= d; i += 16)                                                                \
                for (int r = 0; r < RH; ++r)                                                            \
                    for (int l = 0; l < 16; ++l) acc[r][l] += q[r * d + i + l] * kj[i + l];             \
            for (int r = 0; r < RH; ++r) {                                                              \
                float t = 0.f;                                                                          \
                for (int l = 0; l < 16; ++l) t += acc[r][l];                                            \
                for (int64_t e = i; e < d; ++e) t += q[r * d + e] * kj[e];                              \
                s[r * kBlock + j] = t;                                                                  \
            }                                                                                           \
        }                                                                                               \
    }
MOELITE_SCORES(scores1, 1)
MOELITE_SCORES(scores2, 2)
MOELITE_SCORES(scores4, 4)
MOELITE_SCORES(scores8, 8)
#undef MOELITE_SCORES

static void scores(const float * q, int R, const float * k, int n, int64_t d, float * s) {
    if (R <= 1) scores1(q, k, n, d, s);
    else if (R <= 2) scores2(q, k, n, d, s);
    else if (R <= 4) scores4(q, k, n, d, s);
    else scores8(q, k, n, d, s);
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
    return x == -INFINITY ? 0.f : x != x ? x : y;         // NaN stays NaN
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
static const bool kHasF16C = __builtin_cpu_supports("f16c");
static void row_to_f32(const ggml_fp16_t * x, float * y, int64_t n) {
    if (kHasF16C) row_to_f32_f16c(x, y, n); else ggml_fp16_to_fp32_row(x, y, n);
}
#else
static void row_to_f32(const ggml_fp16_t * x, float * y, int64_t n) { ggml_fp16_to_fp32_row(x, y, n); }
#endif

// Row j of KV head g of a K or V view, as F32 into dst.
static void kv_row(const ggml_tensor * t, int64_t j, int64_t g, float * dst) {
    const char * p = (const char *) t->data + j * t->nb[1] + g * t->nb[2];
    if (t->type == GGML_TYPE_F32) std::memcpy(dst, p, t->ne[0] * sizeof(float));
    else row_to_f32((const ggml_fp16_t *) p, dst, t->ne[0]);
}

// Output row (head h, token t) of dst from its accumulated V sum acc [dv], the running maximum M and sum S of its
// softmax: gpt-oss's sink (one more logit per head that takes softmax mass, no value), then acc / S (NaN if a score
// was NaN, 0 if every position was masked).
static void finish_row(ggml_tensor * dst, int64_t h, int64_t t, float * acc, float M, float S, bool nan) {
    const int64_t dv = dst->ne[0];
    if (const ggml_tensor * sinks = dst->src[4]) {
        const float s = ((const float *) sinks->data)[h];
        float ms = 1.f, vs = 1.f;
        if (s > M) ms = std::exp(M - s); else vs = std::exp(s - M);
        S = S * ms + vs;
        scale_f32(acc, ms, dv);
    }
    const float inv = nan ? NAN : S == 0.f ? 0.f : 1.f / S;
    float * o = (float *) ((char *) dst->data + h * dst->nb[1] + t * dst->nb[2]);
    for (int64_t i = 0; i < dv; ++i) o[i] = acc[i] * inv;
}

// Work items: (KV head g, token t, chunk c of g's query heads); a group's query heads are split into chunks only
// when there are fewer (g, t) pairs than threads (MLA: one KV head). Each item runs its heads kHeads at a time over
// blocks of kBlock positions: the block's K rows to F32, the scores, one online-softmax update per head (the sums so
// far rescaled when the maximum grows), the block's V rows to F32 and their weighted sum.
static void op_attn_decode(ggml_tensor * dst, int ith, int nth, void * userdata) {
    const float scale = *(const float *) userdata;
    const ggml_tensor * q = dst->src[0], * k = dst->src[1], * v = dst->src[2], * mask = dst->src[3];
    const int64_t dk = q->ne[0], n_head = q->ne[1], T = q->ne[2], dv = v->ne[0], n_kv = k->ne[1], h_kv = k->ne[2];
    const int64_t rk = n_head / h_kv, pairs = h_kv * T;
    const int64_t n_chunk = std::min<int64_t>(rk, (nth + pairs - 1) / pairs), per = (rk + n_chunk - 1) / n_chunk;
    thread_local std::vector<float> buf;          // this thread's, kept between steps (no allocation per step)
    buf.resize((size_t) (kHeads * dk + kHeads * dv + kBlock * dk + kBlock * dv + kHeads * kBlock));
    float * qf = buf.data(), * acc = qf + kHeads * dk, * kb = acc + kHeads * dv, * vb = kb + kBlock * dk;
    float * sc = vb + kBlock * dv;
    float mk[kBlock];
    for (int64_t it = ith; it < pairs * n_chunk; it += nth) {
        const int64_t g = it / (T * n_chunk), t = (it / n_chunk) % T, c = it % n_chunk;
        const int64_t c0 = g * rk + c * per, c1 = std::min(c0 + per, (g + 1) * rk);
        const ggml_fp16_t * mrow = mask ? (const ggml_fp16_t *) ((const char *) mask->data + t * mask->nb[1]) : nullptr;
        for (int64_t h0 = c0; h0 < c1; h0 += kHeads) {
            const int R = (int) std::min<int64_t>(kHeads, c1 - h0);
            float M[kHeads], S[kHeads];
            bool nan[kHeads] = {};                      // a NaN score poisons the head's output, as in ggml's op
            std::fill(qf, qf + kHeads * dk, 0.f);
            std::fill(acc, acc + kHeads * dv, 0.f);
            for (int r = 0; r < R; ++r) {
                std::memcpy(qf + r * dk, (const char *) q->data + (h0 + r) * q->nb[1] + t * q->nb[2], dk * sizeof(float));
                M[r] = -INFINITY;
                S[r] = 0.f;
            }
            for (int64_t j0 = 0; j0 < n_kv; j0 += kBlock) {
                const int n = (int) std::min<int64_t>(kBlock, n_kv - j0);
                bool any = false;
                for (int j = 0; j < n; ++j) {
                    mk[j] = mrow ? ggml_fp16_to_fp32(mrow[j0 + j]) : 0.f;
                    any = any || mk[j] != -INFINITY;
                }
                if (!any) continue;                     // masked out (causal future, outside a sliding window)
                for (int j = 0; j < n; ++j) kv_row(k, j0 + j, g, kb + j * dk);
                scores(qf, R, kb, n, dk, sc);
                bool converted = false;
                for (int r = 0; r < R; ++r) {
                    float * s = sc + r * kBlock;
                    float mb = -INFINITY;
                    for (int j = 0; j < n; ++j) {
                        s[j] = mk[j] == -INFINITY ? -INFINITY : s[j] * scale + mk[j];
                        nan[r] = nan[r] || std::isnan(s[j]);
                        mb = std::max(mb, s[j]);
                    }
                    if (mb == -INFINITY) continue;
                    const float m_new = std::max(M[r], mb);
                    if (m_new > M[r]) {                 // the maximum grew: rescale what was summed so far
                        const float ms = M[r] == -INFINITY ? 0.f : std::exp(M[r] - m_new);
                        S[r] *= ms;
                        scale_f32(acc + r * dv, ms, dv);
                        M[r] = m_new;
                    }
                    for (int j = 0; j < n; ++j) s[j] -= m_new;
                    exp_block(s, n);
                    if (!converted) {
                        for (int j = 0; j < n; ++j) kv_row(v, j0 + j, g, vb + j * dv);
                        converted = true;
                    }
                    for (int j = 0; j < n; ++j) {
                        S[r] += s[j];
                        if (s[j] != 0.f) axpy_f32(acc + r * dv, vb + j * dv, s[j], dv);
                    }
                }
            }
            for (int r = 0; r < R; ++r) finish_row(dst, h0 + r, t, acc + r * dv, M[r], S[r], nan[r]);
        }
    }
}

// ---- attn_prompt ----

constexpr int kTile = 64;      // KV positions per tile, and query rows (token, head) per work item at most

// C [M x N] = (acc ? C : 0) + A [M x K] B [K x N]: A read as A[i * asi + k * ask] (K rows as they lie, or the
// scores transposed), B and C row-major with leading dimensions ldb and ldc. M a multiple of 4 and N of 16 (the
// callers pad their tiles). Register blocks of 4 rows x 64 columns (AVX-512: 16 accumulators, 4 loads of B and 4
// broadcasts of A per 16 FMAs) or 4 x 16 (AVX2).
#if defined(__x86_64__) && defined(__GNUC__)
template <int RN, bool ACC>
__attribute__((target("avx512f"), always_inline)) inline void block_avx512(float * C, int64_t ldc, const float * A,
        int64_t asi, int64_t ask, const float * B, int64_t ldb, int64_t K) {
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
        int64_t ask, const float * B, int64_t ldb, int64_t M, int64_t N, int64_t K) {
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
        int64_t ask, const float * B, int64_t ldb, int64_t M, int64_t N, int64_t K) {
    for (int64_t i = 0; i < M; i += 4, C += 4 * ldc, A += 4 * asi)
        for (int64_t j = 0; j < N; j += 16) {
            __m256 c[4][2];
            for (int r = 0; r < 4; ++r)
                for (int h = 0; h < 2; ++h) c[r][h] = ACC ? _mm256_loadu_ps(C + r * ldc + j + 8 * h) : _mm256_setzero_ps();
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
static const int kGemmIsa = __builtin_cpu_supports("avx512f") ? 2
                          : __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") ? 1 : 0;
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
    for (int64_t r = 0; r < rp; ++r) { mx[r] = -INFINITY; sum[r] = 0.f; }
    for (int p = 0; p < kTile; ++p)                   // rp is a multiple of 16: fixed-length blocks vectorize
        for (int64_t r0 = 0; r0 < rp; r0 += 16)
            for (int r = 0; r < 16; ++r) {
                const float x = st[p * rp + r0 + r];
                mx[r0 + r] = x > mx[r0 + r] ? x : mx[r0 + r];
            }
    for (int64_t r = 0; r < rp; ++r) {
        const float mn = std::max(m[r], mx[r]);
        alpha[r] = mn > m[r] ? (m[r] == -INFINITY ? 0.f : std::exp(m[r] - mn)) : 1.f;
        m[r] = mn;
        ms[r] = mn == -INFINITY ? 0.f : mn;       // a row masked so far: e^(-inf - 0) = 0
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
    const ggml_tensor * q = dst->src[0], * k = dst->src[1], * v = dst->src[2], * mask = dst->src[3];
    const int64_t dk = q->ne[0], n_head = q->ne[1], T = q->ne[2], dv = v->ne[0], n_kv = k->ne[1], h_kv = k->ne[2];
    const int64_t rk = n_head / h_kv, hc = std::min<int64_t>(rk, kTile), n_hc = (rk + hc - 1) / hc;
    const int64_t tq = std::max<int64_t>(1, kTile / hc), n_tq = (T + tq - 1) / tq;
    const int64_t rp = (tq * hc + 15) / 16 * 16, dvp = (dv + 15) / 16 * 16;
    thread_local std::vector<float> buf;
    buf.resize((size_t) (dk * rp + kTile * dk + kTile * rp + kTile * dvp + rp * dvp + tq * kTile + 3 * rp));
    float * qt = buf.data(), * kf = qt + dk * rp, * st = kf + kTile * dk, * vf = st + kTile * rp;
    float * o = vf + kTile * dvp, * mt = o + rp * dvp, * M = mt + tq * kTile, * S = M + rp, * alpha = S + rp;
    std::fill(vf, vf + kTile * dvp, 0.f);             // columns dv..dvp stay 0
    for (int64_t it = ith; it < h_kv * n_hc * n_tq; it += nth) {
        const int64_t ti = it / (h_kv * n_hc), g = it % (h_kv * n_hc) / n_hc, c = it % n_hc;
        const int64_t h0 = g * rk + c * hc, heads = std::min(hc, rk - c * hc), t0 = ti * tq, toks = std::min(tq, T - t0);
        std::fill(qt, qt + dk * rp, 0.f);
        for (int64_t tok = 0; tok < toks; ++tok)
            for (int64_t h = 0; h < heads; ++h) {
                const float * x = (const float *) ((const char *) q->data + (h0 + h) * q->nb[1] + (t0 + tok) * q->nb[2]);
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
                    all_inf &= m[j] == 0xFC00;               // F16 -inf
                    all_zero &= m[j] == 0;
                }
            }
            if (mask && all_inf) continue;                   // masked out (causal future, outside a sliding window)
            if (!all_zero)
                for (int64_t tok = 0; tok < tq; ++tok) {
                    float * m = mt + tok * kTile;
                    if (tok >= toks) std::fill(m, m + n, -INFINITY);
                    else if (!mask) std::fill(m, m + n, 0.f);
                    else row_to_f32((const ggml_fp16_t *) ((const char *) mask->data + (t0 + tok) * mask->nb[1]) + j0, m, n);
                    std::fill(m + n, m + kTile, -INFINITY);  // past the cache's end
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
                finish_row(dst, h0 + h, t0 + tok, o + r * dvp, M[r], S[r], false);
            }
    }
}

// q [dk, n_head, T], K/V views of the cache, mask [n_kv, >= T] F16 or null, sinks or null, *scale (kq scale; the
// caller keeps it alive while the graph runs) -> [dv, n_head, T], by op.
static ggml_tensor * attn_node(ggml_context * ctx, ggml_custom_op_t op, ggml_tensor * q, ggml_tensor * K,
                               ggml_tensor * V, ggml_tensor * mask, ggml_tensor * sinks, const float * scale) {
    ggml_tensor * args[5] = {q, K, V, mask, sinks};
    return ggml_custom_4d(ctx, GGML_TYPE_F32, V->ne[0], q->ne[1], q->ne[2], 1, args, sinks ? 5 : 4, op,
                          GGML_N_TASKS_MAX, (void *) scale);
}

ggml_tensor * attn_decode(ggml_context * ctx, ggml_tensor * q, ggml_tensor * K, ggml_tensor * V, ggml_tensor * mask,
                          ggml_tensor * sinks, const float * scale) {
    return attn_node(ctx, op_attn_decode, q, K, V, mask, sinks, scale);
}

ggml_tensor * attn_prompt(ggml_context * ctx, ggml_tensor * q, ggml_tensor * K, ggml_tensor * V, ggml_tensor * mask,
                          ggml_tensor * sinks, const float * scale) {
    return attn_node(ctx, op_attn_prompt, q, K, V, mask, sinks, scale);
}

}  // namespace moelite
