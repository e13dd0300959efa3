// The model: resident dense weights, KV cache, the expert cache, and the per-layer ggml graphs.
#pragma once
#include <functional>
#include <future>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "expert_cache.h"
#include "ggml-alloc.h"
#include "ggml-backend.h"
#include "ggml.h"
#include "gguf_index.h"
#include "tiering.h"

namespace moelite {

enum Gating : int { GATING_SOFTMAX = 1, GATING_SIGMOID = 2, GATING_SOFTMAX_WEIGHT = 3, GATING_SPARSEMIXER = 4 };
// GELU: tanh approximation (GeGLU). RELU_SQR: FFNs without a gate, down(relu(up x)^2) (Nemotron-H experts and MLPs)
enum Act : int { ACT_SILU = 0, ACT_SWIGLU_OAI = 1, ACT_GELU = 2, ACT_RELU_SQR = 3 };
// q/k norms: per head with weight (Qwen3), over the whole projection (OLMoE), per head without weight (Llama-4)
enum QKNorm : int { QK_NORM_NONE = 0, QK_NORM_HEAD = 1, QK_NORM_FULL = 2, QK_NORM_L2 = 3 };

// The per-layer plan (runtime/hparams.py derives it from the GGUF): which mixer and which FFN block the
// layer is built from, and the attention parameters that vary per layer (sliding/global mixes).
// Recurrent mixers (shortconv: LFM2; deltanet: Qwen3.5 / Qwen3-Next Gated DeltaNet) keep a fixed-size state per
// layer instead of KV: RecurrentState below.
// Nemotron-H's blocks are single-purpose: MIXER_NONE is an FFN-only block (its one norm is attn_norm), FFN_NONE a
// mixer-only block (x + mixer(norm(x)), nothing after). MIXER_KDA: Kimi Delta Attention (Kimi-Linear), the gated
// delta rule with a per-channel decay.
enum MixerKind : int {
    MIXER_ATTN = 0,
    MIXER_MLA = 1,
    MIXER_SHORTCONV = 2,
    MIXER_DELTANET = 3,
    MIXER_MAMBA2 = 4,
    MIXER_NONE = 5,
    MIXER_KDA = 6,
    MIXER_LAST = MIXER_KDA
};
// a mixer with a fixed-size state (RecurrentState) instead of a KV cache
inline bool is_recurrent(int mixer) {
    return mixer == MIXER_SHORTCONV || mixer == MIXER_DELTANET || mixer == MIXER_MAMBA2 || mixer == MIXER_KDA;
}
enum FfnKind : int { FFN_DENSE = 0, FFN_MOE = 1, FFN_NONE = 2 };
enum MaskKind : int { MASK_CAUSAL = 0, MASK_SWA = 1, MASK_CHUNKED = 2 };
// INDEXER_QSA: Qwen4-Exp's token indexer over mean-pooled blocks of LayerPlan::compress keys (mixer_dsa.cpp)
// INDEXER_KPOOL: GLM-5.3-Flash's lightning indexer over gated pools of LayerPlan::compress keys (mixer_dsa.cpp); its
// INDEXER_SHARED layers reuse the selected pools
enum IndexerKind : int { INDEXER_NONE = 0, INDEXER_FULL = 1, INDEXER_SHARED = 2, INDEXER_QSA = 3, INDEXER_KPOOL = 4 };
// hyper-connections (hyper_conn.cpp): Hy4's iHC gates, Qwen4-Exp's gated low-rank mix with inject weights,
// DeepSeek-V4 / GLM-5.3-Flash's mHC (pre / post gates and a Sinkhorn-normalised comb matrix between the streams)
enum HcKind : int { HC_NONE = 0, HC_IHC = 1, HC_GATED = 2, HC_MHC = 3 };

struct LayerPlan {
    int mixer = MIXER_ATTN, ffn = FFN_DENSE, mask = MASK_CAUSAL;
    int n_head = 0, n_head_kv = 0; // query heads (Laguna: per layer) and kv heads
    int head_k = 0, head_v = 0;    // per-head sizes (MLA: of the decompressed heads)
    int n_rot = 0;                 // rotated dims; 0 = NoPE layer
    bool rotate = true;            // false: MLA's rope dims are kept but never rotated (Kimi-Linear's NoPE MLA)
    bool rope_scaling = true;      // the model's RoPE scaling (YaRN) here; off: plain RoPE (Laguna SWA)
    float freq_base = 10000.f;
    float kq_scale = 0.f;
    bool rope_factors = true; // apply the model's rope_freqs / rope factors here
    bool attn_temp = false;   // q *= 1 + s * log(1 + floor((pos + offset) / f)) (Llama-4 NoPE, Mistral-4)
    // SwiGLU limits L (Step-3.5), 0 = none: min(silu(g), L) * clamp(u, -L, L), routed experts / dense and shared FFNs
    float clamp_exp = 0.f, clamp_shexp = 0.f;
    // DSA on an MLA layer (mixer_mla.cpp): INDEXER_FULL runs its own lightning indexer, INDEXER_SHARED reuses the
    // selection of the last full layer before it (GLM-5.2's IndexShare)
    int indexer = INDEXER_NONE;
    int compress = 0; // QSA: keys per pooled block the indexer scores
};

// Generic hyperparameters: runtime/hparams.py reads the llama.cpp keys of each architecture and fills these.
struct HParams {
    std::string arch;
    int n_vocab = 0, n_embd = 0, n_layer = 0, n_head = 0, n_head_kv = 0;
    int n_embd_head_k = 0, n_embd_head_v = 0; // per-head sizes (MLA: of the decompressed heads)
    float norm_eps = 1e-6f;
    bool layernorm = false; // LayerNorm with bias (phimoe) instead of RMSNorm
    int qk_norm = QK_NORM_NONE;
    // RoPE (ggml_rope_ext parameters)
    int n_rot = 0, rope_type = 0, n_ctx_orig = 0;
    float freq_base = 10000.f, freq_scale = 1.f, ext_factor = 0.f, attn_factor = 1.f, beta_fast = 32.f, beta_slow = 1.f;
    float kq_scale = 0.f;
    int n_swa = 0;
    // MLA (deepseek2)
    int q_lora_rank = 0, kv_lora_rank = 0;
    // MoE
    int n_expert = 0, n_expert_used = 0, n_layer_dense_lead = 0;
    int gating = GATING_SOFTMAX;
    bool weights_norm = false;
    float weights_scale = 1.f;
    int n_group = 1, topk_group = 1;
    float jitter_eps = 0.01f;
    int act = ACT_SILU;
    int moe_latent = 0; // latent MoE (Nemotron-3 Super): experts run in this width, 0 = n_embd
    int64_t n_embd_exp() const { return moe_latent > 0 ? moe_latent : n_embd; } // the routed experts' in/out width
    float oai_alpha = 1.702f, oai_limit = 7.0f;
    // granite multipliers
    float embd_scale = 1.f, residual_scale = 1.f, logit_scale = 1.f;
    // wave-2 switches
    bool qk_norm_after_rope = false; // Hunyuan: q/k norm after RoPE
    bool v_norm = false;             // Gemma-4: RMSNorm without weight on V
    bool weights_before_ffn = false; // Llama-4: routing weight scales the expert input
    float final_softcap = 0.f;       // Gemma-4: logits = c * tanh(logits / c)
    int n_chunk = 0;                 // Llama-4 chunked attention: tokens see their chunk only
    float attn_temp_scale = 0.1f, attn_temp_floor = 8192.f;
    float attn_temp_offset = 1.f;    // the temperature's position offset: Llama-4 pos + 1, MLA (Mistral-4) pos
    bool group_top2 = false;         // group score = sum of its top-2 scores whatever the gating (Mistral-4)
    bool parallel_residual = false;  // Command-R: x + attn(n) + ffn(n), n = attn_norm(x) (Cohere2-MoE)
    bool shexp_average = false;      // (routed + shared expert) / 2 (Cohere2-MoE)
    bool attn_output_gate = false;   // Qwen3.5: q_proj also emits a per-head gate, out *= sigmoid(gate)
    bool attn_gate_softplus = false; // attn_gate tensor: out *= softplus(gate) (Laguna), else sigmoid
    float attn_value_scale = 1.f;    // V x this (MiMo-V2: attention.value_scale), applied to the output
    // recurrent mixers (llama.cpp's ssm.* keys): conv kernel; DeltaNet: d_state = head size of k/q, n_group = k
    // heads, dt_rank = v heads, d_inner = v heads * v head size; Mamba2: d_state, n_group (B/C groups), dt_rank =
    // heads, d_inner = heads * head size
    int ssm_conv_kernel = 0, ssm_d_state = 0, ssm_n_group = 0, ssm_dt_rank = 0, ssm_d_inner = 0;
    bool deltanet_repeat_interleave = false; // Qwen3-Next: q/k heads shared by consecutive v heads (no reorder)
    // KDA decay: 0 = A softplus(f + dt) with A = -exp(A_log) (Kimi-Linear); < 0 = Ling-3.0's bounded ("safe") gate
    // lb * sigmoid(A (f + dt)) with A = exp(A_log), this lb
    float kda_gate_lb = 0.f;
    bool kda_neg_a = false; // the bounded gate's A stored as -exp(A_log) (llama.cpp's glm5-next): sigmoid(-A (f + dt))
    // DSA lightning indexer (deepseek32, glm-dsa): heads, head size (RoPE on its first n_rot dims, in this mode),
    // positions each token attends to once the context is longer
    int indexer_n_head = 0, indexer_head_size = 0, indexer_top_k = 0, indexer_rope_type = 0;
    // MTP blocks loaded after the trunk (blk.{n_layer}: a decoder block + the nextn.* projections, mtp.cpp), 0 or 1;
    // the trunk's loops stop at n_layer, the MTP block is run only by the MTP step
    int n_mtp = 0;
    int n_blocks() const { return n_layer + n_mtp; }
    // Hyper-connections (Hy4's iHC, hyper_conn.cpp): the residual stream is hc_mult streams of n_embd per token;
    // 0 = one plain stream. pre / post gates: sigmoid(..) + hc_eps, post x hc_magnitude
    int hc_mult = 0, hc_kind = HC_NONE;
    float hc_eps = 1e-6f, hc_magnitude = 2.f;
    int hc_sinkhorn_iters = 0; // HC_MHC: the comb's Sinkhorn iterations
    // the weights a sublayer's output is written back with, per token: post [hc] (+ HC_MHC: comb [hc, hc])
    int64_t n_hc_post() const { return hc_kind == HC_MHC ? (int64_t) hc_mult * (hc_mult + 1) : hc_mult; }
    int64_t n_embd_res() const { return hc_mult > 1 ? (int64_t) n_embd * hc_mult : n_embd; } // residual row width
    bool clamp_gate = false;        // SwiGLU limits clamp the gate before the SiLU (Hy4: ggml_swiglu_clamp), else after
    bool indexer_rope_tail = false; // the DSA indexer's RoPE on the last n_rot dims of its heads (Hy4), else the first
    bool deltanet_gate_sigmoid = false; // Gated DeltaNet output gate: sigmoid(z) (Qwen4-Exp), else silu(z)
    // PLE n-gram hash embeddings (Qwen4-Exp, ple.cpp) on layer ple_layer (-1: none): per token (ngram - 1) x
    // heads-per-ngram hashed rows of ple_row_dim from per_layer_token_embd, read from the file on demand (PleTable)
    int ple_layer = -1, ple_ngram = 0, ple_heads = 0, ple_conv_kernel = 0, ple_row_dim = 0, ple_eos = 0;
    std::vector<uint64_t> ple_mult, ple_offsets, ple_vocab; // [ngram] multipliers; [heads] offsets, vocab sizes
    std::vector<LayerPlan> plan;                            // [n_layer + n_mtp]
};

// One hyper-connection's weights (hyper_conn.cpp): fn [n_embd * hc, n * hc], base [n * hc], scale [n]; n = 2 (pre and
// post gates) in a layer, 1 in the output head; HC_MHC: fn [n_embd * hc, (2 + hc) hc], base [(2 + hc) hc], scale [3]
// (+ the comb), no output head (its streams' mean)
// HC_GATED: norm [n_embd * hc] (grouped RMSNorm, one group a stream), down [n_embd * hc, rank], up [rank, n_embd *
// hc], inject [n_embd * hc, hc] (none in the output head)
struct HcWeights {
    ggml_tensor *fn = nullptr, *base = nullptr, *scale = nullptr;
    ggml_tensor *norm = nullptr, *down = nullptr, *up = nullptr, *inject = nullptr;
};

struct Layer {
    bool moe = false;
    HcWeights hc_attn, hc_ffn; // hyper-connections around the mixer and the FFN (HParams::hc_mult)
    ggml_tensor *attn_norm = nullptr, *attn_norm_b = nullptr;
    ggml_tensor *wq = nullptr, *wk = nullptr, *wv = nullptr, *wo = nullptr;
    ggml_tensor *bq = nullptr, *bk = nullptr, *bv = nullptr, *bo = nullptr;
    ggml_tensor *q_norm = nullptr, *k_norm = nullptr, *sinks = nullptr;
    // MLA
    ggml_tensor *wq_a = nullptr, *q_a_norm = nullptr, *wq_b = nullptr, *wkv_a = nullptr, *kv_a_norm = nullptr,
                *wk_b = nullptr, *wv_b = nullptr;
    ggml_tensor * attn_post_norm = nullptr; // Gemma-4 sandwich norm on the attention output
    ggml_tensor *ffn_norm = nullptr, *ffn_norm_b = nullptr;
    ggml_tensor * ffn_exp_norm = nullptr; // Gemma-4: experts' own pre-norm (pre_ffw_norm_2)
    ggml_tensor *ffn_post_norm = nullptr, *ffn_post_norm_dense = nullptr, *ffn_post_norm_exp = nullptr;
    ggml_tensor * out_scale = nullptr; // Gemma-4 layer_output_scale [1]
    // dense FFN (leading dense layers)
    ggml_tensor *ffn_gate = nullptr, *ffn_up = nullptr, *ffn_down = nullptr;
    // MoE
    ggml_tensor *gate_inp = nullptr, *gate_inp_b = nullptr;
    ggml_tensor * gate_inp_s = nullptr; // Gemma-4 router: proj(rms_norm(h) / sqrt(n_embd) * s)
    ggml_tensor *gate_exps_b = nullptr, *up_exps_b = nullptr, *down_exps_b = nullptr;
    ggml_tensor *gate_shexp = nullptr, *up_shexp = nullptr, *down_shexp = nullptr, *gate_inp_shexp = nullptr;
    ggml_tensor *ffn_latent_down = nullptr, *ffn_latent_up = nullptr; // latent MoE: [n_embd, L], [L, n_embd]
    std::vector<float> exp_probs_b;     // [n_expert] selection bias (DeepSeek-V3), host side
    std::vector<float> exp_scale;       // [n_expert] per-expert output scale (Gemma-4), host side
    ggml_tensor * rope_freqs = nullptr; // rope factors of this layer (model-wide tensor or none)
    // recurrent mixers: LFM2 short conv; Gated DeltaNet (wqkv = attn_qkv, wqkv_gate = attn_gate = z)
    ggml_tensor *sc_conv = nullptr, *sc_in = nullptr, *sc_out = nullptr;
    ggml_tensor *ssm_in = nullptr, *ssm_conv1d_b = nullptr, *ssm_d = nullptr; // Mamba2 (Granite-4.0-H)
    ggml_tensor *wqkv = nullptr, *wqkv_gate = nullptr, *ssm_conv1d = nullptr, *ssm_dt_b = nullptr, *ssm_a = nullptr,
                *ssm_beta = nullptr, *ssm_alpha = nullptr, *ssm_ba = nullptr, *ssm_norm = nullptr, *ssm_out = nullptr;
    // DSA indexer (INDEXER_FULL layers): q from the MLA's q latent, one key head from the input (LayerNorm), per-head
    // weights; its key cache [indexer_head_size, n_ctx] (roped keys, positions like the KV cache's)
    ggml_tensor *idx_wq_b = nullptr, *idx_wk = nullptr, *idx_k_norm = nullptr, *idx_k_norm_b = nullptr,
                *idx_proj = nullptr, *idx_k_cache = nullptr;
    // KV cache (attention layers) or recurrent state (conv [K - 1, channels]; DeltaNet [S_v, S_v, H_v])
    // KDA (wq / wk / wv / wo = attn_q / k / v / output, ssm_beta, ssm_a [1, H], ssm_dt_b [C], ssm_norm [S]): a
    // depthwise conv kernel per projection ({K, 1, C, 1} as llama.cpp stores them), the decay's and the output
    // gate's low-rank pairs (f_a [n_embd -> S], f_b [S -> C]; f_b / g_b absent: f_a / g_a full rank [n_embd -> C])
    ggml_tensor *ssm_conv_q = nullptr, *ssm_conv_k = nullptr, *ssm_conv_v = nullptr;
    ggml_tensor *ssm_f_a = nullptr, *ssm_f_b = nullptr, *ssm_g_a = nullptr, *ssm_g_b = nullptr;
    ggml_tensor *k_cache = nullptr, *v_cache = nullptr; // [n_embd_k_gqa, n_ctx], V transposed [n_ctx, n_embd_v_gqa]
    ggml_tensor *conv_state = nullptr, *ssm_state = nullptr;
    // MTP block (blk.{n_layer}.nextn.*): eh_proj [2 n_embd, n_embd] over [enorm(embed) | hnorm(h)]; the head's
    // norm; its own token embeddings and LM head where the file has them (else the trunk's)
    ggml_tensor *nextn_eh_proj = nullptr, *nextn_enorm = nullptr, *nextn_hnorm = nullptr, *nextn_head_norm = nullptr,
                *nextn_embd = nullptr, *nextn_head = nullptr;
    // PLE (HParams::ple_layer): key [E_ple, n_embd * hc], value [E_ple, n_embd], grouped (1+w) norms [n_embd * hc],
    // the dilated depthwise conv [K, n_embd * hc]; its state: the conv's last (K - 1) x ngram inputs, and the last
    // ngram - 1 token ids (+ 1; 0 = none: EOS) the next tokens' n-grams start from
    ggml_tensor *ple_key = nullptr, *ple_value = nullptr, *ple_norm_key = nullptr, *ple_norm_query = nullptr,
                *ple_norm_conv = nullptr, *ple_conv = nullptr, *ple_conv_state = nullptr, *ple_hist = nullptr;
    // QSA (INDEXER_QSA): the token indexer's q [n_embd, n_idx d] and k [n_embd, d] projections and (1+w) norms [d]
    ggml_tensor *idx_q_proj = nullptr, *idx_q_norm = nullptr;
    // KPool (INDEXER_KPOOL): the DSA indexer's tensors plus the pooling gate [n_embd, d] and its per-slot bias (APE)
    // [d, r]; its key cache rows [2 d]: a position's normed key and gate logits
    ggml_tensor *idx_kpool_gate = nullptr, *idx_kpool_ape = nullptr;
    // QSA and KPool: each complete pool's key [d, n_ctx / r] (F32), written by the ubatch that completes the pool
    // (mixer_dsa.cpp pool_keys); rows past n_past_ / r are rewritten when their pools complete again
    ggml_tensor * idx_pool_cache = nullptr;
};

struct ModelOptions {
    int n_ctx = 4096;
    int n_threads = 2;
    int n_ubatch = 512;
    ggml_type kv_type = GGML_TYPE_F16;
    std::vector<int> expert_slots; // per layer quota; empty = all experts resident
    int policy = 2;                // Policy::LFUDA, the Python default (cache_policies/registry.py)
    int window_m = 16;
    bool prefetch = true;   // gate lookahead -> async reads
    int prefetch_depth = 1; // prefetch the next 1..kMaxLookahead MoE layers' predicted experts
    int n_io_threads = 2;
    int device = 0; // 0: CPU; 1: CUDA (build with MOELITE_CUDA)
    int gpu = 0;    // CUDA device index
    // tier 2 (tiering.h): per layer RAM slots between the expert arena and the file; empty = no tier 2.
    // With device CPU the "VRAM" arena is host memory too: that runs the tiering logic on any machine.
    std::vector<int> host_slots;
    int cpu_compute = 1;    // CpuCompute: 0 never, 1 cost model, 2 always
    bool flash_attn = true; // ggml_flash_attn_ext (V cached untransposed); off: softmax(QK)V
    // CPU device: weights in ggml's repacked layouts (CPU_REPACK) where its kernels take them: the mul_mat-only
    // dense weights and the expert arenas, resident or offloaded alike (expert_cache.h); off: llama.cpp's --no-repack
    bool repack = true;
    // Cache-aware routing (lossy, off at 0): a routed expert that is not resident is replaced by the resident,
    // unchosen expert of highest router probability when that probability is >= (1 - swap_threshold) x the
    // routed one's (per token and layer; softmax and sigmoid gating). Counted per layer (swaps()).
    float swap_threshold = 0.f;
    // One graph per ubatch (model_fused.cpp) where the whole step can be one: CPU device, every expert resident,
    // no recurrent layer, no routing trace. Embedding, every layer (routing as a ggml custom op between graph A's
    // router logits and the experts) and the logits run in one ggml graph instead of 2 per MoE layer + 2;
    // bit-identical to the per-layer graphs (off: always per layer).
    bool fused_graph = true;
    // Prompt ubatches on the CPU: each expert's tokens in one 2-D matmul per matrix (ggml's repacked, tiled or
    // tinyBLAS GEMMs) instead of mul_mat_id's one GEMV per token (ffn_moe.cpp); with it, repacked Q4_K weights are
    // unpacked for the tiled GEMM in prompts (unrepack.cpp). Which way a ubatch runs depends on its size alone:
    // offloading changes no bit either way. Off: mul_mat_id always, repacked GEMMs only.
    bool expert_gemm = true;
    // Bytes the graph scratch is sized to at load (the planner's bound; 0: grown as graphs need). Virtual memory:
    // only what graphs touch becomes resident (Model::reserve_scratch).
    size_t scratch_reserve = 0;
    // Decode steps and small ubatches (< 64 tokens) on the CPU with flash attention and an F16/F32/Q8_0 KV cache:
    // attention as one pass per KV head for all its query heads, in F32 (attn_cpu.cpp), instead of ggml's flash
    // attention (one query head at a time, F16 sums). Off: ggml's op for those steps.
    bool decode_attn = true;
    // Prompt ubatches (>= 64 tokens), same conditions: attention in tiles whose rows are (token, head) pairs of one KV
    // head's group, so each K/V tile is converted once for all of them (attn_cpu.cpp), instead of ggml's tiled flash
    // attention (one query head per tile). Off: ggml's op for those ubatches.
    bool prompt_attn = true;
    // Offloaded: a step whose experts are partly cached computes those while the I/O threads read the rest
    // (ExpertCache::begin_acquire; expert-major, the same bits); a prompt ubatch routed to more experts than a
    // layer's slots runs them in groups of half the slots, the next group read while one computes. Off: every
    // group waits for its own reads first.
    bool overlap_reads = true;
    // Low-bit stand-ins (lossy, off when standin_path is empty; converters/standins.py writes the side file): in a
    // one-token step, a routed expert that is not in memory and whose weight is <= standin_threshold x the token's
    // top weight is computed with its stand-in (a small copy of the expert, cached in standin_slots per layer and
    // read from the side file on a miss) instead of its full copy, which is not read. Counted per layer.
    std::string standin_path;
    std::vector<int> standin_slots;
    float standin_threshold = 0.f;
    // mlock() the dense weights and the KV cache (with the step state beside it) once loaded, so that neither swap
    // nor reclaim can page them out. Where RLIMIT_MEMLOCK (without CAP_IPC_LOCK) refuses, nothing fails: lock_info()
    // says what was not locked and why. Without swap, anonymous memory cannot be paged out anyway.
    bool mlock = false;
    // PLE table rows (Qwen4-Exp) cached in RAM, bytes (at least one ubatch of rows); the table stays in the file
    size_t ple_cache_bytes = 64ull << 20;
};

// The PLE table's reads since load (Model::ple_stats)
struct PleStats {
    uint64_t bytes_read = 0, rows_read = 0, rows_hit = 0;
    size_t cache_bytes = 0;
};

// What Model::lock_memory() locked (ModelOptions::mlock), and the first refusal
struct LockInfo {
    bool requested = false;
    size_t locked_bytes = 0; // page-rounded bytes under mlock
    size_t failed_bytes = 0; // bytes mlock refused
    int err = 0;             // errno of the first refusal (0: none)
};

struct RepackInfo {                            // what the CPU_REPACK buffer type holds (zeros: none)
    bool available = false;                    // this CPU backend has the buffer type and repack was asked for
    size_t dense_tensors = 0, dense_bytes = 0; // dense weights repacked (part of dense_bytes())
    size_t arena_bytes = 0;                    // expert arena bytes repacked (part of the arena)
    bool tiled_prompts = false;                // prompt matmuls unpack repacked Q4_K for ggml's tiled GEMM
    bool q4_K_packer = false; // Q4_K experts read into repacked slots are packed by unrepack.cpp, not ggml
};

// The (token, k) pairs of a step that one group of resident experts serves (ffn_moe.cpp): pair i = (t, k) with
// ids[i] in the group (slot_of[ids[i]] >= 0); its output goes to row i = t * K + k of the expert-output buffer.
struct ExpertPairs {
    std::vector<int32_t> tok, slot, eid; // token, slot and expert of each pair
    std::vector<int64_t> rows;           // t * K + k
    std::vector<float> w;                // its routing weight (Llama-4 scales the input with it)
    ExpertPairs(const std::vector<int32_t> & ids, const std::vector<float> & weights, int K,
                const std::vector<int> & slot_of);
};

class Model {
  public:
    Model(const std::string & path, const HParams & hp, const ModelOptions & opt);
    ~Model();

    // Evaluate tokens at positions n_past.. (appending to the KV cache). logits: [n_out, n_vocab] for the
    // last n_out tokens (n_out <= n_tokens).
    void eval(const int32_t * tokens, int n_tokens, int n_out, float * logits);
    void eval_tokens(const int32_t * tokens, int n_tokens, int n_out, float * logits); // eval() untimed
    // MTP drafting (mtp.cpp; hp.n_mtp = 1): greedy drafts of up to n_max tokens after `token`, the token that
    // follows the cached context; the first from the MTP block's row (h of the context's last token, token), each
    // next one chained on the block's own output. logits0 (nullable): [n_vocab] of the first draft's row.
    // 0 drafts when the context's last hidden state is not known (after a truncation past the last ubatch).
    int mtp_draft(int32_t token, int n_max, int32_t * out, float * logits0);
    bool mtp_ready() const { return hp_.n_mtp > 0 && n_past_ > 0 && mtp_pending_pos_ == n_past_ - 1; }
    void reset(); // position 0; recurrent state zeroed
    int n_past() const { return n_past_; }
    void truncate(int n); // KV only: a recurrent state cannot go back (restore a snapshot)
    // Recurrent state of all recurrent layers as one blob (snapshots for prompt reuse), and its restore at the
    // position it was taken (the KV cache is truncated there).
    bool recurrent() const { return buf_rs_ != nullptr; }
    size_t state_bytes() const { return buf_rs_ ? ggml_backend_buffer_get_size(buf_rs_) : 0; }
    std::vector<uint8_t> save_state() const;
    void load_state(const uint8_t * data, size_t n, int n_past);

    const HParams & hparams() const { return hp_; }
    ExpertCache & cache() { return *cache_; }
    ExpertCache * tier2() { return tier2_.get(); }
    const CostModel & costs() const { return costs_; }
    const std::vector<uint64_t> & cpu_experts() const { return cpu_experts_; } // per layer: experts run by the CPU
    const std::vector<uint64_t> & swaps() const { return swaps_; } // per layer: routed experts replaced (cache-aware)
    const std::vector<uint64_t> & gemm_experts() const {
        return gemm_experts_;
    } // per layer: experts run by expert_gemm
    const std::vector<uint64_t> & standin_uses() const { return standin_uses_; } // per layer: experts run as stand-ins
    ExpertCache * standins() { return standin_.get(); }
    // Decode steps (eval() of one token) since reset_stats(): their wall seconds and, of those, the expert cache's
    // waits for reads and its bookkeeping (ExpertCache::times()); the rest is compute and graph overhead.
    struct DecodeTimes {
        uint64_t steps = 0;
        double step_s = 0.0, wait_s = 0.0, book_s = 0.0;
    };
    const DecodeTimes & decode_times() const { return decode_times_; }
    void reset_stats();
    size_t dense_bytes() const { return dense_bytes_; }
    RepackInfo repack_info() const;
    size_t kv_bytes() const { return kv_bytes_; }
    PleStats ple_stats() const; // ple.cpp
    const LockInfo & lock_info() const { return lock_; }
    // MOELITE_DENSE_MMAP=1 (a benchmark switch, CPU device): the dense weights are read-only views of the model
    // file mapped MAP_SHARED (page cache, the way llama.cpp holds them) instead of anonymous memory; no repacking
    bool dense_mapped() const { return dense_mmap_; }
    size_t scratch_bytes() const;
    bool fused_ok() const;              // this model runs a step as one graph (model_fused.cpp)
    bool any_expert_gemm(int T) const;  // a ubatch of T runs some layer's experts as per-expert matmuls
    void reserve_scratch(size_t bytes); // size galloc_'s buffer once, on huge pages

    // routing trace, when record_routes: per layer, per evaluated token, k ids in descending score order
    bool record_routes = false;
    std::vector<std::vector<int32_t>> route_ids; // [n_layer][n_tokens * k]
    std::vector<std::vector<float>> route_w;     // [n_layer][n_tokens * k] selection scores (descending)
    // [d - 1][n_layer][n_tokens * k] lookahead prediction for this layer made d MoE layers before it
    std::vector<std::vector<int32_t>> route_la[kMaxLookahead];
    // routing of the last eval() ubatch, always kept (speculative decoding's window planner reads it): per layer,
    // [T * k] expert ids of its T rows (empty for a layer without routed experts)
    std::vector<std::vector<int32_t>> step_ids;

  private:
    // ---- loading (model.cpp)
    ggml_tensor * load_tensor(const std::string & name, bool required, int n_dims_expect = -1,
                              std::vector<int64_t> shape = {});
    void build_layers();
    void load_attention(int il, Layer & L);
    void load_mla(int il, Layer & L);
    ggml_tensor * load_attn_gate(int il); // attn_gate.weight: per head or per element, optional
    void load_ffn(int il, Layer & L);
    struct ExpertTensors {
        TensorInfo gate, up, down;
        bool gated = true;
    }; // gated false: gate unused (ReLU²)
    ExpertTensors expert_tensors(const GGUFIndex & idx, int il, int64_t n_embd) const; // a MoE layer's, checked
    void load_recurrent(int il, Layer & L);
    void load_kda(int il, Layer & L);
    void load_mtp(int il, Layer & L); // mtp.cpp
    std::vector<float> read_f32(const TensorInfo & t, int64_t n);
    std::vector<ggml_tensor *> matmul_weights() const; // 2-D weights read only by ggml_mul_mat (repack candidates)
    void alloc_weights();                              // the repacked ones in buf_rp_, the rest in buf_w_
    void map_weights();                                // MOELITE_DENSE_MMAP: views of the mapped file(s) instead
    void read_weights();
    void lock_memory(); // ModelOptions::mlock
    void alloc_kv();
    std::vector<int> tier_quotas(const std::vector<int> & per_layer, const char * what) const;

    // ---- one step, driven by eval() (model.cpp): per layer, graph A = mixer + FFN front, then for MoE
    // layers host routing + the expert cache + graph B (ffn_moe.cpp); or one graph for the step (model_fused.cpp)
    ggml_context * begin_graph();
    void compute(ggml_context * ctx, ggml_cgraph * gf, ggml_gallocr_t galloc);
    void set_graph_inputs(); // after compute(): the shared inputs this graph created
    void run_embed(const int32_t * tokens, int T);
    void run_layer_front(int il, int T);
    void run_output(int T, int n_out, float * logits);
    int output_rows_per_graph() const; // logits rows per output graph (kOutputScratch)
    void build_masks(int T);
    bool last_row_finite(int T) const; // the residual stream's row T - 1 (x_) holds no NaN/Inf
    void check_finite(int il, int T);  // FormatError naming layer il (-1: embeddings) on NaN/Inf
    int next_moe(int il) const;
    int lookahead_depth() const; // gate lookahead distances a step computes (prefetch, routing traces)

    // ---- the MTP block (mtp.cpp): after each ubatch of the trunk, its rows (h_{i-1}, token_i) at position i - 1
    // (the hidden state of each token paired with the token after it); the drafts chain on its own output
    void run_mtp_lagged(const int32_t * tokens, int T); // the ubatch's rows, before n_past_ moves on
    // T rows (hidden [T, n_embd] host, tokens [T]) through the MTP block at positions pos0..; n_out > 0: logits
    // [n_out, n_vocab] of the last rows and the head-normed hidden state of the last row (h_out [n_embd])
    void mtp_rows(const float * hidden, const int32_t * tokens, int T, int pos0, int n_out, float * logits,
                  float * h_out);
    std::vector<float> mtp_hidden_;  // the output-normed hidden states of the last ubatch [T, n_embd]
    int mtp_hidden_pos_ = 0;         // the position of its first row
    std::vector<float> mtp_pending_; // h of position mtp_pending_pos_ (the context's last token), or pos -1
    int mtp_pending_pos_ = -1;
    // rows not run yet (mtp_backlog): hidden [n, n_embd], tokens [n], at positions mtp_back_pos_..
    void mtp_backlog(const float * hidden, const int32_t * tokens, int n, int pos0);
    void mtp_flush();
    void mtp_forget_from(int n);
    std::vector<float> mtp_back_h_;
    std::vector<int32_t> mtp_back_t_;
    int mtp_back_pos_ = 0;

    // ---- the fused step (model_fused.cpp)
    struct RouteOp { // one MoE layer's routing inside the fused graph
        Model * model;
        int il, T;
        std::vector<int32_t> ids; // [T * k] expert ids, as route() returns them
        std::vector<float> w;     // [T * k] combine weights
        bool failed = false;      // route() threw: the caller reruns the step per layer
    };
    bool eval_fused(const int32_t * tokens, int T, int n_out, float * logits);       // false: rerun per layer
    static void op_route(ggml_tensor * dst, int ith, int nth, void * userdata);      // -> slots [k, T]
    static void op_weights(ggml_tensor * dst, int ith, int nth, void * userdata);    // -> weights [1, k, T]
    static void op_expert_ids(ggml_tensor * dst, int ith, int nth, void * userdata); // -> expert ids [k, T]

    // ---- graph builders shared by the per-layer and the fused step
    // Graph inputs shared by every layer of one graph: created on first use, reset by begin_graph(), set by
    // set_graph_inputs() after allocation.
    ggml_tensor * pos_input(ggml_context * ctx, int T);                      // [T] positions
    ggml_tensor * mask_input(ggml_context * ctx, int kind, int n_kv, int T); // [n_kv, T] (F16 for flash attention)
    ggml_tensor * attn_temp_input(ggml_context * ctx, int T);                // [1, 1, T] Llama-4 NoPE temperature
    ggml_tensor * mask_f32_input(ggml_context * ctx, int n_kv, int T);       // [n_kv, T] causal, F32 (DSA scores)
    // h, the normed h and the routed experts' input (hn, or latent MoE's ffn_latent_down hn) [n_embd | L, T],
    // router logits [n_expert, T]
    // With hyper-connections: res is the streams [n_embd * hc, T], in their mixture read by the FFN [n_embd, T] (its
    // norm not applied; without: in = res) and post the streams' weights for the FFN's output [hc, T]
    struct MoeFront {
        ggml_tensor *res = nullptr, *hn = nullptr, *logits = nullptr, *xe = nullptr, *post = nullptr, *in = nullptr;
    };
    // Layer il on the residual stream x [n_embd, T]: a dense layer's output, or nullptr for a MoE layer, whose
    // FFN front (h = x + mixer, the experts' input, router logits) is left in f.
    ggml_tensor * layer_front(ggml_context * ctx, ggml_cgraph * gf, int il, ggml_tensor * x, int T, MoeFront & f);
    // Experts of layer il (every one resident) + combine: slots / eids [k, T], weights [1, k, T] -> new residual
    ggml_tensor * moe_block(ggml_context * ctx, int il, const MoeFront & f, ggml_tensor * slots, ggml_tensor * weights,
                            ggml_tensor * eids, int T);
    ggml_tensor * output_head(ggml_context * ctx, ggml_tensor * x); // x [n_embd, rows] -> logits [n_vocab, rows]
    // the head after its norm: xn [n_embd, rows] -> proj (+ bias, / logit scale, softcap) -> [n_vocab, rows]; the
    // MTP head passes its own projection
    ggml_tensor * head_logits(ggml_context * ctx, ggml_tensor * xn, ggml_tensor * proj);
    ggml_tensor * rows_of(ggml_context * ctx, ggml_tensor * t, int t0, int T); // [ne0, T] view of a state tensor

    // ---- shared small builders (model.cpp)
    ggml_tensor * norm(ggml_context * ctx, ggml_tensor * x, ggml_tensor * w, ggml_tensor * b);
    ggml_tensor * rms_norm(ggml_context * ctx, ggml_tensor * x, ggml_tensor * w); // plain RMSNorm (* w if given)
    // y -> (post norm) -> * residual_scale -> + h -> (* layer output scale); the layer's new residual stream. hc_w:
    // with hyper-connections, the streams' weights for y [hc, T] (h is the streams)
    ggml_tensor * residual_out(ggml_context * ctx, int il, ggml_tensor * y, ggml_tensor * h, ggml_tensor * post_norm,
                               bool layer_end, ggml_tensor * hc_w = nullptr);

    // ---- hyper-connections (hyper_conn.cpp): x [n_embd * hc, T] streams
    HcWeights load_hc(const std::string & prefix, int n_coef);
    ggml_tensor * hc_norm(ggml_context * ctx, ggml_tensor * x, ggml_tensor * w);   // grouped RMSNorm (a group a stream)
    ggml_tensor * hc_mean(ggml_context * ctx, ggml_tensor * x);                    // the streams' mean [n_embd, T]
    ggml_tensor * hc_reduce(ggml_context * ctx, ggml_tensor * x, ggml_tensor * w); // sum_s w_s x_s -> [n_embd, T]
    // the sublayer's input [n_embd, T]; *post: the streams' weights for its output [hc, T]
    ggml_tensor * hc_pre(ggml_context * ctx, const HcWeights & w, ggml_tensor * x, ggml_tensor ** post);
    ggml_tensor * hc_post(ggml_context * ctx, ggml_tensor * x, ggml_tensor * y, ggml_tensor * post); // x_s + post_s y
    ggml_tensor * hc_head(ggml_context * ctx, ggml_tensor * x);    // the output head's mixture [n_embd, T]
    ggml_tensor * hc_streams(ggml_context * ctx, ggml_tensor * e); // embeddings [n_embd, T] -> the residual stream

    // ---- PLE (ple.cpp): the streams x [n_embd * hc, T] + the n-gram embedding's gated value and its dilated conv
    void load_ple(int il, Layer & L);
    void ple_prepare(const int32_t * tokens, int T); // hash the ubatch's n-grams, start reading their rows
    void ple_wait();                                 // ... and wait for them (ple_rows_)
    ggml_tensor * ple_block(ggml_context * ctx, ggml_cgraph * gf, int il, ggml_tensor * x, int T);

    // ---- mixers: x normed [n_embd, T] -> attention output after W_o [n_embd, T]
    ggml_tensor * mixer_attention(ggml_context * ctx, ggml_cgraph * gf, int il, ggml_tensor * cur, ggml_tensor * pos,
                                  int T); // mixer_attention.cpp
    ggml_tensor * mixer_mla(ggml_context * ctx, ggml_cgraph * gf, int il, ggml_tensor * cur, ggml_tensor * pos,
                            int T); // mixer_mla.cpp
    ggml_tensor * mixer_shortconv(ggml_context * ctx, ggml_cgraph * gf, int il, ggml_tensor * cur,
                                  int T); // mixer_recurrent.cpp
    ggml_tensor * mixer_deltanet(ggml_context * ctx, ggml_cgraph * gf, int il, ggml_tensor * cur, int T);
    ggml_tensor * mixer_mamba2(ggml_context * ctx, ggml_cgraph * gf, int il, ggml_tensor * cur, int T);
    ggml_tensor * mixer_kda(ggml_context * ctx, ggml_cgraph * gf, int il, ggml_tensor * cur, int T);
    // x [C, T] -> causal depthwise conv (kernel [K, C]) over [state | x] -> [C, T]; state [K - 1, C] updated
    ggml_tensor * conv_with_state(ggml_context * ctx, ggml_cgraph * gf, ggml_tensor * state, ggml_tensor * kernel,
                                  ggml_tensor * x, int T);
    // mode < 0: the model's RoPE mode (the DSA indexer passes its own)
    ggml_tensor * rope(ggml_context * ctx, int il, ggml_tensor * t, ggml_tensor * pos, int mode = -1);
    ggml_tensor * indexer_rope(ggml_context * ctx, int il, ggml_tensor * t, ggml_tensor * pos); // mixer_dsa.cpp
    // KV cache + softmax(QK)V; mask: the layer plan's (null) or the caller's [n_kv, T] (DSA's selection)
    ggml_tensor * attention(ggml_context * ctx, ggml_cgraph * gf, int il, ggml_tensor * q, ggml_tensor * k,
                            ggml_tensor * v, int T, ggml_tensor * mask = nullptr);
    // DSA (mixer_dsa.cpp): the indexer of layer il writes its keys; the selection as an attention mask [n_kv, T]
    // (F16 with flash attention), or null while every position fits the budget (dense attention)
    ggml_tensor * dsa_mask(ggml_context * ctx, ggml_cgraph * gf, int il, ggml_tensor * cur, ggml_tensor * qr,
                           ggml_tensor * pos, int T);
    // QSA (mixer_dsa.cpp): the indexer of layer il writes its raw keys; the block selection as an attention mask
    // [n_kv, T] (F16 with flash attention), or null while no token sees more complete blocks than it selects
    ggml_tensor * qsa_mask(ggml_context * ctx, ggml_cgraph * gf, int il, ggml_tensor * cur, ggml_tensor * pos, int T);
    ggml_tensor * qsa_pos_input(ggml_context * ctx, int n); // [n] I32: the first position of each pool this ubatch
                                                            // completes
    void qsa_inputs(ggml_context * ctx, int n_blk, int T, ggml_tensor ** tail, ggml_tensor ** complete);
    ggml_tensor * dsa_scores(ggml_context * ctx, ggml_cgraph * gf, int il, ggml_tensor * cur, ggml_tensor * qr,
                             ggml_tensor * pos, int T); // [n_kv, T] causal-masked, or null under the budget
    ggml_tensor * indexer_key(ggml_context * ctx, Layer & L, ggml_tensor * cur); // LayerNorm(attn_k cur) [d, T]
    // sum over the heads q [d, H, T] of w relu(q . k) for keys K [d, n] -> [n, T]
    ggml_tensor * indexer_score(ggml_context * ctx, Layer & L, ggml_tensor * K, ggml_tensor * q, ggml_tensor * cur);
    // KPool (mixer_dsa.cpp): the pools' selection as an attention mask [n_kv, T], or null (dense)
    ggml_tensor * kpool_mask(ggml_context * ctx, ggml_cgraph * gf, int il, ggml_tensor * cur, ggml_tensor * qr, int T);
    ggml_tensor * top_blocks(ggml_context * ctx, ggml_tensor * s, int K, int n_blk, int T); // [K, T] of complete ones
    // QSA / KPool: the keys of the complete pools [d, n_blk] from the pool-key cache, the ones this ubatch completes
    // computed by key_of(raw rows [row, r, n] F32, n) -> [d, n] and cached first
    ggml_tensor * pool_keys(ggml_context * ctx, ggml_cgraph * gf, int il, int T,
                            const std::function<ggml_tensor *(ggml_tensor *, int)> & key_of);
    ggml_tensor * block_mask(ggml_context * ctx, ggml_tensor * topk, int64_t r, int n_kv, int T);

    // ---- FFN blocks (ffn_dense.cpp, ffn_moe.cpp)
    ggml_tensor * ffn(ggml_context * ctx, ggml_tensor * x, ggml_tensor * gate, ggml_tensor * up, ggml_tensor * down,
                      float limit = 0.f);
    // act(g) * u, the family's act; g nullptr (ACT_RELU_SQR, no gate): relu(u)^2; limit > 0: SwiGLU clamped after SiLU
    ggml_tensor * glu(ggml_context * ctx, ggml_tensor * g, ggml_tensor * u, float limit = 0.f);
    ggml_tensor * dense_block(ggml_context * ctx, int il, ggml_tensor * h); // norm -> FFN (-> post norm)
    ggml_tensor * router_logits(ggml_context * ctx, int il, ggml_tensor * h, ggml_tensor * hn); // [n_expert, T]
    ggml_tensor * expert_input(ggml_context * ctx, int il, ggml_tensor * h); // the experts' normed input
    ggml_tensor * expert_ffn(ggml_context * ctx, int il, const Pool & P, ggml_tensor * hb, ggml_tensor * slots,
                             ggml_tensor * eids);
    ggml_tensor * tiled_weight(ggml_context * ctx, ggml_tensor * w, bool repacked, int64_t n) const;
    ggml_tensor * dense_mm(ggml_context * ctx, ggml_tensor * w, ggml_tensor * x) const; // mul_mat, tiled_weight'd
    ggml_tensor * expert_ffn_rows(ggml_context * ctx, int il, const Pool & P, int slot, int e, ggml_tensor * x);
    bool expert_gemm(int T, const Pool & P) const; // a ubatch of T runs pool P's experts as per-expert matmuls
    ggml_tensor * combine(ggml_context * ctx, int il, ggml_tensor * d, ggml_tensor * weights, const MoeFront & f);
    void moe_layer(int il, int T, const std::vector<int32_t> & ids, const std::vector<float> & w);
    void run_experts(int il, int t0, int t1, const std::vector<int32_t> & slot_ids, const std::vector<float> & w,
                     const std::vector<int32_t> & ids);
    // pool: the arena the pairs' slots index (default: the tier's own; the stand-ins' when given)
    void run_expert_pairs(int il, int T, const ExpertPairs & pairs, bool on_cpu, const Pool * pool = nullptr);
    bool moe_layer_standins(int il, const std::vector<int32_t> & ids, const std::vector<float> & w);
    void run_combine(int il, int T, const std::vector<float> & w);

    // ---- host routing (router.cpp). ids/w/score: [T * k]; score = what experts were ranked by (descending)
    // swap: this is the routing the experts run with (cache-aware routing may apply), not a lookahead guess
    void route(int il, ggml_tensor * logits_src, int T, std::vector<int32_t> & ids, std::vector<float> & w,
               std::vector<float> * score = nullptr, bool swap = false);
    void route_host(int il, const float * logits, int T, std::vector<int32_t> & ids, std::vector<float> & w,
                    std::vector<float> * score, bool swap); // logits [n_expert, T] in host memory

    void swap_for_resident(int il, const std::vector<char> & resident, const std::vector<float> & p,
                           const std::vector<float> & sel, int32_t * id, int K);

    // ---- tiering (tiering.cpp): the experts of this step that the CPU runs from tier 2, and the cost model
    std::vector<int32_t> cpu_group(int il, const std::vector<int32_t> & ids, int n);
    void measure_costs();
    double time_expert(ggml_backend_t backend, ggml_gallocr_t galloc, const Pool & P, int slot0, int il, int n);

    std::string path_;
    HParams hp_;
    ModelOptions opt_;
    std::unique_ptr<GGUFIndex> idx_;
    ggml_backend_t backend_ = nullptr;
    ggml_context * ctx_w_ = nullptr; // dense weight tensors
    ggml_backend_buffer_t buf_w_ = nullptr;
    ggml_backend_buffer_type_t repack_buft_ = nullptr; // CPU_REPACK when repacking (CPU device, opt_.repack)
    bool unrepack_q4_K_ = false; // prompt GEMMs may unpack repacked Q4_K slots for ggml's tiled GEMM (ffn_moe.cpp)
    ggml_backend_buffer_t buf_rp_ = nullptr; // dense weights in repacked layouts (no get_tensor: never read back)
    size_t repacked_tensors_ = 0, repacked_bytes_ = 0;
    ggml_context * ctx_kv_ = nullptr; // KV cache + persistent state tensors
    ggml_backend_buffer_t buf_kv_ = nullptr;
    ggml_context * ctx_rs_ = nullptr; // recurrent states (own buffer: zeroed on reset, saved whole)
    ggml_backend_buffer_t buf_rs_ = nullptr;
    std::vector<std::pair<ggml_tensor *, const TensorInfo *>> to_read_;
    bool dense_mmap_ = false;                       // MOELITE_DENSE_MMAP=1 on a CPU device
    std::vector<std::pair<void *, size_t>> maps_;   // per file of the set: its read-only mapping (nullptr: unused)
    std::vector<ggml_backend_buffer_t> buf_maps_;   // per file: a CPU buffer over the mapping (tensors point into it)
    std::vector<std::pair<void *, size_t>> locked_; // page ranges under mlock, unlocked before they are freed
    LockInfo lock_;
    size_t dense_bytes_ = 0, kv_bytes_ = 0;

    HcWeights hc_head_;                         // output_hc_*: the streams' mixture before the output norm
    std::unique_ptr<class PleTable> ple_table_; // the PLE table's rows, read on demand (ple.cpp)
    std::vector<float> ple_rows_;               // this ubatch's gathered rows [T, heads * row_dim]
    std::future<void> ple_pending_;             // their read (ple_prepare -> ple_wait)
    ggml_tensor *tok_embd_ = nullptr, *out_norm_ = nullptr, *out_norm_b_ = nullptr, *output_ = nullptr,
                *output_b_ = nullptr, *rope_factors_ = nullptr;
    std::vector<Layer> layers_;
    std::unique_ptr<ExpertCache> tier2_; // declared before cache_: destroyed after it
    std::unique_ptr<ExpertCache> cache_;
    ggml_backend_t cpu_backend_ = nullptr; // runs tier-2 experts; == backend_ on a CPU device
    ggml_threadpool * cpu_threadpool_ = nullptr;
    ggml_gallocr_t galloc_cpu_ = nullptr;
    CostModel costs_;
    std::vector<uint64_t> cpu_experts_;
    std::vector<uint64_t> swaps_;
    std::vector<uint64_t> gemm_experts_;
    DecodeTimes decode_times_;
    std::unique_ptr<GGUFIndex> standin_idx_; // the stand-ins' side file (opt_.standin_path)
    std::unique_ptr<ExpertCache> standin_;   // its experts, cached like the full ones
    std::vector<uint64_t> standin_uses_;

    // persistent state between the per-layer graphs, [.., n_ubatch]
    ggml_tensor *x_ = nullptr, *ffn_inp_ = nullptr, *ffn_in_ = nullptr, *router_ = nullptr,
                *ebuf_ = nullptr; // [n_embd_exp, K * n_ubatch] expert outputs of the expert-major path
    // gate lookahead at distance d + 1: the router logits of the (d + 1)-th next MoE layer [n_expert, n_ubatch]
    ggml_tensor * lookahead_[kMaxLookahead] = {};
    ggml_tensor * ffn_xe_ = nullptr; // the experts' input [n_embd_exp, n_ubatch]: ffn_in_, or latent
    // DSA with IndexShare: the last full indexer layer's selection [top_k, n_ubatch] I32, read by the shared layers
    // after it (the per-layer step runs each layer in its own graph)
    ggml_tensor * dsa_topk_ = nullptr;
    ggml_tensor * hc_post_ = nullptr; // hyper-connections: a MoE layer's stream weights for its FFN [hc, n_ubatch]

    ggml_gallocr_t galloc_ = nullptr;
    std::vector<uint8_t> graph_mem_; // tensor + graph metadata of one graph (kMaxNodes)
    std::vector<uint8_t> fused_mem_; // the same for the fused graph (fused_nodes_)
    int fused_nodes_ = 0;
    std::vector<RouteOp> route_ops_; // the fused graph's routing ops (reserved: addresses stable)
    struct GraphInputs {
        ggml_tensor *pos = nullptr, *mask[3] = {nullptr, nullptr, nullptr}, *attn_temp = nullptr;
        ggml_tensor * mask_f32 = nullptr; // causal F32 for the DSA scores (flash attention's masks are F16)
        ggml_tensor * dsa_topk = nullptr; // the last full indexer layer's selection [top_k, T] in this graph
        ggml_tensor * ple_emb = nullptr;  // the ubatch's PLE rows [heads * row_dim, T] (ple_rows_)
        ggml_tensor *qsa_pos = nullptr, *qsa_tail = nullptr, *qsa_complete = nullptr; // QSA's block inputs
    };
    GraphInputs gin_; // the current graph's shared inputs
    int n_past_ = 0;
    std::vector<int32_t> pos_;
    std::vector<float> mask_, mask_swa_, mask_chunk_, attn_temp_; // host inputs of one ubatch
    std::vector<float> mask_dsa_; // the causal mask in F32 for the DSA scores (models with an indexer)
    // QSA's host inputs of a ubatch (blocks of qsa_r_ positions): block starts [n_blk]; per (block, token) 0 / -inf
    // where the block is the token's incomplete tail or not (qsa_tail_), and the reverse (qsa_complete_)
    int qsa_r_ = 0;
    std::vector<int32_t> qsa_pos_;
    std::vector<float> qsa_tail_, qsa_complete_;
    std::vector<ggml_fp16_t> mask16_[3]; // the same in F16 for flash attention (causal, swa, chunk), instead
};

} // namespace moelite
