"""Reads the runs of experiments/run_study.sh and writes the study's tables and figures.

    .venv/bin/python experiments/make_results.py [--runs runs]

Writes
  experiments/results_tables.md          the tables (pasted into RESULTS.md)
  experiments/dsq_w4a4_alpha.md          `python -m dsq_ext.report` of the DSQ W4A4 model
  experiments/figures/dsq_w4a4_alpha.png its --plot
  experiments/figures/curves_w2a2.png    training curves of float, uniform W2A2 and DSQ W2A2
  experiments/figures/curves_w2a2_p99.png  the same with --act-percentile 99 (run_percentile.sh)

Accuracies are read from the TensorBoard events that train.py writes to each run's
--log_path (tags val/acc1, val/acc5, train/loss, train/acc1; one point per epoch), wall
times from runs/NAME/done, commands from runs/NAME/command.txt. The per-step curves
are the running epoch averages that train.py prints every -p steps (train.log).
"""

import argparse
import os
import re
import statistics
import subprocess
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from run_records import tensorboard_scalars as scalars  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
FIGURES = os.path.join(HERE, "figures")

# (method, W/A bits, activation bounds from, run-name prefix); the rows of the main table, float first.
ROWS = [
    ("float", "32/32", "", "float"),
    ("float +1 epoch lr 0.01 (control)", "32/32", "", "float_ft1"),
    ("uniform", "4/4", "min/max", "uniform_w4a4"),
    ("DSQ", "4/4", "min/max", "dsq_w4a4"),
    ("uniform", "4/4", "p99.9", "uniform_w4a4_p999"),
    ("DSQ", "4/4", "p99.9", "dsq_w4a4_p999"),
    ("uniform", "3/3", "min/max", "uniform_w3a3"),
    ("DSQ", "3/3", "min/max", "dsq_w3a3"),
    ("uniform", "2/2", "min/max", "uniform_w2a2"),
    ("DSQ", "2/2", "min/max", "dsq_w2a2"),
    ("uniform", "2/2", "p99", "uniform_w2a2_p99"),
    ("DSQ", "2/2", "p99", "dsq_w2a2_p99"),
    ("uniform", "2/2", "p99", "uniform_w2a2_p99_ep3"),
    ("DSQ", "2/2", "p99", "dsq_w2a2_p99_ep3"),
]
RUN_RE = re.compile(r"^(?P<prefix>.+)_s(?P<seed>\d+)$")
STEP_RE = re.compile(
    r"^Epoch: \[(?P<epoch>\d+)\]\[\s*(?P<step>\d+)/(?P<steps>\d+)\].*?"
    r"Loss (?P<loss>\S+) \((?P<loss_avg>\S+)\)\s+Acc@1\s+(?P<acc1>\S+) \(\s*(?P<acc1_avg>\S+)\)"
)


def read_run(runs, name):
    d = os.path.join(runs, name)
    done = os.path.join(d, "done")
    if not os.path.isfile(done):
        return None
    fields = dict(kv.split("=") for kv in open(done).read().split())
    if fields.get("rc") != "0":
        return None
    s = scalars(d)
    if "val/acc1" not in s:
        return None
    cmd_file = os.path.join(d, "command.txt")
    steps = []
    log = os.path.join(d, "train.log")
    if os.path.isfile(log):
        for line in open(log):
            m = STEP_RE.match(line.strip())
            if m:
                steps.append(
                    (
                        int(m["epoch"]),
                        int(m["step"]),
                        int(m["steps"]),
                        float(m["loss_avg"]),
                        float(m["acc1_avg"]),
                    )
                )
    return {
        "name": name,
        "dir": d,
        "wall_s": int(fields["wall_s"]),
        "epochs": len(s["val/acc1"]),
        "acc1": s["val/acc1"][-1][1],
        "acc5": s["val/acc5"][-1][1],
        "best_acc1": max(v for _, v in s["val/acc1"]),
        "scalars": s,
        "steps": steps,
        "command": open(cmd_file).read().strip() if os.path.isfile(cmd_file) else "",
    }


def paired_row(by_prefix, label, prefix, baseline):
    """A table row of top-1 differences prefix - baseline over their common seeds, or None."""
    a, b = dict(by_prefix.get(prefix, [])), dict(by_prefix.get(baseline, []))
    seeds = sorted(set(a) & set(b))
    if not seeds:
        return None
    diffs = [a[s]["acc1"] - b[s]["acc1"] for s in seeds]
    per = ", ".join(f"{x:+.2f}" for x in diffs)
    sd = f"{statistics.stdev(diffs):.2f}" if len(diffs) > 1 else "-"
    return f"| {label} | {per} | {statistics.mean(diffs):+.2f} | {sd} | {','.join(map(str, seeds))} |"


def fmt_mean(values, digits=2):
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    m = statistics.mean(values)
    return f"{m:.{digits}f} ({min(values):.{digits}f}-{max(values):.{digits}f})"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", default=os.path.join(ROOT, "runs"))
    args = parser.parse_args()
    os.makedirs(FIGURES, exist_ok=True)

    names = sorted(n for n in os.listdir(args.runs) if os.path.isdir(os.path.join(args.runs, n)))
    runs = {n: r for n in names if (r := read_run(args.runs, n)) is not None}
    by_prefix = {}
    for n, r in runs.items():
        m = RUN_RE.match(n)
        if m:
            by_prefix.setdefault(m["prefix"], []).append((int(m["seed"]), r))

    lines = []
    lines.append(
        "| method | W/A bits | act. bounds from | epochs | seeds | top-1 (%) | top-5 (%) "
        "| top-1 per seed | wall time per run (s) |"
    )
    lines.append("|---|---|---|---|---|---|---|---|---|")
    main_names = set()
    for method, bits, init, prefix in ROWS:
        got = sorted(by_prefix.get(prefix, []), key=lambda t: t[0])
        if not got:
            lines.append(f"| {method} | {bits} | {init} | - | - | not run | | | |")
            continue
        main_names.update(r["name"] for _, r in got)
        seeds = ",".join(str(s) for s, _ in got)
        a1 = [r["acc1"] for _, r in got]
        a5 = [r["acc5"] for _, r in got]
        per_seed = ", ".join(f"{r['acc1']:.2f}" for _, r in got)
        walls = ", ".join(str(r["wall_s"]) for _, r in got)
        epochs = ",".join(sorted({str(r["epochs"]) for _, r in got}))
        if prefix != "float":
            epochs = f"2 float + {epochs}"
        lines.append(
            f"| {method} | {bits} | {init} | {epochs} | {seeds} | {fmt_mean(a1)} | {fmt_mean(a5)} "
            f"| {per_seed} | {walls} |"
        )
    lines.append("")
    lines.append(
        "top-1/top-5: validation (the 10,000 test images) after the last epoch, from `val/acc1`, `val/acc5`; "
        "with several seeds, mean (min-max)."
    )

    # Paired by seed (the seed fixes the data order and augmentation): DSQ minus uniform.
    lines.append("")
    lines.append("DSQ minus uniform, top-1 points, paired by seed:")
    lines.append("")
    lines.append("| W/A bits | per seed | mean | sd | seeds |")
    lines.append("|---|---|---|---|---|")
    pairs = [(f"{b}/{b}", f"dsq_w{b}a{b}", f"uniform_w{b}a{b}") for b in (4, 3, 2)] + [
        ("2/2, DSQ --alpha-init 0.5 (investigation)", "dsq_w2a2_a05", "uniform_w2a2"),
        ("2/2, both 2 fine-tuning epochs (investigation)", "dsq_w2a2_ep2", "uniform_w2a2_ep2"),
        ("4/4, act. bounds p99.9", "dsq_w4a4_p999", "uniform_w4a4_p999"),
        ("2/2, act. bounds p99", "dsq_w2a2_p99", "uniform_w2a2_p99"),
        ("2/2, act. bounds p99, 3 fine-tuning epochs", "dsq_w2a2_p99_ep3", "uniform_w2a2_p99_ep3"),
    ]
    lines.extend(r for label, dp, up in pairs if (r := paired_row(by_prefix, label, dp, up)))

    # Against the float model given the same extra epoch (float_ft1), paired by seed.
    controls = (
        ("uniform 4/4, min/max", "uniform_w4a4"),
        ("DSQ 4/4, min/max", "dsq_w4a4"),
        ("uniform 4/4, p99.9", "uniform_w4a4_p999"),
        ("DSQ 4/4, p99.9", "dsq_w4a4_p999"),
    )
    rows = [r for label, prefix in controls if (r := paired_row(by_prefix, label, prefix, "float_ft1"))]
    if rows:
        lines.append("")
        lines.append("Quantized minus the float control (float +1 epoch, same seed), top-1 points:")
        lines.append("")
        lines.append("| model | per seed | mean | sd | seeds |")
        lines.append("|---|---|---|---|---|")
        lines.extend(rows)

    # Runs outside the main table (investigations).
    extra = [r for n, r in runs.items() if n not in main_names]
    if extra:
        lines.append("")
        lines.append("Other runs:")
        lines.append("")
        lines.append("| run | fine-tuning epochs | top-1 (%) | top-5 (%) | wall time (s) |")
        lines.append("|---|---|---|---|---|")
        for r in extra:
            lines.append(
                f"| {r['name']} | {r['epochs']} | {r['acc1']:.2f} | {r['acc5']:.2f} | {r['wall_s']} |"
            )
        groups = {}
        for r in extra:
            m = RUN_RE.match(r["name"])
            if m:
                groups.setdefault(m["prefix"], []).append(r["acc1"])
        for prefix, vals in groups.items():
            if len(vals) > 1:
                lines.append(f"| {prefix}, {len(vals)} seeds | | {fmt_mean(vals)} | | |")

    lines.append("")
    lines.append(
        "Commands (run from the repository root; `experiments/run_study.sh NAME`, "
        "`experiments/run_investigation.sh NAME` or `experiments/run_percentile.sh NAME` "
        "runs one, by the name in the comment):"
    )
    lines.append("")
    lines.append("```")
    for n in names:
        if n in runs and runs[n]["command"]:
            lines.append(f"# {n}")
            lines.append(runs[n]["command"])
    lines.append("```")
    total = sum(r["wall_s"] for r in runs.values())
    lines.append("")
    lines.append(f"Total wall time of these runs: {total} s ({total / 60:.1f} min).")
    table = "\n".join(lines) + "\n"
    with open(os.path.join(HERE, "results_tables.md"), "w") as f:
        f.write(table)
    print(table)

    # The learned alpha of DSQ W4A4.
    w4 = runs.get("dsq_w4a4_s0")
    if w4 is not None:
        ckpt = os.path.relpath(os.path.join(w4["dir"], "model_best.pth.tar"), ROOT)
        png = os.path.relpath(os.path.join(FIGURES, "dsq_w4a4_alpha.png"), ROOT)
        rep = subprocess.run(
            [sys.executable, "-m", "dsq_ext.report", ckpt, "--plot", png],
            cwd=ROOT,
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        with open(os.path.join(HERE, "dsq_w4a4_alpha.md"), "w") as f:
            f.write(rep)
        print(rep)

    plot_curves(runs, "", "curves_w2a2.png", "first-batch min/max activation bounds")
    plot_curves(
        runs, "_p99", "curves_w2a2_p99.png", "activation bounds from the first batch's 1st/99th percentiles"
    )


def plot_curves(runs, variant, filename, what):
    """Float, uniform W2A2 and DSQ W2A2: running training loss/top-1 per step, and val top-1 per epoch."""
    float_run = runs.get("float_s0")
    if float_run is None:
        return
    float_steps = float_run["epochs"] * (float_run["steps"][0][2] if float_run["steps"] else 469)
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.6))
    series = [
        ("float_s0", "float (2 epochs, lr 0.1)", "black", "-"),
        ("float_ft1_s0", "float +1 epoch lr 0.01 (control)", "gray", "-"),
    ]
    for seed, ls in ((0, "-"), (1, "--"), (2, ":")):
        series.append((f"uniform_w2a2{variant}_s{seed}", f"uniform W2A2 seed {seed}", "tab:blue", ls))
        series.append((f"dsq_w2a2{variant}_s{seed}", f"DSQ W2A2 seed {seed}", "tab:red", ls))
    for name, label, color, ls in series:
        r = runs.get(name)
        if r is None:
            continue
        first = name == "float_s0"
        offset = 0 if first else float_steps
        xs = [offset + e * st + s for e, s, st, _, _ in r["steps"]]
        axes[0].plot(xs, [p[3] for p in r["steps"]], ls, color=color, label=label)
        axes[1].plot(xs, [p[4] for p in r["steps"]], ls, color=color, label=label)
        # TensorBoard, one point per epoch: x = epochs completed, fine-tuning after the float epochs.
        ep0 = 0 if first else float_run["epochs"]
        v = r["scalars"]["val/acc1"]
        xs_v = [ep0 + step + 1 for step, _ in v]
        ys_v = [val for _, val in v]
        if not first:
            xs_v = [float_run["epochs"]] + xs_v
            ys_v = [float_run["scalars"]["val/acc1"][-1][1]] + ys_v
        axes[2].plot(xs_v, ys_v, ls, color=color, marker="o", label=label)
    axes[0].set_title("training loss (running average over the epoch, train.log)")
    axes[0].set_xlabel("step (batches of 128); fine-tuning starts from the float model at the dotted line")
    axes[0].set_yscale("log")
    axes[1].set_title("training top-1 % (running average over the epoch)")
    axes[1].set_xlabel("step")
    axes[2].set_title("validation top-1 % (TensorBoard val/acc1)")
    axes[2].set_xlabel("epochs (fine-tuning: epoch 3, from the float model after epoch 2)")
    for ax in axes[:2]:
        ax.axvline(float_steps, color="gray", ls=":")
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[2].legend(fontsize=8)
    fig.suptitle(
        "ResNet-18 on Fashion-MNIST 32x32: float, then 1 epoch of W2A2 fine-tuning (uniform STE vs DSQ), "
        + what
    )
    fig.tight_layout()
    fig.savefig(os.path.join(FIGURES, filename), dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
