"""Plan timeline: devices on the y axis, time on the x axis, one box per SP group.

Micro-batches run one after another, so each starts where the previous one's slowest group ended;
idle device-time (a group finishing early) shows as white space — exactly what the planner
minimises.
"""

from __future__ import annotations

import textwrap

import numpy as np

from .errors import UserError
from .plan import Plan

PLOT_SUFFIXES = (".png", ".svg", ".pdf")
"""File types ``plot_plan`` writes (matplotlib picks the format from the suffix)."""
MAX_HEIGHT_IN = 14.0
"""Figure height cap, inches: 1,024 devices still give a readable page, not a 125-inch strip."""


def plot_title(plan: Plan, width: int = 110) -> str:
    """Title lines: the plan summary wrapped to ``width`` characters (at most 3 lines), then the
    iteration time and gap."""
    gap = f", gap {plan.gap * 100:.1f}% to lower bound" if plan.lower_bound_ms > 0 else ""
    lines = textwrap.wrap(plan.summary(max_chars=3 * width), width=width, break_on_hyphens=False)
    return "\n".join(
        lines[:3]
        + [
            f"{plan.predicted_ms:.0f} ms predicted{gap} | {plan.num_devices} devices, "
            f"{plan.num_sequences} sequences, status {plan.status}"
        ]
    )


MAX_MB_LABELS = 40
"""Micro-batch labels drawn along the top axis at most (every k-th micro-batch beyond that)."""


def label_micro_batches(ax, starts: list[float]) -> None:
    """Name the micro-batches on a top axis: ``mb i`` centred over each one (every k-th when there
    are more than ``MAX_MB_LABELS``), so a reader can match the timeline to the plan table."""
    count = len(starts) - 1
    if count < 1:
        return
    every = max(1, -(-count // MAX_MB_LABELS))
    shown = list(range(0, count, every))
    top = ax.secondary_xaxis("top")
    top.set_xticks([(starts[i] + starts[i + 1]) / 2 for i in shown])
    top.set_xticklabels([f"mb {i}" for i in shown], fontsize=6, rotation=90 if len(shown) > 12 else 0)
    top.tick_params(length=0)
    top.set_xlabel("micro-batch" + (f" (a label every {every})" if every > 1 else ""), fontsize=7)


def plot_plan(plan: Plan, path: str, title: str | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.collections import PolyCollection

    if not str(path).lower().endswith(PLOT_SUFFIXES):
        raise UserError(f"plot file {path}: unsupported type; use one of {', '.join(PLOT_SUFFIXES)}")
    title = title or plot_title(plan)
    n_title = title.count("\n") + 1
    fig, ax = plt.subplots(figsize=(11, min(MAX_HEIGHT_IN, 0.12 * plan.num_devices + 2.0) + 0.18 * n_title))
    cmap = plt.get_cmap("viridis")
    max_log = max(plan.num_devices.bit_length() - 1, 1)
    x0, y0, w, h, starts, t0 = [], [], [], [], [], 0.0
    label = len(plan.micro_batches) <= 64  # labels only where they can be read
    for mb in plan.micro_batches:
        starts.append(t0)
        for g in mb.groups:
            x0.append(t0), y0.append(g.ranks[0]), w.append(g.predicted_ms), h.append(g.sp)
            if label and g.sp >= max(2, plan.num_devices // 16):
                ax.text(
                    t0 + g.predicted_ms / 2,
                    g.ranks[0] + g.sp / 2,
                    f"SP{g.sp}\n{len(g.seq_ids)} seq",
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="white",
                )
        t0 += mb.predicted_ms
    starts.append(t0)
    x0, y0, w, h = (np.asarray(v, dtype=float) for v in (x0, y0, w, h))
    verts = np.stack(
        [
            np.stack([x0, y0], 1),
            np.stack([x0 + w, y0], 1),
            np.stack([x0 + w, y0 + h], 1),
            np.stack([x0, y0 + h], 1),
        ],
        axis=1,
    )
    colors = cmap(np.log2(np.maximum(h, 1)) / max_log)
    big = len(x0) > 2000
    ax.add_collection(
        PolyCollection(
            verts, facecolors=colors, edgecolors="black", linewidths=0.05 if big else 0.4, rasterized=big
        )
    )
    ax.vlines(starts, 0, plan.num_devices, colors="red", linewidth=0.6 if len(starts) <= 200 else 0.2)
    label_micro_batches(ax, starts)
    ax.set_xlim(0, t0 * 1.01 if t0 > 0 else 1)
    ax.set_ylim(plan.num_devices, 0)
    ax.set_xlabel("time (ms, predicted)")
    ax.set_ylabel("device (rank)")
    ax.set_title(title, fontsize=8, loc="left")
    sm = plt.cm.ScalarMappable(cmap=cmap, norm=plt.Normalize(0, max_log))
    cbar = fig.colorbar(sm, ax=ax, ticks=range(max_log + 1))
    cbar.ax.set_yticklabels([str(1 << k) for k in range(max_log + 1)])
    cbar.set_label("SP degree")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_steps(result: dict, path: str) -> None:
    """``flexsp-simulate``'s plot: predicted time per step, one line per policy (static-D thin and
    grey, the others in colour), the lower bound dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    if not str(path).lower().endswith(PLOT_SUFFIXES):
        raise UserError(f"plot file {path}: unsupported type; use one of {', '.join(PLOT_SUFFIXES)}")
    fig, ax = plt.subplots(figsize=(9, 5))
    steps = range(result["num_steps"])
    for name, p in result["policies"].items():
        ys = [s["predicted_ms"] / 1e3 for s in p["steps"]]
        if name.startswith("static-"):
            ax.plot(steps, ys, color="grey", linewidth=0.6, alpha=0.6)
        else:
            label = f"{name} ({p['label']})" if "label" in p else name
            ax.plot(steps, ys, marker="o", markersize=3, linewidth=1.2, label=label)
    bound = [b / 1e3 for b in result["lower_bound_ms"]["steps"]]
    ax.plot(steps, bound, "k--", linewidth=1, label="lower bound")
    if any(n.startswith("static-") for n in result["policies"]):
        ax.plot([], [], color="grey", linewidth=0.6, label="static-D (each D)")
    ax.set_xlabel("step")
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_ylabel("predicted step time (s)")
    ax.set_ylim(bottom=0)
    ax.set_title(
        f"{result['cost_model']} on {result['num_devices']} devices, {result['global_batch']} "
        f"sequences per step: predicted by the cost model",
        fontsize=9,
        loc="left",
    )
    ax.legend(fontsize=7, loc="best")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
