"""``flexsp-simulate``: replay global batches of real lengths through several policies at any
cluster size, pricing every plan with one cost model. Pure CPU, no torch.

    flexsp-simulate --workload cpython --global-batch 512 --steps 8 --num-devices 64 \\
        --cost-model paper-gpt7b-192k --json sim.json --plot sim.png
    flexsp-simulate --lengths lengths.txt --global-batch 256 --policies flexsp,megatron-dcp,best-static

Step k is lines ``[k*B, (k+1)*B)`` of the lengths file, taken as given (no padding, no filtering;
a length that fits no group is an error). Prints, per policy, the predicted time in total and per
step (median and spread), the speedup over best-static and over megatron-dcp, the idle-device
fraction and micro-batches per step, and a lower bound no valid plan beats. Every plan is checked
with ``build.validate_plan``. The JSON carries every plan (a contract, like the plan JSON):
``{"num_devices": N, "cost_model": NAME, "global_batch": B, "policies": {POLICY: {"total_ms": float,
"steps": [{"predicted_ms": float, "plan": PLAN}]}}}``, PLAN exactly what ``flexsp-plan --json``
writes, its ``seq_ids`` indexing that step's lengths; other keys are informative. Bad input is one
line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from .build import price_plan, validate_plan
from .cli import describe_cost_model
from .costmodel import CostModel
from .errors import UserError, print_error
from .inputs import (
    OneLineParser,
    check_output_path,
    int_at_least,
    positive,
    power_of_two,
    read_lengths,
    resize,
    resolve_cost_model,
)
from .milp import MILP_BACKENDS
from .plan import Plan
from .planner import lower_bound_ms
from .plot import PLOT_SUFFIXES
from .policies import PAPER_MILP_SECONDS, PolicySettings, parse_policies, run_policy
from .presets import PRESETS, context_limit
from .workloads import NAMES as WORKLOADS
from .workloads import sample_lengths

PROG = "flexsp-simulate"
REFERENCES = ("best-static", "megatron-dcp")
"""Policies every other one is compared with (speedup columns; null when not run)."""


def largest_length(cm: CostModel) -> int:
    """The longest sequence any policy can place: the largest runnable degree x C."""
    return max(d for d in cm.degrees if cm.attention_modes(d)) * cm.capacity_tokens


def split_steps(
    lengths: list[int], batch: int, steps: int | None, source: str
) -> tuple[list[list[int]], int]:
    """(K batches of B lengths, lines left past them). ValueError when there is not one batch, or
    fewer lines than ``steps`` batches."""
    if len(lengths) < batch:
        raise UserError(f"{source} has {len(lengths)} lengths, fewer than one global batch of {batch}")
    k = steps if steps is not None else len(lengths) // batch
    if k * batch > len(lengths):
        raise UserError(
            f"{source} has {len(lengths)} lengths: --steps {k} x --global-batch {batch} needs "
            f"{k * batch}; at most --steps {len(lengths) // batch}"
        )
    return [lengths[s * batch : (s + 1) * batch] for s in range(k)], len(lengths) - k * batch


def check_fits(batches: list[list[int]], cm: CostModel) -> None:
    """ValueError naming the first length that fits no group (step, index, length, limit)."""
    limit = largest_length(cm)
    for s, batch in enumerate(batches):
        for i, length in enumerate(batch):
            if length < 1 or length > limit:
                raise UserError(
                    f"step {s}, sequence {i} (line {s * len(batch) + i + 1}): length {length} fits no group: "
                    f"lengths must be 1..{limit} ({limit // cm.capacity_tokens} devices x "
                    f"C = {cm.capacity_tokens} tokens under {cm.name} on {cm.num_devices} devices)"
                )


def _speedup(ref: float | None, ms: float) -> float | None:
    return None if ref is None or ms <= 0 else ref / ms


def simulate(
    batches: Sequence[Sequence[int]],
    cm: CostModel,
    policies: list[str],
    settings: PolicySettings,
    progress: Callable[[str], None] | None = None,
) -> dict:
    """Every policy's plan for every batch, validated and priced: the simulator's JSON (without
    the input/command stamps the CLI adds)."""
    steps: dict[str, list[dict]] = {p: [] for p in policies}
    lower: list[float] = []
    started = time.perf_counter()
    for s, batch in enumerate(batches):
        bound = lower_bound_ms(batch, cm)
        for name in policies:
            t0 = time.perf_counter()
            if progress is not None and name == "flexsp-official":
                progress(f"step {s + 1}/{len(batches)}: {name} ({settings.official_label()}) ...")
            plan = run_policy(name, batch, cm, settings)
            validate_plan(plan, batch, cm)
            assert math.isclose(price_plan(plan, batch, cm), plan.predicted_ms, rel_tol=1e-9, abs_tol=1e-6), (
                f"{name}: a plan's stored time must be its price"
            )
            if name == "flexsp":  # the planner's bound (MILP duals) holds for any plan
                bound = max(bound, plan.lower_bound_ms)
            steps[name].append(
                {
                    "predicted_ms": plan.predicted_ms,
                    "plan": plan,
                    "seconds": round(time.perf_counter() - t0, 4),
                }
            )
        lower.append(bound)
        if progress is not None:
            done = ", ".join(f"{p} {steps[p][-1]['predicted_ms']:.0f}" for p in policies[:6])
            progress(
                f"step {s + 1}/{len(batches)} done in {time.perf_counter() - started:.1f} s (ms: {done}"
                f"{', ...' if len(policies) > 6 else ''})"
            )
    return _summarise(cm, len(batches[0]), steps, lower, settings)


def _summarise(
    cm: CostModel, batch: int, steps: dict[str, list[dict]], lower: list[float], settings: PolicySettings
) -> dict:
    refs = {r: [st["predicted_ms"] for st in steps[r]] for r in REFERENCES if r in steps}
    bs, md = refs.get("best-static"), refs.get("megatron-dcp")
    out_policies = {}
    for name, rows in steps.items():
        times = [r["predicted_ms"] for r in rows]
        total = sum(times)
        device_ms = idle_ms = 0.0
        step_rows = []
        for s, row in enumerate(rows):
            plan: Plan = row["plan"]
            mb_ms = sum(mb.predicted_ms for mb in plan.micro_batches)
            device_ms += mb_ms * plan.num_devices
            idle_ms += plan.idle_device_fraction * mb_ms * plan.num_devices
            step_rows.append(
                {
                    "predicted_ms": row["predicted_ms"],
                    "lower_bound_ms": lower[s],
                    "speedup_vs_best_static": _speedup(bs and bs[s], times[s]),
                    "speedup_vs_megatron_dcp": _speedup(md and md[s], times[s]),
                    "idle_device_fraction": plan.idle_device_fraction,
                    "micro_batches": len(plan.micro_batches),
                    "solve_seconds": row["seconds"],
                    "plan": plan.to_dict(),
                }
            )
        entry = {
            "total_ms": total,
            "median_step_ms": statistics.median(times),
            "min_step_ms": min(times),
            "max_step_ms": max(times),
            "speedup_vs_best_static": _speedup(bs and sum(bs), total),
            "speedup_vs_megatron_dcp": _speedup(md and sum(md), total),
            "idle_device_fraction": idle_ms / device_ms if device_ms > 0 else 0.0,
            "micro_batches_per_step": statistics.mean(len(r["plan"].micro_batches) for r in rows),
            "steps": step_rows,
        }
        if name == "flexsp-official":
            entry["label"] = settings.official_label()
            entry["time_limit_per_milp"] = settings.official_milp_s
        if name == "flexsp":
            entry["time_limit"] = settings.time_limit
        out_policies[name] = entry
    return {
        "num_devices": cm.num_devices,
        "cost_model": cm.name,
        "global_batch": batch,
        "num_steps": len(lower),
        "cost_model_source": cm.source,
        "memory_mb": cm.memory_mb,
        "capacity_tokens": cm.capacity_tokens,
        "lower_bound_ms": {"total": sum(lower), "steps": lower},
        "settings": {
            "time_limit": settings.time_limit,
            "official_milp_s": settings.official_milp_s,
            "paper_milp_s": PAPER_MILP_SECONDS,
            "milp_backend": settings.milp_backend,
        },
        "policies": out_policies,
    }


def _fmt_x(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}x"


def format_report(result: dict) -> str:
    """The table ``flexsp-simulate`` prints: one row per policy, then the lower bound."""
    k = result["num_steps"]
    head = (
        f"{'policy':<18} {'total ms':>12} {'median step':>12} {'spread (min-max)':>21} "
        f"{'vs best-static':>14} {'vs megatron-dcp':>15} {'idle dev':>8} {'mb/step':>7}"
    )
    lines = [
        f"{k} steps x {result['global_batch']} sequences, predicted by the cost model (not measured)",
        head,
    ]
    for name, p in result["policies"].items():
        spread = f"{p['min_step_ms']:.0f}-{p['max_step_ms']:.0f}"
        lines.append(
            f"{name:<18} {p['total_ms']:>12.0f} {p['median_step_ms']:>12.0f} {spread:>21} "
            f"{_fmt_x(p['speedup_vs_best_static']):>14} {_fmt_x(p['speedup_vs_megatron_dcp']):>15} "
            f"{p['idle_device_fraction'] * 100:>7.1f}% {p['micro_batches_per_step']:>7.1f}"
        )
    lb = result["lower_bound_ms"]
    spread = f"{min(lb['steps']):.0f}-{max(lb['steps']):.0f}"
    lines.append(
        f"{'lower bound':<18} {lb['total']:>12.0f} {statistics.median(lb['steps']):>12.0f} {spread:>21}"
    )
    if "flexsp-official" in result["policies"]:
        lines.append(f"flexsp-official ran at {result['policies']['flexsp-official']['label']}")
    missing = [r for r in REFERENCES if r not in result["policies"]]
    if missing:
        lines.append(f"speedup columns need {' and '.join(missing)} in --policies (n/a above)")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    ap = OneLineParser(
        prog=PROG,
        description="Replay global batches through several SP policies and compare "
        "their predicted step times under one cost model.",
    )
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument(
        "--lengths", help="lengths file: one integer per line (also .npy, a JSON list, - for stdin)"
    )
    src.add_argument(
        "--workload",
        choices=WORKLOADS,
        metavar="NAME",
        help=f"sample lengths from a workload: {', '.join(WORKLOADS)}",
    )
    ap.add_argument("--global-batch", type=int_at_least(1), required=True, help="sequences per step (B)")
    ap.add_argument(
        "--steps",
        type=int_at_least(1),
        help="consecutive batches (K); default: every full batch of --lengths, 4 for --workload",
    )
    ap.add_argument("--seed", type=int, default=0, help="--workload: random seed (default 0)")
    ap.add_argument(
        "--context-limit",
        type=int_at_least(1),
        help="--workload: longest length drawn (longer draws are redrawn); default: the paper "
        "preset's limit, else the longest length the cluster can hold",
    )
    ap.add_argument(
        "--num-devices", type=power_of_two, help="cluster size N (a power of two; default: the cost model's)"
    )
    ap.add_argument(
        "--memory-mb", type=positive, help="usable memory per device, MB (default: the cost model's)"
    )
    ap.add_argument(
        "--cost-model",
        default="paper-gpt7b-192k",
        metavar="PRESET|FILE",
        help=f"a preset ({', '.join(sorted(PRESETS))}) or a cost-model JSON file (default paper-gpt7b-192k)",
    )
    ap.add_argument(
        "--policies",
        help="comma list of flexsp, flexsp-official, megatron-dcp, best-static, "
        "best-homogeneous, static-D (default: all that apply)",
    )
    ap.add_argument(
        "--time-limit", type=positive, default=1.0, help="flexsp: planner time box per plan, s (default 1)"
    )
    ap.add_argument(
        "--official-milp-seconds",
        type=positive,
        default=PAPER_MILP_SECONDS,
        help=f"flexsp-official: time limit per MILP, s (default {PAPER_MILP_SECONDS:g}, "
        "the paper's; "
        "a shorter one is labelled in every output)",
    )
    ap.add_argument("--milp-backend", choices=MILP_BACKENDS, default="highs", help="flexsp: MILP backend")
    ap.add_argument("--json", help="write every plan and the summary here")
    ap.add_argument("--plot", help="per-step predicted times, one line per policy (.png, .svg or .pdf)")
    ap.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="progress on stderr (default: on a terminal, or when flexsp-official runs)",
    )
    return ap


def _load_input(args, cm: CostModel) -> tuple[list[list[int]], dict]:
    if args.lengths is not None:
        if args.context_limit is not None:
            raise UserError("--context-limit applies to --workload only; --lengths are taken as given")
        lengths = read_lengths(args.lengths)
        batches, rest = split_steps(lengths, args.global_batch, args.steps, args.lengths)
        if rest:
            first = len(lengths) - rest + 1
            print(
                f"{PROG}: note: lines {first}-{len(lengths)} of {args.lengths} ({rest} lengths) are past "
                f"{len(batches)} steps x {args.global_batch} and are not simulated",
                file=sys.stderr,
            )
        return batches, {
            "lengths_file": args.lengths,
            "lines_used": len(batches) * args.global_batch,
            "lines_not_simulated": rest,
        }
    steps = args.steps or 4
    limit = args.context_limit or min(context_limit(cm.name) or largest_length(cm), largest_length(cm))
    drawn = sample_lengths(args.workload, args.global_batch * steps, args.seed, limit).tolist()
    batches = [drawn[s * args.global_batch : (s + 1) * args.global_batch] for s in range(steps)]
    return batches, {"workload": args.workload, "seed": args.seed, "context_limit": limit, "overflow": "drop"}


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.json:
            check_output_path("--json", args.json)
        if args.plot:
            check_output_path("--plot", args.plot, PLOT_SUFFIXES)
        cm = resize(resolve_cost_model(args.cost_model), args.num_devices, args.memory_mb)
        batches, source = _load_input(args, cm)
        check_fits(batches, cm)
        policies = parse_policies(args.policies, cm, max(max(b) for b in batches))
        settings = PolicySettings(
            time_limit=args.time_limit,
            official_milp_s=args.official_milp_seconds,
            milp_backend=args.milp_backend,
        )
        show = args.progress
        if show is None:
            show = sys.stderr.isatty() or "flexsp-official" in policies

        def progress(message: str) -> None:
            print(f"{PROG}: {message}", file=sys.stderr, flush=True)

        if show:
            progress(
                f"{len(batches)} steps x {args.global_batch} sequences, {len(policies)} policies, "
                f"{cm.num_devices} devices ({cm.name})"
            )
        result = simulate(batches, cm, policies, settings, progress if show else None)
    except UserError as exc:
        return print_error(PROG, exc)
    result["input"] = source
    result["command"] = " ".join([PROG, *(argv if argv is not None else sys.argv[1:])])
    origin = "preset" if args.cost_model in PRESETS else f"file {args.cost_model}"
    print(describe_cost_model(cm, origin))
    print(format_report(result))
    try:
        if args.json:
            big = sum(len(b) for b in batches) * len(policies) > 200_000
            Path(args.json).write_text(json.dumps(result, indent=None if big else 1) + "\n")
        if args.plot:
            from .plot import plot_steps

            plot_steps(result, args.plot)
    except OSError as exc:
        return print_error(PROG, f"cannot write output: {exc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
