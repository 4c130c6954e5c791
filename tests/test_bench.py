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
