"""The training run: configuration, schedule, EMA, validation, checkpoints, signals, logs.

    from rnan_fast.train import TrainConfig, run
    run(TrainConfig(task="denoise_rgb", sigma=25, data=["DIV2K_train_HR"], out="runs/dn25", steps=300_000))

A run directory holds
    config.json   the resolved configuration (written at the start)
    last.pt       the latest checkpoint (rnan_fast.train.checkpoint), every save_every steps,
                  at the end, and on SIGINT/SIGTERM
    best.pt       the checkpoint of the best validation PSNR (with val folders)
    log.jsonl     one JSON record per line: {"step", "loss", "lr", "images_per_s", "elapsed_s"}
                  every log_every steps, {"step", "val_psnr", "val_ssim", "val_images"} per validation

The run is a function of its configuration: the batch of step t comes from (seed, t)
(rnan_fast.train.datasets), the learning rate from the step, and the model from the seed; so a
run resumed from last.pt at step k ends with the weights of an uninterrupted run (bit for bit on
the CPU with the same thread count), and K processes under torchrun (each a slice of the same
global batch, gradients averaged by DDP) train what one process does, to fp32 rounding.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from rnan_fast.data import atomic_write, new_file_mode
from rnan_fast.train import checkpoint as C
from rnan_fast.train import datasets as DS
from rnan_fast.train import distributed
from rnan_fast.train.step import PRECISIONS, make_optimizer, make_train_step

__all__ = ["TrainConfig", "ConfigError", "OutOfMemory", "NonFiniteLoss", "Interrupted", "RUN_KEYS", "resolve_config",
           "learning_rate", "run"]

SCHEDULES = ("step", "cosine")


class ConfigError(ValueError):
    """A configuration that cannot run, or that contradicts the checkpoint it resumes."""


class OutOfMemory(ConfigError):
    """A training step ran out of GPU memory: the message names the batch and patch sizes to lower."""

    def __init__(self, cfg: "TrainConfig", step: int, device, world_size: int, error: BaseException):
        per_rank = f" ({cfg.batch_size // world_size} per process)" if world_size > 1 else ""
        side = cfg.patch_size * cfg.model_scale
        hr = f", HR {side}x{side}" if cfg.model_scale > 1 else ""
        first = str(error).splitlines()[0] if str(error) else type(error).__name__
        super().__init__(f"out of GPU memory on {device} in training step {step} with --batch-size {cfg.batch_size}"
                         f"{per_rank} and --patch-size {cfg.patch_size} ({cfg.patch_size}x{cfg.patch_size}{hr}): "
                         f"lower --batch-size or --patch-size ({first})")


class NonFiniteLoss(RuntimeError):
    """The loss became NaN or inf at `step` (1-based); last.pt holds the last good save."""

    def __init__(self, step: int, value: float, last_good: int | None, path):
        kept = f"{path} is from step {last_good}" if last_good is not None else "no checkpoint was saved yet"
        super().__init__(f"the loss became {value} at step {step}; training stopped there, {kept}. "
                         "Lower --lr, or use --precision fp32")
        self.step, self.value, self.last_good = step, value, last_good


# Under DDP the ranks agree on a received signal through an all-reduce, which waits for the
# step's work (on a GPU: a host sync that would stall the queue of launches every step). So they
# compare flags only on steps that sync anyway (log, save, validation) and every
# SIGNAL_CHECK_EVERY steps: a signal stops the run at most that many steps late (torchrun forwards
# SIGTERM to every rank, and schedulers give seconds of grace). One process checks every step.
SIGNAL_CHECK_EVERY = 10


def signal_check_due(step: int, distributed: bool, syncing: bool) -> bool:
    """Whether step `step` (1-based, just finished) looks at the signal flag."""
    return not distributed or syncing or step % SIGNAL_CHECK_EVERY == 0


class Interrupted(Exception):
    """SIGINT or SIGTERM: last.pt was saved at `step`."""

    def __init__(self, signum: int, step: int):
        super().__init__(f"{signal.Signals(signum).name} at step {step}")
        self.signum, self.step = signum, step


@dataclass
class TrainConfig:
    """Every setting of a run (the CLI options of `rnan-fast train`, same names with _)."""

    task: str | None = None
    data: list = field(default_factory=list)
    out: str | None = None
    sigma: float | None = None
    sigma_range: list | None = None
    quality: int | None = None
    scale: int | None = None
    steps: int = 1_000_000                # the official 1000 epochs of 1000 iterations
    batch_size: int = 16                  # the global batch (all processes together)
    patch_size: int = 48                  # input patch side (SR: LR side; HR is scale x)
    n_feats: int = 64
    n_resgroups: int = 10
    lr: float = 1e-4
    schedule: str = "step"                # "step": halve every lr_decay_every; "cosine": to 0 at `steps`
    lr_decay_every: int = 200_000
    seed: int = 0
    ema: float | None = None              # EMA decay (e.g. 0.999), None = no EMA
    precision: str = "fp32"
    device: str = "cpu"
    workers: int | None = None            # None: datasets.default_workers
    save_every: int = 1000
    log_every: int = 100
    val: list | None = None
    val_every: int = 1000
    val_limit: int | None = None
    val_sigma: float | None = None        # default: sigma, or the middle of sigma_range
    init: str | None = None

    @property
    def n_colors(self) -> int:
        from rnan_fast.data import TASK_COLORS

        return TASK_COLORS[self.task]

    @property
    def model_scale(self) -> int:
        return self.scale if self.task == "sr" else 1

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# Settings that decide what is trained: a resumed run must not change them (`steps` also for cosine).
RUN_KEYS = ("task", "sigma", "sigma_range", "quality", "scale", "batch_size", "patch_size", "n_feats",
            "n_resgroups", "lr", "schedule", "lr_decay_every", "seed", "ema", "precision")


def _check(cfg: TrainConfig) -> None:
    from rnan_fast.data import TASKS

    if cfg.task is None:
        raise ConfigError(f"--task is required: one of {', '.join(TASKS)}")
    if cfg.task not in TASKS:
        raise ConfigError(f"--task must be one of {', '.join(TASKS)}, got {cfg.task!r}")
    if not cfg.out:
        raise ConfigError("--out RUN_DIR is required (where last.pt, best.pt, log.jsonl and config.json go)")
    given = {"sigma": cfg.sigma, "sigma_range": cfg.sigma_range, "quality": cfg.quality, "scale": cfg.scale}
    needs = {"denoise_gray": ("sigma", "sigma_range"), "denoise_rgb": ("sigma", "sigma_range"), "denoise_photo": (),
             "car": ("quality",), "sr": ("scale",), "demosaic": ()}[cfg.task]
    for key, value in given.items():
        if value is not None and key not in needs:
            raise ConfigError(f"--{key.replace('_', '-')} does not apply to --task {cfg.task}")
    if cfg.task in ("denoise_gray", "denoise_rgb"):
        if (cfg.sigma is None) == (cfg.sigma_range is None):
            raise ConfigError(f"--task {cfg.task} needs one of --sigma S or --sigma-range A B (0..255 scale)")
        if cfg.sigma is not None and not cfg.sigma >= 0:
            raise ConfigError(f"--sigma must be >= 0, got {cfg.sigma}")
        if cfg.sigma_range is not None:
            if len(cfg.sigma_range) != 2 or not 0 <= cfg.sigma_range[0] <= cfg.sigma_range[1]:
                raise ConfigError(f"--sigma-range needs 0 <= A <= B, got {cfg.sigma_range}")
    if cfg.task == "car" and (cfg.quality is None or not 1 <= cfg.quality <= 100):
        raise ConfigError(f"--task car needs --quality within 1..100, got {cfg.quality}")
    if cfg.task == "sr" and (cfg.scale is None or cfg.scale < 2):
        raise ConfigError(f"--task sr needs --scale >= 2, got {cfg.scale}")
    positive = {"steps": cfg.steps, "batch-size": cfg.batch_size, "patch-size": cfg.patch_size,
                "n-feats": cfg.n_feats, "save-every": cfg.save_every, "log-every": cfg.log_every,
                "val-every": cfg.val_every, "lr-decay-every": cfg.lr_decay_every}
    for name, value in positive.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"--{name} must be a positive integer, got {value!r}")
    if cfg.n_feats % 2:
        raise ConfigError(f"--n-feats must be even (the non-local blocks use n_feats/2 channels), got {cfg.n_feats}")
    if not isinstance(cfg.n_resgroups, int) or cfg.n_resgroups < 2:
        raise ConfigError(f"--n-resgroups must be >= 2 (two non-local groups), got {cfg.n_resgroups}")
    if cfg.patch_size < 8:
        raise ConfigError(f"--patch-size must be >= 8 (the mask branch halves it twice), got {cfg.patch_size}")
    if not (cfg.lr > 0 and math.isfinite(cfg.lr)):
        raise ConfigError(f"--lr must be a positive number, got {cfg.lr}")
    if cfg.schedule not in SCHEDULES:
        raise ConfigError(f"--schedule must be one of {', '.join(SCHEDULES)}, got {cfg.schedule!r}")
    if cfg.seed < 0:
        raise ConfigError(f"--seed must be >= 0, got {cfg.seed}")
    if cfg.ema is not None and not 0 < cfg.ema < 1:
        raise ConfigError(f"--ema is a decay in (0, 1), e.g. 0.999; got {cfg.ema}")
    if cfg.precision not in PRECISIONS:
        raise ConfigError(f"--precision must be fp32 or bf16, got {cfg.precision!r}")
    if cfg.workers is not None and cfg.workers < 0:
        raise ConfigError(f"--workers must be >= 0, got {cfg.workers}")
    if not cfg.data:
        raise ConfigError("--data needs at least one folder of training images")
    if cfg.val_limit is not None and cfg.val_limit < 1:
        raise ConfigError(f"--val-limit must be >= 1, got {cfg.val_limit}")


def resolve_config(options: dict, file_config: dict | None = None, resumed: dict | None = None,
                   source: str = "the checkpoint") -> TrainConfig:
    """The run's configuration: the defaults, then `resumed` (a checkpoint's config) or else
    `file_config` (--config), then `options` (what the command line gave; None = not given).

    A resumed run refuses an option that changes what is trained (RUN_KEYS; `steps` too with the
    cosine schedule) and a --config that does. Unknown keys are a ConfigError."""
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    for where, given in (("--config", file_config or {}), ("options", options)):
        unknown = sorted(set(given) - names)
        if unknown:
            raise ConfigError(f"{where}: unknown setting(s) {', '.join(unknown)}; known: {', '.join(sorted(names))}")
    values = dataclasses.asdict(TrainConfig())
    layers = [resumed] if resumed is not None else [file_config or {}]
    if resumed is not None and file_config:
        layers.append(file_config)
    layers.append({k: v for k, v in options.items() if v is not None})
    for i, layer in enumerate(layers):
        for key, value in layer.items():
            if isinstance(value, tuple):
                value = list(value)
            if resumed is not None and i > 0 and _defines_run(key, resumed) and value != resumed.get(key):
                name = "--" + key.replace("_", "-")
                raise ConfigError(f"{name} {_show(value)} contradicts {source}, which was trained with "
                                  f"{key} {_show(resumed.get(key))}; drop the option to continue that run, "
                                  "or start a new run in another --out")
            values[key] = value
    cfg = TrainConfig(**values)
    _check(cfg)
    return cfg


def _defines_run(key: str, resumed: dict) -> bool:
    return key in RUN_KEYS or (key == "steps" and resumed.get("schedule") == "cosine")


def _show(v) -> str:
    return " ".join(map(str, v)) if isinstance(v, list) else str(v)


def learning_rate(cfg: TrainConfig, step: int) -> float:
    """The learning rate of optimizer step `step` (0-based): the official step schedule (halved
    every lr_decay_every steps) or a cosine from lr to 0 over cfg.steps."""
    if cfg.schedule == "cosine":
        return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * min(step, cfg.steps) / cfg.steps))
    return cfg.lr * 0.5 ** (step // cfg.lr_decay_every)


def _set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        if isinstance(group["lr"], torch.Tensor):  # the CUDA-graph step reads a device tensor
            group["lr"].fill_(lr)
        else:
            group["lr"] = lr


def data_fingerprint(names: list[str], images: list) -> str:
    """What the training images are (names and sizes, in order): a resumed run must see the same."""
    h = hashlib.sha256()
    for name, img in zip(names, images):
        h.update(f"{name}:{'x'.join(map(str, img.shape))};".encode())
    return h.hexdigest()[:16]


# --------------------------------------------------------------------------- the run

class _Signals:
    """SIGINT/SIGTERM set a flag (the loop saves and stops after the current step)."""

    def __init__(self):
        self.received: int | None = None
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: no handlers, the default behaviour stays
                pass
        return self

    def _handle(self, signum, _frame):
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now, without the save
        self.received = signum

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class _RunFiles:
    """What rank 0 writes into the run directory."""

    def __init__(self, out: Path, main: bool):
        self.out, self.main = out, main
        self.last, self.best, self.log, self.config = (out / "last.pt", out / "best.pt", out / "log.jsonl",
                                                       out / "config.json")

    def write_config(self, cfg: TrainConfig) -> None:
        if self.main:
            with atomic_write(self.config, mode=new_file_mode()) as f:
                f.write((json.dumps(cfg.to_dict(), indent=2) + "\n").encode())

    def trim_log(self, step: int) -> None:
        """Keep the records up to `step` (a resumed run rewrites what came after its checkpoint)."""
        if not self.main or not self.log.exists():
            return
        kept = [line for line in self.log.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= step]
        with atomic_write(self.log, mode=new_file_mode()) as f:
            f.write("".join(line + "\n" for line in kept).encode())

    def append_log(self, record: dict) -> None:
        if self.main:
            with open(self.log, "a") as f:
                f.write(json.dumps(record) + "\n")


def _model(cfg: TrainConfig, resumed: dict | None = None):
    """The run's RNAN (initial weights seeded). resumed: the model config of the checkpoint a
    run resumes from (its `mosaic` is kept), None for a new run."""
    from rnan_fast.model import RNAN

    torch.manual_seed(cfg.seed)  # the initial weights are a function of the seed
    # a demosaicing model fills the mosaic bilinearly before its body (RNAN's `mosaic`): its
    # residual then starts from bilinear demosaicing, not from the two thirds of zeros
    mosaic = "grbg" if cfg.task == "demosaic" else None
    if resumed is not None:
        mosaic = resumed.get("mosaic")
    return RNAN(n_colors=cfg.n_colors, scale=cfg.model_scale, n_feats=cfg.n_feats, n_resgroups=cfg.n_resgroups,
                mosaic=mosaic)


def _load_init(net, path: str, note) -> None:
    """Load --init weights into `net`. A 1 <-> 3 channel change is adapted (model.adapt_colors).
    Between forms or scales (a denoiser or an x2 model starting an x4 run) the body is shared and
    only the tensors whose name and shape fit are taken; the note names those left fresh. n_feats
    and n_resgroups must match."""
    from rnan_fast.model import SHAPE_KEYS, CheckpointError, adapt_colors, infer_config, read_checkpoint

    state_dict, source = read_checkpoint(path, "cpu", True)
    found = infer_config(state_dict, source)
    colors = (found["n_colors"], net.config["n_colors"])
    if colors[0] != colors[1] and found["scale"] == 1:
        try:
            state_dict = adapt_colors(state_dict, colors[1], source)
        except CheckpointError:
            pass  # not a 1 <-> 3 denoiser: the check below names the mismatch
        else:
            found["n_colors"] = colors[1]
            note(f"--init {path}: {colors[0]}-channel weights adapted to {colors[1]} channel"
                 f"{'s' * (colors[1] > 1)} (head and tail, model.adapt_colors)")
    want = {k: net.config[k] for k in SHAPE_KEYS}
    diff = {k: (found[k], v) for k, v in want.items() if found[k] != v and k != "scale"}
    if diff:
        detail = ", ".join(f"{k} {a} (run: {b})" for k, (a, b) in diff.items())
        raise ConfigError(f"--init {path}: the weights do not fit the run: {detail}")
    if found["scale"] == want["scale"]:
        net._load_checked(state_dict, source)
        return
    own = net.state_dict()
    taken = {k: v for k, v in state_dict.items() if k in own and own[k].shape == v.shape}
    fresh = [k for k in own if k not in taken]
    net.load_state_dict(taken, strict=False)
    note(f"--init {path}: scale {found['scale']} weights in a scale {want['scale']} run: took {len(taken)} of "
         f"{len(own)} tensors; fresh: {', '.join(fresh)}")


def validate(model, pairs: list, task: str, scale: int, device, d: distributed.Dist) -> tuple[float, float, int]:
    """Mean PSNR and SSIM over every rank's share of the validation pairs (all-reduced), and
    the image count. The model runs whole images in fp32 under inference mode."""
    from rnan_fast.inference import restore_image
    from rnan_fast.metrics import evaluate

    was_training = model.training
    model.eval()
    sums = [0.0, 0.0, 0.0]
    try:
        for _name, gt, lq in pairs:
            out = restore_image(model, lq, device=device)
            p, s = evaluate(gt, out, task, scale)
            sums[0] += p
            sums[1] += s
            sums[2] += 1
    finally:
        model.train(was_training)
    total_p, total_s, n = d.all_reduce_sum(sums)
    return (total_p / n, total_s / n, int(n)) if n else (math.nan, math.nan, 0)


def _prepare_out(files: _RunFiles, resume: bool, d: distributed.Dist) -> None:
    """The run directory exists and is writable; a fresh run refuses one that holds a run."""
    error = None
    if d.main:
        out = files.out
        try:
            if out.exists() and not out.is_dir():
                raise ConfigError(f"--out {out} exists and is not a folder")
            if resume and not files.last.exists():
                raise ConfigError(f"--resume: no checkpoint {files.last} to continue from")
            if not resume and files.last.exists():
                raise ConfigError(f"--out {out} already holds a run ({files.last}); pass --resume to continue it, "
                                  "or choose another --out")
            try:
                out.mkdir(parents=True, exist_ok=True)
                probe = out / f".write-test.{os.getpid()}"
                probe.write_bytes(b"")
                probe.unlink()
            except OSError as e:
                raise ConfigError(f"--out {out}: cannot write there ({e.strerror or e})") from None
        except ConfigError as e:
            error = str(e)
    error = d.broadcast_object(error)
    if error:
        raise ConfigError(error)


def run(cfg: TrainConfig, resume: bool = False, quiet: bool = False, message: Callable[[str], None] | None = None,
        resumed_state: dict | None = None) -> dict:
    """Train as `cfg` says; returns {"step", "last", "best", "best_psnr", "loss"}.

    resume: continue from cfg.out/last.pt (resumed_state: that checkpoint, already read, whose
    config produced `cfg` through resolve_config). message: where one-line notes go (rank 0
    only; default: stderr, through tqdm when the bar is on).
    Raises ConfigError / DataError for unusable settings or data, NonFiniteLoss, Interrupted
    (after saving last.pt)."""
    joined = not distributed.initialized()  # a caller's own process group is left to the caller
    d = distributed.init(cfg.device)
    try:
        return _Training(cfg, d, resume, quiet, message, resumed_state).loop()
    finally:
        if joined:
            distributed.shutdown()


def _cpu_has_fast_bf16() -> bool:
    """Whether oneDNN runs bf16 on this CPU natively (AVX-512 BW/VL/DQ or newer); PyTorch's own
    test of it is private, so an unknown answer counts as yes (no note)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return True


class _Training:
    """One run's state, built in the order that makes it a function of its configuration (data,
    then the seeded model, its EMA, the optimizer, and on --resume the saved states and RNG),
    and the work of each step: train, log, validate, checkpoint."""

    def __init__(self, cfg: TrainConfig, d: distributed.Dist, resume: bool, quiet: bool,
                 message: Callable[[str], None] | None, state: dict | None):
        self.cfg, self.d, self.quiet, self.message = cfg, d, quiet, message
        self.device = d.device
        self.show_bar = d.main and not quiet
        self.files = _RunFiles(Path(cfg.out), d.main)
        _prepare_out(self.files, resume, d)
        if resume and state is None:
            state = C.read_training_checkpoint(self.files.last)
        if cfg.batch_size % d.world_size:
            raise ConfigError(f"--batch-size {cfg.batch_size} (the global batch) must be a multiple of the "
                              f"{d.world_size} processes")
        images = self._load_data(state)
        self._build_model(state)
        self.start = state["step"] if state is not None else 0
        self.best = dict(state["best"]) if state is not None and state.get("best") else None
        self.last_saved = self.start if state is not None else None
        self.files.write_config(cfg)
        self.files.trim_log(self.start)
        self._build_step(images)
        self.pending: list[torch.Tensor] = []  # losses since the last check, on the device (no sync per step)
        self.checked_until = self.start
        self.loss = None

    def note(self, msg: str) -> None:
        """A one-line note from rank 0: to `message`, else stderr (through tqdm while its bar is on)."""
        if not self.d.main:
            return
        if self.message is not None:
            self.message(msg)
        elif self.show_bar:
            from tqdm import tqdm

            tqdm.write(msg, file=sys.stderr)
        else:
            print(msg, file=sys.stderr)

    def _load_data(self, state: dict | None) -> list:
        """The training images (checked against a resumed run's) and this rank's validation pairs."""
        cfg, d = self.cfg, self.d
        images, names = DS.load_images(cfg.data, cfg.task, cfg.patch_size * cfg.model_scale, warn=self.note)
        self.fingerprint = data_fingerprint(names, images)
        if state is not None and state["data"].get("fingerprint") not in (None, self.fingerprint):
            raise ConfigError(f"--resume: the training images differ from those of {self.files.last} "
                              f"({len(images)} images now); resume with the same --data")
        mib = sum(im.nbytes for im in images) / 2**20
        self.note(f"data: {len(images)} images ({mib:.1f} MiB as uint8 in memory) from {', '.join(map(str, cfg.data))}")
        self.val_pairs = []
        if cfg.val:
            val_sigma = cfg.val_sigma if cfg.val_sigma is not None else (
                cfg.sigma if cfg.sigma is not None or cfg.sigma_range is None else sum(cfg.sigma_range) / 2)
            self.val_pairs = DS.validation_pairs(cfg.val, cfg.task, cfg.seed, sigma=val_sigma, quality=cfg.quality,
                                                 scale=cfg.model_scale, limit=cfg.val_limit,
                                                 shard=slice(d.rank, None, d.world_size), warn=self.note)
            if int(d.all_reduce_sum([len(self.val_pairs)])[0]) == 0:
                raise DS.DataError(f"--val {' '.join(cfg.val)}: no usable validation image")
        return images

    def _build_model(self, state: dict | None) -> None:
        """The model (seeded, --init or the resumed weights), its EMA, the optimizer, the RNG."""
        cfg = self.cfg
        if cfg.precision == "bf16" and self.device.type == "cpu" and not _cpu_has_fast_bf16():
            self.note("note: --precision bf16 on a CPU without AVX-512 bf16 support runs oneDNN's slow bf16 "
                      "path (8x slower than fp32 on an AMD EPYC, BENCHMARKS.md); fp32 is faster here")
        # a resumed run rebuilds the model it checkpointed (its mosaic setting too); checkpoints
        # from before "model_config" was kept hold a model without one, as _model built then
        self.net = net = _model(cfg, None if state is None else state.get("model_config", {"mosaic": None}))
        if state is not None:
            net.load_state_dict(state["model"])
        elif cfg.init:
            _load_init(net, cfg.init, self.note)
        # channels_last on the CPU too: oneDNN's NHWC convolutions made a CPU step of RNAN (n_feats 32,
        # 4 groups, batch 16, 48x48) 1.8x faster in fp32 (16.8 -> 9.5 s) and 1.7x in bf16 (11.4 -> 6.7 s),
        # measured in one run on a loaded 2-core machine. Set here, before DDP: its gradient buckets
        # take the parameters' layout at construction (a later change scrambles the averaged gradients).
        net.to(device=self.device, memory_format=torch.channels_last)
        self.ema = None
        if cfg.ema is not None:
            self.ema = copy.deepcopy(net).requires_grad_(False)  # same layout: one fast foreach lerp
            if state is not None:
                self.ema.load_state_dict(state["ema"])
        self.optimizer = make_optimizer(net, lr=cfg.lr)
        if state is not None:
            self.optimizer.load_state_dict(state["optimizer"])
            C.set_rng_state(state["rng"])

    def _build_step(self, images: list) -> None:
        """The step function (DDP-wrapped under torchrun) and the loader of the remaining steps."""
        cfg, d, device = self.cfg, self.d, self.device
        trained = self.net
        if d.active:
            from torch.nn.parallel import DistributedDataParallel

            trained = DistributedDataParallel(self.net, device_ids=[device.index] if device.type == "cuda" else None)
        # The CUDA graph holds one process's whole step; DDP's gradient all-reduce runs eagerly.
        self.step_fn = make_train_step(trained, self.optimizer, loss="l1" if cfg.task == "sr" else "mse",
                                       precision=cfg.precision, channels_last=True,
                                       cuda_graph=device.type == "cuda" and not d.active)
        self.dataset = DS.TrainPatches(images, cfg.task, cfg.patch_size, cfg.batch_size, cfg.seed,
                                       sigma=cfg.sigma,
                                       sigma_range=tuple(cfg.sigma_range) if cfg.sigma_range else None,
                                       quality=cfg.quality, scale=cfg.model_scale)
        workers = cfg.workers if cfg.workers is not None else DS.default_workers(device)
        self.loader = torch.utils.data.DataLoader(
            self.dataset, batch_sampler=DS.StepBatches(self.start, cfg.steps, cfg.batch_size, d.rank, d.world_size),
            num_workers=workers, worker_init_fn=DS.worker_init if workers else None,
            pin_memory=device.type == "cuda", persistent_workers=False)
        self.ema_pairs = None
        if self.ema is not None:
            self.ema_pairs = ([p for p in self.ema.parameters()], [p for p in self.net.parameters()])

    def checkpoint(self, step: int) -> dict:
        cfg = self.cfg
        return {
            "format": C.TRAINING_FORMAT, "step": step,
            "model": self.net.state_dict(), "ema": self.ema.state_dict() if self.ema is not None else None,
            "optimizer": self.optimizer.state_dict(),
            "schedule": {"name": cfg.schedule, "lr": cfg.lr, "decay_every": cfg.lr_decay_every,
                         "steps": cfg.steps},
            "rng": C.rng_state(),
            "data": {**self.dataset.position(step * cfg.batch_size), "fingerprint": self.fingerprint},
            "best": self.best, "config": cfg.to_dict(), "model_config": dict(self.net.config),
        }

    def save(self, step: int, path: Path) -> None:
        if self.d.main:
            C.write_checkpoint(path, self.checkpoint(step))

    def flush(self) -> float | None:
        """Check the pending losses (one host sync): their mean over all ranks, or NonFiniteLoss
        at the first step where any rank's loss is not finite."""
        d = self.d
        if not self.pending:
            return None
        values = torch.stack(self.pending).double().cpu()
        self.pending.clear()
        finite = torch.isfinite(values)
        local_first = len(values) if bool(finite.all()) else int((~finite).nonzero()[0])
        first = int(d.all_reduce_min([float(local_first)])[0])
        if first < len(values):
            value = float(values[first]) if first == local_first else math.nan
            raise NonFiniteLoss(self.checked_until + first + 1, value, self.last_saved, self.files.last)
        self.checked_until += len(values)
        return d.all_reduce_sum([float(values.sum())])[0] / (len(values) * d.world_size)

    def train_step(self, step_index: int, lq: torch.Tensor, gt: torch.Tensor) -> None:
        """Step step_index + 1: the learning rate of its step, the update, the EMA."""
        cfg = self.cfg
        _set_lr(self.optimizer, learning_rate(cfg, step_index))
        try:
            self.pending.append(self.step_fn(lq, gt))
        except torch.OutOfMemoryError as e:   # (the first step also captures the CUDA graph)
            raise OutOfMemory(cfg, step_index + 1, self.device, self.d.world_size, e) from None
        if self.ema_pairs is not None:
            with torch.no_grad():
                torch._foreach_lerp_(self.ema_pairs[0], self.ema_pairs[1], 1.0 - cfg.ema)

    def log(self, step: int, images_per_s: float, elapsed: float, bar) -> None:
        record = {"step": step, "loss": self.loss, "lr": learning_rate(self.cfg, step - 1),
                  "images_per_s": round(images_per_s, 3), "elapsed_s": round(elapsed, 3)}
        self.files.append_log(record)
        bar.set_postfix(loss=f"{self.loss:.4g}", img_s=f"{images_per_s:.1f}")
        if self.quiet:
            self.note(json.dumps(record))

    def validate(self, step: int) -> None:
        """Validate the EMA (else the model); a new best is saved as best.pt."""
        psnr, ssim, n = validate(self.ema if self.ema is not None else self.net, self.val_pairs, self.cfg.task,
                                 self.cfg.model_scale, self.device, self.d)
        self.files.append_log({"step": step, "val_psnr": psnr, "val_ssim": ssim, "val_images": n})
        improved = self.best is None or psnr > self.best["psnr"]
        if improved:
            self.best = {"psnr": psnr, "ssim": ssim, "step": step}
            self.save(step, self.files.best)
        self.note(f"step {step}: validation PSNR {psnr:.4f} dB, SSIM {ssim:.4f} on {n} images"
                  f"{' (best so far: saved best.pt)' if improved else ''}")

    def loop(self) -> dict:
        """Train from self.start to cfg.steps; returns run()'s summary."""
        from tqdm import tqdm

        cfg, d, start = self.cfg, self.d, self.start
        if start >= cfg.steps:
            self.note(f"{self.files.last} is at step {start}, already >= --steps {cfg.steps}: nothing to train")
        bar = tqdm(total=cfg.steps, initial=start, desc="train", unit="step", disable=not self.show_bar,
                   file=sys.stderr, dynamic_ncols=True)
        self.note(f"training {self.net.describe()} for --task {cfg.task} on {self.device} ({d.world_size} process"
                  f"{'es' if d.active else ''}), steps {start} -> {cfg.steps}, global batch {cfg.batch_size}, "
                  f"patch {cfg.patch_size}")
        t_log, step_log = time.perf_counter(), start
        started = time.perf_counter()
        step = start
        try:
            with _Signals() as signals:
                for step_index, (lq, gt) in zip(range(start, cfg.steps), self.loader):
                    self.train_step(step_index, lq, gt)
                    step = step_index + 1
                    bar.update(1)
                    log_now = step % cfg.log_every == 0 or step == cfg.steps
                    save_now = step % cfg.save_every == 0 or step == cfg.steps
                    val_now = bool(self.val_pairs) and (step % cfg.val_every == 0 or step == cfg.steps)
                    stop = (d.any(signals.received is not None)
                            if signal_check_due(step, d.active, log_now or save_now or val_now) else False)
                    save_now = save_now or stop
                    if log_now or save_now or val_now:
                        mean = self.flush()
                        if mean is not None:
                            self.loss = mean
                    if log_now:
                        now = time.perf_counter()
                        self.log(step, (step - step_log) * cfg.batch_size / max(now - t_log, 1e-9), now - started, bar)
                        t_log, step_log = now, step
                    if val_now:
                        t_val = time.perf_counter()
                        self.validate(step)
                        t_log += time.perf_counter() - t_val  # images/s counts training only
                    if save_now:
                        self.save(step, self.files.last)
                        self.last_saved = step
                    if stop:
                        raise Interrupted(signals.received or signal.SIGINT, step)
        finally:
            bar.close()
            self.pending.clear()
        d.barrier()
        return {"step": step, "last": str(self.files.last), "best": str(self.files.best) if self.best else None,
                "best_psnr": self.best["psnr"] if self.best else None, "loss": self.loss}
