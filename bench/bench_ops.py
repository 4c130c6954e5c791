#!/usr/bin/env python
"""Operator benchmark: dsq_ext.dsq_quantize and uniform_quantize against their baselines.

For every (size, dtype, granularity) it times the forward (with autograd
recording, as in training) and the forward+backward of:

  copy                y = x * 1: the memory-traffic floor of an elementwise op
  dsq                 dsq_ext.dsq_quantize, learnable lower, upper and alpha
  uniform             dsq_ext.uniform_quantize, learnable lower and upper
  fq                  torch.fake_quantize_per_{tensor,channel}_affine (4 bit, 0..15)
  fq_learnable        torch._fake_quantize_learnable_per_{tensor,channel}_affine
  composite           DSQ written in torch ops, backward by autograd
  composite_compiled  the same under torch.compile

and, when named in --candidates, dsq_affine, uniform_affine, dsq_symmetric and
uniform_symmetric: the two ops on their integer grids (grid="affine" /
"symmetric"; dsq and uniform are the default, free grid)

and reports medians, the median of the per-round ratios to the copy floor
(every round runs all candidates, A B C A B C ..., so slow drifts of a shared
machine hit them alike), and the bytes each keeps alive for backward.

    python bench/bench_ops.py                 # full run on cuda if present, else cpu
    python bench/bench_ops.py --quick         # tiny sizes, a few seconds (smoke test)
    python bench/bench_ops.py --device cpu --dtypes float32 --json out.json
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402
import torch  # noqa: E402

import dsq_ext  # noqa: E402

BITS = 4
QMIN, QMAX = 0, 2**BITS - 1
ALPHA = 0.2

SIZES = {"act": (16, 64, 56, 56), "weight": (512, 512, 3, 3)}
QUICK_SIZES = {"act": (2, 8, 14, 14), "weight": (32, 16, 3, 3)}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
GRANULARITIES = ("per_tensor", "per_channel")
CANDIDATES = ("copy", "dsq", "uniform", "fq", "fq_learnable", "composite", "composite_compiled")
# Run only when asked for: the ops on the integer grids.
GRID_CANDIDATES = ("dsq_affine", "uniform_affine", "dsq_symmetric", "uniform_symmetric")


def parse_sizes(spec: str, quick: bool) -> list[tuple[str, tuple[int, ...]]]:
    table = QUICK_SIZES if quick else SIZES
    out = []
    for item in spec.split(","):
        item = item.strip()
        if not item:
            continue
        if item in table:
            out.append((item, table[item]))
        else:
            shape = tuple(int(d) for d in item.lower().split("x"))
            out.append((item, shape))
    return out


def shape_str(shape) -> str:
    return "x".join(str(d) for d in shape)


def size_name(label: str, shape) -> str:
    return label if label == shape_str(shape) else f"{label} {shape_str(shape)}"


class Case:
    """One candidate on one input: closures for forward, forward+backward, and its leaves."""

    def __init__(self, name, fwd, leaves, grad_out):
        self.name = name
        self._fwd = fwd
        self.leaves = leaves
        self.grad_out = grad_out

    def clear_grads(self):
        for t in self.leaves:
            t.grad = None

    def forward(self):
        return self._fwd()

    def forward_backward(self):
        self._fwd().backward(self.grad_out)

    def forward_backward_fresh(self):
        # Cleared first so that repeated calls never pay for gradient accumulation.
        self.clear_grads()
        self.forward_backward()


def make_inputs(shape, dtype, device, per_channel: bool, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen).to(device=device, dtype=dtype)
    g = torch.randn(shape, generator=gen).to(device=device, dtype=dtype)
    c = shape[0]
    if per_channel:
        # Spread the bounds so each channel really has its own grid.
        lo = -2.0 - 0.5 * torch.rand(c, generator=gen)
        hi = 2.0 + 0.5 * torch.rand(c, generator=gen)
    else:
        lo, hi = torch.tensor(-2.0), torch.tensor(2.0)
    return x, g, lo.to(device), hi.to(device)


def build_case(name, x0, g, lo, hi, per_channel: bool) -> Case:
    """A fresh leaf copy of x and fresh parameters, so candidates share no autograd state."""
    dev = x0.device
    x = x0.detach().clone().requires_grad_(True)
    # Parameters stay float32 (what dsq_ext.nn keeps for a float32 model and what
    # torch's fake-quant ops require); the ops widen x to float internally anyway.
    l = lo.detach().clone().float().requires_grad_(True)
    u = hi.detach().clone().float().requires_grad_(True)
    a = torch.tensor(ALPHA, device=dev, requires_grad=True)
    scale = ((hi - lo) / QMAX).float()
    zp = torch.round(-lo / scale).clamp(QMIN, QMAX)

    if name == "copy":
        return Case(name, lambda: x * 1, [x], g)
    if name == "dsq":
        return Case(name, lambda: dsq_ext.dsq_quantize(x, l, u, a, BITS), [x, l, u, a], g)
    if name == "uniform":
        return Case(name, lambda: dsq_ext.uniform_quantize(x, l, u, BITS), [x, l, u], g)
    if name in GRID_CANDIDATES:
        method, grid = name.split("_")
        if method == "dsq":
            return Case(name, lambda: dsq_ext.dsq_quantize(x, l, u, a, BITS, grid=grid), [x, l, u, a], g)
        return Case(name, lambda: dsq_ext.uniform_quantize(x, l, u, BITS, grid=grid), [x, l, u], g)
    if name == "composite":
        return Case(name, lambda: common.dsq_composite(x, l, u, a, BITS), [x, l, u, a], g)
    if name == "composite_compiled":
        # A fresh compile per configuration: dynamic=False specialises on shape and
        # dtype, and Dynamo's per-function recompile limit would otherwise be hit.
        torch._dynamo.reset()
        fn = torch.compile(common.dsq_composite, dynamic=False)
        return Case(name, lambda: fn(x, l, u, a, BITS), [x, l, u, a], g)
    if name == "fq":
        if per_channel:
            s_c = scale.detach().clone()
            z_c = zp.to(torch.int32)
            return Case(
                name, lambda: torch.fake_quantize_per_channel_affine(x, s_c, z_c, 0, QMIN, QMAX), [x], g
            )
        s_f, z_i = float(scale), int(zp)
        return Case(name, lambda: torch.fake_quantize_per_tensor_affine(x, s_f, z_i, QMIN, QMAX), [x], g)
    if name == "fq_learnable":
        s_p = scale.detach().clone().reshape(-1).requires_grad_(True)
        z_p = zp.detach().clone().float().reshape(-1).requires_grad_(True)
        if per_channel:
            fn = lambda: torch._fake_quantize_learnable_per_channel_affine(  # noqa: E731
                x, s_p, z_p, 0, QMIN, QMAX, 1.0
            )
        else:
            fn = lambda: torch._fake_quantize_learnable_per_tensor_affine(  # noqa: E731
                x, s_p, z_p, QMIN, QMAX, 1.0
            )
        return Case(name, fn, [x, s_p, z_p], g)
    raise ValueError(f"unknown candidate {name!r}")


def short_error(e: BaseException) -> str:
    msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
    msg = msg.replace("|", "/")
    return f"{type(e).__name__}: {msg[:120]}"


def pair(a, b):
    """(median of the per-round ratios a/b, best-to-best ratio) of two sample lists.

    The median is the headline; the ratio of minima is printed beside it
    because on a loaded machine the noise only ever adds time.
    """
    if not a or not b:
        return None, None
    return common.median([x / y for x, y in zip(a, b)]), min(a) / min(b)


def run_config(label, shape, dtype, device, per_channel, candidates, reps, warmup, inner, verbose):
    load = common._loadavg()
    x0, g, lo, hi = make_inputs(shape, dtype, device, per_channel)
    cases, errors, saved = {}, {}, {}
    for name in candidates:
        try:
            case = build_case(name, x0, g, lo, hi, per_channel)
            for _ in range(warmup):
                case.clear_grads()
                case.forward_backward()
            case.clear_grads()
            with common.SavedBytes() as sb:
                y = case.forward()
            saved[name] = sb.nbytes
            del y
            cases[name] = case
        except Exception as e:  # a failing baseline is a result, not a crash
            errors[name] = short_error(e)
            if verbose:
                traceback.print_exc()
    common.sync(device)

    t_fwd = {n: [] for n in cases}
    t_fb = {n: [] for n in cases}
    for _ in range(reps):
        for n, case in cases.items():
            case.clear_grads()
            t_fwd[n].append(common.timed(case.forward, device, inner))
        for n, case in cases.items():
            case.clear_grads()
            t_fb[n].append(common.timed(case.forward_backward_fresh, device, inner))
    for case in cases.values():
        case.clear_grads()

    x_bytes = x0.numel() * x0.element_size()
    rows = []
    for name in candidates:
        rec = {
            "size": label,
            "shape": list(shape),
            "dtype": str(dtype).replace("torch.", ""),
            "granularity": "per_channel" if per_channel else "per_tensor",
            "candidate": name,
            "loadavg_1min": load[0] if load else None,
        }
        if name in errors:
            rec["error"] = errors[name]
        else:
            rec["fwd_s"] = common.median(t_fwd[name])
            rec["fwd_bwd_s"] = common.median(t_fb[name])
            rec["fwd_min_s"] = min(t_fwd[name])
            rec["fwd_bwd_min_s"] = min(t_fb[name])
            if "copy" in cases:
                rec["fwd_over_copy"], rec["fwd_min_over_copy"] = pair(t_fwd[name], t_fwd["copy"])
                rec["fwd_bwd_over_copy"], rec["fwd_bwd_min_over_copy"] = pair(t_fb[name], t_fb["copy"])
            rec["saved_bytes"] = saved[name]
            rec["saved_over_x"] = saved[name] / x_bytes
            rec["fwd_samples_s"] = t_fwd[name]
            rec["fwd_bwd_samples_s"] = t_fb[name]
        rows.append(rec)
    return rows


def med_min(med, best, fmt) -> str:
    return f"{fmt(med)} ({fmt(best)})"


def noise_note(rows, limit: float = 1.5) -> str | None:
    """A warning when the copy floor's median is far above its best: the machine was busy."""
    copy = next((r for r in rows if r["candidate"] == "copy" and "error" not in r), None)
    if copy is None:
        return None
    spread = max(copy["fwd_s"] / copy["fwd_min_s"], copy["fwd_bwd_s"] / copy["fwd_bwd_min_s"])
    for r in rows:
        r["noisy"] = spread > limit
    if spread <= limit:
        return None
    return (
        f"warning: the copy floor's median is {spread:.1f}x its best time; other work was "
        "competing for the CPU, trust the (best) figures or run again"
    )


def config_table(rows) -> str:
    header = [
        "candidate",
        "fwd ms",
        "fwd / copy",
        "fwd+bwd ms",
        "fwd+bwd / copy",
        "saved for bwd",
        "saved / x",
    ]
    body = []
    for r in rows:
        if "error" in r:
            body.append([r["candidate"], f"failed: {r['error']}", "", "", "", "", ""])
            continue
        body.append(
            [
                r["candidate"],
                med_min(r["fwd_s"], r["fwd_min_s"], common.fmt_ms),
                med_min(r.get("fwd_over_copy"), r.get("fwd_min_over_copy"), common.fmt_ratio),
                med_min(r["fwd_bwd_s"], r["fwd_bwd_min_s"], common.fmt_ms),
                med_min(r.get("fwd_bwd_over_copy"), r.get("fwd_bwd_min_over_copy"), common.fmt_ratio),
                common.fmt_bytes(r["saved_bytes"]),
                f"{r['saved_over_x']:.2f}",
            ]
        )
    return common.markdown_table(header, body)


def summary_table(all_rows) -> str:
    """One line per configuration: the ratios that answer 'is the fused op worth it'.

    Every cell is the median of per-round ratios, with the ratio of the best
    times in parentheses.
    """
    groups: dict = {}
    for r in all_rows:
        key = (r["size"], tuple(r["shape"]), r["dtype"], r["granularity"])
        groups.setdefault(key, {})[r["candidate"]] = r

    def samples(d, name, field):
        r = d.get(name)
        return None if r is None or "error" in r else r.get(field)

    def cell(d, a, b, field="fwd_bwd_samples_s"):
        if a in d and "error" in d[a]:
            return "failed"
        med, best = pair(samples(d, a, field), samples(d, b, field))
        return "-" if med is None else med_min(med, best, common.fmt_ratio)

    header = [
        "size",
        "dtype",
        "granularity",
        "dsq fwd / copy",
        "dsq fwd+bwd / copy",
        "uniform fwd+bwd / copy",
        "dsq / uniform (fwd+bwd)",
        "composite / dsq (fwd+bwd)",
        "compiled / dsq (fwd+bwd)",
        "saved / x: dsq, composite, compiled",
    ]

    def sv(d, name):
        s = samples(d, name, "saved_over_x")
        return "-" if s is None else f"{s:.2f}"

    body = []
    for (label, shape, dtype, gran), d in groups.items():
        noisy = any(r.get("noisy") for r in d.values())
        body.append(
            [
                size_name(label, shape) + (" (busy machine)" if noisy else ""),
                dtype,
                gran,
                cell(d, "dsq", "copy", "fwd_samples_s"),
                cell(d, "dsq", "copy"),
                cell(d, "uniform", "copy"),
                cell(d, "dsq", "uniform"),
                cell(d, "composite", "dsq"),
                cell(d, "composite_compiled", "dsq"),
                f"{sv(d, 'dsq')}, {sv(d, 'composite')}, {sv(d, 'composite_compiled')}",
            ]
        )
    return common.markdown_table(header, body)


def run_scaling(shape, device, threads_list, reps, warmup, inner):
    """dsq_quantize (and the copy floor, for reference) at each thread count, rounds interleaved."""
    x0, g, lo, hi = make_inputs(shape, torch.float32, device, per_channel=False)
    cases = {n: build_case(n, x0, g, lo, hi, False) for n in ("copy", "dsq")}
    before = torch.get_num_threads()
    times = {(n, t, k): [] for n in cases for t in threads_list for k in ("fwd", "fwd_bwd")}
    try:
        for t in threads_list:
            torch.set_num_threads(t)
            for case in cases.values():
                for _ in range(warmup):
                    case.clear_grads()
                    case.forward_backward()
        for _ in range(reps):
            for t in threads_list:
                torch.set_num_threads(t)
                for n, case in cases.items():
                    case.clear_grads()
                    times[(n, t, "fwd")].append(common.timed(case.forward, device, inner))
                    case.clear_grads()
                    times[(n, t, "fwd_bwd")].append(common.timed(case.forward_backward_fresh, device, inner))
    finally:
        torch.set_num_threads(before)
    base = threads_list[0]
    rows = []
    for n in cases:
        for k in ("fwd", "fwd_bwd"):
            rec = {"candidate": n, "pass": k, "shape": list(shape)}
            for t in threads_list:
                rec[f"t{t}_s"] = common.median(times[(n, t, k)])
                rec[f"t{t}_min_s"] = min(times[(n, t, k)])
                rec[f"speedup_{t}"], rec[f"speedup_{t}_best"] = pair(times[(n, base, k)], times[(n, t, k)])
            rows.append(rec)
    return rows


def scaling_table(rows, threads_list) -> str:
    base = threads_list[0]
    header = ["candidate", "pass"] + [f"{t} thr ms" for t in threads_list]
    header += [f"speedup {base}->{t}" for t in threads_list[1:]]
    body = []
    for r in rows:
        line = [r["candidate"], r["pass"].replace("_", "+")]
        line += [med_min(r[f"t{t}_s"], r[f"t{t}_min_s"], common.fmt_ms) for t in threads_list]
        line += [
            med_min(r[f"speedup_{t}"], r[f"speedup_{t}_best"], common.fmt_ratio) for t in threads_list[1:]
        ]
        body.append(line)
    return common.markdown_table(header, body)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu"
    )
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (--quick: 1)")
    p.add_argument(
        "--sizes",
        default="act,weight",
        help="comma list of 'act' (16x64x56x56), 'weight' (512x512x3x3) or shapes like 8x3x32x32",
    )
    p.add_argument("--dtypes", default="float32,bfloat16", help=f"comma list of {','.join(DTYPES)}")
    p.add_argument("--granularity", default=",".join(GRANULARITIES), help="per_tensor,per_channel")
    p.add_argument(
        "--candidates",
        default=",".join(CANDIDATES),
        help="comma list of " + ",".join(CANDIDATES + GRID_CANDIDATES),
    )
    p.add_argument("--reps", type=int, default=None, help="timed rounds (default 15; --quick 3)")
    p.add_argument(
        "--warmup", type=int, default=None, help="untimed calls per candidate (default 3; --quick 1)"
    )
    p.add_argument("--inner", type=int, default=None, help="calls per timed sample (default: cuda 20, cpu 1)")
    p.add_argument(
        "--quick", action="store_true", help="tiny sizes, few rounds, no torch.compile: a smoke test"
    )
    p.add_argument(
        "--compile",
        dest="compile",
        action="store_true",
        default=None,
        help="include composite_compiled (default: on, off with --quick)",
    )
    p.add_argument("--no-compile", dest="compile", action="store_false")
    p.add_argument(
        "--scaling",
        dest="scaling",
        action="store_true",
        default=None,
        help="CPU thread scaling of dsq_quantize on the first size (default: on for cpu)",
    )
    p.add_argument("--no-scaling", dest="scaling", action="store_false")
    p.add_argument("--scaling-threads", default="1,2", help="thread counts for --scaling")
    p.add_argument(
        "--no-malloc-tuning",
        action="store_true",
        help="leave glibc's heap trimming on (by default freed memory is kept, see common.keep_freed_memory)",
    )
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    p.add_argument("--verbose", action="store_true", help="print tracebacks of failing candidates")
    args = p.parse_args(argv)

    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but torch.cuda.is_available() is False")
    device = torch.device(args.device)
    if args.threads is None and args.quick:
        # A smoke test often runs beside other jobs; an OpenMP team that waits for a
        # descheduled thread can turn milliseconds into seconds.
        args.threads = 1
    if args.threads:
        torch.set_num_threads(args.threads)
    reps = args.reps if args.reps is not None else (3 if args.quick else 15)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 3)
    inner = max(
        1, args.inner if args.inner is not None else (1 if args.quick or device.type == "cpu" else 20)
    )
    do_compile = args.compile if args.compile is not None else not args.quick
    do_scaling = args.scaling if args.scaling is not None else device.type == "cpu"
    sizes = parse_sizes(args.sizes, args.quick)
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    for d in dtypes:
        if d not in DTYPES:
            p.error(f"unknown dtype {d!r}")
    grans = [g.strip() for g in args.granularity.split(",") if g.strip()]
    for g_ in grans:
        if g_ not in GRANULARITIES:
            p.error(f"unknown granularity {g_!r}")
    candidates = [c.strip() for c in args.candidates.split(",") if c.strip()]
    for c in candidates:
        if c not in CANDIDATES + GRID_CANDIDATES:
            p.error(f"unknown candidate {c!r}")
    if not do_compile and "composite_compiled" in candidates:
        candidates.remove("composite_compiled")
    if "copy" in candidates:
        candidates.remove("copy")
    candidates.insert(0, "copy")  # every ratio is to the copy floor of the same round

    info = common.machine_info(device)
    info["malloc_keeps_freed_memory"] = False if args.no_malloc_tuning else common.keep_freed_memory()
    print(f"# bench_ops: {info['cpu']}, {info['logical_cpus']} logical CPUs, torch {info['torch']}")
    print(
        f"device {device}"
        + (f" ({info['gpu']})" if "gpu" in info else f", {info['threads']} threads")
        + f", {BITS} bit, {reps} rounds of {inner} call(s) after {warmup} warm-up calls"
        + "; load average at start "
        + (", ".join(f"{v:.2f}" for v in info["loadavg_start"]) if info["loadavg_start"] else "n/a")
        + ("; malloc keeps freed memory" if info["malloc_keeps_freed_memory"] else "")
    )
    print(
        "Cells read 'median (best)': times are medians (minima); ratios are medians of "
        "per-round ratios to the copy floor (y = x * 1) timed in the same round (ratios "
        "of minima). 'saved for bwd' = bytes of the unique storages autograd keeps for "
        "backward (saved_tensors_hooks)."
    )

    all_rows = []
    for label, shape in sizes:
        for dname in dtypes:
            for gran in grans:
                rows = run_config(
                    label, shape, DTYPES[dname], device, gran == "per_channel", candidates, reps, warmup,
                    inner, args.verbose,
                )  # fmt: skip
                all_rows += rows
                load = rows[0].get("loadavg_1min")
                print(
                    f"\n### {size_name(label, shape)}, {dname}, {gran}"
                    + (f" (load average {load:.1f} at start)" if load is not None else "")
                    + "\n"
                )
                print(config_table(rows), flush=True)
                # Microsecond timings of --quick are always spread; the note would be noise itself.
                noisy = None if args.quick else noise_note(rows)
                if noisy:
                    print(f"\n{noisy}", flush=True)

    print("\n### Summary\n")
    print(summary_table(all_rows))

    scaling_rows = None
    if do_scaling and device.type == "cpu":
        threads_list = [int(t) for t in args.scaling_threads.split(",") if t.strip()]
        label, shape = sizes[0]
        scaling_rows = run_scaling(shape, device, threads_list, reps, warmup, inner)
        print(f"\n### Thread scaling: {size_name(label, shape)}, float32, per_tensor\n")
        print(scaling_table(scaling_rows, threads_list))

    common.finish(
        info,
        args.json,
        {
            "args": vars(args),
            "bits": BITS,
            "reps": reps,
            "warmup": warmup,
            "inner": inner,
            "results": all_rows,
            "scaling": scaling_rows,
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
