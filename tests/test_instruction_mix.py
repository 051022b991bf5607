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
