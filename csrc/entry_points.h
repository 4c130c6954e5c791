// What the CPU (ops.cpp) and CUDA (cuda/ops_cuda.cpp) entry points share besides
// the argument checks (checks.h): the ops' options (Options, where their meaning is
// written), the layout the kernels read and write, and EntryPoints, which maps the
// schemas (ops.cpp) onto one backend's forward, backward and grid_params and
// registers them.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/string_view.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

#include "checks.h"
#include "dsq_math.h"

namespace dsq_ext {

// The options every op takes besides its tensors and bits: what the layers ask of
// an op besides the math (dsq_ext.nn.Quantizer.forward). Their meaning is written
// here once; the kernels' headers and the entry points refer to it.
//   grad_scale   multiplies the reduced gradients of lower, upper and alpha (not
//                x's): LSQ's gradient scaling, applied to the sums in double;
//   sort_bounds  a lower above its upper (learned bounds that crossed) is used
//                as the upper and vice versa, each channel on its own, and their
//                gradients follow them; ties and NaN are left as they are;
//   grid         the levels: DSQ_GRID_FREE (l + k Delta), DSQ_GRID_AFFINE or
//                DSQ_GRID_SYMMETRIC (integer zero point, as ONNX QDQ stores them;
//                the formulas are at the top of dsq_math.h), from the schema's string.
// grad_scale and sort_bounds are done inside the kernels because as separate torch
// ops (minimum, maximum, the scaling's mul/sub/add and their backwards) they cost
// about 25 small kernels per quantizer and training step.
struct Options {
    double grad_scale;
    bool sort_bounds;
    int grid;
};

// The layout the kernels read and write. Per tensor, every element is
// independent, so any dense layout (channels_last included) is used as it is
// and the output takes x's strides (empty_like). Per channel, the kernels need
// each channel's elements to be one run, so the contiguous layout is used.
// The fake kernels in dsq_ext/ops.py (_out_like) give the outputs the same strides.
struct Layout {
    at::Tensor x;    // x, or a dense copy of it
    at::Tensor out;  // uninitialised, same shape, strides and dtype as `x` above
};

inline Layout make_layout(const at::Tensor& x, bool per_channel) {
    if (per_channel) {
        at::Tensor xc = x.contiguous();
        return {xc, at::empty(xc.sizes(), xc.options())};
    }
    at::Tensor out = at::empty_like(x);
    at::Tensor xd = x.strides() == out.strides() ? x : at::empty_like(x).copy_(x);
    return {xd, out};
}

// grad in the same strides as the dense x the kernels read.
inline at::Tensor match_layout(const at::Tensor& grad, const at::Tensor& dense_x) {
    if (grad.strides() == dense_x.strides() && grad.scalar_type() == dense_x.scalar_type())
        return grad;
    return at::empty_like(dense_x).copy_(grad);
}

// How the kernels see x in the layout above: `channels` runs of `inner` contiguous
// elements, each run with one set of quantizer parameters. Each backend cuts the
// runs into chunks of its own (ops.cpp's Plan, dsq_cuda.cu's chunks).
struct Runs {
    int64_t channels;  // 1 when every parameter is per tensor
    int64_t inner;     // elements per channel
};

inline Runs make_runs(const at::Tensor& x, bool per_channel) {
    const int64_t channels = per_channel ? x.size(0) : 1;
    return {channels, channels > 0 ? x.numel() / channels : 0};
}

// The type the kernels compute in: the 16-bit types are computed in float.
inline at::ScalarType compute_type(at::ScalarType t) {
    return t == at::kDouble ? at::kDouble : at::kFloat;
}

// The ops' entry points in the schemas' argument order, over one backend's
//   forward(op, x, lower, upper, alpha or null, bits, options) and
//   backward(op, grad, x, lower, upper, alpha or null, bits, mode, options),
// where a null alpha is the uniform mode. Both backends register these, so the
// schema-to-backend mapping is written once.
using ForwardFn = at::Tensor (*)(const char*, const at::Tensor&, const at::Tensor&,
                                 const at::Tensor&, const at::Tensor*, int64_t, const Options&);
using BackwardFn = std::vector<at::Tensor> (*)(const char*, const at::Tensor&, const at::Tensor&,
                                               const at::Tensor&, const at::Tensor&,
                                               const at::Tensor*, int64_t, int, const Options&);
// grid_params(lower, upper, bits, grid, sort_bounds, scale, zero_point): lower and upper
// contiguous in the compute type; writes every element of the (contiguous) outputs.
using GridParamsFn = void (*)(const at::Tensor&, const at::Tensor&, int, int, bool, at::Tensor&,
                              at::Tensor&);

template <ForwardFn Forward, BackwardFn Backward, GridParamsFn GridParams>
struct EntryPoints {
    static at::Tensor dsq_quantize(const at::Tensor& x, const at::Tensor& lower,
                                   const at::Tensor& upper, const at::Tensor& alpha, int64_t bits,
                                   double grad_scale, bool sort_bounds, c10::string_view grid) {
        const char* op = "dsq_quantize";
        return Forward(op, x, lower, upper, &alpha, bits,
                       {grad_scale, sort_bounds, parse_grid(op, grid)});
    }

    static at::Tensor uniform_quantize(const at::Tensor& x, const at::Tensor& lower,
                                       const at::Tensor& upper, int64_t bits, double grad_scale,
                                       bool sort_bounds, c10::string_view grid) {
        const char* op = "uniform_quantize";
        return Forward(op, x, lower, upper, nullptr, bits,
                       {grad_scale, sort_bounds, parse_grid(op, grid)});
    }

    static std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> dsq_quantize_backward(
        const at::Tensor& grad, const at::Tensor& x, const at::Tensor& lower,
        const at::Tensor& upper, const at::Tensor& alpha, int64_t bits, double grad_scale,
        bool sort_bounds, c10::string_view grid) {
        const char* op = "dsq_quantize_backward";
        auto r = Backward(op, grad, x, lower, upper, &alpha, bits, DSQ_MODE_DSQ,
                          {grad_scale, sort_bounds, parse_grid(op, grid)});
        return {r[0], r[1], r[2], r[3]};
    }

    static std::tuple<at::Tensor, at::Tensor, at::Tensor> uniform_quantize_backward(
        const at::Tensor& grad, const at::Tensor& x, const at::Tensor& lower,
        const at::Tensor& upper, int64_t bits, double grad_scale, bool sort_bounds,
        c10::string_view grid) {
        const char* op = "uniform_quantize_backward";
        auto r = Backward(op, grad, x, lower, upper, nullptr, bits, DSQ_MODE_UNIFORM,
                          {grad_scale, sort_bounds, parse_grid(op, grid)});
        return {r[0], r[1], r[2]};
    }

    static std::tuple<at::Tensor, at::Tensor> grid_params(const at::Tensor& lower,
                                                          const at::Tensor& upper, int64_t bits,
                                                          c10::string_view grid,
                                                          bool sort_bounds) {
        const char* op = "grid_params";
        const int g = parse_grid(op, grid);
        const std::vector<int64_t> sizes = check_grid_params(op, lower, upper, bits, g);
        const at::ScalarType ct = compute_type(lower.scalar_type());
        at::Tensor scale = at::empty(sizes, lower.options().dtype(ct));
        at::Tensor zero_point = at::empty(sizes, lower.options().dtype(ct));
        if (scale.numel() > 0)
            GridParams(lower.to(ct).contiguous(), upper.to(ct).contiguous(), int(bits), g,
                       sort_bounds, scale, zero_point);
        return {scale, zero_point};
    }

    static void register_all(torch::Library& m) {
        m.impl("dsq_quantize", &dsq_quantize);
        m.impl("dsq_quantize_backward", &dsq_quantize_backward);
        m.impl("uniform_quantize", &uniform_quantize);
        m.impl("uniform_quantize_backward", &uniform_quantize_backward);
        m.impl("grid_params", &grid_params);
    }
};

}  // namespace dsq_ext
