"""``rnan-fast train``: the command line of rnan_fast.train.loop (options -> TrainConfig -> run)."""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
from pathlib import Path

from rnan_fast.cli.common import EXIT_FAILURES, EXIT_OK, PROG, UserError, _device, _err, _warn_slow_paths
from rnan_fast.data import TASKS

TRAIN_EPILOG = """\
The batch of step t is drawn from (--seed, t) alone: the run is the same for any --workers and
any number of processes. --batch-size is the global batch; under
  torchrun --nproc_per_node=K -m rnan_fast train ...
each process trains on its K-th of it (DDP; gloo on the CPU, NCCL on GPUs, rank 0 writes).

RUN_DIR receives config.json (the resolved settings), last.pt (every --save-every steps, at the
end, and on SIGINT/SIGTERM), best.pt (best validation PSNR, with --val) and log.jsonl. Continue a
run with --out RUN_DIR --resume (settings come from last.pt; --steps may grow). Use the
checkpoints with `rnan-fast restore --weights RUN_DIR/best.pt` (EMA weights when --ema is on).
--config FILE: a JSON object of these settings (names with - or _), e.g. a run's config.json;
options given on the command line override it.

Training degradations are those of `rnan-fast eval` on random 8-fold flipped/transposed patches:
Gaussian noise on the 0..255 scale (a level drawn uniformly per patch with --sigma-range),
camera-like noise (denoise_photo: rnan_fast.data.photo_noise, a new draw per patch), JPEG
of the Y channel (car), GRBG mosaic (demosaic), MATLAB bicubic (sr: LR patch P, HR patch P*s,
L1 loss; MSE for the others). Adam (lr 1e-4, betas 0.9/0.999, eps 1e-8), halved every 200,000
steps (the official schedule) or cosine; validation images are degraded as eval --seed SEED does.
"""

def _read_config(path: str) -> dict:
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise UserError(f"--config {path}: cannot read it ({e.strerror or e})") from None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"--config {path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(obj, dict):
        raise UserError(f"--config {path}: expected a JSON object of settings, found {type(obj).__name__}")
    return {k.replace("-", "_"): v for k, v in obj.items()}


def cmd_train(args) -> int:
    from rnan_fast.model import CheckpointError
    from rnan_fast.train import checkpoint as C
    from rnan_fast.train import loop
    from rnan_fast.train.datasets import DataError

    options = {f.name: getattr(args, f.name) for f in dataclasses.fields(loop.TrainConfig)}  # one option per setting
    file_config = _read_config(args.config) if args.config else None
    state = None
    try:
        resumed = None
        if args.resume:
            out = options["out"] or (file_config or {}).get("out")
            if not out:
                raise UserError("--resume needs --out RUN_DIR (the run to continue)")
            last = Path(out) / "last.pt"
            if not last.exists():
                raise UserError(f"--resume: no checkpoint {last} to continue from")
            try:
                state = C.read_training_checkpoint(last)
            except (CheckpointError, OSError) as e:
                raise UserError(f"--resume: cannot read {last}: {e}") from None
            resumed = state["config"]
            options["out"] = out
        cfg = loop.resolve_config(options, file_config, resumed, source=f"{options['out']}/last.pt")
        device = _device(cfg.device)  # CUDA missing, or a GPU index that is not there: a usage error up front
        _warn_slow_paths(device, None, os.environ.get("RANK", "0") != "0")
        result = loop.run(cfg, resume=args.resume, quiet=args.quiet, resumed_state=state)
    except (loop.ConfigError, DataError) as e:
        raise UserError(str(e)) from None
    except loop.NonFiniteLoss as e:
        _err(str(e))
        return EXIT_FAILURES
    except loop.Interrupted as e:
        _err(f"interrupted ({e}); saved {Path(cfg.out) / 'last.pt'}; continue with: "
             f"{PROG} train --out {cfg.out} --resume")
        return 128 + e.signum
    if os.environ.get("RANK", "0") != "0":
        return EXIT_OK  # under torchrun, rank 0 reports
    best = f", best validation PSNR {result['best_psnr']:.4f} dB in {result['best']}" if result["best"] else ""
    loss = f", loss {result['loss']:.6g}" if result["loss"] is not None else ""
    print(f"{PROG}: trained to step {result['step']}{loss}; {result['last']}{best}")
    return EXIT_OK


def add_parser(sub) -> None:
    t = sub.add_parser("train", help="train RNAN on folders of images (resumable, torchrun-ready)",
                       description="Train RNAN for a restoration task from folders of clean images.",
                       epilog=TRAIN_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = t.add_argument_group("task")
    g.add_argument("--task", choices=TASKS)
    g.add_argument("--sigma", type=float, help="noise level (denoise_*), 0..255 scale")
    g.add_argument("--sigma-range", type=float, nargs=2, metavar=("A", "B"),
                   help="noise level drawn uniformly from [A, B] per patch (denoise_*)")
    g.add_argument("--quality", type=int, help="JPEG quality (car)")
    g.add_argument("--scale", type=int, help="SR factor (sr)")
    g = t.add_argument_group("data and run")
    g.add_argument("--data", nargs="+", metavar="DIR", help="folders of training images (PNG, JPEG, BMP, TIFF)")
    g.add_argument("--out", metavar="RUN_DIR", help="run folder (checkpoints, log, config)")
    g.add_argument("--resume", action="store_true", help="continue the run in --out from its last.pt")
    g.add_argument("--init", metavar="CKPT", help="start from these weights (official or training checkpoint); a "
                   "denoiser's change between 1 and 3 colors is adapted (a gray run from a color model); "
                   "between scales (an sr run from a denoiser or another factor) the tensors that fit are "
                   "taken and the others named")
    g.add_argument("--config", metavar="FILE", help="JSON settings; command-line options override them")
    g.add_argument("--val", nargs="+", metavar="DIR", help="validation image folders")
    g.add_argument("--val-every", type=int, metavar="K", help="validate every K steps (default 1000)")
    g.add_argument("--val-limit", type=int, metavar="N", help="only the first N validation images")
    g.add_argument("--val-sigma", type=float, help="validation noise level (default: --sigma, or the "
                   "middle of --sigma-range)")
    g.add_argument("--save-every", type=int, metavar="K", help="write last.pt every K steps (default 1000)")
    g.add_argument("--log-every", type=int, metavar="K", help="log.jsonl record every K steps (default 100)")
    g.add_argument("--quiet", action="store_true", help="no progress bar; log records as lines")
    g = t.add_argument_group("model and optimisation")
    g.add_argument("--steps", type=int, help="optimizer steps in all (default 1,000,000)")
    g.add_argument("--batch-size", type=int, help="global batch (default 16)")
    g.add_argument("--patch-size", type=int, help="input patch side (default 48; sr: the LR side)")
    g.add_argument("--n-feats", type=int, help="feature channels (default 64)")
    g.add_argument("--n-resgroups", type=int, help="residual groups, two of them non-local (default 10)")
    g.add_argument("--lr", type=float, help="learning rate (default 1e-4)")
    g.add_argument("--schedule", choices=("step", "cosine"),
                   help="step: halve every --lr-decay-every steps (default, official); cosine: to 0 at --steps")
    g.add_argument("--lr-decay-every", type=int, metavar="K", help="step schedule period (default 200,000)")
    g.add_argument("--seed", type=int, help="seed of the weights and of every data draw (default 0)")
    g.add_argument("--ema", type=float, metavar="DECAY",
                   help="keep an EMA of the weights (e.g. 0.999), used for validation and best.pt")
    g.add_argument("--precision", choices=("fp32", "bf16"), help="fp32 (default) or bf16 autocast")
    g.add_argument("--device", help="cpu (default) or cuda / cuda:N")
    g.add_argument("--workers", type=int, help="data loader processes (default 0 on the CPU, 4 on CUDA)")
    t.set_defaults(func=cmd_train)
