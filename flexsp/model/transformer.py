"""LLaMA-style decoder over a packed buffer of variable-length documents.

The model sees only this rank's local tokens: ``input_ids [T_local]`` and ``positions [T_local]``
(each document's positions restart at 0, so RoPE never mixes documents), plus the ATTENTION it
calls, injected by the runtime: any callable ``attention(q, k, v, window=None) -> out`` over the
local tokens (``q [T_local, H, D]``, ``k/v [T_local, Hkv, D]``), closing over the micro-batch's
document boundaries, SP group and shard layout (``flexsp.attention.AttnContext``: local varlen
attention, or Ulysses/ring/hybrid over a group), with a ``doc_lengths(device)`` method for dynamic
RoPE. The model knows nothing of process groups; everything but attention is token-local.
Activation checkpointing, compile and sharding are applied from outside (flexsp.parallelize).

Layers: RMSNorm -> GQA attention (optional q/k/v biases, per-head q/k RMSNorm, sliding window)
with RoPE (optionally scaled: linear/dynamic/yarn/llama3) -> residual -> RMSNorm -> SwiGLU MLP ->
residual; tied or untied LM head.

No host syncs in the forward: document boundaries live on the host (in the attention object), and
everything computed from them on the device is built by tensor ops or asynchronous copies.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from flexsp.model import layers as L
from flexsp.model.config import ModelConfig
from flexsp.model.init import init_module_
from flexsp.model.loss import lm_loss


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

    def forward(self, x, cos, sin, attention):
        t = x.shape[0]
        q = self.wq(x).view(t, self.heads, self.head_dim)
        k = self.wk(x).view(t, self.kv_heads, self.head_dim)
        v = self.wv(x).view(t, self.kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = L.apply_rope(q, k, cos, sin)
        # the window is passed only when set: attention callables without one keep working
        out = attention(q, k, v, window=self.window) if self.window else attention(q, k, v)
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

    def forward(self, x, cos, sin, attention):
        x = x + self.attn(self.attn_norm(x), cos, sin, attention)
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
        init_module_(self, seed, self.config.init_std, self.config.layers)

    def input_embedding(self) -> nn.Module:
        return self.embed

    def final_norm(self) -> nn.Module:
        return self.norm

    def output_head(self) -> nn.Module:
        return self.lm_head

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        attn_ctx,
        labels: torch.Tensor | None = None,
        pad_mask: torch.Tensor | None = None,
        return_hidden: bool = False,
    ):
        """Run the local tokens.

        Args:
            input_ids: ``[T_local]`` token ids (this rank's shard of the packed buffer).
            positions: ``[T_local]`` position of each token inside its document.
            attn_ctx: the injected attention (see the module docstring): how attention runs for
                these tokens (local varlen or SP over a group).
            labels: optional ``[T_local]`` targets (-100 = none); when given, returns
                ``(loss_sum, num_targets)`` via the fused linear cross-entropy instead of logits.
            pad_mask: optional ``[T_local]`` bool, True on padding tokens (excluded from the loss).
            return_hidden: return the final normed hidden ``[T_local, hidden]`` instead of logits.
        Returns:
            logits ``[T_local, vocab]`` | hidden | ``(loss_sum, num_targets)``.
        """
        if input_ids.dim() != 1 or positions.shape != input_ids.shape:
            raise ValueError(
                f"input_ids and positions must both be [tokens]; got "
                f"{tuple(input_ids.shape)} and {tuple(positions.shape)}"
            )
        cfg = self.config
        x = self.embed(input_ids)
        seq_lens = attn_ctx.doc_lengths(positions.device) if cfg.rope_type == "dynamic" else None
        cos, sin = L.rope_cos_sin(
            positions,
            cfg.head_size,
            cfg.rope_theta,
            torch.float32,
            scaling=cfg.rope_scaling,
            max_position_embeddings=cfg.max_position_embeddings,
            seq_lens=seq_lens,
        )
        for block in self.blocks:
            x = block(x, cos, sin, attn_ctx)
        h = self.norm(x)
        if return_hidden and labels is None:
            return h
        tied = self.embed.weight if self.lm_head.weight is None else None
        return self.lm_head(h, labels, pad_mask, tied_weight=tied)
