"""The planner's MILPs, solved with HiGHS through ``scipy.optimize.milp``.

Two models, each used where it is tractable:

* ``solve_exact`` — the whole problem, exactly, for small instances (few sequences, few devices):
  binary u[j, s] "aligned block s is a group in micro-batch j", x[i, j, s] "sequence i runs in
  that group", tau_j the micro-batch time:

      minimise  sum_j tau_j
      s.t.      sum_{j,s} x[i,j,s] = 1                      every sequence exactly once
                x[i,j,s] <= u[j,s]                          only in an open group
                sum_{s contains r} u[j,s] <= 1              a rank is in one group per micro-batch
                sum_i L_i x[i,j,s] <= sp_s * C              memory
                tau_j >= b u[j,s] + sum_i t_s(L_i) x[i,j,s] the slowest group sets the time
                tau_j >= tau_{j+1}                          symmetry breaking

  HiGHS proves optimality (or returns its dual bound), which gives small plans a certificate.

* ``reassign_micro_batch`` — large instances: one micro-batch, its groups (degrees) fixed by the
  packer; re-deal its sequences to those groups to minimise the slowest group. The largest
  sequences are individual binaries; the rest are bucketed into length classes with integer
  counts per group (priced at the class's largest length for memory, its mean for time), then
  mapped back to real sequences and priced exactly. Only a strictly faster, valid result is used.
"""
from __future__ import annotations

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp
from scipy.sparse import coo_matrix

from .packing import Workload


class _Rows:
    """Sparse constraint rows built incrementally."""

    def __init__(self):
        self.rows, self.cols, self.vals, self.lo, self.hi = [], [], [], [], []

    def add(self, entries, lo, hi):
        r = len(self.lo)
        for c, v in entries:
            self.rows.append(r)
            self.cols.append(c)
            self.vals.append(float(v))
        self.lo.append(lo)
        self.hi.append(hi)

    def constraint(self, nvar):
        a = coo_matrix((self.vals, (self.rows, self.cols)), shape=(len(self.lo), nvar)).tocsr()
        return LinearConstraint(a, self.lo, self.hi)


def exact_size(n_seq: int, n_dev: int, max_mbs: int) -> int:
    """Binary variables ``solve_exact`` would create (an upper estimate)."""
    return max_mbs * (2 * n_dev - 1) * (n_seq + 1)


def solve_exact(wl: Workload, max_mbs: int, time_limit: float, node_limit: int = 20000):
    """Solve the full MILP. Returns (status, objective, dual bound, micro-batches) or None.

    micro-batches: list of [(sp, [seq ids]), ...]; status "optimal" or "feasible".
    """
    n, n_dev, cap, b = len(wl.lengths), wl.cm.num_devices, wl.cap, wl.cm.b
    blocks = [(k, sp, start) for k, sp in enumerate(wl.degrees) for start in range(0, n_dev, sp)]
    m = max_mbs
    u_index = {(j, s): j * len(blocks) + s for j in range(m) for s in range(len(blocks))}
    x_index = {}
    for j in range(m):
        for s, (k, sp, _) in enumerate(blocks):
            for i in range(n):
                if wl.fits[k, i]:
                    x_index[i, j, s] = len(u_index) + len(x_index)
    tau0 = len(u_index) + len(x_index)
    nvar = tau0 + m
    rows = _Rows()
    for i in range(n):
        rows.add([(v, 1) for (ii, _, _), v in x_index.items() if ii == i], 1, 1)
    for (i, j, s), v in x_index.items():
        rows.add([(v, 1), (u_index[j, s], -1)], -np.inf, 0)
    for j in range(m):
        for r in range(n_dev):
            rows.add([(u_index[j, s], 1) for s, (_, sp, st) in enumerate(blocks) if st <= r < st + sp], -np.inf, 1)
        for s, (k, sp, _) in enumerate(blocks):
            members = [(i, x_index[i, j, s]) for i in range(n) if (i, j, s) in x_index]
            rows.add([(v, wl.lengths[i]) for i, v in members], -np.inf, sp * cap)
            rows.add([(tau0 + j, 1), (u_index[j, s], -(b + wl.latency[k]))] + [(v, -wl.time[k, i]) for i, v in members],
                     0, np.inf)
        if j + 1 < m:
            rows.add([(tau0 + j, 1), (tau0 + j + 1, -1)], 0, np.inf)
    c = np.zeros(nvar)
    c[tau0:] = 1.0
    integrality = np.ones(nvar)
    integrality[tau0:] = 0
    ub = np.ones(nvar)
    ub[tau0:] = np.inf
    res = milp(c, constraints=rows.constraint(nvar), integrality=integrality, bounds=Bounds(np.zeros(nvar), ub),
               options={"time_limit": max(time_limit, 0.05), "node_limit": node_limit, "disp": False,
                        "mip_rel_gap": 1e-6})
    if res.x is None:
        return None
    mbs = []
    for j in range(m):
        groups = []
        for s, (k, sp, _) in enumerate(blocks):
            ids = [i for i in range(n) if (i, j, s) in x_index and res.x[x_index[i, j, s]] > 0.5]
            if ids:
                groups.append((sp, ids))
        if groups:
            mbs.append(groups)
    status = "optimal" if res.status == 0 else "feasible"
    bound = float(getattr(res, "mip_dual_bound", None) or 0.0)
    return status, float(res.fun), bound if status != "optimal" else float(res.fun), mbs


def reassign_micro_batch(wl: Workload, groups: list, time_limit: float, n_individual: int = 12,
                         n_buckets: int = 12, node_limit: int = 2000):
    """Re-deal one micro-batch's sequences over its fixed groups (see module docstring).

    groups: [(sp, [ids]), ...]. Returns a faster [(sp, [ids]), ...] or None.
    """
    cap = wl.cap
    ids = sorted((i for _, g in groups for i in g), key=lambda i: (-wl.lengths[i], i))
    degs = [sp for sp, _ in groups]
    ks = [sp.bit_length() - 1 for sp in degs]
    ng = len(groups)
    current = max(wl.time[k, g].sum() + wl.latency[k] for k, (_, g) in zip(ks, groups))
    singles = ids[:n_individual]
    rest = ids[n_individual:]
    classes = [list(c) for c in np.array_split(np.array(rest, dtype=np.int64), min(n_buckets, len(rest)))] if rest else []
    classes = [c for c in classes if len(c)]
    items = [[i] for i in singles] + classes          # each item: a list of interchangeable ids
    nvar_x = len(items) * ng
    t_var = nvar_x
    rows = _Rows()
    for a, members in enumerate(items):
        rows.add([(a * ng + g, 1) for g in range(ng)], len(members), len(members))
    for g in range(ng):
        k = ks[g]
        mem = [(a * ng + g, max(wl.lengths[i] for i in members)) for a, members in enumerate(items)]
        rows.add(mem, -np.inf, degs[g] * cap)
        tim = [(a * ng + g, -float(np.mean([wl.time[k, i] for i in members]))) for a, members in enumerate(items)]
        rows.add([(t_var, 1)] + tim, float(wl.latency[k]), np.inf)
    ub = np.array([len(members) for members in items for _ in range(ng)] + [np.inf], dtype=float)
    for a, members in enumerate(items):  # a sequence only where its group's memory holds it
        for g in range(ng):
            if max(wl.lengths[i] for i in members) > degs[g] * cap:
                ub[a * ng + g] = 0
    c = np.zeros(nvar_x + 1)
    c[t_var] = 1.0
    integrality = np.ones(nvar_x + 1)
    integrality[t_var] = 0
    res = milp(c, constraints=rows.constraint(nvar_x + 1), integrality=integrality,
               bounds=Bounds(np.zeros(nvar_x + 1), ub),
               options={"time_limit": max(time_limit, 0.02), "node_limit": node_limit, "disp": False,
                        "mip_rel_gap": 1e-4})
    if res.x is None:
        return None
    counts = np.rint(res.x[:nvar_x]).astype(np.int64).reshape(len(items), ng)
    new = [[] for _ in range(ng)]
    for a, members in enumerate(items):
        pool = list(members)  # largest first: the MILP's memory row priced every one at the largest
        for g in range(ng):
            new[g].extend(pool[:counts[a, g]])
            pool = pool[counts[a, g]:]
        if pool:
            return None
    out = [(degs[g], new[g]) for g in range(ng) if new[g]]
    for g in range(ng):
        if sum(wl.lengths[i] for i in new[g]) > degs[g] * cap:
            return None
    span = max(wl.time[k, new[g]].sum() + wl.latency[k] for g, k in enumerate(ks) if new[g])
    return out if span < current - 1e-6 else None
