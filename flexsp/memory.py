"""Activation bytes per token of the native model, measured on meta tensors (no memory, no device):
the dry run's and the CUDA cost-model estimate's memory side."""

from __future__ import annotations

from dataclasses import replace

import torch

from flexsp.attention.context import AttnContext
from flexsp.attention.local import varlen_attention
from flexsp.model import layers as L
from flexsp.model.transformer import Block, LMHead, RMSNorm


def activation_bytes_per_token(mcfg, compute_dtype, tokens: tuple[int, int] = (4096, 8192)) -> dict:
    """Activation bytes per token held for backward on one rank, MEASURED on meta tensors.

    Each piece runs forward on ``meta`` under ``torch.autograd.graph.saved_tensors_hooks``, which
    sees every tensor autograd saves for backward; distinct storages are summed, parameters (and
    the RoPE cos/sin shared by all blocks, counted once in ``stem``) excluded. Each piece runs at
    two token counts; the per-token figure is the slope (constant terms drop out).

    - ``stem``: embedding (saves the token ids) + RoPE cos/sin (fp32, saved by every block's RoPE:
      one copy);
    - ``block``: one transformer block in the compute dtype (bf16 under mixed precision). Attention
      runs through flexsp.attention.local's autograd Function (``_VarlenAttention``, the one the
      FlashAttention path uses on CUDA: it saves q, k, v, out and the fp32 log-sum-exp; its kernel
      runs as "math" on meta); norms/RoPE/SwiGLU are flexsp.ops' torch path (what meta dispatches
      to; liger on CUDA saves no more);
    - ``block_input``: the block's input, what activation checkpointing keeps per block;
    - ``head``: final RMSNorm + the chunked linear cross-entropy (logits are never saved).

    Total per token: ``stem + layers x block + head`` without activation checkpointing; with it
    ``stem + layers x block_input + block + head`` (every block keeps only its input; the block
    being recomputed in backward holds its full set once). Transient backward buffers (activation
    gradients, one logits chunk) are not included.
    """

    class _Ctx(AttnContext):
        def attention(self, q, k, v, window=None):
            return varlen_attention(q, k, v, self._cu_list, causal=True, backend="math")

    cfg = replace(mcfg, dtype="bfloat16" if compute_dtype == torch.bfloat16 else "float32")
    meta = torch.device("meta")
    with meta:
        embed = torch.nn.Embedding(cfg.vocab_size, cfg.hidden, dtype=cfg.torch_dtype)
        block = Block(cfg, device=meta)
        norm = RMSNorm(cfg.hidden, cfg.norm_eps, meta, cfg.torch_dtype)
        head = LMHead(cfg.hidden, cfg.vocab_size, meta, cfg.torch_dtype)
    param_keys = {p.untyped_storage()._cdata for m in (embed, block, norm, head) for p in m.parameters()}

    def saved(fn, exclude=()):
        seen, keep = {}, []
        skip = param_keys | {t.untyped_storage()._cdata for t in exclude}

        def pack(t):
            s = t.untyped_storage()
            if s._cdata not in skip:
                keep.append(t)
                seen[s._cdata] = max(seen.get(s._cdata, 0), s.nbytes())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = fn()
        del out
        keep.clear()
        return sum(seen.values())

    def measure(T: int) -> dict:
        ids = torch.zeros(T, dtype=torch.int64, device=meta)
        labels = torch.zeros(T, dtype=torch.int64, device=meta)
        pos = torch.arange(T, device=meta)
        cu = [0, T // 2, T]
        cos, sin = L.rope_cos_sin(
            pos,
            cfg.head_size,
            cfg.rope_theta,
            torch.float32,
            scaling=cfg.rope_scaling,
            max_position_embeddings=cfg.max_position_embeddings,
            seq_lens=torch.full((T,), T // 2, dtype=torch.int64, device=meta),
        )
        x = torch.empty(T, cfg.hidden, dtype=cfg.torch_dtype, device=meta, requires_grad=True)
        return {
            "stem": saved(lambda: embed(ids))
            + cos.untyped_storage().nbytes()
            + sin.untyped_storage().nbytes(),
            "block": saved(lambda: block(x, cos, sin, _Ctx(cu_seqlens=cu)), exclude=(cos, sin)),
            "block_input": x.untyped_storage().nbytes(),
            "head": saved(lambda: head(norm(x), labels)),
        }

    method = (
        "measured: saved_tensors_hooks on meta tensors (attention: flexsp.attention.local._VarlenAttention, "
        "the FlashAttention path's autograd Function; ops: flexsp.ops torch path)"
    )
    try:
        lo, hi = measure(tokens[0]), measure(tokens[1])
        per = {k: (hi[k] - lo[k]) / (tokens[1] - tokens[0]) for k in lo}
    except Exception as exc:  # noqa: BLE001 - a kernel without a meta implementation
        per = _fallback_per_token(cfg, torch.tensor([], dtype=compute_dtype).element_size())
        method = (
            f"FALLBACK FORMULA (meta forward failed: {type(exc).__name__}: {str(exc)[:160]}): "
            f"LLaMA block with flash-style attention, see flexsp.memory._fallback_per_token"
        )
    ac = bool(mcfg.activation_checkpointing)
    if ac:
        total = per["stem"] + mcfg.layers * per["block_input"] + per["block"] + per["head"]
    else:
        total = per["stem"] + mcfg.layers * per["block"] + per["head"]
    return {
        "bytes_per_token": total,
        "parts_per_token": per,
        "activation_checkpointing": ac,
        "layers": mcfg.layers,
        "method": method,
        "measured_at_tokens": list(tokens),
    }


def _fallback_per_token(cfg, c: int) -> dict:
    """ROUGH per-token bytes of a LLaMA block (used only if the meta forward fails): norm inputs
    and fp32 upcasts, q/k/v/out + fp32 LSE per head, RoPE inputs, SwiGLU gate/up/product, the
    projections' inputs."""
    h, q = cfg.hidden, cfg.heads * cfg.head_size
    kv = cfg.kv_heads * cfg.head_size
    block = c * (2 * h + 2 * h + 2 * (q + kv) + (q + 2 * kv) + q + 3 * cfg.intermediate) + 4 * (
        2 * h + cfg.heads
    )
    return {
        "stem": 8 + 2 * 4 * cfg.head_size,
        "block": block,
        "block_input": c * h,
        "head": c * h + 4 * h + 8,
    }
