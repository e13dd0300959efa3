// GGUF index through ggml's gguf API: metadata, tensor table with absolute file offsets.
#pragma once
#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "ggml.h"
#include "gguf.h"

namespace moelite {

struct TensorInfo {
    std::string name;
    ggml_type type;
    int64_t ne[GGML_MAX_DIMS];   // ggml order: ne[0] is the contiguous row length
    int n_dims;
    uint64_t offset;             // absolute byte offset in the file (data_offset + tensor offset)
    uint64_t nbytes;
    uint64_t nb2() const { return nbytes / (ne[2] * ne[3]); }   // bytes of one [ne0, ne1] matrix (one expert)
    // distance between experts in the file: nb2(), except for a half of a fused gate_up tensor (the whole block)
    uint64_t stride2 = 0;
    uint64_t expert_stride() const { return stride2 ? stride2 : nb2(); }
};

// Owns a gguf_context opened with no_alloc (metadata only). Validates that every tensor lies inside the
// file and has a known type; throws FormatError naming the file and the tensor otherwise.
struct GGUFIndex {
    std::string path;
    gguf_context * ctx = nullptr;
    uint64_t file_size = 0;
    size_t alignment = 32;
    std::vector<TensorInfo> tensors;
    std::map<std::string, size_t> by_name;

    explicit GGUFIndex(const std::string & path);
    ~GGUFIndex();
    GGUFIndex(const GGUFIndex &) = delete;
    GGUFIndex & operator=(const GGUFIndex &) = delete;

    const TensorInfo * find(const std::string & name) const;
    int64_t key(const std::string & k) const { return gguf_find_key(ctx, k.c_str()); }
};

}  // namespace moelite
