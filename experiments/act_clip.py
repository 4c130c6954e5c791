#!/usr/bin/env python
"""How well do first-batch activation bounds fit? 2-bit (and 4-bit) quantization error of
the quantized layers' inputs, for an upper bound at the batch max or at a percentile.

    .venv/bin/python experiments/act_clip.py runs/float_s0/model_best.pth.tar [--batches 4]

Loads a float train.py checkpoint and, for each seed, draws one shuffled training batch
of 128 with train.py's training augmentation (not the exact batch train.py's loader
draws for that seed), runs it in training mode, and for every conv and linear that
quantize_model would quantize (all but the stem conv and the classifier) measures the
mean squared error of uniform quantization of its input at each candidate upper bound
(the lower bound is the matching low percentile, or the min: these inputs follow a ReLU,
so it is 0 either way), relative to the mean square of the input. The quantizer is the
package's own (a uniform dsq_ext.Quantizer with `percentile`, as train.py's
--act-percentile builds it), so the bounds and the rounding are exactly training's.
Prints the geometric mean over layers, per seed, bit width and candidate.
"""

import argparse
import math
import os

import torch
import torchvision
from torchvision import datasets

import dsq_ext
from dsq_ext.checkpoint import load_model_state, read_checkpoint
from dsq_ext.datasets import train_transform

CANDIDATES = (100.0, 99.99, 99.9, 99.5, 99.0)


def quant_error(x, bits, percentile):
    """Relative MSE of x quantized as train.py's first batch would be, with bounds from this batch."""
    cfg = dsq_ext.QuantConfig(
        bits=bits, method="uniform", percentile=None if percentile == 100 else percentile
    )
    q = dsq_ext.Quantizer(cfg, is_activation=True).train()
    with torch.no_grad():
        y = q(x)
    return ((y - x) ** 2).mean().item() / (x**2).mean().item()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint")
    p.add_argument("--data", default="data/fashion-mnist")
    p.add_argument("--seeds", default="0,1,2")
    args = p.parse_args()
    model = torchvision.models.resnet18()
    load_model_state(model, read_checkpoint(args.checkpoint, "act_clip.py")["state_dict"])
    model.train()  # the bounds are set in a training forward (batch-norm batch statistics)
    layers = [m for _, m in dsq_ext.quantizable_layers(model)]
    inputs = {}
    for i, m in enumerate(layers):
        m.register_forward_pre_hook(lambda mod, a, i=i: inputs.__setitem__(i, a[0].detach()))
    ds = datasets.ImageFolder(os.path.join(args.data, "train"), train_transform(32))
    print(
        f"{len(layers)} quantized layers; relative MSE of the first batch's inputs, geometric mean over layers"
    )
    print("| seed | bits | " + " | ".join("max" if c == 100 else f"p{c}" for c in CANDIDATES) + " |")
    print("|---|---|" + "---|" * len(CANDIDATES))
    for seed in [int(s) for s in args.seeds.split(",")]:
        torch.manual_seed(seed)
        loader = torch.utils.data.DataLoader(ds, batch_size=128, shuffle=True, num_workers=0)
        x, _ = next(iter(loader))
        with torch.no_grad():
            model(x)
        for bits in (2, 4):
            cells = []
            for c in CANDIDATES:
                logs = [math.log(quant_error(inputs[i], bits, c)) for i in range(len(layers))]
                cells.append(f"{math.exp(sum(logs) / len(logs)):.4f}")
            print(f"| {seed} | {bits} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
