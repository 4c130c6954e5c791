"""train.py end to end on a tiny ImageFolder, on CPU; plus dsq_ext.report and dsq_ext.datasets.

The runs hide any GPU (CUDA_VISIBLE_DEVICES=""), so they check the same thing on
every machine (the DDP test needs two CPU processes, not one per GPU); one test
runs train.py on CUDA where a GPU is present.

train.py runs as a subprocess (as a user runs it), one thread each so that the
suite stays usable on a small shared machine. Argument checks run in-process
against train.py's own parser, which is much faster than starting Python.
The subprocess tests carry the `slow` mark (about a minute and a half in all
on 2 cores); `make test` runs them.
"""

import gzip
import importlib.util
import os
import re
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dsq_ext import datasets, report

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


@pytest.fixture(scope="module")
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


@pytest.fixture(scope="module")
def train_script():
    """train.py imported as a module, for its parser and helpers."""
    spec = importlib.util.spec_from_file_location("dsq_train_script", TRAIN)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def dsq_run(data, tmp_path_factory):
    log = tmp_path_factory.mktemp("dsq")
    _, out = run_train("-a", "resnet18", *W4A4, *SMALL, "--epochs", "1", "--log_path", log, data)
    return log, out


@pytest.fixture(scope="module")
def float_run(data, tmp_path_factory):
    log = tmp_path_factory.mktemp("float")
    _, out = run_train("-a", "resnet18", *SMALL, "--epochs", "1", "--log_path", log, data)
    return log, out


def _test_lines(out):
    # The validation lines without their timings: loss and accuracy of every batch.
    lines = [line for line in out.splitlines() if line.startswith("Test:")]
    return [re.sub(r"Time\s+\S+ \(\s*\S+\)", "", line) for line in lines]


def _summary_acc1(out):
    return [float(m) for m in re.findall(r"^ \*\s+Acc@1 ([0-9.]+)", out, re.M)]


# ---------------------------------------------------------------------------------------
# One epoch, checkpoints, TensorBoard


@slow
def test_dsq_w4a4_one_epoch(dsq_run):
    log, out = dsq_run
    assert "=> quantized 19 layers: -q DSQ --w-bits 4 --a-bits 4 --bounds learned" in out
    assert sorted(p.name for p in log.iterdir() if p.name.endswith(".tar")) == [
        "checkpoint.pth.tar",
        "model_best.pth.tar",
    ]
    assert not [p for p in log.iterdir() if p.name.endswith(".tmp")], "temp files left behind"
    ckpt = load(log / "checkpoint.pth.tar")
    assert ckpt["epoch"] == 1 and ckpt["arch"] == "resnet18" and ckpt["image_size"] == 32
    assert ckpt["quant"] == {
        "method": "dsq",
        "w_bits": 4,
        "a_bits": 4,
        "per_channel": False,
        "quantize_first_last": False,
        "bounds": "learned",
        "alpha_init": 0.2,
        "act_percentile": None,
        "recompute": True,
    }
    sd = ckpt["state_dict"]
    assert not any(k.startswith("module.") for k in sd)
    # The first and last layers stay float.
    assert "conv1.weight_quantizer.alpha" not in sd and "fc.act_quantizer.lower" not in sd
    assert bool(sd["layer1.0.conv1.act_quantizer.initialized"])
    assert torch.isfinite(sd["layer4.1.conv2.weight_quantizer.alpha"])
    assert _summary_acc1(out) == [ckpt["best_acc1"]]

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    expected = {f"{s}/{m}" for s in ("train", "val") for m in ("loss", "acc1", "acc5")} | {"lr"}
    expected |= {
        f"quant/layer1.0.conv1/{k}_{f}" for k in ("weight", "act") for f in ("alpha", "lower", "upper")
    }
    assert expected <= tags, expected - tags
    assert events.Scalars("val/acc1")[0].value == pytest.approx(ckpt["best_acc1"])
    assert events.Scalars("lr")[0].value == pytest.approx(0.1)


@slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_dsq_w4a4_one_epoch_on_cuda(data, tmp_path):
    _, out = run_train(
        "-a", "resnet18", *W4A4, *SMALL, "--epochs", "1", "--log_path", tmp_path, data, env=GPU_ENV
    )
    assert "Using device: cuda" in out
    sd = load(tmp_path / "checkpoint.pth.tar")["state_dict"]
    assert bool(sd["layer1.0.conv1.act_quantizer.initialized"])
    quant = {k: v for k, v in sd.items() if "_quantizer." in k and v.is_floating_point()}
    assert len(quant) == 19 * 2 * 3  # 19 layers, weight and activation, lower/upper/alpha
    assert all(torch.isfinite(v).all() for v in quant.values())
    assert len(_summary_acc1(out)) == 1


@slow
def test_uniform_one_epoch(data, tmp_path):
    # -q is case-insensitive; --w-bits and --a-bits override --quan_bit; the unfused layers.
    _, out = run_train(
        "-a", "resnet18", "-q", "UNIFORM", "--quan_bit", "4", "--a-bits", "8", "--no-recompute", *SMALL,
        "--epochs", "1", "--log_path", tmp_path, data,
    )  # fmt: skip
    assert "-q uniform --w-bits 4 --a-bits 8 --bounds learned --no-recompute" in out
    ckpt = load(tmp_path / "model_best.pth.tar")
    assert ckpt["quant"]["method"] == "uniform" and ckpt["quant"]["recompute"] is False
    assert (ckpt["quant"]["w_bits"], ckpt["quant"]["a_bits"]) == (4, 8)
    assert not any(k.endswith("_quantizer.alpha") for k in ckpt["state_dict"])

    layers = report.load_layers(ckpt["state_dict"], ckpt["quant"])
    table = report.markdown_table(layers)
    assert "| layer1.0.conv1 | 4 | n/a |" in table


@slow
def test_resume_continues_at_next_epoch(dsq_run, data, tmp_path):
    log, _ = dsq_run
    shutil.copytree(log, tmp_path, dirs_exist_ok=True)
    _, out = run_train(
        "-a", "resnet18", *W4A4, *SMALL, "--epochs", "2", "--log_path", tmp_path,
        "--resume", tmp_path / "checkpoint.pth.tar", data,
    )  # fmt: skip
    assert "=> loaded checkpoint" in out and "(epoch 1)" in out
    assert "Epoch: [1][" in out and "Epoch: [0][" not in out
    ckpt = load(tmp_path / "checkpoint.pth.tar")
    assert ckpt["epoch"] == 2
    assert ckpt["optimizer"]["state"], "the optimizer's momentum should have been carried over"


@slow
def test_evaluate_reproduces_best_acc(dsq_run, data):
    log, train_out = dsq_run
    best = load(log / "model_best.pth.tar")
    _, out = run_train(
        "-a", "resnet18", *W4A4, *SMALL, "--log_path", log, "-e", "--resume", log / "model_best.pth.tar", data
    )
    assert _summary_acc1(out) == [best["best_acc1"]]
    # Not just the accuracy: every batch's loss is the one seen in training's validation.
    assert _test_lines(out) == _test_lines(train_out)


@slow
def test_dummy_data_trains(tmp_path):
    # --dummy is ImageNet-sized (1.28M fake images): check that it trains, then stop it.
    cmd = [sys.executable, TRAIN, "--dummy", *W4A4, *SMALL, "--log_path", str(tmp_path)]
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    lines = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if any(re.match(r"Epoch: \[0\]\[\s*2/", line) for line in lines):
                break
            time.sleep(0.2)
    finally:
        proc.kill()
        proc.wait()
    out = "".join(lines)
    assert "=> Dummy data is used!" in out
    # ImageNet's 1,281,167 training images in batches of 8.
    assert re.search(r"Epoch: \[0\]\[\s*2/160146\].*Loss", out), out[-3000:]


@slow
def test_mobilenet_v2_per_channel(data, tmp_path):
    # Depthwise convs (groups == channels) and per-channel weight bounds.
    run_train(
        "-a", "mobilenet_v2", *W4A4, "--per-channel", *SMALL, "--epochs", "1", "--log_path", tmp_path, data
    )  # fmt: skip
    ckpt = load(tmp_path / "checkpoint.pth.tar")
    sd = ckpt["state_dict"]
    # features.1.conv.0.0 is the first depthwise conv (32 channels, groups 32).
    assert sd["features.1.conv.0.0.weight"].shape == (32, 1, 3, 3)
    assert sd["features.1.conv.0.0.weight_quantizer.lower"].shape == (32,)
    table = report.markdown_table(report.load_layers(sd, ckpt["quant"]))
    # "*": alpha outside the range the kernels clamp into, for some channel.
    row = r"\| features\.1\.conv\.0\.0 \| 4 \| [0-9.]+\*? \| \[.*\.\..*\] \(32 ch\) \|"
    assert re.search(row, table), table


@slow
def test_ddp_two_processes_keep_quantizers_identical(data, tmp_path, train_script):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    _, out = run_train(
        "-a", "resnet18", *W4A4, *SMALL, "--epochs", "1", "--log_path", tmp_path,
        "--multiprocessing-distributed", "--nproc-per-node", "2", "--world-size", "1", "--rank", "0",
        "--dist-url", f"tcp://127.0.0.1:{port}", data,
    )  # fmt: skip
    assert "using the gloo backend" in out
    # 32 images over 2 ranks, batch 8 per node = 4 per rank: 4 steps each.
    assert len(re.findall(r"Epoch: \[0\]\[1/4\]", out)) == 2
    digests = dict(re.findall(r"rank (\d+): quantizer state sha256 ([0-9a-f]{64})", out))
    assert set(digests) == {"0", "1"}, out[-3000:]
    ckpt = load(tmp_path / "checkpoint.pth.tar")
    # Each rank hashed what it holds; rank 0 saved the checkpoint. All three agree.
    assert digests["0"] == digests["1"] == train_script.quantizer_digest(ckpt["state_dict"])
    assert bool(ckpt["state_dict"]["layer1.0.conv1.act_quantizer.initialized"])


@slow
def test_init_from_float_checkpoint(float_run, data, tmp_path):
    flog, fout = float_run
    fckpt = load(flog / "checkpoint.pth.tar")
    assert fckpt["quant"] == {"method": None}
    assert not any("_quantizer." in k for k in fckpt["state_dict"])
    # lr 0: nothing moves, so what the checkpoint holds is what --init-from started from.
    _, out = run_train(
        "-a", "resnet18", *W4A4, *SMALL, "--lr", "0", "--epochs", "1", "--log_path", tmp_path,
        "--init-from", flog / "checkpoint.pth.tar", data,
    )  # fmt: skip
    assert "=> float weights from" in out
    ckpt = load(tmp_path / "checkpoint.pth.tar")
    assert ckpt["quant"]["method"] == "dsq"
    sd, fsd = ckpt["state_dict"], fckpt["state_dict"]
    for name in ("conv1.weight", "layer1.0.conv1.weight", "layer4.1.conv2.weight", "fc.weight", "fc.bias"):
        assert torch.equal(sd[name], fsd[name]), name
    # The weight quantizers' first bounds are the float weights' range.
    w = fsd["layer1.0.conv1.weight"]
    assert sd["layer1.0.conv1.weight_quantizer.lower"] == w.min()
    assert sd["layer1.0.conv1.weight_quantizer.upper"] == w.max()


# ---------------------------------------------------------------------------------------
# The report


@slow
def test_report_table_and_plot(dsq_run, tmp_path, capsys):
    log, _ = dsq_run
    best, png = str(log / "model_best.pth.tar"), tmp_path / "alpha.png"
    assert report.main([best, "--plot", str(png), "--layer", "layer2.0.downsample.0"]) == 0
    out = capsys.readouterr().out
    assert "arch resnet18, DSQ W4A4, bounds learned, epoch 1" in out
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


# ---------------------------------------------------------------------------------------
# Arguments rejected with clear messages (in-process: no Python start-up per case)


def _reject(train_script, capsys, argv):
    with pytest.raises(SystemExit) as exc:
        args = train_script.parser.parse_args(argv)
        train_script.check_args(args)
    assert exc.value.code == 2
    return capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["-q", "foo", "d"], "argument -q/--quantize: invalid choice: 'foo' (choose from DSQ, uniform"),
        (["-q", "DSQ", "--quan_bit", "9", "d"], "--quan_bit: bit width must be an integer in 1..8, got '9'"),
        (["-q", "DSQ", "--w-bits", "0", "d"], "--w-bits: bit width must be an integer in 1..8, got '0'"),
        (["--quan_bit", "4", "--quantize_input", "d"], "--quan_bit, --quantize_input only apply with -q"),
        (["-q", "uniform", "--alpha-init", "0.1", "d"], "--alpha-init applies to -q DSQ only"),
        (["-q", "DSQ", "--alpha-init", "0.7", "d"], "DSQ's alpha must be in (0, 0.5], got '0.7'"),
        (["-q", "DSQ", "--bounds", "minmax", "d"], "argument --bounds: invalid choice: 'minmax'"),
        (["-q", "DSQ", "--quantize_input", "-e", "d"], "--evaluate of a model with quantized activations"),
        (["--init-from", "/nonexistent.pth.tar", "d"], "--init-from /nonexistent.pth.tar: no such file"),
        (["--act-percentile", "99", "d"], "--act-percentile only apply with -q"),
        (["--no-recompute", "d"], "--[no-]recompute only apply with -q"),
        (["-q", "DSQ", "--act-percentile", "99", "d"], "--act-percentile needs quantized activations"),
        (
            ["-q", "DSQ", "--quantize_input", "--act-percentile", "40", "d"],
            "a percentile in (50, 100], got '40'",
        ),
    ],
)
def test_bad_arguments_are_rejected(train_script, capsys, argv, message):
    assert message in _reject(train_script, capsys, argv)


def test_quantization_flags_resolve(train_script):
    def parsed(*argv):
        args = train_script.parser.parse_args([*argv, "d"])
        train_script.check_args(args)
        return train_script.quant_config(args)

    assert parsed() == {"method": None}
    cfg = parsed("-q", "dsq")  # the seed's defaults: 8-bit weights, float activations
    assert (cfg["w_bits"], cfg["a_bits"], cfg["bounds"], cfg["alpha_init"]) == (8, None, "learned", 0.2)
    cfg = parsed("-q", "Dsq", "--quan_bit", "3", "--quantize_input", "--w-bits", "2", "--bounds", "ema")
    assert (cfg["method"], cfg["w_bits"], cfg["a_bits"], cfg["bounds"]) == ("dsq", 2, 3, "ema")
    assert parsed("-q", "DSQ", "--a-bits", "4")["a_bits"] == 4  # --a-bits implies --quantize_input
    cfg = parsed("-q", "uniform", "--quan_bit", "2", "--quantize_input", "--act-percentile", "99")
    assert cfg["act_percentile"] == 99.0
    args = train_script.parser.parse_args(["-q", "DSQ", "--quantize_input", "--act-percentile", "99.9", "d"])
    train_script.check_args(args)
    assert train_script.quantize_kwargs(args)["act_percentile"] == 99.9
    assert "--act-percentile 99" in train_script.describe_config(cfg)
    # recompute: on by default, recorded, and passed to the layers
    assert cfg["recompute"] is True and "recompute" not in train_script.describe_config(cfg)
    args = train_script.parser.parse_args(["-q", "DSQ", "--no-recompute", "d"])
    train_script.check_args(args)
    assert train_script.quantize_kwargs(args)["recompute"] is False
    assert "--no-recompute" in train_script.describe_config(args)


@slow
def test_resume_with_another_config_is_rejected(dsq_run, train_script, capsys):
    log, _ = dsq_run
    ckpt = str(log / "checkpoint.pth.tar")
    uniform = ["-q", "uniform", "--quan_bit", "4", "--quantize_input"]
    err = _reject(train_script, capsys, [*uniform, "--resume", ckpt, "d"])
    assert "was written by a different configuration (differs in method)" in err
    assert "checkpoint: -a resnet18 -q DSQ --w-bits 4 --a-bits 4 --bounds learned" in err
    err = _reject(train_script, capsys, ["--resume", ckpt, "-e", "d"])  # the float model
    assert "different configuration" in err and "this run:   -a resnet18 (float, no -q)" in err
    err = _reject(train_script, capsys, ["-q", "DSQ", "--init-from", ckpt, "d"])
    assert "--init-from expects a float checkpoint" in err


def test_pretrained_without_cached_weights_fails_clearly(train_script, capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    err = _reject(train_script, capsys, ["--pretrained", "-a", "resnet18", "d"])
    assert "not in torch's hub cache" in err and "does not download" in err
    assert "resnet18-f37072fd.pth" in err


def test_atomic_save_keeps_the_previous_file(train_script, tmp_path):
    path = tmp_path / "checkpoint.pth.tar"
    train_script.atomic_save({"epoch": 1}, str(path))

    class Unsaveable:
        def __reduce__(self):
            raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError, match="interrupted"):
        train_script.atomic_save({"epoch": 2, "x": Unsaveable()}, str(path))
    assert torch.load(path)["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pth.tar"]


# ---------------------------------------------------------------------------------------
# Fashion-MNIST as an ImageFolder


def _write_idx(path, array, gz):
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with (gzip.open if gz else open)(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_fashion_mnist_image_folder(tmp_path, capsys):
    src = tmp_path / "idx"
    src.mkdir()
    rng = np.random.default_rng(0)
    train_x, train_y = rng.integers(0, 256, (12, 28, 28)), np.arange(12) % 10
    val_x, val_y = rng.integers(0, 256, (5, 28, 28)), np.array([9, 0, 3, 3, 1])
    _write_idx(src / "train-images-idx3-ubyte.gz", train_x, gz=True)
    _write_idx(src / "train-labels-idx1-ubyte.gz", train_y, gz=True)
    _write_idx(src / "t10k-images-idx3-ubyte", val_x, gz=False)  # plain IDX works too
    _write_idx(src / "t10k-labels-idx1-ubyte", val_y, gz=False)

    out = tmp_path / "fm"
    assert datasets.main(["fashion-mnist", str(out), "--source", str(src), "-j", "1"]) == 0
    assert sorted(p.name for p in (out / "train").iterdir()) == list(datasets.FASHION_MNIST_CLASSES)
    img = Image.open(out / "val" / "3_dress" / "00003.png")
    assert img.mode == "L" and (np.asarray(img) == val_x[3]).all()
    assert len(list((out / "train").rglob("*.png"))) == 12

    # Idempotent: a second run finds both splits complete and writes nothing.
    before = os.stat(out / "val" / "3_dress" / "00003.png").st_mtime_ns
    assert datasets.main(["fashion-mnist", str(out), "--source", str(src)]) == 0
    assert "already complete" in capsys.readouterr().out
    assert os.stat(out / "val" / "3_dress" / "00003.png").st_mtime_ns == before

    import torchvision

    ds = torchvision.datasets.ImageFolder(str(out / "val"), allow_empty=True)  # 5 images, 4 classes
    assert ds[0][0].mode == "RGB" and ds.targets == sorted(val_y.tolist())


def test_fashion_mnist_missing_files_say_how_to_get_them(tmp_path, capsys):
    assert datasets.main(["fashion-mnist", str(tmp_path / "out"), "--source", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "train-images-idx3-ubyte[.gz]" in err and "apt-get install dataset-fashion-mnist" in err
