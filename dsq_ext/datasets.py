"""Small datasets written as ImageFolder trees, so that train.py reads them like ImageNet.

    python -m dsq_ext.datasets fashion-mnist data/fashion-mnist

reads Fashion-MNIST's IDX files (Debian's dataset-fashion-mnist package, or
--source DIR) and writes DIR/train and DIR/val: one folder per class, one
grayscale PNG per image. ImageFolder's default loader converts every image to
RGB, so any torchvision model takes them unchanged. Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import gzip
import os
import shutil
import struct
import sys
from concurrent.futures import ProcessPoolExecutor

import numpy as np

__all__ = [
    "FASHION_MNIST_CLASSES",
    "read_idx",
    "write_image_folder",
    "prepare_fashion_mnist",
    "train_transform",
    "val_transform",
]

DEBIAN_FASHION_MNIST = "/usr/share/datasets/fashion-mnist"
INSTALL_HINT = "apt-get install dataset-fashion-mnist"

# Label order of the IDX files. The numeric prefix keeps ImageFolder's
# alphabetical class order equal to the original label numbers.
FASHION_MNIST_CLASSES = (
    "0_tshirt_top", "1_trouser", "2_pullover", "3_dress", "4_coat",
    "5_sandal", "6_shirt", "7_sneaker", "8_bag", "9_ankle_boot",
)  # fmt: skip

# split written -> (images file, labels file), without the optional .gz
FASHION_MNIST_FILES = {
    "val": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
}

# IDX type codes (http://yann.lecun.com/exdb/mnist/, "THE IDX FILE FORMAT").
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


# The ImageNet example's normalisation (ImageNet's channel means and standard deviations).
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def train_transform(size: int):
    """The ImageNet example's training transform at size x size: random-resized crop, flip, normalise."""
    import torchvision.transforms as T

    return T.Compose(
        [
            T.RandomResizedCrop(size),
            T.RandomHorizontalFlip(),
            T.ToTensor(),
            T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )


def val_transform(size: int):
    """The ImageNet example's validation transform: resize to size/0.875, centre-crop size, normalise."""
    import torchvision.transforms as T

    return T.Compose(
        [
            T.Resize(int(size / 0.875)),
            T.CenterCrop(size),
            T.ToTensor(),
            T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )


def read_idx(path: str) -> np.ndarray:
    """The array stored in an IDX file, gzip-compressed or plain."""
    with open(path, "rb") as f:
        gzipped = f.read(2) == b"\x1f\x8b"
    with (gzip.open if gzipped else open)(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise ValueError(f"{path}: not an IDX file (header {data[:4].hex()})")
    ndim = data[3]
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    dtype = np.dtype(_IDX_DTYPES[data[2]])
    body = data[4 + 4 * ndim :]
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(body) != expected:
        raise ValueError(f"{path}: header says {shape} ({expected} bytes), file holds {len(body)}")
    return np.frombuffer(body, dtype=dtype).reshape(shape).astype(dtype.newbyteorder("="))


def _find(source: str, name: str) -> str | None:
    for candidate in (name + ".gz", name):
        path = os.path.join(source, candidate)
        if os.path.isfile(path):
            return path
    return None


def _count_pngs(root: str, classes) -> int:
    total = 0
    for c in classes:
        d = os.path.join(root, c)
        if os.path.isdir(d):
            total += sum(1 for e in os.scandir(d) if e.name.endswith(".png"))
    return total


def write_image_folder(
    images: np.ndarray, labels: np.ndarray, classes, root: str, workers: int | None = None
) -> None:
    """Writes root/<class>/<index>.png for uint8 images (N, H, W); root appears only once complete."""
    if images.ndim != 3 or images.dtype != np.uint8:
        raise ValueError(f"expected uint8 images of shape (N, H, W), got {images.dtype} {images.shape}")
    if len(images) != len(labels):
        raise ValueError(f"{len(images)} images but {len(labels)} labels")
    if len(labels) and (labels.min() < 0 or labels.max() >= len(classes)):
        raise ValueError(f"labels span {labels.min()}..{labels.max()}, but there are {len(classes)} classes")
    # Written beside root and renamed at the end: an interrupted run never
    # leaves a root that looks complete.
    partial = os.path.join(os.path.dirname(os.path.abspath(root)), "." + os.path.basename(root) + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    jobs, chunk = [], 2000
    for c, name in enumerate(classes):
        folder = os.path.join(partial, name)
        os.makedirs(folder)
        idx = np.flatnonzero(labels == c)
        # File names are the image's index in the IDX file, so they are stable across runs.
        for s in range(0, len(idx), chunk):
            sel = idx[s : s + chunk]
            jobs.append((folder, sel, images[sel]))
    workers = workers if workers is not None else min(4, os.cpu_count() or 1)
    if workers > 1 and len(images) > 4 * chunk:
        with ProcessPoolExecutor(workers) as pool:
            list(pool.map(_write_named_pngs, jobs))
    else:
        for job in jobs:
            _write_named_pngs(job)
    os.replace(partial, root)


def _write_named_pngs(job) -> None:
    from PIL import Image

    folder, indices, images = job
    for i, img in zip(indices, images):
        # compress_level=1: these are tiny images; speed matters more than bytes.
        Image.fromarray(img).save(os.path.join(folder, f"{int(i):05d}.png"), compress_level=1)


def prepare_fashion_mnist(out: str, source: str | None = None, workers: int | None = None) -> dict:
    """Writes out/train (60k) and out/val (10k) from the IDX files; skips splits already complete."""
    source = source or DEBIAN_FASHION_MNIST
    paths = {}
    missing = []
    for split, names in FASHION_MNIST_FILES.items():
        found = [_find(source, n) for n in names]
        missing += [n + "[.gz]" for n, p in zip(names, found) if p is None]
        paths[split] = found
    if missing:
        hint = (
            f"install them with `{INSTALL_HINT}` (Debian/Ubuntu, as root)"
            if source == DEBIAN_FASHION_MNIST
            else f"put the four IDX files there, or install Debian's (`{INSTALL_HINT}`) and drop --source"
        )
        raise FileNotFoundError(
            f"Fashion-MNIST IDX files not found in {source}: missing {', '.join(missing)}; {hint}"
        )
    os.makedirs(out, exist_ok=True)
    counts = {}
    # val first: the Makefile treats out/train as the sign that the whole tree is there.
    for split in ("val", "train"):
        root = os.path.join(out, split)
        labels = read_idx(paths[split][1])
        if os.path.isdir(root):
            have = _count_pngs(root, FASHION_MNIST_CLASSES)
            if have == len(labels):
                print(f"=> {root}: already complete ({have} images), skipped")
                counts[split] = have
                continue
            raise FileExistsError(
                f"{root} exists but holds {have} images instead of {len(labels)}; remove it and run again"
            )
        images = read_idx(paths[split][0])
        print(f"=> writing {len(images)} images to {root}")
        write_image_folder(images, labels.astype(np.int64), FASHION_MNIST_CLASSES, root, workers)
        counts[split] = len(images)
    return counts


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dsq_ext.datasets", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="dataset", required=True)
    fm = sub.add_parser(
        "fashion-mnist", help="Fashion-MNIST (10 classes, 28x28 grayscale) as DIR/train and DIR/val"
    )
    fm.add_argument("dir", metavar="DIR", help="output directory")
    fm.add_argument(
        "--source",
        metavar="SRC",
        default=None,
        help=f"directory holding the IDX files, gzip-compressed or plain (default: {DEBIAN_FASHION_MNIST})",
    )
    fm.add_argument(
        "-j", "--workers", type=int, default=None, help="processes writing PNGs (default: min(4, CPUs))"
    )
    args = parser.parse_args(argv)
    try:
        counts = prepare_fashion_mnist(args.dir, args.source, args.workers)
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"=> {args.dir}: " + ", ".join(f"{k} {v} images" for k, v in counts.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
