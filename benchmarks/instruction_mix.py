"""Static instruction mix of the attention kernels' hot loops, compiled for sm_90 without a GPU.

    python benchmarks/instruction_mix.py                      # column forward, pass 2, bf16, d = 32
    python benchmarks/instruction_mix.py --kernel _col_lse_kernel --dtype fp32 --d 64
    python benchmarks/instruction_mix.py --defaults       # untuned defaults for sm_80-89 (_SM8X_DEFAULTS)

For each config of the kernel's tuning list: the SASS instructions per score of its largest loop
(per thread per iteration x threads / scores per iteration), the MUFU (ex2) instructions per
score, and the two bounds they set on an SM, in milli-clocks per score: issue = instructions / 128
(4 schedulers x 32 lanes per clock) and MUFU = ex2 / 16 (16 per clock). The larger is the
kernel's floor when the tensor cores and memory keep up; MUFU alone on 132 SMs at 1.98 GHz is
the measured 4.1e12 exp/s. Also: shared memory, register spills (stack bytes, `resources`), and
STS/SHFL inside the loop (data moved between threads, e.g. by a layout conversion).
A prediction, not a measurement: it ignores latencies, the tensor cores' time and the memory.
Where ptxas unrolls a loop the figures count several iterations as one: every kernel computes
one exp per score (pass 1 slightly more for its rescale; fewer with POLY_PART), so an ex2/score
of 2.00 means two iterations per loop body, and every figure of that row is to be halved.
Needs Triton's bundled ptxas and nvdisasm, no GPU.
"""
from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from rnan_fast.kernels import nonlocal_attention as K

ISSUE_PER_CLK, MUFU_PER_CLK = 128, 16
STATS = {"M", "R", "DELTA"}                 # fp32 statistics pointers; other pointers take the dtype
DTYPES = ("fp32", "fp16", "bf16")      # Triton's names, as pointer types take them
_INSTR = re.compile(r"\s*/\*([0-9a-f]+)\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_]+(?:\.[A-Z0-9_.]+)?)(.*)")


def compile_for(kernel, config: triton.Config, dtype: str, d: int, prec: str, stats_per_key: bool = True,
                capability: int = 90):
    """Compile an autotuned kernel of kernels/nonlocal_attention.py for sm_`capability` (75, 80,
    86, 89, 90: 10 * major + minor) with `config`, as the launcher specialises it: contiguous
    (B, N, d) inputs (unit last stride, other strides and all pointers multiples of 16) and an N
    of no known divisibility."""
    fn = kernel.fn
    consts = {"D": d, "DV": d, "PREC": prec, "STATS_PER_KEY": stats_per_key, **config.kwargs}
    sig, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in consts:
            sig[name] = "constexpr"
        elif name.startswith("s") and name.endswith("d"):       # sqd, skd, ...: unit feature stride
            sig[name], consts[name] = "constexpr", 1
        elif name.isupper() and name not in ("N", "N_BUCKET"):     # Q, K, ..., DV_: pointers
            sig[name] = "*fp32" if name in STATS else "*" + dtype
            attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            sig[name] = "i32"
            if name.startswith("s"):
                attrs[(i,)] = [["tt.divisibility", 16]]
    consts = {k: v for k, v in consts.items() if k in fn.arg_names}
    src = ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", capability, 32),
                          options={"num_warps": config.num_warps, "num_stages": config.num_stages})


def _cubin_tool(compiled, tool: str, *args: str) -> str:
    """stdout of Triton's bundled `tool` (nvdisasm, cuobjdump) run on the kernel's cubin."""
    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", tool)
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        return subprocess.run([path, *args, f.name], capture_output=True, text=True, check=True).stdout


def sass(compiled) -> str:
    return _cubin_tool(compiled, "nvdisasm", "-c")


def resources(compiled) -> dict:
    """What ptxas gave the kernel (cuobjdump -res-usage): registers per thread, stack bytes per
    thread (these kernels have no local arrays, so stack = register spills) and shared memory."""
    usage = re.search(r"REG:(\d+) STACK:(\d+)", _cubin_tool(compiled, "cuobjdump", "-res-usage"))
    return {"n_regs": int(usage.group(1)), "spill_bytes": int(usage.group(2)), "shared_bytes": compiled.metadata.shared}


def loops(text: str):
    """[(Counter of opcodes)] of each innermost loop body: the code from a label to a branch back
    to it, containing no other such body."""
    instrs, label_at, pending = [], {}, []
    for line in text.splitlines():
        m = re.match(r"\s*\.(L_x_\d+):", line)
        if m:
            pending.append(m.group(1))
            continue
        m = _INSTR.match(line)
        if m:
            addr = int(m.group(1), 16)
            label_at.update({p: addr for p in pending})
            pending = []
            instrs.append((addr, m.group(2), m.group(3)))
    spans = []
    for addr, op, rest in instrs:
        target = re.search(r"`\(\.(L_x_\d+)\)", rest) if op.startswith("BRA") else None
        if target and label_at.get(target.group(1), addr + 1) <= addr:
            spans.append((label_at[target.group(1)], addr))
    inner = [(lo, hi) for lo, hi in spans if not any(lo <= a and b <= hi and (a, b) != (lo, hi) for a, b in spans)]
    return [collections.Counter(o for a, o, _ in instrs if lo <= a <= hi) for lo, hi in inner]


def mix(kernel, config, dtype="bf16", d=32, prec="tf32", stats_per_key=True) -> dict:
    """Per-score figures of the largest innermost loop of `kernel` compiled with `config` (see the
    docstring; of the column backward's two loops over the queries, that is the dK loop)."""
    compiled = compile_for(kernel, config, dtype, d, prec, stats_per_key)
    text = sass(compiled)
    body = max(loops(text), key=lambda c: sum(c.values()))
    per_thread = config.kwargs["BLOCK_M"] * config.kwargs["BLOCK_N"] / (32 * config.num_warps)
    instr = sum(body.values()) / per_thread
    mufu = sum(v for k, v in body.items() if k.startswith("MUFU")) / per_thread
    return {"instr_per_score": instr, "mufu_per_score": mufu,
            "issue_mclk": 1e3 * instr / ISSUE_PER_CLK, "mufu_mclk": 1e3 * mufu / MUFU_PER_CLK,
            "bound_mclk": 1e3 * max(instr / ISSUE_PER_CLK, mufu / MUFU_PER_CLK),
            "shared_bytes": compiled.metadata.shared, "spills": resources(compiled)["spill_bytes"] > 0,
            "moves_in_loop": sum(v for k, v in body.items() if k.split(".")[0] in ("STS", "SHFL"))}


KINDS = {"fp16": ("fp16", "tf32"), "bf16": ("bf16", "tf32"), "tf32": ("fp32", "tf32"), "tf32x3": ("fp32", "tf32x3"),
         "ieee": ("fp32", "ieee")}      # operand kind -> (Triton dtype, dot precision)
TORCH_DTYPES = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}


def fits(compiled, capability: int) -> bool:
    """No register spills, and shared memory within sm_`capability`'s (K.SHARED_MEMORY)."""
    r = resources(compiled)
    return r["spill_bytes"] == 0 and r["shared_bytes"] <= K.SHARED_MEMORY[capability]


SM8X_TARGETS = tuple((capability, d) for capability in (80, 86, 89) for d in K.HEAD_DIMS)


def first_fitting(name: str, kind: str, stats_per_key: bool, targets=SM8X_TARGETS):
    """The first config, of the sm_90 default at d = 64 and then ever smaller tiles (area, then
    stages, then warps, descending) of its list and of 16-64 x 16-64 tiles with 4 or 8 warps and
    1-2 stages, that compiles without spills and within the GPU's shared memory for every
    (capability, head dim) of `targets` (ptxas spills differ between sm_80 and sm_86, and are not
    monotone in d). Returns the entry tuple, or None."""
    import torch

    dtype, prec = KINDS[kind]
    first = K.default_config(name, getattr(torch, TORCH_DTYPES[dtype]), prec, 64)
    head = K.config_tile(first)
    tail = (first.kwargs["POLY_PART"],) if "POLY_PART" in first.kwargs else ()
    small = [(a, b, w, st) for a in (64, 32, 16) for b in (64, 32, 16) for w in (4, 8) for st in (1, 2)]
    smaller = {tuple(e[:4]) for e in K._ENTRIES[name] + small if e[0] * e[1] <= head[0] * head[1]} - {head}
    for entry in [head] + sorted(smaller, key=lambda e: (-e[0] * e[1], -e[3], -e[2])):
        config = K._configs([entry + tail])[0]
        if all(fits(compile_for(getattr(K, name), config, dtype, d, prec, stats_per_key, capability), capability)
               for capability, d in targets):
            return entry + tail
    return None


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kernel", default="_fwd_known_lse_kernel",
                    choices=["_fwd_known_lse_kernel", "_col_lse_kernel", "_fwd_row_kernel", "_bwd_kv_kernel",
                             "_bwd_q_kernel"])
    ap.add_argument("--dtype", default="bf16", choices=DTYPES)
    ap.add_argument("--d", type=int, default=32, choices=list(K.HEAD_DIMS))
    ap.add_argument("--prec", default="tf32", choices=["tf32", "tf32x3", "ieee"],
                    help="dot precision of fp32 inputs (ignored for fp16/bf16)")
    ap.add_argument("--row-mode", action="store_true", help="backward kernels: row softmax (default column)")
    ap.add_argument("--defaults", action="store_true",
                    help="instead: for each kernel, operand kind and softmax mode, the first config that "
                         "compiles for sm_80, sm_86 and sm_89 at d = 16, 32 and 64 without spills and within "
                         "their shared memory (the entries of _SM8X_DEFAULTS)")
    ap.add_argument("--only", nargs="*", default=None, metavar="KERNEL:MODE:KIND",
                    help="with --defaults: just these entries, e.g. _bwd_kv_kernel:row:fp16")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        ap.error("unset TRITON_INTERPRET: this compiles for real GPUs")
    if args.defaults:
        for name in ap._option_string_actions["--kernel"].choices:
            for mode in (("col", "row") if name.startswith("_bwd") else ("col",)):
                for kind in KINDS:
                    if args.only is None or f"{name}:{mode}:{kind}" in args.only:
                        print(f"{name} {mode} {kind}: {first_fitting(name, kind, mode == 'col')}", flush=True)
        return
    kernel = getattr(K, args.kernel)
    print(f"{args.kernel} {args.dtype} d={args.d} prec={args.prec}: milli-clocks per score per SM")
    print(f"{'config':<44} {'instr':>6} {'ex2':>5} {'issue':>6} {'MUFU':>6} {'bound':>6} {'smem':>7} spill moves")
    for config in kernel.configs:   # the whole tuning list
        name = " ".join(f"{k}={v}" for k, v in config.kwargs.items()) + f" w{config.num_warps} s{config.num_stages}"
        try:
            r = mix(kernel, config, args.dtype, args.d, args.prec, not args.row_mode)
        except Exception as e:   # e.g. out of shared memory: report and go on with the others
            print(f"{name:<44} failed: {type(e).__name__}: {str(e).splitlines()[-1][:80]}")
            continue
        print(f"{name:<44} {r['instr_per_score']:6.2f} {r['mufu_per_score']:5.2f} {r['issue_mclk']:6.1f} "
              f"{r['mufu_mclk']:6.1f} {r['bound_mclk']:6.1f} {r['shared_bytes']:7d} {r['spills']!s:>5} "
              f"{r['moves_in_loop']:5d}")


if __name__ == "__main__":
    main()
