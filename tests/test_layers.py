"""DSQConv2d, DSQLinear, Quantizer and the model helpers."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import dsq_ext
from dsq_ext import DSQConv2d, DSQLinear, Quantizer, dsq_quantize, uniform_quantize


def conv(device="cpu", **kw):
    torch.manual_seed(0)
    return DSQConv2d(8, 16, 3, padding=1, device=device, **kw)


@pytest.mark.parametrize("method", ["dsq", "uniform"])
@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("recompute", [True, False])
def test_conv_equals_conv2d_of_quantized_weight_and_input(device, method, per_channel, recompute):
    layer = conv(device, method=method, per_channel=per_channel, recompute=recompute)
    x = torch.randn(4, 8, 10, 10, device=device).relu()
    y = layer(x)
    wq, aq = layer.weight_quantizer, layer.act_quantizer
    if method == "dsq":
        w = dsq_quantize(layer.weight, wq.lower, wq.upper, wq.alpha, 4, grid=wq.grid)
        xin = dsq_quantize(x, aq.lower, aq.upper, aq.alpha, 4, grid=aq.grid)
    else:
        w = uniform_quantize(layer.weight, wq.lower, wq.upper, 4, grid=wq.grid)
        xin = uniform_quantize(x, aq.lower, aq.upper, 4, grid=aq.grid)
    torch.testing.assert_close(y, F.conv2d(xin, w, layer.bias, padding=1), atol=0, rtol=0)
    # the weight really is on a 4-bit grid per (channel) range
    levels = torch.unique(w[0] if per_channel else w)
    assert len(levels) <= 16


@pytest.mark.parametrize("recompute", [True, False])
def test_linear_equals_linear_of_quantized(device, recompute):
    layer = DSQLinear(12, 5, device=device, w_bits=3, a_bits=2, recompute=recompute)
    x = torch.randn(7, 12, device=device)
    y = layer(x)
    wq, aq = layer.weight_quantizer, layer.act_quantizer
    w = dsq_quantize(layer.weight, wq.lower, wq.upper, wq.alpha, 3, grid=wq.grid)
    xin = dsq_quantize(x, aq.lower, aq.upper, aq.alpha, 2, grid=aq.grid)
    torch.testing.assert_close(y, F.linear(xin, w, layer.bias), atol=0, rtol=0)
    assert len(torch.unique(xin)) <= 4


def test_learned_bounds_initialised_once_from_first_training_batch():
    layer = conv(per_channel=True)
    x1 = torch.randn(4, 8, 6, 6)
    layer(x1)
    wq, aq = layer.weight_quantizer, layer.act_quantizer
    torch.testing.assert_close(wq.lower.detach(), layer.weight.detach().flatten(1).amin(1))
    torch.testing.assert_close(wq.upper.detach(), layer.weight.detach().flatten(1).amax(1))
    assert wq.lower.shape == (16,)
    torch.testing.assert_close(aq.lower.detach(), x1.min())
    torch.testing.assert_close(aq.upper.detach(), x1.max())
    assert bool(aq.initialized) and bool(wq.initialized)
    # a second batch with a different range does not re-initialise
    layer(10 * torch.randn(4, 8, 6, 6))
    torch.testing.assert_close(aq.upper.detach(), x1.max())


def test_eval_never_uses_batch_statistics():
    layer = conv().eval()
    with pytest.raises(RuntimeError, match="activation quantizer has no bounds yet"):
        layer(torch.randn(2, 8, 5, 5))
    # weights may still be initialised in eval (their range is not a batch statistic)
    layer.train()
    layer(torch.randn(2, 8, 5, 5))
    layer.eval()
    lo = layer.act_quantizer.lower.detach().clone()
    layer(100 * torch.randn(2, 8, 5, 5))
    assert torch.equal(layer.act_quantizer.lower.detach(), lo)


def test_ema_bounds():
    layer = conv(bounds="ema", momentum=0.5)
    aq = layer.act_quantizer
    assert "lower" not in dict(aq.named_parameters()) and "lower" in dict(aq.named_buffers())
    x1, x2 = torch.randn(2, 8, 5, 5), 3 * torch.randn(2, 8, 5, 5)
    layer(x1)
    torch.testing.assert_close(aq.upper, x1.max())
    layer(x2)
    torch.testing.assert_close(aq.upper, 0.5 * x1.max() + 0.5 * x2.max())
    before = aq.upper.clone()
    layer.eval()(5 * x2)
    assert torch.equal(aq.upper, before)
    # alpha is still learned with ema bounds
    assert [n for n, _ in aq.named_parameters()] == ["alpha"]


def test_state_dict_round_trip_does_not_reinitialise():
    src = conv(per_channel=True)
    opt = torch.optim.SGD(src.parameters(), lr=0.1)
    for _ in range(3):
        opt.zero_grad()
        src(torch.randn(2, 8, 6, 6)).square().mean().backward()
        opt.step()
    sd = src.state_dict()
    assert {"weight_quantizer.lower", "weight_quantizer.initialized", "act_quantizer.alpha"} <= set(sd)
    dst = conv(per_channel=True)
    dst.load_state_dict(sd)
    x = torch.randn(2, 8, 6, 6)
    torch.testing.assert_close(dst.eval()(x), src.eval()(x), atol=0, rtol=0)
    # training again (as after a resume) keeps the loaded bounds
    dst.train()(50 * torch.randn(2, 8, 6, 6))
    torch.testing.assert_close(dst.act_quantizer.upper, src.act_quantizer.upper)


def test_from_float_and_to_float():
    ref = nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2, bias=True)
    q = DSQConv2d.from_float(ref, w_bits=2, a_bits=None)
    assert q.act_quantizer is None and q.groups == 2 and q.stride == (2, 2)
    assert torch.equal(q.weight, ref.weight) and torch.equal(q.bias, ref.bias)
    back = q.to_float()
    assert type(back) is nn.Conv2d
    x = torch.randn(1, 4, 8, 8)
    torch.testing.assert_close(back(x), ref(x))
    lin = DSQLinear.from_float(nn.Linear(3, 2, bias=False), method="uniform")
    assert lin.bias is None and lin.weight_quantizer.alpha is None
    with pytest.raises(TypeError, match="expects Linear, got Conv2d"):
        DSQLinear.from_float(ref)


def test_constructor_validation():
    with pytest.raises(ValueError, match="method must be one of"):
        conv(method="lsq")
    with pytest.raises(ValueError, match="w_bits must be an int in 1..8 or None, got 9"):
        conv(w_bits=9)
    with pytest.raises(ValueError, match="bounds must be one of"):
        conv(bounds="minmax")
    with pytest.raises(ValueError, match=r"alpha_init must be in \(0, 0.5\], got 0.7"):
        conv(alpha_init=0.7)


def test_grad_scale_scales_quantizer_gradients_only():
    torch.manual_seed(1)
    x = torch.randn(2, 8, 6, 6)
    grads = {}
    for scale in (True, False):
        layer = conv(grad_scale=scale)
        layer(x).sum().backward()
        grads[scale] = {n: p.grad.clone() for n, p in layer.named_parameters()}
    n_act = x.numel()
    s = 1 / math.sqrt(n_act * 15)
    for name in ("act_quantizer.lower", "act_quantizer.upper", "act_quantizer.alpha"):
        torch.testing.assert_close(grads[True][name], grads[False][name] * s)
    torch.testing.assert_close(grads[True]["weight"], grads[False]["weight"])


def test_quantize_model_resnet18():
    model = dsq_ext.quantize_model(torchvision.models.resnet18(num_classes=10), "dsq", 4, 4)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 20
    assert sum(isinstance(m, DSQConv2d) for m in convs) == 19
    assert type(model.conv1) is nn.Conv2d and type(model.fc) is nn.Linear
    assert [n for n, _ in dsq_ext.quantized_modules(model)][:2] == ["layer1.0.conv1", "layer1.0.conv2"]
    out = model(torch.randn(2, 3, 32, 32))
    out.sum().backward()
    assert model.layer1[0].conv1.act_quantizer.alpha.grad is not None
    # everything quantized when asked
    full = dsq_ext.quantize_model(
        torchvision.models.resnet18(num_classes=10), "uniform", 2, 2, skip_first=False, skip_last=False
    )
    assert isinstance(full.conv1, DSQConv2d) and isinstance(full.fc, DSQLinear)


@pytest.mark.parametrize("recompute", [True, False])
def test_quantize_model_mobilenet_v2_depthwise(recompute):
    model = dsq_ext.quantize_model(
        torchvision.models.mobilenet_v2(num_classes=10), "dsq", 4, 4, per_channel=True, recompute=recompute
    )
    depthwise = [m for m in model.modules() if isinstance(m, DSQConv2d) and m.groups > 1]
    assert depthwise and all(m.groups == m.in_channels for m in depthwise)
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    assert all(m.weight.grad is not None for m in depthwise)


def test_param_groups_keep_quantizer_parameters_out_of_weight_decay():
    # Every scale 1: the two groups that checkpoints written before the scales hold.
    model = dsq_ext.quantize_model(torchvision.models.resnet18(num_classes=10), "dsq", 4, 4, alpha_lr_scale=1)
    q = dsq_ext.quantizer_parameters(model)
    assert len(q) == 19 * 2 * 3  # 19 layers x (weight, activation) x (lower, upper, alpha)
    groups = dsq_ext.param_groups(model, 1e-4)
    assert groups[1]["weight_decay"] == 0.0 and len(groups[1]["params"]) == len(q)
    n = sum(len(g["params"]) for g in groups)
    assert n == len(list(model.parameters()))


def test_param_groups_of_the_default_dsq_config_need_lr():
    model = dsq_ext.quantize_model(torchvision.models.resnet18(num_classes=10), "dsq", 4, 4)
    with pytest.raises(ValueError, match=r"pass lr=.*\(1, 1000\)"):
        dsq_ext.param_groups(model, 1e-4)
    groups = dsq_ext.param_groups(model, 1e-4, lr=0.1)
    assert [(len(g["params"]), g.get("lr"), g["weight_decay"]) for g in groups] == [
        (len(list(model.parameters())) - 19 * 2 * 3, None, 1e-4),
        (19 * 2 * 2, 0.1, 0.0),  # lower, upper
        (19 * 2, 100.0, 0.0),  # alpha
    ]
    # uniform quantizers have no alpha: two groups, no lr needed
    uniform = dsq_ext.quantize_model(torchvision.models.resnet18(num_classes=10), "uniform", 4, 4)
    assert len(dsq_ext.param_groups(uniform, 1e-4)) == 2


def test_param_groups_scale_alpha_and_bounds_learning_rates():
    torch.manual_seed(0)
    layer = DSQConv2d(4, 8, 3, w_bits=2, a_bits=2, alpha_lr_scale=0.0, bounds_lr_scale=10.0)
    groups = dsq_ext.param_groups(layer, 1e-4, lr=0.01)
    assert [(len(g["params"]), g.get("lr")) for g in groups] == [(2, None), (2, 0.0), (4, 0.1)]
    assert all(g["weight_decay"] == 0.0 for g in groups[1:])
    with pytest.raises(ValueError, match="pass lr="):
        dsq_ext.param_groups(layer, 1e-4)
    opt = torch.optim.SGD(groups, lr=0.01, momentum=0.9)
    x = torch.randn(4, 4, 6, 6)
    for _ in range(3):
        opt.zero_grad()
        layer(x).square().sum().backward()
        opt.step()
    # alpha_lr_scale 0 keeps alpha at its initial value; the bounds moved.
    for q in (layer.weight_quantizer, layer.act_quantizer):
        assert q.alpha.grad.abs().item() > 0 and torch.equal(q.alpha.detach(), torch.tensor(0.2))
    assert layer.act_quantizer.upper.grad.abs().item() > 0


def test_an_lr_scale_is_a_gradient_scale_under_sgd():
    # The same three steps with lr scale k, and with lr scale 1 and the gradients of
    # the quantizer parameters multiplied by k: the same parameters (to rounding).
    def run(scale_lr):
        torch.manual_seed(0)
        k = 100.0
        layer = DSQLinear(6, 5, w_bits=3, a_bits=3, alpha_lr_scale=k if scale_lr else 1)
        opt = torch.optim.SGD(dsq_ext.param_groups(layer, 0.0, lr=0.05), lr=0.05, momentum=0.9)
        x = torch.randn(16, 6)
        for _ in range(3):
            opt.zero_grad()
            layer(x).square().mean().backward()
            if not scale_lr:
                for q in (layer.weight_quantizer, layer.act_quantizer):
                    q.alpha.grad *= k
            opt.step()
        return torch.stack([layer.weight_quantizer.alpha, layer.act_quantizer.alpha]).detach()

    a, b = run(True), run(False)
    assert not torch.equal(a, torch.full_like(a, 0.2))
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_resnet18_lr_0p1_keeps_quantizer_parameters_finite():
    # The ImageNet example's lr 0.1 (momentum 0.9), alpha at 1000x that: with the
    # layers' gradient scaling and the projection, alpha, lower and upper stay
    # finite and alpha stays in its range.
    torch.manual_seed(0)
    model = dsq_ext.quantize_model(torchvision.models.resnet18(num_classes=10), "dsq", 2, 2)
    opt = torch.optim.SGD(dsq_ext.param_groups(model, 1e-4, lr=0.1), lr=0.1, momentum=0.9)
    opt.register_step_post_hook(lambda *_: dsq_ext.project_alpha_(model))
    x, target = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    for _ in range(8):
        opt.zero_grad()
        loss = F.cross_entropy(model(x), target)
        loss.backward()
        opt.step()
    assert math.isfinite(loss.item())
    for m in model.modules():
        if isinstance(m, Quantizer):
            for p in (m.lower, m.upper, m.alpha):
                assert torch.isfinite(p).all()
            assert dsq_ext.nn.ALPHA_MIN <= m.alpha.item() <= dsq_ext.nn.ALPHA_MAX


@pytest.mark.parametrize("recompute", [True, False])
@pytest.mark.parametrize("outside, projected", [(3.0, 0.5), (-2.0, 1e-3)])
def test_project_alpha_brings_a_clamped_alpha_back_to_life(recompute, outside, projected):
    # An alpha past the kernels' range gets zero gradient (it is clamped where it is
    # used); project_alpha_ moves the parameter onto the range's edge, where the same
    # forward value and input gradient hold and alpha has a gradient again.
    torch.manual_seed(0)
    layer = DSQConv2d(4, 8, 3, w_bits=2, a_bits=2, per_channel=True, recompute=recompute)
    x = torch.randn(2, 4, 6, 6, requires_grad=True)
    quantizers = (layer.weight_quantizer, layer.act_quantizer)

    def step():
        layer.zero_grad()
        x.grad = None
        y = layer(x)
        y.square().sum().backward()
        return y.detach(), x.grad.clone(), [q.alpha.grad.clone() for q in quantizers]

    with torch.no_grad():
        for q in quantizers:
            q.alpha.fill_(outside)
    y0, gx0, ga0 = step()
    assert all(g.item() == 0 for g in ga0)
    dsq_ext.project_alpha_(layer)
    for q in quantizers:
        assert q.alpha.item() == pytest.approx(projected) and q.alpha.requires_grad
    y1, gx1, ga1 = step()
    assert torch.equal(y0, y1) and torch.equal(gx0, gx1)
    assert all(g.item() != 0 for g in ga1)


def test_project_alpha_keeps_alphas_in_range_and_nan_visible():
    model = nn.Sequential(
        DSQLinear(4, 4, w_bits=2, a_bits=2), DSQLinear(4, 4, method="uniform", w_bits=2, a_bits=2)
    )
    alphas = [model[0].weight_quantizer.alpha, model[0].act_quantizer.alpha]
    with torch.no_grad():
        alphas[0].fill_(0.3)
        alphas[1].fill_(float("nan"))
    dsq_ext.project_alpha_(model)
    assert alphas[0].item() == pytest.approx(0.3) and math.isnan(alphas[1].item())
    assert model[1].weight_quantizer.alpha is None  # uniform quantizers have none


@pytest.mark.parametrize("recompute", [True, False])
def test_compile_fullgraph_forward_backward(recompute):
    layer = conv(per_channel=True, recompute=recompute)
    x = torch.randn(2, 8, 7, 7, requires_grad=True)
    layer(x)  # bounds are initialised eagerly on the first training step
    ref_layer = copy.deepcopy(layer)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    y = compiled(x)
    y.square().sum().backward()
    xr = x.detach().clone().requires_grad_()
    ref_layer(xr).square().sum().backward()
    torch.testing.assert_close(y, ref_layer(xr))
    torch.testing.assert_close(x.grad, xr.grad)
    for (n, p), (_, r) in zip(layer.named_parameters(), ref_layer.named_parameters()):
        torch.testing.assert_close(p.grad, r.grad, msg=n)


def test_compile_inductor_matches_eager():
    layer = conv(method="dsq")
    x = torch.randn(2, 8, 7, 7)
    layer(x)
    compiled = torch.compile(layer, fullgraph=True)
    torch.testing.assert_close(compiled(x), layer(x))


@pytest.mark.parametrize("recompute", [True, False])
def test_autocast_bfloat16_cpu(recompute):
    layer = conv(recompute=recompute)
    x = torch.randn(2, 8, 6, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    y.float().sum().backward()
    assert torch.isfinite(layer.act_quantizer.alpha.grad)


def test_to_device_and_dtype_keep_quantizer_state():
    layer = conv()
    layer(torch.randn(2, 8, 5, 5))
    moved = copy.deepcopy(layer).double()
    assert moved.act_quantizer._initialized
    y = moved.eval()(torch.randn(2, 8, 5, 5, dtype=torch.float64))
    assert y.dtype == torch.float64


def test_crossed_learned_bounds_swap_roles():
    layer = conv(per_channel=True)
    x = torch.randn(2, 8, 6, 6)
    layer(x)
    wq = layer.weight_quantizer
    with torch.no_grad():  # as if an optimizer step had pushed channel 0's upper below its lower
        wq.lower[0], wq.upper[0] = wq.upper[0].item(), wq.lower[0].item()
    w = layer.quantized_weight()
    lo, hi = torch.minimum(wq.lower, wq.upper), torch.maximum(wq.lower, wq.upper)
    want = dsq_quantize(layer.weight, lo, hi, wq.alpha, 4, grid=wq.grid)
    torch.testing.assert_close(w, want, atol=0, rtol=0)
    w.sum().backward()
    assert wq.lower.grad[0] != 0 and wq.upper.grad[0] != 0 and (layer.weight.grad[0] != 0).any()


def test_percentile_bounds():
    x = torch.randn(4, 8, 6, 6)
    q = Quantizer(2, is_activation=True, percentile=99.0)
    q(x)
    want = torch.quantile(x.flatten(), torch.tensor([0.01, 0.99]))
    torch.testing.assert_close(torch.stack([q.lower.detach(), q.upper.detach()]), want)
    assert "percentile=99" in repr(q)
    # Per channel (weights): one pair per row.
    w = torch.randn(16, 8, 3, 3)
    qw = Quantizer(4, channels=16, percentile=99.5)
    qw(w)
    torch.testing.assert_close(qw.upper.detach(), torch.quantile(w.flatten(1), 0.995, dim=1))
    torch.testing.assert_close(qw.lower.detach(), torch.quantile(w.flatten(1), 0.005, dim=1))
    # percentile=100 is min/max.
    q100 = Quantizer(2, is_activation=True, percentile=100)
    q100(x)
    assert q100.lower == x.min() and q100.upper == x.max()


def test_percentile_of_a_large_tensor_reads_a_strided_sample():
    # 8 * 2**18 = 2**21 elements, above the 2**20 read per row: every 2nd element is read.
    x = torch.rand(8, 4, 256, 256)
    q = Quantizer(4, is_activation=True, percentile=99.0)
    q(x)
    assert q.upper.item() == pytest.approx(torch.quantile(x.flatten()[::2], 0.99).item())
    assert q.upper.item() == pytest.approx(0.99, abs=2e-3)


@pytest.mark.parametrize("bad", [50, 100.5, "99", True])
def test_percentile_validation(bad):
    with pytest.raises(ValueError, match="percentile must be a number in \\(50, 100\\] or None"):
        Quantizer(2, is_activation=True, percentile=bad)


def test_layers_pass_act_percentile_to_the_activation_quantizer_only():
    layer = conv(act_percentile=99.9)
    assert layer.act_quantizer.percentile == 99.9 and layer.weight_quantizer.percentile is None
    model = dsq_ext.quantize_model(
        torchvision.models.resnet18(num_classes=10), "uniform", 2, 2, act_percentile=99.0
    )
    assert {m.act_quantizer.percentile for _, m in dsq_ext.quantized_modules(model)} == {99.0}


def test_data_parallel_replicas_refuse_to_set_bounds():
    layer = conv()
    layer.act_quantizer._is_replica = True  # what nn.parallel.replicate marks its copies with
    with pytest.raises(RuntimeError, match="use DistributedDataParallel"):
        layer(torch.randn(1, 8, 4, 4))
