"""Whole-model numerics on a GPU: the fast path (backend "auto": Triton attention, CUDA gate,
channels_last) against the reference backend, on real images from the shared data.

Target (issue "whole-model speed"): PSNR(fast output, reference-backend output) >= 70 dB in fp32
and >= 50 dB in bf16 (against the fp32 reference), peak 255 (the models' 0..255 scale), outputs
unclamped; TF32 off. A second bf16 check applies the kernels' 2x rule: the fast bf16 model's error
is at most 2x that of the same model on the reference ops in bf16. On the CPU, bf16 convolutions
alone put these random-weight models at ~36-48 dB from fp32 (bf16 has 8 mantissa bits and the
0..255 scale; measured with the reference ops), so the 50 dB target may not hold for them.
Models: the tiny official-format fixture (n_feats 16, non-zero non-local W) and a full-size
RNAN (n_feats 64, n_resgroups 10) with seeded random weights, its non-local W made non-zero
(the official zero init would hide the attention from the output).
Skipped without CUDA.
"""
import copy

import numpy as np
import pytest
import torch

import rnan_fast
from rnan_fast.data import add_gaussian_noise, list_images, read_image, to_rgb
from rnan_fast.metrics import psnr

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU numerics: needs a CUDA device")

DEV = "cuda"
MIN_PSNR = {"fp32": 70.0, "bf16": 50.0}
IMAGES = [("Kodak24", 2), ("CBSD68", 2)]  # folder, how many (Kodak 768x512; CBSD68 481x321: odd sizes)


@pytest.fixture(scope="module")
def noisy_images(data_dir):
    """(name, (1, 3, H, W) float32 CUDA tensor): sigma-30 Gaussian noise on the 0..255 scale."""
    out = []
    for folder, count in IMAGES:
        for i, path in enumerate(list_images(data_dir / folder)[:count]):
            img = to_rgb(read_image(path))
            noisy = add_gaussian_noise(img, 30, seed=i)
            x = torch.from_numpy(noisy.transpose(2, 0, 1).copy()).float()[None].to(DEV)
            out.append((f"{folder}/{path.name}", x))
    return out


def _full_size():
    torch.manual_seed(0)
    net = rnan_fast.RNAN(n_colors=3, scale=1, n_feats=64, n_resgroups=10)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if ".W." in name:
                p.normal_(0, 0.02)
    return net


MODELS = {
    "fixture_tiny": lambda fixtures_dir: rnan_fast.RNAN.from_checkpoint(fixtures_dir / "official_dn_rgb_tiny.pt"),
    "full_size_random": lambda fixtures_dir: _full_size(),
}


@pytest.fixture(scope="module", params=list(MODELS))
def outputs(request, noisy_images, fixtures_dir):
    """(model name, [(image name, {"ref32", "ref16", "fast32", "fast16"} outputs as float32 numpy
    arrays, (1, 3, H, W), for rnan_fast.metrics.psnr at peak 255)]).

    ref*: backend "reference", NCHW; fast*: backend "auto", channels_last; *16: bf16 weights and
    input. TF32 is off for all of them, so fp32 differences are the kernels' alone."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        ref32 = MODELS[request.param](fixtures_dir).to(DEV).eval()
        ref16 = copy.deepcopy(ref32).to(torch.bfloat16)
        fast32 = copy.deepcopy(ref32).to(memory_format=torch.channels_last)
        fast16 = copy.deepcopy(fast32).to(torch.bfloat16)
        rows = []
        for name, x in noisy_images:
            x_cl = x.contiguous(memory_format=torch.channels_last)
            with torch.inference_mode():
                with rnan_fast.use_backend("reference"):
                    out = {"ref32": ref32(x), "ref16": ref16(x.to(torch.bfloat16))}
                with rnan_fast.use_backend("auto"):
                    out.update(fast32=fast32(x_cl), fast16=fast16(x_cl.to(torch.bfloat16)))
            out = {k: v.float() for k, v in out.items()}
            for k, v in out.items():
                assert v.shape == x.shape and torch.isfinite(v).all(), f"{request.param} {name} {k}"
            rows.append((name, {k: v.cpu().numpy() for k, v in out.items()}))
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
    return request.param, rows


def _report(model_name, rows, pairs):
    lines = [f"{model_name} {name}: " + ", ".join(f"{a} vs {b} {psnr(out[b], out[a]):.1f} dB" for a, b in pairs)
             for name, out in rows]
    text = "\n".join(lines)
    print(text)
    return text


def test_fp32_fast_matches_reference(outputs):
    model_name, rows = outputs
    report = _report(model_name, rows, [("fast32", "ref32")])
    for name, out in rows:
        assert psnr(out["ref32"], out["fast32"]) >= MIN_PSNR["fp32"], f"fp32 below {MIN_PSNR['fp32']} dB:\n{report}"


def test_bf16_fast_meets_psnr_target(outputs):
    """The issue's target: bf16 fast output within 50 dB of the fp32 reference output."""
    model_name, rows = outputs
    report = _report(model_name, rows, [("fast16", "ref32"), ("ref16", "ref32"), ("fast16", "ref16")])
    for name, out in rows:
        assert psnr(out["ref32"], out["fast16"]) >= MIN_PSNR["bf16"], f"bf16 below {MIN_PSNR['bf16']} dB:\n{report}"


def test_bf16_fast_error_within_2x_of_pytorch_bf16(outputs):
    """The kernels' rule (DESIGN.md): in bf16, the fast model's error against the fp32 reference
    is at most 2x (RMS; 6.02 dB) that of the same model on the reference ops in bf16."""
    model_name, rows = outputs
    report = _report(model_name, rows, [("fast16", "ref32"), ("ref16", "ref32")])
    for name, out in rows:
        fast, torch_bf16 = psnr(out["ref32"], out["fast16"]), psnr(out["ref32"], out["ref16"])
        assert fast >= torch_bf16 - 20 * np.log10(2), f"{name}: {fast:.1f} dB vs PyTorch bf16 {torch_bf16:.1f} dB\n{report}"
