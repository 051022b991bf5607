"""The install without compiled kernels: RNAN_FAST_NO_EXT=1 builds a pure-Python wheel (README's
`python -m build --wheel --no-isolation`), which installs into a fresh venv and restores an image
end to end on the reference ops, with a warning; without the switch, a machine that lacks a piece
of the compile gets one message naming it and the switch."""
import importlib.util
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import rnan_fast
from rnan_fast import RNAN, weights
from rnan_fast import data as D
from rnan_fast.inference import restore_image

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = Path(__file__).resolve().parents[1]
# What a source checkout holds for the build (an in-place _C and caches left out).
SOURCES = ("setup.py", "pyproject.toml", "README.md", "rnan_fast", "kernels", "csrc")


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "RNAN_FAST_NO_EXT", "CXX")}
    return {**env, "OMP_NUM_THREADS": "1", **extra}


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    root = tmp_path_factory.mktemp("checkout")
    for name in SOURCES:
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, root / name, ignore=shutil.ignore_patterns("*.so", "__pycache__"))
        else:
            shutil.copy2(src, root / name)
    return root


def test_pure_python_wheel_restores_in_a_fresh_venv(source, tmp_path):
    if importlib.util.find_spec("build") is None:
        pytest.skip("the `build` package is not installed (scripts/setup.sh installs it)")
    dist = tmp_path / "dist"
    run = subprocess.run([sys.executable, "-m", "build", "--wheel", "--no-isolation", "-o", str(dist), str(source)],
                         capture_output=True, text=True, env=_env(RNAN_FAST_NO_EXT="1"), timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    (wheel,) = dist.glob("*.whl")
    assert wheel.name.endswith("-py3-none-any.whl"), wheel.name   # pure Python: no compiled part
    names = zipfile.ZipFile(wheel).namelist()
    assert not [n for n in names if "_C" in Path(n).name]
    assert "rnan_fast/weights/rnan_dn_rgb.safetensors" in names and "rnan_fast/kernels/__init__.py" in names

    # a fresh venv that sees this interpreter's packages (torch, numpy, ...) through a .pth line
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=300)
    python = venv / "bin" / "python"
    purelib = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                  capture_output=True, text=True, check=True).stdout.strip())
    (purelib / "outer.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    install = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps",
                              "--no-index", "-q", str(wheel)], capture_output=True, text=True, env=_env(), timeout=600)
    assert install.returncode == 0, install.stderr

    torch.manual_seed(0)
    net = RNAN(n_colors=3, n_feats=8, n_resgroups=2).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn_like(p) * 1e-2)
    w = weights.write_weights(net, tmp_path / "w.safetensors")
    img = np.random.default_rng(0).integers(0, 256, (20, 26, 3), dtype=np.uint8)
    Image.fromarray(img).save(tmp_path / "a.png")
    proc = subprocess.run([str(venv / "bin" / "rnan-fast"), "restore", "--weights", str(w), "-o", str(tmp_path / "out"),
                           "--quiet", str(tmp_path / "a.png")],
                          capture_output=True, text=True, env=_env(), cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "running without the compiled kernels" in proc.stderr and "reference" in proc.stderr
    with rnan_fast.use_backend("reference"):
        want = restore_image(RNAN.from_checkpoint(w), img)
    assert np.array_equal(D.read_image(tmp_path / "out" / "a.png"), want)
    info = subprocess.run([str(python), "-c", "import json, rnan_fast; "
                           "print(rnan_fast.__file__); print(json.dumps(rnan_fast.backend_info()))"],
                          capture_output=True, text=True, env=_env(), cwd=tmp_path, timeout=300)
    assert info.returncode == 0, info.stderr
    where, backends = info.stdout.splitlines()[-2:]
    assert where.startswith(str(venv)) and '"extension": false' in backends


def test_a_missing_compiler_is_named(source):
    proc = subprocess.run([sys.executable, "setup.py", "-q", "build_ext"], cwd=source, capture_output=True, text=True,
                          env=_env(CXX=str(source / "no-such-compiler"), RNAN_FAST_NO_CUDA="1"), timeout=600)
    assert proc.returncode != 0
    assert "a C++ compiler" in proc.stderr and "no-such-compiler" in proc.stderr, proc.stderr[-2000:]
    assert "RNAN_FAST_NO_EXT=1" in proc.stderr
    assert not list(source.glob("rnan_fast/_C*"))
