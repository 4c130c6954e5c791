"""Small, obviously correct float64 references for the dsq_ext ops, from DSQ_MATH.md.

Two independent ones:
- `composite`: Algorithm 1 of the paper as plain PyTorch ops with a
  straight-through sign, differentiated by autograd;
- `closed_form`: the per-element gradient table of DSQ_MATH.md, reduced.
The tests check the kernels against both, and the two against each other.
"""

import torch

ALPHA_MIN, ALPHA_MAX, K_MAX = 1e-3, 0.5, 1000.0


def _per_channel(p, x):
    # 1-element parameters broadcast; per-channel ones run along dim 0.
    p = p.to(torch.float64)
    if p.numel() == 1:
        return p.reshape(())
    return p.reshape((-1,) + (1,) * (x.dim() - 1))


def _alpha_eff(alpha, delta):
    # The clamp range counts as a constant (no gradient through it), as in the kernels.
    d = delta.detach()
    lo = torch.clamp(2.0 / (1.0 + torch.exp(K_MAX * d)), min=ALPHA_MIN).clamp(max=ALPHA_MAX)
    return torch.where(
        alpha < lo, lo, torch.where(alpha > ALPHA_MAX, torch.full_like(alpha, ALPHA_MAX), alpha)
    )


def composite(x, lower, upper, alpha, bits, mode="dsq"):
    """y of DSQ (or uniform-STE) as differentiable float64 torch ops; requires u > l."""
    x = x.to(torch.float64)
    l, u = _per_channel(lower, x), _per_channel(upper, x)
    n = 2**bits - 1
    delta = (u - l) / n
    xc = torch.where(x < l, l, torch.where(x > u, u, x))  # no tie-splitting at x == l or u
    v = (xc - l) / delta
    i = torch.clamp(torch.floor(v.detach()), max=n - 1)
    r = v - i - 0.5
    q_hard = i + (r.detach() >= 0).to(x.dtype)
    if mode == "uniform":
        q = q_hard + (v - v.detach())  # straight-through: dQ/dv = 1
    else:
        a = _alpha_eff(_per_channel(alpha, x), delta)
        s = 1.0 / (1.0 - a)
        L = torch.log(2.0 / a - 1.0)
        phi = s * torch.tanh(L * r)
        sgn = torch.where(r.detach() >= 0, 1.0, -1.0).to(x.dtype)
        q = i + ((phi + (sgn - phi).detach()) + 1.0) / 2.0  # sign with identity gradient
    return l + delta * q


def closed_form(x, lower, upper, alpha, bits, grad, mode="dsq"):
    """(y, grad_x, grad_lower, grad_upper, grad_alpha) from the DSQ_MATH.md table, in float64.

    Handles every case the kernels do, u <= l included.
    """
    x, g = x.to(torch.float64), grad.to(torch.float64)
    l, u = _per_channel(lower, x), _per_channel(upper, x)
    n = 2**bits - 1
    delta = (u - l) / n
    degenerate = ~(delta > 0)
    delta = torch.where(degenerate, torch.zeros_like(delta), delta)
    u = torch.where(degenerate, l, u)
    below, above = x < l, x > u
    inside = ~(below | above)
    xc = torch.where(below, l, torch.where(above, u, x))
    v = torch.where(degenerate, torch.zeros_like(xc), (xc - l) / torch.where(degenerate, 1.0, delta))
    v = torch.clamp(v, max=n)
    i = torch.clamp(torch.floor(v), max=n - 1)
    r = v - i - 0.5
    q = i + (r >= 0).to(x.dtype)
    y = l + delta * q
    if mode == "uniform":
        d = torch.where(degenerate, 0.0, 1.0).to(x.dtype) + (r - r)  # NaN x: NaN gradient
        da = torch.zeros_like(x)
    else:
        al = _per_channel(alpha, x)
        a = _alpha_eff(al, delta)
        live = (al == a).to(x.dtype)
        s = 1.0 / (1.0 - a)
        L = torch.log(2.0 / a - 1.0)
        th = torch.tanh(L * r)
        sech2 = 1.0 - th * th
        d = torch.where(degenerate, 0.0, s * L / 2.0) * sech2
        da = live * delta * s / 2.0 * (s * th - 2.0 / (a * (2.0 - a)) * r * sech2)
    gin = torch.where(inside, g, 0.0)
    gx = gin * d
    gl = torch.where(below, g, 0.0) + gin * (1.0 - q / n - d * (1.0 - v / n))
    gu = torch.where(above, g, 0.0) + gin * (q / n - d * v / n)
    ga = gin * da
    return y, gx, _reduce(gl, lower), _reduce(gu, upper), _reduce(ga, alpha)


def _reduce(per_element, param):
    if param.numel() == 1:
        return per_element.sum().reshape(param.shape)
    return per_element.reshape(per_element.shape[0], -1).sum(1)


def interval_position(x, lower, upper, bits):
    """(v, r) of each element in float64, to keep random test points off rounding boundaries."""
    x = x.to(torch.float64)
    l, u = _per_channel(lower, x), _per_channel(upper, x)
    n = 2**bits - 1
    delta = (u - l) / n
    v = torch.clamp((torch.clamp(x, min=l, max=u) - l) / delta, max=n)
    i = torch.clamp(torch.floor(v), max=n - 1)
    return v, v - i - 0.5


def grid_of(lower, upper, bits, grid, x=None):
    """(delta, z, nlev) of the affine or symmetric grid in float64, z as a constant.

    affine: Delta = (u - l)/N, z = clamp(round_half_even(-l/Delta), 0, N), levels 0..N;
    symmetric: Delta = max(-l, u)/Qp, Qp = 2^(b-1) - 1, z = Qp, levels 0..2Qp (signed q - z).
    """
    l = lower.to(torch.float64) if x is None else _per_channel(lower, x)
    u = upper.to(torch.float64) if x is None else _per_channel(upper, x)
    if grid == "affine":
        nlev = 2**bits - 1
        delta = (u - l) / nlev
        z = torch.clamp(torch.round(-l / delta), 0, nlev).detach()
    elif grid == "symmetric":
        qp = 2 ** (bits - 1) - 1
        nlev = 2 * qp
        delta = torch.maximum(-l, u) / qp  # a tie splits the gradient, as torch.maximum does
        z = torch.full_like(delta, float(qp)).detach()
    else:
        raise ValueError(grid)
    return delta, z, nlev


def grid_composite(x, lower, upper, alpha, bits, mode="dsq", grid="affine"):
    """y on the affine or symmetric grid as differentiable float64 torch ops; requires u > l.

    The forward is QuantizeLinear -> clip -> DequantizeLinear: q = clamp(round_half_even(x/Delta)
    + z, 0, nlev), y = (q - z)*Delta. The gradient is the free grid's soft staircase (or
    straight-through) on v = x/Delta + z, with z held constant, differentiated by autograd.
    """
    x = x.to(torch.float64)
    delta, z, nlev = grid_of(lower, upper, bits, grid, x)
    t = x / delta
    q_hard = torch.clamp(torch.round(t.detach()) + z, 0, nlev)
    v = t + z
    # clipped to [0, nlev], both ends inside; no gradient outside, where y is a constant level
    v = torch.where((v >= 0) & (v <= nlev), v, torch.clamp(v.detach(), 0, nlev))
    if mode == "uniform":
        soft = v - v.detach()
    else:
        a = _alpha_eff(_per_channel(alpha, x), delta)
        s = 1.0 / (1.0 - a)
        L = torch.log(2.0 / a - 1.0)
        i = torch.clamp(torch.floor(v.detach()), max=nlev - 1)
        phi = s * torch.tanh(L * (v - i - 0.5))
        soft = (phi - phi.detach()) / 2.0
    return (q_hard + soft - z) * delta


def grid_position(x, lower, upper, bits, grid):
    """(v, r) on the affine or symmetric grid in float64, to keep test points off boundaries."""
    x = x.to(torch.float64)
    delta, z, nlev = grid_of(lower, upper, bits, grid, x)
    v = torch.clamp(x / delta + z, 0, nlev)
    i = torch.clamp(torch.floor(v), max=nlev - 1)
    return x / delta + z, v - i - 0.5
