// Kernel check hook for attention (tests/test_attn_kernels.py, bench/bench_attn.py): attend() (mixer_attention.cpp)
// on given arrays, with the KV cache in the layout and type the model keeps it in, run n_reps times on a CPU
// backend of n_threads: the output and the seconds of each run.
#include <chrono>
#include <cstring>
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
#include <string>
#include <vector>

#include "bindings.h"
#include "common.h"
#include "ggml-alloc.h"
#include "ggml-cpu.h"
#include "graph_util.h"

namespace py = pybind11;
using namespace moelite;

using f32_array = py::array_t<float, py::array::c_style | py::array::forcecast>;

// rows [n, len] F32 -> n rows of type (f32, f16, q8_0) at dst, one every stride bytes
static void store_rows(ggml_type type, const float * src, int64_t n, int64_t len, char * dst, size_t stride) {
    for (int64_t i = 0; i < n; ++i) {
        const float * x = src + i * len;
        char * y = dst + i * stride;
        if (type == GGML_TYPE_F32)
            std::memcpy(y, x, len * sizeof(float));
        else if (type == GGML_TYPE_F16)
            ggml_fp32_to_fp16_row(x, (ggml_fp16_t *) y, len);
        else
            ggml_quantize_chunk(type, x, y, 0, 1, len, nullptr);
    }
}

static py::tuple attn_check(f32_array q, f32_array k, f32_array v, py::object mask_obj, py::object sinks_obj,
                            float scale, const std::string & kv_type, const std::string & path, int n_threads,
                            int n_reps) {
    if (q.ndim() != 3 || k.ndim() != 3 || v.ndim() != 3) throw FormatError("attn_check: q, k, v must be 3-d");
    const int64_t T = q.shape(0), n_head = q.shape(1), dk = q.shape(2);
    const int64_t n_kv = k.shape(0), h_kv = k.shape(1), dv = v.shape(2);
    if (k.shape(2) != dk || v.shape(0) != n_kv || v.shape(1) != h_kv || h_kv == 0 || n_head % h_kv != 0)
        throw FormatError("attn_check: q [T, n_head, dk], k [n_kv, h_kv, dk], v [n_kv, h_kv, dv], n_head % h_kv == 0");
    const ggml_type type = kv_type == "f32"    ? GGML_TYPE_F32
                           : kv_type == "f16"  ? GGML_TYPE_F16
                           : kv_type == "q8_0" ? GGML_TYPE_Q8_0
                                               : GGML_TYPE_COUNT;
    const AttnPath ap = path == "cpu" ? AttnPath::CPU : path == "flash" ? AttnPath::FLASH : AttnPath::PLAIN;
    if (type == GGML_TYPE_COUNT || (path != "cpu" && path != "flash" && path != "plain"))
        throw FormatError("attn_check: kv_type f32 | f16 | q8_0, path cpu | flash | plain");
    if (type == GGML_TYPE_Q8_0 && (dk % 32 || dv % 32 || path == "plain"))
        throw FormatError("attn_check: q8_0 needs head sizes of whole blocks of 32 and flash attention's layout");
    std::vector<float> mask_f32;
    if (!mask_obj.is_none()) {
        f32_array m = mask_obj.cast<f32_array>();
        if (m.ndim() != 2 || m.shape(0) != T || m.shape(1) != n_kv) throw FormatError("attn_check: mask [T, n_kv]");
        mask_f32.assign(m.data(), m.data() + m.size());
    }
    std::vector<float> sinks_f32;
    if (!sinks_obj.is_none()) {
        f32_array s = sinks_obj.cast<f32_array>();
        if (s.ndim() != 1 || s.shape(0) != n_head) throw FormatError("attn_check: sinks [n_head]");
        sinks_f32.assign(s.data(), s.data() + s.size());
    }
    const bool plain = ap == AttnPath::PLAIN;
    // the caches as the model allocates them: one row of all KV heads per position; V transposed for PLAIN
    const size_t k_row = ggml_row_size(type, dk * h_kv), v_row = ggml_row_size(type, dv * h_kv);
    ggml_init_params ip = {ggml_tensor_overhead() * 16 + ggml_graph_overhead(), nullptr, true};
    ggml_context * ctx = ggml_init(ip);
    ggml_tensor * kc = ggml_new_tensor_2d(ctx, type, dk * h_kv, n_kv);
    ggml_tensor * vc =
        plain ? ggml_new_tensor_2d(ctx, type, n_kv, dv * h_kv) : ggml_new_tensor_2d(ctx, type, dv * h_kv, n_kv);
    ggml_tensor * qt = ggml_new_tensor_3d(ctx, GGML_TYPE_F32, dk, n_head, T);
    ggml_tensor * mt =
        mask_f32.empty() ? nullptr : ggml_new_tensor_2d(ctx, plain ? GGML_TYPE_F32 : GGML_TYPE_F16, n_kv, T);
    ggml_tensor * st = sinks_f32.empty() ? nullptr : ggml_new_tensor_1d(ctx, GGML_TYPE_F32, n_head);
    ggml_tensor * K = ggml_view_3d(ctx, kc, dk, n_kv, h_kv, kc->nb[1], ggml_row_size(type, dk), 0);
    ggml_tensor * V = plain ? ggml_view_3d(ctx, vc, n_kv, dv, h_kv, vc->nb[1], vc->nb[1] * dv, 0)
                            : ggml_view_3d(ctx, vc, dv, n_kv, h_kv, vc->nb[1], ggml_row_size(type, dv), 0);
    ggml_tensor * out = attend(ctx, ap, qt, K, V, mt, st, &scale);
    ggml_cgraph * gf = ggml_new_graph(ctx);
    ggml_build_forward_expand(gf, out);
    ggml_backend_t be = ggml_backend_cpu_init();
    ggml_backend_cpu_set_n_threads(be, n_threads);
    ggml_gallocr_t ga = ggml_gallocr_new(ggml_backend_get_default_buffer_type(be));
    if (!ggml_gallocr_alloc_graph(ga, gf)) throw BudgetError("attn_check: graph allocation failed");
    // kc / vc are leafs of the graph: the allocator placed them too; fill them row by row
    std::vector<char> host(std::max(ggml_nbytes(kc), ggml_nbytes(vc)));
    store_rows(type, k.data(), n_kv, dk * h_kv, host.data(), k_row);
    ggml_backend_tensor_set(kc, host.data(), 0, ggml_nbytes(kc));
    if (plain) { // V^T: row (head g, dim i) holds that element over the positions
        std::vector<float> vt((size_t) (dv * h_kv * n_kv));
        for (int64_t j = 0; j < n_kv; ++j)
            for (int64_t e = 0; e < dv * h_kv; ++e) vt[e * n_kv + j] = v.data()[j * dv * h_kv + e];
        store_rows(type, vt.data(), dv * h_kv, n_kv, host.data(), vc->nb[1]);
    } else {
        store_rows(type, v.data(), n_kv, dv * h_kv, host.data(), v_row);
    }
    ggml_backend_tensor_set(vc, host.data(), 0, ggml_nbytes(vc));
    ggml_backend_tensor_set(qt, q.data(), 0, ggml_nbytes(qt));
    if (mt) {
        if (plain) {
            ggml_backend_tensor_set(mt, mask_f32.data(), 0, ggml_nbytes(mt));
        } else {
            std::vector<ggml_fp16_t> m16(mask_f32.size());
            ggml_fp32_to_fp16_row(mask_f32.data(), m16.data(), (int64_t) m16.size());
            ggml_backend_tensor_set(mt, m16.data(), 0, ggml_nbytes(mt));
        }
    }
    if (st) ggml_backend_tensor_set(st, sinks_f32.data(), 0, ggml_nbytes(st));
    std::vector<double> seconds;
    for (int r = 0; r < std::max(1, n_reps); ++r) {
        const auto t0 = std::chrono::steady_clock::now();
        ggml_backend_graph_compute(be, gf);
        seconds.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
    }
    py::array_t<float> o({(py::ssize_t) T, (py::ssize_t) n_head, (py::ssize_t) dv});
    ggml_backend_tensor_get(out, o.mutable_data(), 0, ggml_nbytes(out));
    ggml_gallocr_free(ga);
    ggml_backend_free(be);
    ggml_free(ctx);
    return py::make_tuple(o, seconds);
}

void bind_attn(py::module_ & m) {
    m.def("attn_check", &attn_check, py::arg("q"), py::arg("k"), py::arg("v"), py::arg("mask") = py::none(),
          py::arg("sinks") = py::none(), py::arg("scale") = 1.0f, py::arg("kv_type") = "f16", py::arg("path") = "cpu",
          py::arg("n_threads") = 2, py::arg("n_reps") = 1,
          "attention as the model runs it, on q [T, n_head, dk], k [n_kv, h_kv, dk], v [n_kv, h_kv, dv], mask [T, "
          "n_kv] (0 / -inf) and sinks [n_head]: (out [T, n_head, dv], seconds per run)");
}
