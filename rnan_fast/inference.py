"""Whole-image, tiled, chopped and self-ensembled inference for image-to-image models.

Every function takes a `model` mapping (B, C, H, W) to (B, C', s*H, s*W) (s: the model's scale;
1 for denoising, CAR and demosaicking) and a float tensor x of shape (B, C, H, W) on the model's
device, values on the model's scale (0..255 for RNAN). They return (B, C', s*H, s*W) and run
no autograd of their own: call them under torch.inference_mode() (``restore_tensor`` does).

- whole image (default): ``model(x)``.
- ``forward_tiled``: overlapping square tiles of side `tile` (input pixels), neighbours overlapping
  by at least `overlap`; each output pixel comes from exactly one tile, the one whose interior it
  lies in (the seam sits in the middle of each overlap, so every kept pixel is at least
  overlap // 2 input pixels from a cut edge). For a model whose receptive field reaches at most
  overlap // 2 pixels, the result equals whole-image inference exactly. Any image size; the last
  tile in each row/column is shifted back to end at the border; images no larger than one tile
  run whole.
- ``forward_chop``: the official RNAN ``forward_chop``: split into four overlapping quadrants
  whose sides are ``4 * floor((side // 2) / 4) + 12`` (the "adaptive shave": a multiple of 4
  plus a 12-pixel margin), recurse into a quadrant while its area is at least `min_size`
  (10,000 pixels for scale 1, 30,000 for SR, the official defaults), run the model on each
  quadrant, and paste the quadrants' outer parts at the split lines. The official code always
  splits at least once; unlike the official code, a quadrant side is capped at the image side,
  so that tiny images (side < 24) do not produce wrong-sized slices.
- ``forward_x8``: the official self-ensemble (RNAN+): the model runs on the 8 flips/transposes
  of x (index i: bit 0 flips W, bit 1 flips H, bit 2 transposes H and W, applied in that order),
  each output is mapped back by the inverse transform, and the 8 are averaged.

``restore_tensor`` combines them (with an optional per-call progress callback: one call per
tile, per quadrant, per ensemble member); ``restore_array`` wraps it for numpy images (float
out), ``restore_image`` for uint8 out. Given a `device`, restore_tensor keeps the image where
it is (the host) and moves only what one model call takes (a tile, a quadrant, a whole image)
to the device and its output back, so tiled inference holds one tile on the GPU and the image
size is bounded by host memory. Given `oom_retry`, a CUDA out-of-memory error reruns the image
in tiles of half the side that failed, halving until it fits (``OOM_MIN_TILE``).

``auto_tile`` decides when whole-image inference on the CPU would take too long: the non-local
blocks cost (H*W)^2 scores each, so past a few hundred pixels a side they dominate everything
and overlapping tiles are far cheaper (see AUTO_TILE_SECONDS). The GPU always runs whole images.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from torch import Tensor

from rnan_fast.imresize import to_uint8

__all__ = ["model_scale", "model_colors", "forward_tiled", "forward_chop", "forward_x8",
           "restore_tensor", "restore_array", "restore_image", "DTYPES", "nonlocal_blocks", "attention_scores",
           "attention_seconds", "cpu_attention_path", "auto_tile", "model_calls", "tile_count", "chop_calls",
           "AUTO_TILE", "AUTO_TILE_SECONDS", "CPU_NS_PER_SCORE", "OOM_MIN_TILE"]

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

Forward = Callable[[Tensor], Tensor]
Progress = Callable[[int, int], None]   # (model calls done, model calls in all)


def _config_value(model, key: str, default):
    cfg = getattr(model, "config", None)
    if isinstance(cfg, dict) and key in cfg:
        value = cfg[key]
    elif cfg is not None and hasattr(cfg, key):
        value = getattr(cfg, key)
    else:
        value = getattr(model, key, default)
    if isinstance(value, (list, tuple)):
        value = value[0]
    return value


def model_scale(model) -> int:
    """The model's upscaling factor: config["scale"] or .scale (first entry of a list), else 1."""
    return int(_config_value(model, "scale", 1))


def model_colors(model) -> int | None:
    """The model's input channels: config["n_colors"] or .n_colors, else None (unknown)."""
    value = _config_value(model, "n_colors", None)
    return None if value is None else int(value)


# --------------------------------------------------------------------------- tiles

def _tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    if length <= tile:
        return [0]
    stride = tile - overlap
    starts = list(range(0, length - tile, stride))
    starts.append(length - tile)
    return starts


def _owned(starts: list[int], tile: int, length: int) -> list[tuple[int, int]]:
    """[lo, hi) of the input range each tile contributes: seams in the middle of each overlap."""
    size = min(tile, length)
    bounds = [0]
    for a, b in zip(starts[:-1], starts[1:]):
        bounds.append((b + a + size) // 2)
    bounds.append(length)
    return list(zip(bounds[:-1], bounds[1:]))


def tile_count(h: int, w: int, tile: int, overlap: int) -> int:
    """How many tiles forward_tiled runs on an h x w input."""
    return len(_tile_starts(h, tile, overlap)) * len(_tile_starts(w, tile, overlap))


def forward_tiled(model: Forward, x: Tensor, tile: int, overlap: int = 32, scale: int = 1) -> Tensor:
    """Tiled inference. x: (B, C, H, W) -> (B, C', scale*H, scale*W).

    tile: tile side in input pixels (>= 1); overlap: minimum overlap of neighbouring tiles in
    input pixels (0 <= overlap < tile). Tiles run one at a time (peak memory of one tile).
    """
    tile, overlap, scale = int(tile), int(overlap), int(scale)
    if tile < 1:
        raise ValueError(f"tile must be a positive number of pixels, got {tile}")
    if not 0 <= overlap < tile:
        raise ValueError(f"overlap must satisfy 0 <= overlap < tile ({tile}), got {overlap}")
    _, _, h, w = x.shape
    ys, xs = _tile_starts(h, tile, overlap), _tile_starts(w, tile, overlap)
    if len(ys) == 1 and len(xs) == 1:
        return model(x)
    th, tw = min(tile, h), min(tile, w)
    out = None
    for y0, (ylo, yhi) in zip(ys, _owned(ys, tile, h)):
        for x0, (xlo, xhi) in zip(xs, _owned(xs, tile, w)):
            piece = model(x[:, :, y0:y0 + th, x0:x0 + tw])
            if piece.shape[-2:] != (th * scale, tw * scale):
                raise ValueError(f"the model maps a {th}x{tw} tile to {tuple(piece.shape[-2:])}, expected "
                                 f"{th * scale}x{tw * scale} (scale {scale})")
            if out is None:
                out = piece.new_empty(x.shape[0], piece.shape[1], h * scale, w * scale)
            out[:, :, ylo * scale:yhi * scale, xlo * scale:xhi * scale] = \
                piece[:, :, (ylo - y0) * scale:(yhi - y0) * scale, (xlo - x0) * scale:(xhi - x0) * scale]
    return out


# --------------------------------------------------------------------------- official chop

CHOP_SHAVE_MULTIPLE = 4   # the official "shave_scale": down/up-sampling factor in the mask branch
CHOP_MARGIN = 12          # the official "shave_size_max"


def chop_min_size(scale: int) -> int:
    """The official forward_chop threshold (quadrant area): 10,000 for scale 1, 30,000 for SR."""
    return 10000 if int(scale) == 1 else 30000


def _chop_split(h: int, w: int, min_size: int) -> tuple[int, int, bool]:
    """(quadrant height, quadrant width, whether the quadrants are leaves) of an h x w input."""
    h_size = min(h, ((h // 2) // CHOP_SHAVE_MULTIPLE) * CHOP_SHAVE_MULTIPLE + CHOP_MARGIN)
    w_size = min(w, ((w // 2) // CHOP_SHAVE_MULTIPLE) * CHOP_SHAVE_MULTIPLE + CHOP_MARGIN)
    return h_size, w_size, h_size * w_size < min_size or (h_size == h and w_size == w)


def chop_calls(h: int, w: int, scale: int = 1, min_size: int | None = None) -> int:
    """How many model calls forward_chop makes on an h x w input."""
    min_size = chop_min_size(scale) if min_size is None else int(min_size)
    h_size, w_size, leaves = _chop_split(h, w, min_size)
    return 4 if leaves else 4 * chop_calls(h_size, w_size, scale, min_size)


def forward_chop(model: Forward, x: Tensor, scale: int = 1, min_size: int | None = None) -> Tensor:
    """The official recursive quadrant inference. x: (B, C, H, W) -> (B, C', scale*H, scale*W)."""
    scale = int(scale)
    min_size = chop_min_size(scale) if min_size is None else int(min_size)
    _, _, h, w = x.shape
    h_half, w_half = h // 2, w // 2
    h_size, w_size, leaves = _chop_split(h, w, min_size)
    quads = [x[:, :, :h_size, :w_size], x[:, :, :h_size, w - w_size:],
             x[:, :, h - h_size:, :w_size], x[:, :, h - h_size:, w - w_size:]]
    if leaves:
        outs = [model(q) for q in quads]
    else:
        outs = [forward_chop(model, q, scale, min_size) for q in quads]
    H, W, hh, wh, hs, ws = (scale * v for v in (h, w, h_half, w_half, h_size, w_size))
    out = outs[0].new_empty(x.shape[0], outs[0].shape[1], H, W)
    out[:, :, :hh, :wh] = outs[0][:, :, :hh, :wh]
    out[:, :, :hh, wh:] = outs[1][:, :, :hh, ws - W + wh:]
    out[:, :, hh:, :wh] = outs[2][:, :, hs - H + hh:, :wh]
    out[:, :, hh:, wh:] = outs[3][:, :, hs - H + hh:, ws - W + wh:]
    return out


# --------------------------------------------------------------------------- self-ensemble

def _transform(v: Tensor, i: int) -> Tensor:
    if i & 1:
        v = v.flip(-1)
    if i & 2:
        v = v.flip(-2)
    if i & 4:
        v = v.transpose(-2, -1)
    return v


def _untransform(v: Tensor, i: int) -> Tensor:
    if i & 4:
        v = v.transpose(-2, -1)
    if i & 2:
        v = v.flip(-2)
    if i & 1:
        v = v.flip(-1)
    return v


def forward_x8(forward: Forward, x: Tensor) -> Tensor:
    """Self-ensemble: mean over the 8 dihedral transforms. x: (B, C, H, W) -> forward's shape.

    The mean is accumulated in float32 (float64 stays float64) and returned in the outputs' dtype.
    """
    acc, out_dtype = None, None
    for i in range(8):
        y = _untransform(forward(_transform(x, i).contiguous()), i)
        out_dtype = y.dtype
        y = y.to(torch.float64 if y.dtype == torch.float64 else torch.float32)
        acc = y.clone() if acc is None else acc.add_(y)
    return (acc / 8).to(out_dtype)


# --------------------------------------------------------------------------- CPU auto-tiling

# What whole-image inference costs on the CPU is the non-local attention: every non-local block
# (2 in RNAN, at full resolution) scores all N^2 query-key pairs, N = H * W, while the convs grow
# with N only. Per score (fp32, d = 32, B = 1, column softmax, 2-core Xeon with AVX-512, torch
# 2.14.1, 2026-12-01): the reference path 8.2-10.8 ns at N = 96^2..128^2 and 32768 (the table
# of the CPU attention work, a quiet machine); the fused C++ kernel 2.7 ns at N = 128^2 in a run
# where the reference took 86 ns, i.e. on a machine loaded ~8x (BENCHMARKS.md, CPU section). The
# figures below are the quiet-machine reference and a rounded-up kernel figure. Past
# AUTO_TILE_SECONDS (20 s) of attention a whole image is not worth the wait: 2 blocks reach it at
# N ~ 31,600 (~178^2 pixels) on the reference and N ~ 70,700 (~266^2) on the kernel. A 512x512
# image whole needs 1.4e11 scores (~23 min on the reference, ~5 min on the kernel); in 128-pixel
# tiles overlapping by 32 (25 tiles of N = 16,384) it needs 1.3e10 (~2 min, ~27 s) plus ~1.6x
# the conv work of the whole image (the overlaps).
CPU_NS_PER_SCORE = {"reference": 10.0, "extension": 2.0}
AUTO_TILE_SECONDS = 20.0
AUTO_TILE = 128


def nonlocal_blocks(model) -> int:
    """How many non-local blocks `model` holds (each costs N^2 scores per call); 0 if unknown."""
    from rnan_fast.modules import NonLocalBlock2D

    modules = getattr(model, "modules", None)
    return sum(isinstance(m, NonLocalBlock2D) for m in modules()) if callable(modules) else 0


def attention_scores(model, h: int, w: int) -> int:
    """Query-key scores one whole-image forward of `model` on an h x w input computes."""
    n = int(h) * int(w)
    return nonlocal_blocks(model) * n * n


def cpu_attention_path(dtype: torch.dtype = torch.float32) -> str:
    """The kernel that CPU attention of `dtype` takes under the current backend: "extension"
    (the fused C++ kernel: built, fp32/bf16, backend not "reference") or "reference"."""
    from rnan_fast import _ext
    from rnan_fast._backend import get_backend

    if _ext.EXTENSION_ATTENTION and get_backend() != "reference" and dtype in (torch.float32, torch.bfloat16):
        return "extension"
    return "reference"


def attention_seconds(model, h: int, w: int, dtype: torch.dtype = torch.float32) -> float:
    """Estimated CPU time of the attention in one whole-image forward (CPU_NS_PER_SCORE)."""
    return attention_scores(model, h, w) * CPU_NS_PER_SCORE[cpu_attention_path(dtype)] * 1e-9


def auto_tile(model, h: int, w: int, device: torch.device | str, dtype: torch.dtype = torch.float32) -> int | None:
    """The tile side for an h x w image when whole-image attention would take more than
    AUTO_TILE_SECONDS on the CPU; None (whole image) otherwise, and always on other devices
    (the GPU kernels take whole images)."""
    if torch.device(device).type != "cpu" or attention_seconds(model, h, w, dtype) <= AUTO_TILE_SECONDS:
        return None
    return AUTO_TILE


def model_calls(h: int, w: int, tile: int | None = None, overlap: int = 32, chop: bool = False,
                self_ensemble: bool = False, scale: int = 1) -> int:
    """How many model calls restore_tensor makes on an h x w input with these options (the
    total its progress callback counts to). Self-ensemble members 4..7 see the transposed size."""
    def calls(hh, ww):
        if tile is not None:
            return tile_count(hh, ww, tile, overlap)
        return chop_calls(hh, ww, scale) if chop else 1
    if not self_ensemble:
        return calls(h, w)
    return 4 * calls(h, w) + 4 * calls(w, h)


# --------------------------------------------------------------------------- entry points

def _counting(model: Forward, total: int, progress: Progress) -> Forward:
    done = 0

    def forward(v: Tensor) -> Tensor:
        nonlocal done
        out = model(v)
        done += 1
        progress(done, total)
        return out
    return forward


# The smallest tile an out-of-memory retry tries: a 64x64 tile of RNAN holds 1 MiB per 64-channel
# fp32 feature map, so a GPU that cannot take it has no memory to speak of, and smaller tiles
# would mostly be overlap (32 pixels by default).
OOM_MIN_TILE = 64


def _on_device(model: Forward, device, dtype, home: torch.device) -> Forward:
    """model with each input moved to `device` / `dtype` and each output back to `home`."""
    def forward(v: Tensor) -> Tensor:
        return model(v.to(device=device, dtype=dtype)).to(home)
    return forward


def restore_tensor(model, x: Tensor, tile: int | None = None, overlap: int = 32, chop: bool = False,
                   self_ensemble: bool = False, scale: int | None = None,
                   progress: Progress | None = None, device: torch.device | str | None = None,
                   dtype: torch.dtype | None = None, oom_retry: Callable[[int], None] | None = None,
                   period: int = 1) -> Tensor:
    """Restore a batch. x: (B, C, H, W) float, 0..255 values; returns (B, C', scale*H, scale*W)
    in the model's output dtype, unclamped, on x's device.

    tile: tiled inference with tiles of `tile` input pixels overlapping by `overlap` (None:
    whole image). chop: the official forward_chop instead (not combinable with tile).
    self_ensemble: average over the 8 flips/transposes (wraps whichever of the above runs).
    scale: the model's scale (default: read from model.config / model.scale).
    progress: called as progress(done, total) after each model call (a tile, a chop quadrant,
    a whole image; total = model_calls(...)), e.g. to drive a progress bar. A retry (oom_retry)
    counts again from 1 with its own total.
    device, dtype: where and in what dtype the model runs (None: x's own). x stays where it is
    (e.g. the host); each model call's input alone is moved there and its output back, so tiled
    inference holds one tile (and its activations) on the device, never the whole image.
    oom_retry: when given, a torch.OutOfMemoryError (CUDA) of a whole-image or tiled run frees
    the cache and reruns the image in tiles of half the side that failed (the image's longer
    side, or `tile`), overlap min(overlap, tile // 2), halving until it fits; oom_retry(tile) is
    called once, before the first retry, with the first tile tried. Below OOM_MIN_TILE, and with
    chop (the official quadrants are kept as they are), the error propagates.
    period: the input repeats a pattern every `period` pixels (2: the GRBG mosaic a demosaicing
    model reads). Every model call must then see the pattern in its own phase: the image is
    zero-padded at the bottom and right to a multiple of `period` (zeros are what a mosaic's
    missing samples hold) and the output cropped back; tile and overlap must be multiples of
    it, so that every tile and chop quadrant starts on the pattern; self_ensemble is refused
    (its flips and transposes move the pattern).
    """
    if tile is not None and chop:
        raise ValueError("choose tiled inference (tile) or the official chop, not both")
    if x.dim() != 4:
        raise ValueError(f"expected a (B, C, H, W) tensor, got shape {tuple(x.shape)}")
    s = model_scale(model) if scale is None else int(scale)
    if period > 1:
        if self_ensemble:
            raise ValueError(f"self-ensemble flips and transposes the image, which moves its {period}x{period} "
                             f"pattern (a Bayer mosaic): not for this model")
        if tile is not None and (tile % period or overlap % period):
            raise ValueError(f"tile ({tile}) and overlap ({overlap}) must be multiples of {period}, so that every "
                             f"tile starts on the image's {period}x{period} pattern (a Bayer mosaic)")
    h, w = x.shape[-2:]
    if h % period or w % period:
        x = torch.nn.functional.pad(x, (0, (-w) % period, 0, (-h) % period))
    run = dict(overlap=overlap, chop=chop, self_ensemble=self_ensemble, s=s, progress=progress)
    if device is not None or dtype is not None:
        model = _on_device(model, device, dtype, x.device)
    if oom_retry is None or chop:
        return _restore(model, x, tile, **run)[..., : s * h, : s * w]
    side = max(x.shape[-2:]) if tile is None else int(tile)
    told = False
    while True:
        try:
            return _restore(model, x, tile, **run)[..., : s * h, : s * w]
        except torch.OutOfMemoryError:
            side = side // 2 // period * period
            if side < OOM_MIN_TILE:
                raise
        # outside the except block: the failed attempt's tensors (held by its traceback) are gone
        torch.cuda.empty_cache()
        tile, run["overlap"] = side, min(overlap, side // 2) // period * period
        if not told:
            told = True
            oom_retry(side)


def _restore(model: Forward, x: Tensor, tile: int | None, overlap: int, chop: bool, self_ensemble: bool,
             s: int, progress: Progress | None) -> Tensor:
    """One attempt of restore_tensor (model already wrapped to take x where it is; s: its scale)."""
    if progress is not None:
        model = _counting(model, model_calls(x.shape[-2], x.shape[-1], tile, overlap, chop, self_ensemble, s),
                          progress)
    if tile is not None:
        def forward(v):
            return forward_tiled(model, v, tile, overlap, s)
    elif chop:
        def forward(v):
            return forward_chop(model, v, s)
    else:
        forward = model
    with torch.inference_mode():
        return forward_x8(forward, x) if self_ensemble else forward(x)


def restore_array(model, img: np.ndarray, device: torch.device | str = "cpu",
                  dtype: torch.dtype = torch.float32, **kwargs) -> np.ndarray:
    """Restore one image without quantising. img: (H, W) or (H, W, C) array on the 0..255 scale
    (uint8 or float, e.g. a 16-bit photo divided by 257); returns float32 (H', W') or
    (H', W', C') (H' = scale*H), neither rounded nor clamped, so that detail finer than one 8-bit
    step survives for 16-bit outputs. The model must already be on `device` in `dtype`; the
    image stays on the host and each model call's input alone goes to `device`; kwargs go to
    restore_tensor (e.g. oom_retry). Raises FloatingPointError (an ArithmeticError) when the
    output holds NaN or inf."""
    a = np.asarray(img, dtype=np.float32)
    gray = a.ndim == 2
    t = torch.from_numpy(np.ascontiguousarray(a[None, None] if gray else a.transpose(2, 0, 1)[None]))
    y = restore_tensor(model, t, device=device, dtype=dtype, **kwargs)[0].float().numpy()
    if not np.isfinite(y).all():
        hint = " (fp16 overflow? try bf16 or fp32)" if dtype == torch.float16 else ""
        raise FloatingPointError(f"the model produced non-finite values{hint}")
    return y[0] if y.shape[0] == 1 else y.transpose(1, 2, 0)


def restore_image(model, img: np.ndarray, device: torch.device | str = "cpu",
                  dtype: torch.dtype = torch.float32, **kwargs) -> np.ndarray:
    """restore_array, then rounded half away from zero and clamped to uint8 (H', W') or
    (H', W', C')."""
    return to_uint8(restore_array(model, img, device=device, dtype=dtype, **kwargs))
