"""A user's photo through a model: fitted to the model's channels, restored, brought back to
what the photo was (gray stays gray, alpha and 16 bits kept, profile and EXIF written back).

    rnan_fast.restore_file("photo.jpg", "photo_rnan.jpg")                 # the default denoiser
    rnan_fast.restore_file("scan.png", "out.png", model="rnan_dn_gray", device="cuda")

``rnan-fast restore`` runs the same steps (``model_input`` and ``restored_photo``) around its own
tiling and progress bar; ``restore_file`` is the Python form of one file.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from rnan_fast.data import mosaic, rgb_to_ycbcr, to_gray, ycbcr_to_rgb
from rnan_fast.image_io import DEFAULT_MAX_PIXELS, DEFAULT_QUALITY, Photo, read_photo, with_pixels, write_photo

__all__ = ["model_input", "check_strength", "blend", "restored_photo", "restore_file", "LUMA"]

# ITU-R 601-2 luma, the weights of Pillow's convert('L') (the paper's rgb2gray for gray denoising)
LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


def model_input(photo: Photo, n_colors: int | None, task: str | None = None) -> tuple[np.ndarray, str | None]:
    """(the pixels a model of `n_colors` input channels takes, a note when they were converted).
    A gray model gets colour as luma; an RGB model gets gray replicated to three channels
    (restored_photo turns its output back to gray). task "demosaic" (a shipped demosaicing
    model): the photo must be a GRBG Bayer mosaic, one channel (the raw samples) or the
    3-channel zero-filled form of rnan_fast.data.mosaic; ValueError for anything else."""
    pixels = photo.pixels
    if task == "demosaic":
        return _bayer_input(pixels), None
    if task == "car" and pixels.ndim == 3:
        # a Y-channel JPEG model: the luma of MATLAB's rgb2ycbcr (what it was trained on), restored
        # alone; restored_photo puts it back beside the photo's own chroma
        return rgb_to_ycbcr(pixels)[..., 0].astype(np.float32), \
            "JPEG artifacts removed on the luma (Y of rgb2ycbcr); the chroma is kept as decoded"
    if n_colors == 1 and pixels.ndim == 3:
        # 8 bits: Pillow's convert('L'), how the gray test sets are made; 16 bits: the same luma unrounded
        gray = to_gray(pixels.astype(np.uint8)).astype(np.float32) if photo.bit_depth == 8 else pixels @ LUMA
        return gray, "colour converted to gray (ITU-R 601-2 luma, Pillow's convert('L')) for this gray model"
    if n_colors == 3 and pixels.ndim == 2:
        return np.repeat(pixels[:, :, None], 3, axis=2), None
    return pixels, None


def _bayer_input(pixels: np.ndarray) -> np.ndarray:
    """The 3-channel zero-filled GRBG mosaic (H, W, 3) of a one-channel Bayer image, or a
    3-channel one checked to be zero where GRBG has no sample."""
    if pixels.ndim == 2:
        return mosaic(np.repeat(pixels[:, :, None], 3, axis=2))
    if pixels.ndim == 3 and np.array_equal(mosaic(pixels), pixels):
        return pixels
    raise ValueError("a demosaicing model takes a GRBG Bayer mosaic: a one-channel image of the raw samples "
                     "((0,0)=G, (0,1)=R, (1,0)=B, (1,1)=G), or the 3-channel form with the missing samples "
                     "zero; this image is a full colour one")


def check_strength(strength: float, scale: int, task: str | None) -> None:
    """ValueError unless 0 <= strength <= 1 and, for strength < 1, the model keeps the image's
    size and meaning (a blend of output and input: not SR, not demosaicing)."""
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength must be within 0..1, got {strength:g}")
    if strength < 1 and (scale != 1 or task == "demosaic"):
        what = f"an x{scale} super-resolution model" if scale != 1 else "a demosaicing model"
        raise ValueError(f"strength blends the restored image with its input, which needs a model that keeps "
                         f"the input's size and colours (denoising, JPEG artifacts), not {what}")


def blend(model_in: np.ndarray, restored: np.ndarray, strength: float) -> np.ndarray:
    """strength * restored + (1 - strength) * input (the model's input pixels): 1 is the full
    restoration, 0 the input; a weaker denoising keeps more texture (and more noise)."""
    if strength == 1:
        return restored
    return (strength * restored + (1.0 - strength) * model_in).astype(np.float32)


def restored_photo(photo: Photo, restored: np.ndarray, scale: int = 1, task: str | None = None) -> Photo:
    """The photo with the model's output (float (s*H, s*W[, 3]) on 0..255) as its pixels: a gray
    photo restored by an RGB model becomes gray again (luma; not for task "demosaic", whose gray
    input is a mosaic), a colour photo's luma restored by a Y-channel JPEG model (task "car") is
    recombined with the photo's own chroma, an SR output's alpha is resized."""
    if task == "car" and not photo.gray and restored.ndim == 2:
        ycbcr = rgb_to_ycbcr(photo.pixels)
        ycbcr[..., 0] = restored
        restored = ycbcr_to_rgb(ycbcr)
    elif photo.gray and restored.ndim == 3 and task != "demosaic":
        restored = restored @ LUMA
    return with_pixels(photo, np.asarray(restored, dtype=np.float32), scale)


def _resolve_model(model, device, dtype):
    """(the model on device/dtype in eval mode, its card or None) of restore_file's `model`."""
    import torch

    from rnan_fast.inference import place_model
    from rnan_fast.model import RNAN

    card = None
    if model is None or isinstance(model, (str, os.PathLike)):
        from rnan_fast import weights

        name = weights.DEFAULT_MODEL if model is None else model
        path = Path(name)
        if path.suffix and path.exists():
            net = RNAN.from_checkpoint(str(path))
        else:
            net, card = weights.load_with_card(str(name))   # one read of the card: weights, task, tiles
    elif isinstance(model, torch.nn.Module):
        net = model
    else:
        raise TypeError(f"model must be an nn.Module, a shipped model's name or a checkpoint path, got "
                        f"{type(model).__name__}")
    return place_model(net, device, dtype), card


def restore_file(path_in: str | os.PathLike, path_out: str | os.PathLike, model=None, *, device: str = "cpu",
                 precision: str = "auto", tile: int | str | None = "auto", overlap: int | None = None,
                 chop: bool = False, self_ensemble: bool = False, pixel_shuffle: int = 1, strength: float = 1.0,
                 quality: int = DEFAULT_QUALITY, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> list[str]:
    """Restore one image file into another, keeping what the photo carries (rnan_fast.image_io):
    orientation applied, ICC profile and EXIF written back, alpha, 16 bits and gray kept where
    the output format holds them. The output format follows path_out's suffix (.png, .jpg,
    .webp, .tif/.tiff); its folder must exist; the write is atomic.

    model: an RNAN (or any image-to-image nn.Module with .config / .scale), a shipped model's
    name (`rnan-fast models`), a checkpoint path, or None for the default denoiser.
    precision: "auto" (bf16 on CPUs with native bf16 arithmetic, else fp32: inference.auto_precision),
    "fp32", "bf16" or "fp16". tile: "auto" (CPU: images larger than the model's tile run in its
    overlapping tiles, as the command line does), None (whole image) or a tile side in pixels;
    overlap: None for the model's own (inference.cpu_tiling); chop, self_ensemble,
    pixel_shuffle (2 for real camera photos): as rnan_fast.inference.restore_tensor.
    strength: 0..1, the share of the restored image in the output (blend with the input; models
    that keep the size, not SR or demosaicing). quality: JPEG / WebP quality.
    Returns notes on what had to change (e.g. alpha dropped for a JPEG output).
    Raises rnan_fast.image_io.ImageReadError for an unreadable input, ValueError for an input
    the model does not take (a full colour image for a demosaicing model)."""
    import torch

    from rnan_fast.inference import (DTYPES, auto_precision, auto_tile, check_pixel_shuffle, cpu_tiling,
                                     model_colors, model_scale, restore_array, task_period, tile_batch_for)

    device = torch.device(device)
    dtype = DTYPES[auto_precision(device) if precision == "auto" else precision]
    net, card = _resolve_model(model, device, dtype)
    task = card["task"] if card else None
    own_tile, own_overlap = cpu_tiling(card)
    overlap = own_overlap if overlap is None else overlap
    check_strength(strength, model_scale(net), task)
    period = task_period(task)
    check_pixel_shuffle(pixel_shuffle, model_scale(net), period)
    photo = read_photo(path_in, max_pixels=max_pixels)
    pixels, note = model_input(photo, model_colors(net), task)
    notes = list(photo.notes) + ([note] if note else [])
    if tile == "auto":
        tiling = None if chop else auto_tile(net, *pixels.shape[:2], device, (own_tile, overlap), int(pixel_shuffle))
        tile, overlap = tiling or (None, overlap)
    restored = restore_array(net, pixels, device=device, dtype=dtype, tile=tile, overlap=overlap, chop=chop,
                             self_ensemble=self_ensemble, period=period,
                             tile_batch=tile_batch_for(device), pixel_shuffle=pixel_shuffle)
    out = restored_photo(photo, blend(pixels, restored, strength), model_scale(net), task)
    return notes + write_photo(path_out, out, quality=quality)
