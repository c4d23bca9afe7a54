"""Section ``model``: which model a run trains (a preset with field overrides, or a Hugging Face
checkpoint). The YAML keeps every :class:`flexsp.model.ModelConfig` field flat under ``model``
(``model.hidden=128``; null keeps the preset's value); :class:`ModelSection` holds the set ones in
``overrides``, each checked against ModelConfig's annotation."""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field

from flexsp.config.fields import typed_value
from flexsp.errors import UserError
from flexsp.model.config import ModelConfig, model_config

HF_OVERRIDABLE = ("activation_checkpointing", "dtype")
"""ModelConfig fields a run may set on top of a Hugging Face checkpoint's config.json."""


@dataclass
class ModelSection:
    preset: str = "tiny"
    """Model preset (flexsp.model.PRESETS: tiny, small, 1b, 7b, 13b, 30b, 70b); ignored with
    hf_checkpoint."""
    hf_checkpoint: str | None = None
    """A Hugging Face model directory (config.json + safetensors + tokenizer files) to start from:
    its config.json gives the shape, its weights the initial parameters, its tokenizer the data's."""
    hf_native: bool = False
    """True: train hf_checkpoint through transformers' modules (FlexSP attention and loss); False:
    the native model when it covers the architecture, else HF-native (announced on the first line)."""
    overrides: dict = field(default_factory=dict)
    """ModelConfig fields set on top of the preset (every other key of the model section that is
    not null). With hf_checkpoint only activation_checkpointing and dtype (vocab_size follows the
    checkpoint)."""

    def __post_init__(self) -> None:
        if self.hf_native and self.hf_checkpoint is None:
            raise UserError(
                "model.hf_native=true needs model.hf_checkpoint (the Hugging Face model directory "
                "to train through transformers' modules)",
                field="model.hf_native",
            )
        if self.hf_checkpoint is not None:
            if not self.hf_checkpoint.strip():
                raise UserError(
                    "model.hf_checkpoint is empty; give a Hugging Face model directory",
                    field="model.hf_checkpoint",
                )
            bad = sorted(set(self.overrides) - set(HF_OVERRIDABLE) - {"vocab_size"})
            if bad:
                raise UserError(
                    f"model fields {bad} cannot be overridden with model.hf_checkpoint (the shape "
                    f"comes from {self.hf_checkpoint}/config.json); overridable: {sorted(HF_OVERRIDABLE)}",
                    field="model",
                    options=sorted(HF_OVERRIDABLE),
                )
        else:
            model_config(self.preset, **self.overrides)  # the preset exists, the values are valid

    @classmethod
    def from_container(cls, data, name: str = "model") -> ModelSection:
        """The section from its flat YAML form (``preset``, ``hf_checkpoint``, ``hf_native`` and
        ModelConfig fields); UserError naming ``<name>.<key>`` for an unknown key or a bad value."""
        if not isinstance(data, Mapping):
            raise UserError(
                f"{name} must be a mapping (preset, hf_checkpoint, ModelConfig fields), got {data!r}"
            )
        data = dict(data)
        preset = typed_value(str, data.pop("preset", "tiny"), f"{name}.preset")
        hf = typed_value(str | None, data.pop("hf_checkpoint", None), f"{name}.hf_checkpoint")
        hf_native = typed_value(bool, data.pop("hf_native", False), f"{name}.hf_native")
        hints = typing.get_type_hints(ModelConfig)
        valid = sorted(f.name for f in dataclasses.fields(ModelConfig))
        bad = sorted(set(data) - set(valid))
        if bad:
            raise UserError(
                f"unknown {name} keys {bad}; valid keys: {['preset', 'hf_checkpoint', 'hf_native', *valid]}",
                field=name,
            )
        overrides = {k: typed_value(hints[k], v, f"{name}.{k}") for k, v in data.items() if v is not None}
        return cls(preset=preset, hf_checkpoint=hf, hf_native=hf_native, overrides=overrides)

    def to_container(self) -> dict:
        """The flat YAML form (the inverse of :meth:`from_container`)."""
        return {
            "preset": self.preset,
            "hf_checkpoint": self.hf_checkpoint,
            "hf_native": self.hf_native,
            **self.overrides,
        }

    @property
    def name(self) -> str:
        """How the user names the model: the preset, or the checkpoint directory."""
        return self.hf_checkpoint or self.preset
