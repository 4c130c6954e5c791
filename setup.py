"""Builds dsq_ext._C against torch: `pip install .` (see build_backend/dsq_build.py for which torch)

The wheel requires torch==<the version compiled against>: the extension only loads in that torch.

Environment switches:
  FORCE_CUDA=1 / FORCE_CUDA=0   build / skip the CUDA kernels whatever is detected
  TORCH_CUDA_ARCH_LIST          GPU architectures (default: the visible GPUs, else "8.0;9.0+PTX")
  DEBUG=1                       -O0 -g, no multi-versioned loops
"""

import glob
import hashlib
import importlib.metadata
import os
import platform
import shutil

from setuptools import find_packages, setup

# The oldest torch that dsq_ext builds with (build_backend/dsq_build.py states the same floor).
TORCH_FLOOR = "torch>=2.4"

try:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
except ImportError:
    raise SystemExit(
        "dsq_ext is compiled against torch, which this build cannot import. `pip install .` "
        "uses the torch of the environment it installs into, or installs one; with "
        "--no-build-isolation (or `python setup.py ...`), install torch first "
        f"(pip install '{TORCH_FLOOR}')."
    ) from None

HERE = os.path.dirname(os.path.abspath(__file__))
DEBUG = os.environ.get("DEBUG", "0") == "1"
# setuptools wants source paths relative to setup.py
CSRC = "csrc"


def cuda_decision():
    """Whether to build the CUDA kernels, and why (printed, so a CPU-only build is never silent)."""
    force = os.environ.get("FORCE_CUDA")
    if force == "0":
        return False, "FORCE_CUDA=0"
    if force == "1":
        return True, "FORCE_CUDA=1"
    if torch.version.cuda is None:
        return False, f"torch {torch.__version__} was built without CUDA"
    if CUDA_HOME is None or shutil.which("nvcc", path=os.path.join(CUDA_HOME, "bin")) is None:
        return False, "nvcc was not found (set CUDA_HOME to the CUDA toolkit)"
    if not os.path.exists(os.path.join(CUDA_HOME, "include", "cuda_runtime.h")):
        return False, f"CUDA_HOME={CUDA_HOME} has no include/cuda_runtime.h (set CUDA_HOME)"
    return True, f"torch has CUDA {torch.version.cuda} and nvcc is in {CUDA_HOME}/bin"


def torch_requirement():
    """The wheel's runtime requirement: the torch release this build is compiled against, read
    from the distribution that provides the imported torch (e.g. 2.14.1, or 2.13.0+cpu)."""
    root = os.path.dirname(os.path.dirname(torch.__file__))
    dists = list(importlib.metadata.distributions(name="torch", path=[root]))
    if not dists:  # a torch without package metadata (built from source): nothing to pin
        print(f"dsq_ext: torch {torch.__version__} in {root} has no package metadata; not pinned")
        return TORCH_FLOOR
    return f"torch=={dists[0].version}"


C_SOURCES = [f"{CSRC}/dsq_kernels.c"]


def c_flags():
    """Flags of the C11 kernels, compiled by the C compiler as C (not as C++)."""
    # -fno-trapping-math lets the compiler if-convert, and so vectorise, the
    # per-element selects (nothing here relies on floating-point exceptions);
    # ISO C mode would otherwise forbid fusing a*b+c into one FMA.
    flags = ["-std=c11", "-fno-math-errno", "-fno-trapping-math", "-ffp-contract=fast"]
    flags += ["-fopenmp-simd", "-Wall", "-Wextra"]
    if platform.machine() in ("x86_64", "AMD64"):
        # Only the AVX-512 clone can use it; GCC otherwise keeps to 256-bit vectors
        # there (DSQ backward, 3.2M float32 on one core: 4.9 -> 3.7 ms).
        flags.append("-mprefer-vector-width=512")
    flags += ["-O0", "-g", "-DDSQ_NO_CLONES"] if DEBUG else ["-O3"]
    return flags


def get_extensions():
    with_cuda, why = cuda_decision()
    print(f"dsq_ext: {'building' if with_cuda else 'not building'} the CUDA kernels: {why}")
    sources = [f"{CSRC}/module.cpp", f"{CSRC}/ops.cpp"]
    macros = [
        ("DSQ_TORCH_VERSION", f'"{torch.__version__}"'),
        ("Py_LIMITED_API", "0x030A0000"),
    ]
    # at::parallel_for is an inline template over OpenMP when torch's parallel backend
    # is OpenMP: without -fopenmp it silently runs on one thread. The library it links
    # (libgomp.so.1) is the one torch has already loaded, so there is one thread pool.
    cxx = (["-O0", "-g"] if DEBUG else ["-O3"]) + ["-fopenmp"]
    extra = {"cxx": cxx}
    ext = CppExtension
    if with_cuda:
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and torch.cuda.device_count() == 0:
            # No GPU to ask: A100 and H100/H200, plus PTX for newer cards.
            os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0+PTX"
        sources += [f"{CSRC}/cuda/dsq_cuda.cu", f"{CSRC}/cuda/ops_cuda.cpp"]
        macros.append(("DSQ_CUDA_VERSION", f'"{torch.version.cuda}"'))
        extra["nvcc"] = ["-O0", "-g"] if DEBUG else ["-O3", "-std=c++17"]
        ext = CUDAExtension
    return [
        ext(
            "dsq_ext._C",
            sources,
            include_dirs=[os.path.join(HERE, CSRC)],
            define_macros=macros,
            extra_compile_args=extra,
            extra_link_args=["-fopenmp"],
            # any change here, or to this file's flags, relinks the extension
            depends=sorted(f for f in glob.glob(f"{CSRC}/**/*", recursive=True) if os.path.isfile(f))
            + ["setup.py"],
            py_limited_api=True,
        )
    ]


class BuildExt(BuildExtension):
    """Compiles the C kernels with the C compiler, then the extension that links them."""

    def build_extensions(self):
        # Before BuildExtension swaps in its C++/nvcc compile step. Always recompiled
        # (one file, seconds): a changed header or flag must never leave a stale object.
        objects = self.compiler.compile(
            C_SOURCES, output_dir=self.build_temp, include_dirs=[CSRC], extra_postargs=c_flags()
        )
        for ext in self.extensions:
            ext.extra_objects = list(ext.extra_objects or []) + objects
        super().build_extensions()

    def build_extension(self, ext):
        # setuptools reuses an extension that is newer than its sources, even one compiled
        # against another torch or with other switches (one build/ folder serves an editable
        # build, then `pip install .` with another torch). A stamp per output records what it
        # was last built with; anything different rebuilds it.
        config = repr(
            (torch.__version__, os.path.dirname(torch.__file__), ext.sources, ext.define_macros)
            + (ext.extra_compile_args, ext.extra_link_args, os.environ.get("TORCH_CUDA_ARCH_LIST"))
        )
        out = os.path.abspath(self.get_ext_fullpath(ext.name))
        stamp = os.path.join(self.build_temp, f"{hashlib.sha1(out.encode()).hexdigest()[:12]}.config")
        try:
            with open(stamp) as f:
                same = f.read() == config and os.path.exists(out)
        except OSError:
            same = False
        force = self.force
        self.force = force or not same
        try:
            super().build_extension(ext)
        finally:
            self.force = force
        os.makedirs(self.build_temp, exist_ok=True)
        with open(stamp, "w") as f:
            f.write(config)


setup(
    name="dsq_ext",
    version="0.1.0",
    description="Differentiable Soft Quantization (DSQ) fake-quantization ops and layers for PyTorch",
    packages=find_packages(include=["dsq_ext", "dsq_ext.*"]),
    ext_modules=get_extensions(),
    cmdclass={"build_ext": BuildExt},
    options={"bdist_wheel": {"py_limited_api": "cp310"}},
    python_requires=">=3.10",
    install_requires=[torch_requirement()],
    # dsq_ext.export_onnx / python -m dsq_ext.export: pip install .[export]
    extras_require={"export": ["onnx>=1.17", "onnxruntime>=1.20", "onnxscript>=0.5", "ml_dtypes"]},
)
