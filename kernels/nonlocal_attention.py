"""Fused non-local attention in Triton: out = softmax(theta @ phi^T, dim=1 or 2) @ g, never storing N x N.

Inputs theta, phi: (B, N, D), g: (B, N, DV), any strides, D and DV in HEAD_DIMS, dtype fp32 / fp16 /
bf16. Scores S = theta phi^T are unscaled (as in the official RNAN) and always held in fp32: on
0..255 images they reach ~1e4, far beyond what an fp16/bf16 score could carry. Every dot
accumulates in fp32; probabilities are cast to the input dtype only to feed the next tensor-core
dot (fp32 inputs keep them in fp32).

Notation in the kernels: q = theta (queries, index i), k = phi (keys, index j), v = g, o = out,
do = dOut. "query-major" kernels give each program BLOCK_M queries and loop over all keys in
BLOCK_N steps; "key-major" kernels give each program BLOCK_N keys and loop over all queries in
BLOCK_M steps. Grid: (cdiv(N, own block), B). Memory beyond inputs and outputs: stats (2, B, N) fp32
in the forward; stats + D (B, N) fp32 in the backward. Nothing of size N x N exists anywhere.

Saved statistics ("lse" of the op): stats (2, B, N) fp32, m = stats[0] the max score of each
softmax (natural units) and r = stats[1] = log2 sum exp2((S - m) log2 e), so that the natural
LSE = m + r ln 2 (`lse_natural`). Every weight is then exp2((S - m) log2e - r): one FADD, one FFMA
and one MUFU ex2 per score. Why split: scores reach ~1e4, where half an fp32 ulp is ~5e-4, so a
single stored LSE puts a 5e-4 relative error on every weight, and the dominant weight of a
saturated softmax (large scores make most of them saturated) is no longer 1: its gradient
P (dP - D) then holds noise of size 5e-4 |dP| where the true value is ~0. S - m is exact near
the maximum (Sterbenz), so with the split the dominant weight is 1 to the last bit, as in
PyTorch's softmax - provided the kernel that recomputes S_ij gets the same bits as the one that
took the max. Key-major kernels compute S^T = K Q^T and query-major ones S = Q K^T; an MMA with
exact products (fp16/bf16) or an in-order FMA chain ("ieee") should give identical bits either
way, while numpy (the interpreter: at d >= 32 on one CPU, at every d on another) and possibly
tf32x3 differ in the last bit, which
leaves a ~ulp(S) error on saturated weights (the tests' floors allow for it; to verify on GPU).
The extra FADD is free beside the ex2 (MUFU) bound. The op's lse output is internal
(non-differentiable, consumed only by this module's backward).

Column softmax (softmax_over="query", official RNAN, softmax over queries, dim=1):
  pass 1 `_col_lse_kernel`, key-major: online log-sum-exp over queries for each key -> (m_j, r_j).
          N^2 exps, one dot per block pair, no accumulator but (m, l) per key.
  pass 2 `_fwd_known_lse_kernel`, query-major: acc_i = sum_j exp2((S_ij - m_j) log2e - r_j) g_j.
          Every weight is already final and <= 1 (up to rounding), so there is no running
          max, no rescaling of the accumulator and no final divide: N^2 exps, two dots.
          Configs with POLY_PART = 8 (or 4) evaluate 1/8 (1/4) of these exps by a cubic on the
          FMA pipes (`_exp2_split`): at d = 32 the pass is bound by the MUFU unit's 16 ex2 per
          clock and SM, with issue slots to spare (benchmarks/instruction_mix.py). Forward output
          only: the saved statistics and the backward never see the polynomial.
Row softmax (softmax_over="key", ordinary attention): `_fwd_row_kernel`, one query-major
  online-softmax pass (running max m_i, sum l_i, rescaled accumulator), writes out and (m_i, r_i).

Backward (saved: theta, phi, g, stats; not out: D is summed from the recomputed tiles). With P the probabilities and dY = dOut:
  dG_j = sum_i P_ij dY_i;   dS_ij = P_ij (dY_i . g_j - D);   dTheta = dS Phi;   dPhi = dS^T Theta,
  D = sum_k P dP over the normalising index (D_i per query for the row softmax, D_j per key for
  the column softmax; = dY_i . out_i and g_j . dG_j in exact arithmetic). It is summed from the
  very P and dP that the gradient loop recomputes, so that dP - D cancels exactly where the
  softmax saturates (see _bwd_kv_kernel). For the column softmax P^T = rowsoftmax(Phi Theta^T):
  it is ordinary attention with queries and keys swapped, so two kernels serve both modes:
  `_bwd_kv_kernel` (key-major) -> dG (= dV) and dPhi (= dK). Column mode: loop 1 accumulates dG_j
      and D_j (stored for the next kernel), loop 2 dPhi_j. Row mode: one loop, D_i given.
  `_bwd_q_kernel` (query-major) -> dTheta (= dQ). Row mode: loop 1 D_i (stored; this kernel then
      runs first), loop 2 dTheta_i. Column mode: one loop, D_j given.
  Exps: column backward 3 N^2, row backward 3 N^2 (FlashAttention-2 needs 2 with an atomic dQ).
  No atomics anywhere: each output row is owned by exactly one program and accumulated in a
  fixed order, so the backward is deterministic (bit-reproducible run to run) whatever
  `deterministic` says. The flag is kept in the API so an atomic variant (dQ accumulated from
  the key-major kernel, one N^2 pass fewer) can be added behind it if it measures faster.

Masking: any N >= 1. Each loop runs over the full blocks without masks and then, if N is not a
multiple of the block, one masked step (`MASKED` constexpr) that zeroes the weights of padded
rows explicitly (a padded row loads zeros, whose score 0 could give exp(-LSE) = inf).
Offsets: the batch offset and each block's start row are int64 scalars added to the base
pointer, so B*N*D > 2^31 elements is fine; the offsets inside a tile are int32 tensors computed
once (64-bit pointer tensors kept live across the loop made ptxas spill hundreds of bytes at
d = 64; with int32 tile offsets each kernel has spill-free configs for bf16 at d = 32 and 64, as
checked by compiling for sm_90 without a GPU). They are fine while BLOCK * |row stride| +
D * |feature stride| < 2^31, i.e. for any layout of fewer than ~2^24 rows.

Dot precision: fp16/bf16 use tensor cores. fp32 follows torch.get_float32_matmul_precision()
(or torch.backends.cuda.matmul.fp32_precision where that API was used: `fp32_matmul_highest`):
"highest" (new API: "ieee") -> FP32_HIGHEST_INPUT_PRECISION ("tf32x3": three tf32 products,
~fp32 accuracy at a fraction of the cost of "ieee" FMA dots; switch the constant to "ieee" if a
GPU run shows tf32x3 outside the tests' tolerance), "high"/"medium" (new API: "tf32") -> "tf32".

Tuning: on a GPU every kernel is autotuned over 8-13 block/warp/stage configs, keyed on
(N bucket = next power of two, D, DV, dot precision, softmax mode, dtypes);
RNAN_FAST_AUTOTUNE_MAX=k bounds the candidates to k (the default first). RNAN_FAST_AUTOTUNE=0 at
import skips tuning: each launch takes `default_config` for its operands and GPU, spill-free and
within the shared memory of sm_80, sm_86, sm_89 and sm_90 (the GPU tests use it to keep compile
time down). Tuning skips, before compiling them, the candidates whose shared memory
(`shared_bytes_bound`) exceeds the GPU's. Below sm_80 Triton has no tensor-core dots (its dots
compile to FMAs there), so rnan_fast runs the attention on the reference on such GPUs.
Tuning benchmarks (and syncs), so run each new
shape once eagerly before capturing a CUDA graph. Under TRITON_INTERPRET=1 (CPU tests) one small
asymmetric config (BLOCK_M=32, BLOCK_N=16) is used and nothing is tuned (pass 2 has one per
POLY_PART; the tests force each with `forced_config`).
Launches go to the inputs' device (a device guard) and its current stream; no host
synchronisation, no .item().
"""
from __future__ import annotations

import contextlib
import functools
import math
import os

import torch
import triton
import triton.language as tl

HEAD_DIMS = (16, 32, 64)
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
FP32_HIGHEST_INPUT_PRECISION = "tf32x3"   # or "ieee" (exact fp32 FMA dots, several times slower)

LOG2E = 1.4426950408889634
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# ----------------------------------------------------------------------------------------------
# Configs. Query-major kernels own BLOCK_M queries and step BLOCK_N keys; key-major ones own
# BLOCK_N keys and step BLOCK_M queries.
# ----------------------------------------------------------------------------------------------
def _configs(entries):
    """triton.Configs from (BLOCK_M, BLOCK_N, num_warps, num_stages[, POLY_PART]) tuples."""
    if _INTERPRET:
        # Small asymmetric blocks (a swapped index shows up in the tests), one per POLY_PART.
        entries = list(dict.fromkeys((32, 16, 4, 1) + e[4:] for e in entries))
    return [triton.Config({"BLOCK_M": e[0], "BLOCK_N": e[1], **({"POLY_PART": e[4]} if len(e) > 4 else {})},
                          num_warps=e[2], num_stages=e[3]) for e in entries]


# The first config of each list is the default when tuning is off (RNAN_FAST_AUTOTUNE=0) unless
# _DEFAULT_OVERRIDES names a spill-free one for the operands (fp32 dots need smaller tiles).
# Query-major: a big own block amortises the q load and the accumulator; the streamed block
# is what the pipeline stages hold.
_QMAJOR = [(128, 64, 8, 3), (128, 64, 4, 3), (128, 128, 8, 2), (128, 32, 4, 4),
           (64, 64, 4, 3), (64, 128, 4, 3), (128, 128, 4, 3), (64, 32, 4, 4)]
# Column pass 2 also tries moving 1/POLY_PART of its exps off the MUFU unit (_exp2_split), on the
# tiles where benchmarks/instruction_mix.py predicts a gain for bf16 at d = 16-64: MUFU-bound at
# 62.5 mclk per score without, 54.7 with POLY_PART = 8 (issue 50-53); 1/4 turns them issue-bound
# (56-60); 128 x 64 tiles are issue-bound at 63 already with 1/8.
_KNOWN_LSE = [c + (0,) for c in _QMAJOR] + [(128, 128, 8, 2, 8), (256, 64, 8, 3, 0), (256, 64, 8, 3, 8),
                                            (64, 128, 4, 3, 8), (128, 128, 8, 2, 4)]
KNOWN_LSE_CONFIGS = _configs(_KNOWN_LSE)   # all candidates of pass 2, for tests that force each one


def config_tile(config: triton.Config) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages): what a POLY_PART config shares with its twin."""
    return config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"], config.num_warps, config.num_stages
# Key-major: the roles swap (own BLOCK_N keys, stream BLOCK_M queries).
_KMAJOR = [(64, 128, 4, 3), (64, 128, 8, 3), (128, 128, 8, 2), (32, 128, 4, 4),
           (64, 64, 4, 3), (128, 64, 4, 3), (128, 128, 4, 3), (32, 64, 4, 4)]
# The backward kernels hold more live tiles (dK and dV, or dQ, plus P and dP): smaller blocks.
# fp32 inputs with tf32x3 dots need the small ones (ptxas reports spills for 64x64 there).
_BWD_SMALL = [(64, 64, 4, 2), (64, 64, 4, 3), (32, 64, 4, 2), (64, 32, 4, 2), (32, 32, 4, 2), (64, 64, 8, 2)]
_BWD_KV = [(64, 128, 8, 2), (128, 64, 8, 2)] + _BWD_SMALL     # own BLOCK_N keys
_BWD_Q = [(128, 64, 8, 2), (64, 128, 8, 2)] + _BWD_SMALL      # own BLOCK_M queries

# Untuned defaults (RNAN_FAST_AUTOTUNE=0, as in the GPU tests) that differ from the first entry
# of the kernel's list: {(kernel, operand kind, d): entry}, one for both softmax modes. Operand
# kind: "fp16", "bf16", or the dot precision of fp32 inputs ("tf32", "tf32x3", "ieee"); d =
# max(D, DV). Each is the first spill-free config, in ptxas's report, of the list's first entry
# and then ever smaller tiles (compiled for sm_90 without a GPU; spill-free with triton 3.8 and
# 3.6; tests/test_instruction_mix.py checks every default). fp16, bf16 and tf32 need none. tf32x3
# splits each operand into two tf32 halves (more live registers); "ieee" dots run on the FMA
# units with each thread holding whole rows of both operands, hence 8 warps on small tiles.
# Slow tiles, but spill-free: tuning still chooses among the full lists.
_TF32X3_64 = {"_fwd_row_kernel": (64, 32, 4, 4), "_col_lse_kernel": (32, 64, 4, 2),
              "_fwd_known_lse_kernel": (64, 32, 4, 2, 0), "_bwd_kv_kernel": (32, 16, 4, 1),
              "_bwd_q_kernel": (16, 32, 4, 1)}
_IEEE = {16: {"_col_lse_kernel": (32, 32, 8, 1), "_bwd_kv_kernel": (32, 32, 8, 1), "_bwd_q_kernel": (32, 32, 8, 1)},
         32: {"_fwd_row_kernel": (32, 32, 8, 1), "_col_lse_kernel": (32, 32, 8, 1),
              "_fwd_known_lse_kernel": (32, 32, 8, 1, 0), "_bwd_kv_kernel": (32, 32, 8, 1),
              "_bwd_q_kernel": (32, 32, 8, 1)},
         64: {"_fwd_row_kernel": (16, 32, 8, 1), "_col_lse_kernel": (32, 16, 8, 1),
              "_fwd_known_lse_kernel": (16, 16, 8, 1, 0), "_bwd_kv_kernel": (16, 16, 8, 1),
              "_bwd_q_kernel": (16, 16, 8, 1)}}
_DEFAULT_OVERRIDES: dict[tuple[str, str, int], tuple] = {
    **{(name, "tf32x3", 64): e for name, e in _TF32X3_64.items()},
    ("_bwd_kv_kernel", "tf32x3", 32): (32, 64, 4, 2),
    **{(name, "ieee", d): e for d, entries in _IEEE.items() for name, e in entries.items()},
}

# Untuned defaults on GPUs without sm_90's wgmma dots or its 227 KB of shared memory a block
# (sm_80, sm_86, sm_89; see _device_limits): {(kernel, operand kind, softmax mode): entry}, for
# every head dim. Each is the first config, of the sm_90 default at d = 64 and then ever smaller
# tiles, that ptxas compiles without spills and within the shared memory for each of sm_80, sm_86
# and sm_89 at d = 16, 32 and 64 (`python benchmarks/instruction_mix.py --defaults`, triton 3.8:
# spills differ between sm_80 and sm_86 and are not monotone in d); tests/test_gpu_arch.py
# compiles every one for each of these.
# Without wgmma, dot operands pass through registers: the backward's tiles shrink most (tf32 at
# d = 64: _bwd_kv_kernel's sm_90 default spills 504 B per thread on sm_80). Softmax mode: "col" (STATS_PER_KEY,
# the official column softmax) or "row"; the forward kernels serve one mode each, under "col".
_SM8X_DEFAULTS: dict[tuple[str, str, str], tuple] = {
    **{("_fwd_row_kernel", kind, "col"): (128, 64, 8, 3) for kind in ("fp16", "bf16", "tf32")},
    ("_fwd_row_kernel", "tf32x3", "col"): (16, 64, 8, 2), ("_fwd_row_kernel", "ieee", "col"): (32, 16, 8, 2),
    ("_col_lse_kernel", "fp16", "col"): (64, 128, 4, 3), ("_col_lse_kernel", "bf16", "col"): (64, 128, 4, 3),
    ("_col_lse_kernel", "tf32", "col"): (64, 128, 8, 3), ("_col_lse_kernel", "tf32x3", "col"): (32, 64, 4, 2),
    ("_col_lse_kernel", "ieee", "col"): (32, 16, 8, 1),
    **{("_fwd_known_lse_kernel", kind, "col"): (128, 64, 8, 3, 0) for kind in ("fp16", "bf16", "tf32")},
    ("_fwd_known_lse_kernel", "tf32x3", "col"): (32, 64, 8, 1, 0),
    ("_fwd_known_lse_kernel", "ieee", "col"): (16, 16, 8, 1, 0),
    ("_bwd_kv_kernel", "fp16", "col"): (32, 64, 8, 2), ("_bwd_kv_kernel", "bf16", "col"): (32, 64, 8, 2),
    ("_bwd_kv_kernel", "tf32", "col"): (64, 32, 8, 1), ("_bwd_kv_kernel", "tf32x3", "col"): (32, 16, 8, 1),
    ("_bwd_kv_kernel", "ieee", "col"): (16, 16, 8, 1),
    ("_bwd_kv_kernel", "fp16", "row"): (64, 64, 4, 2), ("_bwd_kv_kernel", "bf16", "row"): (64, 64, 4, 2),
    ("_bwd_kv_kernel", "tf32", "row"): (64, 32, 8, 2), ("_bwd_kv_kernel", "tf32x3", "row"): (32, 16, 4, 1),
    ("_bwd_kv_kernel", "ieee", "row"): (16, 16, 8, 1),
    ("_bwd_q_kernel", "fp16", "col"): (128, 64, 8, 2), ("_bwd_q_kernel", "bf16", "col"): (128, 64, 8, 2),
    ("_bwd_q_kernel", "tf32", "col"): (64, 32, 8, 2), ("_bwd_q_kernel", "tf32x3", "col"): (16, 32, 4, 1),
    ("_bwd_q_kernel", "ieee", "col"): (16, 16, 8, 1),
    ("_bwd_q_kernel", "fp16", "row"): (128, 64, 8, 2), ("_bwd_q_kernel", "bf16", "row"): (128, 64, 8, 2),
    ("_bwd_q_kernel", "tf32", "row"): (64, 32, 8, 2), ("_bwd_q_kernel", "tf32x3", "row"): (16, 32, 4, 1),
    ("_bwd_q_kernel", "ieee", "row"): (16, 16, 8, 1),
}
_SM8X = 80
_SM90 = 90

# Shared memory one block may use (the opt-in maximum), bytes, by compute capability: what
# every untuned default must fit (CUDA C Programming Guide, technical specifications).
SHARED_MEMORY = {80: 166_912, 86: 101_376, 89: 101_376, 90: 232_448}

_KEY = ["N_BUCKET", "D", "DV", "PREC"]
# The backward kernels serve both softmax modes, whose loops differ: tune them apart.
_BWD_KEY = _KEY + ["STATS_PER_KEY"]


def tuning_enabled() -> bool:
    """Autotuning on (default) unless RNAN_FAST_AUTOTUNE=0, read once when this module is imported.
    Off, each launch takes the default config for its operands (`default_config`) and calls the
    JIT function directly: Triton then neither benchmarks nor synchronises, so the first call
    may run inside a CUDA-graph capture."""
    return os.environ.get("RNAN_FAST_AUTOTUNE", "1") not in ("", "0")


def tuning_limit() -> int | None:
    """RNAN_FAST_AUTOTUNE_MAX=k: tune over at most k candidates per kernel (the default for the
    operands, then the list in order), to bound compile time (about 2-4 s per candidate and
    shape class); unset: the whole list."""
    value = os.environ.get("RNAN_FAST_AUTOTUNE_MAX", "")
    if not value:
        return None
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"RNAN_FAST_AUTOTUNE_MAX must be a positive integer, got {value!r}")
    return int(value)


_TUNE = tuning_enabled() and not _INTERPRET      # the interpreter cannot time anything
_TUNE_MAX = tuning_limit()
_FORCED: dict = {}                               # kernel -> the Config forced_config set


def shared_bytes_bound(name: str, config: triton.Config, dtype: torch.dtype, prec: str, d: int, dv: int) -> int:
    """An upper bound of the shared memory (bytes) kernel `name` takes with `config`, before
    compiling it: the block's own tiles, num_stages of the streamed ones (Triton's pipeline
    buffers) and 4 KiB for Triton's reductions; for tf32x3 / ieee dots, whose operands are
    converted through shared memory on sm_80-89, also the fp32 score tile and the own tiles once
    more (compiled for sm_80: up to 8 KiB above the tiles plus the score tile). Checked against
    what ptxas allots by tests/test_gpu_arch.py (sm_80-89) and tests/test_instruction_mix.py (sm_90)."""
    bm, bn, stages = config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"], config.num_stages
    own, streamed, own_width, streamed_width = {
        "_fwd_row_kernel": (bm, bn, d, d + dv), "_fwd_known_lse_kernel": (bm, bn, d, d + dv),
        "_col_lse_kernel": (bn, bm, d, d), "_bwd_kv_kernel": (bn, bm, d + dv, d + dv),
        "_bwd_q_kernel": (bm, bn, d + dv, d + dv)}[name]
    converted = operand_kind(dtype, prec) in ("tf32x3", "ieee")
    own_bytes = dtype.itemsize * own * own_width
    extra = 4 * bm * bn + own_bytes if converted else 0
    return own_bytes + dtype.itemsize * stages * streamed * streamed_width + extra + 4096


@functools.cache
def _device_limits(index: int) -> tuple[int, int]:
    """(default table: _SM90 or _SM8X, shared memory per block in bytes) of CUDA device `index`:
    sm_90's defaults on GPUs with its wgmma dots (major >= 9) and its 227 KB, else sm_8x's."""
    major, _ = torch.cuda.get_device_capability(index)
    smem = torch.cuda.get_device_properties(index).shared_memory_per_block_optin
    return (_SM90 if major >= 9 and smem >= SHARED_MEMORY[90] else _SM8X), smem


def _limits(t: torch.Tensor) -> tuple[int, int]:
    """_device_limits of t's GPU; sm_90's for CPU tensors (the interpreter, which has no limits)."""
    return _device_limits(t.device.index) if t.is_cuda else (_SM90, SHARED_MEMORY[90])


def _prune(name, configs, named_args, **kwargs):
    """The candidates of kernel `name` worth timing on the inputs' GPU: none whose shared memory
    (shared_bytes_bound) exceeds the GPU's, so that none fails to launch or is compiled in vain;
    no POLY_PART > 0 under fp32 "highest" (_known_lse_step ignores POLY_PART there); with
    RNAN_FAST_AUTOTUNE_MAX=k, the operands' default first, then the others in list order, k in all.
    The default, which fits every GPU of its table, stands in when nothing else is left."""
    q = named_args["Q"]
    table, smem = _limits(q)
    default = default_config(name, q.dtype, kwargs["PREC"], max(kwargs["D"], kwargs["DV"]),
                             kwargs.get("STATS_PER_KEY", True), table)
    kept = [c for c in configs if (kwargs["PREC"] == "tf32" or not c.kwargs.get("POLY_PART", 0))
            and shared_bytes_bound(name, c, q.dtype, kwargs["PREC"], kwargs["D"], kwargs["DV"]) <= smem]
    if _TUNE_MAX is not None:
        kept = [default] + [c for c in kept if c.all_kwargs() != default.all_kwargs()]
        return kept[:_TUNE_MAX]
    return kept or [default]


_ENTRIES: dict[str, list] = {}       # kernel name -> its candidate tuples, in preference order


def _autotune(entries, key=_KEY):
    def decorate(fn):
        name = fn.__name__
        _ENTRIES[name] = entries
        return triton.autotune(configs=_configs(entries), key=key,
                               prune_configs_by={"early_config_prune": functools.partial(_prune, name)})(fn)
    return decorate


def operand_kind(dtype: torch.dtype, prec: str) -> str:
    """What sets a kernel's register needs: "fp16" / "bf16", or the dot precision of fp32 inputs."""
    return {torch.float16: "fp16", torch.bfloat16: "bf16"}.get(dtype, prec)


@functools.cache
def default_config(name: str, dtype: torch.dtype, prec: str, d: int, stats_per_key: bool = True,
                   table: int = _SM90) -> triton.Config:
    """The untuned config of kernel `name` for operands of `dtype` with dot precision `prec`, head
    dims up to `d` and softmax mode `stats_per_key` (the backward kernels' column mode), on GPUs
    of `table` (_SM90: sm_90; _SM8X: sm_80 to sm_89, see _device_limits): spill-free there and
    within their shared memory (see _DEFAULT_OVERRIDES and _SM8X_DEFAULTS)."""
    kind = operand_kind(dtype, prec)
    if table == _SM8X:
        entry = _SM8X_DEFAULTS[(name, kind, "col" if stats_per_key else "row")]
    else:
        entry = _DEFAULT_OVERRIDES.get((name, kind, d), _ENTRIES[name][0])
    return _configs([entry])[0]


@contextlib.contextmanager
def forced_config(kernel, config: triton.Config):
    """Run the autotuned `kernel` of this module with `config` alone while inside (tests, benchmarks).
    Not thread-safe; nothing is tuned or cached meanwhile."""
    _FORCED[kernel] = config
    try:
        yield
    finally:
        del _FORCED[kernel]


def _launch(kernel, grid, *args, **meta):
    """Launch `kernel` of this module: the forced config, else tuned (`tuning_enabled`), else
    its default for these operands on their GPU (args[0] is Q: its dtype, with PREC, gives the
    operand kind; its device the table of defaults)."""
    config = _FORCED.get(kernel)
    if config is None and not _TUNE:
        config = default_config(kernel.base_fn.__name__, args[0].dtype, meta["PREC"], max(meta["D"], meta["DV"]),
                                meta.get("STATS_PER_KEY", True), _limits(args[0])[0])
    if config is None:
        kernel[grid](*args, **meta)
    else:
        kernel.fn[grid](*args, **meta, **config.all_kwargs())


@triton.jit
def _log2_weight(s, mx, rr):
    """log2 of exp(S - LSE) from the split statistics: s - m is exact near the maximum (Sterbenz),
    so the dominant weight of a saturated softmax comes out as exp2(-r) ~ 1 to the last bit."""
    return (s - mx) * 1.4426950408889634 - rr                  # FADD + FFMA


@triton.jit
def _weight(s, mx, rr):
    return tl.math.exp2(_log2_weight(s, mx, rr))               # + MUFU ex2


@triton.jit
def _exp2_fma(x):
    """2^x for x <= 0 on the FMA and integer pipes instead of the MUFU unit (8 instructions: FMNMX,
    3 FADD, 3 FFMA, LEA), relative error <= 1.02e-4: below the rounding of the fp16, bf16 or tf32
    dot that the weight feeds (>= 4.9e-4), never used for the saved statistics. x = j + f with j = round(x) by
    the 1.5 * 2^23 trick (j lands in t's low mantissa bits) and f in [-0.5, 0.5]; 2^f is a cubic
    (minimax in relative error, constant term 1 so that 2^0 = 1 exactly); j is added to the
    exponent field. x is clamped at -125 so that field cannot wrap: results below 2^-125 (which
    the MUFU gives as 0) come out as ~2^-125, under any output's resolution; -inf only occurs in
    masked columns, which the caller zeroes. NaN propagates."""
    x = tl.maximum(x, -125.0, propagate_nan=tl.PropagateNan.ALL)
    t = x + 12582912.0
    f = x - (t - 12582912.0)
    p = tl.fma(tl.fma(tl.fma(f, 0.05500891, 0.242211), f, 0.69328293), f, 1.0)
    return (p.to(tl.int32, bitcast=True) + (t.to(tl.int32, bitcast=True) << 23)).to(tl.float32, bitcast=True)


@triton.jit
def _halves(x, ROWS: tl.constexpr, COLS: tl.constexpr):
    """Columns [0, COLS/2) and [COLS/2, COLS) of x (ROWS, COLS). In the MMA result layout a thread
    holds the same columns of every 8-column group, so for COLS/2 >= 8 this moves no data."""
    return tl.split(tl.permute(tl.reshape(x, (ROWS, 2, COLS // 2)), (0, 2, 1)))


@triton.jit
def _joined(a, b, ROWS: tl.constexpr, COLS: tl.constexpr):
    """Inverse of _halves: a and b (ROWS, COLS/2) side by side."""
    return tl.reshape(tl.permute(tl.join(a, b), (0, 2, 1)), (ROWS, COLS))


@triton.jit
def _exp2_split(x, ROWS: tl.constexpr, COLS: tl.constexpr, POLY_PART: tl.constexpr):
    """2^x for a tile x (ROWS, COLS): the last COLS/POLY_PART columns (POLY_PART = 2, 4 or 8) by
    _exp2_fma, the rest on the MUFU unit, whose 16 ex2 per clock and SM bound a d = 32 pass (at
    128 x 128, pass 2's 5.6 instructions per score need 44 milli-clocks of issue per SM, the
    MUFU 62.5); POLY_PART = 0: all on the MUFU unit. Compiled for sm_90, the slices add no
    shuffle or shared-memory traffic (tests/test_instruction_mix.py)."""
    # if/else throughout: the compiler visits code after a return inside a constexpr branch.
    if POLY_PART == 0:
        y = tl.math.exp2(x)
    else:
        a, b = _halves(x, ROWS, COLS)
        if POLY_PART == 2:
            b = _exp2_fma(b)
        else:
            b1, b2 = _halves(b, ROWS, COLS // 2)
            if POLY_PART == 4:
                b2 = _exp2_fma(b2)
            else:
                tl.static_assert(POLY_PART == 8, "POLY_PART must be 0, 2, 4 or 8")
                b21, b22 = _halves(b2, ROWS, COLS // 4)
                b2 = _joined(tl.math.exp2(b21), _exp2_fma(b22), ROWS, COLS // 4)
            b = _joined(tl.math.exp2(b1), b2, ROWS, COLS // 2)
        y = _joined(tl.math.exp2(a), b, ROWS, COLS)
    return y


# ----------------------------------------------------------------------------------------------
# Forward, row softmax (ordinary attention): one online-softmax pass.
# ----------------------------------------------------------------------------------------------
@triton.jit
def _row_fwd_step(acc, m_i, l_i, q, k_ptrs, v_ptrs, start_n, N, offs_n,
                  BLOCK_N: tl.constexpr, MASKED: tl.constexpr, PREC: tl.constexpr):
    if MASKED:
        valid = (start_n + offs_n) < N
        k = tl.load(k_ptrs, mask=valid[:, None], other=0.0)
        v = tl.load(v_ptrs, mask=valid[:, None], other=0.0)
    else:
        k = tl.load(k_ptrs)
        v = tl.load(v_ptrs)
    s = tl.dot(q, tl.trans(k), input_precision=PREC)            # (BLOCK_M, BLOCK_N) fp32
    if MASKED:
        s = tl.where(valid[None, :], s, float("-inf"))
    # log2e > 0 and rounding is monotone, so max(s) * log2e == max(s * log2e).
    m_new = tl.maximum(m_i, tl.max(s, 1))
    p = tl.math.exp2((s - m_new[:, None]) * 1.4426950408889634)  # FADD + FMUL + ex2 per score
    alpha = tl.math.exp2((m_i - m_new) * 1.4426950408889634)     # 0 on the first step (m_i = -inf)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
    return acc, m_new, l_i


@_autotune(_QMAJOR)
@triton.jit
def _fwd_row_kernel(Q, K, V, O, M, R,
                    sqb, sqn, sqd, skb, skn, skd, svb, svn, svd, sob, son, sod,
                    N, N_BUCKET,
                    D: tl.constexpr, DV: tl.constexpr, PREC: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_m = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    offs_dv = tl.arange(0, DV)
    m_valid = offs_m < N
    rows = tl.cast(offs_m, tl.int64)
    q = tl.load(Q + b * sqb + rows[:, None] * sqn + offs_d[None, :] * sqd, mask=m_valid[:, None], other=0.0)
    k_base = K + b * skb
    k_off = offs_n[:, None] * skn + offs_d[None, :] * skd
    v_base = V + b * svb
    v_off = offs_n[:, None] * svn + offs_dv[None, :] * svd
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, DV], tl.float32)
    n_full = (N // BLOCK_N) * BLOCK_N
    for start_n in range(0, n_full, BLOCK_N):
        st = tl.cast(start_n, tl.int64)
        acc, m_i, l_i = _row_fwd_step(acc, m_i, l_i, q, (k_base + st * skn) + k_off, (v_base + st * svn) + v_off,
                                      start_n, N, offs_n, BLOCK_N, False, PREC)
    if n_full < N:
        st = tl.cast(n_full, tl.int64)
        acc, m_i, l_i = _row_fwd_step(acc, m_i, l_i, q, (k_base + st * skn) + k_off, (v_base + st * svn) + v_off,
                                      n_full, N, offs_n, BLOCK_N, True, PREC)
    out = acc / l_i[:, None]
    tl.store(O + b * sob + rows[:, None] * son + offs_dv[None, :] * sod, out.to(O.dtype.element_ty),
             mask=m_valid[:, None])
    tl.store(M + b * N + rows, m_i, mask=m_valid)
    tl.store(R + b * N + rows, tl.math.log2(l_i), mask=m_valid)


# ----------------------------------------------------------------------------------------------
# Forward, column softmax (official RNAN). Pass 1: (m_j, r_j) per key, key-major.
# ----------------------------------------------------------------------------------------------
@triton.jit
def _col_lse_step(m_j, l_j, k, q_ptrs, start_m, N, offs_m,
                  MASKED: tl.constexpr, PREC: tl.constexpr):
    if MASKED:
        valid = (start_m + offs_m) < N
        q = tl.load(q_ptrs, mask=valid[:, None], other=0.0)
    else:
        q = tl.load(q_ptrs)
    st = tl.dot(k, tl.trans(q), input_precision=PREC)           # S^T block: (BLOCK_N, BLOCK_M)
    if MASKED:
        st = tl.where(valid[None, :], st, float("-inf"))
    m_new = tl.maximum(m_j, tl.max(st, 1))
    p = tl.math.exp2((st - m_new[:, None]) * 1.4426950408889634)
    l_j = l_j * tl.math.exp2((m_j - m_new) * 1.4426950408889634) + tl.sum(p, 1)
    return m_new, l_j


@_autotune(_KMAJOR)
@triton.jit
def _col_lse_kernel(Q, K, M, R, sqb, sqn, sqd, skb, skn, skd,
                    N, N_BUCKET,
                    D: tl.constexpr, DV: tl.constexpr, PREC: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_n = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    n_valid = offs_n < N
    cols = tl.cast(offs_n, tl.int64)
    k = tl.load(K + b * skb + cols[:, None] * skn + offs_d[None, :] * skd, mask=n_valid[:, None], other=0.0)
    q_base = Q + b * sqb
    q_off = offs_m[:, None] * sqn + offs_d[None, :] * sqd
    m_j = tl.full([BLOCK_N], float("-inf"), tl.float32)
    l_j = tl.zeros([BLOCK_N], tl.float32)
    m_full = (N // BLOCK_M) * BLOCK_M
    for start_m in range(0, m_full, BLOCK_M):
        m_j, l_j = _col_lse_step(m_j, l_j, k, (q_base + tl.cast(start_m, tl.int64) * sqn) + q_off, start_m, N, offs_m,
                                 False, PREC)
    if m_full < N:
        m_j, l_j = _col_lse_step(m_j, l_j, k, (q_base + tl.cast(m_full, tl.int64) * sqn) + q_off, m_full, N, offs_m,
                                 True, PREC)
    tl.store(M + b * N + cols, m_j, mask=n_valid)
    tl.store(R + b * N + cols, tl.math.log2(l_j), mask=n_valid)


# ----------------------------------------------------------------------------------------------
# Forward, column softmax. Pass 2: out_i = sum_j exp2((S_ij - m_j) log2e - r_j) g_j, query-major.
# ----------------------------------------------------------------------------------------------
@triton.jit
def _known_lse_step(acc, q, k_ptrs, v_ptrs, m_ptrs, r_ptrs, start_n, N, offs_n, MASKED: tl.constexpr,
                    PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, POLY_PART: tl.constexpr):
    if MASKED:
        valid = (start_n + offs_n) < N
        k = tl.load(k_ptrs, mask=valid[:, None], other=0.0)
        v = tl.load(v_ptrs, mask=valid[:, None], other=0.0)
        mx = tl.load(m_ptrs, mask=valid, other=0.0)
        rr = tl.load(r_ptrs, mask=valid, other=0.0)
    else:
        k = tl.load(k_ptrs)
        v = tl.load(v_ptrs)
        mx = tl.load(m_ptrs)
        rr = tl.load(r_ptrs)
    s = tl.dot(q, tl.trans(k), input_precision=PREC)
    # Final weights, each <= 1: nothing to rescale later.
    # The polynomial exp2 (relative error 1.0e-4) only where the weights then meet a dot of at most
    # 10 mantissa bits (fp16, bf16, tf32): fp32 "highest" keeps every exp on the MUFU unit.
    x = _log2_weight(s, mx[None, :], rr[None, :])
    if PREC == "tf32":
        p = _exp2_split(x, BLOCK_M, BLOCK_N, POLY_PART)
    else:
        p = tl.math.exp2(x)
    if MASKED:
        p = tl.where(valid[None, :], p, 0.0)
    return acc + tl.dot(p.to(v.dtype), v, input_precision=PREC)


@_autotune(_KNOWN_LSE)
@triton.jit
def _fwd_known_lse_kernel(Q, K, V, O, M, R,
                          sqb, sqn, sqd, skb, skn, skd, svb, svn, svd, sob, son, sod,
                          N, N_BUCKET,
                          D: tl.constexpr, DV: tl.constexpr, PREC: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, POLY_PART: tl.constexpr):
    pid_m = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    offs_dv = tl.arange(0, DV)
    m_valid = offs_m < N
    rows = tl.cast(offs_m, tl.int64)
    q = tl.load(Q + b * sqb + rows[:, None] * sqn + offs_d[None, :] * sqd, mask=m_valid[:, None], other=0.0)
    k_base = K + b * skb
    k_off = offs_n[:, None] * skn + offs_d[None, :] * skd
    v_base = V + b * svb
    v_off = offs_n[:, None] * svn + offs_dv[None, :] * svd
    m_base = M + b * N
    r_base = R + b * N
    acc = tl.zeros([BLOCK_M, DV], tl.float32)
    n_full = (N // BLOCK_N) * BLOCK_N
    for start_n in range(0, n_full, BLOCK_N):
        st = tl.cast(start_n, tl.int64)
        acc = _known_lse_step(acc, q, (k_base + st * skn) + k_off, (v_base + st * svn) + v_off, m_base + st + offs_n,
                              r_base + st + offs_n, start_n, N, offs_n, False, PREC, BLOCK_M, BLOCK_N, POLY_PART)
    if n_full < N:
        st = tl.cast(n_full, tl.int64)
        acc = _known_lse_step(acc, q, (k_base + st * skn) + k_off, (v_base + st * svn) + v_off, m_base + st + offs_n,
                              r_base + st + offs_n, n_full, N, offs_n, True, PREC, BLOCK_M, BLOCK_N, POLY_PART)
    tl.store(O + b * sob + rows[:, None] * son + offs_dv[None, :] * sod, acc.to(O.dtype.element_ty),
             mask=m_valid[:, None])


# ----------------------------------------------------------------------------------------------
# Backward.
# ----------------------------------------------------------------------------------------------
@triton.jit
def _load_rows(ptrs, start, N, offs, MASKED: tl.constexpr):
    if MASKED:
        return tl.load(ptrs, mask=((start + offs) < N)[:, None], other=0.0)
    return tl.load(ptrs)


@triton.jit
def _load_vec(ptrs, start, N, offs, MASKED: tl.constexpr):
    if MASKED:
        return tl.load(ptrs, mask=(start + offs) < N, other=0.0)
    return tl.load(ptrs)




@triton.jit
def _kv_step(dk, dv, dacc, k, v, m_k, r_k, delta_k, q_ptrs, do_ptrs, m_ptrs, r_ptrs, dl_ptrs, start_m, N,
             offs_m, STATS_PER_KEY: tl.constexpr, WANT_DV: tl.constexpr, WANT_DK: tl.constexpr,
             MASKED: tl.constexpr, PREC: tl.constexpr):
    """One query block for a key-major program: P^T, then dV += P^T dY and D_j += sum_i P dP
    (loop 1 of the column softmax), or dV and/or dK += dS^T Q."""
    q = _load_rows(q_ptrs, start_m, N, offs_m, MASKED)
    do = _load_rows(do_ptrs, start_m, N, offs_m, MASKED)
    st = tl.dot(k, tl.trans(q), input_precision=PREC)           # (BLOCK_N, BLOCK_M)
    if STATS_PER_KEY:
        pt = _weight(st, m_k[:, None], r_k[:, None])
        delta = delta_k[:, None]
    else:
        pt = _weight(st, _load_vec(m_ptrs, start_m, N, offs_m, MASKED)[None, :],
                     _load_vec(r_ptrs, start_m, N, offs_m, MASKED)[None, :])
        delta = _load_vec(dl_ptrs, start_m, N, offs_m, MASKED)[None, :]
    if MASKED:
        pt = tl.where(((start_m + offs_m) < N)[None, :], pt, 0.0)
    if WANT_DV:
        dv += tl.dot(pt.to(do.dtype), do, input_precision=PREC)
    dpt = tl.dot(v, tl.trans(do), input_precision=PREC)          # (BLOCK_N, BLOCK_M): g_j . dY_i
    if WANT_DK:
        dst = pt * (dpt - delta)
        dk += tl.dot(dst.to(q.dtype), q, input_precision=PREC)
    else:
        dacc += tl.sum(pt * dpt, 1)
    return dk, dv, dacc


@triton.jit
def _kv_loop(dk, dv, dacc, k, v, m_k, r_k, delta_k, q_base, q_off, do_base, do_off, m_base, r_base, dl_base,
             N, offs_m, sqn, sdn, STATS_PER_KEY: tl.constexpr, WANT_DV: tl.constexpr, WANT_DK: tl.constexpr,
             BLOCK_M: tl.constexpr, PREC: tl.constexpr):
    m_full = (N // BLOCK_M) * BLOCK_M
    for start_m in range(0, m_full, BLOCK_M):
        st = tl.cast(start_m, tl.int64)
        dk, dv, dacc = _kv_step(dk, dv, dacc, k, v, m_k, r_k, delta_k, (q_base + st * sqn) + q_off,
                                (do_base + st * sdn) + do_off, m_base + st + offs_m, r_base + st + offs_m,
                                dl_base + st + offs_m, start_m, N, offs_m, STATS_PER_KEY, WANT_DV, WANT_DK,
                                False, PREC)
    if m_full < N:
        st = tl.cast(m_full, tl.int64)
        dk, dv, dacc = _kv_step(dk, dv, dacc, k, v, m_k, r_k, delta_k, (q_base + st * sqn) + q_off,
                                (do_base + st * sdn) + do_off, m_base + st + offs_m, r_base + st + offs_m,
                                dl_base + st + offs_m, m_full, N, offs_m, STATS_PER_KEY, WANT_DV, WANT_DK,
                                True, PREC)
    return dk, dv, dacc


@_autotune(_BWD_KV, key=_BWD_KEY)
@triton.jit
def _bwd_kv_kernel(Q, K, V, DO, M, R, DELTA, DK, DV_,
                   sqb, sqn, sqd, skb, skn, skd, svb, svn, svd, sdb, sdn, sdd,
                   sdkb, sdkn, sdkd, sdvb, sdvn, sdvd,
                   N, N_BUCKET,
                   D: tl.constexpr, DV: tl.constexpr, PREC: tl.constexpr, STATS_PER_KEY: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_n = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    offs_dv = tl.arange(0, DV)
    n_valid = offs_n < N
    cols = tl.cast(offs_n, tl.int64)
    k = tl.load(K + b * skb + cols[:, None] * skn + offs_d[None, :] * skd, mask=n_valid[:, None], other=0.0)
    v = tl.load(V + b * svb + cols[:, None] * svn + offs_dv[None, :] * svd, mask=n_valid[:, None], other=0.0)
    q_base = Q + b * sqb
    q_off = offs_m[:, None] * sqn + offs_d[None, :] * sqd
    do_base = DO + b * sdb
    do_off = offs_m[:, None] * sdn + offs_dv[None, :] * sdd
    m_base = M + b * N
    r_base = R + b * N
    dl_base = DELTA + b * N
    dk = tl.zeros([BLOCK_N, D], tl.float32)
    dv = tl.zeros([BLOCK_N, DV], tl.float32)
    if STATS_PER_KEY:
        # Column softmax: D_j needs a whole column first, so two loops over the queries. D_j is
        # summed as sum_i P_ij dP_ij (= g_j . dG_j in exact arithmetic) from the very P and dP that
        # loop 2 recomputes bit for bit: for a saturated column (P = 1 at one query, as 1e4-sized
        # scores give) dP - D then cancels exactly, as in PyTorch's softmax backward, instead of
        # leaving rounding noise of size eps * |dP| where the true gradient is ~0.
        m_k = tl.load(M + b * N + cols, mask=n_valid, other=0.0)
        r_k = tl.load(R + b * N + cols, mask=n_valid, other=0.0)
        zero = tl.zeros([BLOCK_N], tl.float32)
        dk, dv, delta_k = _kv_loop(dk, dv, zero, k, v, m_k, r_k, zero, q_base, q_off, do_base, do_off, m_base, r_base,
                                   dl_base, N, offs_m, sqn, sdn, True, True, False, BLOCK_M, PREC)
        tl.store(DELTA + b * N + cols, delta_k, mask=n_valid)
        dk, dv, delta_k = _kv_loop(dk, dv, delta_k, k, v, m_k, r_k, delta_k, q_base, q_off, do_base, do_off, m_base,
                                   r_base, dl_base, N, offs_m, sqn, sdn, True, False, True, BLOCK_M, PREC)
    else:
        # Row softmax: D_i per query comes from _bwd_q_kernel (run first): one loop does both.
        zero = tl.zeros([BLOCK_N], tl.float32)
        dk, dv, zero = _kv_loop(dk, dv, zero, k, v, zero, zero, zero, q_base, q_off, do_base, do_off, m_base, r_base,
                                dl_base, N, offs_m, sqn, sdn, False, True, True, BLOCK_M, PREC)
    tl.store(DK + b * sdkb + cols[:, None] * sdkn + offs_d[None, :] * sdkd, dk.to(DK.dtype.element_ty),
             mask=n_valid[:, None])
    tl.store(DV_ + b * sdvb + cols[:, None] * sdvn + offs_dv[None, :] * sdvd, dv.to(DV_.dtype.element_ty),
             mask=n_valid[:, None])


@triton.jit
def _q_step(dq, dacc, q, do, m_q, r_q, delta_q, k_ptrs, v_ptrs, m_ptrs, r_ptrs, dl_ptrs, start_n, N, offs_n,
            STATS_PER_KEY: tl.constexpr, WANT_DQ: tl.constexpr, MASKED: tl.constexpr, PREC: tl.constexpr):
    """One key block for a query-major program: dQ += dS K, or D_i += sum_j P dP (row softmax, loop 1)."""
    k = _load_rows(k_ptrs, start_n, N, offs_n, MASKED)
    v = _load_rows(v_ptrs, start_n, N, offs_n, MASKED)
    s = tl.dot(q, tl.trans(k), input_precision=PREC)            # (BLOCK_M, BLOCK_N)
    if STATS_PER_KEY:
        p = _weight(s, _load_vec(m_ptrs, start_n, N, offs_n, MASKED)[None, :],
                    _load_vec(r_ptrs, start_n, N, offs_n, MASKED)[None, :])
        delta = _load_vec(dl_ptrs, start_n, N, offs_n, MASKED)[None, :]
    else:
        p = _weight(s, m_q[:, None], r_q[:, None])
        delta = delta_q[:, None]
    if MASKED:
        p = tl.where(((start_n + offs_n) < N)[None, :], p, 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision=PREC)          # dY_i . g_j
    if WANT_DQ:
        ds = p * (dp - delta)
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PREC)
    else:
        dacc += tl.sum(p * dp, 1)
    return dq, dacc


@triton.jit
def _q_loop(dq, dacc, q, do, m_q, r_q, delta_q, k_base, k_off, v_base, v_off, m_base, r_base, dl_base,
            N, offs_n, skn, svn, STATS_PER_KEY: tl.constexpr, WANT_DQ: tl.constexpr, BLOCK_N: tl.constexpr,
            PREC: tl.constexpr):
    n_full = (N // BLOCK_N) * BLOCK_N
    for start_n in range(0, n_full, BLOCK_N):
        st = tl.cast(start_n, tl.int64)
        dq, dacc = _q_step(dq, dacc, q, do, m_q, r_q, delta_q, (k_base + st * skn) + k_off, (v_base + st * svn) + v_off,
                           m_base + st + offs_n, r_base + st + offs_n, dl_base + st + offs_n, start_n, N, offs_n,
                           STATS_PER_KEY, WANT_DQ, False, PREC)
    if n_full < N:
        st = tl.cast(n_full, tl.int64)
        dq, dacc = _q_step(dq, dacc, q, do, m_q, r_q, delta_q, (k_base + st * skn) + k_off, (v_base + st * svn) + v_off,
                           m_base + st + offs_n, r_base + st + offs_n, dl_base + st + offs_n, n_full, N, offs_n,
                           STATS_PER_KEY, WANT_DQ, True, PREC)
    return dq, dacc


@_autotune(_BWD_Q, key=_BWD_KEY)
@triton.jit
def _bwd_q_kernel(Q, K, V, DO, M, R, DELTA, DQ,
                  sqb, sqn, sqd, skb, skn, skd, svb, svn, svd, sdb, sdn, sdd, sdqb, sdqn, sdqd,
                  N, N_BUCKET,
                  D: tl.constexpr, DV: tl.constexpr, PREC: tl.constexpr, STATS_PER_KEY: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_m = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    offs_dv = tl.arange(0, DV)
    m_valid = offs_m < N
    rows = tl.cast(offs_m, tl.int64)
    q = tl.load(Q + b * sqb + rows[:, None] * sqn + offs_d[None, :] * sqd, mask=m_valid[:, None], other=0.0)
    do = tl.load(DO + b * sdb + rows[:, None] * sdn + offs_dv[None, :] * sdd, mask=m_valid[:, None], other=0.0)
    k_base = K + b * skb
    k_off = offs_n[:, None] * skn + offs_d[None, :] * skd
    v_base = V + b * svb
    v_off = offs_n[:, None] * svn + offs_dv[None, :] * svd
    m_base = M + b * N
    r_base = R + b * N
    dl_base = DELTA + b * N
    dq = tl.zeros([BLOCK_M, D], tl.float32)
    if STATS_PER_KEY:
        # Column softmax: statistics and D_j per key, loaded in the loop (D_j from _bwd_kv_kernel).
        zero = tl.zeros([BLOCK_M], tl.float32)
        dq, zero = _q_loop(dq, zero, q, do, zero, zero, zero, k_base, k_off, v_base, v_off, m_base, r_base, dl_base,
                           N, offs_n, skn, svn, True, True, BLOCK_N, PREC)
    else:
        # Row softmax: loop 1 sums D_i = sum_j P_ij dP_ij (exact cancellation for saturated rows, see
        # _bwd_kv_kernel; FlashAttention's dY . out differs from it by rounding), stores it for
        # _bwd_kv_kernel, loop 2 accumulates dQ.
        m_q = tl.load(M + b * N + rows, mask=m_valid, other=0.0)
        r_q = tl.load(R + b * N + rows, mask=m_valid, other=0.0)
        zero = tl.zeros([BLOCK_M], tl.float32)
        dq, delta_q = _q_loop(dq, zero, q, do, m_q, r_q, zero, k_base, k_off, v_base, v_off, m_base, r_base, dl_base,
                              N, offs_n, skn, svn, False, False, BLOCK_N, PREC)
        tl.store(DELTA + b * N + rows, delta_q, mask=m_valid)
        dq, delta_q = _q_loop(dq, delta_q, q, do, m_q, r_q, delta_q, k_base, k_off, v_base, v_off, m_base, r_base,
                              dl_base, N, offs_n, skn, svn, False, True, BLOCK_N, PREC)
    tl.store(DQ + b * sdqb + rows[:, None] * sdqn + offs_d[None, :] * sdqd, dq.to(DQ.dtype.element_ty),
             mask=m_valid[:, None])


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------
def unsupported_reason(theta: torch.Tensor, phi: torch.Tensor, g: torch.Tensor) -> str:
    """"" when the kernels take these inputs, else what is wrong (for error messages and "auto")."""
    if theta.dtype not in DTYPES or phi.dtype != theta.dtype or g.dtype != theta.dtype:
        return (f"dtype {theta.dtype} is not supported by the Triton kernel "
                f"(supported: {', '.join(str(t) for t in DTYPES)})")
    for name, dim in (("head dim d of theta/phi", theta.shape[-1]), ("value dim of g", g.shape[-1])):
        if dim not in HEAD_DIMS:
            return (f"{name} = {dim} is not supported by the Triton kernel "
                    f"(supported: {', '.join(map(str, HEAD_DIMS))})")
    return ""


def check_inputs(theta: torch.Tensor, phi: torch.Tensor, g: torch.Tensor, softmax_over: str) -> None:
    """Raise ValueError (shapes, head dims, softmax_over) or TypeError (dtype) for inputs the kernels refuse."""
    if softmax_over not in ("query", "key"):
        raise ValueError(f"softmax_over must be 'query' or 'key', got {softmax_over!r}")
    if theta.dim() != 3 or phi.shape != theta.shape or g.dim() != 3 or g.shape[:2] != theta.shape[:2]:
        raise ValueError(f"expected theta, phi (B, N, d) and g (B, N, dv), got {tuple(theta.shape)}, "
                         f"{tuple(phi.shape)}, {tuple(g.shape)}")
    reason = unsupported_reason(theta, phi, g)
    if reason:
        raise (TypeError if reason.startswith("dtype") else ValueError)(f"nonlocal_attention: {reason}")
    if theta.shape[0] > MAX_BATCH:
        raise ValueError(f"nonlocal_attention: batch {theta.shape[0]} exceeds the Triton kernel's {MAX_BATCH} "
                         f"(the batch is CUDA grid axis 1); split the batch")


# CUDA limits grid axis 1, which carries the batch, to 65535 blocks.
MAX_BATCH = 65535


def stats_shape(B: int, N: int) -> tuple[int, int, int]:
    """Shape of the saved softmax statistics ("lse" of the op): (2, B, N) fp32, see the docstring."""
    return (2, B, N)


def lse_natural(stats: torch.Tensor) -> torch.Tensor:
    """The natural-log LSE (B, N) from the saved statistics: m + ln 2 * r."""
    return stats[0] + math.log(2.0) * stats[1]


def fp32_matmul_highest() -> bool:
    """Whether torch asks for fp32-accurate fp32 matmuls: get_float32_matmul_precision() ==
    "highest", or, once the per-backend API was used (torch.backends.cuda.matmul.fp32_precision =
    "tf32" / "ieee", torch >= 2.9), its CUDA matmul setting: the legacy getter then raises."""
    try:
        return torch.get_float32_matmul_precision() == "highest"
    except RuntimeError:
        precision = torch.backends.cuda.matmul.fp32_precision
        if precision == "none":                  # unset for CUDA matmuls: the global setting holds
            precision = torch.backends.fp32_precision
        return precision != "tf32"               # "ieee", or "none" at both levels (the default)


def _precision(dtype: torch.dtype) -> str:
    if dtype != torch.float32:
        return "tf32"   # ignored for fp16/bf16 operands
    return FP32_HIGHEST_INPUT_PRECISION if fp32_matmul_highest() else "tf32"


def _bucket(n: int) -> int:
    # Tune once per power-of-two size class, not once per image size.
    return 1 << max(8, math.ceil(math.log2(max(n, 1))))


def _device_guard(t: torch.Tensor):
    """t's GPU made current while launching: Triton launches on the current device (and its
    current stream), so tensors on cuda:1 while cuda:0 is current need it. For CPU tensors (the
    interpreter) torch.cuda.device(-1), a documented no-op that initialises nothing."""
    return torch.cuda.device(t.device if t.is_cuda else -1)


def _grid_m(B, N):
    return lambda meta: (triton.cdiv(N, meta["BLOCK_M"]), B)


def _grid_n(B, N):
    return lambda meta: (triton.cdiv(N, meta["BLOCK_N"]), B)


def forward(theta: torch.Tensor, phi: torch.Tensor, g: torch.Tensor, softmax_over: str = "query"):
    """(out (B, N, dv) in g's dtype, stats (2, B, N) fp32 = (max score m, log2 of the sum r))."""
    check_inputs(theta, phi, g, softmax_over)
    B, N, D = theta.shape
    DV = g.shape[-1]
    out = torch.empty(B, N, DV, dtype=g.dtype, device=g.device)
    stats = torch.empty(stats_shape(B, N), dtype=torch.float32, device=g.device)
    if B == 0 or N == 0:
        return out, stats
    prec = _precision(theta.dtype)
    strides = (*theta.stride(), *phi.stride(), *g.stride(), *out.stride())
    with _device_guard(theta):
        if softmax_over == "key":
            _launch(_fwd_row_kernel, _grid_m(B, N), theta, phi, g, out, stats[0], stats[1], *strides, N,
                    _bucket(N), D=D, DV=DV, PREC=prec)
        else:
            _launch(_col_lse_kernel, _grid_n(B, N), theta, phi, stats[0], stats[1], *theta.stride(),
                    *phi.stride(), N, _bucket(N), D=D, DV=DV, PREC=prec)
            _launch(_fwd_known_lse_kernel, _grid_m(B, N), theta, phi, g, out, stats[0], stats[1], *strides, N,
                    _bucket(N), D=D, DV=DV, PREC=prec)
    return out, stats


def backward(dout, theta, phi, g, stats, softmax_over: str = "query", deterministic: bool = False):
    """(dtheta, dphi, dg) in the inputs' dtypes from the saved stats of `forward`.

    Always deterministic (no atomics; see the module docstring), so `deterministic` changes nothing.
    """
    check_inputs(theta, phi, g, softmax_over)
    B, N, D = theta.shape
    DV = g.shape[-1]
    if tuple(stats.shape) != stats_shape(B, N):
        raise ValueError(f"nonlocal_attention backward: stats must be {stats_shape(B, N)} (from this "
                         f"module's forward), got {tuple(stats.shape)}")
    dtheta, dphi, dg = torch.empty_like(theta), torch.empty_like(phi), torch.empty_like(g)
    if B == 0 or N == 0:
        return dtheta, dphi, dg
    if dout.dtype != g.dtype:
        dout = dout.to(g.dtype)
    stats = stats.to(torch.float32).contiguous()   # no-op for this module's own stats
    delta = torch.empty(B, N, dtype=torch.float32, device=g.device)
    prec = _precision(theta.dtype)
    per_key = softmax_over == "query"
    ins = (*theta.stride(), *phi.stride(), *g.stride(), *dout.stride())

    def kv():
        _launch(_bwd_kv_kernel, _grid_n(B, N), theta, phi, g, dout, stats[0], stats[1], delta, dphi, dg, *ins,
                *dphi.stride(), *dg.stride(), N, _bucket(N), D=D, DV=DV, PREC=prec, STATS_PER_KEY=per_key)

    def q():
        _launch(_bwd_q_kernel, _grid_m(B, N), theta, phi, g, dout, stats[0], stats[1], delta, dtheta, *ins,
                *dtheta.stride(), N, _bucket(N), D=D, DV=DV, PREC=prec, STATS_PER_KEY=per_key)

    # The kernel that owns the normalising index computes D first and stores it for the other.
    with _device_guard(theta):
        for launch in ((kv, q) if per_key else (q, kv)):
            launch()
    return dtheta, dphi, dg
