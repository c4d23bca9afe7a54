"""``flexsp-plan``: plan one global batch from the command line.

    flexsp-plan --lengths FILE --preset paper-gpt7b-192k --json plan.json [--plot plan.png]

FILE holds the sequence lengths: one integer per line, a .npy array, or a JSON list; ``-`` reads
stdin. Prints a table of micro-batches and groups, the iteration time, lower bound and gap, the
solve time, and the static baselines' times with our speedup over each. Bad input is one line on
stderr and exit status 2 (never a traceback).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from .baselines import best_homogeneous_plan, greedy_hybrid_cp_plan, static_plan
from .costmodel import CostModel
from .plan import Plan
from .planner import PlanningError, plan_batch
from .presets import PRESETS, load_preset


def read_lengths(source: str) -> list[int]:
    """Lengths from a text/.npy/JSON file or stdin ("-"); ValueError naming the problem."""
    try:
        if source == "-":
            text = sys.stdin.read()
        elif source.endswith(".npy"):
            try:
                arr = np.load(source, allow_pickle=False)
            except (OSError, ValueError) as exc:
                raise ValueError(f"{source}: not a readable .npy array ({exc})") from None
            return _as_lengths(arr.reshape(-1).tolist(), source)
        else:
            text = Path(source).read_text()
    except FileNotFoundError:
        raise ValueError(f"lengths file {source} does not exist") from None
    except UnicodeDecodeError:
        raise ValueError(f"{source}: not a text file of lengths") from None
    stripped = text.strip()
    if stripped.startswith("["):
        try:
            return _as_lengths(json.loads(stripped), source)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{source}: malformed JSON list ({exc})") from None
    values = []
    for lineno, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        try:
            values.append(int(line))
        except ValueError:
            raise ValueError(f"{source}:{lineno}: expected one integer per line, got {line[:40]!r}") from None
    return _as_lengths(values, source)


def _as_lengths(values, source: str) -> list[int]:
    if not isinstance(values, list) or not values:
        raise ValueError(f"{source}: no sequence lengths found (the batch is empty)")
    out = []
    for i, v in enumerate(values):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v != int(v):
            raise ValueError(f"{source}: entry {i} is {v!r}, not an integer length")
        out.append(int(v))
    return out


def load_cost_model(args) -> CostModel:
    cm = CostModel.load(args.cost_model) if args.cost_model else load_preset(args.preset)
    if args.num_devices or args.memory_mb:
        n = args.num_devices
        if n is not None and (n < 1 or n & (n - 1)):
            raise ValueError(f"--num-devices must be a power of two, got {n}")
        cm = cm.with_devices(n, args.memory_mb)
        if n is not None and n < cm.devices_per_node:
            cm = CostModel.from_dict({**cm.to_dict(), "devices_per_node": n})
    return cm


def format_table(plan: Plan, baselines: dict[str, float]) -> str:
    lines = [f"{'mb':>3} {'sp':>4} {'ranks':>11} {'attn':>8} {'seqs':>5} {'tokens':>9} {'pred ms':>10} {'mem MB':>9}"]
    for mi, mb in enumerate(plan.micro_batches):
        for g in mb.groups:
            ranks = f"{g.ranks[0]}-{g.ranks[-1]}" if g.sp > 1 else str(g.ranks[0])
            lines.append(f"{mi:>3} {g.sp:>4} {ranks:>11} {g.attention:>8} {len(g.seq_ids):>5} {g.tokens:>9} "
                         f"{g.predicted_ms:>10.1f} {g.memory_mb:>9.0f}")
        lines.append(f"{'':>3} micro-batch {mi}: {mb.predicted_ms:.1f} ms")
    gap = f"{plan.gap * 100:.2f}%" if plan.lower_bound_ms > 0 else "n/a"
    lines += [
        f"plan: {plan.summary()}",
        f"iteration time {plan.predicted_ms:.1f} ms | lower bound {plan.lower_bound_ms:.1f} ms | gap {gap} | "
        f"status {plan.status} | solve {plan.solve_seconds:.3f} s",
    ]
    for name, ms in baselines.items():
        lines.append(f"  vs {name:<22} {ms:>12.1f} ms   speedup {ms / plan.predicted_ms:.3f}x")
    return "\n".join(lines)


def run_baselines(lengths, cm: CostModel) -> dict[str, float]:
    out = {}
    for name, fn in ((f"static SP={cm.num_devices}", static_plan), ("best homogeneous", best_homogeneous_plan),
                     ("greedy hybrid-CP", greedy_hybrid_cp_plan)):
        try:
            out[name] = fn(lengths, cm).predicted_ms
        except ValueError as exc:  # e.g. static SP=N past the head count: report, don't fail
            out[name] = float("nan")
            print(f"note: baseline {name} not applicable: {exc}", file=sys.stderr)
    return out


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="flexsp-plan", description="Plan one global batch with adaptive SP.")
    ap.add_argument("--lengths", required=True, help="lengths file: one integer per line, .npy, JSON list, or - for stdin")
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--preset", default="paper-gpt7b-192k", help=f"cost-model preset: {', '.join(sorted(PRESETS))}")
    src.add_argument("--cost-model", help="cost-model JSON file (e.g. written by flexsp-profile)")
    ap.add_argument("--num-devices", type=int, help="override the cluster size (power of two)")
    ap.add_argument("--memory-mb", type=float, help="override usable memory per device, MB")
    ap.add_argument("--time-limit", type=float, default=1.0, help="planner time box, seconds (default 1.0)")
    ap.add_argument("--json", help="write the plan JSON here")
    ap.add_argument("--plot", help="draw the plan timeline to this PNG")
    ap.add_argument("--no-baselines", action="store_true", help="skip the baseline comparison")
    ap.add_argument("--quiet", action="store_true", help="print only the summary lines")
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.time_limit <= 0:
            raise ValueError(f"--time-limit must be > 0, got {args.time_limit}")
        cm = load_cost_model(args)
        lengths = read_lengths(args.lengths)
        plan = plan_batch(lengths, cm, time_limit=args.time_limit)
    except (ValueError, PlanningError) as exc:
        print(f"flexsp-plan: error: {exc}", file=sys.stderr)
        return 2
    baselines = {} if args.no_baselines else run_baselines(lengths, cm)
    if baselines:
        plan = Plan(**{**plan.__dict__, "extra": {**plan.extra, "baselines_ms": baselines}})
    text = format_table(plan, baselines)
    print("\n".join(text.splitlines()[-(2 + len(baselines)):]) if args.quiet else text)
    try:
        if args.json:
            Path(args.json).write_text(plan.to_json(indent=1) + "\n")
        if args.plot:
            from .plot import plot_plan
            plot_plan(plan, args.plot)
    except OSError as exc:
        print(f"flexsp-plan: error: cannot write output: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
