"""Classical baselines to set beside RNAN on the very images the model gets, scored alike
(outputs rounded and clamped to uint8 like every restored image):

- "bm3d": BM3D (gray) and CBM3D (color) given the true sigma, through the optional `bm3d`
  package (pip install "rnan_fast[bm3d]"), the reference implementation of Makinen, Azzari and
  Foi, with its default profile ("np"); CBM3D is its bm3d_rgb (block matching in the opponent
  colour space). Inputs: the noisy images, float64, noise unclipped
  (rnan_fast.data.add_gaussian_noise).
  With eval --pairs (real noise) the sigma comes from the noisy image (pairs_sigma: the noise
  read at 4x coarser scales, times a gain chosen on PolyU_dev).
- "nlm": OpenCV's non-local means (Buades, Coll and Morel 2005; cv2.fastNlMeansDenoisingColored
  for RGB, cv2.fastNlMeansDenoising for gray) with filter strength NLM_H on the uint8 input
  (opencv-python-headless is a dependency of the package: photo I/O reads 16-bit PNGs with it):
  the quick classical answer a user has at hand for real photos.
- "menon": Menon, Andriani and Calvagno's demosaicing (2007, directional filtering with a
  posteriori decision), through the optional `colour-demosaicing` package
  (pip install "rnan_fast[demosaic]"), on the GRBG mosaic of rnan_fast.data.mosaic.
- "bilinear": bilinear demosaicing of the same mosaic (rnan_fast.modules.MosaicFill, the fixed
  fill that RNAN(mosaic="grbg") starts from): the floor a demosaicing model must clear, as
  bicubic is for super-resolution.
"""
from __future__ import annotations

import importlib
import warnings
from dataclasses import dataclass

import numpy as np

from rnan_fast.imresize import to_uint8

__all__ = ["Baseline", "BaselineUnavailable", "BASELINES", "check_baseline", "baseline_label", "run_baseline",
           "bm3d_denoise", "nlm_denoise", "estimate_sigma", "pairs_sigma", "menon_demosaic", "bilinear_demosaic", "NLM_H",
           "PAIRS_SIGMA_LEVEL", "PAIRS_SIGMA_GAIN"]

DENOISING_TASKS = ("denoise_gray", "denoise_rgb", "denoise_photo")


@dataclass(frozen=True)
class Baseline:
    """A classical method: its table column, what it is (for headers), the tasks it applies
    to, the optional package it needs and how to install that."""

    column: str
    label: str
    tasks: tuple[str, ...]
    module: str
    install: str


BASELINES = {
    "bm3d": Baseline("BM3D", "BM3D (CBM3D for color) given the true sigma", DENOISING_TASKS, "bm3d",
                     'pip install "rnan_fast[bm3d]" (or: pip install bm3d)'),
    "nlm": Baseline("NLM", "OpenCV non-local means (h = NLM_H)", DENOISING_TASKS, "cv2",
                    "pip install opencv-python-headless (a dependency of rnan_fast)"),
    "menon": Baseline("Menon", "Menon 2007 demosaicing (colour-demosaicing)", ("demosaic",), "colour_demosaicing",
                      'pip install "rnan_fast[demosaic]" (or: pip install colour-demosaicing)'),
    "bilinear": Baseline("Bilinear", "bilinear demosaicing (modules.MosaicFill)", ("demosaic",), "torch",
                         "pip install torch (a dependency of rnan_fast)"),
}


class BaselineUnavailable(RuntimeError):
    """The baseline cannot run here (its package is missing) or does not apply to the task."""


def _module(name: str):
    b = BASELINES[name]
    try:
        with warnings.catch_warnings():   # colour-science warns on import that matplotlib is missing
            warnings.simplefilter("ignore")
            return importlib.import_module(b.module)
    except ImportError as e:
        raise BaselineUnavailable(f"the {b.column} baseline needs the optional {b.module} package, which is not "
                                  f"installed ({e}); {b.install}") from None


def check_baseline(name: str, task: str) -> None:
    """Raise BaselineUnavailable when baseline `name` cannot run for `task` on this machine."""
    if name not in BASELINES:
        raise BaselineUnavailable(f"unknown baseline {name!r}; the baselines are: {', '.join(BASELINES)}")
    b = BASELINES[name]
    if task not in b.tasks:
        raise BaselineUnavailable(f"the {b.column} baseline applies to {' and '.join(b.tasks)}, not to {task}")
    _module(name)


def baseline_label(name: str, params: dict) -> str:
    """What baseline `name` is on eval's degradation `params` (its label; on real pairs, BM3D's
    sigma is estimated rather than true)."""
    if name == "bm3d" and params.get("pairs"):
        return "BM3D (CBM3D for color) given an estimated sigma (baselines.pairs_sigma)"
    return BASELINES[name].label


def run_baseline(name: str, lq: np.ndarray, params: dict) -> np.ndarray:
    """Baseline `name` on a degraded input of the eval protocol (params: eval's degradation,
    e.g. {"task": "denoise_rgb", "sigma": 30}); uint8 output of the ground truth's shape."""
    if name == "bm3d":
        sigma = params.get("sigma")
        return bm3d_denoise(lq, pairs_sigma(lq) if sigma is None else sigma)
    if name == "nlm":
        return nlm_denoise(lq)
    if name == "menon":
        return menon_demosaic(lq)
    if name == "bilinear":
        return to_uint8(bilinear_demosaic(lq))
    raise BaselineUnavailable(f"unknown baseline {name!r}; the baselines are: {', '.join(BASELINES)}")


def bm3d_denoise(noisy: np.ndarray, sigma: float) -> np.ndarray:
    """BM3D of a gray (H, W) or CBM3D of an RGB (H, W, 3) image on the 0..255 scale (any
    float or uint8 values, noise unclipped), given the noise's true sigma (0..255 scale).
    Returns uint8 of the same shape. sigma 0 returns the input rounded (nothing to remove)."""
    bm3d = _module("bm3d")
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


# Filter strength of the NLM baseline (h = hColor, on the 0..255 scale; 7x7 patches, 21x21
# search window, OpenCV's defaults), chosen on PolyU_dev (real camera noise, 45 pairs): the mean
# PSNR there peaks at h = 4 (+1.67 dB over the noisy input; h 3: +1.63, h 5: +1.53; BENCHMARKS.md,
# "Real camera noise").
NLM_H = 4.0


def nlm_denoise(noisy: np.ndarray, h: float = NLM_H) -> np.ndarray:
    """OpenCV's non-local means of a gray (H, W) or RGB (H, W, 3) image on the 0..255 scale
    (rounded and clamped to uint8 first, as OpenCV takes it); returns uint8 of the same shape."""
    cv2 = _module("nlm")
    a = to_uint8(np.asarray(noisy, dtype=np.float64))
    if a.ndim == 2:
        return cv2.fastNlMeansDenoising(a, None, h=h)
    if a.ndim != 3 or a.shape[2] != 3:
        raise ValueError(f"nlm_denoise expects a (H, W) or (H, W, 3) image, got shape {a.shape}")
    bgr = np.ascontiguousarray(a[..., ::-1])   # OpenCV's colour order (its YUV step weighs channels)
    return np.ascontiguousarray(cv2.fastNlMeansDenoisingColored(bgr, None, h=h, hColor=h)[..., ::-1])


# The sigma CBM3D is given on a real photo (eval --pairs): PAIRS_SIGMA_GAIN x the noise read two
# levels coarser (estimate_sigma at PAIRS_SIGMA_LEVEL). Camera noise is spatially correlated
# (demosaicing) and JPEG removes its finest band: on 15 PolyU_dev pairs the finest level reads
# 0-1.5 where the noisy shot is 2.3-5.8 RMS from its mean, level 2 reads 4-15, and CBM3D (a
# white-noise filter) does best at sigma 9-22. Chosen on PolyU_dev as NLM's h was: on its 8 pairs
# with a full grid (sigma 2.5..22), CBM3D at gain 1 gains +1.92 dB, 1.5 +2.55, 2 +2.75,
# 2.5 +2.81, 3 +2.83, each image's best sigma +2.96 (BENCHMARKS.md, "Real camera noise").
PAIRS_SIGMA_LEVEL = 2
PAIRS_SIGMA_GAIN = 2.5


def pairs_sigma(noisy: np.ndarray) -> float:
    """The noise level CBM3D is given for a real noisy photo (0..255 scale)."""
    return PAIRS_SIGMA_GAIN * estimate_sigma(noisy, PAIRS_SIGMA_LEVEL)


def estimate_sigma(noisy: np.ndarray, level: int = 0) -> float:
    """The standard deviation of white noise in an image (0..255 scale), from the median absolute
    value of its diagonal Haar wavelet coefficients divided by 0.6745 (Donoho and Johnstone's
    robust estimator); the mean over the channels of an RGB image.

    level 0 reads the finest band: the image's own edges barely reach the median, though a heavily
    textured photo reads high at low noise (7.8 for sigma 5 on Kodak's kodim05, 5.5 on the
    smoother kodim23). level k reads the image averaged over 2^k x 2^k blocks, times 2^k: the same
    sigma for white noise, and the noise that survives at coarser scales for correlated noise
    (real photos: PAIRS_SIGMA_LEVEL), at the price of more of the image's texture."""
    a = np.asarray(noisy, dtype=np.float64)
    if a.ndim == 2:
        a = a[..., None]
    side = 2 ** (level + 1)
    if level < 0 or a.shape[0] < side or a.shape[1] < side:
        raise ValueError(f"estimate_sigma at level {level} needs at least {side}x{side} pixels (level >= 0), "
                         f"got shape {np.shape(noisy)}")
    for _ in range(level):   # 2x2 block means: white noise of sigma s becomes s / 2
        h, w = a.shape[0] // 2 * 2, a.shape[1] // 2 * 2
        a = (a[0:h:2, 0:w:2] + a[0:h:2, 1:w:2] + a[1:h:2, 0:w:2] + a[1:h:2, 1:w:2]) / 4.0
    h, w = a.shape[0] // 2 * 2, a.shape[1] // 2 * 2
    a = a[:h, :w]
    # the orthonormal Haar HH band: (x00 - x01 - x10 + x11) / 2 per 2x2 block
    hh = (a[0::2, 0::2] - a[0::2, 1::2] - a[1::2, 0::2] + a[1::2, 1::2]) / 2.0
    return float(np.mean([np.median(np.abs(hh[..., c])) / 0.6745 for c in range(a.shape[2])])) * 2 ** level


def menon_demosaic(mosaiced: np.ndarray) -> np.ndarray:
    """Menon 2007 demosaicing of the 3-channel zero-filled GRBG mosaic (H, W, 3) of
    rnan_fast.data.mosaic (0..255); returns uint8 (H, W, 3)."""
    a = np.asarray(mosaiced, dtype=np.float64)
    if a.ndim != 3 or a.shape[2] != 3:
        raise ValueError(f"menon_demosaic expects the 3-channel mosaic (H, W, 3), got shape {a.shape}")
    cfa = a.sum(axis=2)          # each site holds one colour, the others are zero
    out = _module("menon").demosaicing_CFA_Bayer_Menon2007(cfa, pattern="GRBG")
    return to_uint8(np.asarray(out, dtype=np.float64))


def bilinear_demosaic(mosaiced: np.ndarray) -> np.ndarray:
    """Bilinear demosaicing (modules.MosaicFill, in float64) of the 3-channel zero-filled GRBG
    mosaic (H, W, 3) of rnan_fast.data.mosaic, any scale; returns float64 (H, W, 3), unrounded."""
    import torch

    from rnan_fast.modules import MosaicFill

    a = np.asarray(mosaiced, dtype=np.float64)
    if a.ndim != 3 or a.shape[2] != 3:
        raise ValueError(f"bilinear_demosaic expects the 3-channel mosaic (H, W, 3), got shape {a.shape}")
    with torch.no_grad():
        out = MosaicFill().double()(torch.from_numpy(a).permute(2, 0, 1)[None])
    return out[0].permute(1, 2, 0).numpy()
