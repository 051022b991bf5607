"""rnan_fast.ops.gated_residual: registration, autograd and dispatch of x + sigmoid(m) * t.

Kernels: "reference" (PyTorch) and "extension" (rnan_fast._C: C++ CPU kernel, and CUDA kernel
when compiled with CUDA), reached as torch.ops.rnan_fast.gated_residual_fwd / _bwd.
Autograd saves mask_logits and trunk only; grad_x is the incoming gradient itself.
"""
from __future__ import annotations

import torch
from torch import Tensor

from rnan_fast import _backend, _ext, reference


def _extension_why_not(t: Tensor, explicit: bool) -> str:
    if not _ext.EXTENSION:
        return f"the extension rnan_fast._C is not built ({_ext.EXTENSION_ERROR})"
    if t.device.type == "cpu" or (t.is_cuda and _ext.EXTENSION_CUDA):
        return ""
    return f"the extension has no kernel for {t.device} tensors (built with CUDA: {_ext.EXTENSION_CUDA})"


@torch.library.custom_op("rnan_fast::gated_residual", mutates_args=())
def _forward(x: Tensor, mask_logits: Tensor, trunk: Tensor, backend: str) -> Tensor:
    if backend == "extension":
        return torch.ops.rnan_fast.gated_residual_fwd(x, mask_logits, trunk)
    return reference.gated_residual(x, mask_logits, trunk)


@_forward.register_fake
def _(x, mask_logits, trunk, backend):
    return torch.empty_like(x)


@torch.library.custom_op("rnan_fast::gated_residual_backward", mutates_args=())
def _backward_op(grad: Tensor, mask_logits: Tensor, trunk: Tensor, backend: str) -> tuple[Tensor, Tensor]:
    if backend == "extension":
        return torch.ops.rnan_fast.gated_residual_bwd(grad, mask_logits, trunk)
    return reference.gated_residual_backward(grad, mask_logits, trunk)


@_backward_op.register_fake
def _(grad, mask_logits, trunk, backend):
    return torch.empty_like(mask_logits), torch.empty_like(trunk)


def _setup_context(ctx, inputs, output):
    _, mask_logits, trunk, backend = inputs
    ctx.save_for_backward(mask_logits, trunk)
    ctx.backend = backend


def _backward(ctx, grad):
    mask_logits, trunk = ctx.saved_tensors
    grad_mask, grad_trunk = _backward_op(grad, mask_logits, trunk, ctx.backend)
    return grad, grad_mask, grad_trunk, None


_forward.register_autograd(_backward, setup_context=_setup_context)


def gated_residual(x: Tensor, mask_logits: Tensor, trunk: Tensor, backend: str | None = None) -> Tensor:
    """x + sigmoid(mask_logits) * trunk for three tensors of one shape, dtype and device.

    backend: None (global setting), "auto", "reference", "extension" (or "fast").
    """
    for name, t in (("x", x), ("mask_logits", mask_logits), ("trunk", trunk)):
        if not isinstance(t, Tensor):
            raise TypeError(f"gated_residual: {name} must be a torch.Tensor, got {type(t).__name__}")
    if not (x.shape == mask_logits.shape == trunk.shape):
        raise ValueError(f"gated_residual: shapes differ (x {tuple(x.shape)}, mask_logits "
                         f"{tuple(mask_logits.shape)}, trunk {tuple(trunk.shape)})")
    if not (x.dtype == mask_logits.dtype == trunk.dtype):
        raise TypeError(f"gated_residual: dtypes differ (x {x.dtype}, mask_logits {mask_logits.dtype}, trunk {trunk.dtype})")
    if not (x.device == mask_logits.device == trunk.device):
        raise ValueError(f"gated_residual: devices differ (x {x.device}, mask_logits {mask_logits.device}, trunk {trunk.device})")
    kernel = _backend.resolve("gated_residual", backend, "extension",
                              lambda explicit: _extension_why_not(x, explicit))
    return _forward(x, mask_logits, trunk, kernel)
