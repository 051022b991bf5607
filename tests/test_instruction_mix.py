"""benchmarks/instruction_mix.py: compiles for sm_90 without a GPU (Triton's bundled ptxas and
nvdisasm), in a subprocess because this test session may run Triton through its interpreter."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from rnan_fast import _ext

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(not _ext.triton_available(), reason="needs Triton")

# Pass 2 of the column forward at its 128 x 128 tile, all exps on the MUFU unit and 1/8 of them by
# the polynomial: per-score figures of the hot loop.
SCRIPT = """
import json, triton
from benchmarks import instruction_mix as im
from rnan_fast.kernels import nonlocal_attention as K
out = {}
for part in (0, 8):
    cfg = triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "POLY_PART": part}, num_warps=8, num_stages=2)
    out[part] = im.mix(K._fwd_known_lse_kernel, cfg, "bf16", 32)
print(json.dumps(out))
"""


def test_polynomial_slices_stay_in_registers_and_unload_the_mufu():
    env = {**os.environ, "TRITON_INTERPRET": "0", "RNAN_FAST_AUTOTUNE": "0", "PYTHONPATH": str(REPO)}
    run = subprocess.run([sys.executable, "-c", SCRIPT], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    mix = {int(k): v for k, v in json.loads(run.stdout.strip().splitlines()[-1]).items()}
    for part, m in mix.items():
        assert not m["spills"] and m["moves_in_loop"] == 0, (part, m)
        assert 3 < m["instr_per_score"] < 12, (part, m)
    assert mix[0]["mufu_per_score"] == pytest.approx(1.0)
    assert mix[8]["mufu_per_score"] == pytest.approx(7 / 8)
    assert mix[8]["bound_mclk"] < mix[0]["bound_mclk"], mix


# Every untuned default (tests/conftest.py turns tuning off, as the GPU check does) and every
# pass-2 config the tests force, compiled for sm_90: registers, spills, shared memory.
RESOURCES_SCRIPT = """
import concurrent.futures, json, os, sys
import torch
from benchmarks import instruction_mix as im
from rnan_fast.kernels import nonlocal_attention as K
import test_nonlocal_attention as T

KINDS = {"fp16": (torch.float16, "tf32"), "bf16": (torch.bfloat16, "tf32"), "tf32": (torch.float32, "tf32"),
         "tf32x3": (torch.float32, "tf32x3"), "ieee": (torch.float32, "ieee")}
NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
KERNELS = ("_fwd_row_kernel", "_col_lse_kernel", "_fwd_known_lse_kernel", "_bwd_kv_kernel", "_bwd_q_kernel")

def defaults():
    for name in KERNELS:
        for per_key in ((True, False) if name.startswith("_bwd") else (True,)):
            for kind in KINDS:
                for d in K.HEAD_DIMS:
                    yield "default", name, per_key, kind, d, None

def forced():
    for dtype, kind in ((torch.float32, "tf32"), (torch.bfloat16, "bf16")):
        for i, (config, *_, d, _layout) in enumerate(T.pass2_cases(K.KNOWN_LSE_CONFIGS, dtype)):
            yield "forced", "_fwd_known_lse_kernel", True, kind, d, i

def one(case):
    what, name, per_key, kind, d, index = case
    dtype, prec = KINDS[kind]
    config = K.default_config(name, dtype, prec, d) if index is None else K.KNOWN_LSE_CONFIGS[index]
    r = im.resources(im.compile_for(getattr(K, name), config, NAMES[dtype], d, prec, per_key))
    r["bound"] = K.shared_bytes_bound(name, config, dtype, prec, d, d)
    if index is not None:
        r["estimate"] = T.pass2_shared_bytes(config, dtype.itemsize, d)
    return {"what": what, "kernel": name, "stats_per_key": per_key, "kind": kind, "d": d, "config": str(config), **r}

with concurrent.futures.ProcessPoolExecutor(os.cpu_count()) as pool:
    print(json.dumps(list(pool.map(one, [*defaults(), *forced()]))))
"""


@pytest.fixture(scope="module")
def sm90_resources():
    """Compiled for sm_90 in a subprocess (one process per core): ~130 kernels, 1-10 s each the first
    time, then from Triton's cache."""
    env = {**os.environ, "TRITON_INTERPRET": "0", "RNAN_FAST_AUTOTUNE": "0",
           "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")])}
    run = subprocess.run([sys.executable, "-c", RESOURCES_SCRIPT], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=1800)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


def test_untuned_defaults_are_spill_free_on_sm90(sm90_resources):
    """fp16 / bf16 / fp32 (tf32, tf32x3, ieee dots) at d = 16, 32, 64, both softmax modes, forward
    and backward: ptxas keeps every default config in registers (spills would turn every GPU test
    and untuned call into local-memory traffic: fp32 d = 64 spilled over 1 KB per thread before)."""
    defaults = [r for r in sm90_resources if r["what"] == "default"]
    assert len(defaults) == 7 * 5 * 3
    spilling = [(r["kernel"], r["stats_per_key"], r["kind"], r["d"], r["config"], r["spill_bytes"])
                for r in defaults if r["spill_bytes"]]
    assert not spilling, spilling
    assert all(r["n_regs"] <= 255 and r["shared_bytes"] <= min(232_448, r["bound"]) for r in defaults), \
        [r for r in defaults if r["shared_bytes"] > r["bound"]]   # the bound autotuning prunes by


def test_forced_pass2_configs_stay_well_inside_shared_memory(sm90_resources):
    """The pass-2 configs the tests force (pass2_cases) need at most 85% of sm_90's 232,448 B, and
    the estimate that picks their head dim is an upper bound of what ptxas allots."""
    forced = [r for r in sm90_resources if r["what"] == "forced"]
    assert forced and {r["kind"] for r in forced} == {"tf32", "bf16"}
    for r in forced:
        assert r["shared_bytes"] <= r["estimate"] <= 0.85 * 232_448, r
