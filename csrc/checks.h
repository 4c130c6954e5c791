// Argument checks shared by the CPU (ops.cpp) and CUDA (cuda/ops_cuda.cpp) entry
// points, so that both reject the same inputs with the same messages (the fake
// kernels in dsq_ext/ops.py repeat them for tracing).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <c10/util/string_view.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <string>
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
                       int64_t bits, int grid, double grad_scale) {
    check_input(op, "x", x);
    if (grad) check_grad(op, *grad, x);
    check_bits(op, bits);
    check_grid_bits(op, grid, bits);
    check_grad_scale(op, grad_scale);
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

}  // namespace dsq_ext
