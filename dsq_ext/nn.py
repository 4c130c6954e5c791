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
the quantizer parameters. The values are unchanged; `grad_scale=False` turns
this off.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from . import fused, ops

__all__ = [
    "Quantizer",
    "DSQConv2d",
    "DSQLinear",
    "quantize_model",
    "quantized_modules",
    "quantizer_parameters",
    "param_groups",
]

METHODS = ("dsq", "uniform")
# Elements per row that Quantizer(percentile=...) reads to set bounds (see _percentile_range).
PERCENTILE_SAMPLE = 1 << 20
BOUNDS = ("learned", "ema")


def _all_reduce_(t: Tensor, op) -> Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=op)
    return t


def _check_bits(name: str, bits, allow_none: bool) -> None:
    if bits is None and allow_none:
        return
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 8:
        raise ValueError(f"{name} must be an int in 1..8{' or None' if allow_none else ''}, got {bits!r}")


class Quantizer(nn.Module):
    """Fake-quantizes one tensor (DSQ or uniform-STE) and owns its bounds and alpha.

    bounds="learned": lower/upper are nn.Parameters, set from the tensor's min/max
    on the first training forward (activations: min/max of the first batch,
    all-reduced across ranks), then trained by backprop.
    bounds="ema": lower/upper are buffers, a moving average (momentum) of the
    min/max seen in training. Eval mode never looks at batch statistics.
    `initialized` (a buffer) records that the bounds were set, so eval, resume
    and load_state_dict never set them again.
    """

    def __init__(
        self,
        bits: int,
        *,
        method: str = "dsq",
        channels: int | None = None,
        alpha_init: float = 0.2,
        bounds: str = "learned",
        momentum: float = 0.1,
        grad_scale: bool = True,
        is_activation: bool = False,
        percentile: float | None = None,
        device=None,
        dtype=None,
    ):
        super().__init__()
        _check_bits("bits", bits, allow_none=False)
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        if bounds not in BOUNDS:
            raise ValueError(f"bounds must be one of {BOUNDS}, got {bounds!r}")
        if not 0.0 < alpha_init <= 0.5:
            raise ValueError(f"alpha_init must be in (0, 0.5], got {alpha_init}")
        if not 0.0 < momentum <= 1.0:
            raise ValueError(f"momentum must be in (0, 1], got {momentum}")
        if channels is not None and is_activation:
            raise ValueError("activations are quantized per tensor (channels=None)")
        if percentile is not None and not (
            isinstance(percentile, (int, float))
            and not isinstance(percentile, bool)
            and 50.0 < percentile <= 100.0
        ):
            raise ValueError(f"percentile must be a number in (50, 100] or None, got {percentile!r}")
        self.bits = bits
        self.method = method
        self.channels = channels
        self.bounds = bounds
        self.momentum = momentum
        self.grad_scale = grad_scale
        self.is_activation = is_activation
        self.percentile = None if percentile is None else float(percentile)
        kw = {"device": device, "dtype": dtype if dtype is not None else torch.float32}
        shape = (channels,) if channels is not None else ()
        lower, upper = torch.zeros(shape, **kw), torch.ones(shape, **kw)
        if bounds == "learned":
            self.lower, self.upper = nn.Parameter(lower), nn.Parameter(upper)
        else:
            self.register_buffer("lower", lower)
            self.register_buffer("upper", upper)
        if method == "dsq":
            self.alpha = nn.Parameter(torch.full((), float(alpha_init), **kw))
        else:
            self.register_parameter("alpha", None)
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool, device=device))
        # Host-side mirror of `initialized`: reading the buffer every step would
        # synchronise a GPU and break torch.compile graphs.
        self._initialized = False

    def extra_repr(self) -> str:
        per = f"per_channel({self.channels})" if self.channels is not None else "per_tensor"
        pct = f", percentile={self.percentile:g}" if self.percentile is not None else ""
        return f"{self.method}, bits={self.bits}, {per}, bounds={self.bounds}{pct}"

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
            self.lower.lerp_(lo, self.momentum)
            self.upper.lerp_(hi, self.momentum)
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
        if self.grad_scale:
            per_channel = x.numel() // (self.channels or 1)
            s = 1.0 / math.sqrt(max(per_channel, 1) * (2**self.bits - 1))
        sort = self.bounds == "learned"
        return fused.QuantArgs(self.lower, self.upper, self.alpha, self.bits, self.method, s, sort)

    def forward(self, x: Tensor) -> Tensor:
        q = self.kernel_args(x)
        kw = dict(grad_scale=q.grad_scale, sort_bounds=q.sort_bounds)
        if q.method == "dsq":
            return ops.dsq_quantize(x, q.lower, q.upper, q.alpha, q.bits, **kw)
        return ops.uniform_quantize(x, q.lower, q.upper, q.bits, **kw)


class _QuantMixin:
    """What DSQConv2d and DSQLinear share: two quantizers and the float conversions."""

    _FLOAT: type[nn.Module]

    def _init_quantizers(self, *, w_bits, a_bits, per_channel, act_percentile, recompute, **common):
        # common: what both quantizers take (method, alpha_init, bounds, momentum, grad_scale, device).
        _check_bits("w_bits", w_bits, allow_none=True)
        _check_bits("a_bits", a_bits, allow_none=True)
        if not isinstance(recompute, bool):
            raise TypeError(f"recompute must be a bool, got {recompute!r}")
        self.recompute = recompute
        self.weight_quantizer = (
            Quantizer(w_bits, channels=self.weight.shape[0] if per_channel else None, **common)
            if w_bits is not None
            else None
        )
        self.act_quantizer = (
            Quantizer(a_bits, is_activation=True, percentile=act_percentile, **common)
            if a_bits is not None
            else None
        )
        self.method, self.w_bits, self.a_bits = common["method"], w_bits, a_bits
        self.per_channel = per_channel

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
        return (
            super().extra_repr()
            + f", method={self.method}, w_bits={self.w_bits}, a_bits={self.a_bits}"
            + (", per_channel=True" if self.per_channel else "")
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
        method: str = "dsq",
        w_bits: int | None = 4,
        a_bits: int | None = 4,
        per_channel: bool = False,
        alpha_init: float = 0.2,
        bounds: str = "learned",
        momentum: float = 0.1,
        grad_scale: bool = True,
        act_percentile: float | None = None,
        recompute: bool = True,
    ):
        super().__init__(
            in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
            padding_mode, device, dtype,
        )  # fmt: skip
        self._init_quantizers(
            w_bits=w_bits, a_bits=a_bits, per_channel=per_channel, act_percentile=act_percentile,
            recompute=recompute, method=method, alpha_init=alpha_init, bounds=bounds, momentum=momentum,
            grad_scale=grad_scale, device=device,
        )  # fmt: skip

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
        method: str = "dsq",
        w_bits: int | None = 4,
        a_bits: int | None = 4,
        per_channel: bool = False,
        alpha_init: float = 0.2,
        bounds: str = "learned",
        momentum: float = 0.1,
        grad_scale: bool = True,
        act_percentile: float | None = None,
        recompute: bool = True,
    ):
        super().__init__(in_features, out_features, bias, device, dtype)
        self._init_quantizers(
            w_bits=w_bits, a_bits=a_bits, per_channel=per_channel, act_percentile=act_percentile,
            recompute=recompute, method=method, alpha_init=alpha_init, bounds=bounds, momentum=momentum,
            grad_scale=grad_scale, device=device,
        )  # fmt: skip

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
    method: str = "dsq",
    w_bits: int | None = 4,
    a_bits: int | None = 4,
    skip_first: bool = True,
    skip_last: bool = True,
    per_channel: bool = False,
    **layer_kwargs,
) -> nn.Module:
    """Replaces nn.Conv2d and nn.Linear in place with DSQConv2d / DSQLinear; returns the model.

    Layers are taken in registration order; by default the first one (the stem
    conv) and the last one (the classifier) stay float, as in the paper.
    """
    candidates = [(name, m) for name, m in model.named_modules() if type(m) in _SWAPS and name != ""]
    if type(model) in _SWAPS:
        raise TypeError(
            "quantize_model swaps the layers inside a model; use DSQConv2d.from_float for one layer"
        )
    first = 1 if skip_first else 0
    last = len(candidates) - (1 if skip_last else 0)
    for name, mod in candidates[first:last]:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(
            parent,
            child,
            _SWAPS[type(mod)].from_float(
                mod, method=method, w_bits=w_bits, a_bits=a_bits, per_channel=per_channel, **layer_kwargs
            ),
        )
    return model


def quantized_modules(model: nn.Module):
    """(name, layer) for every DSQConv2d / DSQLinear in the model, in order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, _QuantMixin)]


def quantizer_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Every learned lower, upper and alpha in the model (to keep out of weight decay)."""
    return [p for m in model.modules() if isinstance(m, Quantizer) for p in m.parameters(recurse=False)]


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Optimizer parameter groups: the model's weights with weight_decay, quantizer parameters without."""
    quant = {id(p) for p in quantizer_parameters(model)}
    rest = [p for p in model.parameters() if id(p) not in quant]
    return [
        {"params": rest, "weight_decay": weight_decay},
        {"params": [p for p in model.parameters() if id(p) in quant], "weight_decay": 0.0},
    ]
