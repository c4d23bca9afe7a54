"""PuLP as the MILP backend: the same backend-neutral models as HiGHS, valid plans, proven optima
on the small exact instances (objective equal to HiGHS's and to brute force), honest statuses."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.sparse import csr_matrix

pulp = pytest.importorskip("pulp")

from test_planner import brute_force, tiny_model  # noqa: E402

from solver.build import price_plan, validate_plan  # noqa: E402
from solver.milp import MilpModel, available_pulp_solvers, check_backend, solve_model  # noqa: E402
from solver.planner import plan_batch  # noqa: E402
from solver.presets import load_preset  # noqa: E402
from solver.workloads import sample_lengths  # noqa: E402

pytestmark = pytest.mark.skipif("PULP_CBC_CMD" not in available_pulp_solvers(), reason="CBC not available")


def _knapsack(n=12, seed=0) -> MilpModel:
    rng = np.random.default_rng(seed)
    w, v = rng.integers(3, 30, n), rng.integers(5, 60, n)
    return MilpModel(
        c=-v.astype(float),
        A=csr_matrix(w[None, :].astype(float)),
        row_lo=np.array([-np.inf]),
        row_hi=np.array([float(w.sum() // 3)]),
        lb=np.zeros(n),
        ub=np.ones(n),
        integrality=np.ones(n),
    )


def test_both_backends_solve_the_same_model_to_the_same_optimum():
    model = _knapsack()
    highs = solve_model(model, time_limit=10, node_limit=10_000, mip_rel_gap=0, backend="highs")
    cbc = solve_model(model, time_limit=10, node_limit=10_000, mip_rel_gap=0, backend="pulp")
    assert highs.status == cbc.status == "optimal"
    assert cbc.objective == pytest.approx(highs.objective)
    assert cbc.x is not None and np.all(np.isin(np.round(cbc.x), [0, 1]))
    assert (model.A @ cbc.x)[0] <= model.row_hi[0] + 1e-9


def test_pulp_infeasible_model_reports_no_solution():
    model = MilpModel(
        c=np.ones(2),
        A=csr_matrix(np.array([[1.0, 1.0]])),
        row_lo=np.array([5.0]),
        row_hi=np.array([5.0]),
        lb=np.zeros(2),
        ub=np.ones(2),
        integrality=np.ones(2),
    )
    res = solve_model(model, time_limit=5, node_limit=100, mip_rel_gap=0, backend="pulp")
    assert res.x is None and res.status == "none"


@pytest.mark.parametrize("seed", range(5))
def test_pulp_exact_instances_are_optimal_and_agree_with_highs(seed):
    rng = np.random.default_rng(seed)
    cm = tiny_model(
        b=float(rng.choice([0.5, 5.0, 30.0])),
        per_sequence_ms=float(rng.choice([0.0, 2.0])),
        group_latency_ms=[{}, {2: 3.0, 4: 8.0}][int(rng.integers(2))],
    )
    lengths = [int(x) for x in rng.integers(5, 380, size=int(rng.integers(2, 6)))]
    by_pulp = plan_batch(lengths, cm, time_limit=30, milp_backend="pulp")
    by_highs = plan_batch(lengths, cm, time_limit=30)
    validate_plan(by_pulp, lengths, cm)
    assert by_pulp.status == by_highs.status == "optimal"
    assert by_pulp.predicted_ms == pytest.approx(by_highs.predicted_ms, rel=1e-9)
    assert by_pulp.predicted_ms == pytest.approx(brute_force(lengths, cm), rel=1e-6)
    assert by_pulp.extra["milp_backend"] == "pulp:PULP_CBC_CMD"


@pytest.mark.parametrize("dist", ["github", "bytescale"])
def test_pulp_plans_at_paper_scale_are_valid(dist):
    cm = load_preset("paper-gpt7b-192k")
    lengths = sample_lengths(dist, 256, seed=1, context_limit=191872).tolist()
    plan = plan_batch(lengths, cm, time_limit=5, milp_backend="pulp")
    validate_plan(plan, lengths, cm)
    assert plan.predicted_ms == pytest.approx(price_plan(plan, lengths, cm), rel=1e-9)
    assert plan.status in ("feasible", "optimal", "time_limit")


def test_unknown_solver_lists_the_available_ones():
    with pytest.raises(ValueError) as exc:
        check_backend("pulp", "GUROBI_DOES_NOT_EXIST")
    assert "GUROBI_DOES_NOT_EXIST" in str(exc.value) and "PULP_CBC_CMD" in str(exc.value)
    check_backend("pulp", "PULP_CBC_CMD")


def test_cbc_stopped_by_its_node_limit_is_not_reported_optimal():
    """Number partitioning: the LP bound is 0, integer solutions rarely are; CBC stopped after one
    node has a solution it cannot prove (PuLP's status says "Optimal", its sol_status does not)."""
    rng = np.random.default_rng(5)
    a = rng.integers(10**6, 10**7, 40).astype(float)
    n = len(a)
    # x_i in {0,1}; d >= |sum a_i (2 x_i - 1)|; minimise d
    A = csr_matrix(np.vstack([np.append(2 * a, -1.0), np.append(2 * a, 1.0)]))
    model = MilpModel(
        c=np.append(np.zeros(n), 1.0),
        A=A,
        row_lo=np.array([-np.inf, a.sum()]),
        row_hi=np.array([a.sum(), np.inf]),
        lb=np.zeros(n + 1),
        ub=np.append(np.ones(n), np.inf),
        integrality=np.append(np.ones(n), 0.0),
    )
    res = solve_model(model, time_limit=20, node_limit=1, mip_rel_gap=0, backend="pulp")
    assert res.status in ("feasible", "none")
    assert not res.timed_out  # the node limit ended it, not the clock
    if res.x is not None:
        assert res.dual_bound is None and res.objective >= 0
