"""dsq_ext.checkpoint: atomic writes, stale temporaries, clear errors for files that are not checkpoints,
and checkpoints written in the earlier format (train.py, report) keeping their meaning."""

import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
import torchvision
from train_helpers import ENV, SMALL, _summary_acc1, run_train, slow

import dsq_ext
from dsq_ext import checkpoint, report


def test_atomic_save_keeps_the_previous_file(tmp_path):
    path = tmp_path / "checkpoint.pth.tar"
    checkpoint.atomic_save({"epoch": 1}, str(path))

    class Unsaveable:
        def __reduce__(self):
            raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError, match="interrupted"):
        checkpoint.atomic_save({"epoch": 2, "x": Unsaveable()}, str(path))
    assert torch.load(path)["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pth.tar"]


_KILLED_WRITER = """
import sys, time, torch
from dsq_ext import checkpoint

class Slow:
    def __reduce__(self):
        time.sleep(600)

checkpoint.atomic_save({"w": torch.zeros(1000), "slow": Slow()}, sys.argv[1])
"""


def test_a_write_killed_mid_save_leaves_a_temporary_that_the_next_save_removes(tmp_path):
    target = tmp_path / "checkpoint.pth.tar"
    checkpoint.atomic_save({"epoch": 1}, str(target))
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_WRITER, str(target)], env=ENV)
    try:
        deadline = time.monotonic() + 60
        while not list(tmp_path.glob(".checkpoint.pth.tar.*.tmp")) and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    stale = list(tmp_path.glob(".checkpoint.pth.tar.*.tmp"))
    assert len(stale) == 1, "the killed writer should have left its temporary"
    assert torch.load(target)["epoch"] == 1  # the previous checkpoint is intact
    checkpoint.atomic_save({"epoch": 2}, str(target))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pth.tar"]
    assert torch.load(target)["epoch"] == 2


def _bad_files(tmp_path):
    good = tmp_path / "good.pth.tar"
    torch.save({"state_dict": {"w": torch.zeros(64)}, "epoch": 1}, good)
    files = {
        "empty": (b"", "the file is empty"),
        "text": (
            b"epoch: 3\nthis is not a checkpoint\n",
            "not a PyTorch checkpoint (a torch.save file is a zip",
        ),
        "random": (b"\x13" + os.urandom(4095), "not a PyTorch checkpoint (a torch.save file is a zip"),
        "truncated": (good.read_bytes()[:300], "corrupt or truncated PyTorch checkpoint (RuntimeError: "),
        "pickle": (b"\x80\x02" + os.urandom(100), "corrupt or truncated PyTorch checkpoint ("),
    }
    paths = {}
    for name, (data, message) in files.items():
        p = tmp_path / f"{name}.pth.tar"
        p.write_bytes(data)
        paths[name] = (p, message)
    lst = tmp_path / "list.pth.tar"
    torch.save([1, 2, 3], lst)
    paths["list"] = (lst, "not a checkpoint written by train.py: it holds list")
    other = tmp_path / "other.pth.tar"
    torch.save({"model": {"w": torch.zeros(1)}, "step": 3}, other)
    paths["not ours"] = (other, "not a checkpoint written by train.py: it holds a dict without 'state_dict'")
    paths["missing"] = (tmp_path / "nope.pth.tar", "no such file")
    return paths


def test_files_that_are_not_checkpoints_get_one_line_naming_them(tmp_path):
    for _, (path, message) in _bad_files(tmp_path).items():
        with pytest.raises(checkpoint.CheckpointError) as exc:
            checkpoint.read_checkpoint(str(path), "--resume")
        text = str(exc.value)
        assert text.startswith(f"--resume {path}: ") and message in text, text
        assert "\n" not in text and "weights_only" not in text


@pytest.mark.parametrize("flag", ["--resume", "--init-from"])
def test_train_py_rejects_them_before_anything_runs(train_script, capsys, tmp_path, flag):
    for _, (path, message) in _bad_files(tmp_path).items():
        argv = ["-q", "DSQ"] if flag == "--resume" else []
        with pytest.raises(SystemExit) as exc:
            train_script.check_args(train_script.parser.parse_args([*argv, flag, str(path), "d"]))
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert f"error: {flag} {path}: " in err and message in err, err
        assert "Traceback" not in err


def test_report_rejects_them_with_one_line(tmp_path, capsys):
    for name, (path, message) in _bad_files(tmp_path).items():
        if name == "not ours":
            continue  # a bare dict of tensors is a state_dict, which the report accepts
        assert report.main([str(path)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"error: report {path}: ") and message in err and "\n" not in err, err


def test_a_missing_resume_file_stops_before_anything_is_written(tmp_path):
    log = tmp_path / "log"
    code, out = run_train(
        "-q", "DSQ", "--resume", tmp_path / "nope.pth.tar", "--log_path", log, tmp_path, check=False
    )
    assert code == 2 and f"--resume {tmp_path / 'nope.pth.tar'}: no such file" in out
    assert not log.exists()


# A checkpoint as train.py wrote it before ModelQuantConfig (its "quant" is format 1).
FORMAT_1 = {
    "method": "dsq",
    "w_bits": 4,
    "a_bits": 4,
    "per_channel": False,
    "quantize_first_last": False,
    "bounds": "learned",
    "alpha_init": 0.2,
    "act_percentile": None,
}


def _format_1_checkpoint(path, data):
    torch.manual_seed(0)
    model = dsq_ext.quantize_model(torchvision.models.resnet18(), "dsq", 4, 4, alpha_lr_scale=1, grid="free")
    model.train()
    with torch.no_grad():
        model(torch.randn(4, 3, 32, 32))  # sets the activation bounds, as the first training step does
    opt = torch.optim.SGD(dsq_ext.param_groups(model, 1e-4), 0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(opt, 30)
    state = {
        "epoch": 1,
        "arch": "resnet18",
        "state_dict": model.state_dict(),
        "best_acc1": 25.0,
        "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict(),
        "quant": dict(FORMAT_1),
        "image_size": 32,
    }
    torch.save(state, path)
    return model


def test_format_1_checkpoint_reads_in_report(tmp_path, capsys):
    path = tmp_path / "old.pth.tar"
    _format_1_checkpoint(path, None)
    assert report.main([str(path)]) == 0
    out = capsys.readouterr().out
    assert "arch resnet18, DSQ W4A4, bounds learned, free grid, epoch 1" in out
    assert "| layer1.0.conv1 | 4 | 0.2 |" in out


@slow
def test_format_1_checkpoint_evaluates_and_resumes(tmp_path, data):
    path = tmp_path / "old.pth.tar"
    model = _format_1_checkpoint(path, data)
    flags = ["-a", "resnet18", "-q", "DSQ", "--quan_bit", "4", "--quantize_input", *SMALL]
    # Without --grid free --alpha-lr-scale 1 the run asks for today's defaults: a different configuration.
    rc, err = run_train(*flags, "--log_path", tmp_path / "eval", "-e", "--resume", path, data, check=False)
    assert rc == 2 and "weight.grid" in err and "weight.alpha_lr_scale" in err, err
    assert "--alpha-lr-scale 1 --grid free" in err, err
    assert not (tmp_path / "eval").exists()
    flags += ["--alpha-lr-scale", "1", "--grid", "free"]
    _, out = run_train(*flags, "--log_path", tmp_path / "eval", "-e", "--resume", path, data)
    assert len(_summary_acc1(out)) == 1
    # Resuming continues the old run at its next epoch, and records the config in today's format.
    log = tmp_path / "resumed"
    shutil.copy(path, tmp_path / "copy.pth.tar")
    _, out = run_train(
        *flags, "--epochs", "2", "--log_path", log, "--resume", tmp_path / "copy.pth.tar", data
    )
    assert "(epoch 1)" in out and "Epoch: [1][" in out
    ckpt = torch.load(log / "checkpoint.pth.tar")
    assert ckpt["quant"] == dsq_ext.ModelQuantConfig.from_dict(FORMAT_1).to_dict()
    # The quantizers continued from the old values, not from a new initialisation.
    old = model.state_dict()["layer1.0.conv1.act_quantizer.lower"]
    assert bool(ckpt["state_dict"]["layer1.0.conv1.act_quantizer.initialized"]) and torch.isfinite(old)
