"""The fused gate h = x + sigmoid(mask_logits) * trunk: the C++/CUDA extension against the reference.

CPU tests run everywhere the extension is built (CI builds it); the GPU tests at the end run
only where CUDA is available and the extension was compiled with its CUDA kernels.
Tolerances: float64 and float32 to rounding; float16 / bfloat16 by the rule "the kernel's error
against a float64 reference is at most twice that of PyTorch computing in the same precision".
"""
from __future__ import annotations

import importlib.util
import math
import os
import sys
import time
from pathlib import Path

import pytest
import torch

import rnan_fast
from rnan_fast import _backend, _ext, reference
from rnan_fast.ops import gated_residual

REPO = Path(__file__).resolve().parents[1]
gr_module = sys.modules["rnan_fast.ops.gated_residual"]
fwd_op = torch.ops.rnan_fast.gated_residual_fwd if _ext.EXTENSION else None
bwd_op = torch.ops.rnan_fast.gated_residual_bwd if _ext.EXTENSION else None

needs_ext = pytest.mark.skipif(not _ext.EXTENSION, reason=f"extension not built: {_ext.EXTENSION_ERROR}")
needs_cuda = pytest.mark.skipif(not (torch.cuda.is_available() and _ext.EXTENSION_CUDA),
                                reason="needs a CUDA GPU and the extension compiled with CUDA")
pytestmark = needs_ext

LOW = (torch.float16, torch.bfloat16)
ALL_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
ODD_SHAPES = [(3, 5, 7, 9), (1,), (13,), (2, 3, 4, 17), (1, 7, 1, 33), (2, 64, 48, 48)]


def rand(shape, dtype=torch.float32, device="cpu", scale=3.0, seed=None):
    gen = None
    if seed is not None:
        gen = torch.Generator(device=device).manual_seed(seed)
    return (torch.randn(shape, generator=gen, device=device, dtype=torch.float32) * scale).to(dtype)


def inputs(shape, dtype=torch.float32, device="cpu", seed=0):
    return tuple(rand(shape, dtype, device, seed=seed + i) for i in range(3))


def ref_fwd64(x, m, t):
    return reference.gated_residual(x.double(), m.double(), t.double())


def ref_bwd64(g, m, t):
    return reference.gated_residual_backward(g.double(), m.double(), t.double())


def eager_lowp(x, m, t, g):
    """PyTorch's own result in the inputs' precision: forward and autograd backward."""
    m_, t_ = m.clone().requires_grad_(), t.clone().requires_grad_()
    out = x + torch.sigmoid(m_) * t_
    gm, gt = torch.autograd.grad(out, (m_, t_), g)
    return out.detach(), gm, gt


def assert_close_to(actual, expected64, dtype, baseline=None, what=""):
    """actual vs a float64 expectation; in half precision, within 2x PyTorch's own error."""
    if dtype == torch.float64:
        torch.testing.assert_close(actual, expected64.to(dtype), rtol=1e-12, atol=1e-12, msg=what)
    elif dtype == torch.float32:
        torch.testing.assert_close(actual, expected64.to(dtype), rtol=1e-5, atol=1e-5, msg=what)
    else:
        assert actual.dtype == dtype
        err = (actual.double() - expected64).abs().max().item() if actual.numel() else 0.0
        base = (baseline.double() - expected64).abs().max().item() if actual.numel() else 0.0
        assert err <= 2 * base + 1e-6, f"{what}: error {err:.3g} > 2 x PyTorch's {base:.3g} in {dtype}"


def check_against_reference(x, m, t, g, what=""):
    dtype = x.dtype
    out = fwd_op(x, m, t)
    gm, gt = bwd_op(g, m, t)
    lowp = eager_lowp(x, m, t, g) if dtype in LOW else (None, None, None)
    assert out.shape == x.shape and gm.shape == m.shape and gt.shape == t.shape
    assert out.dtype == gm.dtype == gt.dtype == dtype
    assert_close_to(out, ref_fwd64(x, m, t), dtype, lowp[0], f"forward {what}")
    rm, rt = ref_bwd64(g, m, t)
    assert_close_to(gm, rm, dtype, lowp[1], f"grad_mask_logits {what}")
    assert_close_to(gt, rt, dtype, lowp[2], f"grad_trunk {what}")
    return out, gm, gt


# ---- build and dispatch ------------------------------------------------------------------------

def load_setup(monkeypatch):
    """(setup.py as a module, the keyword arguments it passed to setuptools.setup), imported with
    setuptools.setup recorded instead of run; torch's CUDA_HOME and the arch list are restored after."""
    import setuptools
    from torch.utils import cpp_extension

    calls = []
    monkeypatch.setattr(setuptools, "setup", lambda **kwargs: calls.append(kwargs))
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", cpp_extension.CUDA_HOME)
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", os.environ.get("TORCH_CUDA_ARCH_LIST", "9.0"))
    monkeypatch.chdir(REPO)                      # setup.py globs csrc/ from the working directory
    spec = importlib.util.spec_from_file_location("rnan_fast_setup", REPO / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module, calls[0]


def test_backend_info_reports_extension(monkeypatch):
    info = rnan_fast.backend_info()
    assert info["extension"] is True and info["extension_error"] is None
    setup, _ = load_setup(monkeypatch)
    if setup.cuda_home():
        assert info["extension_cuda"] is True, (f"a CUDA toolkit is here ({setup.cuda_home()}): the install "
                                                "should compile the CUDA kernels")


def _fake_toolkit(root: Path, headers: bool = True) -> Path:
    (root / "bin").mkdir(parents=True)
    nvcc = root / "bin" / "nvcc"
    nvcc.write_text("#!/bin/sh\nexit 0\n")
    nvcc.chmod(0o755)
    if headers:
        (root / "include").mkdir()
        (root / "include" / "cuda_runtime.h").write_text("")
    return root


def test_setup_finds_cuda_like_torch_and_decides_without_a_gpu(monkeypatch, tmp_path):
    """setup.py takes the toolkit torch.utils.cpp_extension finds (here: the only nvcc on PATH, no
    CUDA_HOME), builds the CUDA kernels whenever torch.version.cuda is set whether or not a GPU is
    visible, and not at all for a CPU build of torch, with RNAN_FAST_NO_CUDA=1, or when an explicit
    CUDA_HOME is no toolkit."""
    from torch.utils import cpp_extension

    toolkit = _fake_toolkit(tmp_path / "toolkit")
    wrapper = _fake_toolkit(tmp_path / "wrapper", headers=False)      # an nvcc script, no headers
    for name in ("CUDA_HOME", "CUDA_PATH", "RNAN_FAST_NO_CUDA"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("PATH", f"{toolkit / 'bin'}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    # What torch itself concludes in this environment (it decides once, at import: recompute it).
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", cpp_extension._find_cuda_home())
    assert cpp_extension.CUDA_HOME == str(toolkit)
    setup, kwargs = load_setup(monkeypatch)
    assert setup.cuda_home() == str(toolkit)
    (ext,) = kwargs["ext_modules"]
    assert any(src.endswith(".cu") for src in ext.sources) and cpp_extension.CUDA_HOME == str(toolkit)
    for visible in (True, False):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: visible)
        assert setup.cuda_home() == str(toolkit)
    monkeypatch.setenv("RNAN_FAST_NO_CUDA", "1")
    assert setup.cuda_home() is None
    monkeypatch.delenv("RNAN_FAST_NO_CUDA")
    monkeypatch.setattr(torch.version, "cuda", None)
    assert setup.cuda_home() is None
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setenv("CUDA_HOME", str(wrapper))
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", cpp_extension._find_cuda_home())
    assert setup.cuda_home() is None
    _, kwargs = load_setup(monkeypatch)
    assert not any(src.endswith(".cu") for src in kwargs["ext_modules"][0].sources)


@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_auto_uses_extension_on_cpu(dtype):
    x = torch.zeros(2, 3, dtype=dtype)
    why = lambda explicit: gr_module._extension_why_not(x, explicit)  # noqa: E731
    assert _backend.resolve("gated_residual", None, "extension", why) == "extension"
    assert _backend.resolve("gated_residual", "auto", "extension", why) == "extension"
    with rnan_fast.use_backend("reference"):
        assert _backend.resolve("gated_residual", None, "extension", why) == "reference"
    with rnan_fast.use_backend("fast"):
        assert _backend.resolve("gated_residual", None, "extension", why) == "extension"


def test_auto_falls_back_for_dtypes_the_extension_lacks():
    x = torch.arange(6).reshape(2, 3)
    why = lambda explicit: gr_module._extension_why_not(x, explicit)  # noqa: E731
    assert _backend.resolve("gated_residual", "auto", "extension", why) == "reference"
    with pytest.raises(RuntimeError, match="float32, float16, bfloat16 or float64"):
        gated_residual(x, x, x, backend="extension")


# ---- values ------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("shape", ODD_SHAPES)
def test_extension_matches_reference(shape, dtype):
    x, m, t = inputs(shape, dtype)
    g = rand(shape, dtype, seed=10)
    check_against_reference(x, m, t, g, f"{shape} {dtype}")


@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_public_op_forward_backward(dtype):
    x, m, t = (a.requires_grad_() for a in inputs((2, 8, 5, 7), dtype))
    g = rand(x.shape, dtype, seed=5)
    out = gated_residual(x, m, t, backend="extension")
    out.backward(g)
    base = eager_lowp(x.detach(), m.detach(), t.detach(), g)
    assert_close_to(out.detach(), ref_fwd64(x, m, t), dtype, base[0])
    assert torch.equal(x.grad, g)  # grad_x is the incoming gradient
    rm, rt = ref_bwd64(g, m.detach(), t.detach())
    assert_close_to(m.grad, rm, dtype, base[1] if dtype in LOW else None)
    assert_close_to(t.grad, rt, dtype, base[2] if dtype in LOW else None)


def test_extreme_logits_and_nan():
    m = torch.tensor([float("nan"), float("inf"), -float("inf"), 100.0, -100.0, 88.5, -88.5, 0.0, 20.0, -20.0])
    x, t = torch.zeros_like(m), torch.ones_like(m)
    out = fwd_op(x, m, t)
    expected = torch.sigmoid(m.double())
    assert math.isnan(out[0].item())
    torch.testing.assert_close(out[1:], expected[1:].float(), rtol=1e-6, atol=1e-37)
    gm, gt = bwd_op(torch.ones_like(m), m, t)
    rm, rt = ref_bwd64(torch.ones_like(m), m, t)
    assert math.isnan(gm[0].item()) and math.isnan(gt[0].item())
    torch.testing.assert_close(gm[1:], rm[1:].float(), rtol=1e-5, atol=1e-37)
    torch.testing.assert_close(gt[1:], rt[1:].float(), rtol=1e-6, atol=1e-37)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=needs_cuda)])
def test_sigmoid_accurate_at_extreme_logits(device):
    """s = sigmoid(v) (forward with x = 0, t = 1), s (1 - s) and s (backward with g = t = 1) within
    6e-7 relative (5 ulp) of float64 for every v in [-87, 87] (beyond, s or 1 - s leaves fp32's
    normal range). CUDA's __expf intrinsic (ex2.approx of v log2 e) fails this from |v| ~ 20 on:
    rounding v log2 e alone costs up to 3.8e-6 at |v| = 87; expf (2 ulp) passes."""
    gen = torch.Generator().manual_seed(0)
    v = torch.linspace(-87, 87, 1_000_001) + (torch.rand(1_000_001, generator=gen) - 0.5) * 1e-3
    v = v.clamp(-87, 87).to(device)
    one = torch.ones_like(v)
    s = fwd_op(torch.zeros_like(v), v, one)
    gm, gt = bwd_op(one, v, one)
    s64 = torch.sigmoid(v.double())
    for name, ours, exact in (("s", s, s64), ("s (1 - s)", gm, s64 * torch.sigmoid(-v.double())), ("grad_trunk", gt, s64)):
        rel = ((ours.double() - exact) / exact).abs()
        worst = rel.argmax()
        assert rel.max().item() <= 6e-7, f"{device} {name}: relative error {rel.max().item():.2e} at v = {v[worst].item()}"


@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_every_output_element_written(dtype):
    """Freshly allocated outputs may reuse freed memory: poison it first, then check all values."""
    shape = (3, 17, 19, 23)  # 22287 elements: several parallel chunks, none a multiple of 16
    for _ in range(3):
        poison = torch.full(shape, float("nan"), dtype=dtype)
        del poison
        x, m, t = inputs(shape, dtype, seed=3)
        out = fwd_op(x, m, t)
        poison = [torch.full(shape, float("nan"), dtype=dtype) for _ in range(2)]
        del poison
        gm, gt = bwd_op(x, m, t)
        for name, a in (("out", out), ("grad_mask_logits", gm), ("grad_trunk", gt)):
            assert not a.isnan().any(), f"{name} has unwritten (NaN) elements"
        check_against_reference(x, m, t, x, "poisoned")


# ---- gradients and registration ----------------------------------------------------------------

def test_gradcheck_float64():
    args = tuple(a.double().requires_grad_() for a in inputs((2, 3, 4, 5), seed=1))
    assert torch.autograd.gradcheck(lambda a, b, c: gated_residual(a, b, c, backend="extension"), args)
    assert torch.autograd.gradcheck(fwd_op, args)  # the C++ op has its own autograd registration
    cl = tuple(a.detach().to(memory_format=torch.channels_last).requires_grad_() for a in args)
    assert torch.autograd.gradcheck(lambda a, b, c: gated_residual(a, b, c, backend="extension"), cl)


def _opcheck_samples(dtype=torch.float32):
    base = inputs((2, 3, 4, 5), dtype, seed=7)
    cl = tuple(a.to(memory_format=torch.channels_last) for a in base)
    mixed = (rand((2, 4, 3, 5), dtype, seed=8).transpose(1, 2), cl[1], base[2])
    return [base, cl, mixed, inputs((0, 3), dtype), inputs((13,), dtype)]


@pytest.mark.parametrize("backend", ["extension", "reference"])
def test_opcheck_public_ops(backend):
    for sample in _opcheck_samples():
        grad_args = tuple(a.clone().requires_grad_() for a in sample)
        torch.library.opcheck(torch.ops.rnan_fast.gated_residual.default, (*grad_args, backend))
        torch.library.opcheck(torch.ops.rnan_fast.gated_residual_backward.default, (*sample, backend))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_opcheck_cpp_ops(dtype):
    for sample in _opcheck_samples(dtype):
        grad_args = tuple(a.clone().requires_grad_() for a in sample)
        torch.library.opcheck(fwd_op.default, grad_args)
        torch.library.opcheck(fwd_op.default, sample)
        torch.library.opcheck(bwd_op.default, sample)


# ---- layouts -----------------------------------------------------------------------------------

def _copies_in(fn) -> list[str]:
    """Names of copying ATen ops that fn runs (nothing but the kernel and its allocation expected)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    names = {e.name for e in prof.events()}
    return sorted(n for n in names if n in ("aten::copy_", "aten::contiguous", "aten::clone", "aten::to", "aten::_to_copy"))


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("shape", [(2, 16, 9, 11), (3, 5, 7, 9), (1, 3, 1, 1)])
def test_channels_last_in_place_layout(shape, dtype):
    x, m, t = inputs(shape, dtype)
    g = rand(shape, dtype, seed=9)
    xc, mc, tc, gc = (a.contiguous(memory_format=torch.channels_last) for a in (x, m, t, g))
    out, gm, gt = check_against_reference(xc, mc, tc, gc, "channels_last")
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert gm.is_contiguous(memory_format=torch.channels_last) and gt.is_contiguous(memory_format=torch.channels_last)
    assert out.stride() == xc.stride() and gm.stride() == mc.stride() and gt.stride() == tc.stride()
    # Elementwise and the same math per element: bitwise the contiguous result, and no copy made.
    assert torch.equal(out, fwd_op(x, m, t))
    gm0, gt0 = bwd_op(g, m, t)
    assert torch.equal(gm, gm0) and torch.equal(gt, gt0)
    assert _copies_in(lambda: fwd_op(xc, mc, tc)) == []
    assert _copies_in(lambda: bwd_op(gc, mc, tc)) == []


def test_public_op_keeps_channels_last_without_copies():
    x, m, t = (a.contiguous(memory_format=torch.channels_last).requires_grad_() for a in inputs((2, 8, 6, 5)))
    out = gated_residual(x, m, t, backend="extension")
    assert out.is_contiguous(memory_format=torch.channels_last)
    g = torch.randn_like(out)
    out.backward(g)
    assert m.grad.is_contiguous(memory_format=torch.channels_last)
    assert t.grad.is_contiguous(memory_format=torch.channels_last)
    assert _copies_in(lambda: gated_residual(x.detach(), m.detach(), t.detach(), backend="extension")) == []


def _transposed(a):
    """Same values, W-major strides."""
    return a.transpose(2, 3).contiguous().transpose(2, 3)


def _sliced(a, seed=0):
    """Same values in a view with gaps: each row of W is followed by W other (random) values."""
    return torch.cat([a, rand(a.shape, a.dtype, a.device, seed=seed)], dim=3)[..., :a.shape[3]]


def _unaligned(a):
    """Same values at a storage offset of one element (the scalar, V = 1, kernel path)."""
    return torch.cat([rand((1,), a.dtype, a.device, seed=99), a.reshape(-1)])[1:].view(a.shape)


def _views(shape=(2, 6, 5, 7), dtype=torch.float32, device="cpu"):
    """(name, x, m, t, g) with awkward layouts; the kernels must give the reference values."""
    x, m, t = inputs(shape, dtype, device)
    g = rand(shape, dtype, device, seed=4)
    return [
        ("all transposed (same strides)", _transposed(x), _transposed(m), _transposed(t), _transposed(g)),
        ("x transposed, others contiguous", _transposed(x), m, t, g),
        ("m transposed", x, _transposed(m), t, g),
        ("t channels_last, others contiguous", x, m, t.contiguous(memory_format=torch.channels_last), g),
        ("sliced with gaps", _sliced(x, 20), _sliced(m, 21), _sliced(t, 22), _sliced(g, 23)),
        ("x sliced", _sliced(x, 24), m, t, g),
        ("offset by one element (unaligned)", _unaligned(x), _unaligned(m), _unaligned(t), _unaligned(g)),
        ("expanded grad", x, m, t, g[:1].expand(shape)),
        ("transposed trunk and grad", x, m, _transposed(t), _transposed(g)),
        ("permuted view", x.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2), m, t, g),
    ]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_non_contiguous_inputs(dtype):
    for name, x, m, t, g in _views(dtype=dtype):
        out, gm, gt = check_against_reference(x, m, t, g, name)
        # The output layouts follow x (forward) and mask_logits / trunk (backward): empty_like.
        assert out.stride() == torch.empty_like(x).stride(), name
        assert gm.stride() == torch.empty_like(m).stride(), name
        assert gt.stride() == torch.empty_like(t).stride(), name


def test_same_stride_views_are_not_copied():
    _, x, m, t, g = _views()[0]
    assert _copies_in(lambda: fwd_op(x, m, t)) == []
    assert _copies_in(lambda: bwd_op(g, m, t)) == []
    _, x, m, t, g = _views()[1]
    assert _copies_in(lambda: fwd_op(x, m, t)) != []  # the documented fallback: m, t copied into x's layout


# ---- errors and empty tensors ------------------------------------------------------------------

def test_cpp_error_messages():
    x = torch.randn(2, 3, 4)
    with pytest.raises(RuntimeError, match=r"gated_residual_fwd: shapes differ: x has shape \[2, 3, 4\] but "
                                           r"mask_logits has shape \[2, 3, 5\]"):
        fwd_op(x, torch.randn(2, 3, 5), x)
    with pytest.raises(RuntimeError, match=r"shapes differ: x has shape \[2, 3, 4\] but trunk has shape \[24\]"):
        fwd_op(x, x, torch.randn(24))
    with pytest.raises(RuntimeError, match=r"gated_residual_fwd: dtypes differ: x is Float but mask_logits is Double"):
        fwd_op(x, x.double(), x)
    with pytest.raises(RuntimeError, match=r"gated_residual_bwd: dtypes differ: grad is Float but trunk is BFloat16"):
        bwd_op(x, x, x.bfloat16())
    with pytest.raises(RuntimeError, match=r"gated_residual_bwd: shapes differ: grad has shape \[2, 3, 4\] but "
                                           r"mask_logits has shape \[3, 4\]"):
        bwd_op(x, x[0], x[0])
    with pytest.raises(RuntimeError, match=r"unsupported dtype Int \(expected float32, float16, bfloat16 or float64\)"):
        fwd_op(x.int(), x.int(), x.int())
    # A meta tensor beside CPU ones dispatches to the fake, which checks with the same words.
    with pytest.raises(RuntimeError, match=r"gated_residual_fwd: devices differ: x is on cpu but mask_logits is on meta"):
        fwd_op(x, x.to("meta"), x)


def test_public_error_messages():
    x = torch.randn(2, 3, 4)
    with pytest.raises(ValueError, match=r"shapes differ \(x \(2, 3, 4\), mask_logits \(2, 3, 5\)"):
        gated_residual(x, torch.randn(2, 3, 5), x, backend="extension")
    with pytest.raises(TypeError, match=r"dtypes differ \(x torch.float32, mask_logits torch.float32, trunk torch.float16\)"):
        gated_residual(x, x, x.half(), backend="extension")
    with pytest.raises(ValueError, match=r"devices differ \(x cpu, mask_logits meta"):
        gated_residual(x, x.to("meta"), x, backend="extension")
    with pytest.raises(TypeError, match="trunk must be a torch.Tensor"):
        gated_residual(x, x, 1.0)
    with pytest.raises(ValueError, match="unknown backend 'cuda'"):
        gated_residual(x, x, x, backend="cuda")


@pytest.mark.parametrize("shape, channels_last", [((0,), False), ((2, 0, 3, 3), False), ((0, 4, 5, 6), False),
                                                   ((2, 0, 3, 3), True), ((0, 4, 5, 6), True)])
def test_empty_tensors(shape, channels_last):
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x, m, t = (torch.randn(shape).contiguous(memory_format=fmt) for _ in range(3))
    out = fwd_op(x, m, t)
    gm, gt = bwd_op(x, m, t)
    assert out.shape == gm.shape == gt.shape == torch.Size(shape)
    assert out.stride() == x.stride()
    xr, mr, tr = (a.clone().requires_grad_() for a in (x, m, t))
    out = gated_residual(xr, mr, tr, backend="extension")
    out.sum().backward()
    assert mr.grad.shape == torch.Size(shape) and tr.grad.shape == torch.Size(shape)


# ---- torch.compile -----------------------------------------------------------------------------

def _compiled_step(backend, compile_backend, dynamic=False, shape=(2, 4, 6, 5), channels_last=False):
    torch._dynamo.reset()
    from torch._dynamo.testing import CompileCounterWithBackend

    counter = CompileCounterWithBackend(compile_backend)

    def step(x, m, t):
        return gated_residual(x, m, t, backend=backend) * 2.0

    compiled = torch.compile(step, backend=counter, fullgraph=True, dynamic=dynamic)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    leaves = [a.contiguous(memory_format=fmt).requires_grad_() for a in inputs(shape, seed=11)]
    out = compiled(*leaves)
    g = rand(shape, seed=12)
    out.backward(g)
    expected = [a.detach().clone().requires_grad_() for a in leaves]
    ref = step(*expected)
    ref.backward(g)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for a, b in zip(leaves, expected):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-5)
    assert counter.frame_count == 1, "one graph, no graph breaks"
    return out


@pytest.mark.parametrize("backend", ["extension", "reference", None])
def test_compile_fullgraph_aot_eager(backend):
    _compiled_step(backend, "aot_eager")


def test_compile_dynamic_channels_last_aot_eager():
    out = _compiled_step("extension", "aot_eager", dynamic=True, channels_last=True)
    assert out.is_contiguous(memory_format=torch.channels_last)


def test_compile_cpp_ops_directly():
    torch._dynamo.reset()

    @torch.compile(backend="aot_eager", fullgraph=True)
    def f(x, m, t, g):
        return fwd_op(x, m, t), bwd_op(g, m, t)

    x, m, t = inputs((3, 5, 7, 9))
    out, (gm, gt) = f(x, m, t, x)
    torch.testing.assert_close(out, fwd_op(x, m, t))
    torch.testing.assert_close(gm, bwd_op(x, m, t)[0])
    torch.testing.assert_close(gt, bwd_op(x, m, t)[1])


def test_compile_inductor_small():
    start = time.perf_counter()
    _compiled_step("extension", "inductor")
    elapsed = time.perf_counter() - start
    assert elapsed < 120, f"inductor run took {elapsed:.0f} s"


# ---- GPU ---------------------------------------------------------------------------------------

GPU_LAYOUTS = ("contiguous", "channels_last", "transposed", "unaligned", "sliced", "mixed")


def _gpu_layout(a: torch.Tensor, layout: str) -> torch.Tensor:
    if layout == "contiguous":
        return a.contiguous()
    if layout == "channels_last":
        return a.contiguous(memory_format=torch.channels_last)
    if layout == "transposed":
        return _transposed(a)
    if layout == "unaligned":
        return _unaligned(a)
    if layout == "sliced":
        return _sliced(a)
    raise ValueError(layout)


@needs_cuda
@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("layout", GPU_LAYOUTS)
@pytest.mark.parametrize("shape", [(3, 5, 7, 9), (2, 64, 48, 48), (1, 3, 1, 1), (2, 7, 13, 3)])
def test_cuda_matches_reference(shape, layout, dtype):
    x, m, t = inputs(shape, dtype, "cuda", seed=2)
    g = rand(shape, dtype, "cuda", seed=6)
    if layout == "mixed":
        x, g = _gpu_layout(x, "channels_last"), _gpu_layout(g, "transposed")
    else:
        x, m, t, g = (_gpu_layout(a, layout) for a in (x, m, t, g))
    out, gm, gt = check_against_reference(x, m, t, g, f"cuda {layout} {shape}")
    assert out.stride() == torch.empty_like(x).stride()
    assert gm.stride() == torch.empty_like(m).stride() and gt.stride() == torch.empty_like(t).stride()
    # The same vector kernel runs whatever the layout (only "unaligned" takes the V = 1 variant):
    # bitwise the contiguous result.
    if layout != "unaligned":
        assert torch.equal(out.contiguous(), fwd_op(x.contiguous(), m.contiguous(), t.contiguous()))


@needs_cuda
@pytest.mark.parametrize("n", [1, 3, 7, 8, 9, 15, 16, 17, 1023, 4097, 1 << 20, (1 << 20) + 5])
@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_cuda_vector_tails(n, dtype):
    x, m, t = inputs((n,), dtype, "cuda", seed=n)
    check_against_reference(x, m, t, x.flip(0), f"n={n}")


@needs_cuda
@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_cuda_every_output_element_written(dtype):
    shape = (4, 33, 47, 29)
    for _ in range(2):
        poison = [torch.full(shape, float("nan"), dtype=dtype, device="cuda") for _ in range(3)]
        del poison  # the caching allocator hands these blocks to the outputs below
        x, m, t = inputs(shape, dtype, "cuda", seed=1)
        out = fwd_op(x, m, t)
        gm, gt = bwd_op(t, m, x)
        for a in (out, gm, gt):
            assert not a.isnan().any()
        check_against_reference(x, m, t, t, "poisoned cuda")


@needs_cuda
def test_cuda_gradcheck_and_opcheck():
    args = tuple(a.double().requires_grad_() for a in inputs((2, 3, 4, 5), device="cuda", seed=1))
    assert torch.autograd.gradcheck(lambda a, b, c: gated_residual(a, b, c, backend="extension"), args)
    for sample in [inputs((2, 3, 4, 5), device="cuda"), tuple(_gpu_layout(a, "channels_last") for a in inputs((2, 3, 4, 5), device="cuda"))]:
        torch.library.opcheck(fwd_op.default, tuple(a.clone().requires_grad_() for a in sample))
        torch.library.opcheck(bwd_op.default, sample)
        torch.library.opcheck(torch.ops.rnan_fast.gated_residual.default, (*sample, "extension"))


@needs_cuda
def test_cuda_auto_uses_extension_and_errors():
    x = torch.zeros(2, 3, device="cuda")
    why = lambda explicit: gr_module._extension_why_not(x, explicit)  # noqa: E731
    assert _backend.resolve("gated_residual", None, "extension", why) == "extension"
    with pytest.raises(RuntimeError, match=r"gated_residual_fwd: devices differ: x is on cuda:0 but mask_logits is on cpu"):
        fwd_op(x, x.cpu(), x)
    with pytest.raises(RuntimeError, match=r"gated_residual_bwd: devices differ: grad is on cpu but mask_logits is on cuda:0"):
        bwd_op(x.cpu(), x, x)
    e = torch.empty(0, 3, device="cuda")
    assert fwd_op(e, e, e).shape == (0, 3)


@needs_cuda
def test_cuda_side_stream_and_other_device():
    x, m, t = inputs((4, 64, 33, 35), device="cuda", seed=3)
    expected = fwd_op(x, m, t)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        out = fwd_op(x, m, t)
    torch.cuda.current_stream().wait_stream(stream)
    assert torch.equal(out, expected)
    if torch.cuda.device_count() > 1:  # CUDAGuard: tensors on cuda:1 while cuda:0 is current
        x1, m1, t1 = (a.to("cuda:1") for a in (x, m, t))
        out1 = fwd_op(x1, m1, t1)
        assert out1.device == torch.device("cuda:1")
        assert torch.equal(out1.cpu(), expected.cpu())


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_cuda_large_tensor_64bit_indexing(dtype):
    """More than 2^31 elements (fp16: 4 GiB a tensor), so 32-bit element indices would overflow."""
    n = (1 << 31) + 37 if dtype == torch.float16 else (1 << 28) + 37  # fp32: > 2^26 elements, > 2^30 bytes
    need = 9 * n * torch.finfo(dtype).bits // 8  # x, m, t, out, grad_m, grad_t and slack
    torch.cuda.empty_cache()  # blocks cached by earlier tests count as used in mem_get_info
    if torch.cuda.mem_get_info()[0] < need:
        pytest.skip(f"needs {need / 2**30:.1f} GiB of free GPU memory")
    gen = torch.Generator(device="cuda").manual_seed(0)
    x, m, t = (torch.randn(n, device="cuda", dtype=dtype, generator=gen) for _ in range(3))
    out = fwd_op(x, m, t)
    gm, gt = bwd_op(x, m, t)
    torch.cuda.synchronize()
    windows = [slice(0, 4096), slice((1 << 30) - 2048, (1 << 30) + 2048), slice(n - 3 * 4096, n)]
    if n > (1 << 31):
        windows.append(slice((1 << 31) - 2048, (1 << 31) + 2048))
    # Probe random positions everywhere, plus windows at the ends and the 2^30 / 2^31 boundaries.
    probe = torch.randint(0, n, (1 << 20,), device="cuda", generator=gen)
    for idx in [probe] + [torch.arange(w.start, w.stop, device="cuda") for w in windows]:
        xs, ms, ts = x[idx], m[idx], t[idx]
        lowp = eager_lowp(xs, ms, ts, xs) if dtype in LOW else (None, None, None)
        assert_close_to(out[idx], ref_fwd64(xs, ms, ts), dtype, lowp[0], "large forward")
        rm, rt = ref_bwd64(xs, ms, ts)
        assert_close_to(gm[idx], rm, dtype, lowp[1], "large grad_mask_logits")
        assert_close_to(gt[idx], rt, dtype, lowp[2], "large grad_trunk")
    del x, m, t, out, gm, gt
    torch.cuda.empty_cache()


@needs_cuda
def test_cuda_compile_fullgraph():
    torch._dynamo.reset()
    leaves = [a.requires_grad_() for a in inputs((2, 16, 12, 10), device="cuda")]

    @torch.compile(backend="aot_eager", fullgraph=True)
    def step(x, m, t):
        return gated_residual(x, m, t, backend="extension")

    out = step(*leaves)
    out.sum().backward()
    torch.testing.assert_close(out.detach(), ref_fwd64(*(a.detach() for a in leaves)).float(), rtol=1e-5, atol=1e-5)
    assert all(a.grad is not None for a in leaves)
