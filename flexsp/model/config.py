"""Model configuration: one dataclass for every LLaMA-style shape FlexSP trains, plus named presets.

The config is plain data (str/int/float/bool fields) so Hydra structured configs and checkpoints can
hold it. ``tiny`` and ``small`` run on CPU (tests, demos); the ``1b``/``7b``/``13b``/``70b`` presets
carry published LLaMA shapes for clusters and for the planner's cost model (``num_params``,
``flops_per_token``): they are never instantiated in tests.
"""
from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass
class ModelConfig:
    vocab_size: int = 512
    """Vocabulary size; must be at least the tokenizer's vocab size."""
    hidden: int = 64
    """Model (residual stream) width."""
    layers: int = 2
    """Number of transformer blocks."""
    heads: int = 4
    """Query heads per attention layer; ``hidden`` must be divisible by it."""
    kv_heads: int = 2
    """Key/value heads (grouped-query attention); must divide ``heads``. Equal to heads = MHA."""
    intermediate: int = 192
    """Width of the SwiGLU MLP's gate/up projections."""
    rope_theta: float = 10000.0
    """RoPE base frequency."""
    norm_eps: float = 1e-5
    """RMSNorm epsilon."""
    tie_embeddings: bool = False
    """Share the input embedding matrix with the output (LM head) projection."""
    dtype: str = "float32"
    """Parameter and activation dtype: float32 or bfloat16 (norms, RoPE and the loss run in fp32)."""
    activation_checkpointing: bool = False
    """Recompute each block in backward (torch.utils.checkpoint, non-reentrant) to save memory."""
    init_std: float = 0.02
    """Std of the normal init; output projections use init_std / sqrt(2 * layers)."""

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden", "layers", "heads", "kv_heads", "intermediate"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"ModelConfig.{name} must be a positive int, got {value!r}")
        if self.hidden % self.heads:
            raise ValueError(f"ModelConfig.hidden={self.hidden} is not divisible by heads={self.heads}")
        if self.heads % self.kv_heads:
            raise ValueError(f"ModelConfig.heads={self.heads} is not divisible by kv_heads={self.kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"ModelConfig head_dim={self.head_dim} (hidden/heads) must be even for RoPE")
        if self.dtype not in DTYPES:
            raise ValueError(f"ModelConfig.dtype={self.dtype!r}; valid options: {sorted(DTYPES)}")
        if not self.rope_theta > 0:
            raise ValueError(f"ModelConfig.rope_theta must be > 0, got {self.rope_theta!r}")
        if not self.norm_eps > 0:
            raise ValueError(f"ModelConfig.norm_eps must be > 0, got {self.norm_eps!r}")
        if not self.init_std > 0:
            raise ValueError(f"ModelConfig.init_std must be > 0, got {self.init_std!r}")

    @property
    def head_dim(self) -> int:
        """Per-head width: hidden / heads."""
        return self.hidden // self.heads

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def num_params(self, include_embeddings: bool = True) -> int:
        """Exact parameter count of :class:`flexsp.model.Transformer` built from this config."""
        d, kv = self.hidden, self.kv_heads * self.head_dim
        attn = d * d + 2 * d * kv + d * d
        mlp = 3 * d * self.intermediate
        per_layer = attn + mlp + 2 * d
        total = self.layers * per_layer + d  # + final norm
        if include_embeddings:
            total += self.vocab_size * d * (1 if self.tie_embeddings else 2)
        return total

    def flops_per_token(self, context: int) -> float:
        """Training FLOPs (fwd+bwd = 3x fwd) per token for a document of ``context`` tokens:
        6 * matmul params + causal attention (12 * layers * hidden * context / 2)."""
        dense = 6 * (self.num_params(include_embeddings=False) + self.vocab_size * self.hidden)
        attn = 12 * self.layers * self.hidden * context / 2
        return float(dense + attn)


# Published shapes: LLaMA-3.2-1B (tied embeddings, GQA 32/8, theta 5e5), LLaMA-2 7B/13B (MHA),
# LLaMA-2 70B (GQA 64/8).
PRESETS: dict[str, dict] = {
    "tiny": dict(vocab_size=512, hidden=64, layers=2, heads=4, kv_heads=2, intermediate=192),
    "small": dict(vocab_size=8192, hidden=256, layers=4, heads=8, kv_heads=4, intermediate=704),
    "1b": dict(vocab_size=128256, hidden=2048, layers=16, heads=32, kv_heads=8, intermediate=8192,
               rope_theta=500000.0, tie_embeddings=True, dtype="bfloat16"),
    "7b": dict(vocab_size=32000, hidden=4096, layers=32, heads=32, kv_heads=32, intermediate=11008,
               dtype="bfloat16"),
    "13b": dict(vocab_size=32000, hidden=5120, layers=40, heads=40, kv_heads=40, intermediate=13824,
                dtype="bfloat16"),
    "70b": dict(vocab_size=32000, hidden=8192, layers=80, heads=64, kv_heads=8, intermediate=28672,
                dtype="bfloat16"),
}


def model_config(name: str, **overrides) -> ModelConfig:
    """The preset ``name`` (tiny, small, 1b, 7b, 13b, 70b) with ``overrides`` applied."""
    key = name.lower().removeprefix("llama-")
    if key not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; valid options: {sorted(PRESETS)}")
    valid = {f.name for f in fields(ModelConfig)}
    bad = sorted(set(overrides) - valid)
    if bad:
        raise ValueError(f"unknown ModelConfig fields {bad}; valid fields: {sorted(valid)}")
    return replace(ModelConfig(**PRESETS[key]), **overrides)
