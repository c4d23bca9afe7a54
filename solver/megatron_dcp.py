"""Megatron-Core dynamic context parallelism (DCP): its scheduling policy, reproduced.

Read from NVIDIA/Megatron-LM, branch ``dev`` at d48bd6be (2026-08-21), and written anew here
(no code copied):

- ``megatron/core/datasets/data_schedule.py``, ``DefaultDynamicCPScheduler.
  get_groups_and_subsamples`` (what ``--dynamic-context-parallel`` runs, scheduler
  ``default_dynamic_cp``): the global batch's samples sorted longest first (a stable sort), then
  ``next_hdp_group_packing_aware`` called on what is left until nothing is; each call returns one
  micro-batch (Megatron: one "group" of packed samples per DPxCP rank) and the leftovers.
- ``megatron/core/datasets/data_schedule_utils.py``:
  - ``dcp_gpus_needed``: a sample's least CP size, the power of two ``2^ceil(log2(L / m))``
    (at least 1 and at least ``min_cp_size``), m = ``max_seqlen_per_dp_cp_rank`` (tokens a rank
    may hold).
  - ``next_hdp_group_packing_aware``: (1) the longest sample opens a CP group of its least size on
    ranks ``0..cp-1``; (2) every other sample, longest first, tries each CP size from its least one
    doubling up to the DPxCP size: joining each existing group of exactly that size whose per-rank
    tokens stay <= m, or a new group on the lowest free ranks; each option is scored by the
    busiest rank's projected work, work = ``L^2 / cp`` per rank (attention only); the lowest score
    wins, ties to the first tried (smaller CP size, then existing groups in creation order, then
    the new group); options scoring above ``tall * m * 1.05`` are refused
    (``_DYNAMIC_CP_WORKLOAD_CAP_DELTA``); a sample with no option is left for a later micro-batch;
    (3) ``fill_empty_gpus_once`` while ranks are empty: the first group of the smallest size
    doubles onto the next ranks (later groups shift right), its work re-estimated;
    ``fill_with_full_dpxcp_group`` when that cannot fill them.
- ``megatron/core/parallel_state.py``, ``create_dynamic_dp_cp_groups``: a process group for every
  aligned block of every power-of-two size; a rank's CP group is the aligned block of its
  micro-batch's ``local_cp_size`` (``build_packed_microbatches``).
- The earlier scheduler, ``megatron/core/pipeline_parallel/hybrid_cp_schedule.py``
  ``BalancedCPScheduler.get_groups_and_subsamples`` / ``next_hdp_group`` (buckets of equal work,
  least-loaded group of exactly the needed size, stop once ranks are balanced within 5%,
  ``trim_overload``, ``fill_empty_gpus``), is what ``solver.baselines.greedy_hybrid_cp_plan``
  approximates; the packing-aware one above replaced it for dynamic CP.

Facts of that policy this reproduction relies on (proved from the rules above, checked by
assertions and tests): every rank of a group carries the same work, so the busiest rank after
adding a sample to group g is ``max(M, load_g + L^2/cp)`` (M the busiest rank now); new groups
open in non-increasing sizes on the lowest free ranks and the fill doubles the first group of the
smallest size, so with a power-of-two DPxCP size every group is an aligned block (Megatron's layout
is exactly ``build.layout_ranks``' biggest-first layout) and ``fill_with_full_dpxcp_group`` is never
reached; the 1.05 cap never refuses an option that passes the token check
(``sum_i L_i^2/cp <= tall * sum_i L_i/cp <= tall * m``).

What differs, and why:
- m defaults to the cost model's capacity C (tokens one device holds); Megatron users set it.
- A CP size the cost model cannot run (Ulysses-only presets stop at the head count; Megatron would
  run ring attention there) is never tried: options stop at the largest runnable size and the fill
  stops doubling there, leaving the remaining ranks idle (counted in ``extra["capped_fills"]``).
- The plan is priced by our cost model like every other policy; Megatron's own ``L^2/cp`` estimate
  only steers its choices.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from .build import build_plan, layout_ranks
from .costmodel import CostModel
from .errors import UserError
from .plan import Plan
from .schedules import check_lengths, usable_degrees

WORKLOAD_CAP_DELTA = 0.05
"""Megatron's ``_DYNAMIC_CP_WORKLOAD_CAP_DELTA``: options may load the busiest rank up to
``tall * m * (1 + delta)``."""


def dcp_gpus_needed(length: int, max_seqlen_per_rank: int, min_cp_size: int = 1) -> int:
    """Megatron's least CP size of a sample: the smallest power of two p >= 1 with
    ``p * max_seqlen_per_rank >= length``, at least ``min_cp_size`` (integer arithmetic, the same
    as its ``2 ** ceil(log2(length / m))``)."""
    p = 1
    while p * max_seqlen_per_rank < length:
        p *= 2
    return max(min_cp_size, p)


@dataclass
class _Group:
    size: int
    """CP size (ranks)."""
    start: int
    """First rank in Megatron's layout."""
    load: float
    """Estimated work of each member rank, sum of L^2 / size."""
    packed: float
    """Tokens per member rank, sum of L / size (Megatron's ``packing_sequence_len``)."""
    ids: list = field(default_factory=list)
    """Sample ids in placement order."""
    lengths: list = field(default_factory=list)
    """Their lengths."""


def _work(length: int, cp: int) -> float:
    return (length * length) / cp


class _SizeIndex:
    """Groups of one CP size, in creation order, with their loads and per-rank tokens as arrays
    (the option scan is vectorised: exact, the same floats as Megatron's per-rank loop)."""

    def __init__(self, capacity: int):
        self.gids: list[int] = []
        self.load = np.empty(capacity)
        self.packed = np.empty(capacity)
        self.min_packed = math.inf

    def add(self, gid: int, load: float, packed: float) -> None:
        k = len(self.gids)
        self.gids.append(gid)
        self.load[k], self.packed[k] = load, packed
        self.min_packed = min(self.min_packed, packed)

    def update(self, k: int, load: float, packed: float) -> None:
        self.load[k], self.packed[k] = load, packed
        self.min_packed = float(self.packed[: len(self.gids)].min())

    def best(self, busiest: float, cost: float, per_rank: float, m: float) -> tuple[float, int] | None:
        """(score, position) of the option Megatron picks among these groups, or None."""
        k = len(self.gids)
        if not k or self.min_packed + per_rank > m:
            return None
        ok = ~(self.packed[:k] + per_rank > m)
        score = np.where(ok, np.maximum(busiest, self.load[:k] + cost), np.inf)
        pos = int(np.argmin(score))
        return (float(score[pos]), pos) if ok[pos] else None


def next_micro_batch(
    samples: list[tuple[int, int]], total: int, m: int, min_cp: int = 1, max_cp: int | None = None
) -> tuple[list[_Group], list[tuple[int, int]], int]:
    """One call of Megatron's ``next_hdp_group_packing_aware`` on ``samples`` ((id, length),
    longest first): (groups in Megatron's rank order, leftovers in order, ranks left idle because
    of ``max_cp``). ``max_cp`` (default ``total``) caps the CP sizes tried and filled."""
    max_cp = total if max_cp is None else max_cp
    tall = samples[0][1]
    cap = float(tall) * float(m) * (1.0 + WORKLOAD_CAP_DELTA)
    groups: list[_Group] = []
    index: dict[int, _SizeIndex] = {}
    where: list[tuple[int, int]] = []  # gid -> (size, position in its index)
    allocated = 0
    busiest = 0.0

    def open_group(sid: int, length: int, cp: int) -> None:
        nonlocal allocated, busiest
        g = _Group(
            size=cp, start=allocated, load=_work(length, cp), packed=length / cp, ids=[sid], lengths=[length]
        )
        groups.append(g)
        idx = index.setdefault(cp, _SizeIndex(total // cp))
        where.append((cp, len(idx.gids)))
        idx.add(len(groups) - 1, g.load, g.packed)
        allocated += cp
        busiest = max(busiest, g.load)

    sid, length = samples[0]
    first = dcp_gpus_needed(length, m, min_cp)
    assert first <= max_cp, "check_lengths keeps every sample within the largest runnable CP size"
    open_group(sid, length, first)
    leftovers = []
    smallest = samples[-1][1]
    for n, (sid, length) in enumerate(samples[1:], 1):
        if total - allocated < dcp_gpus_needed(smallest, m, min_cp) and all(
            idx.min_packed + smallest / size > m for size, idx in index.items()
        ):
            # not even the shortest sample fits anywhere (no free ranks for it, no group with room):
            # every sample left is a leftover, in order (what the scan would conclude one by one)
            leftovers += samples[n:]
            break
        best = None  # (score, cp, gid or None for a new group)
        cp = dcp_gpus_needed(length, m, min_cp)
        while cp <= max_cp:
            cost = _work(length, cp)
            idx = index.get(cp)
            found = idx.best(busiest, cost, length / cp, m) if idx is not None else None
            if found is not None and found[0] <= cap and (best is None or found[0] < best[0]):
                best = (found[0], cp, idx.gids[found[1]])
            if total - allocated >= cp:
                score = max(busiest, cost)
                if score <= cap and (best is None or score < best[0]):
                    best = (score, cp, None)
            if best is not None and best[0] <= busiest:
                break  # no later option can score below the busiest rank
            cp *= 2
        if best is None:
            leftovers.append((sid, length))
            continue
        _, cp, gid = best
        if gid is None:
            open_group(sid, length, cp)
            continue
        g = groups[gid]
        g.load += _work(length, cp)
        g.packed += length / cp
        g.ids.append(sid)
        g.lengths.append(length)
        size, pos = where[gid]
        index[size].update(pos, g.load, g.packed)
        busiest = max(busiest, g.load)
    idle = _fill_empty_ranks(groups, total, max_cp)
    return groups, leftovers, idle


def _fill_empty_ranks(groups: list[_Group], total: int, max_cp: int) -> int:
    """Megatron's ``fill_empty_gpus_once`` until no rank is empty: the first group (creation
    order) of the smallest size that has room doubles, later groups shift right. Returns the ranks
    left idle because the smallest size already is ``max_cp``."""
    allocated = sum(g.size for g in groups)
    while allocated < total:
        smallest = min(g.size for g in groups)
        if smallest >= max_cp:
            return total - allocated
        grow = min(2 * smallest, total) - smallest
        for g in groups:
            end = g.start + g.size - 1
            if g.size != smallest or end + 1 > allocated or end + grow >= total:
                continue
            for other in groups:
                if other.start > end:
                    other.start += grow
            g.size += grow
            g.load = sum(_work(length, g.size) for length in g.lengths)
            allocated += grow
            break
        else:
            raise AssertionError("a power-of-two DPxCP size always has a group to double")
    return 0


def megatron_dcp_plan(
    lengths: Sequence[int], cm: CostModel, *, max_seqlen_per_rank: int | None = None, min_cp_size: int = 1
) -> Plan:
    """Megatron-Core dynamic context parallelism's schedule of one global batch (see the module
    docstring for the source read: ``DefaultDynamicCPScheduler.get_groups_and_subsamples`` and
    ``next_hdp_group_packing_aware``), priced by ``cm``.

    max_seqlen_per_rank: Megatron's ``max_seqlen_per_dp_cp_rank`` (default: C, the tokens one
    device holds under ``cm``); min_cp_size: its ``min_dynamic_context_parallel_size``.
    ValueError when a sequence fits no group (longer than the largest runnable CP size x m).
    """
    t0 = time.perf_counter()
    arr = check_lengths(lengths, cm)
    m = int(max_seqlen_per_rank or cm.capacity_tokens)
    if m < 1 or m > cm.capacity_tokens:
        raise UserError(f"max_seqlen_per_rank must be in 1..{cm.capacity_tokens} (C of {cm.name}), got {m}")
    max_cp = max(usable_degrees(cm))
    if min_cp_size < 1 or min_cp_size & (min_cp_size - 1) or min_cp_size > max_cp:
        raise UserError(f"min_cp_size must be a power of two in 1..{max_cp}, got {min_cp_size}")
    too_long = [i for i, length in enumerate(arr.tolist()) if dcp_gpus_needed(length, m) > max_cp]
    if too_long:
        raise UserError(
            f"sequences {too_long[:5]} of lengths {arr[too_long[:5]].tolist()} fit no CP group: "
            f"longest holds {max_cp} ranks x {m} tokens = {max_cp * m}"
        )
    # Python's sort is stable with reverse=True, as Megatron's sorted(..., reverse=True)
    remaining = sorted(enumerate(arr.tolist()), key=lambda s: s[1], reverse=True)
    micro_batches, capped, sizes = [], 0, []
    while remaining:
        groups, remaining, idle = next_micro_batch(remaining, cm.num_devices, m, min_cp_size, max_cp)
        capped += bool(idle)
        starts = layout_ranks([g.size for g in groups], cm.num_devices)
        assert starts == [g.start for g in groups], "Megatron's layout is the aligned biggest-first one"
        micro_batches.append([(g.size, g.ids) for g in groups])
        sizes.append([g.size for g in groups])
    return build_plan(
        micro_batches,
        arr.tolist(),
        cm,
        method="megatron-dcp",
        solve_seconds=time.perf_counter() - t0,
        extra={
            "max_seqlen_per_rank": m,
            "min_cp_size": min_cp_size,
            "max_cp_size": max_cp,
            "capped_fills": capped,
            "source": "Megatron-LM dev d48bd6be: DefaultDynamicCPScheduler / next_hdp_group_packing_aware",
        },
    )
