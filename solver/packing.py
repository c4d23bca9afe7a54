"""Two-resource first-fit packing of sequences into SP groups inside micro-batches.

The core move of the planner: given a load cap ``tau`` (ms of per-group work, the micro-batch time
minus the overhead b), pack every sequence, longest-running first, into a group whose load and
memory still have room, or open the cheapest new group (the smallest degree whose devices hold it
and run it within ``tau``) in a micro-batch with free devices. Any multiset of power-of-two degrees
that sums to <= N has an aligned layout (``build.layout_ranks``), so a micro-batch only tracks its
free device count.

Sequences that cannot run within ``tau`` at any degree ("giants") open a micro-batch of their own
whose cap is the giant's time at the degree ``giant_stretch`` picks; later sequences fill it up to
that cap. With ``giant_stretch > 1`` the same applies to sequences that would need more than their
least-work degree to meet ``tau`` (a longer micro-batch instead of more all-to-all). ``pack`` is
the feasibility test the planner bisects ``tau`` over; ``solve_micro_batch`` packs one
micro-batch on its own.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

import numpy as np

from .costmodel import CostModel


class Workload:
    """Per-sequence numbers the packer needs, precomputed once per batch.

    ``time[k][i]`` is what sequence i adds to a group of degree ``degrees[k]`` (no overhead b).
    """

    def __init__(self, lengths, cm: CostModel):
        self.cm = cm
        self.lengths = np.asarray(lengths, dtype=np.int64)
        self.degrees = cm.degrees
        self.cap = cm.capacity_tokens
        L = self.lengths.astype(np.float64)
        # degrees no attention mode can run (e.g. Ulysses past the head count) are never used
        usable = np.array([bool(cm.attention_modes(d)) for d in self.degrees])
        self.time = np.stack(
            [cm.seq_time_ms(L, d) if ok else np.full_like(L, np.inf) for d, ok in zip(self.degrees, usable)]
        )  # [degrees, n]
        fits = (self.lengths[None, :] <= np.array(self.degrees)[:, None] * self.cap) & usable[:, None]
        self.fits = fits
        # device-ms of work at each degree (inf where memory does not allow that degree)
        work = self.time * np.array(self.degrees, dtype=np.float64)[:, None]
        self.work = np.where(fits, work, np.inf)
        self.min_work = self.work.min(axis=0)
        self.min_time = np.where(fits, self.time, np.inf).min(axis=0)
        # fixed time a new group of each degree starts with (beyond b, which every group pays)
        self.latency = np.array(
            [cm.group_overhead_ms(d) - cm.b if ok else 0.0 for d, ok in zip(self.degrees, usable)]
        )


@dataclass
class Group:
    sp: int
    load: float = 0.0
    tokens: int = 0
    ids: list = field(default_factory=list)


@dataclass
class MicroBatch:
    cap: float
    free: int
    groups: list = field(default_factory=list)

    @property
    def makespan(self) -> float:
        return max((g.load for g in self.groups), default=0.0)


def pack(
    wl: Workload, order, tau: float, max_mbs: int, giant_stretch: float = 1.0, clock=None
) -> list[MicroBatch] | None:
    """First-fit-decreasing under load cap ``tau`` into at most ``max_mbs`` micro-batches.

    Returns None if they do not suffice. Each sequence joins the open group with the least load
    slack left that has room (best fit), else opens a group of the smallest degree that holds it
    within a cap, in the fullest micro-batch with enough free devices, else in a new micro-batch.
    giant_stretch: a sequence that exceeds ``tau`` at every degree opens a micro-batch of its own
    at the smallest degree whose time is within ``giant_stretch * tau`` (leaving room for others
    beside it), or else at the degree that minimises its time; that micro-batch's cap becomes the
    giant's time. Vectorised over open groups with NumPy. ``clock``: the planner's time box;
    once ``clock.expired()`` (asked every 128 sequences) the packing is abandoned (None).
    """
    n_dev, cap, degrees, lat = wl.cm.num_devices, wl.cap, wl.degrees, wl.latency
    order = np.asarray(order, dtype=np.int64)
    n = len(order)
    max_groups = min(max_mbs * n_dev, n)
    g_mb = np.zeros(max_groups, dtype=np.int64)
    g_k = np.zeros(max_groups, dtype=np.int64)
    g_cap = np.zeros(max_groups)
    g_load = np.zeros(max_groups)
    g_tok = np.zeros(max_groups, dtype=np.int64)
    g_captok = np.zeros(max_groups, dtype=np.int64)
    mb_cap = np.zeros(max_mbs)
    mb_free = np.zeros(max_mbs, dtype=np.int64)
    members: list[list[int]] = []
    # Groups that no remaining sequence can join (load slack below the least remaining time at
    # their degree, or token room below the shortest remaining length) leave the scan: the same
    # result as scanning every group, in time that no longer grows with the groups already full.
    suf_len = np.minimum.accumulate(wl.lengths[order][::-1])[::-1]
    suf_time = np.minimum.accumulate(wl.time[:, order][:, ::-1], axis=1)[:, ::-1]
    alive = np.zeros(max_groups, dtype=np.int64)
    na = 0
    ng = nm = 0
    lengths, fits, time_ = wl.lengths, wl.fits, wl.time
    for pos, i in enumerate(order.tolist()):
        if clock is not None and pos % 128 == 127 and clock.expired():
            return None
        if pos % 64 == 0 and na:
            act = alive[:na]
            keep = (g_cap[act] - g_load[act] >= suf_time[g_k[act], pos]) & (
                g_captok[act] - g_tok[act] >= suf_len[pos]
            )
            na = int(keep.sum())
            alive[:na] = act[keep]
        L = int(lengths[i])
        t = time_[:, i]
        if na:
            act = alive[:na]
            add = t[g_k[act]]
            slack = g_cap[act] - g_load[act] - add
            ok = (slack >= 0) & (g_tok[act] + L <= g_captok[act])
            if ok.any():
                j = int(act[int(np.argmin(np.where(ok, slack, np.inf)))])
                g_load[j] += t[g_k[j]]
                g_tok[j] += L
                members[j].append(i)
                continue
        target = -1
        feas = np.flatnonzero(fits[:, i])
        for k in feas:
            room = (mb_free[:nm] >= degrees[k]) & (t[k] + lat[k] <= mb_cap[:nm])
            if room.any():
                target = int(np.argmin(np.where(room, mb_free[:nm], np.iinfo(np.int64).max)))
                break
        if target < 0:
            if nm >= max_mbs:
                return None
            t = t + lat  # a new group's load starts with its latency
            within = [k for k in feas if t[k] <= tau]
            if within and (giant_stretch <= 1.0 or within[0] == feas[0]):
                k, mb_cap[nm] = within[0], tau
            else:  # a giant (or, when stretching, a sequence that would need more than its
                # least-work degree to meet tau) sets its own micro-batch's cap
                stretched = [k for k in feas if t[k] <= giant_stretch * tau]
                k = stretched[0] if stretched else int(feas[np.argmin(t[feas])])
                mb_cap[nm] = max(t[k], tau)
            mb_free[nm] = n_dev
            target, nm = nm, nm + 1
        g_mb[ng], g_k[ng], g_load[ng], g_tok[ng], g_captok[ng] = (
            target,
            k,
            time_[k, i] + lat[k],
            L,
            degrees[k] * cap,
        )
        g_cap[ng] = mb_cap[target]
        mb_free[target] -= degrees[k]
        members.append([i])
        alive[na] = ng
        na += 1
        ng += 1
    mbs = [MicroBatch(cap=float(mb_cap[j]), free=int(mb_free[j])) for j in range(nm)]
    for j in range(ng):
        mbs[g_mb[j]].groups.append(Group(degrees[g_k[j]], float(g_load[j]), int(g_tok[j]), members[j]))
    return mbs


def _join_best_fit(i, L, t, caps, g_k, g_load, g_tok, g_captok, members, ng) -> bool:
    """Add sequence i (L tokens, time t[k] at degree index k) to the open group left with the
    least load slack under its cap ``caps`` (scalar or per group) that has memory room; False if
    none has. Updates the group arrays in place."""
    add = t[g_k[:ng]]
    slack = caps - g_load[:ng] - add
    ok = (slack >= 0) & (g_tok[:ng] + L <= g_captok[:ng])
    if not ok.any():
        return False
    j = int(np.argmin(np.where(ok, slack, np.inf)))
    g_load[j] += add[j]
    g_tok[j] += L
    members[j].append(i)
    return True


def mbs_time(mbs: list[MicroBatch], b: float) -> float:
    return sum(mb.makespan + b for mb in mbs if mb.groups)


def pack_micro_batch(wl: Workload, ids, tau: float, min_sp: int = 1) -> list[Group] | None:
    """Pack the sequences ``ids`` (longest-running first) into groups of one micro-batch so that
    no group's load exceeds ``tau``; None when they need more than N devices.

    Vectorised over open groups: best fit on load slack among groups with room. New groups get
    the smallest degree >= ``min_sp`` that holds the sequence within ``tau`` (a larger ``min_sp``
    pools memory of several devices, which packs memory-bound batches tighter at some comm cost).
    """
    n_dev, cap = wl.cm.num_devices, wl.cap
    nk = len(wl.degrees)
    g_k = np.zeros(n_dev, dtype=np.int64)  # degree index of each open group
    g_load = np.zeros(n_dev)
    g_tok = np.zeros(n_dev, dtype=np.int64)
    g_captok = np.zeros(n_dev, dtype=np.int64)
    members: list[list[int]] = []
    ng, free = 0, n_dev
    k_floor = min_sp.bit_length() - 1
    for i in ids:
        L = int(wl.lengths[i])
        t = wl.time[:, i]
        if ng and _join_best_fit(i, L, t, tau, g_k, g_load, g_tok, g_captok, members, ng):
            continue
        for k in range(k_floor, nk):
            sp = wl.degrees[k]
            if sp > free:
                return None
            if wl.fits[k, i] and t[k] + wl.latency[k] <= tau:
                g_k[ng], g_load[ng], g_tok[ng], g_captok[ng] = k, t[k] + wl.latency[k], L, sp * cap
                members.append([i])
                ng += 1
                free -= sp
                break
        else:
            return None
    return [Group(wl.degrees[g_k[j]], float(g_load[j]), int(g_tok[j]), members[j]) for j in range(ng)]


def lpt_micro_batch(wl: Workload, ids, sp: int) -> list[Group] | None:
    """N/sp groups of degree sp; each sequence (longest-running first) to the least-loaded group
    with memory room (LPT). Balances well when memory, not time, is what binds."""
    n_groups, k = wl.cm.num_devices // sp, sp.bit_length() - 1
    if not wl.fits[k, list(ids)].all():
        return None
    load, tok = np.full(n_groups, float(wl.latency[k])), np.zeros(n_groups, dtype=np.int64)
    members: list[list[int]] = [[] for _ in range(n_groups)]
    cap = sp * wl.cap
    for i in ids:
        room = tok + wl.lengths[i] <= cap
        if not room.any():
            return None
        j = int(np.argmin(np.where(room, load, np.inf)))
        load[j] += wl.time[k, i]
        tok[j] += wl.lengths[i]
        members[j].append(i)
    return [Group(sp, float(load[j]), int(tok[j]), members[j]) for j in range(n_groups) if members[j]]


def solve_micro_batch(wl: Workload, ids, clock, rel_tol: float = 4e-3, target: float = np.inf):
    """Smallest-makespan packing of one micro-batch found by: bisecting the cap of the first-fit
    for each ``min_sp`` within a node, and LPT over equal groups of each degree. Only makespans
    below ``target`` (the packing we already have) are searched for. ``clock.expired()`` (the
    planner's time box) stops the search over ``min_sp`` once something was found.

    Returns (makespan, groups) or None when nothing below ``target`` was found.
    """
    ids = sorted(ids, key=lambda i: (-wl.min_time[i], i))
    n = wl.cm.num_devices
    lo0 = max(float(wl.min_time[ids].max()), float(wl.min_work[ids].sum()) / n)
    best = None
    if lo0 >= target:
        return None
    for sp in wl.degrees:
        if best is not None and clock.expired():
            break
        groups = lpt_micro_batch(wl, ids, sp)
        if groups is not None:
            span = max(g.load for g in groups)
            if best is None or span < best[0]:
                best = (span, groups)
    for min_sp in (1, 2, 4, 8):
        if min_sp > min(n, wl.cm.devices_per_node) or (best is not None and clock.expired()):
            break
        lo, hi = lo0 * (1 - 1e-9), lo0
        limit = min(target, best[0] if best else np.inf)
        groups = pack_micro_batch(wl, ids, hi, min_sp)
        while groups is None and hi < min(limit, 1e12) and not clock.expired():
            lo, hi = hi, min(hi * 1.25, limit)
            groups = pack_micro_batch(wl, ids, hi, min_sp)
        if groups is None:
            continue
        while hi - lo > rel_tol * hi and not clock.expired():
            mid = 0.5 * (lo + hi)
            g = pack_micro_batch(wl, ids, mid, min_sp)
            if g is None:
                lo = mid
            else:
                hi, groups = mid, g
        span = max(g.load for g in groups)
        if best is None or span < best[0]:
            best = (span, groups)
    return best if best is not None and best[0] < target else None


def quick_pack(wl: Workload, ids) -> list[list[tuple[int, list[int]]]]:
    """A valid plan of the sequences ``ids`` in O(n log n), the time box's safety net.

    Each sequence runs at its least-work degree. Sequences of one degree fill groups of
    ``degree * C`` tokens: each group takes the longest sequence left, then as many of the shortest
    left as still fit (one ``searchsorted`` per group). The groups, slowest first, fill
    micro-batches first-fit by free devices (a few micro-batches open at a time), so groups of
    similar time share a micro-batch. Returns [[(sp, ids), ...] per micro-batch].
    """

    ids = np.asarray(list(ids) if not isinstance(ids, (range, np.ndarray)) else ids, dtype=np.int64)
    n_dev, cap = wl.cm.num_devices, wl.cap
    k_best = np.argmin(wl.work[:, ids], axis=0)
    loads, sps, bins = [], [], []
    for k in np.unique(k_best).tolist():
        members = ids[k_best == k]
        members = members[np.lexsort((members, -wl.lengths[members]))]  # longest first, ties by id
        lens = wl.lengths[members]
        limit = int(wl.degrees[k]) * cap
        n = len(members)
        asc = np.concatenate([[0], np.cumsum(lens[::-1])]).tolist()  # shortest first
        order = members.tolist()
        lens_l = lens.tolist()
        t_desc = wl.time[k][members]
        cum_t = np.concatenate([[0.0], np.cumsum(t_desc)]).tolist()
        t_desc = t_desc.tolist()
        lat, sp = float(wl.latency[k]), int(wl.degrees[k])
        lo, hi = 0, n - 1
        while lo <= hi:
            q0 = n - 1 - hi
            c = bisect.bisect_right(asc, asc[q0] + limit - lens_l[lo]) - 1 - q0
            c = max(0, min(c, hi - lo))
            a, b = hi - c + 1, hi + 1
            bins.append([order[lo]] + order[a:b])
            loads.append(t_desc[lo] + (cum_t[b] - cum_t[a]) + lat)
            sps.append(sp)
            lo, hi = lo + 1, hi - c
    rank = sorted(range(len(bins)), key=lambda g: (-loads[g], -sps[g], bins[g][0]))
    mbs: list[list[tuple[int, list[int]]]] = []
    free: list[int] = []
    open_mbs: list[int] = []  # at most 8 micro-batches open at a time
    for g in rank:
        sp = sps[g]
        for j in open_mbs:
            if free[j] >= sp:
                break
        else:
            j = len(mbs)
            mbs.append([])
            free.append(n_dev)
            open_mbs.append(j)
            if len(open_mbs) > 8:
                open_mbs.pop(0)
        mbs[j].append((sp, bins[g]))
        free[j] -= sp
        if free[j] == 0:
            open_mbs.remove(j)
    return mbs
