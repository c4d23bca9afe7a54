"""Sequence-parallel attention of one rank's shard: Ulysses, or hybrid Ulysses x ring."""

from __future__ import annotations

from .hybrid import hybrid_attention
from .sharding import MODES, ShardMeta
from .ulysses import ulysses_attention


def sp_attention(q, k, v, meta: ShardMeta, group, mode, causal=True, *, backend=None, scale=None):
    """Attention of this rank's tokens ``q [T_local, H, D]``, ``k/v [T_local, Hkv, D]``.

    ``meta`` comes from :func:`shard` with the same ``group`` and ``mode``. ``backend``
    overrides the local kernel (see local.py). Returns ``[T_local, H, D]``.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if mode != meta.mode and meta.degree > 1:
        raise ValueError(f"meta was built for mode {meta.mode!r}, not {mode!r}")
    if q.shape[0] != meta.tokens_local or k.shape[0] != meta.tokens_local:
        raise ValueError(f"q/k have {q.shape[0]}/{k.shape[0]} tokens, meta expects {meta.tokens_local}")
    if meta.ring_degree == 1:
        return ulysses_attention(q, k, v, meta, group, causal, backend, scale)
    return hybrid_attention(q, k, v, meta, group, causal, backend, scale)
