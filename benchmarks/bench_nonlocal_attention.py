"""Non-local attention (official column softmax): naive vs composites vs ours, on the GPU and on the CPU.

    pytest benchmarks/bench_nonlocal_attention.py --benchmark-columns=median,min,rounds
    pytest benchmarks/bench_nonlocal_attention.py -k cpu       # the CPU cases only

GPU providers (d = 32):
  naive      the official formula (N x N scores and probabilities, autograd), eager PyTorch;
  sdpa2      two calls of PyTorch's memory-efficient attention kernel with its log-sum-exp output
             (aten._scaled_dot_product_efficient_attention, scale=1): call 1 with queries and keys
             swapped gives LSE_j per key; call 2 attends with the bias -LSE_j and rescales by
             exp(its own LSE_i) = sum_j P_ij. Forward only: that kernel has no gradient for its LSE
             output, so a fwd+bwd through it would be wrong;
  ours       rnan_fast.ops.nonlocal_attention(backend="triton").
benchmark.extra_info: scores_per_s = B N^2 / median time; exp_floor_fraction = (exps / 4.1e12 per s)
/ median time with exps = 2 B N^2 for the forward (the two exp passes of the column softmax) and
5 B N^2 for forward + backward (what our kernels evaluate: 2 forward + 3 backward); peak_mem_mib =
peak CUDA memory of one call above what was allocated before it. Naive is skipped where its
estimated memory (scores + probabilities, x2 with the backward) exceeds 85% of free memory.
On a machine without CUDA every GPU case skips with the reason.

CPU providers (`test_cpu_*`):
  naive      the official formula, eager PyTorch (N x N matrix);
  reference  rnan_fast.ops.nonlocal_attention(backend="reference"), the blocked PyTorch reference;
  ours       backend="extension", the C++ kernel (csrc/nonlocal_attention.cpp);
  sdpa_row   torch.nn.functional.scaled_dot_product_attention(scale=1.0): PyTorch's CPU flash
             attention with the ordinary *row* softmax, one pass. Not the same function: it is the
             speed yardstick (one pass, 2d FMAs and one exp per score; ours does two passes with 3d
             FMAs and two exps), as the targets are set against it.
extra_info: ns_per_score = median / (B N^2) (the cost model for CPU tiling decisions), and in the
`ratio` cases ours / sdpa_row timed alternately in one test, against the target; in the `isa`
cases the kernel's path for this CPU (AVX-512 or AVX2) / its portable MKL-tile path, alternately.
"""

import statistics
import time

import pytest
import torch

import rnan_fast
from rnan_fast import _ext, inference, reference

EXP_RATE = 4.1e12          # MUFU ex2 per second, H100 (DESIGN.md section 5)
D = 32
SHAPES = [(16, 48 * 48), (16, 96 * 96), (1, 100 * 100), (1, 200 * 200), (1, 256 * 384), (1, 512 * 768)]
DTYPES = {name: inference.DTYPES[name] for name in ("fp32", "bf16")}
CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="GPU benchmark: no CUDA device on this machine")


def _inputs(B, N, dtype, device, requires_grad):
    gen = torch.Generator(device=device).manual_seed(0)
    # Random, never zeros; unit-variance features give O(sqrt(d)) scores (timing does not depend on it).
    th, ph, g = (torch.randn(B, N, D, generator=gen, device=device, dtype=torch.float32).to(dtype) for _ in range(3))
    return [t.requires_grad_(requires_grad) for t in (th, ph, g)]


def _naive(th, ph, g):
    return reference.nonlocal_attention_naive(th, ph, g, "query")


def _sdpa2(th, ph, g, eff=None):
    eff = eff or torch.ops.aten._scaled_dot_product_efficient_attention
    q, k, v = (t.unsqueeze(1) for t in (th, ph, g))                    # (B, 1, N, D)
    B, _, N, _ = q.shape
    _, lse_key, _, _ = eff(k, q, k, None, True, 0.0, False, scale=1.0)  # softmax over queries, per key
    bias = (-lse_key[..., :N]).to(q.dtype).unsqueeze(2).expand(B, 1, N, N)
    out, lse_row, _, _ = eff(q, k, v, bias, True, 0.0, False, scale=1.0)
    return (out.float() * lse_row[..., :N, None].exp()).to(g.dtype).squeeze(1)


def _ours(th, ph, g):
    return rnan_fast.ops.nonlocal_attention(th, ph, g, softmax_over="query", backend="triton")


PROVIDERS = {"naive": _naive, "sdpa2": _sdpa2, "ours": _ours}


def _call(fn, th, ph, g, backward, dout):
    """One timed call of provider fn: forward and backward(dout) with the gradients cleared, or
    the forward alone under inference_mode (what inference runs under)."""
    def run():
        if backward:
            for t in (th, ph, g):
                t.grad = None
            fn(th, ph, g).backward(dout)
        else:
            with torch.inference_mode():
                fn(th, ph, g)
    return run


def _naive_bytes(B, N, dtype, backward):
    per = B * N * N * dtype.itemsize
    return per * (4 if backward else 2)


@needs_cuda
@pytest.mark.parametrize("passes", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("B,N", SHAPES, ids=[f"B{b}-N{n}" for b, n in SHAPES])
@pytest.mark.parametrize("provider", list(PROVIDERS))
def test_nonlocal_attention(benchmark, provider, B, N, dtype_name, passes):
    dtype = DTYPES[dtype_name]
    backward = passes == "fwd+bwd"
    if provider == "ours" and not _ext.triton_available():
        pytest.skip(f"Triton unavailable: {_ext.triton_error()}")
    if provider == "sdpa2" and backward:
        pytest.skip("sdpa2 is forward only: the efficient-attention kernel has no gradient for its LSE output")
    free, _ = torch.cuda.mem_get_info()
    if provider == "naive" and _naive_bytes(B, N, dtype, backward) > 0.85 * free:
        pytest.skip(f"naive would need ~{_naive_bytes(B, N, dtype, backward) / 2**30:.0f} GiB "
                    f"(free {free / 2**30:.0f} GiB): out of memory")
    th, ph, g = _inputs(B, N, dtype, "cuda", backward)
    dout = torch.randn(B, N, D, device="cuda", dtype=dtype)
    run = _call(PROVIDERS[provider], th, ph, g, backward, dout)

    try:
        run()                                   # compile, autotune, and check it runs at all
    except Exception as e:                      # e.g. a backend without this shape: report, do not fail
        pytest.skip(f"{provider} failed on this case: {type(e).__name__}: {str(e)[:200]}")
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    run()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base

    def timed():
        run()
        torch.cuda.synchronize()

    n2 = B * N * N
    est = 2 * n2 / EXP_RATE * (2.5 if backward else 1)
    rounds = max(3, min(50, int(1.0 / max(est, 1e-4))))
    benchmark.pedantic(timed, rounds=rounds, iterations=1, warmup_rounds=2)
    t = benchmark.stats.stats.median
    exps = (5 if backward else 2) * n2
    info = rnan_fast.backend_info()
    benchmark.extra_info.update({
        "provider": provider, "B": B, "N": N, "d": D, "dtype": dtype_name, "passes": passes,
        "scores_per_s": n2 / t, "exp_floor_s": exps / EXP_RATE, "exp_floor_fraction": exps / EXP_RATE / t,
        "peak_mem_mib": peak / 2**20, "device": info["device"],
        "torch": info["torch"], "triton": info["triton_version"],
        **_fp32_matmul_info(),
        **({"tuned_configs": _tuned_configs()} if provider == "ours" else {}),
    })


def _fp32_matmul_info():
    """fp32_matmul_highest: whether torch asked for fp32-accurate fp32 matmuls (else TF32), read
    with the kernel module's reader, which works under both the legacy and the per-backend
    precision API (torch.get_float32_matmul_precision() raises once the latter was used). Left
    out where Triton does not import (that module needs it)."""
    if not _ext.triton_available():
        return {}
    from rnan_fast.kernels import nonlocal_attention as kernel

    return {"fp32_matmul_highest": kernel.fp32_matmul_highest()}


def _tuned_configs():
    """The config each of our kernels ran with last (what the autotuner chose for this shape)."""
    from rnan_fast.kernels import nonlocal_attention as kernel

    names = ("_col_lse_kernel", "_fwd_known_lse_kernel", "_bwd_kv_kernel", "_bwd_q_kernel")
    return {n: str(getattr(kernel, n).best_config) for n in names if hasattr(getattr(kernel, n), "best_config")}


def _pass2_candidates():
    """Pass-2 configs with POLY_PART > 0 and their POLY_PART = 0 twins (same tile), for a same-run
    comparison; empty without Triton."""
    if not _ext.triton_available():
        return []
    from rnan_fast.kernels import nonlocal_attention as kernel

    poly_tiles = {kernel.config_tile(c) for c in kernel.KNOWN_LSE_CONFIGS if c.kwargs["POLY_PART"]}
    return [c for c in kernel.KNOWN_LSE_CONFIGS if kernel.config_tile(c) in poly_tiles]


@needs_cuda
@pytest.mark.parametrize("config", _pass2_candidates(), ids=str)
@pytest.mark.parametrize("B,N", [(1, 512 * 768), (16, 48 * 48)], ids=["B1-N512x768", "B16-N48x48"])
def test_column_forward_pass2_config(benchmark, config, B, N):
    """bf16 column forward with pass 2 forced to `config` (pass 1 tuned as usual): does moving
    1/POLY_PART of the exps to the FMA pipes pay on this GPU? Compare with the twin of the same tile
    (benchmarks/instruction_mix.py predicts 62.5 -> 54.7 milli-clocks per score for pass 2)."""
    from rnan_fast.kernels import nonlocal_attention as kernel

    th, ph, g = _inputs(B, N, torch.bfloat16, "cuda", False)
    with kernel.forced_config(kernel._fwd_known_lse_kernel, config):
        kernel.forward(th, ph, g, "query")                     # compile
        torch.cuda.synchronize()

        def timed():
            kernel.forward(th, ph, g, "query")
            torch.cuda.synchronize()

        n2 = B * N * N
        benchmark.pedantic(timed, rounds=max(3, min(30, int(0.5 * EXP_RATE / (2 * n2)))), iterations=1,
                           warmup_rounds=1)
    t = benchmark.stats.stats.median
    benchmark.extra_info.update({"B": B, "N": N, "d": D, "dtype": "bf16", "config": str(config),
                                 "poly_part": config.kwargs["POLY_PART"], "scores_per_s": n2 / t,
                                 "exp_floor_fraction": 2 * n2 / EXP_RATE / t,
                                 "pass1_config": str(kernel._col_lse_kernel.best_config)})


# ---- CPU ------------------------------------------------------------------------------------

def _sdpa_row(th, ph, g):
    return torch.nn.functional.scaled_dot_product_attention(th.unsqueeze(1), ph.unsqueeze(1), g.unsqueeze(1),
                                                            scale=1.0).squeeze(1)


CPU_PROVIDERS = {
    "naive": _naive,
    "reference": lambda th, ph, g: rnan_fast.ops.nonlocal_attention(th, ph, g, "query", backend="reference"),
    "ours": lambda th, ph, g: rnan_fast.ops.nonlocal_attention(th, ph, g, "query", backend="extension"),
    "sdpa_row": _sdpa_row,
}
CPU_FWD_SHAPES = [(1, 48 * 48), (1, 96 * 96), (1, 128 * 128), (1, 32768)]   # B = 1, d = 32 (n_feats 64)
CPU_TRAIN = (16, 48 * 48, 16)   # B, N, d of a training batch (n_feats 32)
# Targets (same-run ratios): column forward N = 16384 d = 32 fp32 <= 1.5x SDPA's row forward;
# training-shape forward + backward <= 2x SDPA's row forward + backward.
CPU_TARGETS = {"fwd": 1.5, "fwd+bwd": 2.0}
needs_cpu_kernel = pytest.mark.skipif(not _ext.EXTENSION_ATTENTION,
                                      reason="the extension's CPU attention kernel is not built")


def _cpu_inputs(B, N, d, dtype, backward):
    """theta, phi, g (leaves, requiring grad for a backward) and dout: random, never zeros."""
    gen = torch.Generator().manual_seed(0)
    th, ph, g, dout = (torch.randn(B, N, d, generator=gen).to(dtype) for _ in range(4))
    return th.requires_grad_(backward), ph.requires_grad_(backward), g.requires_grad_(backward), dout


def _cpu_rounds(seconds):
    return max(2, min(10, int(4.0 / max(seconds, 1e-3))))


def _cpu_bench(benchmark, provider, B, N, d, dtype_name, backward):
    """Times one provider on fresh (B, N, d) inputs: one warm-up call sets the rounds (about 4 s in
    all, 2 to 10 rounds), then extra_info gets ns_per_score = median / (B N^2)."""
    th, ph, g, dout = _cpu_inputs(B, N, d, DTYPES[dtype_name], backward)
    run = _call(CPU_PROVIDERS[provider], th, ph, g, backward, dout)
    t0 = time.perf_counter()
    run()
    benchmark.pedantic(run, rounds=_cpu_rounds(time.perf_counter() - t0), iterations=1)
    t = benchmark.stats.stats.median
    benchmark.extra_info.update({"provider": provider, "B": B, "N": N, "d": d, "dtype": dtype_name,
                                 "ns_per_score": t / (B * N * N) * 1e9, "threads": torch.get_num_threads(),
                                 "device": "cpu", "torch": torch.__version__})


@needs_cpu_kernel
@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("B,N", CPU_FWD_SHAPES, ids=[f"B{b}-N{n}" for b, n in CPU_FWD_SHAPES])
@pytest.mark.parametrize("provider", list(CPU_PROVIDERS))
def test_cpu_forward(benchmark, provider, B, N, dtype_name):
    """Column forward at d = 32, B = 1; ns_per_score of ours is the CPU cost model."""
    dtype = DTYPES[dtype_name]
    if provider == "naive" and N > 16384:
        pytest.skip(f"naive needs {2 * N * N * 4 / 2**30:.0f} GiB of scores and probabilities at N = {N}")
    if provider in ("naive", "reference") and (dtype != torch.float32 or N > 16384):
        pytest.skip("naive and reference: fp32 up to N = 16384 only (minutes per call beyond)")
    _cpu_bench(benchmark, provider, B, N, D, dtype_name, backward=False)


@needs_cpu_kernel
@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("provider", list(CPU_PROVIDERS))
def test_cpu_train_shape(benchmark, provider, dtype_name):
    """Forward + backward at a training batch's shape (B = 16, N = 48^2, d = 16)."""
    dtype = DTYPES[dtype_name]
    if provider in ("naive", "reference") and dtype != torch.float32:
        pytest.skip("naive and reference: fp32 only")
    _cpu_bench(benchmark, provider, *CPU_TRAIN, dtype_name, backward=True)


def _alternate(benchmark, fns, rounds):
    """Times the calls in fns (name -> callable) alternately, `rounds` times each after one warm-up
    call each (a shared machine's load falls on all of them); returns name -> median seconds."""
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}

    def one_round():
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)

    benchmark.pedantic(one_round, rounds=rounds, iterations=1)
    return {name: statistics.median(v) for name, v in times.items()}


@needs_cpu_kernel
@pytest.mark.parametrize("passes", ["fwd", "fwd+bwd"])
def test_cpu_ratio_to_sdpa(benchmark, passes):
    """The targets as same-run ratios: ours and sdpa_row timed alternately (a shared machine's load
    falls on both); extra_info has ratio = median(ours) / median(sdpa_row) and the target."""
    backward = passes == "fwd+bwd"
    B, N, d = CPU_TRAIN if backward else (1, 128 * 128, D)
    th, ph, g, dout = _cpu_inputs(B, N, d, torch.float32, backward)
    ours, sdpa = (_call(CPU_PROVIDERS[p], th, ph, g, backward, dout) for p in ("ours", "sdpa_row"))
    # 15 pairs (~8 s): with 5, the ratio moved by +-0.1 between back-to-back runs on this VM.
    med = _alternate(benchmark, {"ours": ours, "sdpa_row": sdpa}, rounds=15)
    ratio = med["ours"] / med["sdpa_row"]
    benchmark.extra_info.update({"passes": passes, "B": B, "N": N, "d": d, "dtype": "fp32",
                                 "median_s": med, "ratio": ratio, "target": CPU_TARGETS[passes],
                                 "target_met": ratio <= CPU_TARGETS[passes], "threads": torch.get_num_threads()})


def test_cpu_reference_blocked_vs_naive(benchmark):
    """The one case that runs without a GPU: blocked reference (O(block * N) memory) vs naive, small N."""
    B, N = 2, 16 * 16
    th, ph, g = _inputs(B, N, torch.float32, "cpu", False)
    out = benchmark(lambda: reference.nonlocal_attention_forward(th, ph, g, "query", block=32)[0])
    torch.testing.assert_close(out, _naive(th, ph, g), rtol=1e-4, atol=1e-5)
    t = benchmark.stats.stats.median
    benchmark.extra_info.update({"provider": "reference-blocked", "B": B, "N": N, "d": D,
                                 "scores_per_s": B * N * N / t, "device": "cpu"})


def test_cpu_sdpa2_composite_formula():
    """The composite's algebra (bias -LSE_j, rescale by exp(LSE_i)) against naive, with a PyTorch
    stand-in for the CUDA-only efficient-attention op (same signature and outputs)."""

    def eff(q, k, v, bias, compute_lse, dropout_p, is_causal, scale):
        s = q @ k.transpose(-1, -2) * scale + (0 if bias is None else bias)
        return torch.softmax(s, -1) @ v, torch.logsumexp(s, -1), None, None

    th, ph, g = (t.double() for t in _inputs(2, 50, torch.float32, "cpu", False))
    torch.testing.assert_close(_sdpa2(th, ph, g, eff), _naive(th, ph, g))


# (B, N, d, backward): the training shape, the column forward at the shipped models' d = 16 and at
# d = 32, and a forward + backward of one 96x96 image.
CPU_ISA_CASES = [(*CPU_TRAIN, True), (1, 128 * 128, 16, False), (1, 128 * 128, D, False), (1, 96 * 96, D, True)]


@needs_cpu_kernel
@pytest.mark.parametrize("B,N,d,backward", CPU_ISA_CASES,
                         ids=[f"B{b}-N{n}-d{d}-{'fwd+bwd' if bw else 'fwd'}" for b, n, d, bw in CPU_ISA_CASES])
def test_cpu_isa_ratio(benchmark, B, N, d, backward):
    """The kernel's path for this CPU ("avx512" or "avx2") against its portable MKL-tile path, timed
    alternately (8 rounds); extra_info has ratio = median(this CPU's path) / median(portable)."""
    from rnan_fast import _C

    best = _C.cpu_attention_isa()
    if best == "portable":
        pytest.skip("this CPU has only the portable path")
    th, ph, g, dout = _cpu_inputs(B, N, d, torch.float32, backward)
    call = _call(CPU_PROVIDERS["ours"], th, ph, g, backward, dout)

    def on(isa):
        def run():
            _C.set_cpu_attention_isa(isa)
            call()
        return run

    try:
        med = _alternate(benchmark, {best: on(best), "portable": on("portable")}, rounds=8)
    finally:
        _C.set_cpu_attention_isa(best)
    benchmark.extra_info.update({"B": B, "N": N, "d": d, "backward": backward, "isa": best, "median_s": med,
                                 "ratio": med[best] / med["portable"], "threads": torch.get_num_threads()})
