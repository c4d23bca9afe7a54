"""Write the profiler's outputs: cost model JSON, raw+fit JSON, a markdown summary, a plot."""

from __future__ import annotations

import json
import platform
from pathlib import Path

import numpy as np

from solver.costmodel import CostModel


def _shape(lengths) -> str:
    lens = list(lengths)
    if len(set(lens)) == 1:
        return f"{len(lens)}x{lens[0]}" if len(lens) > 1 else str(lens[0])
    return "+".join(str(x) for x in lens[:6]) + ("..." if len(lens) > 6 else "")


def _table(header, rows) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return out


def _load(x) -> str:
    return "/".join(f"{v:.2f}" for v in x) if x else "?"


def _spread(ts):
    return [min(ts), float(np.median(ts)), max(ts)] if ts else None


def _ms3(x) -> str:
    return "/".join(f"{v:.0f}" for v in x) if x else "-"


def error_stats(rows, kind: str) -> tuple[float, float, int]:
    errs = [abs(r["predicted_ms"] - r["measured_ms"]) / r["measured_ms"] for r in rows if r["kind"] == kind]
    if not errs:
        return float("nan"), float("nan"), 0
    return float(np.median(errs)), float(np.max(errs)), len(errs)


def summary_lines(raw: dict, cmd: str = "") -> list[str]:
    cm = CostModel.from_dict(raw["cost_model"])
    fit = raw["fit"]
    c = fit["compute"]
    lines = [f"# flexsp-profile: {cm.name}", ""]
    if cmd:
        lines += [f"Command: `{cmd}`", ""]
    se = c.get("stderr") or {}

    def pm(key, fmt):
        return f"{c.get(key, 0.0):{fmt}}" + (f" +- {se[key]:{fmt}}" if key in se else "")

    loads = raw.get("loadavg_per_pass") or []
    one_min = [x[0] for x in loads]
    lines += [
        f"Machine: {platform.node() or '?'} {platform.machine()}, {raw['device']} ({raw['backend']}), "
        f"{raw['world_size']} rank(s), {raw['threads_per_rank']} thread(s)/rank; model {raw['model']} "
        f"{raw['model_config']} ({raw['num_params'] / 1e6:.2f}M params). Date: {raw.get('date', '?')}. "
        f"CPUs: {raw.get('cpu_count')}.",
        "",
        f"Load average (1/5/15 min): start {_load(raw.get('loadavg_start'))}, end "
        f"{_load(raw.get('loadavg_end'))}"
        + (f"; 1-min load after each timed pass {min(one_min):.2f}-{max(one_min):.2f}" if one_min else "")
        + " (other work on the machine inflates timings).",
        "",
        f"Statistic: {raw.get('statistic', 'fastest of N runs')}.",
        "",
        "## Compute fit (degree 1, every rank busy)",
        "",
        "time = a1 * sum L^2 + a2 * sum L + per_sequence_ms * docs + b (NNLS on relative error; "
        "+- is the jackknife standard error, refitting without each shape):",
        "",
        f"- a1 = {pm('a1', '.4e')} ms/token^2",
        f"- a2 = {pm('a2', '.4e')} ms/token",
        f"- per_sequence_ms = {pm('per_seq', '.4f')} ms per document (not divided by the degree)",
        f"- b = {pm('b', '.3f')} ms per micro-batch",
        f"- step_overhead_ms = {fit.get('step_overhead_ms', raw.get('optimizer_ms', 0.0)):.2f} ms per step "
        f"(timed optimizer step; min/median/max over the passes {_ms3(fit.get('step_overhead_spread_ms'))})",
        "",
        f"Relative fit error over the {len(raw['compute'])} fit shapes: median "
        f"{c['median_abs_rel_err']:.1%}, "
        f"max {c['max_abs_rel_err']:.1%}.",
        "",
    ]
    full = raw["model_config"]["layers"]
    depths = raw.get("profile_depths", [full])
    rows = []
    for r, e in zip(raw["compute"], c["rel_errors"]):
        L, ms = r[0], r[1]
        rows.append(
            (
                _shape(L),
                r[2] if len(r) > 2 else full,
                len(L),
                sum(L),
                f"{ms:.1f}",
                f"{ms * (1 + e):.1f}",
                f"{e:+.1%}",
            )
        )
    lines += _table(
        ["shape", "layers", "docs", "tokens", "measured ms", "fitted ms (at its depth)", "error"], rows
    )
    mc = raw["model_config"]
    lines += [
        "",
        "## Model shape and depth scaling",
        "",
        f"Written for the full model: layers={full}, hidden={mc['hidden']}, heads={mc['heads']}, "
        f"kv_heads={mc['kv_heads']}, activation_checkpointing={mc.get('activation_checkpointing', False)}, "
        f"precision {mc.get('precision', mc['dtype'])}; longest profiled document {raw.get('max_len', '?')} "
        "tokens.",
        "",
    ]
    if len(depths) > 1:
        pl, fx = fit.get("per_layer", {}), fit.get("fixed", {})
        lines += [
            f"Timed on {depths[0]}- and {depths[1]}-layer builds (sharded like training): time = layers x "
            "per-layer part + fixed part (embedding, head, loss), fitted jointly; the coefficients above "
            f"are at {full} layers. Per layer: a1 = {pl.get('a1', 0):.4e}, a2 = {pl.get('a2', 0):.4e}, "
            f"per_sequence_ms = {pl.get('per_seq', 0):.4f}, b = {pl.get('b', 0):.3f}; fixed: "
            f"a2 = {fx.get('a2', 0):.4e}, per_sequence_ms = {fx.get('per_seq', 0):.4f}, b = "
            f"{fx.get('b', 0):.3f}. "
            "SP communication is per layer (x layers). Optimizer step: "
            f"{fit.get('step_overhead_how', 'timed')}.",
            "",
        ]
    else:
        lines += [f"Timed on the full {full}-layer model (no depth scaling).", ""]
    if fit["comm"]:
        lines += ["", "## Communication (effective, from timed SP micro-batches)", ""]
        rows = [
            (
                k.split(":")[0],
                k.split(":")[1],
                f"{v['ms_per_token'] * 1e3:.3f}"
                + (f" +- {v['stderr'] * 1e3:.3f}" if v.get("stderr") is not None else ""),
                f"{v.get('latency_ms', 0.0):.2f}"
                + (f" +- {v['latency_stderr']:.2f}" if v.get("latency_stderr") is not None else ""),
                (
                    f"{v['per_sequence_comm_ms']:.3f} +- {v['per_sequence_comm_stderr']:.3f}"
                    if v.get("per_sequence_comm_ms") is not None
                    else "not fitted"
                ),
                f"{v['effective_gbps']:.3g}",
                f"{np.median(np.abs(v['rel_errors'])):.1%}",
                f"{v['max_abs_rel_err']:.1%}",
            )
            for k, v in fit["comm"].items()
        ]
        lines += [
            "time(group of degree d, mode m) = (a1 * sum L^2 + a2 * sum L) / d + (per_sequence_ms + "
            "per_doc(m, d)) * docs + b + c(m, d) * sum L + latency(m, d); c, latency and per_doc fitted "
            "jointly with the compute terms (+- jackknife s.e.).",
            "",
        ]
        lines += _table(
            [
                "mode",
                "degree",
                "c: us per token",
                "latency ms per group",
                "extra ms per document",
                "effective GB/s",
                "median rel err",
                "max rel err",
            ],
            rows,
        )

        def _fmt(tab):
            return ", ".join(f"{k}: {v:.3f}" for k, v in tab.items()) if tab else "{} (not fitted)"

        lines += [
            "",
            "Written to the CostModel, keyed mode:degree (each group priced with the mode it runs): "
            f"group_latency_ms {{{_fmt(fit.get('group_latency_ms') or {})}}} ms per group; "
            f"per_sequence_comm_ms {{{_fmt(fit.get('per_sequence_comm_ms') or {})}}} ms per document "
            "(hybrid at a degree equal to its Ulysses width = Ulysses).",
            "",
        ]
    if fit["links"]:
        lines += ["", "## Link micro-benchmarks (all groups of a degree at once)", ""]
        rows = [
            (k.split(":")[0], k.split(":")[1], f"{v['latency_ms']:.3f}", f"{v['gbps']:.3g}")
            for k, v in fit["links"].items()
        ]
        lines += _table(["kind", "degree", "latency ms", "GB/s"], rows)
    act = raw["activation"]
    split = (
        f" = {act['fixed_bytes_per_token'] / 2**10:.2f} KiB fixed + layers x "
        f"{act['per_layer_bytes_per_token'] / 2**10:.3f} KiB per layer; at the full depth "
        f"{cm.act_mb_per_token * 2**10:.2f} KiB"
        if "per_layer_bytes_per_token" in act
        else ""
    )
    lines += [
        "",
        f"Activation memory: {act['bytes_per_token'] / 2**10:.2f} KiB per token at {act.get('depth', full)} "
        f"layers{split} ({act['method']}). Capacity: {cm.capacity_tokens} tokens per device "
        f"({'emulated budget (capacity_tokens)' if cm.capacity_override else f'{cm.memory_mb:.0f} MB'}).",
        "",
    ]
    val = raw.get("validation") or []
    if val:
        lines += [
            "## Validation on held-out long-tailed batches",
            "",
            "Plans from a provisional fit of the warm-up pass; predictions re-priced with the final cost "
            f"model at the timed depth ({raw.get('validation_depth', full)} layers; steps include "
            "step_overhead_ms); measured: fastest of the interleaved runs.",
            "",
        ]
        for kind in ("micro-batch", "step"):
            med, mx, n = error_stats(val, kind)
            lines.append(f"- {kind}: median |error| {med:.1%}, max {mx:.1%} over {n}")
        lines.append("")
        rows = [
            (
                r["batch"],
                r["method"],
                r["kind"],
                r["groups"],
                r.get("docs", ""),
                f"{r['predicted_ms']:.1f}",
                f"{r['measured_ms']:.1f}",
                _ms3(_spread(r.get("all_ms"))),
                f"{(r['predicted_ms'] - r['measured_ms']) / r['measured_ms']:+.1%}",
            )
            for r in val
        ]
        lines += _table(
            [
                "batch",
                "plan",
                "kind",
                "groups",
                "docs",
                "predicted ms",
                "measured ms (min)",
                "runs min/med/max",
                "error",
            ],
            rows,
        )
    lines += ["", f"Source: {cm.source}", ""]
    return lines


def plot(raw: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fit = raw["fit"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    ax = axes[0]
    c = fit["compute"]
    for label, rows, errs, marker in [("degree 1", raw["compute"], c["rel_errors"], "o")] + [
        (k, raw["comm"][k], v["rel_errors"], "s") for k, v in fit["comm"].items()
    ]:
        x = [sum(r[0]) for r in rows]
        y = [r[1] for r in rows]
        p = ax.scatter(x, y, marker=marker, label=f"{label} measured")
        ax.scatter(x, [m * (1 + e) for m, e in zip(y, errs)], marker="x", color=p.get_facecolor()[0])
    ax.set_xlabel("tokens in the micro-batch")
    ax.set_ylabel("ms (o/s measured, x fitted)")
    ax.set_title("micro-batch time: measured vs fitted")
    ax.legend(fontsize=7)
    ax = axes[1]
    val = raw.get("validation") or []
    for kind, m in (("micro-batch", "o"), ("step", "s")):
        pts = [(r["measured_ms"], r["predicted_ms"]) for r in val if r["kind"] == kind]
        if pts:
            ax.scatter(*zip(*pts), marker=m, label=kind)
    if val:
        hi = max(max(r["measured_ms"], r["predicted_ms"]) for r in val) * 1.05
        ax.plot([0, hi], [0, hi], "k--", lw=0.8)
        ax.plot([0, hi], [0, 1.1 * hi], ":", color="grey", lw=0.8)
        ax.plot([0, hi], [0, 0.9 * hi], ":", color="grey", lw=0.8)
        ax.legend()
    ax.set_xlabel("measured ms")
    ax.set_ylabel("predicted ms")
    ax.set_title("held-out validation (dotted: +-10%)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_outputs(raw: dict, out_dir: Path, name: str, make_plot: bool = True, cmd: str = "") -> dict:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {
        "cost_model": out_dir / f"{name}.json",
        "report": out_dir / f"{name}.report.json",
        "summary": out_dir / f"{name}.md",
    }
    CostModel.from_dict(raw["cost_model"]).save(paths["cost_model"])
    paths["report"].write_text(json.dumps(raw, indent=1, default=float) + "\n")
    lines = summary_lines(raw, cmd)
    paths["summary"].write_text("\n".join(lines))
    if make_plot:
        try:
            plot(raw, out_dir / f"{name}.png")
            paths["plot"] = out_dir / f"{name}.png"
        except ImportError as exc:  # matplotlib missing: the tables still hold everything
            print(f"[flexsp-profile] no plot: {exc}", flush=True)
    return paths
