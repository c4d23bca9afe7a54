"""Fused elementwise / loss ops for the FlexSP model, with a liger-kernel path on CUDA.

On GPU the step time outside attention is dominated by memory-bound elementwise work (RMSNorm,
RoPE, SwiGLU) and by the loss over a large vocabulary. This package gives the model one small
functional API for those ops and dispatches each call (see :mod:`flexsp.ops._dispatch`):

* ``liger``: liger-kernel's Triton kernels, used automatically for RMSNorm, RoPE and SwiGLU when
  the tensors are on CUDA and liger-kernel imports (linear + cross-entropy: only when forced, see
  :func:`linear_cross_entropy`);
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

import math

import torch

from flexsp.ops import liger_ops, torch_ops
from flexsp.ops._dispatch import ENV_VAR, VALID_BACKENDS, liger_available, resolve_backend

__all__ = [
    "rms_norm",
    "apply_rope",
    "rope_cos_sin",
    "rope_inv_freq",
    "swiglu",
    "linear_cross_entropy",
    "resolve_backend",
    "liger_available",
    "ENV_VAR",
    "VALID_BACKENDS",
]

_REDUCTIONS = ("sum", "mean")


def _liger():

    return liger_ops


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, *, backend: str | None = None
) -> torch.Tensor:
    """RMSNorm over the last dim: ``weight * (x / sqrt(mean(x**2) + eps))``.

    Statistics are computed in float32 and the normalised values cast back to ``x.dtype`` before
    the weight multiply (Llama convention); the output has ``x.dtype``.
    """
    if weight.dim() != 1 or x.shape[-1] != weight.shape[0]:
        raise ValueError(
            f"rms_norm: weight must be 1-D of size x.shape[-1]; got x {tuple(x.shape)}, weight "
            f"{tuple(weight.shape)}"
        )
    if eps <= 0:
        raise ValueError(f"rms_norm: eps must be > 0, got {eps}")
    if resolve_backend(backend, x, weight) == "liger":
        return _liger().rms_norm(x, weight, eps)
    return torch_ops.rms_norm(x, weight, eps)


def rope_inv_freq(
    head_dim: int,
    theta: float = 10000.0,
    scaling: dict | None = None,
    max_position_embeddings: int | None = None,
    *,
    seq_lens: torch.Tensor | None = None,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, float]:
    """RoPE inverse frequencies and the cos/sin (attention) factor, as transformers'
    ``modeling_rope_utils`` computes them for ``scaling`` (HF ``rope_parameters`` without
    ``rope_theta``; None = plain RoPE).

    Returns ``(inv_freq, attention_factor)``: ``inv_freq`` is float32 ``[head_dim / 2]``, or
    ``[tokens, head_dim / 2]`` for ``rope_type="dynamic"`` when ``seq_lens`` is given.

    * ``linear``: ``inv_freq / factor``.
    * ``dynamic`` (NTK): HF rescales the base with the *current sequence length* ``L`` =
      ``max(position) + 1``: ``base * (factor * max(L, M) / M - (factor - 1)) ** (d / (d - 2))``
      with ``M = max_position_embeddings``. In a packed buffer a "sequence" is one document:
      ``seq_lens`` ``[tokens]`` holds each token's *document length*, so every document gets
      exactly the frequencies HF uses for that document run alone (from a freshly loaded HF
      model: HF's rotary module caches the largest length it has seen). Without ``seq_lens``
      the length is taken as ``M`` (HF's initial frequencies = plain RoPE).
    * ``yarn``: blend of interpolated / extrapolated frequencies over HF's correction range
      (``beta_fast``=32, ``beta_slow``=1, ``truncate``=True defaults), ``factor`` defaults to
      ``M / original_max_position_embeddings``; attention factor ``attention_factor`` or
      ``0.1 * ln(factor) + 1`` (or the ``mscale``/``mscale_all_dim`` ratio).
    * ``llama3``: LLaMA-3.1 wavelength-banded scaling.
    """
    if head_dim <= 0 or head_dim % 2:
        raise ValueError(f"rope_inv_freq: head_dim must be a positive even number, got {head_dim}")
    if theta <= 0:
        raise ValueError(f"rope_inv_freq: theta must be > 0, got {theta}")
    p = dict(scaling or {})
    rope_type = p.get("rope_type", p.get("type", "default"))
    dim = head_dim
    exponents = torch.arange(0, dim, 2, dtype=torch.int64, device=device).to(torch.float32) / dim
    if rope_type == "default":
        return 1.0 / (theta**exponents), 1.0
    if rope_type == "linear":
        return 1.0 / (theta**exponents) / p["factor"], 1.0
    if rope_type == "dynamic":
        if max_position_embeddings is None:
            raise ValueError("rope_inv_freq: rope_type 'dynamic' needs max_position_embeddings")
        factor, m = p["factor"], max_position_embeddings
        if seq_lens is None:
            base = theta * ((factor * m / m) - (factor - 1)) ** (dim / (dim - 2))
            return 1.0 / (base**exponents), 1.0
        seq = torch.clamp(seq_lens.to(torch.int64), min=m)
        base = theta * ((factor * seq / m) - (factor - 1)) ** (dim / (dim - 2))  # float32 [tokens]
        return 1.0 / (base[:, None] ** exponents.to(base.device)[None, :]), 1.0
    if rope_type == "yarn":
        orig = p.get("original_max_position_embeddings") or max_position_embeddings
        if orig is None:
            raise ValueError(
                "rope_inv_freq: rope_type 'yarn' needs original_max_position_embeddings "
                "or max_position_embeddings"
            )
        factor = p.get("factor")
        if factor is None:
            if max_position_embeddings is None:
                raise ValueError("rope_inv_freq: yarn without factor needs max_position_embeddings")
            factor = max_position_embeddings / orig

        def get_mscale(scale, mscale=1.0):
            return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0

        attention_factor = p.get("attention_factor")
        mscale, mscale_all_dim = p.get("mscale"), p.get("mscale_all_dim")
        if attention_factor is None:
            if mscale and mscale_all_dim:
                attention_factor = float(get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dim))
            else:
                attention_factor = get_mscale(factor)
        beta_fast = p.get("beta_fast") or 32
        beta_slow = p.get("beta_slow") or 1
        truncate = p.get("truncate", True)

        def correction_dim(num_rotations):
            return (dim * math.log(orig / (num_rotations * 2 * math.pi))) / (2 * math.log(theta))

        low, high = correction_dim(beta_fast), correction_dim(beta_slow)
        if truncate:
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, dim - 1)
        if low == high:
            high += 0.001  # HF: prevent singularity
        # built on the device (no host->device copy in the forward)
        ramp = torch.clamp(
            (torch.arange(dim // 2, dtype=torch.float32, device=device) - low) / (high - low), 0, 1
        )
        extrapolation_factor = 1 - ramp
        pos_freqs = theta ** (torch.arange(0, dim, 2, device=device).to(torch.float32) / dim)
        inv_extra, inv_inter = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)
        inv_freq = inv_inter * (1 - extrapolation_factor) + inv_extra * extrapolation_factor
        return inv_freq, float(attention_factor)
    if rope_type == "llama3":
        inv_freq = 1.0 / (theta**exponents)
        factor, low_ff, high_ff = p["factor"], p["low_freq_factor"], p["high_freq_factor"]
        old = p.get("original_max_position_embeddings") or max_position_embeddings
        if old is None:
            raise ValueError("rope_inv_freq: rope_type 'llama3' needs original_max_position_embeddings")
        low_wavelen, high_wavelen = old / low_ff, old / high_ff
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old / wavelen - low_ff) / (high_ff - low_ff)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
        return torch.where(medium, smoothed, scaled), 1.0
    raise ValueError(
        f"rope_inv_freq: rope_type {rope_type!r} is not supported; valid options: "
        "['default', 'linear', 'dynamic', 'yarn', 'llama3']"
    )


def rope_cos_sin(
    positions: torch.Tensor,
    head_dim: int,
    theta: float = 10000.0,
    dtype: torch.dtype = torch.float32,
    *,
    scaling: dict | None = None,
    max_position_embeddings: int | None = None,
    seq_lens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token RoPE tables ``cos, sin`` of shape ``[tokens, head_dim]`` for :func:`apply_rope`.

    ``positions`` is 1-D: each token's position *within its own document* (restarting at 0 for
    every packed document). Angles are ``pos * inv_freq`` with ``inv_freq = theta ** (-2i /
    head_dim)`` for ``i < head_dim / 2`` unless ``scaling`` (HF ``rope_parameters``, see
    :func:`rope_inv_freq`) rescales them; computed in float32 and duplicated as
    ``cat(freqs, freqs)`` (the rotate-half layout), multiplied by the scaling's attention
    factor (yarn), then cast to ``dtype``. ``seq_lens`` ``[tokens]`` (each token's document
    length) is used by ``dynamic`` scaling only. Device follows ``positions``; no host sync.
    """
    if positions.dim() != 1:
        raise ValueError(f"rope_cos_sin: positions must be 1-D [tokens], got shape {tuple(positions.shape)}")
    if head_dim <= 0 or head_dim % 2:
        raise ValueError(f"rope_cos_sin: head_dim must be a positive even number, got {head_dim}")
    if theta <= 0:
        raise ValueError(f"rope_cos_sin: theta must be > 0, got {theta}")
    device = positions.device
    dynamic = bool(scaling) and scaling.get("rope_type") == "dynamic"
    if seq_lens is not None and dynamic and seq_lens.shape != positions.shape:
        raise ValueError(
            f"rope_cos_sin: seq_lens {tuple(seq_lens.shape)} must match positions {tuple(positions.shape)}"
        )
    inv_freq, factor = rope_inv_freq(
        head_dim,
        theta,
        scaling,
        max_position_embeddings,
        seq_lens=seq_lens.to(device) if (dynamic and seq_lens is not None) else None,
        device=device,
    )
    if inv_freq.dim() == 1:
        freqs = positions.to(torch.float32)[:, None] * inv_freq[None, :]
    else:
        freqs = positions.to(torch.float32)[:, None] * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos(), emb.sin()
    if factor != 1.0:
        cos, sin = cos * factor, sin * factor
    return cos.to(dtype), sin.to(dtype)


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
            f"apply_rope: q and k must be [tokens, heads, head_dim]; got q {tuple(q.shape)}, k "
            f"{tuple(k.shape)}"
        )
    tokens, _, head_dim = q.shape
    if k.shape[0] != tokens or k.shape[2] != head_dim:
        raise ValueError(
            f"apply_rope: k {tuple(k.shape)} does not match q {tuple(q.shape)} in tokens/head_dim"
        )
    if head_dim % 2:
        raise ValueError(f"apply_rope: head_dim must be even, got {head_dim}")
    expected = (tokens, head_dim)
    if tuple(cos.shape) != expected or tuple(sin.shape) != expected:
        raise ValueError(
            f"apply_rope: cos/sin must be [tokens, head_dim] = {expected}; got cos {tuple(cos.shape)}, "
            f"sin {tuple(sin.shape)}"
        )
    if resolve_backend(backend, q, k, cos, sin) == "liger":
        return _liger().apply_rope(q, k, cos, sin)
    return torch_ops.apply_rope(q, k, cos, sin)


def swiglu(gate: torch.Tensor, up: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
    """SwiGLU activation ``silu(gate) * up`` (elementwise; same shapes)."""
    if gate.shape != up.shape:
        raise ValueError(
            f"swiglu: gate {tuple(gate.shape)} and up {tuple(up.shape)} must have the same shape"
        )
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
    tokens (nan if there are none, as ``F.cross_entropy``). Returns a float32 scalar on
    both paths.

    ``chunk_size`` (tokens per chunk) applies to the torch path only; by default a chunk holds
    about 128 MiB of float32 logits.

    Backend: ``"auto"`` picks the torch path on CUDA too. liger-kernel 0.8.0's fused version is
    about 10% faster (measured on an H200 at 8192 tokens, hidden 4096, vocab 128K, with liger's
    default bf16 weight-gradient accumulation: 155.7 vs 174.1 ms fwd+bwd) but calls ``.item()``
    in every forward and ``torch.equal`` in every backward, two host syncs per step that stall
    the CPU's kernel queue, and it has no argument to avoid them; the torch path is sync-free.
    ``backend="liger"`` (or ``FLEXSP_OPS_BACKEND=liger``) still selects it, with float32
    weight-gradient accumulation (see :func:`flexsp.ops.liger_ops.linear_cross_entropy`).
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
    if resolve_backend(backend, hidden, weight, labels, auto_liger=False) == "liger":
        return _liger().linear_cross_entropy(hidden, weight, labels.long(), ignore_index, reduction)
    return torch_ops.linear_cross_entropy(hidden, weight, labels.long(), ignore_index, reduction, chunk_size)
