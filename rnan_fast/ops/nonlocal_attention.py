"""rnan_fast.ops.nonlocal_attention: registration, autograd and dispatch.

Math: ../reference.py (module docstring). Kernels: "reference" (blocked PyTorch, any device)
and "triton" (rnan_fast.kernels.nonlocal_attention: CUDA tensors, or CPU tensors under
TRITON_INTERPRET=1).

The op's second output ("lse", non-differentiable, only consumed by the same backend's backward)
is the softmax normaliser: (B, N) natural-log LSE for "reference"; for "triton" the split
statistics (2, B, N) fp32 = (max score, log2 of the shifted sum), see the kernel module's docstring
(`rnan_fast.kernels.nonlocal_attention.lse_natural` converts). Per query for "key", per key for
"query".
The Triton kernel takes head dims 16, 32, 64 and fp32 / fp16 / bf16; backend="triton" raises a
ValueError / TypeError for anything else, while "auto" falls back to the reference there.
"""
from __future__ import annotations

import torch
from torch import Tensor

from rnan_fast import _backend, _ext, reference


def _triton_why_not(theta: Tensor, phi: Tensor, g: Tensor, explicit: bool) -> str:
    if not _ext.triton_available():
        return f"Triton is unavailable ({_ext.triton_error()})"
    if not (theta.is_cuda or (explicit and theta.device.type == "cpu" and _ext.triton_interpret())):
        return (f"the Triton kernel runs on CUDA tensors (got {theta.device}; TRITON_INTERPRET=1 runs it "
                "on the CPU for tests)")
    if not explicit:
        # "auto" takes the reference for shapes/dtypes the kernel lacks; an explicit request
        # gets the kernel's own ValueError/TypeError instead (see nonlocal_attention).
        from rnan_fast.kernels import nonlocal_attention as kernel

        return kernel.unsupported_reason(theta, phi, g)
    return ""


@torch.library.custom_op("rnan_fast::nonlocal_attention", mutates_args=())
def _forward(theta: Tensor, phi: Tensor, g: Tensor, softmax_over: str, backend: str) -> tuple[Tensor, Tensor]:
    if backend == "triton":
        from rnan_fast.kernels import nonlocal_attention as kernel

        return kernel.forward(theta, phi, g, softmax_over)
    out, lse = reference.nonlocal_attention_forward(theta, phi, g, softmax_over)
    return out.to(g.dtype), lse.to(reference.compute_dtype(g))


@_forward.register_fake
def _(theta, phi, g, softmax_over, backend):
    B, N, _ = theta.shape
    if backend == "triton":
        return g.new_empty(B, N, g.shape[-1]), g.new_empty(2, B, N, dtype=torch.float32)
    return g.new_empty(B, N, g.shape[-1]), g.new_empty(B, N, dtype=reference.compute_dtype(g))


@torch.library.custom_op("rnan_fast::nonlocal_attention_backward", mutates_args=())
def _backward_op(dout: Tensor, theta: Tensor, phi: Tensor, g: Tensor, lse: Tensor,
                 softmax_over: str, backend: str, deterministic: bool) -> tuple[Tensor, Tensor, Tensor]:
    if backend == "triton":
        from rnan_fast.kernels import nonlocal_attention as kernel

        return kernel.backward(dout, theta, phi, g, lse, softmax_over, deterministic)
    return reference.nonlocal_attention_backward(dout, theta, phi, g, lse, softmax_over)


@_backward_op.register_fake
def _(dout, theta, phi, g, lse, softmax_over, backend, deterministic):
    return torch.empty_like(theta), torch.empty_like(phi), torch.empty_like(g)


def _setup_context(ctx, inputs, output):
    theta, phi, g, softmax_over, backend = inputs
    _, lse = output
    ctx.save_for_backward(theta, phi, g, lse)   # not out: neither backward reads it
    ctx.softmax_over, ctx.backend = softmax_over, backend
    ctx.mark_non_differentiable(lse)


def _backward(ctx, dout, _dlse):
    theta, phi, g, lse = ctx.saved_tensors
    dtheta, dphi, dg = _backward_op(dout, theta, phi, g, lse, ctx.softmax_over, ctx.backend,
                                    torch.are_deterministic_algorithms_enabled())
    return dtheta, dphi, dg, None, None


_forward.register_autograd(_backward, setup_context=_setup_context)


def _check_inputs(theta: Tensor, phi: Tensor, g: Tensor) -> None:
    for name, t in (("theta", theta), ("phi", phi), ("g", g)):
        if not isinstance(t, Tensor):
            raise TypeError(f"nonlocal_attention: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 3:
            raise ValueError(f"nonlocal_attention: {name} must be (B, N, d), got shape {tuple(t.shape)}")
        if not t.is_floating_point():
            raise TypeError(f"nonlocal_attention: {name} must be a floating-point tensor, got {t.dtype}")
    if theta.shape != phi.shape:
        raise ValueError(f"nonlocal_attention: theta {tuple(theta.shape)} and phi {tuple(phi.shape)} must have one shape")
    if g.shape[:2] != theta.shape[:2]:
        raise ValueError(f"nonlocal_attention: g {tuple(g.shape)} must share (B, N) with theta {tuple(theta.shape)}")
    if not (theta.dtype == phi.dtype == g.dtype):
        raise TypeError(f"nonlocal_attention: dtypes differ (theta {theta.dtype}, phi {phi.dtype}, g {g.dtype})")
    if not (theta.device == phi.device == g.device):
        raise ValueError(f"nonlocal_attention: devices differ (theta {theta.device}, phi {phi.device}, g {g.device})")


def nonlocal_attention(theta: Tensor, phi: Tensor, g: Tensor, softmax_over: str = "query",
                       backend: str | None = None) -> Tensor:
    """Non-local attention without the N x N matrix: theta, phi (B, N, d), g (B, N, dv) -> (B, N, dv).

    softmax_over="query" normalises over queries (the official RNAN, softmax dim=1);
    "key" is ordinary attention. No 1/sqrt(d) scaling. backend: see rnan_fast.set_backend.
    Under autocast, float32/float16/bfloat16 inputs are cast to the autocast dtype.
    """
    dtype = _backend.autocast_dtype(theta.device) if isinstance(theta, Tensor) else None
    if dtype is not None:
        # Matmul-like, so under autocast it runs in the autocast dtype, as PyTorch's own
        # attention does (autocast does not cast custom ops by itself).
        theta, phi, g = (t.to(dtype) if isinstance(t, Tensor) and t.dtype != torch.float64 else t
                         for t in (theta, phi, g))
    _check_inputs(theta, phi, g)
    reference.check_softmax_over(softmax_over)
    kernel = _backend.resolve("nonlocal_attention", backend, "triton",
                              lambda explicit: _triton_why_not(theta, phi, g, explicit))
    if kernel == "triton":
        from rnan_fast.kernels import nonlocal_attention as triton_kernel

        triton_kernel.check_inputs(theta, phi, g, softmax_over)   # head dim / dtype: clear errors
    return _forward(theta, phi, g, softmax_over, kernel)[0]
