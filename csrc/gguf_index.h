// GGUF index through ggml's gguf API: metadata, tensor table with per-file byte offsets. A split set
// (llama.cpp's gguf-split layout: NAME-00001-of-0000N.gguf ..., keys split.no / split.count /
// split.tensors.count in every shard, the metadata in the first) is indexed as one model: each tensor knows
// the shard that holds its bytes, so readers pread (file, offset) and the set behaves as one file.
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
    int64_t ne[GGML_MAX_DIMS]; // ggml order: ne[0] is the contiguous row length
    int n_dims;
    int file = 0;    // index into GGUFIndex::files: the shard holding the bytes (0 for a single file)
    uint64_t offset; // absolute byte offset in that file (its data_offset + tensor offset)
    uint64_t nbytes;
    uint64_t nb2() const { return nbytes / (ne[2] * ne[3]); } // bytes of one [ne0, ne1] matrix (one expert)
    // distance between experts in the file: nb2(), except for a half of a fused gate_up tensor (the whole block)
    uint64_t stride2 = 0;
    uint64_t expert_stride() const { return stride2 ? stride2 : nb2(); }
};

struct GGUFFile {
    std::string path;
    uint64_t size = 0;
    size_t n_tensors = 0;
};

// Owns the gguf_context of the metadata file (opened with no_alloc). Validates, for every file of a set, that
// each tensor lies inside its file and has a known type, and for a split set that the shards are all there and
// agree (count, number, tensor count, no tensor twice); throws FormatError naming the file otherwise.
struct GGUFIndex {
    std::string path;             // the file, or the first shard of a split set (the metadata)
    std::vector<GGUFFile> files;  // the file, or every shard in order
    gguf_context * ctx = nullptr; // metadata of `path`
    uint64_t file_size = 0;       // bytes of all files together
    size_t alignment = 32;        // of the metadata file
    std::vector<TensorInfo> tensors;
    std::map<std::string, size_t> by_name;

    // `path`: a single GGUF, or any shard of a split set (the whole set is opened)
    explicit GGUFIndex(const std::string & path);
    ~GGUFIndex();
    GGUFIndex(const GGUFIndex &) = delete;
    GGUFIndex & operator=(const GGUFIndex &) = delete;

    const TensorInfo * find(const std::string & name) const;
    int64_t key(const std::string & k) const { return gguf_find_key(ctx, k.c_str()); }
    bool is_split() const { return files.size() > 1; }

  private:
    void add_tensors(gguf_context * c, int file);
};

// Whole-tensor reads from an index's files (the dense weights at load): each file opened on first use, closed
// with the FileSet. FormatError naming the file and tensor when the bytes are not all there.
struct FileSet {
    explicit FileSet(const GGUFIndex & idx) : idx_(idx), fds_(idx.files.size(), -1) {}
    ~FileSet();
    FileSet(const FileSet &) = delete;
    FileSet & operator=(const FileSet &) = delete;
    void read(const TensorInfo & t, void * dst);

  private:
    const GGUFIndex & idx_;
    std::vector<int> fds_;
};

// llama.cpp's shard name: PREFIX-%05d-of-%05d.gguf (number 1-based)
std::string split_shard_path(const std::string & prefix, int no, int count);

} // namespace moelite
