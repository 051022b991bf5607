"""torchrun with 2 CPU processes (gloo): training equals one process at the same global batch,
and restore / eval split the images across ranks with the results of one process."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from rnan_fast import RNAN, cli
from rnan_fast import data as D
from rnan_fast.train import loop, run
from rnan_fast.train.checkpoint import read_training_checkpoint

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Five random RGB images of odd sizes (an odd count: the ranks get unequal shares)."""
    d = tmp_path_factory.mktemp("dist_imgs")
    rng = np.random.default_rng(8)
    for i, (h, w) in enumerate(((23, 31), (17, 40), (29, 19), (21, 21), (18, 33))):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(d / f"im{i}.png")
    return d


def torchrun(argv, nproc=2, timeout=600):
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "rnan_fast", *map(str, argv)]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def test_two_processes_train_what_one_process_trains(images, tmp_path):
    common = dict(task="denoise_rgb", sigma=20.0, data=[str(images)], steps=3, batch_size=4, patch_size=16,
                  n_feats=8, n_resgroups=2, ema=0.5, val=[str(images)], val_every=3, log_every=1, lr=1e-3)
    argv = ["train", "--out", tmp_path / "two", "--quiet"]
    for key, value in common.items():
        flag = "--" + key.replace("_", "-")
        argv += [flag, *value] if isinstance(value, list) else [flag, value]
    proc = torchrun(argv)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 processes" in proc.stderr and "Traceback" not in proc.stderr
    assert proc.stdout.count("trained to step 3") == 1  # rank 0 reports
    run(loop.resolve_config(dict(common, out=str(tmp_path / "one"))), quiet=True)
    two = read_training_checkpoint(tmp_path / "two" / "last.pt")
    one = read_training_checkpoint(tmp_path / "one" / "last.pt")
    assert two["step"] == one["step"] == 3 and two["data"] == one["data"]
    lr, worst = common["lr"], 0.0
    for name, p in one["model"].items():
        q = two["model"][name]
        if name.endswith("theta.bias"):
            # its gradient is zero in exact arithmetic (softmax over queries): Adam turns rounding
            # noise into steps of up to lr, which no two reduction orders share
            assert (p - q).abs().max() <= 2 * lr * common["steps"]
            continue
        worst = max(worst, float((p - q).abs().max() / p.abs().max().clamp_min(1e-6)))
    assert worst < 1e-4, worst
    # one log (rank 0), validation over all images of both ranks, metrics that agree
    logs = {k: [json.loads(x) for x in (tmp_path / k / "log.jsonl").read_text().splitlines()] for k in ("one", "two")}
    assert [r["step"] for r in logs["two"]] == [r["step"] for r in logs["one"]]
    val_one, val_two = (next(r for r in logs[k] if "val_psnr" in r) for k in ("one", "two"))
    assert val_one["val_images"] == val_two["val_images"] == 5
    assert abs(val_one["val_psnr"] - val_two["val_psnr"]) < 1e-3
    losses = [(a["loss"], b["loss"]) for a, b in zip(logs["one"], logs["two"]) if "loss" in a]
    assert all(abs(a - b) <= 1e-4 * abs(a) for a, b in losses)


def test_restore_and_eval_split_images_across_ranks(images, tmp_path, capsys, monkeypatch):
    torch.manual_seed(3)
    net = RNAN(n_colors=3, scale=1, n_feats=8, n_resgroups=2)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    weights = tmp_path / "w.pt"
    torch.save(net.state_dict(), weights)
    # --precision fp32: torchrun's processes do not see the tests' fp32 `auto` (conftest)
    proc = torchrun(["restore", "--weights", weights, "-o", tmp_path / "two", "--quiet", "--whole", "--precision", "fp32",
                     images])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.count("restored 5 of 5") == 1
    assert cli.main(["restore", "--weights", str(weights), "-o", str(tmp_path / "one"), "--quiet", "--whole",
                     "--precision", "fp32", str(images)]) == 0
    names = sorted(os.listdir(tmp_path / "one"))
    assert names == sorted(os.listdir(tmp_path / "two")) and len(names) == 5
    for n in names:
        assert np.array_equal(D.read_image(tmp_path / "one" / n), D.read_image(tmp_path / "two" / n))
    capsys.readouterr()
    argv = ["eval", "--weights", weights, "--task", "denoise_rgb", "--sigma", 15, "--data", images, "--quiet",
            "--whole", "--precision", "fp32"]
    proc = torchrun(argv + ["--csv", tmp_path / "two.csv"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert cli.main([str(a) for a in argv] + ["--csv", str(tmp_path / "one.csv")]) == 0
    one_out = capsys.readouterr().out
    table = lambda text: [line for line in text.splitlines() if not line.startswith("#")]  # noqa: E731
    assert table(proc.stdout) == table(one_out) and len(table(one_out)) == 7  # header, 5 images, mean
    assert (tmp_path / "two.csv").read_text() == (tmp_path / "one.csv").read_text()
    # --resume under torchrun: the ranks share the images the journal lacks; the table is the same
    from rnan_fast.cli.eval_journal import Journal
    monkeypatch.setattr(Journal, "remove", lambda self: None)  # a run of 2 images whose journal stays behind
    assert cli.main([str(a) for a in argv] + ["--csv", str(tmp_path / "part.csv"), "--limit", "2"]) == 0
    monkeypatch.undo()
    (tmp_path / "part.csv.partial").rename(tmp_path / "three.csv.partial")
    capsys.readouterr()
    proc = torchrun(argv + ["--csv", tmp_path / "three.csv", "--resume"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 of 5 images come from" in proc.stderr and table(proc.stdout) == table(one_out)
    assert (tmp_path / "three.csv").read_text() == (tmp_path / "one.csv").read_text()
    assert not (tmp_path / "three.csv.partial").exists()


def test_global_batch_must_split_evenly(images, tmp_path):
    proc = torchrun(["train", "--task", "demosaic", "--data", images, "--out", tmp_path / "r", "--steps", 1,
                     "--batch-size", 3, "--patch-size", 16, "--n-feats", 8, "--n-resgroups", 2, "--quiet"])
    assert proc.returncode != 0
    assert "rnan-fast: error: --batch-size 3 (the global batch) must be a multiple of the 2 processes" in proc.stderr
    # (torchrun itself prints a traceback of its agent when a worker fails; none comes from rnan_fast)
    assert not [line for line in proc.stderr.splitlines() if line.strip().startswith("File") and "rnan_fast" in line]
