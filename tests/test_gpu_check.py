"""scripts/gpu_check.sh and scripts/bundle_shared.py, checked without a GPU.

The bundle: made from the shared folder, it must satisfy the tests' shared-data fixtures with
RNAN_FAST_REQUIRE_SHARED=1 (a subprocess pointing RNAN_FAST_SHARED at it). The check: a dry run
with a stand-in python whose build fails, whose backend lacks CUDA (the real interpreter: this
machine has none), one of whose test groups fails and whose attention benchmark hangs past its
budget; every stage must still report, in order, with its JSON, and the hang must be cut off.
"""
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

import rnan_fast
from rnan_fast.data import list_images

REPO = Path(__file__).resolve().parents[1]
CHECK = REPO / "scripts" / "gpu_check.sh"
sys.path.insert(0, str(REPO / "scripts"))
import bundle_shared  # noqa: E402


# ------------------------------------------------------------------------------------------------
# The bundle
# ------------------------------------------------------------------------------------------------
PROBE = '''
def test_bundle_serves_the_fixtures(shared_dir, fixtures_dir, data_dir, official_tiny, official_manifest):
    import os
    from pathlib import Path
    assert shared_dir == Path(os.environ["RNAN_FAST_SHARED"])
    assert {p.name for p, _ in official_tiny} >= {"official_dn_rgb_tiny.pt", "official_sr2_tiny.pt"}
    assert len(official_manifest) == 7
    for folder in ("Kodak24", "CBSD68", "Set12"):
        assert (data_dir / folder).is_dir()
'''


@pytest.fixture(scope="module")
def bundle(shared_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("bundle") / ".gpu_shared"
    run = subprocess.run([sys.executable, str(REPO / "scripts" / "bundle_shared.py"), "--shared", str(shared_dir),
                          "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "MiB" in run.stdout
    return out


def test_bundle_is_small_and_holds_what_the_gpu_tests_read(bundle, shared_dir):
    files = [p for p in bundle.rglob("*") if p.is_file()]
    size = sum(p.stat().st_size for p in files)
    assert 5 * 2**20 < size < 32 * 2**20, size          # a few MB: well inside the 64 MiB that travels
    for rel in [f.relative_to(bundle) for f in files]:
        assert (bundle / rel).read_bytes() == (shared_dir / rel).read_bytes(), rel
    # tests/test_model_gpu.py reads the first two images (by name) of these folders: the same ones.
    for folder in ("Kodak24", "CBSD68"):
        assert [p.name for p in list_images(bundle / "data" / folder)][:2] == \
            [p.name for p in list_images(shared_dir / "data" / folder)][:2]


def test_bundle_satisfies_the_fixtures_with_data_required(bundle, tmp_path):
    """The real fixtures (tests/conftest.py, loaded as a plugin) and two tests of the suite that read
    the fixtures, with RNAN_FAST_SHARED at the bundle and its absence made a failure."""
    (tmp_path / "test_probe.py").write_text(PROBE)
    env = {**os.environ, "RNAN_FAST_SHARED": str(bundle), "RNAN_FAST_REQUIRE_SHARED": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), str(REPO)])}
    args = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs", "--rootdir", str(tmp_path),
            "-p", "conftest", str(tmp_path / "test_probe.py")]
    run = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and "1 passed" in run.stdout, run.stdout[-3000:] + run.stderr[-2000:]
    suite = ["tests/test_model.py::test_golden_fixtures",
             "tests/test_checkpoint.py::test_the_manifest_configurations_are_inferred"]
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *suite], cwd=REPO,
                         env={**env, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and "2 passed" in run.stdout and "skipped" not in run.stdout, run.stdout[-3000:]


def test_bundle_names_what_is_missing(tmp_path):
    (tmp_path / "shared" / "fixtures").mkdir(parents=True)
    run = subprocess.run([sys.executable, str(REPO / "scripts" / "bundle_shared.py"), "--shared",
                          str(tmp_path / "shared"), "--out", str(tmp_path / "out")],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 1
    assert "fixtures/official_*_tiny.pt" in run.stderr and "data/Set12/01.png" in run.stderr
    assert not (tmp_path / "out").exists()


def test_bundle_folder_is_ignored_by_git():
    run = subprocess.run(["git", "check-ignore", "-q", str(bundle_shared.DEFAULT_OUT / "data" / "x.png")], cwd=REPO)
    assert run.returncode == 0, ".gpu_shared/ must be git-ignored (it is carried, never committed)"


# ------------------------------------------------------------------------------------------------
# The check's stages, dry
# ------------------------------------------------------------------------------------------------
FAKE_PYTHON = r"""#!/usr/bin/env bash
# Stands in for python in the GPU check's dry run.
args="$*"
opt() { grep -o -- "--$1=[^ ]*" <<<"$args" | head -1 | cut -d= -f2-; }
case "$1 $2" in
  "-m pip") echo "fake build: nvcc failed" >&2; exit 1 ;;
  "-m pytest")
    echo "$args" >> "$FAKE_DIR/pytest_calls"
    if [[ $args == *bench_nonlocal_attention.py::* ]]; then   # hangs, with a grandchild
      sleep 300 & echo $! > "$FAKE_DIR/grandchild.pid"; wait
    fi
    xml=$(opt junitxml); json=$(opt benchmark-json)
    if [ -n "$xml" ]; then
      fails=0; [[ $xml == */tests-attention.xml ]] && fails=1
      echo "<testsuites><testsuite name=\"pytest\" errors=\"0\" failures=\"$fails\" skipped=\"1\" tests=\"5\" time=\"0.1\"></testsuite></testsuites>" > "$xml"
      exit $fails
    fi
    [ -n "$json" ] && echo '{"benchmarks": []}' > "$json"
    exit 0 ;;
  "-c "*) echo "python 3.12 torch 2.11.0 cuda 13.0 triton 3.6.0" ;;
  *) exec "$REAL_PYTHON" "$@" ;;
esac
"""


def test_budgets_fit_in_eight_minutes():
    budgets = [int(b) for b in re.findall(r"^run_stage \w+ (\d+) stage_\w+$", CHECK.read_text(), re.M)]
    grace = int(re.search(r"timeout -k (\d+)", CHECK.read_text()).group(1))
    assert len(budgets) == 5 and sum(budgets) + grace * len(budgets) <= 480, budgets


def test_dry_run_every_stage_reports_after_failures_and_a_hang(tmp_path):
    fake = tmp_path / "python"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(0o755)
    out = tmp_path / "out"
    env = {**os.environ, "PY": str(fake), "REAL_PYTHON": sys.executable, "FAKE_DIR": str(tmp_path), "OUT": str(out),
           "GPU_CHECK_BUDGET_BENCH_KERNELS": "3",
           # The backend stage runs the real interpreter (import torch + rnan_fast): a cold start on a
           # busy 2-core CI machine took more than its 20 s GPU-machine budget. The test is about the
           # stage machinery, not that budget.
           "GPU_CHECK_BUDGET_BACKEND": "180"}
    env.pop("RNAN_FAST_SHARED", None)
    start = time.monotonic()
    run = subprocess.run(["bash", str(CHECK)], cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    elapsed = time.monotonic() - start
    assert run.returncode == 1, run.stdout + run.stderr
    assert ("WARNING: no test data" in run.stdout) == (not (REPO / ".gpu_shared" / "fixtures").is_dir())
    summary = json.loads((out / "summary.json").read_text())
    assert [s["stage"] for s in summary] == ["build", "backend", "tests", "bench_kernels", "bench_model"]
    by_name = {s["stage"]: s for s in summary}
    for name, stage in by_name.items():
        assert json.loads((out / f"{name}.json").read_text()) == stage       # each written as it ended
        assert (out / stage["log"]).exists()
    # The backend stage runs the real backend_info() of this machine (without a GPU: cuda missing).
    info = rnan_fast.backend_info()
    missing = [k for k in ("extension", "extension_cuda", "triton", "cuda") if not info[k]]
    assert {n: s["status"] for n, s in by_name.items()} == {
        "build": "failed", "backend": "failed" if missing else "passed", "tests": "failed",
        "bench_kernels": "timeout", "bench_model": "passed"}
    assert "nvcc failed" in (out / "build.log").read_text()
    assert "torch 2.11.0" in (out / "env.txt").read_text()
    backend_log = (out / "backend.log").read_text()
    assert ("FAILED: backend_info() has" in backend_log) == bool(missing)
    assert all(f"{k} = False" in backend_log for k in missing)
    assert json.loads((out / "backend_info.json").read_text())["cuda"] == info["cuda"]
    groups = (tmp_path / "pytest_calls").read_text().count("--junitxml=")
    assert groups >= 4
    assert by_name["tests"]["counts"] == {"tests": 5 * groups, "failures": 1, "errors": 0, "skipped": groups}
    assert by_name["bench_kernels"]["budget_s"] == 3 and 3 <= by_name["bench_kernels"]["seconds"] < 10
    assert by_name["build"]["budget_s"] == 120 and by_name["tests"]["budget_s"] == 150
    assert (out / "bench_model.json").exists() and elapsed < 120
    pid = int((tmp_path / "grandchild.pid").read_text())
    assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2], \
        "the hung stage's child processes must be stopped with it"
    assert len(list(out.glob("tests-*.log"))) == len(list(out.glob("tests-*.xml"))) == groups


def test_stage_environment(tmp_path):
    """The tests run untuned and the benchmarks bounded, with the bundle as RNAN_FAST_SHARED and
    required: a stand-in pytest records its environment."""
    fake = tmp_path / "python"
    fake.write_text(FAKE_PYTHON.replace('echo "$args" >> "$FAKE_DIR/pytest_calls"',
                                        'echo "$args|$RNAN_FAST_AUTOTUNE|${RNAN_FAST_AUTOTUNE_MAX:-}|'
                                        '$RNAN_FAST_SHARED|$RNAN_FAST_REQUIRE_SHARED" >> "$FAKE_DIR/pytest_calls"')
                    .replace("sleep 300 & echo $! > \"$FAKE_DIR/grandchild.pid\"; wait", ":"))
    fake.chmod(0o755)
    env = {**os.environ, "PY": str(fake), "REAL_PYTHON": sys.executable, "FAKE_DIR": str(tmp_path),
           "OUT": str(tmp_path / "out"), "GPU_CHECK_BUDGET_BACKEND": "1"}
    for name in ("RNAN_FAST_SHARED", "RNAN_FAST_AUTOTUNE", "RNAN_FAST_AUTOTUNE_MAX"):
        env.pop(name, None)
    subprocess.run(["bash", str(CHECK)], cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    rows = [line.split("|") for line in (tmp_path / "pytest_calls").read_text().splitlines()]
    tests = [r for r in rows if "--junitxml=" in r[0]]
    benches = [r for r in rows if "--benchmark-json=" in r[0]]
    assert len(tests) >= 4 and len(benches) == 4
    assert all(r[1] == "0" for r in tests) and all(r[1:3] == ["1", "2"] for r in benches)
    assert all(r[3] == str(REPO / ".gpu_shared") and r[4] == "1" for r in rows)
