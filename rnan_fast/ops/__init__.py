"""The two hot spots of RNAN as registered ops (torch.ops.rnan_fast.*), one module per op.

Each module registers the op with torch.library.custom_op (a fake kernel for torch.compile and
autograd through a backward op) and dispatches to the reference or the fast kernel by backend.
"""
from rnan_fast.ops.gated_residual import gated_residual
from rnan_fast.ops.nonlocal_attention import nonlocal_attention

__all__ = ["gated_residual", "nonlocal_attention"]
