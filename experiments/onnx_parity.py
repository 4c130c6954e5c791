#!/usr/bin/env python
"""onnxruntime (CPU) against the dsq_ext eval model on a whole validation set.

    .venv/bin/python experiments/onnx_parity.py log/w4a4/model_best.pth.tar data/fashion-mnist
    .venv/bin/python experiments/onnx_parity.py CKPT DATA --images 500 --json parity.json

Exports the train.py checkpoint with dsq_ext.export (grid="free" checkpoints need
--approximate), then runs DATA/val (or DATA itself when it has no val/) through the
PyTorch model and through onnxruntime with train.py's validation transform, in three
sessions: graph optimisation off (ORT_DISABLE_ALL), onnxruntime's default
(ORT_ENABLE_ALL), and the default with its QDQ fusions off (session.disable_quant_qdq,
which keeps QLinearConv from rounding the bias to int32). For each it prints:

- top-1: predictions identical (and each side's accuracy),
- the largest |logit difference|,
- per quantized layer: the codes at its input that differ, by how much, and how far
  from a rounding boundary the farthest such PyTorch value lay (in steps). Float
  rounding before the quantizer (another summation order in a conv, BatchNorm's
  arithmetic) moves values by a few float32 ulps, amplified where BatchNorm divides by
  a small variance: a mismatch it causes lies a small fraction of a step from a
  boundary (the tests see up to a few 1e-4 steps). A margin near 0.5 means a code
  that changed for another reason: an earlier mismatch that propagated, a fused
  integer kernel (QLinearConv rounds the bias), or a bug.
"""

import argparse
import json
import os
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import torch  # noqa: E402

from dsq_ext import export as E  # noqa: E402

SESSIONS = (
    ("ORT_DISABLE_ALL", dict(optimized=False)),
    ("ORT_ENABLE_ALL", dict(optimized=True)),
    ("ORT_ENABLE_ALL, no QDQ fusion", dict(optimized=True, qdq_fusion=False)),
)


def layer_table(p):
    rows = ["| layer | codes | differ | identical % | max code diff | farthest from a boundary (steps) |",
            "|---|---|---|---|---|---|"]  # fmt: skip
    for name, s in p["layers"].items():
        same = 100.0 * (s["elements"] - s["mismatches"]) / max(s["elements"], 1)
        margin = f"{s['max_margin']:.3g}" if s["mismatches"] else "-"
        rows.append(
            f"| {name} | {s['elements']} | {s['mismatches']} | {same:.4f} | {s['max_code_diff']} | {margin} |"
        )
    return "\n".join(rows)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint")
    p.add_argument("data", help="the data root train.py was given (its val/ is read), or an ImageFolder")
    p.add_argument("--onnx", default=None, help="where to write the exported model (default: a temp file)")
    p.add_argument("--approximate", action="store_true", help="export grid='free' checkpoints approximately")
    p.add_argument("--images", type=int, default=None, help="at most this many images (default: all)")
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--threads", type=int, default=None, help="torch and onnxruntime threads")
    p.add_argument("--json", default=None, help="also write the reports as JSON")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    folder = os.path.join(args.data, "val") if os.path.isdir(os.path.join(args.data, "val")) else args.data

    model, ckpt = E.load_checkpoint_model(args.checkpoint)
    size = int(ckpt.get("image_size", 224))
    with tempfile.TemporaryDirectory() as tmp:
        path = args.onnx or os.path.join(tmp, "model.onnx")
        example = next(iter(E.image_batches(folder, size, 2)))[0]
        res = E.export_onnx(model, example, path, approximate=args.approximate, check=False)
        print(f"# {args.checkpoint}: {ckpt.get('arch')}, quant {ckpt.get('quant')}, image size {size}")
        print(f"exported to opset {res.opset}: " + ", ".join(
            sorted({f"{d['kind']} {d['bits']}-bit {d['grid']} in {d['container']}" for d in res.layers})))  # fmt: skip
        reports = {}
        for title, kw in SESSIONS:
            batches = E.image_batches(folder, size, args.batch_size, args.images)
            rep = E.compare_onnx(
                model, path, batches, threads=args.threads, approximate=args.approximate, **kw
            )
            reports[title] = rep
            print(f"\n## {title}\n")
            print(E.format_parity(rep).splitlines()[0])
            if rep["labelled"]:
                n, c = rep["labelled"], rep["correct"]
                print(
                    f"top-1 accuracy: PyTorch {100 * c['torch'] / n:.2f}%, onnxruntime {100 * c['onnx'] / n:.2f}%"
                )
            print()
            print(layer_table(rep))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"checkpoint": args.checkpoint, "layers": res.layers, "reports": reports}, f, indent=1)


if __name__ == "__main__":
    main()
