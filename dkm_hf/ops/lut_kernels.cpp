// The kernels of lut_kernels.c as torch operators: dkm_hf::decode_rows, dkm_hf::lut_gemv, dkm_hf::lut_lanes.
// Built by dkm_hf/ops/native.py through torch.utils.cpp_extension (dkm_hf/ops/extension.py); native.py registers
// their fake (meta) implementations. The C file is compiled here as C++, in this translation unit.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <thread>

#include "lut_kernels.c"

namespace {

int64_t dtype_code(at::ScalarType t, const char* what) {
    switch (t) {
        case at::kFloat: return 0;
        case at::kHalf: return 1;
        case at::kBFloat16: return 2;
        default: TORCH_CHECK(false, "dkm_hf native kernels: ", what, " has dtype ", t, "; float32, float16 or bfloat16 needed");
    }
}

void check_cpu(const at::Tensor& t, const char* what) {
    TORCH_CHECK(t.device().is_cpu() && t.is_contiguous(), "dkm_hf native kernels: ", what,
                " must be a contiguous CPU tensor, got ", t.device(), t.is_contiguous() ? "" : " (not contiguous)");
}

Palette palette_of(const at::Tensor& packed, const at::Tensor& lut, const std::optional<at::Tensor>& scale,
                   int64_t bits, int64_t channels, int64_t features, at::ScalarType dtype) {
    check_cpu(packed, "packed");
    check_cpu(lut, "lut");
    TORCH_CHECK(packed.scalar_type() == at::kByte, "dkm_hf native kernels: packed has dtype ", packed.scalar_type(),
                ", uint8 needed");
    TORCH_CHECK(lut.dim() == 3, "dkm_hf native kernels: lut has shape ", lut.sizes(), ", (groups, 2**bits, d) needed");
    const int64_t groups = lut.size(0), n_clusters = lut.size(1), dim = lut.size(2);
    TORCH_CHECK(bits >= 1 && bits <= 8 && n_clusters == (int64_t{1} << bits), "dkm_hf native kernels: lut of shape ",
                lut.sizes(), " does not fit bits=", bits);
    TORCH_CHECK(channels >= 0 && features >= 0, "dkm_hf native kernels: a weight of ", channels, " x ", features);
    TORCH_CHECK(dim >= 1 && dim <= MAX_DIM && n_clusters * dim <= MAX_LUT && features % dim == 0 && groups >= 1 &&
                    channels % groups == 0,
                "dkm_hf native kernels: lut of shape ", lut.sizes(), " does not fit a weight of ", channels, " x ",
                features);
    // channels * vectors * bits <= the packed bits, without forming the product (it can wrap for huge arguments)
    const int64_t vectors = features / dim;
    TORCH_CHECK(vectors == 0 || channels <= packed.numel() * 8 / bits / vectors, "dkm_hf native kernels: packed has ",
                packed.numel(), " bytes, too few for ", channels, " x ", vectors, " indices of ", bits, " bits");
    Palette p;
    p.packed = packed.data_ptr<uint8_t>();
    p.bits = bits;
    p.cluster_dim = dim;
    p.vectors_per_row = features / dim;
    p.rows_per_group = channels / groups;
    p.n_clusters = n_clusters;
    p.lut = lut.data_ptr();
    p.lut_dtype = dtype_code(lut.scalar_type(), "lut");
    p.scale = nullptr;
    p.scale_dtype = 0;
    if (scale.has_value()) {
        check_cpu(*scale, "scale");
        TORCH_CHECK(scale->numel() == channels, "dkm_hf native kernels: scale has ", scale->numel(),
                    " values for ", channels, " rows");
        p.scale = scale->data_ptr();
        p.scale_dtype = dtype_code(scale->scalar_type(), "scale");
    }
    p.value_dtype = dtype_code(dtype, "the value dtype");
    return p;
}

// OpenMP's team size: at least one thread, at most what the machine or torch has (a huge count crashed libgomp)
int64_t team(int64_t threads) {
    const int64_t most = std::max<int64_t>({at::get_num_threads(), std::thread::hardware_concurrency(), 1});
    return std::clamp<int64_t>(threads, 1, most);
}

at::Tensor decode_rows(const at::Tensor& packed, const at::Tensor& lut, const std::optional<at::Tensor>& scale,
                       int64_t bits, int64_t channels, int64_t features, at::ScalarType dtype,
                       const std::optional<at::Tensor>& rows, int64_t threads) {
    const Palette p = palette_of(packed, lut, scale, bits, channels, features, dtype);
    const int64_t* row_ptr = nullptr;
    at::Tensor index;
    int64_t n = channels;
    if (rows.has_value()) {
        TORCH_CHECK(rows->device().is_cpu() && at::isIntegralType(rows->scalar_type(), /*includeBool=*/false),
                    "dkm_hf native kernels: rows must be an integer CPU tensor, got ", rows->scalar_type());
        index = rows->to(at::kLong).contiguous();
        n = index.numel();
        if (n) {
            TORCH_CHECK(index.min().item<int64_t>() >= 0 && index.max().item<int64_t>() < channels,
                        "dkm_hf native kernels: rows out of range for a weight of ", channels, " rows");
        }
        row_ptr = index.data_ptr<int64_t>();
    }
    at::Tensor out = at::empty({n, features}, at::TensorOptions().dtype(dtype));
    if (n == 0 || features == 0) return out;
    dkm_decode_rows(&p, row_ptr, 0, n, out.data_ptr(), team(threads));
    return out;
}

at::Tensor lut_gemv(const at::Tensor& packed, const at::Tensor& lut, const std::optional<at::Tensor>& scale,
                    int64_t bits, int64_t channels, int64_t features, at::ScalarType dtype, const at::Tensor& x,
                    const std::optional<at::Tensor>& bias, int64_t threads) {
    const Palette p = palette_of(packed, lut, scale, bits, channels, features, dtype);
    TORCH_CHECK(x.scalar_type() == at::kFloat && x.device().is_cpu() && x.dim() >= 1 && x.size(-1) == features,
                "lut_gemv needs float32 CPU input of ", features, " features, got ", x.scalar_type(), " ", x.sizes());
    at::Tensor flat = x.reshape({-1, features}).contiguous();
    at::Tensor b;
    if (bias.has_value()) {
        TORCH_CHECK(bias->device().is_cpu(), "dkm_hf native kernels: bias must be a CPU tensor");
        b = bias->to(at::kFloat).contiguous();
        TORCH_CHECK(b.numel() == channels, "dkm_hf native kernels: bias has ", b.numel(), " values for ", channels,
                    " rows");
    }
    at::Tensor out = at::empty({flat.size(0), channels}, at::TensorOptions().dtype(at::kFloat));
    if (flat.size(0) > 0 && channels > 0)
        dkm_lut_gemv(&p, flat.data_ptr<float>(), flat.size(0), b.defined() ? b.data_ptr<float>() : nullptr,
                     out.data_ptr<float>(), channels, team(threads));
    auto shape = x.sizes().vec();
    shape.back() = channels;
    return out.view(shape);
}

int64_t lut_lanes() { return DKM_LANES; }

}  // namespace

TORCH_LIBRARY_FRAGMENT(dkm_hf, m) {
    m.def("decode_rows(Tensor packed, Tensor lut, Tensor? scale, int bits, int channels, int features, "
          "ScalarType dtype, Tensor? rows, int threads) -> Tensor");
    m.def("lut_gemv(Tensor packed, Tensor lut, Tensor? scale, int bits, int channels, int features, "
          "ScalarType dtype, Tensor x, Tensor? bias, int threads) -> Tensor");
    m.def("lut_lanes() -> int", &lut_lanes);
}

TORCH_LIBRARY_IMPL(dkm_hf, CPU, m) {
    m.impl("decode_rows", &decode_rows);
    m.impl("lut_gemv", &lut_gemv);
}
