"""Packed variable-length buffers: where each token's document starts, its position in it, its
length, and the next-token labels -- the helpers the data, attention and model layers share."""

from __future__ import annotations

import torch

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
    cu = torch.as_tensor(
        cu_seqlens if torch.is_tensor(cu_seqlens) else list(cu_seqlens), dtype=torch.int64
    ).to(input_ids.device)
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
        raise ValueError(
            f"target_mask {tuple(target_mask.shape)} does not match input_ids {tuple(input_ids.shape)}"
        )
    next_is_target = torch.zeros_like(labels, dtype=torch.bool)
    next_is_target[:-1] = target_mask[1:].to(device=input_ids.device, dtype=torch.bool)
    return labels.masked_fill(~next_is_target, IGNORE_INDEX)


def _token_documents(cu_seqlens, total, device):
    """``(cu int64, token index [total], document of each token, output device)`` shared by the
    per-token helpers below; ``total`` defaults to the last boundary (read once from the device
    only when the boundaries live there)."""
    if not torch.is_tensor(cu_seqlens):
        cu_seqlens = [int(c) for c in cu_seqlens]
        total = cu_seqlens[-1] if total is None else total
        cu_seqlens = torch.tensor(cu_seqlens, dtype=torch.int64)
    cu = cu_seqlens.to(torch.int64)
    if device is None:
        device = cu.device
    if total is None:
        total = int(cu[-1].cpu()) if cu.device.type != "cpu" else int(cu[-1])
    idx = torch.arange(int(total), device=cu.device, dtype=torch.int64)
    # document of each token: how many boundaries cu[1:] are <= its index (the tail past
    # cu[-1] falls into the extra pseudo-document starting at cu[-1])
    doc = torch.searchsorted(cu[1:].contiguous(), idx, right=True)
    return cu, idx, doc, device


def positions_from_cu_seqlens(
    cu_seqlens, total: int | None = None, device: torch.device | str | None = None
) -> torch.Tensor:
    """Position of every token of the packed buffer inside its own document (restarts at 0).

    ``cu_seqlens``: a Python list, a CPU tensor or a device tensor. ``total`` (>= cu_seqlens[-1])
    pads the tail with positions 0.. of an extra pseudo-document. The result is on ``device``
    (default: the device of ``cu_seqlens``, CPU for a list). No host sync when the boundaries are
    host-side or ``total`` is given; a device tensor without ``total`` needs its last boundary on
    the host (one transfer; pass host boundaries or ``total`` to avoid it).
    """
    cu, idx, doc, device = _token_documents(cu_seqlens, total, device)
    pos = idx - cu[doc]
    return pos.to(device)


def doc_lengths_from_cu_seqlens(
    cu_seqlens, total: int | None = None, device: torch.device | str | None = None
) -> torch.Tensor:
    """Length of each token's document, ``[total]`` int64 (tail tokens: the tail's length);
    same conventions as :func:`positions_from_cu_seqlens`. Used by dynamic RoPE scaling."""
    cu, idx, doc, device = _token_documents(cu_seqlens, total, device)
    ends = torch.cat([cu[1:], cu.new_full((1,), idx.numel())])
    return (ends[doc] - cu[doc]).to(device)
