"""The training loop against the bare training step: what the data pipeline and the loop cost.

    pytest benchmarks/bench_train.py --benchmark-columns=median,iqr,rounds

Same model, same batch shape, same run:
  step   rnan_fast.train.make_train_step called on one pre-made batch (no data work at all)
  loop   rnan_fast.train.run: patches cut from decoded images, flipped, degraded on the fly
         (data.degrade, one generator per sample), the learning-rate schedule, the loss checks
         and log.jsonl; images/s read from its log records (training time only), steps after
         the first (warm-up) only
extra_info: images_per_s of each, and on the loop case ratio = loop / step images/s and
data_ms_per_batch (the DataLoader alone, no step).

Target (issue: the data pipeline costs at most 10%): loop images/s >= 0.9 x step images/s.
  CPU  tiny RNAN (n_feats 8, 2 groups), global batch 16, 24x24 patches, one thread, workers 0:
       the fastest step we train on a CPU, so the pipeline's share is as large as it gets.
  GPU  the official size (n_feats 64, 10 groups), batch 16, 48x48, CUDA-graph step, 4 workers.
Tasks: denoise_rgb (noise: the cheapest degradation) and sr x2 (MATLAB bicubic per patch: the
dearest). Training images: Kodak24 of the shared data (24 images, 768x512).
"""
from __future__ import annotations

import json
import os
import statistics
import time
from pathlib import Path

import pytest
import torch

from rnan_fast.train import datasets as DS
from rnan_fast.train import loop, make_optimizer, make_train_step

CUDA = torch.cuda.is_available()
SHARED = Path(os.environ.get("RNAN_FAST_SHARED", Path(__file__).resolve().parents[2] / "shared"))
KODAK = SHARED / "data" / "Kodak24"
TARGET_RATIO = 0.9
CASES = {
    "cpu": dict(device="cpu", n_feats=8, n_resgroups=2, batch_size=16, patch_size=24, workers=0, steps=12),
    "cuda": dict(device="cuda", n_feats=64, n_resgroups=10, batch_size=16, patch_size=48, workers=4, steps=60),
}
TASKS = {"denoise_rgb": dict(sigma=25.0), "sr": dict(scale=2)}
RESULTS: dict = {}


def _skip_reason(device: str) -> str | None:
    if device == "cuda" and not CUDA:
        return "no CUDA device on this machine"
    if not KODAK.is_dir():
        return f"{KODAK} is absent (set RNAN_FAST_SHARED)"
    return None


@pytest.fixture
def threads():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)  # a shared 2-core machine: one thread keeps the two cases comparable
    yield
    torch.set_num_threads(previous)


def _config(device: str, task: str, out: Path) -> loop.TrainConfig:
    case = dict(CASES[device])
    return loop.resolve_config(dict(task=task, data=[str(KODAK)], out=str(out), log_every=1,
                                    save_every=10**6, **case, **TASKS[task]))


def _patches(cfg: loop.TrainConfig) -> DS.TrainPatches:
    """The training patches of `cfg`, as rnan_fast.train.run cuts them."""
    images, _ = DS.load_images(cfg.data, cfg.task, cfg.patch_size * cfg.model_scale)
    return DS.TrainPatches(images, cfg.task, cfg.patch_size, cfg.batch_size, cfg.seed, sigma=cfg.sigma,
                           scale=cfg.model_scale)


@pytest.mark.parametrize("task", list(TASKS))
@pytest.mark.parametrize("device", list(CASES))
def test_bare_step(benchmark, threads, device, task, tmp_path):
    if _skip_reason(device):
        pytest.skip(_skip_reason(device))
    cfg = _config(device, task, tmp_path)
    net = loop._model(cfg).to(device)
    step = make_train_step(net, make_optimizer(net, lr=cfg.lr), loss="l1" if task == "sr" else "mse",
                           channels_last=True)  # as the loop (rnan_fast.train.loop: NHWC on CPUs too)
    ds = _patches(cfg)
    lq, gt = torch.utils.data.default_collate([ds[k] for k in range(cfg.batch_size)])
    lq, gt = lq.to(device), gt.to(device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def one():
        step(lq, gt)
        sync()

    one()  # capture (CUDA) / first-call allocation
    benchmark.pedantic(one, rounds=11 if device == "cpu" else 50, warmup_rounds=1)
    ips = cfg.batch_size / benchmark.stats.stats.median
    benchmark.extra_info["images_per_s"] = ips
    RESULTS[(device, task, "step")] = ips


@pytest.mark.parametrize("task", list(TASKS))
@pytest.mark.parametrize("device", list(CASES))
def test_loop(benchmark, threads, device, task, tmp_path):
    if _skip_reason(device):
        pytest.skip(_skip_reason(device))
    if (device, task, "step") not in RESULTS:
        pytest.skip("needs test_bare_step of the same case in this run (same-run ratio)")
    cfg = _config(device, task, tmp_path / "run")
    ds = _patches(cfg)   # the data pipeline alone: batches as the loop's DataLoader makes them
    t0 = time.perf_counter()
    for _ in torch.utils.data.DataLoader(ds, batch_sampler=DS.StepBatches(0, 5, cfg.batch_size)):
        pass
    data_ms = (time.perf_counter() - t0) / 5 * 1e3

    def whole_run():
        for f in (tmp_path / "run").glob("*"):
            f.unlink()
        loop.run(cfg, quiet=True, message=lambda _m: None)

    benchmark.pedantic(whole_run, rounds=1, iterations=1)
    records = [json.loads(x) for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    ips = statistics.median(r["images_per_s"] for r in records if "images_per_s" in r and r["step"] > 1)
    ratio = ips / RESULTS[(device, task, "step")]
    benchmark.extra_info.update(images_per_s=ips, ratio=ratio, data_ms_per_batch=data_ms,
                                target_ratio=TARGET_RATIO)
    print(f"\n{device} {task}: loop {ips:.2f} img/s, bare step {RESULTS[(device, task, 'step')]:.2f} img/s, "
          f"ratio {ratio:.3f}; data alone {data_ms:.1f} ms per batch of {cfg.batch_size}")
    assert ratio >= TARGET_RATIO, f"the loop runs at {ratio:.3f} of the bare step's images/s"
