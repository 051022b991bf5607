"""PSNR and SSIM as RNAN's MATLAB evaluation scripts compute them (numpy, float64).

- ``psnr(ref, out, border=0)``: 10 log10(255^2 / MSE) over all pixels and channels after removing
  `border` pixels on each side. For a 3-channel image the MSE is the mean of the three
  per-channel MSEs (the colour-denoising / demosaicing protocol; equal to the MSE over all values).
- ``ssim(ref, out, border=0)``: Wang et al.'s SSIM index (``ssim_index.m`` v1.0): 11x11 Gaussian
  window with sigma 1.5 normalised to sum 1, K1 = 0.01, K2 = 0.03, L = 255, 'valid' filtering
  (no padding, no downsampling), mean of the SSIM map. For 3-channel images: the mean of the
  per-channel SSIMs (the colour-denoising / demosaicing scripts).
- ``evaluate(ref, out, task, scale)``: the per-task protocol. "sr": Y channel of MATLAB's
  rgb2ycbcr computed in floating point (unrounded), `scale` border pixels removed (a 1-channel
  ground truth, such as Set14's bridge, is scored on its own gray values against
  ``sr_gray_output(out)``); "car":
  Y channel (rounded, as the test images are stored), no border; "denoise_gray": gray, no
  border; "denoise_rgb", "denoise_photo" and "demosaic": RGB, no border.
"""
from __future__ import annotations

import math

import numpy as np

from rnan_fast.data import rgb_to_y, to_uint8

__all__ = ["psnr", "ssim", "gaussian_window", "evaluate", "sr_gray_output"]


def _crop(a: np.ndarray, border: int, what: str) -> np.ndarray:
    """`a` less `border` pixels on each side; ValueError when nothing is left to score."""
    if border > 0:
        a = a[border:-border, border:-border]
    if a.size == 0:
        raise ValueError(f"{what}: no pixels left to score (image {a.shape[:2]} after removing a border of "
                         f"{max(border, 0)}); the image is too small")
    return a


def psnr(ref: np.ndarray, out: np.ndarray, border: int = 0, peak: float = 255.0) -> float:
    """PSNR in dB of `out` against `ref` (same shape, 0..255 scale); inf when identical."""
    ref = np.asarray(ref, dtype=np.float64)
    out = np.asarray(out, dtype=np.float64)
    if ref.shape != out.shape:
        raise ValueError(f"psnr: shapes differ, {ref.shape} vs {out.shape}")
    e = _crop(ref, border, "psnr") - _crop(out, border, "psnr")
    mse = float(np.mean(e ** 2))  # over RGB: the mean of the per-channel MSEs (equal counts)
    return math.inf if mse == 0 else 10.0 * math.log10(peak * peak / mse)


def gaussian_window(size: int = 11, sigma: float = 1.5) -> np.ndarray:
    """1-D factor of MATLAB's fspecial('gaussian', size, sigma), normalised to sum 1
    (the 2-D window is its outer product with itself)."""
    x = np.arange(size, dtype=np.float64) - (size - 1) / 2.0
    g = np.exp(-(x * x) / (2.0 * sigma * sigma))
    return g / g.sum()


def _filter_valid(a: np.ndarray, g: np.ndarray) -> np.ndarray:
    """Separable 'valid' correlation of a 2-D array with the window outer(g, g)."""
    k = len(g)
    h, w = a.shape
    rows = np.zeros((h - k + 1, w), dtype=np.float64)
    for i in range(k):
        rows += g[i] * a[i:i + h - k + 1, :]
    out = np.zeros((h - k + 1, w - k + 1), dtype=np.float64)
    for j in range(k):
        out += g[j] * rows[:, j:j + w - k + 1]
    return out


def _ssim_2d(a: np.ndarray, b: np.ndarray, k1: float, k2: float, peak: float, g: np.ndarray) -> float:
    if min(a.shape) < len(g):
        raise ValueError(f"ssim needs images of at least {len(g)}x{len(g)} pixels, got {a.shape}")
    c1 = (k1 * peak) ** 2
    c2 = (k2 * peak) ** 2
    mu1 = _filter_valid(a, g)
    mu2 = _filter_valid(b, g)
    mu1_sq, mu2_sq, mu12 = mu1 * mu1, mu2 * mu2, mu1 * mu2
    s1 = _filter_valid(a * a, g) - mu1_sq
    s2 = _filter_valid(b * b, g) - mu2_sq
    s12 = _filter_valid(a * b, g) - mu12
    ssim_map = ((2 * mu12 + c1) * (2 * s12 + c2)) / ((mu1_sq + mu2_sq + c1) * (s1 + s2 + c2))
    return float(ssim_map.mean())


def ssim(ref: np.ndarray, out: np.ndarray, border: int = 0, k1: float = 0.01, k2: float = 0.03,
         peak: float = 255.0, win_size: int = 11, win_sigma: float = 1.5) -> float:
    """Mean SSIM (Wang et al. 2004, ssim_index.m defaults); 3-channel: mean over channels."""
    ref = np.asarray(ref, dtype=np.float64)
    out = np.asarray(out, dtype=np.float64)
    if ref.shape != out.shape:
        raise ValueError(f"ssim: shapes differ, {ref.shape} vs {out.shape}")
    ref, out = _crop(ref, border, "ssim"), _crop(out, border, "ssim")
    g = gaussian_window(win_size, win_sigma)
    if ref.ndim == 3:
        return float(np.mean([_ssim_2d(ref[..., c], out[..., c], k1, k2, peak, g) for c in range(ref.shape[2])]))
    return _ssim_2d(ref, out, k1, k2, peak, g)


def sr_gray_output(out: np.ndarray) -> np.ndarray:
    """The gray image an SR output is scored on when the ground truth is 1-channel: a gray
    output as it is, a 3-channel one as the mean of its channels rounded to uint8 (for the
    bicubic baseline of a replicated gray image, the three channels are equal: any one of them)."""
    out = np.asarray(out)
    if out.ndim == 2:
        return out
    return to_uint8(out.astype(np.float64).mean(axis=2))


def evaluate(ref: np.ndarray, out: np.ndarray, task: str, scale: int = 1, with_ssim: bool = True):
    """(PSNR, SSIM) of a restored image `out` against the ground truth `ref` under `task`'s
    protocol (module docstring). `ref`/`out`: (H, W) or (H, W, 3) on the 0..255 scale, usually
    uint8. SSIM is None when with_ssim is False."""
    if task == "sr" and np.ndim(ref) == 2:  # gray ground truth: its gray values, not Y of RGB
        a, b, border = ref, sr_gray_output(out), int(scale)
    elif task == "sr":
        a, b, border = rgb_to_y(ref, rounded=False), rgb_to_y(out, rounded=False), int(scale)
    elif task == "car":
        a, b, border = rgb_to_y(ref, rounded=True), rgb_to_y(out, rounded=True), 0
    elif task in ("denoise_gray", "denoise_rgb", "denoise_photo", "demosaic"):
        a, b, border = ref, out, 0
    else:
        raise ValueError(f"unknown task {task!r}")
    p = psnr(a, b, border)
    s = ssim(a, b, border) if with_ssim else None
    return p, s
