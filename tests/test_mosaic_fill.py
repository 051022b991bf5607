"""RNAN(mosaic="grbg"): the bilinear fill of a zero-filled GRBG mosaic before the network
(modules.MosaicFill), its configuration, and its way through checkpoints, training resumes and
the model zoo."""
import numpy as np
import pytest
import torch

from rnan_fast import RNAN
from rnan_fast import data as D
from rnan_fast.model import CheckpointError
from rnan_fast.baselines import bilinear_demosaic
from rnan_fast.modules import MosaicFill

# (row, col) parity of each colour's samples in a GRBG cell, and the bilinear weights by offset
SITES = {0: [(0, 1)], 1: [(0, 0), (1, 1)], 2: [(1, 0)]}


def _fill_by_loops(mosaic: np.ndarray) -> np.ndarray:
    """The reference, float64, one pixel at a time: (H, W, 3) zero-filled mosaic -> each missing
    sample the weighted mean of its colour's samples in the 3x3 neighbourhood inside the image
    (weight 1 for the centre, 1/2 for side neighbours, 1/4 for corners; G: no corners), samples kept."""
    h, w, _ = mosaic.shape
    out = np.zeros((h, w, 3))
    for c, sites in SITES.items():
        for y in range(h):
            for x in range(w):
                num = den = 0.0
                for dy in (-1, 0, 1):
                    for dx in (-1, 0, 1):
                        yy, xx = y + dy, x + dx
                        if c == 1 and dy and dx:
                            continue   # G's kernel has no corners: at a G site the centre alone, elsewhere the 4 sides
                        if 0 <= yy < h and 0 <= xx < w and (yy % 2, xx % 2) in sites:
                            weight = 0.5 ** (abs(dy) + abs(dx))
                            num += weight * mosaic[yy, xx, c]
                            den += weight
                out[y, x, c] = num / den if den else 0.0
    return out


@pytest.mark.parametrize("size", [(7, 9), (8, 6), (2, 2), (1, 5), (5, 1)])
def test_fill_is_bilinear_demosaicing(size):
    g = np.random.default_rng(size[0] * 10 + size[1])
    rgb = g.uniform(0, 255, (*size, 3))
    mosaic = D.mosaic(rgb)
    want = _fill_by_loops(mosaic)
    wide = torch.from_numpy(np.stack([mosaic, 2 * mosaic]).transpose(0, 3, 1, 2)).repeat(1, 1, 1, 2)
    x = wide[..., : size[1]]                      # a non-contiguous batch of 2
    got = MosaicFill().double()(x)
    assert got.shape == x.shape
    np.testing.assert_allclose(got[0].numpy().transpose(1, 2, 0), want, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(got[1].numpy(), 2 * got[0].numpy(), rtol=1e-12, atol=1e-12)
    known = mosaic != 0
    np.testing.assert_array_equal(got[0].numpy().transpose(1, 2, 0)[known], mosaic[known])  # samples kept
    # values where a mosaic has no sample do not matter (only the pattern's sites are read)
    noisy = x + torch.from_numpy((D.mosaic(np.ones((*size, 3))) == 0).transpose(2, 0, 1)) * 99.0
    torch.testing.assert_close(MosaicFill().double()(noisy), got, rtol=0, atol=0)


def test_fill_is_exact_on_linear_images():
    """Bilinear interpolation reproduces a linear image away from the border, and a constant
    one everywhere (the border renormalised), from its GRBG mosaic."""
    yy, xx = np.mgrid[0:12, 0:14].astype(np.float64)
    img = np.stack([3 * xx + 2, 2 * yy + 5, xx + yy], axis=2)
    for ramp, inner in ((img, (slice(1, -1), slice(1, -1))), (np.full((6, 8, 3), 7.0), (slice(None), slice(None)))):
        out = bilinear_demosaic(D.mosaic(ramp))
        np.testing.assert_allclose(out[inner], ramp[inner], atol=1e-12)


def test_rnan_with_mosaic_is_the_official_network_after_the_fill():
    torch.manual_seed(0)
    plain = RNAN(n_colors=3, n_feats=8, n_resgroups=2).double().eval()
    filled = RNAN(n_colors=3, n_feats=8, n_resgroups=2, mosaic="grbg").double().eval()
    assert list(filled.state_dict()) == list(plain.state_dict())   # nothing added to the checkpoint
    filled.load_state_dict(plain.state_dict())
    x = torch.from_numpy(D.mosaic(np.random.default_rng(1).uniform(0, 255, (13, 11, 3)))).permute(2, 0, 1)[None]
    with torch.no_grad():
        torch.testing.assert_close(filled(x), plain(MosaicFill().double()(x)), rtol=1e-12, atol=1e-10)
    assert filled.config["mosaic"] == "grbg" and filled.mosaic == "grbg" and plain.mosaic is None
    assert filled.describe().endswith("mosaic='grbg')") and "mosaic" not in plain.describe()


@pytest.mark.parametrize("kwargs", [dict(mosaic="rggb"), dict(mosaic="grbg", n_colors=1),
                                    dict(mosaic="grbg", scale=2)])
def test_mosaic_needs_a_grbg_rgb_scale_one_model(kwargs):
    with pytest.raises(ValueError, match="mosaic"):
        RNAN(n_feats=8, n_resgroups=2, **kwargs)


def test_checkpoints_keep_the_mosaic_setting(tmp_path):
    from rnan_fast.train.checkpoint import write_checkpoint
    from rnan_fast.weights import write_weights

    torch.manual_seed(0)
    net = RNAN(n_colors=3, n_feats=8, n_resgroups=2, mosaic="grbg")
    write_weights(net, tmp_path / "w.safetensors")
    assert RNAN.from_checkpoint(tmp_path / "w.safetensors").mosaic == "grbg"
    torch.save(net.state_dict(), tmp_path / "plain.pt")             # a bare state dict: no setting
    assert RNAN.from_checkpoint(tmp_path / "plain.pt").mosaic is None
    assert RNAN.from_checkpoint(tmp_path / "plain.pt", mosaic="grbg").mosaic == "grbg"
    state = {"format": "rnan_fast.train/1", "model": net.state_dict(), "ema": None}
    write_checkpoint(tmp_path / "old.pt", state)                      # before "model_config" was kept
    assert RNAN.from_checkpoint(tmp_path / "old.pt").mosaic is None
    write_checkpoint(tmp_path / "new.pt", {**state, "model_config": dict(net.config)})
    assert RNAN.from_checkpoint(tmp_path / "new.pt").mosaic == "grbg"
    with pytest.raises(CheckpointError, match="n_feats"):           # a stored config must fit the tensors
        write_checkpoint(tmp_path / "bad.pt", {**state, "model_config": {**net.config, "n_feats": 16}})
        RNAN.from_checkpoint(tmp_path / "bad.pt")


def test_zoo_cards_carry_the_mosaic_setting(tmp_path, monkeypatch):
    import json

    from rnan_fast import weights

    torch.manual_seed(0)
    net = RNAN(n_colors=3, n_feats=8, n_resgroups=2, mosaic="grbg")
    torch.save(net.state_dict(), tmp_path / "plain.pt")
    fields = dict(task="demosaic", noise={"type": "none"}, test_gain_db=0.0)
    monkeypatch.setenv(weights.ENV_FOLDER, str(tmp_path / "zoo"))
    weights.export(tmp_path / "plain.pt", "dm", target=tmp_path / "zoo", **fields)
    card = json.loads((tmp_path / "zoo" / "dm.json").read_text())
    assert "mosaic" not in card["architecture"]          # the official model: the card as before
    weights.write_weights(net, tmp_path / "filled.safetensors")
    weights.export(tmp_path / "filled.safetensors", "dm_fill", target=tmp_path / "zoo", **fields)
    card = json.loads((tmp_path / "zoo" / "dm_fill.json").read_text())
    assert card["architecture"]["mosaic"] == "grbg"
    assert weights.load("dm_fill").mosaic == "grbg" and weights.load("dm").mosaic is None
    # a card that says otherwise than its weights is refused
    card["architecture"].pop("mosaic")
    (tmp_path / "zoo" / "dm_fill.json").write_text(json.dumps(card))
    with pytest.raises(weights.WeightsError, match="mosaic"):
        weights.load("dm_fill")
