#!/usr/bin/env python
"""Training-step benchmark: torchvision ResNet-18, one SGD step, float vs quantized W4A4.

Variants (same initial weights, same batch):

  float         the plain model
  dsq           dsq_ext.quantize_model(model, "dsq", 4, 4)      (fused C/CUDA op; the layers'
                default recompute=True: one autograd node per layer, which keeps the float
                input and weight and quantizes them again in backward)
  dsq_keep      the same with recompute=False: the quantizer ops and F.conv2d as three
                autograd nodes, the convolution keeping the quantized input and weight
  uniform       dsq_ext.quantize_model(model, "uniform", 4, 4)  (fused op, straight-through)
  uniform_keep  the same with recompute=False
  composite     the dsq_keep model on the free grid, with the op swapped for DSQ written in
                torch ops (what common implementations do; autograd derives the backward)

A step is zero_grad, forward, cross-entropy, backward, optimizer step. After
warm-up steps (the first sets the learned bounds), every round runs each
variant once, A B C D A B C D ..., and the reported ratio is the median of the
per-round ratios to float, which keeps a shared machine's slow drifts out of it;
"time / keep" is the same paired ratio of a recompute variant to its _keep twin.

Memory: "saved for bwd" is the bytes of the unique storages autograd keeps for
backward (saved_tensors_hooks, during the last warm-up step), on every device;
"excl. params" leaves out the storages of the model's parameters, which exist
anyway. On CUDA the peak of torch.cuda.max_memory_allocated over a step is
reported as well.

    python bench/bench_step.py                      # cuda if present: batch 128 at 224 px
    python bench/bench_step.py --device cpu         # batch 16 at 112 px
    python bench/bench_step.py --quick              # tiny, a few seconds (smoke test)
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import math
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import dsq_ext  # noqa: E402

VARIANTS = ("float", "dsq", "dsq_keep", "uniform", "uniform_keep", "composite")


def build_models(variants, num_classes, device, w_bits, a_bits, per_channel, grid):
    import torchvision

    torch.manual_seed(0)
    base = torchvision.models.resnet18(num_classes=num_classes)
    models = {}
    for v in variants:
        m = copy.deepcopy(base)
        if v != "float":
            # composite swaps the op that the unfused layers (recompute=False) call
            method = "dsq" if v == "composite" else v.removesuffix("_keep")
            recompute = v in ("dsq", "uniform")
            # the composite computes the paper's free grid; the others --grid
            dsq_ext.quantize_model(
                m, method, w_bits, a_bits, per_channel=per_channel, recompute=recompute,
                grid="free" if v == "composite" else grid,
            )  # fmt: skip
        models[v] = m.to(device).train()
    return models


class Runner:
    def __init__(self, name, model, lr, weight_decay):
        self.name = name
        self.model = model
        # Quantizer parameters (lower, upper, alpha) are kept out of weight decay.
        self.opt = torch.optim.SGD(dsq_ext.param_groups(model, weight_decay, lr), lr=lr, momentum=0.9)
        self.param_ptrs = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def context(self):
        return common.composite_in_layers() if self.name == "composite" else contextlib.nullcontext()

    def step(self, x, y):
        with self.context():
            self.opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(self.model(x), y)
            loss.backward()
            self.opt.step()
        self.last_loss = loss.detach()

    def saved_bytes(self, x, y):
        """(all, excluding parameters) bytes saved for backward by one full step."""
        with self.context():
            self.opt.zero_grad(set_to_none=True)
            with common.SavedBytes() as sb:
                loss = F.cross_entropy(self.model(x), y)
            loss.backward()
            self.opt.step()
        total = sb.nbytes
        excl = sum(n for (dev, ptr), n in sb.seen.items() if ptr not in self.param_ptrs)
        return total, excl


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu"
    )
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (--quick: 1)")
    p.add_argument("--batch", type=int, default=None, help="default: cuda 128, cpu 16, --quick 2")
    p.add_argument("--image-size", type=int, default=None, help="default: cuda 224, cpu 112, --quick 32")
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument(
        "--reps", type=int, default=None, help="timed rounds (default: cuda 20, cpu 10, --quick 2)"
    )
    p.add_argument(
        "--warmup", type=int, default=None, help="untimed steps first, >= 1 (default 2, --quick 1)"
    )
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma list of " + ",".join(VARIANTS))
    p.add_argument("--w-bits", type=int, default=4)
    p.add_argument("--a-bits", type=int, default=4)
    p.add_argument("--per-channel", action="store_true", help="per-channel weight bounds")
    p.add_argument(
        "--grid",
        default=dsq_ext.QuantConfig().grid,
        choices=("free", "affine", "symmetric"),
        help="the quantized variants' grid (default: the layers' default; composite: always free)",
    )
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--quick", action="store_true", help="tiny batch and image, two rounds: a smoke test")
    p.add_argument(
        "--no-malloc-tuning",
        action="store_true",
        help="leave glibc's heap trimming on (by default freed memory is kept, see common.keep_freed_memory)",
    )
    p.add_argument(
        "--profile",
        default="",
        metavar="VARIANTS",
        help="comma list of variants to run one more step of under torch.profiler, printing "
        "their kernel count, device time against wall time, and the costliest ops",
    )
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    args = p.parse_args(argv)

    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but torch.cuda.is_available() is False")
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if args.threads is None and args.quick:
        # A smoke test often runs beside other jobs; an OpenMP team that waits for a
        # descheduled thread can turn milliseconds into seconds.
        args.threads = 1
    if args.threads:
        torch.set_num_threads(args.threads)
    batch = args.batch or (2 if args.quick else 128 if cuda else 16)
    size = args.image_size or (32 if args.quick else 224 if cuda else 112)
    reps = args.reps if args.reps is not None else (2 if args.quick else 20 if cuda else 10)
    warmup = max(1, args.warmup if args.warmup is not None else (1 if args.quick else 2))
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    for v in variants:
        if v not in VARIANTS:
            p.error(f"unknown variant {v!r}")
    if "float" in variants:
        variants.remove("float")
    variants.insert(0, "float")  # the reference of every ratio

    info = common.machine_info(device)
    info["malloc_keeps_freed_memory"] = False if args.no_malloc_tuning else common.keep_freed_memory()
    print(f"# bench_step: {info['cpu']}, {info['logical_cpus']} logical CPUs, torch {info['torch']}")
    print(
        f"resnet18, batch {batch} at {size}x{size}, {args.num_classes} classes, SGD momentum 0.9, "
        f"W{args.w_bits}A{args.a_bits}{' per-channel weights' if args.per_channel else ''}, "
        f"{args.grid} grid; device {device}"
        + (f" ({info['gpu']})" if cuda else f", {info['threads']} threads")
        + f"; {reps} rounds after {warmup} warm-up steps; load average at start "
        + (", ".join(f"{v:.2f}" for v in info["loadavg_start"]) if info["loadavg_start"] else "n/a")
        + ("; malloc keeps freed memory" if info["malloc_keeps_freed_memory"] else "")
    )

    models = build_models(
        variants, args.num_classes, device, args.w_bits, args.a_bits, args.per_channel, args.grid
    )
    runners = {v: Runner(v, models[v], args.lr, args.weight_decay) for v in variants}
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, size, size, generator=gen).to(device)
    y = torch.randint(0, args.num_classes, (batch,), generator=gen).to(device)

    saved = {}
    for v, r in runners.items():
        for _ in range(warmup - 1):
            r.step(x, y)
        # The last warm-up step doubles as the memory measurement (it is untimed).
        saved[v] = r.saved_bytes(x, y)
    common.sync(device)

    times = {v: [] for v in variants}
    cpu_times = {v: [] for v in variants}
    peaks = {v: [] for v in variants}
    losses = {}
    for i in range(reps):
        # Every other round runs backwards, so that no variant always follows the same one.
        for v in variants if i % 2 == 0 else variants[::-1]:
            r = runners[v]
            if cuda:
                torch.cuda.reset_peak_memory_stats(device)
            cpu0 = time.process_time()
            times[v].append(common.timed(functools.partial(r.step, x, y), device))
            cpu_times[v].append(time.process_time() - cpu0)
            if cuda:
                peaks[v].append(torch.cuda.max_memory_allocated(device))
            losses[v] = float(r.last_loss)

    rows = []
    for v in variants:
        rec = {
            "variant": v,
            "step_s": common.median(times[v]),
            "images_per_s": batch / common.median(times[v]),
            "step_min_s": min(times[v]),
            "time_over_float": common.median([a / b for a, b in zip(times[v], times["float"])]),
            "time_min_over_float": min(times[v]) / min(times["float"]),
            "saved_bytes": saved[v][0],
            "saved_bytes_excl_params": saved[v][1],
            "saved_over_float": saved[v][0] / saved["float"][0],
            "saved_excl_params_over_float": saved[v][1] / saved["float"][1],
            "last_loss": losses[v],
            "step_samples_s": times[v],
            "cpu_samples_s": cpu_times[v],
        }
        twin = v + "_keep"
        if twin in times:
            # recompute against the unfused layers, paired round by round
            rec["time_over_keep"] = common.median([a / b for a, b in zip(times[v], times[twin])])
            rec["time_min_over_keep"] = min(times[v]) / min(times[twin])
            rec["time_over_keep_rounds"] = [a / b for a, b in zip(times[v], times[twin])]
            rec["cpu_over_keep_rounds"] = [a / b for a, b in zip(cpu_times[v], cpu_times[twin])]
        if cuda:
            rec["peak_allocated_bytes"] = common.median(peaks[v])
            rec["peak_over_float"] = common.median([a / b for a, b in zip(peaks[v], peaks["float"])])
        rows.append(rec)

    header = [
        "variant",
        "step ms",
        "img/s",
        "time / float",
        "time / keep",
        "saved for bwd",
        "/ float",
        "excl. params",
        "/ float",
    ]
    if cuda:
        header += ["peak allocated", "/ float"]
    body = []
    for r in rows:
        line = [
            r["variant"],
            f"{common.fmt_ms(r['step_s'])} ({common.fmt_ms(r['step_min_s'])})",
            f"{r['images_per_s']:.1f}",
            f"{common.fmt_ratio(r['time_over_float'])} ({common.fmt_ratio(r['time_min_over_float'])})",
            f"{common.fmt_ratio(r['time_over_keep'])} ({common.fmt_ratio(r['time_min_over_keep'])})"
            if "time_over_keep" in r
            else "-",
            common.fmt_bytes(r["saved_bytes"]),
            common.fmt_ratio(r["saved_over_float"]),
            common.fmt_bytes(r["saved_bytes_excl_params"]),
            common.fmt_ratio(r["saved_excl_params_over_float"]),
        ]
        if cuda:
            line += [common.fmt_bytes(r["peak_allocated_bytes"]), common.fmt_ratio(r["peak_over_float"])]
        body.append(line)
    print()
    print(common.markdown_table(header, body))
    mem_note = (
        "memory: saved_tensors_hooks bytes (all devices) and torch.cuda.max_memory_allocated"
        if cuda
        else "memory: bytes saved for backward (saved_tensors_hooks); no allocator peak on CPU"
    )
    print(
        f"\n{mem_note}. Cells read 'median (best)': step times are medians (minima), time ratios "
        "are medians of per-round ratios to float or to the _keep twin (ratios of minima)."
    )
    if not cuda:
        print_cpu_time_table(rows, cpu_times)
    bad = [v for v in variants if not math.isfinite(losses[v])]
    if bad:
        print(f"warning: non-finite loss in {', '.join(bad)} (timings of NaN steps are not representative)")

    profiles = {}
    for v in [v.strip() for v in args.profile.split(",") if v.strip()]:
        if v not in runners:
            p.error(f"--profile {v!r} is not among the variants run")
        profiles[v] = profile_step(runners[v], x, y, device)

    common.finish(
        info,
        args.json,
        {"args": vars(args), "batch": batch, "image_size": size, "reps": reps, "warmup": warmup}
        | {"results": rows, "profiles": profiles},
    )
    return 0


def _quartiles(xs) -> str:
    if len(xs) < 2:
        return "-"
    q1, _, q3 = statistics.quantiles(xs, n=4)
    return f"[{q1:.3f}, {q3:.3f}]"


def _ci(xs) -> str:
    lo, hi = common.median_ci(xs)
    return "-" if math.isnan(lo) else f"[{lo:.3f}, {hi:.3f}]"


def print_cpu_time_table(rows, cpu_times) -> None:
    """Process CPU time of each step: on a shared machine, time spent descheduled does not count."""
    body = []
    for r in rows:
        v = r["variant"]
        per_round = [a / b for a, b in zip(cpu_times[v], cpu_times["float"])]
        keep = r.get("cpu_over_keep_rounds")
        wall_keep = r.get("time_over_keep_rounds")
        body.append(
            [
                v,
                f"{common.fmt_ms(common.median(cpu_times[v]))} ({common.fmt_ms(min(cpu_times[v]))})",
                f"{common.median(per_round):.3f} {_quartiles(per_round)}",
                f"{common.median(keep):.3f} {_quartiles(keep)}" if keep else "-",
                _ci(keep) if keep else "-",
                f"{common.median(wall_keep):.3f} {_quartiles(wall_keep)}" if wall_keep else "-",
            ]
        )
        r["cpu_over_float"] = common.median(per_round)
        if keep:
            r["cpu_over_keep"] = common.median(keep)
            r["cpu_over_keep_ci95"] = list(common.median_ci(keep))
    print()
    print(
        common.markdown_table(
            [
                "variant",
                "cpu ms",
                "cpu / float [q1, q3]",
                "cpu / keep [q1, q3]",
                "95% CI",
                "time / keep [q1, q3]",
            ],
            body,
        )
    )
    print(
        "\nProcess CPU time (time.process_time) of the same steps; ratios are medians of the "
        "per-round ratios, with their quartiles over the rounds and, for cpu / keep, the 95% "
        "confidence interval of that median (common.median_ci)."
    )


def profile_step(runner, x, y, device) -> dict:
    """One step under torch.profiler: how many kernels, how busy the device was, and where."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    common.sync(device)
    with profile(activities=activities) as prof:
        wall = common.timed(functools.partial(runner.step, x, y), device)
    events = prof.key_averages()
    sort = "self_device_time_total" if cuda else "self_cpu_time_total"
    kernels = [e for e in prof.events() if cuda and e.device_type == torch.autograd.DeviceType.CUDA]
    busy = sum(e.time_range.elapsed_us() for e in kernels) / 1e6 if cuda else float("nan")
    print(f"\n### profile of one {runner.name} step: wall {wall * 1e3:.2f} ms (under the profiler)")
    if cuda:
        print(
            f"{len(kernels)} kernels, {busy * 1e3:.2f} ms of device time ({busy / wall:.0%} of the wall time)"
        )
    print(events.table(sort_by=sort, row_limit=15, max_name_column_width=60))
    return {"wall_s": wall, "kernels": len(kernels), "device_busy_s": busy}


if __name__ == "__main__":
    sys.exit(main())
