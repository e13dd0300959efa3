#pragma once
#include <cstddef>
#include <cstdint>

#include "ggml.h"

namespace moelite {
size_t row_size(ggml_type type, int64_t n_per_row);
bool can_quantize_row(ggml_type type, int64_t n_per_row);
void quantize_rows(ggml_type type, const float * src, void * dst, int64_t nrows, int64_t n_per_row, int n_threads);
void dequantize_rows(ggml_type type, const void * src, float * dst, int64_t n);
} // namespace moelite
