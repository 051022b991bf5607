"""What the subcommands share: exit codes, user errors, the device, the model load, the
runtime options of restore/eval, the progress bar and message lines."""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PROG = "rnan-fast"
EXIT_OK, EXIT_FAILURES, EXIT_USAGE, EXIT_INTERRUPT = 0, 1, 2, 130


class UserError(Exception):
    """A problem with the command's inputs: reported as one line, no traceback."""

    def __init__(self, message: str, code: int = EXIT_USAGE):
        super().__init__(message)
        self.code = code


def _err(msg: str) -> None:
    print(f"{PROG}: error: {msg}", file=sys.stderr)


def _warn(msg: str) -> None:
    print(f"{PROG}: warning: {msg}", file=sys.stderr)


def _first_line(e: BaseException) -> str:
    """The first line of an exception's message (its type name when the message is empty), for
    one-line reports of a failure."""
    return str(e).splitlines()[0] if str(e) else type(e).__name__


def _add_runtime_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("inference")
    g.add_argument("--device", default="auto",
                   help="auto (default: cuda when torch sees a usable GPU, else cpu), cpu, or cuda / cuda:N")
    g.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16", "fp16"),
                   help="model weights and activations dtype (default auto: bf16 on a CPU with native bf16 "
                        "arithmetic, AVX-512 BF16 or AMX, where it holds PSNR and runs faster; else fp32)")
    g.add_argument("--backend", default=None, choices=("auto", "reference", "fast"),
                   help="kernel backend (default: RNAN_FAST_BACKEND or auto)")
    g.add_argument("--tile", type=int, default=None, metavar="N",
                   help="tiled inference with N x N input tiles (default: whole images on a GPU; on the "
                        "CPU, images larger than the model's tile run in its tiles, 64 pixels for the shipped "
                        "models)")
    g.add_argument("--whole", action="store_true",
                   help="whole-image inference also where the CPU would tile (attention grows with (H*W)^2)")
    g.add_argument("--tile-overlap", type=int, default=None, metavar="P",
                   help="minimum overlap of neighbouring tiles in input pixels (default: the model's, 16 "
                        "for the shipped models)")
    g.add_argument("--chop", action="store_true",
                   help="the official forward_chop (recursive quadrants), for comparisons with published numbers")
    g.add_argument("--self-ensemble", action="store_true",
                   help="average over the 8 flips/transposes (RNAN+), 8x the time")
    g.add_argument("--pixel-shuffle", type=int, default=1, metavar="K",
                   help="restore the K x K stride-K sub-images apart and interleave them back (pixel-shuffle "
                        "downsampling): 2 for real camera photos, whose noise is correlated over neighbouring "
                        "pixels (PolyU_dev real pairs: +0.52 dB for the default denoiser); not for white noise, "
                        "where it loses detail (CBSD68 at sigma 15: -2.1 dB). Models that keep the size "
                        "(denoising, JPEG) only (default 1: off)")
    g.add_argument("--quiet", action="store_true", help="no progress bar")
    g.add_argument("--trust-checkpoint", action="store_true",
                   help="load a checkpoint that pickles Python objects besides the weights (e.g. a "
                        "training script's argument namespace); this runs code from the file, so "
                        "only for files you trust (default: weights-only load)")


@dataclass(frozen=True)
class RunOptions:
    """The inference options of restore, eval and demo, checked and resolved once from the
    command line (the device chosen, --precision auto picked), then handed to the model load
    (load_net) and to the image runner (cli.tiling.ImageRunner)."""
    device: Any                     # torch.device
    precision: str = "fp32"         # fp32 / bf16 / fp16, never "auto"
    backend: str | None = None      # --backend, None: RNAN_FAST_BACKEND or auto
    tile: int | None = None         # --tile N
    overlap: int | None = None      # --tile-overlap P, None: the model's own (inference.cpu_tiling)
    whole: bool = False
    chop: bool = False
    self_ensemble: bool = False
    pixel_shuffle: int = 1          # --pixel-shuffle K (inference.restore_tensor)
    quiet: bool = False
    trust_checkpoint: bool = False

    @property
    def dtype(self):
        from rnan_fast.inference import DTYPES

        return DTYPES[self.precision]


def run_options(args, device) -> RunOptions:
    """RunOptions of parsed arguments (_add_runtime_args) on `device`; UserError for options that
    exclude each other or are out of range."""
    from rnan_fast.inference import auto_precision

    if args.whole and (args.tile is not None or args.chop):
        raise UserError(f"--whole and {'--tile' if args.tile is not None else '--chop'} exclude each other")
    if args.tile is not None:
        if args.chop:
            raise UserError("--tile and --chop exclude each other")
        if args.tile < 1:
            raise UserError(f"--tile must be a positive number of pixels, got {args.tile}")
    if args.tile_overlap is not None and not 0 <= args.tile_overlap < (args.tile or float("inf")):
        raise UserError(f"--tile-overlap must be >= 0{f' and smaller than --tile ({args.tile})' if args.tile else ''}, "
                        f"got {args.tile_overlap}")
    if args.pixel_shuffle < 1:
        raise UserError(f"--pixel-shuffle must be >= 1 (1: off), got {args.pixel_shuffle}")
    precision = auto_precision(device) if args.precision == "auto" else args.precision
    return RunOptions(device=device, precision=precision, backend=args.backend, tile=args.tile,
                      overlap=args.tile_overlap, whole=args.whole, chop=args.chop, self_ensemble=args.self_ensemble,
                      pixel_shuffle=args.pixel_shuffle, quiet=args.quiet, trust_checkpoint=args.trust_checkpoint)


def _device(name: str):
    import torch

    if name == "auto":
        name = "cuda" if _cuda_usable() else "cpu"
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda" or name.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise UserError(f"--device {name}: CUDA is not available here (torch {torch.__version__}, "
                            f"built with CUDA {torch.version.cuda}); use --device cpu")
        try:
            dev = torch.device(name)
        except RuntimeError as e:
            raise UserError(f"--device {name}: {e}") from None
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UserError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) visible")
        return dev
    raise UserError(f"--device must be auto, cpu or cuda (or cuda:N), got {name!r}")


def _cuda_usable() -> bool:
    """--device auto's test: torch sees a CUDA device."""
    import torch

    return torch.cuda.is_available()


def _warn_slow_paths(device, backend: str | None, quiet: bool) -> None:
    """One warning when a fast path the command would use is missing, with its reason and the
    expected slowdown (not for --backend reference, which asks for the slow path)."""
    import rnan_fast
    from rnan_fast._backend import get_backend

    if quiet or (backend or get_backend()) == "reference":
        return
    info = rnan_fast.backend_info()
    if device.type == "cpu" and not info["extension_attention_cpu"]:
        _warn(f"the compiled CPU kernels are not available ({info['extension_error'] or 'built without them'}): "
              f"attention runs on the PyTorch reference, about 5x slower on whole images and up to 10x on "
              f"tiles (BENCHMARKS.md); reinstall with `pip install --no-build-isolation -e .` against this torch")
    elif device.type == "cuda" and not info["triton"]:
        _warn(f"Triton is not available ({info['triton_error']}): attention on the GPU runs on the PyTorch "
              f"reference, which is many times slower and stores score blocks; `pip install triton`")


def _distributed(name: str):
    """This process's rnan_fast.train.distributed.Dist: under torchrun (WORLD_SIZE > 1) the process
    group is joined and a --device cuda process takes the GPU of its LOCAL_RANK; otherwise rank
    0 of 1 on _device(name)."""
    from rnan_fast.train import distributed

    device = _device(name)
    if name == "auto":
        name = device.type   # under torchrun, "cuda" still means the GPU of this process's LOCAL_RANK
    try:
        return distributed.init(str(device) if distributed.env_world_size() <= 1 else name)
    except ValueError as e:
        raise UserError(str(e)) from None


def _load_model(weights: str, opts: RunOptions):
    """RNAN.from_checkpoint with user-level errors; the model is in eval mode on the options'
    device and dtype (--trust-checkpoint: torch.load with weights_only=False)."""
    from rnan_fast.inference import place_model

    trust = opts.trust_checkpoint
    path = Path(weights)
    if not path.exists():
        raise UserError(f"weights file not found: {weights}")
    if path.is_dir():
        raise UserError(f"weights path is a directory, not a checkpoint file: {weights}")
    from rnan_fast import CheckpointError
    from rnan_fast.model import RNAN

    try:
        net = RNAN.from_checkpoint(str(path), map_location="cpu", weights_only=not trust)
    except (ValueError, OSError, RuntimeError, EOFError, KeyError, TypeError) as e:
        msg = str(e).strip() or type(e).__name__
        if str(path) not in msg:
            msg = f"{weights}: {msg}"
        if isinstance(e, CheckpointError) and not trust and ("weights_only" in msg or "weights-only" in msg):
            msg = msg.replace("pass weights_only=False", "pass --trust-checkpoint")
            if "--trust-checkpoint" not in msg:
                msg += "; if you trust the file, pass --trust-checkpoint"
        raise UserError(f"cannot load the checkpoint: {msg}") from None
    return place_model(net, opts.device, opts.dtype)


def _check_backend(opts: RunOptions) -> None:
    """--backend fast: run both ops on tiny tensors of the device and dtype, so a device the
    fast kernels cannot serve is a usage error up front, not a failure on every image."""
    if opts.backend != "fast":
        return
    import torch

    from rnan_fast import ops

    device, dtype, precision = opts.device, opts.dtype, opts.precision
    gen = torch.Generator().manual_seed(0)
    try:
        with torch.inference_mode():
            t = torch.rand(1, 16, 16, generator=gen).to(device, dtype)
            ops.nonlocal_attention(t, t, t, backend="fast")
            x = torch.rand(1, 2, 2, 2, generator=gen).to(device, dtype)
            ops.gated_residual(x, x, x, backend="fast")
    except (RuntimeError, ValueError, TypeError) as e:
        raise UserError(f"--backend fast is not available for --device {device} with --precision {precision}: "
                        f"{_first_line(e)}; use --backend auto (the fast kernels where they run, the reference "
                        f"elsewhere) or --backend reference") from None


def _progress(iterable, total: int, desc: str, quiet: bool):
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc=desc, unit="img", disable=quiet, file=sys.stderr,
                dynamic_ncols=True)


def _report(msg: str, quiet: bool, file=None) -> None:
    """One message line (to stderr unless `file`) that does not break a running progress bar."""
    file = file or sys.stderr
    if quiet:
        print(msg, file=file)
    else:
        from tqdm import tqdm

        tqdm.write(msg, file=file)

