#!/usr/bin/env python3
"""Simulator table: predicted step times of every policy, per workload x cost model x cluster size.

Runs ``solver.simulate.simulate`` (the engine of ``flexsp-simulate``: every plan validated with
``build.validate_plan`` and priced by one cost model) on:

- workloads (``solver.workloads``): ``stdlib-8k`` (the demo corpus, CPython stdlib files cut at
  8,192 tokens), ``cpython`` (whole stdlib files, real lengths), ``prolong-64k`` (ProLong's 64K
  continued-training mix, Gao et al. 2024);
- cost models: the paper's ``paper-gpt7b-192k`` and ``paper-gpt30b-192k`` (A100, 30 GB, measured
  constants) and the ESTIMATE presets ``h100-/h200-nvlink4-ib8x400-gpt7b-estimate`` (public machine
  figures, nothing measured);
- 8, 64, 512 and 1,024 devices; ``STEPS`` consecutive global batches per cell, the batch size
  chosen so a step holds about ``TOKENS_PER_DEVICE`` tokens per device (``batch_size``);
- policies: flexsp (time box ``--time-limit`` per plan), megatron-dcp, best-static (the fastest
  static-D per batch), best-homogeneous, and flexsp-official with paper-gpt7b-192k where it fits
  the time budget: at the paper's 10 s per MILP on 8 devices, at ``--official-64-seconds``
  (SHORTER, labelled) on 64 devices, not run elsewhere (labelled "not run").

Each cell's context limit is the workload's own (8,192 / the paper's 191,872 / 65,536) capped at
what the cluster holds (N x C); cells whose model states do not fit memory are listed as such.
Speedups are per step (policy time / best-static time, etc.), reported as the median and the
min-max over the steps. All numbers are PREDICTED by the cost models, not measured.

    .venv/bin/python benchmarks/simulate_table.py              # ~15 min on 2 shared cores
    .venv/bin/python benchmarks/simulate_table.py --quick      # smoke: stdlib-8k, 1 estimate preset, N=8

Writes ``benchmarks/results/simulate[_quick].md`` / ``.json`` / ``.png``, stamped by
``benchmarks/stamp.py`` with the commit, machine, command, load, cost models (with their sources) and
policies as run.
"""
from __future__ import annotations

import argparse
import collections
import functools
import json
import math
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import stamp as provenance  # noqa: E402  (benchmarks/stamp.py)
from solver.policies import PAPER_MILP_SECONDS, PolicySettings, static_degrees  # noqa: E402
from solver.presets import load_preset  # noqa: E402
from solver.simulate import simulate  # noqa: E402
from solver.workloads import sample_lengths  # noqa: E402

WORKLOADS = {"stdlib-8k": 8192, "cpython": 191_872, "prolong-64k": 65_536}
"""Workload -> its own context limit (the demo's 8,192; the paper's 192K - 128; ProLong's 64K)."""
PRESETS = ["paper-gpt7b-192k", "paper-gpt30b-192k", "h100-nvlink4-ib8x400-gpt7b-estimate",
           "h200-nvlink4-ib8x400-gpt7b-estimate"]
DEVICES = [8, 64, 512, 1024]
STEPS = 3
TOKENS_PER_DEVICE = 24_000
"""A step holds about this many tokens per device (a few micro-batches at the paper's C ~ 6,500)."""
POLICIES = ["flexsp", "megatron-dcp", "best-static", "best-homogeneous"]
MEAN_SAMPLE = 20_000
"""Lengths drawn once per workload to estimate its mean length (for the batch size)."""


@functools.lru_cache(maxsize=None)
def mean_length(workload: str, limit: int) -> float:
    return float(sample_lengths(workload, MEAN_SAMPLE, 12345, limit).mean())


def batch_size(workload: str, devices: int, limit: int) -> int:
    """Sequences per step: the power of two nearest TOKENS_PER_DEVICE x devices / mean length."""
    return max(8, 1 << round(math.log2(TOKENS_PER_DEVICE * devices / mean_length(workload, limit))))


def official_setting(preset: str, devices: int, args) -> float | None:
    """Seconds per MILP for flexsp-official in this cell, or None (not run: time budget)."""
    if preset != "paper-gpt7b-192k":
        return None
    if devices == 8:
        return PAPER_MILP_SECONDS
    if devices == 64 and args.official_64_seconds > 0:
        return args.official_64_seconds
    return None


def run_cell(workload: str, preset: str, devices: int, args) -> dict:
    cell = {"workload": workload, "preset": preset, "devices": devices}
    try:
        cm = load_preset(preset).with_devices(devices)
    except ValueError as exc:
        return {**cell, "skipped": f"does not fit: {exc}"}
    limit = min(WORKLOADS[workload], max(static_degrees(cm, 1)) * cm.capacity_tokens)
    b = batch_size(workload, devices, limit)
    lengths = sample_lengths(workload, b * args.steps, args.seed, limit).tolist()
    batches = [lengths[s * b:(s + 1) * b] for s in range(args.steps)]
    milp_s = official_setting(preset, devices, args)
    policies = POLICIES + (["flexsp-official"] if milp_s is not None else [])
    settings = PolicySettings(time_limit=args.time_limit, official_milp_s=milp_s or PAPER_MILP_SECONDS)
    t0 = time.perf_counter()
    result = simulate(batches, cm, policies, settings)
    cell.update(batch=b, steps=args.steps, context_limit=limit, capacity_tokens=cm.capacity_tokens,
                seconds=round(time.perf_counter() - t0, 1),
                official=settings.official_label() if milp_s else None,
                lower_bound_ms=result["lower_bound_ms"]["steps"], policies={})
    runs = result["policies"]
    ref = {r: [s["predicted_ms"] for s in runs[r]["steps"]] for r in ("best-static", "megatron-dcp")}
    for name, pol in runs.items():
        times = [s["predicted_ms"] for s in pol["steps"]]
        cell["policies"][name] = {
            "step_ms": times,
            "vs_best_static": [r / t for r, t in zip(ref["best-static"], times)],
            "vs_megatron_dcp": [r / t for r, t in zip(ref["megatron-dcp"], times)],
            "idle_device_fraction": pol["idle_device_fraction"],
            "micro_batches_per_step": pol["micro_batches_per_step"],
            "status": [s["plan"]["status"] for s in pol["steps"]],
            "method": [s["plan"]["extra"].get("search", s["plan"]["method"]) for s in pol["steps"]],
        }
    static_ms = [s["plan"]["extra"]["static_ms"] for s in runs["best-static"]["steps"]]
    cell["best_static_degrees"] = [min(ms, key=ms.get) for ms in static_ms]
    return cell


def _origin(method: str) -> str:
    """Where a flexsp plan came from: its own search, or one of its safety nets."""
    if method == "megatron-dcp-net":
        return "mDCP net"
    if method.startswith("static-"):
        return "static net"
    if method == "megatron-dcp":
        return "search from mDCP"     # the search's baseline phase started from Megatron's plan
    return "quick net" if method == "quick" else "search"


def _spread(values: list[float], fmt: str = "{:.2f}") -> str:
    med = statistics.median(values)
    return f"{fmt.format(med)} [{fmt.format(min(values))}-{fmt.format(max(values))}]"


HEADER = """# Simulator table: predicted step times under one cost model per row

All numbers are PREDICTED by the cost models (not measured). Rows with an `-estimate` preset use
ESTIMATED machine figures (H100/H200 datasheets, analytic compute at MFU 0.4, bandwidths from the
topology form); the `paper-` presets are the FlexSP paper's measured A100 constants.
"""

LEGEND = (
    "- Cells: `median [min-max]` over the steps of the per-step ratio (best-static step time / policy step "
    "time; >1 = faster than best-static). `flexsp vs mDCP`: flexsp over megatron-dcp. `gap`: flexsp above "
    "the lower bound (`solver.planner.lower_bound_ms`, or the planner's MILP bound). `idle`: share of "
    "device-time on devices in no group (flexsp / megatron-dcp). `flexsp plan from`: per step, whether "
    "flexsp's plan came from its own search or from one of its safety nets (the best static plan, "
    "Megatron's schedule, or the quick packing: computed before the search, so flexsp is never slower "
    "than them; a net winning means the search found nothing better in its time box).")


def _row(c: dict) -> str:
    """One markdown row of a cell."""
    if "skipped" in c:
        return f"| {c['preset']} | {c['devices']} | | | {c['skipped'][:90]} |" + " |" * 10
    p = c["policies"]
    bs = [t / 1e3 for t in p["best-static"]["step_ms"]]
    off = "not run"
    if "flexsp-official" in p:
        paper = c["official"].startswith(f"{PAPER_MILP_SECONDS:g} s")
        label = " (10 s/MILP, paper)" if paper else f" ({c['official'].split(' s ')[0]} s/MILP, SHORTER)"
        off = _spread(p["flexsp-official"]["vs_best_static"]) + label
    gap = statistics.median(t / lb - 1 for t, lb in zip(p["flexsp"]["step_ms"], c["lower_bound_ms"]))
    degrees = "/".join(sorted({d.replace("static-", "") for d in c["best_static_degrees"]}, key=int))
    origin = collections.Counter(_origin(m) for m in p["flexsp"]["method"])
    idle = f"{p['flexsp']['idle_device_fraction']:.0%} / {p['megatron-dcp']['idle_device_fraction']:.0%}"
    cols = [c["preset"], c["devices"], c["batch"], f"{c['context_limit']:,}", _spread(bs, "{:.1f}"), degrees,
            _spread(p["flexsp"]["vs_best_static"]), _spread(p["megatron-dcp"]["vs_best_static"]),
            _spread(p["best-homogeneous"]["vs_best_static"]), off, _spread(p["flexsp"]["vs_megatron_dcp"]),
            ", ".join(f"{k} {v}" for k, v in sorted(origin.items())), f"{gap:.1%}", idle,
            f"{c['seconds']:.0f}"]
    return "| " + " | ".join(str(x) for x in cols) + " |"


def markdown(cells: list[dict], args, stamp: provenance.Stamp, rendered: str = "") -> str:
    title, rest = HEADER.split("\n", 1)
    lines = [title, "", provenance.markdown_block(stamp), rest.lstrip("\n"),
             f"- Tables re-rendered from the JSON (numbers unchanged) by `{rendered}`" if rendered else
             "- The planners' time boxes are wall-clock: on a shared machine (load in the stamp) a search gets "
             "less CPU and may stop earlier; the pricing of a plan does not depend on load.",
             f"- Policies: flexsp (`solver.planner.plan_batch`, time box {args.time_limit:g} s per plan), "
             "megatron-dcp (Megatron-Core dynamic CP, `solver.megatron_dcp`), best-static (fastest static-D "
             "per batch, `solver.baselines.static_plan`), best-homogeneous (`best_homogeneous_plan`), "
             "flexsp-official (`solver.official`, HiGHS) with paper-gpt7b-192k only: at the paper's "
             f"{PAPER_MILP_SECONDS:g} s per MILP on 8 devices, at {args.official_64_seconds:g} s per MILP "
             "(SHORTER than the paper's) on 64 devices; not run elsewhere (time budget: at 10 s per MILP a "
             "64-device step needs minutes).",
             f"- Steps: {args.steps} consecutive global batches per cell (seed {args.seed}); batch B = the "
             f"power of two nearest {TOKENS_PER_DEVICE:,} tokens per device / the workload's mean length; "
             "context limit (`ctx`) = the workload's own, capped at N x C.",
             LEGEND, "", "Cost models:", ""]
    lines += [f"- `{name}`: {source}" for name, source in stamp.cost_models.items()]
    lines.append("")
    for workload in _workloads(cells):
        lines += [f"## {workload}", "",
                  "| cost model | N | B | ctx | best-static step (s) | static D | flexsp | megatron-dcp | "
                  "best-homog. | flexsp-official | flexsp vs mDCP | flexsp plan from | gap | idle | s |",
                  "|---|---:|---:|---:|---|---|---|---|---|---|---|---|---:|---|---:|"]
        lines += [_row(c) for c in cells if c["workload"] == workload]
        lines.append("")
    done = [c for c in cells if "skipped" not in c]
    if done:
        def every(name, key):
            return [x for c in done for x in c["policies"][name][key]]
        fl, md = every("flexsp", "vs_best_static"), every("megatron-dcp", "vs_best_static")
        fm = every("flexsp", "vs_megatron_dcp")
        slower = sum(x < 1 - 1e-9 for x in fm)
        homog = [(c["policies"]["flexsp"], k) for c in done
                 for k, (h, f) in enumerate(zip(c["policies"]["best-homogeneous"]["step_ms"],
                                                c["policies"]["flexsp"]["step_ms"])) if h < f * (1 - 1e-9)]
        cut = sum(ours["status"][k] in ("time_limit", "fallback") for ours, k in homog)
        netted = sum(_origin(ours["method"][k]).endswith("net") for ours, k in homog)
        lines += ["## Over every step of every cell", "",
                  f"- flexsp vs best-static: median {statistics.median(fl):.2f}x, min {min(fl):.2f}x, "
                  f"max {max(fl):.2f}x ({len(fl)} steps)",
                  f"- megatron-dcp vs best-static: median {statistics.median(md):.2f}x, min {min(md):.2f}x, "
                  f"max {max(md):.2f}x",
                  f"- flexsp vs megatron-dcp: median {statistics.median(fm):.2f}x, min {min(fm):.2f}x, "
                  f"max {max(fm):.2f}x; flexsp slower than megatron-dcp on {slower} of {len(fm)} steps",
                  f"- best-homogeneous faster than flexsp on {len(homog)} of {len(fm)} steps; on {cut} of "
                  f"them the {args.time_limit:g} s box cut flexsp's search short (status time_limit or "
                  "fallback; its baseline phase, where best-homogeneous is a candidate, comes after the "
                  f"first fit); on {netted} flexsp's plan is one of its safety nets", ""]
    return "\n".join(lines)


def _workloads(cells: list[dict]) -> list[str]:
    """The workloads of ``cells``, in WORKLOADS order."""
    return [w for w in WORKLOADS if any(c["workload"] == w for c in cells)]


def plot(cells: list[dict], path: Path, stamp: provenance.Stamp) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    workloads = _workloads(cells)
    fig, axes = plt.subplots(len(workloads), 1, figsize=(13, 3.6 * len(workloads)))
    series = [("flexsp", "tab:blue"), ("megatron-dcp", "tab:green"), ("best-homogeneous", "tab:purple"),
              ("flexsp-official", "tab:orange")]
    for ax, workload in zip(np.atleast_1d(axes), workloads):
        rows = [c for c in cells if c["workload"] == workload and "skipped" not in c]
        x = np.arange(len(rows))
        for k, (name, color) in enumerate(series):
            runs = [c["policies"][name]["vs_best_static"] if name in c["policies"] else [np.nan]
                    for c in rows]
            med = np.array([statistics.median(r) for r in runs])
            err = np.array([med - [min(r) for r in runs], [max(r) for r in runs] - med])
            ax.bar(x + (k - 1.5) * 0.2, med, 0.2, yerr=err, color=color, label=name, capsize=2)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xticks(x)
        short = [c["preset"].replace("-nvlink4-ib8x400", "").replace("-estimate", "*") for c in rows]
        ax.set_xticklabels([f"{name}\nN={c['devices']}" for name, c in zip(short, rows)], fontsize=6,
                           rotation=90)
        ax.set_ylabel("speedup vs best-static\n(predicted)", fontsize=8)
        ax.set_title(f"{workload}: median over steps, bars = min-max (* = ESTIMATE preset)", fontsize=9,
                     loc="left")
        ax.set_ylim(0, ax.get_ylim()[1] * 1.2)          # room for the legend above the bars
        ax.legend(fontsize=7, ncol=4, loc="upper center")
    fig.tight_layout()
    fig.savefig(path, dpi=110, metadata=provenance.png_metadata(stamp))
    plt.close(fig)


def _baselines(args) -> dict[str, str]:
    """Every policy's label -> what ran under it (goes into the stamp)."""
    return {"flexsp": f"`solver.planner.plan_batch`, time box {args.time_limit:g} s per plan",
            "megatron-dcp": "`solver.megatron_dcp` (Megatron-Core DefaultDynamicCPScheduler, reproduced)",
            "best-static": "the fastest `solver.baselines.static_plan` over every power-of-two degree that fits",
            "best-homogeneous": "`solver.baselines.best_homogeneous_plan`",
            "flexsp-official": f"`solver.official` (HiGHS) with paper-gpt7b-192k only: {PAPER_MILP_SECONDS:g} s "
                               f"per MILP (published) on 8 devices, {args.official_64_seconds:g} s per MILP "
                               "(SHORTER) on 64 devices, not run elsewhere"}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help="smoke: stdlib-8k, the H100 estimate preset, 8 devices, 1 step, 0.5 s box")
    ap.add_argument("--time-limit", type=float, default=2.0, help="flexsp time box per plan, s (default 2)")
    ap.add_argument("--official-64-seconds", type=float, default=1.0,
                    help="flexsp-official seconds per MILP on 64 devices (paper-gpt7b-192k); 0 = not run")
    ap.add_argument("--steps", type=int, default=STEPS)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "simulate"))
    ap.add_argument("--render", metavar="JSON",
                    help="only rewrite the .md and .png from a JSON this script wrote (no simulation)")
    args = ap.parse_args()
    stamp = provenance.start()
    if args.render:
        data = json.loads(Path(args.render).read_text())
        saved = argparse.Namespace(**data["args"])
        out = Path(args.render).with_suffix("")
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                              text=True).stdout.strip()
        how = f"benchmarks/simulate_table.py --render {Path(args.render).name} at {head}"
        fields = {k: v for k, v in data["stamp"].items() if k in provenance.Stamp.__dataclass_fields__}
        saved_stamp = provenance.Stamp(**fields)
        out.with_suffix(".md").write_text(markdown(data["cells"], saved, saved_stamp, how) + "\n")
        plot(data["cells"], out.with_suffix(".png"), saved_stamp)
        print(f"rendered {out}.md / .png from {args.render}")
        return 0
    workloads, presets, devices = list(WORKLOADS), PRESETS, DEVICES
    if args.quick:
        workloads, presets, devices = workloads[:1], PRESETS[2:3], DEVICES[:1]
        args.steps, args.time_limit = 1, min(args.time_limit, 0.5)
        args.out += "_quick"
    t0 = time.perf_counter()
    cells = []
    for workload in workloads:
        for preset in presets:
            for n in devices:
                cell = run_cell(workload, preset, n, args)
                cells.append(cell)
                note = cell.get("skipped")
                if note is None:
                    ours, mdcp = (statistics.median(cell["policies"][name]["vs_best_static"])
                                  for name in ("flexsp", "megatron-dcp"))
                    note = (f"B={cell['batch']}, flexsp {ours:.2f}x, mDCP {mdcp:.2f}x vs best-static, "
                            f"{cell['seconds']:.0f} s")
                print(f"[{time.perf_counter() - t0:6.0f} s] {workload} {preset} N={n}: {note}", flush=True)
    stamp = provenance.finish(stamp, cost_models={p: load_preset(p).source for p in presets},
                              baselines=_baselines(args))
    out = Path(args.out)
    data = {"stamp": provenance.to_json(stamp), "args": vars(args), "cells": cells}
    out.with_suffix(".json").write_text(json.dumps(data, indent=1) + "\n")
    out.with_suffix(".md").write_text(markdown(cells, args, stamp) + "\n")
    plot(cells, out.with_suffix(".png"), stamp)
    print(f"wrote {out}.md / .json / .png in {stamp.wall_s:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
