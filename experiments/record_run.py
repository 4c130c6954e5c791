#!/usr/bin/env python
"""Writes the small, committable record of one finished train.py run (run directories and
checkpoints are not kept from one machine to the next):

    .venv/bin/python experiments/record_run.py runs/NAME [--out experiments/results/NAME.json]

The record holds the command, the seed, the exit status and wall time (runs/NAME/done), the
validation top-1/top-5 after every epoch (train.log), the final alpha and bounds of every
quantizer (its last checkpoint), every alpha after each epoch (TensorBoard events), the
machine and the code version.
"""

import argparse
import json
import os
import platform
import re
import subprocess
import sys

import run_records
import torch

from dsq_ext import report
from dsq_ext.checkpoint import quant_config_of, read_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cpu() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        return next(
            line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")
        )
    except (OSError, StopIteration):
        return platform.processor() or "unknown"


def _values(t):
    t = t.flatten().tolist()
    return t[0] if len(t) == 1 else t


def alpha_per_epoch(run_dir: str) -> dict:
    """{quantizer: [alpha after epoch 0, 1, ...]} from the run's TensorBoard events (train.py
    logs every quantizer's alpha once per epoch, as quant/<layer>/<weight|act>_alpha)."""
    out = {}
    for tag, points in run_records.tensorboard_scalars(run_dir).items():
        m = re.fullmatch(r"quant/(?P<layer>.+)/(?P<kind>weight|act)_alpha", tag)
        if m:
            by_epoch = dict(points)  # a resumed run logs again
            out[f"{m['layer']}.{m['kind']}"] = [by_epoch[k] for k in sorted(by_epoch)]
    return out


def record(run_dir: str) -> dict:
    name = os.path.basename(os.path.normpath(run_dir))
    command = open(os.path.join(run_dir, "command.txt")).read().strip()
    done = open(os.path.join(run_dir, "done")).read().split()
    log = open(os.path.join(run_dir, "train.log")).read()
    seed = re.search(r"--seed (\d+)", command)
    epochs = [
        {"epoch": i, "acc1": float(a1), "acc5": float(a5)}
        for i, (a1, a5) in enumerate(re.findall(r"^ \*\s+Acc@1 ([0-9.]+) Acc@5 ([0-9.]+)", log, re.M))
    ]
    ckpt = read_checkpoint(os.path.join(run_dir, "checkpoint.pth.tar"), "record_run.py")
    quantizers = {}
    for layer in report.load_layers(report.canonical_state_dict(ckpt["state_dict"]), ckpt.get("quant")):
        for kind in ("weight", "act"):
            q = getattr(layer, kind)
            if q is not None:
                quantizers[f"{layer.name}.{kind}"] = {
                    "bits": q.bits,
                    "alpha": None if q.alpha is None else _values(q.alpha),
                    "lower": _values(q.lower),
                    "upper": _values(q.upper),
                }
    commit = subprocess.run(
        ["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    )
    return {
        "name": name,
        "command": command,
        "seed": int(seed.group(1)) if seed else None,
        **{k: int(v) for k, v in (item.split("=", 1) for item in done)},
        "quant": quant_config_of(ckpt).to_dict(),
        "epochs": epochs,
        "best_acc1": float(ckpt["best_acc1"]),
        "quantizers": quantizers,
        "alpha_per_epoch": alpha_per_epoch(run_dir),
        "machine": {
            "cpu": _cpu(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "torch": torch.__version__,
        },
        "commit": commit.stdout.strip() or None,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_dir")
    p.add_argument("--out", help="default: experiments/results/<run name>.json")
    args = p.parse_args(argv)
    rec = record(args.run_dir)
    out = args.out or os.path.join(ROOT, "experiments", "results", rec["name"] + ".json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(rec, f, indent=1)
        f.write("\n")
    print(f"=> {out}: best Acc@1 {rec['best_acc1']:.2f} over {len(rec['epochs'])} epochs", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
