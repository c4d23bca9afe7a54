"""LLaMA-style decoder over a packed buffer of variable-length documents.

The model sees only this rank's local tokens: ``input_ids [T_local]`` and ``positions [T_local]``
(each document's positions restart at 0, so RoPE never mixes documents), plus an
:class:`AttnContext` saying how attention runs. With no sharding meta, attention is plain
single-device varlen attention over ``cu_seqlens``; with a meta from ``flexsp.attention.shard`` it
is the teammates' sequence-parallel attention (Ulysses/ring/hybrid) over the group. Everything but
attention is token-local, so the rest of the block is identical in both cases.

Layers: RMSNorm -> GQA attention (optional q/k/v biases, per-head q/k RMSNorm, sliding window)
with RoPE (optionally scaled: linear/dynamic/yarn/llama3) -> residual -> RMSNorm -> SwiGLU MLP ->
residual; optional per-block activation checkpointing (non-reentrant); tied or untied LM head.

No host syncs in the forward: document boundaries live on the host (:class:`AttnContext`), and
everything computed from them on the device is built by tensor ops or host->device copies.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from flexsp.hostcopy import to_device
from flexsp.model import layers as L
from flexsp.model.config import ModelConfig
from flexsp.model.loss import lm_loss


def _host_bounds(cu) -> list[int]:
    """Boundaries as Python ints. A list / CPU tensor costs nothing; a device tensor is copied to
    the host once (a sync): pass host-side boundaries to avoid it."""
    if torch.is_tensor(cu):
        return [int(c) for c in (cu if cu.device.type == "cpu" else cu.cpu()).tolist()]
    return [int(c) for c in cu]


@dataclass
class AttnContext:
    """How the attention of every layer runs for one forward pass.

    Boundaries are kept on the host (Python ints, computed once at construction), so the forward
    never syncs with the device for them: give ``cu_seqlens`` as a list or CPU tensor (a device
    tensor also works, copied to the host once here, outside the forward)."""

    cu_seqlens: torch.Tensor | list[int] | None = None
    """Document boundaries of the local buffer (local path only): ints ``[num_docs + 1]``."""
    meta: Any = None
    """Sharding meta returned by ``flexsp.attention.shard`` (SP path); None = local path."""
    group: Any = None
    """The SP process group (None or a 1-rank group: local attention)."""
    mode: str = "local"
    """SP attention mode passed to ``sp_attention``: local, ulysses, ring or hybrid."""

    def __post_init__(self) -> None:
        if self.meta is None and self.cu_seqlens is None:
            raise ValueError("AttnContext needs cu_seqlens (local attention) or meta (SP attention)")
        self._cu_list = None if self.cu_seqlens is None else _host_bounds(self.cu_seqlens)
        self._doc_len_cache: dict = {}

    @classmethod
    def local(cls, cu_seqlens) -> "AttnContext":
        return cls(cu_seqlens=cu_seqlens)

    def _global_bounds(self) -> list[int]:
        return self._cu_list if self.meta is None else [int(c) for c in self.meta.cu_seqlens]

    def max_doc_len(self) -> int:
        """Longest document of the (global) packed buffer, from host-side boundaries."""
        b = self._global_bounds()
        return max((e - s for s, e in zip(b[:-1], b[1:])), default=0)

    def doc_lengths(self, device) -> torch.Tensor:
        """int64 ``[T_local]``: the length of each local token's document (dynamic RoPE). Built
        from host boundaries and copied to ``device`` (no device->host sync); cached per device."""
        key = str(device)
        if key not in self._doc_len_cache:
            if self.meta is None:
                from flexsp.model.layers import doc_lengths_from_cu_seqlens
                lens = doc_lengths_from_cu_seqlens(self._cu_list, device="cpu")
                self._doc_len_cache[key] = to_device(lens, device)
            else:
                b = self._global_bounds()
                table = torch.tensor([e - s for s, e in zip(b[:-1], b[1:])] + [1], dtype=torch.int64)
                ids = to_device(self.meta.doc_ids.to(torch.int64), device)
                table = to_device(table, device)
                self._doc_len_cache[key] = table[ids.clamp(max=table.numel() - 1)]
        return self._doc_len_cache[key]

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  window: int | None = None) -> torch.Tensor:
        """Causal attention of the local tokens; ``window`` = sliding window (None: full).

        With a window, documents no longer than it are plain causal. Local and Ulysses attention
        run the window exactly; ring/hybrid need every document to fit in the window (else a
        ValueError: their block kernels have no window)."""
        if window and self.max_doc_len() <= window:
            window = None
        if self.meta is None:
            if window:
                return L.varlen_attention(q, k, v, self._cu_list, causal=True, window=window)
            return L.varlen_attention(q, k, v, self._cu_list, causal=True)
        if window:
            if self.meta.ring_degree == 1:
                from flexsp.attention.ulysses import ulysses_attention
                if q.shape[0] != self.meta.tokens_local or k.shape[0] != self.meta.tokens_local:
                    raise ValueError(f"q/k have {q.shape[0]}/{k.shape[0]} tokens, meta expects "
                                     f"{self.meta.tokens_local}")
                return ulysses_attention(q, k, v, self.meta, self.group, True, window=window)
            raise ValueError(
                f"sliding_window={window} is not supported with mode={self.mode!r} (ring degree "
                f"{self.meta.ring_degree}) when a document is longer than the window (longest: "
                f"{self.max_doc_len()} tokens); use mode='ulysses', or documents of at most "
                f"{window} tokens (then attention is plain causal)")
        from flexsp.attention import sp_attention  # teammate's runtime; imported only when used
        return sp_attention(q, k, v, self.meta, self.group, self.mode, causal=True)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, device=None, dtype=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return L.rms_norm(x, self.weight, self.eps)


class Attention(nn.Module):
    """GQA attention: q/k/v projections (biases with ``attention_bias``), optional per-head q/k
    RMSNorm (``qk_norm``, before RoPE), RoPE, varlen/SP attention (sliding window if set), output
    projection (no bias)."""

    def __init__(self, cfg: ModelConfig, device=None):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = cfg.heads, cfg.kv_heads, cfg.head_size
        self.window = cfg.window
        hd = cfg.head_size
        kw = dict(device=device, dtype=cfg.torch_dtype)
        self.wq = nn.Linear(cfg.hidden, cfg.heads * hd, bias=cfg.attention_bias, **kw)
        self.wk = nn.Linear(cfg.hidden, cfg.kv_heads * hd, bias=cfg.attention_bias, **kw)
        self.wv = nn.Linear(cfg.hidden, cfg.kv_heads * hd, bias=cfg.attention_bias, **kw)
        self.wo = nn.Linear(cfg.heads * hd, cfg.hidden, bias=False, **kw)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(hd, cfg.norm_eps, device, cfg.torch_dtype)
            self.k_norm = RMSNorm(hd, cfg.norm_eps, device, cfg.torch_dtype)
        else:
            self.q_norm = self.k_norm = None

    def forward(self, x, cos, sin, ctx: AttnContext):
        t = x.shape[0]
        q = self.wq(x).view(t, self.heads, self.head_dim)
        k = self.wk(x).view(t, self.kv_heads, self.head_dim)
        v = self.wv(x).view(t, self.kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = L.apply_rope(q, k, cos, sin)
        # the window is passed only when set, so AttnContext stand-ins with attention(q, k, v) keep working
        out = ctx.attention(q, k, v, self.window) if self.window else ctx.attention(q, k, v)
        return self.wo(out.reshape(t, self.heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, device=None):
        super().__init__()
        kw = dict(bias=False, device=device, dtype=cfg.torch_dtype)
        self.w_gate = nn.Linear(cfg.hidden, cfg.intermediate, **kw)
        self.w_up = nn.Linear(cfg.hidden, cfg.intermediate, **kw)
        self.w_down = nn.Linear(cfg.intermediate, cfg.hidden, **kw)

    def forward(self, x):
        return self.w_down(L.swiglu(self.w_gate(x), self.w_up(x)))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, device=None):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.hidden, cfg.norm_eps, device, cfg.torch_dtype)
        self.attn = Attention(cfg, device)
        self.mlp_norm = RMSNorm(cfg.hidden, cfg.norm_eps, device, cfg.torch_dtype)
        self.mlp = MLP(cfg, device)

    def forward(self, x, cos, sin, ctx: AttnContext):
        x = x + self.attn(self.attn_norm(x), cos, sin, ctx)
        return x + self.mlp(self.mlp_norm(x))


class LMHead(nn.Module):
    """The output projection, as a module of its own so a sharding wrapper (FSDP2 unit, ZeRO-3
    module hook) sees it run: ``forward(h)`` -> logits, ``forward(h, labels)`` -> ``(loss_sum,
    num_targets)`` through the fused linear cross-entropy (logits never materialised). Tied
    embeddings: no weight of its own (``weight is None``); the caller passes the embedding matrix."""

    def __init__(self, hidden: int, vocab_size: int, device=None, dtype=None, tied: bool = False):
        super().__init__()
        if tied:
            self.register_parameter("weight", None)
        else:
            self.weight = nn.Parameter(torch.empty(vocab_size, hidden, device=device, dtype=dtype))

    def forward(self, h, labels=None, pad_mask=None, tied_weight=None):
        w = self.weight if tied_weight is None else tied_weight
        if labels is not None:
            return lm_loss(h, w, labels, pad_mask)
        return h @ w.t()


class Transformer(nn.Module):
    """The decoder. Build with ``Transformer(config, device=None)``, then ``init_weights(seed)``."""

    def __init__(self, config: ModelConfig, device: torch.device | str | None = None):
        super().__init__()
        self.config = config
        dt = config.torch_dtype
        self.embed = nn.Embedding(config.vocab_size, config.hidden, device=device, dtype=dt)
        self.blocks = nn.ModuleList(Block(config, device) for _ in range(config.layers))
        self.norm = RMSNorm(config.hidden, config.norm_eps, device, dt)
        self.lm_head = LMHead(config.hidden, config.vocab_size, device, dt, tied=config.tie_embeddings)
        if self.embed.weight.device.type != "meta":
            self.init_weights(seed=0)

    @property
    def output_weight(self) -> torch.Tensor:
        """The ``[vocab, hidden]`` LM-head matrix (the embedding matrix when tied)."""
        return self.embed.weight if self.lm_head.weight is None else self.lm_head.weight

    @torch.no_grad()
    def init_weights(self, seed: int) -> None:
        """Deterministic init from ``seed`` (see flexsp.model.init): every parameter -- full, or the
        local shard of a sharded one -- gets exactly the values it would have in an unsharded
        model, whatever the world size and device. Norm weights are 1, biases 0; output
        projections (wo, w_down) use init_std / sqrt(2 * layers)."""
        from flexsp.model.init import init_module_
        init_module_(self, seed, self.config.init_std, self.config.layers)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, attn_ctx: AttnContext,
                labels: torch.Tensor | None = None, pad_mask: torch.Tensor | None = None,
                return_hidden: bool = False):
        """Run the local tokens.

        Args:
            input_ids: ``[T_local]`` token ids (this rank's shard of the packed buffer).
            positions: ``[T_local]`` position of each token inside its document.
            attn_ctx: how attention runs (local varlen or SP over a group).
            labels: optional ``[T_local]`` targets (-100 = none); when given, returns
                ``(loss_sum, num_targets)`` via the fused linear cross-entropy instead of logits.
            pad_mask: optional ``[T_local]`` bool, True on padding tokens (excluded from the loss).
            return_hidden: return the final normed hidden ``[T_local, hidden]`` instead of logits.
        Returns:
            logits ``[T_local, vocab]`` | hidden | ``(loss_sum, num_targets)``.
        """
        if input_ids.dim() != 1 or positions.shape != input_ids.shape:
            raise ValueError(f"input_ids and positions must both be [tokens]; got "
                             f"{tuple(input_ids.shape)} and {tuple(positions.shape)}")
        cfg = self.config
        x = self.embed(input_ids)
        seq_lens = attn_ctx.doc_lengths(positions.device) if cfg.rope_type == "dynamic" else None
        cos, sin = L.rope_cos_sin(positions, cfg.head_size, cfg.rope_theta, torch.float32,
                                  scaling=cfg.rope_scaling,
                                  max_position_embeddings=cfg.max_position_embeddings, seq_lens=seq_lens)
        for block in self.blocks:
            if cfg.activation_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, cos, sin, attn_ctx, use_reentrant=False)
            else:
                x = block(x, cos, sin, attn_ctx)
        h = self.norm(x)
        if return_hidden and labels is None:
            return h
        tied = self.embed.weight if self.lm_head.weight is None else None
        return self.lm_head(h, labels, pad_mask, tied_weight=tied)
