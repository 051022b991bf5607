"""Tiled inference, the official forward_chop and self-ensemble (rnan_fast.inference)."""
import numpy as np
import pytest
import torch
from torch import nn

from rnan_fast import RNAN
from rnan_fast.inference import (chop_min_size, forward_chop, forward_tiled, forward_x8, model_colors, model_scale,
                                 restore_image, restore_tensor, tile_count)


class LocalNet(nn.Module):
    """Three 3x3 convs (receptive radius 3), then an optional pixel shuffle: a purely local model."""

    def __init__(self, scale=1, colors=3, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.scale = scale
        self.body = nn.Sequential(nn.Conv2d(colors, 8, 3, padding=1), nn.ReLU(),
                                  nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                                  nn.Conv2d(8, colors * scale * scale, 3, padding=1))
        self.up = nn.PixelShuffle(scale)

    def forward(self, x):
        return self.up(self.body(x)).double()


class Counting(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner, self.calls, self.shapes = inner, 0, []

    @property
    def scale(self):
        return self.inner.scale

    def forward(self, x):
        self.calls += 1
        self.shapes.append(tuple(x.shape[-2:]))
        return self.inner(x)


def _x(h, w, c=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(1, c, h, w, generator=g) * 255


@pytest.mark.parametrize("scale", [1, 2, 3])
@pytest.mark.parametrize("size", [(37, 53), (16, 16), (64, 21)])
def test_tiled_equals_whole_for_local_model(scale, size):
    net = LocalNet(scale).double().eval()
    x = _x(*size).double()
    with torch.no_grad():
        whole = net(x)
        for tile, overlap in ((16, 6), (20, 8), (9, 6)):
            tiled = forward_tiled(net, x, tile, overlap, scale)
            assert tiled.shape == whole.shape
            torch.testing.assert_close(tiled, whole, rtol=1e-12, atol=1e-10, msg=str((tile, overlap)))


def test_tiled_identity_reconstructs_exactly_and_counts_tiles():
    ident = Counting(nn.Identity())
    ident.inner.scale = 1
    x = _x(50, 31)
    y = forward_tiled(ident, x, tile=16, overlap=4)
    assert torch.equal(y, x)
    assert ident.calls == 4 * 3 and set(ident.shapes) == {(16, 16)}
    ident.calls = 0
    assert torch.equal(forward_tiled(ident, x, tile=64, overlap=8), x) and ident.calls == 1  # one tile
    with pytest.raises(ValueError):
        forward_tiled(ident, x, tile=8, overlap=8)
    with pytest.raises(ValueError):
        forward_tiled(ident, x, tile=0, overlap=0)


def test_tiled_overlap_too_small_differs():
    net = LocalNet().double().eval()
    x = _x(40, 40).double()
    with torch.no_grad():
        assert (forward_tiled(net, x, 16, 2) - net(x)).abs().max() > 1e-3


@pytest.mark.parametrize("scale", [1, 2])
def test_batched_tiles_equal_one_by_one(scale):
    """tile_batch stacks tiles along the batch axis: the result equals one tile per call exactly
    (a non-local RNAN in float64, a 2-image batch, a last group smaller than tile_batch), and
    the progress callback still counts tiles."""
    torch.manual_seed(3)
    net = RNAN(n_colors=3, scale=scale, n_feats=8, n_resgroups=2).double().eval()
    g = torch.Generator().manual_seed(4)
    x = torch.rand(2, 3, 29, 37, generator=g, dtype=torch.float64) * 255
    with torch.no_grad():
        one = forward_tiled(net, x, 16, 6, scale)
        calls = Counting(net)
        for batch in (2, 4, 100):
            calls.calls = 0
            got = forward_tiled(calls, x, 16, 6, scale, tile_batch=batch)
            assert torch.equal(got, one), batch
            assert calls.calls == -(-12 // batch)    # 3 x 4 tiles
    seen = []
    out = restore_tensor(net, x, tile=16, overlap=6, tile_batch=4, progress=lambda d, t: seen.append((d, t)))
    assert tile_count(29, 37, 16, 6) == 12
    assert torch.equal(out, one) and seen == [(4, 12), (8, 12), (12, 12)]
    with pytest.raises(ValueError, match="tile_batch"):
        forward_tiled(net, x, 16, 6, scale, tile_batch=0)


def test_cpu_inference_in_channels_last_is_the_same():
    """restore_tensor feeds CPU inputs in channels-last layout (and the CLI stores the weights
    so): the values equal the contiguous run's in float64, for a non-contiguous input too."""
    torch.manual_seed(5)
    net = RNAN(n_colors=3, scale=1, n_feats=8, n_resgroups=2).double().eval()
    g = torch.Generator().manual_seed(6)
    x = (torch.rand(1, 3, 23, 40, generator=g, dtype=torch.float64) * 255)[..., ::2]   # a strided view
    with torch.no_grad():
        plain = net(x.contiguous())
        got = restore_tensor(net, x, device="cpu", dtype=torch.float64)
        torch.testing.assert_close(got, plain, rtol=0, atol=1e-9)
        net = net.to(memory_format=torch.channels_last)
        got = restore_tensor(net, x, device="cpu", dtype=torch.float64, tile=12, overlap=4, tile_batch=3)
        torch.testing.assert_close(got, forward_tiled(net, x.contiguous(), 12, 4), rtol=0, atol=1e-9)


# --------------------------------------------------------------------------- official chop

@pytest.mark.parametrize("scale", [1, 2])
def test_chop_small_input_is_one_split_of_four_quadrants(scale):
    """Below the threshold the official chop runs the model once per quadrant (no recursion)."""
    net = Counting(LocalNet(scale).double().eval())
    x = _x(30, 42).double()
    with torch.no_grad():
        y = forward_chop(net, x, scale)
        assert net.calls == 4
        # quadrant sides: 4 * floor((side // 2) / 4) + 12
        assert set(net.shapes) == {(4 * (15 // 4) + 12, 4 * (21 // 4) + 12)}
        # local model: the margin (>= 9 pixels) covers its receptive radius 3
        torch.testing.assert_close(y, net.inner(x), rtol=1e-12, atol=1e-10)


def test_chop_matches_manual_quadrant_assembly_for_a_global_model():
    """A model that is not local (adds its input's global mean): the output is assembled from the
    four quadrant outputs exactly as the official code pastes them."""

    class Global(nn.Module):
        scale = 1

        def forward(self, x):
            return x + x.mean(dim=(-1, -2), keepdim=True)

    x = _x(26, 34).double()
    y = forward_chop(Global(), x)
    hs, ws = 4 * (13 // 4) + 12, 4 * (17 // 4) + 12
    q = [x[..., :hs, :ws], x[..., :hs, -ws:], x[..., -hs:, :ws], x[..., -hs:, -ws:]]
    o = [Global()(v) for v in q]
    assert torch.equal(y[..., :13, :17], o[0][..., :13, :17])
    assert torch.equal(y[..., :13, 17:], o[1][..., :13, ws - 17:])
    assert torch.equal(y[..., 13:, :17], o[2][..., hs - 13:, :17])
    assert torch.equal(y[..., 13:, 17:], o[3][..., hs - 13:, ws - 17:])


def test_chop_recurses_on_large_inputs():
    net = Counting(LocalNet(1).double().eval())
    x = _x(256, 200).double()
    with torch.no_grad():
        y = forward_chop(net, x, 1)  # quadrant 140x112 >= 10,000 pixels: recurse once more
        assert net.calls == 16 and max(h * w for h, w in net.shapes) < 10000
        torch.testing.assert_close(y, net.inner(x), rtol=1e-12, atol=1e-10)
    net.calls = 0
    with torch.no_grad():
        forward_chop(net, x, 1, min_size=chop_min_size(2))  # SR threshold: quadrants of 15,680 run directly
    assert net.calls == 4 and chop_min_size(1) == 10000 and chop_min_size(4) == 30000


def test_chop_tiny_images_keep_their_size():
    net = LocalNet(1).double().eval()
    for h, w in ((5, 7), (1, 1), (23, 24)):
        x = _x(h, w).double()
        with torch.no_grad():
            torch.testing.assert_close(forward_chop(net, x), net(x), rtol=1e-12, atol=1e-10)


# --------------------------------------------------------------------------- self-ensemble

def test_self_ensemble_is_mean_of_transforms():
    class PositionDependent(nn.Module):  # deliberately not flip-equivariant
        scale = 2

        def forward(self, x):
            h, w = x.shape[-2:]
            ramp = torch.arange(h * w, dtype=x.dtype).reshape(h, w)
            y = x * 1.5 + ramp
            return torch.nn.functional.interpolate(y, scale_factor=2, mode="nearest")

    m = PositionDependent()
    x = _x(5, 7).double()
    got = forward_x8(m, x)
    a = x.numpy()
    outs = []
    for t in (False, True):
        for fh in (False, True):
            for fw in (False, True):
                v = a
                if fw:
                    v = v[..., ::-1]
                if fh:
                    v = v[..., ::-1, :]
                if t:
                    v = v.swapaxes(-1, -2)
                o = m(torch.from_numpy(v.copy())).numpy()
                if t:
                    o = o.swapaxes(-1, -2)
                if fh:
                    o = o[..., ::-1, :]
                if fw:
                    o = o[..., ::-1]
                outs.append(o)
    np.testing.assert_allclose(got.numpy(), np.mean(outs, axis=0), rtol=0, atol=1e-12)
    assert got.shape == (1, 3, 10, 14)
    ident = nn.Identity()
    assert torch.allclose(forward_x8(ident, x), x, rtol=0, atol=1e-12)


def test_restore_tensor_options_and_model_helpers():
    net = LocalNet(2).double().eval()
    x = _x(20, 18).double()
    whole = restore_tensor(net, x)
    assert whole.shape == (1, 3, 40, 36)
    torch.testing.assert_close(restore_tensor(net, x, tile=12, overlap=8), whole, rtol=1e-12, atol=1e-10)
    torch.testing.assert_close(restore_tensor(net, x, chop=True), whole, rtol=1e-12, atol=1e-10)
    ens = restore_tensor(net, x, tile=12, overlap=8, self_ensemble=True)
    assert torch.allclose(ens, restore_tensor(net, x, self_ensemble=True), atol=1e-9)
    with pytest.raises(ValueError, match="not both"):
        restore_tensor(net, x, tile=8, chop=True)
    assert model_scale(net) == 2 and model_colors(net) is None

    class Cfg(nn.Module):
        config = {"scale": [3], "n_colors": 1}

    assert model_scale(Cfg()) == 3 and model_colors(Cfg()) == 1


def test_restore_image_rounds_and_clamps():
    class Affine(nn.Module):
        scale = 1

        def forward(self, x):
            return x * 2 - 100.25

    img = np.array([[0, 50, 100, 200], [10, 60, 178, 255]], dtype=np.uint8)
    out = restore_image(Affine(), img)
    expected = np.clip(np.floor(img.astype(float) * 2 - 100.25 + 0.5), 0, 255)
    assert out.dtype == np.uint8 and np.array_equal(out, expected)
    rgb = np.stack([img, img, img], 2)
    assert restore_image(Affine(), rgb).shape == (2, 4, 3)


def test_restore_image_uses_the_package_rounding():
    """restore_image rounds with imresize.to_uint8 (half away from zero, clamped), the rule of
    the rest of the package, on random outputs with exact halves among them."""
    from rnan_fast.imresize import to_uint8

    rng = np.random.default_rng()
    target = rng.uniform(-30, 290, (3, 7, 9))
    target[:, 0, :] = np.floor(target[:, 0, :]) + 0.5  # exact halves: half-to-even would differ

    class Fixed(nn.Module):
        scale = 1

        def forward(self, x):
            return torch.from_numpy(target)[None].to(x.dtype) + 0 * x

    img = rng.integers(1, 256, (7, 9, 3), dtype=np.uint8)
    out = restore_image(Fixed(), img, dtype=torch.float64)
    assert out.dtype == np.uint8 and np.array_equal(out, to_uint8(target.transpose(1, 2, 0)))


def test_rnan_whole_tiled_chop_ensemble_run():
    """The real model through every path on a small input (shapes, finiteness, determinism)."""
    torch.manual_seed(0)
    net = RNAN(n_colors=3, scale=2, n_feats=8, n_resgroups=2).eval()
    assert model_scale(net) == 2 and model_colors(net) == 3
    x = _x(18, 22)
    whole = restore_tensor(net, x)
    assert whole.shape == (1, 3, 36, 44) and torch.isfinite(whole).all()
    assert torch.equal(restore_tensor(net, x), whole)
    tiled = restore_tensor(net, x, tile=16, overlap=6)
    assert tiled.shape == whole.shape and torch.isfinite(tiled).all()
    # the chop of an input below the threshold = the four quadrant outputs pasted together
    x = _x(26, 30)
    chop = restore_tensor(net, x, chop=True)
    hs, ws = 4 * (13 // 4) + 12, 4 * (15 // 4) + 12
    with torch.no_grad():
        q0 = net(x[..., :hs, :ws])
        q3 = net(x[..., -hs:, -ws:])
    assert chop.shape == (1, 3, 52, 60)
    assert torch.allclose(chop[..., :26, :30], q0[..., :26, :30], atol=1e-4)
    assert torch.allclose(chop[..., 26:, 30:], q3[..., 2 * hs - 26:, 2 * ws - 30:], atol=1e-4)
    ens = restore_tensor(net, x, self_ensemble=True)
    assert ens.shape == chop.shape and torch.isfinite(ens).all()


def test_restore_image_rejects_non_finite_output():
    class Overflow(nn.Module):
        scale = 1

        def forward(self, x):
            return x * float("inf") - x * float("inf")

    with pytest.raises(FloatingPointError, match="non-finite"):
        restore_image(Overflow(), np.ones((4, 4), np.uint8))


class PhaseChecker(torch.nn.Module):
    """Returns its input; records whether every call saw a 2x2 pattern in phase (the input
    codes each pixel's phase as 2 * (row % 2) + (col % 2) + 1, 0 being padding)."""

    def __init__(self):
        super().__init__()
        self.scale, self.calls, self.off_phase = 1, 0, 0

    def forward(self, v):
        self.calls += 1
        phase = v[0, 0]
        want = torch.tensor([[1.0, 2.0], [3.0, 4.0]]).repeat((phase.shape[0] + 1) // 2, (phase.shape[1] + 1) // 2)
        want = want[: phase.shape[0], : phase.shape[1]]
        self.off_phase += int(((phase != want) & (phase != 0)).any())
        return v.clone()


@pytest.mark.parametrize("kwargs", [dict(), dict(tile=8, overlap=2), dict(tile=6, overlap=4), dict(chop=True)])
def test_period_keeps_every_call_on_the_pattern(kwargs):
    """A Bayer mosaic's period 2: odd-sized images are zero-padded, tiles and chop quadrants start
    on the pattern; the output is the input's size. Without it, tiles of an odd-sized image
    start off the pattern (what the check detects)."""
    h, w = 21, 31
    i, j = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    x = (2 * (i % 2) + (j % 2) + 1).float()[None, None].repeat(1, 3, 1, 1)
    net = PhaseChecker()
    out = restore_tensor(net, x, period=2, **kwargs)
    assert out.shape == x.shape and torch.equal(out, x) and net.off_phase == 0 and net.calls >= 1
    if kwargs.get("tile"):
        net = PhaseChecker()
        restore_tensor(net, x, **kwargs)
        assert net.off_phase > 0
    with pytest.raises(ValueError, match="pattern"):
        restore_tensor(PhaseChecker(), x, period=2, self_ensemble=True)
    with pytest.raises(ValueError, match="multiples of 2"):
        restore_tensor(PhaseChecker(), x, period=2, tile=9, overlap=2)


# --------------------------------------------------------------------------- pixel-shuffle downsampling

def _sub_images_by_slicing(x: np.ndarray, k: int) -> list:
    """The reference: x (B, C, H, W) padded at the bottom/right by repeating edges (numpy),
    then sliced [i::k, j::k] in (i, j) order."""
    h, w = x.shape[-2:]
    xp = np.pad(x, ((0, 0), (0, 0), (0, (-h) % k), (0, (-w) % k)), mode="edge")
    return [xp[:, :, i::k, j::k] for i in range(k) for j in range(k)]


@pytest.mark.parametrize("k", [2, 3])
@pytest.mark.parametrize("size", [(20, 30), (21, 31), (1, 5)])
def test_shuffle_down_is_strided_slicing_and_shuffle_up_inverts_it(k, size):
    from rnan_fast.inference import shuffle_down, shuffle_up

    g = torch.Generator().manual_seed(k * 100 + size[0])
    base = torch.rand(2, 3, size[0], size[1] + 3, generator=g, dtype=torch.float64)
    x = base[..., 3:]   # a non-contiguous view
    subs = shuffle_down(x, k)
    ref = _sub_images_by_slicing(x.numpy(), k)
    hs, ws = -(-size[0] // k), -(-size[1] // k)
    assert subs.shape == (2 * k * k, 3, hs, ws)
    for b in range(2):
        for n, r in enumerate(ref):
            np.testing.assert_array_equal(subs[b * k * k + n].numpy(), r[b])
    back = shuffle_up(subs, k)[..., : size[0], : size[1]]
    assert torch.equal(back, x)


@pytest.mark.parametrize("kwargs", [dict(), dict(tile=8, overlap=6), dict(self_ensemble=True)])
@pytest.mark.parametrize("size", [(24, 18), (23, 17)])
def test_pixel_shuffle_restores_each_sub_image_alone(kwargs, size):
    """restore_tensor(pixel_shuffle=2) = the model on each stride-2 sub-image of the edge-padded
    image, interleaved back and cropped (float64; tiles with overlap 6 are exact for LocalNet's
    radius 3)."""
    net = LocalNet(1).double().eval()
    x = _x(*size).double()
    ref_subs = _sub_images_by_slicing(x.numpy(), 2)
    with torch.no_grad():
        outs = [(forward_x8(net, torch.from_numpy(r)) if kwargs.get("self_ensemble") else net(torch.from_numpy(r)))
                for r in ref_subs]
    h2, w2 = ref_subs[0].shape[-2:]
    want = torch.full((1, 3, 2 * h2, 2 * w2), float("nan"), dtype=torch.float64)
    for n, o in enumerate(outs):
        want[:, :, n // 2::2, n % 2::2] = o
    calls = []
    got = restore_tensor(net, x, pixel_shuffle=2, progress=lambda d, t: calls.append((d, t)), **kwargs)
    assert got.shape == x.shape
    torch.testing.assert_close(got, want[..., : size[0], : size[1]], rtol=1e-12, atol=1e-10)
    assert calls and calls[-1][0] == calls[-1][1]


def test_pixel_shuffle_of_identity_is_identity_and_refusals():
    class Identity(nn.Module):
        scale = 1

        def forward(self, v):
            return v.clone()

    x = _x(13, 22)
    for k in (1, 2, 3, 4):
        assert torch.equal(restore_tensor(Identity(), x, pixel_shuffle=k), x)
    with pytest.raises(ValueError, match="scale 2"):
        restore_tensor(LocalNet(2).eval(), x, pixel_shuffle=2)
    with pytest.raises(ValueError, match="Bayer"):
        restore_tensor(Identity(), x, pixel_shuffle=2, period=2)
    with pytest.raises(ValueError, match=">= 1"):
        restore_tensor(Identity(), x, pixel_shuffle=0)
