"""Simple schedules, in the same framework as the FlexSP planner: the planner's safety nets and
fallback, and the implementations of the baselines it is compared with (solver.baselines).

Each baseline is ``fn(lengths, cm) -> Plan`` and builds its plan with ``build.build_plan``, so all
plans are laid out and priced identically (the paper's cost model, see
``shared/reference/flexsp-paper.md``):

- ``static_plan``: DeepSpeed-Ulysses-like, one SP degree for every sequence (default: all N
  devices), best-fit-decreasing packing into bins of 0.9 * C * degree tokens, exactly as the
  official FlexSP code's "static" baseline.
- ``best_homogeneous_plan``: the official code's "BatchAda": the best single SP degree for the
  whole batch, packed well (BFD, or time-balanced LPT), micro-batches formed from equal-time groups.
- ``greedy_hybrid_cp_plan``: a Megatron-LM hybrid-context-parallel-style greedy scheduler, an early
  approximation of Megatron's legacy ``BalancedCPScheduler``; kept as the runtime's fast fallback
  (``flexsp.planning``). The faithful reproduction of Megatron-Core's current dynamic-CP policy is
  ``solver.megatron_dcp.megatron_dcp_plan`` (the simulator's ``megatron-dcp``).

Every baseline raises ValueError when a sequence cannot fit the cluster (longer than N * C tokens,
or than degree * C for a fixed degree).
"""

from __future__ import annotations

import bisect
import heapq
import math
import time
from collections.abc import Sequence

import numpy as np

from .build import build_plan
from .costmodel import CostModel
from .errors import PlanningError, UserError
from .plan import Plan

STATIC_FILL = 0.9
"""Fraction of a group's token capacity the official static baseline fills per bin."""


class BaselineTimeout(TimeoutError):
    """A baseline ran past its ``deadline`` (time.perf_counter() value) and was abandoned."""


def _check_deadline(deadline: float | None, name: str) -> None:
    if deadline is not None and time.perf_counter() > deadline:
        raise BaselineTimeout(f"{name} ran past its time box")


def usable_degrees(cm: CostModel) -> tuple[int, ...]:
    """SP degrees some attention mode can run (Ulysses alone caps the degree at the head count)."""
    return tuple(d for d in cm.degrees if cm.attention_modes(d))


def check_lengths(lengths: Sequence[int], cm: CostModel, degree: int | None = None) -> np.ndarray:
    """Validated integer lengths (np.int64); PlanningError naming the offending sequences otherwise:
    an empty batch, non-integer or non-positive lengths, or a sequence longer than ``degree``
    devices hold (default: the largest usable SP group). The one length check of the planner, the
    schedules and the runtime."""
    arr = np.asarray(lengths)
    if arr.ndim != 1 or arr.size == 0:
        raise PlanningError("the batch is empty: give at least one sequence length")
    if not np.issubdtype(arr.dtype, np.integer):
        if not np.all(np.isfinite(arr)) or np.any(arr != np.round(arr)):
            raise PlanningError("sequence lengths must be whole numbers")
        arr = arr.astype(np.int64)
    bad = np.flatnonzero(arr < 1)
    if bad.size:
        raise PlanningError(
            f"sequence lengths must be >= 1: ids {bad[:5].tolist()} have {arr[bad[:5]].tolist()}"
        )
    max_sp = degree or max(usable_degrees(cm))
    limit = max_sp * cm.capacity_tokens
    over = np.flatnonzero(arr > limit)
    if over.size:
        group = "an SP group of that degree" if degree else "the largest usable SP group"
        raise PlanningError(
            f"{over.size} sequence(s) longer than {group} holds ({max_sp} devices x "
            f"{cm.capacity_tokens} tokens = {limit}; they exceed it): ids {over[:5].tolist()} with lengths "
            f"{arr[over[:5]].tolist()}; drop or split them, or plan with more devices/memory"
        )
    return arr.astype(np.int64)


def best_fit_decreasing(lengths: np.ndarray, ids: Sequence[int], capacity: float) -> list[list[int]]:
    """Bins of sequence ids packed best-fit-decreasing into ``capacity`` tokens each.

    Longest first; each goes to the open bin with the least room that still holds it (ties: the
    earliest bin), else opens a bin. A sequence longer than ``capacity`` gets a bin of its own.
    Deterministic, O(n log n) searches.
    """
    order = sorted(ids, key=lambda i: (-int(lengths[i]), i))
    bins: list[list[int]] = []
    room: list[tuple[float, int]] = []  # sorted (remaining capacity, bin index) of open bins
    for i in order:
        L = int(lengths[i])
        k = bisect.bisect_left(room, (L, -1))
        if k < len(room):
            rem, b = room.pop(k)
            bins[b].append(i)
            bisect.insort(room, (rem - L, b))
        else:
            bins.append([i])
            if L <= capacity:
                bisect.insort(room, (capacity - L, len(bins) - 1))
    return bins


def _chunk_groups(groups: list[list[int]], degree: int, cm: CostModel) -> list[list[tuple[int, list[int]]]]:
    """Micro-batches of N/degree groups each, taken in the given order."""
    per = cm.num_devices // degree
    return [[(degree, g) for g in groups[s : s + per]] for s in range(0, len(groups), per)]


def static_plan(
    lengths: Sequence[int], cm: CostModel, degree: int | None = None, *, deadline: float | None = None
) -> Plan:
    """DeepSpeed-Ulysses-like static SP: one degree for every sequence (default N = all devices).

    As the official FlexSP code's "static" baseline: best-fit-decreasing packing into bins of
    ``0.9 * C * degree`` tokens; with degree = N one bin is one micro-batch (the default degree is
    the largest usable one: N, or the head count if Ulysses caps it), with degree < N the
    N/degree groups of a micro-batch take consecutive bins (BFD order). A sequence longer than
    the bin but within ``degree * C`` gets its own bin.
    """
    t0 = time.perf_counter()
    degree = degree or max(usable_degrees(cm))
    if degree not in usable_degrees(cm):
        raise UserError(f"degree must be a power of two in {usable_degrees(cm)}, got {degree}")
    arr = check_lengths(lengths, cm, degree)
    cap = STATIC_FILL * cm.capacity_tokens * degree
    bins = best_fit_decreasing(arr, range(len(arr)), cap)  # O(n log n): the deadline is checked after
    _check_deadline(deadline, "static")
    mbs = _chunk_groups(bins, degree, cm)
    return build_plan(
        mbs,
        arr.tolist(),
        cm,
        method=f"static-{degree}",
        solve_seconds=time.perf_counter() - t0,
        extra={"degree": degree, "bin_tokens": cap},
    )


def _lpt_groups(
    arr: np.ndarray, times: np.ndarray, num_groups: int, capacity: int, deadline: float | None = None
) -> list[list[int]] | None:
    """Longest-processing-time-first over ``num_groups`` groups with a token capacity each.

    Each sequence (by decreasing time) goes to the least-loaded group that still has memory for
    it. None when some sequence fits no group.
    """
    heap = [(0.0, g) for g in range(num_groups)]
    tokens = [0] * num_groups
    groups: list[list[int]] = [[] for _ in range(num_groups)]
    for step, i in enumerate(sorted(range(len(arr)), key=lambda i: (-times[i], i))):
        if step % 512 == 0:
            _check_deadline(deadline, "best homogeneous")
        L, popped, placed = int(arr[i]), [], False
        while heap:
            load, g = heapq.heappop(heap)
            if tokens[g] + L <= capacity:
                groups[g].append(i)
                tokens[g] += L
                heapq.heappush(heap, (load + float(times[i]), g))
                placed = True
                break
            popped.append((load, g))
        for item in popped:
            heapq.heappush(heap, item)
        if not placed:
            return None
    return groups


def _homogeneous_candidates(arr: np.ndarray, cm: CostModel, degree: int, deadline: float | None = None):
    """Group lists (one degree) from BFD bins and from time-balanced LPT on 1-2 more micro-batches."""
    per = cm.num_devices // degree
    capacity = degree * cm.capacity_tokens
    times = cm.seq_time_ms(arr.astype(np.float64), degree)
    bins = best_fit_decreasing(arr, range(len(arr)), capacity)
    yield bins, times
    m_min = math.ceil(len(bins) / per)
    for m in (m_min, m_min + 1):
        groups = _lpt_groups(arr, times, min(m * per, max(len(arr), 1)), capacity, deadline)
        if groups is not None:
            yield [g for g in groups if g], times


def best_homogeneous_plan(lengths: Sequence[int], cm: CostModel, *, deadline: float | None = None) -> Plan:
    """The best single SP degree for the whole batch (the official code's "BatchAda").

    For every degree that holds the longest sequence: pack with BFD into bins of degree * C tokens,
    and also balance predicted time with LPT over the groups of the fewest (and one more)
    micro-batches; in each case sort the groups by time and fill micro-batches of N/degree groups
    with consecutive ones (which minimises the sum of per-micro-batch maxima for those groups).
    Returns the fastest plan over degrees and packings. ``deadline`` (a time.perf_counter()
    value): raise BaselineTimeout once past it.
    """
    t0 = time.perf_counter()
    arr = check_lengths(lengths, cm)
    lo = cm.min_degree(int(arr.max())) if arr.size else 1
    best, best_ms, best_deg = None, math.inf, lo
    for degree in (d for d in usable_degrees(cm) if d >= lo):
        _check_deadline(deadline, "best homogeneous")
        for groups, times in _homogeneous_candidates(arr, cm, degree, deadline):
            load = [sum(float(times[i]) for i in g) for g in groups]
            ordered = [g for _, g in sorted(zip(load, groups), key=lambda t: -t[0])]
            mbs = _chunk_groups(ordered, degree, cm)
            per, sl = cm.num_devices // degree, sorted(load, reverse=True)
            ms = sum(sl[s] + cm.b for s in range(0, len(sl), per))  # each chunk's max is its first
            if ms < best_ms - 1e-9:
                best, best_ms, best_deg = mbs, ms, degree
    return build_plan(
        best or [],
        arr.tolist(),
        cm,
        method="best-homogeneous",
        solve_seconds=time.perf_counter() - t0,
        extra={"degree": best_deg},
    )


def _next_pow2(x: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(x, 1))))


def _free_block(free: list[bool], size: int) -> int:
    """Start of the lowest aligned block of ``size`` free ranks, -1 if none."""
    for start in range(0, len(free), size):
        if all(free[start : start + size]):
            return start
    return -1


def greedy_hybrid_cp_plan(lengths: Sequence[int], cm: CostModel, *, deadline: float | None = None) -> Plan:
    """Megatron-LM hybrid/dynamic-context-parallel-style greedy scheduler (our reading of it).

    Megatron-LM's hybrid CP (2026) prebuilds power-of-two CP groups and schedules each batch
    greedily: a sequence's CP size is the next power of two of ``len / max_len_per_rank``; its work
    is estimated (there ~len^2/cp; here the cost model's time at that degree) and sequences, heaviest
    first, go to the least-loaded GPUs; when the GPUs' memory is full the remaining sequences go to
    the next scheduling group (here: the next micro-batch). Our reading, in this plan contract:

    - ``max_len_per_rank`` = C (the cost model's tokens per device), so cp = next_pow2(ceil(L / C)).
    - Within a micro-batch a rank belongs to at most one group (Megatron lets overlapping groups
      of different sizes take turns on a rank with barriers; our plans run groups concurrently on
      disjoint aligned blocks). A sequence goes to the least-loaded of: a new aligned block of cp
      free ranks (load 0), or an open group of degree >= cp with memory room for it.
    - A sequence that fits nowhere is deferred to the next micro-batch; each micro-batch is one
      pass over the remaining sequences in work order. Idle ranks stay idle (no re-sharding).

    ``deadline`` (a time.perf_counter() value): raise BaselineTimeout once past it (the scheduler
    is quadratic in the batch: a pass over the remaining sequences per micro-batch).

    How it differs from Megatron's schedulers (``solver.megatron_dcp`` reproduces the current one,
    ``DefaultDynamicCPScheduler`` / ``next_hdp_group_packing_aware``): it balances the cost model's
    time where Megatron balances its ``L^2/cp`` estimate; it lets a sequence join any open group of
    degree >= its CP size where Megatron tries CP sizes from the least one up and scores each option
    by the busiest rank after it; it has neither the legacy scheduler's work buckets, 5% balance
    exit and ``trim_overload`` nor either scheduler's filling of idle ranks by doubling the smallest
    group (idle ranks stay idle here).
    """
    t0 = time.perf_counter()
    arr = check_lengths(lengths, cm)
    n, cap = cm.num_devices, cm.capacity_tokens
    cp = [_next_pow2(math.ceil(int(L) / cap)) for L in arr]
    work = [cm.seq_time_ms(float(L), c) for L, c in zip(arr, cp)]
    remaining = sorted(range(len(arr)), key=lambda i: (-work[i], i))
    mbs = []
    while remaining:
        free = [True] * n
        groups: list[dict] = []  # {"sp", "load", "tokens", "ids"}
        deferred = []
        for step, i in enumerate(remaining):
            if step % 256 == 0:
                _check_deadline(deadline, "greedy hybrid-CP")
            L, c = int(arr[i]), cp[i]
            best, best_load = None, math.inf
            start = _free_block(free, c)
            if start >= 0:
                best, best_load = ("new", start), 0.0
            for g in groups:
                if g["sp"] >= c and g["tokens"] + L <= g["sp"] * cap and g["load"] < best_load:
                    best, best_load = g, g["load"]
            if best is None:
                deferred.append(i)
                continue
            if isinstance(best, tuple):
                start = best[1]
                free[start : start + c] = [False] * c
                best = {"sp": c, "load": cm.b, "tokens": 0, "ids": []}
                groups.append(best)
            best["load"] += cm.seq_time_ms(float(L), best["sp"])
            best["tokens"] += L
            best["ids"].append(i)
        mbs.append([(g["sp"], g["ids"]) for g in groups])
        remaining = deferred
    return build_plan(
        mbs, arr.tolist(), cm, method="greedy-hybrid-cp", solve_seconds=time.perf_counter() - t0
    )
