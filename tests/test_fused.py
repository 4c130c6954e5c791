"""The layers' recompute path (dsq_ext/fused.py) against the unfused one, bit for bit.

recompute=False is the three-node path (quantizer ops, then F.conv2d / F.linear),
itself checked against the ops in test_layers.py; recompute=True must give the same
output and the same gradients of the input, weight, bias, bounds and alpha, to the
last bit, while keeping only the float input and weight for backward.
"""

import copy

import pytest
import torch
import torch.nn.functional as F
import torchvision
from reference import composite, grid_composite
from torch import nn

import dsq_ext
from dsq_ext import DSQConv2d, DSQLinear

METHODS = ["dsq", "uniform"]


def step(layer, x, seed, autocast=False):
    """Output, gradients and quantizer state after one forward/backward with a fixed upstream gradient."""
    x = x.detach().clone().requires_grad_(x.requires_grad)
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=autocast):
        y = layer(x)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed)).to(y.device, y.dtype)
    y.backward(g)
    out = {"y": y.detach(), "x.grad": x.grad}
    step.last_node = type(y.grad_fn).__name__
    layer = getattr(layer, "_orig_mod", layer)  # torch.compile's wrapper prefixes the names
    for n, p in layer.named_parameters():
        out[n + ".grad"] = p.grad
        p.grad = None
    out.update((n, b.clone()) for n, b in layer.named_buffers())
    out.update((n, p.detach().clone()) for n, p in layer.named_parameters())
    return out


def assert_same(make, x, steps=2, autocast=False, layout=None, fused_node=True):
    """recompute=True and recompute=False layers from the same state: equal bits, step after step."""
    torch.manual_seed(0)
    keep = make(recompute=False)
    fused = copy.deepcopy(keep)
    fused.recompute = True
    if layout is not None:
        keep, fused = keep.to(memory_format=layout), fused.to(memory_format=layout)
    for s in range(steps):  # the first step sets the bounds
        a, b = step(keep, x, s, autocast), step(fused, x, s, autocast)
        assert (step.last_node == "_QuantizedProductBackward") == fused_node, step.last_node
        assert a.keys() == b.keys()
        for k in a:
            if a[k] is None or b[k] is None:
                assert a[k] is None and b[k] is None, k
                continue
            assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
            assert torch.equal(a[k], b[k]), f"step {s}: {k} differs by {(a[k] - b[k]).abs().max()}"
    return keep, fused


def conv(**kw):
    return lambda **more: DSQConv2d(8, 16, 3, padding=1, **kw, **more)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_conv_gradients_bitwise_equal(device, method, per_channel, bias):
    x = torch.randn(4, 8, 10, 10, device=device).relu().requires_grad_()
    make = conv(bias=bias, method=method, per_channel=per_channel, device=device)
    keep, fused = assert_same(make, x)
    # what was compared includes every gradient the layer has
    names = {"x.grad", "weight.grad", "act_quantizer.lower.grad", "weight_quantizer.upper.grad"}
    names |= {"bias.grad"} if bias else set()
    names |= {"act_quantizer.alpha.grad"} if method == "dsq" else set()
    got = step(fused, x, 0)
    assert names <= {k for k, v in got.items() if v is not None}


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize(
    "shape, perm",
    [((7, 12), None), ((12, 7), (1, 0)), ((3, 5, 12), None), ((5, 3, 12), (1, 0, 2)), ((2, 3, 4, 12), None)]
    + [((12,), None)],
    ids=["2d", "2d-column-major", "3d", "3d-permuted", "4d", "1d"],
)
def test_linear_gradients_bitwise_equal(device, method, per_channel, bias, shape, perm):
    # F.linear takes addmm, or matmul and an add, by input layout; both are followed.
    x = torch.randn(*shape, device=device)
    x = (x.permute(*perm) if perm else x).requires_grad_()
    make = lambda **kw: DSQLinear(
        12, 5, bias=bias, method=method, per_channel=per_channel, device=device, **kw
    )
    assert_same(make, x)


@pytest.mark.parametrize("per_channel", [False, True])
def test_linear_column_major_weight_bitwise_equal(per_channel):
    # A transposed weight takes mm's other branch for the weight's gradient.
    def make(**kw):
        layer = DSQLinear(12, 5, per_channel=per_channel, **kw)
        layer.weight = nn.Parameter(torch.randn(12, 5).t())
        return layer

    assert_same(make, torch.randn(7, 12, requires_grad=True))


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize(
    "kw",
    [
        dict(groups=2, dilation=2, padding=2),
        dict(groups=8, stride=2),  # depthwise
        dict(stride=(2, 1), padding=(0, 1), bias=True),
    ],
    ids=["grouped-dilated", "depthwise", "strided"],
)
def test_conv_variants_bitwise_equal(method, kw):
    out = 8 if kw.get("groups") == 8 else 16
    make = lambda **more: DSQConv2d(
        8, out, 3, method=method, per_channel=True, **{"padding": 1, **kw}, **more
    )
    assert_same(make, torch.randn(3, 8, 9, 11).relu().requires_grad_())


@pytest.mark.parametrize("method", METHODS)
def test_channels_last_bitwise_equal(method):
    x = torch.randn(4, 8, 10, 10).relu().to(memory_format=torch.channels_last).requires_grad_()
    assert_same(conv(method=method, bias=True), x, layout=torch.channels_last)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("per_channel", [False, True])
def test_autocast_bfloat16_bitwise_equal(method, per_channel):
    # The quantizers run in the input's dtype, the product in bfloat16; gradients come back in float32.
    x = torch.randn(4, 8, 10, 10).relu().requires_grad_()
    _, fused = assert_same(conv(method=method, per_channel=per_channel, bias=True), x, autocast=True)
    got = step(fused, x, 0, autocast=True)
    assert got["y"].dtype == torch.bfloat16 and got["weight.grad"].dtype == torch.float32
    make = lambda **kw: DSQLinear(12, 5, method=method, per_channel=per_channel, **kw)
    assert_same(make, torch.randn(2, 7, 12, requires_grad=True), autocast=True)
    # a bfloat16 input (the output of an earlier autocast layer) is quantized in bfloat16
    assert_same(conv(method=method), x.detach().bfloat16().requires_grad_(), autocast=True)


def test_float64_bitwise_equal_and_autocast_leaves_it():
    make = lambda **kw: DSQConv2d(8, 16, 3, padding=1, dtype=torch.float64, **kw)
    x = torch.randn(2, 8, 6, 6, dtype=torch.float64, requires_grad=True)
    assert_same(make, x)
    assert_same(make, x, autocast=True)


@pytest.mark.parametrize(
    "kw",
    [
        dict(w_bits=None),
        dict(a_bits=None),
        dict(bounds="ema"),
        dict(grad_scale=False),
        dict(act_percentile=99),
        dict(grid="affine"),
        dict(grid="symmetric", per_channel=True),
        dict(grid="symmetric", method="uniform", w_bits=2, a_bits=2),
    ],
    ids=[
        "float-weight",
        "float-input",
        "ema",
        "raw-grads",
        "percentile",
        "affine",
        "symmetric",
        "symmetric-2bit",
    ],
)
def test_layer_options_bitwise_equal(kw):
    assert_same(conv(**kw), torch.randn(2, 8, 6, 6).relu().requires_grad_(), steps=3)


def test_frozen_parts_bitwise_equal():
    # An input without grad, a frozen bias and frozen weight bounds: only what is asked is computed.
    def make(**kw):
        layer = DSQConv2d(8, 16, 3, padding=1, per_channel=True, **kw)
        layer.bias.requires_grad_(False)
        layer.weight_quantizer.lower.requires_grad_(False)
        return layer

    keep, fused = assert_same(make, torch.randn(2, 8, 6, 6))
    assert step(fused, torch.randn(2, 8, 6, 6), 0)["bias.grad"] is None


def test_fallbacks_are_the_unfused_path():
    # Non-zero padding modes, string padding and unbatched inputs take the three-node path.
    x = torch.randn(3, 8, 6, 6).relu().requires_grad_()
    reflect = lambda **kw: DSQConv2d(8, 16, 3, padding=1, padding_mode="reflect", **kw)
    same = lambda **kw: DSQConv2d(8, 16, 3, padding="same", **kw)
    for make in (reflect, same):
        assert_same(make, x, fused_node=False)
    assert_same(conv(), x[0].detach().requires_grad_(), fused_node=False)


def saved_storages(fn):
    """(data_ptr, nbytes) of every storage autograd saves while fn runs."""
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, seen


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("kind", ["conv", "linear"])
def test_saves_only_the_float_input_weight_and_parameters(method, kind):
    if kind == "conv":
        layer = DSQConv2d(8, 16, 3, padding=1, method=method, per_channel=True)
        x = torch.randn(4, 8, 10, 10).relu().requires_grad_()
    else:
        layer = DSQLinear(12, 5, method=method, per_channel=True)
        x = torch.randn(6, 12, requires_grad=True)
    layer(x)  # sets the bounds
    y, saved = saved_storages(lambda: layer(x))
    y.sum().backward()
    allowed = [x, layer.weight] + [
        p for q in (layer.act_quantizer, layer.weight_quantizer) for p in q.parameters()
    ]
    assert set(saved) == {t.untyped_storage().data_ptr() for t in allowed}
    layer.recompute = False
    _, unfused = saved_storages(lambda: layer(x))
    # the unfused path also keeps the quantized input and weight
    assert sum(unfused.values()) - sum(saved.values()) == x.numel() * 4 + layer.weight.numel() * 4


def test_resnet18_saves_what_the_float_model_saves():
    torch.manual_seed(0)
    base = torchvision.models.resnet18(num_classes=10)
    x, target = torch.randn(2, 3, 32, 32), torch.randint(0, 10, (2,))
    totals = {}
    for name, recompute in (("float", None), ("fused", True), ("keep", False)):
        model = copy.deepcopy(base)
        if recompute is not None:
            dsq_ext.quantize_model(model, "dsq", 4, 4, recompute=recompute)
        F.cross_entropy(model(x), target).backward()  # sets the bounds
        loss, saved = saved_storages(lambda: F.cross_entropy(model(x), target))  # noqa: B023
        loss.backward()
        totals[name] = sum(saved.values())
    params = 19 * (3 + 3) * 4  # 19 layers x two quantizers x (lower, upper, alpha), float32 scalars
    assert totals["fused"] == totals["float"] + params
    assert totals["keep"] > 1.5 * totals["float"]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("kind", ["conv", "linear"])
@pytest.mark.parametrize("grid", ["free", "affine", "symmetric"])
def test_matches_a_float64_reference(method, kind, grid):
    # The layer in float64 against the reference quantizer and the float product, by autograd.
    torch.manual_seed(0)
    kw = dict(method=method, per_channel=True, grad_scale=False, dtype=torch.float64, grid=grid)
    if kind == "conv":
        layer = DSQConv2d(4, 6, 3, padding=1, groups=2, **kw)
        x = torch.rand(2, 4, 5, 5, dtype=torch.float64, requires_grad=True)
        product = lambda xq, wq: F.conv2d(xq, wq, layer.bias, 1, 1, 1, 2)
    else:
        layer = DSQLinear(7, 3, **kw)
        x = torch.rand(5, 7, dtype=torch.float64, requires_grad=True)
        product = lambda xq, wq: F.linear(xq, wq, layer.bias)
    assert layer.recompute
    y = layer(x)  # bounds from this batch
    g = torch.randn_like(y)
    params = [x, layer.weight, layer.bias] + [
        p for q in (layer.act_quantizer, layer.weight_quantizer) for p in (q.lower, q.upper, q.alpha)
    ]
    params = [p for p in params if p is not None]
    got = torch.autograd.grad(y, params, g)
    aq, wq = layer.act_quantizer, layer.weight_quantizer

    def ref(t, q):
        if q.grid == "free":
            return composite(t, q.lower, q.upper, q.alpha, 4, method)
        return grid_composite(t, q.lower, q.upper, q.alpha, 4, method, q.grid)

    ref_y = product(ref(x, aq), ref(layer.weight, wq))
    want = torch.autograd.grad(ref_y, params, g, allow_unused=True)
    torch.testing.assert_close(y, ref_y, rtol=1e-12, atol=1e-12)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b if b is not None else torch.zeros_like(a), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("kind", ["conv", "linear"])
def test_compile_fullgraph_bitwise_equal(kind):
    torch.manual_seed(0)
    if kind == "conv":
        keep = DSQConv2d(8, 16, 3, padding=1, per_channel=True, bias=True, recompute=False)
        x = torch.randn(2, 8, 7, 7, requires_grad=True)
    else:
        keep = DSQLinear(12, 5, method="uniform", recompute=False)
        x = torch.randn(3, 4, 12, requires_grad=True)
    keep(x)  # bounds are initialised eagerly on the first training step
    fused = copy.deepcopy(keep)
    fused.recompute = True
    compiled = torch.compile(fused, fullgraph=True, backend="aot_eager")
    for autocast in (False, True):
        a, b = step(keep, x, 0, autocast), step(compiled, x, 0, autocast)
        for k in a:
            assert (a[k] is None and b[k] is None) or torch.equal(a[k], b[k]), (autocast, k)


def test_compile_inductor_matches_eager():
    layer = DSQConv2d(8, 16, 3, padding=1, per_channel=True)
    x = torch.randn(2, 8, 7, 7, requires_grad=True)
    layer(x)
    ref = copy.deepcopy(layer)
    compiled = torch.compile(layer, fullgraph=True)
    a, b = step(ref, x, 0), step(compiled, x, 0)
    for k in a:
        torch.testing.assert_close(a[k], b[k], msg=k)


def test_recompute_option():
    with pytest.raises(TypeError, match="recompute must be a bool, got 'yes'"):
        DSQConv2d(2, 2, 1, recompute="yes")
    assert DSQLinear(2, 2).recompute and "recompute=False" in repr(DSQLinear(2, 2, recompute=False))
    model = dsq_ext.quantize_model(torchvision.models.resnet18(num_classes=10), "dsq", 4, 4, recompute=False)
    assert {m.recompute for _, m in dsq_ext.quantized_modules(model)} == {False}
    assert isinstance(DSQConv2d.from_float(nn.Conv2d(2, 2, 1), recompute=False).recompute, bool)
