"""Weights in and out of an HF-native model (flexsp.model.hf_native).

In: :class:`HFNativeWeights`, the weight source the engines fill local shards from
(``check(module)``, ``fill_(dest, name, numel, start)``, see flexsp.engines). The model's parameter
names are transformers' own, so a parameter stored under its own name is read as a slice of the
safetensors file (FSDP2: the rows of the local shard; DeepSpeed: the elements of the flat
partition). Checkpoint keys that transformers converts on load are mapped with transformers' own
conversion rules (``get_model_conversion_mapping`` + ``rename_source_key``, as ``from_pretrained``
does): renamed keys are read as slices too; a converted parameter (e.g. v5's fused MoE expert
tensors ``experts.gate_up_proj [E, 2I, H]`` stacked from per-expert ``gate_proj``/``up_proj``) is
assembled whole by transformers' conversion operations, one parameter at a time, and each rank
copies its part (a transient of one such parameter per rank).

Out: :func:`save_hf_native`: a state dict with these names -> a ``save_pretrained`` directory
(config.json, safetensors in the original checkpoint layout: transformers reverses its
conversions when saving, tokenizer files), which ``AutoModelForCausalLM.from_pretrained`` loads.
"""

from __future__ import annotations

import copy
import os
from collections import defaultdict
from dataclasses import replace
from pathlib import Path

import torch

from flexsp.errors import UserError
from flexsp.model.hf_files import (
    DEFAULT_MAX_SHARD_BYTES,
    HFCheckpointReader,
    _hf_dtype,
    _load_config_dict,
    _save_tokenizer,
)
from flexsp.model.hf_native import HFNativeModel, build_causal_lm, hf_native_config
from flexsp.model.init import fill_local_shards


def _shape(p) -> tuple[int, ...]:
    return tuple(getattr(p, "ds_shape", None) or p.shape)


class HFNativeWeights:
    """Element ranges of an HF-native model's parameters, read lazily from ``path``'s safetensors."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.reader = HFCheckpointReader(path, names="hf")
        self.direct: dict[str, str] = {}  # parameter -> checkpoint key (same tensor)
        self.converted: dict[str, tuple] = {}  # parameter -> (converter, {source pattern: [keys]})
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._hf_config = None
        self._cache: tuple[str, torch.Tensor] | None = None

    def _map_keys(self, module) -> list[str]:
        """Map every checkpoint key onto the module's state dict; returns the unmapped keys."""
        from transformers.core_model_loading import (
            WeightConverter,
            WeightRenaming,
            dot_natural_key,
            rename_source_key,
        )

        transforms = module.weight_conversions()
        renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
        converters = [t for t in transforms if isinstance(t, WeightConverter)]
        by_pattern = {p: c for c in converters for p in c.source_patterns}
        targets = {k: True for k in module.state_dict().keys()}
        prefix = module.base_model_prefix
        unmapped = []
        for key in sorted(self.reader.keys(), key=dot_natural_key):
            name, pattern = rename_source_key(key, renamings, converters, prefix, targets)
            if name not in targets and key in targets:
                name, pattern = key, None
            if name not in targets:
                unmapped.append(key)
            elif pattern is None:
                self.direct[name] = key
            else:
                template = copy.deepcopy(by_pattern[pattern])
                _, sources = self.converted.setdefault(name, (template, defaultdict(list)))
                sources[pattern].append(key)
        return unmapped

    def check(self, module) -> None:
        """Every parameter of ``module`` present with its shape and no checkpoint key left over,
        in one ValueError naming them all, before anything is filled."""
        self._hf_config = module.config.transformers_config()
        unmapped = self._map_keys(module)
        params = {n: _shape(p) for n, p in module.named_parameters()}
        self._shapes = params
        missing = [n for n in params if n not in self.direct and n not in self.converted]
        shapes = [
            f"{n}: checkpoint {self.reader.shape(k)} vs model {params[n]}"
            for n, k in self.direct.items()
            if n in params and self.reader.shape(k) != params[n]
        ]
        msgs = []
        if missing:
            msgs.append(f"missing keys: {missing}")
        if unmapped:
            msgs.append(f"unexpected keys: {unmapped}")
        if shapes:
            msgs.append(f"shape mismatches: {shapes}")
        if msgs:
            raise UserError(f"{self.path} does not match the model: " + "; ".join(msgs))

    def _assembled(self, name: str) -> torch.Tensor:
        """The whole converted parameter ``name``, built by transformers' conversion operations."""
        if self._cache is not None and self._cache[0] == name:
            return self._cache[1]
        template, sources = self.converted[name]
        conv = copy.deepcopy(template)
        tensors = {
            pattern: [self.reader.read_rows(k, 0, self.reader.shape(k)[0]) for k in keys]
            for pattern, keys in sources.items()
        }
        for op in conv.operations:
            tensors = op.convert(
                tensors,
                source_patterns=conv.source_patterns,
                target_patterns=conv.target_patterns,
                full_layer_name=name,
                model=None,
                config=self._hf_config,
                missing_keys=None,
            )
        if len(tensors) == 1:
            full = next(iter(tensors.values()))
        else:
            full = next((v for k, v in tensors.items() if name.endswith(k.lstrip("."))), None)
        full = full[0] if isinstance(full, list) else full
        if full is None or tuple(full.shape) != self._shapes.get(name, tuple(full.shape)):
            got = None if full is None else tuple(full.shape)
            keys = sorted(k for v in sources.values() for k in v)
            raise UserError(
                f"{self.path}: {name} converted from {keys} has shape {got}, the model expects "
                f"{self._shapes.get(name)}"
            )
        self._cache = (name, full)
        return full

    @torch.no_grad()
    def fill_(self, dest: torch.Tensor, name: str, numel: int, start: int) -> None:
        n = dest.numel()
        if name in self.direct:
            vals = self.reader.read_elements(self.direct[name], start, start + n)
        elif name in self.converted:
            vals = self._assembled(name).reshape(-1)[start : start + n]
        else:
            raise KeyError(f"{self.path}: no tensor for parameter {name!r} (call check(module) first)")
        dest.copy_(vals.reshape(dest.shape).to(device=dest.device, dtype=dest.dtype))


def save_hf_native(
    cfg,
    state_dict: dict[str, torch.Tensor],
    path,
    *,
    dtype: torch.dtype = torch.bfloat16,
    max_shard_bytes: int | None = None,
    tokenizer_from=None,
) -> Path:
    """Write ``state_dict`` (an HF-native model's, transformers' names) as a ``save_pretrained``
    directory in ``dtype``: the causal LM is built on ``meta`` from ``cfg.hf_config``, the tensors
    are assigned into it (no second copy), and transformers writes config.json + safetensors
    (+ generation_config.json); the tokenizer of ``tokenizer_from`` is copied/saved."""

    name = str(dtype).replace("torch.", "")
    model = build_causal_lm(
        replace(cfg, dtype=name if name in ("float32", "bfloat16") else "float32"), attn_implementation=None
    )
    expected = model.state_dict()
    tensors = {}
    for k, t in state_dict.items():
        if hasattr(t, "full_tensor"):
            t = t.full_tensor()
        tensors[k] = t.detach().to(device="cpu", dtype=dtype).contiguous()
    tied = {k for k in expected if k not in dict(model.named_parameters())}
    missing = sorted(set(expected) - set(tensors) - tied)
    unexpected = sorted(set(tensors) - set(expected))
    wrong = [
        f"{k}: {tuple(tensors[k].shape)} vs {tuple(expected[k].shape)}"
        for k in expected
        if k in tensors and tuple(tensors[k].shape) != tuple(expected[k].shape)
    ]
    if missing or unexpected or wrong:
        raise UserError(
            f"state dict does not match {type(model).__name__}: missing {missing}, unexpected "
            f"{unexpected}, shape mismatches {wrong}"
        )
    model.load_state_dict({k: v for k, v in tensors.items() if k not in tied}, strict=False, assign=True)
    model.tie_weights()
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    for old in list(out.glob("model*.safetensors")) + [out / "model.safetensors.index.json"]:
        if old.exists():
            old.unlink()
    ids = _save_tokenizer(tokenizer_from, out) if tokenizer_from else {}
    for key, value in ids.items():
        setattr(model.config, key, value)
        if model.generation_config is not None:
            setattr(model.generation_config, key, value)
    model.config.dtype = dtype
    model.save_pretrained(str(out), max_shard_size=int(max_shard_bytes or DEFAULT_MAX_SHARD_BYTES))
    return out


def load_hf_native(path, device="cpu", dtype=None, **overrides) -> HFNativeModel:
    """The :class:`HFNativeModel` of the checkpoint at ``path`` with its weights on ``device``."""
    if dtype is not None:
        overrides["dtype"] = str(dtype).replace("torch.", "")
    elif "dtype" not in overrides:
        overrides["dtype"] = _hf_dtype(_load_config_dict(path)[0])
    cfg = hf_native_config(path, **overrides)
    model = HFNativeModel(cfg)
    model.to_empty(device=device)
    fill_local_shards(model, HFNativeWeights(path))
    return model
