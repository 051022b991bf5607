"""``rnan-fast restore``: restore image files or folders with a checkpoint or a shipped model."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from rnan_fast import data as D
from rnan_fast.cli.common import (EXIT_FAILURES, EXIT_OK, PROG, UserError, _add_runtime_args, _check_backend,
                                  _check_runtime_args, _distributed, _err, _first_line, _progress, _report, _warn)
from rnan_fast.cli.models import add_model_args, load_net
from rnan_fast.cli.tiling import ImageRunner

RESTORE_EPILOG = """\
Without --weights or --model, the default color denoiser that ships with rnan_fast runs (a note
names it; `rnan-fast models` lists the others). On the CPU, images whose whole-image attention
would take more than ~20 s run in overlapping 128-pixel tiles (said once; --whole forces whole
images, --tile N chooses the tiles); a bar shows the tiles (or model stages) of an image that
takes a while.
The architecture (colours, scale, width, depth) is read from the checkpoint. A gray model gets
RGB inputs converted with Pillow's convert('L') (ITU-R 601-2 luma, the paper's rgb2gray for gray
denoising); an RGB model gets gray inputs replicated to three channels. SR models write the
upscaled size. Outputs: OUTDIR/<input stem>.png, rounded and clamped to uint8, written through a
temporary file and os.replace. Existing outputs stop the run before any work (nothing is
written) unless --overwrite. Unreadable inputs are reported and skipped; the exit status is then 1.
"""


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
    from rnan_fast.inference import DTYPES, model_colors

    _check_runtime_args(args)
    d = _distributed(args.device)  # under torchrun, each rank restores every world_size-th input
    device = d.device
    inputs = _collect_inputs(args.inputs)
    outdir = Path(args.output)
    outputs = _plan_outputs(inputs, outdir, args.overwrite)
    _check_backend(args.backend, device, args.precision)
    net, _ = load_net(args, device)
    n_colors = model_colors(net)
    try:
        outdir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create the output folder {outdir}: {e.strerror or e}") from None
    failures, notes = [], set()
    runner = ImageRunner(args, net, device, DTYPES[args.precision])
    mine = list(zip(inputs, outputs))[d.rank::d.world_size]
    bar = _progress(mine, len(mine), "restore", args.quiet or not d.main)
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
            out = runner.run(img, src)
        except (RuntimeError, ValueError, ArithmeticError) as e:
            hint = "; try --tile 256" if "out of memory" in str(e).lower() else ""
            _report(f"{PROG}: failed on {src}: {_first_line(e)}{hint}",
                    args.quiet)
            failures.append(src)
            continue
        try:
            D.write_png_atomic(dst, out)
        except OSError as e:
            _report(f"{PROG}: cannot write {dst}: {e}", args.quiet)
            failures.append(src)
    failures = d.gather_lists(failures)
    if not d.main:
        return EXIT_FAILURES if failures else EXIT_OK
    done = len(inputs) - len(failures)
    print(f"{PROG}: restored {done} of {len(inputs)} image(s) into {outdir}", file=sys.stderr)
    if failures:
        _err(f"{len(failures)} input(s) failed: " + ", ".join(str(f) for f in failures))
        return EXIT_FAILURES
    return EXIT_OK


def add_parser(sub) -> None:
    r = sub.add_parser("restore", help="restore image files or folders (the shipped denoiser, or a checkpoint)",
                       description="Restore images with a shipped RNAN model or a checkpoint; PNG outputs named "
                                   "after the inputs.",
                       epilog=RESTORE_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    r.add_argument("inputs", nargs="+", metavar="INPUT", help="image files or folders of images")
    add_model_args(r, default_model=True)
    r.add_argument("-o", "--output", default="restored", metavar="OUTDIR",
                   help="output folder (default ./restored)")
    r.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    _add_runtime_args(r)
    r.set_defaults(func=cmd_restore)
