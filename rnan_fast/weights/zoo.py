"""The shipped models: NAME.pt (weights) beside NAME.json (its model card), found, verified, loaded.

    available()            {name: card} of every card in the folder, sorted by name
    card(name)             the card of one model (WeightsError when there is none)
    verify(name)           the weights file, after its size and SHA-256 were checked against the card
    load(name, device)     RNAN in eval mode (also rnan_fast.RNAN.pretrained(name))
    export(ckpt, name, ...) writes NAME.pt (a plain state dict) and NAME.json from a checkpoint
    sigma_range(card), check_sigma(card)  the noise levels a model is for, the one CI checks it at
    DEFAULT_MODEL          the color denoiser that `rnan-fast restore` and `rnan-fast demo` use

The folder is this package's own (installed as package data), or $RNAN_FAST_WEIGHTS_DIR when set
(one's own models; tests).

Card (JSON object), the fields this module reads: "sha256" and "size" (bytes) of NAME.pt;
"task" (an eval task: "denoise_rgb", "denoise_gray", ...); "noise" ({"type": "gaussian",
"sigma": S} for a fixed-sigma model, or {"type": "gaussian", "sigma_range": [lo, hi]} for a
blind one); "architecture" (n_colors, scale, n_feats, n_resgroups, softmax_over: what the weights
must build); "test_gain_db" (the least PSNR gain over the noisy input that the tests accept on a
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

import torch

from rnan_fast.data import atomic_write, new_file_mode

__all__ = ["DEFAULT_MODEL", "ENV_FOLDER", "WeightsError", "folder", "available", "card", "verify", "load", "load_with_card", "export",
           "check_sigma", "sigma_range", "sha256_of"]

DEFAULT_MODEL = "rnan_dn_rgb"
ENV_FOLDER = "RNAN_FAST_WEIGHTS_DIR"
REQUIRED = ("sha256", "size", "task", "noise", "architecture", "test_gain_db")
# A card's leading fields, in this order whatever the order of export's keyword arguments, so
# that every card reads (and diffs) the same way: what the model is for, then how it was made.
CARD_HEAD = ("task", "noise", "training", "test_gain_db", "measured")
ARCHITECTURE = ("n_colors", "scale", "n_feats", "n_resgroups", "softmax_over")


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


def verify(name: str) -> Path:
    """The path of NAME.pt after checking its size and SHA-256 against the card; WeightsError
    naming the file and what differs when it is missing, truncated, corrupt or altered."""
    return _verify(name, card(name))


def _verify(name: str, c: dict) -> Path:
    """verify() against the card `c` already read (load needs it too: one read of NAME.json)."""
    path = folder() / f"{name}.pt"
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
    from rnan_fast.model import RNAN

    name = DEFAULT_MODEL if name is None else name
    c = card(name)
    path = _verify(name, c)
    arch = c["architecture"]
    net = RNAN.from_checkpoint(path, map_location="cpu", softmax_over=arch["softmax_over"])
    differ = [f"{k}: card {arch[k]!r}, weights {net.config[k]!r}" for k in ARCHITECTURE if arch[k] != net.config[k]]
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


def export(checkpoint: Any, name: str, target: str | os.PathLike | None = None,
           dtype: torch.dtype = torch.float32, **fields: Any) -> Path:
    """Write TARGET/NAME.pt and TARGET/NAME.json (TARGET default: folder()); returns the .pt path.

    checkpoint: anything RNAN.from_checkpoint reads (a training run's file gives its EMA
    weights when it holds them); its weights are stored as a plain state dict in `dtype` (fp32,
    or bf16 for half the size). fields: the card's other fields (task, noise, test_gain_db,
    training, measured, ...); sha256, size, architecture and stored_dtype are filled in here.
    Both files are written through rnan_fast.data.atomic_write."""
    from rnan_fast.model import RNAN

    missing = [k for k in REQUIRED if k not in fields and k not in ("sha256", "size", "architecture")]
    if missing:
        raise WeightsError(f"export of {name!r}: give the card fields {', '.join(missing)}")
    softmax_over = fields.get("architecture", {}).get("softmax_over", "query")
    net = RNAN.from_checkpoint(checkpoint, map_location="cpu", softmax_over=softmax_over)
    root = Path(target) if target is not None else folder()
    root.mkdir(parents=True, exist_ok=True)
    pt, js = root / f"{name}.pt", root / f"{name}.json"
    state = {k: v.detach().to(dtype) if v.is_floating_point() else v.detach()
             for k, v in net.state_dict().items()}
    file_mode = new_file_mode()
    with atomic_write(pt, mode=file_mode) as f:
        torch.save(state, f)
    fields.pop("name", None)
    c = {**{k: fields.pop(k) for k in CARD_HEAD if k in fields}, **fields,
         "architecture": {k: net.config[k] for k in ARCHITECTURE},
         "stored_dtype": str(dtype).replace("torch.", ""), "size": pt.stat().st_size, "sha256": sha256_of(pt)}
    with atomic_write(js, mode=file_mode) as f:
        f.write((json.dumps(c, indent=2) + "\n").encode("utf-8"))
    return pt
