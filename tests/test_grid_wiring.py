"""The `grid` option from the Quantizer and the layers up to train.py's --grid.

The ops' grids themselves are tested in test_ops.py; this checks that the option
reaches them: weights on the layer's grid, activations on the affine grid where
the layer says symmetric, quantize_model passing it on, and train.py recording it.
"""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image

import dsq_ext
from dsq_ext import DSQConv2d, DSQLinear, Quantizer, dsq_quantize, uniform_quantize
from dsq_ext.ops import grid_params

REPO = Path(__file__).resolve().parents[1]
TRAIN = str(REPO / "train.py")


def on_grid(t, scale, zero_point, bits, grid):
    """Whether every element of t is a level (q - z)*scale of the grid, q in range (per channel)."""
    if scale.dim() == 1:
        shape = (-1,) + (1,) * (t.dim() - 1)
        scale, zero_point = scale.reshape(shape), zero_point.reshape(shape)
    q = t / scale + zero_point
    top = 2**bits - 1 if grid == "affine" else 2 * (2 ** (bits - 1) - 1)
    return bool(((q - q.round()).abs() < 1e-3).all() and (q.round() >= 0).all() and (q.round() <= top).all())


@pytest.mark.parametrize("method", ["dsq", "uniform"])
@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("grid", ["affine", "symmetric"])
def test_layer_grid_reaches_the_ops(method, per_channel, grid):
    torch.manual_seed(0)
    layer = DSQConv2d(8, 16, 3, padding=1, method=method, per_channel=per_channel, grid=grid)
    x = torch.randn(4, 8, 10, 10).relu()
    y = layer(x)
    wq, aq = layer.weight_quantizer, layer.act_quantizer
    assert (wq.grid, aq.grid) == (grid, "affine")  # symmetric applies to weights only
    if method == "dsq":
        w = dsq_quantize(layer.weight, wq.lower, wq.upper, wq.alpha, 4, grid=grid, sort_bounds=True)
        xin = dsq_quantize(x, aq.lower, aq.upper, aq.alpha, 4, grid="affine", sort_bounds=True)
    else:
        w = uniform_quantize(layer.weight, wq.lower, wq.upper, 4, grid=grid, sort_bounds=True)
        xin = uniform_quantize(x, aq.lower, aq.upper, 4, grid="affine", sort_bounds=True)
    torch.testing.assert_close(y, F.conv2d(xin, w, layer.bias, padding=1), atol=0, rtol=0)
    ws, wz = grid_params(wq.lower.detach(), wq.upper.detach(), 4, grid, sort_bounds=True)
    xs, xz = grid_params(aq.lower.detach(), aq.upper.detach(), 4, "affine", sort_bounds=True)
    assert on_grid(w.detach(), ws, wz, 4, grid) and on_grid(xin.detach(), xs, xz, 4, "affine")
    # the free grid's levels are not (its zero point is not an integer here)
    free = DSQConv2d(8, 16, 3, padding=1, method=method, per_channel=per_channel, grid="free")
    free.load_state_dict(layer.state_dict())
    wf = free.quantized_weight().detach()
    fs, fz = grid_params(wq.lower.detach(), wq.upper.detach(), 4, "free", sort_bounds=True)
    assert not torch.equal(wf, w.detach()) and (fz != fz.round()).any()
    assert f"{grid} grid" in repr(layer) and "free grid" in repr(free)


def test_linear_and_quantizer_grid():
    layer = DSQLinear(12, 5, w_bits=3, a_bits=2, grid="affine")
    assert (layer.weight_quantizer.grid, layer.act_quantizer.grid) == ("affine", "affine")
    q = Quantizer(4, grid="symmetric")
    x = torch.randn(100)
    y = q(x)
    assert torch.equal(y, dsq_quantize(x, q.lower, q.upper, q.alpha, 4, grid="symmetric", sort_bounds=True))
    s, z = dsq_ext.grid_params(q.lower.detach(), q.upper.detach(), 4, "symmetric", sort_bounds=True)
    assert z.item() == 7 and on_grid(y.detach(), s, z, 4, "symmetric")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(grid="integer"), r"grid must be one of \('free', 'affine', 'symmetric'\), got 'integer'"),
        (dict(grid="symmetric", bits=1), r"grid 'symmetric' needs bits >= 2, got bits=1"),
    ],
)
def test_quantizer_rejects_bad_grid(kwargs, match):
    kwargs = dict(kwargs)
    bits = kwargs.pop("bits", 4)
    with pytest.raises(ValueError, match=match):
        Quantizer(bits, **kwargs)


def test_layer_rejects_bad_grid():
    with pytest.raises(ValueError, match=r"grid must be one of .* got 'Symmetric'"):
        DSQConv2d(3, 4, 3, grid="Symmetric")
    with pytest.raises(ValueError, match=r"grid 'symmetric' needs bits >= 2, got bits=1"):
        DSQLinear(3, 4, w_bits=1, grid="symmetric")


def test_quantize_model_passes_grid_on():
    model = dsq_ext.quantize_model(
        torchvision.models.resnet18(num_classes=10), w_bits=4, a_bits=4, grid="symmetric"
    )
    layers = dsq_ext.quantized_modules(model)
    assert len(layers) == 19
    assert all(m.weight_quantizer.grid == "symmetric" and m.act_quantizer.grid == "affine" for _, m in layers)
    default = dsq_ext.quantize_model(torchvision.models.resnet18(num_classes=10))
    # the deployable grid is the default (older configs keep theirs: test_config.py)
    layers = dsq_ext.quantized_modules(default)
    assert all(m.weight_quantizer.grid == m.act_quantizer.grid == "affine" for _, m in layers)


# ---------------------------------------------------------------------------
# train.py --grid


# train_script: conftest.py's fixture (train.py imported as a module)


def _parsed(train_script, *argv):
    args = train_script.parser.parse_args([*argv, "d"])
    train_script.check_args(args)
    return args


def _reject(train_script, capsys, argv):
    with pytest.raises(SystemExit) as exc:
        _parsed(train_script, *argv)
    assert exc.value.code == 2
    return capsys.readouterr().err


def test_train_grid_flag(train_script, capsys):
    args = _parsed(train_script, "-q", "DSQ", "--quan_bit", "4", "--quantize_input", "--grid", "symmetric")
    cfg = train_script.quant_config(args)
    assert (cfg.weight.grid, cfg.act.grid) == ("symmetric", "affine")
    assert train_script.describe_config(cfg).endswith("--bounds learned --grid symmetric")
    assert "symmetric/affine grids" in cfg.describe()
    default = train_script.quant_config(_parsed(train_script, "-q", "uniform"))
    assert default.weight.grid == dsq_ext.QuantConfig().grid
    assert train_script.describe_config(default).endswith(f"--grid {dsq_ext.QuantConfig().grid}")
    assert "--grid only apply with -q" in _reject(train_script, capsys, ["--grid", "affine"])
    err = _reject(train_script, capsys, ["-q", "DSQ", "--w-bits", "1", "--grid", "symmetric"])
    assert "invalid quantizer: grid 'symmetric' needs bits >= 2, got bits=1" in err
    assert "invalid choice: 'integer'" in _reject(train_script, capsys, ["-q", "DSQ", "--grid", "integer"])


# A train.py checkpoint's "quant" entry as written before the grid option (format 1).
FORMAT_1 = dict(method="dsq", w_bits=4, a_bits=None, per_channel=False, quantize_first_last=False,
                bounds="learned", alpha_init=0.2, act_percentile=None)  # fmt: skip


@pytest.mark.parametrize("fmt", [1, 2])
def test_resume_compares_grid_and_reads_old_checkpoints_as_free(train_script, capsys, tmp_path, fmt):
    # (format 1 also predates the alpha lr scale: alpha learned at 1x)
    flags = ["-q", "DSQ", "--quan_bit", "4", "--alpha-lr-scale", "1", "--grid", "free"]
    if fmt == 1:
        quant = FORMAT_1
    else:  # format 2 written before QuantConfig had a grid field
        quant = train_script.quant_config(_parsed(train_script, *flags)).to_dict()
        del quant["weight"]["grid"]
    path = tmp_path / "old.pth.tar"
    torch.save({"state_dict": {}, "arch": "resnet18", "quant": quant}, path)
    assert dsq_ext.ModelQuantConfig.from_dict(quant).weight.grid == "free"
    _parsed(train_script, *flags, "--resume", str(path))  # the free grid: same configuration
    err = _reject(train_script, capsys, [*flags[:-2], "--grid", "affine", "--resume", str(path)])
    assert "differs in weight.grid" in err and "--grid free" in err and "--grid affine" in err


@pytest.mark.slow
def test_train_records_grid_and_trains_on_it(tmp_path):
    rng = np.random.default_rng(0)
    for split, n in (("train", 8), ("val", 4)):
        for c in range(4):
            d = tmp_path / "data" / split / f"class{c}"
            d.mkdir(parents=True)
            for i in range(n):
                img = rng.integers(0, 60, (32, 32)).astype(np.uint8)
                img[:, c * 8 : (c + 1) * 8] += 180
                Image.fromarray(img).save(d / f"{i}.png")
    log = tmp_path / "log"
    argv = ["-a", "resnet18", "-q", "uniform", "--quan_bit", "4", "--quantize_input", "--grid", "symmetric"]
    argv += ["--per-channel", "--image-size", "32", "-b", "8", "-j", "0", "--epochs", "1", "--seed", "0"]
    proc = subprocess.run(
        [sys.executable, TRAIN, *argv, "--log_path", str(log), str(tmp_path / "data")],
        cwd=REPO,
        env=dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES=""),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "--grid symmetric" in proc.stdout
    ckpt = torch.load(log / "checkpoint.pth.tar", map_location="cpu")
    cfg = dsq_ext.ModelQuantConfig.from_dict(ckpt["quant"])
    assert (cfg.weight.grid, cfg.act.grid) == ("symmetric", "affine")
    model = torchvision.models.resnet18()
    dsq_ext.quantize_model(model, method="uniform", w_bits=4, a_bits=4, per_channel=True, grid="symmetric")
    model.load_state_dict(ckpt["state_dict"])
    layer = model.layer1[0].conv1
    wq = layer.weight_quantizer
    s, z = grid_params(wq.lower.detach(), wq.upper.detach(), 4, "symmetric", sort_bounds=True)
    assert on_grid(layer.quantized_weight().detach(), s, z, 4, "symmetric")
