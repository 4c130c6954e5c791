#!/usr/bin/env python
"""How strongly alpha and the bounds learn: their gradients per layer, and how far they
would move over a long schedule.

    .venv/bin/python experiments/alpha_grads.py runs/float_s0/model_best.pth.tar [--batches 16]

Quantizes the float checkpoint with DSQ as train.py does (W2A2 with p99 activation
bounds, and W4A4 with p99.9), runs --batches training batches of 128 (train.py's
augmentation, the first batch setting the bounds), and records for every quantizer
the gradient of alpha, lower and upper as training sees it (the layers' LSQ scale
1/sqrt(elements per channel * (2^b - 1))) and without it (the op's exact gradient),
beside the RMS gradient of the layer's weight.

The projection: SGD with momentum m moves a parameter by about lr/(1-m) * E[g] per
step (the drift), and by a random walk of about lr/(1-m) * sd(g) * sqrt(steps) from
the noise. Over the ImageNet example's schedule as the unofficial DSQ implementation
runs it (90 epochs of 5,005 steps, lr 0.1 divided by 10 every 30 epochs, m = 0.9),
sum(lr) over steps is 5,005 * 30 * (0.1 + 0.01 + 0.001) = 16,667. Printed: that
drift for each policy (LSQ-scaled gradient, LSQ with an alpha learning-rate scale K,
unscaled gradient), as |delta alpha|. This assumes the gradient statistics of these
first batches persist, which they need not: an order of magnitude, not a forecast.
"""

import argparse
import math
import os

import torch
import torchvision

import dsq_ext
from dsq_ext.checkpoint import load_model_state, read_checkpoint
from dsq_ext.datasets import train_transform

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCHEDULE_LR_STEPS = 5005 * 30 * (0.1 + 0.01 + 0.001)
MOMENTUM = 0.9
RECIPES = {"W2A2 p99": (2, 99.0), "W4A4 p99.9": (4, 99.9)}


def collect(ckpt_path, data, bits, percentile, batches, grad_scale, seed=0):
    torch.manual_seed(seed)
    model = torchvision.models.resnet18()
    load_model_state(model, read_checkpoint(ckpt_path, "alpha_grads.py")["state_dict"])
    w, a = dsq_ext.layer_configs("dsq", bits, bits, act_percentile=percentile, grad_scale=grad_scale)
    dsq_ext.quantize_model(model, weight_config=w, act_config=a)
    model.train()
    ds = torchvision.datasets.ImageFolder(os.path.join(data, "train"), train_transform(32))
    loader = torch.utils.data.DataLoader(ds, batch_size=128, shuffle=True, num_workers=0)
    layers = dsq_ext.quantized_modules(model)
    stats = {}
    for i, (x, target) in enumerate(loader):
        if i == batches:
            break
        model.zero_grad()
        torch.nn.functional.cross_entropy(model(x), target).backward()
        for name, layer in layers:
            for kind in ("weight", "act"):
                q = getattr(layer, f"{kind}_quantizer")
                rec = stats.setdefault((name, kind), {"alpha": [], "lower": [], "upper": [], "w_rms": []})
                rec["alpha"].append(q.alpha.grad.item())
                rec["lower"].append(q.lower.grad.item())
                rec["upper"].append(q.upper.grad.item())
                rec["w_rms"].append(layer.weight.grad.pow(2).mean().sqrt().item())
    return stats


def mean_sd(v):
    t = torch.tensor(v, dtype=torch.float64)
    return t.mean().item(), t.std().item()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint")
    p.add_argument("--data", default=os.path.join(ROOT, "data", "fashion-mnist"))
    p.add_argument("--batches", type=int, default=16)
    args = p.parse_args()
    steps = SCHEDULE_LR_STEPS / (1 - MOMENTUM)
    for recipe, (bits, pct) in RECIPES.items():
        scaled = collect(args.checkpoint, args.data, bits, pct, args.batches, True)
        raw = collect(args.checkpoint, args.data, bits, pct, args.batches, False)
        print(f"\n### DSQ {recipe}: {args.batches} batches of 128, float_s0 quantized, gradients per step\n")
        print(
            "| quantizer | alpha grad, LSQ: mean (sd) | unscaled: mean (sd) | lower grad, LSQ | upper grad, LSQ "
            "| weight grad RMS | drift of alpha over the schedule: LSQ | LSQ x100 | LSQ x1000 | unscaled |"
        )
        print("|---|---|---|---|---|---|---|---|---|---|")
        drifts = {"LSQ": [], "LSQ x100": [], "LSQ x1000": [], "unscaled": []}
        for key in scaled:
            am, asd = mean_sd(scaled[key]["alpha"])
            rm, rsd = mean_sd(raw[key]["alpha"])
            lm, _ = mean_sd(scaled[key]["lower"])
            um, _ = mean_sd(scaled[key]["upper"])
            wr, _ = mean_sd(scaled[key]["w_rms"])
            d = {
                "LSQ": abs(am) * steps,
                "LSQ x100": 100 * abs(am) * steps,
                "LSQ x1000": 1000 * abs(am) * steps,
            }
            d["unscaled"] = abs(rm) * steps
            for k, v in d.items():
                drifts[k].append(v)
            print(
                f"| {key[0]} {key[1]} | {am:.2e} ({asd:.1e}) | {rm:.2e} ({rsd:.1e}) | {lm:.1e} | {um:.1e} | {wr:.1e} "
                f"| {d['LSQ']:.3g} | {d['LSQ x100']:.3g} | {d['LSQ x1000']:.3g} | {d['unscaled']:.3g} |"
            )
        med = {k: sorted(v)[len(v) // 2] for k, v in drifts.items()}
        print(
            "\nmedian over quantizers of the projected |delta alpha|: "
            + ", ".join(f"{k} {v:.3g}" for k, v in med.items())
            + f" (sum of lr/(1-m) over the schedule: {steps:.4g}; alpha lives in (0, 0.5])"
        )
        if any(math.isnan(v) for v in med.values()):
            print("(NaN: a gradient was NaN)")


if __name__ == "__main__":
    main()
