"""The benchmark scripts still run (tiny sizes); they are not timed here."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("script", ["bench_ops.py", "bench_step.py"])
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
