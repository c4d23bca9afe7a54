"""Pure PyTorch implementations of the :mod:`flexsp.ops` ops.

These run on any device and are the reference that the liger-kernel path is tested against.
Numerics follow the Llama/HF conventions that liger's kernels also implement, so the two paths
agree to rounding:

* RMSNorm: statistics in float32, normalised activations cast back to the input dtype, then
  multiplied by the weight ("llama" casting mode); the result has the input dtype.
* RoPE: rotate-half (GPT-NeoX / HF Llama) convention, computed in the dtype of cos/sin.
* SwiGLU: ``silu(gate) * up``.
* Linear + cross-entropy: chunked over tokens with a custom autograd.Function that recomputes
  each chunk's logits in backward, so peak memory is one chunk of ``[chunk, vocab]`` logits
  (plus its softmax) instead of the full ``[tokens, vocab]`` matrix.

Input validation lives in :mod:`flexsp.ops` (the public entry points); these functions assume
already-checked shapes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Default budget for one chunk of float32 logits, in elements (2**25 = 128 MiB). Backward holds
# about three such buffers (fp32 logits, fp32 softmax, its low-precision cast) at once.
DEFAULT_CHUNK_ELEMENTS = 2**25


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    rstd = torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + eps)
    return (weight * (xf * rstd).to(x.dtype)).to(x.dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(q, k, cos, sin):
    c = cos[:, None, :]
    s = sin[:, None, :]
    qc = q.to(cos.dtype)
    kc = k.to(cos.dtype)
    q_out = (qc * c + _rotate_half(qc) * s).to(q.dtype)
    k_out = (kc * c + _rotate_half(kc) * s).to(k.dtype)
    return q_out, k_out


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


def default_chunk_size(num_tokens: int, vocab: int) -> int:
    return max(1, min(num_tokens, DEFAULT_CHUNK_ELEMENTS // max(vocab, 1)))


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Per-token CE losses of ``hidden @ weight.T`` without materialising all logits.

    Forward returns float32 per-token losses ``[tokens]`` (0 where the label is ignored); the
    caller reduces them. Backward recomputes each chunk's logits and forms
    ``(softmax - onehot) * grad_loss`` for that chunk only; the weight gradient is accumulated
    in float32.
    """

    @staticmethod
    def forward(ctx, hidden, weight, labels, ignore_index: int, chunk_size: int):
        num_tokens = hidden.shape[0]
        losses = torch.zeros(num_tokens, dtype=torch.float32, device=hidden.device)
        with torch.no_grad():
            for start in range(0, num_tokens, chunk_size):
                end = min(start + chunk_size, num_tokens)
                y = labels[start:end]
                valid = y != ignore_index
                logits = (hidden[start:end] @ weight.t()).float()
                lse = torch.logsumexp(logits, dim=-1)
                target = logits.gather(1, torch.where(valid, y, 0)[:, None]).squeeze(1)
                losses[start:end] = torch.where(valid, lse - target, 0.0)
                del logits
        ctx.save_for_backward(hidden, weight, labels)
        ctx.ignore_index = ignore_index
        ctx.chunk_size = chunk_size
        return losses

    @staticmethod
    def backward(ctx, grad_losses):
        hidden, weight, labels = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        num_tokens, chunk = hidden.shape[0], ctx.chunk_size
        for start in range(0, num_tokens, chunk):
            end = min(start + chunk, num_tokens)
            h = hidden[start:end]
            y = labels[start:end]
            valid = y != ctx.ignore_index
            probs = torch.softmax((h @ weight.t()).float(), dim=-1)
            rows = torch.arange(end - start, device=probs.device)
            probs[rows, torch.where(valid, y, 0)] -= 1.0
            probs *= torch.where(valid, grad_losses[start:end].float(), 0.0)[:, None]
            g = probs.to(hidden.dtype)
            del probs
            if need_h:
                grad_h[start:end] = g @ weight
            if need_w:
                grad_w += (g.t() @ h).float()
        return grad_h, (grad_w.to(weight.dtype) if need_w else None), None, None, None


def linear_cross_entropy(hidden, weight, labels, ignore_index: int, reduction: str, chunk_size: int | None):
    if chunk_size is None:
        chunk_size = default_chunk_size(hidden.shape[0], weight.shape[0])
    losses = _ChunkedLinearCrossEntropy.apply(hidden, weight, labels, ignore_index, chunk_size)
    total = losses.sum()
    if reduction == "sum":
        return total
    # "mean" over non-ignored tokens; 0/0 = nan when all are ignored, like F.cross_entropy.
    return total / (labels != ignore_index).sum()
