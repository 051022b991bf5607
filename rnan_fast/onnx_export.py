"""ONNX export of an RNAN in standard operators, and its check with ONNX Runtime.

    export_onnx(net, "rnan.onnx")              # input "x" (batch, n_colors, height, width), all dynamic
    export_onnx(net, "rnan.onnx", tile=128)    # a fixed (batch, n_colors, 128, 128) input
    check_onnx("rnan.onnx", net, (37, 29))     # ONNX Runtime against PyTorch on a random input

The model's two hot spots are registered ops (torch.ops.rnan_fast.nonlocal_attention and
.gated_residual) that ONNX has no form for. The export traces the model with torch.export and
replaces each by its definition in standard operators (decompositions()), whatever backend
would run it in PyTorch:

    attention  S = theta @ phi^T (B, N, N), N = H*W, no scaling; softmax over queries (the official
               block) or keys; @ g (see _attention). The whole N x N matrix exists: 4 B N^2 bytes per
               non-local block in fp32 (1 GiB for a 128x128 tile at batch 1, 16 GiB at 256x256),
               where our kernels keep O(N). Large images go through in tiles (README, ONNX export).
    gate       x + sigmoid(mask_logits) * trunk

The graph holds Conv, ConvTranspose, MatMul, Softmax, Transpose, Sigmoid, Relu, Add, Mul and shape
arithmetic (Shape, Slice, Reshape, ...): nothing in a custom domain (nonstandard_ops checks).
Needs the `onnx` extra (onnx, onnxscript for torch.onnx's exporter; onnxruntime for the check).
"""
from __future__ import annotations

import contextlib
import copy
import logging
import os
from pathlib import Path

import torch
from torch import Tensor

# The operator domains of standard ONNX ("" is ai.onnx's usual spelling).
STANDARD_DOMAINS = ("", "ai.onnx")
# The check's bound on max |ORT - PyTorch| as a fraction of rgb_range: 0.0051 on 0..255, a
# fiftieth of an 8-bit level. Both compute in fp32 in other summation orders; measured on 0..255
# (2026-12-07, random inputs): at most 4.2e-5 for an 8-feature, 2-group model (3 sizes, batch 2),
# 1.2e-4 to 4.5e-4 for rnan_dn_rgb (6 inputs from 33x17 to 64x64), so 11x margin, while a
# softmax over the wrong dim or a missing gate moves outputs by whole levels.
TOLERANCE = 2e-5
# The example size of a dynamic export: distinct, not 0/1 (which torch.export specialises).
_EXAMPLE = (2, 24, 20)   # batch, height, width


def _attention(theta: Tensor, phi: Tensor, g: Tensor, softmax_over: str, backend: str):
    """rnan_fast::nonlocal_attention in standard ops: (B, N, d) x 3 -> ((B, N, dv), lse (B, N)).

    The scores are laid out so that the softmax runs along the last axis: (keys, queries) for
    the softmax over queries, then transposed into the product with g. ONNX Runtime (1.32, CPU,
    1 thread) ran rnan_dn_rgb 1.7x to 2.4x faster this way than with Softmax over axis 1 of
    (queries, keys): 0.38 vs 0.65 s at 64x64, 5.1 vs 12.2 s at 128x128 (2026-12-07, shared
    machine; BENCHMARKS.md)."""
    if softmax_over == "query":
        scores = torch.matmul(phi, theta.transpose(1, 2))   # (B, keys, queries)
        probs_t = torch.softmax(scores, dim=2)
        out = torch.matmul(probs_t.transpose(1, 2), g)
    else:
        scores = torch.matmul(theta, phi.transpose(1, 2))   # (B, queries, keys)
        out = torch.matmul(torch.softmax(scores, dim=2), g)
    # lse: the op's second output (per key for "query", per query for "key"), which inference
    # never reads: the exporter drops it
    return out, torch.logsumexp(scores, dim=2)


def _gate(x: Tensor, mask_logits: Tensor, trunk: Tensor, backend: str) -> Tensor:
    """rnan_fast::gated_residual in standard ops."""
    return x + torch.sigmoid(mask_logits) * trunk


def decompositions() -> dict:
    """torch.export's default decomposition table plus our two ops in standard ops."""
    table = torch.export.default_decompositions()
    table[torch.ops.rnan_fast.nonlocal_attention.default] = _attention
    table[torch.ops.rnan_fast.gated_residual.default] = _gate
    return table


def _need(module: str):
    try:
        return __import__(module)
    except ImportError as e:
        raise ImportError(f"ONNX export needs {module} ({e}): pip install \"rnan_fast[onnx]\" "
                          f"(onnx, onnxscript, onnxruntime)") from None


@contextlib.contextmanager
def _quiet_exporter():
    """torch.onnx logs a line per torchvision op it cannot register when torchvision is absent:
    noise for a model without them."""
    log = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def export_onnx(net, path: str | os.PathLike, tile: int | None = None, opset: int | None = None) -> Path:
    """Write `net` (an RNAN) to `path` as ONNX in standard operators; returns the path.

    Input "x": (batch, n_colors, H, W) float32 on the 0..rgb_range scale; output "y": (batch,
    n_colors, scale*H, scale*W). tile None: batch, H and W are dynamic (any H, W >= 3); tile N:
    H = W = N fixed (batch dynamic), for runtimes that want static shapes. opset: the ONNX opset
    (None: torch.onnx's default). The model is traced in fp32 on the CPU (a copy: `net` is left
    as it was). RuntimeError if the graph holds a non-standard operator."""
    _need("onnx")
    _need("onnxscript")   # torch.onnx's exporter translates through it
    model = copy.deepcopy(net).float().cpu().eval()
    batch, h, w = _EXAMPLE
    if tile is not None:
        h = w = tile
    x = torch.rand(batch, model.n_colors, h, w) * model.rgb_range
    dyn = torch.export.Dim.DYNAMIC
    shapes = {"x": {0: dyn} if tile is not None else {0: dyn, 2: dyn, 3: dyn}}
    with torch.no_grad():
        program = torch.export.export(model, (x,), dynamic_shapes=shapes).run_decompositions(decompositions())
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _quiet_exporter():
        torch.onnx.export(program, (x,), path, dynamo=True, input_names=["x"], output_names=["y"],
                          opset_version=opset, external_data=False, verbose=False)
    odd = nonstandard_ops(path)
    if odd:
        raise RuntimeError(f"{path}: the exported graph holds non-standard operators: {', '.join(odd)}")
    return path


def nonstandard_ops(path: str | os.PathLike) -> list[str]:
    """"domain::OpType" of every node of the ONNX file (graph, subgraphs and functions) outside
    standard ONNX, sorted; [] for a graph in standard operators."""
    onnx = _need("onnx")
    model = onnx.load(os.fspath(path))
    found = set()

    def visit(nodes):
        for node in nodes:
            if node.domain not in STANDARD_DOMAINS:
                found.add(f"{node.domain}::{node.op_type}")
            for attr in node.attribute:
                for graph in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                    visit(graph.node)

    visit(model.graph.node)
    for function in model.functions:
        visit(function.node)
    return sorted(found)


def check_onnx(path: str | os.PathLike, net, size: tuple[int, int], batch: int = 1, seed: int = 0) -> dict:
    """Run the ONNX file with ONNX Runtime (CPU) and `net` with PyTorch on one random input of
    (batch, n_colors, *size), uniform on [0, rgb_range) from torch.Generator(seed), and compare.

    Returns {"size", "batch", "max_abs", "tolerance" (TOLERANCE * rgb_range), "ok" (max_abs <=
    tolerance and equal shapes), "onnxruntime" (version)}. ImportError naming the extra when
    onnxruntime is missing."""
    ort = _need("onnxruntime")
    gen = torch.Generator().manual_seed(seed)
    model = copy.deepcopy(net).float().cpu().eval()
    x = torch.rand(batch, model.n_colors, *size, generator=gen) * model.rgb_range
    with torch.no_grad():
        want = model(x).numpy()
    session = ort.InferenceSession(os.fspath(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    tolerance = TOLERANCE * model.rgb_range
    same_shape = got.shape == want.shape
    max_abs = float(abs(got - want).max()) if same_shape else float("inf")
    return {"size": tuple(size), "batch": batch, "max_abs": max_abs, "tolerance": tolerance,
            "ok": same_shape and max_abs <= tolerance, "onnxruntime": ort.__version__}
