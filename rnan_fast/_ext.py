"""Loads the compiled extension rnan_fast._C and Triton, and says what is available.

Nothing here raises: a missing piece only sets its flag to False and records why, so that
`import rnan_fast` works on any machine and `backend_info()` can tell the user.
"""
from __future__ import annotations

import functools
import importlib
import importlib.util
import os
import warnings

import torch

EXTENSION = False          # rnan_fast._C loaded (its C++ CPU kernels are there)
EXTENSION_CUDA = False     # rnan_fast._C was compiled with its CUDA kernels
EXTENSION_ATTENTION = False  # rnan_fast._C has the C++ CPU non-local attention kernel
EXTENSION_ERROR = ""
_cpu_attention_isa = None    # rnan_fast._C.cpu_attention_isa (builds before it lack it)
# The GPU architectures the CUDA gate was compiled for, as 10 * major + minor: SASS (native code)
# and PTX (compiled by the driver for newer GPUs). Empty without CUDA, or for a build that predates
# the record (rnan_fast._C.cuda_archs).
CUDA_SASS: tuple[int, ...] = ()
CUDA_PTX: tuple[int, ...] = ()
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
        if EXTENSION_CUDA and hasattr(_C, "cuda_archs"):
            CUDA_SASS, CUDA_PTX = (tuple(a) for a in _C.cuda_archs())
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


# ---- per-GPU support: one check per device, cached ------------------------------------------

# The oldest GPUs the Triton attention runs on: sm_80 (Ampere). Below it Triton's dots have no
# tensor-core path: compiled for sm_75 (Turing) they are FMA loops (no HMMA in the SASS, and
# 5-9 KB of register spills per thread with the default tiles; tests/test_gpu_arch.py checks the
# former), where the reference's cuBLAS matmuls use the tensor cores.
TRITON_MIN_CAPABILITY = (8, 0)


def image_runs(capability: tuple[int, int], sass, ptx) -> bool:
    """Whether code compiled to SASS for `sass` and PTX for `ptx` (10 * major + minor each) runs on
    a GPU of compute capability (major, minor): SASS for X.Y runs on X.Z for Z >= Y (binary
    compatibility within a major version); PTX for X.Y is compiled by the driver for any X.Y or newer."""
    major, minor = capability
    return (any(a // 10 == major and a % 10 <= minor for a in sass)
            or any(a <= 10 * major + minor for a in ptx))


def _arch_names(sass, ptx) -> str:
    names = [f"sm_{a}" for a in sass] + [f"compute_{a} (PTX)" for a in ptx]
    return ", ".join(names) or "no GPU architecture recorded (rebuilt rnan_fast._C records them)"


@functools.cache
def _device_checks(index: int) -> dict:
    """{"name", "capability", "gate", "triton"} of CUDA device `index`: "gate" / "triton" are ""
    when that kernel runs there, else why not. Computed once per device and process."""
    major, minor = torch.cuda.get_device_capability(index)
    name = f"{torch.cuda.get_device_name(index)} (cuda:{index}, sm_{major}{minor})"
    if not EXTENSION:
        gate = f"the extension rnan_fast._C is not built ({EXTENSION_ERROR})"
    elif not EXTENSION_CUDA:
        gate = "rnan_fast._C was built without its CUDA kernels"
    elif not image_runs((major, minor), CUDA_SASS, CUDA_PTX):
        gate = (f"rnan_fast._C's CUDA gate was compiled for {_arch_names(CUDA_SASS, CUDA_PTX)}, which cannot run "
                f"on {name}: rebuild with TORCH_CUDA_ARCH_LIST=\"{major}.{minor}\" (see the README, Install)")
    else:
        gate = ""
    if not triton_available():
        triton = f"Triton is unavailable ({triton_error()})"
    elif (major, minor) < TRITON_MIN_CAPABILITY:
        need = ".".join(map(str, TRITON_MIN_CAPABILITY))
        triton = (f"the Triton attention needs compute capability {need} or newer (below it Triton's dots do "
                  f"not use the tensor cores); {name} has {major}.{minor}")
    else:
        triton = ""
    return {"name": name, "capability": (major, minor), "gate": gate, "triton": triton}


def _index(device) -> int:
    device = torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
    if device.type != "cuda":
        raise ValueError(f"expected a CUDA device, got {device}")
    return torch.cuda.current_device() if device.index is None else device.index


@torch.compiler.assume_constant_result  # a per-device constant: torch.compile need not trace the check
def gate_cuda_why_not(device) -> str:
    """"" when the CUDA gate of rnan_fast._C runs on CUDA `device` (torch.device, "cuda:1" or an
    index), else why not (not built with CUDA, or not compiled for the device's architecture)."""
    return _device_checks(_index(device))["gate"]


@torch.compiler.assume_constant_result
def triton_cuda_why_not(device) -> str:
    """"" when the Triton attention kernels run on CUDA `device`, else why not (Triton missing, or
    a GPU older than TRITON_MIN_CAPABILITY, sm_80)."""
    return _device_checks(_index(device))["triton"]


def cuda_device_support(device) -> tuple[bool, str]:
    """Whether both fast CUDA paths run on CUDA `device` (torch.device, "cuda:1" or an index): the
    gate of rnan_fast._C (compiled for the device's architecture) and the Triton attention kernels.

    Returns (True, "") or (False, reason), the reason naming each path that cannot run and why.
    Where one cannot, backend "auto" runs that op on the reference on this device (warning once)
    and "fast" raises with the same reason; the device itself stays usable. One check per device,
    cached for the process; torch.cuda must see the device.
    """
    checks = _device_checks(_index(device))
    reasons = [f"{what}: {why}" for what, why in (("gate", checks["gate"]), ("attention", checks["triton"])) if why]
    return not reasons, "; ".join(reasons)


_WARNED: set = set()


def warn_fallback(op: str, device, reason: str) -> None:
    """Warn, once per op and device in this process, that backend "auto" runs `op` on the
    reference on `device` because its fast kernel cannot run there (`reason`)."""
    key = (op, str(device))
    if key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(f"rnan_fast.ops.{op} runs on the reference on {device}: {reason}", RuntimeWarning, stacklevel=3)


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
        # the GPU architectures the CUDA gate was compiled for
        "extension_cuda_archs": _arch_names(CUDA_SASS, CUDA_PTX) if EXTENSION_CUDA else None,
        # per visible GPU: what runs there ("" for gate / triton) and why not
        "cuda_devices": ([dict(_device_checks(i)) for i in range(torch.cuda.device_count())]
                         if torch.cuda.is_available() else []),
    }
