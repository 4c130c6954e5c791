"""What to do when this folder's dsq_ext._C cannot be imported (imported only then).

The usual cause: Python runs from a checkout after a regular (not editable) install, e.g.
`pip install .` then `python train.py`. The script's folder (or the current one) comes first
on sys.path, so the checkout's dsq_ext/, which has no compiled _C, hides the installed one.
When the installed package holds the same Python files, its compiled _C is loaded here and
the import works; otherwise the error says which folder hides which and what to run.
"""

import importlib.machinery
import importlib.util
import os
import sys


def _compiled_in(folder):
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        path = os.path.join(folder, "_C" + suffix)
        if os.path.isfile(path):
            return path
    return None


def _installed_elsewhere(here):
    """The first other dsq_ext folder on sys.path with a compiled _C: (folder, extension)."""
    for entry in sys.path:
        folder = os.path.join(entry or os.getcwd(), "dsq_ext")
        try:
            if not os.path.isfile(os.path.join(folder, "__init__.py")) or os.path.samefile(folder, here):
                continue
        except OSError:
            continue
        ext = _compiled_in(folder)
        if ext is not None:
            return folder, ext
    return None


def _python_files(folder):
    files = {}
    for root, dirs, names in os.walk(folder):
        dirs[:] = [d for d in dirs if d != "__pycache__"]
        for name in names:
            if name.endswith(".py"):
                path = os.path.join(root, name)
                files[os.path.relpath(path, folder)] = path
    return files


def _differing(a, b):
    """The Python files that differ between two package folders (sorted relative paths)."""
    fa, fb = _python_files(a), _python_files(b)
    out = set(fa) ^ set(fb)
    for rel in set(fa) & set(fb):
        with open(fa[rel], "rb") as x, open(fb[rel], "rb") as y:
            if x.read() != y.read():
                out.add(rel)
    return sorted(out)


def _load(name, path):
    loader = importlib.machinery.ExtensionFileLoader(name, path)
    spec = importlib.util.spec_from_file_location(name, path, loader=loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    sys.modules[name] = module
    return module


def load_or_explain(error):
    """dsq_ext._C from an installed copy of these same sources; else raises an ImportError
    that says what is happening and what to run."""
    import torch

    here = os.path.dirname(os.path.abspath(__file__))
    root = os.path.dirname(here)
    checkout = os.path.isfile(os.path.join(root, "setup.py"))
    own = _compiled_in(here)
    other = None if own else _installed_elsewhere(here)
    if own:
        msg = (
            f"dsq_ext's compiled extension {own} exists but could not be loaded (running torch "
            f"{torch.__version__}). It was most likely compiled against another torch: rebuild it "
            + (
                f"with `pip install -e {root}` (in place) or `pip install {root}`."
                if checkout
                else "by reinstalling dsq_ext (`pip install --force-reinstall --no-deps <source>`)."
            )
            + f"\n(import error: {error})"
        )
    elif other is None:
        msg = f"dsq_ext's compiled extension (_C) is not in {here}" + (
            f", a source folder that has not been built, and no installed dsq_ext was found on "
            f"sys.path. Build and install it: `pip install {root}`, or `pip install -e {root}` "
            "to build it in place and work on the code."
            if checkout
            else ". Reinstall dsq_ext (`pip install --force-reinstall --no-deps <source>`)."
        )
    else:
        folder, ext = other
        differ = _differing(here, folder)
        if not differ:
            try:
                return _load(__package__ + "._C", ext)
            except ImportError as e:
                msg = (
                    f"dsq_ext was imported from {here}, a source folder without a compiled "
                    f"extension; the installed copy in {folder} holds the same Python files, but "
                    f"its extension {ext} could not be loaded either ({e}). Reinstall it against "
                    f"the running torch {torch.__version__}: `pip install {root}`."
                )
        else:
            shown = ", ".join(differ[:5]) + (", ..." if len(differ) > 5 else "")
            msg = (
                f"dsq_ext was imported from {here}, a source folder without the compiled extension "
                f"(_C). It hides the installed dsq_ext in {folder}, because Python puts the folder "
                "of the script it runs (or the current folder) first on sys.path; and that copy "
                f"was installed from other sources ({shown} differ), so it is not used in this "
                "folder's place. Either:\n"
                f"  - build in place, so that these sources run: pip install -e {root}\n"
                f"  - or reinstall from them (pip install {root}); this folder then uses the "
                "installed build. To run the installed copy as it is instead, keep this folder "
                "off sys.path: `python -P script.py` (Python 3.11+), or run from another folder."
            )
    raise ImportError(msg) from error
