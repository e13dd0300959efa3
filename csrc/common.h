// Shared helpers of the C++ core: the exceptions that pybind maps to moelite.errors, and small utilities.
#pragma once
#include <cstdint>
#include <cstdlib>
#include <stdexcept>
#include <string>
#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "ggml-backend.h"
#include "ggml.h"

namespace moelite {

// Bad model file (missing/mis-shaped tensor, bad key, truncated data). Maps to moelite.errors.ModelFormatError.
struct FormatError : std::runtime_error {
    using std::runtime_error::runtime_error;
};
// Disk read failure while the model is open. Maps to moelite.errors.ExpertIOError.
struct IOError : std::runtime_error {
    using std::runtime_error::runtime_error;
};
// A memory budget that cannot hold what is asked. Maps to moelite.errors.BudgetError.
struct BudgetError : std::runtime_error {
    using std::runtime_error::runtime_error;
};

inline bool valid_ggml_type(int t) {
    if (t < 0 || t >= GGML_TYPE_COUNT) return false;
    return ggml_type_size((ggml_type) t) != 0 && ggml_blck_size((ggml_type) t) > 0;
}

// Ask Linux for transparent huge pages on a large host allocation before it is first touched (weights, expert
// arenas, KV cache): where THP is "madvise" (the common default) anonymous memory gets 4 KiB pages, and streaming
// gigabytes of weights through them costs a TLB miss per page. Only whole 2 MiB pages inside [p, p + n) are
// advised; a no-op elsewhere, and MOELITE_NO_HUGEPAGES=1 turns it off (to measure it).
inline void advise_huge_pages(void * p, size_t n) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    static const bool off = std::getenv("MOELITE_NO_HUGEPAGES") != nullptr;
    const uintptr_t huge = 2u << 20, lo = ((uintptr_t) p + huge - 1) & ~(huge - 1),
                    hi = ((uintptr_t) p + n) & ~(huge - 1);
    if (!off && p && hi > lo) madvise((void *) lo, hi - lo, MADV_HUGEPAGE);
#else
    (void) p;
    (void) n;
#endif
}

// The same for a whole backend buffer, when it is host memory.
inline void advise_huge_pages(ggml_backend_buffer_t b) {
    if (b && ggml_backend_buffer_is_host(b))
        advise_huge_pages(ggml_backend_buffer_get_base(b), ggml_backend_buffer_get_size(b));
}

} // namespace moelite
