"""A quantized conv2d / linear as one autograd node that keeps only its float input and weight.

Quantizing the input and the weight with the ops, then calling F.conv2d, leaves
three autograd nodes; the convolution's node keeps the quantized input and
weight for its backward, beside the float input that the input quantizer (and
the layer before) already keep: a W4A4 ResNet-18 step then keeps about 1.6x the
float model's bytes for backward. Here one node goes from the float input and
weight to the output and saves only those (and the quantizers' tiny
parameters). Its backward quantizes both again with the same kernels, runs
aten's own backward of the convolution or of the matrix product on them, frees
them, and hands the results to the quantizers' fused backward. The kernels are
deterministic, so the gradients are bitwise those of the three-node path.

What autocast does to F.conv2d / F.linear is done here by hand: the quantized
input and weight (and the bias) are cast to the autocast dtype before the
product, and the product's gradients are cast back to their dtypes, exactly as
the three-node path's casts and their backwards do.

The layers (DSQConv2d / DSQLinear with recompute=True) call `conv2d` and `linear`
with the QuantArgs of their two quantizers (Quantizer.kernel_args).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["QuantArgs", "conv2d", "linear"]

_ops = torch.ops.dsq_ext


class QuantArgs(NamedTuple):
    """Everything one quantizer kernel call takes besides x: what Quantizer.kernel_args returns."""

    lower: Tensor
    upper: Tensor
    alpha: Tensor | None  # None for method="uniform"
    bits: int
    method: str
    grad_scale: float
    sort_bounds: bool
    grid: str


_N_TENSORS = 3  # lower, upper, alpha: the fields that travel as autograd inputs


def quantize(x: Tensor, q: QuantArgs) -> Tensor:
    """The quantizer's forward kernel (inside the node, autograd records nothing around it)."""
    if q.method == "dsq":
        return _ops.dsq_quantize(x, q.lower, q.upper, q.alpha, q.bits, q.grad_scale, q.sort_bounds, q.grid)
    return _ops.uniform_quantize(x, q.lower, q.upper, q.bits, q.grad_scale, q.sort_bounds, q.grid)


def quantize_backward(grad: Tensor, x: Tensor, q: QuantArgs):
    """The quantizer's fused backward kernel: (grad_x, grad_lower, grad_upper, grad_alpha or None)."""
    if q.method == "dsq":
        return _ops.dsq_quantize_backward(
            grad, x, q.lower, q.upper, q.alpha, q.bits, q.grad_scale, q.sort_bounds, q.grid
        )
    gx, gl, gu = _ops.uniform_quantize_backward(
        grad, x, q.lower, q.upper, q.bits, q.grad_scale, q.sort_bounds, q.grid
    )
    return gx, gl, gu, None


# ---------------------------------------------------------------------------
# The products: forward as the float layers compute it, backward as autograd does.


class _Conv2d(NamedTuple):
    stride: tuple
    padding: tuple
    dilation: tuple
    groups: int

    def forward(self, x, w, b):
        return F.conv2d(x, w, b, self.stride, self.padding, self.dilation, self.groups)

    def backward(self, grad, x, w, bias_shape, mask):
        # What ConvolutionBackward0 (the autograd node of F.conv2d) calls.
        return torch.ops.aten.convolution_backward(
            grad, x, w, bias_shape, self.stride, self.padding, self.dilation,
            False, (0, 0), self.groups, list(mask),
        )  # fmt: skip


class _Linear(NamedTuple):
    # F.linear is a composite: with a bias and a 2-D or contiguous input it is
    # addmm on the input viewed as 2-D, otherwise matmul (which folds the input
    # into 2-D, a weight that requires grad makes it always fold) and an add.
    # Its backward is then that of mm / addmm (mm_mat1_backward and
    # mm_mat2_backward in torch's FunctionsManual.cpp), followed here.

    @staticmethod
    def _addmm_path(x, has_bias: bool) -> bool:
        return has_bias and (x.dim() == 2 or x.is_contiguous())

    def forward(self, x, w, b):
        x2 = x.reshape(-1, x.shape[-1])
        shape = (*x.shape[:-1], w.shape[0])
        if _Linear._addmm_path(x, b is not None):
            return torch.addmm(b, x2, w.t()).view(shape)
        y = x2.mm(w.t()).view(shape)
        return y if b is None else y + b

    def backward(self, grad, x, w, bias_shape, mask):
        x2 = x.reshape(-1, x.shape[-1])
        g2 = grad.reshape(-1, w.shape[0])
        wt = w.t()
        gx = gw = gb = None
        if mask[0]:
            if x2.stride(0) == 1 and x2.stride(1) == x2.size(0):  # a column-major input
                gx = wt.mm(g2.t()).t()
            else:
                gx = g2.mm(w)
            gx = gx.reshape(x.shape)
        if mask[1]:
            if wt.stride(0) == 1 and wt.stride(1) == wt.size(0):
                gw = g2.t().mm(x2)
            else:
                gw = x2.t().mm(g2).t()
        if mask[2]:
            # autograd reduces a broadcast bias's gradient with sum_to_size
            gb = (g2 if _Linear._addmm_path(x, True) else grad).sum_to_size(bias_shape)
        return gx, gw, gb


def _cast(t: Tensor | None, dtype) -> Tensor | None:
    # autocast's rule: floating-point tensors other than float64 go to its dtype.
    if t is None or dtype is None or not t.is_floating_point() or t.dtype in (dtype, torch.float64):
        return t
    return t.to(dtype)


def _autocast_dtype(x: Tensor):
    dev = x.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else None


# ---------------------------------------------------------------------------
# The autograd node.


class _QuantizedProduct(torch.autograd.Function):
    """y = product(quantize(x), quantize(weight), bias), saving x, weight and the quantizer parameters."""

    @staticmethod
    def forward(ctx, x, weight, bias, a_lower, a_upper, a_alpha, w_lower, w_upper, w_alpha, spec):
        op, act, wgt, dtype = spec
        xq = x if act is None else quantize(x, QuantArgs(a_lower, a_upper, a_alpha, *act))
        wq = weight if wgt is None else quantize(weight, QuantArgs(w_lower, w_upper, w_alpha, *wgt))
        y = op.forward(_cast(xq, dtype), _cast(wq, dtype), _cast(bias, dtype))
        ctx.save_for_backward(x, weight, a_lower, a_upper, a_alpha, w_lower, w_upper, w_alpha)
        ctx.spec = spec
        ctx.bias_shape = None if bias is None else bias.shape
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y

    @staticmethod
    def backward(ctx, grad):
        x, weight, a_lower, a_upper, a_alpha, w_lower, w_upper, w_alpha = ctx.saved_tensors
        op, act, wgt, dtype = ctx.spec
        need = ctx.needs_input_grad
        need_x = any(need[i] for i in (0, 3, 4, 5))
        need_w = any(need[i] for i in (1, 6, 7, 8))
        act = None if act is None else QuantArgs(a_lower, a_upper, a_alpha, *act)
        wgt = None if wgt is None else QuantArgs(w_lower, w_upper, w_alpha, *wgt)
        # Quantized again (the same deterministic kernels), used once and dropped.
        xq = _cast(x if act is None else quantize(x, act), dtype)
        wq = _cast(weight if wgt is None else quantize(weight, wgt), dtype)
        g_xq, g_wq, g_b = op.backward(grad, xq, wq, ctx.bias_shape, (need_x, need_w, need[2]))
        del xq, wq
        g_b = _uncast(g_b, ctx.bias_dtype)
        gx, ga_lower, ga_upper, ga_alpha = _through_quantizer(g_xq, x, act)
        del g_xq
        gw, gw_lower, gw_upper, gw_alpha = _through_quantizer(g_wq, weight, wgt)
        grads = (gx, gw, g_b, ga_lower, ga_upper, ga_alpha, gw_lower, gw_upper, gw_alpha, None)
        return tuple(g if n else None for g, n in zip(grads, need))


def _through_quantizer(g: Tensor | None, t: Tensor, q: QuantArgs | None):
    # The product's gradient g of quantize(t) -> (grad_t, grad_lower, grad_upper, grad_alpha).
    if g is None:
        return None, None, None, None
    g = _uncast(g, t.dtype)
    if q is None:
        return g, None, None, None
    return quantize_backward(g, t, q)


def _uncast(g: Tensor | None, dtype) -> Tensor | None:
    # The backward of autocast's cast: the gradient goes back to the tensor's dtype.
    return g if g is None or g.dtype == dtype else g.to(dtype)


def _split(q: QuantArgs | None):
    # lower, upper and alpha travel as autograd inputs; the rest rides along as constants.
    if q is None:
        return (None,) * _N_TENSORS, None
    return tuple(q[:_N_TENSORS]), tuple(q[_N_TENSORS:])


def _apply(op, x, weight, bias, act: QuantArgs | None, wgt: QuantArgs | None) -> Tensor:
    act_tensors, act_static = _split(act)
    wgt_tensors, wgt_static = _split(wgt)
    spec = (op, act_static, wgt_static, _autocast_dtype(x))
    return _QuantizedProduct.apply(x, weight, bias, *act_tensors, *wgt_tensors, spec)


def conv2d(x, weight, bias, act: QuantArgs | None, wgt: QuantArgs | None, stride, padding, dilation, groups):
    """F.conv2d(quantize(x), quantize(weight), bias, ...) as one autograd node (zeros padding, 4-D x)."""
    return _apply(_Conv2d(tuple(stride), tuple(padding), tuple(dilation), groups), x, weight, bias, act, wgt)


def linear(x, weight, bias, act: QuantArgs | None, wgt: QuantArgs | None):
    """F.linear(quantize(x), quantize(weight), bias) as one autograd node."""
    return _apply(_Linear(), x, weight, bias, act, wgt)
