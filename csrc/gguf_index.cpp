#include "gguf_index.h"

#include <sys/stat.h>

#include "common.h"

namespace moelite {

GGUFIndex::GGUFIndex(const std::string & p) : path(p) {
    struct stat st;
    if (stat(path.c_str(), &st) != 0) throw FormatError(path + ": cannot open (no such file or not readable)");
    file_size = (uint64_t) st.st_size;
    gguf_init_params params = {/*no_alloc =*/ true, /*ctx =*/ nullptr};
    ctx = gguf_init_from_file(path.c_str(), params);
    if (!ctx) throw FormatError(path + ": not a valid GGUF file (bad magic, version, header or truncated metadata)");
    alignment = gguf_get_alignment(ctx);
    const uint64_t data_offset = gguf_get_data_offset(ctx);
    const int64_t n = gguf_get_n_tensors(ctx);
    tensors.reserve(n);
    for (int64_t i = 0; i < n; ++i) {
        TensorInfo t;
        t.name = gguf_get_tensor_name(ctx, i);
        const int type = (int) gguf_get_tensor_type(ctx, i);
        if (!valid_ggml_type(type))
            throw FormatError(path + ": tensor '" + t.name + "' has unknown ggml type " + std::to_string(type));
        t.type = (ggml_type) type;
        const int64_t * ne = gguf_get_tensor_ne(ctx, i);
        t.n_dims = 1;
        for (int d = 0; d < GGML_MAX_DIMS; ++d) {
            t.ne[d] = ne[d];
            if (ne[d] != 1) t.n_dims = d + 1;
        }
        t.offset = data_offset + gguf_get_tensor_offset(ctx, i);
        t.nbytes = gguf_get_tensor_size(ctx, i);
        if (t.offset + t.nbytes > file_size)
            throw FormatError(path + ": truncated: tensor '" + t.name + "' needs bytes [" + std::to_string(t.offset) +
                              ", " + std::to_string(t.offset + t.nbytes) + ") but the file has " +
                              std::to_string(file_size) + " bytes");
        by_name[t.name] = tensors.size();
        tensors.push_back(t);
    }
}

GGUFIndex::~GGUFIndex() {
    if (ctx) gguf_free(ctx);
}

const TensorInfo * GGUFIndex::find(const std::string & name) const {
    auto it = by_name.find(name);
    return it == by_name.end() ? nullptr : &tensors[it->second];
}

}  // namespace moelite
