"""Shipped models (rnan_fast.weights): every file in the package folder loads, matches its card
and denoises; the folder machinery (listing, hash check, errors, RNAN.pretrained, the CLI's
default model, `rnan-fast models`) on tiny models exported into temporary folders."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from rnan_fast import RNAN, cli, weights
from rnan_fast import data as D
from rnan_fast.cli.models import describe_noise, note_sigma
from rnan_fast.inference import restore_image
from rnan_fast.metrics import psnr
from rnan_fast.baselines import bilinear_demosaic

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = Path(__file__).resolve().parents[1]
PACKAGE_FOLDER = REPO / "rnan_fast" / "weights"
# The noisy crop each shipped model must improve by its card's test_gain_db (MODEL_ZOO.md):
# a 96x96 crop of Kodak24/kodim05 at (left 256, top 192), gray models on its convert('L').
CHECK_IMAGE, CHECK_BOX = ("Kodak24", "kodim05.png"), (256, 192, 352, 288)


def tiny_card(task="denoise_rgb", gain=-1.0, measured=()):
    return dict(task=task, noise={"type": "gaussian", "sigma_range": [5, 55]}, test_gain_db=gain,
                training={"data": "none: random weights for the tests", "steps": 0}, measured=list(measured))


def tiny_checkpoint(path, n_colors=3, seed=0, training_format=False):
    torch.manual_seed(seed)
    net = RNAN(n_colors=n_colors, n_feats=8, n_resgroups=2)
    with torch.no_grad():
        for p in net.parameters():  # small, non-zero: the non-local path matters, output ~ input
            p.copy_(torch.randn_like(p) * 1e-3)
    sd = net.state_dict()
    torch.save({"format": "rnan_fast.train/1", "model": sd, "ema": sd} if training_format else sd, path)
    return net


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """A weights folder: the default color model (training-format source, fp32), a gray one (bf16)."""
    root = tmp_path_factory.mktemp("zoo")
    src = tmp_path_factory.mktemp("src")
    nets = {"rgb": tiny_checkpoint(src / "rgb.pt", 3, 1, training_format=True),
            "gray": tiny_checkpoint(src / "gray.pt", 1, 2)}
    weights.export(src / "rgb.pt", weights.DEFAULT_MODEL, root, **tiny_card())
    weights.export(src / "gray.pt", "tiny_gray", root, dtype=torch.bfloat16,
                   **tiny_card("denoise_gray", measured=[{"set": "BSD68", "sigma": 30, "psnr": 20.0, "ssim": 0.5,
                                                          "bm3d_psnr": 27.8, "bm3d_ssim": 0.77},
                                                         {"set": "BSD68", "sigma": 30, "psnr": 20.5, "ssim": 0.5,
                                                          "self_ensemble": True}]))
    return {"root": root, "nets": nets}


@pytest.fixture
def use_zoo(zoo, monkeypatch):
    monkeypatch.setenv(weights.ENV_FOLDER, str(zoo["root"]))
    return zoo


def check_crop(data_dir, n_colors):
    img = D.read_image(data_dir.joinpath(*CHECK_IMAGE))[CHECK_BOX[1]:CHECK_BOX[3], CHECK_BOX[0]:CHECK_BOX[2]]
    return D.to_gray(img) if n_colors == 1 else img


def check_model(name, data_dir):
    """What CI asks of a shipped model: its file matches its card (size, SHA-256, architecture),
    it loads, and it restores the check crop, degraded as its task says (Gaussian denoisers: noise
    at check_sigma; the others: data.degrade's seed 0), by at least the card's test_gain_db. Returns the gain."""
    card = weights.card(name)
    path = weights.verify(name)
    assert path.stat().st_size == card["size"] and weights.sha256_of(path) == card["sha256"]
    net = RNAN.pretrained(name)
    assert not net.training
    assert {k: net.config[k] for k in card["architecture"]} == card["architecture"]
    task = card["task"]
    assert D.TASK_COLORS[task] == net.n_colors
    clean = check_crop(data_dir, net.n_colors)
    if task in ("denoise_gray", "denoise_rgb"):
        what = f"sigma {weights.check_sigma(card)}"
        degraded = D.add_gaussian_noise(clean, weights.check_sigma(card), seed=0)
    elif task == "car":   # JPEG at the card's quality
        what = f"JPEG quality {card['noise']['quality']}"
        degraded = D.degrade(clean, task, quality=card["noise"]["quality"])[1]
    elif task == "sr":
        what = f"x{net.scale}"
        clean, degraded = D.degrade(clean, task, scale=net.scale)
    else:
        what = task
        degraded = D.degrade(clean, task)[1]
    # the gain over the degraded input (SR: over bicubic upscaling of the same low-resolution crop;
    # demosaicing: over bilinear demosaicing of the same mosaic, the network's own starting point)
    before = (D.bicubic_upscale(degraded, net.scale) if task == "sr" else
              D.to_uint8(bilinear_demosaic(degraded)) if task == "demosaic" else degraded)
    gain = psnr(clean, restore_image(net, degraded)) - psnr(clean, before)
    assert gain > card["test_gain_db"], f"{name}: gain {gain:.2f} dB at {what}, card bound {card['test_gain_db']}"
    return gain


def test_every_shipped_model(data_dir, tmp_path, monkeypatch):
    """Every NAME.safetensors of the package has a card and passes check_model (no pickled .pt
    ships). While nothing ships, the same checks run on a folder holding a tiny model, and the
    gain check is shown to fail on a bound that model cannot reach."""
    monkeypatch.delenv(weights.ENV_FOLDER, raising=False)
    assert weights.folder() == PACKAGE_FOLDER
    assert not list(PACKAGE_FOLDER.glob("*.pt")), "shipped weights are .safetensors files"
    pts = sorted(p.stem for p in PACKAGE_FOLDER.glob("*.safetensors"))
    assert pts == sorted(weights.available()), "every shipped .safetensors needs its .json card, and every card its file"
    for name in pts:
        check_model(name, data_dir)
    if pts:
        assert weights.DEFAULT_MODEL in pts, "the default color denoiser must ship once any model does"
        return
    tiny_checkpoint(tmp_path / "src.pt")
    weights.export(tmp_path / "src.pt", "tiny", tmp_path / "zoo", **tiny_card())
    monkeypatch.setenv(weights.ENV_FOLDER, str(tmp_path / "zoo"))
    assert list(weights.available()) == ["tiny"]
    gain = check_model("tiny", data_dir)
    card_path = tmp_path / "zoo" / "tiny.json"
    card = json.loads(card_path.read_text())
    card["test_gain_db"] = gain + 0.5
    card_path.write_text(json.dumps(card))
    with pytest.raises(AssertionError, match="card bound"):
        check_model("tiny", data_dir)


def test_export_writes_the_card_head_first(tmp_path):
    tiny_checkpoint(tmp_path / "src.pt")
    fields = tiny_card()
    weights.export(tmp_path / "src.pt", "tiny", tmp_path, note="extra", **dict(reversed(fields.items())))
    keys = list(json.loads((tmp_path / "tiny.json").read_text()))
    assert keys == ["task", "noise", "training", "test_gain_db", "measured", "note",
                    "architecture", "stored_dtype", "size", "sha256"]


def test_export_and_load(use_zoo):
    cards = weights.available()
    assert list(cards) == sorted([weights.DEFAULT_MODEL, "tiny_gray"])
    rgb = cards[weights.DEFAULT_MODEL]
    assert rgb["architecture"] == {"n_colors": 3, "scale": 1, "n_feats": 8, "n_resgroups": 2, "softmax_over": "query"}
    assert rgb["stored_dtype"] == "float32" and cards["tiny_gray"]["stored_dtype"] == "bfloat16"
    for name, card in cards.items():
        assert card["name"] == name and card["size"] == (use_zoo["root"] / f"{name}.safetensors").stat().st_size
    # the default model is the one exported from the training-format file, weights unchanged
    net = RNAN.pretrained()
    x = torch.rand(1, 3, 13, 17) * 255
    with torch.no_grad():
        torch.testing.assert_close(net(x), use_zoo["nets"]["rgb"].eval()(x), rtol=0, atol=0)
    assert list(RNAN.pretrained_models()) == list(cards)
    # bf16 storage: the model runs in fp32 with the bf16-rounded weights
    gray = RNAN.pretrained("tiny_gray")
    ref = use_zoo["nets"]["gray"].state_dict()
    for k, v in gray.state_dict().items():
        assert v.dtype == torch.float32
        assert torch.equal(v, ref[k].to(torch.bfloat16).float()), k
    raw = load_file(use_zoo["root"] / "tiny_gray.safetensors")
    assert all(v.dtype == torch.bfloat16 for v in raw.values() if v.is_floating_point())


def _copy_zoo(zoo, tmp_path):
    root = tmp_path / "zoo"
    root.mkdir()
    for p in zoo["root"].iterdir():
        (root / p.name).write_bytes(p.read_bytes())
    return root


def test_corrupt_or_altered_files_are_named(zoo, tmp_path, monkeypatch):
    root = _copy_zoo(zoo, tmp_path)
    monkeypatch.setenv(weights.ENV_FOLDER, str(root))
    name = weights.DEFAULT_MODEL
    pt = root / f"{name}.safetensors"
    good = pt.read_bytes()
    # one flipped byte: same size, other hash
    pt.write_bytes(good[:100] + bytes([good[100] ^ 1]) + good[101:])
    with pytest.raises(weights.WeightsError, match="SHA-256") as e:
        RNAN.pretrained(name)
    assert str(pt) in str(e.value) and "altered" in str(e.value) and f"{name}.json" in str(e.value)
    # truncated
    pt.write_bytes(good[:-10])
    with pytest.raises(weights.WeightsError, match="truncated") as e:
        weights.verify(name)
    assert str(pt) in str(e.value) and str(len(good) - 10) in str(e.value) and str(len(good)) in str(e.value)
    # missing
    pt.unlink()
    with pytest.raises(weights.WeightsError, match="missing"):
        RNAN.pretrained(name)
    pt.write_bytes(good)
    assert weights.verify(name) == pt
    # a card whose architecture the weights do not build (hash fine)
    card_path = root / f"{name}.json"
    card = json.loads(card_path.read_text())
    card["architecture"]["n_feats"] = 16
    card_path.write_text(json.dumps(card))
    with pytest.raises(weights.WeightsError, match="n_feats: card 16, weights 8"):
        RNAN.pretrained(name)
    # a card that lacks fields, and one that is not JSON
    del card["sha256"], card["architecture"]["softmax_over"]
    card_path.write_text(json.dumps(card))
    with pytest.raises(weights.WeightsError, match=r"lacks sha256, architecture.softmax_over"):
        weights.available()
    card_path.write_text("{not json")
    with pytest.raises(weights.WeightsError, match="unreadable model card"):
        weights.card(name)
    # unknown names list what there is
    for bad in ("nope", "../zoo/tiny_gray", ""):
        with pytest.raises(weights.WeightsError, match="the models there are: .*tiny_gray"):
            RNAN.pretrained(bad)
    monkeypatch.setenv(weights.ENV_FOLDER, str(tmp_path / "empty"))
    assert weights.available() == {}
    with pytest.raises(weights.WeightsError, match="no model ships there yet"):
        RNAN.pretrained()


def test_export_needs_the_card_fields(tmp_path):
    tiny_checkpoint(tmp_path / "src.pt")
    with pytest.raises(weights.WeightsError, match="task, noise, test_gain_db"):
        weights.export(tmp_path / "src.pt", "x", tmp_path / "zoo")
    assert not (tmp_path / "zoo" / "x.safetensors").exists()


def test_check_sigma():
    assert weights.check_sigma({"noise": {"sigma": 15}}) == 15
    assert weights.check_sigma({"noise": {"sigma_range": [5, 55]}}) == 30
    assert weights.check_sigma({"noise": {"sigma_range": [40, 60]}}) == 40


def test_note_sigma(capsys):
    fixed = {"name": "m", "task": "denoise_rgb", "noise": {"type": "gaussian", "sigma": 30}}
    for sigma, noted in ((30, False), (25, True), (50, True)):
        note_sigma(fixed, sigma, quiet=True)
        err = capsys.readouterr().err
        assert ("model m was trained for gaussian sigma 30, not sigma" in err) == noted, (sigma, err)
    note_sigma({"name": "c", "task": "car", "noise": {"type": "jpeg"}}, 10, quiet=True)  # not a denoiser
    note_sigma(None, 10, quiet=True)  # a --weights file: no card
    assert capsys.readouterr().err == ""
    photo = {"name": "p", "task": "denoise_photo", "noise": {"type": "camera", "sigma_range": [5, 30]}}
    assert describe_noise(photo) == "camera + gaussian 5-30"
    assert describe_noise({"noise": {"type": "camera"}}) == "camera"
    assert describe_noise({"noise": {"type": "MATLAB bicubic", "scale": 2}}) == "MATLAB bicubic x2"
    note_sigma(photo, 20, quiet=True)
    assert capsys.readouterr().err == ""
    note_sigma(photo, 50, quiet=True)
    assert "model p was trained for camera + gaussian 5-30, not sigma 50" in capsys.readouterr().err


# --------------------------------------------------------------------------- command line

def _run(argv, capsys):
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_restore_without_weights_uses_the_default_model(use_zoo, data_dir, tmp_path, capsys):
    src = tmp_path / "in"
    src.mkdir()
    crop = check_crop(data_dir, 3)[:40, :52]
    Image.fromarray(crop).save(src / "a.png")
    Image.fromarray(D.to_gray(crop)).save(src / "g.png")
    code, _, err = _run(["restore", "-o", tmp_path / "out", "--quiet", src], capsys)
    assert code == 0, err
    assert f"model {weights.DEFAULT_MODEL}" in err and "denoise_rgb" in err
    net = RNAN.pretrained()
    assert np.array_equal(D.read_image(tmp_path / "out" / "a.png"), restore_image(net, crop))
    assert D.read_image(tmp_path / "out" / "g.png").shape == (40, 52)    # gray in, gray out
    # --model picks another: the gray model gets RGB inputs as gray
    code, _, err = _run(["restore", "--model", "tiny_gray", "-o", tmp_path / "gray", "--quiet", src / "a.png"], capsys)
    assert code == 0, err
    assert "model tiny_gray" in err and "convert('L')" in err
    assert np.array_equal(D.read_image(tmp_path / "gray" / "a.png"),
                          restore_image(RNAN.pretrained("tiny_gray"), D.to_gray(crop)))
    # user errors: unknown name, both options, a corrupt default model (no traceback, nothing written)
    for argv, needle in ((["--model", "nope"], "no model named 'nope'"),
                         (["--model", "tiny_gray", "--weights", tmp_path / "w.pt"], "not both")):
        code, _, err = _run(["restore", "-o", tmp_path / "never", "--quiet", src] + argv, capsys)
        assert code == 2 and needle in err and "Traceback" not in err, err
    assert not (tmp_path / "never").exists()


def test_restore_and_demo_name_a_corrupt_model(zoo, tmp_path, monkeypatch, capsys):
    root = _copy_zoo(zoo, tmp_path)
    monkeypatch.setenv(weights.ENV_FOLDER, str(root))
    pt = root / f"{weights.DEFAULT_MODEL}.safetensors"
    data = bytearray(pt.read_bytes())
    data[len(data) // 2] ^= 0x40
    pt.write_bytes(bytes(data))
    img = tmp_path / "a.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(img)
    for argv in (["restore", "-o", tmp_path / "o", "--quiet", img], ["demo", "-o", tmp_path / "d", "--quiet"]):
        code, _, err = _run(argv, capsys)
        assert code == 2 and str(pt) in err and "SHA-256" in err and "Traceback" not in err, err
    assert not (tmp_path / "o").exists() and not (tmp_path / "d").exists()


def test_restore_without_any_model(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(weights.ENV_FOLDER, str(tmp_path / "nothing"))
    img = tmp_path / "a.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(img)
    code, _, err = _run(["restore", "-o", tmp_path / "o", img], capsys)
    assert code == 2 and "does not ship" in err and "--weights" in err and "Traceback" not in err
    code, out, err = _run(["models"], capsys)
    assert code == 0 and "no model ships" in out


def test_models_lists_cards(use_zoo, capsys):
    code, out, err = _run(["models"], capsys)
    assert code == 0, err
    lines = out.splitlines()
    default = next(line for line in lines if weights.DEFAULT_MODEL in line)
    assert default.startswith("*") and "denoise_rgb" in default and "gaussian sigma 5-55" in default
    assert "not measured" in default and "MiB" in default
    gray = next(line for line in lines if "tiny_gray" in line)
    assert "BSD68 s30 20.00 (BM3D 27.80), BSD68 s30 x8 20.50" in gray and not gray.startswith("*")
    # a photo denoiser's card: its real-noise rows first, with the baselines beside them
    from rnan_fast.cli.models import _measured

    photo = {"measured": [{"set": "CBSD68", "sigma": 30, "psnr": 29.9},
                          {"set": "PolyU_dev", "pairs": True, "psnr": 38.2, "bm3d_psnr": 37.9, "nlm_psnr": 37.71},
                          {"set": "Kodak24", "sigma": 15, "psnr": 33.0}]}
    assert _measured(photo) == "PolyU_dev real 38.20 (BM3D 37.90) (NLM 37.71), CBSD68 s30 29.90"
    sr = {"measured": [{"set": "Set5", "psnr": 36.5, "bicubic_psnr": 33.66}, {"set": "Set14", "psnr": 32.4}]}
    assert _measured(sr) == "Set5 36.50 (bicubic 33.66), Set14 32.40"


def test_eval_with_a_shipped_model(use_zoo, data_dir, tmp_path, capsys):
    folder = tmp_path / "set"
    folder.mkdir()
    Image.fromarray(check_crop(data_dir, 3)[:32, :40]).save(folder / "k.png")
    code, out, err = _run(["eval", "--model", weights.DEFAULT_MODEL, "--task", "denoise_rgb", "--sigma", 30,
                           "--data", folder, "--quiet", "--csv", tmp_path / "r.csv"], capsys)
    assert code == 0, err
    assert "RNAN(n_colors=3, scale=1, n_feats=8, n_resgroups=2)" in out
    assert "trained for" not in err  # sigma 30 is inside the card's 5-55
    net = RNAN.pretrained()
    gt = check_crop(data_dir, 3)[:32, :40]
    want = psnr(gt, restore_image(net, D.add_gaussian_noise(gt, 30, D.noise_seed(0, 0))))
    row = (tmp_path / "r.csv").read_text().splitlines()[1].split(",")
    assert row[0] == "k.png" and float(row[1]) == pytest.approx(want, abs=2e-6)
    code, _, err = _run(["eval", "--model", "tiny_gray", "--task", "denoise_rgb", "--sigma", 30, "--data", folder,
                         "--quiet"], capsys)
    assert code == 2 and "1-channel" not in err and "3-channel model" in err, err
    # without --task: the card's (denoise_gray here); the same numbers as with it
    code, out, err = _run(["eval", "--model", "tiny_gray", "--sigma", 30, "--data", folder, "--quiet"], capsys)
    assert code == 0 and out.startswith("# denoise_gray sigma 30"), err
    code, out2, err = _run(["eval", "--model", "tiny_gray", "--task", "denoise_gray", "--sigma", 30, "--data", folder,
                            "--quiet"], capsys)
    assert code == 0 and out2.splitlines()[:-1] == out.splitlines()[:-1], err  # (the last line: the time)
    code, _, err = _run(["eval", "--model", "tiny_gray", "--sigma", 60, "--data", folder, "--quiet"], capsys)
    assert code == 0 and "model tiny_gray was trained for gaussian sigma 5-55, not sigma 60" in err, err
    for argv, needle in ((["--weights", tmp_path / "w.pt"], "--task is required"),
                         (["--baseline"], "--task is required"), (["--model", "nope"], "no model named 'nope'")):
        code, out, err = _run(["eval", "--sigma", 30, "--data", folder] + argv, capsys)
        assert code == 2 and needle in err and out == "", err


def test_subprocess_restore_with_env_folder(zoo, tmp_path):
    img = tmp_path / "a.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (18, 22, 3), dtype=np.uint8)).save(img)
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               **{weights.ENV_FOLDER: str(zoo["root"])})
    proc = subprocess.run([sys.executable, "-m", "rnan_fast", "restore", "-o", tmp_path / "o", img],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert f"model {weights.DEFAULT_MODEL}" in proc.stderr and (tmp_path / "o" / "a.png").is_file()
