#!/usr/bin/env python
"""The grid study's table (run_grid.sh), from the committed run records alone:

    .venv/bin/python experiments/grid_table.py [--results experiments/results] [--out FILE]

Reads experiments/results/dsq_w{4a4_p999,2a2_p99}_{free,affine,symmetric}_s*.json (written by
record_run.py after each run, so no run directory or checkpoint is needed) and prints, per
bit width, the top-1 of each grid per seed and the paired differences to the free grid.
"""

import argparse
import os
import re
import statistics

import run_records

HERE = os.path.dirname(os.path.abspath(__file__))
NAME_RE = re.compile(r"^dsq_(?P<bits>w\da\d)_(?P<pct>p\d+)_(?P<grid>free|affine|symmetric)_s(?P<seed>\d+)$")
GRIDS = ("free", "affine", "symmetric")


def read_records(folder: str) -> dict:
    """{(bits, grid): {seed: best top-1}} of the grid study's records in folder."""
    out = {}
    for m, rec in run_records.read_records(folder, NAME_RE):
        key = (f"{m['bits'].upper()} {m['pct']}", m["grid"])
        out.setdefault(key, {})[int(m["seed"])] = rec["best_acc1"]
    return out


def table(records: dict) -> str:
    lines = [
        "| W/A, act. bounds | grid | top-1 per seed (%) | mean +- sd | paired diff. to free, per seed | mean diff. |",
        "|---|---|---|---|---|---|",
    ]
    for bits in sorted({b for b, _ in records}, reverse=True):
        free = records.get((bits, "free"), {})
        for grid in GRIDS:
            runs = records.get((bits, grid))
            if not runs:
                continue
            seeds = sorted(runs)
            per = ", ".join(f"s{s} {runs[s]:.2f}" for s in seeds)
            paired = [s for s in seeds if s in free] if grid != "free" else []
            diffs = [runs[s] - free[s] for s in paired]
            per_diff = ", ".join(f"s{s} {d:+.2f}" for s, d in zip(paired, diffs)) or "-"
            mean_diff = f"{statistics.mean(diffs):+.2f}" if diffs else "-"
            row = [bits, grid, per, run_records.mean_sd([runs[s] for s in seeds]), per_diff, mean_diff]
            lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--results", default=os.path.join(HERE, "results"))
    p.add_argument("--out", default=None, help="also write the table to this file")
    args = p.parse_args()
    text = table(read_records(args.results))
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
