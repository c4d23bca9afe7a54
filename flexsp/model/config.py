"""Model configuration: one dataclass for every LLaMA-style shape FlexSP trains, plus named presets.

The config is plain data (str/int/float/bool fields, ``rope_scaling`` a plain dict or None) so
Hydra structured configs and checkpoints can hold it (``dataclasses.asdict`` round-trips).
``tiny`` and ``small`` run on CPU (tests, demos); the ``1b``/``7b``/``13b``/``30b``/``70b``
presets carry published shapes for clusters and for the planner's cost model (``num_params``,
``flops_per_token``): they are never instantiated in tests.

The decoder family covered (see :mod:`flexsp.model.hf`): LLaMA (GQA, tied or untied head,
llama3/linear/dynamic/yarn RoPE scaling), Mistral (sliding-window attention, explicit head_dim),
Qwen2 (q/k/v biases) and Qwen3 (per-head q/k RMSNorm, head_dim != hidden / heads).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields

import torch

from flexsp.errors import UserError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}

ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "llama3")
"""RoPE scaling types (HF ``rope_parameters["rope_type"]``) the model implements."""

# Keys each rope_type may carry (HF names); "rope_type" itself is always there.
_ROPE_KEYS = {
    "default": set(),
    "linear": {"factor"},
    "dynamic": {"factor"},
    "yarn": {
        "factor",
        "original_max_position_embeddings",
        "attention_factor",
        "beta_fast",
        "beta_slow",
        "mscale",
        "mscale_all_dim",
        "truncate",
    },
    "llama3": {"factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"},
}
_ROPE_REQUIRED = {
    "default": set(),
    "linear": {"factor"},
    "dynamic": {"factor"},
    "yarn": set(),
    "llama3": {"factor", "low_freq_factor", "high_freq_factor"},
}


def normalize_rope_scaling(value, rope_theta: float | None = None) -> dict | None:
    """``rope_scaling`` as a plain dict with ``rope_type`` (or None for plain RoPE).

    Accepts HF's forms: ``rope_parameters`` (v5) or legacy ``rope_scaling`` (``type`` as an alias
    of ``rope_type``). ``rope_theta`` inside the dict must agree with ``rope_theta`` when given
    (it is the config's own field here) and is dropped; ``partial_rotary_factor`` 1.0 is dropped,
    anything else is unsupported. Raises ValueError naming the bad key/value and the options.
    """
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise UserError(f"ModelConfig.rope_scaling must be a dict or None, got {value!r}")
    d = {str(k): (v.item() if hasattr(v, "item") else v) for k, v in dict(value).items()}
    if "type" in d:
        legacy = d.pop("type")
        d.setdefault("rope_type", legacy)
    d.setdefault("rope_type", "default")
    theta = d.pop("rope_theta", None)
    if theta is not None and rope_theta is not None and float(theta) != float(rope_theta):
        raise UserError(
            f"ModelConfig.rope_scaling['rope_theta']={theta} disagrees with "
            f"rope_theta={rope_theta}; set rope_theta only"
        )
    prf = d.pop("partial_rotary_factor", None)
    if prf is not None and float(prf) != 1.0:
        raise UserError(
            f"ModelConfig.rope_scaling['partial_rotary_factor']={prf} is not supported; "
            "valid options: 1.0 (RoPE on the full head_dim)"
        )
    rt = d["rope_type"]
    if rt not in ROPE_TYPES:
        raise UserError(
            f"ModelConfig.rope_scaling['rope_type']={rt!r} is not supported; "
            f"valid options: {list(ROPE_TYPES)}"
        )
    bad = sorted(set(d) - {"rope_type"} - _ROPE_KEYS[rt])
    if bad:
        raise UserError(
            f"ModelConfig.rope_scaling keys {bad} are not supported for rope_type={rt!r}; "
            f"valid keys: {sorted(_ROPE_KEYS[rt] | {'rope_type'})}"
        )
    missing = sorted(_ROPE_REQUIRED[rt] - {k for k, v in d.items() if v is not None})
    if missing:
        raise UserError(f"ModelConfig.rope_scaling for rope_type={rt!r} needs keys {missing}")
    if "factor" in d and d["factor"] is not None and not float(d["factor"]) > 0:
        raise UserError(f"ModelConfig.rope_scaling['factor'] must be > 0, got {d['factor']!r}")
    if rt == "default":
        return None
    return d


@dataclass
class ModelConfig:
    vocab_size: int = 512
    """Vocabulary size; must be at least the tokenizer's vocab size."""
    hidden: int = 64
    """Model (residual stream) width."""
    layers: int = 2
    """Number of transformer blocks."""
    heads: int = 4
    """Query heads per attention layer."""
    kv_heads: int = 2
    """Key/value heads (grouped-query attention); must divide ``heads``. Equal to heads = MHA."""
    intermediate: int = 192
    """Width of the SwiGLU MLP's gate/up projections."""
    rope_theta: float = 10000.0
    """RoPE base frequency."""
    norm_eps: float = 1e-5
    """RMSNorm epsilon (block norms, final norm and the per-head q/k norms)."""
    tie_embeddings: bool = False
    """Share the input embedding matrix with the output (LM head) projection."""
    dtype: str = "float32"
    """Parameter and activation dtype: float32 or bfloat16 (norms, RoPE and the loss run in fp32)."""
    activation_checkpointing: bool = False
    """Recompute each block in backward (torch.utils.checkpoint, non-reentrant) to save memory."""
    init_std: float = 0.02
    """Std of the normal init; output projections use init_std / sqrt(2 * layers)."""
    head_dim: int = 0
    """Per-head width of q/k/v. 0 = ``hidden // heads`` (then hidden must be divisible by heads);
    an explicit value may differ from hidden / heads (Qwen3, some Mistral). Read the width in
    use from :attr:`head_size`."""
    attention_bias: bool = False
    """Biases on the q/k/v projections (Qwen2). The output projection never has a bias."""
    qk_norm: bool = False
    """Per-head RMSNorm (weight ``[head_size]``, eps ``norm_eps``) on q and k after the
    projections and before RoPE (Qwen3)."""
    rope_scaling: dict | None = None
    """RoPE scaling, HF ``rope_parameters``/``rope_scaling`` semantics: None (or
    ``{"rope_type": "default"}``) = plain RoPE; ``{"rope_type": "linear", "factor": f}``;
    ``{"rope_type": "dynamic", "factor": f}`` (NTK, per-document length: each packed document gets
    the frequencies HF computes for it run alone); ``{"rope_type": "yarn", "factor": f,
    "original_max_position_embeddings": n, ...}`` (beta_fast/beta_slow/mscale/mscale_all_dim/
    attention_factor/truncate as in HF; cos/sin scaled by the attention factor);
    ``{"rope_type": "llama3", "factor", "low_freq_factor", "high_freq_factor",
    "original_max_position_embeddings"}``. Missing original_max_position_embeddings defaults to
    ``max_position_embeddings`` as in HF."""
    sliding_window: int | None = None
    """Sliding-window attention (Mistral): a token sees itself and the ``sliding_window - 1``
    tokens before it in its document. None or 0 = full causal attention."""
    max_position_embeddings: int = 4096
    """Context length the model is made for (recorded in exports; the reference length of the
    dynamic and yarn/llama3 RoPE scaling)."""

    def __post_init__(self) -> None:
        for name in (
            "vocab_size",
            "hidden",
            "layers",
            "heads",
            "kv_heads",
            "intermediate",
            "max_position_embeddings",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise UserError(f"ModelConfig.{name} must be a positive int, got {value!r}")
        if not isinstance(self.head_dim, int) or isinstance(self.head_dim, bool) or self.head_dim < 0:
            raise UserError(
                f"ModelConfig.head_dim must be an int >= 0 (0 = hidden // heads), got {self.head_dim!r}"
            )
        if self.head_dim == 0 and self.hidden % self.heads:
            raise UserError(
                f"ModelConfig.hidden={self.hidden} is not divisible by heads={self.heads} "
                "(set head_dim explicitly for such shapes)"
            )
        if self.heads % self.kv_heads:
            raise UserError(f"ModelConfig.heads={self.heads} is not divisible by kv_heads={self.kv_heads}")
        if self.head_size % 2:
            raise UserError(f"ModelConfig.head_dim={self.head_size} must be even for RoPE")
        if self.dtype not in DTYPES:
            raise UserError(f"ModelConfig.dtype={self.dtype!r}; valid options: {sorted(DTYPES)}")
        if not self.rope_theta > 0:
            raise UserError(f"ModelConfig.rope_theta must be > 0, got {self.rope_theta!r}")
        if not self.norm_eps > 0:
            raise UserError(f"ModelConfig.norm_eps must be > 0, got {self.norm_eps!r}")
        if not self.init_std > 0:
            raise UserError(f"ModelConfig.init_std must be > 0, got {self.init_std!r}")
        for name in ("attention_bias", "qk_norm", "tie_embeddings", "activation_checkpointing"):
            if not isinstance(getattr(self, name), bool):
                raise UserError(f"ModelConfig.{name} must be a bool, got {getattr(self, name)!r}")
        w = self.sliding_window
        if w is not None and (not isinstance(w, int) or isinstance(w, bool) or w < 0):
            raise UserError(
                f"ModelConfig.sliding_window must be None or an int >= 0 (0/None = no window), got {w!r}"
            )
        self.rope_scaling = normalize_rope_scaling(self.rope_scaling, self.rope_theta)

    @property
    def head_size(self) -> int:
        """Per-head width in use: ``head_dim``, or ``hidden // heads`` when head_dim is 0."""
        return self.head_dim or self.hidden // self.heads

    @property
    def window(self) -> int | None:
        """The sliding window in tokens, None when attention is full causal."""
        return self.sliding_window or None

    @property
    def rope_type(self) -> str:
        return "default" if self.rope_scaling is None else self.rope_scaling["rope_type"]

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def num_params(self, include_embeddings: bool = True) -> int:
        """Exact parameter count of :class:`flexsp.model.Transformer` built from this config."""
        d, hd = self.hidden, self.head_size
        q, kv = self.heads * hd, self.kv_heads * hd
        attn = d * q + 2 * d * kv + q * d
        if self.attention_bias:
            attn += q + 2 * kv
        if self.qk_norm:
            attn += 2 * hd
        mlp = 3 * d * self.intermediate
        per_layer = attn + mlp + 2 * d
        total = self.layers * per_layer + d  # + final norm
        if include_embeddings:
            total += self.vocab_size * d * (1 if self.tie_embeddings else 2)
        return total

    def attended_keys(self, context: int) -> float:
        """Mean number of keys a token of a ``context``-token document attends, in the
        continuous approximation the FLOP count uses: ``context / 2`` for causal attention;
        with a sliding window ``w < context``: ``(w**2 / 2 + (context - w) * w) / context``."""
        w = self.window
        if w is None or context <= w:
            return context / 2
        return (w * w / 2 + (context - w) * w) / context

    def flops_per_token(self, context: int) -> float:
        """Training FLOPs (fwd+bwd = 3x fwd) per token for a document of ``context`` tokens:
        6 * matmul params + attention scores and values, 12 * layers * (heads * head_dim) *
        :meth:`attended_keys` (= ``context / 2`` for causal attention)."""
        dense = 6 * (self.num_params(include_embeddings=False) + self.vocab_size * self.hidden)
        attn = 12 * self.layers * self.heads * self.head_size * self.attended_keys(context)
        return float(dense + attn)


def _swiglu_width(hidden: int, multiple_of: int = 256) -> int:
    """LLaMA's SwiGLU width: 2/3 of 4 * hidden, rounded UP to a multiple of ``multiple_of``."""
    w = int(2 * 4 * hidden / 3)
    return multiple_of * ((w + multiple_of - 1) // multiple_of)


# Published shapes: LLaMA-3.2-1B (tied embeddings, GQA 32/8, theta 5e5, llama3 RoPE scaling),
# LLaMA-2 7B/13B (MHA), the FlexSP paper's GPT-30B (60 x 6656, 64 heads, MHA; SwiGLU width
# 8h/3 rounded up to 256 = 17920, LLaMA's rule, as in LLaMA-33B), LLaMA-2 70B (GQA 64/8).
# The big presets train in bfloat16 with activation checkpointing on.
PRESETS: dict[str, dict] = {
    "tiny": dict(vocab_size=512, hidden=64, layers=2, heads=4, kv_heads=2, intermediate=192),
    "small": dict(vocab_size=8192, hidden=256, layers=4, heads=8, kv_heads=4, intermediate=704),
    "1b": dict(
        vocab_size=128256,
        hidden=2048,
        layers=16,
        heads=32,
        kv_heads=8,
        intermediate=8192,
        rope_theta=500000.0,
        tie_embeddings=True,
        dtype="bfloat16",
        activation_checkpointing=True,
        max_position_embeddings=131072,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 32.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
    ),
    "7b": dict(
        vocab_size=32000,
        hidden=4096,
        layers=32,
        heads=32,
        kv_heads=32,
        intermediate=11008,
        dtype="bfloat16",
        activation_checkpointing=True,
    ),
    "13b": dict(
        vocab_size=32000,
        hidden=5120,
        layers=40,
        heads=40,
        kv_heads=40,
        intermediate=13824,
        dtype="bfloat16",
        activation_checkpointing=True,
    ),
    "30b": dict(
        vocab_size=32000,
        hidden=6656,
        layers=60,
        heads=64,
        kv_heads=64,
        intermediate=_swiglu_width(6656),
        dtype="bfloat16",
        activation_checkpointing=True,
    ),
    "70b": dict(
        vocab_size=32000,
        hidden=8192,
        layers=80,
        heads=64,
        kv_heads=8,
        intermediate=28672,
        dtype="bfloat16",
        activation_checkpointing=True,
    ),
}


def model_config(name: str, **overrides) -> ModelConfig:
    """The preset ``name`` (tiny, small, 1b, 7b, 13b, 30b, 70b) with ``overrides`` applied
    (None values keep the preset's value)."""
    key = name.lower().removeprefix("llama-")
    if key not in PRESETS:
        raise UserError(f"unknown model preset {name!r}; valid options: {sorted(PRESETS)}")
    valid = {f.name for f in fields(ModelConfig)}
    bad = sorted(set(overrides) - valid)
    if bad:
        raise UserError(f"unknown ModelConfig fields {bad}; valid fields: {sorted(valid)}")
    return ModelConfig(**{**PRESETS[key], **{k: v for k, v in overrides.items() if v is not None}})
