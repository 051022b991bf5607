"""Weights as safetensors: written by rnan_fast.weights (write_weights, export, `rnan-fast export
--safetensors`), read by RNAN.from_checkpoint, the zoo and `restore --weights`; strict loads and
one-line errors for damaged files."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from rnan_fast import RNAN, cli, weights
from rnan_fast import data as D
from rnan_fast.inference import restore_image
from rnan_fast.model import CONFIG_METADATA, CheckpointError, is_safetensors, read_checkpoint, safetensors_bytes

pytestmark = pytest.mark.usefixtures("one_thread")


def _random_net(seed=0, **cfg):
    torch.manual_seed(seed)
    net = RNAN(**{"n_colors": 3, "n_feats": 4, "n_resgroups": 2, **cfg})
    with torch.no_grad():
        for p in net.parameters():  # small, non-zero: every branch changes the output
            p.copy_(torch.randn_like(p) * 1e-2)
    return net.eval()


@pytest.mark.parametrize("cfg", [
    dict(n_colors=1),
    dict(scale=2, rgb_range=1),               # rgb_range the SR mean shift also tells
    dict(rgb_range=1, softmax_over="key"),    # what only the metadata tells (shapes do not)
])
def test_round_trip(tmp_path, cfg):
    net = _random_net(**cfg)
    path = weights.write_weights(net, tmp_path / "w.safetensors")
    raw = load_file(path)
    sd = net.state_dict()
    assert set(raw) == set(sd) and len(raw) == len(sd)
    for k, v in sd.items():
        assert raw[k].dtype == v.dtype and raw[k].shape == v.shape and torch.equal(raw[k], v), k
    back = RNAN.from_checkpoint(path)
    assert back.config == net.config
    for k, v in back.state_dict().items():
        assert torch.equal(v, sd[k]), k
    x = torch.rand(1, net.n_colors, 9, 11) * net.rgb_range
    with torch.no_grad():
        assert torch.equal(back(x), net(x))
    # the same file through the path every reader shares (train --init uses it)
    state, source = read_checkpoint(path)
    assert source == str(path) and state.keys() == sd.keys()
    # an explicit setting still wins over the metadata
    assert RNAN.from_checkpoint(path, softmax_over="query").config["softmax_over"] == "query"


def test_bf16_storage_and_same_bytes(tmp_path):
    net = _random_net(1)
    a = weights.write_weights(net, tmp_path / "a.safetensors", torch.bfloat16)
    b = weights.write_weights(net, tmp_path / "b.safetensors", torch.bfloat16)
    assert a.read_bytes() == b.read_bytes()   # same weights, same bytes: a card's SHA-256 is reproducible
    assert all(v.dtype == torch.bfloat16 for v in load_file(a).values())
    back = RNAN.from_checkpoint(a)
    for k, v in net.state_dict().items():
        assert back.state_dict()[k].dtype == torch.float32
        assert torch.equal(back.state_dict()[k], v.to(torch.bfloat16).float()), k


def test_strict_load_names_every_difference(tmp_path):
    net = _random_net()
    sd = net.state_dict()
    broken = {k: v for k, v in sd.items() if k != "tail.0.bias"}
    broken["extra.weight"] = torch.zeros(2)
    broken["head.0.bias"] = torch.zeros(5)
    path = tmp_path / "broken.safetensors"
    path.write_bytes(safetensors_bytes(broken, net.config))
    with pytest.raises(CheckpointError) as info:
        RNAN.from_checkpoint(path)
    assert str(path) in str(info.value)
    assert info.value.missing == ["tail.0.bias"] and info.value.unexpected == ["extra.weight"]
    assert info.value.misshaped == [("head.0.bias", (5,), (4,))]
    # a setting given by the caller that the tensors do not fit
    good = weights.write_weights(net, tmp_path / "good.safetensors")
    with pytest.raises(CheckpointError, match="n_feats=4"):
        RNAN.from_checkpoint(good, n_feats=8)
    # metadata that contradicts the tensors
    path = tmp_path / "lying.safetensors"
    path.write_bytes(safetensors_bytes(sd, {**net.config, "n_feats": 16}))
    with pytest.raises(CheckpointError, match="n_feats: metadata 16, tensors 4"):
        RNAN.from_checkpoint(path)


def test_foreign_safetensors_file_without_metadata(tmp_path):
    """A safetensors file from elsewhere (no config in it), under any name: configuration from
    the shapes, as for a .pt."""
    net = _random_net(2, n_colors=1, n_resgroups=3)
    path = tmp_path / "weights.bin"
    save_file(net.state_dict(), path)
    assert is_safetensors(path)
    back = RNAN.from_checkpoint(path)
    assert back.config == {**net.config, "softmax_over": "query", "rgb_range": 255}
    torch.save(net.state_dict(), tmp_path / "w.pt")
    assert not is_safetensors(tmp_path / "w.pt")


def test_damaged_files_give_one_line(tmp_path):
    net = _random_net()
    good = weights.write_weights(net, tmp_path / "good.safetensors").read_bytes()
    header = int.from_bytes(good[:8], "little")
    cases = {
        "truncated.safetensors": good[:-100],
        "header.safetensors": good[:8] + b"[" + good[9:],          # the JSON header broken
        "garbage.safetensors": bytes(range(256)) * 4,
        "short.safetensors": good[:5],
        "badjson.safetensors": good[:8 + header - 2] + b"!}" + good[8 + header:],
    }
    for name, blob in cases.items():
        path = tmp_path / name
        path.write_bytes(blob)
        with pytest.raises(CheckpointError) as info:
            RNAN.from_checkpoint(path)
        message = str(info.value)
        assert "\n" not in message and message.startswith(f"{path}: not a safetensors file"), (name, message)


def test_zoo_reads_a_legacy_pt_folder(tmp_path, monkeypatch):
    """A weights folder made before safetensors (NAME.pt beside its card) still loads, hash-checked."""
    net = _random_net(3)
    root = tmp_path / "zoo"
    weights.export(net.state_dict(), "legacy", root, task="denoise_rgb", noise={"type": "gaussian", "sigma": 30},
                   test_gain_db=-1.0)
    (root / "legacy.safetensors").unlink()
    torch.save(net.state_dict(), root / "legacy.pt")
    card = json.loads((root / "legacy.json").read_text())
    card["sha256"], card["size"] = weights.sha256_of(root / "legacy.pt"), (root / "legacy.pt").stat().st_size
    (root / "legacy.json").write_text(json.dumps(card))
    monkeypatch.setenv(weights.ENV_FOLDER, str(root))
    assert weights.weights_path("legacy") == root / "legacy.pt" == weights.verify("legacy")
    loaded = RNAN.pretrained("legacy")
    for k, v in net.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k


def test_cli_export_and_restore(tmp_path, capsys):
    net = _random_net(4)
    torch.save({"state_dict": net.state_dict()}, tmp_path / "w.pt")
    out = tmp_path / "w.safetensors"
    code = cli.main(["export", "--weights", str(tmp_path / "w.pt"), "--safetensors", str(out)])
    stdout, err = capsys.readouterr()
    assert code == 0, err
    assert f"wrote {out}" in stdout and weights.sha256_of(out) in stdout
    back = RNAN.from_checkpoint(out)
    for k, v in net.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k
    # an existing output is refused unless --overwrite
    code = cli.main(["export", "--weights", str(tmp_path / "w.pt"), "--safetensors", str(out)])
    assert code == 2 and "--overwrite" in capsys.readouterr().err
    # restore reads it like a .pt
    img = np.random.default_rng(0).integers(0, 256, (14, 18, 3), dtype=np.uint8)
    Image.fromarray(img).save(tmp_path / "a.png")
    code = cli.main(["restore", "--weights", str(out), "-o", str(tmp_path / "o"), "--quiet", str(tmp_path / "a.png")])
    assert code == 0, capsys.readouterr().err
    assert np.array_equal(D.read_image(tmp_path / "o" / "a.png"), restore_image(back, img))
    with safe_open(out, framework="pt") as f:
        assert json.loads(f.metadata()[CONFIG_METADATA]) == net.config


def test_the_model_module_does_not_import_the_zoo():
    """No import cycle: the model module reaches the zoo only inside RNAN.pretrained, and the zoo
    imports the model (and torch) only in the functions that build models, so that reading cards
    (`rnan-fast models`, the CLI's help) does not import torch."""
    code = ("import sys, rnan_fast.model; assert 'rnan_fast.weights' not in sys.modules; "
            "import rnan_fast.weights.zoo; print('ok')")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr
    code = ("import sys, rnan_fast.weights as w; w.available(); w.card(w.DEFAULT_MODEL); "
            "print('torch' in sys.modules, 'rnan_fast.model' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "False False", proc.stderr
