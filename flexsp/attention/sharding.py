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
from dataclasses import dataclass, field

import torch

from flexsp.hostcopy import to_device

from .comm import AllGather, group_rank, group_size
from .ring import make_plan

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
    _cache: dict = field(default_factory=dict, repr=False, compare=False)

    def ring_plan(self, device):
        """Ring attention's per-document index sets (flexsp.attention.ring.make_plan), built once
        per micro-batch (this layout) and device, not once per layer and pass."""
        key = ("ring_plan", str(device))
        if key not in self._cache:
            self._cache[key] = make_plan(self.slot_chunk_lens, device)
        return self._cache[key]

    @property
    def slot_chunk_lens(self) -> tuple:
        """Per document, the length of one ring chunk (``padded / (2 r)``; r=1: the doc)."""
        r = self.ring_degree
        return tuple(p // (2 * r) if r > 1 else p for p in self.padded_seqlens)


def split_degree(
    mode: str, degree: int, heads: int | None = None, ulysses_degree: int | None = None
) -> tuple[int, int]:
    """(ring_degree, ulysses_degree) for ``mode`` on ``degree`` ranks."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if mode == "ulysses" or degree == 1:
        return 1, degree
    if mode == "ring":
        return degree, 1
    if ulysses_degree is None:
        if heads is None:
            raise ValueError(
                "mode='hybrid' needs heads=<query heads> or ulysses_degree=<u> "
                "at shard() time to fix the layout"
            )
        ulysses_degree = math.gcd(heads, degree)  # degree is a power of two
    if ulysses_degree < 1 or degree % ulysses_degree:
        raise ValueError(f"ulysses_degree={ulysses_degree} must divide the group degree {degree}")
    return degree // ulysses_degree, ulysses_degree


def _layout(cu: list[int], d: int, r: int):
    """Every group rank's tokens, built with tensor ops (no per-token Python loop).

    Returns ``(index, doc, pos, padded)``: ``index``/``doc``/``pos`` are CPU int64 tensors of
    shape ``[d, tokens_local]`` (row ``g`` = group rank ``g``): the global index of each token
    (-1 = padding), its document and its position inside the (padded) document; ``padded``
    lists the padded document lengths (plus the trailing padding document, if any).
    """
    lens = [b - a for a, b in zip(cu[:-1], cu[1:])]
    if any(n < 0 for n in lens) or cu[0] != 0:
        raise ValueError(f"cu_seqlens must start at 0 and be non-decreasing, got {cu}")
    m = 2 * r if r > 1 else 1
    padded = [-(-n // m) * m for n in lens]
    unit = m * d // math.gcd(m, d)
    tail = -(-sum(padded) // unit) * unit - sum(padded)
    starts, real = list(cu[:-1]), list(lens)
    if tail:
        starts.append(0)
        real.append(0)
        padded.append(tail)
    lng = dict(dtype=torch.long)
    start, n = torch.tensor(starts, **lng), torch.tensor(real, **lng)
    c = torch.tensor(padded, **lng) // m  # chunk length per document
    piece = c * (2 if r > 1 else 1)  # rows per document in every slot
    slot_len = int(piece.sum())
    # Every slot has the same document structure: rows [off_i, off_i + piece_i) hold doc i.
    doc = torch.repeat_interleave(torch.arange(len(padded), **lng), piece, output_size=slot_len)
    off = torch.cumsum(piece, 0) - piece
    o = torch.arange(slot_len, **lng) - off[doc]  # offset inside the doc's piece
    cd = c[doc]
    if r > 1:  # slot j: first c rows = chunk j (head), next c rows = chunk 2r-1-j (tail)
        j = torch.arange(r, **lng).unsqueeze(1)
        first = o < cd
        pos = torch.where(first, j * cd + o, (2 * r - 1 - j) * cd + (o - cd))  # [r, slot_len]
    else:
        pos = o.unsqueeze(0)
    index = torch.where(pos < n[doc], start[doc] + pos, torch.full_like(pos, -1))
    u = d // r
    shape = (d, slot_len // u)  # slot j's rows split contiguously over its u ranks
    return (index.reshape(shape), doc.expand_as(pos).reshape(shape), pos.reshape(shape), padded)


def make_meta(cu_seqlens, group, mode, *, heads=None, ulysses_degree=None, device=None):
    cu = cu_seqlens.tolist() if torch.is_tensor(cu_seqlens) else [int(c) for c in cu_seqlens]
    d, g = group_size(group), group_rank(group)
    r, u = split_degree(mode, d, heads, ulysses_degree)
    index_all, doc_all, pos_all, padded = _layout(cu, d, r)
    index, doc, pos = index_all[g], doc_all[g], pos_all[g]
    # runs of consecutive positions of one document -> local cu_seqlens
    brk = (doc[1:] != doc[:-1]) | (pos[1:] != pos[:-1] + 1)
    runs = [0] + (brk.nonzero().squeeze(1) + 1).tolist() + ([len(index)] if len(index) else [])

    def dev(x):  # own storage (not a view of every rank's layout), on ``device``
        return x.clone() if device is None or torch.device(device) == x.device else x.to(device)

    index = dev(index)
    return ShardMeta(
        mode=mode,
        degree=d,
        ring_degree=r,
        ulysses_degree=u,
        rank=g,
        num_tokens=cu[-1],
        cu_seqlens=tuple(cu),
        padded_seqlens=tuple(padded),
        tokens_local=len(index),
        local_cu_seqlens=tuple(runs),
        index=index,
        all_index=dev(index_all.reshape(-1)),
        valid_mask=index >= 0,
        position_ids=dev(pos),
        doc_ids=dev(doc),
    )


def shard(x, cu_seqlens, group, mode, *, heads=None, ulysses_degree=None, pad_value=0, meta=None):
    """This rank's tokens of the packed buffer ``x`` ``[tokens, ...]`` (same on every rank).

    Returns ``(local_x, meta)``. Pass ``meta=`` to shard more tensors (labels, positions)
    with an existing layout. Padding rows are filled with ``pad_value``. Differentiable
    (gradient flows to this rank's rows of ``x``).
    """
    if meta is None:
        meta = make_meta(cu_seqlens, group, mode, heads=heads, ulysses_degree=ulysses_degree, device=x.device)
    if x.shape[0] != meta.num_tokens:
        raise ValueError(f"x has {x.shape[0]} tokens but cu_seqlens ends at {meta.num_tokens}")
    idx = to_device(meta.index, x.device)
    pad = torch.full((1,) + tuple(x.shape[1:]), pad_value, dtype=x.dtype, device=x.device)
    src = torch.cat([x, pad])
    return src[torch.where(idx >= 0, idx, x.shape[0])], meta


def unshard(x_local, meta: ShardMeta, group):
    """Gather every rank's ``[tokens_local, ...]`` back into the unpadded packed buffer
    ``[tokens, ...]`` on every rank of the group (differentiable; see comm.AllGather)."""
    if x_local.shape[0] != meta.tokens_local:
        raise ValueError(f"x_local has {x_local.shape[0]} rows, meta expects {meta.tokens_local}")
    full = x_local if meta.degree == 1 else AllGather.apply(x_local, group)
    idx = to_device(meta.all_index, x_local.device)
    keep = (idx >= 0).nonzero().squeeze(1)
    out = full.new_zeros((meta.num_tokens,) + tuple(full.shape[1:]))
    return out.index_copy(0, idx[keep], full[keep])
