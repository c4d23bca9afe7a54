"""Fused elementwise / loss ops for the FlexSP model, with a liger-kernel path on CUDA.

On GPU the step time outside attention is dominated by memory-bound elementwise work (RMSNorm,
RoPE, SwiGLU) and by the loss over a large vocabulary. This package gives the model one small
functional API for those ops and dispatches each call (see :mod:`flexsp.ops._dispatch`):

* ``liger``: liger-kernel's Triton kernels, used automatically when the tensors are on CUDA and
  liger-kernel imports;
* ``torch``: pure PyTorch (:mod:`flexsp.ops.torch_ops`), used everywhere else and as the test
  reference. Its linear + cross-entropy is chunked over tokens so it too never materialises the
  full ``[tokens, vocab]`` logits.

Force a backend with ``backend="torch"|"liger"`` on a call or ``FLEXSP_OPS_BACKEND=torch|liger``.

Layouts are packed varlen: documents are concatenated along the token dimension, there is no
batch dimension. ``q``/``k`` are ``[tokens, heads, head_dim]`` and ``cos``/``sin`` are
``[tokens, head_dim]``, gathered per token from per-document positions (see
:func:`rope_cos_sin`).
"""

from __future__ import annotations

import torch

from flexsp.ops import torch_ops
from flexsp.ops._dispatch import ENV_VAR, VALID_BACKENDS, liger_available, resolve_backend

__all__ = [
    "rms_norm",
    "apply_rope",
    "rope_cos_sin",
    "swiglu",
    "linear_cross_entropy",
    "resolve_backend",
    "liger_available",
    "ENV_VAR",
    "VALID_BACKENDS",
]

_REDUCTIONS = ("sum", "mean")


def _liger():
    from flexsp.ops import liger_ops  # lazy: imports triton

    return liger_ops


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, *, backend: str | None = None) -> torch.Tensor:
    """RMSNorm over the last dim: ``weight * (x / sqrt(mean(x**2) + eps))``.

    Statistics are computed in float32 and the normalised values cast back to ``x.dtype`` before
    the weight multiply (Llama convention); the output has ``x.dtype``.
    """
    if weight.dim() != 1 or x.shape[-1] != weight.shape[0]:
        raise ValueError(
            f"rms_norm: weight must be 1-D of size x.shape[-1]; got x {tuple(x.shape)}, weight {tuple(weight.shape)}"
        )
    if eps <= 0:
        raise ValueError(f"rms_norm: eps must be > 0, got {eps}")
    if resolve_backend(backend, x, weight) == "liger":
        return _liger().rms_norm(x, weight, eps)
    return torch_ops.rms_norm(x, weight, eps)


def rope_cos_sin(
    positions: torch.Tensor, head_dim: int, theta: float = 10000.0, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token RoPE tables ``cos, sin`` of shape ``[tokens, head_dim]`` for :func:`apply_rope`.

    ``positions`` is 1-D: each token's position *within its own document* (restarting at 0 for
    every packed document). Angles are ``pos * theta ** (-2i / head_dim)`` for
    ``i < head_dim / 2``, computed in float32 and duplicated as ``cat(freqs, freqs)`` (the
    rotate-half layout), then cast to ``dtype``. Device follows ``positions``.
    """
    if positions.dim() != 1:
        raise ValueError(f"rope_cos_sin: positions must be 1-D [tokens], got shape {tuple(positions.shape)}")
    if head_dim <= 0 or head_dim % 2:
        raise ValueError(f"rope_cos_sin: head_dim must be a positive even number, got {head_dim}")
    if theta <= 0:
        raise ValueError(f"rope_cos_sin: theta must be > 0, got {theta}")
    device = positions.device
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    freqs = positions.to(torch.float32)[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *, backend: str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary position embedding on packed ``q`` ``[tokens, q_heads, d]`` and ``k`` ``[tokens, kv_heads, d]``.

    Convention: rotate-half (GPT-NeoX / HF Llama), *not* the interleaved-pairs form of the
    original RoPE paper. With ``x = [x1, x2]`` split into halves along ``head_dim``::

        out = x * cos + rotate_half(x) * sin,   rotate_half(x) = [-x2, x1]

    and ``cos``/``sin`` ``[tokens, d]`` laid out as ``cat(freqs, freqs)`` (see :func:`rope_cos_sin`).
    Math runs in ``cos.dtype``; outputs have the dtypes of ``q`` and ``k``. Inputs are not modified.
    """
    if q.dim() != 3 or k.dim() != 3:
        raise ValueError(
            f"apply_rope: q and k must be [tokens, heads, head_dim]; got q {tuple(q.shape)}, k {tuple(k.shape)}"
        )
    tokens, _, head_dim = q.shape
    if k.shape[0] != tokens or k.shape[2] != head_dim:
        raise ValueError(f"apply_rope: k {tuple(k.shape)} does not match q {tuple(q.shape)} in tokens/head_dim")
    if head_dim % 2:
        raise ValueError(f"apply_rope: head_dim must be even, got {head_dim}")
    expected = (tokens, head_dim)
    if tuple(cos.shape) != expected or tuple(sin.shape) != expected:
        raise ValueError(
            f"apply_rope: cos/sin must be [tokens, head_dim] = {expected}; got cos {tuple(cos.shape)}, sin {tuple(sin.shape)}"
        )
    if resolve_backend(backend, q, k, cos, sin) == "liger":
        return _liger().apply_rope(q, k, cos, sin)
    return torch_ops.apply_rope(q, k, cos, sin)


def swiglu(gate: torch.Tensor, up: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
    """SwiGLU activation ``silu(gate) * up`` (elementwise; same shapes)."""
    if gate.shape != up.shape:
        raise ValueError(f"swiglu: gate {tuple(gate.shape)} and up {tuple(up.shape)} must have the same shape")
    if resolve_backend(backend, gate, up) == "liger":
        return _liger().swiglu(gate, up)
    return torch_ops.swiglu(gate, up)


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = -100,
    reduction: str = "sum",
    *,
    chunk_size: int | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Cross-entropy of ``hidden @ weight.T`` against ``labels`` without materialising all logits.

    ``hidden`` ``[tokens, hidden]``, ``weight`` ``[vocab, hidden]`` (the LM head), ``labels``
    ``[tokens]`` integer class ids; tokens whose label equals ``ignore_index`` contribute nothing.
    ``reduction="sum"`` returns the sum of token losses (the default: sequence-parallel ranks
    sum and divide by a global token count); ``"mean"`` divides by the number of non-ignored
    tokens (nan if there are none, as ``F.cross_entropy``). Returns a float32 scalar on the
    torch path (liger returns the input dtype's accumulation; compare with tolerance).

    ``chunk_size`` (tokens per chunk) applies to the torch path only; by default a chunk holds
    about 128 MiB of float32 logits.
    """
    if reduction not in _REDUCTIONS:
        raise ValueError(f"linear_cross_entropy: reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            "linear_cross_entropy: need hidden [tokens, H] and weight [vocab, H]; "
            f"got hidden {tuple(hidden.shape)}, weight {tuple(weight.shape)}"
        )
    if labels.shape != (hidden.shape[0],):
        raise ValueError(
            f"linear_cross_entropy: labels must be [tokens] = ({hidden.shape[0]},), got {tuple(labels.shape)}"
        )
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ValueError(f"linear_cross_entropy: labels must be an integer tensor, got {labels.dtype}")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"linear_cross_entropy: chunk_size must be >= 1 or None, got {chunk_size}")
    if resolve_backend(backend, hidden, weight, labels) == "liger":
        return _liger().linear_cross_entropy(hidden, weight, labels.long(), ignore_index, reduction)
    return torch_ops.linear_cross_entropy(hidden, weight, labels.long(), ignore_index, reduction, chunk_size)
