"""GPU architectures without a GPU: which CUDA paths run on which compute capability (faked
torch.cuda answers), the fallbacks and errors that follow, the architectures the built extension
holds (cuobjdump), and the Triton kernels compiled in a subprocess without the interpreter: the
untuned defaults for sm_80, sm_86 and sm_89 (sm_90: tests/test_instruction_mix.py), and why sm_75
is left to the reference (no tensor-core dots)."""
import importlib
import importlib.util
import json
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import rnan_fast
from rnan_fast import _ext

gate_op = importlib.import_module("rnan_fast.ops.gated_residual")          # the modules, not the functions
attention_op = importlib.import_module("rnan_fast.ops.nonlocal_attention")

REPO = Path(__file__).resolve().parents[1]


def _cuobjdump() -> str:
    """The CUDA toolkit's cuobjdump, else the one Triton bundles ("" if neither)."""
    candidates = [os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "cuobjdump")]
    spec = importlib.util.find_spec("triton")
    if spec is not None:
        candidates.append(os.path.join(os.path.dirname(spec.origin), "backends", "nvidia", "bin", "cuobjdump"))
    return next((c for c in candidates if os.access(c, os.X_OK)), "")


CUOBJDUMP = _cuobjdump()
GATE_BUILD = (75, 80, 86, 89, 90), (90,)    # setup.py's default: SASS sm_75..sm_90, PTX compute_90


@pytest.mark.parametrize("capability,sass,ptx,runs", [
    ((7, 5), *GATE_BUILD, True),
    ((8, 7), *GATE_BUILD, True),        # Orin: sm_86 SASS runs on 8.7 (same major, newer minor)
    ((10, 0), *GATE_BUILD, True),       # B200: only through compute_90 PTX
    ((12, 0), *GATE_BUILD, True),
    ((7, 0), *GATE_BUILD, False),       # older than every SASS and PTX
    ((8, 6), (90,), (), False),         # the old default "9.0" on an RTX 30
    ((8, 0), (86,), (), False),         # SASS never runs on an older minor
    ((10, 0), (90,), (), False),        # nor on another major
    ((9, 0), (90,), (), True),
    ((8, 9), (), (80,), True),          # PTX runs on anything at least as new
])
def test_image_runs_follows_cuda_compatibility(capability, sass, ptx, runs):
    assert _ext.image_runs(capability, sass, ptx) is runs


@pytest.fixture
def fake_gpu(monkeypatch):
    """set(capability, sass=..., ptx=...): torch.cuda answers for one GPU of that capability, the
    extension as built for `sass` / `ptx`; the per-device caches are cleared before and after."""
    monkeypatch.setattr(_ext, "EXTENSION", True)
    monkeypatch.setattr(_ext, "EXTENSION_CUDA", True)
    monkeypatch.setattr(_ext, "_WARNED", set())

    def set_gpu(capability, sass=GATE_BUILD[0], ptx=GATE_BUILD[1], shared=232_448):
        monkeypatch.setattr(_ext, "CUDA_SASS", tuple(sass))
        monkeypatch.setattr(_ext, "CUDA_PTX", tuple(ptx))
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Fake GPU")
        monkeypatch.setattr(torch.cuda, "get_device_properties",
                            lambda device=None: SimpleNamespace(shared_memory_per_block_optin=shared))
        _ext._device_checks.cache_clear()
    yield set_gpu
    _ext._device_checks.cache_clear()


def test_device_support_names_what_cannot_run(fake_gpu):
    fake_gpu((8, 6), sass=(90,), ptx=())
    ok, reason = _ext.cuda_device_support("cuda:0")
    assert not ok and reason.startswith("gate: ") and "sm_86" in reason and 'TORCH_CUDA_ARCH_LIST="8.6"' in reason
    assert "attention" not in reason and _ext.triton_cuda_why_not(0) == ""
    info = rnan_fast.backend_info()
    assert info["extension_cuda_archs"] == "sm_90"
    assert [d["capability"] for d in info["cuda_devices"]] == [(8, 6)]
    assert info["cuda_devices"][0]["gate"] == _ext.gate_cuda_why_not(torch.device("cuda", 0))

    fake_gpu((7, 5))
    ok, reason = _ext.cuda_device_support(0)
    assert not ok and reason.startswith("attention: ") and "8.0" in reason and "gate" not in reason
    fake_gpu((9, 0))
    assert _ext.cuda_device_support(torch.device("cuda")) == (True, "")
    fake_gpu((8, 9))
    assert _ext.cuda_device_support(0) == (True, "")
    with pytest.raises(ValueError, match="CUDA device"):
        _ext.cuda_device_support("cpu")


def test_device_checks_run_once_per_device(fake_gpu, monkeypatch):
    fake_gpu((8, 0))
    calls = []
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: calls.append(device) or (8, 0))
    for _ in range(3):
        _ext.gate_cuda_why_not(0)
        _ext.triton_cuda_why_not("cuda:0")
        _ext.cuda_device_support(0)
    assert calls == [0]


def _chosen(module, monkeypatch):
    """Records the kernel each call of `module`'s registered op is given (instead of running it)."""
    chosen = []

    def record(*args):
        chosen.append(args[-1])
        return (args[0], args[0]) if module is attention_op else args[0]
    monkeypatch.setattr(module, "_forward", record)
    return chosen


def test_gate_falls_back_on_a_gpu_it_was_not_compiled_for(fake_gpu, monkeypatch):
    chosen = _chosen(gate_op, monkeypatch)
    fake_gpu((8, 6), sass=(90,), ptx=())
    with FakeTensorMode():
        x = torch.empty(2, 8, device="cuda")
        with pytest.warns(RuntimeWarning, match="gated_residual runs on the reference on cuda:0: .*sm_86"):
            rnan_fast.ops.gated_residual(x, x, x)
        with warnings.catch_warnings():
            warnings.simplefilter("error")        # said once per GPU
            rnan_fast.ops.gated_residual(x, x, x, backend="auto")
        with pytest.raises(RuntimeError, match="backend 'extension' asked for, but .*compiled for sm_90"):
            rnan_fast.ops.gated_residual(x, x, x, backend="extension")
        rnan_fast.set_backend("fast")
        with pytest.raises(RuntimeError, match="backend 'fast' asked for, but .*sm_86"):
            rnan_fast.ops.gated_residual(x, x, x)
    assert chosen == ["reference", "reference"]

    fake_gpu((8, 6))                              # the default build runs there
    rnan_fast.set_backend("auto")
    with FakeTensorMode():
        x = torch.empty(2, 8, device="cuda")
        rnan_fast.ops.gated_residual(x, x, x)
    assert chosen[-1] == "extension"


def test_attention_falls_back_below_sm80(fake_gpu, monkeypatch):
    pytest.importorskip("triton")
    chosen = _chosen(attention_op, monkeypatch)
    fake_gpu((7, 5))
    with FakeTensorMode():
        q = torch.empty(1, 64, 32, device="cuda", dtype=torch.float16)
        with pytest.warns(RuntimeWarning, match="nonlocal_attention runs on the reference on cuda:0: .*8.0"):
            rnan_fast.ops.nonlocal_attention(q, q, q)
        with pytest.raises(RuntimeError, match="backend 'triton' asked for, but .*sm_75"):
            rnan_fast.ops.nonlocal_attention(q, q, q, backend="triton")
        with pytest.raises(RuntimeError, match="backend 'fast' asked for"):
            rnan_fast.ops.nonlocal_attention(q, q, q, backend="fast")
    assert chosen == ["reference"]
    fake_gpu((8, 0))
    with FakeTensorMode():
        q = torch.empty(1, 64, 32, device="cuda", dtype=torch.float16)
        rnan_fast.ops.nonlocal_attention(q, q, q)
    assert chosen[-1] == "triton"


# ---- the extension as built ---------------------------------------------------------------

@pytest.mark.skipif(not _ext.EXTENSION_CUDA, reason="rnan_fast._C was built without CUDA")
@pytest.mark.skipif(not CUOBJDUMP, reason="needs cuobjdump (CUDA toolkit, or Triton's bundled one)")
def test_built_extension_holds_the_recorded_architectures():
    """The SASS and PTX inside rnan_fast._C are exactly what it reports (and setup.py printed)."""
    from rnan_fast import _C

    sass, ptx = _C.cuda_archs()
    assert sass or ptx, "a CUDA build must record its architectures"
    elf = subprocess.run([CUOBJDUMP, "--list-elf", _C.__file__], capture_output=True, text=True, check=True).stdout
    listed_ptx = subprocess.run([CUOBJDUMP, "--list-ptx", _C.__file__], capture_output=True, text=True,
                                check=True).stdout
    assert {int(a) for a in re.findall(r"\.sm_(\d+)a?\.cubin", elf)} == set(sass), elf
    assert {int(a) for a in re.findall(r"\.sm_(\d+)a?\.ptx", listed_ptx)} == set(ptx), listed_ptx
    assert (_ext.CUDA_SASS, _ext.CUDA_PTX) == (tuple(sass), tuple(ptx))


# ---- Triton's untuned defaults on each architecture -----------------------------------------

COMPILE_SCRIPT = """
import concurrent.futures, json, os
import torch
from benchmarks import instruction_mix as im
from rnan_fast.kernels import nonlocal_attention as K

KERNELS = ("_fwd_row_kernel", "_col_lse_kernel", "_fwd_known_lse_kernel", "_bwd_kv_kernel", "_bwd_q_kernel")

def cases():
    for capability, d in im.SM8X_TARGETS:
        for name in KERNELS:
            for per_key in ((True, False) if name.startswith("_bwd") else (True,)):
                for kind in im.KINDS:
                    yield capability, name, per_key, kind, d

def one(case):
    capability, name, per_key, kind, d = case
    dtype, prec = im.KINDS[kind]
    tdtype = getattr(torch, im.TORCH_DTYPES[dtype])
    config = K.default_config(name, tdtype, prec, d, per_key, K._SM8X)
    r = im.resources(im.compile_for(getattr(K, name), config, dtype, d, prec, per_key, capability))
    return {"capability": capability, "kernel": name, "per_key": per_key, "kind": kind, "d": d,
            "config": str(config), "bound": K.shared_bytes_bound(name, config, tdtype, prec, d, d), **r}

def mma(capability):
    # one fp16 tile of column pass 2: does Triton use the tensor cores on this GPU?
    config = K._configs([(64, 64, 4, 1, 0)])[0]
    ops = im.sass(im.compile_for(K._fwd_known_lse_kernel, config, "fp16", 16, "tf32", True, capability))
    return sum(1 for line in ops.splitlines() if "MMA" in line)

with concurrent.futures.ProcessPoolExecutor(os.cpu_count()) as pool:
    mmas = {c: pool.submit(mma, c) for c in (75, 80)}
    results = list(pool.map(one, cases()))
    print(json.dumps({"defaults": results, "mma": {c: f.result() for c, f in mmas.items()}}))
"""


@pytest.fixture(scope="module")
def sm8x_compiled():
    """Every sm_8x default compiled for sm_80, sm_86 and sm_89 at d = 16, 32 and 64 (ptxas spills
    differ between sm_80 and sm_86 and are not monotone in d): 315 kernels, 1-20 s each the first
    time, then from Triton's cache."""
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "0", "RNAN_FAST_AUTOTUNE": "0", "PYTHONPATH": str(REPO)}
    run = subprocess.run([sys.executable, "-c", COMPILE_SCRIPT], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=3600)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


def test_sm8x_defaults_are_spill_free_and_fit_shared_memory(sm8x_compiled):
    """fp16 / bf16 / fp32 (tf32, tf32x3, ieee dots), both softmax modes, forward and backward:
    no spills, within the GPU's shared memory (99 KB on sm_86/89), and within shared_bytes_bound,
    the estimate autotuning prunes by."""
    from rnan_fast.kernels import nonlocal_attention as K

    results = sm8x_compiled["defaults"]
    assert len(results) == 7 * 5 * 3 * 3
    bad = [(r["capability"], r["kernel"], r["per_key"], r["kind"], r["d"], r["config"], r["spill_bytes"],
            r["shared_bytes"], r["bound"]) for r in results
           if r["spill_bytes"] or r["shared_bytes"] > min(K.SHARED_MEMORY[r["capability"]], r["bound"])]
    assert not bad, bad


def test_triton_has_no_tensor_core_dots_below_sm80(sm8x_compiled):
    """Why the Triton attention is not used below sm_80 (rnan_fast._ext.TRITON_MIN_CAPABILITY):
    compiled for sm_75 its dots hold no MMA instruction; for sm_80 they do."""
    mma = {int(k): v for k, v in sm8x_compiled["mma"].items()}
    assert mma[75] == 0 and mma[80] > 0, mma
    assert _ext.TRITON_MIN_CAPABILITY == (8, 0)


def test_device_limits_pick_the_table_and_prune_by_shared_memory(fake_gpu):
    """The defaults table and the shared memory of a (faked) GPU, and the autotuning prune: every
    kept candidate's bound fits the GPU, and a 99 KB GPU loses candidates a 227 KB one keeps."""
    import triton

    from rnan_fast.kernels import nonlocal_attention as K

    expected = {((9, 0), 232_448): K._SM90, ((10, 0), 232_448): K._SM90, ((8, 0), 166_912): K._SM8X,
                ((8, 6), 101_376): K._SM8X, ((8, 9), 101_376): K._SM8X, ((12, 0), 101_376): K._SM8X}
    configs = [triton.Config({"BLOCK_M": e[0], "BLOCK_N": e[1]}, num_warps=e[2], num_stages=e[3])
               for e in K._ENTRIES["_bwd_kv_kernel"]]
    kept = {}
    for (capability, shared), table in expected.items():
        fake_gpu(capability, shared=shared)
        K._device_limits.cache_clear()
        try:
            assert K._device_limits(0) == (table, shared)
            with FakeTensorMode():
                q = torch.empty(1, 64, 64, device="cuda")
                pruned = K._prune("_bwd_kv_kernel", configs, {"Q": q}, PREC="tf32", D=64, DV=64, STATS_PER_KEY=True)
            assert pruned and all(K.shared_bytes_bound("_bwd_kv_kernel", c, torch.float32, "tf32", 64, 64) <= shared
                                  for c in pruned)
            kept[shared] = len(pruned)
        finally:
            K._device_limits.cache_clear()
    assert kept[101_376] < kept[232_448] <= len(configs)
