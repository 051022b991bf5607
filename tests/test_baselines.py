"""The classical baselines (rnan_fast.baselines: BM3D / CBM3D, non-local means, Menon 2007
demosaicing, the noise estimate) and `rnan-fast eval --baseline NAME`, also on real noisy pairs
(`eval --pairs`)."""
import csv
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from rnan_fast import RNAN, cli
from rnan_fast import data as D
from rnan_fast.baselines import (PAIRS_SIGMA_GAIN, PAIRS_SIGMA_LEVEL, BaselineUnavailable, bilinear_demosaic,
                                 bm3d_denoise, check_baseline, estimate_sigma, menon_demosaic, nlm_denoise, pairs_sigma)
from rnan_fast.metrics import evaluate, psnr

pytestmark = pytest.mark.usefixtures("one_thread")

# The bm3d package's binary is not bit-deterministic: repeated calls on one input differ now and
# then by one grey level in a pixel (measured: 0 or 1 pixel of a 40x44 crop at sigma 6, 1.7e-4 dB),
# so BM3D's scores are compared within these bounds, far below any real difference.
BM3D_PSNR_TOL, BM3D_SSIM_TOL = 0.01, 1e-3


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
        check_baseline("wiener", "denoise_rgb")
    with pytest.raises(BaselineUnavailable, match="not to sr"):
        check_baseline("nlm", "sr")
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
        assert float(a["psnr"]) == pytest.approx(float(b["bm3d_psnr"]), abs=BM3D_PSNR_TOL)
        assert float(a["ssim"]) == pytest.approx(float(b["bm3d_ssim"]), abs=BM3D_SSIM_TOL)
    gt = D.read_image(crops / "c1.png")
    lq = D.add_gaussian_noise(gt, 25, D.noise_seed(7, 1))
    p, s = evaluate(gt, bm3d_denoise(lq, 25), "denoise_rgb")
    assert float(both[1]["bm3d_psnr"]) == pytest.approx(p, abs=BM3D_PSNR_TOL)
    assert float(both[1]["bm3d_ssim"]) == pytest.approx(s, abs=BM3D_SSIM_TOL)
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


def test_bilinear_demosaic_keeps_the_samples_and_is_evals_baseline(crops, tmp_path, capsys):
    """Bilinear demosaicing keeps every sampled value, fills the rest far above the zero-filled
    mosaic, and `eval --baseline bilinear` scores exactly it (rounded as every output)."""
    img = D.read_image(crops / "c0.png")
    mosaiced = D.mosaic(img)
    out = bilinear_demosaic(mosaiced)
    assert out.dtype == np.float64 and out.shape == img.shape
    sampled = D.mosaic(np.ones(img.shape)) > 0
    np.testing.assert_array_equal(out[sampled], mosaiced[sampled].astype(np.float64))
    assert psnr(img, D.to_uint8(out)) > psnr(img, mosaiced) + 10
    with pytest.raises(ValueError, match="shape"):
        bilinear_demosaic(np.zeros((4, 4)))
    with pytest.raises(BaselineUnavailable, match="not to sr"):
        check_baseline("bilinear", "sr")
    code, out_text, err = _run(["eval", "--task", "demosaic", "--data", crops, "--quiet", "--baseline", "bilinear",
                                "--csv", tmp_path / "b.csv"], capsys)
    assert code == 0 and "baseline bilinear demosaicing" in out_text, err
    row = _rows(tmp_path / "b.csv")[0]
    assert float(row["psnr"]) == pytest.approx(evaluate(img, D.to_uint8(out), "demosaic")[0], abs=2e-6)


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


# --------------------------------------------------------------------------- real noise: pairs, NLM, sigma estimate

def test_estimate_sigma_on_known_noise(data_dir):
    """White Gaussian noise of a known sigma on a photo of smooth areas (kodim23, the parrots) is
    estimated within 10% (+0.6); a heavily textured one (kodim05) reads high at low noise, as a
    MAD estimator does; a flat image gives the noise alone, closely."""
    img = D.read_image(data_dir / "Kodak24" / "kodim23.png")[:256, :384].astype(np.float64)
    for sigma in (5, 15, 30):
        assert abs(estimate_sigma(D.add_gaussian_noise(img, sigma, seed=1)) - sigma) < 0.1 * sigma + 0.6, sigma
        gray = D.to_gray(img.astype(np.uint8)) + np.random.default_rng(2).normal(0, sigma, img.shape[:2])
        assert abs(estimate_sigma(gray) - sigma) < 0.1 * sigma + 0.6, sigma
    textured = D.read_image(data_dir / "Kodak24" / "kodim05.png")[:256, :384].astype(np.float64)
    assert 5 < estimate_sigma(D.add_gaussian_noise(textured, 5, seed=1)) < 10
    flat = np.full((64, 65), 100.0) + np.random.default_rng(3).normal(0, 7, (64, 65))
    assert abs(estimate_sigma(flat) - 7) < 0.5
    with pytest.raises(ValueError, match="2x2"):
        estimate_sigma(np.zeros((1, 5)))


def test_estimate_sigma_at_a_coarser_level():
    """A coarser level reads the same sigma for white noise, and more than the finest level for
    noise that is correlated (smoothed) the way demosaicing and JPEG leave camera noise."""
    rng = np.random.default_rng(4)
    white = 100.0 + rng.normal(0, 9, (256, 260, 3))
    for level in (0, 1, 2):
        assert abs(estimate_sigma(white, level) - 9) < 0.6, level
    correlated = 100.0 + bilinear_demosaic(D.mosaic(rng.normal(0, 9, (256, 260, 3))))
    fine, coarse = estimate_sigma(correlated), estimate_sigma(correlated, PAIRS_SIGMA_LEVEL)
    assert coarse > 1.5 * fine, (fine, coarse)
    with pytest.raises(ValueError, match="8x8"):
        estimate_sigma(np.zeros((7, 9)), 2)
    with pytest.raises(ValueError, match="level"):
        estimate_sigma(white, -1)


@pytest.mark.parametrize("gray", [True, False])
def test_nlm_denoises_a_crop(data_dir, gray):
    cv2 = pytest.importorskip("cv2")
    img = D.read_image(data_dir / "Kodak24" / "kodim05.png")[200:248, 300:356]
    clean = D.to_gray(img) if gray else img
    noisy = D.add_gaussian_noise(clean, 15, seed=3)
    out = nlm_denoise(noisy, h=12)
    assert out.dtype == np.uint8 and out.shape == clean.shape
    assert psnr(clean, out) > psnr(clean, noisy) + 1
    u8 = D.to_uint8(noisy)   # OpenCV's own call on the uint8 image (BGR order for colour)
    want = cv2.fastNlMeansDenoising(u8, None, h=12) if gray else \
        cv2.fastNlMeansDenoisingColored(np.ascontiguousarray(u8[..., ::-1]), None, h=12, hColor=12)[..., ::-1]
    assert np.array_equal(out, want)


@pytest.fixture
def pairs(data_dir, tmp_path):
    """Two PolyU-style pairs made from Kodak crops (noise of sigma 4 and 8, as stored uint8 JPEG
    would be: rounded), a non-image file, and nothing else."""
    folder = tmp_path / "pairs"
    folder.mkdir()
    for i, (name, sigma) in enumerate((("kodim05.png", 4), ("kodim23.png", 8))):
        clean = D.read_image(data_dir / "Kodak24" / name)[100:140, 200:244]
        Image.fromarray(clean).save(folder / f"cam_{i}_mean.png")
        Image.fromarray(D.to_uint8(D.add_gaussian_noise(clean, sigma, seed=i))).save(folder / f"cam_{i}_real.png")
    (folder / "README.txt").write_text("pairs")
    return folder


def test_eval_pairs_scores_the_stored_noisy_images(pairs, tmp_path, capsys):
    torch.manual_seed(0)
    net = RNAN(n_colors=3, n_feats=8, n_resgroups=2)
    torch.save(net.state_dict(), tmp_path / "w.pt")
    base = ["eval", "--task", "denoise_rgb", "--pairs", "--data", pairs, "--quiet", "--no-ssim"]
    code, out, err = _run(base + ["--baseline", "--csv", tmp_path / "in.csv"], capsys)
    assert code == 0, err
    assert "real noise" in out
    rows = _rows(tmp_path / "in.csv")
    assert [r["image"] for r in rows] == ["cam_0_real.png", "cam_1_real.png", "mean"]
    for r in rows[:2]:   # the noisy file as stored, against its _mean
        clean = D.read_image(pairs / r["image"].replace("_real", "_mean"))
        assert float(r["psnr"]) == pytest.approx(psnr(clean, D.read_image(pairs / r["image"])), abs=2e-6)
    code, out, err = _run(base + ["--weights", tmp_path / "w.pt", "--baseline", "nlm", "--csv", tmp_path / "m.csv",
                                  "--precision", "fp32"], capsys)
    assert code == 0, err
    both = _rows(tmp_path / "m.csv")
    assert list(both[0]) == ["image", "psnr", "ssim", "nlm_psnr", "nlm_ssim"]
    noisy = D.read_image(pairs / "cam_1_real.png")
    clean = D.read_image(pairs / "cam_1_mean.png")
    assert float(both[1]["nlm_psnr"]) == pytest.approx(psnr(clean, nlm_denoise(noisy)), abs=2e-6)
    from rnan_fast.inference import restore_image
    assert float(both[1]["psnr"]) == pytest.approx(psnr(clean, restore_image(net, noisy.astype(np.float32))), abs=2e-6)


def test_eval_pairs_bm3d_uses_an_estimated_sigma(bm3d, pairs, tmp_path, capsys):
    code, out, err = _run(["eval", "--task", "denoise_rgb", "--pairs", "--data", pairs, "--quiet", "--no-ssim",
                           "--baseline", "bm3d", "--csv", tmp_path / "b.csv"], capsys)
    assert code == 0, err
    assert "given an estimated sigma" in out and "true sigma" not in out
    noisy = D.read_image(pairs / "cam_0_real.png")
    sigma = pairs_sigma(noisy)
    assert sigma == pytest.approx(PAIRS_SIGMA_GAIN * estimate_sigma(noisy, PAIRS_SIGMA_LEVEL)) and sigma > 0
    want = psnr(D.read_image(pairs / "cam_0_mean.png"), bm3d_denoise(noisy, sigma))
    assert float(_rows(tmp_path / "b.csv")[0]["psnr"]) == pytest.approx(want, abs=BM3D_PSNR_TOL)


def test_eval_pairs_user_errors(pairs, tmp_path, capsys):
    base = ["eval", "--pairs", "--quiet", "--baseline"]
    for extra, needle in ((["--task", "car", "--data", pairs], "not car"),
                          (["--task", "denoise_rgb", "--sigma", 5, "--data", pairs], "--sigma does not apply"),
                          (["--task", "denoise_rgb", "--data", tmp_path], "no NAME_real.EXT / NAME_mean.EXT pairs")):
        code, out, err = _run(base + extra, capsys)
        assert code == 2 and needle in err, (extra, err)
    (pairs / "cam_1_mean.png").unlink()
    code, _, err = _run(base + ["--task", "denoise_rgb", "--data", pairs], capsys)
    assert code == 2 and "no _mean image beside cam_1_real.png" in err, err


def test_eval_pairs_through_pixel_shuffle(pairs, tmp_path, capsys):
    """--pixel-shuffle 2 scores the model on the 4 stride-2 sub-images of each stored noisy
    image, interleaved back (inference.restore_tensor's pixel_shuffle), and says so."""
    from rnan_fast.inference import restore_image

    torch.manual_seed(1)
    net = RNAN(n_colors=3, n_feats=8, n_resgroups=2)
    torch.save(net.state_dict(), tmp_path / "w.pt")
    code, out, err = _run(["eval", "--task", "denoise_rgb", "--pairs", "--data", pairs, "--quiet", "--no-ssim",
                           "--weights", tmp_path / "w.pt", "--pixel-shuffle", 2, "--csv", tmp_path / "p.csv"], capsys)
    assert code == 0, err
    assert "pixel-shuffle downsampling x2" in out
    noisy = D.read_image(pairs / "cam_0_real.png").astype(np.float32)
    clean = D.read_image(pairs / "cam_0_mean.png")
    shuffled, plain = (restore_image(net.eval(), noisy, pixel_shuffle=k) for k in (2, 1))
    assert not np.array_equal(shuffled, plain)
    assert float(_rows(tmp_path / "p.csv")[0]["psnr"]) == pytest.approx(psnr(clean, shuffled), abs=2e-6)
