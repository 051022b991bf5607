"""The fused gate h = x + sigmoid(mask_logits) * trunk: eager vs torch.compile vs the extension.

    pytest benchmarks/bench_gated_residual.py --benchmark-columns=median,iqr,rounds

Providers:
  eager      the official formula in PyTorch (3 kernels forward; autograd backward);
  compiled   torch.compile (inductor) of the same formula, forward and autograd backward;
  extension  rnan_fast.ops.gated_residual(backend="extension"): one fused kernel each way.
Passes: "fwd" (no grad) and "fwd+bwd" (x, mask_logits and trunk require grad; the gradients
of all three by torch.autograd.grad with a random output gradient, so no .grad accumulation).

Timing on CUDA: one round = `inner` back-to-back calls then torch.cuda.synchronize() (inside the
timed function), `inner` chosen so a round lasts >= ~2 ms and launch latency is amortised; the
table's times are per round, and benchmark.extra_info["per_call_s"] = median / inner.
extra_info also holds
  bytes      the minimum traffic: 4 tensors forward (read x, m, t; write h), 9 for fwd+bwd
             (+ read grad, m, t; write grad_m, grad_t; grad_x is the incoming gradient itself);
  GBps       bytes / per_call_s;
  copy_GBps  a device-to-device copy that moves the same number of bytes (read + write), timed
             the same way in the same run (same L2 behaviour; measured once per byte count, so the
             providers of a case share it), and pct_of_copy = GBps / copy_GBps;
  dram_copy_GBps / pct_of_dram_copy: the same against a 2 GiB copy (DRAM bandwidth).
Note (16, 64, 48, 48) in fp32 is 9.4 MB a tensor: the working set partly fits the H100's 50 MB
L2, so its GB/s can exceed DRAM bandwidth; (1, 64, 512, 768) is DRAM-bound.

Without CUDA every GPU case skips with the reason, and a small CPU case (reference vs extension
at (2, 64, 48, 48) fp32) runs so that `pytest benchmarks/` does something.
"""
from __future__ import annotations

import functools

import pytest
import torch

import rnan_fast
from rnan_fast import _ext, inference, reference

SHAPES = [(16, 64, 48, 48), (16, 64, 96, 96), (1, 64, 512, 768)]
DTYPES = {name: inference.DTYPES[name] for name in ("fp32", "bf16")}
PASSES = ("fwd", "fwd+bwd")
CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="GPU benchmark: no CUDA device on this machine")
needs_ext = pytest.mark.skipif(not _ext.EXTENSION, reason=f"extension not built: {_ext.EXTENSION_ERROR}")


def _extension(x, m, t):
    return rnan_fast.ops.gated_residual(x, m, t, backend="extension")


PROVIDERS = ("eager", "compiled", "extension")


def _inputs(shape, dtype, device, requires_grad, seed=0):
    gen = torch.Generator(device=device).manual_seed(seed)
    # Random data, never zeros (timing must not profit from special values).
    ts = [torch.randn(shape, generator=gen, device=device, dtype=torch.float32).mul_(2).to(dtype) for _ in range(4)]
    x, m, t, g = ts
    return [a.requires_grad_(requires_grad) for a in (x, m, t)], g


def _round_fn(fn, inner):
    def timed():
        for _ in range(inner):
            fn()
        torch.cuda.synchronize()
    return timed


def _event_s_per_call(fn, inner):
    """Seconds per call of `inner` back-to-back calls of fn, measured with CUDA events."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(inner):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3 / inner


def _pick_inner(fn, target_s=2e-3):
    """Calls per round so that one round lasts >= target_s (measured with CUDA events)."""
    fn()
    torch.cuda.synchronize()
    per_call = max(_event_s_per_call(fn, 5), 1e-7)
    return max(1, min(1000, int(target_s / per_call) + 1))


@functools.lru_cache(maxsize=None)
def _copy_GBps(nbytes: int, rounds: int = 15) -> float:
    """Bandwidth of a device-to-device copy that moves nbytes in all (nbytes / 2 read + written).
    Measured once per nbytes in a run (cached): every provider of a case compares with the same copy."""
    n = max(1, nbytes // 2 // 4)
    src = torch.randn(n, device="cuda")
    dst = torch.empty_like(src)
    fn = lambda: dst.copy_(src)  # noqa: E731
    inner = _pick_inner(fn)
    times = sorted(_event_s_per_call(fn, inner) for _ in range(rounds))
    return 2 * n * 4 / times[len(times) // 2] / 1e9


@pytest.fixture(scope="module")
def dram_copy_GBps():
    return _copy_GBps(2 * 2**30)


@needs_cuda
@needs_ext
@pytest.mark.parametrize("passes", PASSES)
@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("shape", SHAPES, ids=["x".join(map(str, s)) for s in SHAPES])
@pytest.mark.parametrize("provider", list(PROVIDERS))
def test_gated_residual(benchmark, dram_copy_GBps, provider, shape, dtype_name, passes):
    if not _ext.EXTENSION_CUDA:
        pytest.skip("the extension was built without its CUDA kernels")
    dtype = DTYPES[dtype_name]
    backward = passes == "fwd+bwd"
    (x, m, t), g = _inputs(shape, dtype, "cuda", backward)
    if provider == "compiled":
        torch._dynamo.reset()  # a fresh cache per case: no recompile limit, no dynamic-shape fallback
        fn = torch.compile(reference.gated_residual, dynamic=False)
    elif provider == "eager":
        fn = reference.gated_residual
    else:
        fn = _extension

    def run():
        if backward:  # autograd.grad: no accumulation into .grad (that would add a copy of g for x)
            torch.autograd.grad(fn(x, m, t), (x, m, t), g)
        else:
            with torch.no_grad():
                fn(x, m, t)

    # Correctness first (and compilation): the fused result against eager in float32.
    with torch.no_grad():
        expected = reference.gated_residual(x.float(), m.float(), t.float())
        got = fn(x, m, t).float()
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got, expected, rtol=tol, atol=tol * 4)
    run()
    torch.cuda.synchronize()

    inner = _pick_inner(run)
    benchmark.pedantic(_round_fn(run, inner), rounds=15, iterations=1, warmup_rounds=2)
    per_call = benchmark.stats.stats.median / inner
    nbytes = (9 if backward else 4) * x.numel() * dtype.itemsize
    gbps = nbytes / per_call / 1e9
    copy = _copy_GBps(nbytes)
    info = rnan_fast.backend_info()
    benchmark.extra_info.update({
        "provider": provider, "shape": list(shape), "dtype": dtype_name, "passes": passes,
        "inner": inner, "per_call_s": per_call, "bytes": nbytes, "GBps": gbps,
        "copy_GBps": copy, "pct_of_copy": 100 * gbps / copy,
        "dram_copy_GBps": dram_copy_GBps, "pct_of_dram_copy": 100 * gbps / dram_copy_GBps,
        "device": info["device"], "torch": info["torch"],
    })


@needs_ext
@pytest.mark.parametrize("passes", PASSES)
@pytest.mark.parametrize("provider", ["reference", "extension"])
def test_gated_residual_cpu(benchmark, provider, passes):
    """The case that runs without a GPU: (2, 64, 48, 48) fp32 on the CPU, reference vs extension."""
    shape = (2, 64, 48, 48)
    backward = passes == "fwd+bwd"
    (x, m, t), g = _inputs(shape, torch.float32, "cpu", backward)

    def run():
        if backward:
            torch.autograd.grad(rnan_fast.ops.gated_residual(x, m, t, backend=provider), (x, m, t), g)
        else:
            with torch.no_grad():
                return rnan_fast.ops.gated_residual(x, m, t, backend=provider)

    with torch.no_grad():
        torch.testing.assert_close(rnan_fast.ops.gated_residual(x, m, t, backend=provider),
                                   reference.gated_residual(x, m, t), rtol=1e-5, atol=1e-5)
    benchmark.pedantic(run, rounds=20, iterations=1, warmup_rounds=2)
    nbytes = (9 if backward else 4) * x.numel() * 4
    benchmark.extra_info.update({
        "provider": provider, "shape": list(shape), "dtype": "fp32", "passes": passes, "bytes": nbytes,
        "GBps": nbytes / benchmark.stats.stats.median / 1e9, "device": "cpu",
        "threads": torch.get_num_threads(),
    })
