"""Turn a group's packed global buffer into this rank's model inputs.

Every rank of an SP group holds the same packed buffer of the group's documents (from
``flexsp.data.pack_documents``). ``shard_inputs`` keeps this rank's tokens, with their in-document
positions, labels (computed on the global buffer, so a shard boundary never changes a target),
the padding mask the layout added, and the :class:`AttnContext` every layer needs. With
``group=None`` (or a 1-rank group) nothing is sharded and attention is local.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from flexsp.model.layers import positions_from_cu_seqlens
from flexsp.model.loss import IGNORE_INDEX, lm_labels
from flexsp.model.transformer import AttnContext


@dataclass
class ModelInputs:
    """One rank's share of a packed batch, ready for ``Transformer.forward``."""

    input_ids: torch.Tensor
    """int64 ``[T_local]``."""
    positions: torch.Tensor
    """int64 ``[T_local]`` position inside each token's document."""
    labels: torch.Tensor
    """int64 ``[T_local]`` targets, -100 where none (document ends, padding)."""
    pad_mask: torch.Tensor | None
    """bool ``[T_local]``, True on padding added by the SP layout (None: no padding)."""
    attn_ctx: AttnContext
    """How attention runs for these tokens."""

    def loss(self, model) -> tuple[torch.Tensor, torch.Tensor]:
        """``(loss_sum, num_targets)`` of ``model`` on these inputs."""
        return model(self.input_ids, self.positions, self.attn_ctx, labels=self.labels,
                     pad_mask=self.pad_mask)

    def logits(self, model) -> torch.Tensor:
        return model(self.input_ids, self.positions, self.attn_ctx)


def shard_inputs(input_ids: torch.Tensor, cu_seqlens: torch.Tensor, group=None, mode: str = "ulysses",
                 labels: torch.Tensor | None = None, *, heads: int | None = None,
                 ulysses_degree: int | None = None) -> ModelInputs:
    """This rank's :class:`ModelInputs` for the packed buffer ``input_ids [T]`` of its group.

    ``labels`` default to next-token labels within each document (:func:`lm_labels`). ``mode``:
    ulysses, ring or hybrid (hybrid needs ``heads`` or ``ulysses_degree``), ignored when the group
    has one rank.
    """
    if labels is None:
        labels = lm_labels(input_ids, cu_seqlens)
    degree = 1 if group is None else torch.distributed.get_world_size(group)
    if degree == 1:
        return ModelInputs(input_ids, positions_from_cu_seqlens(cu_seqlens).to(input_ids.device),
                           labels, None, AttnContext.local(cu_seqlens))
    from flexsp.attention import shard  # teammate's runtime; imported only for SP
    ids, meta = shard(input_ids, cu_seqlens, group, mode, heads=heads, ulysses_degree=ulysses_degree)
    lab, _ = shard(labels, cu_seqlens, group, mode, meta=meta, pad_value=IGNORE_INDEX)
    return ModelInputs(ids, meta.position_ids.to(ids.device), lab, ~meta.valid_mask.to(ids.device),
                       AttnContext(meta=meta, group=group, mode=mode))
