"""Out of GPU memory, without a GPU: models that raise torch.OutOfMemoryError (what the CUDA
caching allocator raises) above an input size. Inference retries in halved tiles; the CLI says
so once per image; training stops with the batch and patch sizes to lower."""

import numpy as np
import pytest
import torch
from PIL import Image

from rnan_fast import cli
from rnan_fast.cli.common import RunOptions
from rnan_fast.inference import OOM_MIN_TILE, forward_tiled, restore_array, restore_image, restore_tensor
from rnan_fast.train import loop

pytestmark = pytest.mark.usefixtures("one_thread")


class Limited(torch.nn.Module):
    """A pointwise model (2x + 1: every tiling gives the whole-image result exactly) that runs out
    of memory when an input side exceeds `limit`, and records the input sizes and dtypes it got."""

    def __init__(self, limit: int):
        super().__init__()
        self.limit, self.seen = limit, []

    def forward(self, x):
        self.seen.append((tuple(x.shape[-2:]), x.dtype))
        if max(x.shape[-2:]) > self.limit:
            raise torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate {x.numel() * 64} bytes")
        return 2 * x + 1


def test_whole_image_retries_in_halved_tiles_until_they_fit():
    x = torch.rand(1, 3, 300, 200, dtype=torch.float64) * 255
    net, told = Limited(80), []
    y = restore_tensor(net, x, overlap=32, oom_retry=told.append)
    assert torch.equal(y, 2 * x + 1)
    assert told == [150]                               # once per image, with the first tile tried
    sizes = [s for s, _ in net.seen]
    assert sizes[0] == (300, 200) and (150, 150) in sizes    # whole, then 150, then 75 (fits)
    assert max(max(s) for s in sizes[sizes.index((150, 150)) + 1:]) <= 75


def test_a_tiled_run_halves_its_own_tile():
    x = torch.rand(1, 1, 260, 260, dtype=torch.float64)
    net, told = Limited(100), []
    y = restore_tensor(net, x, tile=256, overlap=48, oom_retry=told.append)
    assert torch.equal(y, 2 * x + 1) and told == [128]
    assert max(max(s) for s, _ in net.seen[-4:]) == 64      # 128 failed too: 64-pixel tiles


def test_retry_gives_up_below_the_minimum_tile_and_without_the_option():
    x = torch.rand(1, 3, 200, 200)
    told = []
    with pytest.raises(torch.OutOfMemoryError):
        restore_tensor(Limited(OOM_MIN_TILE - 1), x, oom_retry=told.append)
    assert told == [100]
    net = Limited(150)
    with pytest.raises(torch.OutOfMemoryError):
        restore_tensor(net, x)                          # no oom_retry: the error as it came
    assert len(net.seen) == 1
    with pytest.raises(torch.OutOfMemoryError):      # chop keeps the official quadrants (68 x 68 here)
        restore_tensor(Limited(50), x, chop=True, oom_retry=told.append)
    assert told == [100]


def test_progress_counts_each_attempt_anew():
    x = torch.rand(1, 1, 128, 128)
    calls = []
    restore_tensor(Limited(64), x, overlap=16, progress=lambda done, total: calls.append((done, total)),
                   oom_retry=lambda tile: None)
    assert calls[-1][0] == calls[-1][1] == len([c for c in calls if c[1] == calls[-1][1]]) > 1


def test_only_the_current_tile_is_moved_to_the_model():
    """restore_tensor(device=, dtype=): x stays as it is; each tile alone is converted (here to the
    model's float64) and each output comes back; restore_array/restore_image keep their signature."""
    x = torch.rand(1, 3, 70, 50) * 255
    net = Limited(10**6)
    y = restore_tensor(net, x, tile=32, overlap=8, dtype=torch.float64, device="cpu")
    assert y.dtype == torch.float64 and torch.equal(y, 2 * x.double() + 1)
    assert all(dtype == torch.float64 and max(size) <= 32 for size, dtype in net.seen)
    assert forward_tiled(net, x.double(), 32, 8).equal(y)
    img = (np.random.default_rng(0).random((40, 30, 3)) * 100).astype(np.uint8)
    assert np.array_equal(restore_array(Limited(64), img, dtype=torch.float64), 2 * img.astype(np.float32) + 1)
    assert np.array_equal(restore_image(Limited(64), img, tile=16, overlap=4), 2 * img + 1)


def test_image_runner_says_once_per_image_and_retries(monkeypatch, capsys):
    """The runner restore and eval use: on a CUDA device it passes oom_retry (faked here, since
    the model runs on the CPU), and the note names the image, the size and the first tile."""
    from rnan_fast.cli import tiling
    from rnan_fast import inference

    seen = []

    def fake_restore(net, img, device, dtype, progress, oom_retry, **kwargs):
        seen.append(oom_retry)
        if oom_retry is not None:
            oom_retry(128)
            progress(1, 4)
        return img
    monkeypatch.setattr(inference, "restore_image", fake_restore)
    img = np.zeros((300, 256, 3), np.uint8)
    tiling.ImageRunner(RunOptions(torch.device("cuda", 0), whole=True), Limited(10)).run(img, "big.png")
    err = capsys.readouterr().err
    assert err.count("ran out of GPU memory") == 1 and "big.png (256x300)" in err and "128x128 tiles" in err
    tiling.ImageRunner(RunOptions(torch.device("cpu"), whole=True), Limited(10)).run(img, "big.png")
    assert seen[0] is not None and seen[1] is None and "GPU memory" not in capsys.readouterr().err


@pytest.fixture
def tiny_images(tmp_path):
    d = tmp_path / "images"
    d.mkdir()
    rng = np.random.default_rng(1)
    for i in range(2):
        Image.fromarray(rng.integers(0, 256, (40, 36, 3), dtype=np.uint8)).save(d / f"{i}.png")
    return d


def test_training_out_of_memory_names_batch_and_patch_size(tiny_images, tmp_path, monkeypatch, capsys):
    def make_step(*args, **kwargs):
        def step(lq, gt):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return step
    monkeypatch.setattr(loop, "make_train_step", make_step)
    cfg = loop.resolve_config(dict(task="sr", scale=2, data=[str(tiny_images)], out=str(tmp_path / "run"), n_feats=8,
                                   n_resgroups=2, patch_size=8, batch_size=2, steps=2, log_every=1))
    with pytest.raises(loop.OutOfMemory) as info:
        loop.run(cfg, quiet=True)
    message = str(info.value)
    assert "--batch-size 2" in message and "--patch-size 8" in message and "HR 16x16" in message
    assert "training step 1" in message and "Tried to allocate 2.00 GiB" in message
    assert isinstance(info.value, loop.ConfigError)      # the CLI reports it without a traceback
    code = cli.main(["train", "--task", "denoise_rgb", "--sigma", "25", "--data", str(tiny_images), "--out",
                     str(tmp_path / "run2"), "--n-feats", "8", "--n-resgroups", "2", "--patch-size", "16",
                     "--batch-size", "2", "--steps", "2", "--quiet"])
    err = capsys.readouterr().err
    assert code != 0 and "lower --batch-size or --patch-size" in err and "--patch-size 16" in err
    assert "Traceback" not in err
