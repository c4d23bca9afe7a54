"""``flexsp-plan``: plan one global batch from the command line.

    flexsp-plan --lengths FILE --preset paper-gpt7b-192k --json plan.json [--plot plan.png]

FILE holds the sequence lengths: one integer per line, a .npy array, or a JSON list; ``-`` reads
stdin. Prints a table of micro-batches and groups, the iteration time, lower bound and gap, the
solve time, and the static baselines' times with our speedup over each. Bad input is one line on
stderr and exit status 2 (never a traceback).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from .baselines import (
    BaselineTimeout,
    best_homogeneous_plan,
    greedy_hybrid_cp_plan,
    static_plan,
    usable_degrees,
)
from .costmodel import CostModel
from .errors import UserError, print_error
from .inputs import OneLineParser, check_output_path, positive, power_of_two, read_lengths, resize
from .milp import MILP_BACKENDS, check_backend
from .plan import Plan
from .planner import plan_batch
from .plot import PLOT_SUFFIXES
from .presets import PRESETS, load_preset


def load_cost_model(args) -> CostModel:
    """The cost model ``--preset`` or ``--cost-model`` names, resized by ``--num-devices`` /
    ``--memory-mb``."""
    cm = CostModel.load(args.cost_model) if args.cost_model else load_preset(args.preset)
    return resize(cm, args.num_devices, args.memory_mb)


TABLE_GROUPS = 64
"""Group rows the table prints before it stops with a note (``--full`` prints them all)."""


def describe_cost_model(cm: CostModel, origin: str) -> str:
    """One line: which cost model (and where it came from), how many devices, how much memory."""
    return (
        f"cost model {cm.name} ({origin}) | {cm.num_devices} devices, {cm.devices_per_node} per node | "
        f"memory {cm.memory_mb:.0f} MB per device, C = {cm.capacity_tokens} tokens per device"
    )


def idle_line(plan: Plan) -> str:
    """How many devices the plan leaves idle: per micro-batch (range) and as a share of device-time."""
    idle = plan.idle_devices()
    if not idle:
        return "idle devices: none (empty plan)"
    with_idle = sum(1 for i in idle if i)
    span = f"{min(idle)}" if min(idle) == max(idle) else f"{min(idle)}-{max(idle)}"
    return (
        f"idle devices: {span} of {plan.num_devices} per micro-batch ({with_idle} of {len(idle)} "
        f"micro-batches leave devices idle; {plan.idle_device_fraction * 100:.1f}% of device-time)"
    )


def format_table(
    plan: Plan, baselines: dict[str, float], full: bool = False, header: str = "", quiet: bool = False
) -> str:
    """The group table (unless ``quiet``) between ``header`` and the summary lines."""
    lines = [header] if header else []
    if not quiet:
        lines.append(
            f"{'mb':>3} {'sp':>4} {'ranks':>11} {'attn':>8} {'seqs':>5} {'tokens':>9} "
            f"{'pred ms':>10} {'mem MB':>9}"
        )
    shown = 0
    total_groups = sum(len(mb.groups) for mb in plan.micro_batches)
    for mi, (mb, idle) in enumerate(zip(plan.micro_batches, plan.idle_devices())):
        if quiet:
            break
        if not full and shown + len(mb.groups) > TABLE_GROUPS and shown:
            lines.append(
                f"... {total_groups - shown} more groups in {len(plan.micro_batches) - mi} more "
                "micro-batches "
                f"not shown (--full prints every group)"
            )
            break
        shown += len(mb.groups)
        for g in mb.groups:
            ranks = f"{g.ranks[0]}-{g.ranks[-1]}" if g.sp > 1 else str(g.ranks[0])
            lines.append(
                f"{mi:>3} {g.sp:>4} {ranks:>11} {g.attention:>8} {len(g.seq_ids):>5} {g.tokens:>9} "
                f"{g.predicted_ms:>10.1f} {g.memory_mb:>9.0f}"
            )
        lines.append(
            f"{'':>3} micro-batch {mi}: {mb.predicted_ms:.1f} ms, {plan.num_devices - idle} of "
            f"{plan.num_devices} devices in groups" + (f" ({idle} idle)" if idle else "")
        )
    gap = f"{plan.gap * 100:.2f}%" if plan.lower_bound_ms > 0 else "n/a"
    cut = plan.extra.get("cut") if plan.status == "time_limit" else None
    lines += [
        f"plan: {plan.summary()}",
        f"iteration time {plan.predicted_ms:.1f} ms | lower bound {plan.lower_bound_ms:.1f} ms | gap {gap} | "
        f"status {plan.status}{' (' + ', '.join(cut) + ')' if cut else ''} | "
        f"solve {plan.solve_seconds:.3f} s",
        idle_line(plan),
    ]
    for name, ms in baselines.items():
        lines.append(f"  vs {name:<22} {ms:>12.1f} ms   speedup {ms / plan.predicted_ms:.3f}x")
    return "\n".join(lines)


def run_baselines(lengths, cm: CostModel, budget_s: float = float("inf")) -> dict[str, float]:
    """Each baseline's predicted ms. Static SP (one O(n log n) pass) always runs; the others
    share a time box of ``budget_s`` seconds: one that runs past it is skipped with a note on
    stderr (its time is then not printed)."""
    out = {}
    deadline = time.perf_counter() + budget_s
    for name, fn in (
        (f"static SP={max(usable_degrees(cm))}", static_plan),
        ("best homogeneous", best_homogeneous_plan),
        ("greedy hybrid-CP", greedy_hybrid_cp_plan),
    ):
        if time.perf_counter() > deadline:
            print(
                f"flexsp-plan: note: baseline {name} skipped: the baselines' time box ({budget_s:.1f} s) "
                "is spent",
                file=sys.stderr,
            )
            continue
        try:
            # static SP is one O(n log n) best-fit pass: always computed (it is the headline
            # comparison); the others stop at the box
            out[name] = (
                fn(lengths, cm) if fn is static_plan else fn(lengths, cm, deadline=deadline)
            ).predicted_ms
        except BaselineTimeout:
            print(
                f"flexsp-plan: note: baseline {name} skipped: it ran past the baselines' time box "
                f"({budget_s:.1f} s; --time-limit raises it)",
                file=sys.stderr,
            )
        except ValueError as exc:  # e.g. static SP=N past the head count: report, don't fail
            out[name] = float("nan")
            print(f"flexsp-plan: note: baseline {name} not applicable: {exc}", file=sys.stderr)
    return out


def build_parser() -> argparse.ArgumentParser:
    ap = OneLineParser(prog="flexsp-plan", description="Plan one global batch with adaptive SP.")
    ap.add_argument(
        "--lengths", required=True, help="lengths file: one integer per line, .npy, JSON list, or - for stdin"
    )
    src = ap.add_mutually_exclusive_group()
    src.add_argument(
        "--preset", default="paper-gpt7b-192k", help=f"cost-model preset: {', '.join(sorted(PRESETS))}"
    )
    src.add_argument("--cost-model", help="cost-model JSON file (e.g. written by flexsp-profile)")
    ap.add_argument("--num-devices", type=power_of_two, help="override the cluster size (a power of two)")
    ap.add_argument("--memory-mb", type=positive, help="override usable memory per device, MB (> 0)")
    ap.add_argument(
        "--time-limit",
        type=positive,
        default=1.0,
        help="time box of the planner, seconds (default 1.0); the baselines get a box of "
        "their own of max(0.5, time limit / 4) s",
    )
    ap.add_argument(
        "--milp-backend",
        choices=MILP_BACKENDS,
        default="highs",
        help="MILP solver: highs (scipy.optimize.milp, default) or pulp",
    )
    ap.add_argument(
        "--pulp-solver",
        help="with --milp-backend pulp: a solver PuLP can run here "
        "(default PULP_CBC_CMD; e.g. GUROBI_CMD, CPLEX_CMD if installed)",
    )
    ap.add_argument("--json", help="write the plan JSON here")
    ap.add_argument("--plot", help="draw the plan timeline to this file (.png, .svg or .pdf)")
    ap.add_argument("--no-baselines", action="store_true", help="skip the baseline comparison")
    ap.add_argument(
        "--full", action="store_true", help=f"print every group (default: the first {TABLE_GROUPS} or so)"
    )
    ap.add_argument("--quiet", action="store_true", help="print only the summary lines")
    ap.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="progress lines on stderr (default: when stderr is a terminal or the run is long)",
    )
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        check_backend(args.milp_backend, args.pulp_solver)
        if args.json:
            check_output_path("--json", args.json)
        if args.plot:
            check_output_path("--plot", args.plot, PLOT_SUFFIXES)
        cm = load_cost_model(args)
        lengths = read_lengths(args.lengths)
        long_run = len(lengths) >= 20_000 or args.time_limit >= 10
        show = args.progress if args.progress is not None else (sys.stderr.isatty() or long_run)
        started = time.perf_counter()

        def progress(message: str) -> None:
            print(f"flexsp-plan: {message}", file=sys.stderr, flush=True)

        if show:
            progress(
                f"planning {len(lengths)} sequences on {cm.num_devices} devices ({cm.name}), "
                f"time box {args.time_limit:g} s"
            )
        plan = plan_batch(
            lengths,
            cm,
            time_limit=args.time_limit,
            milp_backend=args.milp_backend,
            pulp_solver=args.pulp_solver,
            progress=progress if show else None,
        )
    except UserError as exc:
        return print_error("flexsp-plan", exc)
    budget = max(0.5, args.time_limit / 4)
    if show and not args.no_baselines:
        progress(
            f"plan done in {time.perf_counter() - started:.1f} s ({plan.status}); baselines (box "
            f"{budget:.1f} s)"
        )
    baselines = {} if args.no_baselines else run_baselines(lengths, cm, budget)
    if baselines:
        plan = Plan(**{**plan.__dict__, "extra": {**plan.extra, "baselines_ms": baselines}})
    origin = f"file {args.cost_model}" if args.cost_model else "preset"
    header = describe_cost_model(cm, origin)
    print(format_table(plan, baselines, full=args.full, header=header, quiet=args.quiet))
    try:
        if args.json:
            # indented JSON goes through the pure-Python encoder: compact above 10,000 sequences
            Path(args.json).write_text(
                plan.to_json(indent=1 if plan.num_sequences <= 10_000 else None) + "\n"
            )
        if args.plot:
            from .plot import plot_plan

            plot_plan(plan, args.plot)
    except OSError as exc:
        return print_error("flexsp-plan", f"cannot write output: {exc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
