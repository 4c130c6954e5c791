"""The dsq_ext operators: typed wrappers, their fake kernels, and their autograd.

The kernels live in csrc/ and are registered as torch.ops.dsq_ext.*; this file
adds what the dispatcher needs from Python: a fake (meta) kernel per op, so
torch.compile can trace them, and the autograd formula, which calls the fused
backward op.

lower, upper and alpha are tensors: one element (per tensor) or 1-D of length
x.size(0) (per channel). They are never read on the host, so nothing here
synchronises a GPU or breaks a graph.

Two options serve the layers (dsq_ext.nn.Quantizer), done inside the kernels
so that they cost no extra kernel launches:
  grad_scale   multiplies the gradients of lower, upper and alpha (not of x),
               as LSQ's gradient scaling does; the forward value ignores it;
  sort_bounds  where upper < lower (learned bounds that crossed), the two are
               used swapped, per channel, and their gradients follow them:
               the same as quantizing with torch.minimum(lower, upper) and
               torch.maximum(lower, upper), except that tied bounds are not
               split (lower gets the gradient of the lower bound).

`grid` chooses the levels (docs/DSQ_MATH.md): "free" (the ops' default), the
paper's l + k*Delta;
"affine", Delta = (u - l)/N with an integer zero point, so that 0.0 is a level
and the forward is exactly ONNX QuantizeLinear -> clip -> DequantizeLinear;
"symmetric", zero point 0 and levels -Qp..Qp, Qp = 2^(b-1) - 1, Delta =
max(-l, u)/Qp (bits >= 2). grid_params gives the scale and zero point the
kernels use, for export. (The layers, QuantConfig, quantize_model and train.py
default to "affine", which exports exactly.)

Double backward (differentiating a gradient of these ops) is not supported:
it raises.
"""

from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor

from .config import GRIDS

__all__ = [
    "GRIDS",
    "dsq_quantize",
    "uniform_quantize",
    "dsq_quantize_backward",
    "uniform_quantize_backward",
    "grid_params",
]

_ops = torch.ops.dsq_ext


def _as_tensor(value, x: Tensor, name: str) -> Tensor:
    # Plain numbers are accepted for convenience in notebooks; tensors pass through untouched.
    # They take the compute type of x's kernels: float64 for float64 x, else float32.
    if isinstance(value, Tensor):
        return value
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        return torch.tensor(float(value), dtype=dtype, device=x.device)
    raise TypeError(f"{name} must be a Tensor or a real number, got {type(value).__name__}")


def dsq_quantize(
    x: Tensor,
    lower,
    upper,
    alpha,
    bits: int,
    *,
    grad_scale: float = 1.0,
    sort_bounds: bool = False,
    grid: str = "free",
) -> Tensor:
    """DSQ fake quantization: the hard b-bit value of x in [lower, upper], DSQ's soft-staircase gradients.

    grad_scale, sort_bounds and grid: see the module docstring (the defaults are the plain op).
    """
    bits = _check_bits(bits)
    return _ops.dsq_quantize(
        x,
        _as_tensor(lower, x, "lower"),
        _as_tensor(upper, x, "upper"),
        _as_tensor(alpha, x, "alpha"),
        bits,
        _check_grad_scale(grad_scale),
        _check_flag(sort_bounds, "sort_bounds"),
        _check_grid(grid, bits),
    )


def uniform_quantize(
    x: Tensor,
    lower,
    upper,
    bits: int,
    *,
    grad_scale: float = 1.0,
    sort_bounds: bool = False,
    grid: str = "free",
) -> Tensor:
    """Uniform fake quantization with a straight-through estimator; learnable lower and upper.

    grad_scale, sort_bounds and grid: as for dsq_quantize.
    """
    bits = _check_bits(bits)
    return _ops.uniform_quantize(
        x,
        _as_tensor(lower, x, "lower"),
        _as_tensor(upper, x, "upper"),
        bits,
        _check_grad_scale(grad_scale),
        _check_flag(sort_bounds, "sort_bounds"),
        _check_grid(grid, bits),
    )


def dsq_quantize_backward(
    grad, x, lower, upper, alpha, bits: int, grad_scale=1.0, sort_bounds=False, grid="free"
):
    """The fused backward of dsq_quantize: (grad_x, grad_lower, grad_upper, grad_alpha)."""
    return _ops.dsq_quantize_backward(grad, x, lower, upper, alpha, bits, grad_scale, sort_bounds, grid)


def uniform_quantize_backward(
    grad, x, lower, upper, bits: int, grad_scale=1.0, sort_bounds=False, grid="free"
):
    """The fused backward of uniform_quantize: (grad_x, grad_lower, grad_upper)."""
    return _ops.uniform_quantize_backward(grad, x, lower, upper, bits, grad_scale, sort_bounds, grid)


def grid_params(
    lower: Tensor, upper: Tensor, bits: int, grid: str, *, sort_bounds: bool = False
) -> tuple[Tensor, Tensor]:
    """(scale, zero_point) of the grid the kernels use: Delta and z, per element of lower/upper.

    Computed by the kernels' own code, so they are bit-identical to training's, in
    float64 if lower is float64 else float32 (the compute type of float32, float16
    and bfloat16 x). zero_point is a float tensor: an integer in 0..2^b - 1 on the
    affine grid, 2^(b-1) - 1 on the symmetric one (whose signed levels are q - z),
    and the non-integer -lower/Delta on the free grid. A degenerate range (upper <=
    lower: every output is lower) gives scale 0 and zero point 0; a NaN bound, NaN.
    """
    bits = _check_bits(bits)
    return _ops.grid_params(
        lower, upper, bits, _check_grid(grid, bits), _check_flag(sort_bounds, "sort_bounds")
    )


def _check_grid(grid, bits: int) -> str:
    if not isinstance(grid, str) or grid not in GRIDS:
        raise ValueError(f"grid must be 'free', 'affine' or 'symmetric', got {grid!r}")
    if grid == "symmetric" and bits < 2:
        raise ValueError(
            f"grid 'symmetric' needs bits >= 2 (its levels are -(2^(b-1)-1)..2^(b-1)-1), got bits={bits}"
        )
    return grid


def _check_bits(bits) -> int:
    # The C++ check gives the same message; this one also catches floats and bools,
    # which the schema would otherwise reject or convert with a less helpful error.
    if isinstance(bits, bool) or not isinstance(bits, numbers.Integral):
        raise TypeError(f"bits must be an int in 1..8, got {bits!r}")
    if not 1 <= int(bits) <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")
    return int(bits)


def _check_grad_scale(grad_scale) -> float:
    if isinstance(grad_scale, bool) or not isinstance(grad_scale, numbers.Real):
        raise TypeError(f"grad_scale must be a real number, got {grad_scale!r}")
    if not (math.isfinite(grad_scale) and grad_scale >= 0):
        raise ValueError(f"grad_scale must be a finite number >= 0, got {grad_scale}")
    return float(grad_scale)


def _check_flag(value, name: str) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {value!r}")
    return value


# ---------------------------------------------------------------------------
# Fake kernels: shapes, dtypes and strides only, the same rules as csrc/checks.h (the
# checks) and csrc/entry_points.h (Layout: the outputs' strides).


_FLOATS = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


# c10's names of the dtypes, as the C++ messages print them ("got Long").
_C10_NAMES = {
    torch.bool: "Bool",
    torch.uint8: "Byte",
    torch.int8: "Char",
    torch.int16: "Short",
    torch.int32: "Int",
    torch.int64: "Long",
    torch.complex64: "ComplexFloat",
    torch.complex128: "ComplexDouble",
}


def _dtype_name(dtype: torch.dtype) -> str:
    return _C10_NAMES.get(dtype, str(dtype))


def _check_grid_name(op: str, grid: str) -> None:
    if grid not in GRIDS:
        raise RuntimeError(f"{op}: grid must be 'free', 'affine' or 'symmetric', got '{grid}'")


def _check_grid_bits(op: str, grid: str, bits: int) -> None:
    if grid == "symmetric" and bits < 2:
        raise RuntimeError(
            f"{op}: grid 'symmetric' needs bits >= 2 (its levels are -(2^(b-1)-1)..2^(b-1)-1), "
            f"got bits={bits}"
        )


def _check(
    op: str,
    x: Tensor,
    bits: int,
    grad_scale: float,
    grid: str,
    grad: Tensor | None = None,
    **params: Tensor,
) -> None:
    # The checks of csrc/checks.h, so that tracing (and a meta tensor, which the
    # dispatcher would send here) fails with the same message as the kernels.
    _check_grid_name(op, grid)
    if x.dtype not in _FLOATS:
        raise RuntimeError(
            f"{op}: x must be float32, float64, float16 or bfloat16, got {_dtype_name(x.dtype)}"
        )
    if not 1 <= bits <= 8:
        raise RuntimeError(f"{op}: bits must be in 1..8, got {bits}")
    _check_grid_bits(op, grid, bits)
    if not (math.isfinite(grad_scale) and grad_scale >= 0):
        raise RuntimeError(f"{op}: grad_scale must be a finite number >= 0, got {grad_scale}")
    for name, p in params.items():
        if p.dtype not in _FLOATS:
            raise RuntimeError(
                f"{op}: {name} must be a float32, float64, float16 or bfloat16 tensor, "
                f"got {_dtype_name(p.dtype)}"
            )
        if p.device != x.device:
            raise RuntimeError(f"{op}: {name} is on {p.device} but x is on {x.device}")
        if p.numel() != 1 and not (x.dim() >= 1 and p.dim() == 1 and p.shape[0] == x.shape[0]):
            raise RuntimeError(
                f"{op}: {name} must have one element (per tensor) or shape [x.size(0)] (per channel); "
                f"got {name} of shape {list(p.shape)} for x of shape {list(x.shape)}"
            )
    if grad is not None and (grad.shape != x.shape or grad.device != x.device):
        raise RuntimeError(
            f"{op}: grad must have x's shape {list(x.shape)} and device, got {list(grad.shape)}"
        )


def _out_like(x: Tensor, *params: Tensor) -> Tensor:
    # Per tensor the output keeps x's (dense) layout; per channel it is contiguous.
    if all(p.numel() == 1 for p in params):
        return torch.empty_like(x)
    return x.new_empty(x.shape)


@torch.library.register_fake("dsq_ext::dsq_quantize")
def _(x, lower, upper, alpha, bits, grad_scale=1.0, sort_bounds=False, grid="free"):
    _check("dsq_quantize", x, bits, grad_scale, grid, lower=lower, upper=upper, alpha=alpha)
    return _out_like(x, lower, upper, alpha)


@torch.library.register_fake("dsq_ext::uniform_quantize")
def _(x, lower, upper, bits, grad_scale=1.0, sort_bounds=False, grid="free"):
    _check("uniform_quantize", x, bits, grad_scale, grid, lower=lower, upper=upper)
    return _out_like(x, lower, upper)


@torch.library.register_fake("dsq_ext::dsq_quantize_backward")
def _(grad, x, lower, upper, alpha, bits, grad_scale=1.0, sort_bounds=False, grid="free"):
    _check("dsq_quantize_backward", x, bits, grad_scale, grid, grad, lower=lower, upper=upper, alpha=alpha)
    return (
        _out_like(x, lower, upper, alpha),
        torch.empty_like(lower),
        torch.empty_like(upper),
        torch.empty_like(alpha),
    )


@torch.library.register_fake("dsq_ext::uniform_quantize_backward")
def _(grad, x, lower, upper, bits, grad_scale=1.0, sort_bounds=False, grid="free"):
    _check("uniform_quantize_backward", x, bits, grad_scale, grid, grad, lower=lower, upper=upper)
    return _out_like(x, lower, upper), torch.empty_like(lower), torch.empty_like(upper)


@torch.library.register_fake("dsq_ext::grid_params")
def _(lower, upper, bits, grid, sort_bounds=False):
    op = "grid_params"
    _check_grid_name(op, grid)
    if not 1 <= bits <= 8:
        raise RuntimeError(f"{op}: bits must be in 1..8, got {bits}")
    _check_grid_bits(op, grid, bits)
    for name, p in (("lower", lower), ("upper", upper)):
        if p.dtype not in _FLOATS:
            raise RuntimeError(
                f"{op}: {name} must be a float32, float64, float16 or bfloat16 tensor, "
                f"got {_dtype_name(p.dtype)}"
            )
        if p.numel() != 1 and p.dim() != 1:
            raise RuntimeError(
                f"{op}: {name} must have one element (per tensor) or be 1-D (per channel); "
                f"got shape {list(p.shape)}"
            )
    if upper.device != lower.device:
        raise RuntimeError(f"{op}: upper is on {upper.device} but lower is on {lower.device}")
    if lower.numel() != 1 and upper.numel() != 1 and lower.numel() != upper.numel():
        raise RuntimeError(
            f"{op}: lower and upper must have the same number of channels; "
            f"got shapes {list(lower.shape)} and {list(upper.shape)}"
        )
    shape = torch.broadcast_shapes(lower.shape, upper.shape)
    dtype = torch.float64 if lower.dtype == torch.float64 else torch.float32
    return lower.new_empty(shape, dtype=dtype), lower.new_empty(shape, dtype=dtype)


@torch.library.register_fake("dsq_ext::_fast_tanh")
def _(x):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


# ---------------------------------------------------------------------------
# Autograd: only x (and the tiny parameters) are saved, never an intermediate.


# The dispatcher passes every schema argument, defaults filled in.
def _dsq_setup_context(ctx, inputs, output):
    x, lower, upper, alpha, bits, grad_scale, sort_bounds, grid = inputs
    ctx.save_for_backward(x, lower, upper, alpha)
    ctx.bits = bits
    ctx.options = (grad_scale, sort_bounds, grid)


def _dsq_backward(ctx, grad):
    x, lower, upper, alpha = ctx.saved_tensors
    gx, gl, gu, ga = _first_order(
        _ops.dsq_quantize_backward, grad, x, lower, upper, alpha, ctx.bits, *ctx.options
    )
    need = ctx.needs_input_grad
    return (
        gx if need[0] else None,
        gl if need[1] else None,
        gu if need[2] else None,
        ga if need[3] else None,
        None,
        None,
        None,
        None,
    )


def _uniform_setup_context(ctx, inputs, output):
    x, lower, upper, bits, grad_scale, sort_bounds, grid = inputs
    ctx.save_for_backward(x, lower, upper)
    ctx.bits = bits
    ctx.options = (grad_scale, sort_bounds, grid)


def _uniform_backward(ctx, grad):
    x, lower, upper = ctx.saved_tensors
    gx, gl, gu = _first_order(_ops.uniform_quantize_backward, grad, x, lower, upper, ctx.bits, *ctx.options)
    need = ctx.needs_input_grad
    return (gx if need[0] else None, gl if need[1] else None, gu if need[2] else None) + (None,) * 4


class _FirstOrderOnly(torch.autograd.Function):
    """A backward op run with create_graph=True: its results raise if differentiated again."""

    @staticmethod
    def forward(ctx, op, *args):
        return op(*args)

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError(
            "double backward of dsq_ext ops is not supported: a gradient computed with "
            "create_graph=True cannot be differentiated again (first-order gradients work)"
        )


def _first_order(op, *args):
    # With create_graph=True the backward runs with grad mode on; without this node,
    # differentiating its results would return None with only a warning. Otherwise
    # (the training path) the op is called directly, at no extra cost.
    if torch.is_grad_enabled():
        return _FirstOrderOnly.apply(op, *args)
    return op(*args)


torch.library.register_autograd("dsq_ext::dsq_quantize", _dsq_backward, setup_context=_dsq_setup_context)
torch.library.register_autograd(
    "dsq_ext::uniform_quantize", _uniform_backward, setup_context=_uniform_setup_context
)
