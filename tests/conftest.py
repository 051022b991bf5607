"""Test-session setup shared by all test files.

- On a machine without CUDA, Triton kernels run through the interpreter (TRITON_INTERPRET=1
  must be set before Triton is first imported, hence here); with CUDA, untuned (see below).
- `shared_dir`: the project's shared data (../shared beside the checkout, or $RNAN_FAST_SHARED).
  Tests that need it skip with a reason when it is absent, unless RNAN_FAST_REQUIRE_SHARED=1
  (set by .ci/run), where its absence is a failure.
"""
import json
import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Each Triton kernel runs its first config instead of autotuning 8 per shape class: compile
# time would dominate a GPU test session. RNAN_FAST_AUTOTUNE=1 tests the tuned configs instead.
os.environ.setdefault("RNAN_FAST_AUTOTUNE", "0")

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("RNAN_FAST_SHARED", REPO.parent / "shared"))


def _require(path: Path) -> Path:
    if path.exists():
        return path
    if os.environ.get("RNAN_FAST_REQUIRE_SHARED", "0") not in ("", "0"):
        pytest.fail(f"{path} is missing and RNAN_FAST_REQUIRE_SHARED is set")
    pytest.skip(f"{path} is absent (shared data lives beside the checkout; set RNAN_FAST_SHARED)")


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    return _require(SHARED)


@pytest.fixture(scope="session")
def fixtures_dir(shared_dir) -> Path:
    return _require(shared_dir / "fixtures")


@pytest.fixture(scope="session")
def data_dir(shared_dir) -> Path:
    return _require(shared_dir / "data")


@pytest.fixture(scope="session")
def official_tiny(fixtures_dir) -> list:
    """[(path, contents)] of the official_*_tiny.pt fixtures (config, state_dict, golden cases),
    loaded once per session. Shared: tests read them and never modify them."""
    files = sorted(fixtures_dir.glob("official_*_tiny.pt"))
    if not files:
        pytest.fail(f"no official_*_tiny.pt fixtures in {fixtures_dir}")
    return [(path, torch.load(path, map_location="cpu", weights_only=False)) for path in files]


@pytest.fixture(scope="session")
def official_manifest(fixtures_dir) -> dict:
    """The official state-dict manifest: {name: {config fields, "state_dict": [[key, shape]], "params"}}."""
    with open(fixtures_dir / "official_state_dict_manifest.json") as f:
        return json.load(f)


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of tiny-network tests (`pytestmark =
    pytest.mark.usefixtures("one_thread")`): they gain nothing from threads, and on a busy
    2-core machine OpenMP's spinning threads slowed them down a hundredfold."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(autouse=True)
def _restore_backend():
    """Every test starts and ends on the default global backend."""
    import rnan_fast

    previous = rnan_fast.get_backend()
    rnan_fast.set_backend("auto")
    yield
    rnan_fast.set_backend(previous)


@pytest.fixture
def official_ops(monkeypatch):
    """A function that routes rnan_fast.ops through the official formulas: the full N x N
    softmax (reference.nonlocal_attention_naive) and `trunk * sigmoid(logits) + x`, both
    differentiated by PyTorch's autograd. Pass a `monkeypatch.context()` to limit its scope."""
    import rnan_fast

    def apply(patcher=monkeypatch):
        patcher.setattr(rnan_fast.ops, "nonlocal_attention",
                        lambda theta, phi, g, softmax_over="query", backend=None:
                        rnan_fast.reference.nonlocal_attention_naive(theta, phi, g, softmax_over))
        # Spelled as the official model writes it, not through rnan_fast.reference (bitwise equal).
        patcher.setattr(rnan_fast.ops, "gated_residual",
                        lambda x, mask_logits, trunk, backend=None: trunk * torch.sigmoid(mask_logits) + x)
    return apply


@pytest.fixture(autouse=True)
def _auto_precision_is_fp32():
    """`--precision auto` resolves to fp32 in every in-process test, whatever the CPU: the tests
    compare command-line outputs with fp32 references, and must not depend on the machine's ISA.
    (The probes are what inference.auto_precision reads; test_auto_precision sets them itself.
    A patcher of its own, so that a test's monkeypatch.undo() keeps it.)"""
    with pytest.MonkeyPatch.context() as mp:
        for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
            mp.setattr(torch.cpu, probe, lambda: False, raising=False)
        yield
