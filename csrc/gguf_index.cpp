#include "gguf_index.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdint>
#include <cstring>

#include <cstdio>

#include "common.h"

namespace moelite {

namespace {

// One GGUF file's context (metadata only) and size; FormatError with ggml's own reason when it is refused.
gguf_context * open_gguf(const std::string & path, uint64_t & size) {
    struct stat st;
    if (stat(path.c_str(), &st) != 0) throw FormatError(path + ": cannot open (no such file or not readable)");
    size = (uint64_t) st.st_size;
    gguf_init_params params = {/*no_alloc =*/true, /*ctx =*/nullptr};
    // ggml says why a header is refused only in its log: collect that text (instead of letting it reach stderr)
    // for the error message, then restore the previous logger
    ggml_log_callback prev_cb = nullptr;
    void * prev_ud = nullptr;
    ggml_log_get(&prev_cb, &prev_ud);
    std::string why;
    ggml_log_set(
        [](ggml_log_level level, const char * text, void * ud) {
            if (level == GGML_LOG_LEVEL_ERROR || level == GGML_LOG_LEVEL_WARN || level == GGML_LOG_LEVEL_CONT)
                *static_cast<std::string *>(ud) += text;
        },
        &why);
    gguf_context * ctx = gguf_init_from_file(path.c_str(), params);
    ggml_log_set(prev_cb, prev_ud);
    if (!ctx) {
        std::string said; // ggml's lines, its "function: " prefixes dropped
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
        throw FormatError(path + ": not a valid GGUF file" +
                          (said.empty() ? std::string(" (bad magic, version, header or "
                                                      "truncated metadata)")
                                        : ": " + said.substr(0, 300)));
    }
    return ctx;
}

// An integer key of any integer GGUF type; `fallback` when absent, FormatError when of another type.
int64_t int_key(gguf_context * ctx, const char * key, const std::string & path, int64_t fallback) {
    const int64_t k = gguf_find_key(ctx, key);
    if (k < 0) return fallback;
    switch (gguf_get_kv_type(ctx, k)) {
    case GGUF_TYPE_UINT8: return gguf_get_val_u8(ctx, k);
    case GGUF_TYPE_INT8: return gguf_get_val_i8(ctx, k);
    case GGUF_TYPE_UINT16: return gguf_get_val_u16(ctx, k);
    case GGUF_TYPE_INT16: return gguf_get_val_i16(ctx, k);
    case GGUF_TYPE_UINT32: return gguf_get_val_u32(ctx, k);
    case GGUF_TYPE_INT32: return gguf_get_val_i32(ctx, k);
    case GGUF_TYPE_UINT64: {
        const uint64_t v = gguf_get_val_u64(ctx, k);
        return v > (uint64_t) INT64_MAX ? -1 : (int64_t) v;
    }
    case GGUF_TYPE_INT64: return gguf_get_val_i64(ctx, k);
    default: throw FormatError(path + ": key '" + key + "' is not an integer");
    }
}

struct Ctx { // frees a gguf_context on every path out of the constructor
    gguf_context * c = nullptr;
    ~Ctx() {
        if (c) gguf_free(c);
    }
};

} // namespace

std::string split_shard_path(const std::string & prefix, int no, int count) {
    char tail[48];
    std::snprintf(tail, sizeof tail, "-%05d-of-%05d.gguf", no, count);
    return prefix + tail;
}

GGUFIndex::GGUFIndex(const std::string & p) : path(p) {
    uint64_t size = 0;
    Ctx opened{open_gguf(p, size)};
    const int64_t count = int_key(opened.c, "split.count", p, 1);
    const int64_t no = int_key(opened.c, "split.no", p, 0);
    if (count < 1 || count > 65535)
        throw FormatError(p + ": key 'split.count' = " + std::to_string(count) + ": expected an integer in [1, 65535]");
    if (no < 0 || no >= count)
        throw FormatError(p + ": key 'split.no' = " + std::to_string(no) + ": expected an integer in [0, " +
                          std::to_string(count - 1) + "] (split.count = " + std::to_string(count) + ")");
    if (count == 1) {
        files.push_back({p, size, 0});
        ctx = opened.c;
        opened.c = nullptr;
        add_tensors(ctx, 0);
    } else {
        // the other shards are found by llama.cpp's naming: PREFIX-0000k-of-0000N.gguf
        const std::string own = split_shard_path("", (int) no + 1, (int) count);
        if (p.size() <= own.size() || p.compare(p.size() - own.size(), own.size(), own) != 0)
            throw FormatError(p + ": shard " + std::to_string(no + 1) + " of a split set of " + std::to_string(count) +
                              " (keys split.no, split.count), but its name does not end in '" + own +
                              "', so the other shards cannot be found (llama.cpp names them NAME-00001-of-" +
                              own.substr(own.size() - 10, 5) + ".gguf ...)");
        const std::string prefix = p.substr(0, p.size() - own.size());
        constexpr int64_t kAbsent = INT64_MIN;
        int64_t tensors_total = kAbsent;
        for (int i = 0; i < (int) count; ++i) {
            const std::string sp = split_shard_path(prefix, i + 1, (int) count);
            Ctx shard;
            uint64_t ssize = size;
            if (i == no) {
                shard.c = opened.c;
                opened.c = nullptr;
            } else {
                struct stat st;
                if (stat(sp.c_str(), &st) != 0)
                    throw FormatError(sp + ": missing shard " + std::to_string(i + 1) + " of " + std::to_string(count) +
                                      " of the split set " + p + " belongs to");
                shard.c = open_gguf(sp, ssize);
            }
            const int64_t c = int_key(shard.c, "split.count", sp, -1), n = int_key(shard.c, "split.no", sp, -1);
            if (c != count)
                throw FormatError(
                    sp + ": key 'split.count' = " + (c < 0 ? std::string("(absent)") : std::to_string(c)) +
                    ", but the set has " + std::to_string(count) + " shards (" + p + "): a file of another set");
            if (n != i)
                throw FormatError(sp + ": key 'split.no' = " + (n < 0 ? std::string("(absent)") : std::to_string(n)) +
                                  ", expected " + std::to_string(i) + " for shard " + std::to_string(i + 1) + " of " +
                                  std::to_string(count) + ": a shard of another set, or renamed");
            const int64_t tc = int_key(shard.c, "split.tensors.count", sp, kAbsent);
            auto said = [&](int64_t v) { return v == kAbsent ? std::string("(absent)") : std::to_string(v); };
            if (tc != kAbsent && tc < 0)
                throw FormatError(sp + ": key 'split.tensors.count' = " + std::to_string(tc) +
                                  ": expected an integer >= 0");
            if (i == 0) tensors_total = tc; // shard 1's value (or its absence) is the reference
            if (tc != tensors_total)
                throw FormatError(sp + ": key 'split.tensors.count' = " + said(tc) + ", but shard 1 says " +
                                  said(tensors_total) + ": a shard of another set");
            files.push_back({sp, ssize, 0});
            add_tensors(shard.c, i);
            if (i == 0) {
                ctx = shard.c; // the metadata
                shard.c = nullptr;
                path = sp;
            }
        }
        if (tensors_total != kAbsent && (size_t) tensors_total != tensors.size()) {
            std::string held; // which shard holds how many: the odd one stands out
            for (const GGUFFile & f : files)
                held += (held.empty() ? "" : ", ") + f.path.substr(f.path.rfind('/') + 1) + ": " +
                        std::to_string(f.n_tensors);
            throw FormatError(path + ": key 'split.tensors.count' = " + std::to_string(tensors_total) + ", but the " +
                              std::to_string(count) + " shards hold " + std::to_string(tensors.size()) + " tensors (" +
                              held + "): a shard of another set");
        }
    }
    alignment = gguf_get_alignment(ctx);
    for (const GGUFFile & f : files) file_size += f.size;
}

void GGUFIndex::add_tensors(gguf_context * c, int file) {
    GGUFFile & f = files[file];
    const uint64_t data_offset = gguf_get_data_offset(c);
    const int64_t n = gguf_get_n_tensors(c);
    f.n_tensors = (size_t) n;
    tensors.reserve(tensors.size() + n);
    for (int64_t i = 0; i < n; ++i) {
        TensorInfo t;
        t.name = gguf_get_tensor_name(c, i);
        const int type = (int) gguf_get_tensor_type(c, i);
        if (!valid_ggml_type(type))
            throw FormatError(f.path + ": tensor '" + t.name + "' has unknown ggml type " + std::to_string(type));
        t.type = (ggml_type) type;
        const int64_t * ne = gguf_get_tensor_ne(c, i);
        t.n_dims = 1;
        for (int d = 0; d < GGML_MAX_DIMS; ++d) {
            t.ne[d] = ne[d];
            if (ne[d] != 1) t.n_dims = d + 1;
        }
        t.file = file;
        t.offset = data_offset + gguf_get_tensor_offset(c, i);
        t.nbytes = gguf_get_tensor_size(c, i);
        if (t.offset + t.nbytes > f.size)
            throw FormatError(f.path + ": truncated: tensor '" + t.name + "' needs bytes [" + std::to_string(t.offset) +
                              ", " + std::to_string(t.offset + t.nbytes) + ") but the file has " +
                              std::to_string(f.size) + " bytes");
        auto it = by_name.find(t.name);
        if (it != by_name.end()) // one file never repeats a name (ggml refuses it): two shards do
            throw FormatError(f.path + ": tensor '" + t.name + "' is also in " + files[tensors[it->second].file].path +
                              ": a shard of another set");
        by_name[t.name] = tensors.size();
        tensors.push_back(t);
    }
}

GGUFIndex::~GGUFIndex() {
    if (ctx) gguf_free(ctx);
}

FileSet::~FileSet() {
    for (int fd : fds_)
        if (fd >= 0) close(fd);
}

void FileSet::read(const TensorInfo & t, void * dst) {
    const std::string & path = idx_.files[t.file].path;
    int & fd = fds_[t.file];
    if (fd < 0) fd = open(path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) throw IOError(path + ": " + strerror(errno));
    uint64_t done = 0;
    while (done < t.nbytes) {
        const ssize_t r = pread(fd, (char *) dst + done, t.nbytes - done, t.offset + done);
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0) throw FormatError(path + ": reading tensor '" + t.name + "' failed (truncated file?)");
        done += (uint64_t) r;
    }
}

const TensorInfo * GGUFIndex::find(const std::string & name) const {
    auto it = by_name.find(name);
    return it == by_name.end() ? nullptr : &tensors[it->second];
}

} // namespace moelite
