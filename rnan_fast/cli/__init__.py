"""The ``rnan-fast`` command line (also ``python -m rnan_fast``).

    rnan-fast restore [--weights W | --model NAME] [-o OUTDIR] [--device auto|cpu|cuda]
                      [--ext auto|png|jpg|webp|tiff] [--quality Q] [--suffix S] [--recursive]
                      [--overwrite | --skip-existing] [--max-pixels N]
                      [--precision fp32|bf16|fp16] [--tile N [--tile-overlap P] | --chop | --whole]
                      [--self-ensemble] [--pixel-shuffle K] [--backend auto|reference|fast]
                      [--trust-checkpoint] INPUT...
    rnan-fast eval    (--weights W | --model NAME | --baseline [bm3d|menon]) [--baseline bm3d|menon]
                      --task denoise_gray|denoise_rgb|car|demosaic|sr (with --model: its card's by default)
                      [--sigma S | --quality Q | --scale s] --data DIR [--limit N] [--csv FILE]
                      [--self-ensemble] [--chop | --tile N] [--pixel-shuffle K] [--seed K] [--quantize-noisy] ...
    rnan-fast train   --task TASK [--sigma S | --sigma-range A B | --quality Q | --scale s]
                      --data DIR... --out RUN_DIR [--resume] [--val DIR...] [--steps N] ...
                      (see `rnan-fast train --help`; torchrun --nproc_per_node=K -m rnan_fast train ...)
    rnan-fast demo    [-o OUTDIR] [--image astronaut|coffee|chelsea] [--crop N] [--sigma S] [--seed K]
    rnan-fast models
    rnan-fast export  [--model NAME | --weights W] [--safetensors OUT] [--onnx OUT [--tile N]]
    rnan-fast bench   [--device cpu|cuda] [--quick] [--repeat N]

restore: INPUT are image files or folders (their images; subfolders with --recursive, mirrored
under OUTDIR). The model: --weights (a checkpoint), --model (a shipped one: `models`), else the
default color denoiser that ships (rnan_fast.weights). On the CPU, images larger than the model's
tile (64 pixels for the shipped models) run in its overlapping tiles unless --whole
(rnan_fast.inference.auto_tile), in bf16 where the CPU has native bf16 arithmetic
(--precision auto: rnan_fast.inference.auto_precision). The architecture comes from the checkpoint. Photos are read and
written by rnan_fast.image_io (orientation applied; ICC profile, EXIF, alpha, 16 bits and gray
kept) and fitted to the model by rnan_fast.photos. Output: OUTDIR/<stem><suffix>.<ext>, written
atomically (temporary file in the output folder, then os.replace). Before any work, every
output name is checked: existing files stop the run (nothing written) unless --overwrite or
--skip-existing, and two inputs with one output name are refused. An unreadable input is
reported by name and skipped; the others are still written, and the exit status is 1.

eval: the degradation protocols of rnan_fast.data and the metrics of rnan_fast.metrics; see the
`eval` help. Images the protocol cannot use (unreadable, smaller than the SR scale or its border)
are reported and skipped. Exit status: 0 success, 1 some images (or bench timings) failed, 2 usage
or input errors (an unwritable --csv included), 130 interrupt.

--backend applies to the command only (rnan_fast.use_backend around it); --backend fast is tried
on tiny tensors first and refused up front where its kernels cannot run. --trust-checkpoint loads
checkpoints that pickle Python objects (torch.load with weights_only=False): trusted files only.

Under `torchrun --nproc_per_node=K -m rnan_fast restore|eval ...` each process takes every K-th
image (--device cuda: the GPU of its LOCAL_RANK); eval's table and means are gathered on rank 0,
which alone prints them and writes --csv. `train` under torchrun: see its help.

Every command runs with subnormal floats flushed to zero (flush_subnormals): 2.7x faster on
low-noise inputs, the same PSNR.

Layout: one module per subcommand (restore, eval, train, demo, models, export, bench), each with
add_parser(subparsers) and its cmd_* function; rnan_fast.cli.common holds what they share
(UserError, exit codes, the device, the checkpoint load, the progress bar), models the
--weights / --model choice, tiling how one image runs (auto-tiling, the bar inside an image).
"""
from __future__ import annotations

import argparse
import os
import sys

from rnan_fast.cli import bench, demo, eval, export, models, restore, train
from rnan_fast.cli.common import EXIT_INTERRUPT, EXIT_USAGE, PROG, UserError, _err

SUBCOMMANDS = (restore, eval, demo, models, export, train, bench)  # modules with add_parser(subparsers), in help order


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="RNAN image restoration: restore images, "
                                     "evaluate on benchmarks, train, time the kernels.")
    from rnan_fast import __version__

    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    names = ",".join(m.__name__.rsplit(".", 1)[1] for m in SUBCOMMANDS)
    sub = parser.add_subparsers(dest="command", metavar="{" + names + "}")
    for module in SUBCOMMANDS:
        module.add_parser(sub)
    return parser


def flush_subnormals() -> None:
    """Treat subnormal floats as zero (x86 FTZ/DAZ) in this thread and in the threads torch starts
    after it, which inherit the floating-point state. Low-noise inputs send the network's
    activations through subnormals, which x86 CPUs handle in slow microcode: without this a sigma-10
    eval runs 2.7x slower (68.1 vs 25.6 s, BENCHMARKS.md). Only values under 1.2e-38 (float32)
    become zero; that eval's PSNR is the same to 4 decimals. Called before a command's first torch
    op, since threads that exist already keep their state; in-process callers of main() keep the
    setting."""
    import torch

    torch.set_flush_denormal(True)  # False (no effect) where the CPU lacks the mode


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status (also for usage errors)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse: --help, --version, usage errors
        return int(e.code) if isinstance(e.code, int) else (0 if e.code is None else EXIT_USAGE)
    if getattr(args, "func", None) is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    flush_subnormals()
    try:
        backend = getattr(args, "backend", None)
        if backend is None:
            return args.func(args)
        import rnan_fast

        with rnan_fast.use_backend(backend):  # scoped: in-process callers keep their setting
            return args.func(args)
    except UserError as e:
        rank = os.environ.get("RANK", "0") if os.environ.get("WORLD_SIZE", "1") != "1" else "0"
        _err(str(e) if rank == "0" else f"(rank {rank}) {e}")  # torchrun: each rank's own line, rank 0's plain
        return e.code
    except KeyboardInterrupt:
        _err("interrupted")
        return EXIT_INTERRUPT
    finally:
        from rnan_fast.train import distributed

        distributed.shutdown()  # the process group a command joined under torchrun, if any


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
