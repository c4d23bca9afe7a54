"""A re-implementation of the official FlexSP planner (the comparison point of our benchmarks).

The official planner (PKU-DAIR/Hetu-Galvatron, ``flexsp`` branch; see
``shared/reference/flexsp-paper.md``) works in three steps, reproduced here:

1. Micro-batches: sort the global batch by length (descending) and split it into m contiguous
   chunks with a DP that minimises the largest chunk's token count. The smallest m is
   ceil(tokens / (N * C)), raised until every chunk is below N * C tokens; m, m+1, ..., m+4 are
   each solved (the official code runs them in parallel processes) and the fastest plan is kept.
2. Buckets, per micro-batch: the chunk's lengths are grouped by a DP that minimises padding
   (16 buckets, more while the padded tokens exceed (tokens + N*C) / 2); a bucket is priced and
   sized at its longest member.
3. One MILP per micro-batch: integer A[k, p] = sequences of bucket k in group slot p, binary
   m[p] = slot p used, continuous M; minimise M subject to every bucket placed, slot memory
   (sum_k boundary_k * A[k,p] <= sp_p * C), slot time (sum_k t(boundary_k, sp_p) A[k,p] + b <= M),
   used slots non-empty and unused ones empty, sum_p sp_p m[p] = N (all GPUs used), and A[k,p] = 0
   where sp_p is below bucket k's minimum degree. Slots are SP sizes 2..N only (never SP=1), N/sp
   slots per size, pruned as the official code does when long sequences force big groups.
   The bucketed counts are then mapped back to real sequences (each bucket's sequences dealt to
   its slots in order).

What differs from the original:
- HiGHS (``scipy.optimize.milp``) instead of SCIP, with a short time limit per MILP (default 1 s,
  the official code uses 10 s), run one after another rather than in parallel processes.
- No MILP warm start (scipy's milp has none): the official warm start is a balanced homogeneous
  solution per SP size; we compute the same homogeneous solutions, bound M by the best of them
  (only better solutions are sought) and keep the better of them and the MILP's answer, which is
  what a warm-started solver returns at worst. If the MILP finds nothing better in time, that
  homogeneous solution is used (the official code would add a micro-batch when SCIP finds none).
  With time limits well under a second most micro-batches end there: the MILP needs ~1-10 s to
  beat the homogeneous solution on micro-batches of 10-20 sequences.
- Symmetry breaking among equal-size slots (m[p] >= m[p+1]) and memory-implied upper bounds on
  A[k, p]; both only speed the search.
- Slots use only the SP sizes some attention mode can run (``cm.attention_modes``; with the paper's
  64 heads, all of 2..64).
- Plans are priced by ``build.build_plan`` with real (unpadded) lengths, like every other planner.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp
from scipy.sparse import lil_matrix

from .build import build_plan
from .costmodel import CostModel
from .errors import UserError
from .plan import Plan
from .schedules import check_lengths, usable_degrees

NUM_BUCKETS = 16
EXTRA_MICRO_BATCHES = 4


def chunk_global_batch(
    lengths: np.ndarray, order: list[int], m: int, should_stop=None
) -> list[list[int]] | None:
    """Split ``order`` (ids, longest first) into m contiguous chunks minimising the largest token sum.

    The official DP: dp[i][k] = min over j of max(dp[j][k-1], tokens(j..i)), first minimiser kept.
    ``should_stop`` (optional, asked once per chunk count k): True abandons the DP (returns None).
    """
    n = len(order)
    prefix = np.concatenate([[0], np.cumsum([int(lengths[i]) for i in order])]).astype(np.float64)
    dp = np.full((n + 1, m + 1), np.inf)
    part = np.zeros((n + 1, m + 1), dtype=np.int64)
    dp[0, 0] = 0.0
    for k in range(1, m + 1):
        if should_stop is not None and should_stop():
            return None
        for i in range(k, n + 1):
            j = np.arange(k - 1, i)
            cost = np.maximum(dp[j, k - 1], prefix[i] - prefix[j])
            best = int(np.argmin(cost))
            dp[i, k], part[i, k] = cost[best], j[best]
    chunks, idx = [], n
    for k in range(m, 0, -1):
        start = int(part[idx, k])
        chunks.append(order[start:idx])
        idx = start
    return [c for c in reversed(chunks) if c]


def bucket_lengths(lens: np.ndarray, num_buckets: int) -> list[tuple[int, np.ndarray]]:
    """DP bucketing of sorted-ascending ``lens`` into <= num_buckets runs minimising total padding.

    Returns (boundary, positions) per bucket, boundary = the run's largest length.
    """
    n = len(lens)
    B = min(num_buckets, n)
    prefix = np.concatenate([[0], np.cumsum(lens)]).astype(np.float64)
    dp = np.full((n + 1, B + 1), np.inf)
    arg = np.zeros((n + 1, B + 1), dtype=np.int64)
    dp[0, 0] = 0.0
    for b in range(1, B + 1):
        for i in range(1, n + 1):
            j = np.arange(0, i)
            cost = dp[j, b - 1] + lens[i - 1] * (i - j) - (prefix[i] - prefix[j])
            best = int(np.argmin(cost))
            dp[i, b], arg[i, b] = cost[best], j[best]
    b_best = int(np.argmin(dp[n, 1:])) + 1
    out, i = [], n
    for b in range(b_best, 0, -1):
        j = int(arg[i, b])
        out.append((int(lens[i - 1]), np.arange(j, i)))
        i = j
        if i == 0:
            break
    return list(reversed(out))


def _sp_options(lens: Sequence[int], cm: CostModel) -> list[int]:
    """Group slots, SP 2..N (never 1), pruned as officially: room left by the biggest forced groups."""
    n, cap = cm.num_devices, cm.capacity_tokens
    min_sp = [max(1, 1 << max(0, math.ceil(math.log2(max(1, math.ceil(L / cap)))))) for L in lens]
    sp_max = max(min_sp)
    cnt_max = min_sp.count(sp_max)
    slots = []
    for sp in (d for d in usable_degrees(cm) if d >= 2):
        num = (n - sp_max * cnt_max) // sp if sp < sp_max else n // sp
        slots += [sp] * max(0, num)
    return slots


def _homogeneous(bounds: list[int], counts: list[int], sp: int, cm: CostModel):
    """Balanced homogeneous solution (the official warm start): N/sp groups of degree sp, buckets
    dealt longest-first to the least-loaded group with memory; (M, slot assignment) or None."""
    P = cm.num_devices // sp
    cap = sp * cm.capacity_tokens
    load, tok = [0.0] * P, [0] * P
    assign = [[0] * P for _ in bounds]
    for k in sorted(range(len(bounds)), key=lambda k: -bounds[k]):
        t = cm.seq_time_ms(bounds[k], sp)
        for _ in range(counts[k]):
            ok = [p for p in range(P) if tok[p] + bounds[k] <= cap]
            if not ok:
                return None
            p = min(ok, key=lambda p: (load[p], p))
            load[p] += t
            tok[p] += bounds[k]
            assign[k][p] += 1
    if sum(counts) < P:  # every GPU used by a non-empty group
        return None
    return max(load) + cm.b, [sp] * P, assign


def _solve_milp(bounds, counts, slots, cm: CostModel, time_limit: float, cutoff: float = np.inf):
    """The official bucketed MILP; (M, slots, assign[k][p], status) or None when no solution in time.

    ``cutoff`` bounds M from above (the warm start's objective: only better solutions are sought).
    """
    K, P = len(bounds), len(slots)
    cap, total = cm.capacity_tokens, sum(counts)
    nv = K * P + P + 1  # A[k,p] at k*P+p, m[p] at K*P+p, M last
    c = np.zeros(nv)
    c[-1] = 1.0
    lb, ub = np.zeros(nv), np.full(nv, np.inf)
    integrality = np.ones(nv)
    integrality[-1] = 0
    for k in range(K):
        min_sp = cm.min_degree(bounds[k])
        for p in range(P):
            fit = (slots[p] * cap) // bounds[k]  # memory alone caps the count
            ub[k * P + p] = min(counts[k], fit) if slots[p] >= min_sp else 0
    ub[K * P : K * P + P] = 1
    ub[-1] = cutoff
    rows = K + 3 * P + 1 + sum(slots[p] == slots[p + 1] for p in range(P - 1))
    A = lil_matrix((rows, nv))
    lo, hi = np.zeros(rows), np.zeros(rows)
    r = 0
    for k in range(K):  # every bucket placed
        for p in range(P):
            A[r, k * P + p] = 1
        lo[r] = hi[r] = counts[k]
        r += 1
    for p in range(P):
        sp = slots[p]
        for k in range(K):  # memory
            A[r, k * P + p] = bounds[k]
        lo[r], hi[r] = -np.inf, sp * cap
        r += 1
        for k in range(K):  # time <= M
            A[r, k * P + p] = cm.seq_time_ms(bounds[k], sp)
        A[r, nv - 1] = -1
        lo[r], hi[r] = -np.inf, -cm.b
        r += 1
        for k in range(K):  # sum_k A[k,p] <= total * m[p] (empty unless used)
            A[r, k * P + p] = 1
        A[r, K * P + p] = -total
        lo[r], hi[r] = -total, 0
        r += 1
    for p in range(P):  # all GPUs used
        A[r, K * P + p] = slots[p]
    lo[r] = hi[r] = cm.num_devices
    r += 1
    for p in range(P - 1):  # symmetry breaking among equal slots
        if slots[p] == slots[p + 1]:
            A[r, K * P + p], A[r, K * P + p + 1] = 1, -1
            lo[r], hi[r] = 0, 1
            r += 1
    nonempty = lil_matrix((P, nv))  # sum_k A[k,p] - m[p] >= 0
    for p in range(P):
        for k in range(K):
            nonempty[p, k * P + p] = 1
        nonempty[p, K * P + p] = -1
    cons = [LinearConstraint(A.tocsr(), lo, hi), LinearConstraint(nonempty.tocsr(), 0, np.inf)]
    res = milp(
        c,
        constraints=cons,
        integrality=integrality,
        bounds=Bounds(lb, ub),
        options={"time_limit": time_limit, "disp": False},
    )
    if res.x is None:
        return None
    x = np.round(res.x).astype(np.int64)
    used = [p for p in range(P) if x[K * P + p] == 1]
    assign = [[int(x[k * P + p]) for p in used] for k in range(K)]
    ok = "optimal" if res.status == 0 else "time-limit"
    return float(res.x[-1]), [slots[p] for p in used], assign, ok


def solve_micro_batch(
    ids: list[int], lengths: np.ndarray, cm: CostModel, time_limit: float, num_buckets: int = NUM_BUCKETS
):
    """Bucket, solve the MILP (homogeneous fallback), map back: ([(sp, ids)], status) or None."""
    ids = sorted(ids, key=lambda i: (int(lengths[i]), i))
    lens = np.array([int(lengths[i]) for i in ids], dtype=np.int64)
    thresh = (lens.sum() + cm.num_devices * cm.capacity_tokens) / 2
    B = min(num_buckets, len(lens))
    while True:
        buckets = bucket_lengths(lens, B)
        if sum(bd * len(pos) for bd, pos in buckets) <= thresh or B >= len(lens):
            break
        B += 1
    bounds = [bd for bd, _ in buckets]
    counts = [len(pos) for _, pos in buckets]
    slots = _sp_options(lens.tolist(), cm)
    cands = [h for sp in sorted(set(slots)) if (h := _homogeneous(bounds, counts, sp, cm))]
    best = min(cands, key=lambda h: h[0]) if cands else None
    status = "homogeneous"
    cutoff = best[0] if best else np.inf
    sol = _solve_milp(bounds, counts, slots, cm, time_limit, cutoff) if slots else None
    if sol is not None and (best is None or sol[0] < best[0] - 1e-6):
        best, status = sol[:3], sol[3]
    if best is None:
        return None
    _, sps, assign = best
    groups = [[] for _ in sps]
    for k, (_, pos) in enumerate(buckets):
        members = [ids[j] for j in pos][::-1]  # longest first
        for p, cnt in enumerate(assign[k]):
            groups[p] += members[:cnt]
            members = members[cnt:]
    return [(sp, g) for sp, g in zip(sps, groups)], status


def official_flexsp_plan(
    lengths: Sequence[int],
    cm: CostModel,
    time_limit_per_milp: float = 1.0,
    extra_micro_batches: int = EXTRA_MICRO_BATCHES,
) -> Plan:
    """The official FlexSP planner's plan for one global batch (see the module docstring)."""
    t0 = time.perf_counter()
    arr = check_lengths(lengths, cm)
    if cm.num_devices < 2:
        raise UserError(f"the official planner uses SP sizes 2..N; N={cm.num_devices} has none")
    order = sorted(range(len(arr)), key=lambda i: (-int(arr[i]), i))
    cluster = cm.num_devices * cm.capacity_tokens
    m = max(1, math.ceil(int(arr.sum()) / cluster))
    while m < len(arr) and any(
        sum(int(arr[i]) for i in c) >= cluster for c in chunk_global_batch(arr, order, m)
    ):
        m += 1
    best, best_ms, tried, statuses = None, math.inf, [], {}
    m_hi = m + extra_micro_batches
    while m <= min(m_hi, len(arr)) or (best is None and m <= len(arr)):
        mbs, stats = [], []
        for chunk in chunk_global_batch(arr, order, m):
            sol = solve_micro_batch(chunk, arr, cm, time_limit_per_milp)
            if sol is None:
                mbs = None
                break
            mbs.append(sol[0])
            stats.append(sol[1])
        if mbs is not None:
            plan = build_plan(mbs, arr.tolist(), cm, method="official-flexsp")
            tried.append((m, plan.predicted_ms))
            if plan.predicted_ms < best_ms:
                best, best_ms, statuses = mbs, plan.predicted_ms, {s: stats.count(s) for s in set(stats)}
        m += 1
    if best is None:
        raise UserError(f"official planner found no feasible plan for {len(arr)} sequences on {cm.name}")
    return build_plan(
        best,
        arr.tolist(),
        cm,
        method="official-flexsp",
        solve_seconds=time.perf_counter() - t0,
        status="optimal" if set(statuses) == {"optimal"} else "feasible",
        extra={
            "micro_batches_tried": tried,
            "milp_status": statuses,
            "time_limit_per_milp": time_limit_per_milp,
        },
    )
