// Operator schemas of the dsq_ext namespace and their CPU implementations.
//
// Each entry point does the same steps: check the arguments (the messages name
// the argument and its value), pick a dense layout, allocate, cut the work into
// fixed chunks, and run the C kernels of dsq_kernels.c over the chunks on
// torch's intra-op thread pool (so torch.set_num_threads is honoured).

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <vector>

#include "checks.h"
#include "dsq_kernels.h"
#include "dsq_math.h"
#include "entry_points.h"

namespace dsq_ext {
namespace {

// Elements per chunk, the unit of work of one task and of one set of partial
// sums. Fixed, so that the chunks whose partial sums are added, and the order
// they are added in, do not depend on the number of threads: the reduced
// gradients are bit-identical run to run and across torch.set_num_threads.
constexpr int64_t kChunk = int64_t(1) << 16;
// float16 is widened to float32 this many elements at a time, on the stack: whole
// spans (DSQ_SPAN), so that the kernels' partial sums are those of one call.
constexpr int64_t kWidenElems = 4 * DSQ_SPAN;
// Below this many elements per thread, threading costs more than it saves.
constexpr int64_t kMinPerThread = int64_t(1) << 15;

// How x's runs (entry_points.h) are cut into chunks, one task each.
struct Plan : Runs {
    int64_t channel_chunks;  // chunks per channel
    int64_t chunks() const { return channels * channel_chunks; }
    int64_t grain() const { return std::max<int64_t>(1, kMinPerThread / std::min(inner, kChunk)); }
};

Plan make_plan(const Runs& runs) {
    return {runs, std::max<int64_t>(1, (runs.inner + kChunk - 1) / kChunk)};
}

// A parameter widened to the compute type, readable per channel. A missing one
// (alpha in the uniform mode, where the kernels ignore it) reads as DSQ_ALPHA_MAX.
template <typename T>
struct Param {
    at::Tensor t;
    const T* p = nullptr;
    int64_t stride = 0;  // 0 per tensor, 1 per channel
    Param(const at::Tensor* param, at::ScalarType compute) {
        if (param == nullptr) return;
        t = param->to(compute).contiguous();
        p = t.data_ptr<T>();
        stride = param->numel() == 1 ? 0 : 1;
    }
    T operator[](int64_t c) const { return p ? p[c * stride] : T(DSQ_ALPHA_MAX); }
};

template <typename T>
void forward_kernel(const T* x, T* y, int64_t n, T l, T u, int bits, int grid);
template <>
void forward_kernel<float>(const float* x, float* y, int64_t n, float l, float u, int bits,
                           int grid) {
    dsq_forward_f32(x, y, n, l, u, bits, grid);
}
template <>
void forward_kernel<double>(const double* x, double* y, int64_t n, double l, double u, int bits,
                            int grid) {
    dsq_forward_f64(x, y, n, l, u, bits, grid);
}

template <typename T>
void backward_kernel(const T* g, const T* x, T* dx, int64_t n, T l, T u, T a, int bits, int mode,
                     int grid, double* sums);
template <>
void backward_kernel<float>(const float* g, const float* x, float* dx, int64_t n, float l, float u,
                            float a, int bits, int mode, int grid, double* sums) {
    dsq_backward_f32(g, x, dx, n, l, u, a, bits, mode, grid, sums);
}
template <>
void backward_kernel<double>(const double* g, const double* x, double* dx, int64_t n, double l,
                             double u, double a, int bits, int mode, int grid, double* sums) {
    dsq_backward_f64(g, x, dx, n, l, u, a, bits, mode, grid, sums);
}

// bfloat16 goes to the C kernels as its 16 bits (c10::BFloat16 is one uint16_t).
inline const uint16_t* bits16(const c10::BFloat16* p) {
    return reinterpret_cast<const uint16_t*>(p);
}
inline uint16_t* bits16(c10::BFloat16* p) { return reinterpret_cast<uint16_t*>(p); }

// Calls fn(channel, first_element, length, chunk) for every chunk, on the thread pool.
template <typename Fn>
void for_each_chunk(const Plan& plan, const Fn& fn) {
    at::parallel_for(0, plan.chunks(), plan.grain(), [&](int64_t begin, int64_t end) {
        for (int64_t t = begin; t < end; ++t) {
            const int64_t c = t / plan.channel_chunks;
            const int64_t off = (t % plan.channel_chunks) * kChunk;
            fn(c, c * plan.inner + off, std::min(kChunk, plan.inner - off), t);
        }
    });
}

// dsq_math.h's rule for crossed bounds, for either compute type.
inline bool sort_crossed(bool on, float& l, float& u) { return dsq_sort_bounds_f32(on, &l, &u); }
inline bool sort_crossed(bool on, double& l, double& u) { return dsq_sort_bounds_f64(on, &l, &u); }

// Channel c's bounds as the kernels use them; true when sort_bounds swapped them.
template <typename T>
bool bounds(const Param<T>& lo, const Param<T>& up, int64_t c, bool sort_bounds, T& l, T& u) {
    l = lo[c];
    u = up[c];
    return sort_crossed(sort_bounds, l, u);
}

// scalar_t is the storage type, T the compute type (float for the 16-bit types).
// float16 is widened to float32 on the stack; bfloat16 has kernels of its own.
template <typename scalar_t, typename T>
void forward_impl(const Layout& lay, const Plan& plan, const at::Tensor& lower,
                  const at::Tensor& upper, int bits, const Options& opt) {
    const Param<T> lo(&lower, c10::CppTypeToScalarType<T>::value);
    const Param<T> up(&upper, c10::CppTypeToScalarType<T>::value);
    const scalar_t* x = lay.x.data_ptr<scalar_t>();
    scalar_t* y = lay.out.data_ptr<scalar_t>();
    for_each_chunk(plan, [&](int64_t c, int64_t start, int64_t len, int64_t) {
        T l, u;
        bounds(lo, up, c, opt.sort_bounds, l, u);
        if constexpr (std::is_same_v<scalar_t, T>) {
            forward_kernel<T>(x + start, y + start, len, l, u, bits, opt.grid);
        } else if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
            dsq_forward_bf16(bits16(x + start), bits16(y + start), len, l, u, bits, opt.grid);
        } else {
            T bx[kWidenElems], by[kWidenElems];
            for (int64_t s = 0; s < len; s += kWidenElems) {
                const int64_t m = std::min(kWidenElems, len - s);
                for (int64_t j = 0; j < m; ++j) bx[j] = static_cast<T>(x[start + s + j]);
                forward_kernel<T>(bx, by, m, l, u, bits, opt.grid);
                for (int64_t j = 0; j < m; ++j) y[start + s + j] = static_cast<scalar_t>(by[j]);
            }
        }
    });
}

template <typename scalar_t, typename T>
void backward_impl(const at::Tensor& g_t, const Layout& lay, const Plan& plan,
                   const at::Tensor& lower, const at::Tensor& upper, const at::Tensor* alpha,
                   int bits, int mode, const Options& opt, std::vector<double>& partial) {
    const Param<T> lo(&lower, c10::CppTypeToScalarType<T>::value);
    const Param<T> up(&upper, c10::CppTypeToScalarType<T>::value);
    const Param<T> al(alpha, c10::CppTypeToScalarType<T>::value);
    const scalar_t* g = g_t.data_ptr<scalar_t>();
    const scalar_t* x = lay.x.data_ptr<scalar_t>();
    scalar_t* dx = lay.out.data_ptr<scalar_t>();
    for_each_chunk(plan, [&](int64_t c, int64_t start, int64_t len, int64_t t) {
        double* sums = partial.data() + 3 * t;
        T l, u;
        const bool swapped = bounds(lo, up, c, opt.sort_bounds, l, u);
        if constexpr (std::is_same_v<scalar_t, T>) {
            backward_kernel<T>(g + start, x + start, dx + start, len, l, u, al[c], bits, mode,
                               opt.grid, sums);
        } else if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
            dsq_backward_bf16(bits16(g + start), bits16(x + start), bits16(dx + start), len, l,
                              u, al[c], bits, mode, opt.grid, sums);
        } else {
            T bg[kWidenElems], bx[kWidenElems], bd[kWidenElems];
            for (int64_t s = 0; s < len; s += kWidenElems) {
                const int64_t m = std::min(kWidenElems, len - s);
                for (int64_t j = 0; j < m; ++j) {
                    bg[j] = static_cast<T>(g[start + s + j]);
                    bx[j] = static_cast<T>(x[start + s + j]);
                }
                backward_kernel<T>(bg, bx, bd, m, l, u, al[c], bits, mode, opt.grid, sums);
                for (int64_t j = 0; j < m; ++j) dx[start + s + j] = static_cast<scalar_t>(bd[j]);
            }
        }
        // Slot 0 is always the parameter `lower`: a swapped lower was used as the upper.
        if (swapped) std::swap(sums[0], sums[1]);
    });
}

at::Tensor forward_cpu(const char* op, const at::Tensor& x, const at::Tensor& lower,
                       const at::Tensor& upper, const at::Tensor* alpha, int64_t bits,
                       const Options& opt) {
    const bool per_channel = check_args(op, nullptr, x, lower, upper, alpha, bits, opt.grid,
                                        opt.grad_scale);
    const Layout lay = make_layout(x, per_channel);
    if (x.numel() == 0) return lay.out;
    const Plan plan = make_plan(make_runs(lay.x, per_channel));
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "dsq_ext", [&] {
        if constexpr (std::is_same_v<scalar_t, double>)
            forward_impl<scalar_t, double>(lay, plan, lower, upper, int(bits), opt);
        else
            forward_impl<scalar_t, float>(lay, plan, lower, upper, int(bits), opt);
    });
    return lay.out;
}

// Sums the per-chunk partials of one gradient (k = 0 lower, 1 upper, 2 alpha)
// in chunk order, per channel when the parameter is, scales the sums by
// grad_scale, and returns them in the parameter's shape and dtype.
at::Tensor reduce_grad(const std::vector<double>& partial, const Plan& plan, int k,
                       const at::Tensor& param, double scale) {
    const bool per_channel = param.numel() != 1;
    at::Tensor out = at::zeros({per_channel ? plan.channels : 1}, param.options().dtype(at::kDouble)
                                                                     .device(at::kCPU));
    double* o = out.data_ptr<double>();
    for (int64_t c = 0; c < plan.channels; ++c) {
        double s = 0.0;
        for (int64_t j = 0; j < plan.channel_chunks; ++j)
            s += partial[3 * (c * plan.channel_chunks + j) + k];
        o[per_channel ? c : 0] += s;
    }
    for (int64_t i = 0; i < out.numel(); ++i) o[i] *= scale;
    return out.to(param.scalar_type()).reshape(param.sizes());
}

// alpha is null in the uniform mode, which has no alpha and returns no grad for it.
std::vector<at::Tensor> backward_cpu(const char* op, const at::Tensor& grad, const at::Tensor& x,
                                     const at::Tensor& lower, const at::Tensor& upper,
                                     const at::Tensor* alpha, int64_t bits, int mode,
                                     const Options& opt) {
    const bool per_channel = check_args(op, &grad, x, lower, upper, alpha, bits, opt.grid,
                                        opt.grad_scale);
    const Layout lay = make_layout(x, per_channel);
    const Plan plan = make_plan(make_runs(lay.x, per_channel));
    std::vector<double> partial(3 * plan.chunks(), 0.0);
    if (x.numel() > 0) {
        const at::Tensor g = match_layout(grad, lay.x);
        AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "dsq_ext", [&] {
            if constexpr (std::is_same_v<scalar_t, double>)
                backward_impl<scalar_t, double>(g, lay, plan, lower, upper, alpha, int(bits),
                                                mode, opt, partial);
            else
                backward_impl<scalar_t, float>(g, lay, plan, lower, upper, alpha, int(bits),
                                               mode, opt, partial);
        });
    }
    const double s = opt.grad_scale;
    std::vector<at::Tensor> r = {lay.out, reduce_grad(partial, plan, 0, lower, s),
                                 reduce_grad(partial, plan, 1, upper, s)};
    if (alpha) r.push_back(reduce_grad(partial, plan, 2, *alpha, s));
    return r;
}

// lower and upper: contiguous, in the compute type (scale's dtype).
void grid_params_cpu(const at::Tensor& lower, const at::Tensor& upper, int bits, int grid,
                     bool sort_bounds, at::Tensor& scale, at::Tensor& zero_point) {
    const int64_t ls = lower.numel() == 1 ? 0 : 1, us = upper.numel() == 1 ? 0 : 1;
    if (scale.scalar_type() == at::kDouble)
        dsq_grid_params_f64(lower.const_data_ptr<double>(), ls, upper.const_data_ptr<double>(), us,
                            scale.numel(), bits, grid, sort_bounds, scale.data_ptr<double>(),
                            zero_point.data_ptr<double>());
    else
        dsq_grid_params_f32(lower.const_data_ptr<float>(), ls, upper.const_data_ptr<float>(), us,
                            scale.numel(), bits, grid, sort_bounds, scale.data_ptr<float>(),
                            zero_point.data_ptr<float>());
}

at::Tensor fast_tanh_cpu(const at::Tensor& x) {
    TORCH_CHECK(x.scalar_type() == at::kFloat, "_fast_tanh: x must be float32, got ",
                dtype_name(x.scalar_type()));
    const at::Tensor xc = x.contiguous();
    at::Tensor y = at::empty_like(xc);
    dsq_tanh_f32_array(xc.data_ptr<float>(), y.data_ptr<float>(), xc.numel());
    return y;
}

}  // namespace

// grad_scale, sort_bounds and grid: see Options in entry_points.h. The forward ops take
// grad_scale too, although their value does not depend on it, so that their
// autograd formula (dsq_ext/ops.py) can pass it on to the backward op.
TORCH_LIBRARY(dsq_ext, m) {
    m.def(
        "dsq_quantize(Tensor x, Tensor lower, Tensor upper, Tensor alpha, int bits, "
        "float grad_scale=1., bool sort_bounds=False, str grid=\"free\") -> Tensor");
    m.def(
        "dsq_quantize_backward(Tensor grad, Tensor x, Tensor lower, Tensor upper, Tensor alpha, "
        "int bits, float grad_scale=1., bool sort_bounds=False, str grid=\"free\") "
        "-> (Tensor, Tensor, Tensor, Tensor)");
    m.def(
        "uniform_quantize(Tensor x, Tensor lower, Tensor upper, int bits, "
        "float grad_scale=1., bool sort_bounds=False, str grid=\"free\") -> Tensor");
    m.def(
        "uniform_quantize_backward(Tensor grad, Tensor x, Tensor lower, Tensor upper, int bits, "
        "float grad_scale=1., bool sort_bounds=False, str grid=\"free\") "
        "-> (Tensor, Tensor, Tensor)");
    // The scale (Delta) and zero point of the grid the kernels use, per element of
    // lower/upper, computed by the kernels' own code (dsq_coef_make): for export.
    m.def(
        "grid_params(Tensor lower, Tensor upper, int bits, str grid, bool sort_bounds=False) "
        "-> (Tensor scale, Tensor zero_point)");
    // The float tanh approximation the CPU DSQ backward uses; exposed for its accuracy test.
    m.def("_fast_tanh(Tensor x) -> Tensor");
}

TORCH_LIBRARY_IMPL(dsq_ext, CPU, m) {
    EntryPoints<forward_cpu, backward_cpu, grid_params_cpu>::register_all(m);
    m.impl("_fast_tanh", &fast_tanh_cpu);
}

}  // namespace dsq_ext
