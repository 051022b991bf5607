"""RNAN, a drop-in for the official model (same parameter names and shapes), any H x W.

    net = RNAN(n_colors=3, scale=1, n_feats=64, n_resgroups=10)   # keywords
    net = RNAN(args)                                              # official-style namespace
    net = RNAN.from_checkpoint("RNAN_DN_RGB.pt")                  # configuration from the weights
    net = RNAN.from_checkpoint("rnan_dn_rgb.safetensors")         # safetensors files too (no pickle)

scale 1 builds the denoising form (also CAR and demosaicking): out = x + tail(body(head(x))).
scale 2, 3, 4 (or any power of two) builds the SR form: mean shifts, a long feature skip and a
sub-pixel upsampler in the tail.
"""
from __future__ import annotations

import json
import numbers
import os
import re
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from rnan_fast import _ext
from rnan_fast.modules import DIV2K_RGB_MEAN, MeanShift, MosaicFill, ResGroup, Upsampler, default_conv
from rnan_fast.reference import check_softmax_over

__all__ = ["RNAN", "CheckpointError", "make_model"]

_DEFAULTS = {"n_colors": 3, "scale": 1, "n_feats": 64, "n_resgroups": 10, "rgb_range": 255,
             "softmax_over": "query", "mosaic": None}
# What `mosaic` may be: None (the input as it is: the official model), or the Bayer pattern of a
# zero-filled mosaic input that the model first fills by bilinear interpolation (MosaicFill).
MOSAIC_PATTERNS = ("grbg",)
# The settings that decide parameter shapes (what a checkpoint must agree with).
SHAPE_KEYS = ("n_colors", "scale", "n_feats", "n_resgroups")
# Keys under which training scripts nest a state dict, tried in this order.
_WRAPPER_KEYS = ("state_dict", "model", "params")
# The "format" entry of a rnan_fast.train checkpoint: {"model": ..., "ema": ... or None, ...}.
TRAINING_FORMAT = "rnan_fast.train/1"
# The safetensors metadata entry that holds an RNAN's `config` as JSON (safetensors_bytes writes it).
CONFIG_METADATA = "rnan_fast.config"


class CheckpointError(ValueError):
    """A checkpoint that cannot be read, or whose weights do not fit an RNAN.

    For weights that do not fit, the complete lists (the message shows the first 20 of each):
    `missing` and `unexpected` (key names) and `misshaped` ((name, checkpoint shape, model shape)).
    """

    def __init__(self, message: str, missing=(), unexpected=(), misshaped=()):
        super().__init__(message)
        self.missing = list(missing)
        self.unexpected = list(unexpected)
        self.misshaped = list(misshaped)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_config(n_colors, scale, n_feats, n_resgroups, rgb_range, softmax_over, mosaic) -> None:
    if not _is_int(n_colors) or n_colors < 1:
        raise ValueError(f"RNAN: n_colors must be a positive int, got {n_colors!r}")
    if not _is_int(n_feats) or n_feats < 2 or n_feats % 2:
        raise ValueError(f"RNAN: n_feats must be an even int >= 2 (the non-local block uses n_feats / 2 "
                         f"channels), got {n_feats!r}")
    if not _is_int(n_resgroups) or n_resgroups < 2:
        raise ValueError(f"RNAN: n_resgroups must be an int >= 2 (two non-local groups plus "
                         f"n_resgroups - 2 local ones), got {n_resgroups!r}")
    if not _is_int(scale) or scale < 1 or (scale != 3 and scale & (scale - 1)):
        raise ValueError(f"RNAN: scale must be 1 (denoising, CAR, demosaicking), 2, 3, 4 or another "
                         f"power of two (super-resolution), got {scale!r}")
    if scale > 1 and n_colors != 3:
        raise ValueError(f"RNAN: the super-resolution form (scale {scale}) needs n_colors=3: its mean "
                         f"shifts are RGB, as in the official code; got n_colors={n_colors}")
    if isinstance(rgb_range, bool) or not isinstance(rgb_range, (int, float)) or not rgb_range > 0:
        raise ValueError(f"RNAN: rgb_range must be a positive number, got {rgb_range!r}")
    check_softmax_over(softmax_over)
    if mosaic is not None and (mosaic not in MOSAIC_PATTERNS or n_colors != 3 or scale != 1):
        raise ValueError(f"RNAN: mosaic must be None or one of {MOSAIC_PATTERNS} with n_colors=3 and scale 1 "
                         f"(a 3-channel zero-filled Bayer mosaic in, RGB out); got mosaic={mosaic!r}, "
                         f"n_colors={n_colors}, scale={scale}")


def _from_args(args: Any) -> dict:
    """The configuration fields of an official-style namespace (or a mapping); absent ones are left out."""
    get = args.get if isinstance(args, Mapping) else (lambda k, d=None: getattr(args, k, d))
    out = {}
    for key in _DEFAULTS:
        value = get(key, None)
        if value is not None:
            out[key] = value
    if "scale" in out:
        out["scale"] = _first_scale(out["scale"])
    return out


def _first_scale(scale: Any) -> Any:
    """The scale the official model builds for: the first of a list, or of an option string
    such as "2+3"; anything else as it is (checked later)."""
    if isinstance(scale, (list, tuple)):
        if not scale:
            raise ValueError("RNAN: scale is an empty list")
        return scale[0]
    if isinstance(scale, str):
        return int(scale.split("+")[0])
    return scale


def _warn_without_extension() -> None:
    """One warning per process when rnan_fast._C is missing (a pure-Python install:
    RNAN_FAST_NO_EXT=1, or a checkout used without building): every op then runs on the
    reference, which took 10x the time of the C++ kernels for a whole 256x256 image on the CPU
    (695 vs 69.8 s, README)."""
    global _warned
    if not _ext.EXTENSION and not _warned:
        _warned = True
        warnings.warn(f"rnan_fast: running without the compiled kernels ({_ext.EXTENSION_ERROR}); the ops use "
                      f"the pure-PyTorch reference, about 10x slower on a CPU", RuntimeWarning, stacklevel=3)


_warned = False   # _warn_without_extension has warned in this process


class RNAN(nn.Module):
    """Residual Non-local Attention Network (Zhang et al., ICLR 2019).

    Forward: x (B, n_colors, H, W) -> (B, n_colors, scale*H, scale*W), any H, W >= 1, values in
    [0, rgb_range] as the official models were trained.

    Construction, either
        RNAN(n_colors=3, scale=1, n_feats=64, n_resgroups=10, rgb_range=255, softmax_over="query")
    or RNAN(args) with an official-style namespace (or mapping): n_colors, scale (int or a list,
    whose first entry is used), n_feats, n_resgroups, rgb_range and optionally softmax_over; other
    fields (n_resblocks, reduction, res_scale, ...) are ignored, as the official model ignores
    them. Keywords given beside `args` override it.

    softmax_over: "query" normalises the non-local attention over queries (softmax dim=1, as the
    official checkpoints were trained), "key" is ordinary attention.

    mosaic (not in the official code; default None: the official model): "grbg" for a demosaicing
    model whose input is the zero-filled 3-channel GRBG mosaic and which first fills it by
    bilinear interpolation (modules.MosaicFill, no parameters), so that its residual (the
    denoising form's x + tail(...)) starts from bilinear demosaicing instead of from zeros. The
    state dict is the official one either way.

    Attributes: `config` (dict of the seven settings above), `task` ("denoise" or "sr").
    Submodules: [sub_mean, add_mean (SR only)], head, body_nl_low, body, body_nl_high, tail,
    parameter names and shapes as in the official code.
    """

    CheckpointError = CheckpointError

    def __init__(self, args: Any = None, *, n_colors: int | None = None, scale: int | None = None,
                 n_feats: int | None = None, n_resgroups: int | None = None,
                 rgb_range: float | None = None, softmax_over: str | None = None, mosaic: str | None = None):
        super().__init__()
        config = dict(_DEFAULTS)
        if args is not None:
            if isinstance(args, (int, float, str, bool)):
                raise TypeError(f"RNAN: the positional argument is an official-style namespace or a "
                                f"mapping; pass settings as keywords (got {args!r})")
            config.update(_from_args(args))
        given = {"n_colors": n_colors, "scale": scale, "n_feats": n_feats, "n_resgroups": n_resgroups,
                 "rgb_range": rgb_range, "softmax_over": softmax_over, "mosaic": mosaic}
        config.update({k: v for k, v in given.items() if v is not None})
        if isinstance(config["scale"], (list, tuple)):
            config["scale"] = _first_scale(config["scale"])
        for key in SHAPE_KEYS:  # numpy / tensor ints -> int
            if isinstance(config[key], numbers.Integral) and not isinstance(config[key], bool):
                config[key] = int(config[key])
        _check_config(**config)
        _warn_without_extension()
        self.config = config
        n_colors, scale, n_feats, n_resgroups, rgb_range, softmax_over, mosaic = (config[k] for k in _DEFAULTS)
        self.task = "sr" if scale > 1 else "denoise"
        if mosaic is not None:   # (holds no tensors: the state dict keeps the official keys)
            self.fill = MosaicFill()

        # Registration order follows the official code, so state_dict() lists keys in its order.
        if self.task == "sr":
            self.sub_mean = MeanShift(rgb_range, sign=-1)
            self.add_mean = MeanShift(rgb_range, sign=1)
        self.head = nn.Sequential(default_conv(n_colors, n_feats, 3))
        self.body_nl_low = nn.Sequential(ResGroup(n_feats, 3, non_local=True, softmax_over=softmax_over))
        self.body = nn.Sequential(*[ResGroup(n_feats, 3) for _ in range(n_resgroups - 2)],
                                  default_conv(n_feats, n_feats, 3))
        self.body_nl_high = nn.Sequential(ResGroup(n_feats, 3, non_local=True, softmax_over=softmax_over))
        tail: list[nn.Module] = [default_conv(n_feats, n_colors, 3)]
        if self.task == "sr":
            tail.insert(0, Upsampler(scale, n_feats))
        self.tail = nn.Sequential(*tail)

    def describe(self) -> str:
        """The settings that decide parameter shapes, e.g. "RNAN(n_colors=3, scale=2, n_feats=64, n_resgroups=10)"
        (and the mosaic fill when set)."""
        return _describe(self.config)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.config.items())

    def forward(self, x: Tensor) -> Tensor:
        """(B, n_colors, H, W) -> (B, n_colors, scale*H, scale*W)."""
        if x.dim() != 4 or x.shape[1] != self.n_colors:
            raise ValueError(f"RNAN: input must be (B, {self.n_colors}, H, W), got shape {tuple(x.shape)}")
        if self.task == "sr":
            x = self.sub_mean(x)
        elif self.config["mosaic"] is not None:
            x = self.fill(x)
        feats = self.head(x)
        res = self.body_nl_high(self.body(self.body_nl_low(feats)))
        if self.task == "sr":
            return self.add_mean(self.tail(res + feats))
        return x + self.tail(res)

    # ------------------------------------------------------------------ checkpoints

    @classmethod
    def from_checkpoint(cls, path_or_state_dict: str | os.PathLike | Mapping, map_location: Any = "cpu",
                        softmax_over: str | None = None, *, weights_only: bool = True,
                        n_colors: int | None = None, scale: int | None = None, n_feats: int | None = None,
                        n_resgroups: int | None = None, rgb_range: float | None = None,
                        mosaic: str | None = None) -> "RNAN":
        """Build an RNAN whose configuration is read off an official-format state dict, and load it.

        path_or_state_dict: a file saved with torch.save, a .safetensors file, or an in-memory
            dict. A state dict nested under "state_dict", "model" or "params" is unwrapped, and a
            "module." (DataParallel) prefix is stripped. A `rnan-fast train` checkpoint (last.pt,
            best.pt) gives its EMA weights when the run kept an EMA, else its model weights.
        map_location: passed to torch.load; a device (str or torch.device) also places the model.
        softmax_over: "query" (official) or "key" for the non-local attention; None: the one a
            safetensors file's metadata records (rnan_fast.weights writes it), else "query".
        weights_only: torch.load's safe mode (tensors and plain containers only). Pass False only
            for a file you trust that also pickles other Python objects. (A safetensors file
            holds no code: it is always safe.)
        n_colors, scale, n_feats, n_resgroups: inferred when None; a value given here is what
            the weights must fit (a checkpoint for another configuration is then reported).
        rgb_range: the input range; default: a safetensors file's metadata, else read off the SR
            mean shift, else 255.
        mosaic: default: the file's stored config (safetensors metadata, or the model config a
            `rnan-fast train` checkpoint records), else None (the official model).

        Inferred: n_colors and n_feats from head.0.weight, n_resgroups from the number of
        body.<i> groups (+ 2 non-local groups), scale from the tail upsampler. The config a file
        stores (safetensors metadata, a training checkpoint's "model_config") must agree with
        them (else CheckpointError) and supplies what the shapes cannot tell (rgb_range,
        softmax_over, mosaic). The result's `config` holds them. Loading
        is strict; any missing, unexpected or mis-shaped key raises CheckpointError (a
        ValueError) listing them all.
        """
        state_dict, source, stored = _read(path_or_state_dict, map_location, weights_only)
        inferred = infer_config(state_dict, source)
        differ = [f"{k}: metadata {stored[k]!r}, tensors {inferred[k]!r}" for k in SHAPE_KEYS
                  if k in stored and stored[k] != inferred[k]]
        if differ:
            raise CheckpointError(f"{source}: the config in the file's metadata does not fit its tensors "
                                  f"({'; '.join(differ)})")
        given = {"n_colors": n_colors, "scale": scale, "n_feats": n_feats, "n_resgroups": n_resgroups,
                 "rgb_range": rgb_range, "softmax_over": softmax_over, "mosaic": mosaic}
        config = {**inferred, **stored, **{k: v for k, v in given.items() if v is not None}}
        net = cls(**config)
        hint = ""
        if any(config[k] != inferred[k] for k in SHAPE_KEYS):
            hint = f"\n  (the weights look like {_describe(inferred)})"
        net._load_checked(state_dict, source, hint)
        if isinstance(map_location, (str, torch.device)):
            net.to(map_location)
        return net

    @classmethod
    def pretrained(cls, name: str | None = None, device: Any = "cpu") -> "RNAN":
        """A model that ships with the package (rnan_fast/weights), in eval mode on `device`.

        name: see `RNAN.pretrained_models()` (default: the color denoiser,
        rnan_fast.weights.DEFAULT_MODEL). The file's SHA-256 is checked against its model card;
        rnan_fast.weights.WeightsError (a ValueError) names the file and what differs."""
        # Imported here: the zoo imports this module at its top (it builds models), never the
        # other way round at import time.
        from rnan_fast import weights

        return weights.load(name, device)

    @staticmethod
    def pretrained_models() -> dict:
        """{name: model card} of the shipped models (rnan_fast.weights.available())."""
        from rnan_fast import weights

        return weights.available()

    def load_checkpoint(self, path_or_state_dict: str | os.PathLike | Mapping, map_location: Any = "cpu",
                        *, weights_only: bool = True) -> "RNAN":
        """Load an official-format checkpoint into this model, strictly; returns self.

        Reads and unwraps like `from_checkpoint`; raises CheckpointError listing every missing,
        unexpected and mis-shaped key when the weights do not fit this configuration.
        """
        state_dict, source = read_checkpoint(path_or_state_dict, map_location, weights_only)
        self._load_checked(state_dict, source)
        return self

    def _load_checked(self, state_dict: Mapping[str, Tensor], source: str, hint: str = "") -> None:
        report, missing, unexpected, misshaped = _compare(self.state_dict(), state_dict)
        if report:
            raise CheckpointError(f"{source}: the weights do not fit {self.describe()}:\n{report}{hint}",
                                  missing, unexpected, misshaped)
        self.load_state_dict(state_dict, strict=True)



# The settings as read-only attributes (net.n_feats, net.scale, ...): `config` is their one store.
for _key in _DEFAULTS:
    setattr(RNAN, _key, property(lambda self, key=_key: self.config[key], doc=f"config[{_key!r}]"))


def _describe(config: Mapping) -> str:
    """"RNAN(n_colors=3, scale=1, n_feats=64, n_resgroups=10)", with ", mosaic='grbg'" when set."""
    mosaic = f", mosaic={config['mosaic']!r}" if config.get("mosaic") is not None else ""
    return "RNAN(" + ", ".join(f"{k}={config[k]}" for k in SHAPE_KEYS) + mosaic + ")"


def make_model(args: Any, parent: bool = False) -> RNAN:
    """The official entry point `model.rnan.make_model(args)`."""
    return RNAN(args)


# ---------------------------------------------------------------------- checkpoint helpers

def read_checkpoint(path_or_state_dict: str | os.PathLike | Mapping, map_location: Any = "cpu",
                    weights_only: bool = True) -> tuple[dict, str]:
    """(flat state dict, a name for messages) from a checkpoint file (torch.save or safetensors)
    or an in-memory dict."""
    return _read(path_or_state_dict, map_location, weights_only)[:2]


def _read(path_or_state_dict: str | os.PathLike | Mapping, map_location: Any,
          weights_only: bool) -> tuple[dict, str, dict]:
    """read_checkpoint's (state dict, name), and the RNAN config the file stores: a safetensors
    file's metadata (stored_config), a training checkpoint's "model_config" (RNAN settings
    only), else {}."""
    stored = stored_config(path_or_state_dict)
    if isinstance(path_or_state_dict, (str, os.PathLike)):
        source = os.fspath(path_or_state_dict)
        obj = load_checkpoint_file(source, map_location, weights_only)
    elif isinstance(path_or_state_dict, Mapping):
        source, obj = "state dict", path_or_state_dict
    else:
        raise TypeError(f"RNAN: expected a checkpoint path or a state dict, got {type(path_or_state_dict).__name__}")
    if isinstance(obj, Mapping) and obj.get("format") == TRAINING_FORMAT:
        # a training checkpoint: the EMA weights when the run kept them (what validation scored)
        model_config = obj.get("model_config")   # (absent in checkpoints made before it was kept)
        if isinstance(model_config, Mapping):
            stored = {k: v for k, v in model_config.items() if k in _DEFAULTS}
        obj = obj["ema"] if isinstance(obj.get("ema"), Mapping) else obj["model"]
    return _unwrap(obj, source), source, stored


def load_checkpoint_file(path: str, map_location: Any, weights_only: bool) -> Any:
    """torch.load of `path` (a safetensors file: its {name: tensor} dict), with FileNotFoundError /
    IsADirectoryError / CheckpointError that name the file and say what is wrong with it (empty,
    not a checkpoint, pickled objects)."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(2, "checkpoint file not found", path)
    if p.is_dir():
        raise IsADirectoryError(21, "checkpoint path is a directory, not a file", path)
    if p.stat().st_size == 0:
        raise CheckpointError(f"{path}: the checkpoint file is empty")
    if is_safetensors(p):
        return _read_safetensors(p, map_location)
    try:
        return torch.load(p, map_location=map_location, weights_only=weights_only)
    except Exception as e:  # torch.load fails on bad bytes with many types: report them all as one
        detail = _error_detail(e)
        if weights_only and "Unsupported global" in str(e):
            raise CheckpointError(
                f"{path}: the file pickles Python objects besides tensors, which a weights-only load "
                f"refuses; if you trust the file, pass weights_only=False ({detail})") from e
        raise CheckpointError(f"{path}: not a PyTorch checkpoint, or a truncated or damaged one "
                              f"({type(e).__name__}: {detail})") from e


def is_safetensors(path: str | os.PathLike) -> bool:
    """True for a .safetensors name, or a file that starts as one: an 8-byte little-endian header
    length that fits the file, then the header's "{" (a torch.save zip starts with "PK", a legacy
    pickle with 0x80: neither passes)."""
    p = Path(path)
    if p.suffix == ".safetensors":
        return True
    with open(p, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:] == b"{" and int.from_bytes(head[:8], "little") + 8 <= p.stat().st_size


def _safetensors_error(path: str | os.PathLike, e: BaseException) -> CheckpointError:
    return CheckpointError(f"{path}: not a safetensors file, or a truncated or damaged one "
                           f"({type(e).__name__}: {_first_line(str(e)) or 'no detail'})")


def _safetensors():
    """The safetensors package (imported on first use: `import rnan_fast` works without it)."""
    try:
        import safetensors.torch
    except ImportError as e:
        raise CheckpointError(f"safetensors files need the safetensors package ({e}): pip install safetensors") from None
    return safetensors


def _read_safetensors(path: Path, map_location: Any) -> dict:
    """{name: tensor} of a safetensors file, on map_location when that is a device (else the CPU)."""
    st = _safetensors()
    try:
        tensors = st.torch.load(path.read_bytes())   # the whole file (a model's weights) in memory
    except Exception as e:  # SafetensorError, or a header that is not JSON / names unknown dtypes
        raise _safetensors_error(path, e) from e
    if isinstance(map_location, (str, torch.device)):
        tensors = {k: v.to(map_location) for k, v in tensors.items()}
    return tensors


def stored_config(path_or_state_dict: Any) -> dict:
    """The config that a safetensors file's metadata records under CONFIG_METADATA ({} for other
    files, in-memory dicts, and safetensors files without it). CheckpointError for a damaged file."""
    if not isinstance(path_or_state_dict, (str, os.PathLike)) or not is_safetensors(path_or_state_dict):
        return {}
    st = _safetensors()
    try:
        with st.safe_open(os.fspath(path_or_state_dict), framework="pt") as f:
            metadata = f.metadata() or {}
        config = json.loads(metadata.get(CONFIG_METADATA, "{}"))
    except Exception as e:  # SafetensorError, or metadata that is not JSON
        raise _safetensors_error(path_or_state_dict, e) from e
    if not isinstance(config, dict):
        raise CheckpointError(f"{os.fspath(path_or_state_dict)}: the metadata entry {CONFIG_METADATA!r} "
                              f"is not a JSON object")
    return {k: v for k, v in config.items() if k in _DEFAULTS}


def safetensors_bytes(state_dict: Mapping[str, Tensor], config: Mapping) -> bytes:
    """A safetensors file of `state_dict` (contiguous CPU copies) with `config` (the RNAN's
    settings) as JSON in its metadata, which from_checkpoint reads back. The same tensors and
    config give the same bytes (so the same SHA-256): the metadata holds one entry, since
    safetensors writes several in a random order (3 runs of one 4-entry save: 3 orders)."""
    st = _safetensors()
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    return st.torch.save(tensors, metadata={CONFIG_METADATA: json.dumps(dict(config))})


def _error_detail(e: BaseException) -> str:
    """The telling line of a torch.load error (its weights-only errors bury it mid-text)."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(e)).strip()
    for line in text.splitlines():
        if "WeightsUnpickler error:" in line:
            return line.split("WeightsUnpickler error:", 1)[1].strip()
    return _first_line(text) or type(e).__name__


def _first_line(text: str) -> str:
    lines = text.strip().splitlines()
    return lines[0] if lines else ""


def _unwrap(obj: Any, source: str) -> dict:
    """The flat {name: tensor} dict inside a checkpoint."""
    for _ in range(4):
        if isinstance(obj, nn.Module):
            obj = obj.state_dict()
        if not isinstance(obj, Mapping):
            raise CheckpointError(f"{source}: expected a state dict (a mapping of names to tensors), "
                                  f"found {type(obj).__name__}")
        # Go down into a wrapper key unless this level holds the weights themselves: a training
        # checkpoint may keep tensors beside its state dict ({"state_dict": ..., "best_psnr": t}).
        inner = next((k for k in _WRAPPER_KEYS if isinstance(obj.get(k), (Mapping, nn.Module))), None)
        holds_weights = any(isinstance(v, Tensor) and isinstance(k, str) and k.endswith("head.0.weight")
                            for k, v in obj.items())
        if holds_weights or (inner is None and any(isinstance(v, Tensor) for v in obj.values())):
            break
        if inner is None:
            keys = ", ".join(repr(k) for k in list(obj)[:8]) or "none"
            raise CheckpointError(f"{source}: no tensors found, and none of the keys "
                                  f"{', '.join(map(repr, _WRAPPER_KEYS))} holds a state dict (keys: {keys})")
        obj = obj[inner]
    state_dict = {}
    for k, v in obj.items():
        if not isinstance(k, str) or not isinstance(v, Tensor):
            continue  # bookkeeping beside the weights (an epoch counter, ...) is not a parameter
        state_dict[k] = v
    if not state_dict:
        raise CheckpointError(f"{source}: the state dict holds no tensors")
    if all(k.startswith("module.") for k in state_dict):
        state_dict = {k[len("module."):]: v for k, v in state_dict.items()}
    return state_dict


def infer_config(state_dict: Mapping[str, Tensor], source: str = "state dict") -> dict:
    """n_colors, scale, n_feats, n_resgroups and rgb_range of an official-format RNAN state dict."""
    head = state_dict.get("head.0.weight")
    if head is None or head.dim() != 4:
        some = ", ".join(list(state_dict)[:5])
        raise CheckpointError(f"{source}: no 4-d 'head.0.weight', so not an RNAN state dict "
                              f"(first keys: {some}{', ...' if len(state_dict) > 5 else ''})")
    n_feats, n_colors = int(head.shape[0]), int(head.shape[1])
    groups = {int(m.group(1)) for k in state_dict if (m := re.match(r"body\.(\d+)\.body\.", k))}
    n_resgroups = len(groups) + 2

    stages = []
    i = 0
    while f"tail.0.{i}.weight" in state_dict:
        stages.append(int(state_dict[f"tail.0.{i}.weight"].shape[0]))
        i += 2
    if not stages:
        if "tail.0.weight" not in state_dict:
            raise CheckpointError(f"{source}: neither 'tail.0.weight' (denoising form) nor "
                                  f"'tail.0.0.weight' (super-resolution form) is present")
        scale = 1
    elif stages == [9 * n_feats]:
        scale = 3
    elif all(s == 4 * n_feats for s in stages):
        scale = 2 ** len(stages)
    else:
        raise CheckpointError(f"{source}: upsampler convs with {stages} output channels fit no scale "
                              f"for n_feats={n_feats} (expected 4*n_feats per x2 stage or 9*n_feats for x3)")

    rgb_range: float = 255
    bias = state_dict.get("sub_mean.bias")
    if bias is not None and bias.numel() == 3 and bias.device.type != "meta":
        estimate = float(-bias.detach().double()[0]) / DIV2K_RGB_MEAN[0]
        if estimate > 0:
            rounded = round(estimate)
            rgb_range = rounded if abs(estimate - rounded) < 1e-3 * max(1.0, estimate) else estimate
    return {"n_colors": n_colors, "scale": scale, "n_feats": n_feats, "n_resgroups": n_resgroups,
            "rgb_range": rgb_range}


def adapt_colors(state_dict: Mapping[str, Tensor], n_colors: int, source: str = "state dict") -> dict:
    """The weights of a denoising-form (scale 1) RNAN for `n_colors` channels from one for the other
    of 1 (gray) and 3 (RGB); only head.0 and tail.0 change, every other tensor is shared.

    3 -> 1: head summed over R, G, B and tail averaged, so that the gray net on x equals the color
    net on x replicated to 3 channels, averaged over them. 1 -> 3: head / 3 per channel and the tail
    repeated, so that the color net adds to every channel the correction that the gray net makes
    to the channel mean (on gray replicated to 3 channels: the gray net's output in each). A start
    for training (`--init`): a gray denoiser from a color one."""
    found = infer_config(state_dict, source)
    if found["scale"] != 1:
        raise CheckpointError(f"{source}: only a denoising-form (scale 1) RNAN changes its colors, "
                              f"this one has scale {found['scale']}")
    if {found["n_colors"], n_colors} != {1, 3}:
        raise CheckpointError(f"{source}: colors change between 1 and 3 only, not {found['n_colors']} -> {n_colors}")
    out = dict(state_dict)
    head, weight, bias = (state_dict[k] for k in ("head.0.weight", "tail.0.weight", "tail.0.bias"))
    if n_colors == 1:
        out["head.0.weight"] = head.sum(1, keepdim=True)
        out["tail.0.weight"], out["tail.0.bias"] = weight.mean(0, keepdim=True), bias.mean(0, keepdim=True)
    else:
        out["head.0.weight"] = head.repeat(1, 3, 1, 1) / 3
        out["tail.0.weight"], out["tail.0.bias"] = weight.repeat(3, 1, 1, 1), bias.repeat(3)
    return out


def _compare(expected: Mapping[str, Tensor], given: Mapping[str, Tensor], limit: int = 20):
    """(report, missing, unexpected, misshaped); the report is "" when the state dicts fit."""
    missing = [k for k in expected if k not in given]
    unexpected = [k for k in given if k not in expected]
    misshaped = [(k, tuple(given[k].shape), tuple(expected[k].shape))
                 for k in expected if k in given and given[k].shape != expected[k].shape]
    lines = []
    for title, items in (("missing keys", missing), ("unexpected keys", unexpected),
                         ("mis-shaped keys", [f"{k}: checkpoint {c}, model {m}" for k, c, m in misshaped])):
        if items:
            lines.append(f"  {len(items)} {title}:")
            lines += [f"    {item}" for item in items[:limit]]
            if len(items) > limit:
                lines.append(f"    ... and {len(items) - limit} more (the error's .{title.split()[0].replace('-', '')} "
                             f"attribute lists them all)")
    return "\n".join(lines), missing, unexpected, misshaped
