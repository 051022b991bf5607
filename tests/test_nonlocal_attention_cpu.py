"""The C++ CPU kernel of non-local attention (csrc/nonlocal_attention.cpp, backend "extension").

Ground truth: the naive official formula in float64 (`reference.nonlocal_attention_naive`), output
and all three gradients. Tolerance rule (flash-attention's): our error against float64 is at most
2x PyTorch's own error computing the naive formula eagerly in the same dtype, plus a floor of a
few fp32 ulps of the result's magnitude (PyTorch's error can be ~0 on a tiny problem).
"""
import random

import pytest
import torch

import rnan_fast
from rnan_fast import _ext, reference
from rnan_fast.ops import nonlocal_attention

pytestmark = pytest.mark.skipif(not _ext.EXTENSION_ATTENTION,
                                reason=f"the extension's CPU attention kernel is not built ({_ext.EXTENSION_ERROR})")
MODES = ("query", "key")
FLOOR = 2e-6   # relative to max |reference|: ~16 fp32 ulps, for sums over up to ~1e3 terms


@pytest.fixture(autouse=True, params=["avx512", "avx2", "portable"])
def isa(request):
    """Every test runs on each inner-loop path of the kernel that this CPU has: the AVX-512
    microkernels (AVX-512F/DQ), the AVX2 gemm (AVX2 and FMA), and the MKL-tile loops of any x86-64."""
    from rnan_fast import _C

    previous = _C.cpu_attention_isa()
    try:
        _C.set_cpu_attention_isa(request.param)
    except RuntimeError as e:
        pytest.skip(f"{request.param}: {e}")
    yield request.param
    _C.set_cpu_attention_isa(previous)


def _inputs(B, N, d, dv, *, seed=0, image=False, dtype=torch.float32):
    """theta, phi (B, N, d), g (B, N, dv) in float64, cast to dtype. image=True: 1x1-conv-like
    projections of 0..255 pixels, so the unscaled scores reach ~1e4 as on real images."""
    gen = torch.Generator().manual_seed(seed)
    if image:
        C = 2 * max(d, dv, 4)
        x = torch.rand(B, N, C, generator=gen, dtype=torch.float64) * 255
        th, ph, g = (x @ (torch.randn(C, k, generator=gen, dtype=torch.float64) / C) for k in (d, d, dv))
        f = (1e4 / (th @ ph.transpose(1, 2)).abs().max()).sqrt()
        th, ph = th * f, ph * f
    else:
        th, ph, g = (torch.randn(B, N, k, generator=gen, dtype=torch.float64) for k in (d, d, dv))
    return [t.to(dtype) for t in (th, ph, g)]


def _run(fn, th, ph, g, dy):
    """(out, dtheta, dphi, dg) of fn on leaf copies of the inputs."""
    leaves = [t.detach().clone().requires_grad_() for t in (th, ph, g)]
    out = fn(*leaves)
    out.backward(dy.to(out.dtype))
    return [out.detach()] + [t.grad for t in leaves]


def _rel_err(a, ref):
    return ((a.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def _check_against_float64(th, ph, g, mode, seed=1):
    """Ours vs float64, within 2x PyTorch's own error in the inputs' dtype (+ floor)."""
    gen = torch.Generator().manual_seed(seed)
    dy = torch.randn(*g.shape, generator=gen, dtype=torch.float64)
    ref = _run(lambda a, b, c: reference.nonlocal_attention_naive(a, b, c, mode), th.double(), ph.double(), g.double(), dy)
    eager = _run(lambda a, b, c: reference.nonlocal_attention_naive(a, b, c, mode), th, ph, g, dy)
    ours = _run(lambda a, b, c: nonlocal_attention(a, b, c, softmax_over=mode, backend="extension"), th, ph, g, dy)
    for name, o, e, r in zip(("out", "dtheta", "dphi", "dg"), ours, eager, ref):
        assert o.dtype == th.dtype and o.shape == r.shape, name
        assert torch.isfinite(o).all(), name
        if r.abs().max() == 0:   # e.g. dtheta at N = 1 (a softmax over one element): exactly 0
            assert (o == 0).all(), name
            continue
        bound = 2 * _rel_err(e, r) + FLOOR
        assert _rel_err(o, r) <= bound, f"{name}: error {_rel_err(o, r):.3g} > {bound:.3g} ({th.dtype}, {mode})"


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("B,N,d,dv", [(1, 1, 3, 3), (2, 7, 8, 5), (3, 100, 12, 12), (2, 257, 33, 16),
                                      (1, 1000, 24, 24), (2, 1031, 16, 32), (1, 300, 64, 64), (2, 65, 32, 32)])
def test_matches_float64(mode, B, N, d, dv):
    _check_against_float64(*_inputs(B, N, d, dv), mode)


@pytest.mark.parametrize("mode", MODES)
def test_random_shapes(mode):
    rng = random.Random(10)   # seeded: a few shapes no list above was tuned to
    for k in range(3):
        B, N, d, dv = rng.randint(1, 3), rng.randint(1, 700), rng.randint(1, 70), rng.randint(1, 70)
        _check_against_float64(*_inputs(B, N, d, dv, seed=k), mode)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("N", [100, 1100])
def test_image_scale_scores(mode, N):
    """Scores ~1e4 (0..255 inputs): finite, and as accurate as PyTorch's fp32 (saturated softmax)."""
    _check_against_float64(*_inputs(2, N, 16, 16, image=True), mode)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("image", [False, True])
def test_bfloat16(mode, image):
    _check_against_float64(*_inputs(2, 300, 16, 24, image=image, dtype=torch.bfloat16), mode)


@pytest.mark.parametrize("mode", MODES)
def test_statistics(mode):
    """stats (2, B, N) fp32 = (max score, log2 sum exp(S - max)) per softmax: the natural LSE."""
    th, ph, g = _inputs(2, 150, 8, 8)
    out, stats = torch.ops.rnan_fast.nonlocal_attention_fwd(th, ph, g, mode)
    s = th.double() @ ph.double().transpose(1, 2)
    lse = torch.logsumexp(s, dim=1 if mode == "query" else 2)
    assert stats.shape == (2, 2, 150) and stats.dtype == torch.float32
    torch.testing.assert_close(stats[0].double(), s.amax(dim=1 if mode == "query" else 2), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(stats[0].double() + stats[1].double() * torch.log(torch.tensor(2.0)), lse,
                               rtol=1e-6, atol=1e-5)


def _views(th, ph, g):
    """Layouts the model produces or a user may pass: permuted storage, a strided slice, and the
    (B, N, C) view of a channels_last feature map."""
    B, N, d = th.shape
    permuted = [t.transpose(1, 2).contiguous().transpose(1, 2) for t in (th, ph, g)]
    sliced = [torch.stack([t, torch.full_like(t, float("nan"))], -1)[..., 0] for t in (th, ph, g)]
    cl = [t.reshape(B, 1, N, t.shape[-1]).permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last)
          .flatten(2).transpose(1, 2) for t in (th, ph, g)]
    return {"permuted": permuted, "sliced": sliced, "channels_last": cl}


@pytest.mark.parametrize("mode", MODES)
def test_views(mode):
    th, ph, g = _inputs(2, 130, 12, 12)
    dy = torch.randn(2, 130, 12, dtype=torch.float64)
    base = _run(lambda a, b, c: nonlocal_attention(a, b, c, mode, backend="extension"), th, ph, g, dy)
    for name, (a, b, c) in _views(th, ph, g).items():
        # The (B, N, C) view of a channels_last map is contiguous (no copy); the others are not.
        assert a.is_contiguous() == (name == "channels_last"), name
        got = _run(lambda x, y, z: nonlocal_attention(x, y, z, mode, backend="extension"), a, b, c, dy)
        for r, o in zip(base, got):
            assert torch.equal(r, o), name   # same values, same arithmetic: bit-identical


@pytest.mark.parametrize("mode", MODES)
def test_gradient_layout_follows_inputs(mode):
    """The backward's outputs are empty_like(input), as the fakes say (opcheck checks it too)."""
    th, ph, g = _views(*_inputs(1, 40, 8, 8))["permuted"]
    out, stats = torch.ops.rnan_fast.nonlocal_attention_fwd(th, ph, g, mode)
    grads = torch.ops.rnan_fast.nonlocal_attention_bwd(torch.randn_like(out), th, ph, g, stats, mode)
    for grad, t in zip(grads, (th, ph, g)):
        assert grad.stride() == torch.empty_like(t).stride()


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape", [(0, 5, 4, 4), (2, 0, 4, 4), (2, 5, 4, 0), (2, 5, 0, 3)])
def test_empty_and_degenerate(mode, shape):
    B, N, d, dv = shape
    th, ph, g = _inputs(B, N, d, dv)
    dy = torch.randn(B, N, dv, dtype=torch.float64)
    ours = _run(lambda a, b, c: nonlocal_attention(a, b, c, mode, backend="extension"), th, ph, g, dy)
    ref = _run(lambda a, b, c: reference.nonlocal_attention_naive(a, b, c, mode), th.double(), ph.double(), g.double(),
               dy)
    for o, r in zip(ours, ref):
        assert o.shape == r.shape
        torch.testing.assert_close(o.double(), r, rtol=1e-5, atol=1e-6)   # d = 0: uniform weights


def test_outputs_fully_written():
    """Every output element is written: freed NaN-filled memory is what the kernel's allocations
    are likely to get back from the allocator, and no NaN may survive."""
    for mode in MODES:
        th, ph, g = _inputs(2, 333, 16, 16)
        poison = torch.full((4 * 2 * 333 * 16 + 4096,), float("nan"))
        del poison
        out, stats = torch.ops.rnan_fast.nonlocal_attention_fwd(th, ph, g, mode)
        poison = torch.full((4 * 2 * 333 * 16 + 4096,), float("nan"))
        del poison
        grads = torch.ops.rnan_fast.nonlocal_attention_bwd(torch.randn_like(out), th, ph, g, stats, mode)
        for t in (out, stats, *grads):
            assert torch.isfinite(t).all()


@pytest.mark.parametrize("mode", MODES)
def test_deterministic_across_runs_and_threads(mode):
    """Promised (csrc/nonlocal_attention.cpp): bit-identical for any run and any thread count."""
    th, ph, g = _inputs(3, 777, 16, 16)
    dy = torch.randn(3, 777, 16)
    previous = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2, 2, max(previous, 1)):
            torch.set_num_threads(threads)
            out, stats = torch.ops.rnan_fast.nonlocal_attention_fwd(th, ph, g, mode)
            results.append((out, stats, *torch.ops.rnan_fast.nonlocal_attention_bwd(dy, th, ph, g, stats, mode)))
    finally:
        torch.set_num_threads(previous)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


@pytest.mark.parametrize("mode", MODES)
def test_opcheck(mode):
    th, ph, g = (t.requires_grad_() for t in _inputs(2, 70, 8, 12))
    torch.library.opcheck(torch.ops.rnan_fast.nonlocal_attention_fwd, (th, ph, g, mode))
    out, stats = torch.ops.rnan_fast.nonlocal_attention_fwd(th.detach(), ph.detach(), g.detach(), mode)
    torch.library.opcheck(torch.ops.rnan_fast.nonlocal_attention_bwd,
                          (torch.randn_like(out), th.detach(), ph.detach(), g.detach(), stats, mode))
    torch.library.opcheck(torch.ops.rnan_fast.nonlocal_attention, (th, ph, g, mode, "extension"))


@pytest.mark.parametrize("mode", MODES)
def test_compile_fullgraph(mode):
    """torch.compile(fullgraph=True) forward + backward: zero graph breaks, the same numbers."""
    torch._dynamo.reset()

    def fn(a, b, c):
        return nonlocal_attention(a, b, c, softmax_over=mode, backend="extension").square().sum()

    th, ph, g = _inputs(2, 90, 16, 16)
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    leaves = [t.clone().requires_grad_() for t in (th, ph, g)]
    compiled(*leaves).backward()
    eager = [t.clone().requires_grad_() for t in (th, ph, g)]
    fn(*eager).backward()
    for a, b in zip(leaves, eager):
        torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=0)
    explanation = torch._dynamo.explain(fn)(th, ph, g)
    assert explanation.graph_break_count == 0


def _ops_called(fn):
    with torch.autograd.profiler.profile() as prof:
        fn()
    return {e.name for e in prof.function_events}


def test_auto_dispatch_on_cpu():
    th, ph, g = (t.requires_grad_() for t in _inputs(1, 50, 8, 8))
    called = _ops_called(lambda: nonlocal_attention(th, ph, g).sum().backward())
    assert {"rnan_fast::nonlocal_attention_fwd", "rnan_fast::nonlocal_attention_bwd"} <= called
    for dtype in (torch.float64, torch.float16):   # not the kernel's: auto takes the reference
        args = [t.detach().to(dtype) for t in (th, ph, g)]
        assert "rnan_fast::nonlocal_attention_fwd" not in _ops_called(lambda: nonlocal_attention(*args))
    with rnan_fast.use_backend("reference"):
        assert "rnan_fast::nonlocal_attention_fwd" not in _ops_called(lambda: nonlocal_attention(th, ph, g))
    with rnan_fast.use_backend("fast"):
        assert "rnan_fast::nonlocal_attention_fwd" in _ops_called(lambda: nonlocal_attention(th, ph, g))
    assert rnan_fast.backend_info()["extension_attention_cpu"] is True


def test_model_default_backend_uses_kernel():
    """RNAN on the CPU with the default backend runs its non-local blocks through this kernel."""
    torch.manual_seed(0)
    net = rnan_fast.RNAN(n_colors=1, scale=1, n_feats=8, n_resgroups=3, rgb_range=255).eval()
    x = torch.rand(1, 1, 13, 11) * 255
    with torch.no_grad():
        called = _ops_called(lambda: net(x))
        with rnan_fast.use_backend("reference"):
            ref = net(x)
        out = net(x)
    assert "rnan_fast::nonlocal_attention_fwd" in called
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-3)


def test_bad_inputs():
    th, ph, g = _inputs(2, 10, 4, 4)
    ext = dict(backend="extension")
    with pytest.raises(ValueError, match="must be \\(B, N, d\\)"):
        nonlocal_attention(th[0], ph[0], g[0], **ext)
    with pytest.raises(ValueError, match="one shape"):
        nonlocal_attention(th, ph[:, :9], g, **ext)
    with pytest.raises(ValueError, match="share \\(B, N\\)"):
        nonlocal_attention(th, ph, g[:, :9], **ext)
    with pytest.raises(TypeError, match="dtypes differ"):
        nonlocal_attention(th, ph.double(), g, **ext)
    for dtype in (torch.float64, torch.float16):
        with pytest.raises(TypeError, match="float32 or bfloat16"):
            nonlocal_attention(th.to(dtype), ph.to(dtype), g.to(dtype), **ext)
    with pytest.raises(RuntimeError, match="runs on CPU tensors"):
        nonlocal_attention(*(t.to("meta") for t in (th, ph, g)), **ext)
    with pytest.raises(ValueError, match="softmax_over"):
        nonlocal_attention(th, ph, g, softmax_over="rows", **ext)
    # The raw ops check their arguments themselves.
    fwd, bwd = torch.ops.rnan_fast.nonlocal_attention_fwd, torch.ops.rnan_fast.nonlocal_attention_bwd
    with pytest.raises(RuntimeError, match="unsupported dtype"):
        fwd(th.double(), ph.double(), g.double(), "query")
    with pytest.raises(RuntimeError, match="must be \\(B, N, d\\)"):
        fwd(th[0], ph[0], g[0], "query")
    with pytest.raises(RuntimeError, match="softmax_over"):
        fwd(th, ph, g, "rows")
    out, stats = fwd(th, ph, g, "query")
    with pytest.raises(RuntimeError, match="stats must be"):
        bwd(out, th, ph, g, stats[0], "query")
    with pytest.raises(RuntimeError, match="must match g"):
        bwd(out[:, :5], th, ph, g, stats, "query")


def test_column_backward_without_partials():
    """Above 64 MiB of per-key-block partial sums (k_blocks x B x N x d fp32) the column backward
    computes dTheta by a query-major pass instead: 33 x 8200 x 64 x 4 B = 66 MiB here (the
    smallest kind of problem that takes that path; ~15 s, nearly all in the naive references)."""
    _check_against_float64(*_inputs(1, 8200, 64, 1), "query")


def test_isa_switch(isa):
    """The process-wide switch names the path in use, rejects unknown names, and is reported."""
    from rnan_fast import _C

    assert _C.cpu_attention_isa() == isa == rnan_fast.backend_info()["extension_attention_isa"]
    with pytest.raises(RuntimeError, match="expected 'avx512', 'avx2' or 'portable'"):
        _C.set_cpu_attention_isa("sse")
    assert _C.cpu_attention_isa() == isa


@pytest.mark.parametrize("mode", MODES)
def test_key_blocks_at_cache_strides(mode):
    """N a multiple of 1024 with several key blocks (the packed phi^T layout of the AVX-512 path)
    and a tail of one key and one query past a register block."""
    for N in (2048, 1024 + 256 + 33):
        _check_against_float64(*_inputs(1, N, 32, 32, seed=N), mode)
