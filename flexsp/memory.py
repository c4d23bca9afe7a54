"""Activation bytes per token of a model, measured on meta tensors (no memory, no device): the dry
run's and the CUDA cost-model estimate's memory side. The native model is measured piece by piece
(one block, the stem, the head); an HF-native model (transformers' modules) whole, each saved tensor
attributed to the decoder layer that saved it."""

from __future__ import annotations

from dataclasses import replace

import torch

from flexsp.attention.context import AttnContext
from flexsp.attention.local import varlen_attention
from flexsp.model import layers as L
from flexsp.model.transformer import Block, LMHead, RMSNorm


def activation_bytes_per_token(mcfg, compute_dtype, tokens: tuple[int, int] = (4096, 8192)) -> dict:
    """Activation bytes per token held for backward on one rank, MEASURED on meta tensors.
    An HF-native ``mcfg`` (:class:`flexsp.model.hf_native.HFNativeConfig`) is measured by
    :func:`hf_native_activation_bytes_per_token`; the native model as follows.

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

    if getattr(mcfg, "hf_native", False):
        return hf_native_activation_bytes_per_token(mcfg, compute_dtype, tokens)
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
            "block": saved(lambda: block(x, cos, sin, _MetaAttention(cu_seqlens=cu)), exclude=(cos, sin)),
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


class _MetaAttention(AttnContext):
    """Local attention through flexsp.attention.local's autograd Function, its "math" kernel (the
    one that runs on meta); saves what the FlashAttention path saves (q, k, v, out, fp32 LSE). A
    sliding window is measured as full attention: it changes which scores a fused kernel computes,
    not what it saves (the math kernel's windowed path would save a dense mask instead)."""

    def attention(self, q, k, v, window=None, scale=None):
        return varlen_attention(q, k, v, self._cu_list, causal=True, backend="math", scale=scale)


def hf_native_activation_bytes_per_token(mcfg, compute_dtype, tokens: tuple[int, int] = (4096, 8192)) -> dict:
    """:func:`activation_bytes_per_token` of an HF-native model, MEASURED on meta tensors.

    The whole causal LM (transformers' modules, in the compute dtype) runs one forward with labels
    through FlexSP's attention (:class:`_MetaAttention`) under ``saved_tensors_hooks``; forward
    hooks on the decoder layers attribute each saved storage (parameters excluded) to the layer
    that saved it. Storages saved by one layer only are that layer's; the rest (embedding, RoPE
    tables every layer reads, final norm, the chunked linear cross-entropy) are ``stem+head``.
    ``block`` is the largest layer (layers differ, e.g. sliding-window vs full, dense vs MoE),
    ``blocks`` all layers together. Two token counts, the slope per token (constants drop out).

    Total per token: ``stem+head + blocks``; with activation checkpointing ``stem+head + layers x
    block_input + block`` (each layer keeps its input; the one recomputed holds its full set).
    An architecture whose forward cannot run on meta falls back, loudly (``method``), to the
    formula of its LLaMA-equivalent shape.
    """
    from flexsp.model.hf_native import HFNativeModel, register_attention

    cfg = replace(mcfg, dtype="bfloat16" if compute_dtype == torch.bfloat16 else "float32")
    meta = torch.device("meta")
    register_attention()
    with meta:
        model = HFNativeModel(cfg, device=meta)
    blocks = model.decoder_blocks()
    params = {p.untyped_storage()._cdata for p in model.parameters()}

    def measure(T: int) -> dict:
        where = ["outside"]
        owners: dict[int, set] = {}
        sizes: dict[int, int] = {}

        def pack(t):
            s = t.untyped_storage()
            if s._cdata not in params:
                owners.setdefault(s._cdata, set()).add(where[0])
                sizes[s._cdata] = max(sizes.get(s._cdata, 0), s.nbytes())
            return t

        def enter(i):
            return lambda *a: where.__setitem__(0, i)

        hooks = [b.register_forward_pre_hook(enter(i)) for i, b in enumerate(blocks)]
        hooks += [b.register_forward_hook(lambda *a: where.__setitem__(0, "outside")) for b in blocks]
        ids = torch.zeros(T, dtype=torch.int64, device=meta)
        half = torch.arange(T // 2, device=meta)
        try:
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                out = model(
                    ids, torch.cat([half, half]), _MetaAttention(cu_seqlens=[0, T // 2, T]), labels=ids
                )
            del out
        finally:
            for h in hooks:
                h.remove()
        per_block = [0] * len(blocks)
        outside = 0
        for key, who in owners.items():
            if len(who) == 1 and (i := next(iter(who))) != "outside":
                per_block[i] += sizes[key]
            else:
                outside += sizes[key]
        return {
            "stem+head": outside,
            "block": max(per_block, default=0),
            "blocks": sum(per_block),
            "block_input": T * cfg.hidden * torch.tensor([], dtype=compute_dtype).element_size(),
        }

    method = (
        f"measured: saved_tensors_hooks on meta tensors over a whole forward of {mcfg.architecture} "
        "(transformers' modules; attention: flexsp.attention.local._VarlenAttention)"
    )
    ac = bool(mcfg.activation_checkpointing)
    try:
        lo, hi = measure(tokens[0]), measure(tokens[1])
        per = {k: (hi[k] - lo[k]) / (tokens[1] - tokens[0]) for k in lo}
    except Exception as exc:  # noqa: BLE001 - a module without a meta implementation
        shape = mcfg.planning_shape()
        c = torch.tensor([], dtype=compute_dtype).element_size()
        fb = _fallback_per_token(shape, c)
        per = {"stem+head": fb["stem"] + fb["head"], "block": fb["block"], "block_input": fb["block_input"]}
        per["blocks"] = mcfg.layers * fb["block"]
        method = (
            f"FALLBACK FORMULA (meta forward of {mcfg.architecture} failed: {type(exc).__name__}: "
            f"{str(exc)[:160]}): its LLaMA-equivalent shape, see flexsp.memory._fallback_per_token"
        )
    if ac:
        total = per["stem+head"] + mcfg.layers * per["block_input"] + per["block"]
    else:
        total = per["stem+head"] + per["blocks"]
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
