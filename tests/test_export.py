"""dsq_ext.export: the ONNX file against the PyTorch eval model, in onnxruntime (CPU).

A small conv + linear model whose first layer is quantized, so that the first
quantizer sees the model's input itself: its codes must be identical whatever
onnxruntime does with floats. Deeper codes may differ only for values that lie
within float rounding of a rounding boundary (the float ops before them sum in
another order); each comparison reports how far from a boundary the worst
disagreeing value was, and the tests bound it.
"""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import dsq_ext
from dsq_ext import export as E

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

REPO = Path(__file__).resolve().parents[1]


class Net(nn.Module):
    """conv (first, quantized) -> grouped reflect-padded conv -> strided conv -> linear -> float linear.

    conv0 and conv1 feed the next quantizer through a Relu only, which onnxruntime fuses into
    QLinearConv; they have no bias unless bias0 (see test_qlinearconv_rounds_the_bias).
    """

    def __init__(self, bias0=False):
        super().__init__()
        self.conv0 = nn.Conv2d(3, 8, 3, padding=1, bias=bias0)
        self.conv1 = nn.Conv2d(8, 8, 3, padding=1, groups=2, bias=False, padding_mode="reflect")
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2)  # 10x10 -> 4x4: the mean divides by 16, exactly
        self.fc1 = nn.Linear(16, 12)
        self.fc2 = nn.Linear(12, 10)

    def forward(self, x):
        x = torch.relu(self.conv0(x))
        x = torch.relu(self.conv1(x))
        x = torch.relu(self.conv2(x))
        x = torch.relu(self.fc1(x.mean((2, 3))))
        return self.fc2(x)


def make_model(bits, per_channel, method, grid="free", seed=0, bias0=False, **kw):
    torch.manual_seed(seed)
    m = Net(bias0)
    dsq_ext.quantize_model(m, method=method, w_bits=bits, a_bits=bits, per_channel=per_channel,
                           skip_first=False, grid=grid, **kw)  # fmt: skip
    m.train()
    m(torch.randn(16, 3, 10, 10))  # sets the bounds from this batch
    return m.eval()


def snap_bounds(model, dyadic=False):
    """Bounds with an integer -l/Delta (up to float rounding): the free grid is then an affine one.

    dyadic: a power-of-two step as well, so that x / Delta is exact.
    """
    for _, layer in dsq_ext.quantized_modules(model):
        for q in (layer.weight_quantizer, layer.act_quantizer):
            if q is None:
                continue
            n = 2**q.bits - 1
            with torch.no_grad():
                delta = (q.upper - q.lower) / n
                if dyadic:
                    delta = 2.0 ** torch.round(torch.log2(delta))
                z = torch.round(-q.lower / delta).clamp(0, n)
                q.lower.copy_(-z * delta)
                q.upper.copy_((n - z) * delta)
    return model


def inputs(n=6, seed=1):
    return torch.randn(n, 3, 10, 10, generator=torch.Generator().manual_seed(seed))


def assert_parity(model, path, x, *, optimized, boundary=1e-4):
    """Codes identical except where explained; top-1 identical; outputs close.

    The first layer whose codes differ anywhere must have every disagreeing value within
    `boundary` steps of a rounding boundary (float rounding upstream); a code moved there
    may move a few values of the layers after it further (propagation): those may differ
    by one code on at most 1% of their elements (or 2).
    """
    p = E.compare_onnx(model, path, [x], optimized=optimized)
    text = E.format_parity(p)
    layers = list(p["layers"].values())
    assert layers[0]["mismatches"] == 0, text  # the model's input: no float op before it
    upstream = False
    for s in layers:
        assert s["elements"] > 0
        if s["mismatches"] and not upstream:
            assert s["max_code_diff"] == 1 and s["max_margin"] <= boundary, text
        elif s["mismatches"]:
            assert s["max_code_diff"] == 1 and s["mismatches"] <= max(2, 0.01 * s["elements"]), text
        upstream |= s["mismatches"] > 0
    assert p["top1_agree"] == p["images"] == x.shape[0], text
    with torch.no_grad():
        scale = model(x).abs().max().item()
    assert p["max_abs_diff"] <= (0.02 if upstream else 1e-4) * scale, text
    return p


@pytest.fixture(scope="module")
def approx_export(tmp_path_factory):
    """export(bits, per_channel, opset=None) -> (model, path, result) of an approximated free-grid
    model whose bounds make the free grid an affine one; each made once per module."""
    made = {}

    def export(bits, per_channel, opset=None):
        key = (bits, per_channel, opset)
        if key not in made:
            method = "uniform" if per_channel else "dsq"
            model = snap_bounds(make_model(bits, per_channel, method))
            path = tmp_path_factory.mktemp("approx") / "m.onnx"
            with pytest.warns(UserWarning, match="nearest integer zero point"):
                res = dsq_ext.export_onnx(model, inputs(2), path, approximate=True, opset=opset)
            made[key] = model, path, res
        return made[key]

    return export


def initializers(path):
    m = onnx.load(path)
    return m, {t.name: t for t in m.graph.initializer}


# ---------------------------------------------------------------------------------------
# Exact grids


@pytest.mark.parametrize(
    "bits, per_channel, wgrid, method",
    # each grid per tensor and per channel, with DSQ and uniform, at every bit width
    [(2, False, "symmetric", "dsq"), (2, True, "affine", "uniform"), (4, False, "affine", "uniform"),
     (4, True, "symmetric", "dsq"), (8, False, "symmetric", "uniform"), (8, True, "affine", "dsq")],
)  # fmt: skip
def test_exact_grids_match_onnxruntime(tmp_path, bits, per_channel, wgrid, method):
    model = make_model(bits, per_channel, method, grid=wgrid)
    path = tmp_path / "m.onnx"
    res = dsq_ext.export_onnx(model, inputs(2), path)
    onnx.checker.check_model(onnx.load(path), full_check=True)
    assert {d["grid"] for d in res.layers if d["kind"] == "weight"} == {wgrid}
    assert {d["grid"] for d in res.layers if d["kind"] == "activation"} == {"affine"}
    signed = {"int8", "int4"} if wgrid == "symmetric" else {"uint8", "uint4"}
    assert {d["container"] for d in res.layers if d["kind"] == "weight"} <= signed
    if wgrid == "symmetric":  # narrow range, zero point 0
        q = 2 ** (bits - 1) - 1
        assert {tuple(d["codes"]) for d in res.layers if d["kind"] == "weight"} == {(-q, q)}
    x = inputs()
    # The float ops are PyTorch's up to summation order (about 1e-7 relative); the default
    # optimisation runs conv0 and conv1 as QLinearConv (integer sums, requantized by a float
    # multiplier), which moves values by about as little.
    assert_parity(model, path, x, optimized=False)
    assert_parity(model, path, x, optimized=True)


@pytest.mark.parametrize("bits", [2, 8])
def test_dyadic_model_is_bit_exact(tmp_path, bits):
    # Power-of-two scales, integer zero points and inputs on a coarse grid: every float op is
    # exact in any order, values often land exactly on a half step, and onnxruntime must
    # round them as the model does (half to even) for every code to be identical.
    model = snap_bounds(make_model(bits, True, "dsq", grid="affine"), dyadic=True)
    with torch.no_grad():
        for _, layer in dsq_ext.quantized_modules(model):
            layer.weight.copy_(layer.quantized_weight())
            if layer.bias is not None:
                layer.bias.copy_(torch.round(layer.bias * 16) / 16)
    path = tmp_path / "m.onnx"
    dsq_ext.export_onnx(model, inputs(2), path)
    x = torch.round(inputs() * 4) / 4
    for optimized in (False, True):
        p = E.compare_onnx(model, path, [x], optimized=optimized)
        for s in p["layers"].values():
            assert s["mismatches"] == 0, E.format_parity(p)
        assert sum(s["ties"] for s in p["layers"].values()) > 100, p  # values exactly on a half step
        assert p["max_abs_diff"] < 1e-6  # the float classifier sums in another order


@pytest.mark.parametrize("bits", [2])
def test_qlinearconv_rounds_the_bias(tmp_path, bits):
    # onnxruntime's QLinearConv adds the bias as int32 at scale input_scale * weight_scale: the
    # bias moves by up to half that, and with it the next layer's input. The exported graph is
    # exact; onnxruntime's fused kernel is not, unless its QDQ fusion is turned off.
    model = make_model(bits, True, "dsq", bias0=True, grid="affine")
    path = tmp_path / "m.onnx"
    dsq_ext.export_onnx(model, inputs(2), path)
    x = inputs()
    fused = E.compare_onnx(model, path, [x], optimized=True)
    assert fused["layers"]["conv0"]["mismatches"] == 0
    s_in = E._grid_params(E.quantizer_spec(model.conv0.act_quantizer), "affine")[0]
    s_w = E._grid_params(E.quantizer_spec(model.conv0.weight_quantizer), "affine")[0]
    s_out = E._grid_params(E.quantizer_spec(model.conv1.act_quantizer), "affine")[0]
    bound = (0.5 * s_in * s_w.max() / s_out).item() + 1e-4
    conv1 = fused["layers"]["conv1"]
    assert 0 < conv1["mismatches"] and conv1["max_margin"] <= bound, (E.format_parity(fused), bound)
    apart = E.compare_onnx(model, path, [x], optimized=True, qdq_fusion=False)
    assert all(s["mismatches"] == 0 for s in apart["layers"].values()), E.format_parity(apart)


# ---------------------------------------------------------------------------------------
# The free grid: refused, or approximated and measured


def test_free_grid_is_refused_with_the_way_out(tmp_path):
    model = make_model(4, False, "dsq", grid="free")
    with pytest.raises(
        E.ExportError, match=r"grid='free'.*the default --grid affine, or --grid symmetric.*approximate=True"
    ) as e:
        dsq_ext.export_onnx(model, inputs(2), tmp_path / "m.onnx")
    assert "conv0" in str(e.value) and "integer" in str(e.value)
    assert not (tmp_path / "m.onnx").exists()


@pytest.mark.parametrize("bits, per_channel", [(2, True), (4, True), (8, True), (4, False)])
def test_approximate_is_exact_when_the_free_grid_is_affine(approx_export, bits, per_channel):
    # With an integer -l/Delta the free levels are affine ones (up to float rounding); the
    # two roundings differ only at exact half steps, which random inputs do not hit.
    model, path, res = approx_export(bits, per_channel)
    assert {d["model_grid"] for d in res.layers} == {"free"}
    assert {d["grid"] for d in res.layers} == {"affine"}
    onnx.checker.check_model(onnx.load(path), full_check=True)
    x = inputs()
    assert_parity(model, path, x, optimized=False)
    assert_parity(model, path, x, optimized=True)


def test_approximate_measures_the_disagreement(tmp_path):
    model = make_model(2, False, "dsq")
    with torch.no_grad():  # a zero point of exactly k + 1/2: the worst case
        q = model.conv0.act_quantizer
        delta = (q.upper - q.lower) / 3
        q.lower.copy_(-1.5 * delta)
        q.upper.copy_(1.5 * delta)
    with pytest.warns(UserWarning, match=r"codes identical on \d+/\d+") as w:
        res = dsq_ext.export_onnx(model, inputs(2), tmp_path / "m.onnx", approximate=True)
    s = res.parity["layers"]["conv0"]
    assert s["mismatches"] > 0 and s["max_margin"] > 0.1
    assert "conv0" in str(w[0].message)


# ---------------------------------------------------------------------------------------
# The file: containers, structure, dynamic batch


def _quantize_nodes(path):
    m = onnx.load(path)
    return m, [n for n in m.graph.node if n.op_type == "QuantizeLinear"]


def test_why_4bit_activations_are_not_uint4():
    # The claim in dsq_ext/export.py: onnxruntime's default optimisation drops a Relu in front
    # of a QuantizeLinear to uint4 although the zero point (3) makes negative inputs matter.
    # If this fails, onnxruntime keeps the Relu now, and 4-bit activations could use uint4.
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("QuantizeLinear", ["r", "s", "z"], ["q"]),
         helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"])],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [5])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [5])],
        initializer=[numpy_helper.from_array(np.array(0.5, np.float32), "s"),
                     helper.make_tensor("z", TensorProto.UINT4, [], [3])],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    onnx.checker.check_model(model, full_check=True)
    x = np.array([-2.0, -1.0, 0.0, 1.0, 2.0], np.float32)
    plain, optimised = (E.ort_session(model, opt).run(None, {"x": x})[0] for opt in (False, True))
    np.testing.assert_array_equal(plain, [0.0, 0.0, 0.0, 1.0, 2.0])
    assert optimised[0] < 0, f"onnxruntime {ort.__version__} keeps the Relu now: {optimised}"


@pytest.mark.parametrize(
    "bits, opset, weight_type, clip",
    [(2, None, "UINT8", True), (4, None, "UINT4", True), (4, 18, "UINT8", True), (8, None, "UINT8", False)],
)
def test_containers(approx_export, bits, opset, weight_type, clip):
    model, path, res = approx_export(bits, True, opset)
    m, inits = initializers(path)
    assert res.opset == (opset or (21 if bits == 4 else 18))
    assert [o.version for o in m.opset_import if o.domain in ("", "ai.onnx")] == [res.opset]
    n = 2**bits - 1
    for layer in ("conv0", "conv1", "conv2", "fc1"):
        codes = inits[f"{layer}.weight_codes"]
        assert onnx.TensorProto.DataType.Name(codes.data_type) == weight_type
        values = onnx.numpy_helper.to_array(codes).astype(np.int64)
        assert 0 <= values.min() and values.max() <= n
        assert onnx.numpy_helper.to_array(inits[f"{layer}.weight_scale"]).shape == (
            model.get_submodule(layer).weight.shape[0],
        )
        zp = onnx.numpy_helper.to_array(inits[f"{layer}.input_zero_point"])
        assert zp.dtype == np.uint8 and 0 <= int(zp) <= n
    dq = {n.output[0]: n for n in m.graph.node if n.op_type == "DequantizeLinear"}
    assert all(a.i == 0 for a in dq["conv0.weight"].attribute if a.name == "axis")
    _, qs = _quantize_nodes(path)
    assert [q.output[0] for q in qs] == [E.input_codes_name(n) for n in ("conv0", "conv1", "conv2", "fc1")]
    producers = {o: n for n in m.graph.node for o in n.output}
    assert all((q.input[0] in producers and producers[q.input[0]].op_type == "Clip") == clip for q in qs)
    # float layers stay float
    assert onnx.TensorProto.DataType.Name(inits["fc2.weight"].data_type) == "FLOAT"
    assert json.loads({p.key: p.value for p in m.metadata_props}["dsq_ext.layers"]) == res.layers


def test_batch_is_dynamic_and_the_model_is_left_as_it_was(tmp_path):
    model = snap_bounds(make_model(4, False, "dsq")).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    path = tmp_path / "m.onnx"
    with pytest.warns(UserWarning):
        dsq_ext.export_onnx(model, inputs(1), path, approximate=True)  # traced with a batch of one
    assert model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    model.eval()
    sess = E.ort_session(str(path), optimized=False)
    for n in (1, 5):
        x = inputs(n)
        (out,) = sess.run(None, {"input": x.numpy()})
        with torch.no_grad():
            ref = model(x).numpy()
        assert out.shape == ref.shape == (n, 10)
        np.testing.assert_allclose(out, ref, rtol=0, atol=1e-4)


def test_layers_that_share_their_input(tmp_path):
    # A ResNet block's first conv and its downsample read the same tensor; with equal bounds
    # the exporter keeps one QuantizeLinear for both, and the metadata says so.
    class Fork(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(3, 4, 3, padding=1)
            self.a = nn.Conv2d(4, 4, 3, padding=1)
            self.b = nn.Conv2d(4, 4, 1)
            self.fc = nn.Linear(4, 3)

        def forward(self, x):
            x = torch.relu(self.stem(x))
            return self.fc((self.a(x) + self.b(x)).mean((2, 3)))

    model = Fork()
    dsq_ext.quantize_model(model, w_bits=4, a_bits=4, grid="free")
    model.train()
    model(inputs(4))
    snap_bounds(model.eval())
    path = tmp_path / "m.onnx"
    with pytest.warns(UserWarning):
        dsq_ext.export_onnx(model, inputs(2), path, approximate=True)
    m, qs = _quantize_nodes(path)
    assert [q.output[0] for q in qs] == ["a.input_codes"]
    assert json.loads({p.key: p.value for p in m.metadata_props}["dsq_ext.input_codes"]) == {
        "a": "a.input_codes",
        "b": "a.input_codes",
    }
    p = E.compare_onnx(model, path, [inputs()])
    assert p["layers"]["b"]["elements"] == p["layers"]["a"]["elements"] > 0
    assert p["layers"]["b"]["mismatches"] == 0 and p["top1_agree"] == 6


def test_weights_or_activations_only(tmp_path):
    for w_bits, a_bits in ((4, None), (None, 8)):
        torch.manual_seed(0)
        model = Net()
        dsq_ext.quantize_model(model, w_bits=w_bits, a_bits=a_bits, skip_first=False, grid="free")
        model.train()
        model(inputs(4))
        snap_bounds(model.eval())
        path = tmp_path / f"m{w_bits}{a_bits}.onnx"
        with pytest.warns(UserWarning):
            res = dsq_ext.export_onnx(model, inputs(2), path, approximate=True)
        assert {d["kind"] for d in res.layers} == {"weight" if w_bits else "activation"}
        m, qs = _quantize_nodes(path)
        assert len(qs) == (0 if a_bits is None else 4)
        p = E.compare_onnx(model, path, [inputs()])
        assert p["top1_agree"] == 6 and p["max_abs_diff"] < 1e-4, E.format_parity(p)


# ---------------------------------------------------------------------------------------
# Bad input


def test_no_quantized_layers(tmp_path):
    with pytest.raises(E.ExportError, match="no quantized layers.*torch.onnx.export"):
        dsq_ext.export_onnx(Net().eval(), inputs(2), tmp_path / "m.onnx")


def test_layer_types_we_cannot_export(tmp_path):
    class MyConv(dsq_ext.DSQConv2d):
        def forward(self, x):
            return super().forward(x) * 2

    model = make_model(4, False, "dsq")
    model.conv1 = MyConv(8, 8, 3, padding=1)
    with pytest.raises(E.ExportError, match="conv1: cannot export a MyConv"):
        dsq_ext.export_onnx(model, inputs(2), tmp_path / "m.onnx")

    model = make_model(4, False, "dsq")
    model.extra = dsq_ext.Quantizer(4)
    with pytest.raises(E.ExportError, match="extra: a dsq_ext.Quantizer used on its own"):
        dsq_ext.export_onnx(model, inputs(2), tmp_path / "m.onnx")


def test_quantizers_without_a_grid(tmp_path):
    model = Net()
    dsq_ext.quantize_model(model, w_bits=4, a_bits=4, grid="free")
    with pytest.raises(E.ExportError, match="conv1: the activation quantizer has no bounds yet"):
        dsq_ext.export_onnx(model.eval(), inputs(2), tmp_path / "m.onnx", approximate=True)

    model = snap_bounds(make_model(4, False, "dsq"))
    with torch.no_grad():
        model.fc1.act_quantizer.upper.copy_(model.fc1.act_quantizer.lower)
    with pytest.raises(E.ExportError, match=r"fc1: the activation quantizer's step .* collapsed"):
        dsq_ext.export_onnx(model, inputs(2), tmp_path / "m.onnx", approximate=True)


def test_bad_arguments(tmp_path):
    model = snap_bounds(make_model(4, False, "dsq"))
    with pytest.raises(E.ExportError, match="opset must be an int >= 18.*got 13"):
        dsq_ext.export_onnx(model, inputs(2), tmp_path / "m.onnx", approximate=True, opset=13)
    with pytest.raises(E.ExportError, match="example_input must be a Tensor"):
        dsq_ext.export_onnx(model, [inputs(2)], tmp_path / "m.onnx", approximate=True)
    with pytest.raises(E.ExportError, match="float32 model"):
        dsq_ext.export_onnx(make_model(4, False, "dsq").double(), inputs(2), tmp_path / "m.onnx")


def test_output_path_that_cannot_be_written(tmp_path):
    model = snap_bounds(make_model(4, False, "dsq"))
    with pytest.raises(E.ExportError, match="cannot write the ONNX file to .*: folder .* does not exist"):
        dsq_ext.export_onnx(model, inputs(2), tmp_path / "no" / "m.onnx", approximate=True)
    with pytest.raises(E.ExportError, match="cannot write the ONNX file to .*: it is a directory"):
        dsq_ext.export_onnx(model, inputs(2), tmp_path, approximate=True)
    if os.geteuid() != 0:  # root may write anywhere
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o555)
        with pytest.raises(E.ExportError, match="permission denied"):
            dsq_ext.export_onnx(model, inputs(2), ro / "m.onnx", approximate=True)


def test_checkpoints_that_are_not_ours(tmp_path):
    with pytest.raises(E.ExportError, match="no such file"):
        E.load_checkpoint_model(tmp_path / "missing.pth.tar")
    junk = tmp_path / "junk.pth.tar"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(E.ExportError, match="not a PyTorch checkpoint"):
        E.load_checkpoint_model(junk)
    other = tmp_path / "other.pth.tar"
    torch.save({"weights": torch.zeros(3)}, other)
    with pytest.raises(E.ExportError, match="not a checkpoint written by train.py"):
        E.load_checkpoint_model(other)
    flt = tmp_path / "float.pth.tar"
    torch.save({"arch": "resnet18", "state_dict": {}, "quant": {"method": None}}, flt)
    with pytest.raises(E.ExportError, match="a float checkpoint"):
        E.load_checkpoint_model(flt)
    odd = tmp_path / "odd.pth.tar"
    quant = dict(method="dsq", w_bits=4, a_bits=4, per_channel=False, quantize_first_last=False,
                 bounds="learned", alpha_init=0.2)  # fmt: skip
    torch.save({"arch": "resnet18", "state_dict": {"x": torch.zeros(1)}, "quant": quant}, odd)
    with pytest.raises(E.ExportError, match="does not fit -a resnet18"):
        E.load_checkpoint_model(odd)
    torch.save({"arch": "mynet", "state_dict": {}, "quant": quant}, odd)
    with pytest.raises(E.ExportError, match="'mynet' is not a torchvision classification model"):
        E.load_checkpoint_model(odd)


# ---------------------------------------------------------------------------------------
# The command line, on a checkpoint written by train.py


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """One epoch of ResNet-18 W4A4 on a tiny 2-class ImageFolder (a few seconds)."""
    from PIL import Image

    root = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in range(2):
            d = root / split / f"class{c}"
            d.mkdir(parents=True)
            for i in range(4):
                img = rng.integers(0, 60, (32, 32)).astype(np.uint8)
                img[:, c * 16 : (c + 1) * 16] += 180
                Image.fromarray(img).save(d / f"{i}.png")
    log = tmp_path_factory.mktemp("log")
    args = ["-a", "resnet18", "-q", "DSQ", "--quan_bit", "4", "--quantize_input", "--grid", "symmetric",
            "--image-size", "32", "-b", "8", "-j", "0", "--epochs", "1", "--seed", "0",
            "--log_path", str(log), str(root)]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, str(REPO / "train.py"), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return log / "checkpoint.pth.tar", root


@pytest.mark.slow
def test_cli_on_a_train_py_checkpoint(checkpoint, tmp_path, capsys):
    ckpt, data = checkpoint
    out = tmp_path / "model.onnx"
    # the same checkpoint as if trained on the free grid: refused, or approximated
    free = tmp_path / "free.pth.tar"
    ckpt_dict = torch.load(ckpt, map_location="cpu", weights_only=True)
    cfg = dsq_ext.ModelQuantConfig.from_dict(ckpt_dict["quant"])
    cfg = dataclasses.replace(cfg, weight=cfg.weight.replace(grid="free"), act=cfg.act.replace(grid="free"))
    torch.save(dict(ckpt_dict, quant=cfg.to_dict()), free)
    assert E.main([str(free), "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert "error: layer1.0.conv1: the weight quantizer uses grid='free'" in err, err
    assert "train.py with the default --grid affine" in err and not out.exists()
    with pytest.warns(UserWarning, match="nearest integer zero point"):
        assert E.main([str(free), "-o", str(out), "--approximate"]) == 0
    assert "=> APPROXIMATE" in capsys.readouterr().out
    # as a user runs it
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, "-m", "dsq_ext.export", str(ckpt), "-o", str(out),
                           "--data", str(data / "val")], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0, text
    assert "RuntimeWarning" not in text, text
    assert f"=> wrote {out} (opset 21; 19 quantized layers, input [2, 3, 32, 32])" in text, text
    assert "weight 4-bit" in text and "int4" in text and "activation 4-bit" in text, text
    assert "top-1 identical on 2/2" in text and "top-1 identical on 8/8" in text, text
    assert "APPROXIMATE" not in text and "activation codes identical on 331776/331776" in text, text
    onnx.checker.check_model(onnx.load(out), full_check=True)
    model, _ = E.load_checkpoint_model(ckpt)
    assert len(dsq_ext.quantized_modules(model)) == 19 and not model.training
    p = E.compare_onnx(model, out, [torch.randn(3, 3, 32, 32)])
    assert p["top1_agree"] == 3 and p["layers"]["layer1.0.conv1"]["elements"] == 3 * 64 * 8 * 8

    # the parity script, on the same checkpoint and images
    report = tmp_path / "parity.json"
    proc = subprocess.run([sys.executable, str(REPO / "experiments" / "onnx_parity.py"), str(ckpt), str(data),
                           "--batch-size", "3", "--json", str(report)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    reports = json.loads(report.read_text())["reports"]
    assert list(reports) == ["ORT_DISABLE_ALL", "ORT_ENABLE_ALL", "ORT_ENABLE_ALL, no QDQ fusion"]
    for rep in reports.values():
        assert rep["images"] == rep["labelled"] == 8 and len(rep["layers"]) == 19
    assert "| layer1.0.conv1 | 32768 |" in proc.stdout


def test_cli_errors(tmp_path, capsys):
    assert E.main([str(tmp_path / "missing.pth.tar"), "-o", str(tmp_path / "m.onnx")]) == 2
    assert "error: " in capsys.readouterr().err
    junk = tmp_path / "junk.pth.tar"
    torch.save({"weights": torch.zeros(3)}, junk)
    assert E.main([str(junk), "-o", str(tmp_path / "m.onnx")]) == 2
    assert "not a checkpoint written by train.py" in capsys.readouterr().err
