"""How the power of noise spreads over spatial frequency: real camera noise (noisy / clean
pairs, PolyU names NAME_real / NAME_mean) against the training degradation rnan_fast.data.photo_noise
on clean crops. Prints each band's median power and share of the total, over RGB and for Y, Cb
and Cr apart (MODEL_ZOO.md, "rnan_dn_photo"), and the median RMS.

    python benchmarks/noise_spectrum.py ../shared/data/PolyU_dev ../shared/data/BSDS500/test

Residual = noisy - clean (its mean per channel removed), power = |FFT|^2 / pixels averaged over
channels (RGB; or one channel of the residual in BT.601 YCbCr), bands of radial frequency in cycles per pixel; clean crops: the first 30 images of the
second folder, 256x256 from the top left, photo_noise seed = image index.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from rnan_fast import data as D

BANDS = (0.0, 1 / 16, 1 / 8, 1 / 4, 3 / 8, 1 / 2, 0.71)   # 0.71 > sqrt(2) / 2: the corner of the spectrum


def band_power(residual: np.ndarray) -> np.ndarray:
    """Mean power of an (H, W, C) residual in each band of BANDS, shape (len(BANDS) - 1,)."""
    r = residual - residual.mean(axis=(0, 1))
    power = (np.abs(np.fft.fft2(r, axes=(0, 1))) ** 2 / (r.shape[0] * r.shape[1])).mean(axis=2)
    f = np.hypot(np.fft.fftfreq(r.shape[0])[:, None], np.fft.fftfreq(r.shape[1])[None, :])
    return np.array([power[(f >= lo) & (f < hi)].mean() for lo, hi in zip(BANDS[:-1], BANDS[1:])])


def spectra(residual: np.ndarray) -> np.ndarray:
    """(4, bands): band_power of the RGB residual, then of its Y, Cb and Cr."""
    ycc = residual @ D.YCBCR_601.T   # cameras denoise and subsample chroma apart
    return np.stack([band_power(residual)] + [band_power(ycc[..., c:c + 1]) for c in range(3)])


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    pairs, clean_dir = Path(argv[0]), Path(argv[1])
    real = []
    for f in sorted(pairs.glob("*_real.*")):
        clean = D.read_image(f.with_name(f.name.replace("_real", "_mean")))
        real.append((D.read_image(f).astype(np.float64) - clean))
    synthetic = []
    for i, f in enumerate(D.list_images(clean_dir)[:30]):
        crop = D.to_rgb(D.read_image(f))[:256, :256]
        synthetic.append(D.photo_noise(crop, i) - crop)
    print("bands (cycles/pixel):", ", ".join(f"{lo:.3g}-{hi:.3g}" for lo, hi in zip(BANDS[:-1], BANDS[1:])))
    for name, residuals in ((f"{pairs.name} ({len(real)} pairs)", real),
                            (f"photo_noise ({len(synthetic)} crops)", synthetic)):
        median = np.median(np.array([spectra(r) for r in residuals]), axis=0)
        rms = np.median([np.sqrt((r ** 2).mean()) for r in residuals])
        print(f"{name}: median RMS {rms:.2f}")
        for label, row in zip(("RGB", "Y", "Cb", "Cr"), median):
            print(f"  {label:>3}: power {np.round(row, 2).tolist()}, share {np.round(row / row.sum(), 2).tolist()}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
