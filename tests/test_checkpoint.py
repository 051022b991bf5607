"""RNAN.from_checkpoint / load_checkpoint: configuration inference, wrappers, and clear errors."""
import argparse
import collections
import os

import pytest
import torch

import rnan_fast
from rnan_fast import RNAN
from rnan_fast.model import CheckpointError, adapt_colors, infer_config


pytestmark = pytest.mark.usefixtures("one_thread")

def _tiny(**kw):
    cfg = {"n_colors": 1, "scale": 1, "n_feats": 4, "n_resgroups": 2, **kw}
    torch.manual_seed(0)
    return RNAN(**cfg)


def _random_state_dict(net, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=gen) for k, v in net.state_dict().items()}


def _assert_loaded(net, sd):
    own = net.state_dict()
    assert own.keys() == sd.keys()
    for k, v in sd.items():
        assert torch.equal(own[k], v.to(own[k].dtype)), k


# ---------------------------------------------------------------------- inference of the configuration

def test_fixture_configurations_are_inferred(official_tiny):
    for path, data in official_tiny:
        net = RNAN.from_checkpoint(data["state_dict"])
        expected = {k: data["config"][k] for k in ("n_colors", "scale", "n_feats", "n_resgroups", "rgb_range")}
        assert {k: net.config[k] for k in expected} == expected, path.name
        assert net.config["softmax_over"] == "query"
        _assert_loaded(net, data["state_dict"])
        # The fixture file itself: its weights sit under "state_dict" beside other entries.
        from_file = RNAN.from_checkpoint(path)
        assert from_file.config == net.config
        _assert_loaded(from_file, data["state_dict"])


@pytest.mark.parametrize("cfg", [
    dict(n_colors=3, scale=1, n_feats=4, n_resgroups=2),
    dict(n_colors=1, scale=1, n_feats=6, n_resgroups=5),
    dict(n_colors=3, scale=2, n_feats=4, n_resgroups=3),
    dict(n_colors=3, scale=3, n_feats=4, n_resgroups=2),
    dict(n_colors=3, scale=4, n_feats=8, n_resgroups=4),
    dict(n_colors=3, scale=8, n_feats=4, n_resgroups=2),
    dict(n_colors=3, scale=2, n_feats=4, n_resgroups=2, rgb_range=1),
])
def test_round_trip_through_a_file(tmp_path, cfg):
    net = RNAN(**cfg)
    sd = _random_state_dict(net)
    if net.task == "sr":  # keep the mean shifts meaningful: rgb_range is read off sub_mean.bias
        sd["sub_mean.bias"] = net.state_dict()["sub_mean.bias"].clone()
    path = tmp_path / "w.pt"
    torch.save(sd, path)
    loaded = RNAN.from_checkpoint(path, softmax_over="key")
    expected = {"rgb_range": 255, **cfg, "softmax_over": "key", "mosaic": None}
    assert loaded.config == expected
    _assert_loaded(loaded, sd)
    loaded_str = RNAN.from_checkpoint(str(path))
    assert loaded_str.config["softmax_over"] == "query"


def test_the_manifest_configurations_are_inferred(official_manifest):
    for name, entry in official_manifest.items():
        sd = {k: torch.empty(s, device="meta") for k, s in entry["state_dict"]}
        cfg = infer_config(sd, name)
        assert [cfg[k] for k in ("n_colors", "scale", "n_feats", "n_resgroups")] == \
            [entry[k] for k in ("n_colors", "scale", "n_feats", "n_resgroups")], name


def test_model_is_usable_after_loading(tmp_path):
    rnan_fast.set_backend("reference")
    net = _tiny(n_colors=3, scale=2)
    path = tmp_path / "sr.pt"
    torch.save(net.state_dict(), path)
    loaded = RNAN.from_checkpoint(path, map_location="cpu")
    x = torch.rand(1, 3, 5, 6, generator=torch.Generator().manual_seed(1)) * 255
    with torch.no_grad():
        assert torch.equal(loaded(x), net(x))
    assert next(loaded.parameters()).device.type == "cpu"


# ---------------------------------------------------------------------- wrappers and prefixes

@pytest.mark.parametrize("wrap", ["state_dict", "model", "params"])
def test_wrapped_state_dicts(tmp_path, wrap):
    net = _tiny()
    sd = _random_state_dict(net, 1)
    path = tmp_path / "wrapped.pt"
    # Tensors beside the wrapped state dict (a best-PSNR record) must not stop the unwrapping.
    torch.save({wrap: sd, "epoch": 7, "best_psnr": torch.tensor(30.1), "optimizer": {"lr": 1e-4}}, path)
    _assert_loaded(RNAN.from_checkpoint(path), sd)
    _assert_loaded(RNAN.from_checkpoint({wrap: sd}), sd)


def test_dataparallel_prefix_and_nested_wrapper(tmp_path):
    net = _tiny(n_colors=3, scale=2)
    sd = _random_state_dict(net, 2)
    sd["sub_mean.bias"] = net.state_dict()["sub_mean.bias"].clone()
    wrapped = {"model": {"state_dict": collections.OrderedDict(("module." + k, v) for k, v in sd.items())}}
    path = tmp_path / "dp.pt"
    torch.save(wrapped, path)
    loaded = RNAN.from_checkpoint(path)
    assert loaded.config["scale"] == 2
    _assert_loaded(loaded, sd)


def test_load_checkpoint_into_an_existing_model(tmp_path):
    net = _tiny()
    sd = _random_state_dict(net, 3)
    path = tmp_path / "w.pt"
    torch.save({"params": sd}, path)
    assert net.load_checkpoint(path) is net
    _assert_loaded(net, sd)


def test_plain_load_state_dict_is_pytorch_strict():
    net = _tiny()
    sd = _random_state_dict(net)
    sd["extra.weight"] = torch.zeros(1)
    with pytest.raises(RuntimeError, match="extra.weight"):
        net.load_state_dict(sd)


# ---------------------------------------------------------------------- mismatches

def test_other_configuration_lists_misshaped_keys(tmp_path):
    sd = RNAN(n_colors=1, n_feats=8, n_resgroups=2).state_dict()
    path = tmp_path / "feats8.pt"
    torch.save(sd, path)
    with pytest.raises(CheckpointError) as info:
        RNAN.from_checkpoint(path, n_feats=4)
    msg = str(info.value)
    assert str(path) in msg and "mis-shaped" in msg
    assert "head.0.weight: checkpoint (8, 1, 3, 3), model (4, 1, 3, 3)" in msg
    assert "n_feats=8" in msg  # what the weights look like
    assert isinstance(info.value, ValueError)
    # The same through an existing model; the error holds the complete lists.
    with pytest.raises(CheckpointError, match="feats8.pt") as info:
        _tiny().load_checkpoint(path)
    assert len(info.value.misshaped) == len(sd) - 1 and not info.value.missing and not info.value.unexpected
    assert ("tail.0.weight", (1, 8, 3, 3), (1, 4, 3, 3)) in info.value.misshaped
    assert "more (the error's .misshaped attribute" in str(info.value)


def test_sr_checkpoint_into_a_denoiser_reports_every_kind():
    sd = RNAN(n_colors=3, scale=2, n_feats=4, n_resgroups=2).state_dict()
    with pytest.raises(CheckpointError) as info:
        RNAN(n_colors=3, scale=4, n_feats=4, n_resgroups=2).load_checkpoint(sd)
    msg = str(info.value)
    assert "missing keys" in msg and "tail.0.2.weight" in msg


def test_unexpected_keys():
    sd = dict(_tiny().state_dict())
    sd["body.0.extra.weight"] = torch.zeros(3)
    sd["head.1.bias"] = torch.zeros(4)
    with pytest.raises(CheckpointError) as info:
        RNAN.from_checkpoint(sd)
    msg = str(info.value)
    assert "2 unexpected keys" in msg and "body.0.extra.weight" in msg and "head.1.bias" in msg
    assert "missing" not in msg and "mis-shaped" not in msg


def test_missing_keys(tmp_path):
    sd = dict(_tiny().state_dict())
    del sd["body_nl_high.0.body.0.RA_MB.0.MB_RB1.0.W.weight"]
    del sd["tail.0.bias"]
    path = tmp_path / "missing.pt"
    torch.save(sd, path)
    with pytest.raises(CheckpointError) as info:
        RNAN.from_checkpoint(path)
    msg = str(info.value)
    assert str(path) in msg and "2 missing keys" in msg
    assert "body_nl_high.0.body.0.RA_MB.0.MB_RB1.0.W.weight" in msg and "tail.0.bias" in msg


def test_not_an_rnan_state_dict():
    with pytest.raises(CheckpointError, match="head.0.weight"):
        RNAN.from_checkpoint({"conv1.weight": torch.zeros(4, 3, 3, 3)})
    with pytest.raises(CheckpointError, match="no tensors"):
        RNAN.from_checkpoint({"epoch": 3, "note": "hello"})
    sd = dict(_tiny().state_dict())
    sd["tail.0.0.weight"] = torch.zeros(5, 4, 3, 3)  # an upsampler of no known scale
    del sd["tail.0.weight"]
    with pytest.raises(CheckpointError, match="upsampler"):
        RNAN.from_checkpoint(sd)
    with pytest.raises(TypeError):
        RNAN.from_checkpoint(12)


# ---------------------------------------------------------------------- unreadable files

def test_truncated_file(tmp_path):
    path = tmp_path / "trunc.pt"
    torch.save(_tiny().state_dict(), path)
    data = path.read_bytes()
    for cut in (len(data) // 2, 100, 10):
        path.write_bytes(data[:cut])
        with pytest.raises(CheckpointError, match="trunc.pt"):
            RNAN.from_checkpoint(path)


def test_truncated_legacy_file(tmp_path):
    path = tmp_path / "legacy.pt"
    torch.save(_tiny().state_dict(), path, _use_new_zipfile_serialization=False)
    _assert_loaded(RNAN.from_checkpoint(path), _tiny().state_dict())
    path.write_bytes(path.read_bytes()[:3000])
    with pytest.raises(CheckpointError, match="legacy.pt"):
        RNAN.from_checkpoint(path)


def test_empty_file(tmp_path):
    path = tmp_path / "empty.pt"
    path.write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty.pt.*empty"):
        RNAN.from_checkpoint(path)


@pytest.mark.parametrize("seed", range(4))
def test_random_bytes(tmp_path, seed):
    path = tmp_path / f"random{seed}.bin"
    path.write_bytes(os.urandom(16) + torch.randint(0, 256, (2000,), generator=torch.Generator().manual_seed(seed),
                                                     dtype=torch.uint8).numpy().tobytes())
    with pytest.raises(CheckpointError, match=f"random{seed}.bin"):
        RNAN.from_checkpoint(path)


def test_text_file(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("these are not weights\n")
    with pytest.raises(CheckpointError, match="notes.txt"):
        RNAN.from_checkpoint(str(path))


def test_checkpoint_of_something_else(tmp_path):
    path = tmp_path / "list.pt"
    torch.save([torch.zeros(2), torch.ones(3)], path)
    with pytest.raises(CheckpointError, match="list.pt.*mapping"):
        RNAN.from_checkpoint(path)


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.pt"):
        RNAN.from_checkpoint(tmp_path / "nothing.pt")
    with pytest.raises(IsADirectoryError):
        RNAN.from_checkpoint(tmp_path)


def test_pickled_objects_need_weights_only_false(tmp_path):
    sd = _tiny().state_dict()
    path = tmp_path / "with_args.pt"
    torch.save({"args": argparse.Namespace(n_feats=4), "state_dict": sd}, path)
    with pytest.raises(CheckpointError, match="with_args.pt.*weights_only=False"):
        RNAN.from_checkpoint(path)
    _assert_loaded(RNAN.from_checkpoint(path, weights_only=False), sd)


def test_adapt_colors_gray_from_color_and_back():
    """A gray net adapted from a color one is the color net on the gray image replicated to 3
    channels, averaged over them; a color net adapted from a gray one adds the gray net's
    correction of the channel mean to every channel (float64, random weights, odd sizes)."""
    color = _tiny(n_colors=3, n_feats=6).double()
    color.load_state_dict({k: v.double() * 0.3 for k, v in _random_state_dict(color, 4).items()})
    gray = _tiny(n_colors=1, n_feats=6).double()
    gray.load_state_dict(adapt_colors(color.state_dict(), 1))  # strict: every key, every shape
    x = torch.rand(2, 1, 13, 11, dtype=torch.float64)
    with torch.no_grad():
        want = color(x.expand(-1, 3, -1, -1)).mean(1, keepdim=True)
        assert float((gray(x) - x).abs().max()) > 0.1  # the net changes its input: the test can fail
        torch.testing.assert_close(gray(x), want, rtol=1e-10, atol=1e-10)
        back = _tiny(n_colors=3, n_feats=6).double()
        back.load_state_dict(adapt_colors(gray.state_dict(), 3))
        y = torch.rand(2, 3, 9, 14, dtype=torch.float64)
        m = y.mean(1, keepdim=True)
        torch.testing.assert_close(back(y), y + (gray(m) - m), rtol=1e-10, atol=1e-10)
    sd = color.state_dict()
    assert all(torch.equal(sd[k], v) for k, v in adapt_colors(sd, 1).items() if not k.startswith(("head", "tail")))
    with pytest.raises(CheckpointError, match="not 3 -> 3"):
        adapt_colors(sd, 3)
    with pytest.raises(CheckpointError, match="scale 2"):
        adapt_colors(_tiny(n_colors=3, scale=2).state_dict(), 1)
