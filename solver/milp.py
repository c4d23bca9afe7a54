"""The planner's MILPs: built once in a backend-neutral form (``MilpModel``: c, sparse A with row
bounds, variable bounds, integrality) and solved by HiGHS through ``scipy.optimize.milp``
(backend "highs", the default) or by any solver PuLP drives (backend "pulp": its bundled CBC by
default, or e.g. GUROBI_CMD / CPLEX_CMD where the user has them), so both backends solve the same
model. ``solve_model`` reports "optimal" only when the solver proved it (PuLP says "Optimal" when
CBC stops at its time limit: its ``sol_status`` tells the two apart) and whether the time limit,
not the node limit, ended the search (then the answer depends on the machine's speed).

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

import time
import warnings
from dataclasses import dataclass

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp
from scipy.sparse import coo_matrix, csr_matrix

from .errors import UserError
from .packing import Workload

MILP_BACKENDS = ("highs", "pulp")
DEFAULT_PULP_SOLVER = "PULP_CBC_CMD"


@dataclass
class MilpModel:
    """minimise c @ x  s.t.  row_lo <= A @ x <= row_hi,  lb <= x <= ub,  x[j] integer where
    integrality[j] == 1. The one form every backend solves."""

    c: np.ndarray
    A: csr_matrix
    row_lo: np.ndarray
    row_hi: np.ndarray
    lb: np.ndarray
    ub: np.ndarray
    integrality: np.ndarray


@dataclass
class MilpResult:
    x: np.ndarray | None
    """Best solution found (None: none)."""
    status: str
    """"optimal" (proven), "feasible" (a solution, not proven), "none" (no solution found)."""
    objective: float
    dual_bound: float | None
    """A proven bound on the objective where the backend reports one (HiGHS), else None."""
    timed_out: bool
    """The wall-clock limit (not the node limit) ended the search: the answer is machine-dependent."""
    seconds: float


def available_pulp_solvers() -> list[str]:
    """Names of the solvers PuLP can run on this machine (``pulp.listSolvers(onlyAvailable=True)``)."""
    import pulp

    return list(pulp.listSolvers(onlyAvailable=True))


def check_backend(backend: str, pulp_solver: str | None = None) -> None:
    """ValueError naming the backend or PuLP solver and listing the valid ones."""
    if backend not in MILP_BACKENDS:
        raise UserError(f"milp_backend must be one of {', '.join(MILP_BACKENDS)}, got {backend!r}")
    if pulp_solver is not None and backend != "pulp":
        raise UserError(f"pulp_solver={pulp_solver!r} needs milp_backend='pulp', got {backend!r}")
    if backend == "pulp":
        try:
            available = available_pulp_solvers()
        except ImportError:
            raise UserError("milp_backend='pulp' needs the pulp package (pip install pulp)") from None
        name = pulp_solver or DEFAULT_PULP_SOLVER
        if name not in available:
            raise UserError(
                f"PuLP solver {name!r} is not available here; available: {', '.join(available) or 'none'}"
            )


def solve_model(
    model: MilpModel,
    *,
    time_limit: float,
    node_limit: int,
    mip_rel_gap: float,
    backend: str = "highs",
    pulp_solver: str | None = None,
) -> MilpResult:
    """Solve ``model`` with the chosen backend within ``time_limit`` s and ``node_limit`` nodes
    (CBC and HiGHS honour the node limit; other PuLP solvers only the time limit and gap)."""
    t0 = time.perf_counter()
    if backend == "highs":
        res = milp(
            model.c,
            constraints=LinearConstraint(model.A, model.row_lo, model.row_hi),
            integrality=model.integrality,
            bounds=Bounds(model.lb, model.ub),
            options={
                "time_limit": time_limit,
                "node_limit": node_limit,
                "disp": False,
                "mip_rel_gap": mip_rel_gap,
            },
        )
        seconds = time.perf_counter() - t0
        timed_out = res.status == 1 and "time limit" in str(res.message).lower()
        if res.x is None:
            return MilpResult(None, "none", float("inf"), None, timed_out, seconds)
        bound = getattr(res, "mip_dual_bound", None)
        status = "optimal" if res.status == 0 else "feasible"
        return MilpResult(
            np.asarray(res.x),
            status,
            float(res.fun),
            float(res.fun) if status == "optimal" else (None if bound is None else float(bound)),
            timed_out,
            seconds,
        )
    if backend == "pulp":
        return _solve_pulp(model, time_limit, node_limit, mip_rel_gap, pulp_solver or DEFAULT_PULP_SOLVER, t0)
    raise UserError(f"milp_backend must be one of {', '.join(MILP_BACKENDS)}, got {backend!r}")


def _solve_pulp(
    model: MilpModel, time_limit: float, node_limit: int, gap: float, solver_name: str, t0: float
):
    import pulp

    n = len(model.c)
    prob = pulp.LpProblem("flexsp", pulp.LpMinimize)
    xs = []
    for j in range(n):
        lb = None if not np.isfinite(model.lb[j]) else float(model.lb[j])
        ub = None if not np.isfinite(model.ub[j]) else float(model.ub[j])
        cat = pulp.LpInteger if model.integrality[j] else pulp.LpContinuous
        if hasattr(prob, "add_variable"):  # PuLP >= 3.3; LpVariable(...) alone is deprecated there
            xs.append(prob.add_variable(f"x{j}", lowBound=lb, upBound=ub, cat=cat))
        else:
            xs.append(pulp.LpVariable(f"x{j}", lowBound=lb, upBound=ub, cat=cat))
    prob += pulp.lpSum(float(v) * xs[j] for j, v in enumerate(model.c) if v)
    A = model.A.tocsr()
    for r in range(A.shape[0]):
        cols, vals = A.indices[A.indptr[r] : A.indptr[r + 1]], A.data[A.indptr[r] : A.indptr[r + 1]]
        expr = pulp.lpSum(float(v) * xs[c] for c, v in zip(cols, vals))
        lo, hi = model.row_lo[r], model.row_hi[r]
        if np.isfinite(lo) and np.isfinite(hi) and lo == hi:
            prob += expr == float(lo)
        else:
            if np.isfinite(hi):
                prob += expr <= float(hi)
            if np.isfinite(lo):
                prob += expr >= float(lo)
    kwargs = {"msg": False, "timeLimit": max(float(time_limit), 0.01), "gapRel": mip_gap_floor(gap)}
    if solver_name == "PULP_CBC_CMD":
        kwargs.update(maxNodes=int(node_limit), threads=1)
    with warnings.catch_warnings():  # PuLP 3.3 flags PULP_CBC_CMD for removal in 4.0: still the bundled CBC
        warnings.simplefilter("ignore", DeprecationWarning)
        solver = pulp.getSolver(solver_name, **kwargs)
    t_solve = time.perf_counter()
    prob.solve(solver)
    solve_s = time.perf_counter() - t_solve
    seconds = time.perf_counter() - t0
    sol = prob.sol_status
    values = [v.varValue for v in xs]
    if sol not in (pulp.constants.LpSolutionOptimal, pulp.constants.LpSolutionIntegerFeasible) or any(
        v is None for v in values
    ):
        return MilpResult(None, "none", float("inf"), None, solve_s >= 0.95 * time_limit, seconds)
    x = np.array(values, dtype=float)
    objective = float(model.c @ x)
    optimal = sol == pulp.constants.LpSolutionOptimal and prob.status == pulp.constants.LpStatusOptimal
    # CBC stopped by its node limit also reports "solution found" (sol_status 2): only a proven
    # optimum is "optimal"; the time limit, not the node limit, is what makes it machine-dependent
    return MilpResult(
        x,
        "optimal" if optimal else "feasible",
        objective,
        objective if optimal else None,
        not optimal and solve_s >= 0.95 * time_limit,
        seconds,
    )


def mip_gap_floor(gap: float) -> float:
    """Relative gap passed to PuLP solvers (CBC rejects 0)."""
    return max(float(gap), 1e-9)


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

    def model(self, c, lb, ub, integrality) -> MilpModel:
        a = coo_matrix((self.vals, (self.rows, self.cols)), shape=(len(self.lo), len(c))).tocsr()
        return MilpModel(
            np.asarray(c, float),
            a,
            np.asarray(self.lo, float),
            np.asarray(self.hi, float),
            np.asarray(lb, float),
            np.asarray(ub, float),
            np.asarray(integrality, float),
        )


def exact_size(n_seq: int, n_dev: int, max_mbs: int) -> int:
    """Binary variables ``solve_exact`` would create (an upper estimate)."""
    return max_mbs * (2 * n_dev - 1) * (n_seq + 1)


def solve_exact(
    wl: Workload,
    max_mbs: int,
    time_limit: float,
    node_limit: int = 20000,
    *,
    backend: str = "highs",
    pulp_solver: str | None = None,
):
    """Solve the full MILP. Returns (status, objective, dual bound, micro-batches, timed_out) or
    None when no solution was found.

    micro-batches: list of [(sp, [seq ids]), ...]; status "optimal" or "feasible"; dual bound 0.0
    when the backend reports none.
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
            rows.add(
                [(u_index[j, s], 1) for s, (_, sp, st) in enumerate(blocks) if st <= r < st + sp], -np.inf, 1
            )
        for s, (k, sp, _) in enumerate(blocks):
            members = [(i, x_index[i, j, s]) for i in range(n) if (i, j, s) in x_index]
            rows.add([(v, wl.lengths[i]) for i, v in members], -np.inf, sp * cap)
            rows.add(
                [(tau0 + j, 1), (u_index[j, s], -(b + wl.latency[k]))]
                + [(v, -wl.time[k, i]) for i, v in members],
                0,
                np.inf,
            )
        if j + 1 < m:
            rows.add([(tau0 + j, 1), (tau0 + j + 1, -1)], 0, np.inf)
    c = np.zeros(nvar)
    c[tau0:] = 1.0
    integrality = np.ones(nvar)
    integrality[tau0:] = 0
    ub = np.ones(nvar)
    ub[tau0:] = np.inf
    res = solve_model(
        rows.model(c, np.zeros(nvar), ub, integrality),
        time_limit=max(time_limit, 0.05),
        node_limit=node_limit,
        mip_rel_gap=1e-6,
        backend=backend,
        pulp_solver=pulp_solver,
    )
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
    bound = res.dual_bound if res.dual_bound is not None else 0.0
    return res.status, res.objective, bound, mbs, res.timed_out


def reassign_micro_batch(
    wl: Workload,
    groups: list,
    time_limit: float,
    n_individual: int = 12,
    n_buckets: int = 12,
    node_limit: int = 2000,
    *,
    backend: str = "highs",
    pulp_solver: str | None = None,
    report: dict | None = None,
):
    """Re-deal one micro-batch's sequences over its fixed groups (see module docstring).

    groups: [(sp, [ids]), ...]. Returns a faster [(sp, [ids]), ...] or None. ``report`` (a dict)
    gets "timed_out": True when the time limit ended the solve.
    """
    cap = wl.cap
    ids = sorted((i for _, g in groups for i in g), key=lambda i: (-wl.lengths[i], i))
    degs = [sp for sp, _ in groups]
    ks = [sp.bit_length() - 1 for sp in degs]
    ng = len(groups)
    current = max(wl.time[k, g].sum() + wl.latency[k] for k, (_, g) in zip(ks, groups))
    singles = ids[:n_individual]
    rest = ids[n_individual:]
    classes = (
        [list(c) for c in np.array_split(np.array(rest, dtype=np.int64), min(n_buckets, len(rest)))]
        if rest
        else []
    )
    classes = [c for c in classes if len(c)]
    items = [[i] for i in singles] + classes  # each item: a list of interchangeable ids
    nvar_x = len(items) * ng
    t_var = nvar_x
    rows = _Rows()
    for a, members in enumerate(items):
        rows.add([(a * ng + g, 1) for g in range(ng)], len(members), len(members))
    for g in range(ng):
        k = ks[g]
        mem = [(a * ng + g, max(wl.lengths[i] for i in members)) for a, members in enumerate(items)]
        rows.add(mem, -np.inf, degs[g] * cap)
        tim = [
            (a * ng + g, -float(np.mean([wl.time[k, i] for i in members]))) for a, members in enumerate(items)
        ]
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
    res = solve_model(
        rows.model(c, np.zeros(nvar_x + 1), ub, integrality),
        time_limit=max(time_limit, 0.02),
        node_limit=node_limit,
        mip_rel_gap=1e-4,
        backend=backend,
        pulp_solver=pulp_solver,
    )
    if report is not None and res.timed_out:
        report["timed_out"] = True
    if res.x is None:
        return None
    counts = np.rint(res.x[:nvar_x]).astype(np.int64).reshape(len(items), ng)
    new = [[] for _ in range(ng)]
    for a, members in enumerate(items):
        pool = list(members)  # largest first: the MILP's memory row priced every one at the largest
        for g in range(ng):
            new[g].extend(pool[: counts[a, g]])
            pool = pool[counts[a, g] :]
        if pool:
            return None
    out = [(degs[g], new[g]) for g in range(ng) if new[g]]
    for g in range(ng):
        if sum(wl.lengths[i] for i in new[g]) > degs[g] * cap:
            return None
    span = max(wl.time[k, new[g]].sum() + wl.latency[k] for g, k in enumerate(ks) if new[g])
    return out if span < current - 1e-6 else None
