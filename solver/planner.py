"""The FlexSP planner: one global batch in, the fastest valid plan we can find in a time box out.

Method (all under the cost model of ``costmodel.py``):

1. Lower bound. Any plan with m micro-batches costs at least ``m * b`` (one overhead per
   micro-batch) plus the least device-work of every sequence spread over all N devices (or the
   slowest single sequence, if larger); m is at least ``ceil(total tokens / (N * C))``. Every
   reported gap is against this bound (or HiGHS's dual bound, when the exact MILP ran).
2. Search. For each candidate micro-batch count m (from the memory minimum upward, stopping when
   the bound of m exceeds the best plan found) and each giant-stretch policy, bisect one load cap
   ``tau`` shared by all micro-batches with the two-resource first fit of ``packing.py``: the
   smallest cap at which every sequence fits in m micro-batches. Coarse for every candidate, then
   fine for the best. One shared cap balances micro-batches against each other, which the
   official planner, optimising each micro-batch alone, does not do.
3. Improve. The baselines first (best homogeneous, the greedy hybrid-CP scheduler, Megatron-Core's
   dynamic-CP schedule, ``megatron_dcp``): one pass each, the faster plan kept, so a plan never
   loses to them when the box reaches them. Then pair search (the slowest micro-batch re-planned
   together with each other one), then each micro-batch repacked alone (own cap; first fit per
   pooling degree; LPT over equal groups).
4. MILP (``milp.py``: HiGHS, or any solver PuLP drives, on the same models). Small instances are
   solved exactly and certified ("optimal"); on large ones the slowest micro-batches are re-dealt
   over their groups by a bucketed MILP.
5. Large batches. Above ~24 micro-batches (memory minimum) or 8,192 sequences the batch is split
   into stratified chunks (every K-th sequence, longest first: each chunk looks like the whole)
   of ~16 micro-batches, each searched as above with an even share of the time left; their
   micro-batches are concatenated. The search's cost then grows linearly with the batch.
6. Determinism and time box. Before any search the batch gets O(n log n) safety-net plans:
   ``packing.quick_pack``, ``baselines.static_plan`` at every degree that holds the batch, and
   Megatron-Core's dynamic-CP schedule (``megatron_dcp``, up to ``MEGATRON_SAFETY_WORK``): the plan
   returned is never slower than any of them, so never slower than best-static (or megatron-dcp),
   even when the box cuts the search short (``extra["search"]`` names the safety net that won).
   The search is a fixed amount of work and MILPs stop at node limits;
   every loop that could run long asks the clock, and a search cut short is marked. So the same
   input gives the same plan and status on every run and rank when it finishes inside
   ``time_limit`` ("feasible", or "optimal" when proven); when the box cut something short the
   best plan so far (always valid) comes back as "time_limit", and as "fallback" when only the
   safety net fitted in the box.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import replace

import numpy as np

from .build import build_plan
from .costmodel import CostModel
from .errors import (
    PlanningError,  # noqa: F401 (re-exported)
    UserError,
)
from .megatron_dcp import megatron_dcp_plan
from .milp import DEFAULT_PULP_SOLVER, check_backend, exact_size, reassign_micro_batch, solve_exact
from .official import chunk_global_batch
from .packing import Workload, mbs_time, pack, quick_pack, solve_micro_batch
from .plan import Plan
from .schedules import (
    BaselineTimeout,
    best_homogeneous_plan,
    check_lengths,
    greedy_hybrid_cp_plan,
    static_plan,
    usable_degrees,
)


def min_micro_batches(wl: Workload) -> int:
    cm = wl.cm
    return max(1, math.ceil(int(wl.lengths.sum()) / (cm.num_devices * cm.capacity_tokens)))


def lower_bound_ms(lengths: Sequence[int], cm: CostModel) -> float:
    """A bound no valid plan beats: m_min * b + max(total least work / N, slowest single sequence)."""
    wl = Workload(check_lengths(lengths, cm), cm)
    return _lower_bound(wl, min_micro_batches(wl)) + cm.step_fixed_ms


def _lower_bound(wl: Workload, m: int) -> float:
    """Bound for plans with at least m micro-batches, without the plan-independent step overhead."""
    work = float(wl.min_work.sum()) / wl.cm.num_devices
    return m * wl.cm.b + max(work, float(wl.min_time.max()))


def _bisect_tau(
    wl: Workload,
    order,
    m: int,
    stretch: float,
    clock,
    rel_tol: float = 4e-3,
    bracket: tuple[float, float] | None = None,
):
    """Smallest load cap (to rel_tol) at which ``pack`` fits the batch in m micro-batches.

    Starts at the work bound and grows by 1.5x until feasible, or from ``bracket`` (lo, hi).
    """
    n = wl.cm.num_devices
    lo = max(float(wl.min_work.sum()) / (n * m), 1e-9)
    hi = lo
    if bracket is not None:
        lo, hi = bracket
    best = None
    while not clock.expired():
        mbs = pack(wl, order, hi, m, stretch, clock)
        if mbs is not None:
            best = (hi, mbs)
            break
        lo, hi = hi, hi * 1.5
        if hi > 1e12:
            return None
    if best is None:
        return None
    while hi - lo > rel_tol * hi and not clock.expired():
        mid = 0.5 * (lo + hi)
        mbs = pack(wl, order, mid, m, stretch, clock)
        if mbs is None:
            lo = mid
        else:
            hi, best = mid, (mid, mbs)
    return best


class _Clock:
    """The time box: ``expired()`` is asked wherever work would be skipped or cut short, and
    records that it was (``cut``): a plan whose search was never cut is a fixed amount of work,
    the same on every run and every rank."""

    def __init__(self, deadline: float, parent: "_Clock | None" = None):
        self.deadline, self.parent, self.cut = deadline, parent, False
        self.reasons: set[str] = set()

    def left(self) -> float:
        return self.deadline - time.perf_counter()

    def mark(self, reason: str) -> None:
        """Record that ``reason`` cut work short (here and in the enclosing clock)."""
        self.cut = True
        self.reasons.add(reason)
        if self.parent is not None:
            self.parent.mark(reason)

    def expired(self) -> bool:
        if time.perf_counter() > self.deadline:
            self.mark("time box")
            return True
        return False


CHUNK_MICRO_BATCHES = 16
"""Large batches are planned in stratified chunks of about this many micro-batches (memory minimum)..."""
CHUNK_SEQUENCES = 8192
"""...and at most this many sequences, so the search's cost grows linearly with the batch."""


def plan_batch(
    lengths: Sequence[int],
    cm: CostModel,
    *,
    time_limit: float = 1.0,
    max_extra_micro_batches: int = 3,
    rebalance_rounds: int = 2,
    exact_max_binaries: int = 4000,
    milp_node_limit: int = 500,
    milp_micro_batches: int = 2,
    milp_backend: str = "highs",
    pulp_solver: str | None = None,
    progress: Callable[[str], None] | None = None,
) -> Plan:
    """Plan one global batch: the fastest valid plan the search finds within ``time_limit`` s.

    The search is a fixed amount of work (MILPs stop at ``milp_node_limit`` branch-and-bound
    nodes), so the same input gives the same plan and status on every run and rank when it
    finishes inside ``time_limit``. The time box covers everything (search, MILPs, baselines,
    pricing): ``plan_batch`` returns within ``time_limit`` plus one search step (under ~0.5 s
    measured on a loaded 2-core machine), or, where that is longer, the O(n) floor any plan costs
    (checking, safety-net packing, pricing: ~10 us of CPU per sequence, ~1 s at 100,000); see
    ``benchmarks/results/planner_scaling.md``. Status: "optimal" (proven: the exact
    MILP, or the plan meets the lower bound), "feasible" (the search ran to the end), "time_limit"
    (the box cut the search short: valid, maybe not reproducible), "fallback" (nothing but the
    O(n log n) safety-net packing fitted in the box).

    Batches with more than ``CHUNK_MICRO_BATCHES`` x 1.5 micro-batches (memory minimum) or more
    than ``CHUNK_SEQUENCES`` sequences are split into stratified chunks (every K-th sequence,
    longest first) planned one after another, each with its share of the time left.

    milp_backend: "highs" (scipy.optimize.milp) or "pulp" (``pulp_solver``: any name in
    ``pulp.listSolvers(onlyAvailable=True)``, default PULP_CBC_CMD). progress: called with a short
    line of text as chunks finish (flexsp-plan prints it on stderr).
    """
    start = time.perf_counter()
    if (
        isinstance(time_limit, bool)
        or not isinstance(time_limit, (int, float))
        or not math.isfinite(time_limit)
        or time_limit <= 0
    ):
        raise UserError(f"time_limit must be a finite number of seconds > 0, got {time_limit!r}")
    check_backend(milp_backend, pulp_solver)
    clock = _Clock(start + time_limit)
    wl = Workload(check_lengths(lengths, cm), cm)
    n = len(wl.lengths)
    m0 = min_micro_batches(wl)
    order = _order(wl, range(n))
    chunks = max(1, math.ceil(n / CHUNK_SEQUENCES))
    if m0 > 1.5 * CHUNK_MICRO_BATCHES:
        chunks = max(chunks, math.ceil(m0 / CHUNK_MICRO_BATCHES))
    chunk_ids = (
        [np.array(order[c::chunks], dtype=np.int64) for c in range(chunks)]
        if chunks > 1
        else [np.arange(n, dtype=np.int64)]
    )
    sub = [Workload(wl.lengths[ids], cm) for ids in chunk_ids] if chunks > 1 else [wl]
    # The safety net first, timed: the whole batch packed in O(n log n) (a plan never loses to
    # it). The end of the run re-packs what the search did not improve in one piece and prices
    # the result (~2.5x a packing): that much of the box is kept for it.
    t_quick = time.perf_counter()
    whole = quick_pack(wl, range(n))
    reserve = 0.02 + (time.perf_counter() - t_quick) * (4.0 if chunks > 1 else 2.5)
    # ...then the best static plan (one degree for every sequence) and Megatron-Core's dynamic-CP
    # schedule: safety nets too, so flexsp is never slower than best-static or megatron-dcp on any
    # batch, cut short or not (one O(n log n) pass each).
    safety = "quick"
    for name, mbs in _cheap_plans(wl):
        if _plan_time(wl, mbs) < _plan_time(wl, whole) - 1e-9:
            safety, whole = name, mbs
    plans: list = [whole if chunks == 1 else None] + [None] * (chunks - 1)
    improved = [False] * chunks
    opts = dict(
        max_extra=max_extra_micro_batches,
        rebalance_rounds=rebalance_rounds,
        exact_max_binaries=exact_max_binaries if chunks == 1 else 0,
        node_limit=milp_node_limit,
        milp_micro_batches=milp_micro_batches,
        backend=milp_backend,
        pulp_solver=pulp_solver,
        # each re-deal MILP may use a tenth of the box (at least 0.3 s): on a slow or busy
        # machine the node limit, not the clock, should still end it
        milp_cap_s=max(0.3, 0.1 * time_limit),
    )
    searched, info, lower_exact, proven, starved, whole_won = 0, [], 0.0, False, 0, False
    last_report = start
    for c, w in enumerate(sub):
        left = clock.left() - reserve
        if left <= 0:
            clock.mark("time box")
            if progress is not None:
                progress(f"time box reached after {c}/{chunks} chunks; the rest get the safety-net packing")
            break
        # an even share of what is left (time a chunk leaves rolls over); each chunk whose share
        # was too short to find even its first packing doubles the shares after it
        share = min(left, left / (chunks - c) * 2**starved)
        chunk_clock = _Clock(time.perf_counter() + share, parent=clock)
        result = _search(w, chunk_clock, opts)
        if result is None:
            starved += 1
            continue
        groups, meta = result
        if plans[c] is None:
            plans[c] = quick_pack(w, range(len(w.lengths)))
        if _plan_time(w, groups) <= _plan_time(w, plans[c]) + 1e-9:
            plans[c], improved[c] = groups, True
        else:
            meta["search"] = safety if chunks == 1 else "quick"
        searched += 1
        info.append(meta)
        if chunks == 1:
            lower_exact, proven = meta.pop("exact_bound", 0.0), meta.pop("proven", False)
        now = time.perf_counter()
        if progress is not None and chunks > 1 and (c == 0 or now - last_report > 1.0 or c == chunks - 1):
            progress(
                f"planned chunk {c + 1}/{chunks} ({len(w.lengths)} sequences), "
                f"{now - start:.1f} s of {time_limit:g} s"
            )
            last_report = now
    if chunks == 1:
        merged = plans[0]
    else:
        merged = []
        for ids, mbs, done in zip(chunk_ids, plans, improved):
            if done:
                ids = ids.tolist()
                merged += [[(sp, [ids[x] for x in g]) for sp, g in mb] for mb in mbs]
        rest = [c for c in range(chunks) if not improved[c]]
        if rest and len(rest) < chunks:  # one safety net over the chunks the search did not improve
            merged += quick_pack(wl, np.concatenate([chunk_ids[c] for c in rest]))
        if len(rest) == chunks or _plan_time(wl, whole) < _plan_time(wl, merged):
            merged, whole_won = whole, True
    lower = max(_lower_bound(wl, m0), lower_exact)
    extra = {
        "chunks": chunks,
        "chunks_searched": searched,
        "time_limit": time_limit,
        "cut": sorted(clock.reasons),
        "milp_backend": milp_backend
        if milp_backend == "highs"
        else f"pulp:{pulp_solver or DEFAULT_PULP_SOLVER}",
    }
    if chunks == 1 and info:
        extra.update(info[0])
    elif info and not whole_won:
        extra["search"] = "chunked"
        extra["searches"] = sorted({m["search"] for m in info})
    else:
        extra["search"] = safety
    plan = build_plan(merged, wl.lengths, cm, method="flexsp", extra=extra)
    plan_ms = plan.predicted_ms - cm.step_fixed_ms
    if proven or plan_ms <= lower * (1 + 1e-12):
        status = "optimal"
    elif searched == 0:
        status = "fallback"
    elif clock.cut:
        status = "time_limit"
    else:
        status = "feasible"
    return replace(
        plan,
        status=status,
        lower_bound_ms=min(lower, plan_ms) + cm.step_fixed_ms,
        solve_seconds=round(time.perf_counter() - start, 4),
    )


MEGATRON_SAFETY_WORK = 400_000
"""Megatron's scheduler scans the sequences left once per micro-batch: it is a safety net while
sequences x memory-minimum micro-batches stays under this (~1 s); beyond, only the search tries it."""


def _cheap_plans(wl: Workload):
    """(name, micro-batches) of ``baselines.static_plan`` at every degree that holds every
    sequence (one O(n log n) best-fit pass each) and of ``megatron_dcp_plan`` (while
    ``MEGATRON_SAFETY_WORK`` allows)."""
    cm, longest = wl.cm, int(wl.lengths.max())
    plans = [
        (f"static-{d}", static_plan(wl.lengths, cm, d))
        for d in usable_degrees(cm)
        if d * cm.capacity_tokens >= longest
    ]
    if len(wl.lengths) * min_micro_batches(wl) <= MEGATRON_SAFETY_WORK:
        plans.append(("megatron-dcp-net", megatron_dcp_plan(wl.lengths, cm)))
    return [
        (name, [[(g.sp, list(g.seq_ids)) for g in mb.groups] for mb in plan.micro_batches])
        for name, plan in plans
    ]


def _search(wl: Workload, clock: _Clock, opts: dict):
    """The full search on one batch (or chunk): ((micro-batches of (sp, ids)), diagnostics), or
    None when the time box ended before the first packing was found."""
    cm = wl.cm
    backend, pulp_solver = opts["backend"], opts["pulp_solver"]
    m0 = min_micro_batches(wl)
    order = _order(wl, range(len(wl.lengths)))
    best_cost, best_mbs, best_key, tried = math.inf, None, None, []
    coarse = 0.03  # survey every (m, stretch) coarsely, then refine the best one
    no_stretch = float(wl.time[np.argmax(wl.fits, axis=0), np.arange(len(wl.lengths))].max())
    for m in range(m0, m0 + opts["max_extra"] + 1):
        if _lower_bound(wl, m) >= best_cost or clock.expired():
            break
        for stretch in (1.0, 2.0, 4.0, math.inf):
            found = _bisect_tau(wl, order, m, stretch, clock, rel_tol=coarse)
            if found is None:
                break
            tau, mbs = found
            cost = mbs_time(mbs, cm.b)
            tried.append({"micro_batches": m, "stretch": stretch, "tau": round(tau, 3), "ms": round(cost, 3)})
            if cost < best_cost - 1e-9:
                best_cost, best_mbs, best_key = cost, mbs, (m, stretch, tau)
            if tau >= no_stretch:
                break  # every sequence meets the cap at its least-work degree: stretching changes nothing
    if best_key is not None:
        m, stretch, tau = best_key
        found = _bisect_tau(wl, order, m, stretch, clock, bracket=(tau * (1 - coarse), tau))
        if found is not None and mbs_time(found[1], cm.b) < best_cost:
            best_cost, best_mbs = mbs_time(found[1], cm.b), found[1]
    if best_mbs is None:
        return None
    method = "first-fit"
    groups = [[(g.sp, list(g.ids)) for g in mb.groups] for mb in best_mbs if mb.groups]
    phases = {"first_fit": _plan_time(wl, groups)}
    # the baselines are cheap (one pass each): tried first, so a short box still gets the best of
    # them, and the phases below improve on whichever plan is ahead; a plan never loses to them
    groups, method = _baseline_candidates(wl, groups, method, clock)
    phases["baselines"] = _plan_time(wl, groups)
    groups = _rebalance(wl, groups, opts["rebalance_rounds"], clock)
    phases["rebalance"] = _plan_time(wl, groups)
    groups = _polish(wl, groups, clock)
    phases["repack"] = _plan_time(wl, groups)
    contiguous = _contiguous_split(wl, sorted({m0, m0 + 1, len(groups)}), clock)
    if contiguous is not None and _plan_time(wl, contiguous) < _plan_time(wl, groups) - 1e-9:
        groups, method = _rebalance(wl, contiguous, opts["rebalance_rounds"], clock), "contiguous"
    phases["contiguous"] = _plan_time(wl, groups)
    groups = _milp_polish(
        wl,
        groups,
        clock,
        opts["node_limit"],
        opts["milp_micro_batches"],
        backend,
        pulp_solver,
        cap_s=opts["milp_cap_s"],
    )
    phases["milp"] = _plan_time(wl, groups)
    # the exact model needs only the micro-batch counts that could still beat this plan: m more
    # micro-batches cost at least m * b on top of the m-independent part of the bound
    m_cap = len(wl.lengths)
    if cm.b > 0:
        m_cap = min(
            m_cap, max(min_micro_batches(wl), int((_plan_time(wl, groups) - _lower_bound(wl, 0)) // cm.b))
        )
    exact_bound, proven = 0.0, False
    if (
        exact_size(len(wl.lengths), cm.num_devices, m_cap) <= opts["exact_max_binaries"]
        and not clock.expired()
    ):
        exact = solve_exact(wl, max(m_cap, 1), clock.left(), backend=backend, pulp_solver=pulp_solver)
        if exact is not None:
            ex_status, _, bound, ex_groups, timed_out = exact
            if timed_out:
                clock.mark("exact MILP stopped on the clock")
            if _plan_time(wl, ex_groups) <= _plan_time(wl, groups) + 1e-9:
                groups, method = ex_groups, "exact-milp"
            exact_bound = bound
            proven = ex_status == "optimal" and _plan_time(wl, groups) <= _plan_time(wl, ex_groups) + 1e-9
    return groups, {
        "search": method,
        "phases_ms": {k: round(v, 3) for k, v in phases.items()},
        "tried": tried[:20],
        "exact_bound": exact_bound,
        "proven": proven,
    }


def _baseline_candidates(wl: Workload, groups: list, method: str, clock: _Clock) -> tuple[list, str]:
    """The faster of ``groups`` and each baseline's plan: best homogeneous, the greedy hybrid-CP
    scheduler and Megatron-Core's dynamic-CP schedule (``megatron_dcp``), while the box allows."""
    cm = wl.cm
    for name, make in (
        ("homogeneous", best_homogeneous_plan),
        ("megatron-dcp", megatron_dcp_plan),
        ("greedy", greedy_hybrid_cp_plan),
    ):
        # the greedy scheduler scans rank blocks per sequence: skip it where that is slow
        if name == "greedy" and len(wl.lengths) * cm.num_devices > 100_000:
            continue
        if name == "megatron-dcp" and len(wl.lengths) * min_micro_batches(wl) > MEGATRON_SAFETY_WORK:
            continue
        if clock.expired():
            break
        try:
            if name == "megatron-dcp":
                other = make(wl.lengths.tolist(), cm)  # one pass per micro-batch, no deadline needed
            else:
                other = make(wl.lengths.tolist(), cm, deadline=clock.deadline)
        except BaselineTimeout:
            clock.expired()
            break
        except ValueError:
            continue
        other_groups = [[(g.sp, list(g.seq_ids)) for g in mb.groups] for mb in other.micro_batches]
        if _plan_time(wl, other_groups) < _plan_time(wl, groups) - 1e-9:
            groups, method = other_groups, name
    return groups, method


def _plan_time(wl: Workload, mbs: list) -> float:
    """Sum of micro-batch times (slowest group + b), vectorised: one reduction per degree."""
    sizes, ks, mb_of, cat = [], [], [], []
    for j, mb in enumerate(mbs):
        for sp, ids in mb:
            if not len(ids):
                continue
            sizes.append(len(ids))
            ks.append(sp.bit_length() - 1)
            mb_of.append(j)
            cat.append(ids)
    if not sizes:
        return 0.0
    ks_a, mb_a = np.asarray(ks), np.asarray(mb_of)
    loads = np.empty(len(sizes))
    for k in np.unique(ks_a).tolist():
        sel = np.flatnonzero(ks_a == k)
        ids = np.fromiter(
            itertools.chain.from_iterable(cat[g] for g in sel.tolist()),
            dtype=np.int64,
            count=int(sum(sizes[g] for g in sel.tolist())),
        )
        offsets = np.cumsum([0] + [sizes[g] for g in sel.tolist()[:-1]])
        loads[sel] = np.add.reduceat(wl.time[k][ids], offsets) + wl.latency[k]
    worst = np.full(len(mbs), -np.inf)
    np.maximum.at(worst, mb_a, loads)
    used = np.isfinite(worst)
    return float(worst[used].sum() + wl.cm.b * used.sum())


def _milp_polish(
    wl: Workload,
    mbs: list,
    clock,
    node_limit: int,
    count: int,
    backend: str = "highs",
    pulp_solver: str | None = None,
    cap_s: float = 0.3,
) -> list:
    """Re-deal the sequences of the ``count`` slowest micro-batches over their groups with the
    MILP (each solve capped at ``cap_s`` s; the node limit normally ends it first). Skips
    micro-batches whose slowest group runs a single sequence (no re-deal helps)."""
    out = []
    for rank, mb in enumerate(sorted(mbs, key=lambda mb: -_mb_time(wl, mb))):
        slowest = max(
            mb, key=lambda g: wl.time[g[0].bit_length() - 1, g[1]].sum() + wl.latency[g[0].bit_length() - 1]
        )
        # at most 16 groups keeps the model small (<= ~400 integers): HiGHS then stays in ~0.1 s
        if rank < count and 1 < len(mb) <= 16 and len(slowest[1]) > 1 and not clock.expired():
            report: dict = {}
            better = reassign_micro_batch(
                wl,
                mb,
                min(max(clock.left(), 0.02), cap_s),
                node_limit=node_limit,
                backend=backend,
                pulp_solver=pulp_solver,
                report=report,
            )
            if report.get("timed_out"):  # the wall clock, not the node limit, ended it
                clock.mark("re-deal MILP stopped on its time cap")
            if better is not None:
                mb = better
        out.append(mb)
    return out


def _order(wl: Workload, ids) -> list[int]:
    """Longest-running first (time at the least-work degree), ties by index."""
    ids = np.asarray(list(ids) if not isinstance(ids, (range, np.ndarray)) else ids, dtype=np.int64)
    return ids[np.lexsort((ids, -wl.min_time[ids]))].tolist()


def _mb_time(wl: Workload, mb) -> float:
    return (
        max(wl.time[sp.bit_length() - 1, ids].sum() + wl.latency[sp.bit_length() - 1] for sp, ids in mb)
        + wl.cm.b
    )


def _rebalance(wl: Workload, mbs: list, rounds: int, clock) -> list:
    """Large-neighbourhood search: re-plan the slowest micro-batch together with each other one
    (fastest first) as a two-micro-batch problem; keep the pair's new split if it is faster."""
    times = [_mb_time(wl, mb) for mb in mbs]
    for _ in range(rounds):
        improved = False
        slow = int(np.argmax(times))
        for other in sorted(range(len(mbs)), key=lambda j: (times[j], j)):
            if other == slow:
                continue
            if clock.expired():
                break
            ids = [i for _, g in mbs[slow] for i in g] + [i for _, g in mbs[other] for i in g]
            found = _bisect_tau(wl, _order(wl, ids), 2, 1.0, clock)
            if found is None:
                continue
            new = [[(g.sp, list(g.ids)) for g in mb.groups] for mb in found[1] if mb.groups]
            new_times = [_mb_time(wl, mb) for mb in new]
            if len(new) == 2 and sum(new_times) < times[slow] + times[other] - 1e-6:
                mbs[slow], mbs[other] = new
                times[slow], times[other] = new_times
                improved = True
                slow = int(np.argmax(times))
        if not improved:
            break
    return mbs


def _contiguous_split(wl: Workload, counts, clock, max_sequences: int = 2048):
    """The official planner's micro-batch split (lengths sorted, cut into m contiguous chunks with
    the least largest token sum), each chunk then packed by ``solve_micro_batch``; the best over
    ``counts``. It wins on some batches where one shared cap forces long sequences to high degrees.
    Skipped above ``max_sequences`` (the split's dynamic program is quadratic)."""
    n = len(wl.lengths)
    if n > max_sequences:
        return None
    by_length = sorted(range(n), key=lambda i: (-wl.lengths[i], i))
    best, best_time = None, math.inf
    for m in counts:
        if m > n or clock.expired():
            break
        plan = []
        split = chunk_global_batch(wl.lengths, by_length, m, should_stop=clock.expired)
        if split is None:
            break
        for ids in split:
            found = solve_micro_batch(wl, ids, clock)
            if found is None:
                plan = None
                break
            plan.append([(g.sp, list(g.ids)) for g in found[1]])
        if plan and _plan_time(wl, plan) < best_time:
            best, best_time = plan, _plan_time(wl, plan)
    return best


def _polish(wl: Workload, mbs: list, clock) -> list:
    """Re-pack each micro-batch alone (its own cap, memory pooled in larger groups if that is
    faster), slowest first, while time remains; keep whichever is faster."""
    out = []
    for mb in sorted(mbs, key=lambda mb: -_mb_time(wl, mb)):
        if not clock.expired():
            found = solve_micro_batch(
                wl, [i for _, g in mb for i in g], clock, target=_mb_time(wl, mb) - wl.cm.b
            )
            if found is not None and found[0] + wl.cm.b < _mb_time(wl, mb) - 1e-9:
                mb = [(g.sp, g.ids) for g in found[1]]
        out.append(mb)
    return out
