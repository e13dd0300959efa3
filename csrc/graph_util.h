// Small helpers shared by the graph builders (model.cpp, mixer_*.cpp, ffn_*.cpp, tiering.cpp).
#pragma once
#include <stdexcept>
#include <string>

#include "ggml-backend.h"
#include "ggml.h"

namespace moelite {

static constexpr int kMaxNodes = 4096;      // nodes of one per-layer graph, at most
static constexpr int kLayerNodes = 512;     // nodes of one layer in the fused graph, at most (model_fused.cpp)
static constexpr int kGemmMinRows = 4;      // tokens per expert on average from which a ubatch runs expert_gemm
static constexpr int kGemmExpertNodes = 32; // graph nodes (and tensors) of one expert in expert_gemm, at most
// ubatches of at most this many tokens use attn_decode on the CPU (one pass per KV head, one token per work item),
// larger ones attn_prompt (64 x 64 tiles of (token, head) rows and KV positions)
static constexpr int kAttnDecodeMaxT = 63;
static constexpr int64_t kOutputScratch = 8 << 20; // bytes of logits per output graph (runtime/planner.py counts it)

// Attention on the CPU as custom ops (attn_cpu.cpp), decode steps and small ubatches / prompt ubatches:
// q [dk, n_head, T], K/V cache views (F16/F32/Q8_0), F16 mask, sinks or null, *scale alive while the graph runs
// -> [dv, n_head, T].
ggml_tensor * attn_decode(ggml_context * ctx, ggml_tensor * q, ggml_tensor * K, ggml_tensor * V, ggml_tensor * mask,
                          ggml_tensor * sinks, const float * scale);
ggml_tensor * attn_prompt(ggml_context * ctx, ggml_tensor * q, ggml_tensor * K, ggml_tensor * V, ggml_tensor * mask,
                          ggml_tensor * sinks, const float * scale);
// Whether attn_decode / attn_prompt take these cache views (their types) and this mask (F16) for a ubatch of T.
bool attn_cpu_supports(const ggml_tensor * K, const ggml_tensor * V, const ggml_tensor * mask, int64_t T);

// Which attention runs (mixer_attention.cpp attend): CPU, attn_decode / attn_prompt by the ubatch size (ggml's
// flash attention where attn_cpu_supports says no); FLASH, ggml_flash_attn_ext; PLAIN, softmax(K^T Q + mask) V
// over a V cache stored transposed.
enum class AttnPath { CPU, FLASH, PLAIN };
// q [dk, n_head, T], K [dk, n_kv, h_kv], V [dv, n_kv, h_kv] ([n_kv, dv, h_kv] for PLAIN), mask [n_kv, >= T] (F16
// unless PLAIN), sinks [n_head] or null -> [dv, n_head, T]
ggml_tensor * attend(ggml_context * ctx, AttnPath path, ggml_tensor * q, ggml_tensor * K, ggml_tensor * V,
                     ggml_tensor * mask, ggml_tensor * sinks, const float * scale);

// Whether ggml's CPU_REPACK layout of Q4_K (buft) is the one unrepack.cpp packs and unpacks, checked once.
bool q4_Kx8_layout_check(ggml_backend_buffer_type_t buft);
// ... and the CPU has ggml's tiled K-quant GEMM (x86, AVX2); false disables the unpacking (MOELITE_NO_UNREPACK=1 too).
bool unrepack_q4_K_check(ggml_backend_buffer_type_t buft);
// Q4_K rows src [ne0, ne1] (ne0 % 256 == 0, ne1 % 8 == 0) into ggml's repacked layout at dst, as its CPU_REPACK
// buffer's set_tensor writes them (where q4_Kx8_layout_check says so).
void q4_K_to_q4_Kx8_rows(const void * src, void * dst, int64_t ne0, int64_t ne1);

inline std::string blk(int il, const char * name) { return "blk." + std::to_string(il) + "." + name; }

// Copy host data into a graph input after the allocator placed it.
inline void set_input(ggml_tensor * t, const void * data, size_t n) {
    if (!t->buffer) throw std::logic_error(std::string("graph input '") + t->name + "' was not allocated");
    ggml_backend_tensor_set(t, data, 0, n);
}

} // namespace moelite
