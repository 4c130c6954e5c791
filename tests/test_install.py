"""`pip install` as users type it, each way in an environment of its own (mark: `install`).

`make test` runs these (DSQ_INSTALL_TESTS=1; a few minutes, three compiles); a plain
`python -m pytest tests` skips them. Each installs from a copy of the project's files (what
a fresh clone holds), compiles without the CUDA kernels (FORCE_CUDA=0: the install steps are
the same, and `make build` compiles CUDA) and imports dsq_ext from another folder, checking
the torch it was compiled against and one op against hand-computed values.

- With torch installed (a copy of the running venv made of hard links, so that no GBs are
  copied, minus dsq_ext): `pip install .` builds against that torch and fetches none; then
  `--no-build-isolation`; running train.py from a checkout that hides the installed package;
  `pip install -e .`; pip's `--use-feature=venv-isolation` (dry run, no compile).
- Without torch (a new venv, with the pip that Python bundles): `--no-build-isolation` stops
  with a clear message; `pip install .` installs torch for the build, compiles against it and
  installs that same version. The torch is DSQ_INSTALL_TEST_TORCH (default the 190 MB
  CPU build torch==2.13.0+cpu from the local wheel folder, instead of GBs of CUDA wheels),
  passed to pip as a constraint, as a user would pin it.
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TORCH_SPEC = os.environ.get("DSQ_INSTALL_TEST_TORCH", "torch==2.13.0+cpu")

pytestmark = [
    pytest.mark.install,
    pytest.mark.skipif(
        os.environ.get("DSQ_INSTALL_TESTS") != "1",
        reason="pip install checks (minutes): `make test` runs them, or DSQ_INSTALL_TESTS=1",
    ),
]

ENV = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PIP_CONSTRAINT")}
ENV.update(FORCE_CUDA="0", PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INPUT="1")

# Imports dsq_ext, calls one op and reports what was imported and what it was built against.
PROBE = """
import importlib.metadata as md, json, torch, dsq_ext
x = torch.linspace(-2, 2, 9, dtype=torch.float64)
b = dict(dtype=torch.float64)
y = dsq_ext.uniform_quantize(x, torch.tensor(-1.0, **b), torch.tensor(1.0, **b), bits=2)
print(json.dumps({"file": dsq_ext.__file__, "ext": dsq_ext._C.__file__, "info": dsq_ext.build_info(),
                  "y": y.tolist(), "requires": md.requires("dsq_ext"), "torch": md.version("torch")}))
"""
# 2 bits on [-1, 1]: levels -1, -1/3, 1/3, 1; clipped outside, ties rounded up (0 -> 1/3).
EXPECTED_Y = [-1, -1, -1, -1 / 3, 1 / 3, 1 / 3, 1, 1, 1]


def run(cmd, cwd, check=True, env=None, timeout=1200):
    cmd = [str(c) for c in cmd]
    proc = subprocess.run(cmd, cwd=cwd, env=env or ENV, capture_output=True, text=True, timeout=timeout)
    out = proc.stdout + proc.stderr
    if check and proc.returncode != 0:
        pytest.fail(f"`{' '.join(cmd)}` in {cwd} exited with {proc.returncode}:\n{out[-8000:]}")
    return proc.returncode, out


def probe(python, cwd):
    proc = subprocess.run([python, "-c", PROBE], cwd=cwd, env=ENV, capture_output=True, text=True)
    assert proc.returncode == 0, f"import from {cwd} failed:\n{proc.stderr[-6000:]}"
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    info = got["info"]
    assert info["compiled_with_torch"] == info["running_torch"], info
    # the wheel pins the torch release that it was compiled against
    runtime = [r for r in got["requires"] if "extra ==" not in r]  # the export extra aside
    assert runtime == [f"torch=={got['torch']}"], got
    assert got["y"] == pytest.approx(EXPECTED_Y, abs=1e-12)
    return got


def copy_source(dest):
    """The project's files as a clone has them: tracked, and new ones that git does not ignore."""
    try:
        listed = subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=REPO,
            capture_output=True,
            check=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        ignore = ("build", ".venv", ".git", "data", "log", "runs", "*.so", "__pycache__", "*.egg-info")
        shutil.copytree(REPO, dest, ignore=shutil.ignore_patterns(*ignore))
        return dest
    for name in filter(None, listed.split(b"\0")):
        src = REPO / os.fsdecode(name)
        if src.is_file():
            (dest / os.fsdecode(name)).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / os.fsdecode(name))
    return dest


@pytest.fixture(scope="module")
def work():
    # beside the venv (in build/, ignored by git): hard links need one file system
    (REPO / "build").mkdir(exist_ok=True)
    path = Path(tempfile.mkdtemp(prefix="install_tests_", dir=REPO / "build"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def source(work):
    return copy_source(work / "src")


@pytest.fixture(scope="module")
def torch_venv(work):
    """A venv that has torch: the running one, copied as hard links, without dsq_ext."""
    if sys.prefix == sys.base_prefix:
        pytest.skip("run from a venv (make test's .venv): it is copied as the environment with torch")
    dest = work / "venv-with-torch"
    if subprocess.run(["cp", "-al", sys.prefix, dest], capture_output=True).returncode != 0:
        shutil.rmtree(dest, ignore_errors=True)  # another file system: a real copy
        subprocess.run(["cp", "-a", sys.prefix, dest], check=True)
    python = dest / "bin" / "python"
    run([python, "-m", "pip", "uninstall", "-y", "dsq_ext"], cwd=work)
    return python


def torch_version(python, cwd):
    _, out = run([python, "-c", "import importlib.metadata as m; print(m.version('torch'))"], cwd=cwd)
    return out.strip().splitlines()[-1]


def test_pip_install_builds_against_the_installed_torch(work, source, torch_venv):
    version = torch_version(torch_venv, work)
    _, out = run([torch_venv, "-m", "pip", "install", "-v", source], cwd=work)
    prefix = torch_venv.parent.parent
    # the build used this environment's torch, and pip fetched none for it
    assert f"building against the torch {version} installed in {prefix}" in out, out[-4000:]
    got = probe(torch_venv, work)
    assert Path(got["file"]).is_relative_to(prefix) and Path(got["ext"]).is_relative_to(prefix), got
    assert got["torch"] == version


def test_checkout_hiding_the_installed_package(work, source, torch_venv):
    """`pip install --no-build-isolation .`, then train.py from the checkout."""
    run([torch_venv, "-m", "pip", "install", "-v", "--no-build-isolation", source], cwd=work)
    prefix = torch_venv.parent.parent
    assert not list((source / "dsq_ext").glob("_C*")), "the checkout must have no build of its own here"
    # The checkout's dsq_ext/ comes first on sys.path; it holds the same files as the
    # installed copy, whose compiled extension it then loads.
    got = probe(torch_venv, source)
    assert got["file"] == str(source / "dsq_ext" / "__init__.py")
    assert Path(got["ext"]).is_relative_to(prefix), got
    _, out = run([torch_venv, "train.py", "--help"], cwd=source)
    assert "usage: train.py" in out
    # Edited sources are not silently swapped for the installed copy: the error names both
    # folders, the file that differs and what to run.
    nn = source / "dsq_ext" / "nn.py"
    text = nn.read_text()
    nn.write_text(text + "\n# edited after installing\n")
    try:
        rc, out = run([torch_venv, "train.py", "--help"], cwd=source, check=False)
        assert rc != 0
        msg = out[out.index("ImportError: ") :]
        for part in (
            f"imported from {source / 'dsq_ext'}, a source folder without the compiled extension",
            f"It hides the installed dsq_ext in {prefix}",
            "(nn.py differ)",
            f"pip install -e {source}",
            f"pip install {source}",
            "python -P script.py",
        ):
            assert part in msg, msg
        if sys.version_info >= (3, 11):  # -P: the script's folder stays off sys.path
            _, out = run([torch_venv, "-P", "train.py", "--help"], cwd=source)
            assert "usage: train.py" in out
    finally:
        nn.write_text(text)


def test_venv_isolation_finds_the_installed_torch(work, source, torch_venv):
    # pip's other isolation runs the build hooks with a temporary venv's interpreter
    rc, out = run(
        [torch_venv, "-m", "pip", "install", "-v", "--dry-run", "--use-feature=venv-isolation", source],
        cwd=work,
        check=False,
    )
    if rc != 0 and "venv-isolation" in out and "invalid choice" in out:
        pytest.skip("this pip has no --use-feature=venv-isolation")
    assert rc == 0, out[-6000:]
    version = torch_version(torch_venv, work)
    assert f"building against the torch {version} installed in {torch_venv.parent.parent}" in out
    assert "Would install dsq_ext-0.1.0\n" in out, out[-3000:]


def test_editable_install(work, source, torch_venv):
    run([torch_venv, "-m", "pip", "install", "-v", "-e", source], cwd=work)
    got = probe(torch_venv, work)
    assert got["file"] == str(source / "dsq_ext" / "__init__.py")
    assert Path(got["ext"]).parent == source / "dsq_ext", got


def test_pip_install_without_torch(work):
    source = copy_source(work / "src-no-torch")
    venv = work / "venv-without-torch"
    run([sys.executable, "-m", "venv", venv], cwd=work)
    python = venv / "bin" / "python"
    rc, out = run([python, "-c", "import torch"], cwd=work, check=False)
    assert rc != 0, "the new venv must not see a torch"

    rc, out = run([python, "-m", "pip", "install", "--no-build-isolation", source], cwd=work, check=False)
    assert rc != 0 and "install torch first" in out, out[-4000:]

    # A user's pin, for the build (--build-constraint; older pips apply PIP_CONSTRAINT to it)
    # and for the environment.
    constraint = work / "torch-constraint.txt"
    constraint.write_text(TORCH_SPEC + "\n")
    env = dict(ENV, PIP_CONSTRAINT=str(constraint), PIP_BUILD_CONSTRAINT=str(constraint))
    rc, out = run([python, "-m", "pip", "install", "-v", source], cwd=work, check=False, env=env)
    if rc != 0 and "No matching distribution found for torch" in out:
        pytest.fail(f"{TORCH_SPEC} is not served by the configured indexes: set DSQ_INSTALL_TEST_TORCH")
    assert rc == 0, out[-8000:]
    assert f"no torch in the environment of {venv}" in out, out[-4000:]
    got = probe(python, work)
    assert got["torch"] == TORCH_SPEC.split("==", 1)[1]
    assert Path(got["ext"]).is_relative_to(venv), got
