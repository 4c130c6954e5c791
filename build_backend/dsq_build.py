"""The build backend of `pip install .`: setuptools, compiling dsq_ext._C against the right torch.

dsq_ext._C links libtorch, so it only loads in the torch it was compiled against. pip builds
in an isolated environment, which would otherwise fetch a torch of its own (whichever is newest)
and produce an extension that fails to load beside the user's torch. This backend decides
which torch the build uses, before setuptools runs setup.py:

- The environment that pip installs into already has torch: the build uses that very torch.
  Its folder is appended to the build's sys.path, so nothing is downloaded and the ABI is the
  one that will load the extension, whatever index or build that torch came from.
- It has none: torch becomes a build requirement (the newest that the user's constraints
  allow, e.g. `pip install --build-constraint c.txt .`); pip installs it in the isolated
  environment.

Either way setup.py pins the wheel's runtime requirement to `torch==<the version compiled
against>`, so pip then installs exactly that torch into an environment without one, and
reports a conflict instead of loading a mismatched build later.

pip runs these hooks in a separate process, with either the target's interpreter and
PYTHONPATH/PYTHONNOUSERSITE set to hide its packages (pip's default isolation) or the
interpreter of a temporary venv (`--use-feature=venv-isolation`). The target environment is
found by asking, in a subprocess, the interpreter that runs pip (the parent of this process,
with the environment pip was started with; Linux), else this interpreter with pip's isolation
variables removed. Without isolation (`--no-build-isolation`) torch is importable here and
none of this happens.

(PyTorch's LibTorch stable ABI would let one build load in later torch releases as well,
but the C++ code uses the full ATen/c10 API, and an isolated build would still need a
torch to compile against.)
"""

import functools
import importlib.util
import json
import os
import shutil
import subprocess
import sys

from setuptools import build_meta as _setuptools
from setuptools.build_meta import *  # noqa: F403  (every hook that is not wrapped below)

# The oldest torch that dsq_ext builds with; setup.py states the same floor.
TORCH_FLOOR = "torch>=2.4"

# Run in the target environment: where its torch is, its version, and its package folders.
_QUERY = r"""
import importlib.metadata, importlib.util, json, os, site, sys
out = {"prefix": sys.prefix, "executable": sys.executable}
spec = importlib.util.find_spec("torch")
if spec is not None and spec.origin:
    root = os.path.dirname(os.path.dirname(spec.origin))
    dists = list(importlib.metadata.distributions(name="torch", path=[root]))
    dirs = [root] + site.getsitepackages()
    if site.ENABLE_USER_SITE:
        dirs.append(site.getusersitepackages())
    out["torch"] = {
        "root": root,
        "version": dists[0].version if dists else None,
        "dirs": [d for d in dict.fromkeys(dirs) if os.path.isdir(d)],
    }
print(json.dumps(out))
"""


def _log(msg):
    print(f"dsq_ext build: {msg}", file=sys.stderr, flush=True)


def _parent_python():
    """The interpreter and initial environment of the process that runs this hook, if it is
    this same Python (pip, or another frontend), as the command line started it (Linux)."""
    ppid = os.getppid()
    proc = f"/proc/{ppid}"
    try:
        if os.path.realpath(f"{proc}/exe") != os.path.realpath(sys.executable):
            return None  # not a Python like this one (e.g. a frontend written in another language)
        with open(f"{proc}/cmdline", "rb") as f:
            argv0 = os.fsdecode(f.read().split(b"\0")[0])
        with open(f"{proc}/environ", "rb") as f:
            env = dict(os.fsdecode(kv).split("=", 1) for kv in f.read().split(b"\0") if b"=" in kv)
        cwd = os.readlink(f"{proc}/cwd")
    except OSError:
        return None
    if os.sep in argv0:
        exe = os.path.join(cwd, argv0)
    else:  # started by name: found on the PATH it was started with, as Python itself does
        exe = shutil.which(argv0, path=env.get("PATH", os.defpath))
    if not exe or not os.path.isfile(exe):
        return None
    # the path as typed matters (a venv's python is a symlink to the base interpreter)
    return exe, env, cwd


@functools.cache
def _target():
    """What the environment that pip installs into holds (see _QUERY); None if not found."""
    candidates = []
    parent = _parent_python()
    if parent is not None:
        candidates.append(parent)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONNOUSERSITE")}
    candidates.append((sys.executable, env, os.getcwd()))
    for exe, env, cwd in candidates:
        try:
            r = subprocess.run(
                [exe, "-c", _QUERY], env=env, cwd=cwd, capture_output=True, text=True, timeout=120
            )
            found = json.loads(r.stdout.strip().splitlines()[-1]) if r.returncode == 0 else None
        except (OSError, ValueError, IndexError, subprocess.TimeoutExpired):
            found = None
        if found is not None:
            return found
    return None


def _torch_here():
    return importlib.util.find_spec("torch") is not None


def _requires():
    if _torch_here():
        return []  # no isolation, or the isolated environment already has torch
    target = _target()
    if target is not None and "torch" in target:
        t = target["torch"]
        version = t["version"] or "(no package metadata)"
        _log(f"building against the torch {version} installed in {target['prefix']} ({t['root']})")
        return []
    where = f"the environment of {target['executable']}" if target else "the target environment"
    _log(f"no torch in {where}: building against {TORCH_FLOOR} (the newest allowed), then pinning it")
    return [TORCH_FLOOR]


def _use_target_torch():
    """Makes the target environment's torch importable in this build process (appended, so
    the build's own setuptools and wheel still come first)."""
    if _torch_here():
        return
    target = _target()
    if target is None or "torch" not in target:
        return  # setup.py says that torch is missing
    for d in target["torch"]["dirs"]:
        if d not in sys.path:
            sys.path.append(d)
    importlib.invalidate_caches()


# setuptools' own get_requires_* hooks run setup.py to collect setup_requires (there are
# none): that needs torch, which is what they are asked to find. [build-system] requires
# lists setuptools and wheel.
def get_requires_for_build_wheel(config_settings=None):
    return _requires()


def get_requires_for_build_editable(config_settings=None):
    return _requires()


def get_requires_for_build_sdist(config_settings=None):
    return _requires()


def prepare_metadata_for_build_wheel(metadata_directory, config_settings=None):
    _use_target_torch()
    return _setuptools.prepare_metadata_for_build_wheel(metadata_directory, config_settings)


def prepare_metadata_for_build_editable(metadata_directory, config_settings=None):
    _use_target_torch()
    return _setuptools.prepare_metadata_for_build_editable(metadata_directory, config_settings)


def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):
    _use_target_torch()
    return _setuptools.build_wheel(wheel_directory, config_settings, metadata_directory)


def build_editable(wheel_directory, config_settings=None, metadata_directory=None):
    _use_target_torch()
    return _setuptools.build_editable(wheel_directory, config_settings, metadata_directory)


def build_sdist(sdist_directory, config_settings=None):
    _use_target_torch()
    return _setuptools.build_sdist(sdist_directory, config_settings)
