"""How much DSQ's soft staircase scales the gradient that flows through each quantizer.

    .venv/bin/python experiments/grad_factor.py runs/dsq_w2a2_s0/model_best.pth.tar [more checkpoints]

For a DSQ checkpoint of train.py (resnet18), runs one batch of 256 validation images
through the model in eval mode, and for every quantized layer's input activation and
weight computes dy/dx of the quantizer (DSQ's D = s*L/2*sech^2(L*r), 0 outside [l, u])
with the kernel's own backward (dsq_ext.ops.dsq_quantize_backward with grad = 1).
The straight-through estimator of -q uniform uses dy/dx = 1 inside [l, u].

Printed per layer: the mean D over the input elements that are > 0 (post-ReLU
activations that pass gradient back through the ReLU) and inside [l, u], and the mean
D over the weights. Over a uniform spread of positions inside an interval D averages
exactly 1; values below 1 mean the activations sit near the quantization levels, where
the soft staircase is flat.
"""

import argparse
import math
import os
import sys

import torch
import torchvision

import dsq_ext
from dsq_ext import ops
from dsq_ext.checkpoint import quant_config_of, read_checkpoint
from dsq_ext.datasets import val_transform

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoints", nargs="+")
    p.add_argument("--data", default=os.path.join(ROOT, "data", "fashion-mnist"))
    p.add_argument("-n", type=int, default=256)
    args = p.parse_args()
    torch.manual_seed(0)
    ds = torchvision.datasets.ImageFolder(os.path.join(args.data, "val"), val_transform(32))
    idx = torch.randperm(len(ds))[: args.n].tolist()
    x = torch.stack([ds[i][0] for i in idx])

    for path in args.checkpoints:
        ckpt = read_checkpoint(path, "grad_factor.py")
        cfg = quant_config_of(ckpt, path)
        if cfg.method != "dsq":
            sys.exit(f"{path}: not a DSQ checkpoint")
        model = cfg.quantize(torchvision.models.resnet18())
        model.load_state_dict(ckpt["state_dict"])
        model.eval()
        rows = []

        def factor(t, quant):
            # dy/dx of the quantizer as training computes it (crossed learned bounds used sorted).
            sort = quant.bounds == "learned"
            g = ops.dsq_quantize_backward(
                torch.ones_like(t), t, quant.lower.detach(), quant.upper.detach(), quant.alpha.detach(),
                quant.bits, 1.0, sort,
            )[0]  # fmt: skip
            return g

        def hook(name):
            def fn(mod, inputs):
                a = inputs[0].detach()
                aq = mod.act_quantizer
                d = factor(a, aq)
                live = a > 0
                inside = live & (d > 0)
                wq = mod.weight_quantizer
                dw = factor(mod.weight.detach(), wq)
                delta = float((aq.upper - aq.lower).abs() / (2**aq.bits - 1))
                rows.append(
                    (
                        name,
                        float(d[inside].mean()),
                        float(inside.sum() / live.sum().clamp(min=1)),
                        float((a[inside] < aq.lower + delta / 2).float().mean()),
                        float(dw.mean()),
                    )
                )

            return fn

        handles = [m.register_forward_pre_hook(hook(n)) for n, m in dsq_ext.quantized_modules(model)]
        with torch.no_grad():
            model(x)
        for h in handles:
            h.remove()
        print(f"\n{path}: {cfg.describe()}, {args.n} validation images")
        print(
            "| layer | mean dy/dx, activations > 0 inside [l, u] | share of activations > 0 inside [l, u] | share of those in the lowest half-interval | mean dy/dx, weights |"
        )
        print("|---|---|---|---|---|")
        for name, d, share, low, dw in rows:
            print(f"| {name} | {d:.3f} | {share:.3f} | {low:.3f} | {dw:.3f} |")
        prod = math.prod(r[1] for r in rows)
        print(
            f"| mean over layers | {sum(r[1] for r in rows) / len(rows):.3f} | | | {sum(r[4] for r in rows) / len(rows):.3f} |"
        )
        print(f"\nproduct of the per-layer activation factors over the {len(rows)} layers: {prod:.3g}")


if __name__ == "__main__":
    main()
