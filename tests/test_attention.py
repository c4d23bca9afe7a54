"""Distributed attention vs a single-process reference: every mode, forward and backward.

One spawned world per world size; each loops over many cases (spawning costs seconds).
"""

from __future__ import annotations

import itertools

import pytest
import torch
from attn_cases import check_case
from dist_harness import run_distributed

# Uneven documents: empty, shorter than the degree, a long one, odd lengths.
DOCS = [
    [0, 3, 3, 20, 21, 40, 47],  # 6 docs incl. an empty one and a 1-token one
    [0, 57],
]  # one document spanning every rank
FP32, BF16 = torch.float32, torch.bfloat16


def _cases(degree):
    heads = 4
    for mode, cu, kvh, dtype in itertools.product(
        ("ulysses", "ring", "hybrid"), DOCS, (1, 2, heads), (FP32, BF16)
    ):
        kw = {"heads": heads} if mode == "hybrid" else {}
        if mode == "hybrid" and degree == 4:
            kw = {"ulysses_degree": 2}  # 2 x 2: both levels active
        yield mode, cu, heads, kvh, dtype, kw


def _run_all(rank, world, extra):
    from flexsp.topology import SPTopology

    topo = SPTopology(world).build()
    group = topo.group(world, 0)
    done = []
    for mode, cu, heads, kvh, dtype, kw in _cases(world):
        name = f"{mode} d={world} cu={cu} heads={heads} kv={kvh} {dtype} {kw}"
        try:
            check_case(group, mode, cu, heads, kvh, dtype, **kw)
        except Exception as e:
            raise AssertionError(f"case failed: {name}") from e
        done.append(name)
    for fn in extra:
        done += globals()[fn](rank, world, topo)
    return done


def _noncausal_and_gqa_replication(rank, world, topo):
    g = topo.group(world, 0)
    check_case(g, "ring", [0, 8, 32], 4, 2, FP32, causal=False)
    check_case(g, "ulysses", [0, 9, 30], 4, 4, FP32, causal=False)
    # heads (2) < degree (4): hybrid must use u=2 (Ulysses) x r=2 (ring)
    meta = check_case(g, "hybrid", [0, 5, 33], 2, 1, FP32, heads=2)
    assert (meta.ulysses_degree, meta.ring_degree) == (2, 2)
    # ring with kv heads == 1 and hybrid with u=4 (kv replicated 4x since kv_heads < u)
    check_case(g, "hybrid", [0, 2, 3, 25], 4, 1, FP32, ulysses_degree=4)
    return ["noncausal+hybrid-heads<degree"]


def _concurrency(rank, world, topo):
    """{0,1} ring, {2} and {3} local at the same time, then {0..3} hybrid."""
    cu = [0, 7, 8, 30]
    if rank < 2:
        check_case(topo.group_of(2, rank), "ring", cu, 4, 2, FP32, seed=1)
    else:
        check_case(topo.group_of(1, rank), "ulysses", cu, 4, 2, FP32, seed=2)
        check_case(None, "ring", cu, 4, 2, FP32, seed=3)  # group=None: local
    check_case(topo.group(4, 0), "hybrid", cu, 4, 2, FP32, seed=4, ulysses_degree=2)
    # and the other way round: two rings of 2 concurrently, then Ulysses on 4
    check_case(topo.group_of(2, rank), "ring", [0, 1, 2, 19], 2, 1, FP32, seed=5)
    check_case(topo.group(4, 0), "ulysses", [0, 1, 2, 19], 4, 4, FP32, seed=6)
    return ["concurrency"]


@pytest.mark.slow
def test_attention_2_ranks():
    res = run_distributed(_run_all, 2, args=(["_noncausal_2"],), timeout=150)
    assert res[0] == res[1] and len(res[0]) > 30


def _noncausal_2(rank, world, topo):
    g = topo.group(2, 0)
    check_case(g, "ring", [0, 8, 32], 4, 2, FP32, causal=False)
    check_case(g, "ulysses", [0, 1, 30], 4, 1, FP32, causal=False)
    with pytest.raises(ValueError, match="non-causal ring"):
        check_case(g, "ring", [0, 9, 30], 4, 2, FP32, causal=False)
    return ["noncausal"]


@pytest.mark.slow
def test_attention_4_ranks_with_concurrency():
    res = run_distributed(
        _run_all, 4, args=(["_noncausal_and_gqa_replication", "_concurrency"],), timeout=170
    )
    assert all(r == res[0] for r in res) and "concurrency" in res[0]
