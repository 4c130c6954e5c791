"""The ops against the float64 references, their identities, edge cases and bad input."""

import itertools
import math

import numpy as np
import pytest
import torch
from reference import closed_form, composite, grid_composite, grid_of, grid_position, interval_position

import dsq_ext
from dsq_ext import dsq_quantize, uniform_quantize
from dsq_ext.ops import grid_params

ops = torch.ops.dsq_ext
MODES = ("dsq", "uniform")
GRIDS = ("free", "affine", "symmetric")
PINNED = ("affine", "symmetric")  # the grids with an integer zero point
# (forward atol, per-element grad atol, reduction tolerance per unit of sum|g|)
TOL = {
    torch.float64: (1e-12, 1e-10, 1e-10),
    # float32 r = v - i - 1/2 carries ~v * 6e-8 of rounding (v <= 255) and the fast tanh 4e-7.
    torch.float32: (4e-6, 1e-3, 5e-4),
}


def quantize(mode, x, lower, upper, alpha, bits, **options):
    if mode == "dsq":
        return dsq_quantize(x, lower, upper, alpha, bits, **options)
    return uniform_quantize(x, lower, upper, bits, **options)


def _case_tensors(x, lower, upper, alpha, pshape, dtype, device):
    # x in the dtype under test; the parameters float32, as the layers hold them.
    f32 = dict(dtype=torch.float32, device=device)
    return (
        x.to(dtype=dtype, device=device),
        lower.to(**f32),
        upper.to(**f32),
        torch.full(pshape, alpha, **f32),
    )


def make_case(shape, bits, per_channel, dtype, device, alpha=0.2, spread=1.5):
    """Random x around [lower, upper], kept off the round-half-up boundaries by 1% of Delta.

    Points exactly on boundaries are tested separately; here float32 and float64
    must agree on which level each element rounds to.
    """
    c = shape[0]
    pshape = (c,) if per_channel else ()
    lower = -1.0 + 0.2 * torch.rand(pshape, dtype=torch.float64)
    upper = 1.0 + 0.2 * torch.rand(pshape, dtype=torch.float64)
    x = spread * torch.randn(shape, dtype=torch.float64)
    for _ in range(3):
        v, r = interval_position(x, lower, upper, bits)
        lo = lower.reshape((-1,) + (1,) * (len(shape) - 1)) if per_channel else lower
        up = upper.reshape((-1,) + (1,) * (len(shape) - 1)) if per_channel else upper
        delta = (up - lo) / (2**bits - 1)
        near = (r.abs() < 0.01) & (x >= lo) & (x <= up)
        x = torch.where(near, x + 0.02 * delta, x)
    return _case_tensors(x, lower, upper, alpha, pshape, dtype, device)


def kernel_grads(mode, x, lower, upper, alpha, bits, g, **options):
    leaves = [t.detach().clone().requires_grad_() for t in (x, lower, upper, alpha)]
    y = quantize(mode, *leaves, bits, **options)
    inputs = leaves if mode == "dsq" else leaves[:3]
    grads = torch.autograd.grad(y, inputs, g)
    if mode == "uniform":
        grads = (*grads, torch.zeros_like(alpha))
    return (y.detach(), *grads)


def assert_matches_reference(mode, x, lower, upper, alpha, bits, g):
    y, gx, gl, gu, ga = kernel_grads(mode, x, lower, upper, alpha, bits, g)
    ry, rgx, rgl, rgu, rga = closed_form(x.cpu(), lower.cpu(), upper.cpu(), alpha.cpu(), bits, g.cpu(), mode)
    fwd, elem, red = TOL[x.dtype]
    scale = g.abs().sum().item() + 1.0
    torch.testing.assert_close(y.cpu().double(), ry, atol=fwd, rtol=0)
    torch.testing.assert_close(gx.cpu().double(), rgx, atol=elem, rtol=1e-4)
    for name, k, r in (("lower", gl, rgl), ("upper", gu, rgu), ("alpha", ga, rga)):
        assert k.shape == r.shape, name
        assert k.dtype == torch.float32, name
        # the result is rounded to the parameter dtype (float32)
        torch.testing.assert_close(k.cpu().double(), r, atol=red * scale, rtol=2e-7, msg=name)


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
# alpha does not enter the uniform mode: one value is enough there
@pytest.mark.parametrize("mode, alpha", [("dsq", 0.05), ("dsq", 0.2), ("dsq", 0.45), ("uniform", 0.2)])
def test_matches_closed_form(device, mode, dtype, per_channel, alpha, bits):
    x, lower, upper, a = make_case((6, 5, 7), bits, per_channel, dtype, device, alpha)
    g = torch.randn_like(x)
    assert_matches_reference(mode, x, lower, upper, a, bits, g)


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("alpha", [0.05, 0.2, 0.45])
@pytest.mark.parametrize("mode", MODES)
def test_closed_form_equals_autograd_composite(mode, alpha, bits):
    # The two references are derived independently; they must agree (float64, CPU).
    x, lower, upper, a = make_case((4, 33), bits, True, torch.float64, "cpu", alpha)
    g = torch.randn_like(x)
    leaves = [t.clone().double().requires_grad_() for t in (x, lower, upper, a)]
    y = composite(*leaves, bits, mode)
    grads = torch.autograd.grad(y, leaves, g, allow_unused=True)
    ry, rgx, rgl, rgu, rga = closed_form(x, lower, upper, a, bits, g, mode)
    torch.testing.assert_close(y.detach(), ry, atol=1e-12, rtol=0)
    torch.testing.assert_close(grads[0], rgx, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(grads[1], rgl, atol=1e-9, rtol=1e-10)
    torch.testing.assert_close(grads[2], rgu, atol=1e-9, rtol=1e-10)
    if mode == "dsq":
        torch.testing.assert_close(grads[3], rga, atol=1e-9, rtol=1e-10)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("bits", [2, 4])
def test_large_tensor_reductions(device, mode, bits):
    # Many fixed blocks and threads: the reductions must still match the reference.
    x, lower, upper, a = make_case((3, 64, 41, 41), bits, False, torch.float32, device)
    g = torch.randn_like(x)
    assert_matches_reference(mode, x, lower, upper, a, bits, g)


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
@pytest.mark.parametrize("mode", MODES)
def test_gradcheck_surrogate(mode, bits):
    """gradcheck (float64) of the kernel's backward against finite differences.

    The forward value is a staircase, so it has no derivative to check. With the
    interval index and the hard level held at their values at the base point,
    y = l + Delta*Q + Delta*(phi - phi0)/2 (uniform: Delta*(v - v0)) is smooth,
    and its exact derivative at the base point is what the backward computes.
    """
    _, lower0, upper0, a0 = make_case((2, 9), bits, True, torch.float64, "cpu", 0.3)
    lower0, upper0, a0 = lower0.double(), upper0.double(), a0.double()
    n = 2**bits - 1
    # Inside the bounds (clipping is not smooth), away from interval edges and centres.
    k = torch.randint(0, n, (2, 9)).double()
    f = torch.where(torch.rand(2, 9) < 0.5, 0.1, 0.6) + 0.3 * torch.rand(2, 9)
    x0 = lower0.reshape(-1, 1) + (upper0 - lower0).reshape(-1, 1) / n * (k + f)
    v0, r0 = interval_position(x0, lower0, upper0, bits)
    i0 = torch.clamp(torch.floor(v0), max=n - 1)
    q0 = i0 + (r0 >= 0).double()

    a_base = a0.reshape(-1, 1)
    phi_base = 1 / (1 - a_base) * torch.tanh(torch.log(2 / a_base - 1) * r0)

    def soft(x, lower, upper, alpha):
        l, u = lower.reshape(-1, 1), upper.reshape(-1, 1)
        delta = (u - l) / n
        v = (x - l) / delta
        if mode == "uniform":
            return l + delta * q0 + delta * (v - v0)
        a = alpha.reshape(-1, 1)
        s, L = 1 / (1 - a), torch.log(2 / a - 1)
        phi = s * torch.tanh(L * (v - i0 - 0.5))
        return l + delta * q0 + delta * (phi - phi_base) / 2

    class KernelGrad(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, lower, upper, alpha):
            ctx.save_for_backward(x, lower, upper, alpha)
            return soft(x, lower, upper, alpha)

        @staticmethod
        def backward(ctx, g):
            x, lower, upper, alpha = ctx.saved_tensors
            if mode == "uniform":
                return (*ops.uniform_quantize_backward(g, x, lower, upper, bits), None)
            return ops.dsq_quantize_backward(g, x, lower, upper, alpha, bits)

    inputs = [t.double().requires_grad_() for t in (x0, lower0, upper0, a0)]
    if mode == "uniform":
        inputs[3].requires_grad_(False)
    assert torch.autograd.gradcheck(KernelGrad.apply, inputs, eps=1e-7, atol=1e-6, rtol=1e-5)


# ---------------------------------------------------------------------------
# The identities of DSQ_MATH.md, per element: one channel per element makes the
# per-channel reductions per-element gradients.


def per_element_grads(mode, x, lower, upper, alpha, bits, **options):
    n = x.numel()
    rep = lambda t: t.expand(n).clone()  # noqa: E731
    return kernel_grads(mode, x, rep(lower), rep(upper), rep(alpha), bits, torch.ones_like(x), **options)


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("alpha", [0.01, 0.2, 0.5])
@pytest.mark.parametrize("mode", MODES)
def test_identities_inside(mode, alpha, bits):
    lower, upper = torch.tensor(-0.7, dtype=torch.float64), torch.tensor(1.3, dtype=torch.float64)
    a = torch.tensor(alpha, dtype=torch.float64)
    x = torch.linspace(-0.69, 1.29, 301, dtype=torch.float64)
    y, gx, gl, gu, _ = per_element_grads(mode, x, lower, upper, a, bits)
    # shifting x, l and u together shifts y
    torch.testing.assert_close(gx + gl + gu, torch.ones_like(x), atol=1e-12, rtol=0)
    # scaling them together scales y
    torch.testing.assert_close(x * gx + lower * gl + upper * gu, y, atol=1e-12, rtol=0)


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
@pytest.mark.parametrize("alpha", [0.01, 0.2, 0.45])
def test_alpha_gradient_zero_at_centres_and_edges(alpha, bits):
    n = 2**bits - 1
    lower, upper = torch.tensor(0.0, dtype=torch.float64), torch.tensor(float(n), dtype=torch.float64)
    centres = torch.arange(n, dtype=torch.float64) + 0.5
    edges = torch.arange(1, n, dtype=torch.float64)  # interior edges; l and u are their own case
    x = torch.cat([centres, edges, edges - 1e-12, edges + 1e-12])
    _, _, _, _, ga = per_element_grads("dsq", x, lower, upper, torch.tensor(alpha, dtype=torch.float64), bits)
    torch.testing.assert_close(ga, torch.zeros_like(ga), atol=1e-9, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_grad_x_continuous_across_edges(dtype, bits):
    n = 2**bits - 1
    lower = torch.tensor(-1.0, dtype=dtype)
    upper = torch.tensor(1.0, dtype=dtype)
    delta = 2.0 / n
    edges = torch.tensor([-1.0 + k * delta for k in range(1, n)], dtype=torch.float64)
    eps = 1e-9 if dtype == torch.float64 else 1e-5
    a = torch.tensor(0.2, dtype=dtype)
    _, below, *_ = per_element_grads("dsq", (edges - eps).to(dtype), lower, upper, a, bits)
    _, above, *_ = per_element_grads("dsq", (edges + eps).to(dtype), lower, upper, a, bits)
    torch.testing.assert_close(below, above, atol=1e-4 if dtype == torch.float32 else 1e-7, rtol=0)


# ---------------------------------------------------------------------------
# Exact points: l, u, interval edges and centres, on a grid that float32 holds exactly.


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bits", [1, 2, 3, 4])
@pytest.mark.parametrize("mode", MODES)
def test_exact_points(device, mode, dtype, bits):
    n = 2**bits - 1
    lower, upper = torch.tensor(0.0, device=device), torch.tensor(float(n), device=device)
    k = torch.arange(n + 1, dtype=torch.float64)
    x = torch.cat([k, k[:-1] + 0.5, k[:-1] + 0.25, k[:-1] + 0.75, torch.tensor([-3.0, n + 3.0])])
    expected = torch.cat([k, k[:-1] + 1, k[:-1], k[:-1] + 1, torch.tensor([0.0, float(n)])])
    y = quantize(mode, x.to(dtype=dtype, device=device), lower, upper, torch.tensor(0.2, device=device), bits)
    assert y.dtype == dtype
    torch.testing.assert_close(y.double().cpu(), expected, atol=0, rtol=0)


def test_bounds_are_inside():
    # x == l and x == u are inside: they get dy/dx and no "outside" gradient.
    x = torch.tensor([0.0, 3.0], dtype=torch.float64)
    y, gx, gl, gu, _ = per_element_grads(
        "dsq", x, torch.tensor(0.0).double(), torch.tensor(3.0).double(), torch.tensor(0.2).double(), 2
    )
    torch.testing.assert_close(y, x)
    assert (gx > 0).all()
    assert gl[1] == 0 or abs(gl[1]) < 1.0  # u's element: no full "below" gradient for l
    assert abs(gu[0]) < 1.0


# ---------------------------------------------------------------------------
# alpha limits, degenerate bounds, NaN, empty


@pytest.mark.parametrize("bits", [2, 4])
def test_alpha_clamped_at_and_beyond_limits(device, bits):
    x, lower, upper, _ = make_case((4, 50), bits, False, torch.float32, device)
    g = torch.randn_like(x)

    def grads(alpha):
        return kernel_grads("dsq", x, lower, upper, torch.tensor(alpha, device=device), bits, g)

    at_floor, at_top = grads(1e-3), grads(0.5)
    for beyond, at in (
        (1e-5, at_floor),
        (-0.1, at_floor),
        (0.0, at_floor),
        (0.7, at_top),
        (1.0, at_top),
        (2.0, at_top),
    ):
        got = grads(beyond)
        for t in got:
            assert torch.isfinite(t).all(), beyond
        torch.testing.assert_close(got[1], at[1], msg=f"grad x at alpha={beyond}")
        assert got[4].item() == 0.0, f"a clamped alpha ({beyond}) must get zero gradient"
    assert at_floor[4].item() != 0.0 and at_top[4].item() != 0.0  # at the limits alpha is live


def test_alpha_k_bound_for_tiny_delta():
    # Delta = 1e-4: k <= 1000 needs alpha >= 2/(1+e^0.1) > 0.5, so alpha is held at 0.5.
    lower, upper = torch.tensor(0.0, dtype=torch.float64), torch.tensor(15e-4, dtype=torch.float64)
    x = torch.linspace(0.0, 15e-4, 97, dtype=torch.float64)
    g = torch.ones_like(x)
    a_small = kernel_grads("dsq", x, lower, upper, torch.tensor(0.1, dtype=torch.float64), 4, g)
    a_half = kernel_grads("dsq", x, lower, upper, torch.tensor(0.5, dtype=torch.float64), 4, g)
    torch.testing.assert_close(a_small[1], a_half[1])
    assert a_small[4].item() == 0.0


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("upper_value", [0.3, 0.2999999, -1.0, 0.3 + 1e-40])
def test_degenerate_bounds_are_finite(device, mode, upper_value):
    x = torch.linspace(-1, 1, 41, device=device)
    lower, upper = torch.tensor(0.3, device=device), torch.tensor(upper_value, device=device)
    y, gx, gl, gu, ga = kernel_grads(
        mode, x, lower, upper, torch.tensor(0.2, device=device), 4, torch.ones_like(x)
    )
    for t in (y, gx, gl, gu, ga):
        assert torch.isfinite(t).all()
    if upper_value <= 0.3:
        assert (y == 0.3).all()  # every level collapses onto l
        assert (gx == 0).all()
        assert gl.item() == (x < 0.3).sum().item() + (x == 0.3).sum().item()
        assert gu.item() == (x > 0.3).sum().item()
    ry, rgx, rgl, rgu, rga = closed_form(
        x.cpu(), lower.cpu(), upper.cpu(), torch.tensor(0.2), 4, torch.ones(41), mode
    )
    torch.testing.assert_close(y.cpu().double(), ry)
    torch.testing.assert_close(gl.cpu().double(), rgl)
    torch.testing.assert_close(gu.cpu().double(), rgu)


@pytest.mark.parametrize("mode", MODES)
def test_nan_propagates(device, mode):
    # Documented behaviour: a NaN element gives NaN there and NaN reduced gradients,
    # like any PyTorch op (so GradScaler and anomaly detection see it); others are unaffected.
    x, lower, upper, a = make_case((2, 20), 4, False, torch.float32, device)
    x[1, 3] = float("nan")
    y, gx, gl, gu, ga = kernel_grads(mode, x, lower, upper, a, 4, torch.ones_like(x))
    assert torch.isnan(y[1, 3]) and torch.isnan(gx[1, 3])
    mask = torch.ones_like(x, dtype=torch.bool)
    mask[1, 3] = False
    assert torch.isfinite(y[mask]).all() and torch.isfinite(gx[mask]).all()
    assert torch.isnan(gl) and torch.isnan(gu)
    if mode == "dsq":
        assert torch.isnan(ga)


def test_nan_in_upstream_gradient_propagates():
    x = torch.linspace(-2, 2, 10)
    g = torch.ones_like(x)
    g[0] = float("nan")  # x[0] is below l: only dl sees it
    _, gx, gl, gu, _ = kernel_grads("dsq", x, torch.tensor(-1.0), torch.tensor(1.0), torch.tensor(0.2), 2, g)
    assert torch.isnan(gl) and torch.isfinite(gu) and torch.isfinite(gx).all()


@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("mode", MODES)
def test_empty(device, mode, per_channel):
    x = torch.empty(0, 3, device=device)
    p = (
        (lambda v: torch.full((0,), v, device=device))
        if per_channel
        else (lambda v: torch.tensor(v, device=device))
    )
    y, gx, gl, gu, ga = kernel_grads(mode, x, p(-1.0), p(1.0), p(0.2), 4, torch.empty_like(x))
    assert y.shape == (0, 3) and gx.shape == (0, 3)
    assert gl.shape == p(0.0).shape
    assert (gl == 0).all() and (gu == 0).all() and (ga == 0).all()


# ---------------------------------------------------------------------------
# Layouts and dtypes


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("per_channel", [False, True])
def test_non_contiguous_and_channels_last(device, mode, per_channel):
    x, lower, upper, a = make_case((4, 6, 5, 7), 3, per_channel, torch.float32, device)
    g = torch.randn_like(x)
    ref = kernel_grads(mode, x, lower, upper, a, 3, g)
    views = {
        "channels_last": (
            x.contiguous(memory_format=torch.channels_last),
            g.contiguous(memory_format=torch.channels_last),
        ),
        "strided": (torch.stack([x, x], -1)[..., 0], torch.stack([g, g], -1)[..., 1]),
        "transposed": (
            x.transpose(1, 2).contiguous().transpose(1, 2),
            g.transpose(2, 3).contiguous().transpose(2, 3),
        ),
    }
    for name, (xv, gv) in views.items():
        got = kernel_grads(mode, xv, lower, upper, a, 3, gv)
        for i, (r, t) in enumerate(zip(ref, got)):
            # y and grad x are elementwise: bit-identical. The reductions add the
            # elements in memory order, which a kept dense layout changes: equal to rounding.
            exact = i < 2 or per_channel or name == "strided"
            torch.testing.assert_close(t, r, atol=0 if exact else 1e-5, rtol=0 if exact else 1e-5, msg=name)
        if not per_channel and name == "channels_last":
            # per tensor, a dense layout is kept rather than copied
            assert got[0].is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("per_channel", [False, True])
def test_reduced_precision(device, dtype, mode, per_channel):
    x, lower, upper, a = make_case((8, 3, 33), 4, per_channel, dtype, device)
    g = torch.randn_like(x)
    y, gx, gl, gu, ga = kernel_grads(mode, x, lower, upper, a, 4, g)
    assert y.dtype == dtype and gx.dtype == dtype
    assert gl.dtype == gu.dtype == ga.dtype == torch.float32  # the parameters' dtype
    ry, rgx, rgl, rgu, rga = closed_form(x.cpu(), lower.cpu(), upper.cpu(), a.cpu(), 4, g.cpu(), mode)
    torch.testing.assert_close(y.cpu(), ry.to(dtype), atol=0, rtol=0)
    torch.testing.assert_close(gx.cpu(), rgx.to(dtype), atol=1e-3, rtol=1e-2)
    scale = g.abs().double().sum().item()
    for k, r in ((gl, rgl), (gu, rgu), (ga, rga)):
        torch.testing.assert_close(k.cpu().double(), r, atol=1e-5 * scale, rtol=0)


@pytest.mark.parametrize("mode", MODES)
def test_float64_params_with_float32_x(mode):
    x, lower, upper, a = make_case((3, 40), 4, False, torch.float32, "cpu")
    y, gx, gl, gu, ga = kernel_grads(
        mode, x, lower.double(), upper.double(), a.double(), 4, torch.ones_like(x)
    )
    assert y.dtype == torch.float32 and gl.dtype == torch.float64


# ---------------------------------------------------------------------------
# The layers' options: grad_scale and sort_bounds


def options_grads(mode, x, lower, upper, alpha, bits, g, **options):
    leaves = [t.detach().clone().requires_grad_() for t in (x, lower, upper, alpha)]
    if mode == "dsq":
        y = dsq_quantize(*leaves, bits, **options)
    else:
        y = uniform_quantize(*leaves[:3], bits, **options)
        leaves = leaves[:3]
    return (y.detach(), *torch.autograd.grad(y, leaves, g))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("per_channel", [False, True])
def test_grad_scale_scales_parameter_gradients_only(device, mode, per_channel):
    x, lower, upper, a = make_case((5, 3, 40), 3, per_channel, torch.float32, device)
    g = torch.randn_like(x)
    base = options_grads(mode, x, lower, upper, a, 3, g)
    scaled = options_grads(mode, x, lower, upper, a, 3, g, grad_scale=0.0123)
    assert torch.equal(scaled[0], base[0]) and torch.equal(scaled[1], base[1])
    for b, t in zip(base[2:], scaled[2:]):
        assert (b != 0).all()
        # The double sums are scaled, then rounded once to float32.
        torch.testing.assert_close(t, b * 0.0123, rtol=3e-7, atol=0)
    zero = options_grads(mode, x, lower, upper, a, 3, g, grad_scale=0.0)
    assert torch.equal(zero[1], base[1]) and all((t == 0).all() for t in zero[2:])


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("layout", ["per_tensor", "per_channel", "mixed"])
def test_sort_bounds_equals_quantizing_with_min_and_max(device, mode, layout):
    x, lower, upper, a = make_case((5, 3, 40), 3, layout != "per_tensor", torch.float32, device)
    if layout == "per_tensor":
        lower, upper = upper, lower  # crossed
    else:
        crossed = torch.tensor([False, True, False, True, False], device=device)
        lower, upper = torch.where(crossed, upper, lower), torch.where(crossed, lower, upper)
        if layout == "mixed":
            lower = torch.tensor(0.0, device=device)  # above some uppers, below the others
    g = torch.randn_like(x)
    got = options_grads(mode, x, lower, upper, a, 3, g, sort_bounds=True)
    # The reference: what the layers did before the option existed (no ties here).
    leaves = [t.detach().clone().requires_grad_() for t in (x, lower, upper, a)]
    lo, hi = torch.minimum(leaves[1], leaves[2]), torch.maximum(leaves[1], leaves[2])
    y = quantize(mode, leaves[0], lo, hi, leaves[3], 3)
    want = (y.detach(), *torch.autograd.grad(y, leaves if mode == "dsq" else leaves[:3], g))
    for name, w, t in zip(("y", "x", "lower", "upper", "alpha"), want, got):
        assert w.shape == t.shape, name
        # Exact, except where the reference adds float32 per-channel sums into a
        # per-tensor parameter's gradient that the kernels add up in double.
        tol = 2e-6 if layout == "mixed" and w.numel() == 1 else 0
        torch.testing.assert_close(t, w, atol=0, rtol=tol, msg=name)
    # Without the option, a crossed channel is degenerate: every output is its lower.
    plain = options_grads(mode, x, lower, upper, a, 3, g)[0]
    assert not torch.equal(plain, got[0])


@pytest.mark.parametrize("mode", MODES)
def test_sort_bounds_leaves_tied_bounds_alone(device, mode):
    x = torch.linspace(-1, 1, 41, device=device)
    bound = torch.tensor(0.25, device=device)
    g = torch.ones_like(x)
    a = torch.tensor(0.2, device=device)
    for got, want in zip(
        options_grads(mode, x, bound, bound, a, 2, g, sort_bounds=True),
        options_grads(mode, x, bound, bound, a, 2, g),
    ):
        assert torch.equal(got, want)


# ---------------------------------------------------------------------------
# Determinism


@pytest.mark.parametrize("mode", MODES)
def test_reductions_bit_identical_across_runs_and_threads(mode):
    x, lower, upper, a = make_case((2, 64, 60, 60), 4, False, torch.float32, "cpu")
    g = torch.randn_like(x)
    before = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2, 1, 2):
            torch.set_num_threads(threads)
            results.append(kernel_grads(mode, x, lower, upper, a, 4, g))
    finally:
        torch.set_num_threads(before)
    for other in results[1:]:
        for r, t in zip(results[0], other):
            assert torch.equal(r, t)


# ---------------------------------------------------------------------------
# The fast tanh the float32 backward uses: its error bound, as documented in dsq_math.h.

TANH_ABS_ERROR_BOUND = 5e-7


def test_fast_tanh_error_bound():
    z = torch.cat(
        [torch.linspace(-12, 12, 4_000_001), torch.tensor([0.0, -0.0, 1e-30, -1e-30, 7.9, 1e30, -1e30])]
    )
    err = (ops._fast_tanh(z).double() - torch.tanh(z.double())).abs()
    assert err.max().item() <= TANH_ABS_ERROR_BOUND
    special = ops._fast_tanh(torch.tensor([float("inf"), float("-inf"), float("nan")]))
    assert special[0] == pytest.approx(1.0, abs=1e-6) and special[1] == pytest.approx(-1.0, abs=1e-6)
    assert torch.isnan(special[2])


# ---------------------------------------------------------------------------
# opcheck: schema, fake kernels, autograd registration, AOT dispatch


def opcheck_cases(device):
    for per_channel, requires_grad, dtype in itertools.product(
        [False, True], [False, True], [torch.float32, torch.bfloat16]
    ):
        x, lower, upper, a = make_case((4, 3, 5, 5), 4, per_channel, dtype, device)
        if not per_channel:
            x = x.contiguous(memory_format=torch.channels_last)
        for t in (x, lower, upper, a):
            t.requires_grad_(requires_grad)
        yield x, lower, upper, a


def test_opcheck(device):
    for x, lower, upper, a in opcheck_cases(device):
        torch.library.opcheck(ops.dsq_quantize.default, (x, lower, upper, a, 4))
        torch.library.opcheck(ops.uniform_quantize.default, (x, lower, upper, 4))
        g = torch.randn_like(x)
        d = [t.detach() for t in (x, lower, upper, a)]
        torch.library.opcheck(ops.dsq_quantize_backward.default, (g, *d, 4))
        torch.library.opcheck(ops.uniform_quantize_backward.default, (g, *d[:3], 4))
        torch.library.opcheck(ops.dsq_quantize.default, (x, upper, lower, a, 4, 0.5, True))
        torch.library.opcheck(ops.uniform_quantize.default, (x, upper, lower, 4, 0.5, True))
        torch.library.opcheck(ops.dsq_quantize_backward.default, (g, *d, 4, 0.5, True))
        torch.library.opcheck(ops.uniform_quantize_backward.default, (g, *d[:3], 4, 0.5, True))
    if device == "cpu":
        torch.library.opcheck(ops._fast_tanh.default, (torch.randn(10),))


# ---------------------------------------------------------------------------
# Bad input: a clear error naming the argument and the value, never a crash.


def good_args(device="cpu"):
    return (
        torch.randn(4, 3, device=device),
        torch.tensor(-1.0, device=device),
        torch.tensor(1.0, device=device),
        torch.tensor(0.2, device=device),
    )


@pytest.mark.parametrize(
    "case, match",
    [
        ("int_x", r"x must be float32, float64, float16 or bfloat16, got Int"),
        ("complex_x", r"x must be .* got ComplexFloat"),
        ("int_lower", r"lower must be a float32.* got Long"),
        ("bits0", r"bits must be in 1..8, got 0"),
        ("bits9", r"bits must be in 1..8, got 9"),
        ("bits_float", r"bits must be an int in 1..8, got 4.0"),
        ("lower_shape", r"lower must have one element \(per tensor\) or shape \[x.size\(0\)\].*\[3\]"),
        ("alpha_2d", r"alpha must have one element .*\[4, 1\]"),
        ("scalar_x_per_channel", r"upper must have one element"),
        ("lower_meta", r"lower is on meta but x is on cpu"),
        ("upper_type", r"upper must be a Tensor or a real number, got str"),
    ],
)
@pytest.mark.parametrize("mode", MODES)
def test_bad_input(mode, case, match):
    x, lower, upper, a = good_args()
    bits = 4
    if case == "int_x":
        x = torch.ones(4, 3, dtype=torch.int32)
    elif case == "complex_x":
        x = torch.ones(4, 3, dtype=torch.complex64)
    elif case == "int_lower":
        lower = torch.tensor(0)
    elif case == "bits0":
        bits = 0
    elif case == "bits9":
        bits = 9
    elif case == "bits_float":
        bits = 4.0
    elif case == "lower_shape":
        lower = torch.zeros(3)
    elif case == "alpha_2d":
        if mode == "uniform":
            pytest.skip("no alpha")
        a = torch.full((4, 1), 0.2)
    elif case == "scalar_x_per_channel":
        x, upper = torch.tensor(0.5), torch.ones(2)
    elif case == "lower_meta":
        lower = torch.tensor(-1.0, device="meta")
    elif case == "upper_type":
        upper = "1.0"
    with pytest.raises((RuntimeError, ValueError, TypeError), match=match):
        quantize(mode, x, lower, upper, a, bits)


@pytest.mark.parametrize("raw", [True, False])
def test_bad_input_raw_ops(raw):
    # The C++ checks themselves (bypassing the Python wrappers), backward included.
    x, lower, upper, a = good_args()
    with pytest.raises(RuntimeError, match=r"dsq_quantize: bits must be in 1..8, got 12"):
        ops.dsq_quantize(x, lower, upper, a, 12)
    with pytest.raises(RuntimeError, match=r"grad must have x's shape \[4, 3\], got \[3, 4\]"):
        ops.dsq_quantize_backward(torch.ones(3, 4), x, lower, upper, a, 4)
    with pytest.raises(RuntimeError, match=r"uniform_quantize_backward: grad must be .* got Long"):
        ops.uniform_quantize_backward(torch.ones(4, 3, dtype=torch.long), x, lower, upper, 4)
    with pytest.raises(RuntimeError, match=r"lower is on meta but x is on cpu"):
        ops.uniform_quantize(x, lower.to("meta"), upper, 4)
    with pytest.raises(RuntimeError, match=r"dsq_quantize_backward: grad_scale must be .* >= 0, got -1"):
        ops.dsq_quantize_backward(torch.ones(4, 3), x, lower, upper, a, 4, -1.0)
    with pytest.raises(RuntimeError, match=r"uniform_quantize: grad_scale must be .* >= 0, got inf"):
        ops.uniform_quantize(x, lower, upper, 4, float("inf"))


@pytest.mark.parametrize(
    "options, error, match",
    [
        (dict(grad_scale=float("nan")), ValueError, r"grad_scale must be a finite number >= 0, got nan"),
        (dict(grad_scale=-0.5), ValueError, r"grad_scale must be a finite number >= 0, got -0.5"),
        (dict(grad_scale="1"), TypeError, r"grad_scale must be a real number, got '1'"),
        (dict(sort_bounds=1), TypeError, r"sort_bounds must be a bool, got 1"),
    ],
)
@pytest.mark.parametrize("mode", MODES)
def test_bad_options(mode, options, error, match):
    x, lower, upper, a = good_args()
    with pytest.raises(error, match=match):
        if mode == "dsq":
            dsq_quantize(x, lower, upper, a, 4, **options)
        else:
            uniform_quantize(x, lower, upper, 4, **options)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_mixed_devices_cuda():
    x, lower, upper, a = good_args("cuda")
    with pytest.raises(RuntimeError, match=r"lower is on cpu but x is on cuda:0"):
        dsq_quantize(x, lower.cpu(), upper, a, 4)


def test_cuda_built_when_gpu_present():
    # A silently CPU-only build would show up later as "Could not run ... CUDA backend".
    if torch.cuda.is_available():
        assert "CUDA" in dsq_ext.build_info()["backends"], (
            "a GPU is present but the CUDA kernels were not built: rebuild with FORCE_CUDA=1"
        )
    assert "CPU" in dsq_ext.build_info()["backends"]


def test_python_numbers_accepted():
    x = torch.linspace(-1, 1, 9)
    torch.testing.assert_close(
        dsq_quantize(x, -1, 1, 0.2, 2),
        dsq_quantize(x, torch.tensor(-1.0), torch.tensor(1.0), torch.tensor(0.2), 2),
    )
    assert math.isfinite(uniform_quantize(x, -1.0, 1.0, 3).sum().item())


@pytest.mark.parametrize("mode", MODES)
def test_mixed_per_tensor_and_per_channel_parameters(device, mode):
    x, lower, upper, a = make_case((5, 3, 40), 3, True, torch.float32, device)
    # per-channel lower, per-tensor upper (1-element, 1-D) and alpha (0-dim)
    upper1 = upper.max().reshape(1)
    g = torch.randn_like(x)
    assert_matches_reference(mode, x, lower, upper1, a[0], 3, g)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_misaligned_storage_gives_identical_results(device, mode, dtype):
    # A view that starts one element into its storage (not 16-byte aligned) must
    # give bit-identical results to an aligned copy: vector and scalar paths agree.
    x, lower, upper, a = make_case((3, 1000), 4, False, dtype, device)
    big = torch.empty(x.numel() + 1, dtype=dtype, device=device)
    big[1:] = x.reshape(-1)
    xv = big[1:].view(x.shape)
    g = torch.randn_like(x)
    for r, t in zip(
        kernel_grads(mode, x, lower, upper, a, 4, g), kernel_grads(mode, xv, lower, upper, a, 4, g)
    ):
        assert torch.equal(r, t)


@pytest.mark.parametrize("mode", MODES)
def test_deterministic_on_device(device, mode):
    x, lower, upper, a = make_case((4, 64, 33, 33), 4, True, torch.float32, device)
    g = torch.randn_like(x)
    first = kernel_grads(mode, x, lower, upper, a, 4, g)
    for _ in range(2):
        for r, t in zip(first, kernel_grads(mode, x, lower, upper, a, 4, g)):
            assert torch.equal(r, t)


# ---------------------------------------------------------------------------
# The affine and symmetric grids (0.0 is a level, integer zero point)


def make_grid_case(shape, bits, per_channel, dtype, device, grid, alpha=0.2):
    """Random x and bounds for a grid, kept off its rounding boundaries and range ends by 1%.

    Bounds are sometimes both positive (affine: the grid then starts at 0). The affine
    zero point -l/Delta is kept off half-integers, where float32 and float64 could round
    it differently.
    """
    c = shape[0]
    pshape = (c,) if per_channel else ()
    n = 2**bits - 1
    lower = -1.0 + 1.4 * torch.rand(pshape, dtype=torch.float64)
    upper = lower + 0.5 + torch.rand(pshape, dtype=torch.float64)
    ratio = -lower / ((upper - lower) / n)
    near_half = ((ratio - ratio.floor() - 0.5).abs() < 0.02) & (ratio > 0) & (ratio < n)
    lower = torch.where(near_half, lower - 0.05 * (upper - lower) / n, lower)
    lower, upper = lower.float().double(), upper.float().double()  # exactly what the kernel sees
    x = 1.5 * torch.randn(shape, dtype=torch.float64)
    delta, z, nlev = grid_of(lower, upper, bits, grid, x)
    for _ in range(3):
        v, r = grid_position(x, lower, upper, bits, grid)
        near = (r.abs() < 0.01) | (v.abs() < 0.01) | ((v - nlev).abs() < 0.01)
        x = torch.where(near, x + 0.02 * delta, x)
    return _case_tensors(x, lower, upper, alpha, pshape, dtype, device)


def grid_reference_grads(mode, x, lower, upper, alpha, bits, g, grid):
    leaves = [t.detach().cpu().double().requires_grad_() for t in (x, lower, upper, alpha)]
    y = grid_composite(*leaves, bits, mode, grid)
    grads = torch.autograd.grad(y, leaves if mode == "dsq" else leaves[:3], g.cpu().double())
    if mode == "uniform":
        grads = (*grads, torch.zeros_like(leaves[3]))
    return (y.detach(), *grads)


def assert_matches_grid_reference(mode, x, lower, upper, alpha, bits, g, grid):
    got = kernel_grads(mode, x, lower, upper, alpha, bits, g, grid=grid)
    want = grid_reference_grads(mode, x, lower, upper, alpha, bits, g, grid)
    fwd, elem, red = TOL[x.dtype]
    scale = g.abs().sum().item() + 1.0
    torch.testing.assert_close(got[0].cpu().double(), want[0], atol=fwd, rtol=0, msg="y")
    torch.testing.assert_close(got[1].cpu().double(), want[1], atol=elem, rtol=1e-4, msg="grad x")
    for name, k, r in zip(("lower", "upper", "alpha"), got[2:], want[2:]):
        assert k.shape == r.shape and k.dtype == torch.float32, name
        torch.testing.assert_close(k.cpu().double(), r, atol=red * scale, rtol=2e-7, msg=name)


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("grid", PINNED)
@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("mode, alpha", [("dsq", 0.05), ("dsq", 0.3), ("uniform", 0.2)])
def test_grid_matches_reference(device, mode, alpha, dtype, per_channel, grid, bits):
    if grid == "symmetric" and bits == 1:
        pytest.skip("the symmetric grid needs bits >= 2")
    x, lower, upper, a = make_grid_case((6, 5, 7), bits, per_channel, dtype, device, grid, alpha)
    g = torch.randn_like(x)
    assert_matches_grid_reference(mode, x, lower, upper, a, bits, g, grid)


@pytest.mark.parametrize("grid", PINNED)
@pytest.mark.parametrize("mode", MODES)
def test_grid_large_tensor_and_mixed_parameters(device, mode, grid):
    x, lower, upper, a = make_grid_case((3, 64, 41, 41), 4, False, torch.float32, device, grid)
    assert_matches_grid_reference(mode, x, lower, upper, a, 4, torch.randn_like(x), grid)
    x, lower, upper, a = make_grid_case((5, 3, 40), 3, True, torch.float32, device, grid)
    upper1 = upper.max().reshape(1)  # per-channel lower, per-tensor upper and alpha
    assert_matches_grid_reference(mode, x, lower, upper1, a[0], 3, torch.randn_like(x), grid)


@pytest.mark.parametrize("mode", MODES)
def test_symmetric_tie_splits_the_scale_gradient(mode):
    # -l == u: the scale max(-l, u) takes half of its gradient from each bound.
    x = torch.linspace(-1.3, 1.3, 53, dtype=torch.float64)
    lower, upper, a = (torch.tensor(v, dtype=torch.float64) for v in (-1.0, 1.0, 0.2))
    g = torch.randn_like(x)
    y, gx, gl, gu, ga = kernel_grads(mode, x, lower, upper, a, 3, g, grid="symmetric")
    want = grid_reference_grads(mode, x, lower, upper, a, 3, g, "symmetric")
    for k, r in zip((y, gx, gl, gu, ga), want):
        torch.testing.assert_close(k, r, atol=1e-12, rtol=1e-12)
    assert gl == -gu and gu != 0
    # a wider upper takes it all
    _, _, gl2, gu2, _ = kernel_grads(mode, x, lower, upper + 0.25, a, 3, g, grid="symmetric")
    assert gl2 == 0 and gu2 != 0


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
@pytest.mark.parametrize("grid", PINNED)
@pytest.mark.parametrize("mode", MODES)
def test_grid_identities(mode, grid, bits):
    if grid == "symmetric" and bits == 1:
        pytest.skip("the symmetric grid needs bits >= 2")
    # Scaling x, l and u together scales y (inside and outside the range); with z held,
    # y depends on l and u only through Delta. One channel per element gives per-element
    # gradients.
    x = torch.linspace(-2.2, 2.2, 301, dtype=torch.float64)
    lower, upper = torch.tensor(-0.7, dtype=torch.float64), torch.tensor(1.3, dtype=torch.float64)
    y, gx, gl, gu, _ = per_element_grads(mode, x, lower, upper, torch.tensor(0.2).double(), bits, grid=grid)
    torch.testing.assert_close(x * gx + lower * gl + upper * gu, y, atol=1e-12, rtol=0)
    if grid == "affine":
        torch.testing.assert_close(gl, -gu, atol=0, rtol=0)
    else:
        assert (gl == 0).all()  # u > -l: the scale is u's


@pytest.mark.parametrize("grid", PINNED)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bits", [1, 2, 3, 4])
@pytest.mark.parametrize("mode", MODES)
def test_grid_exact_points(device, mode, bits, dtype, grid):
    # The levels (k - z)*Delta, their midpoints (round half to even), quarter points and
    # points beyond the range, on bounds where Delta and the levels are exact in every dtype.
    if grid == "symmetric" and bits == 1:
        pytest.skip("the symmetric grid needs bits >= 2")
    delta, n = 0.25, 2**bits - 1
    if grid == "affine":
        z = float(min(2, n))
        nlev, lo, hi = n, -z * delta, (n - z) * delta
    else:
        z = float(2 ** (bits - 1) - 1)
        nlev, lo, hi = 2 * z, -z * delta, z * delta
    k = torch.arange(nlev + 1, dtype=torch.float64) - z  # the signed levels
    mid = k[:-1] + 0.5
    x = torch.cat([k, mid, k[:-1] + 0.25, k[:-1] + 0.75, torch.tensor([k[0] - 3, k[-1] + 3])]) * delta
    to_even = 2 * torch.round(mid / 2)  # the even one of the two neighbours (mid/2 is never a tie)
    want = torch.cat([k, to_even, k[:-1], k[:-1] + 1, torch.tensor([k[0], k[-1]])]) * delta
    lower, upper = torch.tensor(lo, device=device), torch.tensor(hi, device=device)
    a = torch.tensor(0.2, device=device)
    y = quantize(mode, x.to(dtype=dtype, device=device), lower, upper, a, bits, grid=grid)
    assert y.dtype == dtype
    torch.testing.assert_close(y.double().cpu(), want, atol=0, rtol=0)


def onnx_qdq(x, scale, zero_point, bits, grid):
    """ONNX QuantizeLinear -> clip to the b-bit range -> DequantizeLinear, in float32 torch ops.

    QuantizeLinear is saturate(round_half_to_even(x / scale) + zero_point) with a true
    division; DequantizeLinear is (float)(q - zero_point) * scale. The symmetric grid is
    stored as int8 with zero point 0, its level q - z.
    """
    if scale.dim() == 1:
        shape = (-1,) + (1,) * (x.dim() - 1)
        scale, zero_point = scale.reshape(shape), zero_point.reshape(shape)
    if grid == "affine":
        q = torch.clamp(torch.round(x / scale) + zero_point, 0, 2**bits - 1)
        return (q - zero_point) * scale
    qp = 2 ** (bits - 1) - 1
    return torch.clamp(torch.round(x / scale), -qp, qp) * scale


def qdq_case(bits, per_channel, grid, device, c=6):
    lower = -1.0 + 1.4 * torch.rand((c,) if per_channel else ())
    upper = lower + 0.3 + torch.rand((c,) if per_channel else ())
    scale, zp = grid_params(lower, upper, bits, grid)
    s = scale.reshape(-1, 1) if per_channel else scale
    k = torch.randint(-300, 300, (c, 500)).float()
    # random points, exact level midpoints (ties) and exact levels, and beyond the range
    x = torch.cat([1.5 * torch.randn(c, 2000), (k + 0.5) * s, k * s, 1e30 * torch.randn(c, 3)], 1)
    return x.to(device), lower.to(device), upper.to(device), scale, zp


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("grid", PINNED)
@pytest.mark.parametrize("per_channel", [False, True])
def test_grid_forward_is_onnx_qdq_bit_for_bit(device, per_channel, grid, bits):
    if grid == "symmetric" and bits == 1:
        pytest.skip("the symmetric grid needs bits >= 2")
    x, lower, upper, scale, zp = qdq_case(bits, per_channel, grid, device)
    want = onnx_qdq(x.cpu(), scale, zp, bits, grid)
    for mode in MODES:
        y = quantize(mode, x, lower, upper, torch.tensor(0.2, device=device), bits, grid=grid)
        assert torch.equal(y.cpu(), want), mode
    # float16 and bfloat16 are computed in float32 and rounded once
    for dtype in (torch.float16, torch.bfloat16):
        xr = x.to(dtype)
        y = uniform_quantize(xr, lower, upper, bits, grid=grid)
        assert torch.equal(y.cpu(), onnx_qdq(xr.cpu().float(), scale, zp, bits, grid).to(dtype)), dtype


def onnxruntime_qdq(scale, zero_point, bits, grid):
    """An onnxruntime session of QuantizeLinear -> Clip -> DequantizeLinear (opset 13)."""
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    from onnx import TensorProto, helper, numpy_helper

    if grid == "affine":
        qtype, zp, qmin, qmax = np.uint8, zero_point.numpy().astype(np.uint8), 0, 2**bits - 1
    else:
        qp = 2 ** (bits - 1) - 1
        qtype, zp, qmin, qmax = np.int8, np.zeros(zero_point.shape, np.int8), -qp, qp
    axis = {"axis": 0} if scale.dim() == 1 else {}
    inits = [
        numpy_helper.from_array(scale.numpy(), "scale"),
        numpy_helper.from_array(zp, "zero_point"),
        numpy_helper.from_array(np.array(qmin, qtype), "qmin"),
        numpy_helper.from_array(np.array(qmax, qtype), "qmax"),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "scale", "zero_point"], ["q"], **axis),
        helper.make_node("Clip", ["q", "qmin", "qmax"], ["qc"]),
        helper.make_node("DequantizeLinear", ["qc", "scale", "zero_point"], ["y"], **axis),
    ]
    io = [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["C", "K"]) for n in ("x", "y")]
    model = helper.make_model(
        helper.make_graph(nodes, "qdq", io[:1], io[1:], inits), opset_imports=[helper.make_opsetid("", 13)]
    )
    onnx.checker.check_model(model)
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("grid", PINNED)
@pytest.mark.parametrize("per_channel", [False, True])
def test_grid_forward_equals_onnxruntime(device, per_channel, grid, bits):
    x, lower, upper, scale, zp = qdq_case(bits, per_channel, grid, device)
    sess = onnxruntime_qdq(scale, zp, bits, grid)
    want = torch.from_numpy(sess.run(None, {"x": x.cpu().numpy()})[0])
    y = uniform_quantize(x, lower, upper, bits, grid=grid)
    assert torch.equal(y.cpu(), want)


# ---------------------------------------------------------------------------
# grid_params: the scale and zero point the kernels use


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("grid", GRIDS)
def test_grid_params_values(device, grid, bits):
    if grid == "symmetric" and bits == 1:
        pytest.skip("the symmetric grid needs bits >= 2")
    for dtype in (torch.float32, torch.float64):
        lower = (-1.0 + 1.4 * torch.rand(7, dtype=torch.float64)).to(dtype)
        upper = (lower.double() + 0.2 + torch.rand(7, dtype=torch.float64)).to(dtype)
        scale, zp = grid_params(lower.to(device), upper.to(device), bits, grid)
        assert scale.dtype == zp.dtype == dtype and scale.shape == zp.shape == (7,)
        n = 2**bits - 1
        # the same float operations in the same type as the kernels
        if grid == "symmetric":
            qp = 2 ** (bits - 1) - 1
            want_s, want_z = torch.maximum(-lower, upper) / qp, torch.full_like(lower, qp)
        else:
            want_s = (upper - lower) / n
            want_z = -lower / want_s
            if grid == "affine":
                want_z = torch.clamp(torch.round(want_z), 0, n)
        assert torch.equal(scale.cpu(), want_s) and torch.equal(zp.cpu(), want_z)


def test_grid_params_shapes_dtypes_and_options(device):
    f = lambda *v: torch.tensor(v if len(v) > 1 else v[0], device=device)  # noqa: E731
    s, z = grid_params(f(-1.0), f(2.0), 2, "affine")
    assert s.shape == () and s.item() == 1.0 and z.item() == 1.0
    s, z = grid_params(f(-1.0, -2.5), f(2.0), 2, "affine")  # per-channel lower, per-tensor upper
    assert s.shape == (2,) and s.tolist() == [1.0, 1.5] and z.tolist() == [1.0, 2.0]
    s, z = grid_params(f(-1.0).reshape(1), f(2.0), 2, "affine")
    assert s.shape == (1,)
    s, _ = grid_params(f(-1.0).half(), f(2.0).double(), 2, "affine")
    assert s.dtype == torch.float32  # lower's dtype decides: float64 only for float64 lower
    # sort_bounds: crossed bounds are used swapped, as the kernels do
    crossed = grid_params(f(2.0, -1.0), f(-1.0, 2.0), 3, "symmetric", sort_bounds=True)
    assert torch.equal(crossed[0], grid_params(f(-1.0, -1.0), f(2.0, 2.0), 3, "symmetric")[0])
    # degenerate (upper <= lower; not sorted): scale 0 and zero point 0; NaN bound: NaN
    for grid in GRIDS:
        s, z = grid_params(f(0.5, 0.5, float("nan"), -1.0), f(0.5, -1.0, 1.0, float("nan")), 4, grid)
        assert s[:2].tolist() == [0.0, 0.0] and z[:2].tolist() == [0.0, 0.0]
        assert torch.isnan(s[2:]).all() and torch.isnan(z[2:]).all()


def test_grid_params_are_the_kernels_grid(device):
    # Per channel, including bounds whose u - l overflows and a degenerate channel:
    # the levels of the forward are exactly (k - z)*scale.
    lower = torch.tensor([-1.0, 0.25, -0.3, -2e38, 0.7], device=device)
    upper = torch.tensor([1.0, 1.0, 0.05, 2e38, 0.7], device=device)
    for grid in PINNED:
        scale, zp = grid_params(lower, upper, 4, grid)
        assert torch.isfinite(scale).all() and (zp == torch.round(zp)).all()
        ks = torch.arange(-20, 20, dtype=torch.float32, device=device) + 0.3
        x = ks * scale[:, None]
        y = uniform_quantize(x, lower, upper, 4, grid=grid)
        ok = scale > 0
        want = onnx_qdq(x[ok].cpu(), scale[ok].cpu(), zp[ok].cpu(), 4, grid)
        assert torch.equal(y[ok].cpu(), want)
        assert (y[~ok] == lower[~ok, None]).all()  # degenerate: y = lower on every grid


def test_grid_params_opcheck(device):
    lower = torch.tensor([-1.0, 0.5, -0.2], device=device)
    upper = torch.tensor([1.0, 0.1, 3.0], device=device)
    for grid in GRIDS:
        torch.library.opcheck(ops.grid_params.default, (lower, upper, 4, grid))
        torch.library.opcheck(ops.grid_params.default, (lower, upper[0], 3, grid, True))
        torch.library.opcheck(ops.grid_params.default, (lower.double(), upper, 2, grid))


# ---------------------------------------------------------------------------
# Every grid: options, degenerate and NaN bounds, overflow, dtypes, opcheck


@pytest.mark.parametrize("grid", PINNED)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("layout", ["per_tensor", "per_channel", "mixed"])
def test_grid_sort_bounds_and_grad_scale(device, mode, grid, layout):
    x, lower, upper, a = make_grid_case((5, 3, 40), 3, layout != "per_tensor", torch.float32, device, grid)
    if layout == "per_tensor":
        lower, upper = upper, lower
    else:
        crossed = torch.tensor([False, True, False, True, False], device=device)
        lower, upper = torch.where(crossed, upper, lower), torch.where(crossed, lower, upper)
        if layout == "mixed":
            lower = torch.tensor(-0.1, device=device)
    g = torch.randn_like(x)
    got = options_grads(mode, x, lower, upper, a, 3, g, sort_bounds=True, grid=grid, grad_scale=0.5)
    leaves = [t.detach().clone().requires_grad_() for t in (x, lower, upper, a)]
    lo, hi = torch.minimum(leaves[1], leaves[2]), torch.maximum(leaves[1], leaves[2])
    y = quantize(mode, leaves[0], lo, hi, leaves[3], 3, grid=grid)
    want = (y.detach(), *torch.autograd.grad(y, leaves if mode == "dsq" else leaves[:3], g))
    for i, (name, w, t) in enumerate(zip(("y", "x", "lower", "upper", "alpha"), want, got)):
        w = w * 0.5 if i >= 2 else w
        tol = 2e-6 if layout == "mixed" and w.numel() == 1 and i >= 2 else 0
        torch.testing.assert_close(t, w, atol=0, rtol=tol, msg=name)


@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("upper_value", [0.3, -1.0, 0.3 + 1e-40])
def test_degenerate_bounds_on_every_grid(device, mode, grid, upper_value):
    # u <= l (or a Delta that underflows): y = l, dy/dx = 0, x <= l feeds lower, x > l upper.
    x = torch.linspace(-1, 1, 41, device=device)
    lower, upper = torch.tensor(0.3, device=device), torch.tensor(upper_value, device=device)
    a = torch.tensor(0.2, device=device)
    y, gx, gl, gu, ga = kernel_grads(mode, x, lower, upper, a, 4, torch.ones_like(x), grid=grid)
    assert (y == 0.3).all() and (gx == 0).all() and (ga == 0).all()
    assert gl.item() == (x <= 0.3).sum().item() and gu.item() == (x > 0.3).sum().item()


@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("which", ["lower", "upper"])
@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("value", ["nan", "inf"])
def test_nan_bound_propagates(device, mode, grid, which, per_channel, value):
    # A NaN (or infinite) bound makes y and every gradient NaN (in its channel), so
    # GradScaler and anomaly detection see it.
    x, lower, upper, a = make_case((3, 20), 4, per_channel, torch.float32, device)
    target = lower if which == "lower" else upper
    target.view(-1)[-1] = float(value) * (-1 if which == "lower" else 1)
    g = torch.randn_like(x)
    y, gx, gl, gu, ga = kernel_grads(mode, x, lower, upper, a, 4, g, grid=grid)
    rows = slice(2, 3) if per_channel else slice(None)
    assert torch.isnan(y[rows]).all() and torch.isnan(gx[rows]).all()
    assert torch.isnan(gl.view(-1)[-1]) and torch.isnan(gu.view(-1)[-1])
    if mode == "dsq":
        assert torch.isnan(ga.view(-1)[-1])
    if per_channel:  # the other channels are untouched
        clean = kernel_grads(mode, x[:2], lower[:2], upper[:2], a[:2], 4, g[:2], grid=grid)
        for t, c in zip((y, gx), clean[:2]):
            assert torch.equal(t[:2], c)
        assert torch.equal(gl[:2], clean[2]) and torch.equal(gu[:2], clean[3])


@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype, big", [(torch.float32, 2e38), (torch.float64, 1e308)])
@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_overflowing_range(device, mode, grid, dtype, big, bits):
    # u - l overflows the compute type: the op is computed on x, l and u halved (exact)
    # and y doubled, i.e. exactly what it gives on the halved inputs, times 2.
    if grid == "symmetric" and bits == 1:
        pytest.skip("the symmetric grid needs bits >= 2")
    x = torch.cat([torch.linspace(-1.2, 1.2, 201, dtype=torch.float64), torch.tensor([0.0, 1e-3])])
    x = (x * big).to(dtype=dtype, device=device)
    lower, upper = (
        torch.tensor(-big, dtype=dtype, device=device),
        torch.tensor(big, dtype=dtype, device=device),
    )
    a = torch.tensor(0.3, dtype=dtype, device=device)
    g = torch.randn_like(x)
    got = kernel_grads(mode, x, lower, upper, a, bits, g, grid=grid)
    half = kernel_grads(mode, x / 2, lower / 2, upper / 2, a, bits, g, grid=grid)
    assert torch.equal(got[0], half[0] * 2)
    # dy/dx, dy/dl, dy/du do not depend on the scale (dy/dalpha is proportional to Delta,
    # ~1e37 per element here: its sum may overflow). The halved path is a plain loop: its
    # sums may be added in another order than the vectorised one's.
    rtol = 1e-6 if dtype == torch.float32 else 1e-13
    for t, h in zip(got[1:4], half[1:4]):
        assert torch.isfinite(t).all()
        torch.testing.assert_close(t, h, rtol=rtol, atol=rtol * g.abs().sum().item())
    # Finite, except on the 1-bit affine grid: z = 0, and its other level, Delta = u - l,
    # is beyond the float range (y = inf there, as the exact value rounds).
    assert torch.isfinite(got[0]).all() or (bits == 1 and grid == "affine")
    scale, _ = grid_params(lower, upper, bits, grid)
    assert torch.equal(scale, grid_params(lower / 2, upper / 2, bits, grid)[0] * 2)


@pytest.mark.parametrize("grid", PINNED)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mode", MODES)
def test_grid_reduced_precision_is_float32_rounded(device, dtype, mode, grid):
    x, lower, upper, a = make_grid_case((8, 3, 33), 4, True, torch.float32, device, grid)
    x = x.to(dtype)
    g = torch.randn_like(x)
    got = kernel_grads(mode, x, lower, upper, a, 4, g, grid=grid)
    ref = kernel_grads(mode, x.float(), lower, upper, a, 4, g.float(), grid=grid)
    assert got[0].dtype == dtype and torch.equal(got[0], ref[0].to(dtype))
    assert torch.equal(got[1], ref[1].to(dtype))
    for t, r in zip(got[2:], ref[2:]):
        torch.testing.assert_close(t, r, atol=1e-4 * g.abs().sum().item(), rtol=0)


@pytest.mark.parametrize("grid", PINNED)
def test_grid_opcheck(device, grid):
    for x, lower, upper, a in opcheck_cases(device):
        torch.library.opcheck(ops.dsq_quantize.default, (x, lower, upper, a, 4, 1.0, False, grid))
        torch.library.opcheck(ops.uniform_quantize.default, (x, upper, lower, 3, 0.5, True, grid))
        g = torch.randn_like(x)
        d = [t.detach() for t in (x, lower, upper, a)]
        torch.library.opcheck(ops.dsq_quantize_backward.default, (g, *d, 2, 0.5, True, grid))
        torch.library.opcheck(ops.uniform_quantize_backward.default, (g, *d[:3], 4, 1.0, False, grid))


@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("mode", MODES)
def test_grid_under_torch_compile(mode, grid):
    x, lower, upper, a = make_grid_case((4, 50), 4, True, torch.float32, "cpu", "affine")

    def f(x, lower, upper, a):
        return quantize(mode, x, lower, upper, a, 4, grid=grid, sort_bounds=True).sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    leaves = [t.clone().requires_grad_() for t in (x, lower, upper, a)]
    eager = [t.clone().requires_grad_() for t in (x, lower, upper, a)]
    compiled(*leaves).backward()
    f(*eager).backward()
    for t, e in zip(leaves, eager):
        if e.grad is not None:
            assert torch.equal(t.grad, e.grad)


# ---------------------------------------------------------------------------
# Double backward, plain-number bounds, bad grid input


@pytest.mark.parametrize("mode", MODES)
def test_double_backward_raises_clearly(mode):
    x, lower, upper, a = (t.requires_grad_() for t in make_case((3, 10), 4, False, torch.float64, "cpu"))
    y = quantize(mode, x, lower, upper, a, 4)
    # create_graph=True and first-order gradients: fine, the same values as without it
    first = torch.autograd.grad(y.sum(), (x, lower), create_graph=True)
    plain = torch.autograd.grad(quantize(mode, x, lower, upper, a, 4).sum(), (x, lower))
    for f, p in zip(first, plain):
        assert torch.equal(f.detach(), p)
    with pytest.raises(RuntimeError, match="double backward of dsq_ext ops is not supported"):
        first[0].sum().backward()


@pytest.mark.parametrize("mode", MODES)
def test_plain_number_bounds_take_x_compute_type(mode):
    # float64 x: float64 bounds (a float32 -1.1 would move the grid by ~2e-8)
    x = torch.linspace(-1.3, 1.3, 4001, dtype=torch.float64)
    y = quantize(mode, x, -1.1, 1.3, 0.2, 8)
    as64 = quantize(mode, x, *(torch.tensor(v, dtype=torch.float64) for v in (-1.1, 1.3, 0.2)), 8)
    as32 = quantize(mode, x, *(torch.tensor(v) for v in (-1.1, 1.3, 0.2)), 8)
    assert torch.equal(y, as64) and not torch.equal(y, as32)
    # float32, float16, bfloat16 x: float32, their kernels' compute type
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        xs = x.to(dtype)
        assert torch.equal(
            quantize(mode, xs, -1.1, 1.3, 0.2, 8),
            quantize(mode, xs, *(torch.tensor(v) for v in (-1.1, 1.3, 0.2)), 8),
        )


@pytest.mark.parametrize(
    "options, error, match",
    [
        (dict(grid="integer"), ValueError, r"grid must be 'free', 'affine' or 'symmetric', got 'integer'"),
        (dict(grid="Affine"), ValueError, r"grid must be .* got 'Affine'"),
        (dict(grid=None), ValueError, r"grid must be .* got None"),
        (dict(grid="symmetric", bits=1), ValueError, r"grid 'symmetric' needs bits >= 2 .*got bits=1"),
    ],
)
@pytest.mark.parametrize("mode", MODES)
def test_bad_grid(mode, options, error, match):
    x, lower, upper, a = good_args()
    options = dict(options)
    bits = options.pop("bits", 4)
    with pytest.raises(error, match=match):
        quantize(mode, x, lower, upper, a, bits, **options)


def test_bad_grid_raw_ops_and_fake_kernels():
    # The C++ checks and the fake kernels give the same messages.
    x, lower, upper, a = good_args()
    for dev in ("cpu", "meta"):
        args = [t.to(dev) for t in (x, lower, upper, a)]
        with pytest.raises(
            RuntimeError, match=r"^dsq_quantize: grid must be 'free', 'affine' or 'symmetric', got 'foo'"
        ):
            ops.dsq_quantize(*args, 4, 1.0, False, "foo")
        with pytest.raises(
            RuntimeError, match=r"^uniform_quantize: grid 'symmetric' needs bits >= 2 .* got bits=1"
        ):
            ops.uniform_quantize(*args[:3], 1, 1.0, False, "symmetric")
        g = torch.ones(4, 3, device=dev)
        with pytest.raises(RuntimeError, match=r"^dsq_quantize_backward: grid 'symmetric' needs bits >= 2"):
            ops.dsq_quantize_backward(g, *args, 1, 1.0, False, "symmetric")
        with pytest.raises(RuntimeError, match=r"^uniform_quantize_backward: grid must be .* got ''"):
            ops.uniform_quantize_backward(g, *args[:3], 4, 1.0, False, "")
        lo, up = args[1], args[2]
        for gp_args, match in (
            ((lo, up, 4, "nope"), r"grid must be .* got 'nope'"),
            ((lo, up, 1, "symmetric"), r"grid 'symmetric' needs bits >= 2"),
            ((lo, up, 0, "free"), r"bits must be in 1..8, got 0"),
            ((lo.long(), up, 4, "free"), r"lower must be a float32.* got Long"),
            (
                (lo, torch.ones(2, 2, device=dev), 4, "free"),
                r"upper must have one element \(per tensor\) or be 1-D \(per channel\); got shape \[2, 2\]",
            ),
            (
                (torch.zeros(3, device=dev), torch.ones(2, device=dev), 4, "free"),
                r"lower and upper must have the same number of channels; got shapes \[3\] and \[2\]",
            ),
        ):
            with pytest.raises(RuntimeError, match="^grid_params: " + match):
                ops.grid_params(*gp_args)
    with pytest.raises(RuntimeError, match=r"grid_params: upper is on meta but lower is on cpu"):
        ops.grid_params(lower, upper.to("meta"), 4, "free")


def test_grid_params_wrapper_checks():
    with pytest.raises(ValueError, match=r"grid must be 'free', 'affine' or 'symmetric', got 'x'"):
        grid_params(torch.tensor(-1.0), torch.tensor(1.0), 4, "x")
    with pytest.raises(ValueError, match=r"bits must be in 1..8, got 9"):
        grid_params(torch.tensor(-1.0), torch.tensor(1.0), 9, "affine")
    with pytest.raises(TypeError, match=r"sort_bounds must be a bool, got 1"):
        grid_params(torch.tensor(-1.0), torch.tensor(1.0), 4, "affine", sort_bounds=1)
