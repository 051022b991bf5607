"""``rnan-fast demo``: denoise a sample photo that ships with scikit-image, no data or network needed."""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from rnan_fast import data as D
from rnan_fast.cli.common import EXIT_OK, PROG, UserError, _add_runtime_args, _check_backend, _device, run_options
from rnan_fast.cli.models import add_model_args, load_net, note_sigma
from rnan_fast.cli.tiling import ImageRunner

# Photos that scikit-image bundles in its wheel (no download): name -> licence, default crop
# (top, left) of a `--crop` square; the astronaut's crop holds her face, the suit and its patch.
SAMPLES = {"astronaut": ("public domain (NASA)", (0, 96)), "coffee": ("CC0", (44, 172)),
           "chelsea": ("CC0", (22, 95))}
OUTPUTS = ("noisy.png", "restored.png", "side_by_side.png")
GAP = 8  # white pixels between the panels of side_by_side.png

DEMO_EPILOG = """\
Takes a sample photo bundled with scikit-image (no network), adds noise (--noise gaussian:
Gaussian noise of --sigma on the 0..255 scale, numpy default_rng(--seed), unclipped, the eval
protocol's noise; --noise camera: camera-like noise, shot and read noise through a camera's
colour pipeline, sometimes demosaiced and JPEG-stored, rnan_fast.data.photo_noise with --seed),
restores it with the default denoiser (or --model / --weights), prints PSNR/SSIM before and after
and the time, and writes OUTDIR/noisy.png, restored.png and side_by_side.png (clean | noisy |
restored). The default noise is camera-like for a model trained on camera noise, else Gaussian.
The default 256x256 crop keeps the demo within ~2 minutes on a 2-core CPU; --crop 0 takes the
whole photo (512x512 astronaut).
"""


def _sample(name: str) -> np.ndarray:
    try:
        import skimage.data
    except ImportError:
        raise UserError(f"{PROG} demo needs scikit-image for its bundled sample photos, which is not "
                        f"installed: pip install \"rnan_fast[demo]\" (or: pip install scikit-image; "
                        f"scripts/setup.sh installs it)") from None
    return np.asarray(getattr(skimage.data, name)(), dtype=np.uint8)


def _crop(img: np.ndarray, name: str, side: int) -> np.ndarray:
    h, w = img.shape[:2]
    if side == 0 or side >= min(h, w):
        return img
    top, left = SAMPLES[name][1]
    top, left = min(top, h - side), min(left, w - side)
    return img[top:top + side, left:left + side]


def side_by_side(*panels: np.ndarray) -> np.ndarray:
    """uint8 panels of one height, left to right, GAP white pixels apart (gray ones as RGB)."""
    panels = [D.to_rgb(p) for p in panels]
    h = panels[0].shape[0]
    gap = np.full((h, GAP, 3), 255, dtype=np.uint8)
    parts = [panels[0]]
    for p in panels[1:]:
        parts += [gap, p]
    return np.concatenate(parts, axis=1)


def cmd_demo(args) -> int:
    from rnan_fast.inference import model_colors
    from rnan_fast.metrics import psnr, ssim

    opts = run_options(args, _device(args.device))
    if args.sigma is not None and args.sigma < 0:
        raise UserError(f"--sigma must be >= 0, got {args.sigma}")
    if args.sigma is not None and args.noise == "camera":
        raise UserError("--sigma sets Gaussian noise; --noise camera draws its own levels")
    if args.crop < 0:
        raise UserError(f"--crop must be >= 0 (0: the whole photo), got {args.crop}")
    outdir = Path(args.output)
    if outdir.exists() and not outdir.is_dir():
        raise UserError(f"output folder {outdir} exists and is not a folder")
    existing = [outdir / n for n in OUTPUTS if (outdir / n).exists()]
    if existing and not args.overwrite:
        raise UserError(f"{existing[0]} already exists; pass --overwrite to replace the demo's outputs, "
                        f"or choose another -o folder")
    photo = _sample(args.image)
    clean = _crop(photo, args.image, args.crop)
    _check_backend(opts)
    net, card = load_net(args, opts)
    # a --sigma asks for Gaussian noise; else a model trained on camera noise is shown on it
    photo_model = card is not None and card["task"] == "denoise_photo"
    noise = args.noise or ("camera" if photo_model and args.sigma is None else "gaussian")
    if noise == "camera":
        if model_colors(net) != 3:
            raise UserError("--noise camera needs a color model (camera noise is drawn on RGB)")
        noisy = D.photo_noise(clean, args.seed)
        what = "camera-like noise"
    else:
        sigma = 30.0 if args.sigma is None else args.sigma
        note_sigma(card, sigma)
        if model_colors(net) == 1:
            clean = D.to_gray(clean)
        noisy = D.add_gaussian_noise(clean, sigma, args.seed)
        what = f"Gaussian noise sigma {sigma:g}"
    h, w = clean.shape[:2]
    print(f"# {args.image} (scikit-image sample, {SAMPLES[args.image][0]}), {w}x{h}"
          f"{' crop' if clean.shape[:2] != photo.shape[:2] else ''}, {what} "
          f"(seed {args.seed}); {net.describe()} on {opts.device}, {opts.precision}")
    runner = ImageRunner(opts, net, card)
    t0 = time.perf_counter()
    restored = runner.run(noisy, f"{args.image}")
    seconds = time.perf_counter() - t0
    noisy_u8 = D.to_uint8(noisy)
    p0, s0 = psnr(clean, noisy), ssim(clean, noisy)
    p1, s1 = psnr(clean, restored), ssim(clean, restored)
    print(f"noisy     PSNR {p0:6.2f} dB  SSIM {s0:.4f}")
    print(f"restored  PSNR {p1:6.2f} dB  SSIM {s1:.4f}  ({p1 - p0:+.2f} dB) in {seconds:.1f} s")
    try:
        outdir.mkdir(parents=True, exist_ok=True)
        for name, img in zip(OUTPUTS, (noisy_u8, restored, side_by_side(clean, noisy_u8, restored))):
            D.write_png_atomic(outdir / name, img)
    except OSError as e:
        raise UserError(f"cannot write the demo's outputs into {outdir}: {e.strerror or e}") from None
    print(f"# wrote {', '.join(str(outdir / n) for n in OUTPUTS)} (side by side: clean | noisy | restored)")
    return EXIT_OK


def add_parser(sub) -> None:
    d = sub.add_parser("demo", help="denoise a bundled sample photo and show before / after",
                       description="Denoise a sample photo with the shipped default denoiser.",
                       epilog=DEMO_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    d.add_argument("-o", "--output", default="rnan_demo", metavar="OUTDIR", help="output folder (default ./rnan_demo)")
    d.add_argument("--image", default="astronaut", choices=tuple(SAMPLES), help="the sample photo (default astronaut)")
    d.add_argument("--crop", type=int, default=256, metavar="N",
                   help="an N x N crop of the photo (default 256; 0: the whole photo)")
    d.add_argument("--noise", choices=("gaussian", "camera"),
                   help="the noise added: gaussian (of --sigma) or camera (camera-like); default: camera "
                        "for a model trained on camera noise (unless --sigma is given), else gaussian")
    d.add_argument("--sigma", type=float, help="Gaussian noise level on the 0..255 scale (default 30)")
    d.add_argument("--seed", type=int, default=0, help="noise seed (default 0)")
    d.add_argument("--overwrite", action="store_true", help="replace the outputs of an earlier demo")
    add_model_args(d, default_model=True)
    _add_runtime_args(d)
    d.set_defaults(func=cmd_demo)
