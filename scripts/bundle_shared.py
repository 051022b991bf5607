"""Copy the few files of the shared data that the GPU check's tests read into the checkout.

    python scripts/bundle_shared.py                  # ../shared (or $RNAN_FAST_SHARED) -> .gpu_shared/
    python scripts/bundle_shared.py --shared DIR --out DIR

A GPU machine receives the checkout and the ignored paths carried with it (64 MiB in all), not
../shared, so without this the data-reading GPU tests would skip. The bundle (~11 MB, git-ignored)
is laid out like the shared folder (fixtures/, data/<set>/), so the tests' fixtures
(tests/conftest.py) take it as RNAN_FAST_SHARED; scripts/gpu_check.sh points there and sets
RNAN_FAST_REQUIRE_SHARED=1, so that a missing file fails instead of skipping. Standard library only.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / ".gpu_shared"

# Glob patterns relative to the shared folder, with the tests of the GPU check that read them.
FILES = {
    "fixtures/official_*_tiny.pt": "official tiny models, golden outputs (conftest.official_tiny, test_model_gpu.py)",
    "fixtures/official_state_dict_manifest.json": "official state-dict layouts (conftest.official_manifest)",
    "data/Kodak24/kodim0[1-2].png": "test_model_gpu.py: the first two Kodak24 images",
    "data/CBSD68/10108[57].png": "test_model_gpu.py: the first two CBSD68 images (odd sizes)",
    "data/Kodak24/kodim0[35].png": "test_train_loop.py: training crops",
    "data/Kodak24/kodim13.png": "test_train_loop.py: training crops",
    "data/Set12/01.png": "test_train_loop.py: a gray training crop",
}


def bundle(shared: Path, out: Path) -> list[Path]:
    """Copy FILES from `shared` into `out` (same relative paths; files already there and of the
    same size are kept). Returns the relative paths. Raises FileNotFoundError naming every pattern
    that matches nothing."""
    matches = {pattern: sorted(shared.glob(pattern)) for pattern in FILES}
    missing = [f"{pattern} ({why})" for pattern, why in FILES.items() if not matches[pattern]]
    if missing:
        raise FileNotFoundError(f"{shared}: nothing matches " + "; ".join(missing))
    copied = []
    for paths in matches.values():
        for src in paths:
            rel = src.relative_to(shared)
            dst = out / rel
            if not (dst.exists() and dst.stat().st_size == src.stat().st_size):
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, dst)
            copied.append(rel)
    return copied


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shared", type=Path,
                    default=Path(os.environ.get("RNAN_FAST_SHARED", REPO.parent / "shared")),
                    help="the shared folder (default: $RNAN_FAST_SHARED or ../shared beside the checkout)")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"the bundle (default: {DEFAULT_OUT})")
    args = ap.parse_args(argv)
    if not args.shared.is_dir():
        print(f"bundle_shared: {args.shared} is not a folder (set --shared or RNAN_FAST_SHARED)", file=sys.stderr)
        return 2
    try:
        files = bundle(args.shared, args.out)
    except FileNotFoundError as e:
        print(f"bundle_shared: {e}", file=sys.stderr)
        return 1
    size = sum((args.out / f).stat().st_size for f in files)
    print(f"bundle_shared: {len(files)} files, {size / 2**20:.1f} MiB in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
