"""The classical baselines (rnan_fast.baselines: BM3D / CBM3D, Menon 2007 demosaicing) and
`rnan-fast eval --baseline NAME`."""
import csv
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from rnan_fast import RNAN, cli
from rnan_fast import data as D
from rnan_fast.baselines import BaselineUnavailable, bm3d_denoise, check_baseline, menon_demosaic
from rnan_fast.metrics import evaluate, psnr

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def bm3d():
    return pytest.importorskip("bm3d", reason="the optional bm3d package is not installed "
                               "(scripts/setup.sh installs it; pip install 'rnan_fast[bm3d]')")


@pytest.fixture(scope="module")
def crops(data_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("crops")
    for i, name in enumerate(("kodim05.png", "kodim23.png")):
        Image.open(data_dir / "Kodak24" / name).crop((300, 200, 340, 236)).save(folder / f"c{i}.png")
    return folder


@pytest.mark.parametrize("gray", [True, False])
def test_bm3d_denoises_a_crop(bm3d, data_dir, gray):
    img = D.read_image(data_dir / "Kodak24" / "kodim05.png")[200:248, 300:356]
    clean = D.to_gray(img) if gray else img
    noisy = D.add_gaussian_noise(clean, 30, seed=3)
    out = bm3d_denoise(noisy, 30)
    assert out.dtype == np.uint8 and out.shape == clean.shape
    assert psnr(clean, out) > psnr(clean, noisy) + 3  # sigma 30: BM3D gains ~7-9 dB on real photos
    # the package's own call on the 0..1 scale, rounded: the same image
    fn = bm3d.bm3d if gray else bm3d.bm3d_rgb
    assert np.array_equal(out, D.to_uint8(np.asarray(fn(noisy / 255, sigma_psd=30 / 255)) * 255))
    assert np.array_equal(bm3d_denoise(noisy, 0), D.to_uint8(noisy))
    with pytest.raises(ValueError, match="sigma"):
        bm3d_denoise(noisy, -1)
    with pytest.raises(ValueError, match="shape"):
        bm3d_denoise(np.zeros((4, 4, 2)), 10)


def test_check_baseline_errors(monkeypatch):
    with pytest.raises(BaselineUnavailable, match="not to car"):
        check_baseline("bm3d", "car")
    with pytest.raises(BaselineUnavailable, match="not to denoise_rgb"):
        check_baseline("menon", "denoise_rgb")
    with pytest.raises(BaselineUnavailable, match="unknown baseline"):
        check_baseline("nlm", "denoise_rgb")
    monkeypatch.setitem(sys.modules, "bm3d", None)  # import bm3d raises ImportError
    with pytest.raises(BaselineUnavailable, match=r"rnan_fast\[bm3d\]"):
        check_baseline("bm3d", "denoise_gray")


def _run(argv, capsys):
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_eval_bm3d_beside_the_model(bm3d, crops, tmp_path, capsys):
    torch.manual_seed(0)
    net = RNAN(n_colors=3, n_feats=8, n_resgroups=2)
    torch.save(net.state_dict(), tmp_path / "w.pt")
    base = ["eval", "--task", "denoise_rgb", "--sigma", 25, "--data", crops, "--quiet", "--seed", 7]
    code, out, err = _run(base + ["--baseline", "bm3d", "--csv", tmp_path / "b.csv"], capsys)
    assert code == 0, err
    assert "BM3D" in out
    alone = _rows(tmp_path / "b.csv")
    assert list(alone[0]) == ["image", "psnr", "ssim"] and [r["image"] for r in alone] == ["c0.png", "c1.png", "mean"]
    code, out, err = _run(base + ["--weights", tmp_path / "w.pt", "--baseline", "bm3d", "--csv", tmp_path / "m.csv"],
                          capsys)
    assert code == 0, err
    assert "BM3D PSNR" in out and "beside BM3D" in out
    both = _rows(tmp_path / "m.csv")
    assert list(both[0]) == ["image", "psnr", "ssim", "bm3d_psnr", "bm3d_ssim"]
    for a, b in zip(alone, both):  # the very same noisy images: BM3D's columns equal the run without a model
        assert (a["psnr"], a["ssim"]) == (b["bm3d_psnr"], b["bm3d_ssim"])
    gt = D.read_image(crops / "c1.png")
    lq = D.add_gaussian_noise(gt, 25, D.noise_seed(7, 1))
    p, s = evaluate(gt, bm3d_denoise(lq, 25), "denoise_rgb")
    assert float(both[1]["bm3d_psnr"]) == pytest.approx(p, abs=2e-6)
    assert float(both[1]["bm3d_ssim"]) == pytest.approx(s, abs=2e-6)
    mean = np.mean([float(r["bm3d_psnr"]) for r in both[:2]])
    assert float(both[2]["bm3d_psnr"]) == pytest.approx(mean, abs=2e-6)
    # the model's own columns are those of a run without the baseline
    code, _, err = _run(base + ["--weights", tmp_path / "w.pt", "--csv", tmp_path / "w.csv"], capsys)
    assert code == 0, err
    assert [(r["psnr"], r["ssim"]) for r in _rows(tmp_path / "w.csv")] == [(r["psnr"], r["ssim"]) for r in both]


def test_eval_bm3d_user_errors(crops, tmp_path, capsys, monkeypatch):
    code, out, err = _run(["eval", "--baseline", "bm3d", "--task", "car", "--quality", 10, "--data", crops], capsys)
    assert code == 2 and "--baseline bm3d" in err and "car" in err and out == "", err
    monkeypatch.setitem(sys.modules, "bm3d", None)
    code, out, err = _run(["eval", "--baseline", "bm3d", "--task", "denoise_gray", "--sigma", 15, "--data", crops],
                          capsys)
    assert code == 2 and "rnan_fast[bm3d]" in err and "Traceback" not in err and out == "", err
    code, out, err = _run(["eval", "--baseline", "input", "--weights", tmp_path / "w.pt", "--task", "denoise_gray",
                           "--sigma", 15, "--data", crops], capsys)
    assert code == 2 and "--baseline" in err


@pytest.fixture(scope="module")
def colour_demosaicing():
    return pytest.importorskip("colour_demosaicing", reason="the optional colour-demosaicing package is not "
                               "installed (scripts/setup.sh installs it; pip install 'rnan_fast[demosaic]')")


def test_menon_demosaics_a_crop(colour_demosaicing, data_dir):
    img = D.read_image(data_dir / "Kodak24" / "kodim05.png")[200:248, 300:356]
    mosaiced = D.mosaic(img)
    out = menon_demosaic(mosaiced)
    assert out.dtype == np.uint8 and out.shape == img.shape
    assert psnr(img, out) > psnr(img, mosaiced) + 15          # mosaiced ~8-9 dB, demosaiced > 25
    # the package's own call on the single-plane GRBG mosaic, rounded: the same image
    cfa = np.zeros(img.shape[:2])
    cfa[0::2, 0::2], cfa[0::2, 1::2] = img[0::2, 0::2, 1], img[0::2, 1::2, 0]
    cfa[1::2, 0::2], cfa[1::2, 1::2] = img[1::2, 0::2, 2], img[1::2, 1::2, 1]
    want = D.to_uint8(np.asarray(colour_demosaicing.demosaicing_CFA_Bayer_Menon2007(cfa, pattern="GRBG")))
    assert np.array_equal(out, want)
    with pytest.raises(ValueError, match="shape"):
        menon_demosaic(np.zeros((4, 4)))


def test_eval_menon_beside_the_model(colour_demosaicing, crops, tmp_path, capsys):
    torch.manual_seed(0)
    torch.save(RNAN(n_colors=3, n_feats=8, n_resgroups=2).state_dict(), tmp_path / "w.pt")
    base = ["eval", "--task", "demosaic", "--data", crops, "--quiet"]
    code, out, err = _run(base + ["--baseline", "menon", "--csv", tmp_path / "alone.csv"], capsys)
    assert code == 0 and "Menon" in out, err
    code, out, err = _run(base + ["--weights", tmp_path / "w.pt", "--baseline", "menon", "--csv",
                                  tmp_path / "both.csv"], capsys)
    assert code == 0 and "Menon PSNR" in out, err
    alone, both = _rows(tmp_path / "alone.csv"), _rows(tmp_path / "both.csv")
    assert list(both[0]) == ["image", "psnr", "ssim", "menon_psnr", "menon_ssim"]
    assert [(a["psnr"], a["ssim"]) for a in alone] == [(b["menon_psnr"], b["menon_ssim"]) for b in both]
    gt = D.read_image(crops / "c0.png")
    assert float(alone[0]["psnr"]) == pytest.approx(evaluate(gt, menon_demosaic(D.mosaic(gt)), "demosaic")[0],
                                                    abs=2e-6)
