"""Causal-LM labels for packed documents and the loss as (sum, count).

Labels are built on the *global* packed buffer before sharding: the label of token i is token i+1
of the same document; the last token of every document has no target (-100), so no document
predicts the next one's first token. Supervised fine-tuning passes a ``target_mask`` (True on the
assistant / completion tokens): the label of token i is then -100 unless token i+1 is trained.
The loss is returned as a SUM over valid targets plus their count: with SP groups of different
sizes and gradient accumulation, the executor all-reduces both and divides once by the number of
target tokens of the whole global batch (a per-rank mean would weight tokens unequally).
"""

from __future__ import annotations

import torch

from flexsp.model import layers as L
from flexsp.varlen import IGNORE_INDEX, lm_labels  # noqa: F401 (re-exported)


def lm_loss(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, pad_mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(loss_sum, num_targets)``: summed fp32 token cross-entropy of ``hidden [T, d] @ weight.T``
    over labels != -100 and not padding (``pad_mask`` True = padding token), and their count."""
    if labels.shape != hidden.shape[:1]:
        raise ValueError(f"labels {tuple(labels.shape)} do not match hidden {tuple(hidden.shape)}")
    if pad_mask is not None:
        labels = labels.masked_fill(pad_mask.to(torch.bool), IGNORE_INDEX)
    count = (labels != IGNORE_INDEX).sum()
    loss_sum = L.linear_cross_entropy(hidden, weight, labels, ignore_index=IGNORE_INDEX, reduction="sum")
    return loss_sum.float(), count
