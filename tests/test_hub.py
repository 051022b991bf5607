"""hubconf.py through torch.hub from the local checkout (source="local": no network)."""
import importlib.util
from pathlib import Path

import pytest
import torch

from rnan_fast import RNAN, weights

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = str(Path(__file__).resolve().parents[1])


def _load(**kwargs):
    return torch.hub.load(REPO, "rnan", source="local", **kwargs)


def test_entry_points_and_docs():
    """What torch.hub.list and .help show (they take GitHub repositories only): the public
    callables of hubconf.py, each with a docstring."""
    spec = importlib.util.spec_from_file_location("hubconf_under_test", Path(REPO) / "hubconf.py")
    hubconf = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hubconf)
    entries = [name for name in dir(hubconf) if callable(getattr(hubconf, name)) and not name.startswith("_")]
    assert entries == ["rnan"]
    doc = hubconf.rnan.__doc__
    assert "pretrained" in doc and "weights" in doc and "(B, n_colors, H, W)" in doc
    assert all(importlib.util.find_spec(name) for name in hubconf.dependencies)


def test_config_keywords_build_an_untrained_model():
    net = _load(n_colors=1, n_feats=8, n_resgroups=3, softmax_over="key")
    assert isinstance(net, RNAN)
    assert net.config == {"n_colors": 1, "scale": 1, "n_feats": 8, "n_resgroups": 3, "rgb_range": 255,
                          "softmax_over": "key", "mosaic": None}


def test_pretrained_is_the_shipped_model(monkeypatch):
    monkeypatch.delenv(weights.ENV_FOLDER, raising=False)
    net = _load(pretrained="rnan_dn_rgb")
    want = RNAN.pretrained("rnan_dn_rgb")
    assert not net.training and net.config == want.config
    for k, v in want.state_dict().items():
        assert torch.equal(net.state_dict()[k], v), k
    assert _load(pretrained="rnan_dn_gray", n_colors=1).n_colors == 1   # keywords that fit are accepted
    with pytest.raises(ValueError, match="n_feats=64 \\(the model has 32\\)"):
        _load(pretrained="rnan_dn_rgb", n_feats=64)
    with pytest.raises(weights.WeightsError, match="no model named 'nope'"):
        _load(pretrained="nope")


def test_weights_file(tmp_path):
    torch.manual_seed(0)
    net = RNAN(n_colors=3, scale=2, n_feats=4, n_resgroups=2, rgb_range=1)
    path = weights.write_weights(net, tmp_path / "sr.safetensors")
    loaded = _load(weights=str(path))
    assert not loaded.training and loaded.config == net.config
    x = torch.rand(1, 3, 7, 9)
    with torch.no_grad():
        assert torch.equal(loaded(x), net.eval()(x))
    with pytest.raises(ValueError, match="not both"):
        _load(weights=str(path), pretrained="rnan_dn_rgb")
