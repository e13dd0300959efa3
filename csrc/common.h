// Shared helpers of the C++ core: the exceptions that pybind maps to moelite.errors, and small utilities.
#pragma once
#include <stdexcept>
#include <string>

#include "ggml.h"

namespace moelite {

// Bad model file (missing/mis-shaped tensor, bad key, truncated data). Maps to moelite.errors.ModelFormatError.
struct FormatError : std::runtime_error { using std::runtime_error::runtime_error; };
// Disk read failure while the model is open. Maps to moelite.errors.ExpertIOError.
struct IOError : std::runtime_error { using std::runtime_error::runtime_error; };
// A memory budget that cannot hold what is asked. Maps to moelite.errors.BudgetError.
struct BudgetError : std::runtime_error { using std::runtime_error::runtime_error; };

inline bool valid_ggml_type(int t) {
    if (t < 0 || t >= GGML_TYPE_COUNT) return false;
    return ggml_type_size((ggml_type) t) != 0 && ggml_blck_size((ggml_type) t) > 0;
}

}  // namespace moelite
