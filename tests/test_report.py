"""python -m dsq_ext.report: the table and plot of what a checkpoint learned."""

import re

import pytest
import torch
from train_helpers import slow

from dsq_ext import report


@slow
def test_report_table_and_plot(dsq_run, tmp_path, capsys):
    log, _ = dsq_run
    best, png = str(log / "model_best.pth.tar"), tmp_path / "alpha.png"
    assert report.main([best, "--plot", str(png), "--layer", "layer2.0.downsample.0"]) == 0
    out = capsys.readouterr().out
    assert "arch resnet18, DSQ W4A4, bounds learned, affine grid, epoch 1" in out
    rows = [line for line in out.splitlines() if re.match(r"\| layer\d", line)]
    assert len(rows) == 19 and rows[0].startswith("| layer1.0.conv1 | 4 | 0.")
    assert "staircases of layer2.0.downsample.0" in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000

    assert report.main([best, "--plot", str(png), "--layer", "nope"]) == 2
    assert "no quantized layer 'nope'" in capsys.readouterr().err


def test_soft_staircase_matches_the_paper():
    x = torch.linspace(-1.5, 1.5, 601)
    hard, soft = report.soft_staircase(x, -1.0, 1.0, 0.2, 2)
    delta = 2.0 / 3
    levels = -1.0 + delta * torch.arange(4, dtype=torch.float64)
    assert all(torch.isclose(levels, v).any() for v in hard.unique())
    # phi meets the hard levels at interval edges and passes through the midpoints at their centres.
    edges = torch.tensor([-1.0, -1.0 + delta, 1.0 - delta, 1.0])
    h, s = report.soft_staircase(edges, -1.0, 1.0, 0.2, 2)
    assert torch.allclose(s, edges.double(), atol=1e-6)
    centre = torch.tensor([-1.0 + delta / 2])
    assert report.soft_staircase(centre, -1.0, 1.0, 0.2, 2)[1].item() == pytest.approx(-1.0 + delta / 2)
    assert (soft[x < -1] == -1).all() and (soft[x > 1] == 1).all()
