"""flexsp-bench's outputs: the summary of a run's rows, ``STEM.json``, ``STEM.md`` and ``STEM.png``.

Definitions (every number below is computed here from the rows of one run):

- a row is one (batch, method): its ``bench.repeats`` step times, their median, min, max and
  quartiles, and ``predicted_ms`` (solver.build.price_plan of the plan it ran);
- a method's total = the sum over the batches it ran of the per-batch medians (spread: the sums of
  the per-batch minima and maxima); its tokens/s = tokens of those batches / total;
- ``best static``, per batch, is the static degree with the smallest measured median among those
  that hold the batch (the fastest single degree per batch, as flexsp-simulate's best-static);
- ``best baseline``, per batch, is the faster (measured median) of best static and best-homogeneous;
- FlexSP's speedup over X = X's total / FlexSP's total over the same batches (measured); the
  predicted speedup uses the predicted times (best static / best baseline chosen by prediction);
  a load-robust cross-check uses the fastest repetition of each (batch, method) instead of the
  median (other jobs on a shared machine only ever add time);
- deepspeed-ulysses, when present, ran in a world of its own: it is listed but is not part of
  best baseline (not timed side by side with the others).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from flexsp.errors import UserError


def _by_batch(rows) -> dict:
    out: dict = {}
    for r in rows:
        out.setdefault(r["batch"], {})[r["method"]] = r
    return out


STATS = ("median", "predicted", "min")
"""Per (batch, method): the measured median, the prediction, the fastest repetition."""


def _ratios(base: dict, fx: dict) -> dict:
    """FlexSP's speedups over ``base`` (totals in ms): measured (medians), predicted, fastest runs."""
    return {
        "measured": base["median_ms"] / fx["median_ms"],
        "predicted": base["predicted_ms"] / fx["predicted_ms"],
        "fastest": base["min_ms"] / fx["min_ms"],
    }


def _best_of(cands: dict) -> dict:
    """The candidate rows' best by measured median (``method``), by prediction and by fastest run."""
    out = {}
    for stat, label in zip(STATS, ("method", "predicted_method", "fastest_method")):
        best = min(cands, key=lambda m: cands[m][f"{stat}_ms"])
        out[label], out[f"{stat}_ms"] = best, cands[best][f"{stat}_ms"]
    return out


def summarize(res: dict) -> dict:
    """Per-method totals, best static / best baseline per batch, speedups and prediction errors."""
    rows = res["rows"]
    batches = _by_batch(rows)
    methods = list(dict.fromkeys(r["method"] for r in rows))
    per_method = {}
    for m in methods:
        mine = [r for r in rows if r["method"] == m]
        total = sum(r["median_ms"] for r in mine)
        pred = sum(r["predicted_ms"] for r in mine)
        tokens = sum(r["tokens"] for r in mine)
        per_method[m] = {
            "batches": len(mine),
            "tokens": tokens,
            "median_ms": total,
            "min_ms": sum(r["min_ms"] for r in mine),
            "max_ms": sum(r["max_ms"] for r in mine),
            "predicted_ms": pred,
            "tokens_per_s": tokens / total * 1e3,
            "error": (pred - total) / total,
            "flops": sum(r["flops"] for r in mine),
        }
    picks = []
    for k in sorted(batches):
        got, pick = batches[k], {"batch": k}
        for name, extra in (("best_static", ()), ("best_baseline", ("best-homogeneous",))):
            cands = {m: r for m, r in got.items() if m.startswith("static-") or m in extra}
            if cands:
                pick[name] = _best_of(cands)
        picks.append(pick)
    speedups = {}
    if "flexsp" in per_method:
        fx = per_method["flexsp"]
        for name in ("best_static", "best_baseline"):
            if all(name in p for p in picks):
                totals = {f"{stat}_ms": sum(p[name][f"{stat}_ms"] for p in picks) for stat in STATS}
                speedups[name] = _ratios(totals, fx)
        for m, s in per_method.items():
            if m != "flexsp" and s["batches"] == fx["batches"]:
                speedups[m] = _ratios(s, fx)
    errors = np.array([abs(r["predicted_ms"] - r["median_ms"]) / r["median_ms"] for r in rows])
    under = int(sum(r["predicted_ms"] < r["median_ms"] for r in rows))
    out = {
        "methods": per_method,
        "per_batch": picks,
        "speedups": speedups,
        "prediction_error": {
            "rows": len(rows),
            "median_abs": float(np.median(errors)),
            "max_abs": float(errors.max()),
            "under_predicted": under,
        },
    }
    peak = res.get("matmul_peak_flops")
    if peak:
        for m, s in per_method.items():
            s["mfu"] = s["flops"] / (s["median_ms"] / 1e3) / (peak * res["world_size"])
    return out


def merge_deepspeed(stem: Path, ds: dict) -> dict:
    """The main world's STEM.json with the rows of DeepSpeed's world added (same batches required)."""
    path = Path(f"{stem}.json")
    if not path.is_file():
        raise UserError(
            f"bench.world=deepspeed adds its rows to {path}, which does not exist: run the main "
            f"world first (the same command with bench.world=main)"
        )
    main = json.loads(path.read_text())
    if main.get("batches") != ds["batches"] or main.get("world_size") != ds["world_size"]:
        raise UserError(
            f"{path} holds other batches or another world size than this run "
            f"({main.get('world_size')} vs {ds['world_size']} ranks): rerun the main world with "
            f"the same overrides"
        )
    main["rows"] = [r for r in main["rows"] if r["method"] != "deepspeed-ulysses"] + ds["rows"]
    keep = ("command", "date", "seconds", "loadavg_start", "loadavg_end", "commit", "dirty", "first_loss")
    main["deepspeed_world"] = {k: ds[k] for k in keep}
    return main


def _fmt_speed(speedups: dict, key: str) -> str:
    s = speedups.get(key)
    return "n/a" if s is None else f"{s['measured']:.3f}x"


def markdown(res: dict, summary: dict) -> str:
    """The report: stamps, setting, methods as run, summary table, speedups, every row."""
    m, cm, data, b = res["machine"], res["cost_model"], res["data"], res["bench"]
    loads = [r["loadavg"][0] for r in res["rows"]]
    changed = res.get("dirty")
    dirty = f" (with uncommitted changes to {', '.join(changed[:8])})" if changed else ""
    batches = res["batches"]
    lines = [
        f"# flexsp-bench: FlexSP adaptive vs static SP, measured ({res['world_size']} ranks, "
        f"{m['device']}/{m['backend']})",
        "",
        f"Commit `{res['commit']}`{dirty}; date {res['date']}.",
        "",
        f"Command: `{res['command']}`",
        "",
        f"Machine: {m['host']}, {m['os']}; {m['cpu']}, {m['cpu_count']} CPUs; "
        f"device {m['device_name']}; "
        f"{m['world_size']} ranks x {m['threads_per_rank']} thread(s), backend {m['backend']}; "
        f"Python {m['python']}, torch {m['torch']}.",
        "",
        f"**Load** (1-min load average): {res['loadavg_start'][0]:.2f} at start, {min(loads):.2f}-"
        f"{max(loads):.2f} after each batch, {res['loadavg_end'][0]:.2f} at the end, on "
        f"{m['cpu_count']} CPUs. Other jobs on the machine add time to every method and scatter the "
        f"timings; the methods are interleaved so that load drift hits them alike.",
        "",
    ]
    if b.get("note"):
        lines += [b["note"], ""]
    mod = res["model"]
    lines += [
        f"Setting: model {mod['preset']} ({mod['params'] / 1e6:.2f}M parameters, {mod['layers']} layers, "
        f"hidden {mod['hidden']}, activation checkpointing {mod['activation_checkpointing']}), precision "
        f"{mod['precision']}, engine {mod['engine']}; data {data['source']}"
        + (f" ({data['distribution']})" if data.get("distribution") else "")
        + f", documents of at most {data['max_doc_tokens']} tokens, global batches of at most "
        f"{data['global_batch']} documents / {data['global_batch_tokens']} tokens; the first "
        f"{len(batches)} batches the sampler deals: "
        + "; ".join(
            f"batch {x['index']}: {len(x['lengths'])} docs, {sum(x['lengths'])} tokens, longest "
            f"{max(x['lengths'])}"
            for x in batches
        )
        + ".",
        "",
        f"Cost model `{cm['spec']}` ({cm['name']}): {cm['source']}. Memory budget C = "
        f"{cm['capacity_tokens']} tokens per rank"
        + (" (emulated: bench.capacity_tokens)" if cm["capacity_emulated"] else "")
        + ".",
        "",
        f"Each (batch, method): {b['warmup']} untimed warm-up step(s), then {b['repeats']} timed steps, "
        f"methods interleaved (order reversed every other repetition). A step = StepExecutor.run (every "
        f"micro-batch) + engine.step() + the step's host sync, fenced by barriers (as flexsp-train "
        f"trains). Times are **measured** medians; spread = min-max; predicted = solver.build.price_plan "
        f"of the plan the method ran under the cost model above.",
        "",
        "Methods, exactly as run:",
        f"- `flexsp`: parallel.mode=adaptive: flexsp.planning.solve_plan (the FlexSP planner), time limit "
        f"{res['solver']['time_limit']} s per batch, MILP backend {res['solver']['milp_backend']};",
        "- `static-d`: parallel.mode=static parallel.static_degree=d: solver.baselines.static_plan "
        "(best-fit-decreasing into bins of 0.9 x C x d tokens, each group in the cost model's best attention "
        "mode for d), for every degree d that holds the batch's longest document;",
        "- `best-homogeneous`: solver.baselines.best_homogeneous_plan (the best single degree per batch, "
        "time-balanced packing);",
        "- `best static` (derived): per batch, the static degree with the smallest measured median; "
        "`best baseline` (derived): per batch, the faster of best static and best-homogeneous.",
    ]
    ds = res.get("deepspeed_world")
    if ds:
        lines.append(
            "- `deepspeed-ulysses`: the static plan at the largest Ulysses degree, attention "
            "through DeepSpeed's DistributedAttention, in a second world launched after the main "
            "one (not side by side with the others: not part of best baseline). Its first step's "
            f"loss {ds['first_loss']:.6f} vs the main world's {res['first_loss']:.6f} (same seeded "
            "weights, same batch: equal up to float rounding)."
        )
    lines += ["", *_summary_lines(res, summary), "", *_row_lines(res)]
    return "\n".join(lines) + "\n"


def _summary_lines(res: dict, summary: dict) -> list[str]:
    sp, per, err = summary["speedups"], summary["methods"], summary["prediction_error"]
    nb = len(res["batches"])
    mfu = bool(res.get("matmul_peak_flops"))
    head = (
        "| method | batches | tokens/s (measured) | step ms, sum of medians [min-max] | predicted ms | "
        "pred. error | FlexSP speedup over it: medians / fastest runs / predicted |"
        + (" MFU |" if mfu else "")
    )
    lines = ["## Summary", "", head, "|---" * (7 + mfu) + "|"]
    for m, s in per.items():
        ratio = sp.get(m)
        ratio_s = "-" if m == "flexsp" else ("n/a (not every batch)" if ratio is None else _ratio_cell(ratio))
        lines.append(
            f"| {m} | {s['batches']}/{nb} | {s['tokens_per_s']:.0f} | {s['median_ms']:.0f} "
            f"[{s['min_ms']:.0f}-{s['max_ms']:.0f}] | {s['predicted_ms']:.0f} | {s['error']:+.1%} | "
            f"{ratio_s} |" + (f" {s['mfu']:.1%} |" if mfu else "")
        )
    for name, label in (("best_static", "best static"), ("best_baseline", "best baseline")):
        picks = [p[name] for p in summary["per_batch"] if name in p]
        if len(picks) == nb:
            total = sum(p["median_ms"] for p in picks)
            ratio = sp.get(name)
            ratio_s = "n/a" if ratio is None else _ratio_cell(ratio)
            tokens = sum(sum(x["lengths"]) for x in res["batches"])
            lines.append(
                f"| {label} ({', '.join(p['method'] for p in picks)}) | {nb}/{nb} | "
                f"{tokens / total * 1e3:.0f} | {total:.0f} | "
                f"{sum(p['predicted_ms'] for p in picks):.0f} | | {ratio_s} |" + (" |" if mfu else "")
            )
    lines.append("")
    if "flexsp" in per:
        lines.append(
            f"**FlexSP speedup, measured: {_fmt_speed(sp, 'best_static')} over best static, "
            f"{_fmt_speed(sp, 'best-homogeneous')} over best-homogeneous, "
            f"{_fmt_speed(sp, 'best_baseline')} over the best baseline** (predicted: "
            + ", ".join(
                f"{sp[k]['predicted']:.3f}x" if k in sp else "n/a"
                for k in ("best_static", "best-homogeneous", "best_baseline")
            )
            + ")."
        )
        lines += [
            "",
            "Load-robust cross-check (other jobs only ever add time, so the fastest of the "
            f"{res['bench']['repeats']} repetitions is the least disturbed): from the fastest runs, "
            "FlexSP "
            + ", ".join(
                f"{sp[k]['fastest']:.3f}x over {label}"
                for k, label in (
                    ("best_static", "best static"),
                    ("best-homogeneous", "best-homogeneous"),
                    ("best_baseline", "the best baseline"),
                )
                if k in sp
            )
            + ".",
        ]
        lines.append("")
    lines.append(
        f"Predicted vs measured step time over all {err['rows']} (batch, method) rows: median "
        f"|error| {err['median_abs']:.1%}, max {err['max_abs']:.1%}; {err['under_predicted']} of "
        f"{err['rows']} under-predicted."
    )
    if mfu:
        lines += [
            "",
            f"MFU = model FLOPs per second / (measured bf16 matmul peak "
            f"{res['matmul_peak_flops'] / 1e12:.0f} TFLOP/s per device x {res['world_size']} "
            f"devices); {res['flops_convention']}.",
        ]
    return lines


def _ratio_cell(ratio: dict) -> str:
    return f"{ratio['measured']:.3f}x / {ratio['fastest']:.3f}x / {ratio['predicted']:.3f}x"


def _row_lines(res: dict) -> list[str]:
    lines = [
        "## Every (batch, method)",
        "",
        "| batch | method | plan | predicted ms | median ms | min-max | IQR | error | loss, first -> last |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(res["rows"], key=lambda r: r["batch"]):
        plan = r["plan"].replace("|", "\\|")  # a plan summary separates micro-batches with |
        lines.append(
            f"| {r['batch']} | {r['method']} | {plan} | {r['predicted_ms']:.0f} | "
            f"{r['median_ms']:.0f} | {r['min_ms']:.0f}-{r['max_ms']:.0f} | {r['q1_ms']:.0f}-"
            f"{r['q3_ms']:.0f} | {(r['predicted_ms'] - r['median_ms']) / r['median_ms']:+.1%} | "
            f"{r['losses'][0]:.3f} -> {r['losses'][-1]:.3f} |"
        )
    return lines


def plot(res: dict, summary: dict, path: Path) -> None:
    """Per-batch median step time per method (min-max whiskers) and predicted vs measured."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = res["rows"]
    batches = sorted({r["batch"] for r in rows})
    methods = list(summary["methods"])
    by = {(r["batch"], r["method"]): r for r in rows}
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.4))
    w = 0.8 / max(len(methods), 1)
    for j, m in enumerate(methods):
        xs = [i + j * w for i, k in enumerate(batches) if (k, m) in by]
        got = [by[k, m] for k in batches if (k, m) in by]
        med = np.array([r["median_ms"] for r in got])
        err = np.array(
            [[r["median_ms"] - r["min_ms"] for r in got], [r["max_ms"] - r["median_ms"] for r in got]]
        )
        axes[0].bar(xs, med, w, yerr=err, capsize=2, label=m)
    axes[0].set_xticks(np.arange(len(batches)) + 0.4 - w / 2, [f"batch {k}" for k in batches])
    axes[0].set_ylabel("step time, ms (measured median, min-max)")
    axes[0].legend(fontsize=7)
    axes[0].set_title(
        f"{res['world_size']} ranks, {res['machine']['device']} ({res['machine']['backend']}), "
        f"commit {res['commit'][:10]}",
        fontsize=9,
    )
    ax = axes[1]
    for m in methods:
        pts = [(r["median_ms"], r["predicted_ms"]) for r in rows if r["method"] == m]
        ax.scatter(*zip(*pts), label=m, s=16)
    hi = max(max(r["median_ms"], r["predicted_ms"]) for r in rows) * 1.05
    ax.plot([0, hi], [0, hi], "k--", lw=0.8)
    ax.set_xlabel("measured step ms (median)")
    ax.set_ylabel("predicted step ms (cost model)")
    ax.set_title(f"predicted vs measured; cost model {res['cost_model']['name']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _dumps(res: dict) -> str:
    """JSON of the run, one line per row and per batch (a diff-able file of modest size)."""
    lists = ("batches", "rows")
    head = json.dumps({k: v for k, v in res.items() if k not in lists}, indent=1)
    tail = [
        f' "{k}": [\n' + ",\n".join("  " + json.dumps(x) for x in res[k]) + "\n ]" for k in lists if k in res
    ]
    return head[:-2] + ",\n" + ",\n".join(tail) + "\n}\n"


def write_outputs(res: dict, stem: Path) -> list[Path]:
    """STEM.json (the run and its summary), STEM.md, STEM.png."""
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    res = {**res, "summary": summarize(res)}
    paths = [Path(f"{stem}.json"), Path(f"{stem}.md"), Path(f"{stem}.png")]
    paths[0].write_text(_dumps(res))
    paths[1].write_text(markdown(res, res["summary"]))
    plot(res, res["summary"], paths[2])
    return paths
