"""The ``rnan-fast`` command line (also ``python -m rnan_fast``).

    rnan-fast restore --weights W.pt [-o OUTDIR] [--device cpu|cuda] [--precision fp32|bf16|fp16]
                      [--tile N [--tile-overlap P] | --chop] [--self-ensemble] [--overwrite]
                      [--backend auto|reference|fast] [--trust-checkpoint] INPUT...
    rnan-fast eval    (--weights W.pt | --baseline) --task denoise_gray|denoise_rgb|car|demosaic|sr
                      [--sigma S | --quality Q | --scale s] --data DIR [--limit N] [--csv FILE]
                      [--self-ensemble] [--chop | --tile N] [--seed K] [--quantize-noisy] ...
    rnan-fast bench   [--device cpu|cuda] [--quick] [--repeat N]

restore: INPUT are image files or folders (their images, not recursive). The architecture comes
from the checkpoint. A gray model (n_colors=1) gets RGB inputs converted with Pillow's
convert('L') (ITU-R 601-2 luma, as gray Kodak24 is made); an RGB model gets gray inputs with the
channel replicated. Output: OUTDIR/<input stem>.png, at the model's scale, rounded and clamped to
uint8, written atomically (temporary file in OUTDIR, then os.replace). Before any work, every
output name is checked: an existing file stops the run (nothing written) unless --overwrite, and
two inputs with the same stem are refused. An unreadable input is reported by name and skipped;
the others are still written, and the exit status is 1.

eval: the degradation protocols of rnan_fast.data and the metrics of rnan_fast.metrics; see the
`eval` help. Images the protocol cannot use (unreadable, smaller than the SR scale or its border)
are reported and skipped. Exit status: 0 success, 1 some images (or bench timings) failed, 2 usage
or input errors (an unwritable --csv included), 130 interrupt.

--backend applies to the command only (rnan_fast.use_backend around it); --backend fast is tried
on tiny tensors first and refused up front where its kernels cannot run. --trust-checkpoint loads
checkpoints that pickle Python objects (torch.load with weights_only=False): trusted files only.
"""
from __future__ import annotations

import argparse
import csv
import math
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from rnan_fast import data as D

PROG = "rnan-fast"
TASKS = ("denoise_gray", "denoise_rgb", "car", "demosaic", "sr")
TASK_COLORS = {"denoise_gray": 1, "car": 1, "denoise_rgb": 3, "demosaic": 3, "sr": 3}
EXIT_OK, EXIT_FAILURES, EXIT_USAGE, EXIT_INTERRUPT = 0, 1, 2, 130


class UserError(Exception):
    """A problem with the command's inputs: reported as one line, no traceback."""

    def __init__(self, message: str, code: int = EXIT_USAGE):
        super().__init__(message)
        self.code = code


def _err(msg: str) -> None:
    print(f"{PROG}: error: {msg}", file=sys.stderr)


def _warn(msg: str) -> None:
    print(f"{PROG}: warning: {msg}", file=sys.stderr)


# --------------------------------------------------------------------------- shared pieces

def _add_runtime_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("inference")
    g.add_argument("--device", default="cpu", help="cpu (default) or cuda / cuda:N")
    g.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "fp16"),
                   help="model weights and activations dtype (default fp32)")
    g.add_argument("--backend", default=None, choices=("auto", "reference", "fast"),
                   help="kernel backend (default: RNAN_FAST_BACKEND or auto)")
    g.add_argument("--tile", type=int, default=None, metavar="N",
                   help="tiled inference with N x N input tiles (default: whole image)")
    g.add_argument("--tile-overlap", type=int, default=32, metavar="P",
                   help="minimum overlap of neighbouring tiles in input pixels (default 32)")
    g.add_argument("--chop", action="store_true",
                   help="the official forward_chop (recursive quadrants), for comparisons with published numbers")
    g.add_argument("--self-ensemble", action="store_true",
                   help="average over the 8 flips/transposes (RNAN+), 8x the time")
    g.add_argument("--quiet", action="store_true", help="no progress bar")
    g.add_argument("--trust-checkpoint", action="store_true",
                   help="load a checkpoint that pickles Python objects besides the weights (e.g. a "
                        "training script's argument namespace); this runs code from the file, so "
                        "only for files you trust (default: weights-only load)")


def _check_runtime_args(args) -> None:
    if args.tile is not None:
        if args.chop:
            raise UserError("--tile and --chop exclude each other")
        if args.tile < 1:
            raise UserError(f"--tile must be a positive number of pixels, got {args.tile}")
        if not 0 <= args.tile_overlap < args.tile:
            raise UserError(f"--tile-overlap must be >= 0 and smaller than --tile ({args.tile}), "
                            f"got {args.tile_overlap}")


def _device(name: str):
    import torch

    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda" or name.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise UserError(f"--device {name}: CUDA is not available here (torch {torch.__version__}, "
                            f"built with CUDA {torch.version.cuda}); use --device cpu")
        try:
            dev = torch.device(name)
        except RuntimeError as e:
            raise UserError(f"--device {name}: {e}") from None
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UserError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) visible")
        return dev
    raise UserError(f"--device must be cpu or cuda (or cuda:N), got {name!r}")


def _load_model(weights: str, device, precision: str, trust: bool = False):
    """RNAN.from_checkpoint with user-level errors; the model is in eval mode on device/dtype.
    trust: --trust-checkpoint (torch.load with weights_only=False)."""
    from rnan_fast.inference import DTYPES

    path = Path(weights)
    if not path.exists():
        raise UserError(f"weights file not found: {weights}")
    if path.is_dir():
        raise UserError(f"weights path is a directory, not a checkpoint file: {weights}")
    from rnan_fast import CheckpointError
    from rnan_fast.model import RNAN

    try:
        net = RNAN.from_checkpoint(str(path), map_location="cpu", weights_only=not trust)
    except (ValueError, OSError, RuntimeError, EOFError, KeyError, TypeError) as e:
        msg = str(e).strip() or type(e).__name__
        if str(path) not in msg:
            msg = f"{weights}: {msg}"
        if isinstance(e, CheckpointError) and not trust and ("weights_only" in msg or "weights-only" in msg):
            msg = msg.replace("pass weights_only=False", "pass --trust-checkpoint")
            if "--trust-checkpoint" not in msg:
                msg += "; if you trust the file, pass --trust-checkpoint"
        raise UserError(f"cannot load the checkpoint: {msg}") from None
    return net.to(device=device, dtype=DTYPES[precision]).eval()


def _check_backend(name, device, precision: str) -> None:
    """--backend fast: run both ops on tiny tensors of the device and dtype, so a device the
    fast kernels cannot serve is a usage error up front, not a failure on every image."""
    if name != "fast":
        return
    import torch

    from rnan_fast import ops
    from rnan_fast.inference import DTYPES

    dtype = DTYPES[precision]
    gen = torch.Generator().manual_seed(0)
    try:
        with torch.inference_mode():
            t = torch.rand(1, 16, 16, generator=gen).to(device, dtype)
            ops.nonlocal_attention(t, t, t, backend="fast")
            x = torch.rand(1, 2, 2, 2, generator=gen).to(device, dtype)
            ops.gated_residual(x, x, x, backend="fast")
    except (RuntimeError, ValueError, TypeError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"--backend fast is not available for --device {device} with --precision {precision}: "
                        f"{first}; use --backend auto (the fast kernels where they run, the reference "
                        f"elsewhere) or --backend reference") from None


def _restore_kwargs(args) -> dict:
    return dict(tile=args.tile, overlap=args.tile_overlap, chop=args.chop, self_ensemble=args.self_ensemble)


def _progress(iterable, total: int, desc: str, quiet: bool):
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc=desc, unit="img", disable=quiet, file=sys.stderr,
                dynamic_ncols=True)


def _report(msg: str, quiet: bool, file=None) -> None:
    """One message line (to stderr unless `file`) that does not break a running progress bar."""
    file = file or sys.stderr
    if quiet:
        print(msg, file=file)
    else:
        from tqdm import tqdm

        tqdm.write(msg, file=file)


# --------------------------------------------------------------------------- restore

def _collect_inputs(items: list[str]) -> list[Path]:
    files: list[Path] = []
    missing = []
    for item in items:
        p = Path(item)
        if p.is_dir():
            found = D.list_images(p)
            if not found:
                _warn(f"{item}: folder holds no images ({', '.join(D.IMAGE_EXTENSIONS)})")
            files.extend(found)
        elif p.exists():
            files.append(p)
        else:
            missing.append(item)
    if missing:
        raise UserError("input not found: " + ", ".join(missing))
    unique, seen = [], set()
    for f in files:
        key = f.resolve()
        if key not in seen:
            seen.add(key)
            unique.append(f)
    if not unique:
        raise UserError("no input images found")
    return unique


def _plan_outputs(inputs: list[Path], outdir: Path, overwrite: bool) -> list[Path]:
    if outdir.exists() and not outdir.is_dir():
        raise UserError(f"output folder {outdir} exists and is not a folder")
    outputs = [outdir / (p.stem + ".png") for p in inputs]
    by_name: dict[Path, list[Path]] = {}
    for i, o in zip(inputs, outputs):
        by_name.setdefault(o, []).append(i)
    clashes = {o: ins for o, ins in by_name.items() if len(ins) > 1}
    if clashes:
        o, ins = next(iter(clashes.items()))
        raise UserError(f"{len(clashes)} output name(s) would be written by several inputs, e.g. {o} "
                        f"from {', '.join(map(str, ins))}; restore them into separate folders")
    sources = {i.resolve() for i in inputs}
    for i, o in zip(inputs, outputs):
        if o.resolve() in sources:
            raise UserError(f"output {o} would replace the input {i}; choose another -o folder")
    if not overwrite:
        existing = [o for o in outputs if o.exists()]
        if existing:
            more = f" (and {len(existing) - 1} more)" if len(existing) > 1 else ""
            raise UserError(f"output {existing[0]} already exists{more}; nothing was written. "
                            f"Pass --overwrite to replace, or choose another -o folder")
    return outputs


def _fit_channels(img: np.ndarray, n_colors: int | None) -> tuple[np.ndarray, str | None]:
    if n_colors == 1 and img.ndim == 3:
        return D.to_gray(img), "RGB converted to gray (Pillow convert('L'))"
    if n_colors == 3 and img.ndim == 2:
        return D.to_rgb(img), "gray replicated to 3 channels"
    return img, None


def cmd_restore(args) -> int:
    from rnan_fast.inference import DTYPES, model_colors, restore_image

    _check_runtime_args(args)
    device = _device(args.device)
    inputs = _collect_inputs(args.inputs)
    outdir = Path(args.output)
    outputs = _plan_outputs(inputs, outdir, args.overwrite)
    _check_backend(args.backend, device, args.precision)
    net = _load_model(args.weights, device, args.precision, args.trust_checkpoint)
    n_colors = model_colors(net)
    try:
        outdir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create the output folder {outdir}: {e.strerror or e}") from None
    failures, notes = [], set()
    kwargs = _restore_kwargs(args)
    bar = _progress(zip(inputs, outputs), len(inputs), "restore", args.quiet)
    for src, dst in bar:
        try:
            img = D.read_image(src)
        except D.ImageReadError as e:
            _report(f"{PROG}: skipped {e}", args.quiet)
            failures.append(src)
            continue
        img, note = _fit_channels(img, n_colors)
        if note and note not in notes:
            notes.add(note)
            _report(f"{PROG}: note: {note} for this {n_colors}-channel model (first: {src})", args.quiet)
        try:
            out = restore_image(net, img, device=device, dtype=DTYPES[args.precision], **kwargs)
        except (RuntimeError, ValueError, ArithmeticError) as e:
            hint = "; try --tile 256" if "out of memory" in str(e).lower() else ""
            _report(f"{PROG}: failed on {src}: {str(e).splitlines()[0] if str(e) else type(e).__name__}{hint}",
                    args.quiet)
            failures.append(src)
            continue
        try:
            D.write_png_atomic(dst, out)
        except OSError as e:
            _report(f"{PROG}: cannot write {dst}: {e}", args.quiet)
            failures.append(src)
    done = len(inputs) - len(failures)
    print(f"{PROG}: restored {done} of {len(inputs)} image(s) into {outdir}", file=sys.stderr)
    if failures:
        _err(f"{len(failures)} input(s) failed: " + ", ".join(str(f) for f in failures))
        return EXIT_FAILURES
    return EXIT_OK


# --------------------------------------------------------------------------- eval

def _eval_images(data: str) -> list[Path]:
    folder = Path(data)
    if not folder.is_dir():
        raise UserError(f"--data {data}: no such folder")
    files = D.list_images(folder)
    if not files and (folder / "HR").is_dir():  # Set5-style layout: DIR/HR holds the ground truth
        files = D.list_images(folder / "HR")
    if not files:
        raise UserError(f"--data {data}: no images found")
    return files


def _task_params(args, net, model_pending: bool = False) -> dict:
    """Check the task options against each other and against the model; return the degradation.
    model_pending: a model will be loaded later (its scale may supply --scale)."""
    from rnan_fast.inference import model_colors, model_scale

    task = args.task
    p = {"task": task, "scale": 1}
    given = {"--sigma": args.sigma, "--quality": args.quality, "--scale": args.scale}
    needed = {"denoise_gray": "--sigma", "denoise_rgb": "--sigma", "car": "--quality", "sr": "--scale",
              "demosaic": None}[task]
    for opt, val in given.items():
        if val is not None and opt != needed:
            raise UserError(f"{opt} does not apply to --task {task}")
    if task in ("denoise_gray", "denoise_rgb"):
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
            raise UserError(f"--task sr needs a super-resolution model; the checkpoint {args.weights} is a "
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


def _degrade(img: np.ndarray, index: int, p: dict, args):
    """(ground truth, model input) for one image; see the eval help for the protocol.
    ValueError for an image the protocol cannot use (sr: smaller than the scale)."""
    task = p["task"]
    if task == "denoise_gray":
        gt = D.to_gray(img)
        lq = D.add_gaussian_noise(gt, p["sigma"], D.noise_seed(args.seed, index), args.quantize_noisy)
    elif task == "denoise_rgb":
        gt = D.to_rgb(img)
        lq = D.add_gaussian_noise(gt, p["sigma"], D.noise_seed(args.seed, index), args.quantize_noisy)
    elif task == "car":
        gt = D.rgb_to_y(img, rounded=True)
        lq = D.jpeg(gt, p["quality"])
    elif task == "demosaic":
        gt = D.to_rgb(img)
        lq = D.mosaic(gt)
    else:  # bicubic_downscale refuses an image that modcrop would leave empty
        lq = D.bicubic_downscale(D.to_rgb(img), p["scale"], padding=args.resize_padding)
        gt = D.modcrop(img, p["scale"])
    return gt, lq


def _describe_task(p: dict, args) -> str:
    task = p["task"]
    if task.startswith("denoise"):
        q = ", noisy image rounded and clipped to uint8" if args.quantize_noisy else ""
        return f"{task} sigma {p['sigma']:g} (seed {args.seed} + image index{q})"
    if task == "car":
        return f"car JPEG quality {p['quality']} (Y channel)"
    if task == "sr":
        return f"sr x{p['scale']} (bicubic, {args.resize_padding} padding; Y channel, border {p['scale']})"
    return "demosaic (GRBG Bayer)"


def cmd_eval(args) -> int:
    from rnan_fast.inference import DTYPES, restore_image
    from rnan_fast.metrics import evaluate

    _check_runtime_args(args)
    if args.baseline == (args.weights is not None):
        raise UserError("give --weights W.pt (restore and score) or --baseline (score the degraded input)")
    if args.limit is not None and args.limit < 1:
        raise UserError(f"--limit must be >= 1, got {args.limit}")
    if args.csv:
        _prepare_csv(Path(args.csv))
    files = _eval_images(args.data)
    if args.limit is not None:
        files = files[: args.limit]
    net = None
    device = None
    if not args.baseline:
        device = _device(args.device)
        _task_params(args, None, model_pending=True)  # option errors before the (slow) model load
        _check_backend(args.backend, device, args.precision)
        net = _load_model(args.weights, device, args.precision, args.trust_checkpoint)
    p = _task_params(args, net)
    kwargs = _restore_kwargs(args)
    who = "baseline (degraded input)" if net is None else net.describe()
    print(f"# {_describe_task(p, args)}; data {args.data} ({len(files)} images); {who}")
    width = max(12, max(len(f.name) for f in files))
    print(f"{'image':<{width}}  {'PSNR':>8}  {'SSIM':>6}")
    rows, failures = [], []
    t0 = time.perf_counter()
    for index, path in enumerate(_progress(files, len(files), "eval", args.quiet)):
        try:
            img = D.read_image(path)
            gt, lq = _degrade(img, index, p, args)
        except (D.ImageReadError, ValueError) as e:
            _report(f"{PROG}: skipped {path}: {e}", args.quiet)
            failures.append(path)
            continue
        if net is None:
            out = D.bicubic_upscale(lq, p["scale"]) if p["task"] == "sr" else lq
        else:
            try:
                out = restore_image(net, lq, device=device, dtype=DTYPES[args.precision], **kwargs)
            except (RuntimeError, ValueError, ArithmeticError) as e:
                _report(f"{PROG}: failed on {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}",
                        args.quiet)
                failures.append(path)
                continue
        try:  # (a 1-channel SR ground truth is scored on its gray values: metrics.evaluate)
            pv, sv = evaluate(gt, out, p["task"], p["scale"], with_ssim=not args.no_ssim)
        except ValueError as e:  # e.g. an image too small for the SSIM window
            _report(f"{PROG}: cannot score {path}: {e}", args.quiet)
            failures.append(path)
            continue
        rows.append({"image": path.name, "psnr": pv, "ssim": sv})
        s_txt = "" if sv is None else f"{sv:.4f}"
        _report(f"{path.name:<{width}}  {pv:8.4f}  {s_txt:>6}", args.quiet, file=sys.stdout)
    if rows:
        mean_p = statistics.fmean(r["psnr"] for r in rows)
        mean_s = None if args.no_ssim else statistics.fmean(r["ssim"] for r in rows)
        s_txt = "" if mean_s is None else f"{mean_s:.4f}"
        print(f"{'mean':<{width}}  {mean_p:8.4f}  {s_txt:>6}")
        print(f"# {len(rows)} images in {time.perf_counter() - t0:.1f} s")
    if args.csv:
        _write_csv(Path(args.csv), rows, mean_p if rows else math.nan, mean_s if rows else None)
    if failures:
        _err(f"{len(failures)} image(s) failed: " + ", ".join(str(f) for f in failures))
        return EXIT_FAILURES
    return EXIT_OK


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


def _write_csv(path: Path, rows: list[dict], mean_p: float, mean_s) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fmt = lambda v: "" if v is None else f"{v:.6f}"  # noqa: E731
    try:
        with open(tmp, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["image", "psnr", "ssim"])
            for r in rows:
                w.writerow([r["image"], fmt(r["psnr"]), fmt(r["ssim"])])
            w.writerow(["mean", fmt(mean_p), fmt(mean_s)])
        os.replace(tmp, path)
    except OSError as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise UserError(f"cannot write --csv {path}: {e.strerror or e}") from None


# --------------------------------------------------------------------------- bench

def _time_call(fn, device, repeat: int) -> float:
    """Median seconds of fn() after one warm-up call (CUDA: synchronised)."""
    import torch

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    fn()
    sync()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _bench_entry(fn, device, repeat: int, failures: list) -> str:
    """One table cell: the time in ms, "OOM", or "n/a" with the error (then appended to failures)."""
    import torch

    try:
        with torch.inference_mode():
            return f"{_time_call(fn, device, repeat) * 1e3:10.2f}"
    except torch.OutOfMemoryError:
        return f"{'OOM':>10}"
    except Exception as e:  # a table cell, not a crash: name the problem and go on
        failures.append(f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
        return f"{'n/a':>10}  ({type(e).__name__}: {str(e).splitlines()[0][:60] if str(e) else ''})"
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()


def cmd_bench(args) -> int:
    """Forward timings (ms, median) of non-local attention and of a whole RNAN. Exit status 1
    when an entry failed for a reason other than running out of memory."""
    if args.repeat is not None and args.repeat < 1:
        raise UserError(f"--repeat must be >= 1, got {args.repeat}")
    import torch

    import rnan_fast
    from rnan_fast import reference
    from rnan_fast.ops import nonlocal_attention

    device = _device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = device.type == "cuda"
    info = rnan_fast.backend_info()
    fast_ok = cuda and bool(info.get("triton"))
    repeat = args.repeat if args.repeat is not None else (3 if args.quick else (20 if cuda else 5))
    failures: list[str] = []
    dtype = torch.float32
    print(f"# device {device} ({torch.cuda.get_device_name(device) if cuda else 'CPU'}), torch {torch.__version__}, "
          f"triton {info.get('triton_version') or 'absent'}, C++ extension {'yes' if info.get('extension') else 'no'}")
    print(f"# forward time in ms, median of {repeat} after a warm-up; fp32; 'auto' = the fastest "
          f"available backend ({'Triton kernel' if fast_ok else 'no Triton kernel on this device'})")
    sides = ([24, 48] if args.quick else [24, 48, 64]) if not cuda else ([48, 96] if args.quick else [48, 96, 128, 192])
    batch, d = (1, 32) if not cuda else (16, 32)
    gen = torch.Generator(device="cpu").manual_seed(0)
    print(f"\nnon-local attention (softmax over queries), B={batch}, d={d}")
    print(f"{'N (side^2)':>14}  {'naive':>10}  {'reference':>10}  {'auto':>10}")
    for side in sides:
        n = side * side
        theta, phi, g = (torch.randn(batch, n, d, generator=gen).to(device, dtype) for _ in range(3))
        cells = [
            _bench_entry(lambda: reference.nonlocal_attention_naive(theta, phi, g), device, repeat, failures),
            _bench_entry(lambda: nonlocal_attention(theta, phi, g, backend="reference"), device, repeat, failures),
            _bench_entry(lambda: nonlocal_attention(theta, phi, g, backend="auto"), device, repeat, failures),
        ]
        print(f"{f'{n} ({side}^2)':>14}  " + "  ".join(cells))
        del theta, phi, g
    from rnan_fast.model import RNAN

    feats, groups = (64, 10) if cuda else (16, 4)
    img_sides = ([48, 96] if args.quick else [48, 96, 192]) if cuda else ([32] if args.quick else [32, 64])
    print(f"\nRNAN forward (n_feats={feats}, n_resgroups={groups}, scale 1, RGB), B=1")
    print(f"{'image':>14}  {'reference':>10}  {'auto':>10}")
    net = RNAN(n_colors=3, scale=1, n_feats=feats, n_resgroups=groups).to(device, dtype).eval()
    for side in img_sides:
        x = (torch.rand(1, 3, side, side, generator=gen) * 255).to(device, dtype)
        cells = []
        for backend in ("reference", "auto"):
            with rnan_fast.use_backend(backend):
                cells.append(_bench_entry(lambda: net(x), device, repeat, failures))
        print(f"{f'{side}x{side}':>14}  " + "  ".join(cells))
    if failures:
        _err(f"{len(failures)} timing(s) failed (n/a above), first: {failures[0]}")
        return EXIT_FAILURES
    return EXIT_OK


# --------------------------------------------------------------------------- parser

RESTORE_EPILOG = """\
The architecture (colours, scale, width, depth) is read from the checkpoint. A gray model gets
RGB inputs converted with Pillow's convert('L') (ITU-R 601-2 luma, the paper's rgb2gray for gray
denoising); an RGB model gets gray inputs replicated to three channels. SR models write the
upscaled size. Outputs: OUTDIR/<input stem>.png, rounded and clamped to uint8, written through a
temporary file and os.replace. Existing outputs stop the run before any work (nothing is
written) unless --overwrite. Unreadable inputs are reported and skipped; the exit status is then 1.
"""

EVAL_EPILOG = """\
protocols (the shared data README; baseline rows reproduce with --baseline):
  denoise_gray  gray ground truth (RGB files: Pillow convert('L')); input = gt + sigma * N(0,1)
                in float64, numpy default_rng(seed + image index), not rounded or clipped
                (--quantize-noisy: rounded and clipped to uint8); PSNR/SSIM on gray, no border
  denoise_rgb   the same noise on RGB; PSNR with the MSE averaged over R, G, B; SSIM: the mean
                of the three per-channel SSIMs; no border
  car           Y of MATLAB rgb2ycbcr (rounded; gray files as they are), Pillow JPEG at
                --quality; PSNR/SSIM on Y, no border
  demosaic      GRBG Bayer mosaic, missing samples zero, 3-channel input; RGB metrics as denoise_rgb
  sr            ground truth cropped to a multiple of --scale; input = MATLAB imresize(gt, 1/scale,
                'bicubic') on uint8; PSNR/SSIM on unrounded Y, --scale border pixels removed
                (a gray ground truth is scored on its gray values); --baseline = bicubic upscale
SSIM: Wang et al. (11x11 Gaussian, sigma 1.5, K1 0.01, K2 0.03, L 255), mean of the map.
Restored images are rounded and clamped to uint8 before scoring.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="RNAN image restoration: restore images, "
                                     "evaluate on benchmarks, time the kernels.")
    from rnan_fast import __version__

    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="{restore,eval,bench}")

    r = sub.add_parser("restore", help="restore image files or folders with a checkpoint",
                       description="Restore images with an RNAN checkpoint; PNG outputs named after the inputs.",
                       epilog=RESTORE_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    r.add_argument("inputs", nargs="+", metavar="INPUT", help="image files or folders of images")
    r.add_argument("--weights", required=True, metavar="W.pt", help="RNAN checkpoint (official state dict)")
    r.add_argument("-o", "--output", default="restored", metavar="OUTDIR",
                   help="output folder (default ./restored)")
    r.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    _add_runtime_args(r)
    r.set_defaults(func=cmd_restore)

    e = sub.add_parser("eval", help="degrade a test set, restore it, print PSNR/SSIM",
                       description="Benchmark evaluation under the paper's protocols.",
                       epilog=EVAL_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    e.add_argument("--weights", metavar="W.pt", help="RNAN checkpoint")
    e.add_argument("--baseline", action="store_true",
                   help="no model: score the degraded input (bicubic upscale for sr)")
    e.add_argument("--task", required=True, choices=TASKS)
    e.add_argument("--sigma", type=float, help="noise level (denoise_*), 0..255 scale")
    e.add_argument("--quality", type=int, help="JPEG quality (car)")
    e.add_argument("--scale", type=int, help="SR factor (sr; default: the checkpoint's)")
    e.add_argument("--data", required=True, metavar="DIR", help="folder of ground-truth images (or DIR/HR)")
    e.add_argument("--limit", type=int, metavar="N", help="only the first N images (sorted by name)")
    e.add_argument("--csv", metavar="FILE", help="also write per-image and mean PSNR/SSIM to FILE")
    e.add_argument("--seed", type=int, default=0, help="noise seed base: image i uses seed + i (default 0)")
    e.add_argument("--quantize-noisy", action="store_true",
                   help="round and clip the noisy input to uint8 (as stored noisy PNGs are)")
    e.add_argument("--resize-padding", default="symmetric", choices=("symmetric", "replicate"),
                   help="imresize border handling for sr: symmetric (MATLAB, default) or replicate "
                        "(reproduces the RNAN repository's LRBI files)")
    e.add_argument("--no-ssim", action="store_true", help="PSNR only (faster)")
    _add_runtime_args(e)
    e.set_defaults(func=cmd_eval)

    b = sub.add_parser("bench", help="time non-local attention and the model on this device")
    b.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    b.add_argument("--quick", action="store_true", help="fewer sizes and repeats")
    b.add_argument("--repeat", type=int, default=None, help="timed repeats per entry")
    b.set_defaults(func=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status (also for usage errors)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse: --help, --version, usage errors
        return int(e.code) if isinstance(e.code, int) else (0 if e.code is None else EXIT_USAGE)
    if getattr(args, "func", None) is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    try:
        backend = getattr(args, "backend", None)
        if backend is None:
            return args.func(args)
        import rnan_fast

        with rnan_fast.use_backend(backend):  # scoped: in-process callers keep their setting
            return args.func(args)
    except UserError as e:
        _err(str(e))
        return e.code
    except KeyboardInterrupt:
        _err("interrupted")
        return EXIT_INTERRUPT


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
