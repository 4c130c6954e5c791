// Argument checks and layout rules shared by the CPU (ops.cpp) and CUDA
// (cuda/ops_cuda.cpp) entry points, so both reject the same inputs with the
// same messages and return the same strides as the fake kernels in ops.py.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <c10/util/string_view.h>

#include <cmath>
#include <cstdio>
#include <string>
#include <algorithm>
#include <tuple>
#include <vector>

#include "dsq_math.h"

namespace dsq_ext {

// Numbers in messages are formatted here, not streamed into TORCH_CHECK: on one
// GPU machine (torch 2.11 wheel, extension built with that machine's GCC 13) every
// message that streamed an integer crashed the interpreter, while messages of
// strings only raised normally (docs/gpu.md). Strings and the names below are safe.
inline std::string num(int64_t v) { return std::to_string(v); }
inline std::string num(double v) {
    char buf[32];
    std::snprintf(buf, sizeof buf, "%g", v);
    return buf;
}
inline std::string shape(at::IntArrayRef sizes) {
    std::string s = "[";
    for (size_t i = 0; i < sizes.size(); ++i) s += (i ? ", " : "") + num(int64_t(sizes[i]));
    return s + "]";
}
inline const char* dtype_name(at::ScalarType t) { return c10::toString(t); }

inline bool is_supported_float(at::ScalarType t) {
    return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

inline void check_bits(const char* op, int64_t bits) {
    TORCH_CHECK(bits >= 1 && bits <= 8, op, ": bits must be in 1..8, got ", num(bits));
}

inline void check_input(const char* op, const char* name, const at::Tensor& t) {
    TORCH_CHECK(is_supported_float(t.scalar_type()), op, ": ", name,
                " must be float32, float64, float16 or bfloat16, got ", dtype_name(t.scalar_type()));
}

// A quantizer parameter (lower, upper, alpha) is per tensor when it has one
// element, per channel when it is 1-D of length x.size(0). Returns true when
// it is per channel.
inline bool check_param(const char* op, const char* name, const at::Tensor& p,
                        const at::Tensor& x) {
    TORCH_CHECK(is_supported_float(p.scalar_type()), op, ": ", name,
                " must be a float32, float64, float16 or bfloat16 tensor, got ", dtype_name(p.scalar_type()));
    TORCH_CHECK(p.device() == x.device(), op, ": ", name, " is on ", p.device().str(),
                " but x is on ", x.device().str(), "; move the quantizer parameters to x's device");
    if (p.numel() == 1) return false;
    TORCH_CHECK(x.dim() >= 1 && p.dim() == 1 && p.size(0) == x.size(0), op, ": ", name,
                " must have one element (per tensor) or shape [x.size(0)] (per channel); got ",
                name, " of shape ", shape(p.sizes()), " for x of shape ", shape(x.sizes()));
    return true;
}

inline void check_grad(const char* op, const at::Tensor& grad, const at::Tensor& x) {
    check_input(op, "grad", grad);
    TORCH_CHECK(grad.sizes() == x.sizes(), op, ": grad must have x's shape ", shape(x.sizes()),
                ", got ", shape(grad.sizes()));
    TORCH_CHECK(grad.device() == x.device(), op, ": grad is on ", grad.device().str(),
                " but x is on ", x.device().str());
}

// What the layers ask of an op besides the math (see Quantizer.forward):
//   grad_scale   multiplies the reduced gradients of lower, upper and alpha (not
//                x's): LSQ's gradient scaling, applied to the sums in double;
//   sort_bounds  a lower above its upper (learned bounds that crossed) is used
//                as the upper and vice versa, each channel on its own, and their
//                gradients follow them; ties and NaN are left as they are.
// As separate torch ops (minimum, maximum, the scaling's mul/sub/add and their
// backwards) these cost about 25 small kernels per quantizer and training step.
//   grid         the levels: DSQ_GRID_FREE (l + k Delta), DSQ_GRID_AFFINE or
//                DSQ_GRID_SYMMETRIC (integer zero point, as ONNX QDQ stores them;
//                see dsq_math.h), from the schema's string.
struct Options {
    double grad_scale;
    bool sort_bounds;
    int grid;
};

inline int parse_grid(const char* op, c10::string_view grid) {
    if (grid == "free") return DSQ_GRID_FREE;
    if (grid == "affine") return DSQ_GRID_AFFINE;
    if (grid == "symmetric") return DSQ_GRID_SYMMETRIC;
    TORCH_CHECK(false, op, ": grid must be 'free', 'affine' or 'symmetric', got '",
                std::string(grid), "'");
}

// The symmetric grid's levels are -(2^(b-1) - 1) .. 2^(b-1) - 1: one bit leaves only 0.
inline void check_grid_bits(const char* op, int grid, int64_t bits) {
    TORCH_CHECK(grid != DSQ_GRID_SYMMETRIC || bits >= 2, op,
                ": grid 'symmetric' needs bits >= 2 (its levels are -(2^(b-1)-1)..2^(b-1)-1), got bits=",
                num(bits));
}

inline void check_grad_scale(const char* op, double grad_scale) {
    TORCH_CHECK(std::isfinite(grad_scale) && grad_scale >= 0, op,
                ": grad_scale must be a finite number >= 0, got ", num(grad_scale));
}

// Every check of an op, in the same order on every backend; grad is null for a
// forward, alpha in the uniform mode. Returns whether any parameter is per channel.
inline bool check_args(const char* op, const at::Tensor* grad, const at::Tensor& x,
                       const at::Tensor& lower, const at::Tensor& upper, const at::Tensor* alpha,
                       int64_t bits, const Options& opt) {
    check_input(op, "x", x);
    if (grad) check_grad(op, *grad, x);
    check_bits(op, bits);
    check_grid_bits(op, opt.grid, bits);
    check_grad_scale(op, opt.grad_scale);
    bool per_channel = check_param(op, "lower", lower, x);
    per_channel |= check_param(op, "upper", upper, x);
    if (alpha) per_channel |= check_param(op, "alpha", *alpha, x);
    return per_channel;
}

// grid_params: lower and upper each hold one element or are 1-D, of one length
// when both are 1-D with more than one; the outputs take their broadcast shape.
inline std::vector<int64_t> check_grid_params(const char* op, const at::Tensor& lower,
                                              const at::Tensor& upper, int64_t bits, int grid) {
    check_bits(op, bits);
    check_grid_bits(op, grid, bits);
    const auto check_one = [op](const char* name, const at::Tensor& p) {
        TORCH_CHECK(is_supported_float(p.scalar_type()), op, ": ", name,
                    " must be a float32, float64, float16 or bfloat16 tensor, got ",
                    dtype_name(p.scalar_type()));
        TORCH_CHECK(p.numel() == 1 || p.dim() == 1, op, ": ", name,
                    " must have one element (per tensor) or be 1-D (per channel); got shape ",
                    shape(p.sizes()));
    };
    check_one("lower", lower);
    check_one("upper", upper);
    TORCH_CHECK(upper.device() == lower.device(), op, ": upper is on ", upper.device().str(),
                " but lower is on ", lower.device().str());
    TORCH_CHECK(lower.numel() == 1 || upper.numel() == 1 || lower.numel() == upper.numel(), op,
                ": lower and upper must have the same number of channels; got shapes ",
                shape(lower.sizes()), " and ", shape(upper.sizes()));
    // numpy-style broadcast of the two shapes (each at most 1-D, or numel 1)
    const at::IntArrayRef a = lower.sizes(), b = upper.sizes();
    const size_t nd = std::max(a.size(), b.size());
    std::vector<int64_t> out(nd, 1);
    for (size_t i = 0; i < nd; ++i) {
        const int64_t da = i + a.size() >= nd ? a[i + a.size() - nd] : 1;
        const int64_t db = i + b.size() >= nd ? b[i + b.size() - nd] : 1;
        out[i] = da == 1 ? db : da;
    }
    return out;
}

// The layout the kernels read and write. Per tensor, every element is
// independent, so any dense layout (channels_last included) is used as it is
// and the output takes x's strides (empty_like). Per channel, the kernels need
// each channel's elements to be one run, so the contiguous layout is used.
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

// The ops' kernels in the schemas' argument order, over one backend's
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
struct Kernels {
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
        const at::ScalarType ct = lower.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
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
