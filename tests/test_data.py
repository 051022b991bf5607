"""Image IO, degradations, MATLAB imresize and the metrics: the benchmark protocols.

The baseline rows of the shared data README (JPEG-only, mosaiced, bicubic PSNR) must come out
of these functions to 0.01 dB (JPEG, mosaic) and 0.03 dB (bicubic).
"""
import os

import numpy as np
import pytest
from PIL import Image

from rnan_fast import data as D
from rnan_fast.data import new_file_mode
from rnan_fast.imresize import contributions, imresize, round_half_away, to_uint8
from rnan_fast.metrics import evaluate, gaussian_window, psnr, sr_gray_output, ssim

SET5 = ["baby", "bird", "butterfly", "head", "woman"]


def _load(path):
    return np.array(Image.open(path))


def _diff(a, b):
    assert a.shape == b.shape, (a.shape, b.shape)
    return np.abs(a.astype(np.int64) - b.astype(np.int64))


# --------------------------------------------------------------------------- imresize

@pytest.mark.parametrize("scale", [2, 3, 4])
def test_imresize_matches_matlab_lr_bicubic(data_dir, scale):
    """Set5/LR_bicubic/X{s}/{name}x{s}.png: MATLAB imresize(HR, 1/s, 'bicubic'), bit-exact."""
    for name in SET5:
        hr = D.read_image(data_dir / "Set5" / "HR" / f"{name}.png")
        ref = _load(data_dir / "Set5" / "LR_bicubic" / f"X{scale}" / f"{name}x{scale}.png")
        lr = D.bicubic_downscale(hr, scale)
        d = _diff(lr, ref)
        assert d.max() == 0, f"{name} x{scale}: {np.count_nonzero(d)} pixels differ, max {d.max()}"


@pytest.mark.parametrize("scale", [2, 3, 4])
def test_imresize_replicate_matches_rnan_lrbi(data_dir, scale):
    """RNAN's own LRBI files differ from current MATLAB only in a 2-pixel frame: they were made
    with edge replication, which padding="replicate" reproduces bit-exactly."""
    ref_dir = data_dir / "Set5" / "RNAN_reference"
    for name in SET5:
        hr = D.read_image(ref_dir / "HR_modcrop" / f"x{scale}" / f"{name}_HR_x{scale}.png")
        assert np.array_equal(D.modcrop(hr, scale), hr)
        ref = _load(ref_dir / "LRBI" / f"x{scale}" / f"{name}_LRBI_x{scale}.png")
        assert _diff(D.bicubic_downscale(hr, scale, padding="replicate"), ref).max() == 0, name
        d = _diff(D.bicubic_downscale(hr, scale), ref)  # symmetric: interior identical
        assert d[2:-2, 2:-2].max() == 0, name


def test_imresize_rounds_after_each_pass():
    """uint8 in: each 1-D pass rounds to uint8 (MATLAB); differs from a float path + one rounding."""
    rng = np.random.default_rng(1)
    img = rng.integers(0, 256, (40, 36, 3), dtype=np.uint8)
    out = imresize(img, 0.5)
    assert out.dtype == np.uint8 and out.shape == (20, 18, 3)
    f = imresize(img.astype(np.float64), 0.5)
    assert f.dtype == np.float64
    assert _diff(out, D.to_uint8(f)).max() <= 1


def test_to_uint8_is_the_one_rounding():
    """One round-half-away-and-clamp for the package: data and imresize share it."""
    assert D.to_uint8 is to_uint8
    halves = np.array([-0.5, 0.5, 1.5, 2.5, 254.5, 255.49, 255.5, 300.0, -3.2])
    assert to_uint8(halves).tolist() == [0, 1, 2, 3, 255, 255, 255, 255, 0]  # not half-to-even
    x = np.random.default_rng().uniform(-40, 300, (9, 7, 3))
    expected = np.clip(np.sign(x) * np.floor(np.abs(x) + 0.5), 0, 255).astype(np.uint8)
    assert np.array_equal(to_uint8(x), expected) and np.array_equal(round_half_away(x), np.sign(x) * np.floor(np.abs(x) + 0.5))
    u = np.random.default_rng().integers(0, 256, (4, 5), dtype=np.uint8)
    assert to_uint8(u) is u


def test_imresize_basic_properties():
    const = np.full((30, 21), 77, dtype=np.uint8)
    assert np.array_equal(imresize(const, 1 / 3), np.full((10, 7), 77, np.uint8))
    assert imresize(const, 2).shape == (60, 42)
    w, idx = contributions(12, 6, 0.5)
    np.testing.assert_allclose(w.sum(axis=1), 1.0)
    assert idx.min() >= 0 and idx.max() <= 11
    # upscaling interpolates: the even samples of a 2x upscale of a linear ramp lie on the ramp
    ramp = np.tile(np.arange(16, dtype=np.float64), (4, 1))
    up = imresize(ramp, 2)
    np.testing.assert_allclose(up[:, 4:-4], np.tile(np.arange(4, 28) / 2 - 0.25, (8, 1)), atol=1e-12)
    with pytest.raises(ValueError):
        imresize(const, 0.5, padding="zero")


# --------------------------------------------------------------------------- colour and degradations

def test_rgb_to_y_and_gray():
    rgb = np.array([[[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 255], [0, 0, 0]]], dtype=np.uint8)
    y = D.rgb_to_y(rgb)
    expected = np.floor(np.array([65.481, 128.553, 24.966, 219.0, 0.0]) + 16 + 0.5)
    assert y.dtype == np.uint8 and np.array_equal(y[0], expected)
    np.testing.assert_allclose(D.rgb_to_y(rgb, rounded=False)[0], [81.481, 144.553, 40.966, 235.0, 16.0])
    g = D.to_gray(rgb)
    assert np.array_equal(g, np.array(Image.fromarray(rgb).convert("L")))
    assert D.to_gray(g) is g
    assert D.to_rgb(g).shape == (1, 5, 3)


def test_mosaic_grbg():
    img = np.arange(4 * 4 * 3, dtype=np.uint8).reshape(4, 4, 3) + 1
    m = D.mosaic(img)
    kept = m != 0
    assert kept.sum(axis=2).max() == 1 and kept.sum() == 16  # one sample per pixel
    assert np.array_equal(m[0, 0], [0, img[0, 0, 1], 0])      # G
    assert np.array_equal(m[0, 1], [img[0, 1, 0], 0, 0])      # R
    assert np.array_equal(m[1, 0], [0, 0, img[1, 0, 2]])      # B
    assert np.array_equal(m[1, 1], [0, img[1, 1, 1], 0])      # G
    assert np.array_equal(m[2:, 2:], D.mosaic(img[2:, 2:]))


def test_gaussian_noise_seeded_unclipped():
    img = np.full((16, 16), 250, dtype=np.uint8)
    a = D.add_gaussian_noise(img, 50, seed=D.noise_seed(0, 3))
    b = D.add_gaussian_noise(img, 50, seed=3)
    assert a.dtype == np.float64 and np.array_equal(a, b)
    assert a.max() > 255 and not np.allclose(a, np.round(a))  # not clipped, not rounded
    expected = 250 + 50 * np.random.default_rng(3).standard_normal((16, 16))
    np.testing.assert_array_equal(a, expected)
    q = D.add_gaussian_noise(img, 50, seed=3, quantize=True)
    assert q.dtype == np.uint8 and np.array_equal(q, D.to_uint8(a))
    assert not np.array_equal(a, D.add_gaussian_noise(img, 50, seed=4))


def test_jpeg_and_modcrop():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (33, 35), dtype=np.uint8)
    j = D.jpeg(img, 10)
    assert j.shape == img.shape and j.dtype == np.uint8
    assert psnr(img, D.jpeg(img, 95)) > psnr(img, j)
    rgb = rng.integers(0, 256, (33, 35, 3), dtype=np.uint8)   # colour: Pillow's RGB JPEG
    assert D.jpeg(rgb, 50).shape == rgb.shape and psnr(rgb, D.jpeg(rgb, 95)) > psnr(rgb, D.jpeg(rgb, 20))
    for bad in (np.zeros((8, 8, 2), np.uint8), np.zeros((8, 8), np.float64)):
        with pytest.raises(ValueError):
            D.jpeg(bad, 10)
    assert D.modcrop(img, 4).shape == (32, 32)


def test_read_image_modes_and_errors(tmp_path):
    rng = np.random.default_rng()
    rgba = rng.integers(1, 256, (5, 6, 4), dtype=np.uint8)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    assert np.array_equal(D.read_image(tmp_path / "a.png"), rgba[..., :3])  # alpha dropped
    # palette image: an RGB (H, W, 3) array of the palette's colours
    palette = rng.integers(1, 256, (256, 3), dtype=np.uint8)
    index = rng.integers(0, 256, (5, 6), dtype=np.uint8)
    p = Image.frombytes("P", (6, 5), index.tobytes())
    p.putpalette(palette.flatten().tolist())
    p.save(tmp_path / "p.png")
    got = D.read_image(tmp_path / "p.png")
    assert got.shape == (5, 6, 3) and np.array_equal(got, palette[index])
    gray = rng.integers(1, 256, (5, 6), dtype=np.uint8)
    Image.fromarray(gray, "L").save(tmp_path / "l.png")
    assert np.array_equal(D.read_image(tmp_path / "l.png"), gray)
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(D.ImageReadError, match="bad.png"):
        D.read_image(tmp_path / "bad.png")
    good = tmp_path / "t.png"
    Image.fromarray(np.zeros((64, 64, 3), np.uint8) + 9).save(good)
    (tmp_path / "trunc.png").write_bytes(good.read_bytes()[:60])
    with pytest.raises(D.ImageReadError, match="trunc.png"):
        D.read_image(tmp_path / "trunc.png")
    with pytest.raises(D.ImageReadError, match="missing.png"):
        D.read_image(tmp_path / "missing.png")
    assert isinstance(D.ImageReadError("x"), ValueError)


@pytest.mark.parametrize("name,dtype", [("w.png", np.uint16), ("w.tif", np.uint16), ("b.tif", ">u2")])
def test_read_image_16bit_scale_by_mode(tmp_path, name, dtype):
    """16-bit files always map 0..65535 to 0..255 (/257), whatever their content: a dark image
    stays dark, instead of reading ~257x too bright because no pixel exceeds 255."""
    rng = np.random.default_rng()
    for hi in (65536, 256):  # full range, then a dark image (every value <= 255)
        v = rng.integers(1, hi, (5, 7)).astype(dtype)
        im = Image.fromarray(v)
        assert im.mode.startswith("I;16")
        im.save(tmp_path / name)
        got = D.read_image(tmp_path / name)
        assert got.dtype == np.uint8 and got.shape == (5, 7)
        assert np.array_equal(got, D.to_uint8(v.astype(np.float64) / 257.0)), hi
    assert got.max() <= 1  # the dark one


@pytest.mark.parametrize("dtype,mode", [(np.int32, "I"), (np.float32, "F")])
def test_read_image_rejects_32bit_modes(tmp_path, dtype, mode):
    """32-bit integer and float images have no agreed 0..255 mapping: refused by name."""
    v = np.random.default_rng().uniform(1, 1000, (4, 6)).astype(dtype)
    im = Image.fromarray(v)
    assert im.mode == mode
    im.save(tmp_path / "deep.tif")
    with pytest.raises(D.ImageReadError, match=r"deep\.tif.*mode " + mode):
        D.read_image(tmp_path / "deep.tif")


def test_read_image_decompression_bomb(tmp_path, monkeypatch):
    img = np.random.default_rng().integers(1, 256, (20, 30, 3), dtype=np.uint8)
    Image.fromarray(img).save(tmp_path / "bomb.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 600 pixels > 2 * 100: Pillow refuses
    with pytest.raises(D.ImageReadError, match="bomb.png"):
        D.read_image(tmp_path / "bomb.png")


def test_write_png_atomic(tmp_path):
    img = np.random.default_rng(0).integers(0, 256, (7, 9, 3), dtype=np.uint8)
    out = tmp_path / "x.png"
    D.write_png_atomic(out, img)
    D.write_png_atomic(out, img[..., 0])  # replaces
    assert np.array_equal(D.read_image(out), img[..., 0])
    assert os.listdir(tmp_path) == ["x.png"]
    assert (out.stat().st_mode & 0o777) == new_file_mode()
    with pytest.raises(TypeError):
        D.write_png_atomic(tmp_path / "f.png", img.astype(np.float32))
    assert os.listdir(tmp_path) == ["x.png"]



@pytest.mark.parametrize("durable", [False, True])
def test_atomic_write_replaces_only_on_success(tmp_path, durable):
    out = tmp_path / "state.bin"
    payload = np.random.default_rng(1).bytes(1000)
    with D.atomic_write(out, durable=durable) as f:
        f.write(payload)
    assert out.read_bytes() == payload and os.listdir(tmp_path) == ["state.bin"]
    assert out.stat().st_mode & 0o777 == 0o600          # mkstemp's bits unless a mode is given
    with pytest.raises(KeyboardInterrupt):               # an interrupt mid-write: old file, no temporary
        with D.atomic_write(out, durable=durable, mode=0o644) as f:
            f.write(payload[:10])
            raise KeyboardInterrupt
    assert out.read_bytes() == payload and os.listdir(tmp_path) == ["state.bin"]
    with D.atomic_write(out, durable=durable, mode=0o640) as f:
        f.write(payload[::-1])
    assert out.read_bytes() == payload[::-1] and out.stat().st_mode & 0o777 == 0o640

# --------------------------------------------------------------------------- metrics

def _ssim_direct(a, b):
    """Unoptimised SSIM straight from the formula (2-D window, explicit windows) for checking."""
    g = gaussian_window()
    w = np.outer(g, g)
    win = np.lib.stride_tricks.sliding_window_view
    A, B = win(a.astype(float), (11, 11)), win(b.astype(float), (11, 11))
    mu1, mu2 = (A * w).sum((-1, -2)), (B * w).sum((-1, -2))
    s1 = (A * A * w).sum((-1, -2)) - mu1 ** 2
    s2 = (B * B * w).sum((-1, -2)) - mu2 ** 2
    s12 = (A * B * w).sum((-1, -2)) - mu1 * mu2
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    return (((2 * mu1 * mu2 + c1) * (2 * s12 + c2)) / ((mu1 ** 2 + mu2 ** 2 + c1) * (s1 + s2 + c2))).mean()


def test_ssim_and_psnr_definitions():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (30, 27)).astype(np.uint8)
    b = np.clip(a + rng.normal(0, 20, a.shape), 0, 255).round().astype(np.uint8)
    assert ssim(a, a) == pytest.approx(1.0)
    assert ssim(a, b) == pytest.approx(_ssim_direct(a, b), abs=1e-12)
    g = gaussian_window()
    assert g.sum() == pytest.approx(1.0) and np.argmax(g) == 5
    assert psnr(a, a) == float("inf")
    assert psnr(a, b) == pytest.approx(10 * np.log10(255 ** 2 / np.mean((a.astype(float) - b) ** 2)))
    # colour: MSE averaged over channels; SSIM averaged over channels
    a3 = np.stack([a, b, a], 2)
    b3 = np.stack([b, b, a], 2)
    mse = np.mean([((a.astype(float) - b) ** 2).mean(), 0, 0])
    assert psnr(a3, b3) == pytest.approx(10 * np.log10(255 ** 2 / mse))
    assert ssim(a3, b3) == pytest.approx((ssim(a, b) + 2) / 3)
    # border removal
    assert psnr(a, b, border=3) == pytest.approx(psnr(a[3:-3, 3:-3], b[3:-3, 3:-3]))
    with pytest.raises(ValueError):
        ssim(a[:10], b[:10])


def test_evaluate_protocols():
    rng = np.random.default_rng(1)
    a = rng.integers(0, 256, (24, 24, 3)).astype(np.uint8)
    b = np.clip(a.astype(int) + rng.integers(-9, 10, a.shape), 0, 255).astype(np.uint8)
    p, s = evaluate(a, b, "sr", 2)
    ya, yb = D.rgb_to_y(a, rounded=False), D.rgb_to_y(b, rounded=False)
    assert p == pytest.approx(psnr(ya, yb, 2)) and s == pytest.approx(ssim(ya, yb, 2))
    assert evaluate(a, b, "car", with_ssim=False) == (pytest.approx(psnr(D.rgb_to_y(a), D.rgb_to_y(b))), None)
    assert evaluate(a, b, "denoise_rgb")[0] == pytest.approx(psnr(a, b))
    with pytest.raises(ValueError):
        evaluate(a, b, "deblur")


def test_evaluate_sr_gray_ground_truth():
    """A 1-channel SR ground truth is scored on its gray values against the output's channel
    mean (rounded), with the scale as border; not on Y of the output."""
    rng = np.random.default_rng()
    gt = rng.integers(1, 256, (26, 30), dtype=np.uint8)
    out = np.clip(gt[..., None].astype(int) + rng.integers(-12, 13, (26, 30, 3)), 0, 255).astype(np.uint8)
    gray = D.to_uint8(out.astype(np.float64).mean(axis=2))
    assert np.array_equal(sr_gray_output(out), gray) and sr_gray_output(gt) is gt
    p, s = evaluate(gt, out, "sr", 3)
    assert p == pytest.approx(psnr(gt, gray, 3), abs=1e-12) and s == pytest.approx(ssim(gt, gray, 3), abs=1e-12)
    same = D.to_rgb(gt)  # the bicubic baseline of a replicated gray image: equal channels
    assert evaluate(gt, same, "sr", 2, with_ssim=False) == (float("inf"), None)


def test_metrics_refuse_empty_regions():
    """Nothing left after the border: ValueError, never a NaN score."""
    rng = np.random.default_rng()
    a = rng.integers(1, 256, (6, 9), dtype=np.uint8)
    b = rng.integers(1, 256, (6, 9), dtype=np.uint8)
    for border in (3, 4, 10):
        with pytest.raises(ValueError, match="no pixels left"):
            psnr(a, b, border)
        with pytest.raises(ValueError, match="no pixels left"):
            ssim(a, b, border)
    with pytest.raises(ValueError, match="no pixels left"):
        psnr(a[:0], b[:0])
    assert np.isfinite(psnr(a, b, 2))
    for task in ("sr", "denoise_gray"):
        with pytest.raises(ValueError):
            evaluate(a[:0], b[:0], task, 2, with_ssim=False)


def test_bicubic_downscale_refuses_images_smaller_than_the_scale():
    rng = np.random.default_rng()
    for shape in ((3, 9, 3), (9, 3, 3), (2, 2)):
        with pytest.raises(ValueError, match="smaller than the scale 4"):
            D.bicubic_downscale(rng.integers(1, 256, shape, dtype=np.uint8), 4)
    assert D.bicubic_downscale(rng.integers(1, 256, (4, 9, 3), dtype=np.uint8), 4).shape == (1, 2, 3)


# --------------------------------------------------------------------------- baseline rows of the README

@pytest.mark.parametrize("folder,expected", [
    ("LIVE1", [27.77, 30.07, 31.41, 32.35]),
    ("Classic5", [27.82, 30.12, 31.48, 32.43]),
])
def test_jpeg_only_psnr(data_dir, folder, expected):
    ys = [D.rgb_to_y(D.read_image(p)) for p in D.list_images(data_dir / folder)]
    assert len(ys) == {"LIVE1": 29, "Classic5": 5}[folder]
    for q, want in zip((10, 20, 30, 40), expected):
        got = np.mean([psnr(y, D.jpeg(y, q)) for y in ys])
        assert abs(got - want) <= 0.01, f"{folder} q{q}: {got:.4f} vs {want}"


@pytest.mark.parametrize("folder,expected", [("McMaster", 9.17), ("Kodak24", 8.56), ("CBSD68", 8.43)])
def test_mosaiced_psnr(data_dir, folder, expected):
    imgs = [D.to_rgb(D.read_image(p)) for p in D.list_images(data_dir / folder)]
    got = np.mean([psnr(i, D.mosaic(i)) for i in imgs])
    assert abs(got - expected) <= 0.01, f"{folder}: {got:.4f} vs {expected}"


@pytest.mark.parametrize("folder,scale,expected", [
    ("Set5/HR", 2, 33.66), ("Set5/HR", 4, 28.42), ("Set14", 2, 30.24), ("Set14", 4, 26.00),
])
def test_bicubic_psnr(data_dir, folder, scale, expected):
    vals = []
    for p in D.list_images(data_dir / folder):
        hr = D.modcrop(D.read_image(p), scale)
        up = D.bicubic_upscale(D.bicubic_downscale(D.to_rgb(hr), scale), scale)
        vals.append(evaluate(hr, up, "sr", scale, with_ssim=False)[0])  # Set14's gray bridge included
    got = np.mean(vals)
    assert abs(got - expected) <= 0.03, f"{folder} x{scale}: {got:.4f} vs {expected}"


# --------------------------------------------------------------------------- camera-like noise (denoise_photo)

def test_photo_noise_seeded_camera_like(data_dir):
    import torch

    clean = D.read_image(data_dir / "Kodak24" / "kodim23.png")[100:164, 200:264]
    a, b = D.photo_noise(clean, 3), D.photo_noise(clean, 3)
    assert np.array_equal(a, b) and a.shape == clean.shape and a.dtype == np.float64
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert np.array_equal(D.photo_noise(clean, g1), D.photo_noise(clean, g2))
    draws = [D.photo_noise(clean, s) for s in range(40)]
    assert all(np.array_equal(d, np.round(d)) and d.min() >= 0 and d.max() <= 255 for d in draws)
    rms = np.array([np.sqrt(((d - clean) ** 2).mean()) for d in draws])
    # camera-like levels: PolyU's real pairs lie at 2.3-5.0; the draws spread around them
    assert 1.5 < np.median(rms) < 10 and rms.min() > 0.3 and rms.max() < 40
    # the signal is kept: no colour shift on average (the way back inverts the way in)
    assert abs(np.mean([(d - clean).mean() for d in draws])) < 1.5
    # the camera draws' noise is grainy (correlated between neighbours), the chroma more than
    # the luma (as on PolyU_dev); the plain Gaussian draws' is white
    ycc = [(d - clean) @ D.YCBCR_601.T for d in draws]

    def neighbours(r):
        return np.corrcoef(r[:, :-1].ravel(), r[:, 1:].ravel())[0, 1]

    luma, chroma = np.array([neighbours(r[..., 0]) for r in ycc]), np.array([neighbours(r[..., 1]) for r in ycc])
    grainy = luma > 0.3
    assert 25 <= grainy.sum() <= 38 and (np.abs(luma[~grainy]) < 0.15).sum() >= 2
    assert np.all(chroma[grainy] > luma[grainy]) and np.median(chroma[grainy]) > 0.8
    gt, lq = D.degrade(clean, "denoise_photo", seed=3)
    assert np.array_equal(gt, clean) and np.array_equal(lq, a)
    with pytest.raises(ValueError, match="RGB"):
        D.photo_noise(clean[..., 0], 0)
    with pytest.raises(TypeError, match="seed"):
        D.photo_noise(clean, "3")
