"""Checkpoints of quantized models: writing them safely, reading them with clear errors.

train.py and `python -m dsq_ext.report` / `python -m dsq_ext.export` read
checkpoints through here, so a file that is not a checkpoint fails the same
way everywhere: one line that names the file, the flag it came from and what
is wrong.

A train.py checkpoint is a dict with "state_dict" (the bare model's names,
without DataParallel/DDP's "module."), "arch", "epoch", "best_acc1",
"optimizer", "scheduler", "image_size" and "quant" (ModelQuantConfig.to_dict();
older checkpoints hold format 1, read by ModelQuantConfig.from_dict).
"""

from __future__ import annotations

import glob
import hashlib
import os
import shutil
import tempfile

import torch

from .config import ModelQuantConfig

__all__ = [
    "CheckpointError",
    "read_checkpoint",
    "quant_config_of",
    "atomic_save",
    "atomic_copy",
    "canonical_key",
    "canonical_state_dict",
    "load_model_state",
    "quantizer_digest",
]


class CheckpointError(ValueError):
    """A file that cannot be used as the checkpoint it was given as; the message names it."""


def read_checkpoint(path: str, flag: str = "checkpoint", *, require_state_dict: bool = True) -> dict:
    """The checkpoint dict at path, on the CPU; CheckpointError (one line) if it is not one.

    flag names where the path came from ("--resume", "--init-from", ...), for the message.
    require_state_dict=False also accepts a bare state_dict, returned as {"state_dict": it}.
    """
    where = f"{flag} {path}"
    if not os.path.exists(path):
        raise CheckpointError(f"{where}: no such file")
    if not os.path.isfile(path):
        raise CheckpointError(f"{where}: not a file")
    if os.path.getsize(path) == 0:
        raise CheckpointError(f"{where}: the file is empty (an interrupted copy?)")
    with open(path, "rb") as f:
        head = f.read(4)
    # torch.save writes a zip archive ("PK"); files of torch < 1.6 are a bare pickle (protocol byte 0x80).
    if head[:2] != b"PK" and head[:1] != b"\x80":
        raise CheckpointError(
            f"{where}: not a PyTorch checkpoint (a torch.save file is a zip archive; "
            f"this one starts {head!r})"
        )
    try:
        # weights_only: a checkpoint is data, never code to run.
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch.load raises many types for a bad file
        raise CheckpointError(f"{where}: corrupt or truncated PyTorch checkpoint ({_reason(e)})") from None
    if isinstance(ckpt, dict) and "state_dict" in ckpt:
        if not isinstance(ckpt["state_dict"], dict):
            raise CheckpointError(f"{where}: its 'state_dict' is a {type(ckpt['state_dict']).__name__}")
        return ckpt
    if (
        not require_state_dict
        and isinstance(ckpt, dict)
        and all(isinstance(v, torch.Tensor) for v in ckpt.values())
    ):
        return {"state_dict": ckpt}
    what = (
        f"a dict without 'state_dict' (keys: {sorted(ckpt)[:6]})"
        if isinstance(ckpt, dict)
        else type(ckpt).__name__
    )
    raise CheckpointError(f"{where}: not a checkpoint written by train.py: it holds {what}")


def _reason(e: Exception) -> str:
    # torch's messages run to paragraphs (and suggest weights_only=False, which would run the
    # file's code): keep the cause alone.
    text = str(e)
    if "WeightsUnpickler error:" in text:
        rest = [line.strip() for line in text.split("WeightsUnpickler error:", 1)[1].splitlines()]
        return "it holds objects that a weights-only load refuses: " + next((r for r in rest if r), "?")
    first = text.strip().splitlines()[0] if text.strip() else ""
    return f"{type(e).__name__}: {first.split('. ')[0][:160]}"


def quant_config_of(ckpt: dict, where: str = "checkpoint") -> ModelQuantConfig:
    """The ModelQuantConfig a checkpoint was trained with (float when it records none)."""
    try:
        return ModelQuantConfig.from_dict(ckpt.get("quant"))
    except (TypeError, ValueError, KeyError) as e:
        raise CheckpointError(f"{where}: unreadable quantization config: {e}") from None


def canonical_key(key: str) -> str:
    # DataParallel and DDP add "module." path components; checkpoints are stored without them.
    return ".".join(part for part in key.split(".") if part != "module")


def canonical_state_dict(model_or_state) -> dict:
    """A state_dict under the bare model's names, whatever wraps the model."""
    state = model_or_state.state_dict() if isinstance(model_or_state, torch.nn.Module) else model_or_state
    return {canonical_key(k): v for k, v in state.items()}


def load_model_state(model: torch.nn.Module, state_dict: dict) -> None:
    """load_state_dict (strict) that matches keys with or without "module." on either side."""
    own = {canonical_key(k): k for k in model.state_dict()}
    model.load_state_dict({own.get(canonical_key(k), k): v for k, v in state_dict.items()})


def quantizer_digest(state_dict: dict) -> str:
    """sha256 of every quantizer tensor (lower, upper, alpha, initialized), in name order."""
    h = hashlib.sha256()
    for key in sorted(k for k in state_dict if "_quantizer." in k):
        t = state_dict[key].detach().cpu().contiguous()
        h.update(key.encode())
        h.update(str(t.dtype).encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


# --- writing: beside the target, then renamed over it --------------------------


def _temporaries(filename: str) -> str:
    directory = os.path.dirname(os.path.abspath(filename))
    return os.path.join(directory, "." + glob.escape(os.path.basename(filename)) + ".*.tmp")


def remove_stale_temporaries(filename: str) -> list[str]:
    """Deletes what interrupted writes of filename left (a process killed mid-save); returns them.

    Only one process writes a given checkpoint (rank 0), so any temporary of it
    that exists before a write starts belongs to a write that died.
    """
    stale = glob.glob(_temporaries(filename))
    for path in stale:
        try:
            os.remove(path)
        except FileNotFoundError:
            pass
    return stale


def _write_atomically(filename: str, write) -> None:
    remove_stale_temporaries(filename)
    # Same directory, so that os.replace is an atomic rename; mkstemp's 0600 widened as the umask allows.
    directory = os.path.dirname(os.path.abspath(filename))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix="." + os.path.basename(filename) + ".", suffix=".tmp")
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, filename)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def atomic_save(obj, filename: str) -> None:
    """torch.save that either completes or leaves the previous file untouched."""
    _write_atomically(filename, lambda f: torch.save(obj, f))


def atomic_copy(src: str, dst: str) -> None:
    """shutil.copyfile that either completes or leaves the previous dst untouched."""

    def copy(f):
        with open(src, "rb") as s:
            shutil.copyfileobj(s, f)

    _write_atomically(dst, copy)
