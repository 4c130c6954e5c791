"""Shared pieces of the benchmarks: the composite DSQ baseline, timing, saved-tensor bytes.

The scripts are meant to be run as `python bench/<script>.py` from anywhere, so
this module is imported by path (the script's folder is sys.path[0]) and it
makes the repository importable when dsq_ext is not installed.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
import types

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    # An in-place build (dsq_ext/_C.abi3.so) is importable from the repo root only.
    sys.path.insert(0, REPO)

import torch  # noqa: E402

import dsq_ext  # noqa: E402

# ---------------------------------------------------------------------------
# The baseline: DSQ written as a torch composite, the way common
# implementations do it (DSQ_MATH.md forward, autograd derives the backward).


def _per_channel_view(p: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    # Per-channel parameters have shape [C]; broadcasting needs [C, 1, 1, ...].
    if p.numel() == 1:
        return p.reshape(())
    return p.reshape((-1,) + (1,) * (x.dim() - 1))


def dsq_composite(
    x: torch.Tensor,
    lower,
    upper,
    alpha,
    bits: int,
    *,
    grad_scale: float = 1.0,
    sort_bounds: bool = False,
    grid: str = "free",
) -> torch.Tensor:
    """DSQ forward in torch ops; sign() passes its gradient straight through.

    Same values and (up to the alpha clamp, which here ignores the k <= 1000
    bound) the same gradients as dsq_ext.dsq_quantize, but every intermediate
    that autograd needs is kept for backward. The options are torch ops too.
    The free grid only (the layers' default).
    """
    if grid != "free":
        raise ValueError(f"dsq_composite computes the free grid only, got grid={grid!r}")
    if sort_bounds:
        lower, upper = torch.minimum(lower, upper), torch.maximum(lower, upper)
    if grad_scale != 1.0:
        # value unchanged, gradient times grad_scale
        lower, upper, alpha = (
            t.detach() + (t * grad_scale - (t * grad_scale).detach()) for t in (lower, upper, alpha)
        )
    n = 2**bits - 1
    l = _per_channel_view(lower, x).to(x.dtype)
    u = _per_channel_view(upper, x).to(x.dtype)
    a = alpha.to(x.dtype).clamp(1e-3, 0.5)
    delta = (u - l) / n
    s = 1.0 / (1.0 - a)
    big_l = torch.log(2.0 / a - 1.0)
    xc = torch.minimum(torch.maximum(x, l), u)
    v = (xc - l) / delta
    # The interval index is held constant in the backward (Algorithm 1).
    i = torch.clamp(torch.floor(v.detach()), max=n - 1)
    r = v - i - 0.5
    phi = s * torch.tanh(big_l * r)
    hard = torch.where(phi >= 0, 1.0, -1.0).to(phi.dtype)
    sgn = phi + (hard - phi).detach()
    return l + delta * (i + (sgn + 1.0) / 2.0)


@contextlib.contextmanager
def composite_in_layers():
    """Makes dsq_ext's layers call dsq_composite instead of the fused op.

    nn.Quantizer looks the op up as `ops.dsq_quantize` at call time, so
    swapping the module-level name `ops` in dsq_ext.nn is enough.
    """
    import dsq_ext.nn as qnn

    saved = qnn.ops
    qnn.ops = types.SimpleNamespace(dsq_quantize=dsq_composite, uniform_quantize=saved.uniform_quantize)
    try:
        yield
    finally:
        qnn.ops = saved


# ---------------------------------------------------------------------------
# Measurement.


class SavedBytes:
    """Bytes of the unique storages autograd saves for backward while active.

    Works for every device. Storages are told apart by (device, data pointer),
    so a tensor saved twice, or saved by two nodes, counts once; a view counts
    its whole storage, as that is what stays alive.
    """

    def __init__(self):
        self.seen: dict = {}

    def _pack(self, t: torch.Tensor):
        try:
            st = t.untyped_storage()
            key = (str(t.device), st.data_ptr())
            self.seen.setdefault(key, st.nbytes())
        except Exception:
            # Tensors without storage (e.g. some subclasses) are counted by size.
            self.seen.setdefault(("nostorage", id(t)), t.numel() * t.element_size())
        return t

    def __enter__(self):
        self.seen.clear()
        self._ctx = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc):
        self._ctx.__exit__(*exc)

    @property
    def nbytes(self) -> int:
        return sum(self.seen.values())


def keep_freed_memory() -> bool:
    """Tells glibc malloc to keep freed blocks instead of returning them to the OS.

    By default glibc trims the heap after a large free, so the next large
    allocation page-faults (and the kernel zeroes) all of its pages: on a
    12 MiB tensor that adds 5-15 ms to whichever candidate happens to run after
    one that freed a lot, which is an artefact of the order, not of the kernel.
    Blocks up to 32 MiB (glibc's largest mmap threshold) are then served from
    the heap and never trimmed. Returns whether the setting took effect.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        ok = libc.mallopt(m_trim_threshold, 1 << 30) == 1
        ok &= libc.mallopt(m_mmap_threshold, 32 << 20) == 1
        return bool(ok)
    except (OSError, AttributeError):
        return False


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, inner: int = 1) -> float:
    """Wall time of one call in seconds, averaged over `inner` back-to-back calls.

    The device is idle before and after. On a GPU a single small op is mostly
    launch latency plus the synchronisation itself, so several calls are timed
    together there.
    """
    sync(device)
    t0 = time.perf_counter()
    for _ in range(inner):
        fn()
    sync(device)
    return (time.perf_counter() - t0) / inner


def median(xs):
    xs = [x for x in xs if x is not None and not math.isnan(x)]
    return statistics.median(xs) if xs else float("nan")


def median_ci(xs, level: float = 0.95) -> tuple[float, float]:
    """A distribution-free confidence interval of the median: (x_(k), x_(n+1-k)) of the sorted xs.

    k is the largest rank whose interval covers the median with probability >= level for any
    continuous distribution (the count of samples below the median is Binomial(n, 1/2)). It
    says how well the rounds pin a paired ratio down, where quartiles say how much the rounds
    spread. (nan, nan) when n is too small for the level (n < 6 at 95%).
    """
    xs = sorted(x for x in xs if x is not None and not math.isnan(x))
    n = len(xs)
    tail = (1.0 - level) / 2.0
    # P(Binomial(n, 1/2) <= k - 1): the chance that x_(k) lies above the median
    below, k = 0.0, 0
    while k < n // 2:
        below += math.comb(n, k) / 2.0**n
        if below > tail:
            break
        k += 1
    if k == 0:
        return float("nan"), float("nan")
    return xs[k - 1], xs[n - k]


def machine_info(device: torch.device) -> dict:
    info = {
        "torch": torch.__version__,
        "dsq_ext": dsq_ext.build_info(),
        "python": platform.python_version(),
        "device": str(device),
        "threads": torch.get_num_threads(),
        "cpu": _cpu_model(),
        "logical_cpus": os.cpu_count(),
        "loadavg_start": _loadavg(),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def _cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=5).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except Exception:
        pass
    return platform.processor() or "unknown"


def _loadavg():
    try:
        return list(os.getloadavg())
    except OSError:
        return None


def fmt_bytes(n) -> str:
    if n is None or (isinstance(n, float) and math.isnan(n)):
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def fmt_ms(t) -> str:
    if t is None or (isinstance(t, float) and math.isnan(t)):
        return "-"
    ms = t * 1e3
    return f"{ms:.3f}" if ms < 1 else f"{ms:.2f}" if ms < 100 else f"{ms:.1f}"


def fmt_ratio(r) -> str:
    if r is None or (isinstance(r, float) and math.isnan(r)):
        return "-"
    return f"{r:.2f}"


def markdown_table(header, rows) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def json_clean(obj):
    """NaN and Inf become null (strict JSON); unknown objects become strings."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): json_clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_clean(v) for v in obj]
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    return str(obj)


def finish(info: dict, json_path: str | None, results: dict) -> None:
    """Prints the load average at the end and writes the run (machine, results) as JSON if asked."""
    info["loadavg_end"] = _loadavg()
    if info["loadavg_end"]:
        print("\nload average at end: " + ", ".join(f"{v:.2f}" for v in info["loadavg_end"]))
    if json_path:
        with open(json_path, "w") as f:
            json.dump(json_clean({"machine": info, **results}), f, indent=1)
        print(f"wrote {json_path}")
