"""rnan_fast.RNAN against the official model: golden outputs, state-dict layout, odd sizes,
gradients and torch.compile. CPU only, small networks."""
import argparse

import pytest
import torch

import rnan_fast
from rnan_fast import RNAN, modules


pytestmark = pytest.mark.usefixtures("one_thread")

def _randomize(net, seed, std=0.2):
    """Random weights everywhere (the non-local W too, which starts at zero), reproducibly."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64) * std)
    return net


# ---------------------------------------------------------------------- golden outputs

def test_golden_fixtures(official_tiny):
    rnan_fast.set_backend("reference")
    for path, data in official_tiny:
        net = RNAN(**data["config"]).double()
        net.load_state_dict(data["state_dict"], strict=True)
        net.eval()
        assert data["cases"], path
        for tag, case in data["cases"].items():
            assert case["input"].dtype == torch.float64
            with torch.no_grad():
                out = net(case["input"])
            ref = case["output"]
            assert out.shape == ref.shape, (path.name, tag)
            err = ((out - ref).abs().max() / ref.abs().max()).item()
            assert err < 1e-9, f"{path.name} [{tag}]: relative max error {err:.3e}"


# ---------------------------------------------------------------------- state-dict layout

def test_manifest_has_all_configurations(official_manifest):
    assert len(official_manifest) == 7


@pytest.mark.parametrize("name", ["dn_rgb", "dn_gray", "car", "demosaic", "sr2", "sr3", "sr4"])
def test_state_dict_matches_official_manifest(official_manifest, name):
    entry = official_manifest[name]
    with torch.device("meta"):
        net = RNAN(n_colors=entry["n_colors"], scale=entry["scale"], n_feats=entry["n_feats"],
                   n_resgroups=entry["n_resgroups"])
    got = [[k, list(v.shape)] for k, v in net.state_dict().items()]
    assert got == [[k, list(s)] for k, s in entry["state_dict"]]  # names, shapes and order
    assert sum(p.numel() for p in net.parameters()) == entry["params"]


@pytest.mark.parametrize("name", ["dn_gray", "sr3"])
def test_namespace_form_matches_manifest(official_manifest, name):
    entry = official_manifest[name]
    # The official option set (SR/code/option.py style): scale is a list, extra fields ignored.
    args = argparse.Namespace(n_resgroups=entry["n_resgroups"], n_resblocks=16, n_feats=entry["n_feats"],
                              reduction=16, scale=[entry["scale"]], rgb_range=255, n_colors=entry["n_colors"],
                              res_scale=1, model="RNAN", precision="single")
    with torch.device("meta"):
        net = RNAN(args)
        sd = RNAN(**{k: entry[k] for k in ("n_colors", "scale", "n_feats", "n_resgroups")}).state_dict()
    assert [(k, tuple(v.shape)) for k, v in net.state_dict().items()] == [(k, tuple(v.shape)) for k, v in sd.items()]
    assert net.config["scale"] == entry["scale"] and net.softmax_over == "query"


# ---------------------------------------------------------------------- construction

def test_namespace_tolerates_missing_fields_and_reads_softmax_over():
    net = RNAN(argparse.Namespace(n_resgroups=2, n_feats=4, n_colors=1, scale=[1], softmax_over="key"))
    assert net.config == {"n_colors": 1, "scale": 1, "n_feats": 4, "n_resgroups": 2, "rgb_range": 255,
                          "softmax_over": "key", "mosaic": None}
    blocks = [m for m in net.modules() if isinstance(m, modules.NonLocalBlock2D)]
    assert len(blocks) == 2 and all(b.softmax_over == "key" for b in blocks)
    # Keywords override the namespace; int scale and mappings work too.
    net = RNAN(argparse.Namespace(n_resgroups=2, n_feats=4, scale=2), n_feats=6)
    assert (net.n_feats, net.scale, net.n_colors, net.task) == (6, 2, 3, "sr")
    assert RNAN({"n_resgroups": 3, "n_feats": 4, "scale": [3, 4]}).scale == 3


def test_defaults_are_the_official_configuration():
    with torch.device("meta"):
        net = RNAN()
    assert net.config == {"n_colors": 3, "scale": 1, "n_feats": 64, "n_resgroups": 10, "rgb_range": 255,
                          "softmax_over": "query", "mosaic": None}
    assert len(net.body) == 9  # 8 local groups and a conv


@pytest.mark.parametrize("kwargs, match", [
    (dict(n_resgroups=1), "n_resgroups"),
    (dict(n_resgroups=2.0), "n_resgroups"),
    (dict(scale=5), "scale"),
    (dict(scale=0), "scale"),
    (dict(scale=6), "scale"),
    (dict(n_feats=7), "even"),
    (dict(n_feats=0), "n_feats"),
    (dict(n_colors=0), "n_colors"),
    (dict(softmax_over="row"), "softmax_over"),
    (dict(scale=2, n_colors=1), "n_colors=3"),
    (dict(rgb_range=-1), "rgb_range"),
])
def test_invalid_configurations(kwargs, match):
    with pytest.raises(ValueError, match=match):
        with torch.device("meta"):
            RNAN(**{"n_feats": 4, "n_resgroups": 2, **kwargs})


def test_power_of_two_scales_and_x3_build():
    with torch.device("meta"):
        for scale, stages in ((2, 1), (4, 2), (8, 3)):
            tail = RNAN(scale=scale, n_feats=4, n_resgroups=2).tail
            convs = [m for m in tail[0] if isinstance(m, torch.nn.Conv2d)]
            assert len(convs) == stages and all(c.out_channels == 16 for c in convs)
        assert RNAN(scale=3, n_feats=4, n_resgroups=2).tail[0][0].out_channels == 36


def test_nonlocal_w_starts_at_zero_and_mask_has_no_sigmoid():
    net = RNAN(n_colors=1, n_feats=4, n_resgroups=3)
    blocks = [m for m in net.modules() if isinstance(m, modules.NonLocalBlock2D)]
    assert len(blocks) == 2
    for b in blocks:
        assert not b.W.weight.any() and not b.W.bias.any()
    assert not any(isinstance(m, torch.nn.Sigmoid) for m in net.modules())


def test_wrong_input_channels():
    net = RNAN(n_colors=1, n_feats=4, n_resgroups=2)
    with pytest.raises(ValueError, match=r"\(B, 1, H, W\)"):
        net(torch.rand(1, 3, 8, 8))


# ---------------------------------------------------------------------- the hot spots go through the ops

def test_forward_calls_the_registered_ops(monkeypatch):
    calls = {"nonlocal_attention": 0, "gated_residual": 0}
    real_nl, real_gr = rnan_fast.ops.nonlocal_attention, rnan_fast.ops.gated_residual

    def nl(theta, phi, g, softmax_over="query", backend=None):
        calls["nonlocal_attention"] += 1
        assert theta.shape == phi.shape == g.shape == (2, 5 * 7, 4)
        assert softmax_over == "query"
        return real_nl(theta, phi, g, softmax_over=softmax_over, backend=backend)

    def gr(x, mask_logits, trunk, backend=None):
        calls["gated_residual"] += 1
        return real_gr(x=x, mask_logits=mask_logits, trunk=trunk, backend=backend)

    monkeypatch.setattr(rnan_fast.ops, "nonlocal_attention", nl)
    monkeypatch.setattr(rnan_fast.ops, "gated_residual", gr)
    net = RNAN(n_colors=3, n_feats=8, n_resgroups=4)
    net(torch.rand(2, 3, 5, 7, generator=torch.Generator().manual_seed(0)))
    assert calls == {"nonlocal_attention": 2, "gated_residual": 4}


def test_matches_official_formulas_with_key_softmax(official_ops):
    """softmax_over="key" also matches the naive formula (ordinary attention)."""
    rnan_fast.set_backend("reference")
    net = _randomize(RNAN(n_colors=3, scale=2, n_feats=4, n_resgroups=2, softmax_over="key").double(), 1, 0.1)
    x = torch.rand(1, 3, 7, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    with torch.no_grad():
        out = net(x)
        official_ops()
        ref = net(x)
    assert out.shape == (1, 3, 14, 12)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)


# ---------------------------------------------------------------------- any H x W

@pytest.mark.parametrize("scale", [1, 2, 3])
@pytest.mark.parametrize("hw", [(1, 1), (5, 7), (9, 6), (13, 17), (2, 3)])
def test_odd_sizes(scale, hw):
    rnan_fast.set_backend("reference")
    net = _randomize(RNAN(n_colors=3, scale=scale, n_feats=4, n_resgroups=2), seed=2, std=0.1).float()
    x = torch.rand(2, 3, *hw, generator=torch.Generator().manual_seed(3)) * 255
    with torch.no_grad():
        out = net(x)
    assert out.shape == (2, 3, hw[0] * scale, hw[1] * scale)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("scale", [1, 4])
def test_even_sizes_are_uncropped(monkeypatch, scale):
    """On even sizes the crop is the whole map: bit-identical to the official (uncropped) add."""
    rnan_fast.set_backend("reference")
    net = _randomize(RNAN(n_colors=3, scale=scale, n_feats=4, n_resgroups=3), seed=4, std=0.1).float()
    x = torch.rand(1, 3, 8, 10, generator=torch.Generator().manual_seed(5)) * 255
    with torch.no_grad():
        out = net(x)
        monkeypatch.setattr(modules, "crop_to", lambda t, ref: t)
        uncropped = net(x)
    assert torch.equal(out, uncropped)
    # ... while the official add fails on odd sizes, which the crop fixes.
    with pytest.raises(RuntimeError):
        with torch.no_grad():
            net(torch.rand(1, 3, 7, 10))


# ---------------------------------------------------------------------- gradients

def test_gradcheck_tiny_model():
    rnan_fast.set_backend("reference")
    net = _randomize(RNAN(n_colors=1, scale=1, n_feats=4, n_resgroups=2).double(), seed=6, std=0.25)
    x = torch.rand(1, 1, 6, 6, generator=torch.Generator().manual_seed(7), dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(net, (x,), eps=1e-6, atol=1e-7, rtol=1e-5)
    assert torch.autograd.gradcheck(net, (x[..., :5, :5].detach().requires_grad_(True),), eps=1e-6, atol=1e-7,
                                    rtol=1e-5)  # odd: through the crop


@pytest.mark.parametrize("scale, hw", [(1, (6, 6)), (2, (5, 7))])
def test_parameter_grads_match_official_formulas(official_ops, scale, hw):
    rnan_fast.set_backend("reference")
    net = _randomize(RNAN(n_colors=3, scale=scale, n_feats=8, n_resgroups=3).double(), seed=8, std=0.1)
    x = torch.rand(2, 3, *hw, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    w = torch.randn(2, 3, hw[0] * scale, hw[1] * scale, generator=torch.Generator().manual_seed(10),
                    dtype=torch.float64)

    def grads():
        net.zero_grad()
        xi = x.clone().requires_grad_(True)
        (net(xi) * w).sum().backward()
        return [xi.grad] + [p.grad.clone() for p in net.parameters()]

    ours = grads()
    official_ops()
    ref = grads()
    names = ["input"] + [n for n, _ in net.named_parameters()]
    for name, a, b in zip(names, ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12, msg=lambda m: f"{name}: {m}")


# ---------------------------------------------------------------------- torch.compile

def test_torch_compile_fullgraph_no_graph_breaks():
    import torch._dynamo
    from torch._dynamo.utils import counters

    rnan_fast.set_backend("reference")
    net = _randomize(RNAN(n_colors=3, scale=2, n_feats=4, n_resgroups=2), seed=11, std=0.1).float()
    x = torch.rand(1, 3, 8, 6, generator=torch.Generator().manual_seed(12))

    def step(model):
        model.zero_grad()
        xi = x.clone().requires_grad_(True)
        out = model(xi)
        (out * out).mean().backward()
        return out.detach(), xi.grad, [p.grad.clone() for p in model.parameters()]

    eager = step(net)
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(net, fullgraph=True, backend="aot_eager")
    got = step(compiled)
    assert not counters["graph_break"], dict(counters["graph_break"])
    torch.testing.assert_close(got[0], eager[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[1], eager[1], rtol=1e-4, atol=1e-6)
    for a, b in zip(got[2], eager[2]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    torch._dynamo.reset()


# ---------------------------------------------------------------------- the model on every backend

@pytest.mark.parametrize("backend", ["auto", "fast"])
def test_backends_agree_with_reference(backend):
    """The whole model on the fast kernels (the C++ gate; Triton attention through its interpreter
    on a CPU-only machine) against the reference ops: outputs and all gradients, float32."""
    net = _randomize(RNAN(n_colors=3, scale=2, n_feats=32, n_resgroups=2), seed=13, std=0.03).float()
    x = torch.rand(2, 3, 7, 6, generator=torch.Generator().manual_seed(14)) * 255

    def run(name):
        net.zero_grad()
        with rnan_fast.use_backend(name):
            out = net(x)
            out.square().mean().backward()
        return out.detach(), [p.grad.clone() for p in net.parameters()]

    ref_out, ref_grads = run("reference")
    try:
        out, grads = run(backend)
    except RuntimeError as e:
        if "asked for, but" in str(e):
            pytest.skip(f"backend {backend!r} unavailable here: {e}")
        raise
    torch.testing.assert_close(out, ref_out, rtol=1e-4, atol=1e-4 * ref_out.abs().max().item())
    scale = max(g.abs().max().item() for g in ref_grads)
    for (name, _), a, b in zip(net.named_parameters(), grads, ref_grads):
        # theta's bias has a zero gradient under the query softmax (a shift of theta_i moves
        # row i of the scores by a per-column constant), so compare on the overall scale.
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5 * scale, msg=lambda m: f"{name}: {m}")
