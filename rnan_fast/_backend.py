"""The backend switch: which implementation the ops use.

Global setting: "auto" (default), "reference" or "fast"; set with `set_backend`, scoped with
`use_backend`, or from the environment variable RNAN_FAST_BACKEND at import time.

Per op call, `backend=` overrides it: None follows the global setting; "reference" is pure
PyTorch; "triton" / "extension" name a kernel family; "auto" picks the fastest correct path for
the tensor's device. `resolve()` turns these into the concrete kernel name an op runs.
"""
from __future__ import annotations

import contextlib
import os
from typing import Callable, Iterator

import torch

GLOBAL_CHOICES = ("auto", "reference", "fast")

_state = {"backend": "auto"}


def _check_global(name: str) -> str:
    if name not in GLOBAL_CHOICES:
        raise ValueError(f"unknown backend {name!r}: choose one of {', '.join(GLOBAL_CHOICES)}")
    return name


def set_backend(name: str) -> None:
    """Set the global backend: "auto", "reference" or "fast"."""
    _state["backend"] = _check_global(name)


def get_backend() -> str:
    """The global backend now in force."""
    return _state["backend"]


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Use backend `name` inside the `with` block, restoring the previous one after."""
    previous = _state["backend"]
    _state["backend"] = _check_global(name)
    try:
        yield
    finally:
        _state["backend"] = previous


def resolve(op: str, requested: str | None, fast: str, why_not: Callable[[bool], str]) -> str:
    """Concrete kernel name ("reference" or `fast`) for one call of `op`.

    requested: the op's `backend=` argument (None follows the global setting).
    fast: the name of the op's fast kernel family ("triton" or "extension").
    why_not(explicit): "" when the fast kernel can run on these tensors here, else what is
        missing; explicit is False for "auto" (which never picks a test-only path such as the
        Triton interpreter) and True when the user named the fast path.
    """
    choice = get_backend() if requested is None else requested
    if choice == "reference":
        return "reference"
    if choice == "auto":
        return "reference" if why_not(False) else fast
    if choice in ("fast", fast):
        reason = why_not(True)
        if reason:
            raise RuntimeError(f"rnan_fast.ops.{op}: backend {choice!r} asked for, but {reason}")
        return fast
    raise ValueError(f"rnan_fast.ops.{op}: unknown backend {choice!r}; "
                     f"choose one of None, 'auto', 'reference', 'fast', {fast!r}")


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The autocast dtype in force for `device`'s type, or None outside autocast.

    The ops are custom ops, which autocast does not cast: their wrappers ask this and cast
    their inputs themselves, the way PyTorch treats its own ops of the same kind.
    """
    if device.type in ("cuda", "cpu") and torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return None


_env = os.environ.get("RNAN_FAST_BACKEND")
if _env:
    try:
        set_backend(_env.strip().lower())
    except ValueError as e:
        raise ValueError(f"environment variable RNAN_FAST_BACKEND: {e}") from None
