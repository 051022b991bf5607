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
- ``shuffle_down`` / ``shuffle_up``: pixel-shuffle downsampling (Zhou et al., "When AWGN-based
  Denoiser Meets Real Noises", AAAI 2020): the image split into its k*k stride-k sub-images,
  each restored as an image of its own, then interleaved back. Camera noise is correlated over
  neighbouring pixels (demosaicing, in-camera denoising, JPEG); in a stride-2 sub-image those
  neighbours are gone, so a denoiser trained on white noise sees noise closer to white. It
  costs fine detail (each sub-image holds a quarter of the samples): it serves real photos
  (PolyU_dev, the default denoiser: +0.52 dB), not white noise (CBSD68 at sigma 15: -2.1 dB).

``restore_tensor`` combines them (with an optional per-call progress callback: one call per
tile, per quadrant, per ensemble member); ``restore_array`` wraps it for numpy images (float
out), ``restore_image`` for uint8 out. Given a `device`, restore_tensor keeps the image where
it is (the host) and moves only what one model call takes (a tile, a quadrant, a whole image)
to the device and its output back, so tiled inference holds one tile on the GPU and the image
size is bounded by host memory. Given `oom_retry`, a CUDA out-of-memory error reruns the image
in tiles of half the side that failed, halving until it fits (``OOM_MIN_TILE``).

``auto_tile`` tiles CPU inference: the non-local blocks cost (H*W)^2 scores each, so on the CPU
every image larger than the model's tile runs in overlapping tiles (see CPU_TILE); the GPU runs
whole images. ``auto_precision`` picks bf16 on CPUs with native bf16 arithmetic.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from torch import Tensor

from rnan_fast.imresize import to_uint8

__all__ = ["model_scale", "model_colors", "forward_tiled", "forward_chop", "forward_x8",
           "restore_tensor", "restore_array", "restore_image", "DTYPES", "nonlocal_blocks", "cpu_tiling",
           "auto_tile", "auto_precision", "model_calls", "tile_count", "chop_calls", "CPU_TILE", "CPU_OVERLAP",
           "CPU_TILE_BATCH", "place_model", "tile_batch_for",
           "OOM_MIN_TILE", "shuffle_down", "shuffle_up", "check_pixel_shuffle"]

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


def forward_tiled(model: Forward, x: Tensor, tile: int, overlap: int = 32, scale: int = 1,
                  tile_batch: int = 1) -> Tensor:
    """Tiled inference. x: (B, C, H, W) -> (B, C', scale*H, scale*W).

    tile: tile side in input pixels (>= 1); overlap: minimum overlap of neighbouring tiles in
    input pixels (0 <= overlap < tile). tile_batch: tiles per model call, stacked along the
    batch axis (all tiles have one size; fewer, larger convolution calls: 1.16x faster per tile
    at 64x64 in bf16 with 4, BENCHMARKS.md); peak memory is that of tile_batch tiles.
    """
    tile, overlap, scale, tile_batch = int(tile), int(overlap), int(scale), int(tile_batch)
    if tile < 1:
        raise ValueError(f"tile must be a positive number of pixels, got {tile}")
    if not 0 <= overlap < tile:
        raise ValueError(f"overlap must satisfy 0 <= overlap < tile ({tile}), got {overlap}")
    if tile_batch < 1:
        raise ValueError(f"tile_batch must be >= 1, got {tile_batch}")
    b, _, h, w = x.shape
    ys, xs = _tile_starts(h, tile, overlap), _tile_starts(w, tile, overlap)
    if len(ys) == 1 and len(xs) == 1:
        return model(x)
    th, tw = min(tile, h), min(tile, w)
    places = [(y0, x0, ylo, yhi, xlo, xhi) for y0, (ylo, yhi) in zip(ys, _owned(ys, tile, h))
              for x0, (xlo, xhi) in zip(xs, _owned(xs, tile, w))]
    out = None
    for first in range(0, len(places), tile_batch):
        group = places[first:first + tile_batch]
        tiles = [x[:, :, y0:y0 + th, x0:x0 + tw] for y0, x0, *_ in group]
        pieces = model(torch.cat(tiles) if len(tiles) > 1 else tiles[0])
        if pieces.shape[-2:] != (th * scale, tw * scale):
            raise ValueError(f"the model maps a {th}x{tw} tile to {tuple(pieces.shape[-2:])}, expected "
                             f"{th * scale}x{tw * scale} (scale {scale})")
        if out is None:
            out = pieces.new_empty(b, pieces.shape[1], h * scale, w * scale)
        for k, (y0, x0, ylo, yhi, xlo, xhi) in enumerate(group):
            out[:, :, ylo * scale:yhi * scale, xlo * scale:xhi * scale] = \
                pieces[k * b:(k + 1) * b, :, (ylo - y0) * scale:(yhi - y0) * scale,
                       (xlo - x0) * scale:(xhi - x0) * scale]
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


def task_period(task: str | None) -> int:
    """The pattern period of a task's input (restore_tensor's `period`): 2 for "demosaic" (a
    GRBG mosaic repeats every 2x2 pixels, so every model call must start on it), else 1."""
    return 2 if task == "demosaic" else 1


# --------------------------------------------------------------------------- pixel-shuffle downsampling

def check_pixel_shuffle(k: int, scale: int = 1, period: int = 1) -> None:
    """ValueError unless pixel-shuffle downsampling by k applies: k >= 1 (1: off); k > 1 only for
    a model that keeps the size (scale 1) on images without a pattern (period 1)."""
    if int(k) < 1:
        raise ValueError(f"pixel_shuffle must be >= 1 (1: off), got {k}")
    if int(k) > 1 and (scale != 1 or period > 1):
        what = f"scale {scale}" if scale != 1 else f"a {period}x{period} pattern (a Bayer mosaic)"
        raise ValueError(f"pixel-shuffle downsampling takes models that keep the size (denoising, JPEG), on "
                         f"images without a pattern; this one has {what}")


def shuffle_down(x: Tensor, k: int) -> Tensor:
    """The k*k stride-k sub-images of x as a batch. x: (B, C, H, W) -> (B*k*k, C, ceil(H/k),
    ceil(W/k)), image b's sub-image (i, j) (the pixels x[b, :, i::k, j::k]) at index
    b*k*k + i*k + j. An H or W that k does not divide is first padded at the bottom / right by
    repeating the last row / column (shuffle_up's caller crops it off)."""
    k = int(k)
    h, w = x.shape[-2:]
    if h % k or w % k:
        x = torch.nn.functional.pad(x, (0, (-w) % k, 0, (-h) % k), mode="replicate")
    b, c, hp, wp = x.shape
    return (torch.nn.functional.pixel_unshuffle(x, k).view(b, c, k * k, hp // k, wp // k)
            .transpose(1, 2).reshape(b * k * k, c, hp // k, wp // k))


def shuffle_up(y: Tensor, k: int) -> Tensor:
    """shuffle_down's inverse: (B*k*k, C, h, w) -> (B, C, k*h, k*w), sub-images interleaved
    back (the padding of shuffle_down is still there: crop to the input's size)."""
    k = int(k)
    n, c, h, w = y.shape
    b = n // (k * k)
    return torch.nn.functional.pixel_shuffle(y.view(b, k * k, c, h, w).transpose(1, 2).reshape(b, c * k * k, h, w), k)


# --------------------------------------------------------------------------- CPU auto-tiling

# On the CPU every image larger than one tile runs in overlapping tiles of the model's own size.
# What a tile costs is mostly the non-local attention: each of RNAN's 2 non-local blocks scores
# all N^2 query-key pairs of its input (N = tile side^2), so the attention per output pixel grows
# with the tile's area while the convolutions' does not; whole-image attention measured no PSNR
# over tiles (MODEL_ZOO.md), and the shipped models were trained on 48-64 pixel patches.
# Measured for the default denoiser (BENCHMARKS.md, "Restore on the CPU"): CPU_TILE / CPU_OVERLAP
# below. A shipped model's card may name its own ("inference": {"cpu_tile": T, "cpu_overlap": P}).
CPU_TILE = 64
CPU_OVERLAP = 16
CPU_TILE_BATCH = 4   # tiles per model call on the CPU (forward_tiled)


def nonlocal_blocks(model) -> int:
    """How many non-local blocks `model` holds (each costs N^2 scores per call); 0 if unknown."""
    from rnan_fast.modules import NonLocalBlock2D

    modules = getattr(model, "modules", None)
    return sum(isinstance(m, NonLocalBlock2D) for m in modules()) if callable(modules) else 0


def cpu_tiling(card: dict | None = None) -> tuple[int, int]:
    """(tile, overlap) of CPU inference: a model card's "inference" entry, else (CPU_TILE,
    CPU_OVERLAP)."""
    entry = (card or {}).get("inference") or {}
    return int(entry.get("cpu_tile", CPU_TILE)), int(entry.get("cpu_overlap", CPU_OVERLAP))


def auto_tile(model, h: int, w: int, device: torch.device | str,
              tiling: tuple[int, int] = (CPU_TILE, CPU_OVERLAP), pixel_shuffle: int = 1) -> tuple[int, int] | None:
    """(tile, overlap) for an h x w image on `device`: the CPU tiles (`tiling`, overlap at most
    half a tile) when the image is larger than one tile and the model has non-local blocks;
    None (whole image) otherwise, and always on other devices (the GPU kernels take whole images).
    pixel_shuffle k: the model sees the ceil(h / k) x ceil(w / k) sub-images (restore_tensor)."""
    tile, overlap = tiling
    h, w = -(-h // pixel_shuffle), -(-w // pixel_shuffle)
    if torch.device(device).type != "cpu" or nonlocal_blocks(model) == 0 or max(h, w) <= tile:
        return None
    return tile, min(overlap, tile // 2)


def auto_precision(device: torch.device | str) -> str:
    """--precision auto: "bf16" on a CPU with native bf16 arithmetic (AVX-512 BF16 or AMX, where
    oneDNN's bf16 convolutions run ~1.6x faster than fp32 at equal PSNR, BENCHMARKS.md), else "fp32"."""
    if torch.device(device).type != "cpu":
        return "fp32"
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    try:
        return "bf16" if any(getattr(torch.cpu, p, lambda: False)() for p in probes) else "fp32"
    except RuntimeError:   # a build without the probes' CPU support
        return "fp32"


def model_calls(h: int, w: int, tile: int | None = None, overlap: int = 32, chop: bool = False,
                self_ensemble: bool = False, scale: int = 1) -> int:
    """How many model calls restore_tensor makes on an h x w input with these options, tiles
    counted one by one whatever tile_batch (the total its progress callback counts to).
    Self-ensemble members 4..7 see the transposed size."""
    def calls(hh, ww):
        if tile is not None:
            return tile_count(hh, ww, tile, overlap)
        return chop_calls(hh, ww, scale) if chop else 1
    if not self_ensemble:
        return calls(h, w)
    return 4 * calls(h, w) + 4 * calls(w, h)


# --------------------------------------------------------------------------- entry points

def _counting(model: Forward, total: int, progress: Progress, batch: int) -> Forward:
    """model, calling progress(done, total) after each call; a call on k stacked tiles of a
    `batch`-image input counts k."""
    done = 0

    def forward(v: Tensor) -> Tensor:
        nonlocal done
        out = model(v)
        done += max(1, v.shape[0] // batch)
        progress(done, total)
        return out
    return forward


# The smallest tile an out-of-memory retry tries: a 64x64 tile of RNAN holds 1 MiB per 64-channel
# fp32 feature map, so a GPU that cannot take it has no memory to speak of, and smaller tiles
# would mostly be overlap (32 pixels by default).
OOM_MIN_TILE = 64


def tile_batch_for(device: torch.device | str) -> int:
    """Tiles per model call for inference on `device`: CPU_TILE_BATCH on the CPU, 1 elsewhere
    (a GPU tile's memory matters more than the call count)."""
    return CPU_TILE_BATCH if torch.device(device).type == "cpu" else 1


def place_model(net: torch.nn.Module, device: torch.device | str, dtype: torch.dtype) -> torch.nn.Module:
    """net in eval mode on `device` and `dtype`, for inference: on the CPU its weights in
    channels-last layout, as restore_tensor feeds CPU inputs (oneDNN's fastest convolutions)."""
    net = net.to(device=device, dtype=dtype).eval()
    return net.to(memory_format=torch.channels_last) if torch.device(device).type == "cpu" else net


def _on_device(model: Forward, device, dtype, home: torch.device) -> Forward:
    """model with each input moved to `device` / `dtype` and each output back to `home`. On the
    CPU the input goes in channels-last layout, which oneDNN's convolutions run fastest (a 64x64
    tile of the shipped denoiser: 1.25x faster in bf16, 1.15x in fp32; the same values)."""
    layout = torch.channels_last if torch.device(device if device is not None else home).type == "cpu" \
        else torch.preserve_format

    def forward(v: Tensor) -> Tensor:
        return model(v.to(device=device, dtype=dtype, memory_format=layout)).to(home)
    return forward


def restore_tensor(model, x: Tensor, tile: int | None = None, overlap: int = 32, chop: bool = False,
                   self_ensemble: bool = False, scale: int | None = None,
                   progress: Progress | None = None, device: torch.device | str | None = None,
                   dtype: torch.dtype | None = None, oom_retry: Callable[[int], None] | None = None,
                   period: int = 1, tile_batch: int = 1, pixel_shuffle: int = 1) -> Tensor:
    """Restore a batch. x: (B, C, H, W) float, 0..255 values; returns (B, C', scale*H, scale*W)
    in the model's output dtype, unclamped, on x's device.

    tile: tiled inference with tiles of `tile` input pixels overlapping by `overlap` (None:
    whole image), `tile_batch` tiles per model call (forward_tiled; tile_batch_for(device) is the
    commands' choice). chop: the official forward_chop instead (not combinable with tile).
    self_ensemble: average over the 8 flips/transposes (wraps whichever of the above runs).
    scale: the model's scale (default: read from model.config / model.scale).
    progress: called as progress(done, total) after each model call (done counts tiles, chop
    quadrants or whole images; total = model_calls(...)), e.g. to drive a progress bar. A retry (oom_retry)
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
    pixel_shuffle: k > 1 restores the k*k stride-k sub-images of each image (shuffle_down) as
    one batch and interleaves them back: for real camera noise (2: PolyU_dev +0.52 dB for the
    default denoiser, MODEL_ZOO.md). Tiles, chop, self_ensemble and progress then apply to the
    sub-images. Scale-1 models on images without a pattern (period 1) only.
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
    check_pixel_shuffle(pixel_shuffle, s, period)
    pixel_shuffle = int(pixel_shuffle)
    h, w = x.shape[-2:]
    if h % period or w % period:
        x = torch.nn.functional.pad(x, (0, (-w) % period, 0, (-h) % period))
    if pixel_shuffle > 1:
        x = shuffle_down(x, pixel_shuffle)
    run = dict(overlap=overlap, chop=chop, self_ensemble=self_ensemble, s=s, progress=progress, tile_batch=tile_batch)
    if device is not None or dtype is not None:
        model = _on_device(model, device, dtype, x.device)
    def done(y: Tensor) -> Tensor:
        return (shuffle_up(y, pixel_shuffle) if pixel_shuffle > 1 else y)[..., : s * h, : s * w]

    if oom_retry is None or chop:
        return done(_restore(model, x, tile, **run))
    side = max(x.shape[-2:]) if tile is None else int(tile)
    told = False
    while True:
        try:
            return done(_restore(model, x, tile, **run))
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
             s: int, progress: Progress | None, tile_batch: int) -> Tensor:
    """One attempt of restore_tensor (model already wrapped to take x where it is; s: its scale)."""
    if progress is not None:
        model = _counting(model, model_calls(x.shape[-2], x.shape[-1], tile, overlap, chop, self_ensemble, s),
                          progress, x.shape[0])
    if tile is not None:
        def forward(v):
            return forward_tiled(model, v, tile, overlap, s, tile_batch)
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
