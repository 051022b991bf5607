"""The backend switch: set_backend, use_backend, RNAN_FAST_BACKEND, backend_info, op-level backend=."""
import os
import subprocess
import sys

import pytest
import torch

import rnan_fast
from rnan_fast import _backend, _ext, reference


def test_default_is_auto_and_set_get():
    assert rnan_fast.get_backend() == "auto"
    rnan_fast.set_backend("reference")
    assert rnan_fast.get_backend() == "reference"
    with pytest.raises(ValueError, match="unknown backend 'turbo'"):
        rnan_fast.set_backend("turbo")
    assert rnan_fast.get_backend() == "reference"


def test_use_backend_is_scoped_and_restores_on_error():
    with rnan_fast.use_backend("fast"):
        assert rnan_fast.get_backend() == "fast"
        with rnan_fast.use_backend("reference"):
            assert rnan_fast.get_backend() == "reference"
        assert rnan_fast.get_backend() == "fast"
    assert rnan_fast.get_backend() == "auto"
    with pytest.raises(KeyError):
        with rnan_fast.use_backend("reference"):
            raise KeyError("boom")
    assert rnan_fast.get_backend() == "auto"


@pytest.mark.parametrize("value, expected", [("reference", "reference"), (" FAST ", "fast")])
def test_environment_variable(value, expected):
    env = dict(os.environ, RNAN_FAST_BACKEND=value)
    out = subprocess.run([sys.executable, "-c", "import rnan_fast; print(rnan_fast.get_backend())"],
                         env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == expected


def test_environment_variable_rejects_unknown_names():
    env = dict(os.environ, RNAN_FAST_BACKEND="gpu")
    # the package's names load on first use (rnan_fast/__init__.py): the first use refuses it
    out = subprocess.run([sys.executable, "-c", "import rnan_fast; rnan_fast.get_backend()"], env=env,
                         capture_output=True, text=True)
    assert out.returncode != 0
    assert "RNAN_FAST_BACKEND" in out.stderr and "'gpu'" in out.stderr


def test_backend_info_keys_and_types():
    info = rnan_fast.backend_info()
    for key in ("extension", "extension_cuda", "triton", "cuda"):
        assert isinstance(info[key], bool), key
    assert info["torch"] == torch.__version__
    assert info["backend"] == "auto"
    if not info["extension"]:
        assert info["extension_error"]


def _why(reason):
    return lambda explicit: reason


@pytest.mark.parametrize("glob, requested, usable, expected", [
    ("auto", None, True, "triton"),
    ("auto", None, False, "reference"),
    ("reference", None, True, "reference"),
    ("fast", None, True, "triton"),
    ("auto", "reference", True, "reference"),
    ("reference", "auto", True, "triton"),
    ("reference", "triton", True, "triton"),
])
def test_resolve(glob, requested, usable, expected):
    with rnan_fast.use_backend(glob):
        assert _backend.resolve("op", requested, "triton", _why("" if usable else "missing")) == expected


def test_resolve_fast_raises_with_the_reason():
    with rnan_fast.use_backend("fast"):
        with pytest.raises(RuntimeError, match="op: backend 'fast' asked for, but no kernel here"):
            _backend.resolve("op", None, "triton", _why("no kernel here"))
    with pytest.raises(RuntimeError, match="backend 'triton' asked for"):
        _backend.resolve("op", "triton", "triton", _why("no kernel here"))
    with pytest.raises(ValueError, match="unknown backend 'cuda'"):
        _backend.resolve("op", "cuda", "triton", _why(""))


def test_auto_never_uses_the_interpreter():
    """'auto' on CPU tensors is the reference even where TRITON_INTERPRET=1 makes Triton runnable."""
    from rnan_fast.ops.nonlocal_attention import _triton_why_not

    t = torch.randn(1, 4, 16)
    assert _triton_why_not(t, t, t, explicit=False)
    assert bool(_triton_why_not(t, t, t, explicit=True)) != (_ext.triton_available() and _ext.triton_interpret())


def test_ops_follow_the_global_backend(monkeypatch):
    """The global setting decides which kernel runs: spy on the extension's op to see it."""
    torch.manual_seed(0)
    x, m, t = (torch.randn(2, 3, 5, 7) for _ in range(3))
    expected = reference.gated_residual(x, m, t)
    calls = []
    if _ext.EXTENSION:
        kernel = torch.ops.rnan_fast.gated_residual_fwd
        monkeypatch.setattr(torch.ops.rnan_fast, "gated_residual_fwd",
                            lambda *a: calls.append("extension") or kernel(*a), raising=False)
    with rnan_fast.use_backend("reference"):
        torch.testing.assert_close(rnan_fast.ops.gated_residual(x, m, t), expected)
    assert calls == []
    if _ext.EXTENSION:
        for name in ("fast", "auto"):
            with rnan_fast.use_backend(name):
                torch.testing.assert_close(rnan_fast.ops.gated_residual(x, m, t), expected)
        assert calls == ["extension", "extension"]
    else:
        with rnan_fast.use_backend("fast"), pytest.raises(RuntimeError, match="not built"):
            rnan_fast.ops.gated_residual(x, m, t)


def test_broken_triton_falls_back_to_the_reference(tmp_path):
    """An installed but unimportable Triton is reported, and 'auto' still runs (reference)."""
    (tmp_path / "triton").mkdir()
    (tmp_path / "triton" / "__init__.py").write_text("raise ImportError('broken build')\n")
    code = ("import torch, rnan_fast; i = rnan_fast.backend_info(); print(i['triton'], i['triton_error']); "
            "q = torch.randn(1, 5, 16); print(rnan_fast.ops.nonlocal_attention(q, q, q).shape)")
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.splitlines() == ["False triton failed to import: ImportError: broken build",
                                       "torch.Size([1, 5, 16])"]


def test_fast_attention_on_cpu_is_the_extension(monkeypatch):
    """'fast' on CPU tensors is the C++ kernel (never the Triton interpreter); unbuilt, it raises."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    q = torch.randn(1, 9, 16)
    with rnan_fast.use_backend("fast"):
        if _ext.EXTENSION_ATTENTION:
            torch.testing.assert_close(rnan_fast.ops.nonlocal_attention(q, q, q), reference.nonlocal_attention_naive(q, q, q))
        else:
            with pytest.raises(RuntimeError, match="not built"):
                rnan_fast.ops.nonlocal_attention(q, q, q)
