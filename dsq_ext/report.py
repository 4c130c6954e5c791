"""What a DSQ checkpoint learned, per quantized layer: alpha, bounds and bits.

    python -m dsq_ext.report log/model_best.pth.tar
    python -m dsq_ext.report log/model_best.pth.tar --plot alpha.png --layer layer1.0.conv1

Reads the state_dict of a checkpoint written by train.py (or a bare state_dict)
directly, so it needs neither the model nor its config: a quantized layer is
whatever owns "<layer>.weight_quantizer.*" or "<layer>.act_quantizer.*" keys.
Bit widths come from the checkpoint's "quant" entry when it has one.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
from dataclasses import dataclass

import torch

from . import _C
from .checkpoint import CheckpointError, canonical_state_dict, read_checkpoint
from .config import ModelQuantConfig
from .nn import ALPHA_MAX, ALPHA_MIN

__all__ = ["QuantizerState", "LayerState", "load_layers", "markdown_table", "soft_staircase", "plot"]

_KEY = re.compile(
    r"^(?P<layer>.+)\.(?P<kind>weight|act)_quantizer\.(?P<field>lower|upper|alpha|initialized)$"
)

# The kernels clamp alpha into [ALPHA_MIN, ALPHA_MAX] (dsq_ext.nn) and keep k = L/Delta <= K_MAX
# (csrc/dsq_math.h): a clamped alpha shapes nothing beyond it.
K_MAX = _C.K_MAX


@dataclass
class QuantizerState:
    lower: torch.Tensor
    upper: torch.Tensor
    alpha: torch.Tensor | None = None
    initialized: bool = True
    bits: int | None = None

    @property
    def channels(self) -> int | None:
        return self.lower.numel() if self.lower.dim() > 0 else None

    def effective_alpha(self) -> torch.Tensor | None:
        """alpha as the kernels use it, per channel: clamped into [max(1e-3, 2/(1+exp(1000 Delta))), 0.5]."""
        if self.alpha is None or self.bits is None:
            return None
        delta = ((self.upper - self.lower) / (2**self.bits - 1)).double()
        lo = (2.0 / (1.0 + torch.exp(K_MAX * delta.clamp(min=0)))).clamp(min=ALPHA_MIN, max=ALPHA_MAX)
        a = self.alpha.double().expand_as(delta)
        return torch.minimum(torch.maximum(a, lo), torch.full_like(lo, ALPHA_MAX))


@dataclass
class LayerState:
    name: str
    weight: QuantizerState | None = None
    act: QuantizerState | None = None


def load_checkpoint(path: str) -> tuple[dict, dict]:
    """(state_dict, metadata) of a train.py checkpoint or of a bare state_dict file."""
    ckpt = read_checkpoint(path, "report", require_state_dict=False)
    meta = {k: v for k, v in ckpt.items() if k not in ("state_dict", "optimizer", "scheduler")}
    return canonical_state_dict(ckpt["state_dict"]), meta


def load_layers(state_dict: dict, quant: dict | ModelQuantConfig | None = None) -> list[LayerState]:
    """The quantized layers of a state_dict, in the model's order; bits from a checkpoint's "quant"."""
    cfg = quant if isinstance(quant, ModelQuantConfig) else ModelQuantConfig.from_dict(quant)
    bits = {kind: None if c is None else c.bits for kind, c in (("weight", cfg.weight), ("act", cfg.act))}
    found: dict[str, dict[str, dict]] = {}
    for key, value in state_dict.items():
        m = _KEY.match(key)
        if m:
            found.setdefault(m["layer"], {}).setdefault(m["kind"], {})[m["field"]] = value
    layers = []
    for name, kinds in found.items():
        layer = LayerState(name)
        for kind, fields in kinds.items():
            if "lower" not in fields or "upper" not in fields:
                continue
            q = QuantizerState(
                lower=fields["lower"].detach().float(),
                upper=fields["upper"].detach().float(),
                alpha=fields["alpha"].detach().float() if "alpha" in fields else None,
                initialized=bool(fields["initialized"]) if "initialized" in fields else True,
                bits=bits[kind],
            )
            setattr(layer, kind, q)
        layers.append(layer)
    return layers


def _num(x: float) -> str:
    return f"{x:.4g}"


def _bounds(q: QuantizerState | None) -> str:
    if q is None:
        return "-"
    if not q.initialized:
        return "not set"
    if q.channels is None:
        return f"[{_num(q.lower.item())}, {_num(q.upper.item())}]"
    lo, up = q.lower, q.upper
    return (
        f"[{_num(lo.min().item())}..{_num(lo.max().item())}, "
        f"{_num(up.min().item())}..{_num(up.max().item())}] ({q.channels} ch)"
    )


def _alpha(q: QuantizerState | None) -> str:
    if q is None:
        return "-"
    if q.alpha is None:
        return "n/a"
    text = _num(q.alpha.item())
    eff = q.effective_alpha()
    if eff is not None and q.initialized and not torch.allclose(eff, q.alpha.double().expand_as(eff)):
        text += "*"
    return text


def _bits(q: QuantizerState | None) -> str:
    if q is None:
        return "float"
    return str(q.bits) if q.bits is not None else "?"


def markdown_table(layers: list[LayerState]) -> str:
    """One row per quantized layer: bits, alpha and bounds of its weight and its input activation."""
    rows = [
        "| layer | W bits | W alpha | W bounds [lower, upper] | A bits | A alpha | A bounds [lower, upper] |",
        "|---|---|---|---|---|---|---|",
    ]
    for layer in layers:
        w, a = layer.weight, layer.act
        cells = [layer.name, _bits(w), _alpha(w), _bounds(w), _bits(a), _alpha(a), _bounds(a)]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def _describe(meta: dict) -> str:
    cfg = ModelQuantConfig.from_dict(meta.get("quant"))
    parts = []
    if "arch" in meta:
        parts.append(f"arch {meta['arch']}")
    if not cfg.is_float:
        parts.append(cfg.describe())
    if "epoch" in meta:
        parts.append(f"epoch {meta['epoch']}")
    if "best_acc1" in meta:
        parts.append(f"best Acc@1 {float(meta['best_acc1']):.3f}")
    return ", ".join(parts)


def soft_staircase(x: torch.Tensor, lower: float, upper: float, alpha: float, bits: int):
    """(hard, soft) curves at x: y = l + Delta*Q, and DSQ's phi = l + Delta*(i + (s*tanh(L*r) + 1)/2)."""
    x = x.double()
    n = 2**bits - 1
    delta = (upper - lower) / n
    if not delta > 0:
        flat = torch.full_like(x, float(lower))
        return flat, flat
    lo = max(ALPHA_MIN, 2.0 / (1.0 + math.exp(min(K_MAX * delta, 700.0))))
    a = min(max(alpha, min(lo, ALPHA_MAX)), ALPHA_MAX)
    s, big_l = 1.0 / (1.0 - a), math.log(2.0 / a - 1.0)
    v = (x.clamp(lower, upper) - lower) / delta
    i = v.floor().clamp(max=n - 1)
    r = v - i - 0.5
    hard = lower + delta * (i + (r >= 0).double())
    soft = lower + delta * (i + (s * torch.tanh(big_l * r) + 1.0) / 2.0)
    return hard, soft


def plot(
    layers: list[LayerState],
    path: str,
    layer_name: str | None = None,
    title: str = "",
    alpha_init: float | None = None,
) -> str:
    """Draws alpha per layer and one layer's soft and hard staircases; returns that layer's name."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not layers:
        raise ValueError("no quantized layers in this checkpoint")
    chosen = layers[0] if layer_name is None else next((la for la in layers if la.name == layer_name), None)
    if chosen is None:
        raise ValueError(f"no quantized layer {layer_name!r}; layers: {', '.join(la.name for la in layers)}")

    fig = plt.figure(figsize=(max(10.0, 0.45 * len(layers) + 4), 9), layout="constrained")
    grid = fig.add_gridspec(2, 2, height_ratios=[1.1, 1])
    bars = fig.add_subplot(grid[0, :])
    pos = torch.arange(len(layers)).tolist()
    width = 0.4
    # Bars start at the initial alpha (when the checkpoint records it), so that small
    # moves, the usual picture after a few epochs, show as up and down.
    base = alpha_init if alpha_init is not None else 0.0
    seen = []
    for offset, kind, color in ((-width / 2, "weight", "tab:blue"), (width / 2, "act", "tab:orange")):
        quantizers = [getattr(la, kind) for la in layers]
        values = [q.alpha.item() if q is not None and q.alpha is not None else None for q in quantizers]
        if any(v is not None for v in values):
            heights = [float("nan") if v is None else v - base for v in values]
            label = "weights" if kind == "weight" else "activations (layer input)"
            bars.bar([p + offset for p in pos], heights, width, bottom=base, label=label, color=color)
            seen += [v for v in values if v is not None]
    if seen:
        lo, hi = min(seen + [base] * (alpha_init is not None)), max(seen + [base] * (alpha_init is not None))
        pad = max(0.1 * (hi - lo), 1e-3)
        bars.set_ylim(max(0.0, lo - pad) if alpha_init is not None else 0.0, hi + pad)
        if alpha_init is not None:
            bars.axhline(alpha_init, color="grey", lw=0.8, ls=":", label=f"init ({alpha_init:g})")
        if hi + pad >= ALPHA_MAX:
            bars.axhline(ALPHA_MAX, color="grey", lw=0.8, ls="--", label=f"kernel clamp ({ALPHA_MAX})")
        bars.set_ylabel("alpha")
        bars.legend(loc="upper right", fontsize=8)
    else:
        no_alpha = "uniform quantization: no alpha"
        bars.text(0.5, 0.5, no_alpha, ha="center", va="center", transform=bars.transAxes)
        bars.set_yticks([])
    bars.set_xticks(pos, [la.name for la in layers], rotation=60, ha="right", fontsize=7)
    bars.set_xlim(-0.7, len(layers) - 0.3)
    bars.set_title("learned alpha per quantized layer (smaller: closer to the hard staircase)")

    for col, kind in enumerate(("weight", "act")):
        ax = fig.add_subplot(grid[1, col])
        q = getattr(chosen, kind)
        what = "weights" if kind == "weight" else "input activations"
        if q is None or q.bits is None or not q.initialized:
            reason = "float" if q is None else ("bits unknown" if q.bits is None else "bounds not set")
            ax.text(0.5, 0.5, f"{what}: {reason}", ha="center", va="center", transform=ax.transAxes)
            ax.set_axis_off()
            continue
        ch = "" if q.channels is None else f", channel 0 of {q.channels}"
        lower, upper = q.lower.reshape(-1)[0].item(), q.upper.reshape(-1)[0].item()
        span = upper - lower if upper > lower else 1.0
        x = torch.linspace(lower - 0.15 * span, upper + 0.15 * span, 3001)
        alpha = q.alpha.item() if q.alpha is not None else ALPHA_MAX
        hard, soft = soft_staircase(x, lower, upper, alpha, q.bits)
        ax.plot(x, x, color="lightgrey", lw=0.8, label="identity")
        ax.plot(x, hard, color="black", lw=1.2, label="hard (forward value)")
        if q.alpha is not None:
            ax.plot(x, soft, color="tab:red", lw=1.4, label=f"DSQ soft phi, alpha={alpha:.3g}")
        ax.axvline(lower, color="grey", lw=0.6, ls="--")
        ax.axvline(upper, color="grey", lw=0.6, ls="--")
        # Across 2^b - 1 intervals the soft curve is hard to tell from the line; zoom on two.
        if q.alpha is not None and q.bits > 1:
            delta = (upper - lower) / (2**q.bits - 1)
            mid = lower + delta * ((2**q.bits - 1) // 2)
            zx = torch.linspace(mid - delta, mid + delta, 801)
            zh, zs = soft_staircase(zx, lower, upper, alpha, q.bits)
            inset = ax.inset_axes([0.6, 0.06, 0.37, 0.37])
            inset.plot(zx, zx, color="lightgrey", lw=0.8)
            inset.plot(zx, zh, color="black", lw=1.0)
            inset.plot(zx, zs, color="tab:red", lw=1.2)
            inset.set_xticks([])
            inset.set_yticks([])
            inset.set_title("two intervals", fontsize=7)
        ax.set_title(f"{chosen.name} {what}: {q.bits} bits, [{lower:.3g}, {upper:.3g}]{ch}", fontsize=9)
        ax.set_xlabel("x")
        ax.set_ylabel("quantized x")
        ax.legend(loc="upper left", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return chosen.name


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dsq_ext.report", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "checkpoint", metavar="CHECKPOINT", help="a checkpoint written by train.py, or a state_dict"
    )
    parser.add_argument(
        "--plot", metavar="FILE.png", help="also draw alpha per layer and one layer's staircase"
    )
    parser.add_argument(
        "--layer", metavar="NAME", help="the layer whose staircase --plot draws (default: the first)"
    )
    args = parser.parse_args(argv)
    try:
        state, meta = load_checkpoint(args.checkpoint)
        layers = load_layers(state, meta.get("quant"))
    except (CheckpointError, TypeError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    header = _describe(meta)
    print(f"{args.checkpoint}" + (f": {header}" if header else ""))
    print()
    if not layers:
        print("no quantized layers (a float checkpoint?)")
        return 0
    print(markdown_table(layers))
    if any("*" in _alpha(la.weight) + _alpha(la.act) for la in layers):
        print("\n* outside the range the kernels clamp alpha into (<= 0.5, and >= 2/(1+exp(1000*Delta)))")
    if args.plot:
        try:
            first = ModelQuantConfig.from_dict(meta.get("quant"))
            first = first.weight or first.act
            alpha_init = first.alpha_init if first is not None and first.method == "dsq" else None
            name = plot(
                layers, args.plot, args.layer, title=f"{args.checkpoint}: {header}", alpha_init=alpha_init
            )
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        print(f"\n=> {args.plot}: alpha per layer, and the staircases of {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
