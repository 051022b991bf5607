"""Per-image comparison of `rnan-fast eval --csv` files on the same images: the mean PSNR of
each, and for the first, its mean gain over each other and on how many images it wins.

    python benchmarks/compare_rows.py ours.csv:psnr noisy.csv:psnr ours.csv:nlm_psnr cbm3d.csv:psnr

A source is FILE:COLUMN (COLUMN defaults to psnr); rows are matched by image name, the "mean"
row is left out. Prints one line per source after the first.
"""
from __future__ import annotations

import csv
import sys


def read(source: str) -> tuple[str, dict[str, float]]:
    path, _, column = source.partition(":")
    with open(path, newline="") as f:
        rows = {r["image"]: float(r[column or "psnr"]) for r in csv.DictReader(f) if r["image"] != "mean"}
    return source, rows


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    (name, first), *others = [read(s) for s in argv]
    print(f"{name}: {len(first)} images, mean {sum(first.values()) / len(first):.4f} dB")
    for other_name, other in others:
        if sorted(other) != sorted(first):
            print(f"{other_name}: not the same images as {name}", file=sys.stderr)
            return 2
        diffs = [first[k] - other[k] for k in first]
        wins = sum(d > 0 for d in diffs)
        print(f"vs {other_name}: mean {sum(other.values()) / len(other):.4f} dB; difference mean "
              f"{sum(diffs) / len(diffs):+.4f}, min {min(diffs):+.4f}, max {max(diffs):+.4f}; {name} higher on "
              f"{wins}/{len(diffs)} images ({100 * wins / len(diffs):.0f}%)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
