"""FlexSP model: a LLaMA-style decoder over packed variable-length documents (see transformer.py)."""

from flexsp.attention.context import AttnContext
from flexsp.model.config import PRESETS, ROPE_TYPES, ModelConfig, model_config
from flexsp.model.inputs import ModelInputs, shard_inputs
from flexsp.model.layers import doc_lengths_from_cu_seqlens, positions_from_cu_seqlens
from flexsp.model.loss import IGNORE_INDEX, lm_labels, lm_loss
from flexsp.model.transformer import Transformer

__all__ = [
    "AttnContext",
    "IGNORE_INDEX",
    "ModelConfig",
    "ModelInputs",
    "PRESETS",
    "ROPE_TYPES",
    "Transformer",
    "doc_lengths_from_cu_seqlens",
    "lm_labels",
    "lm_loss",
    "model_config",
    "positions_from_cu_seqlens",
    "shard_inputs",
]
