"""``rnan-fast restore``: restore image files or folders with a checkpoint or a shipped model."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from rnan_fast.cli.common import (EXIT_FAILURES, EXIT_OK, PROG, UserError, _add_runtime_args, _check_backend,
                                  _distributed, _err, _first_line, _progress, _report, _warn, _warn_slow_paths,
                                  run_options)
from rnan_fast.cli.models import add_model_args, load_net
from rnan_fast.cli.tiling import ImageRunner
from rnan_fast.image_io import (DEFAULT_MAX_PIXELS, DEFAULT_QUALITY, IMAGE_EXTENSIONS, OUTPUT_FORMATS, ImageReadError,
                                output_suffix, read_photo, write_photo)
from rnan_fast.photos import blend, check_strength, model_input, restored_photo

RESTORE_EPILOG = """\
Without --weights or --model, the default color denoiser that ships with rnan_fast runs (a note
names it; `rnan-fast models` lists the others). On the CPU, images larger than the model's tile
run in its overlapping tiles (64 pixels, overlap 16 for the shipped models: said once; --whole
forces whole images, --tile N chooses the tiles), in bf16 on CPUs with AVX-512 BF16 or AMX
(--precision auto; --precision fp32 for fp32); a bar shows the tiles (or model stages) of an
image that takes a while.

Photos keep what they carry: the EXIF orientation is applied (the output is stored upright,
orientation 1), the ICC colour profile and the EXIF data are written back, alpha is kept (resized
for SR models), 16-bit PNG/TIFF inputs give 16-bit outputs (the model sees value/257 unrounded),
gray inputs give gray outputs (an RGB model's output converted back with 601-2 luma). A gray model
gets colour inputs as luma; a JPEG-artifact model (task car, trained on MATLAB's Y) restores a
colour photo's Y and keeps its chroma as decoded. A demosaicing model takes a GRBG Bayer mosaic: a one-channel image of
the raw samples ((0,0)=G, (0,1)=R, (1,0)=B, (1,1)=G) or the 3-channel form with the missing
samples zero (what `eval --task demosaic` makes); other images are refused one by one. CMYK is converted to sRGB through its profile; of an animation the
first frame is restored. What an output format cannot hold (alpha in JPEG, 16 bits in JPEG or
WebP) is dropped and said.

Outputs: OUTDIR/<stem><suffix>.<ext>, with --ext auto the input's own format (PNG for formats
other than PNG, JPEG, WebP and TIFF); with --recursive, subfolders are mirrored under OUTDIR.
Writes are atomic (a temporary file, then os.replace). Existing outputs stop the run before any
work unless --overwrite (replace them) or --skip-existing (keep them: continue a stopped batch).
Unreadable inputs are reported one line each and skipped, the others written; files in the
folders that are not images are listed once at the end. Exit status 1 when any input failed.
"""


def _walk(folder: Path, recursive: bool, exclude: Path | None) -> tuple[list[tuple[Path, Path]], list[Path], list[Path]]:
    """(images as (file, its folder relative to `folder`), other files, subfolders not entered)
    under `folder`, sorted; hidden entries (.name) and the `exclude` folder (the output) are left out."""
    images, others, skipped_dirs = [], [], []
    for entry in sorted(folder.iterdir(), key=lambda p: p.name):
        if entry.name.startswith("."):
            continue
        if entry.is_dir():
            if exclude is not None and entry.resolve() == exclude:
                continue
            if not recursive:
                skipped_dirs.append(entry)
                continue
            sub_images, sub_others, _ = _walk(entry, True, exclude)
            images.extend((f, Path(entry.name) / rel) for f, rel in sub_images)
            others.extend(sub_others)
        elif entry.suffix.lower() in IMAGE_EXTENSIONS:
            images.append((entry, Path()))
        elif entry.is_file():
            others.append(entry)
    return images, others, skipped_dirs


class Batch:
    """The inputs of one restore run: (input, output) pairs in order, and what was left out."""

    def __init__(self, items: list[str], outdir: Path, recursive: bool, ext: str, suffix: str):
        self.pairs: list[tuple[Path, Path]] = []
        self.not_images: list[Path] = []
        self.skipped_dirs: list[Path] = []
        missing, seen = [], set()
        exclude = outdir.resolve() if outdir.exists() else None
        for item in items:
            p = Path(item)
            if p.is_dir():
                images, others, dirs = _walk(p, recursive, exclude)
                if not images and not others and not dirs:
                    _warn(f"{item}: folder is empty")
                self.not_images.extend(others)
                self.skipped_dirs.extend(dirs)
            elif p.exists():
                images = [(p, Path())]
            else:
                missing.append(item)
                continue
            for f, rel in images:
                key = f.resolve()
                if key not in seen:
                    seen.add(key)
                    self.pairs.append((f, outdir / rel / (f.stem + suffix + output_suffix(f, ext))))
        if missing:
            raise UserError("input not found: " + ", ".join(missing))
        if not self.pairs:
            raise UserError("no input images found" + self._left_out(" (", ")"))

    def _left_out(self, before: str = "", after: str = "") -> str:
        parts = []
        if self.not_images:
            parts.append(f"{len(self.not_images)} file(s) that are not images ({', '.join(IMAGE_EXTENSIONS)}): "
                         + _some(self.not_images))
        if self.skipped_dirs:
            parts.append(f"{len(self.skipped_dirs)} subfolder(s), not entered without --recursive: "
                         + _some(self.skipped_dirs))
        return before + "; ".join(parts) + after if parts else ""

    def check_outputs(self, overwrite: bool, skip_existing: bool) -> int:
        """Refuse clashes and outputs that would replace inputs; with skip_existing drop the
        pairs whose output exists (returns how many), else refuse existing outputs unless
        overwrite. Nothing is written before this passes."""
        by_output: dict[Path, list[Path]] = {}
        for i, o in self.pairs:
            by_output.setdefault(o, []).append(i)
        clashes = {o: ins for o, ins in by_output.items() if len(ins) > 1}
        if clashes:
            o, ins = next(iter(clashes.items()))
            raise UserError(f"{len(clashes)} output name(s) would be written by several inputs, e.g. {o} "
                            f"from {', '.join(map(str, ins))}; use --ext auto (each input keeps its format), "
                            f"--suffix, or separate folders")
        sources = {i.resolve() for i, _ in self.pairs}
        for i, o in self.pairs:
            if o.resolve() in sources:
                raise UserError(f"output {o} would replace the input {i}; choose another -o folder or a --suffix")
        existing = [(i, o) for i, o in self.pairs if o.exists()]
        if skip_existing:
            done = set(existing)
            self.pairs = [pair for pair in self.pairs if pair not in done]
            return len(existing)
        if existing and not overwrite:
            more = f" (and {len(existing) - 1} more)" if len(existing) > 1 else ""
            raise UserError(f"output {existing[0][1]} already exists{more}; nothing was written. Pass "
                            f"--skip-existing to keep them and restore the rest, --overwrite to replace them, "
                            f"or choose another -o folder")
        return 0

    def report_left_out(self) -> None:
        text = self._left_out()
        if text:
            _warn("skipped " + text)


def _some(paths: list[Path], k: int = 5) -> str:
    shown = ", ".join(str(p) for p in paths[:k])
    return shown + (f" and {len(paths) - k} more" if len(paths) > k else "")


def cmd_restore(args) -> int:
    from rnan_fast.inference import model_colors, model_scale

    _check_output_args(args)
    d = _distributed(args.device)  # under torchrun, each rank restores every world_size-th input
    opts = run_options(args, d.device)
    outdir = Path(args.output)
    if outdir.exists() and not outdir.is_dir():
        raise UserError(f"output folder {outdir} exists and is not a folder")
    batch = Batch(args.inputs, outdir, args.recursive, args.ext, args.suffix)
    kept = batch.check_outputs(args.overwrite, args.skip_existing)
    if not batch.pairs:
        batch.report_left_out()
        print(f"{PROG}: nothing to do: all {kept} output(s) exist in {outdir} (--skip-existing)", file=sys.stderr)
        return EXIT_OK
    _check_backend(opts)
    _warn_slow_paths(opts.device, opts.backend, args.quiet or not d.main)
    net, card = load_net(args, opts)
    n_colors, scale = model_colors(net), model_scale(net)
    task = card["task"] if card else None   # a checkpoint without a card: an image-to-image model
    try:
        check_strength(args.strength, scale, task)
    except ValueError as e:
        raise UserError(f"--strength: {e}") from None
    failures, notes = [], set()
    if task == "demosaic" and args.self_ensemble:
        raise UserError("--self-ensemble flips the image, which moves a Bayer mosaic's pattern: not for a "
                        "demosaicing model")
    runner = ImageRunner(opts, net, card)
    mine = batch.pairs[d.rank::d.world_size]
    bar = _progress(mine, len(mine), "restore", args.quiet or not d.main)

    def note(text: str, src: Path) -> None:   # each kind of note once per run, with its first file
        if text not in notes:
            notes.add(text)
            _report(f"{PROG}: note: {text} (first: {src})", args.quiet)

    for src, dst in bar:
        try:
            photo = read_photo(src, max_pixels=args.max_pixels or None)
        except ImageReadError as e:
            _report(f"{PROG}: skipped {e}", args.quiet)
            failures.append(src)
            continue
        try:
            pixels, fit_note = model_input(photo, n_colors, task)
        except ValueError as e:
            _report(f"{PROG}: skipped {src}: {e}", args.quiet)
            failures.append(src)
            continue
        for text in photo.notes + ((fit_note,) if fit_note else ()):
            note(text, src)
        try:
            restored = runner.run(pixels, src, quantize=False)
        except (RuntimeError, ValueError, ArithmeticError) as e:
            hint = ("; even 64-pixel tiles did not fit: try --precision bf16, or --device cpu"
                    if "out of memory" in str(e).lower() else "")
            _report(f"{PROG}: failed on {src}: {_first_line(e)}{hint}", args.quiet)
            failures.append(src)
            continue
        try:
            dst.parent.mkdir(parents=True, exist_ok=True)
            for text in write_photo(dst, restored_photo(photo, blend(pixels, restored, args.strength), scale, task), quality=args.quality):
                note(text, src)
        except OSError as e:
            _report(f"{PROG}: cannot write {dst}: {e.strerror or e}", args.quiet)
            failures.append(src)
    failures = d.gather_lists(failures)
    if not d.main:
        return EXIT_FAILURES if failures else EXIT_OK
    batch.report_left_out()
    done = len(batch.pairs) - len(failures)
    kept_text = f", kept {kept} existing" if kept else ""
    print(f"{PROG}: restored {done} of {len(batch.pairs)} image(s) into {outdir}{kept_text}", file=sys.stderr)
    if failures:
        _err(f"{len(failures)} input(s) failed: " + ", ".join(str(f) for f in failures))
        return EXIT_FAILURES
    return EXIT_OK


def _check_output_args(args) -> None:
    if args.overwrite and args.skip_existing:
        raise UserError("--overwrite and --skip-existing exclude each other")
    if not 1 <= args.quality <= 100:
        raise UserError(f"--quality must be 1..100, got {args.quality}")
    if args.max_pixels < 0:
        raise UserError(f"--max-pixels must be >= 0 (0: no limit), got {args.max_pixels}")
    if "/" in args.suffix or os.sep in args.suffix:
        raise UserError(f"--suffix must not contain a path separator, got {args.suffix!r}")


def add_parser(sub) -> None:
    r = sub.add_parser("restore", help="restore image files or folders (the shipped denoiser, or a checkpoint)",
                       description="Restore images with a shipped RNAN model or a checkpoint; outputs named "
                                   "after the inputs, keeping what each photo carries.",
                       epilog=RESTORE_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    r.add_argument("inputs", nargs="+", metavar="INPUT", help="image files or folders of images")
    add_model_args(r, default_model=True)
    g = r.add_argument_group("outputs")
    g.add_argument("-o", "--output", default="restored", metavar="OUTDIR",
                   help="output folder (default ./restored)")
    g.add_argument("--ext", default="auto", choices=("auto", *OUTPUT_FORMATS),
                   help="output format (default auto: the input's own; PNG for other formats)")
    g.add_argument("--quality", type=int, default=DEFAULT_QUALITY, metavar="Q",
                   help=f"JPEG / WebP quality 1..100 (default {DEFAULT_QUALITY})")
    g.add_argument("--suffix", default="", metavar="S", help="appended to each output's stem, e.g. _rnan")
    g.add_argument("--recursive", action="store_true", help="restore the subfolders of input folders too, "
                   "mirrored under OUTDIR")
    g.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    g.add_argument("--skip-existing", action="store_true",
                   help="keep existing outputs and restore the rest (continue a stopped batch)")
    g.add_argument("--strength", type=float, default=1.0, metavar="S",
                   help="0..1: output = S * restored + (1 - S) * input (default 1); below 1 a denoiser "
                        "keeps more of the photo's texture, and of its noise")
    g.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS, metavar="N",
                   help=f"refuse larger images, a guard against decompression bombs (default {DEFAULT_MAX_PIXELS:,}, "
                        f"Pillow's; 0: no limit)")
    _add_runtime_args(r)
    r.set_defaults(func=cmd_restore)
