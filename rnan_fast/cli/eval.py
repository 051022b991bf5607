"""``rnan-fast eval``: degrade a test set, restore it, print PSNR/SSIM."""
from __future__ import annotations

import argparse
import csv
import io
import math
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from rnan_fast import data as D
from rnan_fast.cli.models import add_model_args, load_net, model_task, note_sigma
from rnan_fast.cli.eval_journal import Journal, refuse_unresumed, run_settings
from rnan_fast.cli.tiling import ImageRunner
from rnan_fast.cli.common import (EXIT_FAILURES, EXIT_OK, PROG, UserError, _add_runtime_args, _check_backend,
                                  run_options, _distributed, _err, _first_line, _progress, _report,
                                  _warn_slow_paths)
from rnan_fast.data import TASK_COLORS, TASKS

EVAL_EPILOG = """\
protocols (the shared data README; baseline rows reproduce with --baseline):
  denoise_gray  gray ground truth (RGB files: Pillow convert('L')); input = gt + sigma * N(0,1)
                in float64, numpy default_rng(seed + image index), not rounded or clipped
                (--quantize-noisy: rounded and clipped to uint8); PSNR/SSIM on gray, no border
  denoise_rgb   the same noise on RGB; PSNR with the MSE averaged over R, G, B; SSIM: the mean
                of the three per-channel SSIMs; no border
  denoise_photo camera-like noise on RGB (rnan_fast.data.photo_noise, seed + image index: shot
                and read noise in linear camera space, often mosaic-correlated and JPEG-stored,
                a share of plain Gaussian noise); scored as denoise_rgb
  car           Y of MATLAB rgb2ycbcr (rounded; gray files as they are), Pillow JPEG at
                --quality; PSNR/SSIM on Y, no border
  demosaic      GRBG Bayer mosaic, missing samples zero, 3-channel input; RGB metrics as denoise_rgb
  sr            ground truth cropped to a multiple of --scale; input = MATLAB imresize(gt, 1/scale,
                'bicubic') on uint8; PSNR/SSIM on unrounded Y, --scale border pixels removed
                (a gray ground truth is scored on its gray values); --baseline = bicubic upscale
  --pairs       real noise (denoise_*): DIR holds noisy / clean pairs named NAME_real.EXT and
                NAME_mean.EXT (the PolyU layout: one shot / the mean of many shots); the noisy
                file is the input as stored; scored as denoise_rgb (gray: as denoise_gray)
SSIM: Wang et al. (11x11 Gaussian, sigma 1.5, K1 0.01, K2 0.03, L 255), mean of the map.
Restored images are rounded and clamped to uint8 before scoring.
"""

PAIR_NOISY, PAIR_CLEAN = "_real", "_mean"   # PolyU's suffixes: one noisy shot, the mean of many


def _eval_images(data: str, pairs: bool = False) -> list[Path]:
    """The images to score, sorted: the ground truths, or (pairs) the noisy files of the pairs."""
    folder = Path(data)
    if not folder.is_dir():
        raise UserError(f"--data {data}: no such folder")
    files = D.list_images(folder)
    if pairs:
        return _noisy_of_pairs(folder, files)
    if not files and (folder / "HR").is_dir():  # Set5-style layout: DIR/HR holds the ground truth
        files = D.list_images(folder / "HR")
    if not files:
        raise UserError(f"--data {data}: no images found")
    return files


def _noisy_of_pairs(folder: Path, files: list[Path]) -> list[Path]:
    """The NAME_real files of `folder` that have their NAME_mean (UserError for one that has not,
    or for a folder without pairs)."""
    stems = {f.stem: f for f in files}
    noisy = [f for f in files if f.stem.endswith(PAIR_NOISY)]
    if not noisy:
        raise UserError(f"--pairs: no NAME{PAIR_NOISY}.EXT / NAME{PAIR_CLEAN}.EXT pairs in {folder}")
    lone = [f.name for f in noisy if _clean_stem(f) not in stems]
    if lone:
        raise UserError(f"--pairs: no {PAIR_CLEAN} image beside {', '.join(lone[:3])}"
                        f"{f' and {len(lone) - 3} more' if len(lone) > 3 else ''} in {folder}")
    return noisy


def _clean_stem(noisy: Path) -> str:
    return noisy.stem[: -len(PAIR_NOISY)] + PAIR_CLEAN


def _clean_of(noisy: list[Path]) -> dict[Path, Path]:
    """The ground truth beside each pair's noisy file (any image extension), one folder listing
    per folder."""
    listing = {folder: {f.stem: f for f in D.list_images(folder)} for folder in {f.parent for f in noisy}}
    return {f: listing[f.parent][_clean_stem(f)] for f in noisy}


def _task_params(args, net, model_pending: bool = False) -> dict:
    """Check the task options against each other and against the model; return the degradation.
    model_pending: a model will be loaded later (its scale may supply --scale)."""
    from rnan_fast.inference import model_colors, model_scale

    task = args.task
    p = {"task": task, "scale": 1}
    if args.pairs:
        if not task.startswith("denoise"):
            raise UserError(f"--pairs scores real noise: for a denoising task (denoise_rgb, denoise_photo, "
                            f"denoise_gray), not {task}")
        if args.sigma is not None or args.quantize_noisy:
            raise UserError(f"--pairs: the noise is the photo's own; {'--sigma' if args.sigma is not None else '--quantize-noisy'}"
                            f" does not apply")
        p["pairs"] = True
    given = {"--sigma": args.sigma, "--quality": args.quality, "--scale": args.scale}
    needed = {"denoise_gray": "--sigma", "denoise_rgb": "--sigma", "car": "--quality", "sr": "--scale",
              "denoise_photo": None, "demosaic": None}[task]
    for opt, val in given.items():
        if val is not None and opt != needed:
            raise UserError(f"{opt} does not apply to --task {task}")
    if task in ("denoise_gray", "denoise_rgb") and not args.pairs:
        if args.sigma is None:
            raise UserError(f"--task {task} needs --sigma (noise level on the 0..255 scale)")
        if args.sigma < 0:
            raise UserError(f"--sigma must be >= 0, got {args.sigma}")
        p["sigma"] = args.sigma
    elif task == "car":
        if args.quality is None:
            raise UserError("--task car needs --quality (JPEG quality, e.g. 10, 20, 30, 40)")
        if not 1 <= args.quality <= 100:
            raise UserError(f"--quality must be within 1..100, got {args.quality}")
        p["quality"] = args.quality
    elif task == "sr":
        scale = args.scale if args.scale is not None else (model_scale(net) if net is not None else None)
        if scale is None:
            if model_pending:
                return p
            raise UserError("--task sr needs --scale")
        if args.scale is None and scale < 2:
            raise UserError(f"--task sr needs a super-resolution model; {args.weights or args.model} is a "
                            f"scale-{scale} model ({net.describe()})")
        if scale < 2:
            raise UserError(f"--scale must be >= 2, got {scale}")
        p["scale"] = scale
    if net is not None:
        colors, mscale = model_colors(net), model_scale(net)
        if colors is not None and colors != TASK_COLORS[task]:
            raise UserError(f"--task {task} needs a {TASK_COLORS[task]}-channel model; the checkpoint "
                            f"holds {net.describe()}")
        if mscale != p["scale"]:
            raise UserError(f"--task {task} at scale {p['scale']} does not fit the checkpoint's scale "
                            f"{mscale} ({net.describe()})")
    return p


def _degrade(img: np.ndarray, index: int, p: dict, args, path: Path | None = None):
    """(ground truth, model input) for one image: data.ground_truth and data.degrade with the
    noise seed of image `index`; with pairs, `img` is the noisy file's and the ground truth its
    NAME_mean (`path`). ValueError for an image the protocol cannot use (sr: smaller than the
    scale, pairs: of another size than its ground truth)."""
    if p.get("pairs"):
        gt = D.ground_truth(D.read_image(p["clean"][path]), p["task"])
        noisy = D.ground_truth(img, p["task"])
        if noisy.shape != gt.shape:
            raise ValueError(f"{path.name} is {noisy.shape[1]}x{noisy.shape[0]}, its {PAIR_CLEAN} image "
                             f"{gt.shape[1]}x{gt.shape[0]}")
        return gt, noisy.astype(np.float32)
    gt = D.ground_truth(img, p["task"])
    return D.degrade(gt, p["task"], sigma=p.get("sigma"), quality=p.get("quality"), scale=p["scale"],
                     seed=D.noise_seed(args.seed, index), quantize_noisy=args.quantize_noisy,
                     resize_padding=args.resize_padding)


def _describe_task(p: dict, args) -> str:
    task = p["task"]
    if p.get("pairs"):
        return f"{task} on real noise (pairs NAME{PAIR_NOISY} / NAME{PAIR_CLEAN})"
    if task == "denoise_photo":
        return f"denoise_photo: camera-like noise (data.photo_noise, seed {args.seed} + image index)"
    if task.startswith("denoise"):
        q = ", noisy image rounded and clipped to uint8" if args.quantize_noisy else ""
        return f"{task} sigma {p['sigma']:g} (seed {args.seed} + image index{q})"
    if task == "car":
        return f"car JPEG quality {p['quality']} (Y channel)"
    if task == "sr":
        return f"sr x{p['scale']} (bicubic, {args.resize_padding} padding; Y channel, border {p['scale']})"
    return "demosaic (GRBG Bayer)"


def cmd_eval(args) -> int:
    from rnan_fast.baselines import BASELINES, BaselineUnavailable, baseline_label, check_baseline
    model_given = args.weights is not None or args.model is not None
    if (args.baseline == "input" and model_given) or (args.baseline is None and not model_given):
        raise UserError("give --weights W.pt or --model NAME (restore and score; with --baseline NAME, that "
                        "method beside it), --baseline (score the degraded input) or --baseline NAME "
                        f"({', '.join(BASELINES)})")
    if args.task is None:
        if args.model is None or args.weights is not None:
            raise UserError(f"--task is required ({', '.join(TASKS)}) unless --model names a shipped model")
        args.task = model_task(args.model)
    method = args.baseline if args.baseline in BASELINES else None   # a classical method, not the input
    if method:
        try:
            check_baseline(method, args.task)
        except BaselineUnavailable as e:
            raise UserError(f"--baseline {method}: {e}") from None
    if args.limit is not None and args.limit < 1:
        raise UserError(f"--limit must be >= 1, got {args.limit}")
    if args.resume and not args.csv:
        raise UserError("--resume needs --csv FILE: an interrupted run is continued from FILE.partial")
    if args.csv:
        _prepare_csv(Path(args.csv))
        if not args.resume:
            refuse_unresumed(Path(args.csv))  # before the model load (Journal checks again)
    files = _eval_images(args.data, args.pairs)
    if args.limit is not None:
        files = files[: args.limit]
    net = None
    d = _distributed(args.device if model_given else "cpu")  # torchrun: each rank scores a share
    opts = run_options(args, d.device)
    if model_given:
        _task_params(args, None, model_pending=True)  # option errors before the (slow) model load
        _check_backend(opts)
        _warn_slow_paths(opts.device, opts.backend, args.quiet or not d.main)
        net, card = load_net(args, opts, default_model=False)
    p = _task_params(args, net)
    if args.pairs:
        p["clean"] = _clean_of(files)
    if net is not None and p.get("sigma") is not None:
        note_sigma(card, p["sigma"], args.quiet)
    if p["task"] == "demosaic" and args.self_ensemble:
        raise UserError("--self-ensemble flips the image, which moves the GRBG mosaic's pattern: not for "
                        "--task demosaic")
    runner = None if net is None else ImageRunner(opts, net, card, p["task"])
    beside = method if net is not None else None   # the method's columns beside the model's
    journal = None
    if args.csv:  # every rank reads (or refuses) the old journal before rank 0 starts a new one
        journal = Journal(Path(args.csv), run_settings(args, opts, p, files, _model_id(args, card) if net is not None else None,
                                                       beside), files, args.resume)
        d.barrier()
        if d.main:
            if args.resume and not journal.resumed:
                _report(f"{PROG}: note: --resume: no {journal.path}, so the run starts from the first image",
                        args.quiet)
            journal.start()
        d.barrier()
    done = journal.done if journal else {}
    if net is not None:
        shuffled = f" through pixel-shuffle downsampling x{opts.pixel_shuffle}" if opts.pixel_shuffle > 1 else ""
        who = net.describe() + shuffled + (f", beside {baseline_label(beside, p)}" if beside else "")
    elif method:
        who = f"baseline {baseline_label(method, p)}"
    else:
        who = "baseline (degraded input)"
    width = max(12, max(len(f.name) for f in files))
    if d.main:
        processes = f", {d.world_size} processes" if d.active else ""
        print(f"# {_describe_task(p, args)}; data {args.data} ({len(files)} images{processes}); {who}")
        cols = f"  {BASELINES[beside].column + ' PSNR':>10}  {'SSIM':>6}" if beside else ""
        print(f"{'image':<{width}}  {'PSNR':>8}  {'SSIM':>6}{cols}")
        if done:
            _report(f"{PROG}: note: --resume: {len(done)} of {len(files)} images come from {journal.path}",
                    args.quiet)
            if not d.active:
                for row in done.values():
                    print(f"{row['image']:<{width}}  {_scores_text(row)}")
    rows, failures = [], []  # rows: (index in the file list, row)
    t0 = time.perf_counter()
    mine = [(i, f) for i, f in enumerate(files) if i not in done][d.rank::d.world_size]
    try:
        _score_images(mine, rows, failures, p, args, net, runner, method, journal, d, width)
    except KeyboardInterrupt:
        if journal and d.main:
            _report(f"{PROG}: {len(done) + len(rows)} finished image(s) are kept in {journal.path}: the same "
                    f"command with --resume continues the run", args.quiet)
        raise
    if d.active:  # the ranks scored interleaved shares: rank 0 prints the whole table in file order
        rows, failures = d.gather_lists(rows), d.gather_lists(failures)
        if not d.main:
            return EXIT_FAILURES if failures else EXIT_OK
    new = len(rows)
    rows = [row for _, row in sorted(rows + list(done.items()), key=lambda r: r[0])]
    if d.active:
        for row in rows:
            print(f"{row['image']:<{width}}  {_scores_text(row)}")
    mean = _mean_row(rows)
    if rows:
        print(f"{'mean':<{width}}  {_scores_text(mean)}")
        resumed = f" ({len(done)} from the journal, {new} run)" if done else ""
        print(f"# {len(rows)} images{resumed} in {time.perf_counter() - t0:.1f} s")
    if args.csv:
        _write_csv(Path(args.csv), rows, mean)
        journal.remove()
    if failures:
        _err(f"{len(failures)} image(s) failed: " + ", ".join(str(f) for f in failures))
        return EXIT_FAILURES
    return EXIT_OK


def _model_id(args, card: dict | None) -> str:
    """The weights' identity in a journal: the SHA-256 of the --weights file or of the shipped model."""
    from rnan_fast.weights import sha256_of

    return "sha256:" + (card["sha256"] if card is not None else sha256_of(args.weights))


def _score_images(mine, rows, failures, p, args, net, runner, method, journal, d, width) -> None:
    """Degrade, restore and score this rank's images (index, path), appending (index, row) to
    `rows` (and to the journal) and failed paths to `failures`; one line per image on one process.
    method: a classical baseline (rnan_fast.baselines) that runs alone (net None) or beside the
    model, in columns "<method>_psnr" / "<method>_ssim"."""
    from rnan_fast.baselines import run_baseline
    from rnan_fast.metrics import evaluate

    for index, path in _progress(mine, len(mine), "eval", args.quiet or not d.main):
        try:
            img = D.read_image(path)
            gt, lq = _degrade(img, index, p, args, path)
        except (D.ImageReadError, ValueError) as e:
            _report(f"{PROG}: skipped {path}: {e}", args.quiet)
            failures.append(path)
            continue
        if net is None and method:
            out = run_baseline(method, lq, p)
        elif net is None:
            out = D.bicubic_upscale(lq, p["scale"]) if p["task"] == "sr" else lq
        else:
            try:
                out = runner.run(lq, path)
            except (RuntimeError, ValueError, ArithmeticError) as e:
                _report(f"{PROG}: failed on {path}: {_first_line(e)}",
                        args.quiet)
                failures.append(path)
                continue
        try:  # (a 1-channel SR ground truth is scored on its gray values: metrics.evaluate)
            pv, sv = evaluate(gt, out, p["task"], p["scale"], with_ssim=not args.no_ssim)
        except ValueError as e:  # e.g. an image too small for the SSIM window
            _report(f"{PROG}: cannot score {path}: {e}", args.quiet)
            failures.append(path)
            continue
        row = {"image": path.name, "psnr": pv, "ssim": sv}
        if net is not None and method:  # the very same degraded image through the method, scored alike
            row[f"{method}_psnr"], row[f"{method}_ssim"] = evaluate(gt, run_baseline(method, lq, p), p["task"],
                                                                    with_ssim=not args.no_ssim)
        rows.append((index, row))
        if journal:
            journal.append(index, row)
        if not d.active:
            _report(f"{path.name:<{width}}  {_scores_text(row)}", args.quiet, file=sys.stdout)


def _prepare_csv(path: Path) -> None:
    """Check the --csv target before any work: not a folder, its folder made (or a UserError)."""
    if path.is_dir():
        raise UserError(f"--csv {path} is a folder; give a file name")
    for parent in (path.parent, *path.parent.parents):
        if parent.exists():
            if not parent.is_dir():
                raise UserError(f"--csv {path}: {parent} exists and is not a folder")
            break
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"--csv {path}: cannot create the folder {path.parent}: {e.strerror or e}") from None
    if not os.access(path.parent, os.W_OK):
        raise UserError(f"--csv {path}: the folder {path.parent} is not writable")


def _scores_text(row: dict) -> str:
    """PSNR and SSIM of a row (and a baseline's beside them when it has them), in the table's columns."""
    text = f"{row['psnr']:8.4f}  {'' if row['ssim'] is None else format(row['ssim'], '.4f'):>6}"
    for key in row:
        if key.endswith("_psnr"):
            ssim = row[key[:-5] + "_ssim"]
            text += f"  {row[key]:10.4f}  {'' if ssim is None else format(ssim, '.4f'):>6}"
    return text


def _mean_row(rows: list[dict]) -> dict:
    """The "mean" row: each score column averaged over the rows (NaN PSNR when there are none)."""
    if not rows:
        return {"image": "mean", "psnr": math.nan, "ssim": None}
    mean = {"image": "mean"}
    for key in rows[0]:
        if key != "image":
            values = [r[key] for r in rows]
            mean[key] = None if None in values else statistics.fmean(values)
    return mean


def _write_csv(path: Path, rows: list[dict], mean: dict) -> None:
    """Write the rows and the mean row through rnan_fast.data.atomic_write (0666 less the umask,
    as an ordinary new file): a reader never sees half a table, and no temporary is left."""
    fmt = lambda v: v if isinstance(v, str) else ("" if v is None else f"{v:.6f}")  # noqa: E731
    try:
        with D.atomic_write(path, mode=D.new_file_mode()) as raw, \
                io.TextIOWrapper(raw, newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(list(mean))
            for r in [*rows, mean]:
                w.writerow([fmt(r[k]) for k in mean])
    except OSError as e:
        raise UserError(f"cannot write --csv {path}: {e.strerror or e}") from None


def add_parser(sub) -> None:
    from rnan_fast.baselines import BASELINES   # numpy only: the optional packages load when a baseline runs

    e = sub.add_parser("eval", help="degrade a test set, restore it, print PSNR/SSIM",
                       description="Benchmark evaluation under the paper's protocols.",
                       epilog=EVAL_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(e, default_model=False)
    e.add_argument("--baseline", nargs="?", const="input", choices=("input", *BASELINES),
                   help="--baseline alone: score the degraded input, no model (bicubic upscale for sr); "
                        "--baseline bm3d: BM3D / CBM3D given the true sigma (denoise_*; with --pairs an "
                        "estimated one, baselines.pairs_sigma; the optional bm3d package); --baseline nlm: "
                        "OpenCV's non-local means (denoise_*); --baseline menon: Menon 2007 demosaicing "
                        "(demosaic; the optional colour-demosaicing package); --baseline bilinear: bilinear "
                        "demosaicing (demosaic); alone or beside the model's columns on the same degraded "
                        "images")
    e.add_argument("--task", choices=TASKS, help="the degradation protocol (default with --model: the "
                   "model card's task; required otherwise)")
    e.add_argument("--sigma", type=float, help="noise level (denoise_*), 0..255 scale")
    e.add_argument("--quality", type=int, help="JPEG quality (car)")
    e.add_argument("--scale", type=int, help="SR factor (sr; default: the checkpoint's)")
    e.add_argument("--data", required=True, metavar="DIR", help="folder of ground-truth images (or DIR/HR); "
                   "with --pairs, of noisy/clean pairs")
    e.add_argument("--pairs", action="store_true", help="real noise: --data holds NAME_real / NAME_mean pairs "
                   "(PolyU's layout), scored as they are (denoise_*)")
    e.add_argument("--limit", type=int, metavar="N", help="only the first N images (sorted by name)")
    e.add_argument("--csv", metavar="FILE", help="also write per-image and mean PSNR/SSIM to FILE (FILE.partial "
                   "keeps each finished image until then, for --resume)")
    e.add_argument("--resume", action="store_true", help="with --csv FILE: continue the interrupted run of "
                   "FILE.partial (same settings; the images it finished are not run again)")
    e.add_argument("--seed", type=int, default=0, help="noise seed base: image i uses seed + i (default 0)")
    e.add_argument("--quantize-noisy", action="store_true",
                   help="round and clip the noisy input to uint8 (as stored noisy PNGs are)")
    e.add_argument("--resize-padding", default="symmetric", choices=("symmetric", "replicate"),
                   help="imresize border handling for sr: symmetric (MATLAB, default) or replicate "
                        "(reproduces the RNAN repository's LRBI files)")
    e.add_argument("--no-ssim", action="store_true", help="PSNR only (faster)")
    _add_runtime_args(e)
    e.set_defaults(func=cmd_eval)
