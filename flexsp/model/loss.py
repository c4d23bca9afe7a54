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

IGNORE_INDEX = -100


def lm_labels(input_ids: torch.Tensor, cu_seqlens, target_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Next-token labels ``[T]`` for a packed buffer ``[T]``; -100 on each document's last token
    (and on any tail past ``cu_seqlens[-1]``). ``cu_seqlens``: list, CPU or device tensor; no host
    sync (tensor ops only). ``target_mask`` (bool ``[T]``, optional): True on tokens that are
    trained targets (SFT: assistant / completion tokens); every other label is -100 as well."""
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    t = input_ids.shape[0]
    if t == 0:
        return labels
    labels[:-1] = input_ids[1:]
    cu = torch.as_tensor(cu_seqlens if torch.is_tensor(cu_seqlens) else list(cu_seqlens),
                         dtype=torch.int64).to(input_ids.device)
    # cu[i+1] - 1 is the last token of document i; for an empty document it is the last token
    # of an earlier one (or -1 -> wrapped to T-1, which is a document end or past cu[-1]):
    # either way a token that has no target already, so no data-dependent filtering is needed.
    ends = cu[1:] - 1
    ends = torch.where(ends < 0, ends + t, ends).clamp(max=t - 1)
    labels[ends] = IGNORE_INDEX
    tail = torch.arange(t, device=input_ids.device) >= cu[-1]
    labels = labels.masked_fill(tail, IGNORE_INDEX)
    if target_mask is None:
        return labels
    if target_mask.shape != input_ids.shape:
        raise ValueError(f"target_mask {tuple(target_mask.shape)} does not match input_ids "
                         f"{tuple(input_ids.shape)}")
    next_is_target = torch.zeros_like(labels, dtype=torch.bool)
    next_is_target[:-1] = target_mask[1:].to(device=input_ids.device, dtype=torch.bool)
    return labels.masked_fill(~next_is_target, IGNORE_INDEX)


def lm_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
            pad_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(loss_sum, num_targets)``: summed fp32 token cross-entropy of ``hidden [T, d] @ weight.T``
    over labels != -100 and not padding (``pad_mask`` True = padding token), and their count."""
    if labels.shape != hidden.shape[:1]:
        raise ValueError(f"labels {tuple(labels.shape)} do not match hidden {tuple(hidden.shape)}")
    if pad_mask is not None:
        labels = labels.masked_fill(pad_mask.to(torch.bool), IGNORE_INDEX)
    count = (labels != IGNORE_INDEX).sum()
    loss_sum = L.linear_cross_entropy(hidden, weight, labels, ignore_index=IGNORE_INDEX, reduction="sum")
    return loss_sum.float(), count
