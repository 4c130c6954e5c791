"""Running train.py as a user does, for the tests (imported by conftest.py and the test files).

train.py runs as a subprocess, one thread each so that the suite stays usable on a
small shared machine, with any GPU hidden (CUDA_VISIBLE_DEVICES=""), so that the
runs check the same thing on every machine; GPU_ENV keeps the GPU visible.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
TRAIN = str(REPO / "train.py")
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", CUDA_VISIBLE_DEVICES="")
GPU_ENV = {k: v for k, v in ENV.items() if k != "CUDA_VISIBLE_DEVICES"}
# 32 px, batch 8, no loader workers: a few seconds per epoch of the tiny set.
SMALL = ["--image-size", "32", "-b", "8", "-j", "0", "-p", "1", "--seed", "0"]
W4A4 = ["-q", "DSQ", "--quan_bit", "4", "--quantize_input"]

slow = pytest.mark.slow


def run_train(*args, timeout=300, check=True, env=ENV):
    proc = subprocess.run(
        [sys.executable, TRAIN, *map(str, args)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    out = proc.stdout + proc.stderr
    if check and proc.returncode != 0:
        pytest.fail(f"train.py {' '.join(map(str, args))} exited with {proc.returncode}:\n{out[-6000:]}")
    return proc.returncode, out


def load(path):
    return torch.load(path, map_location="cpu")


def _test_lines(out):
    # The validation lines without their timings: loss and accuracy of every batch.
    lines = [line for line in out.splitlines() if line.startswith("Test:")]
    return [re.sub(r"Time\s+\S+ \(\s*\S+\)", "", line) for line in lines]


def _summary_acc1(out):
    return [float(m) for m in re.findall(r"^ \*\s+Acc@1 ([0-9.]+)", out, re.M)]
