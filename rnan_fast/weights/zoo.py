"""The shipped models: NAME.safetensors (weights) beside NAME.json (its model card), found,
verified, loaded.

    available()            {name: card} of every card in the folder, sorted by name
    card(name)             the card of one model (WeightsError when there is none)
    weights_path(name)     NAME.safetensors, or NAME.pt where only that exists (cards made before)
    verify(name)           the weights file, after its size and SHA-256 were checked against the card
    load(name, device)     RNAN in eval mode (also rnan_fast.RNAN.pretrained(name))
    export(ckpt, name, ...) writes NAME.safetensors and NAME.json from a checkpoint
    write_weights(net, path, dtype)  a model's weights as a safetensors file (no pickle)
    sigma_range(card), check_sigma(card)  the noise levels a model is for, the one CI checks it at
    DEFAULT_MODEL          the color denoiser that `rnan-fast restore` and `rnan-fast demo` use

The folder is this package's own (installed as package data), or $RNAN_FAST_WEIGHTS_DIR when set
(one's own models; tests).

Card (JSON object), the fields this module reads: "sha256" and "size" (bytes) of the weights file;
"task" (an eval task: "denoise_rgb", "denoise_gray", ...); "noise" ({"type": "gaussian",
"sigma": S} for a fixed-sigma model, or {"type": "gaussian", "sigma_range": [lo, hi]} for a
blind one); "architecture" (n_colors, scale, n_feats, n_resgroups, softmax_over, and mosaic when
set: what the weights must build); "test_gain_db" (the least PSNR gain over the noisy input that the tests accept on a
noisy crop at `check_sigma(card)`). Fields that document the model: "training" (data, steps,
hardware, wall time, the exact `rnan-fast train` command), "measured" (rows of set, sigma,
PSNR/SSIM beside BM3D on the same noisy images and the paper's figure), "stored_dtype".
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

from rnan_fast.image_io import atomic_write, new_file_mode

# torch and rnan_fast.model load in the functions that build models: reading cards and listing
# models (`rnan-fast --help`, `rnan-fast models`) must not pay for importing torch (~1.5 s)

__all__ = ["DEFAULT_MODEL", "ENV_FOLDER", "WeightsError", "folder", "available", "card", "weights_path", "verify", "load",
           "load_with_card", "export", "write_weights", "check_sigma", "sigma_range", "sha256_of"]

DEFAULT_MODEL = "rnan_dn_rgb"
ENV_FOLDER = "RNAN_FAST_WEIGHTS_DIR"
REQUIRED = ("sha256", "size", "task", "noise", "architecture", "test_gain_db")
# A card's leading fields, in this order whatever the order of export's keyword arguments, so
# that every card reads (and diffs) the same way: what the model is for, then how it was made.
CARD_HEAD = ("task", "noise", "training", "test_gain_db", "measured")
ARCHITECTURE = ("n_colors", "scale", "n_feats", "n_resgroups", "softmax_over")
# Architecture entries a card holds only when set (absent: None, the official model): a
# demosaicing model's bilinear fill of its mosaic input (RNAN's `mosaic`).
OPTIONAL_ARCHITECTURE = ("mosaic",)
# A model's weights file, by preference: safetensors (what export writes and what ships), then a
# torch.save file (a folder of one's own made before).
WEIGHTS_SUFFIXES = (".safetensors", ".pt")


class WeightsError(ValueError):
    """A shipped model that is missing, has no usable card, or whose file does not match its card."""


def folder() -> Path:
    """Where the models are looked up: $RNAN_FAST_WEIGHTS_DIR, else this package's folder."""
    env = os.environ.get(ENV_FOLDER)
    return Path(env) if env else Path(__file__).resolve().parent


def _read_card(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise WeightsError(f"{path}: unreadable model card ({e})") from None
    if not isinstance(data, dict):
        raise WeightsError(f"{path}: a model card must be a JSON object, found {type(data).__name__}")
    missing = [k for k in REQUIRED if k not in data]
    arch = data.get("architecture")
    if isinstance(arch, dict):
        missing += [f"architecture.{k}" for k in ARCHITECTURE if k not in arch]
    elif "architecture" in data:
        missing.append("architecture (an object)")
    if missing:
        raise WeightsError(f"{path}: the model card lacks {', '.join(missing)}")
    return {**data, "name": path.stem}


def available() -> dict[str, dict]:
    """{name: card} of every NAME.json in the folder (sorted by name); an invalid card raises
    WeightsError naming the file and what is wrong."""
    root = folder()
    if not root.is_dir():
        return {}
    return {p.stem: _read_card(p) for p in sorted(root.glob("*.json"))}


def card(name: str) -> dict:
    """The card of model `name`; WeightsError naming the models there are when it is unknown."""
    path = folder() / f"{name}.json"
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name) or not path.is_file():
        names = sorted(p.stem for p in folder().glob("*.json")) if folder().is_dir() else []
        there = f"the models there are: {', '.join(names)}" if names else "no model ships there yet"
        raise WeightsError(f"no model named {name!r} in {folder()} ({there})")
    return _read_card(path)


def sha256_of(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def weights_path(name: str) -> Path:
    """The weights file of model `name` in folder(): NAME.safetensors, else NAME.pt; when neither
    exists, the NAME.safetensors path (for messages)."""
    paths = [folder() / f"{name}{suffix}" for suffix in WEIGHTS_SUFFIXES]
    return next((p for p in paths if p.is_file()), paths[0])


def verify(name: str) -> Path:
    """The path of the weights file (weights_path) after checking its size and SHA-256 against the
    card; WeightsError naming the file and what differs when it is missing, truncated, corrupt or
    altered."""
    return _verify(name, card(name))


def _verify(name: str, c: dict) -> Path:
    """verify() against the card `c` already read (load needs it too: one read of NAME.json)."""
    path = weights_path(name)
    if not path.is_file():
        raise WeightsError(f"{path}: the weights file of model {name!r} is missing (its card is {name}.json)")
    size = path.stat().st_size
    if size != c["size"]:
        raise WeightsError(f"{path}: {size} bytes, but its card says {c['size']}: the file is truncated, "
                           f"corrupt or was replaced; reinstall rnan_fast")
    digest = sha256_of(path)
    if digest != c["sha256"]:
        raise WeightsError(f"{path}: SHA-256 {digest} differs from its card's {c['sha256']} "
                           f"({name}.json): the file is corrupt or was altered; reinstall rnan_fast")
    return path


def load(name: str | None = None, device: torch.device | str = "cpu"):
    """RNAN `name` (default DEFAULT_MODEL), hash-checked, in eval mode on `device` (fp32).

    The weights load strictly through RNAN.from_checkpoint; the configuration they build must
    be the card's "architecture", else WeightsError."""
    return load_with_card(name, device)[0]


def load_with_card(name: str | None = None, device: torch.device | str = "cpu"):
    """(load(name, device), card(name)), from one read of the card."""
    name = DEFAULT_MODEL if name is None else name
    c = card(name)
    path = _verify(name, c)
    arch = c["architecture"]
    from rnan_fast.model import RNAN

    net = RNAN.from_checkpoint(path, map_location="cpu", softmax_over=arch["softmax_over"])
    differ = [f"{k}: card {arch.get(k)!r}, weights {net.config[k]!r}" for k in ARCHITECTURE + OPTIONAL_ARCHITECTURE
              if arch.get(k) != net.config[k]]
    if differ:
        raise WeightsError(f"{path}: the weights do not build the card's architecture ({'; '.join(differ)})")
    return net.to(device).eval(), c


def sigma_range(c: dict) -> tuple[float, float]:
    """(lo, hi) of the noise levels a card's model was trained for ((s, s) for a fixed sigma s)."""
    noise = c["noise"]
    lo, hi = (noise["sigma"], noise["sigma"]) if "sigma" in noise else noise["sigma_range"]
    return float(lo), float(hi)


def check_sigma(c: dict) -> float:
    """The noise level a model is checked at: its fixed sigma, or 30 clamped into its range."""
    lo, hi = sigma_range(c)
    return min(max(30.0, lo), hi)


def write_weights(net: RNAN, path: str | os.PathLike, dtype: torch.dtype | None = None,
                  mode: int | None = None) -> Path:
    """Write `net`'s state dict to `path` as a safetensors file, floating-point tensors in `dtype`
    (default fp32, or bf16 for half the size), net.config in its metadata (RNAN.from_checkpoint
    reads both back); atomically (rnan_fast.data.atomic_write, file mode `mode`, default
    new_file_mode()). Returns the path."""
    import torch

    from rnan_fast.model import safetensors_bytes

    dtype = torch.float32 if dtype is None else dtype
    state = {k: v.detach().to(dtype) if v.is_floating_point() else v.detach() for k, v in net.state_dict().items()}
    path = Path(path)
    with atomic_write(path, mode=new_file_mode() if mode is None else mode) as f:
        f.write(safetensors_bytes(state, net.config))
    return path


def export(checkpoint: Any, name: str, target: str | os.PathLike | None = None,
           dtype: torch.dtype | None = None, **fields: Any) -> Path:
    """Write TARGET/NAME.safetensors and TARGET/NAME.json (TARGET default: folder()); returns the
    weights path.

    checkpoint: anything RNAN.from_checkpoint reads (a training run's file gives its EMA
    weights when it holds them); its weights are stored by write_weights in `dtype` (default
    fp32, or bf16 for half the size). fields: the card's other fields (task, noise, test_gain_db,
    training, measured, ...); sha256, size, architecture and stored_dtype are filled in here.
    Both files are written through rnan_fast.data.atomic_write."""
    missing = [k for k in REQUIRED if k not in fields and k not in ("sha256", "size", "architecture")]
    if missing:
        raise WeightsError(f"export of {name!r}: give the card fields {', '.join(missing)}")
    import torch

    from rnan_fast.model import RNAN

    dtype = torch.float32 if dtype is None else dtype
    softmax_over = fields.get("architecture", {}).get("softmax_over")   # None: the checkpoint's own, else "query"
    net = RNAN.from_checkpoint(checkpoint, map_location="cpu", softmax_over=softmax_over)
    root = Path(target) if target is not None else folder()
    root.mkdir(parents=True, exist_ok=True)
    js = root / f"{name}.json"
    file_mode = new_file_mode()
    path = write_weights(net, root / f"{name}{WEIGHTS_SUFFIXES[0]}", dtype, file_mode)
    fields.pop("name", None)
    c = {**{k: fields.pop(k) for k in CARD_HEAD if k in fields}, **fields,
         "architecture": {**{k: net.config[k] for k in ARCHITECTURE},
                          **{k: net.config[k] for k in OPTIONAL_ARCHITECTURE if net.config[k] is not None}},
         "stored_dtype": str(dtype).replace("torch.", ""), "size": path.stat().st_size, "sha256": sha256_of(path)}
    with atomic_write(js, mode=file_mode) as f:
        f.write((json.dumps(c, indent=2) + "\n").encode("utf-8"))
    return path
