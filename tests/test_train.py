"""train.py end to end on a tiny ImageFolder, on CPU; and its argument checks.

The subprocess runs carry the `slow` mark (about a minute and a half in all on
2 cores); `make test` runs them. Argument checks run in-process against
train.py's own parser, which is much faster than starting Python.
"""

import re
import shutil
import socket
import subprocess
import sys
import threading
import time

import pytest
import torch
from train_helpers import (
    ENV,
    GPU_ENV,
    REPO,
    SMALL,
    TRAIN,
    W4A4,
    _summary_acc1,
    _test_lines,
    load,
    run_train,
    slow,
)

import dsq_ext
import dsq_ext.checkpoint
from dsq_ext import report

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
    w, a = dsq_ext.layer_configs("dsq", 4, 4)
    assert ckpt["quant"] == dsq_ext.ModelQuantConfig(weight=w, act=a).to_dict()
    assert ckpt["quant"]["format"] == 2 and ckpt["quant"]["act"]["bits"] == 4
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
    assert "-q uniform --w-bits 4 --a-bits 8 --bounds learned --grid " in out
    assert out.count("--no-recompute") == 1
    ckpt = load(tmp_path / "model_best.pth.tar")
    cfg = dsq_ext.ModelQuantConfig.from_dict(ckpt["quant"])
    assert (cfg.method, cfg.weight.bits, cfg.act.bits) == ("uniform", 4, 8)
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
def test_a_truncated_image_names_its_file(data, tmp_path):
    broken = tmp_path / "data"
    shutil.copytree(data, broken)
    png = broken / "train" / "class2" / "3.png"
    png.write_bytes(png.read_bytes()[:200])
    code, out = run_train(
        "-a", "resnet18", *SMALL, "--epochs", "1", "--log_path", tmp_path / "log", broken, check=False
    )
    assert code != 0 and f"cannot read image {png}" in out, out[-3000:]


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
    assert digests["0"] == digests["1"] == dsq_ext.checkpoint.quantizer_digest(ckpt["state_dict"])
    assert bool(ckpt["state_dict"]["layer1.0.conv1.act_quantizer.initialized"])


@slow
def test_init_from_float_checkpoint(float_run, data, tmp_path):
    flog, fout = float_run
    fckpt = load(flog / "checkpoint.pth.tar")
    assert dsq_ext.ModelQuantConfig.from_dict(fckpt["quant"]).is_float
    assert not any("_quantizer." in k for k in fckpt["state_dict"])
    # lr 0: nothing moves, so what the checkpoint holds is what --init-from started from.
    _, out = run_train(
        "-a", "resnet18", *W4A4, *SMALL, "--lr", "0", "--epochs", "1", "--log_path", tmp_path,
        "--init-from", flog / "checkpoint.pth.tar", data,
    )  # fmt: skip
    assert "=> float weights from" in out
    ckpt = load(tmp_path / "checkpoint.pth.tar")
    assert dsq_ext.ModelQuantConfig.from_dict(ckpt["quant"]).method == "dsq"
    sd, fsd = ckpt["state_dict"], fckpt["state_dict"]
    for name in ("conv1.weight", "layer1.0.conv1.weight", "layer4.1.conv2.weight", "fc.weight", "fc.bias"):
        assert torch.equal(sd[name], fsd[name]), name
    # The weight quantizers' first bounds are the float weights' range.
    w = fsd["layer1.0.conv1.weight"]
    assert sd["layer1.0.conv1.weight_quantizer.lower"] == w.min()
    assert sd["layer1.0.conv1.weight_quantizer.upper"] == w.max()


@slow
def test_every_alpha_stays_in_its_range_at_a_huge_alpha_lr(data, tmp_path):
    # At --alpha-lr-scale 1e5 one step moves an alpha by far more than its range
    # (0, 0.5]; train.py projects the alphas back after every step.
    run_train(
        "-a", "resnet18", "-q", "DSQ", "--quan_bit", "2", "--quantize_input", *SMALL,
        "--alpha-lr-scale", "1e5", "--epochs", "1", "--log_path", tmp_path, data,
    )  # fmt: skip
    sd = load(tmp_path / "checkpoint.pth.tar")["state_dict"]
    alphas = torch.stack([v for k, v in sd.items() if k.endswith("_quantizer.alpha")])
    lo, hi = torch.tensor(dsq_ext.nn.ALPHA_MIN), torch.tensor(dsq_ext.nn.ALPHA_MAX)
    assert len(alphas) == 38 and ((alphas >= lo) & (alphas <= hi)).all(), alphas
    # Some sit on an edge: those are the ones that the step took outside.
    assert ((alphas == lo) | (alphas == hi)).any(), alphas


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
        (
            ["-q", "DSQ", "--quan_bit", "9", "d"],
            "--quan_bit/--quan-bit: bits must be an int in 1..8, got 9",
        ),
        (["-q", "DSQ", "--w-bits", "0", "d"], "--w-bits: bits must be an int in 1..8, got 0"),
        (["-q", "DSQ", "--a-bits", "four", "d"], "--a-bits: bits must be an int in 1..8, got 'four'"),
        (["-q", "DSQ", "--alpha-init", "nan", "d"], "--alpha-init: alpha_init must be in (0, 0.5], got nan"),
        (
            ["-q", "DSQ", "--alpha-lr-scale", "inf", "d"],
            "--alpha-lr-scale: alpha_lr_scale must be a finite number >= 0, got inf",
        ),
        (["--quan_bit", "4", "--quantize_input", "d"], "--quan_bit, --quantize_input only apply with -q"),
        (
            ["-q", "uniform", "--alpha-init", "0.1", "d"],
            "--alpha-init and --alpha-lr-scale apply to -q DSQ only",
        ),
        (["-q", "DSQ", "--alpha-init", "0.7", "d"], "--alpha-init: alpha_init must be in (0, 0.5], got 0.7"),
        (["-q", "DSQ", "--bounds", "minmax", "d"], "argument --bounds: invalid choice: 'minmax'"),
        (["-q", "DSQ", "--quantize_input", "-e", "d"], "--evaluate of a model with quantized activations"),
        (["--init-from", "/nonexistent.pth.tar", "d"], "--init-from /nonexistent.pth.tar: no such file"),
        (["--act-percentile", "99", "d"], "--act-percentile only apply with -q"),
        (["--no-recompute", "d"], "--[no-]recompute only apply with -q"),
        (["-q", "DSQ", "--act-percentile", "99", "d"], "--act-percentile needs quantized activations"),
        (["--alpha-lr-scale", "10", "d"], "--alpha-lr-scale only apply with -q"),
        (["-q", "uniform", "--alpha-lr-scale", "10", "d"], "--alpha-lr-scale apply to -q DSQ only"),
        (
            ["-q", "DSQ", "--bounds-lr-scale", "-1", "d"],
            "--bounds-lr-scale: bounds_lr_scale must be a finite number >= 0, got -1.0",
        ),
        (["--lr", "nan", "d"], "--lr must be a finite number >= 0, got nan"),
        (["--lr", "inf", "d"], "--lr must be a finite number >= 0, got inf"),
        (["--lr", "-0.1", "d"], "--lr must be a finite number >= 0, got -0.1"),
        (["--epochs", "0", "d"], "--epochs must be >= 1 (the number of epochs to train), got 0"),
        (["--epochs", "-2", "d"], "--epochs must be >= 1 (the number of epochs to train), got -2"),
        (
            ["-q", "DSQ", "--resume", "/nonexistent.pth.tar", "d"],
            "--resume /nonexistent.pth.tar: no such file",
        ),
        (
            ["-q", "DSQ", "--quantize_input", "--act-percentile", "40", "d"],
            "--act-percentile: percentile must be a number in (50, 100] or None, got 40.0",
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

    assert parsed().is_float
    cfg = parsed("-q", "dsq")  # the seed's defaults: 8-bit weights, float activations
    assert (cfg.weight.bits, cfg.act, cfg.weight.bounds, cfg.weight.alpha_init) == (8, None, "learned", 0.2)
    cfg = parsed("-q", "Dsq", "--quan_bit", "3", "--quantize_input", "--w-bits", "2", "--bounds", "ema")
    assert (cfg.method, cfg.weight.bits, cfg.act.bits, cfg.act.bounds) == ("dsq", 2, 3, "ema")
    assert parsed("-q", "DSQ", "--a-bits", "4").act.bits == 4  # --a-bits implies --quantize_input
    cfg = parsed("-q", "uniform", "--quan-bit", "2", "--quantize-input", "--act-percentile", "99")
    assert cfg.act.percentile == 99.0 and cfg.weight.percentile is None and cfg.weight.bits == 2
    assert "--act-percentile 99" in train_script.describe_config(cfg)
    assert parsed("-q", "DSQ", "--quantize-first-last").skip_first is False
    cfg = parsed("-q", "DSQ", "--quantize-input", "--alpha-lr-scale", "100", "--bounds-lr-scale", "0")
    assert (cfg.act.alpha_lr_scale, cfg.weight.bounds_lr_scale) == (100.0, 0.0)
    assert "--alpha-lr-scale 100 --bounds-lr-scale 0" in train_script.describe_config(cfg)
    args = train_script.parser.parse_args(["-q", "DSQ", "--log-path", "somewhere", "d"])
    assert args.log_path == "somewhere"
    # recompute: how the layers compute, not part of the recorded config
    args = train_script.parser.parse_args(["-q", "DSQ", "--no-recompute", "d"])
    train_script.check_args(args)
    assert args.recompute is False and "recompute" not in str(train_script.quant_config(args).to_dict())


@slow
def test_resume_with_another_config_is_rejected(dsq_run, train_script, capsys):
    log, _ = dsq_run
    ckpt = str(log / "checkpoint.pth.tar")
    uniform = ["-q", "uniform", "--quan_bit", "4", "--quantize_input"]
    err = _reject(train_script, capsys, [*uniform, "--resume", ckpt, "d"])
    # (a uniform config has no alpha, so its alpha lr scale is 1, not DSQ's 1000)
    assert (
        "was written by a different configuration (differs in weight.method, weight.alpha_lr_scale, "
        "act.method, act.alpha_lr_scale)" in err
    )
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
