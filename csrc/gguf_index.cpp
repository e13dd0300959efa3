#include "gguf_index.h"

#include <sys/stat.h>

#include "common.h"

namespace moelite {

GGUFIndex::GGUFIndex(const std::string & p) : path(p) {
    struct stat st;
    if (stat(path.c_str(), &st) != 0) throw FormatError(path + ": cannot open (no such file or not readable)");
    file_size = (uint64_t) st.st_size;
    gguf_init_params params = {/*no_alloc =*/ true, /*ctx =*/ nullptr};
    // ggml says why a header is refused only in its log: collect that text (instead of letting it reach stderr)
    // for the error message, then restore the previous logger
    ggml_log_callback prev_cb = nullptr;
    void * prev_ud = nullptr;
    ggml_log_get(&prev_cb, &prev_ud);
    std::string why;
    ggml_log_set([](ggml_log_level level, const char * text, void * ud) {
        if (level == GGML_LOG_LEVEL_ERROR || level == GGML_LOG_LEVEL_WARN || level == GGML_LOG_LEVEL_CONT)
            *static_cast<std::string *>(ud) += text;
    }, &why);
    ctx = gguf_init_from_file(path.c_str(), params);
    ggml_log_set(prev_cb, prev_ud);
    if (!ctx) {
        std::string said;                                 // ggml's lines, its "function: " prefixes dropped
        size_t pos = 0;
        while (pos < why.size()) {
            size_t end = why.find('\n', pos);
            if (end == std::string::npos) end = why.size();
            std::string line = why.substr(pos, end - pos);
            const size_t colon = line.find(": ");
            if (colon != std::string::npos && colon < 40) line = line.substr(colon + 2);
            if (!line.empty()) said += (said.empty() ? "" : "; ") + line;
            pos = end + 1;
        }
        throw FormatError(path + ": not a valid GGUF file" + (said.empty() ? std::string(" (bad magic, version, header or "
                          "truncated metadata)") : ": " + said.substr(0, 300)));
    }
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
