"""MATLAB-compatible ``imresize(..., 'bicubic')`` in numpy (float64), for the SR degradation.

The super-resolution benchmarks are made in MATLAB: ``LR = imresize(HR, 1/s, 'bicubic')`` on a
uint8 image whose size is a multiple of ``s``. This module reproduces that computation:

- cubic kernel with a = -0.5 (Keys), support 4;
- when shrinking (scale < 1) with antialiasing, the kernel is stretched by 1/scale
  (``h(x) = scale * cubic(scale * x)``, support ``4 / scale``);
- output pixel ``u`` (1-based) samples the input at ``u / scale + 0.5 * (1 - 1 / scale)``;
  ``ceil(support) + 2`` taps per output pixel, weights normalised to sum 1;
- out-of-range taps mirror the image symmetrically (``1..n, n..1``, edge sample repeated;
  MATLAB's current behaviour, ``padding="symmetric"``) or repeat the edge sample
  (``padding="replicate"``, what produced the RNAN repository's own LRBI files);
- the dimension with the smaller scale factor is resized first (rows first when equal);
- uint8 input: each 1-D pass computes in float64 and then rounds (half away from zero) and
  clips to uint8, as MATLAB's imresize does on a uint8 image (the intermediate image after the
  first pass is uint8 too). Float input stays float64 and unrounded.

Checked in tests/test_data.py: ``padding="symmetric"`` reproduces Set5/LR_bicubic (X2, X3, X4)
bit-exactly, ``padding="replicate"`` reproduces Set5/RNAN_reference/LRBI bit-exactly; rounding
only once at the end instead would differ by 1-2 grey levels on ~15% of the pixels.
"""
from __future__ import annotations

import math

import numpy as np

__all__ = ["imresize", "cubic", "contributions", "round_half_away", "to_uint8"]


def cubic(x: np.ndarray) -> np.ndarray:
    """Keys' cubic convolution kernel with a = -0.5 (MATLAB's ``cubic``)."""
    ax = np.abs(x)
    ax2 = ax * ax
    ax3 = ax2 * ax
    inner = (1.5 * ax3 - 2.5 * ax2 + 1.0) * (ax <= 1)
    outer = (-0.5 * ax3 + 2.5 * ax2 - 4.0 * ax + 2.0) * ((ax > 1) & (ax <= 2))
    return inner + outer


PADDINGS = ("symmetric", "replicate")


def contributions(in_length: int, out_length: int, scale: float, padding: str = "symmetric"):
    """Weights (out_length, P) float64 and 0-based source indices (out_length, P) for one axis."""
    if padding not in PADDINGS:
        raise ValueError(f"padding must be one of {PADDINGS}, got {padding!r}")
    kernel_width = 4.0
    if scale < 1:  # antialiasing on, as MATLAB's default
        def kernel(x):
            return scale * cubic(scale * x)
        kernel_width = kernel_width / scale
    else:
        kernel = cubic
    u = np.arange(1, out_length + 1, dtype=np.float64) / scale + 0.5 * (1.0 - 1.0 / scale)
    left = np.floor(u - kernel_width / 2.0)
    taps = int(math.ceil(kernel_width)) + 2
    idx = left[:, None] + np.arange(taps, dtype=np.float64)[None, :]  # 1-based positions
    weights = kernel(u[:, None] - idx)
    weights = weights / weights.sum(axis=1, keepdims=True)
    if padding == "symmetric":  # positions 1..n, then n..1, periodically
        mirror = np.concatenate([np.arange(in_length), np.arange(in_length - 1, -1, -1)])
        idx0 = mirror[np.mod(idx.astype(np.int64) - 1, 2 * in_length)]
    else:  # replicate the edge sample
        idx0 = np.clip(idx.astype(np.int64) - 1, 0, in_length - 1)
    keep = np.any(weights != 0, axis=0)
    return weights[:, keep], idx0[:, keep]


def _resize_axis(a: np.ndarray, axis: int, out_length: int, scale: float, padding: str) -> np.ndarray:
    w, idx = contributions(a.shape[axis], out_length, scale, padding)
    moved = np.moveaxis(a, axis, 0)  # (in, ...)
    gathered = moved[idx]  # (out, P, ...)
    out = np.einsum("op,op...->o...", w, gathered)
    return np.moveaxis(out, 0, axis)


def round_half_away(x: np.ndarray) -> np.ndarray:
    """MATLAB's round (half away from zero), unlike numpy's round-half-to-even."""
    return np.sign(x) * np.floor(np.abs(x) + 0.5)


def to_uint8(img: np.ndarray) -> np.ndarray:
    """Round (half away from zero, as MATLAB) and clamp a 0..255 image to uint8; uint8 is
    returned as is. The one rounding rule of the package: imresize's uint8 passes, the stored
    noisy inputs, rgb2ycbcr's rounded Y, 16-bit file reading and the restored outputs use it."""
    if img.dtype == np.uint8:
        return img
    return np.clip(round_half_away(np.asarray(img, dtype=np.float64)), 0, 255).astype(np.uint8)


def imresize(img: np.ndarray, scale: float | None = None, output_shape: tuple[int, int] | None = None,
             padding: str = "symmetric") -> np.ndarray:
    """Bicubic resize of an (H, W) or (H, W, C) image, as MATLAB's imresize.

    scale: one factor for both axes (e.g. 1/4 or 2); output size ``ceil(H * scale)`` x
        ``ceil(W * scale)``. Or output_shape (H', W'), with per-axis scales H'/H and W'/W.
    uint8 input gives uint8 output (float64 computation, rounded half away from zero and
    clipped after each axis); float input gives float64 output, unrounded.
    padding: "symmetric" (MATLAB) or "replicate" (edge repeat), see the module docstring.
    """
    img = np.asarray(img)
    if img.ndim not in (2, 3):
        raise ValueError(f"imresize expects an (H, W) or (H, W, C) image, got shape {img.shape}")
    h, w = img.shape[:2]
    if output_shape is None:
        if scale is None:
            raise ValueError("give scale or output_shape")
        scales = (float(scale), float(scale))
        # Guard against 3 * (1/3) = 0.9999...: snap to the nearest integer when within 1e-9.
        def _len(n, s):
            v = n * s
            return int(round(v)) if abs(v - round(v)) < 1e-9 else int(math.ceil(v))
        out_hw = (_len(h, scales[0]), _len(w, scales[1]))
    else:
        out_hw = (int(output_shape[0]), int(output_shape[1]))
        scales = (out_hw[0] / h, out_hw[1] / w)
    is_uint8 = img.dtype == np.uint8
    a = img.astype(np.float64)
    order = (0, 1) if scales[0] <= scales[1] else (1, 0)
    for axis in order:
        a = _resize_axis(a, axis, out_hw[axis], scales[axis], padding)
        if is_uint8:
            a = to_uint8(a)
    return a
