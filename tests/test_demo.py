"""`rnan-fast demo` end to end with a tiny model exported into a temporary weights folder."""
import json
import shutil
import sys

import numpy as np
import pytest
import torch

from rnan_fast import RNAN, cli, weights
from rnan_fast import data as D
from rnan_fast.cli import demo
from rnan_fast.inference import restore_image
from rnan_fast.metrics import psnr

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    root, src = tmp_path_factory.mktemp("zoo"), tmp_path_factory.mktemp("src")
    torch.manual_seed(3)
    net = RNAN(n_colors=3, n_feats=8, n_resgroups=2)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn_like(p) * 1e-3)
    torch.save(net.state_dict(), src / "w.pt")
    weights.export(src / "w.pt", weights.DEFAULT_MODEL, root, task="denoise_rgb",
                   noise={"type": "gaussian", "sigma": 30}, test_gain_db=-1.0)
    return root


def _run(argv, capsys):
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_demo_end_to_end(zoo, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(weights.ENV_FOLDER, str(zoo))
    outdir = tmp_path / "demo"
    code, out, err = _run(["demo", "-o", outdir, "--crop", 48, "--quiet"], capsys)
    assert code == 0, err
    assert sorted(p.name for p in outdir.iterdir()) == ["noisy.png", "restored.png", "side_by_side.png"]
    # the very computation, from the library: astronaut crop, seeded noise, the default model
    import skimage.data

    top, left = demo.SAMPLES["astronaut"][1]
    clean = skimage.data.astronaut()[top:top + 48, left:left + 48]
    noisy = D.add_gaussian_noise(clean, 30, 0)
    restored = restore_image(RNAN.pretrained(), noisy)
    assert np.array_equal(D.read_image(outdir / "noisy.png"), D.to_uint8(noisy))
    assert np.array_equal(D.read_image(outdir / "restored.png"), restored)
    sbs = D.read_image(outdir / "side_by_side.png")
    assert sbs.shape == (48, 3 * 48 + 2 * demo.GAP, 3)
    assert np.array_equal(sbs[:, :48], clean) and np.array_equal(sbs[:, -48:], restored)
    assert (sbs[:, 48:48 + demo.GAP] == 255).all()
    assert f"noisy     PSNR {psnr(clean, noisy):6.2f} dB" in out
    assert f"restored  PSNR {psnr(clean, restored):6.2f} dB" in out and " s" in out
    assert f"model {weights.DEFAULT_MODEL}" in err and "sigma 30" in out
    # a second run refuses to replace the outputs unless --overwrite
    code, _, err = _run(["demo", "-o", outdir, "--crop", 48, "--quiet"], capsys)
    assert code == 2 and "--overwrite" in err and "Traceback" not in err
    code, out, err = _run(["demo", "-o", outdir, "--crop", 40, "--sigma", 15, "--seed", 4, "--image", "coffee",
                           "--quiet", "--overwrite"], capsys)
    assert code == 0, err
    assert D.read_image(outdir / "noisy.png").shape == (40, 40, 3) and "coffee" in out and "sigma 15" in out


def test_demo_with_camera_noise(zoo, tmp_path, monkeypatch, capsys):
    """--noise camera draws data.photo_noise (seeded); a model whose card says denoise_photo is
    shown on it by default, on Gaussian noise when --sigma is given."""
    import skimage.data

    monkeypatch.setenv(weights.ENV_FOLDER, str(zoo))
    top, left = demo.SAMPLES["chelsea"][1]
    clean = skimage.data.chelsea()[top:top + 40, left:left + 40]
    outdir = tmp_path / "cam"
    code, out, err = _run(["demo", "-o", outdir, "--crop", 40, "--image", "chelsea", "--noise", "camera", "--seed", 3,
                           "--quiet"], capsys)
    assert code == 0, err
    assert np.array_equal(D.read_image(outdir / "noisy.png"), D.photo_noise(clean, 3).astype(np.uint8))
    assert "camera-like noise" in out and "sigma" not in out
    code, _, err = _run(["demo", "-o", outdir, "--noise", "camera", "--sigma", 10, "--overwrite"], capsys)
    assert code == 2 and "--sigma" in err and "Traceback" not in err
    # a photo denoiser's card: camera noise unless --sigma asks for Gaussian noise
    own = shutil.copytree(zoo, tmp_path / "zoo")
    monkeypatch.setenv(weights.ENV_FOLDER, str(own))
    card_path = own / f"{weights.DEFAULT_MODEL}.json"
    card = json.loads(card_path.read_text())
    card.update(task="denoise_photo", noise={"type": "camera", "sigma_range": [5, 30]})
    card_path.write_text(json.dumps(card))
    code, out, err = _run(["demo", "-o", outdir, "--crop", 40, "--quiet", "--overwrite"], capsys)
    assert code == 0 and "camera-like noise" in out, err
    code, out, err = _run(["demo", "-o", outdir, "--crop", 40, "--quiet", "--overwrite", "--sigma", 20], capsys)
    assert code == 0 and "Gaussian noise sigma 20" in out, err


def test_demo_errors(zoo, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(weights.ENV_FOLDER, str(tmp_path / "empty"))
    code, _, err = _run(["demo", "-o", tmp_path / "d"], capsys)
    assert code == 2 and "does not ship" in err and "Traceback" not in err
    monkeypatch.setenv(weights.ENV_FOLDER, str(zoo))
    monkeypatch.setitem(sys.modules, "skimage", None)  # import skimage.data now raises ImportError
    monkeypatch.setitem(sys.modules, "skimage.data", None)
    code, _, err = _run(["demo", "-o", tmp_path / "d"], capsys)
    assert code == 2 and "scikit-image" in err and "rnan_fast[demo]" in err and "Traceback" not in err
    monkeypatch.undo()
    monkeypatch.setenv(weights.ENV_FOLDER, str(zoo))
    for argv, needle in ((["--sigma", -1], "--sigma"), (["--crop", -3], "--crop"),
                         (["--image", "moon"], "invalid choice")):
        code, _, err = _run(["demo", "-o", tmp_path / "d"] + argv, capsys)
        assert code == 2 and needle in err, err
    assert not (tmp_path / "d").exists()
