"""The ops against the float64 references, their identities, edge cases and bad input."""

import itertools
import math

import pytest
import torch
from reference import closed_form, composite, interval_position

import dsq_ext
from dsq_ext import dsq_quantize, uniform_quantize

ops = torch.ops.dsq_ext
MODES = ("dsq", "uniform")
# (forward atol, per-element grad atol, reduction tolerance per unit of sum|g|)
TOL = {
    torch.float64: (1e-12, 1e-10, 1e-10),
    # float32 r = v - i - 1/2 carries ~v * 6e-8 of rounding (v <= 255) and the fast tanh 4e-7.
    torch.float32: (4e-6, 1e-3, 5e-4),
}


def quantize(mode, x, lower, upper, alpha, bits):
    if mode == "dsq":
        return dsq_quantize(x, lower, upper, alpha, bits)
    return uniform_quantize(x, lower, upper, bits)


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
    f32 = dict(dtype=torch.float32, device=device)
    return (
        x.to(dtype=dtype, device=device),
        lower.to(**f32),
        upper.to(**f32),
        torch.full(pshape if per_channel else (), alpha, **f32),
    )


def kernel_grads(mode, x, lower, upper, alpha, bits, g):
    leaves = [t.detach().clone().requires_grad_() for t in (x, lower, upper, alpha)]
    y = quantize(mode, *leaves, bits)
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


def per_element_grads(mode, x, lower, upper, alpha, bits):
    n = x.numel()
    rep = lambda t: t.expand(n).clone()  # noqa: E731
    return kernel_grads(mode, x, rep(lower), rep(upper), rep(alpha), bits, torch.ones_like(x))


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
