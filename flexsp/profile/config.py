"""What ``flexsp-profile`` profiles: the ``profile`` section (flexsp.config.ProfileConfig, composed with
the training tree by ``configs/profile/default.yaml``) and the model training would build.

The model, its precision, the engine and the backend are the training tree's (``model.*``,
``train.precision``, ``parallel.*``), resolved by :func:`flexsp.modelspec.model_config_of`, the same
function training calls: ``flexsp-profile model.hf_checkpoint=DIR`` times exactly the model
``flexsp-train model.hf_checkpoint=DIR`` trains, and the cost model records its shape.
"""

from __future__ import annotations

from dataclasses import replace

from flexsp.config import ProfileConfig, RunConfig, load_config
from flexsp.config.compose import compose_container
from flexsp.config.profile import MODES, default_comm_shapes, default_compute_shapes  # noqa: F401 (re-exported)
from flexsp.errors import UserError
from flexsp.modelspec import model_config_of, planning_shape

__all__ = [
    "MODES",
    "ProfileConfig",
    "default_comm_shapes",
    "default_compute_shapes",
    "from_flat",
    "profiled_model",
]

FLAT_KEYS = {
    "model": ("model", "preset"),
    "precision": ("train", "precision"),
    "engine": ("parallel", "engine"),
    "backend": ("parallel", "backend"),
    "devices_per_node": ("parallel", "devices_per_node"),
}
"""Keys of the flat profile dicts of earlier versions that now live in the training tree."""


def profiled_model(cfg: RunConfig):
    """(the FULL model training would build -- a ModelConfig in the dtype the precision keeps its
    parameters in --, the resolved precision, a note or None). An HF-native model (transformers'
    modules) is profiled as its LLaMA-equivalent native shape (the shape its cost model is checked
    against), said in the note."""
    mcfg, precision = model_config_of(cfg)
    if not getattr(mcfg, "hf_native", False):
        return mcfg, precision, None
    note = (
        f"{mcfg.architecture} trains HF-native (transformers' modules): timed as its LLaMA-equivalent native "
        f"blocks of the same shape (an approximation)"
    )
    return replace(planning_shape(mcfg), dtype=mcfg.dtype), precision, note


def from_flat(flat: dict) -> RunConfig:
    """A profile run from the flat dict of earlier versions (``name``, ``output_dir``, ``model``,
    ``model_overrides``, ``precision``, ``engine``, ``backend``, ``devices_per_node`` and the profile
    fields): the training defaults of ``configs/`` with those values set. Used by scripts that build
    the profile's settings in Python (benchmarks/gpu_profile.py)."""
    raw = compose_container([], "profile")
    flat = dict(flat)
    for key, (section, field) in FLAT_KEYS.items():
        if key in flat:
            raw[section][field] = flat.pop(key)
    over = flat.pop("model_overrides", None) or {}
    if not isinstance(over, dict):
        raise UserError(f"model_overrides={over!r} must be a mapping of ModelConfig fields")
    raw["model"].update(over)
    if "output_dir" in flat:
        raw["output_dir"] = flat.pop("output_dir")
    raw["profile"].update(flat)
    return load_config(raw)
