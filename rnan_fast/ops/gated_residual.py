"""rnan_fast.ops.gated_residual: registration, autograd and dispatch of x + sigmoid(m) * t.

Kernels: "reference" (PyTorch) and "extension" (rnan_fast._C: a C++ CPU kernel, and a CUDA
kernel when compiled with CUDA), reached as torch.ops.rnan_fast.gated_residual_fwd / _bwd
(schemas in csrc/gated_residual.cpp; fakes and an autograd formula registered here, so the
C++ ops work under torch.compile and torch.library.opcheck on their own as well).

What torch.compile sees: one op rnan_fast::gated_residual(x, mask_logits, trunk, backend) and,
for its gradient, rnan_fast::gated_residual_backward(grad, mask_logits, trunk, backend), which
returns (grad_mask_logits, grad_trunk) from one pass. Autograd saves mask_logits and trunk only;
grad_x is the incoming gradient itself (no copy).

Layout: outputs are empty_like(x) (forward) and empty_like(mask_logits) / empty_like(trunk)
(backward), the same rule in the kernels and the fakes, so channels_last stays channels_last.
"""
from __future__ import annotations

import torch
from torch import Tensor

from rnan_fast import _backend, _ext, reference

# The dtypes the extension's kernels take (float64 for gradcheck; math in float32 otherwise).
EXTENSION_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _extension_why_not(t: Tensor, explicit: bool) -> str:
    if not _ext.EXTENSION:
        return f"the extension rnan_fast._C is not built ({_ext.EXTENSION_ERROR})"
    if t.dtype not in EXTENSION_DTYPES:
        return f"the extension takes float32, float16, bfloat16 or float64 tensors (got {t.dtype})"
    if t.device.type == "cpu":
        return ""
    if t.is_cuda and _ext.EXTENSION_CUDA:
        reason = _ext.gate_cuda_why_not(t.device.index)   # compiled for this GPU's architecture?
        if reason and not explicit:
            _ext.warn_fallback("gated_residual", t.device, reason)
        return reason
    return f"the extension has no kernel for {t.device} tensors (built with CUDA: {_ext.EXTENSION_CUDA})"


def _in_layout_of(out: Tensor, like: Tensor) -> Tensor:
    """out in empty_like(like)'s layout: the output rule of the kernels, applied to the reference.

    Strides of dimensions of size 1 do not matter (the fakes' stride checks ignore them too).
    """
    want = like if like.is_contiguous() else torch.empty_like(like, device="meta")  # strides only
    same = all(a == b for a, b, n in zip(out.stride(), want.stride(), out.shape) if n != 1)
    return out if same else torch.empty_like(like).copy_(out)


@torch.library.custom_op("rnan_fast::gated_residual", mutates_args=())
def _forward(x: Tensor, mask_logits: Tensor, trunk: Tensor, backend: str) -> Tensor:
    if backend == "extension":
        return torch.ops.rnan_fast.gated_residual_fwd(x, mask_logits, trunk)
    return _in_layout_of(reference.gated_residual(x, mask_logits, trunk), x)


@_forward.register_fake
def _(x, mask_logits, trunk, backend):
    return torch.empty_like(x)


@torch.library.custom_op("rnan_fast::gated_residual_backward", mutates_args=())
def _backward_op(grad: Tensor, mask_logits: Tensor, trunk: Tensor, backend: str) -> tuple[Tensor, Tensor]:
    if backend == "extension":
        return torch.ops.rnan_fast.gated_residual_bwd(grad, mask_logits, trunk)
    grad_mask, grad_trunk = reference.gated_residual_backward(grad, mask_logits, trunk)
    return _in_layout_of(grad_mask, mask_logits), _in_layout_of(grad_trunk, trunk)


@_backward_op.register_fake
def _(grad, mask_logits, trunk, backend):
    return torch.empty_like(mask_logits), torch.empty_like(trunk)


def _setup_context(ctx, inputs, output):
    _, mask_logits, trunk, backend = inputs
    ctx.save_for_backward(mask_logits, trunk)
    ctx.backend = backend


def _backward(ctx, grad):
    mask_logits, trunk = ctx.saved_tensors
    grad_mask = grad_trunk = None
    if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
        grad_mask, grad_trunk = _backward_op(grad, mask_logits, trunk, ctx.backend)
    return grad, grad_mask, grad_trunk, None


_forward.register_autograd(_backward, setup_context=_setup_context)


# ---- the C++ ops on their own: fakes (torch.compile, opcheck) and autograd -----------------

def _check_like(op: str, a: Tensor, a_name: str, b: Tensor, b_name: str) -> None:
    # The same conditions and wording as gated::check_pair in csrc/gated_residual.h.
    torch._check(a.device == b.device,
                 lambda: f"{op}: devices differ: {a_name} is on {a.device} but {b_name} is on {b.device}")
    torch._check(a.dtype == b.dtype, lambda: f"{op}: dtypes differ: {a_name} is {a.dtype} but {b_name} is {b.dtype}")
    torch._check(a.shape == b.shape,
                 lambda: f"{op}: shapes differ: {a_name} has shape {list(a.shape)} but {b_name} has shape {list(b.shape)}")


def _check_inputs(op: str, a: Tensor, a_name: str, b: Tensor, b_name: str, c: Tensor, c_name: str) -> None:
    _check_like(op, a, a_name, b, b_name)
    _check_like(op, a, a_name, c, c_name)
    torch._check(a.dtype in EXTENSION_DTYPES,
                 lambda: f"{op}: unsupported dtype {a.dtype} (expected float32, float16, bfloat16 or float64)")


def _fwd_fake(x, mask_logits, trunk):
    _check_inputs("rnan_fast::gated_residual_fwd", x, "x", mask_logits, "mask_logits", trunk, "trunk")
    return torch.empty_like(x)


def _bwd_fake(grad, mask_logits, trunk):
    _check_inputs("rnan_fast::gated_residual_bwd", grad, "grad", mask_logits, "mask_logits", trunk, "trunk")
    return torch.empty_like(mask_logits), torch.empty_like(trunk)


def _fwd_setup_context(ctx, inputs, output):
    _, mask_logits, trunk = inputs
    ctx.save_for_backward(mask_logits, trunk)


def _fwd_backward(ctx, grad):
    mask_logits, trunk = ctx.saved_tensors
    grad_mask = grad_trunk = None
    if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
        grad_mask, grad_trunk = torch.ops.rnan_fast.gated_residual_bwd(grad, mask_logits, trunk)
    return grad, grad_mask, grad_trunk


if _ext.EXTENSION:  # the C++ ops exist only when rnan_fast._C loaded
    torch.library.register_fake("rnan_fast::gated_residual_fwd")(_fwd_fake)
    torch.library.register_fake("rnan_fast::gated_residual_bwd")(_bwd_fake)
    torch.library.register_autograd("rnan_fast::gated_residual_fwd", _fwd_backward, setup_context=_fwd_setup_context)


def gated_residual(x: Tensor, mask_logits: Tensor, trunk: Tensor, backend: str | None = None) -> Tensor:
    """x + sigmoid(mask_logits) * trunk for three tensors of one shape, dtype and device.

    backend: None (global setting), "auto", "reference", "extension" (or "fast"). "auto" takes
    the extension for CPU tensors, and for CUDA tensors when it was built with CUDA for the GPU's
    architecture (else the reference, with a warning once per GPU: rnan_fast.backend_info()
    ["cuda_devices"] says why), in float32 / float16 / bfloat16 / float64; otherwise the reference.
    The output has x's memory format (channels_last in, channels_last out). Under autocast,
    inputs of different float dtypes are first cast to the widest of them.
    """
    for name, t in (("x", x), ("mask_logits", mask_logits), ("trunk", trunk)):
        if not isinstance(t, Tensor):
            raise TypeError(f"gated_residual: {name} must be a torch.Tensor, got {type(t).__name__}")
    if _backend.autocast_dtype(x.device) is not None:
        # Elementwise, like PyTorch's own x + sigmoid(m) * t under autocast: the widest dtype.
        common = torch.promote_types(torch.promote_types(x.dtype, mask_logits.dtype), trunk.dtype)
        x, mask_logits, trunk = (t.to(common) for t in (x, mask_logits, trunk))
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
