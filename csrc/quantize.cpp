// Quantize / dequantize rows with the vendored ggml quantizer (used by the converter and the tests).
#include "quantize.h"

#include <cstring>
#include <thread>
#include <vector>

#include "common.h"

namespace moelite {

size_t row_size(ggml_type type, int64_t n_per_row) { return ggml_row_size(type, n_per_row); }

bool can_quantize_row(ggml_type type, int64_t n_per_row) {
    return valid_ggml_type(type) && n_per_row % ggml_blck_size(type) == 0 &&
           (type == GGML_TYPE_F32 || ggml_get_type_traits(type)->from_float_ref != nullptr || type == GGML_TYPE_F16 ||
            type == GGML_TYPE_BF16);
}

// src: [nrows, n_per_row] f32 row-major. dst: nrows * row_size bytes. Rows are split across threads.
void quantize_rows(ggml_type type, const float * src, void * dst, int64_t nrows, int64_t n_per_row, int n_threads) {
    if (!can_quantize_row(type, n_per_row))
        throw FormatError(std::string("cannot quantize rows of ") + std::to_string(n_per_row) + " values to " +
                          ggml_type_name(type) + " (block size " + std::to_string(ggml_blck_size(type)) + ")");
    if (ggml_quantize_requires_imatrix(type))
        throw FormatError(std::string(ggml_type_name(type)) + " needs an importance matrix; not supported");
    ggml_quantize_init(type); // not thread-safe on first use: do it before spawning
    const size_t rs = ggml_row_size(type, n_per_row);
    n_threads = std::max(1, std::min<int>(n_threads, (int) nrows));
    std::vector<std::thread> pool;
    const int64_t per = (nrows + n_threads - 1) / n_threads;
    for (int t = 0; t < n_threads; ++t) {
        const int64_t r0 = t * per, r1 = std::min(nrows, r0 + per);
        if (r0 >= r1) break;
        pool.emplace_back([=] {
            ggml_quantize_chunk(type, src + r0 * n_per_row, (char *) dst + r0 * rs, 0, r1 - r0, n_per_row, nullptr);
        });
    }
    for (auto & th : pool) th.join();
}

void dequantize_rows(ggml_type type, const void * src, float * dst, int64_t n) {
    if (type == GGML_TYPE_F32) {
        std::memcpy(dst, src, n * sizeof(float));
        return;
    }
    const auto * tr = ggml_get_type_traits(type);
    if (!tr->to_float) throw FormatError(std::string("no dequantizer for ggml type ") + ggml_type_name(type));
    tr->to_float(src, dst, n);
}

} // namespace moelite
