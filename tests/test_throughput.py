"""benchmarks/throughput.py without spawning ranks: the scaled batches, every method's plan, and
the summary's rules (a static degree that cannot hold every batch does not compete)."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from solver.plan import Plan
from solver.presets import load_preset

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
throughput = importlib.import_module("throughput")


def test_scaled_batches_are_long_tailed_and_bounded():
    batches = throughput.scaled_batches("wikipedia", 2, 4096, 512, 32768, seed=0)
    assert len(batches) == 2
    for b in batches:
        assert 4096 <= sum(b) < 4096 + 512 and min(b) >= 8 and max(b) <= 512
    assert batches == throughput.scaled_batches("wikipedia", 2, 4096, 512, 32768, seed=0)


def test_every_method_plans_every_sequence():
    from dataclasses import replace
    cm = replace(load_preset("cpu-gloo-tiny"), capacity_override=256)
    lens = [500, 100, 60, 30, 30, 20, 8]
    plans = throughput.plans_for(lens, cm, 4)
    assert {"ulysses-full", "deepspeed-ulysses", "best-homogeneous", "flexsp"} <= set(plans)
    assert "static-1" not in plans  # 500 tokens do not fit one rank of 256
    for name, d in plans.items():
        plan = Plan.from_dict(d)
        ids = sorted(i for mb in plan.micro_batches for g in mb.groups for i in g.seq_ids)
        assert ids == list(range(len(lens))), name
    full = Plan.from_dict(plans["ulysses-full"])
    assert all(g.sp == 4 and g.attention == "ulysses" for mb in full.micro_batches for g in mb.groups)


def test_summary_ignores_static_degrees_missing_batches():
    def row(m, b, ms):
        return {"distribution": "d", "batch": b, "method": m, "tokens": 1000, "predicted_ms": ms, "measured_ms": ms}
    rows = [row(m, b, ms) for b in (0, 1) for m, ms in (("ulysses-full", 100), ("static-2", 90),
                                                         ("deepspeed-ulysses", 110), ("best-homogeneous", 95),
                                                         ("flexsp", 80))]
    rows.append(row("static-1", 0, 10))  # fits only batch 0: must not be the best static
    lines, agg = throughput.summarize({"rows": rows})
    assert agg["d"]["_best_static"] == "static-2"
    text = "\n".join(lines)
    assert "FlexSP vs best static (static-2): 1.125x measured" in text
    assert "only batches whose longest document fits" in text


def test_bad_arguments_exit_with_the_value():
    with pytest.raises(SystemExit, match="--repeats must be >= 1, got 0"):
        throughput.main(["--cost-model", "x.json", "--repeats", "0"])
    with pytest.raises(SystemExit, match="--max-len 9000 exceeds"):
        throughput.main(["--cost-model", "x.json", "--max-len", "9000"])


def test_predictions_come_from_the_cost_model_alone():
    """The step overhead and per-document cost are CostModel terms: every plan prices them itself
    (the benchmark adds nothing on the side); rows carry price_plan of the plan each method ran."""
    import inspect
    from dataclasses import replace

    from solver.build import price_plan
    cm = replace(load_preset("cpu-gloo-tiny"), capacity_override=256, per_sequence_ms=0.5, step_overhead_ms=40.0)
    lens = [500, 100, 60, 30, 30, 20, 8]
    for name, d in throughput.plans_for(lens, cm, 4).items():
        plan = Plan.from_dict(d)
        assert plan.predicted_ms == pytest.approx(price_plan(plan, lens, cm)), name
        assert plan.predicted_ms > 40.0
    src = inspect.getsource(throughput.rank_body)
    assert "pred = price_plan(plan, lens, cm)" in src and '"predicted_ms": pred,' in src
    assert "+ optimizer_ms" not in src


def test_static_plans_are_priced_with_the_mode_they_run():
    """Mode-keyed terms (ring cheaper than Ulysses): the static baselines run Ulysses, so their
    groups say ulysses and their prediction pays Ulysses' latency and per-document cost."""
    from dataclasses import replace

    from solver.build import price_plan
    base = load_preset("cpu-gloo-tiny")
    cm = replace(base, capacity_override=256, ring_mb_per_token=base.a2a_mb_per_token / 100,
                 p2p_bandwidth_gbps=dict(base.bandwidth_gbps),
                 group_latency_ms={"ulysses:2": 9.0, "ulysses:4": 9.0, "ring:2": 5.0, "ring:4": 5.0},
                 per_sequence_comm_ms={"ulysses:2": 0.8, "ulysses:4": 0.8, "ring:2": 0.2, "ring:4": 0.2})
    lens = [500, 100, 60, 30, 30, 20, 8]
    plans = {k: Plan.from_dict(d) for k, d in throughput.plans_for(lens, cm, 4).items()}
    for name in ("ulysses-full", "deepspeed-ulysses", "best-homogeneous"):
        plan = plans[name]
        assert {g.attention for mb in plan.micro_batches for g in mb.groups if g.sp > 1} == {"ulysses"}, name
        assert plan.predicted_ms == pytest.approx(price_plan(plan, lens, cm)), name
    full = plans["ulysses-full"]
    want = cm.step_overhead_ms + sum(max(cm.group_time_ms([lens[i] for i in g.seq_ids], g.sp, "ulysses")
                                         for g in mb.groups) for mb in full.micro_batches)
    assert full.predicted_ms == pytest.approx(want)
    assert plans["flexsp"].predicted_ms == pytest.approx(price_plan(plans["flexsp"], lens, cm))


def test_deepspeed_runs_only_in_its_own_world():
    """The main world never imports DeepSpeed: only a rank_body called with ds_only does."""
    import inspect
    src = inspect.getsource(throughput.rank_body)
    assert 'use_ds = bool(args.get("ds_only"))' in src
    main_src = inspect.getsource(throughput.main)
    assert '"ds_only": False' in main_src and '"ds_only": True' in main_src


def test_load_during_the_run_is_reported():
    rows = [{"loadavg": [1.2, 1, 1]}, {"loadavg": [0.8, 1, 1]}, {}]
    assert throughput._load_range(rows) == "; 1-min load after each batch 0.80-1.20"
    assert throughput._load_range([{}]) == ""
