import os
import sys

import pytest
import torch

# tests/ holds helper modules (reference.py) imported by the test files.
sys.path.insert(0, os.path.dirname(__file__))

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
