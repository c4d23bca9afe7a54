"""liger-kernel (Triton) implementations of the :mod:`flexsp.ops` ops, for CUDA tensors.

Thin adapters from our packed-varlen layouts to liger's autograd Functions, written against
liger-kernel 0.8.0 (the version pinned in ``pyproject.toml``; its source was read for every
argument below). Imported lazily by :mod:`flexsp.ops` only when the liger backend is selected, so
CPU-only installs never import triton.

* RoPE: liger expects ``q`` as ``[batch, heads, seq, head_dim]`` backed by a
  ``[batch, seq, heads, head_dim]`` buffer and ``cos``/``sin`` as ``[1 or batch, seq, head_dim]``.
  Our packed ``[tokens, heads, head_dim]`` is exactly that buffer with batch 1 and seq = tokens.
  ``cos``/``sin`` go in as ``[1, tokens, head_dim]`` views: liger's ``_triton_rope`` takes
  ``cos.shape[0]`` as ``cos_bs: tl.constexpr``, so 2-D ``[tokens, head_dim]`` tables would make
  every new local token count a new Triton specialisation (a compile of the forward and of the
  backward kernel per micro-batch shape). With ``cos_bs == 1`` the kernel reads row
  ``pid % seq_len`` = ``pid`` (batch 1), the same address the 2-D form reads through its
  ``batch_idx * seq_len * stride + row * stride`` branch (``batch_idx == 0``), so results are
  bitwise identical (checked in tests/test_ops_liger.py). liger rotates in place; we clone q and
  k first so callers' tensors are never mutated.
* RMSNorm: "llama" casting mode with ``in_place=False`` (liger's default ``in_place=True`` writes
  dX into the incoming dY buffer, which is unsafe when that gradient is shared).
* Linear + cross-entropy: see :func:`linear_cross_entropy`. Not used by ``backend="auto"``
  (liger 0.8.0's version syncs the host twice per step); only when liger is forced.
"""

from __future__ import annotations

import inspect

import torch

try:  # liger's SwiGLU checks isinstance(x, torch.distributed.tensor.DTensor); that submodule is lazy
    import torch.distributed.tensor  # noqa: F401
except Exception:  # torch built without distributed
    pass

from liger_kernel.ops.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyFunction
from liger_kernel.ops.rms_norm import LigerRMSNormFunction
from liger_kernel.ops.rope import LigerRopeFunction
from liger_kernel.ops.swiglu import LigerSiLUMulFunction

# dtype of liger's LM-head weight-gradient accumulator (its ``accum_dtype``; None = weight dtype).
WEIGHT_GRAD_ACCUM_DTYPE = torch.float32


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # positional: X, W, eps, offset, casting_mode, in_place
    return LigerRMSNormFunction.apply(x, weight, eps, 0.0, "llama", False)


def apply_rope(q, k, cos, sin):
    # [1, heads, tokens, head_dim] views over fresh [tokens, heads, head_dim] buffers
    q4 = q.clone(memory_format=torch.contiguous_format).unsqueeze(0).transpose(1, 2)
    k4 = k.clone(memory_format=torch.contiguous_format).unsqueeze(0).transpose(1, 2)
    # leading batch dim of 1 keeps liger's cos_bs constexpr at 1 for every token count
    cos3, sin3 = cos.contiguous().unsqueeze(0), sin.contiguous().unsqueeze(0)
    q_out, k_out = LigerRopeFunction.apply(q4, k4, cos3, sin3)
    return q_out.transpose(1, 2).squeeze(0), k_out.transpose(1, 2).squeeze(0)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return LigerSiLUMulFunction.apply(gate, up)


def _positional_args(fn, **named) -> tuple:
    """``named`` as the positional tuple ``fn(ctx, ...)`` expects (autograd ``apply`` takes no
    keywords); a ValueError naming the argument if this liger version lacks one."""
    params = list(inspect.signature(fn).parameters)[1:]  # drop ctx
    unknown = sorted(set(named) - set(params))
    if unknown:
        raise ValueError(
            f"installed liger-kernel's {fn.__qualname__} has no argument(s) {unknown}; "
            f"it takes {params}. flexsp.ops is written for liger-kernel==0.8.0"
        )
    bound = inspect.signature(fn).bind(None, **named)
    bound.apply_defaults()
    return bound.args[1:]


def linear_cross_entropy(hidden, weight, labels, ignore_index: int, reduction: str):
    """liger's fused linear + cross-entropy (chunked; grads computed in forward; no full logits).

    Arguments passed to ``LigerFusedLinearCrossEntropyFunction.forward`` (liger 0.8.0), by name:

    * ``_input=hidden``, ``weight=weight``, ``target=labels``, ``ignore_index``, ``reduction``:
      the problem itself; ``bias=None``, ``ce_weight=None``, ``lse_square_scale=0.0``,
      ``label_smoothing=0.0``, ``softcap=None`` and ``return_z_loss=False`` are liger's
      defaults, spelled out: plain cross-entropy, as the torch path computes.
    * ``accum_dtype=torch.float32``: liger's default (None) accumulates the LM-head weight
      gradient over token chunks in the weight's dtype; in bf16 every chunk's addition rounds
      the running sum, so the error grows with the number of chunks (about vocab / hidden of
      them). float32 costs a ``[vocab, hidden]`` float32 buffer (plus liger's float32 upcast of
      each chunk's product) and gives a weight gradient as accurate as the hidden gradient.

    Host syncs, which is why ``backend="auto"`` does not pick this path (see
    :func:`flexsp.ops.linear_cross_entropy`): liger 0.8.0's forward calls
    ``(target != ignore_index).sum().item()`` unconditionally (needed for ``"mean"`` only), and
    its backward tests ``torch.equal(grad_output, torch.tensor(1.0))`` -- two device-to-host
    syncs per step, with no argument to avoid either (upstream pull request #1292 of
    linkedin/Liger-Kernel, open, moves both onto the device; revisit ``auto`` when it ships).
    """
    args = _positional_args(
        LigerFusedLinearCrossEntropyFunction.forward,
        _input=hidden,
        weight=weight,
        target=labels,
        bias=None,
        ce_weight=None,
        ignore_index=ignore_index,
        lse_square_scale=0.0,
        label_smoothing=0.0,
        reduction=reduction,
        softcap=None,
        return_z_loss=False,
        accum_dtype=WEIGHT_GRAD_ACCUM_DTYPE,
    )
    out = LigerFusedLinearCrossEntropyFunction.apply(*args)
    return out[0] if isinstance(out, tuple) else out
