"""liger-kernel (Triton) implementations of the :mod:`flexsp.ops` ops, for CUDA tensors.

Thin adapters from our packed-varlen layouts to liger's autograd Functions. Imported lazily by
:mod:`flexsp.ops` only when the liger backend is selected, so CPU-only installs never import
triton. Layout notes:

* RoPE: liger expects ``q`` as ``[batch, heads, seq, head_dim]`` backed by a
  ``[batch, seq, heads, head_dim]`` buffer and ``cos``/``sin`` as ``[seq, head_dim]``. Our packed
  ``[tokens, heads, head_dim]`` is exactly that buffer with batch 1 and seq = tokens, and our
  per-token ``cos``/``sin`` index by that same row, so no copy of cos/sin is needed. liger's kernel
  rotates in place; we clone q and k first so callers' tensors are never mutated.
* RMSNorm: "llama" casting mode with ``in_place=False`` (liger's default ``in_place=True`` writes
  dX into the incoming dY buffer, which is unsafe when that gradient is shared).
* Linear + cross-entropy: liger's chunked fused kernel computes grads in forward and never holds
  the full logits.
"""

from __future__ import annotations

import torch

try:  # liger's SwiGLU checks isinstance(x, torch.distributed.tensor.DTensor); that submodule is lazy
    import torch.distributed.tensor  # noqa: F401
except Exception:  # torch built without distributed
    pass

from liger_kernel.ops.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyFunction
from liger_kernel.ops.rms_norm import LigerRMSNormFunction
from liger_kernel.ops.rope import LigerRopeFunction
from liger_kernel.ops.swiglu import LigerSiLUMulFunction


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return LigerRMSNormFunction.apply(x, weight, eps, 0.0, "llama", False)


def apply_rope(q, k, cos, sin):
    q4 = q.clone(memory_format=torch.contiguous_format).unsqueeze(0).transpose(1, 2)  # [1, heads, tokens, head_dim] over a [tokens, heads, d] buffer
    k4 = k.clone(memory_format=torch.contiguous_format).unsqueeze(0).transpose(1, 2)
    q_out, k_out = LigerRopeFunction.apply(q4, k4, cos.contiguous(), sin.contiguous())
    return q_out.transpose(1, 2).squeeze(0), k_out.transpose(1, 2).squeeze(0)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return LigerSiLUMulFunction.apply(gate, up)


def linear_cross_entropy(hidden, weight, labels, ignore_index: int, reduction: str):
    # positional: _input, weight, target, bias, ce_weight, ignore_index, lse_square_scale,
    # label_smoothing, reduction (same order in liger 0.6 - 0.8)
    out = LigerFusedLinearCrossEntropyFunction.apply(
        hidden, weight, labels, None, None, ignore_index, 0.0, 0.0, reduction
    )
    return out[0] if isinstance(out, tuple) else out
