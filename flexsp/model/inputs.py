"""Turn a group's packed buffer into this rank's model inputs, on the host first.

Every rank of an SP group packs the same buffer of the group's documents. Everything about it
is host-side knowledge: the document boundaries, each token's position, the next-token labels
(computed on the global buffer, so a shard boundary never changes a target), the SP shard layout
and the padding it adds, and hence the number of targets and real tokens. :func:`host_inputs`
computes all of it with CPU tensors and Python ints (in the executor's background thread, see
flexsp.pipeline), and :meth:`HostInputs.to_device` queues the asynchronous copies of the four
token tensors; nothing here ever reads a value back from the device.

``shard_inputs`` is the one-call convenience (host preparation + copy to ``input_ids``'s device)
used by tests and tools; a device ``input_ids`` is read back once for it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from flexsp.attention import shard
from flexsp.attention.context import AttnContext
from flexsp.hostcopy import pin, to_device
from flexsp.model.layers import positions_from_cu_seqlens
from flexsp.model.loss import IGNORE_INDEX, lm_labels


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
        return model(
            self.input_ids, self.positions, self.attn_ctx, labels=self.labels, pad_mask=self.pad_mask
        )

    def logits(self, model) -> torch.Tensor:
        return model(self.input_ids, self.positions, self.attn_ctx)


@dataclass
class HostInputs:
    """:class:`ModelInputs` before the copy: CPU tensors (pinned when a GPU exists) and ints."""

    input_ids: torch.Tensor
    """int64 ``[T_local]`` on the host."""
    positions: torch.Tensor
    """int64 ``[T_local]`` on the host."""
    labels: torch.Tensor
    """int64 ``[T_local]`` on the host (-100: no target, incl. padding)."""
    pad_mask: torch.Tensor | None
    """bool ``[T_local]`` on the host, True on layout padding (None: no padding)."""
    cu_seqlens: list[int]
    """Boundaries of the group's (global, unpadded) packed buffer."""
    meta: Any
    """Host-side ``flexsp.attention.ShardMeta`` of the SP layout (None: local attention)."""
    group: Any
    """The SP process group (None: local attention)."""
    mode: str
    """SP attention mode: local, ulysses, ring or hybrid."""
    num_targets: int
    """Targets among this rank's tokens (labels != -100)."""
    num_tokens: int
    """Real (non-padding) tokens this rank holds."""

    def to_device(self, device) -> ModelInputs:
        """The model inputs on ``device``: four asynchronous copies from pinned memory."""
        ctx = (
            AttnContext.local(self.cu_seqlens)
            if self.meta is None
            else AttnContext(meta=self.meta, group=self.group, mode=self.mode)
        )
        pad = None if self.pad_mask is None else to_device(self.pad_mask, device)
        return ModelInputs(
            to_device(self.input_ids, device),
            to_device(self.positions, device),
            to_device(self.labels, device),
            pad,
            ctx,
        )


def _host_cu(cu_seqlens) -> list[int]:
    if torch.is_tensor(cu_seqlens):
        return [int(c) for c in cu_seqlens.cpu().tolist()]
    return [int(c) for c in cu_seqlens]


def host_inputs(
    input_ids: torch.Tensor,
    cu_seqlens,
    group=None,
    mode: str = "ulysses",
    labels: torch.Tensor | None = None,
    *,
    heads: int | None = None,
    ulysses_degree: int | None = None,
) -> HostInputs:
    """This rank's :class:`HostInputs` for the packed host buffer ``input_ids [T]`` of its group.

    ``labels`` default to next-token labels within each document (:func:`lm_labels`). ``mode``:
    ulysses, ring or hybrid (hybrid needs ``heads`` or ``ulysses_degree``), ignored when the group
    has one rank (``group=None``: local attention).
    """
    if input_ids.device.type != "cpu":
        raise ValueError(f"host_inputs takes the packed buffer on the host, got {input_ids.device}")
    cu = _host_cu(cu_seqlens)
    if labels is None:
        labels = lm_labels(input_ids, cu)
    degree = 1 if group is None else torch.distributed.get_world_size(group)
    if degree == 1:
        return HostInputs(
            pin(input_ids),
            pin(positions_from_cu_seqlens(cu)),
            pin(labels),
            None,
            cu,
            None,
            None,
            "local",
            int((labels != IGNORE_INDEX).sum()),
            input_ids.numel(),
        )
    ids, meta = shard(input_ids, cu, group, mode, heads=heads, ulysses_degree=ulysses_degree)
    lab, _ = shard(labels, cu, group, mode, meta=meta, pad_value=IGNORE_INDEX)
    valid = meta.valid_mask
    return HostInputs(
        pin(ids),
        pin(meta.position_ids),
        pin(lab),
        pin(~valid),
        cu,
        meta,
        group,
        mode,
        int((lab != IGNORE_INDEX).sum()),
        int(valid.sum()),
    )


def shard_inputs(
    input_ids: torch.Tensor,
    cu_seqlens,
    group=None,
    mode: str = "ulysses",
    labels: torch.Tensor | None = None,
    *,
    heads: int | None = None,
    ulysses_degree: int | None = None,
) -> ModelInputs:
    """This rank's :class:`ModelInputs` for the packed buffer ``input_ids [T]`` of its group, on
    ``input_ids``'s device (host preparation + copy; see :func:`host_inputs`)."""
    device = input_ids.device
    host = host_inputs(
        input_ids.cpu(),
        cu_seqlens,
        group,
        mode,
        None if labels is None else labels.cpu(),
        heads=heads,
        ulysses_degree=ulysses_degree,
    )
    return host.to_device(device)
