// PleTable (ple.cpp): the rows of Qwen4-Exp's PLE n-gram table, read from the GGUF on demand into an LRU row cache.
#pragma once
#include <cstring>
#include <fcntl.h>
#include <list>
#include <memory>
#include <string>
#include <unistd.h>
#include <unordered_map>
#include <vector>

#include "common.h"
#include "ggml.h"
#include "gguf_index.h"

namespace moelite {

// The rows of one GGUF tensor [row_dim, n_rows] of any ggml type, read on demand into a fixed number of slots
// (least recently used first out); reads and hits counted.
class PleTable {
  public:
    PleTable(const GGUFIndex & idx, const TensorInfo & t, size_t cache_rows)
        : path_(idx.files[t.file].path), info_(t), row_bytes_(ggml_row_size(t.type, t.ne[0])),
          n_slots_(std::max<size_t>(cache_rows, 1)) {
        fd_ = ::open(path_.c_str(), O_RDONLY | O_CLOEXEC);
        if (fd_ < 0) throw FormatError(path_ + ": cannot open for the PLE table's rows");
        arena_.reset(new uint8_t[n_slots_ * row_bytes_]); // not zeroed: a slot's pages are touched when it is read
        to_float_ = ggml_get_type_traits(t.type)->to_float;
        if (!to_float_ && t.type != GGML_TYPE_F32)
            throw FormatError(path_ + ": tensor '" + t.name + "': type " + ggml_type_name(t.type) +
                              " cannot be dequantized for the PLE rows");
    }
    ~PleTable() {
        if (fd_ >= 0) ::close(fd_);
    }
    int64_t n_rows() const { return info_.ne[1]; }
    int64_t row_dim() const { return info_.ne[0]; }
    size_t cache_bytes() const { return n_slots_ * row_bytes_; }
    uint64_t bytes_read = 0, rows_read = 0, rows_hit = 0;

    // rows[i] (each < n_rows) -> out [n, row_dim] F32
    void gather(const int64_t * rows, size_t n, float * out) {
        std::vector<size_t> slot(n);
        for (size_t i = 0; i < n; ++i) slot[i] = acquire(rows[i], rows + n);
        for (size_t i = 0; i < n; ++i) {
            const uint8_t * src = arena_.get() + slot[i] * row_bytes_;
            float * dst = out + i * row_dim();
            if (info_.type == GGML_TYPE_F32)
                std::memcpy(dst, src, row_bytes_);
            else
                to_float_(src, dst, row_dim());
        }
    }

  private:
    // the slot holding `row`, read from the file if absent; a slot holding a row of this batch ([.., end)) is not
    // reused for another of it (the cache holds at least one batch: PleTable's owner sizes it so)
    size_t acquire(int64_t row, const int64_t * end) {
        (void) end;
        auto it = where_.find(row);
        if (it != where_.end()) {
            lru_.splice(lru_.begin(), lru_, it->second.second);
            ++rows_hit;
            return it->second.first;
        }
        size_t s;
        if (where_.size() < n_slots_) {
            s = where_.size();
        } else { // evict the least recently used row
            const int64_t old = lru_.back();
            lru_.pop_back();
            s = where_[old].first;
            where_.erase(old);
        }
        const uint64_t off = info_.offset + (uint64_t) row * row_bytes_;
        uint8_t * dst = arena_.get() + s * row_bytes_;
        size_t got = 0;
        while (got < row_bytes_) {
            const ssize_t r = ::pread(fd_, dst + got, row_bytes_ - got, (off_t) (off + got));
            if (r <= 0)
                throw FormatError(path_ + ": tensor '" + info_.name + "': cannot read row " + std::to_string(row));
            got += (size_t) r;
        }
        bytes_read += row_bytes_;
        ++rows_read;
        lru_.push_front(row);
        where_[row] = {s, lru_.begin()};
        return s;
    }

    std::string path_;
    TensorInfo info_;
    size_t row_bytes_, n_slots_;
    int fd_ = -1;
    std::unique_ptr<uint8_t[]> arena_;
    ggml_to_float_t to_float_ = nullptr;
    std::list<int64_t> lru_; // most recent first
    std::unordered_map<int64_t, std::pair<size_t, std::list<int64_t>::iterator>> where_;
};

} // namespace moelite
