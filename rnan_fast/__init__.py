"""rnan_fast: RNAN (Zhang et al., ICLR 2019) with fused kernels for its hot spots.

    net = rnan_fast.RNAN(n_colors=3, scale=1, n_feats=64, n_resgroups=10)
    net = rnan_fast.RNAN.from_checkpoint("RNAN_DN_RGB.pt")
    rnan_fast.restore_file("photo.jpg", "photo_rnan.jpg")       # a photo, with what it carries
    rnan_fast.ops.nonlocal_attention(theta, phi, g, softmax_over="query")
    rnan_fast.ops.gated_residual(x, mask_logits, trunk)
    rnan_fast.set_backend("auto" | "reference" | "fast"); rnan_fast.backend_info()

The names load on first use (PEP 562), so that `rnan-fast --help` and the image I/O do not pay
for importing torch (~1.5 s). The compiled ops (torch.ops.rnan_fast.*) are registered by the
first use of any of them, or by `import rnan_fast.ops`.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> the module that defines it; _ext comes first in every path that needs the ops,
# since loading rnan_fast._C is what defines torch.ops.rnan_fast
_LAZY = {
    "backend_info": "rnan_fast._ext",
    "get_backend": "rnan_fast._backend", "set_backend": "rnan_fast._backend", "use_backend": "rnan_fast._backend",
    "RNAN": "rnan_fast.model", "CheckpointError": "rnan_fast.model",
    "restore_file": "rnan_fast.photos",
    "ops": None, "reference": None,          # submodules
}

__all__ = ["RNAN", "CheckpointError", "backend_info", "get_backend", "ops", "reference", "restore_file",
           "set_backend", "use_backend", "__version__"]


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'rnan_fast' has no attribute {name!r}")
    importlib.import_module("rnan_fast._ext")
    module = _LAZY[name]
    value = importlib.import_module(f"rnan_fast.{name}") if module is None else \
        getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
