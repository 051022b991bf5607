"""CPU auto-tiling (inference.auto_tile and the CLI around it) and the per-call progress of
restore_tensor; decisions only, nothing is timed."""
import re

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import rnan_fast
from rnan_fast import RNAN, cli
from rnan_fast import data as D
from rnan_fast import inference as I
from rnan_fast.cli import tiling
from rnan_fast.cli.common import run_options

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    m = RNAN(n_colors=3, n_feats=8, n_resgroups=2)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 1e-2)
    return m.eval()


def test_auto_tile_rule(net):
    """CPU: the model's tiles once an image side exceeds one tile (overlap at most half a tile);
    GPU, and models without non-local blocks: whole images."""
    assert I.nonlocal_blocks(net) == 2
    assert (I.CPU_TILE, I.CPU_OVERLAP) == I.cpu_tiling(None) == I.cpu_tiling({"task": "denoise_rgb"})
    assert I.cpu_tiling({"inference": {"cpu_tile": 48, "cpu_overlap": 8}}) == (48, 8)
    assert I.auto_tile(net, 64, 64, "cpu", (64, 16)) is None
    assert I.auto_tile(net, 64, 65, "cpu", (64, 16)) == (64, 16)
    assert I.auto_tile(net, 512, 768, torch.device("cpu"), (48, 40)) == (48, 24)
    assert I.auto_tile(net, 2048, 2048, "cuda") is None and I.auto_tile(net, 2048, 2048, "cuda:1") is None
    assert I.auto_tile(nn.Conv2d(3, 3, 3), 4096, 4096, "cpu") is None


def test_auto_precision(monkeypatch):
    """bf16 where the CPU has native bf16 arithmetic (either probe), fp32 elsewhere and on GPUs."""
    for avx, amx, want in ((True, False, "bf16"), (False, True, "bf16"), (False, False, "fp32")):
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda v=avx: v, raising=False)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda v=amx: v, raising=False)
        assert I.auto_precision("cpu") == want
    assert I.auto_precision("cuda") == "fp32"
    args = cli.build_parser().parse_args(["restore", "x.png"])
    assert args.precision == "auto" and run_options(args, torch.device("cpu")).precision == "fp32"
    assert run_options(args, torch.device("cuda")).precision == "fp32"


def _count(model):
    calls = []

    def forward(v):
        calls.append(tuple(v.shape[-2:]))
        return model(v)
    return forward, calls


@pytest.mark.parametrize("opts", [dict(), dict(tile=16, overlap=4), dict(tile=12, overlap=5, self_ensemble=True),
                                  dict(chop=True), dict(chop=True, self_ensemble=True), dict(self_ensemble=True)])
@pytest.mark.parametrize("size", [(37, 23), (150, 90)])
def test_progress_counts_every_model_call(opts, size):
    model = nn.Identity()
    forward, calls = _count(model)
    seen = []
    x = torch.rand(1, 3, *size)
    out = I.restore_tensor(forward, x, scale=1, progress=lambda d, t: seen.append((d, t)), **opts)
    torch.testing.assert_close(out, x)  # (the ensemble's mean of 8 copies rounds)
    total = I.model_calls(*size, opts.get("tile"), opts.get("overlap", 32), opts.get("chop", False),
                          opts.get("self_ensemble", False))
    assert len(calls) == total and seen == [(i + 1, total) for i in range(total)]
    # without a callback nothing changes
    forward, calls2 = _count(model)
    torch.testing.assert_close(I.restore_tensor(forward, x, scale=1, **opts), out, rtol=0, atol=0)
    assert calls2 == calls


def _run(argv, capsys):
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def images(tmp_path):
    rng = np.random.default_rng(5)
    folder = tmp_path / "in"
    folder.mkdir()
    for name, shape in (("a.png", (40, 36)), ("b.png", (30, 44)), ("small.png", (10, 12))):
        Image.fromarray(rng.integers(0, 256, shape + (3,), dtype=np.uint8)).save(folder / name)
    return folder


@pytest.fixture
def small_threshold(monkeypatch):
    """Auto-tiling at toy sizes: 24-pixel tiles (small.png, 12x10, runs whole)."""
    monkeypatch.setattr(I, "CPU_TILE", 24)


def test_restore_auto_tiles_once_said_and_whole_overrides(net, images, tmp_path, capsys, small_threshold):
    ckpt = tmp_path / "w.pt"
    torch.save(net.state_dict(), ckpt)
    base = ["restore", "--weights", ckpt, "--quiet", "--tile-overlap", 8, "--precision", "fp32", images]
    code, _, err = _run(base + ["-o", tmp_path / "auto"], capsys)
    assert code == 0, err
    notes = [line for line in err.splitlines() if "overlapping" in line]
    assert len(notes) == 1, err  # two images tile; said once
    assert "larger than 24x24" in notes[0] and "--whole" in notes[0] and "a.png, 36x40" in notes[0]
    for name in ("a.png", "b.png"):
        img = D.read_image(images / name)
        got = D.read_image(tmp_path / "auto" / name)
        assert np.array_equal(got, I.restore_image(net, img, tile=24, overlap=8))
        assert not np.array_equal(got, I.restore_image(net, img))  # tiling changes a non-local model's output
    small = D.read_image(images / "small.png")  # under the threshold: whole
    assert np.array_equal(D.read_image(tmp_path / "auto" / "small.png"), I.restore_image(net, small))
    # --whole: whole images and no note; --tile N and --chop: the user's choice, no note
    code, _, err = _run(base + ["-o", tmp_path / "whole", "--whole"], capsys)
    assert code == 0 and "overlapping" not in err, err
    img = D.read_image(images / "a.png")
    assert np.array_equal(D.read_image(tmp_path / "whole" / "a.png"), I.restore_image(net, img))
    code, _, err = _run(base + ["-o", tmp_path / "t", "--tile", 32], capsys)
    assert code == 0 and "overlapping" not in err
    assert np.array_equal(D.read_image(tmp_path / "t" / "a.png"), I.restore_image(net, img, tile=32, overlap=8))
    code, _, err = _run(base + ["-o", tmp_path / "c", "--chop"], capsys)
    assert code == 0 and "overlapping" not in err
    for extra, needle in ((["--tile", 32], "--whole and --tile"), (["--chop"], "--whole and --chop")):
        code, _, err = _run(base + ["-o", tmp_path / "x", "--whole"] + extra, capsys)
        assert code == 2 and needle in err


def test_auto_tile_overlap_fits_the_tile(net, monkeypatch):
    monkeypatch.setattr(I, "CPU_TILE", 20)
    args = cli.build_parser().parse_args(["restore", "x.png", "--tile-overlap", "32", "--quiet"])
    runner = tiling.ImageRunner(run_options(args, torch.device("cpu")), net)
    assert runner.options(np.zeros((50, 50, 3), np.uint8), "x")["overlap"] == 10
    runner = tiling.ImageRunner(run_options(args, torch.device("cuda")), net)  # no CUDA call is made
    assert runner.options(np.zeros((5000, 5000, 3), np.uint8), "x")["tile"] is None
    # the card's tiles, and its overlap when none is given
    args = cli.build_parser().parse_args(["restore", "x.png", "--quiet"])
    card = {"task": "denoise_rgb", "inference": {"cpu_tile": 30, "cpu_overlap": 6}}
    runner = tiling.ImageRunner(run_options(args, torch.device("cpu")), net, card)
    opts = runner.options(np.zeros((50, 50, 3), np.uint8), "x")
    assert (opts["tile"], opts["overlap"]) == (30, 6)


def test_eval_auto_tiles_with_a_progress_bar(net, images, tmp_path, capsys, small_threshold, monkeypatch):
    monkeypatch.setattr(tiling, "PROGRESS_DELAY_S", 0)  # show the bar inside an image at once
    ckpt = tmp_path / "w.pt"
    torch.save(net.state_dict(), ckpt)
    code, out, err = _run(["eval", "--weights", ckpt, "--task", "denoise_rgb", "--sigma", 20, "--data", images,
                           "--tile-overlap", 8, "--no-ssim", "--precision", "fp32"], capsys)
    assert code == 0, err
    assert len([line for line in err.splitlines() if "larger than 24x24 run in overlapping tiles" in line]) == 1
    # a.png (40x36) runs in 2 x 2 tiles of 24 with overlap 8: the bar counts them
    total = I.tile_count(40, 36, 24, 8)
    assert total == 4 and re.search(rf"a\.png: .*/{total} .*tile/s", err), err
    # a whole image: a bar over the model's 5 stages (head, 2 non-local groups, body conv, tail)
    assert re.search(r"small\.png: .*/5 .*stage/s", err), err
    code, out, err = _run(["eval", "--weights", ckpt, "--task", "denoise_rgb", "--sigma", 20, "--data", images,
                           "--whole", "--self-ensemble", "--no-ssim", "--limit", 1, "--precision", "fp32"], capsys)
    assert code == 0 and re.search(r"a\.png: .*/40 .*stage/s", err), err
    args = cli.build_parser().parse_args(["restore", "x.png", "--whole", "--quiet", "--precision", "fp32"])
    img = D.read_image(images / "a.png")
    out = tiling.ImageRunner(run_options(args, torch.device("cpu")), net).run(img, "a.png")
    assert np.array_equal(out, I.restore_image(net, img))
    assert all(not m._forward_hooks for m in net.modules())  # the stage hooks are gone again
