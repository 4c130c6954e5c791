"""Export a trained dsq_ext model to ONNX QuantizeLinear / DequantizeLinear (QDQ), exactly.

    dsq_ext.export_onnx(model, example_input, "model.onnx")
    python -m dsq_ext.export log/model_best.pth.tar -o model.onnx

What the file holds, per quantized layer (DSQConv2d / DSQLinear); every other layer
stays float, as in the PyTorch model:

- the weight as integer codes (an initializer) followed by DequantizeLinear, per
  output channel (axis 0) where the weight bounds are per channel. The codes are
  read off our own kernel's quantized weight (code = value / scale + zero point,
  checked to give back that value exactly), so the float weight the runtime
  computes, (code - zero_point) * scale in float32, is the one the model used;
- at the layer's input, QuantizeLinear -> DequantizeLinear with the activation
  quantizer's scale and zero point. QuantizeLinear divides by the scale, rounds
  half to even, adds the zero point and saturates: the affine grid's forward
  (grid="affine") is defined to be exactly that, so the runtime's codes are the
  model's codes.

Containers per bit width (the integer type that holds a code):

| bits | weights | activations |
|---|---|---|
| 8 | int8 (symmetric grid) / uint8 (affine) | uint8 (affine) / int8 (symmetric) |
| 4 | int4 / uint4 at opset >= 21 (the default then), else as 1-7 | uint8 / int8, restricted to 4 bits |
| 1-3, 5-7 | int8 / uint8 (constant codes, already in range) | uint8 / int8, restricted to b bits |

"Restricted" is a Clip in float just before QuantizeLinear, to the grid's first
and last levels: it gives exactly the codes that an integer Clip between
QuantizeLinear and DequantizeLinear would (x/scale is monotonic, and each bound is
checked to quantize to its own code), and it keeps every QuantizeLinear directly
followed by its DequantizeLinear, the pattern QDQ consumers look for.

Why 4-bit activations are not in uint4/int4 although onnxruntime's CPU
QuantizeLinear runs them: onnxruntime 1.32's graph optimiser (the default,
ORT_ENABLE_ALL) removes a Relu in front of a QuantizeLinear to a 4-bit type even
where the zero point is not the type's minimum, which changes the codes (a Relu
feeds almost every quantized layer of a ResNet); onnxruntime also has no 4-bit
activation kernels, so the 8-bit container costs nothing there. 4-bit weights are
DequantizeLinear'd from int4/uint4 initializers correctly at every optimisation
level, and halve the size of the file. tests/test_export.py checks both.

Grids. A model trained with grid="symmetric" (weights; its activations are then
affine) or grid="affine" exports exactly; symmetric weights are stored as signed codes
-Qp..Qp with zero point 0 (the kernels number the same levels 0..2Qp around Qp).
grid="free" (levels l + k*Delta for any real l) has no integer zero point; export
refuses it unless approximate=True, which snaps each grid to the nearest integer zero
point (the affine grid of the same bounds) and measures how much the exported model
then differs on the example input (codes, top-1, outputs). Retrain with
`train.py --grid symmetric` (or affine) for an exact export.

Checking. export_onnx runs the file in onnxruntime (CPU, graph optimisation off)
on the example input and compares it with the PyTorch model: the codes of every
quantized layer's input, the top-1 of each row and the largest output difference
(compare_onnx; experiments/onnx_parity.py does the same on a validation set).
Codes may differ where a value lies within float rounding of a rounding boundary:
the float layers before it (convolutions, BatchNorm) sum in another order in
onnxruntime than in PyTorch. compare_onnx reports how far from a boundary the
worst disagreeing value was, in units of the step.

onnxruntime's default optimisation may fuse DequantizeLinear -> Conv -> (Relu) ->
QuantizeLinear into QLinearConv where a quantized layer feeds the next one directly.
QLinearConv adds the bias as int32 at scale input_scale * weight_scale, which moves
the next layer's input by up to half that step: codes then differ near boundaries by
that much. The session option session.disable_quant_qdq=1 keeps the fusion off
(ort_session(..., qdq_fusion=False)).

Where two layers quantize the same tensor on the same grid (a ResNet block's first
conv and its downsample, when their bounds are equal), the exporter's optimiser keeps
one QuantizeLinear for both; the file's metadata "dsq_ext.input_codes" names the
QuantizeLinear output of each layer's input.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import sys
import tempfile
import warnings
from collections.abc import Iterable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import ops
from .checkpoint import CheckpointError, load_model_state, quant_config_of, read_checkpoint
from .datasets import val_transform
from .nn import DSQConv2d, DSQLinear, Quantizer, quantized_modules

__all__ = ["export_onnx", "compare_onnx", "load_checkpoint_model", "ExportError", "QuantizerSpec"]

# The opset used when 4-bit weights are stored in int4 / uint4; otherwise the exporter's own.
OPSET_INT4 = 21
OPSET_DEFAULT = 18
# torch's exporter writes opset 18 and above (ONNX itself has per-axis DequantizeLinear from 13).
OPSET_MIN = 18
EXACT_GRIDS = ("affine", "symmetric")
# [min, max] of each container.
CONTAINERS = {"uint8": (0, 255), "int8": (-128, 127), "uint4": (0, 15), "int4": (-8, 7)}


class ExportError(ValueError):
    """A model, checkpoint or path that cannot be exported as asked (the message says why)."""


# ---------------------------------------------------------------------------------------
# What the export reads of a quantizer: the one function that knows Quantizer's attributes.


@dataclasses.dataclass(frozen=True)
class QuantizerSpec:
    method: str  # "dsq" or "uniform": which op computes the forward value (alpha does not change it)
    bits: int
    per_channel: bool
    lower: Tensor  # float32, shape () or [channels]
    upper: Tensor
    alpha: Tensor | None
    sort_bounds: bool  # learned bounds are used sorted per channel (Quantizer.forward)
    grid: str  # "free", "affine" or "symmetric"
    initialized: bool


def quantizer_spec(q: Quantizer) -> QuantizerSpec:
    """Everything the export needs from a dsq_ext.Quantizer."""
    return QuantizerSpec(
        method=q.method,
        bits=q.bits,
        per_channel=q.channels is not None,
        lower=q.lower.detach().float(),
        upper=q.upper.detach().float(),
        alpha=None if q.alpha is None else q.alpha.detach().float(),
        sort_bounds=q.bounds == "learned",
        grid=q.grid,
        initialized=bool(q._initialized),
    )


# ---------------------------------------------------------------------------------------
# The grid as the kernels define it: scale, zero point, first and last code.


def _fake_quantize(x: Tensor, spec: QuantizerSpec, grid: str) -> Tensor:
    """Our kernel's forward value of x on `grid` (the layer's own op)."""
    l, u = spec.lower.to(x.device), spec.upper.to(x.device)
    with torch.no_grad():
        if spec.method == "dsq":
            return ops.dsq_quantize(x, l, u, spec.alpha, spec.bits, sort_bounds=spec.sort_bounds, grid=grid)
        return ops.uniform_quantize(x, l, u, spec.bits, sort_bounds=spec.sort_bounds, grid=grid)


def _grid_params(spec: QuantizerSpec, grid: str) -> tuple[Tensor, Tensor]:
    """(scale, zero point) per channel as the kernels use them: float32 Delta, float zero point."""
    s, z = ops.grid_params(spec.lower, spec.upper, spec.bits, grid, sort_bounds=spec.sort_bounds)
    return s.float().reshape(-1), z.double().reshape(-1)


@dataclasses.dataclass
class _Grid:
    """One quantized tensor as the ONNX file holds it."""

    scale: np.ndarray  # float32, one per channel (one element per tensor)
    zero_point: np.ndarray  # int64, idem
    qmin: int  # the first and last code of the grid
    qmax: int
    container: str  # a key of CONTAINERS
    grid: str  # the grid exported ("affine" for an approximated "free")
    offset: int = 0  # the kernels' number of a level minus its code here (symmetric: Qp)

    def clip(self) -> tuple[np.float32, np.float32] | None:
        """The float range to clip to before QuantizeLinear, or None when saturation does it."""
        if (self.qmin, self.qmax) == CONTAINERS[self.container]:
            return None
        s, z = self.scale[0], int(self.zero_point[0])
        lo, hi = np.float32(self.qmin - z) * s, np.float32(self.qmax - z) * s
        # Each bound must quantize to its own code for the float Clip to equal the integer one.
        for bound, code in ((lo, self.qmin), (hi, self.qmax)):
            if np.rint(np.float32(bound) / s) + z != code:
                raise ExportError(f"clip bound {bound} does not quantize to code {code} at scale {s}")
        return lo, hi


def _code_range(spec: QuantizerSpec, grid: str, s: Tensor, z: Tensor) -> tuple[int, int]:
    # The first and last level, asked of the kernel itself: far below and far above every bound.
    far = 4.0 * (spec.lower.abs().max() + spec.upper.abs().max()).item() + 1.0
    x = torch.tensor([-far, far], dtype=torch.float32)
    if spec.per_channel:
        x = x.repeat(s.numel(), 1)  # one row per channel
    y = _fake_quantize(x, spec, grid).reshape(-1, 2)
    codes = torch.round(y.double() / s.double().reshape(-1, 1) + z.reshape(-1, 1))
    lo, hi = codes[:, 0].unique(), codes[:, 1].unique()
    if lo.numel() != 1 or hi.numel() != 1:
        raise ExportError(f"the {grid} grid's first and last codes differ across channels: {lo}, {hi}")
    return int(lo.item()), int(hi.item())


def _container(qmin: int, qmax: int, bits: int, kind: str, opset: int) -> str:
    signed = qmin < 0
    if kind == "weight" and bits == 4 and opset >= OPSET_INT4:
        name = "int4" if signed else "uint4"
        lo, hi = CONTAINERS[name]
        if lo <= qmin and qmax <= hi:
            return name
    name = "int8" if signed else "uint8"
    lo, hi = CONTAINERS[name]
    if not (lo <= qmin and qmax <= hi):
        raise ExportError(f"codes {qmin}..{qmax} fit no 8-bit container")
    return name


def _export_grid(name: str, spec: QuantizerSpec, kind: str, approximate: bool, opset: int) -> _Grid:
    if not spec.initialized:
        raise ExportError(
            f"{name}: the {kind} quantizer has no bounds yet (never trained nor loaded): "
            "train the model, or load its checkpoint, before exporting"
        )
    if spec.grid in EXACT_GRIDS:
        grid = spec.grid
    elif spec.grid == "free" and approximate:
        grid = "affine"
    elif spec.grid == "free":
        raise ExportError(
            f"{name}: the {kind} quantizer uses grid='free', whose levels l + k*Delta need a "
            "zero point -l/Delta that is in general not an integer, and ONNX (like every integer "
            "runtime) stores only integer zero points, so the file cannot compute what the model "
            "computes. Retrain (or fine-tune) on a deployable grid: train.py with the default --grid "
            "affine, or --grid symmetric (quantize_model(..., grid=...)), or export an approximation with "
            "approximate=True (--approximate), which snaps each zero point to the nearest "
            "integer and reports how much the exported model then differs"
        )
    else:
        raise ExportError(f"{name}: unknown {kind} grid {spec.grid!r}")
    s, z = _grid_params(spec, grid)
    if not bool(torch.all(s > 0)) or not bool(torch.all(torch.isfinite(s))):
        bad = s if s.numel() == 1 else s[~(s > 0) | ~torch.isfinite(s)]
        raise ExportError(
            f"{name}: the {kind} quantizer's step (upper - lower) / (2^bits - 1) is {bad.tolist()}: "
            "its bounds have collapsed (upper == lower) or are not finite, so there is no grid to "
            "export (QuantizeLinear needs a positive scale)"
        )
    if not bool(torch.all(z == torch.round(z))):
        raise ExportError(f"{name}: the {grid} grid gave a non-integer zero point {z.tolist()}")
    qmin, qmax = _code_range(spec, grid, s, z)
    offset = 0
    if grid == "symmetric":
        # The kernels number the symmetric levels 0..2Qp around z = Qp; integer runtimes
        # expect signed codes -Qp..Qp with zero point 0: the same levels, (q - z) * scale.
        offset = int(z[0])
        if not bool(torch.all(z == offset)):
            raise ExportError(f"{name}: the symmetric grid's zero points differ across channels: {z}")
        z, qmin, qmax = torch.zeros_like(z), qmin - offset, qmax - offset
    g = _Grid(
        scale=s.numpy().astype(np.float32),
        zero_point=z.numpy().astype(np.int64),
        qmin=qmin,
        qmax=qmax,
        container=_container(qmin, qmax, spec.bits, kind, opset),
        grid=grid,
        offset=offset,
    )
    if kind == "activation":
        g.clip()  # checks the float bounds now rather than inside the exporter
    return g


def _weight_codes(name: str, weight: Tensor, spec: QuantizerSpec, g: _Grid) -> Tensor:
    """The integer codes of the weight our kernel computes on g's grid, checked to give it back."""
    w = weight.detach().float().cpu()
    y = _fake_quantize(w, spec, g.grid)
    shape = (-1,) + (1,) * (w.dim() - 1)
    s = torch.from_numpy(g.scale).reshape(shape if spec.per_channel else ())
    z = torch.from_numpy(g.zero_point).float().reshape(shape if spec.per_channel else ())
    q = torch.round(y / s) + z
    back = (q - z) * s
    if not torch.equal(back, y) or q.min() < g.qmin or q.max() > g.qmax:
        worst = (back - y).abs().max().item()
        raise ExportError(
            f"{name}: the quantized weight is not (code - zero_point) * scale on its grid "
            f"(largest difference {worst:g}, codes {q.min().item():g}..{q.max().item():g}); "
            "this is a bug in dsq_ext, please report it"
        )
    return q.to(torch.int8 if g.container.startswith("int") else torch.uint8)


# ---------------------------------------------------------------------------------------
# The export form: each quantized layer becomes a module whose forward calls two custom
# ops; the exporter turns them into QuantizeLinear / DequantizeLinear (see _translations).


@torch.library.custom_op("dsq_ext_onnx::quantize_dequantize", mutates_args=())
def _quantize_dequantize(
    x: Tensor, scale: float, zero_point: int, qmin: int, qmax: int, container: str, name: str
) -> Tensor:
    """QuantizeLinear (restricted to [qmin, qmax]) then DequantizeLinear, as onnxruntime computes them."""
    s = torch.tensor(scale, dtype=torch.float32, device=x.device)
    q = torch.clamp(torch.round(x.float() / s) + zero_point, qmin, qmax)
    return (q - zero_point) * s


@_quantize_dequantize.register_fake
def _(x, scale, zero_point, qmin, qmax, container, name):
    return torch.empty_like(x, dtype=torch.float32)


@torch.library.custom_op("dsq_ext_onnx::dequantize", mutates_args=())
def _dequantize(
    codes: Tensor, scale: list[float], zero_point: list[int], container: str, name: str
) -> Tensor:
    """DequantizeLinear of integer codes, per output channel when scale has more than one element."""
    shape = (-1,) + (1,) * (codes.dim() - 1) if len(scale) > 1 else ()
    s = torch.tensor(scale, dtype=torch.float32, device=codes.device).reshape(shape)
    z = torch.tensor(zero_point, dtype=torch.float32, device=codes.device).reshape(shape)
    return (codes.float() - z) * s


@_dequantize.register_fake
def _(codes, scale, zero_point, container, name):
    return torch.empty(codes.shape, dtype=torch.float32, device=codes.device)


class _ExportLayer(nn.Module):
    """A DSQConv2d / DSQLinear as the ONNX file computes it: codes, scales and float ops."""

    def __init__(self, name: str, layer: nn.Module, weight: _Grid | None, act: _Grid | None, codes):
        super().__init__()
        self.layer_name, self.wgrid, self.agrid = name, weight, act
        self.is_conv = isinstance(layer, DSQConv2d)
        if weight is None:
            self.weight = nn.Parameter(layer.weight.detach().float().clone(), requires_grad=False)
        else:
            self.register_buffer("weight_codes", codes)
        self.bias = None
        if layer.bias is not None:
            self.bias = nn.Parameter(layer.bias.detach().float().clone(), requires_grad=False)
        if self.is_conv:
            self.stride, self.padding, self.dilation = layer.stride, layer.padding, layer.dilation
            self.groups, self.padding_mode = layer.groups, layer.padding_mode
            self.pad = layer._reversed_padding_repeated_twice

    def forward(self, x: Tensor) -> Tensor:
        a = self.agrid
        if a is not None:
            x = torch.ops.dsq_ext_onnx.quantize_dequantize(
                x, float(a.scale[0]), int(a.zero_point[0]), a.qmin, a.qmax, a.container, self.layer_name
            )
        if self.wgrid is None:
            w = self.weight
        else:
            g = self.wgrid
            w = torch.ops.dsq_ext_onnx.dequantize(
                self.weight_codes, g.scale.tolist(), g.zero_point.tolist(), g.container, self.layer_name
            )
        if not self.is_conv:
            return F.linear(x, w, self.bias)
        if self.padding_mode != "zeros":
            x = F.pad(x, self.pad, mode=self.padding_mode)
            return F.conv2d(x, w, self.bias, self.stride, 0, self.dilation, self.groups)
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


def input_codes_name(layer: str) -> str:
    """The name of the QuantizeLinear output (the codes) at a quantized layer's input."""
    return f"{layer}.input_codes"


def _translations(opset: int) -> dict:
    import onnx_ir as ir
    from onnxscript import values

    op = values.Opset("", opset)
    np_types = _numpy_containers()

    def const(array, name):
        c = op.Constant(value=ir.tensor(array, name=name))
        c.name = name
        return c

    def quantize_dequantize(x, scale, zero_point, qmin, qmax, container, name):
        g = _Grid(np.array([scale], np.float32), np.array([zero_point]), qmin, qmax, container, "")
        s = const(np.array(scale, dtype=np.float32), f"{name}.input_scale")
        z = const(np.array(zero_point, dtype=np_types[container]), f"{name}.input_zero_point")
        clip = g.clip()
        if clip is not None:
            lo = const(np.array(clip[0], np.float32), f"{name}.input_clip_min")
            hi = const(np.array(clip[1], np.float32), f"{name}.input_clip_max")
            x = op.Clip(x, lo, hi)
        q = op.QuantizeLinear(x, s, z)
        q.name = input_codes_name(name)
        return op.DequantizeLinear(q, s, z)

    def dequantize(codes, scale, zero_point, container, name):
        # torch has no 4-bit tensors: int4 / uint4 codes travel as int8 / uint8, and _finish
        # stores them (and their zero points) as int4 / uint4.
        container = {"int4": "int8", "uint4": "uint8"}.get(container, container)
        per_channel = len(scale) > 1
        shape = (len(scale),) if per_channel else ()
        s = const(np.array(scale, dtype=np.float32).reshape(shape), f"{name}.weight_scale")
        z = const(np.array(zero_point, dtype=np_types[container]).reshape(shape), f"{name}.weight_zero_point")
        return op.DequantizeLinear(codes, s, z, axis=0) if per_channel else op.DequantizeLinear(codes, s, z)

    return {
        torch.ops.dsq_ext_onnx.quantize_dequantize.default: quantize_dequantize,
        torch.ops.dsq_ext_onnx.dequantize.default: dequantize,
    }


def _numpy_containers() -> dict:
    import ml_dtypes

    return {"uint8": np.uint8, "int8": np.int8, "uint4": ml_dtypes.uint4, "int4": ml_dtypes.int4}


# ---------------------------------------------------------------------------------------
# The export


def _require_export_extra() -> None:
    import importlib.util

    missing = [
        m for m in ("onnx", "onnxruntime", "onnxscript", "ml_dtypes") if importlib.util.find_spec(m) is None
    ]
    if missing:
        raise ImportError(
            f"dsq_ext.export needs {', '.join(missing)}: pip install onnx onnxruntime onnxscript "
            "ml_dtypes (or pip install --no-build-isolation '.[export]' in the dsq_ext source tree)"
        )


def _check_exportable(model: nn.Module) -> list[tuple[str, nn.Module]]:
    layers = quantized_modules(model)
    owned = set()
    for name, m in layers:
        if type(m) not in (DSQConv2d, DSQLinear):
            raise ExportError(
                f"{name}: cannot export a {type(m).__name__}: the export rebuilds DSQConv2d and "
                "DSQLinear from their configuration and would not run a subclass's own forward; "
                "export a model made of DSQConv2d / DSQLinear (dsq_ext.quantize_model)"
            )
        owned.update(id(q) for q in (m.weight_quantizer, m.act_quantizer) if q is not None)
    for name, m in model.named_modules():
        if isinstance(m, Quantizer) and id(m) not in owned:
            raise ExportError(
                f"{name}: a dsq_ext.Quantizer used on its own (not as a DSQConv2d / DSQLinear "
                "weight_quantizer or act_quantizer) cannot be exported: the export cannot tell "
                "which tensor it quantizes. Quantize through DSQConv2d / DSQLinear instead"
            )
    if not layers:
        raise ExportError(
            "the model has no quantized layers (DSQConv2d / DSQLinear): there is nothing for "
            "dsq_ext to export; a float model exports with torch.onnx.export"
        )
    for p in model.parameters():
        if p.dtype != torch.float32:
            raise ExportError(f"the export needs a float32 model (QDQ scales are float32), got {p.dtype}")
    return layers


def _check_output_path(path) -> str:
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise ExportError(f"cannot write the ONNX file to {path}: it is a directory")
    if not os.path.isdir(folder):
        raise ExportError(f"cannot write the ONNX file to {path}: folder {folder} does not exist")
    if not os.access(folder, os.W_OK) or (os.path.exists(path) and not os.access(path, os.W_OK)):
        raise ExportError(f"cannot write the ONNX file to {path}: permission denied")
    return path


@dataclasses.dataclass
class ExportResult:
    path: str
    opset: int
    layers: list[dict]  # name, kind, bits, grid, container, per_channel, for each quantized tensor
    parity: dict | None  # compare_onnx's report on the example input (None if check=False)


def export_onnx(
    model: nn.Module,
    example_input: Tensor,
    path,
    *,
    opset: int | None = None,
    approximate: bool = False,
    check: bool = True,
    input_name: str = "input",
    output_name: str = "output",
    verbose: bool = False,
) -> ExportResult:
    """Writes the eval model as an ONNX QDQ graph that computes what it computes; see the module docs.

    example_input: one batch (its batch dimension stays dynamic in the file).
    opset: default 21 where 4-bit weights can use int4 / uint4, else 18; at least 18.
    approximate: export grid="free" quantizers with the nearest integer zero point.
    check: run the file in onnxruntime on example_input and report the agreement (always
        done, and printed as a warning, when a grid was approximated).
    """
    _require_export_extra()
    import onnx

    if not isinstance(example_input, Tensor):
        raise ExportError(f"example_input must be a Tensor (one batch), got {type(example_input).__name__}")
    path = _check_output_path(path)
    _check_exportable(model)
    # The export form is made from a copy, on the CPU, in eval mode: the caller's model is left
    # as it is. A weight quantizer that never ran sets its bounds from the weight, as in eval.
    device = next(iter(model.parameters())).device
    form = copy.deepcopy(model).cpu().eval()
    layers = quantized_modules(form)
    for _, m in layers:
        if m.weight_quantizer is not None and not m.weight_quantizer._initialized:
            m.weight_quantizer.observe(m.weight)
    specs = {
        name: (
            None if m.weight_quantizer is None else quantizer_spec(m.weight_quantizer),
            None if m.act_quantizer is None else quantizer_spec(m.act_quantizer),
        )
        for name, m in layers
    }
    if opset is None:
        four = any(w is not None and w.bits == 4 for w, _ in specs.values())
        opset = OPSET_INT4 if four else OPSET_DEFAULT
    if isinstance(opset, bool) or not isinstance(opset, int) or opset < OPSET_MIN:
        raise ExportError(
            f"opset must be an int >= {OPSET_MIN} (the lowest that torch's ONNX exporter writes), "
            f"got {opset!r}"
        )

    info = []
    for name, m in layers:
        wspec, aspec = specs[name]
        wgrid = None if wspec is None else _export_grid(name, wspec, "weight", approximate, opset)
        agrid = None if aspec is None else _export_grid(name, aspec, "activation", approximate, opset)
        codes = None if wgrid is None else _weight_codes(name, m.weight, wspec, wgrid)
        parent, _, child = name.rpartition(".")
        setattr(
            form.get_submodule(parent) if parent else form, child, _ExportLayer(name, m, wgrid, agrid, codes)
        )
        for kind, spec, g in (("weight", wspec, wgrid), ("activation", aspec, agrid)):
            if g is not None:
                info.append(
                    dict(layer=name, kind=kind, bits=spec.bits, model_grid=spec.grid, grid=g.grid,
                         container=g.container, codes=[g.qmin, g.qmax], code_offset=g.offset,
                         per_channel=spec.per_channel)
                )  # fmt: skip

    x = example_input.detach().float().cpu()
    if x.dim() == 0:
        raise ExportError("example_input must have a batch dimension")
    # torch.export specialises a dimension of size 1: trace with two rows.
    trace_x = x if x.shape[0] > 1 else torch.cat([x, x])
    try:
        prog = torch.onnx.export(
            form,
            (trace_x,),
            dynamo=True,
            opset_version=opset,
            input_names=[input_name],
            output_names=[output_name],
            dynamic_shapes=({0: torch.export.Dim("batch")},),
            custom_translation_table=_translations(opset),
            optimize=True,
            verbose=verbose,
        )
    except Exception as e:
        raise ExportError(f"torch.onnx.export failed on the export form of the model: {e}") from e
    proto = _finish(prog.model_proto, info)
    written = next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
    if written != opset:
        raise ExportError(f"asked for opset {opset}, but torch's exporter wrote opset {written}")
    try:
        onnx.checker.check_model(proto, full_check=True)
    except Exception as e:
        raise ExportError(f"the exported graph fails onnx.checker: {e}") from e
    _save(proto, path)

    parity = None
    approximated = any(d["model_grid"] != d["grid"] for d in info)
    if check or approximated:
        ref = model if device.type == "cpu" else copy.deepcopy(model).cpu()
        parity = compare_onnx(ref, path, [x], approximate=approximated)
    if approximated:
        warnings.warn(
            "export_onnx(approximate=True): grid='free' quantizers were exported with the nearest "
            "integer zero point, so the file differs from the model; on the example input:\n"
            + format_parity(parity),
            stacklevel=2,
        )
    return ExportResult(path=path, opset=opset, layers=info, parity=parity)


def _finish(proto, info: list[dict]):
    """Names tensors after their layers, stores int4 / uint4 codes as such, records what was exported."""
    import onnx
    from onnx import numpy_helper

    graph = proto.graph
    _name_by_layer(graph)
    inits = {t.name: t for t in graph.initializer}
    np_types = _numpy_containers()
    for d in info:
        if d["kind"] == "weight" and d["container"] in ("int4", "uint4"):
            for name in (f"{d['layer']}.weight_codes", f"{d['layer']}.weight_zero_point"):
                t = inits[name]
                t.CopyFrom(
                    numpy_helper.from_array(numpy_helper.to_array(t).astype(np_types[d["container"]]), name)
                )
    used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    live = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(live)
    codes = _trace_input_codes(graph, [d["layer"] for d in info if d["kind"] == "activation"])
    from . import __version__

    onnx.helper.set_model_props(
        proto,
        {
            "dsq_ext.version": __version__,
            "dsq_ext.layers": json.dumps(info),
            "dsq_ext.input_codes": json.dumps(codes),
        },
    )
    proto.producer_name = "dsq_ext"
    proto.producer_version = __version__
    return proto


def _trace_input_codes(graph, layers: list[str]) -> dict[str, str]:
    """{layer: the QuantizeLinear output that holds its input codes}.

    Usually <layer>.input_codes; but where two layers quantize the same tensor on the same
    grid (a ResNet block's first conv and its downsample, when their bounds are equal) the
    exporter's optimiser keeps one QuantizeLinear for both. Found from the layer's Conv /
    Gemm (the consumer of <layer>.weight) back through shape-only ops.
    """
    producers = {o: n for n in graph.node for o in n.output}
    passthrough = ("Pad", "Reshape", "Flatten", "Transpose", "Identity", "Squeeze", "Unsqueeze")
    found = {}
    for layer in layers:
        value = None
        for n in graph.node:
            if n.op_type in ("Conv", "Gemm", "MatMul") and len(n.input) > 1:
                w = producers.get(n.input[1])
                w_name = w.input[0] if w is not None and w.op_type == "Transpose" else n.input[1]
                if w_name == f"{layer}.weight":
                    value = n.input[0]
                    break
        node = producers.get(value)
        while node is not None and node.op_type in passthrough:
            node = producers.get(node.input[0])
        q = producers.get(node.input[0]) if node is not None and node.op_type == "DequantizeLinear" else None
        if q is None or q.op_type != "QuantizeLinear":
            raise ExportError(
                f"{layer}: could not find the QuantizeLinear of its input in the exported graph"
            )
        found[layer] = q.output[0]
    return found


def _name_by_layer(graph) -> None:
    # The exporter's optimiser shares equal constants between layers (and merges a Relu into
    # the Clip that follows it) and names values after torch ops; name each layer's tensors
    # after it instead: <layer>.weight_codes/_scale/_zero_point -> <layer>.weight, and
    # <layer>.input_clip_min/_max -> <layer>.input_codes (with <layer>.input_scale/_zero_point)
    # -> <layer>.input.
    inits = {t.name: t for t in graph.initializer}
    consumers: dict[str, list] = {}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    renames = {}

    def own(node, index, name):
        old = node.input[index]
        if old != name and old in inits:
            if name not in inits:
                t = copy.deepcopy(inits[old])
                t.name = name
                graph.initializer.append(t)
                inits[name] = t
            node.input[index] = name

    producers = {o: n for n in graph.node for o in n.output}
    for n in graph.node:
        if n.op_type == "QuantizeLinear" and n.output[0].endswith(".input_codes"):
            layer = n.output[0][: -len(".input_codes")]
            own(n, 1, f"{layer}.input_scale")
            own(n, 2, f"{layer}.input_zero_point")
            clip = producers.get(n.input[0])
            if clip is not None and clip.op_type == "Clip" and len(clip.input) == 3:
                own(clip, 1, f"{layer}.input_clip_min")
                own(clip, 2, f"{layer}.input_clip_max")
            for dq in consumers.get(n.output[0], []):
                if dq.op_type == "DequantizeLinear":
                    own(dq, 1, f"{layer}.input_scale")
                    own(dq, 2, f"{layer}.input_zero_point")
                    renames[dq.output[0]] = f"{layer}.input"
        elif n.op_type == "DequantizeLinear" and n.input[0].endswith(".weight_codes"):
            layer = n.input[0][: -len(".weight_codes")]
            own(n, 1, f"{layer}.weight_scale")
            own(n, 2, f"{layer}.weight_zero_point")
            renames[n.output[0]] = f"{layer}.weight"
    outputs = {o.name for o in graph.output}
    renames = {old: new for old, new in renames.items() if old not in outputs}
    for n in graph.node:
        for k, i in enumerate(n.input):
            n.input[k] = renames.get(i, i)
        for k, o in enumerate(n.output):
            n.output[k] = renames.get(o, o)
    produced = {o for n in graph.node for o in n.output}
    infos = [v for v in graph.value_info if renames.get(v.name, v.name) in produced]
    for v in infos:
        v.name = renames.get(v.name, v.name)
    del graph.value_info[:]
    graph.value_info.extend(infos)


def _save(proto, path: str) -> None:
    import onnx

    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".onnx", dir=folder)
    os.close(fd)
    try:
        onnx.save(proto, tmp)
        os.replace(tmp, path)
    except OSError as e:
        raise ExportError(f"cannot write the ONNX file to {path}: {e}") from e
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


# ---------------------------------------------------------------------------------------
# Agreement between the PyTorch model and the file


def with_code_outputs(proto):
    """A copy of an exported model whose graph also outputs every quantized layer's input codes.

    Returns (model, layers, index): layers[i]'s codes are extra output index[i] (after the
    model's own output; two layers may share one).
    """
    import onnx

    proto = copy.deepcopy(proto) if not isinstance(proto, (str, os.PathLike)) else onnx.load(proto)
    props = _props(proto)
    if "dsq_ext.input_codes" not in props:
        raise ExportError("not a model written by dsq_ext.export_onnx (no dsq_ext.input_codes metadata)")
    codes = json.loads(props["dsq_ext.input_codes"])
    inits = {t.name: t for t in proto.graph.initializer}
    types = {
        n.output[0]: inits[n.input[2]].data_type for n in proto.graph.node if n.op_type == "QuantizeLinear"
    }
    names = list(dict.fromkeys(codes.values()))
    for name in names:
        proto.graph.output.append(onnx.helper.make_tensor_value_info(name, types[name], None))
    return proto, list(codes), [names.index(codes[layer]) for layer in codes]


def _code_offsets(proto) -> dict[str, int]:
    import onnx

    if isinstance(proto, (str, os.PathLike)):
        proto = onnx.load(proto)
    info = json.loads(_props(proto)["dsq_ext.layers"])
    return {d["layer"]: d.get("code_offset", 0) for d in info if d["kind"] == "activation"}


def _props(proto) -> dict:
    return {p.key: p.value for p in proto.metadata_props}


def ort_session(model, optimized: bool, threads: int | None = None, qdq_fusion: bool = True):
    """An onnxruntime CPU session; optimized=False is ORT_DISABLE_ALL, True its default (ORT_ENABLE_ALL).

    qdq_fusion=False keeps DequantizeLinear -> Conv -> QuantizeLinear apart (no QLinearConv).
    """
    import onnxruntime as ort

    so = ort.SessionOptions()
    if not qdq_fusion:
        so.add_session_config_entry("session.disable_quant_qdq", "1")
    so.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimized else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    if threads is not None:
        so.intra_op_num_threads = threads
    data = model if isinstance(model, (str, os.PathLike)) else model.SerializeToString()
    return ort.InferenceSession(data, so, providers=["CPUExecutionProvider"])


class _CodeHooks:
    """The model's own codes at each quantized layer's input: round(y / scale + zero point),
    numbered as in the file (minus the layer's code_offset)."""

    def __init__(self, model: nn.Module, layers: list[str], offsets: dict[str, int]):
        self.grids, self.handles, self.codes, self.margins = {}, [], {}, {}
        mods = dict(model.named_modules())
        for name in layers:
            q = mods[name].act_quantizer
            spec = quantizer_spec(q)
            s, z = _grid_params(spec, spec.grid)
            self.grids[name] = (float(s[0]), float(z[0]), offsets.get(name, 0))
            self.handles.append(q.register_forward_hook(self._hook(name)))

    def _hook(self, name):
        def hook(module, args, y):
            s, z, offset = self.grids[name]
            t = args[0].detach().double() / s + z  # where x lies on the grid, in steps
            self.codes[name] = (torch.round(y.detach().double() / s + z) - offset).cpu().numpy()
            # distance of x to the nearest rounding boundary (a half step), in steps
            self.margins[name] = (t - torch.floor(t) - 0.5).abs().cpu().numpy()

        return hook

    def close(self):
        for h in self.handles:
            h.remove()


def compare_onnx(
    model: nn.Module,
    onnx_model,
    batches: Iterable[Tensor],
    *,
    optimized: bool = False,
    qdq_fusion: bool = True,
    approximate: bool = False,
    threads: int | None = None,
) -> dict:
    """onnxruntime (CPU) against the PyTorch eval model on some batches: codes, top-1, outputs.

    batches: input tensors, or (input, labels) pairs (then both models' accuracy is counted).
    Returns {"images", "top1_agree", "labelled", "correct": {"torch", "onnx"}, "max_abs_diff",
    "layers": {name: {"elements", "mismatches", "max_code_diff", "max_margin", "ties"}}}:
    max_margin is the largest distance, in steps, from a rounding boundary of a PyTorch
    value whose code onnxruntime computed differently (float rounding upstream moves
    values by a small fraction of a step); ties counts the values exactly on a boundary.
    """
    _require_export_extra()
    proto, layers, index = with_code_outputs(onnx_model)
    device = next(iter(model.parameters())).device
    sess = ort_session(proto, optimized, threads, qdq_fusion)
    in_name = sess.get_inputs()[0].name
    out_names = [o.name for o in sess.get_outputs()]
    was_training = model.training
    model.eval()
    hooks = _CodeHooks(model, layers, _code_offsets(proto))
    # The hooks read each activation quantizer's output, which a recompute=True layer never
    # calls (its kernels run inside one autograd node); the values are the same either way.
    recompute = {m: m.recompute for _, m in quantized_modules(model)}
    for m in recompute:
        m.recompute = False
    stats = {n: dict(elements=0, mismatches=0, max_code_diff=0, max_margin=0.0, ties=0) for n in layers}
    images = agree = labelled = 0
    correct = {"torch": 0, "onnx": 0}
    max_diff = 0.0
    try:
        for batch in batches:
            x, y = batch if isinstance(batch, (tuple, list)) else (batch, None)
            x = x.detach().float().cpu()
            with torch.no_grad():
                ref = model(x.to(device)).double().cpu().numpy()
            outs = sess.run(out_names, {in_name: x.numpy()})
            got = outs[0].astype(np.float64)
            max_diff = max(max_diff, float(np.abs(got - ref).max()) if ref.size else 0.0)
            if ref.ndim == 2:
                agree += int((got.argmax(1) == ref.argmax(1)).sum())
                if y is not None:
                    y = np.asarray(y)
                    labelled += len(y)
                    correct["torch"] += int((ref.argmax(1) == y).sum())
                    correct["onnx"] += int((got.argmax(1) == y).sum())
            images += x.shape[0]
            for name, i in zip(layers, index):
                codes = outs[1 + i]
                mine = hooks.codes[name]
                diff = np.abs(codes.astype(np.int64) - mine.astype(np.int64))
                bad = diff != 0
                st = stats[name]
                st["elements"] += int(diff.size)
                st["mismatches"] += int(bad.sum())
                st["ties"] += int((hooks.margins[name] == 0).sum())
                if bad.any():
                    st["max_code_diff"] = max(st["max_code_diff"], int(diff.max()))
                    st["max_margin"] = max(st["max_margin"], float(hooks.margins[name][bad].max()))
    finally:
        hooks.close()
        model.train(was_training)
        for m, r in recompute.items():
            m.recompute = r
    return dict(
        images=images,
        top1_agree=agree,
        labelled=labelled,
        correct=correct,
        max_abs_diff=max_diff,
        optimized=optimized,
        qdq_fusion=qdq_fusion,
        approximate=approximate,
        layers=stats,
    )


def format_parity(p: dict) -> str:
    """compare_onnx's report as a few lines of text."""
    elements = sum(s["elements"] for s in p["layers"].values())
    mism = sum(s["mismatches"] for s in p["layers"].values())
    level = "ORT_ENABLE_ALL" if p["optimized"] else "ORT_DISABLE_ALL"
    if p["optimized"] and not p["qdq_fusion"]:
        level += ", session.disable_quant_qdq"
    lines = [
        f"onnxruntime ({level}) vs PyTorch on {p['images']} inputs: top-1 identical on "
        f"{p['top1_agree']}/{p['images']}, max |output diff| {p['max_abs_diff']:.3g}, activation codes "
        f"identical on {elements - mism}/{elements} ({100.0 * (elements - mism) / max(elements, 1):.4f}%)"
    ]
    if p.get("labelled"):
        n, c = p["labelled"], p["correct"]
        lines.append(
            f"  top-1 accuracy: PyTorch {100.0 * c['torch'] / n:.2f}%, "
            f"onnxruntime {100.0 * c['onnx'] / n:.2f}%"
        )
    for name, s in p["layers"].items():
        if s["mismatches"]:
            lines.append(
                f"  {name}: {s['mismatches']}/{s['elements']} codes differ (by at most "
                f"{s['max_code_diff']}; farthest {s['max_margin']:.3g} steps from a rounding boundary)"
            )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------
# train.py checkpoints


def load_checkpoint_model(path) -> tuple[nn.Module, dict]:
    """(eval model, checkpoint dict) of a train.py checkpoint: arch, quantization, weights from the file."""
    import torchvision

    path = os.fspath(path)
    try:
        ckpt = read_checkpoint(path, "export")
        cfg = quant_config_of(ckpt, path)
    except CheckpointError as e:
        raise ExportError(str(e)) from None
    if "arch" not in ckpt:
        raise ExportError(f"{path}: not a checkpoint written by train.py (it records no 'arch')")
    if cfg.is_float:
        raise ExportError(
            f"{path}: a float checkpoint (trained without -q): there are no quantized layers for "
            "dsq_ext to export; export the float model with torch.onnx.export"
        )
    arch = ckpt["arch"]
    if arch not in torchvision.models.list_models(module=torchvision.models):
        raise ExportError(f"{path}: arch {arch!r} is not a torchvision classification model")
    model = cfg.quantize(torchvision.models.get_model(arch))
    try:
        load_model_state(model, ckpt["state_dict"])
    except RuntimeError as e:
        raise ExportError(f"{path}: its state_dict does not fit -a {arch} with its quantization: {e}") from e
    return model.eval(), ckpt


def image_batches(folder, image_size: int, batch_size: int, limit: int | None = None):
    """(images, labels) batches of an ImageFolder, with train.py's validation transform."""
    import torchvision.datasets as datasets

    ds = datasets.ImageFolder(os.fspath(folder), val_transform(image_size))
    if limit is not None:
        ds = torch.utils.data.Subset(ds, range(min(limit, len(ds))))
    yield from torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=False)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m dsq_ext.export",
        description="Export a train.py checkpoint to ONNX (QuantizeLinear / DequantizeLinear), "
        "then compare onnxruntime with PyTorch on a random batch (and on images with --data).",
    )
    p.add_argument(
        "checkpoint", help="a checkpoint written by train.py (checkpoint.pth.tar, model_best.pth.tar)"
    )
    p.add_argument("-o", "--output", required=True, help="the .onnx file to write")
    p.add_argument(
        "--opset", type=int, default=None, help="ONNX opset (default: 21 for 4-bit weights, else 18)"
    )
    p.add_argument(
        "--approximate",
        action="store_true",
        help="export grid='free' quantizers with the nearest integer zero point (not exact; "
        "the disagreement is measured and printed)",
    )
    p.add_argument("--batch-size", type=int, default=2, help="rows of the random example batch (default 2)")
    p.add_argument("--data", default=None, help="an ImageFolder (e.g. DATA/val) to compare on as well")
    p.add_argument("--images", type=int, default=1000, help="images of --data to compare on (default 1000)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    try:
        model, ckpt = load_checkpoint_model(args.checkpoint)
        size = int(ckpt.get("image_size", 224))
        gen = torch.Generator().manual_seed(args.seed)
        example = torch.randn(max(args.batch_size, 1), 3, size, size, generator=gen)
        res = export_onnx(model, example, args.output, opset=args.opset, approximate=args.approximate)
    except ExportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    n_layers = len({d["layer"] for d in res.layers})
    print(
        f"=> wrote {res.path} (opset {res.opset}; {n_layers} quantized layers, input {list(example.shape)})"
    )
    kinds = sorted({(d["kind"], d["bits"], d["grid"], d["container"]) for d in res.layers})
    for kind, bits, grid, container in kinds:
        print(f"   {kind} {bits}-bit, {grid} grid: {container}")
    if args.approximate and any(d["model_grid"] == "free" for d in res.layers):
        print("=> APPROXIMATE: free grids snapped to the nearest integer zero point")
    print("=> random batch: " + format_parity(res.parity))
    if args.data:
        batches = image_batches(args.data, size, 50, args.images)
        print("=> " + args.data + ": " + format_parity(compare_onnx(model, res.path, batches)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
