#!/usr/bin/env python
"""Where the layers' recompute costs time: ResNet-18's quantized convolutions one by one.

For each quantized conv of a torchvision ResNet-18 (the shapes of a batch at --image-size
px), the DSQConv2d that quantize_model makes of it (W4A4, the default per-tensor
weights and grid), with the bounds its first training forward sets, runs forward and
backward in two variants, from the same state and the same upstream gradient:

  keep      recompute=False: quantizer ops, then F.conv2d (three autograd nodes; the
            convolution keeps the quantized input and weight)
  recompute recompute=True (the default): one autograd node that keeps the float input
            and weight and quantizes both again in backward (dsq_ext/fused.py)

Rounds run the variants in turn (every other round reversed); each cell is the best
(minimum) over the rounds, which on a shared machine is the least noisy estimate of
what the work costs; "- keep" is the difference of the minima. glibc keeps freed
memory (common.keep_freed_memory, as in bench_step.py), so that no layer pays page faults
for the one before it. Whole-step ratios (medians of paired rounds) are bench_step.py's job.

    python bench/bench_recompute.py --threads 1 --reps 40
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402
import torch  # noqa: E402

import dsq_ext  # noqa: E402

VARIANTS = ("keep", "recompute")


def quantized_convs(method: str, batch: int, size: int):
    """(name, DSQConv2d, its input) for the convs that quantize_model quantizes in ResNet-18
    (W4A4, recompute=False), after a training-mode forward of random data has set the bounds."""
    import torchvision

    torch.manual_seed(0)
    model = dsq_ext.quantize_model(torchvision.models.resnet18(), method, 4, 4, recompute=False)
    convs = [(n, m) for n, m in dsq_ext.quantized_modules(model) if isinstance(m, dsq_ext.DSQConv2d)]
    inputs = {}
    hooks = [m.register_forward_pre_hook(lambda m, args: inputs.setdefault(m, args[0])) for _, m in convs]
    with torch.no_grad():
        model.train()(torch.randn(batch, 3, size, size))
    for h in hooks:
        h.remove()
    return [(n, m, inputs[m]) for n, m in convs]


def fwd_bwd(layer, x, g) -> float:
    """Seconds of one forward and backward of layer from x with upstream gradient g."""
    xi = x.detach().requires_grad_()
    t0 = time.perf_counter()
    layer(xi).backward(g)
    t = time.perf_counter() - t0
    for p in layer.parameters():
        p.grad = None
    return t


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--device", choices=("cpu",), default="cpu", help="the CPU only (bench_step.py measures CUDA)"
    )
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--image-size", type=int, default=112)
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--method", default="dsq", choices=("dsq", "uniform"))
    p.add_argument("--quick", action="store_true", help="batch 2 at 32 px, 2 rounds: a smoke test")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    args = p.parse_args(argv)
    if args.quick:
        args.batch, args.image_size, args.reps = 2, 32, 2
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    info = common.machine_info(device)
    info["malloc_keeps_freed_memory"] = common.keep_freed_memory()  # as bench_step does
    print(f"# bench_recompute: {info['cpu']}, {args.threads} threads, torch {info['torch']}")
    print(
        f"resnet18's quantized convs, batch {args.batch} at {args.image_size} px, {args.method} W4A4, "
        f"{dsq_ext.QuantConfig().grid} grid; best of {args.reps} rounds; load average at start "
        + (", ".join(f"{v:.2f}" for v in info["loadavg_start"]) if info["loadavg_start"] else "n/a")
    )

    rows, totals = [], dict.fromkeys(VARIANTS, 0.0)
    gen = torch.Generator().manual_seed(0)
    for name, conv, x in quantized_convs(args.method, args.batch, args.image_size):
        with torch.no_grad():
            g = torch.randn(conv(x).shape, generator=gen)
        layers = {v: copy.deepcopy(conv) for v in VARIANTS}
        layers["recompute"].recompute = True

        best = dict.fromkeys(VARIANTS, float("inf"))
        for v in VARIANTS:
            fwd_bwd(layers[v], x, g)  # warm-up
        for i in range(args.reps):
            for v in VARIANTS if i % 2 == 0 else VARIANTS[::-1]:
                best[v] = min(best[v], fwd_bwd(layers[v], x, g))
        rows.append(
            {"layer": name, "x": list(x.shape), "x_numel": x.numel(), "w_numel": conv.weight.numel()}
            | {f"{v}_s": best[v] for v in VARIANTS}
        )
        for v in VARIANTS:
            totals[v] += best[v]

    header = ["layer", "x elements", "w elements", "keep ms", "recompute - keep"]
    body = [
        [
            r["layer"],
            f"{r['x_numel']:,}",
            f"{r['w_numel']:,}",
            f"{r['keep_s'] * 1e3:.3f}",
            f"{(r['recompute_s'] - r['keep_s']) * 1e3:+.3f}",
        ]
        for r in rows
    ]
    extra, ratio = totals["recompute"] - totals["keep"], totals["recompute"] / totals["keep"]
    body.append(["all", "", "", f"{totals['keep'] * 1e3:.2f}", f"{extra * 1e3:+.2f} ({ratio:.3f}x)"])
    print()
    print(common.markdown_table(header, body))
    print("\nms of one layer's forward + backward, best of the rounds.")
    common.finish(info, args.json, {"args": vars(args), "results": rows, "totals_s": totals})
    return 0


if __name__ == "__main__":
    sys.exit(main())
