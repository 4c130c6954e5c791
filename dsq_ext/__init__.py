"""dsq_ext: Differentiable Soft Quantization (DSQ) for PyTorch, with C and CUDA kernels.

import torch, dsq_ext
y = dsq_ext.dsq_quantize(x, lower, upper, alpha, bits=4)
model = dsq_ext.quantize_model(model, method="dsq", w_bits=4, a_bits=4)
dsq_ext.export_onnx(model.eval(), example_batch, "model.onnx")
"""

import torch  # noqa: F401  (loads libtorch before the extension that links it)

try:
    from . import _C
except ImportError as e:  # pragma: no cover - depends on how the package was installed
    # e.g. a checkout's dsq_ext/ (not built) hiding the installed package: see _extension.py
    from ._extension import load_or_explain

    _C = load_or_explain(e)

from .config import ModelQuantConfig, QuantConfig, layer_configs  # noqa: E402
from .nn import (  # noqa: E402
    DSQConv2d,
    DSQLinear,
    Quantizer,
    param_groups,
    project_alpha_,
    quantizable_layers,
    quantize_model,
    quantized_modules,
    quantizer_parameters,
)
from .ops import (  # noqa: E402
    dsq_quantize,
    dsq_quantize_backward,
    grid_params,
    uniform_quantize,
    uniform_quantize_backward,
)

__version__ = "0.1.0"

__all__ = [
    "DSQConv2d",
    "DSQLinear",
    "ModelQuantConfig",
    "QuantConfig",
    "Quantizer",
    "build_info",
    "dsq_quantize",
    "dsq_quantize_backward",
    "export_onnx",
    "grid_params",
    "layer_configs",
    "param_groups",
    "project_alpha_",
    "quantizable_layers",
    "quantize_model",
    "quantized_modules",
    "quantizer_parameters",
    "uniform_quantize",
    "uniform_quantize_backward",
]


def __getattr__(name):
    # dsq_ext.export (onnx, onnxruntime: the `export` extra) is imported on first use, so that
    # `python -m dsq_ext.export` runs it once, as __main__.
    if name == "export_onnx":
        from .export import export_onnx

        return export_onnx
    raise AttributeError(f"module 'dsq_ext' has no attribute {name!r}")


def build_info() -> dict:
    """What this build contains: its backends, and the torch and CUDA it was compiled against."""
    has = torch._C._dispatch_has_kernel_for_dispatch_key
    return {
        "version": __version__,
        "backends": [k for k in ("CPU", "CUDA") if has("dsq_ext::dsq_quantize", k)],
        "compiled_with_torch": _C.torch_version,
        "compiled_with_cuda": _C.cuda_version or None,
        "running_torch": torch.__version__,
    }
