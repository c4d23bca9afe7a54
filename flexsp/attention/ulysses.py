"""Ulysses sequence parallelism: all-to-all heads <-> tokens around local attention.

Each of the ``u`` ranks holds ``T/u`` contiguous tokens with all heads. An all-to-all
(``all_to_all_single``) scatters heads and gathers tokens, so each rank holds all ``T``
tokens for ``H/u`` heads and runs ordinary varlen causal attention; the inverse all-to-all
restores the token sharding.

GQA: kv heads are sent as they are when ``u`` divides them (each rank gets ``Hkv/u``), so
GQA's bandwidth saving survives; when ``Hkv < u`` each kv head is replicated only
``u / gcd(Hkv, u)`` times, just enough for every rank to hold the kv heads its query heads use.

In hybrid mode the all-to-all runs over a *sub-group* of ``u`` consecutive ranks of the SP
group; it is issued on the whole group with zero split sizes for the other ranks, so no
extra process group is needed.
"""

from __future__ import annotations

import math

from .comm import AllToAll, group_rank, group_size
from .local import varlen_attention


def _splits(group, u: int, rows: int) -> list[int]:
    """Row split sizes for an all-to-all inside this rank's sub-group of ``u`` ranks."""
    n, g = group_size(group), group_rank(group)
    base = (g // u) * u
    return [rows if base <= p < base + u else 0 for p in range(n)]


def scatter_heads(x, group, u: int):
    """[T, H, D] (all heads, my tokens) -> [u*T, H/u, D] (my heads, the sub-group's tokens)."""
    if u == 1:
        return x
    T, H, D = x.shape
    send = x.reshape(T, u, H // u, D).transpose(0, 1).reshape(u * T, H // u, D)
    sp = _splits(group, u, T)
    return AllToAll.apply(send, group, sp, sp)


def gather_heads(x, group, u: int):
    """Inverse of :func:`scatter_heads`: [u*T, H/u, D] -> [T, H, D]."""
    if u == 1:
        return x
    uT, h, D = x.shape
    T = uT // u
    sp = _splits(group, u, T)
    recv = AllToAll.apply(x, group, sp, sp)  # [u*T, h, D], block p = heads of p
    return recv.reshape(u, T, h, D).transpose(0, 1).reshape(T, u * h, D)


def check_heads(heads: int, kv_heads: int, u: int, mode: str) -> int:
    """Validate head counts for a Ulysses degree ``u``; return the kv replication factor."""
    if heads % kv_heads:
        raise ValueError(f"heads ({heads}) must be a multiple of kv_heads ({kv_heads})")
    if heads % u:
        hint = (
            "use mode='hybrid' (Ulysses inside sub-groups x ring across them) or mode='ring'"
            if mode == "ulysses"
            else f"pass ulysses_degree=<a divisor of {heads}> to shard()"
        )
        raise ValueError(f"{mode}: {heads} query heads are not divisible by the Ulysses degree {u}; {hint}")
    rep = u // math.gcd(kv_heads, u)
    if (heads // u) % (kv_heads * rep // u):
        raise ValueError(f"cannot split kv_heads={kv_heads} for heads={heads} over {u} ranks")
    return rep


def ulysses_attention(q, k, v, meta, group, causal=True, backend=None, scale=None, window=None):
    """Ulysses attention for tokens sharded by ``shard(..., mode='ulysses')``. ``window``: causal
    sliding-window attention (see ``varlen_attention``); each rank holds whole documents for its
    heads, so the window is exact."""
    u = meta.ulysses_degree
    rep = check_heads(q.shape[1], k.shape[1], u, meta.mode)
    if rep > 1:
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    qh, kh, vh = (scatter_heads(t, group, u) for t in (q, k, v))
    cu = [0]
    for p in meta.padded_seqlens:
        cu.append(cu[-1] + p)
    if window:
        out = varlen_attention(qh, kh, vh, cu, causal=causal, backend=backend, scale=scale, window=window)
    else:
        out = varlen_attention(qh, kh, vh, cu, causal=causal, backend=backend, scale=scale)
    return gather_heads(out, group, u)
