"""Photos in, photos out (rnan_fast.image_io, rnan_fast.photos, `rnan-fast restore`): what a
photo carries survives a restore. Fixtures are generated here (never read from ../shared); the
model is a test-only identity (or nearest x2 upscaler), so that these tests check the I/O, not
a network: a value that comes back changed was changed by the I/O."""
import io
import subprocess
import sys

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image, ImageCms, ImageOps

from rnan_fast import cli, image_io as I, photos
from rnan_fast.cli import restore as cli_restore
from rnan_fast.imresize import imresize

ICC = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()


class Identity(torch.nn.Module):
    """A model that returns its input (or a nearest-neighbour x`scale` of it); counts its calls."""

    def __init__(self, n_colors=3, scale=1):
        super().__init__()
        self.n_colors, self.scale, self.calls = n_colors, scale, 0

    def forward(self, x):
        self.calls += 1
        if self.scale == 1:
            return x.clone()
        return x.repeat_interleave(self.scale, -1).repeat_interleave(self.scale, -2)


def _exif(orientation=1):
    ex = Image.Exif()
    ex[0x0112] = orientation
    ex[0x010F] = "TestCam"
    ex.get_ifd(0x8769)[0x9003] = "2026:12:07 10:00:00"
    ex.get_ifd(0x8825)[1] = "N"
    return ex


def _rgb(h=10, w=14, seed=0):
    return (np.random.default_rng(seed).random((h, w, 3)) * 255).astype(np.uint8)


def _u16(shape, seed=1):
    a = np.random.default_rng(seed).integers(0, 65536, shape, dtype=np.uint16)
    a.flat[0] = 1000      # 1000 / 257 is no 8-bit value: truncation would give 3, rounding 4
    return a


def _as16(a):
    return np.clip(np.round(np.asarray(a, np.float64) * 257), 0, 65535).astype(np.uint16)


@pytest.fixture
def use_model(monkeypatch):
    """Make `rnan-fast restore` load the given test model (with a card of `task`) instead of a checkpoint."""
    def use(net, task=None):
        monkeypatch.setattr(cli_restore, "load_net", lambda args, device: (net, task and {"task": task}))
        return net
    return use


def _restore(argv, capsys):
    code = cli.main(["restore", "--quiet", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, err


# --------------------------------------------------------------------------- reading

@pytest.mark.parametrize("orientation", range(1, 9))
def test_orientation_gives_the_displayed_geometry(tmp_path, orientation):
    """Each EXIF orientation of a JPEG, a PNG (eXIf), an 8- and a 16-bit TIFF reads as Pillow's
    exif_transpose displays it, and the kept EXIF says 1."""
    a = _rgb()
    Image.fromarray(a).save(tmp_path / "o.png", exif=_exif(orientation))
    shown = np.asarray(ImageOps.exif_transpose(Image.open(tmp_path / "o.png")), dtype=np.float32)
    if orientation in (5, 6, 7, 8):
        assert shown.shape[:2] == a.shape[1::-1]
    p = I.read_photo(tmp_path / "o.png")
    assert np.array_equal(p.pixels, shown) and p.orientation == orientation and p.exif[0x0112] == 1
    Image.fromarray(a).save(tmp_path / "o.jpg", exif=_exif(orientation), quality=100, subsampling=0)
    jpg = I.read_photo(tmp_path / "o.jpg")
    assert np.array_equal(jpg.pixels, np.asarray(ImageOps.exif_transpose(Image.open(tmp_path / "o.jpg")),
                                                 dtype=np.float32))
    tifffile.imwrite(tmp_path / "o.tif", a, photometric="rgb", extratags=[(274, "H", 1, orientation, True)])
    assert np.array_equal(I.read_photo(tmp_path / "o.tif").pixels, shown)
    a16 = _u16(a.shape)
    tifffile.imwrite(tmp_path / "o16.tif", a16, photometric="rgb", extratags=[(274, "H", 1, orientation, True)])
    p16 = I.read_photo(tmp_path / "o16.tif")
    assert p16.pixels.shape == shown.shape and p16.bit_depth == 16
    assert np.array_equal(_as16(p16.pixels), I._orient(a16, orientation))


def test_modes_alpha_gray_and_depth(tmp_path):
    rgba = np.dstack([_rgb(), np.arange(140, dtype=np.uint8).reshape(10, 14)])
    Image.fromarray(rgba).save(tmp_path / "rgba.png")
    p = I.read_photo(tmp_path / "rgba.png")
    assert np.array_equal(p.alpha, rgba[..., 3]) and np.array_equal(p.pixels, rgba[..., :3])
    Image.fromarray(_rgb()).convert("P").save(tmp_path / "p.png", transparency=0)
    assert I.read_photo(tmp_path / "p.png").alpha is not None
    Image.fromarray(rgba[..., [0, 3]]).save(tmp_path / "la.png")
    la = I.read_photo(tmp_path / "la.png")
    assert la.gray and np.array_equal(la.alpha, rgba[..., 3])
    Image.fromarray(_rgb()[..., 0]).save(tmp_path / "g.jpg")
    assert I.read_photo(tmp_path / "g.jpg").gray
    g16 = _u16((9, 11))
    Image.fromarray(g16).save(tmp_path / "g16.png")
    p = I.read_photo(tmp_path / "g16.png")
    assert p.bit_depth == 16 and p.gray and np.array_equal(_as16(p.pixels), g16)
    assert abs(p.pixels.flat[0] - 1000 / 257) < 1e-5      # not rounded to an 8-bit step


def test_cmyk_and_animation_are_said(tmp_path):
    Image.fromarray(_rgb()).convert("CMYK").save(tmp_path / "c.jpg")
    p = I.read_photo(tmp_path / "c.jpg")
    assert p.pixels.shape == (10, 14, 3) and any("CMYK" in n for n in p.notes)
    frames = [Image.fromarray(_rgb(seed=s)).convert("P") for s in range(3)]
    frames[0].save(tmp_path / "a.gif", save_all=True, append_images=frames[1:])
    p = I.read_photo(tmp_path / "a.gif")
    assert p.notes == ("3 frames or pages: the first is restored",)


def test_bad_inputs_give_one_line_errors(tmp_path):
    Image.fromarray(_rgb()).save(tmp_path / "ok.png")
    data = (tmp_path / "ok.png").read_bytes()
    (tmp_path / "trunc.png").write_bytes(data[: len(data) // 2])
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "junk.jpg").write_bytes(b"not an image at all" * 10)
    Image.fromarray(np.zeros((3, 3), np.int32), "I").save(tmp_path / "i32.tif")
    expect = {"trunc.png": "truncated", "empty.png": "empty file", "junk.jpg": "unknown or damaged",
              "i32.tif": "32-bit integer", "missing.png": "no such file"}
    for name, words in expect.items():
        with pytest.raises(I.ImageReadError, match=words) as e:
            I.read_photo(tmp_path / name)
        assert "\n" not in str(e.value) and name in str(e.value)
    with pytest.raises(I.ImageReadError, match="--max-pixels 140"):
        I.read_photo(tmp_path / "ok.png", max_pixels=139)
    assert I.read_photo(tmp_path / "ok.png", max_pixels=140).pixels.shape == (10, 14, 3)


# --------------------------------------------------------------------------- restore, end to end

@pytest.mark.parametrize("ext,suffix", [("jpg", ".jpg"), ("png", ".png"), ("webp", ".webp"), ("tiff", ".tiff")])
def test_icc_and_exif_survive_a_restore(tmp_path, capsys, use_model, ext, suffix):
    use_model(Identity())
    src = tmp_path / "in" / "photo.jpg"
    src.parent.mkdir()
    Image.fromarray(_rgb(16, 12)).save(src, exif=_exif(6), icc_profile=ICC, quality=95)
    code, err = _restore(["--ext", ext, "--suffix", "_rnan", "-o", tmp_path / "out", src], capsys)
    assert code == 0, err
    out = tmp_path / "out" / f"photo_rnan{suffix}"
    im = Image.open(out)
    im.load()
    exif = im.getexif()
    assert im.info.get("icc_profile") == ICC
    assert exif.get(0x010F) == "TestCam" and exif.get(0x0112) in (None, 1)
    assert exif.get_ifd(0x8769).get(0x9003) == "2026:12:07 10:00:00" and exif.get_ifd(0x8825).get(1) == "N"
    assert im.size == (16, 12)        # stored upright: orientation 6 applied, so 12 wide -> 16 wide


def test_sixteen_bits_alpha_and_gray_survive_an_identity_restore(tmp_path, capsys, use_model):
    use_model(Identity())
    rgba16 = _u16((9, 13, 4))
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "deep.png").write_bytes(I._encode_png16(rgba16, ICC, None))
    g16 = _u16((7, 5), seed=3)
    Image.fromarray(g16).save(tmp_path / "in" / "gray16.png")
    tifffile.imwrite(tmp_path / "in" / "deep.tif", rgba16[..., :3], photometric="rgb")
    gray = _rgb()[..., 1]
    Image.fromarray(gray).save(tmp_path / "in" / "gray.png")
    rgba8 = np.dstack([_rgb(), _rgb(seed=5)[..., 0]])
    Image.fromarray(rgba8).save(tmp_path / "in" / "rgba8.webp", lossless=True)
    code, err = _restore(["-o", tmp_path / "out", tmp_path / "in"], capsys)
    assert code == 0, err
    out = {p.name: p for p in (tmp_path / "out").iterdir()}
    assert sorted(out) == ["deep.png", "deep.tif", "gray.png", "gray16.png", "rgba8.webp"]
    deep = I.read_photo(out["deep.png"])
    assert deep.bit_depth == 16 and deep.icc_profile == ICC
    assert np.array_equal(_as16(deep.pixels), rgba16[..., :3]) and np.array_equal(_as16(deep.alpha), rgba16[..., 3])
    p = I.read_photo(out["gray16.png"])
    assert p.gray and p.bit_depth == 16 and np.array_equal(_as16(p.pixels), g16)
    assert np.array_equal(_as16(I.read_photo(out["deep.tif"]).pixels), rgba16[..., :3])
    assert Image.open(out["gray.png"]).mode == "L" and np.array_equal(np.asarray(Image.open(out["gray.png"])), gray)
    webp = np.asarray(Image.open(out["rgba8.webp"]))       # lossy colour at quality 95, lossless alpha
    buf = io.BytesIO()
    Image.fromarray(rgba8).save(buf, format="WEBP", quality=95)
    assert np.array_equal(webp, np.asarray(Image.open(buf))) and np.array_equal(webp[..., 3], rgba8[..., 3])


def test_alpha_is_resized_for_sr(tmp_path):
    rgba = np.dstack([_rgb(), (np.random.default_rng(4).random((10, 14)) * 255).astype(np.uint8)])
    Image.fromarray(rgba).save(tmp_path / "a.png")
    photos.restore_file(tmp_path / "a.png", tmp_path / "b.png", model=Identity(scale=2))
    out = np.asarray(Image.open(tmp_path / "b.png"))
    assert out.shape == (20, 28, 4)
    assert np.array_equal(out[..., :3], rgba[..., :3].repeat(2, 0).repeat(2, 1))
    want = np.clip(imresize(rgba[..., 3].astype(np.float64), output_shape=(20, 28)), 0, 255)
    assert np.array_equal(out[..., 3], np.clip(np.floor(want + 0.5), 0, 255).astype(np.uint8))


def test_ext_auto_suffix_and_lossy_outputs_say_what_they_drop(tmp_path, capsys, use_model):
    use_model(Identity())
    d = tmp_path / "in"
    d.mkdir()
    Image.fromarray(_rgb()).save(d / "a.jpg", quality=90)
    Image.fromarray(_rgb(seed=2)).save(d / "a.png")
    Image.fromarray(_rgb(seed=3)).save(d / "b.bmp")
    Image.fromarray(np.dstack([_rgb(), _rgb()[..., :1]])).save(d / "c.png")
    code, err = _restore(["-o", tmp_path / "auto", d], capsys)
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "auto").iterdir()) == ["a.jpg", "a.png", "b.png", "c.png"]
    assert Image.open(tmp_path / "auto" / "a.jpg").format == "JPEG"
    code, err = _restore(["--ext", "png", "-o", tmp_path / "clash", d], capsys)
    assert code == 2 and "several inputs" in err and not (tmp_path / "clash").exists()
    code, err = _restore(["--ext", "jpg", "--suffix", "_x", "--quality", "80", "-o", tmp_path / "j", d / "c.png"],
                         capsys)
    assert code == 0 and (tmp_path / "j" / "c_x.jpg").exists() and "alpha dropped" in err


def test_skip_existing_continues_a_stopped_batch(tmp_path, capsys, use_model):
    d = tmp_path / "in"
    d.mkdir()
    for k in range(5):
        Image.fromarray(_rgb(seed=k)).save(d / f"p{k}.png")

    class StopsAtThree(Identity):
        def forward(self, x):
            if self.calls == 2:
                raise KeyboardInterrupt
            return super().forward(x)
    use_model(StopsAtThree())
    code, err = _restore(["-o", tmp_path / "out", d], capsys)
    assert code == 130
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["p0.png", "p1.png"]   # no temporaries left
    before = (tmp_path / "out" / "p0.png").stat().st_mtime_ns
    code, err = _restore(["-o", tmp_path / "out", d], capsys)
    assert code == 2 and "--skip-existing" in err
    net = use_model(Identity())
    code, err = _restore(["--skip-existing", "-o", tmp_path / "out", d], capsys)
    assert code == 0 and net.calls == 3 and "kept 2 existing" in err
    assert (tmp_path / "out" / "p0.png").stat().st_mtime_ns == before
    assert len(list((tmp_path / "out").iterdir())) == 5
    code, err = _restore(["--skip-existing", "-o", tmp_path / "out", d], capsys)
    assert code == 0 and net.calls == 3 and "nothing to do" in err
    code, err = _restore(["--skip-existing", "--overwrite", "-o", tmp_path / "out", d], capsys)
    assert code == 2 and "exclude each other" in err


def test_recursive_mirrors_the_tree_and_others_are_listed(tmp_path, capsys, use_model):
    use_model(Identity())
    d = tmp_path / "in"
    (d / "x" / "y").mkdir(parents=True)
    Image.fromarray(_rgb()).save(d / "top.png")
    Image.fromarray(_rgb()).save(d / "x" / "mid.jpg")
    Image.fromarray(_rgb()).save(d / "x" / "y" / "deep.png")
    (d / "notes.txt").write_text("not an image")
    (d / "x" / "raw.cr2").write_bytes(b"\0" * 10)
    code, err = _restore(["-o", tmp_path / "flat", d], capsys)
    assert code == 0 and [p.name for p in (tmp_path / "flat").iterdir()] == ["top.png"]
    assert "1 subfolder(s)" in err and "--recursive" in err and "notes.txt" in err
    code, err = _restore(["--recursive", "-o", tmp_path / "tree", d], capsys)
    assert code == 0, err
    got = sorted(str(p.relative_to(tmp_path / "tree")) for p in (tmp_path / "tree").rglob("*") if p.is_file())
    assert got == ["top.png", "x/mid.jpg", "x/y/deep.png"]
    assert err.count("not images") == 1 and "notes.txt" in err and "raw.cr2" in err


def test_bad_inputs_are_reported_and_the_rest_written(tmp_path, capsys, use_model):
    use_model(Identity())
    d = tmp_path / "in"
    d.mkdir()
    Image.fromarray(_rgb()).save(d / "good.png")
    data = (d / "good.png").read_bytes()
    (d / "trunc.png").write_bytes(data[:60])
    (d / "empty.jpg").write_bytes(b"")
    Image.fromarray(_rgb(40, 40)).save(d / "big.png")
    code, err = _restore(["--max-pixels", 1000, "-o", tmp_path / "out", d], capsys)
    assert code == 1
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["good.png"]
    for name in ("trunc.png", "empty.jpg", "big.png"):
        assert sum(name in line for line in err.splitlines()) == 2    # its own line, and the failed list
    assert "3 input(s) failed" in err


def test_gray_model_on_colour_and_rgb_model_on_gray(tmp_path):
    rgb = _rgb()
    Image.fromarray(rgb).save(tmp_path / "c.png")
    notes = photos.restore_file(tmp_path / "c.png", tmp_path / "g.png", model=Identity(n_colors=1))
    out = np.asarray(Image.open(tmp_path / "g.png"))
    assert out.ndim == 2 and any("gray" in n for n in notes)
    assert np.array_equal(out, np.asarray(Image.open(tmp_path / "c.png").convert("L")))   # 8-bit: Pillow's luma
    Image.fromarray(rgb[..., 0]).save(tmp_path / "gray.jpg", quality=100)
    photos.restore_file(tmp_path / "gray.jpg", tmp_path / "back.jpg", model=Identity(n_colors=3))
    assert Image.open(tmp_path / "back.jpg").mode == "L"


def test_restore_file_with_a_real_model(tmp_path):
    """The Python API with an RNAN: the same output as the library's restore_image on the pixels."""
    from rnan_fast import RNAN
    from rnan_fast.inference import restore_image

    torch.manual_seed(0)
    net = RNAN(n_colors=3, n_feats=8, n_resgroups=2).eval()
    rgb = _rgb(12, 10)
    Image.fromarray(rgb).save(tmp_path / "a.png", exif=_exif(1), icc_profile=ICC)
    photos.restore_file(tmp_path / "a.png", tmp_path / "b.png", model=net, tile=None)
    assert np.array_equal(np.asarray(Image.open(tmp_path / "b.png")), restore_image(net, rgb))
    assert Image.open(tmp_path / "b.png").info["icc_profile"] == ICC
    photos.restore_file(tmp_path / "a.png", tmp_path / "c.png", model=net, pixel_shuffle=2)
    assert np.array_equal(np.asarray(Image.open(tmp_path / "c.png")), restore_image(net, rgb, pixel_shuffle=2))
    with pytest.raises(ValueError, match="pixel_shuffle"):
        photos.restore_file(tmp_path / "a.png", tmp_path / "d.png", model=net, pixel_shuffle=0)


# --------------------------------------------------------------------------- the command around it

def test_help_does_not_import_torch():
    code = ("import sys; from rnan_fast.cli import main; main(['--help']); main(['restore', '--help']); "
            "sys.stderr.write(str(sorted(m for m in ('torch', 'cv2', 'tifffile') if m in sys.modules)))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stderr.strip() == "[]", proc.stderr[-2000:]
    assert "--skip-existing" in proc.stdout and "--ext" in proc.stdout


def test_device_auto(monkeypatch):
    from rnan_fast.cli import common

    monkeypatch.setattr(common, "_cuda_usable", lambda: False)
    assert common._device("auto").type == "cpu"
    monkeypatch.setattr(common, "_cuda_usable", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert common._device("auto") == torch.device("cuda")


def test_missing_fast_path_is_warned_once(tmp_path, capsys, use_model, monkeypatch):
    import rnan_fast

    info = dict(rnan_fast.backend_info(), extension_attention_cpu=False, extension_error="test: not built")
    monkeypatch.setattr(rnan_fast, "backend_info", lambda: info)
    use_model(Identity())
    for k in range(2):
        Image.fromarray(_rgb(seed=k)).save(tmp_path / f"{k}.png")
    code = cli.main(["restore", "-o", str(tmp_path / "out"), str(tmp_path / "0.png"), str(tmp_path / "1.png")])
    err = capsys.readouterr().err
    assert code == 0 and err.count("test: not built") == 1 and "slower" in err
    code = cli.main(["restore", "--backend", "reference", "-o", str(tmp_path / "ref"), str(tmp_path / "0.png")])
    assert code == 0 and "not built" not in capsys.readouterr().err


def test_demosaicing_model_takes_a_bayer_mosaic(tmp_path, capsys, use_model):
    """A one-channel GRBG image becomes the 3-channel zero-filled mosaic (an identity model hands
    it back); the 3-channel form is taken as it is; a full colour photo is refused by name."""
    from rnan_fast import data as D

    rgb = _rgb(8, 12)
    d = tmp_path / "in"
    d.mkdir()
    raw = D.mosaic(rgb).sum(axis=2).astype(np.uint8)   # one sample per site
    Image.fromarray(raw).save(d / "raw.png")
    Image.fromarray(D.mosaic(rgb)).save(d / "zero_filled.png")
    Image.fromarray(rgb).save(d / "photo.png")
    use_model(Identity(), task="demosaic")
    code, err = _restore(["-o", tmp_path / "out", d], capsys)
    assert code == 1 and "photo.png" in err and "GRBG" in err
    for name in ("raw.png", "zero_filled.png"):
        out = np.asarray(Image.open(tmp_path / "out" / name))
        assert out.shape == (8, 12, 3) and np.array_equal(out, D.mosaic(rgb))
    code, err = _restore(["--self-ensemble", "-o", tmp_path / "x8", d / "raw.png"], capsys)
    assert code == 2 and "Bayer" in err


def test_strength_blends_output_and_input(tmp_path, capsys, use_model):
    class AddTen(Identity):
        def forward(self, x):
            return super().forward(x) + 10
    rgb = (np.random.default_rng(6).random((6, 8, 3)) * 200).astype(np.uint8)
    Image.fromarray(rgb).save(tmp_path / "a.png")
    use_model(AddTen())
    code, err = _restore(["--strength", 0.3, "-o", tmp_path / "out", tmp_path / "a.png"], capsys)
    assert code == 0, err
    assert np.array_equal(np.asarray(Image.open(tmp_path / "out" / "a.png")), rgb + 3)
    photos.restore_file(tmp_path / "a.png", tmp_path / "b.png", model=AddTen(), strength=0.5)
    assert np.array_equal(np.asarray(Image.open(tmp_path / "b.png")), rgb + 5)
    for bad, needle in ((1.5, "within 0..1"), (-0.1, "within 0..1")):
        code, err = _restore(["--strength", bad, "-o", tmp_path / "never", tmp_path / "a.png"], capsys)
        assert code == 2 and needle in err
    use_model(Identity(scale=2))
    code, err = _restore(["--strength", 0.5, "-o", tmp_path / "never", tmp_path / "a.png"], capsys)
    assert code == 2 and "super-resolution" in err and not (tmp_path / "never").exists()


def test_car_model_restores_the_luma_and_keeps_the_chroma(tmp_path, capsys, use_model):
    """A Y-channel JPEG model on a colour photo: Y of rgb2ycbcr goes through the model, the
    photo's own Cb and Cr come back beside it (an identity gives the photo back; +10 on Y moves
    Y alone)."""
    from rnan_fast import data as D

    rgb = np.clip(_rgb(10, 12).astype(int), 30, 220).astype(np.uint8)   # no clipping after +10 on Y
    Image.fromarray(rgb).save(tmp_path / "a.png")
    use_model(Identity(n_colors=1), task="car")
    code, err = _restore(["-o", tmp_path / "same", tmp_path / "a.png"], capsys)
    assert code == 0 and "chroma is kept" in err, err
    assert np.array_equal(np.asarray(Image.open(tmp_path / "same" / "a.png")), rgb)

    class AddTen(Identity):
        def forward(self, x):
            return super().forward(x) + 10
    use_model(AddTen(n_colors=1), task="car")
    code, err = _restore(["-o", tmp_path / "plus", tmp_path / "a.png"], capsys)
    out = np.asarray(Image.open(tmp_path / "plus" / "a.png"))
    assert code == 0 and out.ndim == 3
    before, after = D.rgb_to_ycbcr(rgb), D.rgb_to_ycbcr(out)
    assert np.abs(after[..., 0] - before[..., 0] - 10).max() < 1.0          # rounding to uint8 RGB
    assert np.abs(after[..., 1:] - before[..., 1:]).max() < 1.0
    assert np.allclose(D.ycbcr_to_rgb(D.rgb_to_ycbcr(rgb)), rgb, atol=1e-9)
    assert np.array_equal(D.to_uint8(D.rgb_to_ycbcr(rgb)[..., 0]), D.rgb_to_y(rgb))
