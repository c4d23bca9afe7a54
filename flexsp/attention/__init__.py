"""Sequence-parallel attention over packed variable-length documents.

A group of ``d`` ranks attends over one packed buffer of whole documents (boundaries in
``cu_seqlens``), each rank holding a shard of the tokens; the result equals single-device
causal attention computed document by document, forward and backward.

Usage (every rank of ``group`` runs the same calls)::

    from flexsp.attention import shard, unshard, sp_attention

    ids, meta = shard(input_ids, cu_seqlens, group, "ring")          # [T_local]
    labels, _ = shard(labels_full, cu_seqlens, group, "ring", meta=meta, pad_value=-100)
    pos = meta.position_ids                                          # RoPE positions
    ...
    out = sp_attention(q, k, v, meta, group, "ring")                 # per layer
    loss = ce(logits[meta.valid_mask], labels[meta.valid_mask])      # skip padding
    full = unshard(out, meta, group)                                 # [T, ...] everywhere

Modes: ``"ulysses"`` (all-to-all heads<->tokens; needs ``heads % d == 0``), ``"ring"``
(KV ring, head/tail load-balanced layout), ``"hybrid"`` (Ulysses inside sub-groups of ``u``
ranks x ring across ``d/u`` of them; give ``heads=`` or ``ulysses_degree=`` to ``shard``).
``group=None`` or a 1-rank group means local attention.

Sharding (see :class:`ShardMeta`): every tensor ``[T, ...]`` of the batch can be sharded with
the same ``meta`` (pass ``meta=``). Layouts may add padding tokens (at the end of
documents, plus a trailing padding document) so shards are equal and ring chunks even;
padding is never seen by real tokens under causal attention, and ``meta.valid_mask``
(bool ``[T_local]``) marks the real tokens for the loss. ``meta.position_ids`` gives each
local token's position inside its document, ``meta.doc_ids`` its document,
``meta.local_cu_seqlens`` the contiguous same-document runs of the local buffer and
``meta.index`` each local token's index in the global buffer (-1 for padding).

Single-device attention: :func:`flexsp.attention.local.varlen_attention`.
"""

from __future__ import annotations

from .context import AttnContext
from .local import varlen_attention
from .sharding import MODES, ShardMeta, shard, unshard
from .sp import sp_attention

__all__ = ["AttnContext", "shard", "unshard", "sp_attention", "ShardMeta", "varlen_attention", "MODES"]
