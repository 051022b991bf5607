"""rnan_fast.ops.nonlocal_attention: registration, autograd and dispatch.

Math: ../reference.py (module docstring). Kernels:
  "reference"  blocked PyTorch, any device and float dtype (float64 for the tests' ground truth);
  "extension"  the C++ CPU kernel in rnan_fast._C (csrc/nonlocal_attention.cpp): CPU tensors,
               float32 / bfloat16, any head dim; reached as torch.ops.rnan_fast.nonlocal_attention_fwd
               / _bwd (fakes and autograd registered here too, so they also work on their own);
  "triton"     rnan_fast.kernels.nonlocal_attention: CUDA tensors, or CPU tensors under
               TRITON_INTERPRET=1; head dims 16, 32, 64, fp32 / fp16 / bf16.
"auto" takes the Triton kernel for CUDA tensors and the extension for CPU tensors where they
apply, the reference elsewhere (float64, fp16 on the CPU, head dims Triton lacks, GPUs older than
sm_80: the latter with a warning once per GPU). An explicit
"triton" or "extension" (or "fast") raises instead: RuntimeError when the kernel cannot run here
(not built, wrong device), TypeError / ValueError for a dtype or head dim it does not take.

The op's second output ("lse", non-differentiable, only consumed by the same backend's backward)
is the softmax normaliser: (B, N) natural-log LSE for "reference"; for "triton" and "extension"
the split statistics (2, B, N) fp32 = (max score, log2 of the shifted sum), see the Triton
kernel module's docstring (`rnan_fast.kernels.nonlocal_attention.lse_natural` converts). Per
query for "key", per key for "query".
"""
from __future__ import annotations

import torch
from torch import Tensor

from rnan_fast import _backend, _ext, reference

# The dtypes of the C++ CPU kernel (math in fp32 for both).
EXTENSION_DTYPES = (torch.float32, torch.bfloat16)
_SPLIT_STATS = ("triton", "extension")   # backends whose "lse" is the (2, B, N) split statistics


def _triton_why_not(theta: Tensor, phi: Tensor, g: Tensor, explicit: bool) -> str:
    if not _ext.triton_available():
        return f"Triton is unavailable ({_ext.triton_error()})"
    if not (theta.is_cuda or (explicit and theta.device.type == "cpu" and _ext.triton_interpret())):
        return (f"the Triton kernel runs on CUDA tensors (got {theta.device}; TRITON_INTERPRET=1 runs it "
                "on the CPU for tests)")
    if theta.is_cuda:
        reason = _ext.triton_cuda_why_not(theta.device.index)   # a GPU the kernels support?
        if reason:
            if not explicit:
                _ext.warn_fallback("nonlocal_attention", theta.device, reason)
            return reason
    if not explicit:
        # "auto" takes the reference for shapes/dtypes the kernel lacks; an explicit request
        # gets the kernel's own ValueError/TypeError instead (see nonlocal_attention).
        from rnan_fast.kernels import nonlocal_attention as kernel

        return kernel.unsupported_reason(theta, phi, g)
    return ""


def _extension_why_not(theta: Tensor, explicit: bool) -> str:
    if not _ext.EXTENSION_ATTENTION:
        return f"the extension's CPU attention kernel is not built ({_ext.EXTENSION_ERROR or 'rnan_fast._C predates it'})"
    if theta.device.type != "cpu":
        return f"the extension's attention kernel runs on CPU tensors (got {theta.device}; CUDA tensors use Triton)"
    if not explicit and theta.dtype not in EXTENSION_DTYPES:
        return f"the extension's attention kernel takes float32 or bfloat16 (got {theta.dtype})"
    return ""


def _check_extension_dtype(theta: Tensor) -> None:
    if theta.dtype not in EXTENSION_DTYPES:
        raise TypeError(f"nonlocal_attention: backend 'extension' takes float32 or bfloat16 CPU tensors, got "
                        f"{theta.dtype} (float64 and float16 run on backend 'reference')")


@torch.library.custom_op("rnan_fast::nonlocal_attention", mutates_args=())
def _forward(theta: Tensor, phi: Tensor, g: Tensor, softmax_over: str, backend: str) -> tuple[Tensor, Tensor]:
    if backend == "triton":
        from rnan_fast.kernels import nonlocal_attention as kernel

        return kernel.forward(theta, phi, g, softmax_over)
    if backend == "extension":
        return torch.ops.rnan_fast.nonlocal_attention_fwd(theta, phi, g, softmax_over)
    out, lse = reference.nonlocal_attention_forward(theta, phi, g, softmax_over)
    return out.to(g.dtype), lse.to(reference.compute_dtype(g))


@_forward.register_fake
def _(theta, phi, g, softmax_over, backend):
    B, N, _ = theta.shape
    if backend in _SPLIT_STATS:
        return g.new_empty(B, N, g.shape[-1]), g.new_empty(2, B, N, dtype=torch.float32)
    return g.new_empty(B, N, g.shape[-1]), g.new_empty(B, N, dtype=reference.compute_dtype(g))


@torch.library.custom_op("rnan_fast::nonlocal_attention_backward", mutates_args=())
def _backward_op(dout: Tensor, theta: Tensor, phi: Tensor, g: Tensor, lse: Tensor,
                 softmax_over: str, backend: str, deterministic: bool) -> tuple[Tensor, Tensor, Tensor]:
    if backend == "triton":
        from rnan_fast.kernels import nonlocal_attention as kernel

        return kernel.backward(dout, theta, phi, g, lse, softmax_over, deterministic)
    if backend == "extension":   # always deterministic (csrc/nonlocal_attention.cpp)
        return torch.ops.rnan_fast.nonlocal_attention_bwd(dout.to(g.dtype), theta, phi, g, lse, softmax_over)
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


# ---- the C++ ops on their own: fakes (torch.compile, opcheck) and autograd -----------------

def _ext_fwd_fake(theta, phi, g, softmax_over):
    torch._check(theta.dim() == 3 and theta.shape == phi.shape and g.dim() == 3 and g.shape[:2] == theta.shape[:2],
                 lambda: f"rnan_fast::nonlocal_attention_fwd: shapes theta {tuple(theta.shape)}, phi "
                         f"{tuple(phi.shape)}, g {tuple(g.shape)} do not fit (B, N, d), (B, N, d), (B, N, dv)")
    B, N, _ = theta.shape
    return g.new_empty(B, N, g.shape[-1]), g.new_empty(2, B, N, dtype=torch.float32)


def _ext_bwd_fake(dout, theta, phi, g, stats, softmax_over):
    return torch.empty_like(theta), torch.empty_like(phi), torch.empty_like(g)


def _ext_setup_context(ctx, inputs, output):
    theta, phi, g, softmax_over = inputs
    ctx.save_for_backward(theta, phi, g, output[1])
    ctx.softmax_over = softmax_over
    ctx.mark_non_differentiable(output[1])


def _ext_backward(ctx, dout, _dstats):
    theta, phi, g, stats = ctx.saved_tensors
    return (*torch.ops.rnan_fast.nonlocal_attention_bwd(dout, theta, phi, g, stats, ctx.softmax_over), None)


if _ext.EXTENSION_ATTENTION:  # the C++ ops exist only when rnan_fast._C (with this kernel) loaded
    torch.library.register_fake("rnan_fast::nonlocal_attention_fwd")(_ext_fwd_fake)
    torch.library.register_fake("rnan_fast::nonlocal_attention_bwd")(_ext_bwd_fake)
    torch.library.register_autograd("rnan_fast::nonlocal_attention_fwd", _ext_backward,
                                    setup_context=_ext_setup_context)


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
    # The fast family for these tensors: Triton on CUDA (or when named), the C++ kernel on the CPU.
    requested = _backend.get_backend() if backend is None else backend
    fast = requested if requested in ("triton", "extension") else ("extension" if theta.device.type == "cpu"
                                                                   else "triton")
    why_not = (lambda explicit: _extension_why_not(theta, explicit)) if fast == "extension" else \
        (lambda explicit: _triton_why_not(theta, phi, g, explicit))
    kernel = _backend.resolve("nonlocal_attention", requested, fast, why_not)
    if kernel == "extension":
        _check_extension_dtype(theta)
    elif kernel == "triton":
        from rnan_fast.kernels import nonlocal_attention as triton_kernel

        triton_kernel.check_inputs(theta, phi, g, softmax_over)   # head dim / dtype: clear errors
    return _forward(theta, phi, g, softmax_over, kernel)[0]
