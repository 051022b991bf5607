"""Training data: image folders decoded once into memory, random patches degraded on the fly.

Every random draw of sample k of step t (which image, where the patch lies, which of the 8
flips/transposes, the noise and its level) comes from one torch.Generator seeded by
(seed, t, k) through numpy's SeedSequence, and the image order of each epoch from one seeded by
(seed, epoch). A batch is therefore a function of (seed, step) alone: the same for any number of
data workers or processes (ranks take disjoint slices of the global batch), and a resumed run
needs no data state beyond the step.

Sample n = t * batch_size + k is image perm_e[n mod N] of epoch e = n // N (N images; perm_e a
random permutation), so each epoch visits every image once. The patch is then:
  - denoise_*, car, demosaic: a P x P crop of the task's ground truth (data.ground_truth, done
    once at load), flipped/transposed, then data.degrade: the function `rnan-fast eval` uses.
  - sr: the LR patch is P x P and the HR patch (P*s)^2. The LR patch is cut from the bicubic
    downscale (data.degrade) of an HR region that reaches SR_MARGIN LR pixels beyond it (or to
    the image border), which gives the same pixels as downscaling the whole image and cropping:
    MATLAB's bicubic at 1/s reads input pixels within 2 LR pixels of each output pixel. HR and LR
    patches are then flipped/transposed alike.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image

from rnan_fast import data as D

__all__ = ["DataError", "load_images", "sample_generator", "TrainPatches", "StepBatches", "dihedral",
           "validation_pairs", "worker_init", "default_workers", "SR_MARGIN"]

SR_MARGIN = 3  # LR pixels of context around an SR patch: the bicubic kernel at 1/s reaches 2
_SAMPLE, _EPOCH = 0, 1  # SeedSequence spawn-key domains: per-sample draws, per-epoch image order


class DataError(ValueError):
    """A data set that cannot be used (missing, empty, too small for the patch, too large for RAM)."""


def _available_memory() -> int | None:
    """MemAvailable of /proc/meminfo in bytes (None where there is no such file)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _list_folders(folders: list[str], what: str) -> list[Path]:
    files: list[Path] = []
    for folder in folders:
        p = Path(folder)
        if not p.is_dir():
            raise DataError(f"{what} {folder}: no such folder")
        found = D.list_images(p)
        if not found:
            raise DataError(f"{what} {folder}: the folder holds no images ({', '.join(D.IMAGE_EXTENSIONS)})")
        files.extend(found)
    return files


def load_images(folders: list[str], task: str, min_side: int, what: str = "--data",
                warn: Callable[[str], None] = print, limit_bytes: int | None = None) -> tuple[list[np.ndarray], list[str]]:
    """Decode every image of `folders` once into uint8 ground truths of `task` (data.ground_truth;
    sr: RGB). Returns (images, names).

    Before decoding, the memory they need is estimated from the file headers (H x W x channels
    bytes) and compared with `limit_bytes` (default: 90% of MemAvailable): DataError when it does
    not fit. Unreadable images are skipped and named through `warn`; images with a side below
    `min_side` (the patch, in HR pixels) raise DataError naming them.
    """
    files = _list_folders(folders, what)
    channels = D.TASK_COLORS[task]
    sizes, unreadable = {}, []
    for f in files:
        try:
            with Image.open(f) as im:
                sizes[f] = im.size  # (W, H) from the header, no decode
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
            unreadable.append(f"{f} ({str(e).splitlines()[0] if str(e) else type(e).__name__})")
    need = sum(w * h * channels for w, h in sizes.values())
    if limit_bytes is None:
        avail = _available_memory()
        limit_bytes = int(0.9 * avail) if avail is not None else None
    if limit_bytes is not None and need > limit_bytes:
        raise DataError(f"{what}: {len(sizes)} images need {need / 2**30:.2f} GiB as uint8 in memory, more than "
                        f"the {limit_bytes / 2**30:.2f} GiB available; use fewer or smaller images")
    small = [f"{f.name} ({h}x{w})" for f, (w, h) in sizes.items() if min(w, h) < min_side]
    if small:
        more = f" and {len(small) - 3} more" if len(small) > 3 else ""
        raise DataError(f"{what}: {len(small)} image(s) smaller than the {min_side}x{min_side} training patch: "
                        f"{', '.join(small[:3])}{more}; remove them or lower --patch-size")
    images, names = [], []
    for f in sizes:
        try:
            img = D.read_image(f)
        except D.ImageReadError as e:
            unreadable.append(str(e))
            continue
        gt = D.ground_truth(img, task)
        images.append(np.ascontiguousarray(D.to_rgb(gt) if task == "sr" else gt))
        names.append(f.name)
    for u in unreadable:
        warn(f"skipped unreadable image {u}")
    if not images:
        raise DataError(f"{what}: none of the {len(files)} image(s) could be read")
    return images, names


def sample_generator(seed: int, step: int, k: int) -> torch.Generator:
    """The generator of every draw of sample k of step `step` (seed, step, k >= 0)."""
    state = np.random.SeedSequence(seed, spawn_key=(_SAMPLE, step, k)).generate_state(2, np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def _epoch_order(seed: int, epoch: int, n: int) -> torch.Tensor:
    state = np.random.SeedSequence(seed, spawn_key=(_EPOCH, epoch)).generate_state(2, np.uint32)
    return torch.randperm(n, generator=torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1])))


def dihedral(img: np.ndarray, i: int) -> np.ndarray:
    """The i-th of the 8 flips/transposes of an (H, W[, C]) array, as in inference.forward_x8:
    bit 0 flips W, bit 1 flips H, bit 2 transposes H and W, applied in that order."""
    if i & 1:
        img = img[:, ::-1]
    if i & 2:
        img = img[::-1]
    if i & 4:
        img = img.swapaxes(0, 1)
    return img


def _randint(g: torch.Generator, high: int) -> int:
    """Uniform in 0..high-1."""
    return int(torch.randint(high, (1,), generator=g))


def _to_tensor(a: np.ndarray) -> torch.Tensor:
    """(H, W) or (H, W, C) array -> float32 (C, H, W) tensor on the 0..255 scale."""
    a = np.asarray(a, dtype=np.float32)
    a = a[None] if a.ndim == 2 else a.transpose(2, 0, 1)
    return torch.from_numpy(np.ascontiguousarray(a))


class TrainPatches(torch.utils.data.Dataset):
    """Map-style dataset over global sample indices: self[n] = (input, target), float32 (C, P, P)
    and (C, P*s, P*s) tensors on the 0..255 scale, for sample n % batch_size of step n // batch_size.

    images: ground truths from load_images. sigma: fixed noise level, or sigma_range (low, high):
    a level drawn uniformly per sample (denoise_*). quality: JPEG quality (car). scale: sr factor.
    """

    def __init__(self, images: list[np.ndarray], task: str, patch_size: int, batch_size: int, seed: int,
                 sigma: float | None = None, sigma_range: tuple[float, float] | None = None,
                 quality: int | None = None, scale: int = 1):
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        self.images, self.task, self.patch, self.batch = images, task, patch_size, batch_size
        self.seed, self.sigma, self.sigma_range, self.quality, self.scale = seed, sigma, sigma_range, quality, scale
        self._order: tuple[int, torch.Tensor] | None = None  # (epoch, permutation), one epoch cached

    def __len__(self) -> int:  # indices are unbounded (one per sample of any step); len is one epoch
        return len(self.images)

    def position(self, n: int) -> dict:
        """The data position of global sample n: epoch and index within it."""
        return {"samples": n, "epoch": n // len(self.images), "index": n % len(self.images)}

    def _image(self, n: int) -> np.ndarray:
        epoch, index = divmod(n, len(self.images))
        if self._order is None or self._order[0] != epoch:
            self._order = (epoch, _epoch_order(self.seed, epoch, len(self.images)))
        return self.images[int(self._order[1][index])]

    def __getitem__(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        step, k = divmod(int(n), self.batch)
        g = sample_generator(self.seed, step, k)
        img = self._image(int(n))
        p, s = self.patch, self.scale
        if self.task == "sr":
            gt, lq = self._sr_patch(img, g)
        else:
            y, x = _randint(g, img.shape[0] - p + 1), _randint(g, img.shape[1] - p + 1)
            patch = dihedral(img[y:y + p, x:x + p], _randint(g, 8))
            sigma = self.sigma
            if self.sigma_range is not None:
                low, high = self.sigma_range
                sigma = low + (high - low) * float(torch.rand((), generator=g, dtype=torch.float64))
            gt, lq = D.degrade(np.ascontiguousarray(patch), self.task, sigma=sigma, quality=self.quality,
                               scale=s, seed=g)
        return _to_tensor(lq), _to_tensor(gt)

    def _sr_patch(self, img: np.ndarray, g: torch.Generator) -> tuple[np.ndarray, np.ndarray]:
        p, s, m = self.patch, self.scale, SR_MARGIN
        h, w = img.shape[0] // s, img.shape[1] // s  # the LR grid of the modcropped image
        y, x = _randint(g, h - p + 1), _randint(g, w - p + 1)
        y0, x0 = max(0, y - m), max(0, x - m)
        y1, x1 = min(h, y + p + m), min(w, x + p + m)
        _, lr_region = D.degrade(img[y0 * s:y1 * s, x0 * s:x1 * s], "sr", scale=s)
        lq = lr_region[y - y0:y - y0 + p, x - x0:x - x0 + p]
        gt = img[y * s:(y + p) * s, x * s:(x + p) * s]
        i = _randint(g, 8)
        return dihedral(gt, i), dihedral(lq, i)


class StepBatches(torch.utils.data.Sampler):
    """Batch sampler: for each step start..stop-1, this rank's slice of the global batch
    (indices t * batch + rank * batch/world ... + batch/world - 1)."""

    def __init__(self, start: int, stop: int, batch_size: int, rank: int = 0, world_size: int = 1):
        if batch_size % world_size:
            raise ValueError(f"the batch size {batch_size} must be a multiple of the number of processes {world_size}")
        self.start, self.stop, self.batch = start, stop, batch_size
        self.local = batch_size // world_size
        self.offset = rank * self.local

    def __len__(self) -> int:
        return max(0, self.stop - self.start)

    def __iter__(self):
        for t in range(self.start, self.stop):
            first = t * self.batch + self.offset
            yield list(range(first, first + self.local))


def validation_pairs(folders: list[str], task: str, seed: int, sigma: float | None = None,
                     quality: int | None = None, scale: int = 1, limit: int | None = None,
                     shard: slice = slice(None), warn: Callable[[str], None] = print) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(name, ground truth, input) of validation images, degraded once as `rnan-fast eval
    --seed seed` does (image i of the sorted list gets noise seed seed + i). shard: which of the
    (sorted, limited) images this process keeps. Unreadable or unusable images are named through
    `warn` and skipped."""
    files = _list_folders(folders, "--val")[:limit]
    pairs = []
    for index in range(len(files))[shard]:
        f = files[index]
        try:
            gt, lq = D.degrade(D.ground_truth(D.read_image(f), task), task, sigma=sigma, quality=quality,
                               scale=scale, seed=D.noise_seed(seed, index))
        except (D.ImageReadError, ValueError) as e:
            warn(f"skipped validation image {f}: {e}")
            continue
        pairs.append((f.name, gt, lq))
    return pairs


def worker_init(_worker_id: int) -> None:
    """DataLoader workers: one thread each (the step owns the cores), and SIGINT left to the main
    process, which saves a checkpoint before it stops."""
    import signal

    torch.set_num_threads(1)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def default_workers(device: torch.device) -> int:
    """0 on the CPU (the cores belong to the step; a batch of patches costs ~1 ms against a
    step of seconds), else up to 4 processes to keep a GPU step of ~0.1 s fed."""
    return 0 if device.type == "cpu" else max(1, min(4, (os.cpu_count() or 2) - 1))
