"""ONNX Runtime (CPU) on the exported model against rnan_fast in PyTorch at the same tile, as JSON:

    python benchmarks/onnx_cpu.py [--model rnan_dn_rgb] [--tiles 64 128] [--threads 1] [--repeat 5]

Per tile N: the shipped model exported with a fixed N x N input (rnan_fast.onnx_export, standard
operators: the attention as MatMul / Softmax / MatMul over the whole (N^2)^2 score matrix), run
by ONNX Runtime's CPU provider; the same model in PyTorch (fp32, torch.inference_mode) on the
"auto" backend (the C++ attention kernel) and on "reference". One random batch-1 input;
the median wall time of --repeat calls after one warm-up call each, the three run alternately so
that the load of a shared machine falls on all alike. Both runtimes get --threads threads.
"""
from __future__ import annotations

import argparse
import datetime
import json
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import torch

import rnan_fast
from rnan_fast import onnx_export


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="rnan_dn_rgb")
    ap.add_argument("--tiles", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()

    import onnxruntime as ort

    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)   # as every rnan-fast command runs
    net = rnan_fast.RNAN.pretrained(args.model)
    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = args.threads
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    result = {"model": args.model, "threads": args.threads, "repeat": args.repeat, "commit": commit,
              "torch": torch.__version__, "onnxruntime": ort.__version__,
              "cpu_capability": torch.backends.cpu.get_cpu_capability(),
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="minutes"), "tiles": {}}
    for tile in args.tiles:
        with tempfile.TemporaryDirectory() as tmp:
            path = onnx_export.export_onnx(net, Path(tmp) / "m.onnx", tile=tile)
            session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        x = torch.rand(1, net.n_colors, tile, tile, generator=torch.Generator().manual_seed(0)) * net.rgb_range
        feed = {session.get_inputs()[0].name: x.numpy()}

        def torch_call(backend):
            def call():
                with rnan_fast.use_backend(backend), torch.inference_mode():
                    return net(x).numpy()
            return call

        calls = {"onnxruntime": lambda: session.run(None, feed)[0], "torch_auto": torch_call("auto"),
                 "torch_reference": torch_call("reference")}
        outputs = {name: fn() for name, fn in calls.items()}   # warm-up, and the outputs compared
        times = {name: [] for name in calls}
        for _ in range(args.repeat):
            for name, fn in calls.items():
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
        result["tiles"][tile] = {
            **{f"{name}_s": round(statistics.median(t), 4) for name, t in times.items()},
            "max_abs_ort_vs_auto": float(abs(outputs["onnxruntime"] - outputs["torch_auto"]).max()),
        }
        print(json.dumps({tile: result["tiles"][tile]}), flush=True)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
