// CUDA implementations of the dsq_ext operators declared in ops.cpp.
//
// The same steps as the CPU entry points, with the same checks (checks.h) and
// output layouts (entry_points.h): check, pick a dense layout, allocate, enqueue the
// kernels of dsq_cuda.cu on the current stream. Nothing is read back on the
// host, so these ops never synchronise and are safe to capture in CUDA graphs.

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
// Not ATen/cuda/CUDAContext.h: it pulls in the cuBLAS, cuSPARSE and cuSOLVER
// headers, which nothing here needs (and a minimal CUDA toolkit may lack).
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <optional>
#include <tuple>
#include <vector>

#include "../checks.h"
#include "../dsq_math.h"
#include "../entry_points.h"
#include "dsq_cuda.h"

namespace dsq_ext {
namespace {

int cuda_dtype(at::ScalarType t) {
    switch (t) {
        case at::kFloat: return DSQ_CUDA_F32;
        case at::kDouble: return DSQ_CUDA_F64;
        case at::kHalf: return DSQ_CUDA_F16;
        case at::kBFloat16: return DSQ_CUDA_BF16;
        default: TORCH_CHECK(false, "dsq_ext: unsupported dtype ", dtype_name(t));
    }
}

// A parameter in the compute type, kept alive until the kernels are enqueued
// (the caching allocator orders its reuse after them on the stream).
struct Param {
    at::Tensor t;
    dsq_cuda_param arg;
    Param(const at::Tensor& param, at::ScalarType compute)
        : t(param.to(compute).contiguous()),
          arg{t.const_data_ptr(), param.numel() == 1 ? 0 : 1} {}
};

// A reduced gradient in the parameter's own shape and dtype.
struct ReducedGrad {
    at::Tensor t;
    dsq_cuda_grad arg;
    explicit ReducedGrad(const at::Tensor& param)
        : t(at::empty(param.sizes(), param.options())),
          arg{t.data_ptr(), cuda_dtype(param.scalar_type()), param.numel() == 1 ? 0 : 1} {}
};

at::Tensor forward_cuda(const char* op, const at::Tensor& x, const at::Tensor& lower,
                        const at::Tensor& upper, const at::Tensor* alpha, int64_t bits,
                        const Options& opt) {
    const bool per_channel = check_args(op, nullptr, x, lower, upper, alpha, bits, opt.grid,
                                        opt.grad_scale);
    const c10::cuda::CUDAGuard guard(x.device());
    const Layout lay = make_layout(x, per_channel);
    if (x.numel() == 0) return lay.out;
    const Runs runs = make_runs(lay.x, per_channel);
    const at::ScalarType ct = compute_type(x.scalar_type());
    const Param lo(lower, ct), up(upper, ct);
    dsq_cuda_forward(cuda_dtype(x.scalar_type()), lay.x.const_data_ptr(), lay.out.data_ptr(),
                     runs.channels, runs.inner, lo.arg, up.arg, int(bits), opt.sort_bounds,
                     opt.grid, c10::cuda::getCurrentCUDAStream());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return lay.out;
}

// alpha is null in the uniform mode, which has no alpha and returns no grad for it.
std::vector<at::Tensor> backward_cuda(const char* op, const at::Tensor& grad, const at::Tensor& x,
                                      const at::Tensor& lower, const at::Tensor& upper,
                                      const at::Tensor* alpha, int64_t bits, int mode,
                                      const Options& opt) {
    const bool per_channel = check_args(op, &grad, x, lower, upper, alpha, bits, opt.grid,
                                        opt.grad_scale);
    const c10::cuda::CUDAGuard guard(x.device());
    const Layout lay = make_layout(x, per_channel);
    if (x.numel() == 0) {
        std::vector<at::Tensor> r = {lay.out, at::zeros(lower.sizes(), lower.options()),
                                     at::zeros(upper.sizes(), upper.options())};
        if (alpha) r.push_back(at::zeros(alpha->sizes(), alpha->options()));
        return r;
    }
    const at::Tensor g = match_layout(grad, lay.x);
    const Runs runs = make_runs(lay.x, per_channel);
    const int dtype = cuda_dtype(x.scalar_type());
    const at::ScalarType ct = compute_type(x.scalar_type());
    const Param lo(lower, ct), up(upper, ct);
    const ReducedGrad gl(lower), gu(upper);
    std::optional<Param> al;
    std::optional<ReducedGrad> ga;
    if (alpha) {
        al.emplace(*alpha, ct);
        ga.emplace(*alpha);
    }
    const at::Tensor partials = at::empty({3 * dsq_cuda_chunks(dtype, runs.channels, runs.inner)},
                                          x.options().dtype(at::kDouble));
    dsq_cuda_backward(dtype, mode, g.const_data_ptr(), lay.x.const_data_ptr(), lay.out.data_ptr(),
                      runs.channels, runs.inner, lo.arg, up.arg,
                      al ? al->arg : dsq_cuda_param{nullptr, 0}, int(bits), opt.sort_bounds,
                      opt.grid, opt.grad_scale, partials.data_ptr<double>(), gl.arg, gu.arg,
                      ga ? ga->arg : dsq_cuda_grad{nullptr, DSQ_CUDA_F32, 0},
                      c10::cuda::getCurrentCUDAStream());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    std::vector<at::Tensor> r = {lay.out, gl.t, gu.t};
    if (ga) r.push_back(ga->t);
    return r;
}

// lower and upper: contiguous, in the compute type (scale's dtype), on one device.
void grid_params_cuda(const at::Tensor& lower, const at::Tensor& upper, int bits, int grid,
                      bool sort_bounds, at::Tensor& scale, at::Tensor& zero_point) {
    const c10::cuda::CUDAGuard guard(lower.device());
    dsq_cuda_grid_params(cuda_dtype(scale.scalar_type()), lower.const_data_ptr(),
                         lower.numel() == 1 ? 0 : 1, upper.const_data_ptr(),
                         upper.numel() == 1 ? 0 : 1, scale.numel(), bits, grid, sort_bounds,
                         scale.data_ptr(), zero_point.data_ptr(),
                         c10::cuda::getCurrentCUDAStream());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

TORCH_LIBRARY_IMPL(dsq_ext, CUDA, m) {
    EntryPoints<forward_cuda, backward_cuda, grid_params_cuda>::register_all(m);
}

}  // namespace dsq_ext
