"""The planner's time box, status and determinism at every batch size (up to 100,000 sequences on
1,024 devices), its chunked search, progress reports and argument checks."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest

from solver.build import price_plan, validate_plan
from solver.packing import Workload, quick_pack
from solver.planner import lower_bound_ms, plan_batch
from solver.presets import load_preset
from solver.workloads import sample_lengths

LIMIT = 191_872


def test_100k_sequences_on_1024_devices_respect_the_time_box():
    cm = load_preset("paper-gpt7b-192k").with_devices(1024)
    lengths = sample_lengths("cpython", 100_000, 0, LIMIT).tolist()
    t0 = time.perf_counter()
    plan = plan_batch(lengths, cm, time_limit=2.0)
    wall = time.perf_counter() - t0
    assert wall < 2.0 + 5.0  # generous: the stated overshoot is ~0.1 s + a few us per sequence
    validate_plan(plan, lengths, cm)
    assert plan.status in ("time_limit", "fallback")
    assert "time box" in plan.extra["cut"]
    assert plan.extra["chunks"] > 1
    assert plan.predicted_ms == pytest.approx(price_plan(plan, lengths, cm), rel=1e-9)
    assert (
        lower_bound_ms(lengths, cm) == pytest.approx(plan.lower_bound_ms)
        and plan.lower_bound_ms < plan.predicted_ms
    )


@pytest.mark.parametrize("n,devices", [(20_000, 64), (30_000, 1024)])
def test_mid_size_batches_respect_a_short_time_box(n, devices):
    cm = load_preset("paper-gpt7b-192k").with_devices(devices)
    lengths = sample_lengths("github", n, 1, LIMIT).tolist()
    t0 = time.perf_counter()
    plan = plan_batch(lengths, cm, time_limit=0.5)
    assert time.perf_counter() - t0 < 0.5 + 3.0
    validate_plan(plan, lengths, cm)


def test_small_batches_are_solved_the_same_way_every_run():
    """Tiny inputs finish far inside the box: never "time_limit", same plan and status each run."""
    cm = load_preset("paper-gpt7b-192k")
    lengths = [4096, 800, 120000, 2500, 33000, 700, 9000, 15000]
    plans = [plan_batch(lengths, cm) for _ in range(3)]
    assert {p.status for p in plans} <= {"optimal", "feasible"} and len({p.status for p in plans}) == 1
    assert len({tuple(mb.groups for mb in p.micro_batches) for p in plans}) == 1
    # a batch the exact MILP certifies reports "optimal"
    single = plan_batch([1000], cm)
    assert single.status == "optimal" and single.gap == 0.0


def test_chunked_search_is_deterministic_and_beats_the_safety_net():
    cm = load_preset("paper-gpt7b-192k")
    lengths = sample_lengths("cpython", 1700, 3, LIMIT).tolist()
    a = plan_batch(lengths, cm, time_limit=120)
    b = plan_batch(lengths, cm, time_limit=120)
    assert a.extra["chunks"] > 1 and a.extra["chunks_searched"] == a.extra["chunks"]
    assert a.status == b.status == "feasible" and a.extra["cut"] == []
    assert [mb.groups for mb in a.micro_batches] == [mb.groups for mb in b.micro_batches]
    validate_plan(a, lengths, cm)
    wl = Workload(np.asarray(lengths), cm)
    quick = sum(
        max(wl.time[sp.bit_length() - 1, ids].sum() + wl.latency[sp.bit_length() - 1] for sp, ids in mb)
        + cm.b
        for mb in quick_pack(wl, range(len(lengths)))
    )
    assert a.predicted_ms < quick
    from solver.baselines import static_plan

    assert a.predicted_ms < static_plan(lengths, cm).predicted_ms
    assert a.gap < 0.15


def test_quick_pack_is_valid_on_every_preset():
    for name in ("paper-gpt7b-192k", "paper-gpt30b-384k", "cpu-gloo-tiny"):
        cm = load_preset(name)
        lengths = sample_lengths(
            "bytescale",
            3000,
            0,
            64 * cm.capacity_tokens if name.startswith("paper") else cm.num_devices * cm.capacity_tokens,
        )
        wl = Workload(lengths, cm)
        mbs = quick_pack(wl, range(len(lengths)))
        from solver.build import build_plan

        plan = build_plan(mbs, lengths.tolist(), cm, method="quick")
        validate_plan(plan, lengths.tolist(), cm)


def test_progress_is_reported_for_chunked_runs():
    cm = load_preset("paper-gpt7b-192k")
    lengths = sample_lengths("cpython", 3000, 0, LIMIT).tolist()
    lines: list[str] = []
    plan = plan_batch(lengths, cm, time_limit=1.5, progress=lines.append)
    assert plan.extra["chunks"] > 1
    assert lines and lines[0].startswith("planned chunk 1/") and f"/{plan.extra['chunks']} (" in lines[0]


@pytest.mark.parametrize("bad", [0, -1.0, math.nan, math.inf, "1", True])
def test_time_limit_must_be_a_positive_finite_number(bad):
    with pytest.raises(ValueError, match="time_limit must be a finite number of seconds > 0, got"):
        plan_batch([100, 200], load_preset("paper-gpt7b-192k"), time_limit=bad)


def test_milp_backend_errors_list_the_valid_choices():
    cm = load_preset("paper-gpt7b-192k")
    with pytest.raises(ValueError, match="milp_backend must be one of highs, pulp, got 'gurobi'"):
        plan_batch([100], cm, milp_backend="gurobi")
    with pytest.raises(
        ValueError, match=r"PuLP solver 'NOPE' is not available here; available: .*PULP_CBC_CMD"
    ):
        plan_batch([100], cm, milp_backend="pulp", pulp_solver="NOPE")


def test_summary_is_run_length_encoded_and_capped():
    cm = load_preset("paper-gpt7b-192k")
    lengths = sample_lengths("cpython", 5000, 0, LIMIT).tolist()
    plan = plan_batch(lengths, cm, time_limit=0.5)
    s = plan.summary()
    assert len(s) <= 200 and s.startswith(f"{len(plan.micro_batches)} mb: ")
    assert f"{sum(len(mb.groups) for mb in plan.micro_batches)} groups, 5000 sequences)" in s
    full = plan.summary(max_chars=0)
    assert "x(" in full or len(full) < 200  # repeated micro-batch patterns are encoded
    from solver.plan import GroupPlan, MicroBatchPlan, Plan

    mb = MicroBatchPlan(groups=(GroupPlan(sp=64, ranks=tuple(range(64)), seq_ids=(0,)),))
    two = MicroBatchPlan(
        groups=(
            GroupPlan(sp=32, ranks=tuple(range(32)), seq_ids=(1,)),
            GroupPlan(sp=32, ranks=tuple(range(32, 64)), seq_ids=(2,)),
        )
    )
    p = Plan(num_devices=64, micro_batches=(mb,) * 12 + (two,), predicted_ms=1.0)
    assert p.summary() == "13 mb: 12x(1x64) | 2x32"
