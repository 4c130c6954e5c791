"""The benchmark scripts still run (tiny sizes); they are not timed here."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("script", ["bench_ops.py", "bench_step.py", "bench_recompute.py"])
def test_bench_quick(tmp_path, script):
    out = tmp_path / "result.json"
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "bench", script), "--quick", "--device", "cpu"]
        + ["--json", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "|" in proc.stdout  # a Markdown table was printed
    assert json.loads(out.read_text())


@pytest.mark.slow
def test_bench_onnx_quick(tmp_path):
    pytest.importorskip("onnxruntime")
    out = tmp_path / "result.json"
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "bench", "bench_onnx.py"), "--quick", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    results = json.loads(out.read_text())["results"]
    variants = {r["variant"] for r in results}
    assert variants == {"float", "w8a8", "w4a4", "w8a8 no-QDQ-fusion", "w4a4 no-QDQ-fusion"}
    assert all(r["median_s"] > 0 for r in results)
    # the float model runs float convolutions; every quantized one dequantizes its activations
    kernels = {r["variant"]: r["kernels"] for r in results}
    assert kernels["float"].get("Conv", 0) > 0 and "DequantizeLinear" not in kernels["float"]
    assert all(kernels[v].get("DequantizeLinear", 0) > 0 for v in variants - {"float"})
    assert "What onnxruntime ran" in proc.stdout


def test_median_ci_ranks_and_coverage():
    # The ranks of the distribution-free 95% interval are the textbook ones, and the coverage
    # they give is >= 95% while one rank further in would give less.
    import math
    import random

    sys.path.insert(0, os.path.join(ROOT, "bench"))
    try:
        import common
    finally:
        sys.path.pop(0)

    def coverage(n, k):  # P(x_(k) <= median <= x_(n+1-k))
        return 1.0 - 2.0 * sum(math.comb(n, i) for i in range(k)) / 2.0**n

    for n, (lo, hi) in {6: (1, 6), 20: (6, 15), 60: (22, 39), 200: (86, 115)}.items():
        assert common.median_ci(list(range(1, n + 1))) == (lo, hi)
        assert coverage(n, lo) >= 0.95 > coverage(n, lo + 1)
    assert all(math.isnan(v) for v in common.median_ci([1.0, 2.0, 3.0, 4.0, 5.0]))
    # order and NaN do not matter
    rng = random.Random(0)
    xs = [rng.random() for _ in range(40)]
    assert common.median_ci(xs + [float("nan")]) == common.median_ci(sorted(xs, reverse=True))
