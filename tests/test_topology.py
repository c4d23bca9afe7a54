"""SPTopology: validation, layout, and real group creation/concurrency on 4 gloo ranks."""

from __future__ import annotations

import pytest
from dist_harness import run_distributed

from flexsp.topology import SPTopology


def test_layout_and_validation():
    t = SPTopology(8, devices_per_node=4)
    assert t.degrees == [1, 2, 4, 8]
    assert len(t.all_blocks()) == 2 * 8 - 1
    assert t.ranks(2, 1) == [2, 3] and t.ranks(8, 0) == list(range(8))
    assert t.block_of(4, 5) == 1 and t.is_intra_node(4) and not t.is_intra_node(8)
    for bad in (0, 3, 6, -2):
        with pytest.raises(ValueError, match="power of two"):
            SPTopology(bad)
    with pytest.raises(ValueError, match="devices_per_node"):
        SPTopology(8, devices_per_node=3)
    with pytest.raises(ValueError, match="degree must be one of"):
        t.ranks(3, 0)
    with pytest.raises(ValueError, match="block must be in"):
        t.ranks(2, 4)
    with pytest.raises(RuntimeError, match="build"):
        t.group(2, 0)


def _body(rank, world):
    import torch
    import torch.distributed as dist

    topo = SPTopology(world).build()
    # degree 1: no communicator; degree == world: the default group; in between: the 2 pairs.
    # On gloo the host group is the default group too: 2 communicators for 4 ranks (7 before).
    assert topo.num_communicators == 2 and topo.host_group is dist.group.WORLD
    assert topo.group(4, 0) is dist.group.WORLD and topo.group(1, rank) is None
    seen = {}
    for d, b in topo.all_blocks():
        g = topo.group(d, b)
        if rank in topo.ranks(d, b) and d > 1:
            assert dist.get_world_size(g) == d
            assert [dist.get_global_rank(g, i) for i in range(d)] == topo.ranks(d, b)
            assert topo.group_of(d, rank) is g
    # groups of different sizes at the same time on disjoint ranks: {0,1}, {2}, {3}
    t = torch.ones(1) * (rank + 1)
    g = topo.group_of(2, rank) if rank < 2 else None
    for _ in range(20 if g is not None else 0):
        dist.all_reduce(t, group=g)
    seen["mixed"] = t.item()
    t = torch.ones(1)
    dist.all_reduce(t, group=topo.group(4, 0))
    seen["all"] = t.item()
    return seen


@pytest.mark.slow
def test_build_groups_4_ranks():
    res = run_distributed(_body, 4, timeout=90)
    assert res[0]["mixed"] == 3 * 2**19 and res[2]["mixed"] == 3 and res[3]["mixed"] == 4
    assert all(r["all"] == 4 for r in res)


def test_communicators_for_64_ranks():
    """A 64-rank world (fake process group, rank 0): the SP groups a plan can use are the aligned
    blocks of degree 2..32 (32 + 16 + 8 + 4 + 2 = 62); degree 1 has no communicator, degree 64 is the
    default group. (Under NCCL one gloo group for host objects comes on top: 63; the fake backend,
    like gloo, carries them itself.) Before: one group per (degree, block), 2 * 64 - 1 = 127."""
    import torch.distributed as dist

    from flexsp.dryrun import FakeWorld

    with FakeWorld(64):
        topo = SPTopology(64, 8).build()
        assert topo.num_communicators == 62
        assert topo.group(1, 5) is None and topo.group(64, 0) is dist.group.WORLD
