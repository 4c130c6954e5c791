"""What the study scripts read back from runs: a run directory's TensorBoard scalars, and
the committed run records (experiments/results/NAME.json, written by record_run.py)."""

import json
import os
import re
import statistics


def tensorboard_scalars(run_dir: str) -> dict:
    """{tag: [(step, value), ...]} of the TensorBoard events train.py wrote to run_dir."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(run_dir, size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def read_records(folder: str, name_re: re.Pattern):
    """(match of name_re on the record's name, record) for every finished run (rc 0) in folder."""
    for f in sorted(os.listdir(folder)):
        m = name_re.match(f.removesuffix(".json"))
        if not f.endswith(".json") or not m:
            continue
        rec = json.load(open(os.path.join(folder, f)))
        if rec.get("rc") == 0:
            yield m, rec


def mean_sd(values, fmt: str = "{:.2f}") -> str:
    """'mean +- sd' of values in fmt ('-' for none, the value alone for one); the sd unsigned."""
    if not values:
        return "-"
    if len(values) == 1:
        return fmt.format(values[0])
    return f"{fmt.format(statistics.mean(values))} +- {fmt.replace('+', '').format(statistics.stdev(values))}"
