// pybind11 bindings: moelite._core. Thin: conversions between numpy/Python and the C++ core only.
#include <cstdio>
#include <cstring>

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "bindings.h"
#include "common.h"
#include "gguf_index.h"
#include "quantize.h"

namespace py = pybind11;
using namespace moelite;

// printable form of a name that may not be UTF-8 (for error messages)
static std::string escaped(const char * s) {
    std::string out;
    for (const unsigned char * p = (const unsigned char *) s; *p; ++p) {
        if (*p >= 0x20 && *p < 0x7f) {
            out += (char) *p;
            continue;
        }
        char buf[8];
        snprintf(buf, sizeof buf, "\\x%02x", *p);
        out += buf;
    }
    return out;
}

// strict UTF-8 decoding: GGUF strings come from untrusted files; `what` names the key or tensor
static py::str utf8(const char * s, const std::string & what) {
    PyObject * o = PyUnicode_DecodeUTF8(s, (Py_ssize_t) strlen(s), "strict");
    if (!o) {
        PyErr_Clear();
        throw FormatError(what + " is not valid UTF-8");
    }
    return py::reinterpret_steal<py::str>(o);
}

static py::object gguf_value(gguf_context * ctx, int64_t k, gguf_type t) {
    switch (t) {
    case GGUF_TYPE_UINT8: return py::int_(gguf_get_val_u8(ctx, k));
    case GGUF_TYPE_INT8: return py::int_(gguf_get_val_i8(ctx, k));
    case GGUF_TYPE_UINT16: return py::int_(gguf_get_val_u16(ctx, k));
    case GGUF_TYPE_INT16: return py::int_(gguf_get_val_i16(ctx, k));
    case GGUF_TYPE_UINT32: return py::int_(gguf_get_val_u32(ctx, k));
    case GGUF_TYPE_INT32: return py::int_(gguf_get_val_i32(ctx, k));
    case GGUF_TYPE_UINT64: return py::int_(gguf_get_val_u64(ctx, k));
    case GGUF_TYPE_INT64: return py::int_(gguf_get_val_i64(ctx, k));
    case GGUF_TYPE_FLOAT32: return py::float_(gguf_get_val_f32(ctx, k));
    case GGUF_TYPE_FLOAT64: return py::float_(gguf_get_val_f64(ctx, k));
    case GGUF_TYPE_BOOL: return py::bool_(gguf_get_val_bool(ctx, k));
    case GGUF_TYPE_STRING:
        return utf8(gguf_get_val_str(ctx, k), "the value of key '" + escaped(gguf_get_key(ctx, k)) + "'");
    default: return py::none();
    }
}

static py::object gguf_array(gguf_context * ctx, int64_t k) {
    const gguf_type at = gguf_get_arr_type(ctx, k);
    const size_t n = gguf_get_arr_n(ctx, k);
    if (at == GGUF_TYPE_STRING) {
        py::list out(n);
        for (size_t i = 0; i < n; ++i) {
            const char * s = gguf_get_arr_str(ctx, k, i);
            out[i] = py::reinterpret_steal<py::object>(PyUnicode_DecodeUTF8(s, strlen(s), "replace"));
        }
        return out;
    }
    const void * data = gguf_get_arr_data(ctx, k);
    auto mk = [&](auto tag) {
        using T = decltype(tag);
        py::array_t<T> a(n);
        std::memcpy(a.mutable_data(), data, n * sizeof(T));
        return py::object(a);
    };
    switch (at) {
    case GGUF_TYPE_UINT8: return mk(uint8_t{});
    case GGUF_TYPE_INT8: return mk(int8_t{});
    case GGUF_TYPE_UINT16: return mk(uint16_t{});
    case GGUF_TYPE_INT16: return mk(int16_t{});
    case GGUF_TYPE_UINT32: return mk(uint32_t{});
    case GGUF_TYPE_INT32: return mk(int32_t{});
    case GGUF_TYPE_UINT64: return mk(uint64_t{});
    case GGUF_TYPE_INT64: return mk(int64_t{});
    case GGUF_TYPE_FLOAT32: return mk(float{});
    case GGUF_TYPE_FLOAT64: return mk(double{});
    case GGUF_TYPE_BOOL: return mk(bool{});
    default: return py::none();
    }
}

// read_gguf(path) -> dict(kv=..., tensors=[(name, type, shape(ggml order), offset, nbytes)], alignment, file_size,
// path, files=[(path, size)], tensor_files=[file index per tensor]). `path` may be any shard of a split set: the whole
// set is read (kv from its first shard, tensors from all, offsets within their own shard's file; file_size of all).
static py::dict read_gguf(const std::string & path) {
    GGUFIndex idx(path);
    py::dict kv;
    for (int64_t k = 0; k < gguf_get_n_kv(idx.ctx); ++k) {
        const gguf_type t = gguf_get_kv_type(idx.ctx, k);
        const char * key = gguf_get_key(idx.ctx, k);
        kv[utf8(key, "metadata key '" + escaped(key) + "'")] =
            t == GGUF_TYPE_ARRAY ? gguf_array(idx.ctx, k) : gguf_value(idx.ctx, k, t);
    }
    py::list tensors, tensor_files, files;
    for (const auto & t : idx.tensors) {
        py::tuple shape(t.n_dims);
        for (int d = 0; d < t.n_dims; ++d) shape[d] = t.ne[d];
        tensors.append(py::make_tuple(utf8(t.name.c_str(), "tensor name '" + escaped(t.name.c_str()) + "'"),
                                      (int) t.type, shape, t.offset, t.nbytes));
        tensor_files.append(t.file);
    }
    for (const auto & f : idx.files) files.append(py::make_tuple(f.path, f.size));
    py::dict out;
    out["kv"] = kv;
    out["tensors"] = tensors;
    out["alignment"] = idx.alignment;
    out["file_size"] = idx.file_size;
    out["path"] = idx.path;
    out["files"] = files;
    out["tensor_files"] = tensor_files;
    return out;
}

static py::array_t<uint8_t> py_quantize(py::array_t<float, py::array::c_style | py::array::forcecast> src, int type,
                                        int n_threads) {
    if (src.ndim() != 2) throw FormatError("quantize: expected a 2-D float32 array [rows, n_per_row]");
    const int64_t nrows = src.shape(0), n_per_row = src.shape(1);
    if (!valid_ggml_type(type)) throw FormatError("quantize: unknown ggml type " + std::to_string(type));
    const size_t rs = row_size((ggml_type) type, n_per_row);
    py::array_t<uint8_t> out({(py::ssize_t) nrows, (py::ssize_t) rs});
    const float * s = src.data();
    void * d = out.mutable_data();
    {
        py::gil_scoped_release nogil;
        quantize_rows((ggml_type) type, s, d, nrows, n_per_row, n_threads);
    }
    return out;
}

static py::array_t<float> py_dequantize(py::buffer data, int type, int64_t n) {
    if (!valid_ggml_type(type)) throw FormatError("dequantize: unknown ggml type " + std::to_string(type));
    py::buffer_info bi = data.request();
    const int64_t blck = ggml_blck_size((ggml_type) type);
    if (n % blck != 0 || (size_t) bi.size * bi.itemsize < ggml_row_size((ggml_type) type, n))
        throw FormatError("dequantize: buffer too small or n not a multiple of the block size");
    py::array_t<float> out(n);
    dequantize_rows((ggml_type) type, bi.ptr, out.mutable_data(), n);
    return out;
}

PYBIND11_MODULE(_core, m) {
    m.doc() = "moelite C++ core: GGUF index, quantizers, expert cache, ggml forward graphs";
    // The core's errors as Python exceptions. Their messages quote names read from the file (tensor names,
    // keys), which may hold any bytes: decoded with backslashreplace, never a UnicodeDecodeError instead of the
    // error (a translator registered after pybind's own is tried first).
    static PyObject * format_error = py::register_exception<FormatError>(m, "FormatError", PyExc_ValueError).ptr();
    static PyObject * io_error = py::register_exception<IOError>(m, "IOError", PyExc_OSError).ptr();
    static PyObject * budget_error = py::register_exception<BudgetError>(m, "BudgetError", PyExc_ValueError).ptr();
    py::register_exception_translator([](std::exception_ptr p) {
        auto raise = [](PyObject * type, const char * what) {
            PyObject * msg = PyUnicode_DecodeUTF8(what, (Py_ssize_t) std::strlen(what), "backslashreplace");
            PyErr_SetObject(type, msg);
            Py_XDECREF(msg);
        };
        try {
            if (p) std::rethrow_exception(p);
        } catch (const FormatError & e) { raise(format_error, e.what()); } catch (const IOError & e) {
            raise(io_error, e.what());
        } catch (const BudgetError & e) { raise(budget_error, e.what()); }
    });

    m.def("read_gguf", &read_gguf, py::arg("path"), "metadata and tensor table of a GGUF file (ggml's gguf API)");
    m.def("quantize", &py_quantize, py::arg("src"), py::arg("type"), py::arg("n_threads") = 2,
          "quantize a [rows, n_per_row] float32 array to ggml type rows -> uint8 [rows, row_size]");
    m.def("dequantize", &py_dequantize, py::arg("data"), py::arg("type"), py::arg("n"),
          "dequantize n values of ggml type from a buffer -> float32 [n]");
    m.def("can_quantize", [](int type, int64_t n) { return can_quantize_row((ggml_type) type, n); });
    m.def("type_name", [](int type) {
        if (!valid_ggml_type(type)) throw FormatError("unknown ggml type " + std::to_string(type));
        return std::string(ggml_type_name((ggml_type) type));
    });
    m.def("row_size", [](int type, int64_t n) { return row_size((ggml_type) type, n); });
    m.def("block_size", [](int type) { return ggml_blck_size((ggml_type) type); });
#ifdef MOELITE_CUDA
    m.attr("has_cuda") = true;
#else
    m.attr("has_cuda") = false;
#endif
    bind_model(m);
    bind_attn(m);
}
