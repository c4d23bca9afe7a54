"""Late-plan fallback of flexsp.planning.StepPlanner.

The planner's solve is made "slow" by replacing it with a function that blocks (on an event the
test controls in thread mode; forever in the planner subprocess), so lateness is decided by the
mechanism, not by timing: a solve that cannot finish is late whatever the machine's speed (no timed
assertions).

- unit (thread mode): a blocked solve gives the fallback plan (status "fallback", counted in
  ``late``), which places every sequence of the batch exactly once; once the solver answers again,
  its plan is used and nothing more is counted; a job submitted for another step is not used;
- unit (process mode, the default): the solve runs in a separate process (its pid differs); a
  solve that never returns is late and the fallback is used; once it counts as stuck the next
  batch replaces the process and is planned by the new one; a solve that raises is reported with
  the step;
- trainer (4 gloo ranks, FSDP2, planner subprocess): with every solve blocked, 3 steps train on fallback
plans, every
  step is counted late, every document of every batch is trained on exactly once (targets and doc
  ids in metrics.jsonl) and the losses equal 1-process training on the same batches (tolerance as
  in test_train.py: fp32, different summation order only).
"""

import json
import threading
from dataclasses import replace

import pytest
from dist_harness import run_distributed
from train_cases import base_overrides, compose, reference_training, tiny_cost_model

LENGTHS = [90, 40, 33, 20, 17, 9, 5, 3]


def _blocking_plan_batch(release: threading.Event, calls: list):
    from solver.planner import plan_batch

    def slow(lengths, cm, **kw):
        calls.append(tuple(lengths))
        release.wait()
        return plan_batch(lengths, cm, **kw)

    return slow


def _covers_once(plan, n):
    seen = sorted(i for mb in plan.micro_batches for g in mb.groups for i in g.seq_ids)
    return seen == list(range(n))


@pytest.fixture
def planner_factory(tmp_path, monkeypatch):
    import flexsp.planning as planning

    release, calls = threading.Event(), []
    monkeypatch.setattr(planning, "plan_batch", _blocking_plan_batch(release, calls))
    cm = planning.load_cost_model(tiny_cost_model(tmp_path / "cm32.json", capacity=32), 4)

    def make(**cfg):
        return planning.StepPlanner(
            planning.SolverConfig(background="thread", **cfg), cm, rank=0, world_size=4
        )

    yield make, release, calls
    release.set()  # let the blocked background threads finish


def test_late_solve_falls_back_and_counts(planner_factory):
    make, release, calls = planner_factory
    planner = make(time_limit=0.05, wait_s=0.01)
    planner.submit(0, LENGTHS)
    plan, wait_ms = planner.get(0, LENGTHS, first=True)
    assert calls == [tuple(LENGTHS)]  # the solver really was asked, and is still blocked
    assert planner.late == 1
    assert plan.status == "fallback" and plan.method.endswith("(fallback)"), (plan.status, plan.method)
    assert plan.num_devices == 4 and _covers_once(plan, len(LENGTHS))
    assert wait_ms >= 0

    # the next step: the solver answers again -> its plan, not counted late (a generous wait_s, so
    # the mechanism, not the solve's speed, is under test)
    release.set()
    planner.cfg = replace(planner.cfg, wait_s=60.0)
    nxt = LENGTHS[::-1]
    planner.submit(1, nxt)
    plan, _ = planner.get(1, nxt)
    assert planner.late == 1, "the released solver was counted late"
    assert not plan.method.endswith("(fallback)") and _covers_once(plan, len(nxt))


def test_job_of_another_step_is_not_used(planner_factory):
    make, release, calls = planner_factory
    release.set()
    planner = make(time_limit=0.05, wait_s=5.0)
    planner.submit(0, LENGTHS)
    other = LENGTHS[:5]
    plan, _ = planner.get(1, other)  # step 1 was never submitted: planned now
    assert calls[-1] == tuple(other) and _covers_once(plan, len(other)) and planner.late == 0


def never_returns(lengths, cm, **kwargs):
    """A solve that never finishes (run in the planner subprocess, which is killed at the end)."""
    import time

    time.sleep(3600)


def solve_and_report_pid(lengths, cm, **kwargs):
    """A real solve that records the pid of the process it ran in."""
    import os
    from dataclasses import replace

    from flexsp.planning import solve_plan

    plan = solve_plan(lengths, cm, **kwargs)
    return replace(plan, extra={**plan.extra, "pid": os.getpid()})


def raises(lengths, cm, **kwargs):
    raise ValueError("no plan for you")


def test_planner_process_late_restart_and_errors(tmp_path, monkeypatch):
    import os

    import flexsp.planning as planning
    from solver.planner import PlanningError

    cm = planning.load_cost_model(tiny_cost_model(tmp_path / "cm32.json", capacity=32), 4)
    planner = planning.StepPlanner(
        planning.SolverConfig(time_limit=0.05, wait_s=0.01), cm, rank=0, world_size=4, solve_fn=never_returns
    )
    try:
        planner.submit(0, LENGTHS)
        plan, _ = planner.get(0, LENGTHS)  # not first: no start-up grace, the solve never ends
        assert plan.status == "fallback" and planner.late == 1 and _covers_once(plan, len(LENGTHS))
        busy_pid = planner._proc.proc.pid
        # a late job queues the next one behind it; a stuck one (running past stuck_s) is replaced:
        # the next batch is then planned by a fresh process, for real
        planner._proc.stuck_s = 0.0
        planner._proc.target = f"{__name__}:solve_and_report_pid"
        planner.cfg = replace(planner.cfg, wait_s=60.0)
        nxt = LENGTHS[::-1]
        planner.submit(1, nxt)
        plan, _ = planner.get(1, nxt)
        assert planner.late == 1 and not plan.method.endswith("(fallback)") and _covers_once(plan, len(nxt))
        assert plan.extra["pid"] not in (os.getpid(), busy_pid), "the solve did not run in a new subprocess"
        planner._proc.close()
        planner._proc.target = f"{__name__}:raises"
        planner._proc._start()
        planner.submit(2, nxt)
        with pytest.raises(PlanningError, match="step 2: ValueError: no plan for you"):
            planner.get(2, nxt)
    finally:
        planner.close()


def _body(rank, world_size, cfg):
    import os

    from flexsp.testing import FAULTS_ENV
    from flexsp.train import run

    os.environ[FAULTS_ENV] = "planner:hang"  # every solve (in the planner subprocess) blocks
    s = run(cfg)
    return {"losses": s["losses"], "late": s["late_plans"]}


@pytest.mark.slow
def test_trainer_continues_on_fallback_plans(tmp_path):
    import torch

    from flexsp.data import GlobalBatchSampler, build_source
    from flexsp.executor import num_targets

    cm = tiny_cost_model(tmp_path / "cm32.json", capacity=32)
    out = tmp_path / "late"
    cfg = compose(base_overrides(out, cm, extra=["solver.time_limit=0.05", "solver.wait_s=0.01"]))
    results = run_distributed(_body, world_size=4, args=(cfg,), timeout=150)
    ref_losses, _ = reference_training(cfg, 3)

    metrics = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3]
    assert all(m["status"] == "fallback" and "(fallback)" in m["method"] for m in metrics), metrics
    assert results[0]["late"] == 3
    # every document of every batch trained on exactly once
    c = cfg
    source = build_source(c.data)
    sampler = GlobalBatchSampler(source.lengths, c.data.sampler)
    for m in metrics:
        batch = next(sampler)
        assert m["doc_ids"] == list(batch.doc_ids)
        assert m["targets"] == num_targets(batch.lengths)
    for r in results:
        got = [r["losses"][s] for s in range(3)]
        torch.testing.assert_close(torch.tensor(got), torch.tensor(ref_losses), rtol=1e-5, atol=1e-6)
