"""Training checkpoints: one file per save, written atomically, loadable with weights_only=True.

A checkpoint is a dict (tensors and plain Python containers only, so torch.load's safe mode
reads it and RNAN.from_checkpoint takes it as it is):

    format      rnan_fast.model.TRAINING_FORMAT
    step        optimizer steps done
    model       the model's state dict (official names)
    ema         the EMA weights' state dict, or None without --ema
    optimizer   torch.optim.Adam.state_dict()
    schedule    {"name", "lr", "decay_every", "steps"}: the learning rate is a function of the step
    rng         {"torch": CPU generator state, "cuda": [per-device states], "python": random.getstate()}
    data        {"epoch", "index", "samples"}: the data position (a function of the step too:
                sample k of step t is global sample t * batch + k)
    best        {"psnr", "step"} of the best validation so far, or None
    config      the resolved run configuration (a dict of str, int, float, bool, None, lists)

write_checkpoint goes through a temporary file in the same folder, fsync, os.replace and a
fsync of the folder: a reader (or a crash, SIGKILL included) sees the old file or the new one,
never half of one.
"""
from __future__ import annotations

import os
import random

import torch

from rnan_fast.data import atomic_write
from rnan_fast.model import TRAINING_FORMAT, CheckpointError

__all__ = ["write_checkpoint", "read_training_checkpoint", "rng_state", "set_rng_state", "TRAINING_FORMAT"]


def write_checkpoint(path: str | os.PathLike, state: dict) -> None:
    """torch.save(state) to `path` atomically and durably (rnan_fast.data.atomic_write: temporary
    file, fsync, rename, fsync of the folder)."""
    with atomic_write(path, durable=True) as f:
        torch.save(state, f)


def read_training_checkpoint(path: str | os.PathLike) -> dict:
    """The dict that write_checkpoint saved (CPU tensors, weights-only load). CheckpointError
    (a ValueError) for a file that is not a training checkpoint."""
    from rnan_fast.model import load_checkpoint_file

    obj = load_checkpoint_file(os.fspath(path), "cpu", True)
    if not isinstance(obj, dict) or obj.get("format") != TRAINING_FORMAT:
        raise CheckpointError(f"{path}: not a rnan-fast training checkpoint (no format {TRAINING_FORMAT!r}); "
                              "use --init to start a run from plain weights")
    return obj


def rng_state() -> dict:
    """Every global random state a training process has (the data draws have their own,
    per-sample generators and need none of these)."""
    cuda = [s for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else []
    return {"torch": torch.get_rng_state(), "cuda": cuda, "python": random.getstate()}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
    python = state.get("python")
    if python is not None:  # a tuple (version, tuple of ints, gauss_next); lists after a round trip
        random.setstate((python[0], tuple(python[1]), python[2]))
