#!/usr/bin/env python
"""How well do first-batch activation bounds fit? 2-bit (and 4-bit) quantization error of
the quantized layers' inputs, for an upper bound at the batch max or at a percentile.

    .venv/bin/python experiments/act_clip.py runs/float_s0/model_best.pth.tar [--batches 4]

Loads a float train.py checkpoint and, for each seed, draws one shuffled training batch
of 128 with train.py's training augmentation (not the exact batch train.py's loader
draws for that seed), runs it in training mode, and for every conv and linear that
quantize_model would quantize (all but the stem conv and the classifier) measures the
mean squared error of uniform quantization of its input at each candidate upper bound
(the lower bound is the batch min: these inputs follow a ReLU, so it is 0, as is
their 1st percentile), relative to the mean square of the input. Prints the geometric
mean over layers, per seed, bit width and candidate.
"""

import argparse
import math
import os

import torch
import torchvision
import torchvision.transforms as T
from torchvision import datasets

CANDIDATES = (100.0, 99.99, 99.9, 99.5, 99.0)


def quant_error(x, lo, hi, bits):
    n = 2**bits - 1
    delta = (hi - lo) / n
    q = torch.round((x.clamp(lo, hi) - lo) / delta) * delta + lo
    return ((q - x) ** 2).mean().item() / (x**2).mean().item()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint")
    p.add_argument("--data", default="data/fashion-mnist")
    p.add_argument("--seeds", default="0,1,2")
    args = p.parse_args()
    ckpt = torch.load(args.checkpoint, map_location="cpu")
    model = torchvision.models.resnet18()
    model.load_state_dict(ckpt["state_dict"])
    model.train()  # the bounds are set in a training forward (batch-norm batch statistics)
    layers = [m for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))][1:-1]
    inputs = {}
    for i, m in enumerate(layers):
        m.register_forward_pre_hook(lambda mod, a, i=i: inputs.__setitem__(i, a[0].detach()))
    tf = T.Compose([T.RandomResizedCrop(32), T.RandomHorizontalFlip(), T.ToTensor(),
                    T.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])])  # fmt: skip
    ds = datasets.ImageFolder(os.path.join(args.data, "train"), tf)
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
                logs = []
                for i in range(len(layers)):
                    a = inputs[i]
                    lo = a.min()
                    hi = (
                        a.max()
                        if c == 100
                        else torch.quantile(a.flatten()[:: max(1, a.numel() // 2**20)], c / 100)
                    )
                    logs.append(math.log(quant_error(a, lo, hi, bits)))
                cells.append(f"{math.exp(sum(logs) / len(logs)):.4f}")
            print(f"| {seed} | {bits} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
