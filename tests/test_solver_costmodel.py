"""Cost-model shape fields, HSDP memory and step time, JSON field validation, the analytic model."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from solver.build import build_plan, price_plan
from solver.costmodel import CostModel
from solver.planner import lower_bound_ms, plan_batch
from solver.presets import PAPER_MODELS, PRESETS, analytic_cost_model, load_preset


def test_presets_record_the_model_shape():
    for name in PRESETS:
        cm = load_preset(name)
        if name.startswith("paper-"):
            layers, hidden = PAPER_MODELS[name.split("-")[1]][:2]
            assert (cm.layers, cm.hidden, cm.heads, cm.kv_heads) == (layers, hidden, 64, 64)
            assert cm.a2a_mb_per_token == pytest.approx(16 * cm.layers * cm.hidden / 2**20)
    tiny = load_preset("cpu-gloo-tiny")
    assert (tiny.layers, tiny.hidden, tiny.heads, tiny.kv_heads) == (2, 64, 4, 2)


def test_old_json_without_the_new_fields_still_loads(tmp_path):
    cm = load_preset("paper-gpt7b-192k")
    data = cm.to_dict()
    for key in (
        "layers",
        "hidden",
        "activation_checkpointing",
        "shard_size",
        "replicate_gbps",
        "grad_bytes_per_param",
    ):
        data.pop(key)
    (tmp_path / "old.json").write_text(json.dumps(data))
    old = CostModel.load(tmp_path / "old.json")
    assert (old.layers, old.hidden, old.shard_size, old.grad_bytes_per_param) == (0, 0, 0, 4.0)
    assert old.capacity_tokens == cm.capacity_tokens and old.step_fixed_ms == 0.0


def test_check_model_shape_names_every_mismatch():
    cm = load_preset("paper-gpt7b-192k")
    cm.check_model_shape(32, 4096, 64, 64)  # matches: no error
    with pytest.raises(ValueError) as exc:
        cm.check_model_shape(layers=32, hidden=5120, heads=32, kv_heads=64)
    msg = str(exc.value)
    assert "paper-gpt7b-192k" in msg
    assert "heads=64 but the model has heads=32" in msg and "hidden=4096 but the model has hidden=5120" in msg
    assert "layers" not in msg.split("built for")[1].split(":")[0]  # layers matched: not named
    unknown = replace(cm, layers=0, hidden=0)  # 0 = unknown: not checked
    unknown.check_model_shape(layers=99, hidden=1, heads=64, kv_heads=64)


def test_hsdp_memory_and_allreduce_time():
    base = load_preset("paper-gpt7b-192k").with_devices(1024)
    hsdp = replace(base, shard_size=64, replicate_gbps=25.0)
    total_mb = base.params_gi * 16 * 1024
    assert base.model_states_mb == pytest.approx(total_mb / 1024)
    assert hsdp.model_states_mb == pytest.approx(total_mb / 64)
    assert hsdp.replicas == 16
    shard_mb = base.params_gi * 1024 * 4.0 / 64
    expected = 2 * 15 / 16 * shard_mb / 25.0
    assert hsdp.replicate_allreduce_ms == pytest.approx(expected)
    assert hsdp.step_fixed_ms == pytest.approx(expected)
    with_overhead = replace(hsdp, step_overhead_ms=10.0)
    assert with_overhead.step_fixed_ms == pytest.approx(expected + 10.0)
    # the plan and its bound pay the all-reduce once
    lengths = [5000, 12000, 800, 40000]
    plan = plan_batch(lengths, with_overhead, time_limit=5)
    groups = sum(mb.predicted_ms for mb in plan.micro_batches)
    assert plan.predicted_ms == pytest.approx(groups + expected + 10.0)
    assert price_plan(plan, lengths, with_overhead) == pytest.approx(plan.predicted_ms)
    assert lower_bound_ms(lengths, with_overhead) == pytest.approx(
        lower_bound_ms(lengths, base) + expected + 10.0
    )
    assert plan.lower_bound_ms <= plan.predicted_ms
    built = build_plan([[(64, [0, 1, 2, 3])]], lengths, with_overhead, method="x")
    assert built.predicted_ms == pytest.approx(built.micro_batches[0].predicted_ms + expected + 10.0)
    assert replace(base, shard_size=1024).replicate_allreduce_ms == 0.0  # one replica: nothing to reduce


def test_hsdp_validation():
    base = load_preset("paper-gpt7b-192k")
    with pytest.raises(ValueError, match="replicate_gbps"):
        replace(base, shard_size=8)
    with pytest.raises(ValueError, match=r"shard_size=12 must be 0 or a power of two"):
        replace(base, shard_size=12, replicate_gbps=10.0)
    with pytest.raises(ValueError, match=r"shard_size=128 must be 0 or a power of two <= num_devices=64"):
        replace(base, shard_size=128, replicate_gbps=10.0)


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("a2", "0.18", "field a2 must be a finite number, got '0.18'"),
        ("num_devices", "64", "field num_devices must be an integer"),
        ("num_devices", 64.5, "field num_devices must be an integer"),
        ("memory_mb", float("inf"), "field memory_mb must be a finite number"),
        ("name", 7, "field name must be a string"),
        ("bandwidth_gbps", [1, 2], "field bandwidth_gbps must be an object"),
        ("bandwidth_gbps", {"2": "fast"}, "field bandwidth_gbps['2'] must be a finite number"),
        ("activation_checkpointing", "yes", "field activation_checkpointing must be true or false"),
    ],
)
def test_mistyped_json_fields_are_named_with_the_file(tmp_path, field, value, message):
    data = load_preset("paper-gpt7b-192k").to_dict()
    data[field] = value
    path = tmp_path / "cm.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError) as exc:
        CostModel.load(path)
    assert message in str(exc.value) and str(path) in str(exc.value)


def test_unreadable_cost_model_files_are_named(tmp_path):
    data = load_preset("paper-gpt7b-192k").to_dict()
    del data["a1"], data["b"]
    (tmp_path / "part.json").write_text(json.dumps(data))
    with pytest.raises(
        ValueError, match=r"part.json: incomplete cost model: missing required fields \['a1', 'b'\]"
    ):
        CostModel.load(tmp_path / "part.json")
    (tmp_path / "bin.json").write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ValueError, match=r"bin.json is not UTF-8 text"):
        CostModel.load(tmp_path / "bin.json")
    with pytest.raises(ValueError, match="is a directory"):
        CostModel.load(tmp_path)
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="must hold a JSON object, got list"):
        CostModel.load(tmp_path / "list.json")


def test_with_devices_rejects_zero_instead_of_ignoring_it():
    cm = load_preset("paper-gpt7b-192k")
    with pytest.raises(ValueError, match="num_devices must be > 0, got 0"):
        cm.with_devices(0)
    with pytest.raises(ValueError, match="memory_mb must be > 0, got 0"):
        cm.with_devices(memory_mb=0)
    assert cm.with_devices(None, None) == cm
    assert cm.with_devices(128).num_devices == 128


def test_analytic_model_reproduces_the_paper_shape_and_is_labelled():
    paper = load_preset("paper-gpt7b-192k")
    cm = analytic_cost_model(
        "dry-7b",
        layers=32,
        hidden=4096,
        heads=64,
        kv_heads=64,
        params=paper.params_gi * 2**30,
        num_devices=64,
        devices_per_node=8,
        memory_mb=30 * 1024,
        act_mb_per_token=paper.act_mb_per_token,
        ring=False,
    )
    assert "ANALYTIC" in cm.source
    assert cm.a2a_mb_per_token == pytest.approx(paper.a2a_mb_per_token)  # 16 * layers * hidden bytes
    assert cm.bandwidth_gbps == paper.bandwidth_gbps
    assert cm.a1 == pytest.approx(paper.a1, rel=0.05)  # A100 at 50% MFU
    assert cm.a2 == pytest.approx(6 * paper.params_gi * 2**30 / (0.5 * 312e9))
    assert cm.capacity_tokens == paper.capacity_tokens
    # GQA shrinks the all-to-all; checkpointing adds the recomputed forward
    gqa = analytic_cost_model(
        "gqa",
        layers=32,
        hidden=4096,
        heads=32,
        kv_heads=8,
        params=7e9,
        num_devices=1024,
        memory_mb=80 * 1024,
        act_mb_per_token=4.0,
        activation_checkpointing=True,
    )
    assert gqa.a2a_mb_per_token == pytest.approx(4 * (4096 + 1024) * 2 * 32 * 1.5 / 2**20)
    assert gqa.activation_checkpointing and gqa.ring_mb_per_token > 0
    assert set(gqa.bandwidth_gbps) == {1 << k for k in range(1, 11)}
    assert gqa.attention_modes(64) == ("ring", "hybrid")  # Ulysses capped at 32 heads
    plan = plan_batch([100_000, 3000, 5000, 250_000, 700], gqa, time_limit=5)
    assert plan.predicted_ms > plan.lower_bound_ms > 0


def test_analytic_model_rejects_bad_shapes():
    kw = dict(
        layers=32,
        hidden=4096,
        heads=32,
        kv_heads=8,
        params=7e9,
        num_devices=64,
        memory_mb=80 * 1024,
        act_mb_per_token=4.0,
    )
    with pytest.raises(ValueError, match="kv_heads | heads"):
        analytic_cost_model("x", **{**kw, "kv_heads": 5})
    with pytest.raises(ValueError, match="layers must be a positive integer, got 0"):
        analytic_cost_model("x", **{**kw, "layers": 0})
    with pytest.raises(ValueError, match=r"mfu must be in \(0, 1\], got 1.5"):
        analytic_cost_model("x", mfu=1.5, **kw)
