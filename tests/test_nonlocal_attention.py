"""Non-local attention: blocked reference, registered op, Triton kernel (interpreter on CPU, GPU when present).

Ground truth is always `nonlocal_attention_naive` in float64. Low-precision results follow the
tolerance rule: error vs float64 <= 2 x (PyTorch's own error computing the naive formula in that
dtype) + a small floor relative to the result's magnitude.
"""
import contextlib
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rnan_fast import _backend, _ext, reference
from rnan_fast.ops import nonlocal_attention

op = torch.ops.rnan_fast.nonlocal_attention
REPO = Path(__file__).resolve().parents[1]
# Under the interpreter, rows past N in a partial block (computed, never stored) may overflow to
# inf/nan in numpy; stored results are checked for finiteness below.
pytestmark = [pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning"),
              pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")]
MODES = ("query", "key")
CUDA = torch.cuda.is_available()
TRITON_HERE = _ext.triton_available() and (CUDA or _ext.triton_interpret())
needs_triton = pytest.mark.skipif(not TRITON_HERE, reason="needs Triton with CUDA, or TRITON_INTERPRET=1 "
                                  "(tests/conftest.py sets it on CPU-only machines)")
needs_cuda = pytest.mark.skipif(not (CUDA and _ext.triton_available()), reason="needs a CUDA GPU and Triton")
DEV = "cuda" if CUDA else "cpu"


# ------------------------------------------------------------------------------------------------
# Inputs
# ------------------------------------------------------------------------------------------------
def make_inputs(B, N, d, dv, *, scale="unit", dtype=torch.float32, device="cpu", seed=0, layout="contiguous",
                max_score=1e4):
    """theta, phi (B, N, d), g (B, N, dv). scale="image": 1x1-conv-like projections of 0..255 pixels,
    rescaled so that max |S| = max_score (unscaled scores of real images reach ~1e4)."""
    gen = torch.Generator().manual_seed(seed)
    if scale == "unit":
        th, ph, g = (torch.randn(B, N, k, generator=gen, dtype=torch.float64) for k in (d, d, dv))
    else:
        C = 2 * max(d, dv)
        x = torch.rand(B, N, C, generator=gen, dtype=torch.float64) * 255
        th, ph, g = (x @ (torch.randn(C, k, generator=gen, dtype=torch.float64) / C) for k in (d, d, dv))
        sample = th[:, torch.randperm(N, generator=gen)[:2048]] if N > 4096 else th   # no N x N at large N
        f = (max_score / (sample @ ph.transpose(1, 2)).abs().max()).sqrt()
        th, ph = th * f, ph * f
    out = []
    for t in (th, ph, g):
        t = t.to(dtype)
        if layout == "permuted":      # (B, k, N) storage seen as (B, N, k): stride 1 along N
            t = t.transpose(1, 2).contiguous().transpose(1, 2)
        elif layout == "batch_inner":  # (N, B, k) storage: batch stride k, row stride B*k
            t = t.transpose(0, 1).contiguous().transpose(0, 1)
        elif layout == "sliced":       # every other feature of a wider tensor
            w = torch.zeros(*t.shape[:2], 2 * t.shape[2], dtype=dtype)
            w[..., ::2] = t
            t = w[..., ::2]
        out.append(t.to(device))
    return out


def naive_with_grads(th, ph, g, mode, dout, dtype=torch.float64):
    xs = [t.detach().to(dtype).requires_grad_() for t in (th, ph, g)]
    y = reference.nonlocal_attention_naive(*xs, mode)
    y.backward(dout.to(dtype))
    return y.detach(), [x.grad for x in xs]


def assert_close_rule(ours, ref64, lowp, name, floor, scale=None):
    """|ours - ref| <= 2 |lowp - ref| + floor * max(scale, max |ref|) (max norms).

    For gradients the tests pass the natural scale of the terms summed (`grad_scale`): with
    1e4-sized scores most softmaxes saturate, the true gradients are then far smaller than the
    terms P dP theta they are summed from, and any fp32 computation (PyTorch's included) carries
    rounding noise of size eps * |S| * |dP| * |theta| regardless of how small the true value is.
    """
    ours, ref64, lowp = ours.detach().double().cpu(), ref64.detach().double().cpu(), lowp.detach().double().cpu()
    assert torch.isfinite(ours).all(), f"{name}: non-finite values"
    err = (ours - ref64).abs().max().item()
    base = (lowp - ref64).abs().max().item()
    if not torch.isfinite(torch.tensor(base)):
        base = 0.0   # PyTorch's own low-precision result overflowed: the floor alone bounds ours
    scale = max(ref64.abs().max().item(), scale or 0.0)
    bound = 2 * base + floor * scale + 1e-12
    assert err <= bound, (f"{name}: error {err:.3e} > bound {bound:.3e} (PyTorch's own error {base:.3e}, "
                          f"scale {scale:.3e}, error/scale {err / max(scale, 1e-300):.2e})")


def grad_scales(th, ph, g, dout):
    """Natural magnitudes of (dtheta, dphi, dg): max |dY g^T| * max |phi| (resp. |theta|), max |dY|."""
    th, ph, g, dout = (t.detach().double().cpu() for t in (th, ph, g, dout))
    dp = (dout @ g.transpose(1, 2)).abs().max().item()
    return dp * ph.abs().max().item(), dp * th.abs().max().item(), dout.abs().max().item() * g.abs().max().item()


# ------------------------------------------------------------------------------------------------
# Reference: blocked (memory-bounded) == exact naive, in float64
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("seed", range(3))
def test_blocked_reference_equals_naive(mode, seed):
    rng = random.Random(100 + seed)
    B, N, d, dv = rng.randint(1, 3), rng.choice([1, 7, 33, 61]) + rng.randint(0, 20), rng.choice([4, 16]), rng.choice([3, 8])
    block = rng.randint(1, 9)
    th, ph, g = make_inputs(B, N, d, dv, dtype=torch.float64, seed=seed, scale=rng.choice(["unit", "image"]))
    dout = torch.randn(B, N, dv, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    out, lse = reference.nonlocal_attention_forward(th, ph, g, mode, block=block)
    ref, grads = naive_with_grads(th, ph, g, mode, dout)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10 * ref.abs().max().item())
    S = th @ ph.transpose(1, 2)
    torch.testing.assert_close(lse, torch.logsumexp(S, dim=1 if mode == "query" else 2), rtol=1e-12, atol=1e-9)
    ours = reference.nonlocal_attention_backward(dout, th, ph, g, lse, mode, block=block)
    # With 1e4-sized scores most softmaxes saturate and the true gradients are tiny, so a
    # float64 rounding of the LSE shows relative to the natural scale |dY g^T| |theta|, not to them.
    nat = (dout @ g.transpose(1, 2)).abs().max().item() * max(th.abs().max().item(), ph.abs().max().item())
    for name, a, b in zip(("dtheta", "dphi", "dg"), ours, grads):
        err = (a - b).abs().max().item()
        assert err <= 1e-12 * nat + 1e-10 * b.abs().max().item(), f"{name}: {err:.3e} (natural scale {nat:.3e})"


@pytest.mark.parametrize("mode", MODES)
def test_op_reference_autograd(mode):
    th, ph, g = (t.requires_grad_() for t in make_inputs(2, 37, 8, 5, dtype=torch.float64, seed=3))
    dout = torch.randn(2, 37, 5, dtype=torch.float64)
    y = nonlocal_attention(th, ph, g, softmax_over=mode, backend="reference")
    y.backward(dout)
    ref, grads = naive_with_grads(th, ph, g, mode, dout)
    torch.testing.assert_close(y, ref)
    for a, b in zip((th.grad, ph.grad, g.grad), grads):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("mode", MODES)
def test_autocast_casts_inputs_and_keeps_gradients_accurate(mode):
    """Under autocast the op runs in the autocast dtype (mixed inputs are cast), while the
    reference inside keeps fp32 scores in forward and backward alike."""
    gen = torch.Generator().manual_seed(7)
    th, ph, g = (torch.randn(2, 37, 16, generator=gen) for _ in range(3))
    dout = torch.randn(2, 37, 16, generator=gen)
    leaves = [th.clone().requires_grad_(), ph.bfloat16().requires_grad_(), g.clone().requires_grad_()]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = nonlocal_attention(*leaves, softmax_over=mode, backend="reference")
    assert out.dtype == torch.bfloat16
    out.backward(dout.bfloat16())
    rounded = [t.bfloat16().double().requires_grad_() for t in (th, ph, g)]
    ref = reference.nonlocal_attention_naive(*rounded, mode)
    ref.backward(dout.bfloat16().double())
    torch.testing.assert_close(out.double(), ref, rtol=1e-2, atol=1e-2)
    for ours, exact in zip(leaves, rounded):
        assert ours.grad.dtype == ours.dtype
        err = (ours.grad.double() - exact.grad).norm() / exact.grad.norm()
        assert err < 2e-2, err


def test_default_is_official_query_softmax():
    th, ph, g = make_inputs(1, 20, 4, 4, dtype=torch.float64, seed=4)
    y = nonlocal_attention(th, ph, g, backend="reference")
    S = th @ ph.transpose(1, 2)
    torch.testing.assert_close(y, torch.softmax(S, dim=1) @ g)


# Output tolerance against float64 of the same (rounded) inputs: bf16 / fp16 outputs are rounded
# to 8 / 11 significant bits, and fp16 runs the reference in float32.
AUTO_CPU_TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3, torch.float64: 1e-12}


@pytest.mark.parametrize("dtype", list(AUTO_CPU_TOL), ids=lambda t: str(t).removeprefix("torch."))
def test_auto_backend_on_cpu_takes_the_extension_or_the_reference(dtype, monkeypatch):
    """"auto" (the default) on CPU tensors takes the C++ kernel ("extension") for float32 and
    bfloat16 where it is built, the reference for float64 and float16 (or without it), and never
    Triton, even under TRITON_INTERPRET=1 (the interpreter is a test path, taken only when named).
    The output matches the official formula in float64."""
    chosen = []
    resolve = _backend.resolve
    monkeypatch.setattr(_backend, "resolve", lambda *a: chosen.append(resolve(*a)) or chosen[-1])
    th, ph, g = make_inputs(1, 20, 16, 16, dtype=dtype, seed=5)
    y = nonlocal_attention(th, ph, g)
    kernel_dtype = dtype in (torch.float32, torch.bfloat16)
    assert chosen == ["extension" if kernel_dtype and _ext.EXTENSION_ATTENTION else "reference"]
    assert y.dtype == dtype
    exact = reference.nonlocal_attention_naive(th.double(), ph.double(), g.double())
    tol = AUTO_CPU_TOL[dtype]
    torch.testing.assert_close(y.double(), exact, rtol=tol, atol=tol)


@pytest.mark.parametrize("mode", MODES)
def test_opcheck_reference(mode):
    th, ph, g = make_inputs(2, 9, 4, 3, seed=6)
    torch.library.opcheck(op, (th.requires_grad_(), ph.requires_grad_(), g.requires_grad_(), mode, "reference"))


def test_compile_fullgraph_no_graph_breaks():
    import torch._dynamo

    torch._dynamo.reset()

    def f(th, ph, g):
        y = nonlocal_attention(th, ph, g, softmax_over="query", backend="reference")
        return (y * y).sum() + nonlocal_attention(th, ph, g, softmax_over="key", backend="reference").sum()

    th, ph, g = (t.requires_grad_() for t in make_inputs(2, 11, 4, 4, seed=7))
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")   # raises on any graph break
    loss = compiled(th, ph, g)
    loss.backward()
    grads = [t.grad.clone() for t in (th, ph, g)]
    for t in (th, ph, g):
        t.grad = None
    f(th, ph, g).backward()
    torch.testing.assert_close(loss, f(th, ph, g))
    for a, t in zip(grads, (th, ph, g)):
        torch.testing.assert_close(a, t.grad)


def test_input_validation():
    th, ph, g = make_inputs(1, 5, 4, 4)
    with pytest.raises(ValueError, match="softmax_over"):
        nonlocal_attention(th, ph, g, softmax_over="keys", backend="reference")
    with pytest.raises(ValueError, match=r"\(B, N, d\)"):
        nonlocal_attention(th[0], ph, g, backend="reference")
    with pytest.raises(ValueError, match="one shape"):
        nonlocal_attention(th, ph[:, :4], g, backend="reference")
    with pytest.raises(ValueError, match="share"):
        nonlocal_attention(th, ph, g[:, :3], backend="reference")
    with pytest.raises(TypeError, match="dtypes differ"):
        nonlocal_attention(th, ph.double(), g, backend="reference")
    with pytest.raises(TypeError, match="floating"):
        nonlocal_attention(th.long(), ph.long(), g.long(), backend="reference")
    with pytest.raises(TypeError, match="torch.Tensor"):
        nonlocal_attention(th.numpy(), ph, g, backend="reference")
    with pytest.raises(ValueError, match="unknown backend"):
        nonlocal_attention(th, ph, g, backend="nope")


@needs_triton
def test_triton_rejects_unsupported_head_dim_and_dtype():
    th, ph, g = make_inputs(1, 5, 48, 16, device=DEV)
    with pytest.raises(ValueError, match=r"48 .*16, 32, 64"):
        nonlocal_attention(th, ph, g, backend="triton")
    th, ph, g = make_inputs(1, 5, 16, 24, device=DEV)
    with pytest.raises(ValueError, match="value dim of g = 24"):
        nonlocal_attention(th, ph, g, backend="triton")
    th, ph, g = make_inputs(1, 5, 16, 16, dtype=torch.float64, device=DEV)
    with pytest.raises(TypeError, match="float64"):
        nonlocal_attention(th, ph, g, backend="triton")
    big = torch.randn(1, 3, 16, device=DEV).expand(65536, 3, 16)   # no memory: a stride-0 batch
    with pytest.raises(ValueError, match="batch 65536 exceeds"):
        nonlocal_attention(big, big, big, backend="triton")


@pytest.mark.skipif(CUDA or not _ext.triton_available(), reason="checks the CPU message (no CUDA here)")
def test_triton_on_cpu_without_interpreter_is_refused(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    th, ph, g = make_inputs(1, 5, 16, 16)
    with pytest.raises(RuntimeError, match="CUDA tensors"):
        nonlocal_attention(th, ph, g, backend="triton")


# ------------------------------------------------------------------------------------------------
# Triton kernel (interpreter on CPU-only machines, the GPU otherwise)
# ------------------------------------------------------------------------------------------------
def _random_cases(n, seed):
    rng = random.Random(seed)
    cases = []
    for i in range(n):
        N = [1, 17, 45, 130, 32, 64][i] if i < 6 else rng.randint(2, 140)   # 32, 64: no partial block
        cases.append(dict(B=rng.randint(1, 3), N=N, d=rng.choice([16, 32, 64]), dv=rng.choice([16, 32, 64]),
                          mode=MODES[i % 2], scale=rng.choice(["unit", "image"]),
                          layout=rng.choice(["contiguous", "permuted", "batch_inner", "sliced"]), seed=seed + i))
    return cases


TRITON_CASES = _random_cases(12, 2024)


def fp32_grad_floor(th, ph):
    """Floor for fp32 gradients, relative to `grad_scales`: rounding a score S moves a saturated
    weight by ~eps32 |S|, so the noise grows with the largest score (theoretical worst case
    ~eps32 * max|S| = 6e-4 at |S| = 1e4; measured <= 5e-6 under the interpreter)."""
    return 1e-7 + 4e-9 * _max_score(th, ph)


def _max_score(th, ph):
    return (th.detach().double().cpu() @ ph.detach().double().cpu().transpose(1, 2)).abs().max().item()


def interpreter_score_ulp(th, ph):
    """Extra floor of the fp32 Triton tests under the interpreter, relative to the same scales: one
    ulp of the largest score, 2^-23 max|S| (1.2e-3 at |S| = 1e4). There the key-major passes'
    S^T = K Q^T and the query-major passes' S = Q K^T both come from numpy's sgemm, which on some
    CPUs gives the two different bits (15-40% of a tile's entries at d = 16-64 on an AMD EPYC, with
    OpenBLAS's Zen kernels), so a saturated weight is off by up to that much (the kernel's
    docstring). 0 on a GPU, whose MMA gives both the same bits."""
    return 0.0 if CUDA else 2.0 ** -23 * _max_score(th, ph)


@contextlib.contextmanager
def _matmul_precision(p="highest"):
    """torch's float32 matmul precision set to `p` for the duration (the previous one restored)."""
    prev = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(p)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(prev)


@needs_triton
@pytest.mark.parametrize("case", TRITON_CASES, ids=lambda c: "{mode}-B{B}-N{N}-d{d}-dv{dv}-{scale}-{layout}".format(**c))
def test_triton_fp32_matches_float64(case):
    c = dict(case)
    mode = c.pop("mode")
    th, ph, g = make_inputs(c["B"], c["N"], c["d"], c["dv"], scale=c["scale"], layout=c["layout"], seed=c["seed"],
                            device=DEV)
    from rnan_fast.kernels import nonlocal_attention as kernel

    with _matmul_precision():
        out, stats = kernel.forward(th, ph, g, mode)
        dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(c["seed"])).to(DEV)
        grads = kernel.backward(dout, th, ph, g, stats, mode, False)
        ref, ref_grads = naive_with_grads(th, ph, g, mode, dout)
        low, low_grads = naive_with_grads(th, ph, g, mode, dout, dtype=torch.float32)
    ulp = interpreter_score_ulp(th, ph)
    grad_floor = fp32_grad_floor(th, ph) + ulp
    assert_close_rule(out, ref, low, "out", 2e-5 + ulp)
    S = th.double() @ ph.double().transpose(1, 2)
    lse = torch.logsumexp(S, dim=1 if mode == "query" else 2)
    torch.testing.assert_close(kernel.lse_natural(stats).double(), lse, rtol=1e-5, atol=1e-3)
    for name, a, b, l, sc in zip(("dtheta", "dphi", "dg"), grads, ref_grads, low_grads, grad_scales(th, ph, g, dout)):
        assert_close_rule(a, b, l, name, grad_floor, sc)


@needs_triton
@pytest.mark.parametrize("mode", MODES)
def test_triton_op_autograd_noncontiguous(mode):
    th, ph, g = make_inputs(2, 50, 32, 16, layout="permuted", scale="image", seed=11, device=DEV)
    xs = [t.detach().requires_grad_() for t in (th, ph, g)]
    with _matmul_precision():
        y = nonlocal_attention(*xs, softmax_over=mode, backend="triton")
        dout = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(DEV)
        y.backward(dout)
        ref, ref_grads = naive_with_grads(th, ph, g, mode, dout)
        low, low_grads = naive_with_grads(th, ph, g, mode, dout, dtype=torch.float32)
    ulp = interpreter_score_ulp(th, ph)
    grad_floor = fp32_grad_floor(th, ph) + ulp
    assert_close_rule(y, ref, low, "out", 2e-5 + ulp)
    for name, x, b, l, sc in zip(("dtheta", "dphi", "dg"), xs, ref_grads, low_grads, grad_scales(th, ph, g, dout)):
        assert_close_rule(x.grad, b, l, name, grad_floor, sc)


@needs_triton
@pytest.mark.parametrize("mode", MODES)
def test_triton_expanded_grad_output(mode):
    # A sum over the feature dim hands the backward a stride-0 (expanded) gradient.
    th, ph, g = make_inputs(2, 33, 16, 32, seed=16, device=DEV)
    w = torch.randn(2, 33, generator=torch.Generator().manual_seed(3)).to(DEV)
    xs = [t.detach().requires_grad_() for t in (th, ph, g)]
    with _matmul_precision():
        (nonlocal_attention(*xs, softmax_over=mode, backend="triton").sum(2) * w).sum().backward()
        ref, ref_grads = naive_with_grads(th, ph, g, mode, w[:, :, None].expand(2, 33, 32))
    for x, b, sc in zip(xs, ref_grads, grad_scales(th, ph, g, w[:, :, None].expand(2, 33, 32))):
        err = (x.grad.double().cpu() - b.cpu()).abs().max().item()
        assert err <= 1e-6 * sc, (err, sc)


@needs_triton
@pytest.mark.parametrize("mode", MODES)
def test_triton_fp16(mode):
    # fp16 inputs, fp32 scores: finite and accurate even with 1e4-sized scores.
    th, ph, g = make_inputs(2, 70, 32, 32, scale="image", dtype=torch.float16, seed=12, device=DEV)
    from rnan_fast.kernels import nonlocal_attention as kernel

    out, stats = kernel.forward(th, ph, g, mode)
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(2)).to(DEV).half()
    grads = kernel.backward(dout, th, ph, g, stats, mode, False)
    ref, ref_grads = naive_with_grads(th, ph, g, mode, dout)
    # PyTorch's fp16 computation (upcast on CPU where half matmul is missing or slow).
    low, low_grads = naive_with_grads(th, ph, g, mode, dout, dtype=torch.float16 if CUDA else torch.float32)
    if not CUDA:
        low, low_grads = low.half(), [x.half() for x in low_grads]
    assert out.dtype == torch.float16 and all(t.dtype == torch.float16 for t in grads)
    assert_close_rule(out, ref, low, "out", 2e-3)
    for name, a, b, l, sc in zip(("dtheta", "dphi", "dg"), grads, ref_grads, low_grads, grad_scales(th, ph, g, dout)):
        assert_close_rule(a, b, l, name, 5e-3, sc)


@needs_triton
@pytest.mark.parametrize("mode", MODES)
def test_triton_backward_is_deterministic(mode):
    th, ph, g = make_inputs(1, 40, 16, 16, seed=13, device=DEV)
    from rnan_fast.kernels import nonlocal_attention as kernel

    out, stats = kernel.forward(th, ph, g, mode)
    dout = torch.randn_like(out)
    a = kernel.backward(dout, th, ph, g, stats, mode, True)
    b = kernel.backward(dout, th, ph, g, stats, mode, True)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


@needs_triton
def test_triton_under_compile_fullgraph():
    import torch._dynamo

    torch._dynamo.reset()
    th, ph, g = (t.requires_grad_() for t in make_inputs(1, 20, 16, 16, seed=14, device=DEV))

    def f(a, b, c):
        return nonlocal_attention(a, b, c, backend="triton").square().sum()

    loss = torch.compile(f, fullgraph=True, backend="aot_eager")(th, ph, g)
    loss.backward()
    ref, grads = naive_with_grads(th, ph, g, "query", 2 * reference.nonlocal_attention_naive(
        th.detach().double(), ph.detach().double(), g.detach().double()))
    torch.testing.assert_close(loss.double(), ref.square().sum(), rtol=1e-4, atol=1e-4)
    for x, b in zip((th, ph, g), grads):
        torch.testing.assert_close(x.grad.double(), b, rtol=1e-3, atol=1e-4 * b.abs().max().item())


@needs_triton
@pytest.mark.parametrize("mode", MODES)
def test_opcheck_triton(mode):
    th, ph, g = (t.requires_grad_() for t in make_inputs(2, 9, 16, 32, seed=15, device=DEV))
    torch.library.opcheck(op, (th, ph, g, mode, "triton"))


FP32_NEW_PRECISION_API = """
import torch
from rnan_fast.ops import nonlocal_attention
from rnan_fast.kernels import nonlocal_attention as kernel
assert kernel._INTERPRET
gen = torch.Generator().manual_seed(0)
th, ph, g = (torch.randn(1, 40, 16, generator=gen) for _ in range(3))
exact = torch.softmax(th.double() @ ph.double().transpose(1, 2), dim=1) @ g.double()   # softmax over queries
for precision, expected in (("tf32", "tf32"), ("ieee", kernel.FP32_HIGHEST_INPUT_PRECISION)):
    torch.backends.cuda.matmul.fp32_precision = precision      # the new API: the legacy getter now raises
    assert kernel._precision(torch.float32) == expected, (precision, kernel._precision(torch.float32))
    out = nonlocal_attention(th, ph, g, softmax_over="query", backend="triton")
    assert (out.double() - exact).abs().max() < 1e-4, precision
torch.backends.cuda.matmul.fp32_precision = "none"
torch.backends.fp32_precision = "tf32"                          # the global level of the new API
assert kernel._precision(torch.float32) == "tf32"
print("ok")
"""


@needs_triton
def test_triton_fp32_under_the_new_matmul_precision_api():
    """torch.get_float32_matmul_precision() raises once torch.backends.cuda.matmul.fp32_precision
    was set; fp32 calls must still run and follow the setting. In a subprocess: the new API
    cannot be unset in a process (the legacy getter keeps raising), so this session stays clean."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(REPO)}
    run = subprocess.run([sys.executable, "-c", FP32_NEW_PRECISION_API], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and run.stdout.strip().endswith("ok"), run.stderr[-3000:]


BOUNDED_TUNING = """
import torch
from rnan_fast.kernels import nonlocal_attention as K
assert K._TUNE and K._TUNE_MAX == 2
q = torch.empty(1, 8, 64)
for name in ("_bwd_kv_kernel", "_fwd_known_lse_kernel"):
    kernel = getattr(K, name)
    for prec in ("tf32x3", "tf32"):
        kept = K._prune(name, kernel.configs, {"Q": q}, D=64, DV=64, PREC=prec, STATS_PER_KEY=True)
        default = K.default_config(name, torch.float32, prec, 64)
        assert len(kept) == 2 and kept[0].all_kwargs() == default.all_kwargs() != kept[1].all_kwargs(), kept
        assert all(c.kwargs.get("POLY_PART", 0) == 0 for c in kept) or prec == "tf32", kept
print("ok")
"""


def test_bounded_tuning_keeps_the_default_first():
    """RNAN_FAST_AUTOTUNE_MAX=2: each kernel tunes over its operands' default and one other
    candidate (no polynomial configs under tf32x3). Pruning launches nothing: no GPU needed."""
    env = {**os.environ, "TRITON_INTERPRET": "0", "RNAN_FAST_AUTOTUNE": "1", "RNAN_FAST_AUTOTUNE_MAX": "2",
           "PYTHONPATH": str(REPO)}
    run = subprocess.run([sys.executable, "-c", BOUNDED_TUNING], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0 and run.stdout.strip().endswith("ok"), run.stderr[-3000:]
    run = subprocess.run([sys.executable, "-c", "import rnan_fast.kernels.nonlocal_attention"], cwd=REPO,
                         env={**env, "RNAN_FAST_AUTOTUNE_MAX": "two"}, capture_output=True, text=True, timeout=300)
    assert run.returncode != 0 and "RNAN_FAST_AUTOTUNE_MAX must be a positive integer, got 'two'" in run.stderr


class _DeviceRecorder:
    """Stands in for torch.cuda.device: records the device each guard selects, and which is
    current (None outside every guard)."""

    def __init__(self):
        self.stack, self.selected = [], []

    def __call__(self, device):
        recorder = self

        class Guard:
            def __enter__(self):
                recorder.stack.append(device)
                recorder.selected.append(device)

            def __exit__(self, *exc):
                recorder.stack.pop()
                return False
        return Guard()

    @property
    def current(self):
        return self.stack[-1] if self.stack else None


@needs_triton
@pytest.mark.parametrize("mode", MODES)
def test_triton_launches_inside_a_device_guard(mode, monkeypatch):
    """Every launch runs with the inputs' device current (Triton launches on the current device:
    cuda:1 tensors while cuda:0 is current would otherwise go to cuda:0). Spied here on the
    launcher; a real second GPU is checked by test_gpu_other_device."""
    from rnan_fast.kernels import nonlocal_attention as kernel

    recorder, launches = _DeviceRecorder(), []
    real_launch = kernel._launch

    def spy(k, grid, *args, **meta):
        launches.append((k.base_fn.__name__, recorder.current))
        return real_launch(k, grid, *args, **meta)

    monkeypatch.setattr(torch.cuda, "device", recorder)
    monkeypatch.setattr(kernel, "_launch", spy)
    th, ph, g = make_inputs(1, 20, 16, 16, seed=17, device=DEV)
    expected = th.device if th.is_cuda else -1
    out, stats = kernel.forward(th, ph, g, mode)
    kernel.backward(torch.randn_like(out), th, ph, g, stats, mode)
    names = [name for name, _ in launches]
    assert len(names) == (4 if mode == "query" else 3) and "_bwd_kv_kernel" in names and "_bwd_q_kernel" in names
    assert all(current == expected for _, current in launches), launches
    assert recorder.current is None and set(recorder.selected) == {expected}


# ------------------------------------------------------------------------------------------------
# Column pass 2: every tuning candidate, and the polynomial exp2 some of them use
# ------------------------------------------------------------------------------------------------
if TRITON_HERE:
    import triton
    import triton.language as tl

    from rnan_fast.kernels import nonlocal_attention as _kernel

    @triton.jit
    def _apply_exp2_fma(X, Y, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(Y + offs, _kernel._exp2_fma(tl.load(X + offs, mask=offs < n)), mask=offs < n)


@needs_triton
def test_exp2_fma_accuracy():
    grid = torch.linspace(-140, 0, 70_001, dtype=torch.float64)
    grid = grid + torch.rand(grid.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 2e-3
    x = torch.cat([grid.float(), torch.tensor([0.0, -1.0, -0.5, 0.5 - 2 ** -24, float("-inf"), float("nan")])]).to(DEV)
    y = torch.full_like(x, 7.0)                               # poisoned: every element must be written
    _apply_exp2_fma[(triton.cdiv(x.numel(), 1024),)](x, y, x.numel(), BLOCK=1024)
    x, y = x.cpu().double(), y.cpu().double()
    exact = torch.exp2(x)
    normal = x > -125
    rel = ((y[normal] - exact[normal]) / exact[normal]).abs().max().item()
    assert rel <= 1.02e-4, rel
    assert y[x == 0].eq(1.0).all() and y[x == -1].eq(0.5).all()          # constant term 1: exact powers of 2
    low = y[(x <= -125) & torch.isfinite(x)]
    assert (low >= 0).all() and (low <= 2 ** -124.4).all()            # clamped, never wrapped to inf/nan
    assert y[x == float("-inf")].item() <= 2 ** -124.4 and torch.isnan(y[torch.isnan(x)]).all()


def _twin(config):
    """The POLY_PART = 0 config with the same tile as `config` (None if the list has none)."""
    return next((c for c in _kernel.KNOWN_LSE_CONFIGS
                 if _kernel.config_tile(c) == _kernel.config_tile(config) and not c.kwargs["POLY_PART"]), None)


SMEM_SM90 = 232_448       # shared memory one block may use on sm_90 (the opt-in maximum), bytes
SMEM_USE = 0.85           # configs forced by the tests stay under this share of it


def pass2_shared_bytes(config, itemsize: int, d: int) -> int:
    """Shared memory of column pass 2 with `config` at head dims d = dv and tf32 (or fp16 / bf16)
    dots: the q tile and num_stages k and v tiles, plus 4 KiB for Triton's own buffers (ptxas for
    sm_90 gives at most 2 KiB more than the tiles; tests/test_instruction_mix.py checks this bound)."""
    bm, bn, stages = config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"], config.num_stages
    return itemsize * (bm * d + stages * bn * 2 * d) + 4096


def pass2_cases(configs, dtype):
    """[(config, B, N, d, layout)]: one random case per pass-2 candidate, with d drawn among the head
    dims at which the config stays under SMEM_USE of sm_90's shared memory (fp32 at d = 64 puts
    (128, 128, 4, 3) at 231,424 B: 1 KiB under the limit)."""
    rng, cases = random.Random(7), []
    for config in configs:
        fits = [d for d in (16, 32, 64) if pass2_shared_bytes(config, dtype.itemsize, d) <= SMEM_USE * SMEM_SM90]
        B, N = rng.randint(1, 2), rng.choice([67, 129, 300]) + rng.randint(0, 9)
        cases.append((config, B, N, rng.choice(fits), rng.choice(["contiguous", "permuted"])))
    return cases


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32] + ([torch.bfloat16] if CUDA else []))
def test_triton_column_pass2_every_config(dtype):
    """Each tuning candidate of pass 2, forced, against float64: the autotuner may pick any of them.
    With POLY_PART > 0 the weights carry the polynomial's relative error (<= 1.02e-4), so the
    bound adds 1.05e-4 * (P |g|), the sum of the magnitudes the output is summed from."""
    floor = {torch.float32: 2e-5, torch.bfloat16: 1e-2}[dtype]
    with _matmul_precision("high"):                       # fp32 dots in tf32: polynomial enabled
        for i, (config, B, N, d, layout) in enumerate(pass2_cases(_kernel.KNOWN_LSE_CONFIGS, dtype)):
            th, ph, g = make_inputs(B, N, d, d, dtype=dtype, seed=40 + i, device=DEV, layout=layout)
            with _kernel.forced_config(_kernel._fwd_known_lse_kernel, config):
                out, _ = _kernel.forward(th, ph, g, "query")
            ref = reference.nonlocal_attention_naive(th.double(), ph.double(), g.double(), "query")
            low = reference.nonlocal_attention_naive(th, ph, g, "query")
            magnitude = reference.nonlocal_attention_naive(th.double(), ph.double(), g.double().abs(), "query")
            err = (out.double() - ref).abs()
            bound = (1.05e-4 * magnitude * (config.kwargs["POLY_PART"] > 0) + 2 * (low.double() - ref).abs().max()
                     + floor * ref.abs().max())
            assert torch.isfinite(out).all() and (err <= bound).all(), (
                f"{config}: B={B} N={N} d={d}: max excess {(err - bound).max().item():.3e}")


@needs_triton
def test_triton_polynomial_exp2_only_below_fp32_highest():
    """A POLY_PART config changes the bits under tf32 (so the polynomial is really used) and not at
    all under "highest" (fp32-accurate dots keep every exp on the MUFU unit)."""
    th, ph, g = make_inputs(2, 150, 32, 32, seed=50, device=DEV)
    poly = [c for c in _kernel.KNOWN_LSE_CONFIGS if c.kwargs["POLY_PART"] and _twin(c)]
    assert poly, "no POLY_PART config with a POLY_PART = 0 twin to compare with"
    for precision, same in (("high", False), ("highest", True)):
        with _matmul_precision(precision):
            for config in poly:
                outs = []
                for c in (config, _twin(config)):
                    with _kernel.forced_config(_kernel._fwd_known_lse_kernel, c):
                        outs.append(_kernel.forward(th, ph, g, "query")[0])
                assert torch.equal(*outs) == same, (precision, config)


# ------------------------------------------------------------------------------------------------
# GPU only: low precision, large N, determinism, CUDA graphs
# ------------------------------------------------------------------------------------------------
@needs_cuda
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype,precision", [(torch.float16, "highest"), (torch.bfloat16, "highest"),
                                             (torch.float32, "high"), (torch.float32, "highest")])
@pytest.mark.parametrize("scale", ["unit", "image"])
def test_gpu_dtypes_tolerance_rule(mode, dtype, precision, scale):
    with _matmul_precision(precision):
        for B, N, d in ((2, 1000, 32), (1, 2305, 64), (3, 257, 16)):
            th, ph, g = make_inputs(B, N, d, d, dtype=dtype, scale=scale, seed=N, device="cuda")
            xs = [t.detach().requires_grad_() for t in (th, ph, g)]
            y = nonlocal_attention(*xs, softmax_over=mode, backend="triton")
            dout = torch.randn_like(y)
            y.backward(dout)
            ref, ref_grads = naive_with_grads(th, ph, g, mode, dout)
            low, low_grads = naive_with_grads(th, ph, g, mode, dout, dtype=dtype)
            floor = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1e-2}[dtype]
            assert_close_rule(y, ref, low, f"out {dtype} {precision} N={N}", floor)
            if dtype == torch.float32 and precision == "highest":
                floor = fp32_grad_floor(th, ph)
            for name, x, b, l, sc in zip(("dtheta", "dphi", "dg"), xs, ref_grads, low_grads,
                                         grad_scales(th, ph, g, dout)):
                assert_close_rule(x.grad, b, l, f"{name} {dtype} {precision} N={N}", 2 * floor, sc)


def _chunked_reference_rows(th, ph, g, mode, rows, chunk=4096):
    """out[:, rows] in float64 for large N without the N x N matrix (column LSE by chunks)."""
    th, ph, g = th.double(), ph.double(), g.double()
    if mode == "query":
        lse = torch.cat([torch.logsumexp(th @ ph[:, s:s + chunk].transpose(1, 2), dim=1)
                         for s in range(0, th.shape[1], chunk)], dim=1)            # (B, N) per key
        return torch.exp(th[:, rows] @ ph.transpose(1, 2) - lse[:, None, :]) @ g
    return torch.softmax(th[:, rows] @ ph.transpose(1, 2), dim=2) @ g


@needs_cuda
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_large_n_sampled_rows(mode, dtype):
    N = 100_003
    th, ph, g = make_inputs(1, N, 32, 32, dtype=dtype, scale="image", seed=21, device="cuda")
    y = nonlocal_attention(th, ph, g, softmax_over=mode, backend="triton")
    assert torch.isfinite(y).all()
    rows = torch.randint(0, N, (256,), generator=torch.Generator().manual_seed(0)).cuda()
    ref = _chunked_reference_rows(th, ph, g, mode, rows)
    err = (y[:, rows].double() - ref).abs().max().item()
    assert err <= {torch.float32: 1e-3, torch.bfloat16: 2e-2}[dtype] * ref.abs().max().item()


@needs_cuda
@pytest.mark.parametrize("mode", MODES)
def test_gpu_deterministic_bitwise(mode):
    th, ph, g = make_inputs(4, 2304, 32, 32, dtype=torch.bfloat16, seed=22, device="cuda")
    results = []
    torch.use_deterministic_algorithms(True)
    try:
        for _ in range(2):
            xs = [t.detach().requires_grad_() for t in (th, ph, g)]
            y = nonlocal_attention(*xs, softmax_over=mode, backend="triton")
            y.backward(torch.ones_like(y))
            results.append([y.detach()] + [x.grad for x in xs])
    finally:
        torch.use_deterministic_algorithms(False)
    for a, b in zip(*results):
        assert torch.equal(a, b)


@needs_cuda
@pytest.mark.parametrize("mode", MODES)
def test_gpu_cuda_graph_replay(mode):
    th, ph, g = make_inputs(2, 2304, 32, 32, dtype=torch.float16, seed=23, device="cuda")
    dout = torch.randn(2, 2304, 32, device="cuda", dtype=torch.float16)
    xs = [t.detach().requires_grad_() for t in (th, ph, g)]

    def step():
        for x in xs:
            x.grad = None
        y = nonlocal_attention(*xs, softmax_over=mode, backend="triton")
        y.backward(dout)
        return [y.detach()] + [x.grad for x in xs]

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):            # warm-up: compiles and autotunes outside the capture
            eager = [t.clone() for t in step()]
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    for x in xs:
        x.grad = None
    with torch.cuda.graph(graph):
        y = nonlocal_attention(*xs, softmax_over=mode, backend="triton")
        y.backward(dout)
    graph.replay()
    torch.cuda.synchronize()
    for a, b in zip([y] + [x.grad for x in xs], eager):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.skipif(not (CUDA and _ext.triton_available() and torch.cuda.device_count() > 1),
                    reason="needs two CUDA GPUs and Triton")
@pytest.mark.parametrize("mode", MODES)
def test_gpu_other_device(mode):
    """Tensors on cuda:1 while cuda:0 is current: the same result as on cuda:0, on cuda:1."""
    th, ph, g = make_inputs(2, 300, 32, 32, dtype=torch.bfloat16, seed=24, device="cuda:0")
    xs = [t.detach().requires_grad_() for t in (th, ph, g)]
    y = nonlocal_attention(*xs, softmax_over=mode, backend="triton")
    y.backward(torch.ones_like(y))
    assert torch.cuda.current_device() == 0
    xs1 = [t.detach().to("cuda:1").requires_grad_() for t in (th, ph, g)]
    y1 = nonlocal_attention(*xs1, softmax_over=mode, backend="triton")
    y1.backward(torch.ones_like(y1))
    torch.cuda.synchronize("cuda:1")
    assert y1.device == torch.device("cuda:1") and torch.cuda.current_device() == 0
    for a, b in zip([y] + [x.grad for x in xs], [y1] + [x.grad for x in xs1]):
        assert torch.equal(a, b.to("cuda:0"))
