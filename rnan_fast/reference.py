"""Pure-PyTorch reference implementations of the two hot spots (any device, any float dtype).

Non-local attention, inputs theta, phi: (B, N, d), g: (B, N, dv), scores S = theta @ phi^T
(no 1/sqrt(d) scaling, as in the official code):
  softmax_over="query" (official, softmax dim=1): P_ij = exp(S_ij - LSE_j), LSE_j = log sum_i exp S_ij
  softmax_over="key"   (ordinary attention):      P_ij = exp(S_ij - LSE_i), LSE_i = log sum_j exp S_ij
  out_i = sum_j P_ij g_j.
`nonlocal_attention_naive` is the official formula (N x N matrix, autograd by PyTorch) that the
tests trust; `nonlocal_attention_forward` / `_backward` compute the same in row blocks so that
memory stays O(block * N), which lets whole images run on a CPU.

Gated residual: out = x + sigmoid(mask_logits) * trunk.
"""
from __future__ import annotations

import contextlib
import functools

import torch

SOFTMAX_OVER = ("query", "key")

# Bytes of temporaries one block may hold (scores, probabilities and their gradient):
# in fp32, 256 MiB keeps a whole 512x512 image (N = 262144) at ~85 rows per block.
BLOCK_BUDGET_BYTES = 256 * 2**20


def check_softmax_over(softmax_over: str) -> None:
    if softmax_over not in SOFTMAX_OVER:
        raise ValueError(f"softmax_over must be 'query' (official RNAN) or 'key', got {softmax_over!r}")


def compute_dtype(t: torch.Tensor) -> torch.dtype:
    # float64 stays float64 (the tests' ground truth); everything else computes in float32,
    # since unscaled scores reach ~1e4 on 0..255 images and overflow fp16.
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _block_rows(batch: int, n: int, dtype: torch.dtype, budget: int = BLOCK_BUDGET_BYTES) -> int:
    """Rows per block so that three (batch, rows, n) temporaries of `dtype` fit in `budget` bytes."""
    itemsize = dtype.itemsize
    return max(1, min(n, budget // max(1, 3 * itemsize * batch * n)))


def _without_autocast(fn):
    """Run `fn` with autocast off: the blocked forward and backward choose their own precision
    (float32 scores), and a forward whose matmuls autocast would put in bf16 would not match a
    backward recomputing them in float32 (gradients off by orders of magnitude)."""
    @functools.wraps(fn)
    def wrapper(dout_or_theta, *args, **kwargs):
        kind = dout_or_theta.device.type
        off = torch.autocast(kind, enabled=False) if kind in ("cpu", "cuda") else contextlib.nullcontext()
        with off:
            return fn(dout_or_theta, *args, **kwargs)
    return wrapper


def nonlocal_attention_naive(theta, phi, g, softmax_over: str = "query"):
    """The official computation: the whole (B, N, N) matrix, differentiable by autograd."""
    check_softmax_over(softmax_over)
    scores = torch.matmul(theta, phi.transpose(1, 2))
    return torch.matmul(torch.softmax(scores, dim=1 if softmax_over == "query" else 2), g)


@_without_autocast
def nonlocal_attention_forward(theta, phi, g, softmax_over: str = "query", block: int | None = None):
    """Blocked forward. Returns (out (B, N, dv), lse (B, N)), both in the compute dtype: float64 for
    float64 inputs, float32 otherwise (the op casts `out` back to the inputs' dtype).

    lse is per key for "query" and per query for "key" (the normaliser the backward needs).
    """
    check_softmax_over(softmax_over)
    ct = compute_dtype(g)
    theta, phi, g = theta.to(ct), phi.to(ct), g.to(ct)
    B, N, _ = theta.shape
    block = block or _block_rows(B, N, ct)
    if block >= N:
        # Everything fits in one block: compute the scores once, oriented so that the softmax
        # runs along the contiguous last dim ((keys, queries) for "query"), in place. About 0.8x
        # the official eager time at N = 48^2 on a CPU; the blocked passes below take ~1.7x.
        scores = torch.matmul(phi, theta.transpose(1, 2)) if softmax_over == "query" else \
            torch.matmul(theta, phi.transpose(1, 2))
        peak = scores.amax(-1, keepdim=True)
        total = scores.sub_(peak).exp_().sum(-1, keepdim=True)
        probs = scores.div_(total)
        lse = (peak + total.log()).squeeze(-1)
        return torch.matmul(probs.transpose(1, 2) if softmax_over == "query" else probs, g), lse
    if softmax_over == "key":
        # One query block at a time: all its scores fit, so the row softmax is exact per block.
        out = torch.empty(B, N, g.shape[-1], dtype=ct, device=g.device)
        lse = torch.empty(B, N, dtype=ct, device=g.device)
        for s in range(0, N, block):
            scores = torch.matmul(theta[:, s:s + block], phi.transpose(1, 2))
            lse[:, s:s + block] = torch.logsumexp(scores, dim=2)
            out[:, s:s + block] = torch.matmul(torch.exp(scores - lse[:, s:s + block, None]), g)
        return out, lse
    # Column softmax: pass 1 over key blocks gives LSE_j (scores as (keys, queries), so the
    # reduction runs along the contiguous dim); pass 2 over query blocks sums the weighted
    # values. Each weight exp(S_ij - LSE_j) <= 1, so no running max is needed.
    lse = torch.empty(B, N, dtype=ct, device=g.device)
    for s in range(0, N, block):
        lse[:, s:s + block] = torch.logsumexp(torch.matmul(phi[:, s:s + block], theta.transpose(1, 2)), dim=2)
    out = torch.empty(B, N, g.shape[-1], dtype=ct, device=g.device)
    for s in range(0, N, block):
        scores = torch.matmul(theta[:, s:s + block], phi.transpose(1, 2))
        out[:, s:s + block] = torch.matmul(torch.exp(scores - lse[:, None, :]), g)
    return out, lse


@_without_autocast
def nonlocal_attention_backward(dout, theta, phi, g, lse, softmax_over: str = "query", block: int | None = None):
    """Blocked backward from the saved inputs and lse. Returns (dtheta, dphi, dg) in the inputs' dtypes.

    "query": one loop over key blocks (every column's softmax lives in one block):
        P = exp(S[:, J] - lse_J), dG_J = P^T dY, D_J = g_J . dG_J, dS = P * (dY g_J^T - D_J).
    "key": one loop over query blocks, D_I = rowsum(P * dP).
    Then dTheta = dS @ phi and dPhi = dS^T @ theta, accumulated over blocks.
    """
    check_softmax_over(softmax_over)
    dtypes = (theta.dtype, phi.dtype, g.dtype)
    ct = compute_dtype(g)
    dout, theta, phi, g, lse = (t.to(ct) for t in (dout, theta, phi, g, lse))
    B, N, _ = theta.shape
    block = block or _block_rows(B, N, ct)
    dtheta, dphi, dg = torch.zeros_like(theta), torch.zeros_like(phi), torch.zeros_like(g)
    for s in range(0, N, block):
        sl = slice(s, s + block)
        if softmax_over == "query":
            p = torch.exp(torch.matmul(theta, phi[:, sl].transpose(1, 2)) - lse[:, None, sl])  # (B, N, J)
            dg[:, sl] = torch.matmul(p.transpose(1, 2), dout)
            d = (g[:, sl] * dg[:, sl]).sum(-1)                                                # (B, J)
            ds = p * (torch.matmul(dout, g[:, sl].transpose(1, 2)) - d[:, None, :])
            dtheta += torch.matmul(ds, phi[:, sl])
            dphi[:, sl] = torch.matmul(ds.transpose(1, 2), theta)
        else:
            p = torch.exp(torch.matmul(theta[:, sl], phi.transpose(1, 2)) - lse[:, sl, None])  # (B, I, N)
            dp = torch.matmul(dout[:, sl], g.transpose(1, 2))
            ds = p * (dp - (p * dp).sum(-1, keepdim=True))
            dg += torch.matmul(p.transpose(1, 2), dout[:, sl])
            dtheta[:, sl] = torch.matmul(ds, phi)
            dphi += torch.matmul(ds.transpose(1, 2), theta[:, sl])
    return tuple(t.to(dt) for t, dt in zip((dtheta, dphi, dg), dtypes))


def gated_residual(x, mask_logits, trunk):
    """x + sigmoid(mask_logits) * trunk, all (B, C, H, W) of one shape and dtype."""
    return x + torch.sigmoid(mask_logits) * trunk


def gated_residual_backward(grad, mask_logits, trunk):
    """(grad_mask_logits, grad_trunk); grad_x is `grad` itself. Math in float32 for half inputs."""
    ct = compute_dtype(grad)
    s = torch.sigmoid(mask_logits.to(ct))
    gc = grad.to(ct)
    grad_trunk = gc * s
    grad_mask = grad_trunk * trunk.to(ct) * (1 - s)
    return grad_mask.to(mask_logits.dtype), grad_trunk.to(trunk.dtype)
