"""Sharding a group's packed buffer across its ranks, and back.

One layout covers all three modes. A group of degree ``d = ring_degree * ulysses_degree``
(ranks ordered ``g = ring_index * ulysses_degree + ulysses_index``):

1. Each document is padded at its *end* to a multiple of ``2 * ring_degree`` (no padding when
   ``ring_degree == 1``); a trailing all-padding document makes the total divisible by
   ``d``. Padding sits after the document's real tokens, so causal attention never lets a
   real token see it: it needs no mask in attention, only ``valid_mask`` for the loss.
2. Ring level (load balance): each padded document is cut into ``2r`` equal chunks and ring
   slot ``j`` takes chunks ``j`` and ``2r-1-j`` (head/tail halves), so every slot gets the same
   share of causal work (a cheap early chunk plus an expensive late one) for every document.
3. Ulysses level: a slot's buffer is split contiguously across its ``u`` ranks.

``ulysses``: r=1, u=d (contiguous). ``ring``: r=d, u=1. ``hybrid``: both.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .comm import AllGather, group_rank, group_size

MODES = ("ulysses", "ring", "hybrid")


@dataclass
class ShardMeta:
    """How a group's packed buffer was split. Same for every tensor sharded with it.

    Per-rank tensors (``[tokens_local]``, on the sharded tensor's device):
      index          global token index in the unpadded buffer, -1 for padding
      valid_mask     bool, False for padding tokens (mask them out of the loss)
      position_ids   position of each token inside its document (padding continues counting)
      doc_ids        document index of each token (the trailing pad document is ``num_docs``)
    Python values:
      local_cu_seqlens  boundaries of the contiguous same-document runs of the local buffer
                        (ring: a document contributes a head run and a tail run)
      mode, degree, ring_degree, ulysses_degree, rank (in group), num_tokens (unpadded),
      cu_seqlens (global, unpadded), padded_seqlens (per document incl. trailing pad doc),
      tokens_local, all_index (``[degree * tokens_local]``, every rank's index, for unshard)
    """

    mode: str
    degree: int
    ring_degree: int
    ulysses_degree: int
    rank: int
    num_tokens: int
    cu_seqlens: tuple
    padded_seqlens: tuple
    tokens_local: int
    local_cu_seqlens: tuple
    index: torch.Tensor
    all_index: torch.Tensor
    valid_mask: torch.Tensor
    position_ids: torch.Tensor
    doc_ids: torch.Tensor

    @property
    def slot_chunk_lens(self) -> tuple:
        """Per document, the length of one ring chunk (``padded / (2 r)``; r=1: the doc)."""
        r = self.ring_degree
        return tuple(p // (2 * r) if r > 1 else p for p in self.padded_seqlens)


def split_degree(mode: str, degree: int, heads: int | None = None,
                 ulysses_degree: int | None = None) -> tuple[int, int]:
    """(ring_degree, ulysses_degree) for ``mode`` on ``degree`` ranks."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if mode == "ulysses" or degree == 1:
        return 1, degree
    if mode == "ring":
        return degree, 1
    if ulysses_degree is None:
        if heads is None:
            raise ValueError("mode='hybrid' needs heads=<query heads> or ulysses_degree=<u> "
                             "at shard() time to fix the layout")
        ulysses_degree = math.gcd(heads, degree)   # degree is a power of two
    if ulysses_degree < 1 or degree % ulysses_degree:
        raise ValueError(f"ulysses_degree={ulysses_degree} must divide the group degree {degree}")
    return degree // ulysses_degree, ulysses_degree


def _layout(cu: list[int], d: int, r: int):
    """Per group rank, the list of global indices (-1 = padding) and (doc, pos) per token."""
    lens = [b - a for a, b in zip(cu[:-1], cu[1:])]
    if any(n < 0 for n in lens) or cu[0] != 0:
        raise ValueError(f"cu_seqlens must start at 0 and be non-decreasing, got {cu}")
    m = 2 * r if r > 1 else 1
    padded = [-(-n // m) * m for n in lens]
    unit = m * d // math.gcd(m, d)
    tail = -(-sum(padded) // unit) * unit - sum(padded)
    docs = list(zip(cu[:-1], lens, padded))
    if tail:
        docs.append((0, 0, tail))
        padded.append(tail)
    slots = [[] for _ in range(r)]                    # entries: (global idx, doc, pos)
    for i, (start, n, p) in enumerate(docs):
        c = p // m
        for j in range(r):
            chunks = (j, 2 * r - 1 - j) if r > 1 else (0,)
            for ch in chunks:
                slots[j].extend((start + t if t < n else -1, i, t)
                                for t in range(ch * c, (ch + 1) * c))
    u = d // r
    per = len(slots[0]) // u
    ranks = [slots[j][i * per:(i + 1) * per] for j in range(r) for i in range(u)]
    return ranks, padded


def make_meta(cu_seqlens, group, mode, *, heads=None, ulysses_degree=None, device=None):
    cu = cu_seqlens.tolist() if torch.is_tensor(cu_seqlens) else [int(c) for c in cu_seqlens]
    d, g = group_size(group), group_rank(group)
    r, u = split_degree(mode, d, heads, ulysses_degree)
    ranks, padded = _layout(cu, d, r)
    mine = ranks[g]
    runs, prev = [0], None
    for k, (_, doc, pos) in enumerate(mine):
        if prev is not None and (doc, pos) != (prev[0], prev[1] + 1):
            runs.append(k)
        prev = (doc, pos)
    if mine:
        runs.append(len(mine))
    t = lambda col: torch.tensor([e[col] for e in mine], dtype=torch.long, device=device)  # noqa: E731
    index = t(0)
    return ShardMeta(mode=mode, degree=d, ring_degree=r, ulysses_degree=u, rank=g,
                     num_tokens=cu[-1], cu_seqlens=tuple(cu), padded_seqlens=tuple(padded),
                     tokens_local=len(mine), local_cu_seqlens=tuple(runs), index=index,
                     all_index=torch.tensor([e[0] for rk in ranks for e in rk], dtype=torch.long,
                                            device=device),
                     valid_mask=index >= 0, position_ids=t(2), doc_ids=t(1))


def shard(x, cu_seqlens, group, mode, *, heads=None, ulysses_degree=None, pad_value=0,
          meta=None):
    """This rank's tokens of the packed buffer ``x`` ``[tokens, ...]`` (same on every rank).

    Returns ``(local_x, meta)``. Pass ``meta=`` to shard more tensors (labels, positions)
    with an existing layout. Padding rows are filled with ``pad_value``. Differentiable
    (gradient flows to this rank's rows of ``x``).
    """
    if meta is None:
        meta = make_meta(cu_seqlens, group, mode, heads=heads, ulysses_degree=ulysses_degree,
                         device=x.device)
    if x.shape[0] != meta.num_tokens:
        raise ValueError(f"x has {x.shape[0]} tokens but cu_seqlens ends at {meta.num_tokens}")
    idx = meta.index.to(x.device)
    pad = torch.full((1,) + tuple(x.shape[1:]), pad_value, dtype=x.dtype, device=x.device)
    src = torch.cat([x, pad])
    return src[torch.where(idx >= 0, idx, x.shape[0])], meta


def unshard(x_local, meta: ShardMeta, group):
    """Gather every rank's ``[tokens_local, ...]`` back into the unpadded packed buffer
    ``[tokens, ...]`` on every rank of the group (differentiable; see comm.AllGather)."""
    if x_local.shape[0] != meta.tokens_local:
        raise ValueError(f"x_local has {x_local.shape[0]} rows, meta expects {meta.tokens_local}")
    full = x_local if meta.degree == 1 else AllGather.apply(x_local, group)
    idx = meta.all_index.to(x_local.device)
    keep = (idx >= 0).nonzero().squeeze(1)
    out = full.new_zeros((meta.num_tokens,) + tuple(full.shape[1:]))
    return out.index_copy(0, idx[keep], full[keep])
