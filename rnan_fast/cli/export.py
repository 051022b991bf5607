"""``rnan-fast export``: a model's weights as safetensors, or the model as ONNX in standard
operators, checked with ONNX Runtime (rnan_fast.onnx_export)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rnan_fast.cli.common import EXIT_FAILURES, EXIT_OK, PROG, RunOptions, UserError
from rnan_fast.cli.models import add_model_args, load_net

# The check's input size of a dynamic export: odd, not square, and not the size the export
# traced at (rnan_fast.onnx_export._EXAMPLE), so the check shows the dynamic shapes work.
CHECK_SIZE = (37, 29)
DTYPES = {"fp32": "float32", "bf16": "bfloat16"}

EXPORT_EPILOG = f"""\
--safetensors writes the weights as a safetensors file (no pickle: nothing runs when it loads),
the model's configuration in its metadata; `{PROG} restore --weights` and RNAN.from_checkpoint
read it.

--onnx writes the model as ONNX (torch.onnx's default opset, or --opset) in standard operators
only: the non-local attention as MatMul / Softmax / Transpose / MatMul (its whole (H*W)^2 score
matrix: 1 GiB per non-local block for a 128x128 input, so large images go through in tiles), the
gate as Sigmoid / Mul / Add. Input "x" (batch, colors, height, width), float32 on the model's 0..255
scale; output "y". Batch, height and width are dynamic, or with --tile N the height and width are
N. ONNX Runtime then runs the file on a random input ({CHECK_SIZE[0]}x{CHECK_SIZE[1]}, or N x N with
--tile) beside PyTorch, and the largest difference is printed beside the tolerance
(rnan_fast.onnx_export.TOLERANCE of the model's range); over it the command fails (exit status
1). Needs the onnx extra: pip install "rnan_fast[onnx]".
"""


def add_parser(sub) -> None:
    p = sub.add_parser("export", help="write a model as safetensors weights or as ONNX",
                       description="Export a model: its weights as safetensors, the model as ONNX "
                                   "(standard operators, checked with ONNX Runtime).",
                       epilog=EXPORT_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p, default_model=True)
    out = p.add_argument_group("outputs (one or both)")
    out.add_argument("--safetensors", metavar="OUT.safetensors", help="write the weights here")
    out.add_argument("--onnx", metavar="OUT.onnx", help="write the model here as ONNX")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="fp32",
                   help="stored dtype of --safetensors (default fp32; bf16: half the size, rounded weights)")
    p.add_argument("--tile", type=int, metavar="N", help="ONNX: fixed N x N input (default: dynamic height and width)")
    p.add_argument("--opset", type=int, metavar="K", help="ONNX opset (default: torch.onnx's)")
    p.add_argument("--no-check", action="store_true", help="ONNX: skip the ONNX Runtime check")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    p.add_argument("--trust-checkpoint", action="store_true",
                   help="load a --weights file that pickles Python objects (runs code from it: trusted files only)")
    p.set_defaults(func=cmd_export, precision="fp32")


def cmd_export(args) -> int:
    import torch

    from rnan_fast import weights

    outputs = [Path(o) for o in (args.safetensors, args.onnx) if o is not None]
    if not outputs:
        raise UserError("nothing to export: give --safetensors OUT.safetensors and/or --onnx OUT.onnx")
    if args.tile is not None and args.tile < 3:
        raise UserError(f"--tile must be at least 3 pixels, got {args.tile}")
    existing = [str(o) for o in outputs if o.exists()]
    if existing and not args.overwrite:
        raise UserError(f"{', '.join(existing)} exists; pass --overwrite to replace it")
    net, _ = load_net(args, RunOptions(torch.device("cpu"), trust_checkpoint=args.trust_checkpoint))
    if args.safetensors is not None:
        path = weights.write_weights(net, args.safetensors, getattr(torch, DTYPES[args.dtype]))
        print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB, {DTYPES[args.dtype]}, SHA-256 "
              f"{weights.sha256_of(path)}): {net.describe()}")
    if args.onnx is not None:
        return _export_onnx(net, args)
    return EXIT_OK


def _export_onnx(net, args) -> int:
    from rnan_fast import onnx_export

    try:
        path = onnx_export.export_onnx(net, args.onnx, tile=args.tile, opset=args.opset)
    except ImportError as e:
        raise UserError(str(e)) from None
    shape = f"batch, {net.n_colors}, " + (f"{args.tile}, {args.tile}" if args.tile else "height, width")
    print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB): {net.describe()}, input x ({shape}) float32 "
          f"on 0..{net.rgb_range:g}, standard ONNX operators only")
    if args.no_check:
        return EXIT_OK
    size = (args.tile, args.tile) if args.tile else CHECK_SIZE
    try:
        r = onnx_export.check_onnx(path, net, size)
    except ImportError as e:
        print(f"{PROG}: note: not checked: {e}", file=sys.stderr)
        return EXIT_OK
    verdict = "ok" if r["ok"] else "FAILED"
    print(f"check: ONNX Runtime {r['onnxruntime']} (CPU) against PyTorch on a random 1x{net.n_colors}x{size[0]}x"
          f"{size[1]} input: max |difference| {r['max_abs']:.2e}, tolerance {r['tolerance']:.2e}: {verdict}")
    if not r["ok"]:
        raise UserError(f"{path}: ONNX Runtime's output differs from PyTorch's by more than the tolerance",
                        EXIT_FAILURES)
    return EXIT_OK
