"""rnan_fast.train.loop and `rnan-fast train`: exact resume, signals, SIGKILL, degradations shared
with eval, checkpoints that restore/eval load, and the user errors.

Tiny runs: RNAN n_feats 8, 2 groups, 16x16 patches (sr: 8x8 LR), batch 2, a few steps, one
intra-op thread (the thread count is part of what makes runs bitwise reproducible on the CPU).
"""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from rnan_fast import RNAN, cli
from rnan_fast import data as D
from rnan_fast.model import adapt_colors
from rnan_fast.train import TrainConfig, loop, run
from rnan_fast.train import datasets as DS
from rnan_fast.train.checkpoint import read_training_checkpoint

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")

TINY = dict(n_feats=8, n_resgroups=2, patch_size=16, batch_size=2, log_every=1)


@pytest.fixture(scope="module")
def train_dir(data_dir, tmp_path_factory):
    """Four small crops of real images (three colour, one gray) of odd sizes."""
    d = tmp_path_factory.mktemp("train_images")
    for name, box in (("kodim01", (0, 0, 41, 37)), ("kodim05", (100, 60, 139, 95)),
                      ("kodim13", (200, 100, 251, 133))):
        Image.open(data_dir / "Kodak24" / f"{name}.png").crop(box).save(d / f"{name}.png")
    Image.open(data_dir / "Set12" / "01.png").crop((10, 10, 45, 43)).save(d / "set12_01.png")
    return d


def cfg(train_dir, out, **kw):
    base = dict(task="denoise_rgb", sigma=25.0, data=[str(train_dir)], out=str(out), **TINY)
    base.update(kw)
    return loop.resolve_config(base)


def tensors_equal(a, b) -> bool:
    """Bitwise equality of two nested checkpoint structures (tensors compared exactly)."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(tensors_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(tensors_equal(x, y) for x, y in zip(a, b))
    return a == b


def assert_same_training(a: dict, b: dict) -> None:
    assert a["step"] == b["step"]
    for key in ("model", "ema", "optimizer"):
        assert tensors_equal(a[key], b[key]), key
    assert a["data"] == b["data"]


def _run_cli(argv, capsys):
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


# --------------------------------------------------------------------------- resume

@pytest.mark.parametrize("task,opts", [
    ("denoise_rgb", dict(sigma_range=[5.0, 50.0], ema=0.9)),
    ("sr", dict(scale=2, patch_size=8, schedule="cosine")),
])
def test_resume_is_bitwise_equal_to_an_uninterrupted_run(train_dir, tmp_path, task, opts):
    opts = dict(opts, task=task, sigma=None)  # (None: not given; sigma_range replaces it)
    steps = 5
    whole = run(cfg(train_dir, tmp_path / "whole", steps=steps, save_every=100, **opts), quiet=True)
    assert whole["step"] == steps
    # stop at k = 2: an interrupted run leaves last.pt at step 2 (the cosine schedule depends on
    # --steps, so that run keeps steps=5 and is stopped by the signal path)
    first = cfg(train_dir, tmp_path / "parts", steps=steps, save_every=100, **opts)
    sent = []
    original = loop.learning_rate

    def interrupt_after_two(c, step):
        if step == 2 and not sent:  # (the log record asks for step 2's lr again: one signal only)
            sent.append(step)
            os.kill(os.getpid(), signal.SIGINT)  # arrives during step 3's call; the loop stops after it
        return original(c, step)

    loop.learning_rate = interrupt_after_two
    try:
        with pytest.raises(loop.Interrupted) as e:
            run(first, quiet=True)
    finally:
        loop.learning_rate = original
    stopped = e.value.step
    assert 1 <= stopped < steps
    state = read_training_checkpoint(tmp_path / "parts" / "last.pt")
    assert state["step"] == stopped
    resumed_cfg = loop.resolve_config({"out": str(tmp_path / "parts")}, None, state["config"])
    run(resumed_cfg, resume=True, quiet=True, resumed_state=state)
    a = read_training_checkpoint(tmp_path / "whole" / "last.pt")
    b = read_training_checkpoint(tmp_path / "parts" / "last.pt")
    assert_same_training(a, b)
    # the log of the resumed run continues where the checkpoint was, with no duplicated steps
    steps_logged = [r["step"] for r in map(json.loads, (tmp_path / "parts" / "log.jsonl").read_text().splitlines())
                    if "loss" in r]
    assert steps_logged == list(range(1, steps + 1))


def test_resume_with_more_steps_equals_a_longer_run(train_dir, tmp_path):
    """The step schedule: a run of 2 steps extended by --resume --steps 4 is the 4-step run."""
    run(cfg(train_dir, tmp_path / "long", steps=4), quiet=True)
    run(cfg(train_dir, tmp_path / "short", steps=2), quiet=True)
    state = read_training_checkpoint(tmp_path / "short" / "last.pt")
    run(loop.resolve_config({"out": str(tmp_path / "short"), "steps": 4}, None, state["config"]),
        resume=True, quiet=True, resumed_state=state)
    assert_same_training(read_training_checkpoint(tmp_path / "long" / "last.pt"),
                         read_training_checkpoint(tmp_path / "short" / "last.pt"))


def test_a_resumed_demosaicing_run_keeps_its_model(train_dir, tmp_path):
    """A demosaicing run fills its mosaic (RNAN mosaic "grbg"), and a resume keeps it; a run
    checkpointed before the model config was kept (no "model_config") resumes the model it
    trained then, without the fill."""
    from rnan_fast.train.checkpoint import write_checkpoint

    for name, old in (("new", False), ("old", True)):
        out = tmp_path / name
        run(cfg(train_dir, out, task="demosaic", sigma=None, steps=1), quiet=True)
        state = read_training_checkpoint(out / "last.pt")
        assert state["model_config"]["mosaic"] == "grbg"
        if old:
            del state["model_config"]
            write_checkpoint(out / "last.pt", state)
        run(loop.resolve_config({"out": str(out), "steps": 2}, None, state["config"]),
            resume=True, quiet=True, resumed_state=state)
        resumed = read_training_checkpoint(out / "last.pt")
        assert resumed["step"] == 2 and resumed["model_config"]["mosaic"] == (None if old else "grbg")
        assert RNAN.from_checkpoint(out / "last.pt").mosaic == (None if old else "grbg")


def test_batches_do_not_depend_on_workers(train_dir):
    images, _ = DS.load_images([str(train_dir)], "denoise_gray", 16)
    ds = DS.TrainPatches(images, "denoise_gray", 16, 4, seed=3, sigma=15.0)
    batches = []
    for workers in (0, 2):
        loader = torch.utils.data.DataLoader(ds, batch_sampler=DS.StepBatches(1, 4, 4), num_workers=workers,
                                             worker_init_fn=DS.worker_init if workers else None)
        batches.append([b for b in loader])
    for (lq0, gt0), (lq1, gt1) in zip(*batches):
        assert torch.equal(lq0, lq1) and torch.equal(gt0, gt1)
    # two ranks' slices make up the global batch
    halves = [list(DS.StepBatches(2, 3, 4, rank=r, world_size=2)) for r in (0, 1)]
    assert halves[0][0] + halves[1][0] == list(DS.StepBatches(2, 3, 4))[0]


# --------------------------------------------------------------------------- degradations

def _draws(g, img, p):
    """The documented draw order of a non-SR sample: y, x, transform."""
    y = int(torch.randint(img.shape[0] - p + 1, (1,), generator=g))
    x = int(torch.randint(img.shape[1] - p + 1, (1,), generator=g))
    return y, x, int(torch.randint(8, (1,), generator=g))


@pytest.mark.parametrize("task,kw", [("denoise_gray", dict(sigma=30.0)), ("denoise_rgb", dict(sigma=10.0)),
                                     ("car", dict(quality=20)), ("demosaic", {})])
def test_training_degradation_is_the_eval_one(train_dir, task, kw, monkeypatch):
    """A training sample is data.degrade (what `rnan-fast eval` calls) of its flipped/transposed
    patch, with the sample's generator as the noise seed."""
    images, names = DS.load_images([str(train_dir)], task, 16)
    ds = DS.TrainPatches(images, task, 16, 3, seed=11, **kw)
    for n in (0, 4, 7):
        lq, gt = ds[n]
        img = ds._image(n)
        g = DS.sample_generator(11, n // 3, n % 3)
        y, x, i = _draws(g, img, 16)
        patch = np.ascontiguousarray(DS.dihedral(img[y:y + 16, x:x + 16], i))
        want_gt, want_lq = D.degrade(patch, task, seed=g, **kw)
        assert np.array_equal(gt.numpy().transpose(1, 2, 0).squeeze(-1) if gt.shape[0] == 1
                              else gt.numpy().transpose(1, 2, 0), want_gt.astype(np.float32))
        got_lq = lq.numpy().transpose(1, 2, 0)
        assert np.array_equal(got_lq[..., 0] if got_lq.shape[-1] == 1 else got_lq, want_lq.astype(np.float32))
    # eval's degradation goes through the same function
    from rnan_fast.cli import eval as cli_eval

    calls = []
    monkeypatch.setattr(D, "degrade", lambda *a, **k: calls.append((a[1], k)) or (a[0], a[0]))
    cli_eval._degrade(images[0], 0, {"task": task, "scale": 1, **kw},
                      type("A", (), {"seed": 0, "quantize_noisy": False, "resize_padding": "symmetric"}))
    assert calls and calls[0][0] == task


def test_generator_noise_matches_its_generator():
    img = np.random.default_rng(0).integers(0, 256, (9, 13, 3), dtype=np.uint8)
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    noisy = D.add_gaussian_noise(img, 17.5, g1)
    want = img.astype(np.float64) + 17.5 * torch.randn(img.shape, generator=g2, dtype=torch.float64).numpy()
    assert noisy.dtype == np.float64 and np.array_equal(noisy, want)
    with pytest.raises(TypeError, match="torch.Generator"):
        D.add_gaussian_noise(img, 1.0, "7")


@pytest.mark.parametrize("scale", [2, 3, 4])
def test_sr_patches_are_crops_of_the_whole_image_degradation(data_dir, scale):
    """The LR patch cut from a downscaled region with margin equals the whole image's bicubic
    downscale cropped there (exactly), also at the image borders."""
    img = D.read_image(data_dir / "Kodak24" / "kodim03.png")[:150, :171]
    p = 10
    ds = DS.TrainPatches([img], "sr", p, 8, seed=2, scale=scale)
    gt_whole, lr_whole = D.degrade(img, "sr", scale=scale)
    h, w = img.shape[0] // scale, img.shape[1] // scale
    for n in range(24):
        lq, gt = ds[n]
        g = DS.sample_generator(2, n // 8, n % 8)
        y = int(torch.randint(h - p + 1, (1,), generator=g))
        x = int(torch.randint(w - p + 1, (1,), generator=g))
        i = int(torch.randint(8, (1,), generator=g))
        want_lq = DS.dihedral(lr_whole[y:y + p, x:x + p], i)
        want_gt = DS.dihedral(gt_whole[y * scale:(y + p) * scale, x * scale:(x + p) * scale], i)
        assert np.array_equal(lq.numpy().transpose(1, 2, 0), want_lq.astype(np.float32))
        assert np.array_equal(gt.numpy().transpose(1, 2, 0), want_gt.astype(np.float32))


# --------------------------------------------------------------------------- checkpoints in restore/eval

def test_checkpoints_load_in_restore_and_eval(train_dir, tmp_path, capsys):
    out = tmp_path / "run"
    code, stdout, err = _run_cli(["train", "--task", "denoise_rgb", "--sigma", 25, "--data", train_dir,
                                  "--out", out, "--steps", 2, "--batch-size", 2, "--patch-size", 16,
                                  "--n-feats", 8, "--n-resgroups", 2, "--ema", 0.5, "--val", train_dir,
                                  "--val-every", 1, "--val-limit", 2, "--quiet"], capsys)
    assert code == 0, err
    assert {"last.pt", "best.pt", "log.jsonl", "config.json"} <= set(os.listdir(out))
    config = json.loads((out / "config.json").read_text())
    assert config["n_feats"] == 8 and config["ema"] == 0.5 and config["steps"] == 2
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    val = [r for r in records if "val_psnr" in r]
    assert [r["step"] for r in val] == [1, 2] and all(r["val_images"] == 2 for r in val)
    # from_checkpoint gives the EMA weights of a training checkpoint
    state = read_training_checkpoint(out / "best.pt")
    net = RNAN.from_checkpoint(out / "best.pt")
    assert tensors_equal(net.state_dict(), state["ema"])
    assert not tensors_equal(state["ema"], state["model"])
    code, _, err = _run_cli(["restore", "--weights", out / "last.pt", "-o", tmp_path / "restored", "--quiet",
                             train_dir / "kodim05.png"], capsys)
    assert code == 0, err
    assert D.read_image(tmp_path / "restored" / "kodim05.png").shape == (35, 39, 3)
    code, stdout, err = _run_cli(["eval", "--weights", out / "best.pt", "--task", "denoise_rgb", "--sigma", 25,
                                  "--data", train_dir, "--limit", 2, "--quiet"], capsys)
    assert code == 0, err
    mean = float(next(line for line in stdout.splitlines() if line.startswith("mean")).split()[1])
    best = max(r["val_psnr"] for r in val)
    assert abs(mean - best) <= 5e-5  # eval prints 4 decimals; validation is its protocol (seed, images)


# --------------------------------------------------------------------------- signals and SIGKILL

def test_signal_checks_under_ddp_only_on_syncing_steps():
    """One process looks at the flag every step; DDP ranks only on steps that sync anyway and
    every SIGNAL_CHECK_EVERY steps, so a signal costs at most that many steps' delay."""
    k = loop.SIGNAL_CHECK_EVERY
    assert all(loop.signal_check_due(s, False, False) for s in range(1, 3 * k))
    due = [s for s in range(1, 3 * k + 1) if loop.signal_check_due(s, True, False)]
    assert due == [k, 2 * k, 3 * k]
    assert loop.signal_check_due(k + 1, True, True)


def _train_proc(out, train_dir, steps, extra=()):
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    argv = [sys.executable, "-m", "rnan_fast", "train", "--task", "denoise_rgb", "--sigma", "25", "--data",
            str(train_dir), "--out", str(out), "--steps", str(steps), "--batch-size", "2", "--patch-size", "16",
            "--n-feats", "8", "--n-resgroups", "2", "--save-every", "1", "--quiet", *extra]
    return subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_step(out, at_least, proc, timeout=240):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        log = out / "log.jsonl"
        if log.exists():
            steps = [json.loads(x)["step"] for x in log.read_text().splitlines() if x.strip()]
            if steps and steps[-1] >= at_least:
                return
        if proc.poll() is not None:
            pytest.fail(f"training ended early: {proc.communicate()[1]}")
        time.sleep(0.05)
    proc.kill()
    pytest.fail("training did not reach the step in time")


@pytest.mark.parametrize("how", ["SIGKILL", "SIGTERM"])
def test_killed_run_resumes_to_the_uninterrupted_weights(train_dir, tmp_path, how, capsys):
    """A run killed mid-way (SIGKILL: no chance to save; SIGTERM: saves and exits) leaves a
    loadable last.pt; resumed, it ends where an uninterrupted run of as many steps ends."""
    out = tmp_path / "killed"
    proc = _train_proc(out, train_dir, 400)  # far more steps than it gets to run
    _wait_for_step(out, 3, proc)
    proc.send_signal(getattr(signal, how))
    _, err = proc.communicate(timeout=120)
    if how == "SIGKILL":
        assert proc.returncode == -signal.SIGKILL
    else:
        assert proc.returncode == 128 + signal.SIGTERM, err
        assert "SIGTERM" in err and "--resume" in err and "Traceback" not in err
        assert not [p for p in os.listdir(out) if p.endswith(".tmp")]
    stopped = read_training_checkpoint(out / "last.pt")["step"]  # loadable, never half-written
    assert stopped >= 2
    target = stopped + 2
    code, _, err = _run_cli(["train", "--out", out, "--resume", "--steps", target, "--quiet"], capsys)
    assert code == 0, err
    run(cfg(train_dir, tmp_path / "whole", steps=target, save_every=1, log_every=100), quiet=True)
    assert_same_training(read_training_checkpoint(tmp_path / "whole" / "last.pt"),
                         read_training_checkpoint(out / "last.pt"))


# --------------------------------------------------------------------------- every task trains

@pytest.mark.parametrize("task,opts", [
    ("denoise_gray", dict(sigma=50.0)), ("car", dict(quality=10)), ("demosaic", {}),
    ("sr", dict(scale=3, patch_size=8)), ("denoise_rgb", dict(sigma=25.0, precision="bf16")), ("denoise_photo", {}),
])
def test_each_task_trains_and_its_checkpoint_fits_eval(train_dir, tmp_path, task, opts, capsys):
    opts = dict(opts)
    sigma = opts.pop("sigma", None)
    out = tmp_path / task
    result = run(cfg(train_dir, out, task=task, sigma=sigma, steps=2, **opts), quiet=True)
    assert np.isfinite(result["loss"])
    net = RNAN.from_checkpoint(out / "last.pt")
    assert net.config["n_colors"] == D.TASK_COLORS[task] and net.config["scale"] == opts.get("scale", 1)
    # a demosaicing run trains (and its checkpoint rebuilds) the model that fills the mosaic first
    assert net.config["mosaic"] == ("grbg" if task == "demosaic" else None)
    argv = ["eval", "--weights", out / "last.pt", "--task", task, "--data", train_dir, "--limit", 1,
            "--quiet", "--no-ssim", "--whole"]
    argv += {"denoise_gray": ["--sigma", 50], "denoise_rgb": ["--sigma", 25], "car": ["--quality", 10],
             "demosaic": [], "sr": [], "denoise_photo": []}[task]
    code, _, err = _run_cli(argv, capsys)
    assert code == 0, err


def test_init_from_official_weights(train_dir, tmp_path):
    torch.manual_seed(9)
    official = RNAN(n_colors=3, scale=1, n_feats=8, n_resgroups=2).state_dict()
    torch.save({"state_dict": {"module." + k: v for k, v in official.items()}}, tmp_path / "official.pt")
    run(cfg(train_dir, tmp_path / "run", steps=1, lr=1e-12, init=str(tmp_path / "official.pt")), quiet=True)
    trained = read_training_checkpoint(tmp_path / "run" / "last.pt")["model"]
    assert max(float((trained[k] - v).abs().max()) for k, v in official.items()) < 1e-9  # lr ~ 0: the init
    with pytest.raises(loop.ConfigError, match=r"--init .*n_feats 8 \(run: 16\)"):
        run(cfg(train_dir, tmp_path / "run16", steps=1, n_feats=16, init=str(tmp_path / "official.pt")), quiet=True)
    # a gray denoiser from the color weights: head and tail adapted (model.adapt_colors), with a note
    notes = []
    run(cfg(train_dir, tmp_path / "gray", task="denoise_gray", steps=1, lr=1e-12, init=str(tmp_path / "official.pt")),
        quiet=True, message=notes.append)
    trained = read_training_checkpoint(tmp_path / "gray" / "last.pt")["model"]
    want = adapt_colors(official, 1)
    assert max(float((trained[k] - v).abs().max()) for k, v in want.items()) < 1e-9
    assert any("3-channel weights adapted to 1 channel" in n for n in notes), notes


def test_init_across_scales_takes_what_fits(train_dir, tmp_path):
    """An sr run from a denoiser takes the head and body, an x4 run from an x2 model also the first
    upsampler stage and the last conv; the note names what stays fresh."""
    torch.manual_seed(11)
    denoiser = RNAN(n_colors=3, scale=1, n_feats=8, n_resgroups=2).state_dict()
    torch.save(denoiser, tmp_path / "dn.pt")
    notes = []
    run(cfg(train_dir, tmp_path / "x2", task="sr", sigma=None, scale=2, patch_size=8, steps=1, lr=1e-12, init=str(tmp_path / "dn.pt")),
        quiet=True, message=notes.append)
    x2 = read_training_checkpoint(tmp_path / "x2" / "last.pt")["model"]
    body = [k for k in denoiser if not k.startswith("tail.")]
    assert max(float((x2[k] - denoiser[k]).abs().max()) for k in body) < 1e-9
    fresh = [k for k in x2 if k not in body]
    assert fresh and all(k.startswith(("tail.", "sub_mean.", "add_mean.")) for k in fresh), fresh
    note = next(n for n in notes if "scale 1 weights in a scale 2 run" in n)
    assert f"took {len(body)} of {len(x2)} tensors" in note and "tail.0.0.weight" in note, note
    notes.clear()
    run(cfg(train_dir, tmp_path / "x4", task="sr", sigma=None, scale=4, patch_size=8, steps=1, lr=1e-12,
            init=str(tmp_path / "x2" / "last.pt")), quiet=True, message=notes.append)
    x4 = read_training_checkpoint(tmp_path / "x4" / "last.pt")["model"]
    shared = [k for k in x2 if k in x4 and x2[k].shape == x4[k].shape]
    assert "tail.0.0.weight" in shared and "tail.1.weight" in shared
    assert max(float((x4[k] - x2[k]).abs().max()) for k in shared) < 1e-9
    assert any("fresh: tail.0.2.weight, tail.0.2.bias" in n for n in notes), notes
    with pytest.raises(loop.ConfigError, match=r"n_feats 8 \(run: 16\)"):
        run(cfg(train_dir, tmp_path / "x2b", task="sr", sigma=None, scale=2, n_feats=16, steps=1,
                init=str(tmp_path / "dn.pt")), quiet=True)


def test_loop_with_data_workers_equals_without(train_dir, tmp_path):
    run(cfg(train_dir, tmp_path / "w0", steps=2, workers=0), quiet=True)
    run(cfg(train_dir, tmp_path / "w2", steps=2, workers=2), quiet=True)
    assert_same_training(read_training_checkpoint(tmp_path / "w0" / "last.pt"),
                         read_training_checkpoint(tmp_path / "w2" / "last.pt"))


def test_learning_rate_schedules(train_dir, tmp_path):
    step = cfg(train_dir, tmp_path, steps=10**6)  # the official: halved every 200,000 steps
    assert [loop.learning_rate(step, t) for t in (0, 199_999, 200_000, 399_999, 400_000)] == \
        [1e-4, 1e-4, 5e-5, 5e-5, 2.5e-5]
    cosine = cfg(train_dir, tmp_path, steps=1000, schedule="cosine", lr=2e-4)
    assert loop.learning_rate(cosine, 0) == 2e-4
    assert loop.learning_rate(cosine, 500) == pytest.approx(1e-4, rel=1e-12)
    assert loop.learning_rate(cosine, 1000) == pytest.approx(0.0, abs=1e-20)
    lrs = [loop.learning_rate(cosine, t) for t in range(0, 1001, 50)]
    assert all(a > b for a, b in zip(lrs, lrs[1:]))


def test_sigma_range_draws_a_level_per_patch(train_dir):
    """Each patch's noise level is uniform in [A, B]: recovered from the noise it carries."""
    images, _ = DS.load_images([str(train_dir)], "denoise_gray", 16)
    ds = DS.TrainPatches(images, "denoise_gray", 16, 8, seed=1, sigma_range=(10.0, 40.0))
    levels = [float((lq - gt).std()) for lq, gt in (ds[n] for n in range(32))]
    assert 8.0 < min(levels) and max(levels) < 45.0 and max(levels) - min(levels) > 10.0


@pytest.mark.parametrize("fast_bf16", [False, True])
def test_bf16_on_a_cpu_without_native_bf16_gets_a_note(train_dir, tmp_path, monkeypatch, fast_bf16):
    monkeypatch.setattr(loop, "_cpu_has_fast_bf16", lambda: fast_bf16)
    notes = []
    run(cfg(train_dir, tmp_path / "run", steps=1, precision="bf16"), quiet=True, message=notes.append)
    slow = [n for n in notes if "--precision bf16" in n]
    assert bool(slow) != fast_bf16, notes
    notes.clear()
    run(cfg(train_dir, tmp_path / "fp32", steps=1), quiet=True, message=notes.append)
    assert not [n for n in notes if "bf16" in n], notes
