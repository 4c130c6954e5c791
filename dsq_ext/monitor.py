"""Watching quantizers train: their alpha and bounds as TensorBoard scalars and histograms.

    writer = torch.utils.tensorboard.SummaryWriter(log_dir)
    dsq_ext.monitor.log_quantizers(writer, model, epoch)

Tags are quant/<layer>/<weight|act>_<alpha|lower|upper>, under the bare
model's layer names (without DDP's "module.").
"""

from __future__ import annotations

from .checkpoint import canonical_key
from .nn import quantized_modules

__all__ = ["quantizer_tensors", "log_quantizers"]


def quantizer_tensors(model) -> list[tuple[str, object]]:
    """(tag, tensor) for each quantizer's alpha, lower and upper: quant/layer1.0.conv1/weight_alpha, ..."""
    out = []
    for name, layer in quantized_modules(model):
        for kind, q in (("weight", layer.weight_quantizer), ("act", layer.act_quantizer)):
            if q is None:
                continue
            for field in ("alpha", "lower", "upper"):
                value = getattr(q, field)
                if value is not None:
                    out.append((f"quant/{canonical_key(name)}/{kind}_{field}", value.detach()))
    return out


def log_quantizers(writer, model, step: int) -> None:
    """Per-tensor values as scalars; per-channel bounds as their mean plus a histogram of all channels."""
    for tag, value in quantizer_tensors(model):
        writer.add_scalar(tag, value.float().mean().item(), step)
        if value.numel() > 1:
            writer.add_histogram(tag + "_per_channel", value.float().cpu(), step)
