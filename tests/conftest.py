import importlib.util
import os
import sys

import numpy as np
import pytest
import torch
from PIL import Image

# tests/ holds helper modules (reference.py) imported by the test files.
sys.path.insert(0, os.path.dirname(__file__))

from train_helpers import SMALL, TRAIN, W4A4, run_train  # noqa: E402

import dsq_ext  # noqa: E402

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def pytest_report_header(config):
    return f"dsq_ext build: {dsq_ext.build_info()}; test devices: {DEVICES}"


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: runs train.py in subprocesses; make test runs them")


# train.py runs shared by several test files (each takes seconds to a minute).


@pytest.fixture(scope="session")
def data(tmp_path_factory):
    """4 classes, 8 train and 4 val grayscale 32x32 PNGs each; a class is a bright vertical band."""
    root = tmp_path_factory.mktemp("tiny")
    rng = np.random.default_rng(0)
    for split, n in (("train", 8), ("val", 4)):
        for c in range(4):
            d = root / split / f"class{c}"
            d.mkdir(parents=True)
            for i in range(n):
                img = rng.integers(0, 60, (32, 32)).astype(np.uint8)
                img[:, c * 8 : (c + 1) * 8] += 180
                Image.fromarray(img).save(d / f"{i}.png")
    return root


@pytest.fixture(scope="session")
def train_script():
    """train.py imported as a module, for its parser and helpers."""
    spec = importlib.util.spec_from_file_location("dsq_train_script", TRAIN)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="session")
def dsq_run(data, tmp_path_factory):
    log = tmp_path_factory.mktemp("dsq")
    _, out = run_train("-a", "resnet18", *W4A4, *SMALL, "--epochs", "1", "--log_path", log, data)
    return log, out


@pytest.fixture(scope="session")
def float_run(data, tmp_path_factory):
    log = tmp_path_factory.mktemp("float")
    _, out = run_train("-a", "resnet18", *SMALL, "--epochs", "1", "--log_path", log, data)
    return log, out
