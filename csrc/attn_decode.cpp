// Attention of a decode step on the CPU, as a ggml custom op (attn_decode): for each KV head, one pass over its
// cached positions that serves every query head sharing it (GQA: 8 on Qwen3-30B-A3B, all of them with MLA), each
// K and V row converted to F32 once, the softmax online and the V sums in F32.
//
// Why: ggml's flash attention on the CPU runs a decode step one query head at a time, converting the query to F16,
// dotting it with every F16 K row and summing V in F16, so each K/V row is read and converted once per query head;
// at a 600-token context that was ~20 % of a Qwen3-30B-shaped decode step, most of it conversions and call overhead.
// Ubatches of 64 tokens and more (T > kAttnDecodeMaxT) keep ggml's tiled flash attention, a GEMM per 64-row tile
// with F32 sums; below that ggml runs the per-query path, which this op replaces: prompt and decode rows then sum
// in F32 alike (a prompt evaluated whole or token by token agrees to float rounding).
//
// Inputs as ggml_flash_attn_ext takes them, q unpermuted: q [dk, n_head, T] F32, K [dk, n_kv, h_kv] and
// V [dv, n_kv, h_kv] (F16 or F32 views of the cache), mask [n_kv, >= T] F16 (0 / -inf), sinks [n_head] F32 or none;
// out [dv, n_head, T] F32. The result differs from ggml's in rounding only (F32 where ggml rounds to F16): the same
// op runs for a step whatever the cache holds, so offloading still changes no bit.
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
MOELITE_CLONES static void exp_block(float * x, int n) {
    for (int i = 0; i < n; ++i) {
        const float t = std::max(x[i], -87.0f) * 1.44269504088896341f;
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
        x[i] = x[i] == -INFINITY ? 0.f : y;
    }
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

// Work items: (KV head g, token t, chunk c of g's query heads); a group's query heads are split into chunks only
// when there are fewer (g, t) pairs than threads (MLA: one KV head). Each item runs its heads kHeads at a time over
// blocks of kBlock positions: the block's K rows to F32, the scores, one online-softmax update per head (the sums so
// far rescaled when the maximum grows), the block's V rows to F32 and their weighted sum.
static void op_attn_decode(ggml_tensor * dst, int ith, int nth, void * userdata) {
    const float scale = *(const float *) userdata;
    const ggml_tensor * q = dst->src[0], * k = dst->src[1], * v = dst->src[2], * mask = dst->src[3];
    const ggml_tensor * sinks = dst->src[4];
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
            for (int r = 0; r < R; ++r) {
                float * a = acc + r * dv;
                if (sinks) {                      // gpt-oss: one more logit per head that takes softmax mass, no value
                    const float s = ((const float *) sinks->data)[h0 + r];
                    float ms = 1.f, vs = 1.f;
                    if (s > M[r]) ms = std::exp(M[r] - s); else vs = std::exp(s - M[r]);
                    S[r] = S[r] * ms + vs;
                    scale_f32(a, ms, dv);
                }
                const float inv = nan[r] ? NAN : S[r] == 0.f ? 0.f : 1.f / S[r];
                float * o = (float *) ((char *) dst->data + (h0 + r) * dst->nb[1] + t * dst->nb[2]);
                for (int64_t i = 0; i < dv; ++i) o[i] = a[i] * inv;
            }
        }
    }
}

// q [dk, n_head, T], K/V views of the cache, mask [n_kv, >= T] F16 or null, sinks or null, *scale (kq scale; the
// caller keeps it alive while the graph runs) -> [dv, n_head, T].
ggml_tensor * attn_decode(ggml_context * ctx, ggml_tensor * q, ggml_tensor * K, ggml_tensor * V, ggml_tensor * mask,
                          ggml_tensor * sinks, const float * scale) {
    ggml_tensor * args[5] = {q, K, V, mask, sinks};
    return ggml_custom_4d(ctx, GGML_TYPE_F32, V->ne[0], q->ne[1], q->ne[2], 1, args, sinks ? 5 : 4, op_attn_decode,
                          GGML_N_TASKS_MAX, (void *) scale);
}

}  // namespace moelite
