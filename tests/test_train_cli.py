"""`rnan-fast train` user errors: each a one-line message and exit status 2 (1 for a
non-finite loss), no traceback, nothing lost (an existing run is never overwritten)."""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from rnan_fast import cli
from rnan_fast.train import datasets as DS
from rnan_fast.train.checkpoint import read_training_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = ["--batch-size", 2, "--patch-size", 16, "--n-feats", 8, "--n-resgroups", 2, "--quiet"]


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Three random RGB images of odd sizes (>= 16 pixels a side)."""
    d = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(4)
    for i, (h, w) in enumerate(((23, 31), (17, 40), (29, 19))):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(d / f"im{i}.png")
    return d


def train(argv, capsys):
    code = cli.main(["train"] + [str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code, err, *needles, status=2):
    assert code == status, err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("rnan-fast: error:")]
    assert len(errors) == 1, err
    for needle in needles:
        assert needle in errors[0], errors[0]


def base(images, out, *extra):
    return ["--task", "denoise_rgb", "--sigma", 25, "--data", images, "--out", out, "--steps", 2, *TINY, *extra]


def test_missing_and_empty_data_folders(images, tmp_path, capsys):
    code, _, err = train(base(tmp_path / "nope", tmp_path / "run"), capsys)
    assert_one_line_error(code, err, "--data", "nope", "no such folder")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("not an image")
    code, _, err = train(base(empty, tmp_path / "run"), capsys)
    assert_one_line_error(code, err, "holds no images")
    assert not (tmp_path / "run" / "last.pt").exists()


def test_images_smaller_than_the_patch_are_named(images, tmp_path, capsys):
    d = tmp_path / "small"
    d.mkdir()
    (d / "ok.png").write_bytes((images / "im0.png").read_bytes())
    Image.fromarray(np.full((12, 30, 3), 7, np.uint8)).save(d / "tiny.png")
    code, _, err = train(base(d, tmp_path / "run"), capsys)
    assert_one_line_error(code, err, "tiny.png (12x30)", "16x16", "--patch-size")
    # sr: the HR patch is patch * scale
    code, _, err = train(["--task", "sr", "--scale", 2, "--data", images, "--out", tmp_path / "sr", "--steps", 1,
                          "--batch-size", 2, "--patch-size", 12, "--n-feats", 8, "--n-resgroups", 2], capsys)
    assert_one_line_error(code, err, "smaller than the 24x24 training patch", "im0.png (23x31)")


def test_unreadable_image_is_skipped_and_named(images, tmp_path, capsys):
    d = tmp_path / "mixed"
    d.mkdir()
    for name in ("im0.png", "im1.png"):
        (d / name).write_bytes((images / name).read_bytes())
    (d / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    code, out, err = train(base(d, tmp_path / "run"), capsys)
    assert code == 0, err
    assert "broken.png" in err and "skipped" in err and "Traceback" not in err
    assert "data: 2 images" in err
    only = tmp_path / "only_broken"
    only.mkdir()
    (only / "broken.png").write_bytes(b"garbage")
    code, _, err = train(base(only, tmp_path / "run2"), capsys)
    assert_one_line_error(code, err, "none of the 1 image(s) could be read")


def test_resume_errors(images, tmp_path, capsys):
    run = tmp_path / "run"
    code, _, err = train(["--out", run, "--resume"], capsys)
    assert_one_line_error(code, err, "--resume", "no checkpoint", "last.pt")
    code, _, err = train(base(images, run), capsys)
    assert code == 0, err
    before = (run / "last.pt").read_bytes()
    # a fresh run into a run folder: refused, nothing replaced
    code, _, err = train(base(images, run), capsys)
    assert_one_line_error(code, err, "already holds a run", "--resume")
    # a resume that contradicts the checkpoint
    code, _, err = train(["--out", run, "--resume", "--n-feats", 16], capsys)
    assert_one_line_error(code, err, "--n-feats 16 contradicts", "n_feats 8")
    code, _, err = train(["--out", run, "--resume", "--sigma-range", 5, 10], capsys)
    assert_one_line_error(code, err, "--sigma-range 5.0 10.0 contradicts")
    assert (run / "last.pt").read_bytes() == before
    # a file that is not a training checkpoint
    torch.save({"head.0.weight": torch.zeros(1)}, run / "last.pt")
    code, _, err = train(["--out", run, "--resume"], capsys)
    assert_one_line_error(code, err, "not a rnan-fast training checkpoint")


def test_unwritable_run_dir(images, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("a file")
    code, _, err = train(base(images, blocker), capsys)
    assert_one_line_error(code, err, "exists and is not a folder")
    code, _, err = train(base(images, blocker / "run"), capsys)
    assert_one_line_error(code, err, "cannot write there")


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(images, tmp_path, capsys):
    run = tmp_path / "run"
    # Adam at lr 1e12 throws the weights far out after the first step; the loss then overflows
    code, _, err = train(base(images, run, "--lr", 1e12, "--save-every", 1, "--log-every", 1, "--steps", 50), capsys)
    assert_one_line_error(code, err, "the loss became", "--lr", status=1)
    line = next(x for x in err.splitlines() if "the loss became" in x)
    bad_step = int(line.split(" at step ")[1].split(";")[0])
    state = read_training_checkpoint(run / "last.pt")
    assert state["step"] == bad_step - 1 and f"is from step {bad_step - 1}" in line
    assert all(torch.isfinite(v).all() for v in state["model"].values())
    logged = [json.loads(x)["step"] for x in (run / "log.jsonl").read_text().splitlines()]
    assert max(logged) < bad_step


def test_option_errors(images, tmp_path, capsys):
    out = tmp_path / "run"
    cases = [
        (["--sigma", 25, "--data", images, "--out", out], "--task is required"),
        (["--task", "denoise_rgb", "--data", images, "--out", out], "needs one of --sigma"),
        (["--task", "denoise_rgb", "--sigma", 5, "--sigma-range", 1, 9, "--data", images, "--out", out],
         "needs one of --sigma"),
        (["--task", "denoise_rgb", "--sigma", 5, "--quality", 10, "--data", images, "--out", out],
         "--quality does not apply"),
        (["--task", "car", "--quality", 0, "--data", images, "--out", out], "--quality within 1..100"),
        (["--task", "sr", "--scale", 1, "--data", images, "--out", out], "--scale >= 2"),
        (["--task", "demosaic", "--data", images], "--out RUN_DIR is required"),
        (["--task", "demosaic", "--out", out], "--data needs at least one folder"),
        (["--task", "demosaic", "--data", images, "--out", out, "--n-feats", 7], "--n-feats must be even"),
        (["--task", "demosaic", "--data", images, "--out", out, "--steps", 0], "--steps must be a positive"),
        (["--task", "demosaic", "--data", images, "--out", out, "--ema", 1.5], "--ema is a decay"),
        (["--task", "demosaic", "--data", images, "--out", out, "--seed", -1], "--seed must be >= 0"),
        (["--task", "demosaic", "--data", images, "--out", out, "--device", "cuda:7"], "--device cuda:7"),
    ]
    for argv, needle in cases:
        code, _, err = train(argv, capsys)
        assert_one_line_error(code, err, needle)
    assert not out.exists()


def test_config_file(images, tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    code, _, err = train(["--config", bad], capsys)
    assert_one_line_error(code, err, "--config", "not valid JSON")
    unknown = tmp_path / "unknown.json"
    unknown.write_text(json.dumps({"task": "demosaic", "n_feets": 8}))
    code, _, err = train(["--config", unknown], capsys)
    assert_one_line_error(code, err, "unknown setting(s) n_feets")
    # settings from the file (names with - or _), overridden by the command line
    good = tmp_path / "good.json"
    good.write_text(json.dumps({"task": "demosaic", "data": [str(images)], "out": str(tmp_path / "run"),
                                "n-feats": 8, "n_resgroups": 2, "batch_size": 2, "patch_size": 16, "steps": 9}))
    code, _, err = train(["--config", good, "--steps", 1, "--quiet"], capsys)
    assert code == 0, err
    resolved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert resolved["task"] == "demosaic" and resolved["n_feats"] == 8 and resolved["steps"] == 1


def test_data_that_does_not_fit_in_memory_is_refused_before_decoding(images, monkeypatch):
    decoded = []
    monkeypatch.setattr(DS.D, "read_image", lambda p: decoded.append(p))
    need = 23 * 31 + 17 * 40 + 29 * 19  # gray task: one byte per pixel
    with pytest.raises(DS.DataError, match=r"3 images need .* GiB as uint8 in memory"):
        DS.load_images([str(images)], "denoise_gray", 16, limit_bytes=need - 1)
    assert decoded == []
