"""The vectorised shard layout (sharding._layout / make_meta) equals a straightforward
per-token reference, on random cu_seqlens, for every mode and degree (no processes)."""

from __future__ import annotations

import math
import random

import pytest
import torch

import flexsp.attention.sharding as sh


def _reference_layout(cu, d, r):
    """The layout spelled out token by token (the original implementation)."""
    lens = [b - a for a, b in zip(cu[:-1], cu[1:])]
    m = 2 * r if r > 1 else 1
    padded = [-(-n // m) * m for n in lens]
    unit = m * d // math.gcd(m, d)
    tail = -(-sum(padded) // unit) * unit - sum(padded)
    docs = list(zip(cu[:-1], lens, padded))
    if tail:
        docs.append((0, 0, tail))
        padded.append(tail)
    slots = [[] for _ in range(r)]  # entries: (global idx, doc, pos)
    for i, (start, n, p) in enumerate(docs):
        c = p // m
        for j in range(r):
            for ch in (j, 2 * r - 1 - j) if r > 1 else (0,):
                slots[j].extend((start + t if t < n else -1, i, t) for t in range(ch * c, (ch + 1) * c))
    u = d // r
    per = len(slots[0]) // u
    ranks = [slots[j][i * per : (i + 1) * per] for j in range(r) for i in range(u)]
    runs = []
    for mine in ranks:
        rr, prev = [0], None
        for k, (_, doc, pos) in enumerate(mine):
            if prev is not None and (doc, pos) != (prev[0], prev[1] + 1):
                rr.append(k)
            prev = (doc, pos)
        if mine:
            rr.append(len(mine))
        runs.append(tuple(rr))
    return ranks, padded, runs


def _random_cu(rng):
    n = rng.choice([1, 2, 5, 17])
    lens = [rng.choice([0, 1, 2, 3, rng.randint(1, 40), rng.randint(1, 300)]) for _ in range(n)]
    cu = [0]
    for x in lens:
        cu.append(cu[-1] + x)
    return cu


class _G:  # stand-in process group: only size/rank are read
    def __init__(self, rank):
        self.rank = rank


@pytest.mark.parametrize("degree", [1, 2, 4, 8])
def test_vectorised_layout_matches_reference(degree, monkeypatch):
    monkeypatch.setattr(sh, "group_size", lambda g: degree)
    monkeypatch.setattr(sh, "group_rank", lambda g: g.rank)
    rng = random.Random(degree)
    configs = [("ulysses", {}), ("ring", {})]
    configs += [("hybrid", {"ulysses_degree": u}) for u in (1, 2, 4, 8) if degree % u == 0]
    for trial in range(12):
        cu = _random_cu(rng) if trial else [0]  # first trial: an empty batch
        for mode, kw in configs:
            r, _ = sh.split_degree(mode, degree, **kw)
            ranks, padded, runs = _reference_layout(cu, degree, r)
            index, doc, pos, got_padded = sh._layout(cu, degree, r)
            assert got_padded == padded, (mode, kw, cu)
            for g in range(degree):
                want = torch.tensor(ranks[g], dtype=torch.long).reshape(-1, 3)
                got = torch.stack([index[g], doc[g], pos[g]], 1)
                assert torch.equal(got, want), (mode, kw, cu, g)
                m = sh.make_meta(torch.tensor(cu), _G(g), mode, **kw)
                assert m.local_cu_seqlens == runs[g], (mode, kw, cu, g)
                assert torch.equal(m.index, want[:, 0]) and torch.equal(m.doc_ids, want[:, 1])
                assert torch.equal(m.position_ids, want[:, 2])
                assert torch.equal(m.valid_mask, want[:, 0] >= 0)
                assert torch.equal(
                    m.all_index, torch.tensor([e[0] for rk in ranks for e in rk], dtype=torch.long)
                )
                assert m.padded_seqlens == tuple(padded) and m.tokens_local == len(ranks[g])


def test_layout_rejects_bad_cu_seqlens():
    with pytest.raises(ValueError, match="non-decreasing"):
        sh._layout([0, 5, 3], 2, 2)
    with pytest.raises(ValueError, match="start at 0"):
        sh._layout([1, 5], 1, 1)
