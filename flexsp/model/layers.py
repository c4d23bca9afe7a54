"""Elementwise/fused ops the model calls, as plain PyTorch reference implementations, and the seam.

The model never calls these ``*_ref`` helpers: it calls the names bound in the OPS SEAM block at
the bottom (``rms_norm``, ``rope_cos_sin``, ``apply_rope``, ``swiglu``, ``linear_cross_entropy``,
``varlen_attention``). That block is the single place that binds them to ``flexsp.ops`` (fused
kernels) and ``flexsp.attention.local`` (single-device varlen attention). The references are also the
numerical ground truth the
model tests compare against.

Numerics: RMSNorm, RoPE angles and the cross-entropy run in fp32 whatever the activation dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim, computed in fp32, returned in x's dtype."""
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (y * weight.float()).to(x.dtype)


def rope_cos_sin_ref(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """cos/sin tables ``[tokens, head_dim]`` (rotate-half layout) for integer ``positions [tokens]``.

    Angles are computed in fp32 from the positions themselves, so documents packed in one buffer
    each restart at position 0 (see :func:`positions_from_cu_seqlens`) and no max length is needed.
    """
    inv_freq = 1.0 / (
        theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim)
    )
    angles = positions.to(torch.float32)[:, None] * inv_freq[None, :]
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope_ref(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """Rotate ``q [T, H, D]`` and ``k [T, Hkv, D]`` by ``cos/sin [T, D]`` (rotate-half layout)."""
    cos, sin = cos[:, None, :].float(), sin[:, None, :].float()
    qf, kf = q.float(), k.float()
    q_out = qf * cos + _rotate_half(qf) * sin
    k_out = kf * cos + _rotate_half(kf) * sin
    return q_out.to(q.dtype), k_out.to(k.dtype)


def swiglu_ref(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """SwiGLU: silu(gate) * up."""
    return F.silu(gate) * up


def linear_cross_entropy_ref(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = -100,
    reduction: str = "sum",
) -> torch.Tensor:
    """Cross-entropy of ``hidden [T, d] @ weight[V, d].T`` against ``labels [T]`` (fp32 softmax)."""
    logits = (hidden @ weight.t()).float()
    return F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction=reduction)


def varlen_attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens,
    causal: bool = True,
    window: int | None = None,
) -> torch.Tensor:
    """Attention within each packed document: ``q [T, H, D]``, ``k/v [T, Hkv, D]`` -> ``[T, H, D]``.

    A loop of per-document SDPA calls (the fastest exact option on CPU, see machine-notes); GQA via
    ``enable_gqa`` so k/v are never materialized per query head. ``window`` (causal only): query
    ``i`` sees keys ``j`` with ``0 <= i - j < window`` (HF's sliding-window mask), as an explicit
    banded boolean mask.
    """
    bounds = cu_seqlens.tolist() if torch.is_tensor(cu_seqlens) else list(cu_seqlens)
    outs = []
    for start, end in zip(bounds[:-1], bounds[1:]):
        if end == start:
            continue
        qd, kd, vd = (t[start:end].transpose(0, 1) for t in (q, k, v))
        gqa = q.shape[1] != k.shape[1]
        if window and causal and end - start > window:
            i = torch.arange(end - start, device=q.device)
            diff = i[:, None] - i[None, :]
            mask = (diff >= 0) & (diff < window)
            o = F.scaled_dot_product_attention(qd, kd, vd, attn_mask=mask, enable_gqa=gqa)
        else:
            o = F.scaled_dot_product_attention(qd, kd, vd, is_causal=causal, enable_gqa=gqa)
        outs.append(o.transpose(0, 1))
    if bounds[-1] != q.shape[0]:
        raise ValueError(f"cu_seqlens ends at {bounds[-1]} but q has {q.shape[0]} tokens")
    return torch.cat(outs, dim=0) if outs else q.new_zeros(q.shape)


# ------------------------------------------------------------------------------------------------
# OPS SEAM: the only place that chooses between the teammates' kernels and the references above.
# flexsp.ops dispatches to liger-kernel on CUDA and to chunked PyTorch elsewhere; the references
# stay as the test ground truth.
# ------------------------------------------------------------------------------------------------
from flexsp.ops import apply_rope, linear_cross_entropy, rms_norm, rope_cos_sin, swiglu  # noqa: E402,F401
from flexsp.varlen import doc_lengths_from_cu_seqlens, positions_from_cu_seqlens  # noqa: E402,F401 (re-exported)
