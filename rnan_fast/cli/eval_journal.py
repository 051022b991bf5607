"""The journal of an ``rnan-fast eval --csv FILE`` run: FILE.partial, so that an interrupted run
loses only the image it was on and ``--resume`` continues it.

A self-ensembled pass over a test set takes hours on a 2-core CPU (Kodak24 at x8: ~5 min per
image), and the table is written only at the end. The journal is JSON lines: the first line is
{"settings": {...}} (everything that changes a score: protocol, seed, model file digest, tiling,
precision...), then one {"index": i, "row": {...}} per finished image, appended and flushed as
each image ends (one write of one line, O_APPEND: under torchrun every rank appends its own).
It is removed once FILE is written.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from rnan_fast.cli.common import PROG, UserError, _warn


def journal_path(csv_path: Path) -> Path:
    return csv_path.with_name(csv_path.name + ".partial")


def run_settings(args, opts, p: dict, data_files: list[Path], model_id: str | None, beside: str | None) -> dict:
    """What a resumed run must share with the interrupted one (JSON-able; compared key by key).
    p: the degradation of eval._task_params; model_id: "sha256:..." of the weights, None for a
    baseline-only run; beside: the classical method scored beside the model, if any. The data
    folder is the images' resolved parent. opts: the run's RunOptions (precision as resolved)."""
    s = {"task": p["task"], "sigma": p.get("sigma"), "quality": p.get("quality"), "scale": p["scale"],
         "pairs": bool(p.get("pairs")), "seed": args.seed, "quantize_noisy": args.quantize_noisy, "resize_padding": args.resize_padding,
         "ssim": not args.no_ssim, "data": str(data_files[0].resolve().parent) if data_files else None,
         "model": model_id, "baseline": args.baseline, "beside": beside}
    if model_id is not None:
        s.update(precision=opts.precision, backend=opts.backend or os.environ.get("RNAN_FAST_BACKEND", "auto"),
                 tile=opts.tile, tile_overlap=opts.overlap, chop=opts.chop, whole=opts.whole,
                 self_ensemble=opts.self_ensemble)
        if opts.pixel_shuffle != 1:   # (absent when off: journals written before the option still resume)
            s["pixel_shuffle"] = opts.pixel_shuffle
    return s


def refuse_unresumed(csv_path: Path) -> None:
    """UserError when FILE.partial exists: a run without --resume would overwrite its images."""
    path = journal_path(csv_path)
    if path.exists():
        _, rows = _read(path)
        raise UserError(f"{path} holds {len(rows)} finished image(s) of an interrupted `{PROG} eval` into "
                        f"{csv_path}: pass --resume to continue it, or delete the file to start over")


class Journal:
    """FILE.partial of one eval run. `done` maps image index -> row of the images that an
    interrupted run finished (empty for a new run)."""

    def __init__(self, csv_path: Path, settings: dict, files: list[Path], resume: bool):
        """Read (resume) or refuse an existing journal; `start` then begins a new one.
        files: this run's image list, in index order. UserError: a journal exists without
        --resume, or it was made with other settings or images."""
        self.path, self.settings = journal_path(csv_path), settings
        self.done: dict[int, dict] = {}
        self.resumed = resume and self.path.exists()
        self.writable = True
        if not resume:
            refuse_unresumed(csv_path)
        elif self.path.exists():
            old, rows = _read(self.path)
            diff = [f"{k} {old.get(k)!r}, not {v!r}" for k, v in settings.items() if old.get(k) != v]
            if diff:
                raise UserError(f"--resume: {self.path} comes from a run with other settings ("
                                + "; ".join(diff) + "); delete it to start over")
            for index, row in rows:
                if index < len(files) and files[index].name != row["image"]:
                    raise UserError(f"--resume: {self.path} has {row['image']} as image {index + 1}, but "
                                    f"the data folder now has {files[index].name} there; delete it to start over")
                if index < len(files):  # (rows past a smaller --limit stay in the journal, unused)
                    self.done[index] = row

    def start(self) -> None:
        """Write the settings line of a new journal (once, on rank 0). A resumed one is appended
        to, after cutting off a last line that a kill left half-written."""
        try:
            if self.resumed:
                with open(self.path, "rb+") as f:
                    text = f.read()
                    if not text.endswith(b"\n"):
                        f.truncate(text.rfind(b"\n") + 1)
                return
            with open(self.path, "w", encoding="utf-8") as f:
                f.write(json.dumps({"settings": self.settings}) + "\n")
        except OSError as e:
            raise UserError(f"cannot write {self.path}: {e.strerror or e}") from None

    def append(self, index: int, row: dict) -> None:
        """Record one finished image: one line, one write, on an O_APPEND descriptor. A journal
        that cannot be written (deleted, disk full) costs a warning, not the run: the table is
        still written at the end."""
        if not self.writable:
            return
        line = (json.dumps({"index": index, "row": row}) + "\n").encode()
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
            try:
                os.write(fd, line)
            finally:
                os.close(fd)
        except OSError as e:
            self.writable = False
            _warn(f"cannot append to {self.path} ({e.strerror or e}): an interruption from here on "
                  f"cannot be resumed")

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


def _read(path: Path) -> tuple[dict, list[tuple[int, dict]]]:
    """(settings, [(index, row)]) of the journal on disk; a line cut short by a kill (the
    last one) is dropped."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read {path}: {getattr(e, 'strerror', None) or e}; delete it to "
                        f"start over") from None
    entries = []
    for n, line in enumerate(lines):
        try:
            entries.append(json.loads(line))
        except json.JSONDecodeError:
            if n == len(lines) - 1:
                break
            raise UserError(f"{path} line {n + 1} is not a journal entry; delete the file to "
                            f"start over") from None
    if not entries or not isinstance(entries[0], dict) or "settings" not in entries[0]:
        raise UserError(f"{path} is not an eval journal (no settings line); delete it to start over")
    rows = {}
    for e in entries[1:]:
        try:
            index, row = int(e["index"]), e["row"]
            if not isinstance(row["image"], str) or "psnr" not in row:
                raise ValueError
        except (KeyError, TypeError, ValueError):
            raise UserError(f"{path} holds an entry that is not an image row: {e!r}; delete it "
                            f"to start over") from None
        rows[index] = row
    return entries[0]["settings"], sorted(rows.items())
