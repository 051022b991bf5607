"""ONNX export (rnan_fast.onnx_export, `rnan-fast export --onnx`): standard operators only,
dynamic sizes, checked with ONNX Runtime against PyTorch. Needs the onnx extra (scripts/setup.sh
installs it); skipped with the reason where it is missing."""
import pytest
import torch

from rnan_fast import RNAN, cli

for _module in ("onnx", "onnxscript", "onnxruntime"):
    pytest.importorskip(_module, reason=f"{_module} is not installed (the onnx extra: pip install \"rnan_fast[onnx]\")")

import onnx  # noqa: E402  (after the skips)

from rnan_fast import onnx_export  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def _random_net(seed=0, **cfg):
    torch.manual_seed(seed)
    net = RNAN(**{"n_colors": 3, "n_feats": 8, "n_resgroups": 2, **cfg})
    with torch.no_grad():
        for name, p in net.named_parameters():  # non-zero, so attention and gate shape the output
            if not name.startswith(("sub_mean", "add_mean")):   # the SR mean shifts stay as built
                p.copy_(torch.randn_like(p) * 0.05)
    return net.eval()


def _input_dims(path):
    dims = onnx.load(str(path)).graph.input[0].type.tensor_type.shape.dim
    return [d.dim_value if d.HasField("dim_value") else d.dim_param for d in dims]


@pytest.mark.parametrize("cfg, sizes", [
    (dict(), [(37, 29), (8, 50)]),        # sizes other than the traced 24x20, odd ones included
    (dict(scale=2), [(13, 10)]),
    (dict(softmax_over="key"), [(11, 15)]),
])
def test_dynamic_export_runs_other_sizes(tmp_path, cfg, sizes):
    net = _random_net(**cfg)
    path = onnx_export.export_onnx(net, tmp_path / "m.onnx")
    assert onnx_export.nonstandard_ops(path) == []
    dims = _input_dims(path)
    assert dims[1] == 3 and all(isinstance(d, str) for d in (dims[0], dims[2], dims[3])), dims
    for size in sizes:
        r = onnx_export.check_onnx(path, net, size, batch=2)
        assert r["ok"] and r["max_abs"] <= r["tolerance"] == pytest.approx(255 * onnx_export.TOLERANCE), r
    # the check fails for a model that differs by 4x the tolerance (its output bias shifted)
    other = RNAN(**net.config)
    other.load_state_dict(net.state_dict())
    with torch.no_grad():
        other.tail[-1].bias += 4 * r["tolerance"]
    r = onnx_export.check_onnx(path, other, sizes[0])
    assert not r["ok"] and r["max_abs"] > 3 * r["tolerance"], r


def test_nonstandard_ops_are_found(tmp_path):
    h = onnx.helper
    node = h.make_node("nonlocal_attention", ["x"], ["y"], domain="rnan_fast")
    graph = h.make_graph([node], "g", [h.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
                         [h.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])])
    onnx.save(h.make_model(graph), str(tmp_path / "custom.onnx"))
    assert onnx_export.nonstandard_ops(tmp_path / "custom.onnx") == ["rnan_fast::nonlocal_attention"]


def test_cli_exports_a_shipped_model_at_a_tile(tmp_path, capsys, monkeypatch):
    from rnan_fast import weights

    monkeypatch.delenv(weights.ENV_FOLDER, raising=False)
    out = tmp_path / "dn.onnx"
    code = cli.main(["export", "--model", "rnan_dn_rgb", "--onnx", str(out), "--tile", "24"])
    stdout, err = capsys.readouterr()
    assert code == 0, err
    assert "standard ONNX operators only" in stdout and "1x3x24x24 input" in stdout and ": ok" in stdout, stdout
    assert onnx_export.nonstandard_ops(out) == []
    assert _input_dims(out)[1:] == [3, 24, 24]
    code = cli.main(["export", "--model", "rnan_dn_rgb", "--onnx", str(out), "--tile", "2"])
    assert code == 2 and "--tile must be at least 3" in capsys.readouterr().err
