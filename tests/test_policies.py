"""The simulator's policies: Megatron-Core dynamic CP reproduced on hand-worked examples read from
its source, every policy's plans valid on random and adversarial batches, flexsp never slower than
best-static, the topology form and the H100/H200 estimate presets, the ProLong-like workloads."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from solver import planner
from solver.build import price_plan, validate_plan
from solver.costmodel import CostModel
from solver.megatron_dcp import dcp_gpus_needed, megatron_dcp_plan
from solver.network import MACHINES, Topology, machine_preset_name
from solver.policies import (
    PolicySettings,
    best_static_policy,
    default_policies,
    parse_policies,
    run_policy,
    static_degrees,
)
from solver.presets import load_preset
from solver.workloads import sample_lengths


def toy(n: int, heads: int = 0) -> CostModel:
    """A model whose devices hold exactly 100 tokens (Megatron's max_seqlen_per_dp_cp_rank = 100)."""
    return CostModel(
        name="toy",
        num_devices=n,
        devices_per_node=n,
        memory_mb=1000,
        a1=1e-6,
        a2=1e-3,
        b=1.0,
        a2a_mb_per_token=0.01,
        bandwidth_gbps={2: 10.0},
        act_mb_per_token=1.0,
        params_gi=0.0,
        capacity_override=100,
        heads=heads,
    )


def groups(plan, lengths):
    """Per micro-batch: (degree, lengths) of each group, in rank order."""
    return [
        [(g.sp, sorted((lengths[i] for i in g.seq_ids), reverse=True)) for g in mb.groups]
        for mb in plan.micro_batches
    ]


# ---- megatron-dcp: hand-worked from Megatron-LM dev d48bd6be, data_schedule_utils.py -----------


def test_dcp_gpus_needed_is_megatrons_formula():
    # dcp_gpus_needed: max(min_cp, max(1, 2 ** ceil(log2(L / m))))
    for length in range(1, 2000):
        expected = max(1, 2 ** math.ceil(math.log2(length / 100)))
        assert dcp_gpus_needed(length, 100) == expected, length
    assert dcp_gpus_needed(30, 100, min_cp_size=4) == 4


def test_megatron_example_add_beats_new_on_a_tie_then_fill_doubles_first_smallest_group():
    """next_hdp_group_packing_aware on N=4, m=100, lengths 100, 60, 40, 30 (cap 100*100*1.05).
    100: the first sample opens CP 1 on rank 0 (work 10000). 60: CP 1, group 0 is full (160 > 100
    tokens); a new group on rank 1 scores max(10000, 3600) = 10000; CP 2 new scores 10000 too, not
    lower, so CP 1 stays. 40: CP 1, joining group 1 (60 + 40 = 100 tokens) scores
    max(10000, 5200) = 10000 and is tried before the new group (same score, not lower): it joins.
    30: no room in groups 0 and 1: new CP 1 group on rank 2. Rank 3 is empty: fill_empty_gpus_once
    doubles the FIRST group of the smallest size (group 0, rank 0 -> ranks 0-1, work 100^2/2) and
    shifts groups 1 and 2 right by one. One micro-batch: CP 2 {100}, CP 1 {60, 40}, CP 1 {30}."""
    L = [100, 60, 40, 30]
    plan = megatron_dcp_plan(L, toy(4))
    assert groups(plan, L) == [[(2, [100]), (1, [60, 40]), (1, [30])]]
    assert [g.ranks for g in plan.micro_batches[0].groups] == [(0, 1), (2,), (3,)]


def test_megatron_example_leftovers_open_the_next_micro_batch_and_fill_doubles_twice():
    """N=4, m=100, five samples of 100. Each needs CP 1 and fills a rank (100 tokens); the fifth
    finds no group with room and no free rank at any CP size: a leftover, which get_groups_and_
    subsamples schedules in a second call. There it opens CP 1 on rank 0; fill_empty_gpus_once
    doubles it to ranks 0-1, then (smallest size now 2) to ranks 0-3."""
    L = [100] * 5
    plan = megatron_dcp_plan(L, toy(4))
    assert groups(plan, L) == [[(1, [100])] * 4, [(4, [100])]]


def test_megatron_example_packing_aware_cp_larger_than_needed():
    """N=4, m=100, lengths 120, 100. 120 needs CP 2 (ranks 0-1, work 7200, 60 tokens per rank).
    100 needs CP 1: a new CP 1 group scores max(7200, 10000) = 10000; at CP 2 joining group 0 is
    refused (60 + 50 = 110 > 100 tokens) and a new CP 2 group scores max(7200, 5000) = 7200, lower:
    the packing-aware scheduler gives the shorter sequence MORE ranks than it needs."""
    L = [120, 100]
    plan = megatron_dcp_plan(L, toy(4))
    assert groups(plan, L) == [[(2, [120]), (2, [100])]]


def test_megatron_example_joins_the_group_that_keeps_the_busiest_rank_lowest():
    """N=8, m=100, lengths 201, 200, 100, 100. 201 needs CP 4 (ranks 0-3, work 10100.25); 200 needs
    CP 2, whose new group would score 20000, while a new CP 4 group (ranks 4-7) scores 10100.25: CP 4.
    No ranks are free, so each 100 tries CP 1, 2 (nothing) and CP 4: joining group 0 scores
    10100.25 + 2500, group 1 10000 + 2500 = 12500: the first 100 joins group 1, the second then
    joins group 0 (12600.25 < 15000)."""
    L = [201, 200, 100, 100]
    plan = megatron_dcp_plan(L, toy(8))
    assert groups(plan, L) == [[(4, [201, 100]), (4, [200, 100])]]


def test_megatron_cp_sizes_past_what_the_model_runs_leave_ranks_idle():
    """Deviation (documented): with Ulysses only and 4 heads, CP sizes stop at 4; Megatron would
    double the lone group up to all 8 ranks, here the fill stops at 4 and 4 ranks idle."""
    cm = toy(8, heads=4)
    plan = megatron_dcp_plan([100], cm)
    assert groups(plan, [100]) == [[(4, [100])]]
    assert plan.idle_devices() == [4] and plan.extra["capped_fills"] == 1


def test_megatron_uses_every_rank_and_never_pads_or_drops():
    cm = load_preset("paper-gpt7b-192k").with_devices(16)
    for seed in range(5):
        L = sample_lengths("github", 96, seed, 16 * cm.capacity_tokens).tolist()
        plan = megatron_dcp_plan(L, cm)
        validate_plan(plan, L, cm)
        assert plan.idle_devices() == [0] * len(plan.micro_batches)
        assert sorted(i for mb in plan.micro_batches for g in mb.groups for i in g.seq_ids) == list(range(96))


# ---- every policy: valid plans on random and adversarial batches --------------------------------

SETTINGS = PolicySettings(time_limit=0.2, official_milp_s=0.05)


def adversarial(cm: CostModel) -> dict[str, list[int]]:
    c, n = cm.capacity_tokens, cm.num_devices
    return {
        "all equal": [c] * 40,
        "one giant, many tiny": [n * c] + [1] * 60,
        "capacity edges": [c - 1, c, c + 1, 2 * c, 2 * c + 1, 4 * c - 1, 1, 2, 3] * 3,
        "all ones": [1] * 50,
        "single": [3 * c],
        "ramp": list(range(1, n * c, max(1, n * c // 37))),
    }


@pytest.mark.parametrize("n", [8, 16])
def test_every_policy_valid_on_adversarial_batches(n):
    cm = load_preset("paper-gpt7b-192k").with_devices(n)
    for label, L in adversarial(cm).items():
        for name in default_policies(cm, max(L)):
            plan = run_policy(name, L, cm, SETTINGS)
            validate_plan(plan, L, cm)  # each sequence once, aligned blocks, memory
            assert plan.predicted_ms == pytest.approx(price_plan(plan, L, cm), rel=1e-9), (label, name)


def test_every_policy_valid_on_random_batches_and_presets():
    rng = np.random.default_rng(0)
    for preset, n, dist in (
        ("paper-gpt30b-384k", 32, "bytescale"),
        ("h100-nvlink4-ib8x400-gpt7b-estimate", 8, "prolong-64k"),
        ("h200-nvlink4-ib8x400-gpt30b-estimate", 16, "cpython"),
    ):
        cm = load_preset(preset).with_devices(n)
        for seed in range(2):
            L = sample_lengths(dist, int(rng.integers(8, 48)), seed, n * cm.capacity_tokens).tolist()
            for name in default_policies(cm, max(L)):
                plan = run_policy(name, L, cm, SETTINGS)
                validate_plan(plan, L, cm)


def test_policy_names_are_checked():
    cm = load_preset("paper-gpt7b-192k").with_devices(8)
    longest = 3 * cm.capacity_tokens
    assert static_degrees(cm, longest) == [4, 8]
    assert parse_policies(None, cm, longest)[-2:] == ["static-4", "static-8"]
    assert parse_policies("flexsp, static-8", cm, longest) == ["flexsp", "static-8"]
    for bad, needle in (
        ("nope", "unknown policy 'nope'"),
        ("static-2", "valid static degrees: static-4, static-8"),
        ("static-x", "static-x cannot run"),
        ("", "names no policy"),
        ("flexsp,flexsp", "twice"),
    ):
        with pytest.raises(ValueError, match=needle):
            parse_policies(bad, cm, longest)


# ---- flexsp is never slower than best-static ---------------------------------------------------


@pytest.mark.parametrize(
    "preset,n,dist",
    [
        ("paper-gpt7b-192k", 64, "wikipedia"),
        ("paper-gpt7b-192k", 8, "cpython"),
        ("paper-gpt30b-384k", 32, "github"),
        ("h100-nvlink4-ib8x400-gpt7b-estimate", 64, "prolong-64k"),
    ],
)
def test_flexsp_never_slower_than_best_static_or_megatron_dcp(preset, n, dist):
    cm = load_preset(preset).with_devices(n)
    for seed in range(4):
        L = sample_lengths(dist, 48 + 16 * seed, seed, n * cm.capacity_tokens).tolist()
        best_static = best_static_policy(L, cm, SETTINGS).predicted_ms
        mdcp = megatron_dcp_plan(L, cm).predicted_ms
        for limit in (0.02, 0.2):  # a box too short for the search falls back to its safety nets
            ours = run_policy("flexsp", L, cm, PolicySettings(time_limit=limit)).predicted_ms
            assert ours <= min(best_static, mdcp) * (1 + 1e-12), (seed, limit, ours, best_static, mdcp)


def test_flexsp_never_slower_than_best_static_when_chunked(monkeypatch):
    """Chunked planning (stratified chunks planned apart) also keeps the whole-batch safety nets."""
    monkeypatch.setattr(planner, "CHUNK_SEQUENCES", 40)
    cm = load_preset("paper-gpt7b-192k").with_devices(16)
    for seed in range(3):
        L = sample_lengths("wikipedia", 200, seed, 16 * cm.capacity_tokens).tolist()
        plan = run_policy("flexsp", L, cm, SETTINGS)
        assert plan.extra["chunks"] > 1
        assert plan.predicted_ms <= best_static_policy(L, cm, SETTINGS).predicted_ms * (1 + 1e-12)
        assert plan.predicted_ms <= megatron_dcp_plan(L, cm).predicted_ms * (1 + 1e-12)


# ---- topology form and machine presets ---------------------------------------------------------


def test_topology_fills_bandwidth_tables_by_hand():
    t = Topology(gpus_per_node=8, intra_node_gbps=450, inter_node_gbps=50, efficiency=0.7)
    # SP=2 in a node: half of each device's data crosses NVLink: 0.7 / (0.5 / 450) = 630 GB/s
    assert t.all_to_all_gbps(2) == pytest.approx(630.0)
    # SP=16 over two nodes: 7/16 over NVLink, 8/16 over the network, the network is the bottleneck
    assert t.all_to_all_gbps(16) == pytest.approx(0.7 / (8 / 16 / 50))
    assert t.p2p_gbps(8) == pytest.approx(315.0) and t.p2p_gbps(16) == pytest.approx(35.0)
    with pytest.raises(ValueError, match="gpus_per_node must be a power of two"):
        Topology(gpus_per_node=6, intra_node_gbps=1, inter_node_gbps=1)


def test_cost_model_file_topology_form(tmp_path):
    data = load_preset("paper-gpt7b-192k").to_dict()
    del data["bandwidth_gbps"], data["devices_per_node"]
    data["topology"] = {"gpus_per_node": 4, "intra_node_gbps": 100, "inter_node_gbps": 10}
    data["bandwidth_gbps"] = {"2": 99.0}  # a given entry wins over the form
    (tmp_path / "cm.json").write_text(json.dumps(data))
    cm = CostModel.load(tmp_path / "cm.json")
    assert cm.devices_per_node == 4 and cm.bandwidth_gbps[2] == 99.0
    assert cm.bandwidth_gbps[8] == pytest.approx(0.7 / (4 / 8 / 10))
    data["topology"] = {"gpus_per_node": 8}
    (tmp_path / "bad.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="bad.json: topology must be an object with gpus_per_node"):
        CostModel.load(tmp_path / "bad.json")


def test_machine_presets_are_labelled_estimates():
    for machine in MACHINES:
        for model in ("gpt7b", "gpt30b"):
            name = machine_preset_name(machine, model)
            cm = load_preset(name)
            assert name.endswith("-estimate") and cm.source.startswith("ESTIMATE")
            assert all(cm.attention_modes(d) for d in cm.with_devices(1024).degrees)  # ring: every degree
    h100, h200 = (load_preset(machine_preset_name(m, "gpt7b")) for m in ("h100", "h200"))
    assert h200.capacity_tokens > 1.8 * h100.capacity_tokens  # 141 GB vs 80 GB, same compute
    assert h100.a2 == h200.a2


def test_prolong_mix_token_shares():
    """ProLong 64K stage: 60% of tokens in 64K sequences (code repos 30% + books 30%)."""
    L = sample_lengths("prolong-64k", 60_000, 0)
    assert L[L == 65536].sum() / L.sum() == pytest.approx(0.60, abs=0.03)
    L = sample_lengths("prolong-512k", 200_000, 0)
    assert L[L == 524288].sum() / L.sum() == pytest.approx(0.20, abs=0.04)
    assert L[L == 65536].sum() / L.sum() == pytest.approx(0.40, abs=0.04)
