"""Quantizer configuration: what one quantized tensor is, and how a model is quantized.

QuantConfig describes one quantized tensor (a layer's weight or its input
activation); a layer takes a `weight_config` and an `act_config`, as torchao's
QAT layers do. ModelQuantConfig adds which layers of a model are quantized, and
is what a train.py checkpoint records (as a dict with a format version).

Every quantizer setting and its default is defined here, once. The keywords of
the layers and of quantize_model (`w_bits=4, a_bits=4, method="dsq", ...`) are
a front door that builds these objects (`layer_configs`).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass

__all__ = ["QuantConfig", "ModelQuantConfig", "layer_configs", "resolve_layer_configs"]

METHODS = ("dsq", "uniform")
BOUNDS = ("learned", "ema")
# The kernels' grids (dsq_ext.ops.GRIDS; docs/DSQ_MATH.md): "free" puts the
# levels at lower + k*Delta; "affine" and "symmetric" put 0.0 on a level with an
# integer zero point, as ONNX QuantizeLinear/DequantizeLinear hold them.
GRIDS = ("free", "affine", "symmetric")

# Fields that only matter before the first training step (they initialise state
# that the checkpoint then holds), so a resumed run may name other values.
INIT_ONLY = ("alpha_init", "percentile")

# Fields added after checkpoints were first written, with the value that a dict
# written before the field existed means (the behaviour it was trained with),
# which need not be today's default.
_LEGACY = {"grid": "free", "alpha_lr_scale": 1.0}

# The checkpoint format of ModelQuantConfig.to_dict. Format 1 is the flat dict
# train.py wrote before (method, w_bits, a_bits, per_channel, ...).
FORMAT = 2


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_real(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


@dataclass(frozen=True)
class QuantConfig:
    """How one tensor is fake-quantized. Frozen and validated; `replace(**changes)` makes a variant."""

    bits: int = 4
    # "dsq": the soft-staircase gradient of DSQ; "uniform": straight-through.
    method: str = "dsq"
    # Weights only: one (lower, upper) per output channel; alpha stays per tensor.
    per_channel: bool = False
    # "learned": lower/upper are parameters, set once from the first training
    # batch, then trained; "ema": buffers tracking the batch range with `momentum`.
    bounds: str = "learned"
    momentum: float = 0.1
    # The batch range that sets the bounds: None for min/max, P for the
    # (100-P)-th and P-th percentiles.
    percentile: float | None = None
    # DSQ's initial characteristic variable (the paper's 0.2).
    alpha_init: float = 0.2
    # Scale the gradients of lower, upper and alpha by 1/sqrt(elements per
    # channel * (2^b - 1)), as LSQ does (see dsq_ext.nn).
    grad_scale: bool = True
    # Learning-rate multipliers of alpha and of the bounds, applied by
    # dsq_ext.param_groups (0 freezes them at their initial values). alpha's
    # 1000: with the LSQ scale above, alpha moves about as far as the raw
    # gradient of the paper's implementation moves it (within 2x, median over
    # layers), so that alpha learns per layer, as DSQ has it (RESULTS.md, "The
    # alpha ablation"); at 1x it stays at alpha_init through a short fine-tune,
    # and top-1 did not separate the two there (+0.53 +- 0.82, 3 seeds). The
    # bounds stay learned, as the paper trains them: fixing them measured +0.17
    # at W4A4 and -0.33 at W2A2, neither resolved.
    # Dicts written before 1000 was the default read as 1 (_LEGACY). DSQ only:
    # a uniform config, which has no alpha, holds 1.
    alpha_lr_scale: float = 1000.0
    bounds_lr_scale: float = 1.0
    # Where the levels lie (GRIDS). "symmetric" is for weights: zero point 0,
    # the narrow signed range +-(2^(b-1)-1), so it needs bits >= 2. The default
    # is "affine": an exported model then computes exactly what was trained, at
    # no accuracy cost measured (RESULTS.md, "Grids"); dicts written before this
    # field existed read as "free" (_LEGACY), the grid they were trained on.
    grid: str = "affine"

    def __post_init__(self):
        if not _is_int(self.bits) or not 1 <= self.bits <= 8:
            raise ValueError(f"bits must be an int in 1..8, got {self.bits!r}")
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.bounds not in BOUNDS:
            raise ValueError(f"bounds must be one of {BOUNDS}, got {self.bounds!r}")
        if self.grid not in GRIDS:
            raise ValueError(f"grid must be one of {GRIDS}, got {self.grid!r}")
        if self.grid == "symmetric" and self.bits < 2:
            raise ValueError(f"grid 'symmetric' needs bits >= 2, got bits={self.bits}")
        if not isinstance(self.per_channel, bool):
            raise TypeError(f"per_channel must be a bool, got {self.per_channel!r}")
        if not isinstance(self.grad_scale, bool):
            raise TypeError(f"grad_scale must be a bool, got {self.grad_scale!r}")
        if not (_is_real(self.alpha_init) and 0.0 < self.alpha_init <= 0.5):
            raise ValueError(f"alpha_init must be in (0, 0.5], got {self.alpha_init!r}")
        if not (_is_real(self.momentum) and 0.0 < self.momentum <= 1.0):
            raise ValueError(f"momentum must be in (0, 1], got {self.momentum!r}")
        for name in ("alpha_lr_scale", "bounds_lr_scale"):
            v = getattr(self, name)
            if not (_is_real(v) and 0.0 <= v < math.inf):
                raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")
            object.__setattr__(self, name, float(v))
        if self.method == "uniform":
            object.__setattr__(self, "alpha_lr_scale", 1.0)
        if self.percentile is not None and not (
            _is_real(self.percentile) and 50.0 < self.percentile <= 100.0 and math.isfinite(self.percentile)
        ):
            raise ValueError(f"percentile must be a number in (50, 100] or None, got {self.percentile!r}")
        # Stored as plain Python types, so that to_dict/from_dict round-trip exactly.
        object.__setattr__(self, "bits", int(self.bits))
        object.__setattr__(self, "alpha_init", float(self.alpha_init))
        object.__setattr__(self, "momentum", float(self.momentum))
        if self.percentile is not None:
            object.__setattr__(self, "percentile", float(self.percentile))

    def replace(self, **changes) -> QuantConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> QuantConfig:
        """The config a dict from to_dict describes; fields it lacks keep the meaning they had then."""
        if not isinstance(d, dict):
            raise TypeError(f"a QuantConfig dict must be a dict, got {type(d).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown QuantConfig fields {unknown}; known: {sorted(names)}")
        return cls(**{**_LEGACY, **d})

    def describe(self) -> str:
        """A short human-readable summary, e.g. 'DSQ 4-bit per-channel, learned bounds'."""
        text = f"{'DSQ' if self.method == 'dsq' else 'uniform'} {self.bits}-bit"
        text += " per-channel" if self.per_channel else ""
        text += f", {self.bounds} bounds"
        if self.percentile is not None:
            text += f" from the p{self.percentile:g} range"
        return text + f", {self.grid} grid"


def layer_configs(
    method: str | None = None,
    w_bits: int | None = 4,
    a_bits: int | None = 4,
    *,
    per_channel: bool = False,
    act_percentile: float | None = None,
    **fields,
) -> tuple[QuantConfig | None, QuantConfig | None]:
    """The keyword front door: (weight_config, act_config) from today's keywords.

    w_bits / a_bits None leave that tensor float; per_channel applies to the
    weight, act_percentile to the activation; every other keyword (method,
    alpha_init, bounds, momentum, grad_scale) is a QuantConfig field shared by both.
    """
    if method is not None:
        fields["method"] = method
    # bits, per_channel and percentile have their own front-door names above.
    shared = {f.name for f in dataclasses.fields(QuantConfig)} - {"bits", "per_channel", "percentile"}
    unknown = sorted(set(fields) - shared)
    if unknown:
        raise TypeError(f"unexpected quantization keyword(s) {unknown}")
    for name, bits in (("w_bits", w_bits), ("a_bits", a_bits)):
        if bits is not None and not (_is_int(bits) and 1 <= bits <= 8):
            raise ValueError(f"{name} must be an int in 1..8 or None, got {bits!r}")
    weight = None if w_bits is None else QuantConfig(bits=w_bits, per_channel=per_channel, **fields)
    # Activations (post-ReLU, mostly) take the affine grid where weights are
    # symmetric: a symmetric grid would spend half its levels on negative values.
    if fields.get("grid") == "symmetric":
        fields["grid"] = "affine"
    act = None if a_bits is None else QuantConfig(bits=a_bits, percentile=act_percentile, **fields)
    return weight, act


_UNSET = object()


def resolve_layer_configs(weight_config, act_config, args: tuple, kwargs: dict):
    """(weight_config, act_config) from explicit configs, or else from the front-door keywords.

    Given explicitly, a config that is not passed means float (as in torchao);
    mixing configs and keywords is an error, since one would silently win.
    """
    if weight_config is _UNSET and act_config is _UNSET:
        return layer_configs(*args, **kwargs)
    if args or kwargs:
        given = [repr(a) for a in args] + sorted(kwargs)
        raise TypeError(
            "pass either weight_config/act_config or the quantization keywords, not both "
            f"(got {', '.join(given)})"
        )
    out = []
    for name, cfg in (("weight_config", weight_config), ("act_config", act_config)):
        cfg = None if cfg is _UNSET else cfg
        if cfg is not None and not isinstance(cfg, QuantConfig):
            raise TypeError(f"{name} must be a dsq_ext.QuantConfig or None, got {type(cfg).__name__}")
        out.append(cfg)
    if out[1] is not None and out[1].per_channel:
        raise ValueError("act_config: activations are quantized per tensor (per_channel=False)")
    return tuple(out)


@dataclass(frozen=True)
class ModelQuantConfig:
    """How a model is quantized: the two tensor configs and which layers get them.

    weight and act None (both) is the float model. skip_first/skip_last keep the
    first conv and the last layer float, as the paper does.
    """

    weight: QuantConfig | None = None
    act: QuantConfig | None = None
    skip_first: bool = True
    skip_last: bool = True

    def __post_init__(self):
        for name in ("weight", "act"):
            cfg = getattr(self, name)
            if cfg is not None and not isinstance(cfg, QuantConfig):
                raise TypeError(f"{name} must be a QuantConfig or None, got {type(cfg).__name__}")
        if self.act is not None and self.act.per_channel:
            raise ValueError("act: activations are quantized per tensor (per_channel=False)")

    @property
    def is_float(self) -> bool:
        return self.weight is None and self.act is None

    @property
    def method(self) -> str | None:
        cfg = self.weight or self.act
        return None if cfg is None else cfg.method

    def quantize(self, model, **kwargs):
        """Swaps the model's layers as this config says (dsq_ext.quantize_model); returns the model."""
        from .nn import quantize_model

        if self.is_float:
            return model
        return quantize_model(
            model,
            weight_config=self.weight,
            act_config=self.act,
            skip_first=self.skip_first,
            skip_last=self.skip_last,
            **kwargs,
        )

    def resume_key(self) -> dict:
        """The fields that must match to resume a run: everything but INIT_ONLY."""
        d = self.to_dict()
        for name in ("weight", "act"):
            if d[name] is not None:
                for field in INIT_ONLY:
                    d[name].pop(field)
        return d

    def to_dict(self) -> dict:
        return {
            "format": FORMAT,
            "weight": None if self.weight is None else self.weight.to_dict(),
            "act": None if self.act is None else self.act.to_dict(),
            "skip_first": self.skip_first,
            "skip_last": self.skip_last,
        }

    @classmethod
    def from_dict(cls, d: dict | None) -> ModelQuantConfig:
        """Reads every format written so far: format 2 (to_dict) and format 1 (train.py's flat dict)."""
        if d is None:
            return cls()
        if not isinstance(d, dict):
            raise TypeError(f"a quantization config must be a dict, got {type(d).__name__}")
        fmt = d.get("format", 1)
        if fmt == 1:
            return cls._from_format_1(d)
        if fmt != FORMAT:
            raise ValueError(
                f"quantization config format {fmt!r} is not one this dsq_ext reads (1..{FORMAT}); "
                "a newer dsq_ext wrote it?"
            )
        return cls(
            weight=None if d["weight"] is None else QuantConfig.from_dict(d["weight"]),
            act=None if d["act"] is None else QuantConfig.from_dict(d["act"]),
            skip_first=d["skip_first"],
            skip_last=d["skip_last"],
        )

    @classmethod
    def _from_format_1(cls, d: dict) -> ModelQuantConfig:
        # {"method": None} is a float run; otherwise method, w_bits, a_bits,
        # per_channel, quantize_first_last, bounds, alpha_init, act_percentile.
        if d.get("method") is None:
            return cls()
        common = {"method": d["method"], "bounds": d.get("bounds") or "learned"}
        if d.get("alpha_init") is not None:
            common["alpha_init"] = d["alpha_init"]
        # Format 1 predates the grid option and the alpha lr scale: those runs trained
        # on the free grid, with alpha at the weights' learning rate.
        common["grid"] = d.get("grid") or "free"
        common["alpha_lr_scale"] = 1.0
        weight, act = layer_configs(
            w_bits=d.get("w_bits"),
            a_bits=d.get("a_bits"),
            per_channel=bool(d.get("per_channel")),
            act_percentile=d.get("act_percentile"),
            **common,
        )
        keep_float = not d.get("quantize_first_last", False)
        return cls(weight=weight, act=act, skip_first=keep_float, skip_last=keep_float)

    def describe(self) -> str:
        """One line, e.g. 'DSQ W4A4, bounds learned, per-channel weights'."""
        if self.is_float:
            return "float"
        w, a = self.weight, self.act
        first = w or a
        text = f"{'DSQ' if first.method == 'dsq' else 'uniform'} "
        text += f"W{w.bits}" if w else "W(float)"
        text += f"A{a.bits}" if a else " (activations float)"
        text += f", bounds {first.bounds}"
        if w is not None and w.per_channel:
            text += ", per-channel weights"
        if a is not None and a.percentile is not None:
            text += f", activation bounds from p{a.percentile:g}"
        grids = [c.grid for c in (w, a) if c is not None]
        text += f", {grids[0]} grid" if len(set(grids)) == 1 else f", {w.grid}/{a.grid} grids"
        if not (self.skip_first and self.skip_last):
            text += ", first/last layers quantized"
        return text
