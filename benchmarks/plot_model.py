"""Plot the whole-model inference benchmarks: time and peak memory against image size.

    python benchmarks/plot_model.py [RESULTS.json ...] [-o model.png]

RESULTS.json: the summary that benchmarks/bench_model.py writes on a GPU
(benchmarks/results/model_<device>.json; default: every such file), or a pytest-benchmark
--benchmark-json file of the same run (its extra_info holds the same fields).
Output: one PNG per input (default: beside it, .png instead of .json) with two panels, median
time (ms) and peak memory (GiB) against megapixels, log-log, one line per variant and mode
(naive = the official computation, ours = fused kernels; whole image or official chop).
Cases that ran out of memory are drawn as crosses on the top edge. The training-step cases are
printed as a table. Needs matplotlib (pip install matplotlib).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def load_cases(path: Path) -> tuple[str, list[dict]]:
    """(device or file name, case dicts) from a summary JSON or a pytest-benchmark JSON."""
    try:
        doc = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise SystemExit(f"{path}: cannot read benchmark results ({e})")
    if isinstance(doc, dict) and isinstance(doc.get("cases"), list):
        return str(doc.get("device", path.stem)), doc["cases"]
    if isinstance(doc, dict) and isinstance(doc.get("benchmarks"), list):
        cases = []
        for bench in doc["benchmarks"]:
            info = dict(bench.get("extra_info") or {})
            if "case" in info:
                if info.get("median_ms") is None and bench.get("stats"):
                    info["median_ms"] = 1e3 * bench["stats"]["median"]
                cases.append(info)
        device = (doc.get("machine_info") or {}).get("node", path.stem)
        return str(device), cases
    raise SystemExit(f"{path}: neither a bench_model summary (a 'cases' list) nor a pytest-benchmark file")


def train_table(cases: list[dict]) -> str:
    rows = [c for c in cases if c.get("case") == "train"]
    if not rows:
        return ""
    lines = [f"{'training step':<20} {'median ms':>10} {'pipelined ms':>13} {'peak GiB':>9}"]
    for c in rows:
        if c.get("oom"):
            lines.append(f"{c['name']:<20} {'OOM':>10}")
            continue
        lines.append(f"{c['name']:<20} {c.get('median_ms') or float('nan'):>10.2f} "
                     f"{c.get('ms_per_step_pipelined') or float('nan'):>13.2f} {c.get('peak_gib', float('nan')):>9.2f}")
    return "\n".join(lines)


def plot(device: str, cases: list[dict], out: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("plot_model.py needs matplotlib: pip install matplotlib") from None
    infer = [c for c in cases if c.get("case") == "infer"]
    if not infer:
        raise SystemExit(f"no inference cases to plot ({device})")
    series: dict[str, list[dict]] = {}
    for c in infer:
        series.setdefault(f"{c['name']} {c['mode']}", []).append(c)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    panels = (("median_ms", "median time (ms)"), ("peak_gib", "peak memory (GiB)"))
    for ax, (key, label) in zip(axes, panels):
        tops = [c[key] for c in infer if not c.get("oom") and c.get(key)]
        top = max(tops) * 2 if tops else 1.0
        for name, rows in sorted(series.items()):
            rows = sorted(rows, key=lambda c: c["megapixels"])
            ok = [c for c in rows if not c.get("oom") and c.get(key)]
            style = "--" if name.startswith("naive") else "-"   # dashed: the official computation
            marker = "s" if name.endswith("chop") else "o"      # squares: official chop
            line, = ax.plot([c["megapixels"] for c in ok], [c[key] for c in ok], style, marker=marker, label=name)
            oom = [c["megapixels"] for c in rows if c.get("oom")]
            if oom:
                ax.plot(oom, [top] * len(oom), "x", color=line.get_color(), markersize=9)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("image size (megapixels)")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_title(f"RNAN inference, {device}")
    axes[1].set_title("x on the top edge: out of memory")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("results", nargs="*", type=Path,
                        help="summary or pytest-benchmark JSON files (default: benchmarks/results/model_*.json)")
    parser.add_argument("-o", "--output", type=Path, help="PNG path (one input only)")
    args = parser.parse_args(argv)
    paths = args.results or sorted(RESULTS_DIR.glob("model_*.json"))
    if not paths:
        print(f"no results: run `pytest benchmarks/bench_model.py` on a GPU first (writes {RESULTS_DIR}/model_<device>.json)",
              file=sys.stderr)
        return 1
    if args.output and len(paths) > 1:
        parser.error("-o/--output takes one input file")
    for path in paths:
        device, cases = load_cases(path)
        table = train_table(cases)
        if table:
            print(f"{path} ({device})\n{table}")
        out = args.output or path.with_suffix(".png")
        plot(device, cases, out)
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
