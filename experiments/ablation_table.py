#!/usr/bin/env python
"""The alpha ablation's tables and figure (run_ablation.sh), from the committed run records alone:

    .venv/bin/python experiments/ablation_table.py [--results experiments/results]
        [--out experiments/results/ablation.md] [--figure experiments/figures/ablation_alpha.png]

Reads experiments/results/{uniform,dsq}_<recipe>_<arm>_ep3_s<seed>.json and
float_ft_ep3_s<seed>.json (written by record_run.py after each run, so no run directory or
checkpoint is needed) and prints, per recipe: best top-1 per seed, mean and sd, the
differences to uniform and to the float control paired by seed, and how far the alphas
spread across layers at the end; then every learned alpha per layer; the figure shows
alpha after each epoch, per layer.
"""

import argparse
import os
import re

import run_records

from dsq_ext.nn import ALPHA_MAX, ALPHA_MIN

HERE = os.path.dirname(os.path.abspath(__file__))
NAME_RE = re.compile(
    r"^(?:(?P<method>uniform|dsq)_(?P<recipe>w\da\d_p\d+)_(?P<arm>[a-z0-9_]+?)|float_ft)_ep3_s(?P<seed>\d+)$"
)
# (arm as named by run_ablation.sh, what it is); the rows of the table, in this order.
ARMS = [
    ("float_ft", "float control: the same 3 epochs, unquantized"),
    ("uniform_bfix", "uniform (straight-through), l, u fixed"),
    ("dsq_afix_bfix", "DSQ, alpha fixed at 0.2, l, u fixed"),
    ("dsq_a1000_bfix", "DSQ, alpha learned (lr x1000), l, u fixed"),
    ("dsq_a1000", "DSQ, alpha (lr x1000), l, u learned"),
    ("dsq_a1", "DSQ, alpha (lr x1), l, u learned"),
]
LABEL = dict(ARMS)
# The other comparisons the ablation is for: what learning alpha adds (with l, u
# fixed, and with them learned), what learning l, u adds, and alpha's lr scale.
PAIRS = [
    ("dsq_a1000_bfix", "dsq_afix_bfix"),
    ("dsq_a1000", "dsq_a1000_bfix"),
    ("dsq_a1000", "dsq_afix_bfix"),
    ("dsq_a1000", "dsq_a1"),
]


def read_records(folder: str) -> dict:
    """{recipe: {arm: {seed: record}}}; the float control is filed under every recipe."""
    out, control = {}, {}
    for m, rec in run_records.read_records(folder, NAME_RE):
        seed = int(m["seed"])
        if m["method"] is None:
            control[seed] = rec
        else:
            out.setdefault(m["recipe"], {}).setdefault(f"{m['method']}_{m['arm']}", {})[seed] = rec
    for arms in out.values():
        if control:
            arms["float_ft"] = control
    return out


def _recipe(recipe: str) -> str:
    bits, pct = recipe.split("_")  # "w2a2_p99" -> "W2A2, act. bounds p99"
    return f"{bits.upper()}, act. bounds {pct}"


def _clamped(a: float) -> float:
    # Records written before the projection hold alphas outside the kernels' range, which
    # computed as the clamped value.
    return min(max(a, ALPHA_MIN), ALPHA_MAX)


def alphas(rec: dict, kind: str) -> dict:
    """{layer: alpha as the kernels used it} of the weight or act quantizers of a record."""
    out = {}
    for name, q in rec.get("quantizers", {}).items():
        layer, k = name.rsplit(".", 1)
        if k == kind and q.get("alpha") is not None:
            out[layer] = _clamped(q["alpha"])
    return out


def spread(rec: dict, kind: str) -> float | None:
    a = list(alphas(rec, kind).values())
    return max(a) - min(a) if a else None


def _paired(runs: dict, base: dict | None) -> str:
    if not base:
        return "-"
    seeds = sorted(s for s in runs if s in base)
    if not seeds:
        return "-"
    diffs = [runs[s]["best_acc1"] - base[s]["best_acc1"] for s in seeds]
    per = ", ".join(f"{d:+.2f}" for d in diffs)
    return f"{run_records.mean_sd(diffs, '{:+.2f}')} ({per})"


def table(records: dict) -> str:
    lines = []
    for recipe in sorted(records):
        arms = records[recipe]
        lines += [
            f"### {_recipe(recipe)}",
            "",
            "| arm | top-1 per seed (%) | mean +- sd | minus uniform, paired (per seed) "
            "| minus float control, paired | alpha spread across layers: W / A | code |",
            "|---|---|---|---|---|---|---|",
        ]
        for arm, label in ARMS:
            runs = arms.get(arm)
            if not runs:
                continue
            seeds = sorted(runs)
            acc = [runs[s]["best_acc1"] for s in seeds]
            per = ", ".join(f"s{s} {a:.2f}" for s, a in zip(seeds, acc))
            if arm.startswith("dsq"):
                w = [x for x in (spread(runs[s], "weight") for s in seeds) if x is not None]
                a = [x for x in (spread(runs[s], "act") for s in seeds) if x is not None]
                sp = f"{run_records.mean_sd(w, '{:.3f}')} / {run_records.mean_sd(a, '{:.3f}')}"
            else:
                sp = "-"
            vs_uniform = (
                "-" if arm in ("uniform_bfix", "float_ft") else _paired(runs, arms.get("uniform_bfix"))
            )
            vs_float = "-" if arm == "float_ft" else _paired(runs, arms.get("float_ft"))
            commits = ", ".join(sorted({runs[s].get("commit") or "?" for s in seeds}))
            lines.append(
                f"| {label} | {per} | {run_records.mean_sd(acc)} | {vs_uniform} | {vs_float} | {sp} | {commits} |"
            )
        lines.append("")
        pairs = [(a, b) for a, b in PAIRS if a in arms and b in arms]
        if pairs:
            lines += ["Paired by seed, mean +- sd (per seed):", ""]
            lines += [f"- {LABEL[a]} minus {LABEL[b]}: {_paired(arms[a], arms[b])}" for a, b in pairs]
            lines.append("")
    return "\n".join(lines)


def alpha_table(records: dict, arm: str = "dsq_a1000") -> str:
    """Every final alpha of one arm, per layer and seed (W and A)."""
    lines = []
    for recipe in sorted(records):
        runs = records[recipe].get(arm)
        if not runs:
            continue
        seeds = sorted(runs)
        lines += [
            f"### alpha at the end: {LABEL[arm]}, {_recipe(recipe)}",
            "",
            "| layer | weight alpha, "
            + ", ".join(f"s{s}" for s in seeds)
            + " | act. alpha, "
            + ", ".join(f"s{s}" for s in seeds)
            + " |",
            "|---|---|---|",
        ]
        w = {s: alphas(runs[s], "weight") for s in seeds}
        a = {s: alphas(runs[s], "act") for s in seeds}
        for layer in w[seeds[0]]:
            ws = ", ".join(f"{w[s][layer]:.3f}" for s in seeds)
            acts = ", ".join(f"{a[s][layer]:.3f}" for s in seeds)
            lines.append(f"| {layer} | {ws} | {acts} |")
        lines.append("")
    return "\n".join(lines)


def figure(records: dict, path: str, arm: str = "dsq_a1000", seed: int = 0) -> None:
    """alpha after each epoch, one line per quantizer: a row per recipe, weights | activations."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recipes = [r for r in sorted(records) if seed in records[r].get(arm, {})]
    fig, axes = plt.subplots(len(recipes), 2, figsize=(10, 3.6 * len(recipes)), squeeze=False)
    for row, recipe in zip(axes, recipes):
        rec = records[recipe][arm][seed]
        start = {k: rec["quant"][k]["alpha_init"] for k in ("weight", "act")}
        for ax, kind, title in zip(row, ("weight", "act"), ("weights", "activations")):
            for name, values in rec.get("alpha_per_epoch", {}).items():
                if name.endswith("." + kind):
                    ys = [start[kind]] + [_clamped(v) for v in values]
                    ax.plot(range(len(ys)), ys, marker=".", lw=1)
            ax.set_title(f"{_recipe(recipe)}: {title}", fontsize=9)
            ax.set_xticks(range(len(rec["epochs"]) + 1))
            ax.set_xlabel("epochs of fine-tuning")
            ax.set_ylabel("alpha")
            ax.set_ylim(0, 0.52)
            ax.axhline(ALPHA_MAX, color="grey", lw=0.8, ls="--")
    fig.suptitle(f"alpha per layer after each epoch: {LABEL[arm]}, seed {seed}", fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=110)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--results", default=os.path.join(HERE, "results"))
    p.add_argument("--out", default=None, help="also write the tables to this file")
    p.add_argument("--figure", default=None, help="write the alpha trajectories (PNG) here")
    args = p.parse_args()
    records = read_records(args.results)
    text = table(records) + "\n" + alpha_table(records)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    if args.figure:
        figure(records, args.figure)


if __name__ == "__main__":
    main()
