"""The rnan-fast command line: restore, eval and bench, end to end on the CPU.

Tiny random-weight checkpoints (n_feats=8, n_resgroups=2) and small crops of the shared test
images (written to tmp folders, never into the repository) keep this fast.
"""
import csv
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from rnan_fast import RNAN, cli
from rnan_fast.cli import eval as cli_eval
from rnan_fast import data as D
from rnan_fast.data import new_file_mode

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def ckpts(tmp_path_factory):
    """Tiny checkpoints: gray (scale 1), rgb (scale 1), sr2 (RGB, scale 2); plus broken files."""
    d = tmp_path_factory.mktemp("ckpt")
    out, state_dicts = {}, {}
    for name, colors, scale in (("gray", 1, 1), ("rgb", 3, 1), ("sr2", 3, 2)):
        torch.manual_seed({"gray": 1, "rgb": 2, "sr2": 3}[name])
        net = RNAN(n_colors=colors, scale=scale, n_feats=8, n_resgroups=2)
        # random (not zero-initialised) W so that the non-local path matters
        with torch.no_grad():
            for p in net.parameters():
                p.add_(torch.randn_like(p) * 0.01)
        state_dicts[name] = net.state_dict()
        out[name] = d / f"{name}.pt"
        torch.save(state_dicts[name], out[name])
    out["garbage"] = d / "garbage.pt"
    out["garbage"].write_bytes(b"this is not a checkpoint")
    sd = dict(state_dicts["rgb"])  # a copy: the pickled checkpoint below needs the whole one
    sd.pop(next(iter(sd)))
    sd["extra.weight"] = torch.zeros(1)
    out["wrong"] = d / "wrong.pt"
    torch.save(sd, out["wrong"])
    # a training-script checkpoint: the state dict beside pickled Python objects
    import argparse
    out["pickled"] = d / "pickled.pt"
    torch.save({"args": argparse.Namespace(scale=[1], n_colors=3), "state_dict": state_dicts["rgb"]},
               out["pickled"])
    return out


@pytest.fixture(scope="session")
def crops(data_dir, tmp_path_factory):
    """Small crops of real test images: rgb/ (two colour, one gray), plus folders per eval task."""
    root = tmp_path_factory.mktemp("crops")
    rgb = root / "rgb"
    rgb.mkdir()
    Image.open(data_dir / "Kodak24" / "kodim01.png").crop((100, 100, 140, 130)).save(rgb / "kodim01.png")
    Image.open(data_dir / "McMaster" / "1.png").crop((10, 20, 43, 47)).save(rgb / "mcm1.png")
    Image.open(data_dir / "Set12" / "01.png").crop((0, 0, 36, 28)).save(rgb / "set12_01.png")
    evals = root / "eval"
    evals.mkdir()
    for i, name in enumerate(("kodim03.png", "kodim05.png")):
        Image.open(data_dir / "Kodak24" / name).crop((200, 150, 224, 174)).save(evals / f"k{i}.png")
    return {"rgb": rgb, "eval": evals, "root": root}


def _run(argv, capsys=None):
    code = cli.main([str(a) for a in argv])
    if capsys is None:
        return code
    out, err = capsys.readouterr()
    return code, out, err


def _subprocess_env(**extra):
    """os.environ with this checkout first on PYTHONPATH (and `extra` set), for `python -m rnan_fast`."""
    return dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""), **extra)


# --------------------------------------------------------------------------- subnormals

_SUBNORMAL_PROBE = """
import sys, torch
from rnan_fast import cli
if sys.argv[1] == "command":
    cli.main(["models"])  # a command first; torch starts its worker threads only below
y = torch.full((1 << 22,), 1e-30) * 1e-10  # 1e-40 is subnormal in float32; split over the threads
print(torch.get_num_threads(), int((y != 0).sum()))
"""


@pytest.mark.parametrize("first", ["nothing", "command"])
def test_commands_flush_subnormals_in_torch_worker_threads(first):
    """A command flushes subnormals before torch starts its threads, so the threads inherit it
    (sigma-10 eval 2.7x faster); a fresh process without a command keeps them (the probe sees them)."""
    proc = subprocess.run([sys.executable, "-c", _SUBNORMAL_PROBE, first], capture_output=True, text=True,
                          env=_subprocess_env(OMP_NUM_THREADS="2"), timeout=300)
    assert proc.returncode == 0, proc.stderr
    threads, nonzero = map(int, proc.stdout.splitlines()[-1].split())
    assert threads == 2  # half the product is computed by a worker thread, not the main one
    assert nonzero == (0 if first == "command" else 1 << 22)


# --------------------------------------------------------------------------- restore

def test_restore_subprocess_end_to_end(ckpts, crops, tmp_path):
    outdir = tmp_path / "out"
    env = _subprocess_env()
    proc = subprocess.run([sys.executable, "-m", "rnan_fast", "restore", "--weights", ckpts["sr2"],
                           "-o", outdir, crops["rgb"] / "set12_01.png"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert os.listdir(outdir) == ["set12_01.png"]
    assert Image.open(outdir / "set12_01.png").size == (72, 56)  # gray input, RGB SR model
    assert Image.open(outdir / "set12_01.png").mode == "L"      # gray in, gray out
    # a user error: a message, no traceback, non-zero status
    proc = subprocess.run([sys.executable, "-m", "rnan_fast", "restore", "--weights", tmp_path / "nope.pt",
                           crops["rgb"]], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 2 and "weights file not found" in proc.stderr and "Traceback" not in proc.stderr


def test_restore_folder_gray_model_matches_library(ckpts, crops, tmp_path, capsys):
    from rnan_fast.inference import restore_image

    outdir = tmp_path / "o"
    code, _, err = _run(["restore", "--weights", ckpts["gray"], "-o", outdir, "--quiet", crops["rgb"]], capsys)
    assert code == 0, err
    assert sorted(os.listdir(outdir)) == ["kodim01.png", "mcm1.png", "set12_01.png"]
    assert "convert('L')" in err
    got = D.read_image(outdir / "kodim01.png")
    assert got.shape == (30, 40)
    net = RNAN.from_checkpoint(ckpts["gray"]).eval()
    ref = restore_image(net, D.to_gray(D.read_image(crops["rgb"] / "kodim01.png")))
    assert np.array_equal(got, ref)
    assert (outdir / "mcm1.png").stat().st_mode & 0o777 == new_file_mode()


def test_restore_tile_and_chop_options(ckpts, crops, tmp_path, capsys):
    img = crops["rgb"] / "kodim01.png"
    code, _, err = _run(["restore", "--weights", ckpts["rgb"], "-o", tmp_path / "t", "--quiet",
                         "--tile", 24, "--tile-overlap", 8, img], capsys)
    assert code == 0, err
    code, _, err = _run(["restore", "--weights", ckpts["rgb"], "-o", tmp_path / "c", "--quiet", "--chop", img], capsys)
    assert code == 0, err
    assert D.read_image(tmp_path / "t" / "kodim01.png").shape == (30, 40, 3)
    code, _, err = _run(["restore", "--weights", ckpts["rgb"], "--tile", 8, "--tile-overlap", 8, img], capsys)
    assert code == 2 and "--tile-overlap" in err
    code, _, err = _run(["restore", "--weights", ckpts["rgb"], "--tile", 16, "--chop", img], capsys)
    assert code == 2 and "exclude" in err


def test_restore_pixel_shuffle_option(ckpts, crops, tmp_path, capsys):
    """--pixel-shuffle 2 gives the library's restore_image(pixel_shuffle=2) on an odd-sized
    photo; it is refused for an SR model and below 1, before anything is written."""
    from rnan_fast.inference import restore_image

    img = crops["rgb"] / "mcm1.png"   # 33 x 27
    code, _, err = _run(["restore", "--weights", ckpts["rgb"], "-o", tmp_path / "p", "--quiet",
                         "--pixel-shuffle", 2, img], capsys)
    assert code == 0, err
    net = RNAN.from_checkpoint(ckpts["rgb"]).eval()
    want = restore_image(net, D.read_image(img), pixel_shuffle=2)
    assert np.array_equal(D.read_image(tmp_path / "p" / "mcm1.png"), want)
    assert not np.array_equal(want, restore_image(net, D.read_image(img)))
    for argv, needle in (([ckpts["sr2"], "--pixel-shuffle", 2], "keep the size (denoising, JPEG), on images "
                                                                "without a pattern; this one has scale 2"),
                         ([ckpts["rgb"], "--pixel-shuffle", 0], "--pixel-shuffle must be >= 1")):
        code, _, err = _run(["restore", "-o", tmp_path / "never", "--quiet", "--weights", *argv, img], capsys)
        assert code == 2 and needle in err, err
        assert not (tmp_path / "never").exists()


def test_restore_official_format_fixtures(fixtures_dir, crops, tmp_path, capsys):
    """Checkpoints in the official layout (shared fixtures): the configuration comes from the file."""
    img = crops["rgb"] / "set12_01.png"
    for name, shape in (("official_dn_gray_tiny.pt", (28, 36)), ("official_sr4_tiny.pt", (112, 144))):  # gray stays gray
        outdir = tmp_path / name
        code, _, err = _run(["restore", "--weights", fixtures_dir / name, "-o", outdir, "--quiet", img], capsys)
        assert code == 0, err
        assert D.read_image(outdir / "set12_01.png").shape == shape


def test_restore_corrupt_input_is_skipped(ckpts, crops, tmp_path, capsys):
    inp = tmp_path / "in"
    inp.mkdir()
    (inp / "a.png").write_bytes((crops["rgb"] / "mcm1.png").read_bytes())
    (inp / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    (inp / "c.png").write_bytes((crops["rgb"] / "set12_01.png").read_bytes())
    (inp / "notes.txt").write_text("ignored: not an image extension")
    outdir = tmp_path / "out"
    code, _, err = _run(["restore", "--weights", ckpts["rgb"], "-o", outdir, "--quiet", inp], capsys)
    assert code == 1
    assert "broken.png" in err and "Traceback" not in err
    assert sorted(os.listdir(outdir)) == ["a.png", "c.png"]  # the others written, no temporaries


def test_restore_refuses_existing_outputs_then_overwrites(ckpts, crops, tmp_path, capsys):
    outdir = tmp_path / "out"
    outdir.mkdir()
    (outdir / "mcm1.png").write_bytes(b"keep me")
    args = ["restore", "--weights", ckpts["rgb"], "-o", outdir, "--quiet",
            crops["rgb"] / "kodim01.png", crops["rgb"] / "mcm1.png"]
    code, _, err = _run(args, capsys)
    assert code == 2 and "mcm1.png" in err and "already exists" in err and "--overwrite" in err
    assert os.listdir(outdir) == ["mcm1.png"]  # checked up front: nothing written
    assert (outdir / "mcm1.png").read_bytes() == b"keep me"
    code, _, err = _run(args + ["--overwrite"], capsys)
    assert code == 0, err
    assert sorted(os.listdir(outdir)) == ["kodim01.png", "mcm1.png"]
    assert D.read_image(outdir / "mcm1.png").shape == (27, 33, 3)


def test_restore_user_errors(ckpts, crops, tmp_path, capsys):
    img = crops["rgb"] / "mcm1.png"
    cases = [
        (["--weights", tmp_path / "missing.pt", img], "weights file not found"),
        (["--weights", tmp_path, img], "directory"),
        (["--weights", ckpts["garbage"], img], "garbage.pt"),
        (["--weights", ckpts["wrong"], img], "wrong.pt"),
        (["--weights", ckpts["rgb"], tmp_path / "no_such.png"], "input not found"),
        (["--weights", ckpts["rgb"], tmp_path], "no input images found"),
    ]
    if not torch.cuda.is_available():
        cases.append((["--weights", ckpts["rgb"], "--device", "cuda", img], "CUDA is not available"))
    cases.append((["--weights", ckpts["rgb"], "--device", "tpu", img], "--device"))
    for argv, needle in cases:
        code, out, err = _run(["restore", "-o", tmp_path / "never"] + argv, capsys)
        assert code == 2, (argv, err)
        assert needle in err, (needle, err)
        assert "Traceback" not in err
        assert not (tmp_path / "never").exists()
    # two inputs that would write one output name
    other = tmp_path / "x" / "mcm1.jpg"
    other.parent.mkdir()
    Image.open(img).save(other)
    code, _, err = _run(["restore", "--weights", ckpts["rgb"], "-o", tmp_path / "never", "--ext", "png", img, other],
                        capsys)
    assert code == 2 and "several inputs" in err
    code, _, err = _run(["restore", "--weights", ckpts["rgb"], "-o", img.parent, "--overwrite", img], capsys)
    assert code == 2 and "would replace the input" in err
    assert _run(["restore"], capsys)[0] == 2  # argparse usage error returns, does not raise
    assert _run(["--version"], capsys)[0] == 0


# --------------------------------------------------------------------------- eval

def _read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_eval_baseline_rows(data_dir, tmp_path, capsys):
    """The README's baseline rows through the command line (JPEG LIVE1 q10, bicubic Set5 x4)."""
    code, out, err = _run(["eval", "--baseline", "--task", "car", "--quality", 10, "--data", data_dir / "LIVE1",
                           "--no-ssim", "--quiet", "--csv", tmp_path / "car.csv"], capsys)
    assert code == 0, err
    rows = _read_csv(tmp_path / "car.csv")
    assert len(rows) == 30 and rows[-1]["image"] == "mean"
    assert abs(float(rows[-1]["psnr"]) - 27.77) <= 0.01
    assert "mean" in out and "bikes.png" in out
    code, out, err = _run(["eval", "--baseline", "--task", "sr", "--scale", 4, "--data", data_dir / "Set5",
                           "--quiet", "--csv", tmp_path / "sr.csv"], capsys)
    assert code == 0, err
    rows = _read_csv(tmp_path / "sr.csv")
    assert len(rows) == 6 and abs(float(rows[-1]["psnr"]) - 28.42) <= 0.03
    assert 0.5 < float(rows[-1]["ssim"]) < 1
    code, out, err = _run(["eval", "--baseline", "--task", "demosaic", "--data", data_dir / "McMaster",
                           "--limit", 3, "--no-ssim", "--quiet", "--csv", tmp_path / "dm.csv"], capsys)
    assert code == 0 and len(_read_csv(tmp_path / "dm.csv")) == 4


@pytest.mark.parametrize("task,opts,ckpt", [
    ("denoise_gray", ["--sigma", 30], "gray"),
    ("denoise_rgb", ["--sigma", 50, "--self-ensemble"], "rgb"),
    ("car", ["--quality", 20, "--chop"], "gray"),
    ("demosaic", ["--tile", 24, "--tile-overlap", 8], "rgb"),
    ("sr", [], "sr2"),
])
def test_eval_with_model(ckpts, crops, tmp_path, capsys, task, opts, ckpt):
    csv_path = tmp_path / "r.csv"
    code, out, err = _run(["eval", "--weights", ckpts[ckpt], "--task", task, "--data", crops["eval"],
                           "--limit", 1, "--quiet", "--csv", csv_path] + opts, capsys)
    assert code == 0, err
    rows = _read_csv(csv_path)
    assert [r["image"] for r in rows] == ["k0.png", "mean"]
    assert rows[0]["psnr"] == rows[1]["psnr"] and rows[0]["ssim"] == rows[1]["ssim"]
    assert "RNAN(" in out
    # the same numbers computed here from the library: degradation, restoration, metrics
    from rnan_fast.inference import restore_image
    from rnan_fast.metrics import evaluate

    img = D.read_image(crops["eval"] / "k0.png")
    if task == "denoise_gray":
        gt = D.to_gray(img)
        lq = D.add_gaussian_noise(gt, 30, D.noise_seed(0, 0))
    elif task == "denoise_rgb":
        gt = D.to_rgb(img)
        lq = D.add_gaussian_noise(gt, 50, D.noise_seed(0, 0))
    elif task == "car":
        gt = D.rgb_to_y(img)
        lq = D.jpeg(gt, 20)
    elif task == "demosaic":
        gt = D.to_rgb(img)
        lq = D.mosaic(gt)
    else:
        gt = D.modcrop(img, 2)
        lq = D.bicubic_downscale(D.to_rgb(gt), 2)
    kw = {"self_ensemble": "--self-ensemble" in opts, "chop": "--chop" in opts,
          "tile": 24 if "--tile" in opts else None, "overlap": 8}
    out_img = restore_image(RNAN.from_checkpoint(ckpts[ckpt]).eval(), lq, **kw)
    want_p, want_s = evaluate(gt, out_img, task, 2 if task == "sr" else 1)
    assert float(rows[0]["psnr"]) == pytest.approx(want_p, abs=2e-6)
    assert float(rows[0]["ssim"]) == pytest.approx(want_s, abs=2e-6)
    assert evaluate(gt, gt, task, 2 if task == "sr" else 1)[1] == pytest.approx(1.0)  # identical: 1
    assert 0 < want_s < 0.999  # a tiny random network's output is far from the ground truth


def test_eval_noise_is_seeded_per_image(ckpts, crops, tmp_path, capsys):
    """Image i gets seed + i: --limit keeps the noise of the images it keeps; a run repeats."""
    def run(limit, seed, name):
        argv = ["eval", "--baseline", "--task", "denoise_rgb", "--sigma", 25, "--data", crops["eval"],
                "--seed", seed, "--quiet", "--csv", tmp_path / name]
        if limit:
            argv += ["--limit", limit]
        assert _run(argv, capsys)[0] == 0
        return _read_csv(tmp_path / name)

    full, first, again, other = run(None, 0, "a.csv"), run(1, 0, "b.csv"), run(None, 0, "c.csv"), run(None, 5, "d.csv")
    assert full[0] == first[0] and full == again and full[0] != other[0]
    img = D.read_image(crops["eval"] / "k1.png")
    noisy = D.add_gaussian_noise(img, 25, seed=1)
    from rnan_fast.metrics import psnr

    assert float(full[1]["psnr"]) == pytest.approx(psnr(img, noisy), abs=1e-5)
    argv = ["eval", "--baseline", "--task", "denoise_rgb", "--sigma", 25, "--data", crops["eval"], "--quiet",
            "--no-ssim", "--quantize-noisy", "--csv", tmp_path / "q.csv"]
    assert _run(argv, capsys)[0] == 0
    assert float(_read_csv(tmp_path / "q.csv")[1]["psnr"]) == pytest.approx(psnr(img, D.to_uint8(noisy)), abs=1e-5)


def test_eval_user_errors(ckpts, crops, tmp_path, capsys):
    data = crops["eval"]
    cases = [
        (["--weights", ckpts["rgb"], "--task", "denoise_gray", "--sigma", 10], "1-channel model"),
        (["--weights", ckpts["rgb"], "--task", "sr", "--scale", 2], "scale"),
        (["--weights", ckpts["sr2"], "--task", "sr", "--scale", 4], "scale"),
        (["--weights", ckpts["rgb"], "--task", "denoise_rgb"], "--sigma"),
        (["--weights", ckpts["gray"], "--task", "car"], "--quality"),
        (["--weights", ckpts["gray"], "--task", "car", "--quality", 10, "--sigma", 5], "does not apply"),
        (["--baseline", "--weights", ckpts["rgb"], "--task", "demosaic"], "--baseline"),
        (["--task", "demosaic"], "--baseline"),
        (["--weights", tmp_path / "nope.pt", "--task", "demosaic"], "weights file not found"),
        (["--baseline", "--task", "demosaic", "--limit", 0], "--limit"),
        (["--weights", ckpts["rgb"], "--task", "sr"], "is a scale-1 model"),
        (["--weights", ckpts["rgb"], "--task", "sr"], "rgb.pt"),
        (["--weights", ckpts["pickled"], "--task", "denoise_rgb", "--sigma", 5], "--trust-checkpoint"),
    ]
    for argv, needle in cases:
        code, out, err = _run(["eval", "--data", data, "--quiet"] + argv, capsys)
        assert code == 2 and needle in err and "Traceback" not in err, (argv, err)
        assert "--scale must be" not in err  # no --scale given: the checkpoint's scale is named
    code, _, err = _run(["eval", "--baseline", "--task", "demosaic", "--data", tmp_path / "none"], capsys)
    assert code == 2 and "no such folder" in err
    tiny = tmp_path / "tiny"
    tiny.mkdir()
    Image.fromarray(np.random.default_rng().integers(1, 256, (8, 8, 3), dtype=np.uint8)).save(tiny / "a.png")
    code, _, err = _run(["eval", "--baseline", "--task", "demosaic", "--data", tiny, "--quiet"], capsys)
    assert code == 1 and "a.png" in err and "Traceback" not in err  # too small for SSIM: reported
    empty = tmp_path / "empty"
    empty.mkdir()
    code, _, err = _run(["eval", "--baseline", "--task", "demosaic", "--data", empty], capsys)
    assert code == 2 and "no images" in err


# --------------------------------------------------------------------------- bench

def test_bench_quick_runs(capsys, monkeypatch):
    code, out, err = _run(["bench", "--device", "cpu", "--quick", "--repeat", 1], capsys)
    assert code == 0, err
    assert "non-local attention" in out and "RNAN forward" in out
    assert "naive" in out and "reference" in out
    assert "n/a" not in out and "OOM" not in out  # every entry timed
    import rnan_fast

    def broken(*a, **k):
        raise RuntimeError("kernel exploded")

    monkeypatch.setattr(rnan_fast.reference, "nonlocal_attention_naive", broken)
    code, out, err = _run(["bench", "--device", "cpu", "--quick", "--repeat", 1], capsys)
    assert code == 1 and "n/a" in out and "kernel exploded" in out
    assert "failed" in err and "Traceback" not in err


def test_bench_repeat_must_be_positive(capsys):
    for bad in (0, -2):
        code, out, err = _run(["bench", "--device", "cpu", "--quick", "--repeat", bad], capsys)
        assert code == 2 and "--repeat" in err and out == "", err


# --------------------------------------------------------------------------- review fixes

def test_trusted_checkpoint_option(ckpts, crops, tmp_path, capsys):
    """A checkpoint that pickles Python objects: refused by the weights-only load with a hint,
    loaded with --trust-checkpoint (restore and eval), giving the plain checkpoint's output."""
    img = crops["rgb"] / "mcm1.png"
    code, _, err = _run(["restore", "--weights", ckpts["pickled"], "-o", tmp_path / "n", "--quiet", img], capsys)
    assert code == 2 and "--trust-checkpoint" in err and "pickled.pt" in err and "Traceback" not in err
    assert not (tmp_path / "n").exists()
    code, _, err = _run(["restore", "--weights", ckpts["pickled"], "--trust-checkpoint", "-o", tmp_path / "t",
                         "--quiet", img], capsys)
    assert code == 0, err
    code, _, err = _run(["restore", "--weights", ckpts["rgb"], "-o", tmp_path / "p", "--quiet", img], capsys)
    assert code == 0, err
    assert np.array_equal(D.read_image(tmp_path / "t" / "mcm1.png"), D.read_image(tmp_path / "p" / "mcm1.png"))
    code, out, err = _run(["eval", "--weights", ckpts["pickled"], "--trust-checkpoint", "--task", "demosaic",
                           "--data", crops["eval"], "--limit", 1, "--no-ssim", "--quiet"], capsys)
    assert code == 0 and "k0.png" in out, err


def test_eval_csv_bad_path_fails_before_work(crops, tmp_path, capsys, monkeypatch):
    blocker = tmp_path / "file.txt"
    blocker.write_text("a file, not a folder")
    base = ["eval", "--baseline", "--task", "demosaic", "--data", crops["eval"], "--no-ssim", "--quiet"]
    for target in (blocker / "r.csv", blocker / "sub" / "r.csv", tmp_path):
        code, out, err = _run(base + ["--csv", target], capsys)
        assert code == 2 and "--csv" in err and "Traceback" not in err, err
        assert out == ""  # refused before any image was scored
    # a missing folder is created up front
    code, out, err = _run(base + ["--csv", tmp_path / "new" / "deep" / "r.csv"], capsys)
    assert code == 0 and len(_read_csv(tmp_path / "new" / "deep" / "r.csv")) == 3, err

    # a write that fails at the end: a message and exit 2, no traceback, no temporary left
    def refuse(*a, **k):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(cli_eval.os, "replace", refuse)
    code, out, err = _run(base + ["--csv", tmp_path / "late.csv"], capsys)
    assert code == 2 and "cannot write --csv" in err and "Permission denied" in err and "Traceback" not in err
    assert not any(p.name.startswith(".late.csv") for p in tmp_path.iterdir())


def test_eval_sr_images_smaller_than_scale_or_border(ckpts, crops, tmp_path, capsys):
    """An image that modcrop leaves empty, or whose border leaves nothing, is reported by name
    and skipped; no NaN, exit status 1."""
    rng = np.random.default_rng()
    # (options, scale, a size smaller than the scale, a size whose scale border leaves nothing)
    for argv, scale, tiny, thin in ((["--baseline", "--scale", 4], 4, (3, 9), (9, 6)),
                                    (["--weights", ckpts["sr2"]], 2, (1, 5), (4, 7))):
        folder = tmp_path / f"sr{scale}"
        folder.mkdir()
        Image.fromarray(rng.integers(1, 256, tiny + (3,), dtype=np.uint8)).save(folder / "a_tiny.png")
        Image.fromarray(rng.integers(1, 256, thin + (3,), dtype=np.uint8)).save(folder / "b_border.png")
        (folder / "c_ok.png").write_bytes((crops["eval"] / "k0.png").read_bytes())
        csv_path = tmp_path / f"sr{scale}.csv"
        code, out, err = _run(["eval", "--task", "sr", "--data", folder, "--no-ssim", "--quiet",
                               "--csv", csv_path] + argv, capsys)
        assert code == 1, err
        assert f"a_tiny.png: image of {tiny[0]}x{tiny[1]} pixels is smaller than the scale {scale}" in err
        assert "b_border.png: psnr: no pixels left" in err and "Traceback" not in err
        assert not any("nan" in line.lower().split() for line in out.splitlines())
        rows = _read_csv(csv_path)
        assert [r["image"] for r in rows] == ["c_ok.png", "mean"] and np.isfinite(float(rows[1]["psnr"]))


def _interrupt_after(monkeypatch, n):
    """ImageRunner.run raises KeyboardInterrupt (as Ctrl-C would) once n images have run; returns
    the list of image names it was called with."""
    from rnan_fast.cli.tiling import ImageRunner

    calls, run = [], ImageRunner.run

    def counted(self, img, name):
        if len(calls) == n:
            raise KeyboardInterrupt
        calls.append(Path(name).name)
        return run(self, img, name)
    monkeypatch.setattr(ImageRunner, "run", counted)
    return calls


def test_eval_resume_continues_an_interrupted_run(ckpts, crops, tmp_path, capsys, monkeypatch):
    """An interrupted eval keeps its finished images in FILE.partial; --resume runs only the rest
    and writes the table of an uninterrupted run; a rerun without --resume is refused."""
    base = ["eval", "--weights", ckpts["rgb"], "--task", "denoise_rgb", "--sigma", 25, "--data", crops["eval"],
            "--quiet"]
    assert _run(base + ["--csv", tmp_path / "whole.csv"], capsys)[0] == 0
    target, journal = tmp_path / "r.csv", tmp_path / "r.csv.partial"
    calls = _interrupt_after(monkeypatch, 1)
    code, out, err = _run(base + ["--csv", target], capsys)
    assert code == 130 and calls == ["k0.png"] and not target.exists(), err
    assert "1 finished image(s) are kept in" in err and "--resume" in err
    kept = journal.read_text()
    assert len(kept.splitlines()) == 2  # the settings and k0
    code, out, err = _run(base + ["--csv", target], capsys)  # would start over: refused, nothing lost
    assert code == 2 and "holds 1 finished image(s)" in err and "pass --resume" in err and out == "", err
    assert journal.read_text() == kept
    monkeypatch.undo()
    calls = _interrupt_after(monkeypatch, 9)
    code, out, err = _run(base + ["--csv", target, "--resume"], capsys)
    assert code == 0 and calls == ["k1.png"], err
    assert "1 of 2 images come from" in err
    assert [line.split()[0] for line in out.splitlines()[2:5]] == ["k0.png", "k1.png", "mean"]
    assert target.read_text() == (tmp_path / "whole.csv").read_text() and not journal.exists()


def test_eval_resume_refuses_other_settings_and_mends_a_cut_line(ckpts, crops, tmp_path, capsys, monkeypatch):
    data = tmp_path / "data"  # a private copy of the images, to rename one below
    data.mkdir()
    for f in crops["eval"].iterdir():
        (data / f.name).write_bytes(f.read_bytes())
    base = ["eval", "--task", "denoise_rgb", "--data", data, "--quiet", "--no-ssim"]
    target, journal = tmp_path / "r.csv", tmp_path / "r.csv.partial"
    same = ["--weights", ckpts["rgb"], "--sigma", 25, "--csv", target, "--resume"]
    code, _, err = _run(base + same[:4] + ["--resume"], capsys)
    assert code == 2 and "--resume needs --csv" in err
    _interrupt_after(monkeypatch, 1)
    code, _, err = _run(base + same, capsys)
    assert code == 130 and "starts from the first image" in err, err
    kept = journal.read_text()
    for other, says in ((["--weights", ckpts["rgb"], "--sigma", 30], "sigma 25.0, not 30.0"),
                        (["--weights", ckpts["rgb"], "--sigma", 25, "--self-ensemble"], "self_ensemble False, not True"),
                        (["--weights", ckpts["rgb"], "--sigma", 25, "--pixel-shuffle", 2], "pixel_shuffle None, not 2"),
                        (["--weights", ckpts["pickled"], "--trust-checkpoint", "--sigma", 25], "model 'sha256:"),
                        (["--weights", ckpts["rgb"], "--sigma", 25, "--seed", 1], "seed 0, not 1")):
        code, out, err = _run(base + other + ["--csv", target, "--resume"], capsys)
        assert code == 2 and "other settings" in err and says in err and out == "", err
        assert journal.read_text() == kept
    (data / "k0.png").rename(data / "a.png")  # image 1 is no longer the journal's k0.png
    code, _, err = _run(base + same, capsys)
    assert code == 2 and "has k0.png as image 1" in err and "a.png" in err, err
    (data / "a.png").rename(data / "k0.png")
    journal.write_text(kept.splitlines()[0] + "\nnot json\n" + kept.splitlines()[1] + "\n")
    code, _, err = _run(base + same, capsys)
    assert code == 2 and "line 2 is not a journal entry" in err and "Traceback" not in err, err
    # a kill in the middle of a line: the cut line is dropped, the rest resumes, k1 runs once
    journal.write_text(kept + '{"index": 1, "row": {"ima')
    monkeypatch.undo()
    calls = _interrupt_after(monkeypatch, 9)
    code, out, err = _run(base + same, capsys)
    assert code == 0 and calls == ["k1.png"], err
    assert not journal.exists() and [r["image"] for r in _read_csv(target)] == ["k0.png", "k1.png", "mean"]


def test_fast_backend_unavailable_is_a_usage_error(ckpts, crops, tmp_path, capsys, monkeypatch):
    """fp16 on the CPU: the C++ attention kernel takes fp32 and bf16 only, and Triton (no
    interpreter) takes no CPU tensors, so --backend fast is refused before any image is read."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    reads, read = [], D.read_image
    monkeypatch.setattr(D, "read_image", lambda p: reads.append(p) or read(p))
    fast_fp16 = ["--backend", "fast", "--device", "cpu", "--precision", "fp16", "--quiet"]
    code, out, err = _run(["restore", "--weights", ckpts["rgb"], "-o", tmp_path / "o", *fast_fp16, crops["rgb"]],
                          capsys)
    assert code == 2 and "--backend fast is not available" in err and "fp16" in err and "Traceback" not in err, err
    assert not (tmp_path / "o").exists() and reads == []
    code, out, err = _run(["eval", "--weights", ckpts["rgb"], "--task", "demosaic", "--data", crops["eval"],
                           *fast_fp16], capsys)
    assert code == 2 and "--backend fast is not available" in err and reads == [] and out == "", err


def test_main_leaves_the_global_backend_alone(ckpts, crops, tmp_path, capsys, monkeypatch):
    """--backend applies inside the command only: in-process callers keep their setting, also
    when the command fails."""
    import rnan_fast

    rnan_fast.set_backend("reference")
    img = crops["rgb"] / "mcm1.png"
    code, _, err = _run(["restore", "--weights", ckpts["rgb"], "--backend", "auto", "-o", tmp_path / "a",
                         "--quiet", img], capsys)
    assert code == 0, err
    assert rnan_fast.get_backend() == "reference"
    seen = []
    orig = cli_eval.cmd_eval

    def spy(args):
        seen.append(rnan_fast.get_backend())
        return orig(args)

    monkeypatch.setattr(cli_eval, "cmd_eval", spy)
    code, _, err = _run(["eval", "--baseline", "--backend", "auto", "--task", "demosaic", "--data",
                         crops["eval"], "--limit", 0], capsys)
    assert code == 2 and "--limit" in err
    assert seen == ["auto"] and rnan_fast.get_backend() == "reference"
