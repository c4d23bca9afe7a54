"""Baselines and the official-planner re-implementation: valid plans, the official static formula,
bad input, and agreement with the independent judge (shared/tools/check_plan.py)."""

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from solver.baselines import (
    BASELINES,
    best_fit_decreasing,
    best_homogeneous_plan,
    greedy_hybrid_cp_plan,
    static_plan,
)
from solver.build import price_plan, validate_plan
from solver.official import bucket_lengths, chunk_global_batch, official_flexsp_plan
from solver.presets import context_limit, load_preset
from solver.workloads import sample_lengths, save_lengths

CHECK_PLAN = Path(__file__).resolve().parents[2] / "shared" / "tools" / "check_plan.py"
PRESETS = ["paper-gpt7b-192k", "paper-gpt30b-384k", "paper-gpt13b-192k"]
DISTS = ["wikipedia", "github", "bytescale", "cpython"]


def _lengths(dist, preset, n=128, seed=0):
    return sample_lengths(dist, n, seed, context_limit(preset), pad_to=128)


def _check_blocks(plan, cm):
    for mb in plan.micro_batches:
        assert sum(g.sp for g in mb.groups) <= cm.num_devices
        for g in mb.groups:
            assert g.ranks[0] % g.sp == 0 and len(g.ranks) == g.sp


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("dist", DISTS)
@pytest.mark.parametrize("name", sorted(BASELINES))
def test_baselines_valid(name, dist, preset):
    cm = load_preset(preset)
    L = _lengths(dist, preset)
    plan = BASELINES[name](L, cm)
    validate_plan(plan, L.tolist(), cm)  # every sequence once, aligned disjoint blocks, memory
    _check_blocks(plan, cm)
    assert plan.predicted_ms == pytest.approx(price_plan(plan, L.tolist(), cm), rel=1e-6)


def test_static_degree_below_n_and_small_cluster():
    cm = load_preset("paper-gpt7b-192k").with_devices(8)
    L = sample_lengths("cpython", 200, 1, 8 * cm.capacity_tokens)
    for degree in (1, 4, 8):
        if L.max() <= degree * cm.capacity_tokens:
            plan = static_plan(L, cm, degree)
            validate_plan(plan, L.tolist(), cm)
            assert {g.sp for mb in plan.micro_batches for g in mb.groups} == {degree}
            assert all(len(mb.groups) <= 8 // degree for mb in plan.micro_batches)
    validate_plan(greedy_hybrid_cp_plan(L, cm), L.tolist(), cm)
    validate_plan(best_homogeneous_plan(L, cm), L.tolist(), cm)


def test_static_64_matches_official_formula_by_hand():
    # gpt-7b, 192K: C = 6449, bins of 0.9 * 6449 * 64 = 371,462.4 tokens.
    # BFD: 200K -> bin0 (171,462 left); 150K -> bin0 (21,462 left); 100K -> bin1; 50K -> bin1
    # (only bin with room); 30K -> bin1 (bin0 too full). Two micro-batches of one SP=64 group.
    cm = load_preset("paper-gpt7b-192k")
    assert cm.capacity_tokens == 6449
    L = [100_000, 30_000, 200_000, 50_000, 150_000]
    plan = static_plan(L, cm)
    assert [sorted(g.seq_ids) for mb in plan.micro_batches for g in mb.groups] == [[2, 4], [0, 1, 3]]
    a1, a2, b = 5.128e-6, 0.1839576, 629.3563

    def t(lens):  # the paper's formula, written out
        return (
            sum(a1 * x * x + a2 * x for x in lens) / 64 + b + 16 * 32 * 4096 * sum(lens) / 2**20 / 64 / 4.87
        )

    assert plan.predicted_ms == pytest.approx(t([200_000, 150_000]) + t([100_000, 30_000, 50_000]), rel=1e-6)


def test_best_fit_decreasing_oversized_item_gets_own_bin():
    bins = best_fit_decreasing(np.array([5, 12, 3, 4]), range(4), 10)
    # 12 -> own closed bin; 5 -> new bin; 4 -> same bin (1 left); 3 -> new bin
    assert bins == [[1], [0, 3], [2]]


def test_best_homogeneous_beats_or_ties_every_static_degree():
    cm = load_preset("paper-gpt7b-192k")
    L = _lengths("commoncrawl", "paper-gpt7b-192k", 256, 3)
    best = best_homogeneous_plan(L, cm)
    lo = cm.min_degree(int(L.max()))
    for d in (d for d in cm.degrees if d >= lo):
        # best homogeneous packs with full-capacity bins; static uses 90% bins, so it may be worse
        assert best.predicted_ms <= static_plan(L, cm, d).predicted_ms * 1.05


@pytest.mark.parametrize("dist", ["wikipedia", "github"])
def test_official_valid_and_never_sp1(dist):
    cm = load_preset("paper-gpt7b-192k")
    L = _lengths(dist, "paper-gpt7b-192k", 96, 2)
    plan = official_flexsp_plan(L, cm, time_limit_per_milp=0.2, extra_micro_batches=1)
    validate_plan(plan, L.tolist(), cm)
    _check_blocks(plan, cm)
    assert all(g.sp >= 2 for mb in plan.micro_batches for g in mb.groups)
    assert plan.predicted_ms == pytest.approx(price_plan(plan, L.tolist(), cm), rel=1e-6)


def test_official_helpers():
    L = np.array([90, 80, 70, 60, 50, 40, 30, 20, 10])
    chunks = chunk_global_batch(L, list(range(9)), 3)
    assert sum(chunks, []) == list(range(9))
    assert max(int(L[c].sum()) for c in chunks) == 170  # [90,80] [70,60] [50..10]: best contiguous
    buckets = bucket_lengths(np.sort(L), 3)
    assert [bd for bd, _ in buckets] == sorted(bd for bd, _ in buckets) and len(buckets) <= 3
    assert sum(len(p) for _, p in buckets) == 9


@pytest.mark.parametrize("fn", [*BASELINES.values(), lambda L, cm: official_flexsp_plan(L, cm, 0.1)])
def test_sequence_too_long_raises(fn):
    cm = load_preset("paper-gpt7b-192k")
    too_long = 64 * cm.capacity_tokens + 1
    with pytest.raises(ValueError, match=str(too_long)):
        fn([1000, too_long, 2000], cm)
    with pytest.raises(ValueError, match=">= 1"):
        fn([1000, 0], cm)


def test_static_fixed_degree_too_small_raises():
    cm = load_preset("paper-gpt7b-192k")
    with pytest.raises(ValueError, match="exceed"):
        static_plan([8 * cm.capacity_tokens + 1], cm, degree=8)
    with pytest.raises(ValueError, match="power of two"):
        static_plan([100], cm, degree=3)


@pytest.mark.skipif(not CHECK_PLAN.exists(), reason=f"judge not found at {CHECK_PLAN}")
@pytest.mark.parametrize("preset", ["paper-gpt7b-192k", "paper-gpt30b-384k"])
def test_judge_agrees_with_price_plan(tmp_path, preset):
    cm = load_preset(preset)
    L = _lengths("github", preset, 128, 5)
    save_lengths(tmp_path / "lengths.txt", L)
    for fn in (greedy_hybrid_cp_plan, static_plan):
        plan = fn(L, cm)
        (tmp_path / "plan.json").write_text(plan.to_json())
        out = subprocess.run(
            [
                sys.executable,
                str(CHECK_PLAN),
                str(tmp_path / "lengths.txt"),
                str(tmp_path / "plan.json"),
                "--preset",
                preset,
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert out.returncode == 0, out.stdout + out.stderr
        judged = float(out.stdout.rsplit("iteration time", 1)[1].split()[0])
        # the judge prints 2 decimals: agreement to that print precision and 1e-6 relative
        assert math.isclose(judged, price_plan(plan, L.tolist(), cm), rel_tol=1e-6, abs_tol=0.005)
