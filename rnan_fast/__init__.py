"""rnan_fast: RNAN (Zhang et al., ICLR 2019) with fused kernels for its hot spots.

    net = rnan_fast.RNAN(n_colors=3, scale=1, n_feats=64, n_resgroups=10)
    net = rnan_fast.RNAN.from_checkpoint("RNAN_DN_RGB.pt")
    rnan_fast.ops.nonlocal_attention(theta, phi, g, softmax_over="query")
    rnan_fast.ops.gated_residual(x, mask_logits, trunk)
    rnan_fast.set_backend("auto" | "reference" | "fast"); rnan_fast.backend_info()
"""
from rnan_fast._ext import backend_info  # loads rnan_fast._C first: it defines torch.ops.rnan_fast
from rnan_fast._backend import get_backend, set_backend, use_backend
from rnan_fast import ops, reference
from rnan_fast.model import RNAN, CheckpointError

__version__ = "0.1.0"

__all__ = ["RNAN", "CheckpointError", "backend_info", "get_backend", "ops", "reference", "set_backend", "use_backend", "__version__"]
