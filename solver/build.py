"""Turning an assignment (which sequences run in a group of which degree) into a priced Plan,
and checking any Plan against lengths and a cost model. Every planner and baseline builds its
plans here, so they are laid out and priced identically.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np

from .costmodel import CostModel
from .plan import GroupPlan, MicroBatchPlan, Plan

# One micro-batch as the planners produce it: (degree, sequence ids) per group.
Assignment = Sequence[tuple[int, Sequence[int]]]


def layout_ranks(degrees: Sequence[int], num_devices: int) -> list[int]:
    """First rank of each group: biggest groups first, so every block stays aligned.

    Powers of two placed in decreasing order never straddle an alignment boundary, so any multiset
    of degrees that sums to <= num_devices gets aligned blocks [k*d, (k+1)*d).
    """
    order = sorted(range(len(degrees)), key=lambda i: -degrees[i])
    starts, cursor = [0] * len(degrees), 0
    for i in order:
        assert cursor % degrees[i] == 0, "decreasing powers of two stay aligned"
        starts[i] = cursor
        cursor += degrees[i]
    if cursor > num_devices:
        raise ValueError(f"groups need {cursor} devices, the cluster has {num_devices}")
    return starts


class _Pricer:
    """Group times from per-(degree, mode) arrays of every sequence's time, computed once: pricing
    a plan is then O(sequences) in NumPy, not a Python loop over sequences."""

    def __init__(self, lengths: Sequence[int], cm: CostModel):
        self.cm = cm
        self.lengths = np.asarray(lengths, dtype=np.int64)
        self.L = self.lengths.astype(np.float64)
        self.cache: dict = {}

    def group_ms(self, ids, sp: int, mode: str | None) -> float:
        key = (sp, mode)
        if key not in self.cache:
            self.cache[key] = self.cm.seq_time_ms(self.L, sp, mode)
        if not len(ids):
            return 0.0
        return float(self.cache[key][np.asarray(ids, dtype=np.int64)].sum()) + self.cm.group_overhead_ms(
            sp, mode
        )


def build_plan(
    micro_batches: Sequence[Assignment],
    lengths: Sequence[int],
    cm: CostModel,
    *,
    method: str,
    solve_seconds: float = 0.0,
    lower_bound_ms: float = 0.0,
    status: str = "feasible",
    extra: dict | None = None,
    attention: str | None = None,
) -> Plan:
    """Lay out ranks, pick each group's attention mode (``attention`` forces one for every group
    of degree > 1, e.g. a static Ulysses baseline), price everything; drops empty groups.
    Vectorised: one NumPy reduction per (degree, mode) prices every group of the plan."""
    pricer = _Pricer(lengths, cm)
    modes: dict[int, str] = {}
    laid = []  # per micro-batch: [(sp, start, sorted ids, mode)]
    for assignment in micro_batches:
        groups = [
            (int(sp), sorted(ids.tolist() if isinstance(ids, np.ndarray) else map(int, ids)))
            for sp, ids in assignment
            if len(ids)
        ]
        if not groups:
            continue
        starts = layout_ranks([sp for sp, _ in groups], cm.num_devices)
        row = []
        for (sp, ids), start in sorted(zip(groups, starts), key=lambda t: t[1]):
            if sp not in modes:
                mode = cm.best_mode(sp) if sp == 1 or attention is None else attention
                if mode not in cm.attention_modes(sp):
                    raise ValueError(
                        f"attention={mode!r} cannot run SP degree {sp}; valid: {cm.attention_modes(sp)}"
                    )
                modes[sp] = mode
            row.append((sp, start, ids, modes[sp]))
        laid.append(row)
    # price every group: per (sp, mode), one reduceat over the concatenated ids
    flat = [g for row in laid for g in row]
    times = np.zeros(len(flat))
    tokens = np.zeros(len(flat), dtype=np.int64)
    by_key: dict = {}
    for n, (sp, _, ids, mode) in enumerate(flat):
        by_key.setdefault((sp, mode), []).append(n)
    for (sp, mode), members in by_key.items():
        if (sp, mode) not in pricer.cache:
            pricer.cache[sp, mode] = cm.seq_time_ms(pricer.L, sp, mode)
        sizes = [len(flat[n][2]) for n in members]
        cat = np.fromiter(
            itertools.chain.from_iterable(flat[n][2] for n in members), dtype=np.int64, count=sum(sizes)
        )
        offsets = np.cumsum([0] + sizes[:-1])
        times[members] = np.add.reduceat(pricer.cache[sp, mode][cat], offsets) + cm.group_overhead_ms(
            sp, mode
        )
        tokens[members] = np.add.reduceat(pricer.lengths[cat], offsets)
    sps = np.array([g[0] for g in flat], dtype=np.float64)
    memory = np.round(cm.model_states_mb + cm.act_mb_per_token * tokens / np.maximum(sps, 1), 2).tolist()
    times_l, tokens_l = times.tolist(), tokens.tolist()
    mbs, n = [], 0
    for row in laid:
        built = []
        for sp, start, ids, mode in row:
            built.append(
                GroupPlan(
                    sp=sp,
                    ranks=tuple(range(start, start + sp)),
                    seq_ids=tuple(ids),
                    attention=mode,
                    tokens=tokens_l[n],
                    predicted_ms=times_l[n],
                    memory_mb=memory[n],
                )
            )
            n += 1
        mbs.append(MicroBatchPlan(groups=tuple(built), predicted_ms=max(g.predicted_ms for g in built)))
    return Plan(
        num_devices=cm.num_devices,
        micro_batches=tuple(mbs),
        predicted_ms=sum(mb.predicted_ms for mb in mbs) + cm.step_fixed_ms,
        solve_seconds=round(solve_seconds, 4),
        lower_bound_ms=lower_bound_ms,
        method=method,
        status=status,
        cost_model=cm.name,
        num_sequences=len(lengths),
        extra=dict(extra or {}),
    )


def price_plan(plan: Plan, lengths: Sequence[int], cm: CostModel) -> float:
    """Iteration time of ``plan`` recomputed from scratch under ``cm`` (ignores stored numbers;
    each group priced with its own attention mode when the model can run it)."""
    total = cm.step_fixed_ms
    pricer = _Pricer(lengths, cm)
    for mb in plan.micro_batches:
        total += max(
            (
                pricer.group_ms(
                    g.seq_ids, g.sp, g.attention if g.attention in cm.attention_modes(g.sp) else None
                )
                for g in mb.groups
            ),
            default=0.0,
        )
    return total


def validate_plan(plan: Plan, lengths: Sequence[int], cm: CostModel) -> None:
    """Raise ValueError unless every sequence is placed exactly once, every group is an aligned
    power-of-two rank block inside the cluster, groups of a micro-batch are disjoint, and every
    group fits in memory."""
    n, cap = cm.num_devices, cm.capacity_tokens
    if plan.num_devices != n:
        raise ValueError(f"plan is for {plan.num_devices} devices, cost model for {n}")
    seen = [0] * len(lengths)
    for mi, mb in enumerate(plan.micro_batches):
        used: set[int] = set()
        for g in mb.groups:
            sp, ranks = g.sp, list(g.ranks)
            if (
                sp < 1
                or sp & (sp - 1)
                or not ranks
                or ranks != list(range(ranks[0], ranks[0] + sp))
                or ranks[0] % sp
                or ranks[-1] >= n
            ):
                raise ValueError(
                    f"micro-batch {mi}: group sp={sp} ranks={ranks[:4]}... is not an aligned block in {n} "
                    "devices"
                )
            if used & set(ranks):
                raise ValueError(f"micro-batch {mi}: ranks {sorted(used & set(ranks))[:4]} are in two groups")
            used |= set(ranks)
            tokens = 0
            for i in g.seq_ids:
                if not 0 <= i < len(lengths):
                    raise ValueError(f"micro-batch {mi}: sequence id {i} out of range 0..{len(lengths) - 1}")
                seen[i] += 1
                tokens += lengths[i]
            if tokens > sp * cap:
                raise ValueError(f"micro-batch {mi}: sp={sp} group holds {tokens} tokens > {sp} x {cap}")
    bad = [i for i, c in enumerate(seen) if c != 1]
    if bad:
        raise ValueError(f"{len(bad)} sequences are not placed exactly once, e.g. ids {bad[:5]}")
