"""The planner's MILP (HiGHS via scipy.optimize.milp): where and at which degree long sequences run.

Reformulation. Exact per-sequence, per-group MILPs (the official planner's, one per micro-batch)
are large and still optimise micro-batches one at a time. Ours makes the decisions that matter
across micro-batches exactly and treats the rest as a fluid:

* the K longest-running sequences ("long") each get a binary choice z[i, j, k]: micro-batch j,
  SP degree k (only degrees whose devices hold the sequence);
* the remaining short sequences are a fluid: micro-batch j takes a share f_j of their work and
  tokens (they are small next to a device's capacity, so first-fit packs them almost perfectly);
* tau_j is micro-batch j's load cap (its time minus the overhead b), and

    minimise   sum_j tau_j
    s.t.       sum_{j,k} z[i,j,k] = 1                                  every long sequence placed
               tau_j >= time[k,i] * z[i,j,k]                           no group slower than the cap
               sum_{i,k} work[k,i] z[i,j,k] + f_j * W_short <= N tau_j device-time of the micro-batch
               sum_{i,k} L_i z[i,j,k] + f_j * T_short <= fill * N * C  memory of the micro-batch
               sum_{i,k} sp_k z[i,j,k] <= N                             devices for the long groups
               sum_j f_j = 1,  tau_1 >= tau_2 >= ... (symmetry breaking)

The solution fixes each long sequence's micro-batch and degree; ``packing.solve_micro_batch``
then packs every micro-batch exactly. HiGHS gets a time limit; whatever incumbent it has is used.
"""
from __future__ import annotations

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp
from scipy.sparse import coo_matrix

from .packing import Workload


def long_short_split(wl: Workload, max_long: int) -> tuple[list[int], list[int]]:
    """Long: every sequence that needs SP > 1, then the most work, up to ``max_long``."""
    n = len(wl.lengths)
    order = sorted(range(n), key=lambda i: (-wl.min_work[i], i))
    need_sp = [i for i in order if not wl.fits[0, i]]
    rest = [i for i in order if wl.fits[0, i]]
    long_ids = (need_sp + rest)[:max(max_long, 0)]
    chosen = set(long_ids)
    return long_ids, [i for i in range(n) if i not in chosen]


def solve_long_placement(wl: Workload, m: int, long_ids: list[int], short_ids: list[int],
                         time_limit: float, fill: float = 0.97):
    """Solve the MILP above. Returns (objective, {seq: (mb, degree index)}, shares f) or None."""
    if not long_ids:
        return None
    n_dev, cap = wl.cm.num_devices, wl.cap
    degrees = wl.degrees
    w_short = float(sum(wl.time[0, i] for i in short_ids))  # shorts run at SP=1 (no comm)
    t_short = float(sum(wl.lengths[i] for i in short_ids))
    # variable layout: z (per long seq, mb, feasible degree) | tau_j (m) | f_j (m)
    zvars = [(i, j, k) for i in long_ids for j in range(m) for k in range(len(degrees)) if wl.fits[k, i]]
    nz = len(zvars)
    tau0, f0 = nz, nz + m
    nvar = nz + 2 * m
    rows, cols, vals, lo, hi = [], [], [], [], []
    r = 0

    def add_row(entries, lb, ub):
        nonlocal r
        for c, v in entries:
            rows.append(r), cols.append(c), vals.append(v)
        lo.append(lb), hi.append(ub)
        r += 1

    by_seq: dict[int, list[int]] = {}
    by_mb: dict[int, list[int]] = {j: [] for j in range(m)}
    for v, (i, j, k) in enumerate(zvars):
        by_seq.setdefault(i, []).append(v)
        by_mb[j].append(v)
    for i in long_ids:
        add_row([(v, 1.0) for v in by_seq[i]], 1.0, 1.0)
    for v, (i, j, k) in enumerate(zvars):  # tau_j - time * z >= 0
        add_row([(tau0 + j, 1.0), (v, -float(wl.time[k, i]))], 0.0, np.inf)
    for j in range(m):
        vs = by_mb[j]
        add_row([(v, float(wl.work[zvars[v][2], zvars[v][0]])) for v in vs]
                + [(f0 + j, w_short), (tau0 + j, -float(n_dev))], -np.inf, 0.0)
        add_row([(v, float(wl.lengths[zvars[v][0]])) for v in vs] + [(f0 + j, t_short)],
                -np.inf, fill * n_dev * cap)
        add_row([(v, float(degrees[zvars[v][2]])) for v in vs], -np.inf, float(n_dev))
        if j + 1 < m:
            add_row([(tau0 + j, 1.0), (tau0 + j + 1, -1.0)], 0.0, np.inf)
    add_row([(f0 + j, 1.0) for j in range(m)], 1.0, 1.0)
    a = coo_matrix((vals, (rows, cols)), shape=(r, nvar)).tocsr()
    c = np.zeros(nvar)
    c[tau0:tau0 + m] = 1.0
    integrality = np.zeros(nvar)
    integrality[:nz] = 1
    lb = np.zeros(nvar)
    ub = np.full(nvar, np.inf)
    ub[:nz] = 1.0
    ub[f0:] = 1.0
    res = milp(c, constraints=LinearConstraint(a, lo, hi), integrality=integrality,
               bounds=Bounds(lb, ub),
               options={"time_limit": max(time_limit, 0.01), "disp": False, "mip_rel_gap": 1e-3})
    if res.x is None:
        return None
    x = res.x
    placement = {}
    for v, (i, j, k) in enumerate(zvars):
        if x[v] > 0.5:
            placement[i] = (j, k)
    if len(placement) != len(long_ids):
        return None
    return float(res.fun), placement, np.clip(x[f0:f0 + m], 0.0, 1.0)


def distribute_shorts(wl: Workload, short_ids: list[int], shares: np.ndarray, long_work: np.ndarray) -> list[list[int]]:
    """Deal short sequences to micro-batches so each gets its MILP share of the short work:
    longest first, each to the micro-batch furthest below its target."""
    m = len(shares)
    total = float(sum(wl.time[0, i] for i in short_ids))
    deficit = shares * total
    out: list[list[int]] = [[] for _ in range(m)]
    for i in sorted(short_ids, key=lambda i: (-wl.time[0, i], i)):
        j = int(np.argmax(deficit))
        out[j].append(i)
        deficit[j] -= wl.time[0, i]
    return out
