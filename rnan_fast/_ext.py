"""Loads the compiled extension rnan_fast._C and Triton, and says what is available.

Nothing here raises: a missing piece only sets its flag to False and records why, so that
`import rnan_fast` works on any machine and `backend_info()` can tell the user.
"""
from __future__ import annotations

import importlib
import importlib.util
import os

import torch

EXTENSION = False          # rnan_fast._C loaded (its C++ CPU kernels are there)
EXTENSION_CUDA = False     # rnan_fast._C was compiled with its CUDA kernels
EXTENSION_ATTENTION = False  # rnan_fast._C has the C++ CPU non-local attention kernel
EXTENSION_ERROR = ""
_cpu_attention_isa = None    # rnan_fast._C.cpu_attention_isa (builds before it lack it)
if importlib.util.find_spec("rnan_fast._C") is None:
    EXTENSION_ERROR = "rnan_fast._C is not built: install with `pip install --no-build-isolation -e .`"
else:
    try:
        _C = importlib.import_module("rnan_fast._C")  # registers the torch.ops.rnan_fast.*_fwd/_bwd kernels
        EXTENSION = True
        EXTENSION_CUDA = bool(_C.cuda_compiled())
        EXTENSION_ATTENTION = torch._C._dispatch_has_kernel_for_dispatch_key(
            "rnan_fast::nonlocal_attention_fwd", "CPU")   # False for a build that predates it
        _cpu_attention_isa = getattr(_C, "cpu_attention_isa", None)
    except Exception as e:  # an ABI mismatch (built against another torch) surfaces as ImportError/OSError
        EXTENSION_ERROR = f"rnan_fast._C failed to load: {type(e).__name__}: {e}"


_TRITON_ERROR: list[str] = []   # filled on the first call of triton_error()


@torch.compiler.assume_constant_result  # torch.compile need not (and cannot) trace the import
def triton_error() -> str:
    """Empty when Triton imports, else why not. Imported on first use, not by `import rnan_fast`:
    TRITON_INTERPRET must be set before Triton's first import, and the import costs ~1 s."""
    if not _TRITON_ERROR:
        if importlib.util.find_spec("triton") is None:
            _TRITON_ERROR.append("triton is not installed")
        else:
            try:
                importlib.import_module("triton.language")
                _TRITON_ERROR.append("")
            except Exception as e:  # a broken install must fall back to the reference, not fail the model
                _TRITON_ERROR.append(f"triton failed to import: {type(e).__name__}: {e}")
    return _TRITON_ERROR[0]


def triton_available() -> bool:
    return not triton_error()


def triton_interpret() -> bool:
    """True when Triton kernels run on CPU tensors through the interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_version() -> str | None:
    return importlib.import_module("triton").__version__ if triton_available() else None


def backend_info() -> dict:
    """What this installation can run, with versions and the reasons for anything missing."""
    from rnan_fast._backend import get_backend

    return {
        "backend": get_backend(),
        "extension": EXTENSION,
        "extension_cuda": EXTENSION_CUDA,
        "extension_attention_cpu": EXTENSION_ATTENTION,   # the C++ CPU attention kernel
        # the attention kernel's inner loops: "avx512", "avx2" or "portable" (None: no kernel, or an older build)
        "extension_attention_isa": _cpu_attention_isa() if EXTENSION_ATTENTION and _cpu_attention_isa else None,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "extension_error": EXTENSION_ERROR or None,
        "triton": triton_available(),
        "triton_error": triton_error() or None,
        "triton_interpret": triton_interpret(),
        "cuda": torch.cuda.is_available(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton_version": triton_version(),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
    }
