"""Colour conversions and the benchmark degradations (numpy; torch only for a torch.Generator
given as a noise seed); image files are read and written by rnan_fast.image_io.

Images are numpy arrays: uint8 (H, W) for gray, uint8 (H, W, 3) for RGB; degraded inputs may be
float64 (noise is not rounded). The degradations follow the protocols that reproduce RNAN's
benchmark rows (the shared data README):

- ``add_gaussian_noise``: additive white Gaussian noise, sigma on the 0..255 scale, drawn in
  float64 from ``numpy.random.default_rng(seed)``; the noisy image is neither rounded nor
  clipped (``quantize=True`` rounds and clips to uint8, as storing the noisy image as PNG would).
  ``noise_seed(base, index)`` is the per-image seed the evaluation uses: image ``index`` (0-based
  position in the sorted file list) gets ``base + index``, so ``--limit`` never changes the noise
  of the images it keeps.
- ``jpeg``: Pillow JPEG at a quality, of a gray (H, W) uint8 image (colour test sets are first
  turned into MATLAB's rgb2ycbcr Y channel, ``rgb_to_y(..., rounded=True)``), or of an RGB one.
- ``photo_noise``: camera-like noise for the ``denoise_photo`` task (training a denoiser for real
  photos): the clean sRGB image taken back to linear camera space, signal-dependent shot and
  read noise, optionally correlated as a Bayer mosaic's demosaicing correlates it, forward again,
  often a camera JPEG; a share of plain Gaussian noise.
- ``mosaic``: GRBG Bayer pattern ((0,0)=G, (0,1)=R, (1,0)=B, (1,1)=G), the missing samples set
  to zero, kept as a 3-channel image.
- ``bicubic_downscale``: crop to a multiple of the scale, then MATLAB ``imresize(HR, 1/s,
  'bicubic')`` from uint8 RGB (rnan_fast.imresize).
- ``ground_truth`` and ``degrade``: the per-task protocol built from the above, shared by
  evaluation and training.
- ``to_gray``: Pillow ``convert('L')`` (ITU-R 601-2 luma, R*299/1000 + G*587/1000 + B*114/1000),
  how RGB inputs become gray for gray-denoising models and how gray Kodak24 is made.
"""
from __future__ import annotations

import io

import numpy as np
from PIL import Image

# the image files themselves live in rnan_fast.image_io; re-exported here for eval and training
from rnan_fast.image_io import (IMAGE_EXTENSIONS, ImageReadError, atomic_write, list_images, new_file_mode,
                                read_image, write_png_atomic)
from rnan_fast.imresize import imresize, to_uint8

__all__ = [
    "IMAGE_EXTENSIONS", "ImageReadError", "read_image", "atomic_write", "new_file_mode", "write_png_atomic", "list_images",
    "to_gray", "to_rgb", "rgb_to_y", "rgb_to_ycbcr", "ycbcr_to_rgb", "add_gaussian_noise", "noise_seed", "jpeg", "mosaic",
    "photo_noise",
    "modcrop", "bicubic_downscale", "bicubic_upscale", "to_uint8", "TASKS", "TASK_COLORS",
    "ground_truth", "degrade",
]

# --------------------------------------------------------------------------- colour

def to_gray(img: np.ndarray) -> np.ndarray:
    """uint8 RGB (H, W, 3) -> uint8 gray (H, W) with Pillow's convert('L'); gray is returned as is."""
    if img.ndim == 2:
        return img
    return np.array(Image.fromarray(np.ascontiguousarray(img, dtype=np.uint8), "RGB").convert("L"))


def to_rgb(img: np.ndarray) -> np.ndarray:
    """Gray (H, W) -> (H, W, 3) by replicating the channel; RGB is returned as is."""
    if img.ndim == 2:
        return np.repeat(img[:, :, None], 3, axis=2)
    return img


def rgb_to_y(img: np.ndarray, rounded: bool = True) -> np.ndarray:
    """Y of MATLAB's rgb2ycbcr for a 0..255 RGB image (H, W, 3): (65.481 R + 128.553 G + 24.966 B)
    / 255 + 16. rounded=True gives uint8 (MATLAB on a uint8 image); False gives float64 (MATLAB
    on im2double input, times 255: what the SR evaluation uses). A gray (H, W) image is returned
    unchanged (as float64 when rounded=False)."""
    if img.ndim == 2:
        return img if rounded else img.astype(np.float64)
    a = img.astype(np.float64)
    # the formula as MATLAB writes it (not rgb_to_ycbcr's matrix product: another summation order
    # could round a Y of x.5 the other way and move the CAR protocol's inputs)
    y = (65.481 * a[..., 0] + 128.553 * a[..., 1] + 24.966 * a[..., 2]) / 255.0 + 16.0
    if rounded:
        return to_uint8(y)
    return y


# MATLAB rgb2ycbcr on a 0..255 image: [Y, Cb, Cr] = YCBCR @ [R, G, B] / 255 + [16, 128, 128]
YCBCR = np.array([[65.481, 128.553, 24.966], [-37.797, -74.203, 112.0], [112.0, -93.786, -18.214]])
YCBCR_OFFSET = np.array([16.0, 128.0, 128.0])


def rgb_to_ycbcr(img: np.ndarray) -> np.ndarray:
    """MATLAB's rgb2ycbcr of a 0..255 RGB image (H, W, 3), as float64 (H, W, 3) Y, Cb, Cr, unrounded."""
    return np.asarray(img, dtype=np.float64) @ (YCBCR.T / 255.0) + YCBCR_OFFSET


def ycbcr_to_rgb(ycbcr: np.ndarray) -> np.ndarray:
    """The inverse of rgb_to_ycbcr: float64 RGB (H, W, 3) on 0..255, unrounded and unclamped."""
    return (np.asarray(ycbcr, dtype=np.float64) - YCBCR_OFFSET) @ np.linalg.inv(YCBCR.T / 255.0)


# --------------------------------------------------------------------------- degradations

def noise_seed(base: int, index: int) -> int:
    """Seed for the image at `index` (0-based, in sorted file order): base + index."""
    return int(base) + int(index)


def add_gaussian_noise(img: np.ndarray, sigma: float, seed, quantize: bool = False) -> np.ndarray:
    """img + sigma * N(0, 1) in float64, unclipped and unrounded unless quantize=True (then uint8).

    seed: an int (the evaluation: numpy.random.default_rng(seed).standard_normal of the image's
    shape) or a torch.Generator (training: torch.randn of the image's shape in float64 drawn from
    it, so one generator per sample decides every draw of that sample)."""
    if isinstance(seed, (int, np.integer)):
        noise = np.random.default_rng(seed).standard_normal(img.shape)
    else:
        import torch  # only for generator-driven draws: this module stays numpy-only otherwise

        if not isinstance(seed, torch.Generator):
            raise TypeError(f"add_gaussian_noise: seed must be an int or a torch.Generator, got {type(seed).__name__}")
        noise = torch.randn(img.shape, generator=seed, dtype=torch.float64).numpy()
    noisy = img.astype(np.float64) + float(sigma) * noise
    return to_uint8(noisy) if quantize else noisy


def jpeg(img: np.ndarray, quality: int) -> np.ndarray:
    """Pillow JPEG round trip of a uint8 gray (H, W) or RGB (H, W, 3) image at `quality` (RGB:
    Pillow's default 4:2:0 chroma subsampling, as cameras store); returns uint8 of the same shape."""
    if img.dtype != np.uint8 or not (img.ndim == 2 or (img.ndim == 3 and img.shape[2] == 3)):
        raise ValueError("jpeg expects a uint8 gray (H, W) or RGB (H, W, 3) image")
    mode = "L" if img.ndim == 2 else "RGB"
    buf = io.BytesIO()
    Image.fromarray(img, mode).save(buf, format="JPEG", quality=int(quality))
    buf.seek(0)
    with Image.open(buf) as im:
        return np.array(im.convert(mode), dtype=np.uint8)


def mosaic(img: np.ndarray) -> np.ndarray:
    """GRBG Bayer mosaic of an RGB (H, W, 3) image: (0,0)=G, (0,1)=R, (1,0)=B, (1,1)=G per 2x2
    cell, missing samples zero; same dtype and shape as the input."""
    if img.ndim != 3 or img.shape[2] != 3:
        raise ValueError("mosaic expects an RGB (H, W, 3) image")
    out = np.zeros_like(img)
    out[0::2, 0::2, 1] = img[0::2, 0::2, 1]
    out[0::2, 1::2, 0] = img[0::2, 1::2, 0]
    out[1::2, 0::2, 2] = img[1::2, 0::2, 2]
    out[1::2, 1::2, 1] = img[1::2, 1::2, 1]
    return out


def modcrop(img: np.ndarray, scale: int) -> np.ndarray:
    """Crop the bottom/right so that height and width are multiples of `scale`."""
    h, w = img.shape[:2]
    return img[: h - h % scale, : w - w % scale]


def bicubic_downscale(hr: np.ndarray, scale: int, padding: str = "symmetric") -> np.ndarray:
    """The SR degradation: MATLAB imresize(modcrop(hr, scale), 1/scale, 'bicubic') on uint8.
    ValueError when `hr` is smaller than `scale` in height or width (modcrop leaves nothing)."""
    if min(hr.shape[:2]) < scale:
        raise ValueError(f"image of {hr.shape[0]}x{hr.shape[1]} pixels is smaller than the scale {scale}: "
                         f"nothing is left after cropping to a multiple of {scale}")
    hr = modcrop(hr, scale)
    h, w = hr.shape[:2]
    return imresize(hr, output_shape=(h // scale, w // scale), padding=padding)


def bicubic_upscale(lr: np.ndarray, scale: int) -> np.ndarray:
    """MATLAB imresize(lr, scale, 'bicubic') on uint8: the 'Bicubic' baseline of SR tables."""
    h, w = lr.shape[:2]
    return imresize(lr, output_shape=(h * scale, w * scale))


# --------------------------------------------------------------------------- camera noise
# The idea of going back from sRGB to a camera's linear space, adding shot and read noise there
# and coming forward again is Brooks et al., "Unprocessing Images for Learned Raw Denoising"
# (CVPR 2019), whose ranges are taken for the noise (log shot uniform in [1e-4, 1.2e-2], its top
# cut to 3e-3 here to meet PolyU's levels; log read = 2.18 log shot + 1.2 + N(0, 0.26)) and the
# white-balance gains; the mixture with JPEG and
# plain Gaussian noise follows Zhang et al.'s practical degradation model (ICCV 2021); the noise
# correlated by in-camera processing follows Guo et al.'s CBDNet (CVPR 2019) in spirit; its
# grain is fitted to PolyU_dev's residuals (noisy shot minus mean) in YCbCr, band by band of
# spatial frequency (benchmarks/noise_spectrum.py, MODEL_ZOO.md "rnan_dn_photo"): there the luma
# noise is softened fine grain plus a coarse part, and the chroma noise is blotchy, all of its
# power below 1/8 cycles per pixel (in-camera chroma denoising and 4:2:0 subsampling), whereas
# noise that is white in camera space stays white in luma and in chroma.
PHOTO_AWGN_SHARE = 0.2          # samples with plain Gaussian noise (sigma 5..30) instead
PHOTO_JPEG_SHARE = 0.5          # samples stored as a camera JPEG (quality 70..95)
PHOTO_FINE_BLUR = (0.5, 0.9)    # Gaussian sigma (pixels) of the luma noise's fine grain
PHOTO_COARSE_BLUR = (1.5, 3.0)  # ... of its coarse part
PHOTO_LUMA_COARSE = (0.05, 0.2) # the coarse part's share of the luma noise power
PHOTO_CHROMA_BLUR = (2.5, 4.0)  # Gaussian sigma (pixels) of the chroma noise's grain
PHOTO_CHROMA_GAIN = (0.3, 0.6)  # chroma noise RMS after in-camera chroma denoising, of before
PHOTO_SHOT = (1e-4, 3e-3)       # shot noise variance per unit signal (log-uniform)
_GAMMA = 2.2
# BT.601 RGB -> YCbCr for differences (no offsets), the space in which cameras process noise
YCBCR_601 = YCBCR / np.array([[219.0], [224.0], [224.0]])   # MATLAB's rows without its studio-range gains


def _numpy_rng(seed) -> np.random.Generator:
    """numpy Generator of an int seed, or seeded by one draw of a torch.Generator (training)."""
    if isinstance(seed, (int, np.integer)):
        return np.random.default_rng(int(seed))
    import torch

    if not isinstance(seed, torch.Generator):
        raise TypeError(f"seed must be an int or a torch.Generator, got {type(seed).__name__}")
    return np.random.default_rng(int(torch.randint(0, 2**62, (1,), generator=seed)))


def _random_ccm(rng: np.random.Generator) -> np.ndarray:
    """A camera-to-sRGB colour matrix: negative off-diagonals (-0.6..0), rows summing to 1 (white
    stays white), as cameras' matrices look (diagonals ~1.2-2.2)."""
    m = -rng.uniform(0.0, 0.6, (3, 3))
    np.fill_diagonal(m, 0.0)
    np.fill_diagonal(m, 1.0 - m.sum(axis=1))
    return m


def _grain(noise: np.ndarray, sigma: float) -> np.ndarray:
    """A 2-D noise field blurred by a Gaussian of `sigma` pixels, its variations rescaled to
    their former RMS (so the level stays the shot/read model's; only the grain grows). The mean
    (the gamma curve's bias of noisy values) is kept as it was, not amplified."""
    import cv2

    mean = noise.mean()
    zero = noise - mean
    blurred = cv2.GaussianBlur(zero, (0, 0), sigmaX=sigma, borderType=cv2.BORDER_REFLECT_101)
    rms_in, rms_out = np.sqrt((zero ** 2).mean()), np.sqrt((blurred ** 2).mean())
    return mean + (blurred * (rms_in / rms_out) if rms_out > 0 else blurred)


def _camera_grain(residual: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The sRGB noise `residual` (H, W, 3) as a camera's processing leaves it: in YCbCr, luma
    = sqrt(1 - m) * fine + sqrt(m) * coarse (m drawn from PHOTO_LUMA_COARSE, grains from
    PHOTO_FINE_BLUR / PHOTO_COARSE_BLUR), each chroma channel blotchy (PHOTO_CHROMA_BLUR) and
    weaker (PHOTO_CHROMA_GAIN); back to RGB."""
    ycc = residual @ YCBCR_601.T
    m = rng.uniform(*PHOTO_LUMA_COARSE)
    fine, coarse = rng.uniform(*PHOTO_FINE_BLUR), rng.uniform(*PHOTO_COARSE_BLUR)
    y = ycc[..., 0]
    out = np.empty_like(ycc)
    out[..., 0] = np.sqrt(1.0 - m) * _grain(y, fine) + np.sqrt(m) * _grain(y, coarse)
    gain, blotch = rng.uniform(*PHOTO_CHROMA_GAIN), rng.uniform(*PHOTO_CHROMA_BLUR)
    for c in (1, 2):
        out[..., c] = gain * _grain(np.ascontiguousarray(ycc[..., c]), blotch)
    return out @ np.linalg.inv(YCBCR_601).T


def photo_noise(img: np.ndarray, seed) -> np.ndarray:
    """A camera-like noisy version of a clean uint8 RGB (H, W, 3) image: float64 on 0..255 holding
    integers (an 8-bit photo). seed: an int or a torch.Generator (one per training sample).

    With probability PHOTO_AWGN_SHARE: Gaussian noise of a sigma drawn from 5..30. Otherwise:
    sRGB -> linear (gamma 2.2) -> camera RGB (the inverse of a random colour matrix, the inverse
    of white-balance gains R 1.9..2.4, B 1.5..1.9) -> shot + read noise (variance
    shot * signal + read) -> gains, matrix, gamma back -> the noise (noisy minus clean) given a
    camera's grain (_camera_grain: softened luma, blotchy chroma) -> with probability
    PHOTO_JPEG_SHARE a JPEG at quality 70..95. Rounded and clipped."""
    if img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"photo_noise expects an RGB (H, W, 3) image, got shape {img.shape}")
    rng = _numpy_rng(seed)
    clean = img.astype(np.float64)
    if rng.random() < PHOTO_AWGN_SHARE:
        return np.clip(np.round(clean + rng.uniform(5.0, 30.0) * rng.standard_normal(img.shape)), 0, 255)
    ccm = _random_ccm(rng)
    gains = np.array([rng.uniform(1.9, 2.4), 1.0, rng.uniform(1.5, 1.9)])
    # not clipped: saturated colours leave [0, 1] in camera space, and the way back must return
    # the clean image exactly where the noise is zero
    cam = ((clean / 255.0) ** _GAMMA) @ np.linalg.inv(ccm).T / gains
    log_shot = rng.uniform(*np.log(PHOTO_SHOT))
    read = np.exp(2.18 * log_shot + 1.2 + rng.normal(0.0, 0.26))
    noise = np.sqrt(np.exp(log_shot) * np.clip(cam, 0.0, None) + read) * rng.standard_normal(cam.shape)
    noisy = np.clip(((cam + noise) * gains) @ ccm.T, 0.0, 1.0) ** (1.0 / _GAMMA) * 255.0
    out = to_uint8(clean + _camera_grain(noisy - clean, rng))
    if rng.random() < PHOTO_JPEG_SHARE:
        out = jpeg(out, int(rng.integers(70, 96)))
    return out.astype(np.float64)


# --------------------------------------------------------------------------- task protocols

TASKS = ("denoise_gray", "denoise_rgb", "denoise_photo", "car", "demosaic", "sr")
TASK_COLORS = {"denoise_gray": 1, "car": 1, "denoise_rgb": 3, "denoise_photo": 3, "demosaic": 3, "sr": 3}


def ground_truth(img: np.ndarray, task: str) -> np.ndarray:
    """The clean target of a task for a decoded image (uint8): gray (Pillow convert('L')) for
    denoise_gray, Y of rgb2ycbcr (rounded) for car, RGB for denoise_rgb, denoise_photo and demosaic; sr keeps
    the image as it is (a gray SR ground truth is scored on its gray values: metrics.evaluate)."""
    if task == "denoise_gray":
        return to_gray(img)
    if task == "car":
        return rgb_to_y(img, rounded=True)
    if task in ("denoise_rgb", "denoise_photo", "demosaic"):
        return to_rgb(img)
    if task == "sr":
        return img
    raise ValueError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}")


def degrade(gt: np.ndarray, task: str, *, sigma: float | None = None, quality: int | None = None,
            scale: int = 1, seed=0, quantize_noisy: bool = False,
            resize_padding: str = "symmetric") -> tuple[np.ndarray, np.ndarray]:
    """(ground truth, model input) of a task for a ground truth from ground_truth(): the one
    definition of each degradation, used by `rnan-fast eval` (whole images, int seeds) and by
    training (patches, a torch.Generator per sample as `seed`).

    denoise_gray/rgb: add_gaussian_noise(gt, sigma, seed, quantize_noisy); denoise_photo:
    photo_noise(gt, seed); car: jpeg(gt, quality);
    demosaic: mosaic(gt); sr: bicubic_downscale(to_rgb(gt), scale, resize_padding) and the
    ground truth cropped to a multiple of the scale (ValueError when smaller than the scale)."""
    if task in ("denoise_gray", "denoise_rgb"):
        return gt, add_gaussian_noise(gt, sigma, seed, quantize_noisy)
    if task == "denoise_photo":
        return gt, photo_noise(gt, seed)
    if task == "car":
        return gt, jpeg(gt, quality)
    if task == "demosaic":
        return gt, mosaic(gt)
    if task == "sr":  # bicubic_downscale refuses an image that modcrop would leave empty
        return modcrop(gt, scale), bicubic_downscale(to_rgb(gt), scale, padding=resize_padding)
    raise ValueError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}")
