"""dsq_ext.datasets: Fashion-MNIST's IDX files written as an ImageFolder tree."""

import gzip
import os
import struct

import numpy as np
from PIL import Image

from dsq_ext import datasets


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
