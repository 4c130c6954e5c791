"""dsq_ext.QuantConfig / ModelQuantConfig, the keyword front door, and quantize_model's filter_fn."""

import dataclasses

import pytest
import torch
import torchvision
from torch import nn

import dsq_ext
from dsq_ext import DSQConv2d, DSQLinear, ModelQuantConfig, QuantConfig, Quantizer


def test_defaults_and_round_trip():
    cfg = QuantConfig()
    assert (cfg.bits, cfg.method, cfg.bounds, cfg.alpha_init, cfg.grad_scale) == (
        4,
        "dsq",
        "learned",
        0.2,
        True,
    )
    odd = QuantConfig(bits=3, method="uniform", per_channel=True, bounds="ema", momentum=0.5, percentile=99)
    assert QuantConfig.from_dict(odd.to_dict()) == odd
    assert odd.to_dict()["percentile"] == 99.0 and isinstance(odd.to_dict()["percentile"], float)
    assert odd.replace(bits=2).bits == 2 and odd.bits == 3
    with pytest.raises(dataclasses.FrozenInstanceError):
        odd.bits = 5


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"bits": 9}, "bits must be an int in 1..8, got 9"),
        ({"bits": 2.0}, "bits must be an int in 1..8, got 2.0"),
        ({"bits": True}, "bits must be an int in 1..8, got True"),
        ({"method": "lsq"}, "method must be one of ('dsq', 'uniform'), got 'lsq'"),
        ({"bounds": "minmax"}, "bounds must be one of ('learned', 'ema'), got 'minmax'"),
        ({"alpha_init": 0.7}, "alpha_init must be in (0, 0.5], got 0.7"),
        ({"alpha_init": float("nan")}, "alpha_init must be in (0, 0.5], got nan"),
        ({"momentum": 0.0}, "momentum must be in (0, 1], got 0.0"),
        ({"percentile": 40}, "percentile must be a number in (50, 100] or None, got 40"),
        ({"per_channel": 1}, "per_channel must be a bool, got 1"),
    ],
)
def test_bad_values_are_named(kwargs, message):
    with pytest.raises((ValueError, TypeError)) as exc:
        QuantConfig(**kwargs)
    assert message in str(exc.value)


def test_from_dict_rejects_unknown_fields():
    with pytest.raises(ValueError, match=r"unknown QuantConfig fields \['nbits'\]"):
        QuantConfig.from_dict({"bits": 4, "nbits": 4})


def test_front_door_builds_the_configs():
    w, a = dsq_ext.layer_configs("uniform", 3, 2, per_channel=True, act_percentile=99.9, bounds="ema")
    assert w == QuantConfig(bits=3, method="uniform", per_channel=True, bounds="ema")
    assert a == QuantConfig(bits=2, method="uniform", percentile=99.9, bounds="ema")
    assert dsq_ext.layer_configs(w_bits=None)[0] is None
    with pytest.raises(TypeError, match=r"unexpected quantization keyword\(s\) \['alpha'\]"):
        dsq_ext.layer_configs(alpha=0.1)
    with pytest.raises(ValueError, match="a_bits must be an int in 1..8 or None, got 0"):
        dsq_ext.layer_configs(a_bits=0)


def _same_layer(a, b):
    assert type(a) is type(b)
    assert a.weight_config == b.weight_config and a.act_config == b.act_config
    assert a.state_dict().keys() == b.state_dict().keys()


def test_layers_take_configs_or_keywords():
    w, a = QuantConfig(bits=3, per_channel=True), QuantConfig(bits=2, method="dsq", percentile=99.0)
    _same_layer(
        DSQConv2d(4, 8, 3, weight_config=w, act_config=a),
        DSQConv2d(4, 8, 3, w_bits=3, a_bits=2, per_channel=True, act_percentile=99.0),
    )
    lin = DSQLinear(4, 8, weight_config=w)  # a config not given is float
    assert lin.act_quantizer is None and lin.weight_quantizer.channels == 8
    with pytest.raises(TypeError, match="not both"):
        DSQLinear(4, 8, weight_config=w, a_bits=4)
    with pytest.raises(ValueError, match="activations are quantized per tensor"):
        DSQLinear(4, 8, act_config=QuantConfig(per_channel=True))
    with pytest.raises(TypeError, match="weight_config must be a dsq_ext.QuantConfig or None, got dict"):
        DSQLinear(4, 8, weight_config={"bits": 4})


def test_quantizer_front_door_and_config():
    assert Quantizer(4, channels=16).config == QuantConfig(bits=4, per_channel=True)
    q = Quantizer(QuantConfig(bits=2, method="uniform"), is_activation=True)
    assert (q.bits, q.method, q.alpha) == (2, "uniform", None)
    with pytest.raises(ValueError, match="needs channels=C"):
        Quantizer(QuantConfig(per_channel=True))
    with pytest.raises(TypeError, match="takes no config keywords"):
        Quantizer(QuantConfig(), bits=3)


def test_quantize_model_filter_fn_and_default_layout():
    seen = []

    def only_layer2(module, name):
        seen.append((type(module), name))
        return name.startswith("layer2.")

    model = dsq_ext.quantize_model(torchvision.models.resnet18(num_classes=10), filter_fn=only_layer2)
    names = [n for n, _ in dsq_ext.quantized_modules(model)]
    assert names and all(n.startswith("layer2.") for n in names) and len(names) == 5
    # The default layout still keeps the stem and the classifier away from filter_fn.
    assert ("conv1" not in {n for _, n in seen}) and ("fc" not in {n for _, n in seen})
    assert (nn.Conv2d, "layer1.0.conv1") in seen
    everything = dsq_ext.quantize_model(
        torchvision.models.resnet18(num_classes=10),
        skip_first=False,
        skip_last=False,
        filter_fn=lambda m, n: True,
    )
    assert len(dsq_ext.quantized_modules(everything)) == 21


def test_model_config_applies_and_round_trips():
    w, a = dsq_ext.layer_configs("dsq", 4, 2, per_channel=True)
    cfg = ModelQuantConfig(weight=w, act=a, skip_first=False, skip_last=True)
    assert ModelQuantConfig.from_dict(cfg.to_dict()) == cfg
    model = cfg.quantize(torchvision.models.resnet18(num_classes=10))
    layers = dict(dsq_ext.quantized_modules(model))
    assert "conv1" in layers and "fc" not in layers
    assert layers["conv1"].weight_config == w and layers["conv1"].act_config == a
    assert ModelQuantConfig().is_float and ModelQuantConfig.from_dict(None).is_float
    assert cfg.describe() == (
        "DSQ W4A2, bounds learned, per-channel weights, affine grid, first/last layers quantized"
    )


# train.py's checkpoints before the config object: a flat dict (format 1).
FORMAT_1 = {
    "method": "dsq",
    "w_bits": 4,
    "a_bits": 2,
    "per_channel": True,
    "quantize_first_last": False,
    "bounds": "ema",
    "alpha_init": 0.3,
    "act_percentile": 99.0,
}


def test_format_1_dicts_keep_their_meaning():
    cfg = ModelQuantConfig.from_dict(FORMAT_1)
    # written before the grid option: trained on the free grid, whatever today's default
    assert QuantConfig().grid != "free"
    # and before the alpha lr scale: alpha learned at the weights' lr
    assert QuantConfig().alpha_lr_scale != 1.0
    old = dict(alpha_init=0.3, bounds="ema", grid="free", alpha_lr_scale=1.0)
    assert cfg.weight == QuantConfig(bits=4, per_channel=True, **old)
    assert cfg.act == QuantConfig(bits=2, percentile=99.0, **old)
    assert (cfg.skip_first, cfg.skip_last) == (True, True)
    assert ModelQuantConfig.from_dict({"method": None}).is_float
    weights_only = ModelQuantConfig.from_dict({**FORMAT_1, "a_bits": None, "act_percentile": None})
    assert weights_only.act is None and weights_only.weight.bits == 4
    with pytest.raises(ValueError, match="format 3 is not one this dsq_ext reads"):
        ModelQuantConfig.from_dict({"format": 3})


def test_format_2_dicts_without_newer_fields_keep_their_meaning():
    d = QuantConfig(bits=2).to_dict()
    del d["grid"], d["alpha_lr_scale"]
    assert QuantConfig.from_dict(d) == QuantConfig(bits=2, grid="free", alpha_lr_scale=1.0)
    # A uniform config has no alpha, so no alpha scale: the same config whatever the default.
    uniform = QuantConfig(method="uniform")
    assert uniform.alpha_lr_scale == 1.0 and QuantConfig(method="uniform", alpha_lr_scale=5) == uniform


def test_resume_key_ignores_init_only_fields():
    a = ModelQuantConfig(weight=QuantConfig(alpha_init=0.1), act=QuantConfig(percentile=99.0))
    b = ModelQuantConfig(weight=QuantConfig(alpha_init=0.3), act=QuantConfig())
    assert a.resume_key() == b.resume_key()
    assert a.resume_key() != ModelQuantConfig(weight=QuantConfig(bits=3), act=QuantConfig()).resume_key()


def test_layer_from_configs_trains_like_keywords():
    torch.manual_seed(0)
    x = torch.randn(2, 4, 6, 6)
    a = DSQConv2d(4, 8, 3, weight_config=QuantConfig(bits=3), act_config=QuantConfig(bits=2))
    b = DSQConv2d(4, 8, 3, w_bits=3, a_bits=2)
    b.load_state_dict(a.state_dict())
    assert torch.equal(a(x), b(x))
