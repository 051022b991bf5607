"""``rnan-fast bench``: time non-local attention and the model on this device."""
from __future__ import annotations

import statistics
import time

from rnan_fast.cli.common import EXIT_FAILURES, EXIT_OK, UserError, _device, _err


def _time_call(fn, device, repeat: int) -> float:
    """Median seconds of fn() after one warm-up call (CUDA: synchronised)."""
    import torch

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    fn()
    sync()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _bench_entry(fn, device, repeat: int, failures: list) -> str:
    """One table cell: the time in ms, "OOM", or "n/a" with the error (then appended to failures)."""
    import torch

    try:
        with torch.inference_mode():
            return f"{_time_call(fn, device, repeat) * 1e3:10.2f}"
    except torch.OutOfMemoryError:
        return f"{'OOM':>10}"
    except Exception as e:  # a table cell, not a crash: name the problem and go on
        failures.append(f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
        return f"{'n/a':>10}  ({type(e).__name__}: {str(e).splitlines()[0][:60] if str(e) else ''})"
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()


def cmd_bench(args) -> int:
    """Forward timings (ms, median) of non-local attention and of a whole RNAN. Exit status 1
    when an entry failed for a reason other than running out of memory."""
    if args.repeat is not None and args.repeat < 1:
        raise UserError(f"--repeat must be >= 1, got {args.repeat}")
    import torch

    import rnan_fast
    from rnan_fast import reference
    from rnan_fast.ops import nonlocal_attention

    device = _device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = device.type == "cuda"
    info = rnan_fast.backend_info()
    fast_ok = cuda and bool(info.get("triton"))
    repeat = args.repeat if args.repeat is not None else (3 if args.quick else (20 if cuda else 5))
    failures: list[str] = []
    dtype = torch.float32
    print(f"# device {device} ({torch.cuda.get_device_name(device) if cuda else 'CPU'}), torch {torch.__version__}, "
          f"triton {info.get('triton_version') or 'absent'}, C++ extension {'yes' if info.get('extension') else 'no'}")
    print(f"# forward time in ms, median of {repeat} after a warm-up; fp32; 'auto' = the fastest "
          f"available backend ({'Triton kernel' if fast_ok else 'no Triton kernel on this device'})")
    sides = ([24, 48] if args.quick else [24, 48, 64]) if not cuda else ([48, 96] if args.quick else [48, 96, 128, 192])
    batch, d = (1, 32) if not cuda else (16, 32)
    gen = torch.Generator(device="cpu").manual_seed(0)
    print(f"\nnon-local attention (softmax over queries), B={batch}, d={d}")
    print(f"{'N (side^2)':>14}  {'naive':>10}  {'reference':>10}  {'auto':>10}")
    for side in sides:
        n = side * side
        theta, phi, g = (torch.randn(batch, n, d, generator=gen).to(device, dtype) for _ in range(3))
        cells = [
            _bench_entry(lambda: reference.nonlocal_attention_naive(theta, phi, g), device, repeat, failures),
            _bench_entry(lambda: nonlocal_attention(theta, phi, g, backend="reference"), device, repeat, failures),
            _bench_entry(lambda: nonlocal_attention(theta, phi, g, backend="auto"), device, repeat, failures),
        ]
        print(f"{f'{n} ({side}^2)':>14}  " + "  ".join(cells))
        del theta, phi, g
    from rnan_fast.model import RNAN

    feats, groups = (64, 10) if cuda else (16, 4)
    img_sides = ([48, 96] if args.quick else [48, 96, 192]) if cuda else ([32] if args.quick else [32, 64])
    print(f"\nRNAN forward (n_feats={feats}, n_resgroups={groups}, scale 1, RGB), B=1")
    print(f"{'image':>14}  {'reference':>10}  {'auto':>10}")
    net = RNAN(n_colors=3, scale=1, n_feats=feats, n_resgroups=groups).to(device, dtype).eval()
    for side in img_sides:
        x = (torch.rand(1, 3, side, side, generator=gen) * 255).to(device, dtype)
        cells = []
        for backend in ("reference", "auto"):
            with rnan_fast.use_backend(backend):
                cells.append(_bench_entry(lambda: net(x), device, repeat, failures))
        print(f"{f'{side}x{side}':>14}  " + "  ".join(cells))
    if failures:
        _err(f"{len(failures)} timing(s) failed (n/a above), first: {failures[0]}")
        return EXIT_FAILURES
    return EXIT_OK


def add_parser(sub) -> None:
    b = sub.add_parser("bench", help="time non-local attention and the model on this device")
    b.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    b.add_argument("--quick", action="store_true", help="fewer sizes and repeats")
    b.add_argument("--repeat", type=int, default=None, help="timed repeats per entry")
    b.set_defaults(func=cmd_bench)
