"""Classical baselines to set beside RNAN: BM3D (gray) and CBM3D (color) given the true sigma.

They run through the optional `bm3d` package (pip install "rnan_fast[bm3d]"), the reference
implementation of Makinen, Azzari and Foi, with its default profile ("np"); CBM3D is its
bm3d_rgb (block matching in the opponent colour space). Inputs are the very noisy images the
model gets (float64, noise unclipped, as rnan_fast.data.add_gaussian_noise makes them); the
output is rounded and clamped to uint8 like every restored image, so the two are scored alike.
"""
from __future__ import annotations

import numpy as np

from rnan_fast.imresize import to_uint8

__all__ = ["BaselineUnavailable", "BASELINES", "check_baseline", "bm3d_denoise"]

BASELINES = ("bm3d",)
INSTALL_HINT = 'pip install "rnan_fast[bm3d]" (or: pip install bm3d)'
DENOISING_TASKS = ("denoise_gray", "denoise_rgb")


class BaselineUnavailable(RuntimeError):
    """The baseline cannot run here (its package is missing) or does not apply to the task."""


def _bm3d_module():
    try:
        import bm3d
    except ImportError as e:
        raise BaselineUnavailable(f"the BM3D baseline needs the optional bm3d package, which is not "
                                  f"installed ({e}); {INSTALL_HINT}") from None
    return bm3d


def check_baseline(name: str, task: str) -> None:
    """Raise BaselineUnavailable when baseline `name` cannot run for `task` on this machine."""
    if name not in BASELINES:
        raise BaselineUnavailable(f"unknown baseline {name!r}; the baselines are: {', '.join(BASELINES)}")
    if task not in DENOISING_TASKS:
        raise BaselineUnavailable(f"the BM3D baseline is a Gaussian denoiser: it applies to "
                                  f"{' and '.join(DENOISING_TASKS)}, not to {task}")
    _bm3d_module()


def bm3d_denoise(noisy: np.ndarray, sigma: float) -> np.ndarray:
    """BM3D of a gray (H, W) or CBM3D of an RGB (H, W, 3) image on the 0..255 scale (any
    float or uint8 values, noise unclipped), given the noise's true sigma (0..255 scale).
    Returns uint8 of the same shape. sigma 0 returns the input rounded (nothing to remove)."""
    bm3d = _bm3d_module()
    a = np.asarray(noisy, dtype=np.float64)
    if not (a.ndim == 2 or (a.ndim == 3 and a.shape[2] == 3)):
        raise ValueError(f"bm3d_denoise expects a (H, W) or (H, W, 3) image, got shape {a.shape}")
    if sigma < 0:
        raise ValueError(f"sigma must be >= 0, got {sigma}")
    if sigma == 0:
        return to_uint8(a)
    # The package works on any scale; 0..1 with sigma / 255 is the scale its profiles were tuned on.
    z, s = a / 255.0, float(sigma) / 255.0
    out = bm3d.bm3d(z, sigma_psd=s) if a.ndim == 2 else bm3d.bm3d_rgb(z, sigma_psd=s)
    return to_uint8(np.asarray(out, dtype=np.float64).reshape(a.shape) * 255.0)
