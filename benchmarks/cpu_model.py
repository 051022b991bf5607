"""Whole-model CPU figures, before (backend "reference") and after (backend "auto": the C++
attention kernel) in one run, written as JSON:

    python benchmarks/cpu_model.py [--json benchmarks/results/model_cpu.json] [--skip infer|train]

  infer  RNAN (RGB denoising, n_feats 64, 10 groups) on one 256x256 image, whole image,
         torch.inference_mode, fp32 (target: at most 1/5 of the 226 s the reference took).
  train  one training step (rnan_fast.train.make_train_step with its defaults: eager on the CPU,
         channels_last, fp32, MSE, Adam):
         RGB, n_feats 32, 4 groups, batch 16, 48x48 (target: at most 2 s per step).
Times (wall, and CPU time / threads) are the median of --repeat calls after one warm-up call (the inference case: of
--infer-repeat calls, no warm-up, since one reference call takes minutes). Each case runs the
backends alternately, so that the load of a shared machine falls on both alike.
"""
from __future__ import annotations

import argparse
import datetime
import json
import statistics
import subprocess
import time
from pathlib import Path

import torch

import rnan_fast
from rnan_fast.train import make_optimizer, make_train_step

BACKENDS = ("reference", "auto")
INFER = dict(config=dict(n_colors=3, scale=1, n_feats=64, n_resgroups=10, rgb_range=255), size=256, target_s=226 / 5)
TRAIN = dict(config=dict(n_colors=3, scale=1, n_feats=32, n_resgroups=4, rgb_range=255), batch=16, patch=48,
             target_s=2.0)


def _timed(fn) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process, all threads) of one call."""
    t0, c0 = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - t0, time.process_time() - c0


def _times(calls: dict, repeat: int, warmup: bool) -> dict:
    """{backend: [(wall, cpu) seconds]} for callables run alternately, `repeat` times each."""
    if warmup:
        for backend, fn in calls.items():
            with rnan_fast.use_backend(backend):
                fn()
    out = {b: [] for b in calls}
    for _ in range(repeat):
        for backend, fn in calls.items():
            with rnan_fast.use_backend(backend):
                out[backend].append(_timed(fn))
    return out


def infer_case(repeat: int) -> dict:
    torch.manual_seed(0)
    net = rnan_fast.RNAN(**INFER["config"]).eval()
    x = torch.rand(1, 3, INFER["size"], INFER["size"]) * 255

    def run():
        with torch.inference_mode():
            net(x)

    times = _times({b: run for b in BACKENDS}, repeat, warmup=False)
    return _summary("infer", times, INFER["target_s"], image=[INFER["size"], INFER["size"]], **INFER["config"])


def train_case(repeat: int) -> dict:
    gen = torch.Generator().manual_seed(0)
    clean = torch.rand(TRAIN["batch"], 3, TRAIN["patch"], TRAIN["patch"], generator=gen) * 255
    noisy = clean + 25 * torch.randn(clean.shape, generator=gen)
    steps = {}
    for backend in BACKENDS:
        torch.manual_seed(0)
        net = rnan_fast.RNAN(**TRAIN["config"])
        step = make_train_step(net, make_optimizer(net), loss="mse", precision="fp32")   # defaults: channels_last
        steps[backend] = (lambda s: lambda: float(s(noisy, clean)))(step)
    times = _times(steps, repeat, warmup=True)
    return _summary("train", times, TRAIN["target_s"], batch=TRAIN["batch"], patch=TRAIN["patch"], **TRAIN["config"])


def _summary(case: str, times: dict, target_s: float, **fields) -> dict:
    """Medians of wall time and of CPU time / threads: on a machine shared with other jobs the
    latter estimates the wall time the call would take alone (the work is parallel throughout)."""
    threads = torch.get_num_threads()
    med = {b: statistics.median(w for w, _ in t) for b, t in times.items()}
    alone = {b: statistics.median(c for _, c in t) / threads for b, t in times.items()}
    row = {"case": case, **fields, "wall_cpu_seconds": times, "median_s": med, "cpu_s_per_thread": alone,
           "speedup": med["reference"] / med["auto"], "target_s": target_s, "target_met": med["auto"] <= target_s}
    print(f"{case}: reference {med['reference']:.2f} s, auto {med['auto']:.2f} s ({row['speedup']:.1f}x); "
          f"CPU s / thread: reference {alone['reference']:.2f}, auto {alone['auto']:.2f}; "
          f"target <= {target_s:.1f} s: {'met' if row['target_met'] else 'missed'} (wall)", flush=True)
    return row


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", type=Path, default=Path(__file__).resolve().parent / "results" / "model_cpu.json")
    p.add_argument("--skip", choices=("infer", "train"), action="append", default=[])
    p.add_argument("--repeat", type=int, default=3, help="training steps timed per backend (default 3)")
    p.add_argument("--infer-repeat", type=int, default=1, help="whole-image calls per backend (default 1)")
    args = p.parse_args(argv)
    if args.repeat < 1 or args.infer_repeat < 1:
        p.error("--repeat and --infer-repeat must be at least 1")
    cases = []
    if "train" not in args.skip:
        cases.append(train_case(args.repeat))
    if "infer" not in args.skip:
        cases.append(infer_case(args.infer_repeat))
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).parent).stdout.strip() or None
    doc = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "commit": commit,
           "threads": torch.get_num_threads(), "backend_info": rnan_fast.backend_info(), "cases": cases}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(doc, indent=1, default=str))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
