#!/usr/bin/env python
"""onnxruntime CPU latency and throughput: exported W8A8 and W4A4 ResNet-18 against the float model.

Variants (one random-weight ResNet-18, the same weights for all):

  float   torch.onnx.export of the float model
  w8a8    dsq_ext.quantize_model(model, "dsq", 8, 8), exported with dsq_ext.export_onnx
  w4a4    the same at 4 bits (weights stored as int4 with the default opset 21)

The quantized models get their activation bounds from one training forward on a
random batch. The weights are on the symmetric grid (int8 / int4 codes, zero point 0),
the activations on the affine grid (uint8 codes), both exported exactly.

For each image size, every variant is exported once (the batch dimension is
dynamic), and for each batch size every round runs every session once (A B C A B C
...); the reported ratio is the median of the per-round ratios to float. Sessions
use onnxruntime's default optimisation (ORT_ENABLE_ALL) on the CPU; each quantized
model also runs with session.disable_quant_qdq=1 ("no-QDQ-fusion"), which lets
onnxruntime fold the weights' DequantizeLinear (and BatchNorm) into float
convolutions when the session starts, instead of keeping them for QDQ fusions.

"Kernels" says what onnxruntime ran: the node types of the optimised graph that it
writes out (SessionOptions.optimized_model_filepath). QLinearConv / ConvInteger /
MatMulInteger / QLinearMatMul / MatMulIntegerToFloat are integer kernels;
Conv / FusedConv / Gemm / MatMul next to DequantizeLinear mean the weights were
dequantized and the layer ran in float.

    python bench/bench_onnx.py                          # 32 and 224 px, batch 1 and 32
    python bench/bench_onnx.py --sizes 224 --batches 1 --threads 4
    python bench/bench_onnx.py --quick                  # 32 px, batch 1 and 2, two rounds: a smoke test
"""

from __future__ import annotations

import argparse
import collections
import copy
import functools
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

import dsq_ext  # noqa: E402
from dsq_ext import export as E  # noqa: E402

VARIANTS = {"float": None, "w8a8": 8, "w4a4": 4}
INTEGER_OPS = ("QLinearConv", "ConvInteger", "MatMulInteger", "QLinearMatMul", "MatMulIntegerToFloat")
FLOAT_OPS = ("Conv", "FusedConv", "Gemm", "FusedGemm", "MatMul", "FusedMatMul")


def build_models(num_classes: int, calib_size: int):
    import torchvision

    torch.manual_seed(0)
    base = torchvision.models.resnet18(num_classes=num_classes).eval()
    models = {"float": base}
    for name, bits in VARIANTS.items():
        if bits is None:
            continue
        m = copy.deepcopy(base)
        # int8 weights (zero point 0) and uint8 activations: the u8s8 pair that onnxruntime's
        # x86 integer kernels are built for
        dsq_ext.quantize_model(m, "dsq", bits, bits, grid="symmetric")
        m.train()
        with torch.no_grad():
            m(torch.randn(8, 3, calib_size, calib_size))
        models[name] = m.eval()
    return models


def export_all(models, size: int, folder: str) -> dict:
    paths = {}
    x = torch.randn(2, 3, size, size)
    for name, m in models.items():
        path = os.path.join(folder, f"{name}_{size}.onnx")
        if name == "float":
            torch.onnx.export(
                m, (x,), path, dynamo=True, input_names=["input"], output_names=["output"],
                dynamic_shapes=({0: torch.export.Dim("batch")},), verbose=False, external_data=False,
            )  # fmt: skip
        else:
            E.export_onnx(m, x, path, check=False)
        paths[name] = path
    return paths


def session(path: str, threads: int | None, qdq_fusion: bool = True, optimized_path: str | None = None):
    import onnxruntime as ort

    so = ort.SessionOptions()
    if not qdq_fusion:
        so.add_session_config_entry("session.disable_quant_qdq", "1")
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    if optimized_path:
        so.optimized_model_filepath = optimized_path
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


def kernels(path: str, threads: int | None, qdq_fusion: bool) -> dict:
    """The node types of the graph onnxruntime optimised and runs."""
    import onnx

    with tempfile.TemporaryDirectory() as tmp:
        opt = os.path.join(tmp, "optimized.onnx")
        session(path, threads, qdq_fusion, opt)
        counts = collections.Counter(n.op_type for n in onnx.load(opt).graph.node)
    return dict(counts)


def describe(counts: dict) -> str:
    ints = {k: v for k, v in counts.items() if k in INTEGER_OPS}
    floats = {k: v for k, v in counts.items() if k in FLOAT_OPS}
    extra = {k: counts.get(k, 0) for k in ("DequantizeLinear", "BatchNormalization") if counts.get(k)}
    parts = [f"{k} {v}" for k, v in sorted(ints.items())] + [f"{k} {v}" for k, v in sorted(floats.items())]
    verdict = "integer" if ints and not floats else "float" if not ints else "mixed"
    return f"{verdict}: " + ", ".join(parts + [f"{k} {v}" for k, v in extra.items()])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default=None, help="comma list of image sizes (default 32,224; --quick 32)")
    p.add_argument("--batches", default=None, help="comma list of batch sizes (default 1,32; --quick 1,2)")
    p.add_argument("--rounds", type=int, default=None, help="timed rounds per batch size (default 30)")
    p.add_argument(
        "--threads", type=int, default=None, help="onnxruntime intra-op threads (default: its own)"
    )
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--quick", action="store_true", help="32 px, batch 1 and 2, two rounds: a smoke test")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    args = p.parse_args(argv)
    sizes = [int(s) for s in (args.sizes or ("32" if args.quick else "32,224")).split(",")]
    batches = [int(b) for b in (args.batches or ("1,2" if args.quick else "1,32")).split(",")]
    rounds = args.rounds or (2 if args.quick else 30)
    threads = args.threads or (1 if args.quick else None)

    import onnxruntime as ort

    models = build_models(args.num_classes, min(sizes))
    info = common.machine_info(torch.device("cpu"))
    info.update(onnxruntime=ort.__version__, ort_threads=threads or "default")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in sizes:
            paths = export_all(models, size, tmp)
            runs = {n: (n, True) for n in paths}
            runs.update({f"{n} no-QDQ-fusion": (n, False) for n in paths if n != "float"})
            sizes_mb = {r: os.path.getsize(paths[n]) / 2**20 for r, (n, _) in runs.items()}
            ran = {r: kernels(paths[n], threads, fuse) for r, (n, fuse) in runs.items()}
            sessions = {r: session(paths[n], threads, fuse) for r, (n, fuse) in runs.items()}
            for batch in batches:
                x = np.random.default_rng(0).standard_normal((batch, 3, size, size), dtype=np.float32)
                run = {n: functools.partial(s.run, None, {"input": x}) for n, s in sessions.items()}
                for fn in run.values():  # warm-up
                    fn()
                times = {n: [] for n in run}
                for _ in range(rounds):
                    for n, fn in run.items():
                        times[n].append(common.timed(fn, torch.device("cpu")))
                for n in run:
                    ratios = [t / f for t, f in zip(times[n], times["float"])]
                    t = common.median(times[n])
                    results.append(dict(
                        variant=n, image_size=size, batch=batch, median_s=t, best_s=min(times[n]),
                        ratio_to_float=common.median(ratios), images_per_s=batch / t,
                        file_mib=sizes_mb[n], kernels=ran[n],
                    ))  # fmt: skip

    header = ["variant", "px", "batch", "latency ms median (best)", "x float", "images/s", "file MiB"]
    rows = [
        [r["variant"], r["image_size"], r["batch"],
         f"{common.fmt_ms(r['median_s'])} ({common.fmt_ms(r['best_s'])})",
         common.fmt_ratio(r["ratio_to_float"]), f"{r['images_per_s']:.1f}", f"{r['file_mib']:.1f}"]
        for r in results
    ]  # fmt: skip
    ran = {(r["variant"], r["image_size"]): describe(r["kernels"]) for r in results}
    print(f"onnxruntime {ort.__version__} CPU ({info['cpu']}, {info['logical_cpus']} logical CPUs, "
          f"intra-op threads {info['ort_threads']}); {rounds} rounds")  # fmt: skip
    print(common.markdown_table(header, rows))
    print("\nWhat onnxruntime ran (node types of its optimised graph):\n")
    print(common.markdown_table(["variant", "px", "kernels"], [[v, px, k] for (v, px), k in ran.items()]))
    common.finish(info, args.json, {"results": results})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
