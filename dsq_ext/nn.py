"""Quantized layers: DSQConv2d, DSQLinear, and the model-level helpers.

A layer is nn.Conv2d / nn.Linear plus two Quantizers: one for the weight
(per tensor or per output channel) and one for the input activation (per
tensor). forward quantizes both and calls F.conv2d / F.linear. The bias stays
float.

Gradient scaling. The ops return the exact gradients of lower, upper and
alpha, which are sums over every element of the quantized tensor (millions for
an activation). As in LSQ (Esser et al., ICLR 2020), the Quantizer multiplies
those gradients by 1 / sqrt(elements per channel * (2^b - 1)), so that a
learning rate that suits the weights (the ImageNet example's 0.1) also suits
the bounds. The values are unchanged; `grad_scale=False` turns this off. For
alpha that scale is too strong (alpha would not move in a fine-tune), so
param_groups gives it QuantConfig.alpha_lr_scale (1000) times the learning
rate, and project_alpha_ keeps it in the kernels' range after each step.

Grid. "affine" (the default) and "symmetric" put 0.0 on a level with an integer
zero point, so that integer runtimes (ONNX QuantizeLinear/DequantizeLinear) hold
the trained grid exactly; "free" puts the levels at lower + k*Delta for any real
lower, as the paper does (docs/DSQ_MATH.md). Through the keyword front door a
layer's `grid` applies to its weight; its activation
quantizer uses "affine" where the layer says "symmetric" (a symmetric grid would
spend half its levels on negative values that post-ReLU activations never take).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from . import _C, fused, ops
from .config import _UNSET, QuantConfig, resolve_layer_configs

__all__ = [
    "Quantizer",
    "DSQConv2d",
    "DSQLinear",
    "quantize_model",
    "quantizable_layers",
    "quantized_modules",
    "quantizer_parameters",
    "param_groups",
    "project_alpha_",
]

# The range the kernels clamp alpha into (csrc/dsq_math.h, DSQ_ALPHA_MIN / DSQ_ALPHA_MAX).
ALPHA_MIN, ALPHA_MAX = _C.ALPHA_MIN, _C.ALPHA_MAX

# Elements per row that Quantizer(percentile=...) reads to set bounds (see _percentile_range).
PERCENTILE_SAMPLE = 1 << 20


def _all_reduce_(t: Tensor, op) -> Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=op)
    return t


class Quantizer(nn.Module):
    """Fake-quantizes one tensor (DSQ or uniform-STE) as its QuantConfig says, and owns its bounds and alpha.

    Quantizer(config, channels=...) or, as a front door, Quantizer(bits, **QuantConfig fields)
    (channels=C then implies per_channel). Per-channel quantizers need `channels`.
    bounds="learned": lower/upper are nn.Parameters, set from the tensor's range
    on the first training forward (activations: the first batch's, all-reduced
    across ranks), then trained by backprop.
    bounds="ema": lower/upper are buffers, a moving average (momentum) of the
    range seen in training. Eval mode never looks at batch statistics.
    `initialized` (a buffer) records that the bounds were set, so eval, resume
    and load_state_dict never set them again.
    """

    def __init__(
        self,
        config: QuantConfig | int,
        *,
        channels: int | None = None,
        is_activation: bool = False,
        device=None,
        dtype=None,
        **fields,
    ):
        super().__init__()
        if isinstance(config, QuantConfig):
            if fields:
                raise TypeError(f"Quantizer(config) takes no config keywords, got {sorted(fields)}")
        else:
            fields.setdefault("per_channel", channels is not None)
            config = QuantConfig(bits=config, **fields)
        if config.per_channel and is_activation:
            raise ValueError("activations are quantized per tensor (per_channel=False)")
        if config.per_channel != (channels is not None):
            raise ValueError(
                f"a per-channel quantizer needs channels=C, and only it: per_channel={config.per_channel}, "
                f"channels={channels}"
            )
        self.config = config
        self.channels = channels
        self.is_activation = is_activation
        kw = {"device": device, "dtype": dtype if dtype is not None else torch.float32}
        shape = (channels,) if channels is not None else ()
        lower, upper = torch.zeros(shape, **kw), torch.ones(shape, **kw)
        if config.bounds == "learned":
            self.lower, self.upper = nn.Parameter(lower), nn.Parameter(upper)
        else:
            self.register_buffer("lower", lower)
            self.register_buffer("upper", upper)
        if config.method == "dsq":
            self.alpha = nn.Parameter(torch.full((), config.alpha_init, **kw))
        else:
            self.register_parameter("alpha", None)
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool, device=device))
        # Host-side mirror of `initialized`: reading the buffer every step would
        # synchronise a GPU and break torch.compile graphs.
        self._initialized = False

    # The config's fields, read-only, for brevity.
    bits = property(lambda self: self.config.bits)
    method = property(lambda self: self.config.method)
    bounds = property(lambda self: self.config.bounds)
    percentile = property(lambda self: self.config.percentile)
    grid = property(lambda self: self.config.grid)

    def extra_repr(self) -> str:
        per = f"per_channel({self.channels})" if self.channels is not None else "per_tensor"
        pct = f", percentile={self.percentile:g}" if self.percentile is not None else ""
        return f"{self.method}, bits={self.bits}, {per}, bounds={self.bounds}{pct}, grid={self.grid}"

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._initialized = bool(self.initialized)

    @torch.no_grad()
    def _batch_range(self, x: Tensor) -> tuple[Tensor, Tensor]:
        if self.percentile is not None:
            lo, hi = self._percentile_range(x.detach())
        elif self.channels is not None:
            flat = x.detach().reshape(x.shape[0], -1)
            lo, hi = flat.amin(1), flat.amax(1)
        else:
            lo, hi = torch.aminmax(x.detach())
        lo, hi = lo.to(self.lower.dtype), hi.to(self.lower.dtype)
        if self.is_activation:
            # Every rank must start from, and track, the same bounds.
            _all_reduce_(lo, dist.ReduceOp.MIN)
            _all_reduce_(hi, dist.ReduceOp.MAX)
        return lo, hi

    def _percentile_range(self, x: Tensor) -> tuple[Tensor, Tensor]:
        # The (100 - p)-th and p-th percentiles, per channel when the bounds are.
        # torch.quantile accepts at most 2**24 elements and sorts them all: a large
        # tensor is read at an even stride, at most PERCENTILE_SAMPLE elements per row.
        flat = x.reshape(x.shape[0], -1) if self.channels is not None else x.reshape(1, -1)
        step = -(-flat.shape[1] // PERCENTILE_SAMPLE)
        flat = flat[:, ::step].float()
        q = torch.tensor([1.0 - self.percentile / 100.0, self.percentile / 100.0], device=x.device)
        lo, hi = torch.quantile(flat, q, dim=1)
        if self.channels is None:
            lo, hi = lo[0], hi[0]
        return lo, hi

    @torch.no_grad()
    def observe(self, x: Tensor) -> None:
        """Sets (learned, first call) or updates (ema) the bounds from x."""
        if self.bounds == "learned" and self._initialized:
            return
        lo, hi = self._batch_range(x)
        if self.bounds == "ema" and self._initialized:
            self.lower.lerp_(lo, self.config.momentum)
            self.upper.lerp_(hi, self.config.momentum)
        else:
            self.lower.copy_(lo)
            self.upper.copy_(hi)
            self.initialized.fill_(True)
            self._initialized = True

    def kernel_args(self, x: Tensor) -> fused.QuantArgs:
        """What a kernel call on x takes besides x; first sets or updates the bounds, as forward does."""
        needs_observe = self.training and not (self.bounds == "learned" and self._initialized)
        if needs_observe and getattr(self, "_is_replica", False):
            # nn.DataParallel replicas are thrown away after each forward: bounds set
            # or updated on them would be lost (and set again every step).
            raise RuntimeError(
                "dsq_ext quantizers cannot initialise or update their bounds inside "
                "nn.DataParallel; use DistributedDataParallel (torchrun), or one device"
            )
        if needs_observe:
            self.observe(x)
        elif not self._initialized:
            if self.is_activation:
                raise RuntimeError(
                    "this activation quantizer has no bounds yet: run at least one training "
                    "forward (model.train()) or load a checkpoint before evaluating"
                )
            # A weight's range is not a batch statistic: setting it in eval is safe.
            self.observe(x)
        # Both done inside the kernels (see dsq_ext/ops.py), which as separate torch
        # ops would cost about 25 small kernels per quantizer and step:
        # - learning can push upper below lower (seen on depthwise convs, whose
        #   channels have a handful of weights); the two then swap roles instead
        #   of collapsing the channel to a constant with no gradient;
        # - LSQ's gradient scale 1 / sqrt(elements per channel * levels) keeps the
        #   steps of lower, upper and alpha in proportion to those of the weights.
        s = 1.0
        if self.config.grad_scale:
            per_channel = x.numel() // (self.channels or 1)
            s = 1.0 / math.sqrt(max(per_channel, 1) * (2**self.bits - 1))
        sort = self.bounds == "learned"
        return fused.QuantArgs(self.lower, self.upper, self.alpha, self.bits, self.method, s, sort, self.grid)

    @torch.no_grad()
    def project_(self) -> None:
        """Clamps the alpha parameter into [ALPHA_MIN, ALPHA_MAX] (see project_alpha_)."""
        if self.alpha is not None:
            self.alpha.clamp_(ALPHA_MIN, ALPHA_MAX)  # a NaN alpha stays NaN, visibly

    def forward(self, x: Tensor) -> Tensor:
        q = self.kernel_args(x)
        kw = dict(grad_scale=q.grad_scale, sort_bounds=q.sort_bounds, grid=q.grid)
        if q.method == "dsq":
            return ops.dsq_quantize(x, q.lower, q.upper, q.alpha, q.bits, **kw)
        return ops.uniform_quantize(x, q.lower, q.upper, q.bits, **kw)


class _QuantMixin:
    """What DSQConv2d and DSQLinear share: two quantizers and the float conversions."""

    _FLOAT: type[nn.Module]

    def _init_quantizers(self, weight_config, act_config, kwargs, recompute, device):
        w, a = resolve_layer_configs(weight_config, act_config, (), kwargs)
        channels = self.weight.shape[0] if w is not None and w.per_channel else None
        self.weight_quantizer = None if w is None else Quantizer(w, channels=channels, device=device)
        self.act_quantizer = None if a is None else Quantizer(a, is_activation=True, device=device)
        # How the layer computes, not what it computes (the same values and gradients
        # either way), so it lives on the layer, not in the quantizers' configs.
        if not isinstance(recompute, bool):
            raise TypeError(f"recompute must be a bool, got {recompute!r}")
        self.recompute = recompute

    @property
    def weight_config(self) -> QuantConfig | None:
        return None if self.weight_quantizer is None else self.weight_quantizer.config

    @property
    def act_config(self) -> QuantConfig | None:
        return None if self.act_quantizer is None else self.act_quantizer.config

    def quantized_weight(self) -> Tensor:
        """The fake-quantized weight that forward uses (differentiable)."""
        return self.weight if self.weight_quantizer is None else self.weight_quantizer(self.weight)

    def quantize_input(self, x: Tensor) -> Tensor:
        return x if self.act_quantizer is None else self.act_quantizer(x)

    def _kernel_args(self, x: Tensor):
        # In the order the unfused forward quantizes: input, then weight.
        act = None if self.act_quantizer is None else self.act_quantizer.kernel_args(x)
        return act, None if self.weight_quantizer is None else self.weight_quantizer.kernel_args(self.weight)

    @classmethod
    def from_float(cls, mod: nn.Module, **kwargs):
        """A quantized copy of a float nn.Conv2d / nn.Linear (same weights, device and dtype)."""
        if type(mod) is not cls._FLOAT:
            raise TypeError(
                f"{cls.__name__}.from_float expects {cls._FLOAT.__name__}, got {type(mod).__name__}"
            )
        new = cls(**cls._float_config(mod), device=mod.weight.device, dtype=mod.weight.dtype, **kwargs)
        with torch.no_grad():
            new.weight.copy_(mod.weight)
            if mod.bias is not None:
                new.bias.copy_(mod.bias)
        new.train(mod.training)
        return new

    def to_float(self) -> nn.Module:
        """The float module with this layer's (unquantized) weights."""
        mod = self._FLOAT(**self._float_config(self), device=self.weight.device, dtype=self.weight.dtype)
        with torch.no_grad():
            mod.weight.copy_(self.weight)
            if self.bias is not None:
                mod.bias.copy_(self.bias)
        mod.train(self.training)
        return mod

    def extra_repr(self) -> str:
        w, a = self.weight_config, self.act_config
        return super().extra_repr() + (
            f", weight={w.describe() if w else 'float'}, input={a.describe() if a else 'float'}"
            + ("" if self.recompute else ", recompute=False")
        )


class DSQConv2d(_QuantMixin, nn.Conv2d):
    """nn.Conv2d whose weight and input are fake-quantized (DSQ or uniform-STE)."""

    _FLOAT = nn.Conv2d

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size,
        stride=1,
        padding=0,
        dilation=1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        device=None,
        dtype=None,
        *,
        weight_config: QuantConfig | None = _UNSET,
        act_config: QuantConfig | None = _UNSET,
        recompute: bool = True,
        **quant_kwargs,
    ):
        super().__init__(
            in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
            padding_mode, device, dtype,
        )  # fmt: skip
        self._init_quantizers(weight_config, act_config, quant_kwargs, recompute, device)

    @staticmethod
    def _float_config(m) -> dict:
        return dict(
            in_channels=m.in_channels,
            out_channels=m.out_channels,
            kernel_size=m.kernel_size,
            stride=m.stride,
            padding=m.padding,
            dilation=m.dilation,
            groups=m.groups,
            bias=m.bias is not None,
            padding_mode=m.padding_mode,
        )

    def forward(self, x: Tensor) -> Tensor:
        if (
            self.recompute
            and self.padding_mode == "zeros"
            and not isinstance(self.padding, str)
            and x.dim() == 4
        ):
            args = (self.stride, self.padding, self.dilation, self.groups)
            return fused.conv2d(x, self.weight, self.bias, *self._kernel_args(x), *args)
        return self._conv_forward(self.quantize_input(x), self.quantized_weight(), self.bias)


class DSQLinear(_QuantMixin, nn.Linear):
    """nn.Linear whose weight and input are fake-quantized (DSQ or uniform-STE)."""

    _FLOAT = nn.Linear

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device=None,
        dtype=None,
        *,
        weight_config: QuantConfig | None = _UNSET,
        act_config: QuantConfig | None = _UNSET,
        recompute: bool = True,
        **quant_kwargs,
    ):
        super().__init__(in_features, out_features, bias, device, dtype)
        self._init_quantizers(weight_config, act_config, quant_kwargs, recompute, device)

    @staticmethod
    def _float_config(m) -> dict:
        return dict(in_features=m.in_features, out_features=m.out_features, bias=m.bias is not None)

    def forward(self, x: Tensor) -> Tensor:
        if self.recompute:
            return fused.linear(x, self.weight, self.bias, *self._kernel_args(x))
        return F.linear(self.quantize_input(x), self.quantized_weight(), self.bias)


_SWAPS = {nn.Conv2d: DSQConv2d, nn.Linear: DSQLinear}


def quantize_model(
    model: nn.Module,
    *args,
    weight_config: QuantConfig | None = _UNSET,
    act_config: QuantConfig | None = _UNSET,
    skip_first: bool = True,
    skip_last: bool = True,
    filter_fn=None,
    recompute: bool = True,
    **kwargs,
) -> nn.Module:
    """Replaces nn.Conv2d and nn.Linear in place with DSQConv2d / DSQLinear; returns the model.

    The quantization is given as weight_config/act_config (QuantConfig, None for
    float), or by the front-door arguments `method, w_bits, a_bits` and keywords
    (per_channel, act_percentile, alpha_init, bounds, ...; see layer_configs).
    Layers are taken in registration order; by default the first one (the stem
    conv) and the last one (the classifier) stay float, as in the paper.
    filter_fn(module, qualified_name) -> bool, when given, must also accept a
    layer for it to be swapped (skip_first=False, skip_last=False leave the
    choice to filter_fn alone). recompute goes to every layer (see DSQConv2d).
    """
    if type(model) in _SWAPS:
        raise TypeError(
            "quantize_model swaps the layers inside a model; use DSQConv2d.from_float for one layer"
        )
    w, a = resolve_layer_configs(weight_config, act_config, args, kwargs)
    for name, mod in quantizable_layers(
        model, skip_first=skip_first, skip_last=skip_last, filter_fn=filter_fn
    ):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(
            parent,
            child,
            _SWAPS[type(mod)].from_float(mod, weight_config=w, act_config=a, recompute=recompute),
        )
    return model


def quantizable_layers(model: nn.Module, *, skip_first=True, skip_last=True, filter_fn=None):
    """(name, layer) for the nn.Conv2d / nn.Linear that quantize_model would swap, in order."""
    candidates = [(name, m) for name, m in model.named_modules() if type(m) in _SWAPS and name != ""]
    first = 1 if skip_first else 0
    last = len(candidates) - (1 if skip_last else 0)
    return [(n, m) for n, m in candidates[first:last] if filter_fn is None or filter_fn(m, n)]


def quantized_modules(model: nn.Module):
    """(name, layer) for every DSQConv2d / DSQLinear in the model, in order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, _QuantMixin)]


def quantizer_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Every learned lower, upper and alpha in the model (to keep out of weight decay)."""
    return [p for m in model.modules() if isinstance(m, Quantizer) for p in m.parameters(recurse=False)]


def project_alpha_(model: nn.Module) -> None:
    """Clamps every alpha parameter into [ALPHA_MIN, ALPHA_MAX]; call it after each optimizer step.

    The kernels clamp alpha into that range where they use it, and a clamped alpha
    gets zero gradient: an alpha that one large step pushed past 0.5 (or below
    ALPHA_MIN) would stay there, frozen, for the rest of training. Clamping the
    parameter itself after each step (projected gradient descent) keeps it where its
    gradient lives. It changes no value or gradient of any step: the kernels already
    used the clamped value, so a checkpoint means the same before and after. train.py
    calls it after every step; in another loop, call it yourself or register it once:
        optimizer.register_step_post_hook(lambda *_: dsq_ext.project_alpha_(model))
    (Where the step Delta is below about 0.0076 the kernels also raise alpha to
    2 / (1 + exp(1000 Delta)), the paper's k <= 1000; that floor moves with the
    bounds, per channel, and stays the kernels' business.)
    """
    for m in model.modules():
        if isinstance(m, Quantizer):
            m.project_()


def param_groups(model: nn.Module, weight_decay: float, lr: float | None = None) -> list[dict]:
    """Optimizer parameter groups: the weights with weight_decay; quantizer parameters without.

    The quantizer parameters are grouped by scale (QuantConfig.alpha_lr_scale,
    bounds_lr_scale), each group with learning rate lr * scale; a scale of 0 freezes
    them. lr is the optimizer's learning rate, required unless every scale is 1
    (uniform models, or DSQ with alpha_lr_scale=1): then two groups, [weights,
    quantizer parameters], the layout of checkpoints written before the scales.
    Under SGD, with or without momentum, and no weight decay, multiplying a
    group's learning rate by k is the same as multiplying its gradients by k.
    """
    by_scale: dict[float, list] = {}
    for m in model.modules():
        if isinstance(m, Quantizer):
            for name, p in m.named_parameters(recurse=False):
                scale = m.config.alpha_lr_scale if name == "alpha" else m.config.bounds_lr_scale
                by_scale.setdefault(scale, []).append(p)
    ids = {id(p) for ps in by_scale.values() for p in ps}
    groups = [{"params": [p for p in model.parameters() if id(p) not in ids], "weight_decay": weight_decay}]
    if set(by_scale) <= {1.0}:
        return groups + [{"params": [p for p in model.parameters() if id(p) in ids], "weight_decay": 0.0}]
    if lr is None:
        raise ValueError(
            "param_groups: pass lr=<the optimizer's learning rate>: the quantizers' alpha_lr_scale / "
            f"bounds_lr_scale ({', '.join(f'{k:g}' for k in sorted(by_scale))}) multiply it"
        )
    return groups + [
        {"params": by_scale[scale], "weight_decay": 0.0, "lr": lr * scale} for scale in sorted(by_scale)
    ]
