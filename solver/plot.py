"""Plan timeline: devices on the y axis, time on the x axis, one box per SP group.

Micro-batches run one after another, so each starts where the previous one's slowest group ended;
idle device-time (a group finishing early) shows as white space — exactly what the planner
minimises.
"""
from __future__ import annotations

from .plan import Plan


def plot_plan(plan: Plan, path: str, title: str | None = None) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    fig, ax = plt.subplots(figsize=(11, 0.12 * plan.num_devices + 2.5))
    cmap = plt.get_cmap("viridis")
    max_log = max(plan.num_devices.bit_length() - 1, 1)
    t0 = 0.0
    for mi, mb in enumerate(plan.micro_batches):
        for g in mb.groups:
            color = cmap((g.sp.bit_length() - 1) / max_log)
            ax.add_patch(Rectangle((t0, g.ranks[0]), g.predicted_ms, g.sp, facecolor=color,
                                   edgecolor="black", linewidth=0.4))
            if g.sp >= max(2, plan.num_devices // 16):
                ax.text(t0 + g.predicted_ms / 2, g.ranks[0] + g.sp / 2, f"SP{g.sp}\n{len(g.seq_ids)} seq",
                        ha="center", va="center", fontsize=7, color="white")
        ax.axvline(t0, color="red", linewidth=0.6)
        t0 += mb.predicted_ms
    ax.axvline(t0, color="red", linewidth=0.6)
    ax.set_xlim(0, t0 * 1.01 if t0 > 0 else 1)
    ax.set_ylim(plan.num_devices, 0)
    ax.set_xlabel("time (ms, predicted)")
    ax.set_ylabel("device (rank)")
    gap = f", gap {plan.gap * 100:.1f}% to lower bound" if plan.lower_bound_ms > 0 else ""
    ax.set_title(title or f"{plan.summary()[:90]}\n{plan.predicted_ms:.0f} ms{gap}", fontsize=9)
    sm = plt.cm.ScalarMappable(cmap=cmap, norm=plt.Normalize(0, max_log))
    cbar = fig.colorbar(sm, ax=ax, ticks=range(max_log + 1))
    cbar.ax.set_yticklabels([str(1 << k) for k in range(max_log + 1)])
    cbar.set_label("SP degree")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
