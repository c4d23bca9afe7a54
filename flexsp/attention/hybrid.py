"""Hybrid sequence parallelism: Ulysses inside sub-groups x ring across them.

A group of degree ``d = r * u`` is viewed as ``r`` ring slots of ``u`` consecutive ranks
(consecutive ranks are the ones most likely to share a node). Ulysses' all-to-all inside a
slot turns ``[T/d tokens, H heads]`` into ``[T/r tokens, H/u heads]``; ring attention then
runs across the ``r`` slots for those heads (peers ``u`` ranks apart); the inverse all-to-all
restores the token sharding. Ulysses alone caps the degree at the head count; the ring
factor lifts the cap (e.g. 4 heads on 8 ranks: u=4, r=2), while keeping the ring short.

``u = 1`` is plain ring attention, ``r = 1`` plain Ulysses.
"""

from __future__ import annotations

from .comm import global_rank
from .ring import ring_attention
from .ulysses import check_heads, gather_heads, scatter_heads, ulysses_attention


def hybrid_attention(q, k, v, meta, group, causal=True, backend=None, scale=None):
    """Attention for tokens sharded by ``shard`` with ``ring_degree > 1`` (ring or hybrid)."""
    u, r = meta.ulysses_degree, meta.ring_degree
    if r == 1:
        return ulysses_attention(q, k, v, meta, group, causal, backend, scale)
    if not causal and sum(meta.padded_seqlens) != meta.num_tokens:
        raise ValueError(
            f"non-causal {meta.mode} attention needs document lengths that are multiples of "
            f"2*ring_degree={2 * r} and a total divisible by the degree {meta.degree} (padding "
            f"would be visible); got cu_seqlens={list(meta.cu_seqlens)}. Use causal=True or "
            "mode='ulysses'"
        )
    rep = check_heads(q.shape[1], k.shape[1], u, meta.mode)
    if rep > 1:
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    qh, kh, vh = (scatter_heads(t, group, u) for t in (q, k, v))
    j, i = divmod(meta.rank, u)
    nxt = global_rank(group, ((j + 1) % r) * u + i)
    prv = global_rank(group, ((j - 1) % r) * u + i)
    out = ring_attention(
        qh,
        kh,
        vh,
        meta.slot_chunk_lens,
        group,
        j,
        r,
        nxt,
        prv,
        causal=causal,
        scale=scale,
        backend=backend,
        plan=meta.ring_plan(q.device),
    )
    return gather_heads(out, group, u)
