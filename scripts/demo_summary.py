"""The demo's closing lines (scripts/demo.sh), from the files flexsp-bench and flexsp-simulate wrote.

    python scripts/demo_summary.py bench outputs/demo/bench.json        # measured, this machine
    python scripts/demo_summary.py simulate outputs/demo/simulate64.json  # predicted, 64 GPUs

A measured ratio below 1.0 is reported as a loss, never as a gain.
"""
import json
import sys
from pathlib import Path


NOISE = 0.03
"""Ratios within 3% of 1.0 are called a tie: on a shared 2-core machine the medians of interleaved
repetitions move by about that much between runs (benchmarks/results/bench_cpu*.md)."""


def _gain(x: float) -> str:
    return f"{x:.2f}x faster" if x >= 1.0 else f"{1 / x:.2f}x SLOWER"


def verdict(median: float, fastest: float) -> str:
    """A gain only when the medians AND the fastest runs (load only ever adds time) both show one."""
    if median >= 1 + NOISE and fastest >= 1 + NOISE:
        return "a measured gain"
    if median <= 1 - NOISE and fastest <= 1 - NOISE:
        return "a measured LOSS"
    return "NO CLEAR DIFFERENCE (within run-to-run noise)"


def bench(path: Path) -> str:
    res = json.loads(path.read_text())
    sp = res["summary"]["speedups"]
    static, base = sp["best_static"], sp["best_baseline"]
    load = (res.get("loadavg_start") or [None])[0]
    head = (
        f"[flexsp] MEASURED on this machine ({res['world_size']} {res['device']} ranks, interleaved, median of "
        f"{res['bench']['repeats']} steps per batch, {res['bench']['batches']} batches"
        + (f", load {load:.1f}" if isinstance(load, (int, float)) else "")
        + "): FlexSP "
    )
    return (
        head + f"{_gain(static['measured'])} than the best static SP degree of each batch "
        f"(fastest runs {static['fastest']:.2f}x; {verdict(static['measured'], static['fastest'])}) and "
        f"{_gain(base['measured'])} than the better of that and best-homogeneous (fastest runs "
        f"{base['fastest']:.2f}x; {verdict(base['measured'], base['fastest'])}); the cost model predicted "
        f"{static['predicted']:.2f}x and {base['predicted']:.2f}x (details {path.with_suffix('.md')})"
    )


def simulate(path: Path) -> str:
    res = json.loads(path.read_text())
    pol = res["policies"]
    fx = pol["flexsp"]
    parts = [f"{fx['speedup_vs_best_static']:.2f}x over the best static degree"]
    if "megatron-dcp" in pol:
        parts.append(f"{fx['speedup_vs_megatron_dcp']:.2f}x over Megatron-Core dynamic CP")
    return (f"[flexsp] PREDICTED for {res['num_devices']} GPUs ({res['cost_model']}, an estimate; "
            f"{res['num_steps']} batches of {res['global_batch']} sequences of the same length distribution): "
            f"FlexSP {', '.join(parts)} (flexsp-simulate; {path})")


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] not in ("bench", "simulate"):
        print("usage: demo_summary.py bench|simulate FILE.json", file=sys.stderr)
        return 2
    path = Path(argv[1])
    if not path.is_file():
        print(f"demo_summary: error: {path} does not exist (did the step before finish?)", file=sys.stderr)
        return 2
    print(bench(path) if argv[0] == "bench" else simulate(path), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
