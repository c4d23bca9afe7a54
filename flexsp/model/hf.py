"""Hugging Face interop: configs, lazy safetensors reading (full, FSDP2 or flat shards), export.

Supported architectures (:data:`SUPPORTED_ARCHITECTURES`) are the decoders our
:class:`flexsp.model.Transformer` computes exactly: LLaMA (GQA, tied or untied head,
linear/dynamic/yarn/llama3 RoPE scaling), Mistral (sliding window, explicit head_dim), Qwen2
(q/k/v biases, optional sliding window on every layer) and Qwen3 (per-head q/k RMSNorm, head_dim
!= hidden / heads). Anything else is one ValueError naming what is unsupported.

API::

    cfg = config_from_hf("path/to/hf_dir")                # ModelConfig (config.json)
    model = from_hf("path/to/hf_dir", device="cpu")       # Transformer with the weights
    to_hf(model, "out_dir", tokenizer_from="path/to/hf_dir")

    # sharded training: build on meta, shard, materialise, then read only the local rows
    model = Transformer(cfg, device="meta"); fully_shard(...); model.to_empty(device=dev)
    HFCheckpointReader("path/to/hf_dir").load_into_(model)

Parameter names: ours (``blocks.3.attn.wq.weight``) <-> HF (``model.layers.3.self_attn.q_proj.weight``),
see :func:`hf_name` / :func:`our_name` (``HFCheckpointReader(path, names="hf")`` addresses the
checkpoint's own keys instead).

Every other causal LM trains HF-native (flexsp.model.hf_native: transformers' modules with FlexSP's
attention and loss). :func:`from_hf` returns either, called the same way; :func:`native_gap` says
why the native model does not cover a checkpoint.
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
from collections.abc import Mapping
from pathlib import Path

import torch

from flexsp.model.config import ModelConfig, normalize_rope_scaling
from flexsp.errors import UserError

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")

_MODEL_TYPE = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2",
               "Qwen3ForCausalLM": "qwen3"}
_ARCH_OF_TYPE = {v: k for k, v in _MODEL_TYPE.items()}

# ours <-> HF parameter names (per block, then global)
_BLOCK_MAP = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn.wq.weight": "self_attn.q_proj.weight", "attn.wq.bias": "self_attn.q_proj.bias",
    "attn.wk.weight": "self_attn.k_proj.weight", "attn.wk.bias": "self_attn.k_proj.bias",
    "attn.wv.weight": "self_attn.v_proj.weight", "attn.wv.bias": "self_attn.v_proj.bias",
    "attn.wo.weight": "self_attn.o_proj.weight",
    "attn.q_norm.weight": "self_attn.q_norm.weight", "attn.k_norm.weight": "self_attn.k_norm.weight",
    "mlp_norm.weight": "post_attention_layernorm.weight",
    "mlp.w_gate.weight": "mlp.gate_proj.weight", "mlp.w_up.weight": "mlp.up_proj.weight",
    "mlp.w_down.weight": "mlp.down_proj.weight",
}
_BLOCK_INV = {v: k for k, v in _BLOCK_MAP.items()}
_GLOBAL_MAP = {"embed.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
               "lm_head.weight": "lm_head.weight"}
_GLOBAL_INV = {v: k for k, v in _GLOBAL_MAP.items()}
_IGNORED_HF = re.compile(r".*rotary_emb\.inv_freq$")
DEFAULT_MAX_SHARD_BYTES = 5 * 2**30


def hf_name(name: str) -> str:
    """HF parameter name of our parameter ``name`` (ValueError if it has none)."""
    if name in _GLOBAL_MAP:
        return _GLOBAL_MAP[name]
    m = re.fullmatch(r"blocks\.(\d+)\.(.+)", name)
    if m and m.group(2) in _BLOCK_MAP:
        return f"model.layers.{m.group(1)}.{_BLOCK_MAP[m.group(2)]}"
    raise UserError(f"parameter {name!r} has no Hugging Face counterpart")


def our_name(key: str) -> str | None:
    """Our parameter name of HF key ``key``; None if it is not one of ours."""
    if key in _GLOBAL_INV:
        return _GLOBAL_INV[key]
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", key)
    if m and m.group(2) in _BLOCK_INV:
        return f"blocks.{m.group(1)}.{_BLOCK_INV[m.group(2)]}"
    return None


# ---------------------------------------------------------------------------------- configs
def checkpoint_dir(path, field: str = "model.hf_checkpoint") -> Path:
    """``path`` if it is a directory, else a ValueError (one line) naming ``field``: a Hugging Face
    checkpoint is a model directory, never one of its files."""
    p = Path(path)
    if p.is_dir():
        return p
    what = "is a file" if p.exists() else "does not exist"
    hint = f" (e.g. {field}={p.parent})" if p.exists() and (p.parent / "config.json").is_file() else ""
    raise UserError(f"{field}={path} {what}; it must be a directory: a Hugging Face model directory holding "
                     f"config.json, *.safetensors and the tokenizer files{hint}")


def _load_config_dict(path_or_dict) -> tuple[dict, str]:
    if isinstance(path_or_dict, Mapping):
        return dict(path_or_dict), "<dict>"
    if hasattr(path_or_dict, "to_dict"):          # a transformers PretrainedConfig
        return path_or_dict.to_dict(), type(path_or_dict).__name__
    p = Path(path_or_dict)
    f = p / "config.json" if p.is_dir() else p
    if not f.is_file():
        raise FileNotFoundError(f"{f} not found: an HF model directory needs a config.json")
    try:
        return json.loads(f.read_text()), str(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{f} is not valid JSON ({exc})") from None


def _hf_dtype(d: dict) -> str:
    dt = str(d.get("torch_dtype") or d.get("dtype") or "float32").replace("torch.", "")
    return "bfloat16" if dt == "bfloat16" else "float32"


def config_from_hf(path_or_dict, **overrides) -> ModelConfig:
    """:class:`ModelConfig` of an HF causal LM: a model directory, a config.json path, a config
    dict or a ``PretrainedConfig``. ``overrides`` (e.g. ``dtype``, ``activation_checkpointing``)
    are applied last. ``dtype`` defaults to the checkpoint's (bfloat16 stays bfloat16, anything
    else float32).

    Raises ONE ValueError for an unsupported architecture (listing the supported ones) or an
    unsupported feature of a supported one (unknown rope_type, non-SiLU MLP, o_proj/MLP biases,
    mixed full/sliding layers, partial rotary, attention dropout)."""
    d, src = _load_config_dict(path_or_dict)
    archs = d.get("architectures") or []
    arch = archs[0] if archs else _ARCH_OF_TYPE.get(d.get("model_type", ""))
    if arch not in SUPPORTED_ARCHITECTURES:
        what = f"architecture {arch!r}" if arch else f"model_type {d.get('model_type')!r}"
        raise UserError(f"{src}: unsupported {what}; supported architectures: "
                         f"{', '.join(SUPPORTED_ARCHITECTURES)}")
    problems = []
    act = d.get("hidden_act", "silu")
    if act != "silu":
        problems.append(f"hidden_act={act!r} (only 'silu', SwiGLU)")
    if d.get("mlp_bias"):
        problems.append("mlp_bias=True")
    bias = arch == "Qwen2ForCausalLM"
    if arch != "Qwen2ForCausalLM" and d.get("attention_bias"):
        problems.append(f"attention_bias=True for {arch} (its o_proj has a bias too; only Qwen2-style "
                        "q/k/v biases are supported)")
    if float(d.get("attention_dropout") or 0.0) != 0.0:
        problems.append(f"attention_dropout={d['attention_dropout']}")
    if float(d.get("partial_rotary_factor") or 1.0) != 1.0:
        problems.append(f"partial_rotary_factor={d['partial_rotary_factor']}")
    # sliding window
    window = None
    if arch == "MistralForCausalLM":
        window = d.get("sliding_window") or None
        if d.get("layer_types") and len(set(d["layer_types"])) > 1:
            problems.append("layer_types mixing full and sliding attention")
    elif arch in ("Qwen2ForCausalLM", "Qwen3ForCausalLM"):
        types = d.get("layer_types")
        if types is None:
            sliding = bool(d.get("use_sliding_window")) and d.get("sliding_window") is not None
            n, mwl = int(d.get("num_hidden_layers", 0)), int(d.get("max_window_layers", 0) or 0)
            types = ["sliding_attention" if sliding and i >= mwl else "full_attention" for i in range(n)]
        kinds = set(types)
        if len(kinds) > 1:
            problems.append(f"layer_types mixing full and sliding attention ({sorted(kinds)}, e.g. "
                            "max_window_layers < num_hidden_layers with use_sliding_window)")
        elif kinds == {"sliding_attention"}:
            window = d.get("sliding_window") or None
    elif d.get("sliding_window"):
        problems.append(f"sliding_window for {arch}")
    # RoPE: v5 rope_parameters or v4 rope_theta + rope_scaling
    rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
    if rope and all(isinstance(v, Mapping) for v in rope.values()):
        problems.append("per-layer-type rope_parameters")
        rope = {}
    theta = float(rope.get("rope_theta", d.get("rope_theta", 10000.0)) or 10000.0)
    max_pos = int(d.get("max_position_embeddings") or 4096)
    scaling = None
    try:
        scaling = normalize_rope_scaling(rope, theta) if rope else None
    except ValueError as exc:
        problems.append(str(exc).replace("ModelConfig.rope_scaling", "rope_parameters"))
    if scaling is not None and scaling["rope_type"] in ("yarn", "llama3"):
        # as HF's standardize_rope_params: a top-level original_max_position_embeddings wins,
        # else the rope dict's, else max_position_embeddings
        if d.get("original_max_position_embeddings"):
            scaling["original_max_position_embeddings"] = int(d["original_max_position_embeddings"])
        scaling.setdefault("original_max_position_embeddings", max_pos)
    if problems:
        raise UserError(f"{src}: {arch} with unsupported features: " + "; ".join(problems))
    hidden, heads = int(d["hidden_size"]), int(d["num_attention_heads"])
    head_dim = int(d.get("head_dim") or 0)
    if head_dim and hidden % heads == 0 and head_dim == hidden // heads:
        head_dim = 0
    kw = dict(
        vocab_size=int(d["vocab_size"]), hidden=hidden, layers=int(d["num_hidden_layers"]), heads=heads,
        kv_heads=int(d.get("num_key_value_heads") or heads), intermediate=int(d["intermediate_size"]),
        rope_theta=theta, norm_eps=float(d.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(d.get("tie_word_embeddings", False)), dtype=_hf_dtype(d), head_dim=head_dim,
        attention_bias=bias, qk_norm=arch == "Qwen3ForCausalLM", rope_scaling=scaling,
        sliding_window=int(window) if window else None, max_position_embeddings=max_pos,
    )
    kw.update(overrides)
    return ModelConfig(**kw)


def default_architecture(cfg: ModelConfig) -> str:
    """The HF architecture a model trained from scratch exports as: Qwen3 with q/k norms, Qwen2
    with q/k/v biases, Mistral with a sliding window, else LLaMA."""
    if cfg.qk_norm:
        return "Qwen3ForCausalLM"
    if cfg.attention_bias:
        return "Qwen2ForCausalLM"
    if cfg.window:
        return "MistralForCausalLM"
    return "LlamaForCausalLM"


def hf_config_from_model(cfg: ModelConfig, architecture: str | None = None, *,
                         dtype: torch.dtype | str | None = None, **extra) -> dict:
    """config.json contents for ``cfg`` as ``architecture`` (default :func:`default_architecture`).

    RoPE is written both ways (``rope_parameters`` for transformers >= 5, ``rope_theta`` +
    ``rope_scaling`` for 4.x). ``extra`` keys (e.g. bos/eos token ids) are added. ValueError if
    the architecture cannot express the config (e.g. q/k norms as LLaMA)."""
    arch = architecture or default_architecture(cfg)
    if arch not in SUPPORTED_ARCHITECTURES:
        raise UserError(f"unsupported architecture {arch!r}; supported architectures: "
                         f"{', '.join(SUPPORTED_ARCHITECTURES)}")
    bad = []
    if cfg.qk_norm != (arch == "Qwen3ForCausalLM"):
        bad.append(f"qk_norm={cfg.qk_norm}")
    if cfg.attention_bias != (arch == "Qwen2ForCausalLM"):
        bad.append(f"attention_bias={cfg.attention_bias}")
    if cfg.window and arch == "LlamaForCausalLM":
        bad.append(f"sliding_window={cfg.window}")
    if bad:
        raise UserError(f"{arch} cannot express a model with {', '.join(bad)}; use architecture="
                         f"{default_architecture(cfg)!r} (the default for this config)")
    if dtype is None:
        dtype = cfg.dtype
    dt = str(dtype).replace("torch.", "")
    rope = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling is not None:
        rope = {**cfg.rope_scaling, "rope_theta": cfg.rope_theta}
    d = {
        "architectures": [arch], "model_type": _MODEL_TYPE[arch],
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden, "intermediate_size": cfg.intermediate,
        "num_hidden_layers": cfg.layers, "num_attention_heads": cfg.heads,
        "num_key_value_heads": cfg.kv_heads, "head_dim": cfg.head_size, "hidden_act": "silu",
        "max_position_embeddings": cfg.max_position_embeddings, "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta, "rope_scaling": None if cfg.rope_scaling is None else dict(rope),
        "rope_parameters": rope, "tie_word_embeddings": cfg.tie_embeddings,
        "attention_dropout": 0.0, "initializer_range": cfg.init_std, "use_cache": True,
        "torch_dtype": dt, "dtype": dt,
    }
    if arch == "LlamaForCausalLM":
        d.update(attention_bias=False, mlp_bias=False, pretraining_tp=1)
    elif arch == "MistralForCausalLM":
        d.update(sliding_window=cfg.window)
    else:
        w = cfg.window
        d.update(use_sliding_window=bool(w), sliding_window=w, max_window_layers=0 if w else cfg.layers,
                 layer_types=["sliding_attention" if w else "full_attention"] * cfg.layers)
        if arch == "Qwen3ForCausalLM":
            d.update(attention_bias=False)
    d.update(extra)
    return d


# ---------------------------------------------------------------------------------- reading
class HFCheckpointReader:
    """Lazy reader of an HF safetensors checkpoint, addressed by OUR parameter names.

    ``path``: a directory with ``model.safetensors``, or sharded ``*.safetensors`` with
    ``model.safetensors.index.json`` (bf16, fp16 or fp32 on disk; values are cast on copy). Files
    are opened with ``safetensors.safe_open`` and read per slice (``get_slice``): a rank reads
    only the rows it holds, never the full tensor.

    * :meth:`read_rows` ``(name, start, stop)`` -- rows ``[start, stop)`` of dim 0;
    * :meth:`read_elements` ``(name, start, stop)`` -- flattened elements ``[start, stop)``
      (a DeepSpeed ZeRO-3 flat partition), reading only the rows that cover them;
    * :meth:`load_into_` ``(module)`` -- fill every parameter of ``module``: full tensors, or
      FSDP2 DTensors (only the local rows of their dim-0 shard are read).
    """

    def __init__(self, path: str | os.PathLike, names: str = "flexsp"):
        """``names``: "flexsp" addresses tensors by our parameter names (the native Transformer),
        "hf" by the checkpoint's own keys (HF-native models, whose names are transformers')."""
        if names not in ("flexsp", "hf"):
            raise UserError(f"HFCheckpointReader names={names!r}; valid options: ['flexsp', 'hf']")
        self.hf_names = names == "hf"
        self.path = Path(path)
        if not self.path.is_dir():
            raise FileNotFoundError(f"{self.path} is not a directory (an HF checkpoint directory is needed)")
        index = self.path / "model.safetensors.index.json"
        single = self.path / "model.safetensors"
        key_file: dict[str, Path] = {}
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, UnicodeDecodeError) as exc:
                raise UserError(f"{index} is not a safetensors index ({type(exc).__name__}: {exc})") from None
            for key, fname in weight_map.items():
                key_file[key] = self.path / fname
            for f in sorted(set(key_file.values())):
                if not f.is_file():
                    raise FileNotFoundError(f"{f} (listed in {index.name}) is missing")
        elif single.is_file():
            key_file = {k: single for k in self._keys_of(single)}
        else:
            files = sorted(self.path.glob("*.safetensors"))
            if not files:
                raise FileNotFoundError(
                    f"{self.path} has no model.safetensors, model.safetensors.index.json or *.safetensors "
                    "(PyTorch .bin checkpoints are not supported: re-save with safe_serialization=True)")
            for f in files:
                for k in self._keys_of(f):
                    key_file[k] = f
        self._key_file = key_file
        self._handles: dict[Path, object] = {}
        self.names: dict[str, str] = {}            # our name -> HF key
        self.unknown: list[str] = []               # HF keys that are not ours
        for key in key_file:
            ours = key if self.hf_names else our_name(key)
            if ours is not None:
                self.names[ours] = key
            elif not _IGNORED_HF.fullmatch(key):
                self.unknown.append(key)
        if self.hf_names:
            self.names = {k: k for k in self.names if not _IGNORED_HF.fullmatch(k)}

    @staticmethod
    def _open(f: Path):
        from safetensors import safe_open
        try:
            return safe_open(str(f), framework="pt", device="cpu")
        except FileNotFoundError:
            raise FileNotFoundError(f"{f} is missing") from None
        except Exception as exc:  # SafetensorError: truncated / corrupt header
            raise UserError(f"{f} is not a readable safetensors file ({type(exc).__name__}: {exc})") from None

    def _keys_of(self, f: Path) -> list[str]:
        return list(self._open(f).keys())

    def _handle(self, f: Path):
        if f not in self._handles:
            self._handles[f] = self._open(f)
        return self._handles[f]

    def _slice(self, name: str):
        if name not in self.names:
            raise KeyError(f"{self.path}: no tensor for parameter {name!r} (HF key {self._key(name)!r})")
        f = self._key_file[self.names[name]]
        return self._handle(f).get_slice(self.names[name]), f

    def _key(self, name: str) -> str:
        return name if self.hf_names else hf_name(name)

    def keys(self) -> list[str]:
        """Our parameter names present in the checkpoint."""
        return sorted(self.names)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._slice(name)[0].get_shape())

    def read_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows ``[start, stop)`` (dim 0) of parameter ``name`` as stored (dtype of the file)."""
        sl, f = self._slice(name)
        shape = sl.get_shape()
        if not 0 <= start <= stop <= shape[0]:
            raise UserError(f"rows [{start}, {stop}) outside {name} of shape {tuple(shape)}")
        try:
            return sl[start:stop]
        except Exception as exc:  # truncated data section
            raise UserError(f"{f}: cannot read {self.names[name]} ({type(exc).__name__}: {exc})") from None

    def read_elements(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Flattened (row-major) elements ``[start, stop)`` of parameter ``name``; reads only the
        rows that contain them."""
        shape = self.shape(name)
        numel = math.prod(shape)
        if not 0 <= start <= stop <= numel:
            raise UserError(f"elements [{start}, {stop}) outside {name} of {numel} elements")
        row = math.prod(shape[1:]) if len(shape) > 1 else 1
        if stop == start:
            return self.read_rows(name, 0, 0).reshape(-1)
        r0, r1 = start // row, -(-stop // row)
        block = self.read_rows(name, r0, r1).reshape(-1)
        return block[start - r0 * row: stop - r0 * row]

    def check(self, module: torch.nn.Module) -> None:
        """ValueError naming every missing key, unexpected key and shape mismatch of the
        checkpoint against ``module``'s parameters (global shapes: also for meta tensors, FSDP2
        DTensors and DeepSpeed ZeRO-3 partitioned parameters, whose ``ds_shape`` is used). Call it
        before filling shards with :meth:`read_elements` / :meth:`read_rows`."""
        params = {n: tuple(getattr(p, "ds_shape", None) or p.shape) for n, p in module.named_parameters()}
        tied = "lm_head.weight" not in params and "embed.weight" in params
        missing = [n for n in params if n not in self.names]
        unexpected = [self.names[n] for n in self.names if n not in params
                      and not (tied and n == "lm_head.weight")] + self.unknown
        shapes = [f"{n}: checkpoint {self.shape(n)} vs model {shape}"
                  for n, shape in params.items() if n in self.names and self.shape(n) != shape]
        msgs = []
        if missing:
            msgs.append(f"missing keys (HF names): {[self._key(n) for n in missing]}")
        if unexpected:
            msgs.append(f"unexpected keys: {sorted(unexpected)}")
        if shapes:
            msgs.append(f"shape mismatches: {shapes}")
        if msgs:
            raise UserError(f"{self.path} does not match the model: " + "; ".join(msgs))

    @torch.no_grad()
    def load_into_(self, module: torch.nn.Module) -> torch.nn.Module:
        """Copy the checkpoint into every parameter of ``module`` (our names), cast to each
        parameter's dtype. Full tensors are read whole; FSDP2/HSDP DTensors (``fully_shard``
        after ``to_empty``) read only the rows of their local dim-0 shard. Checks everything first
        (:meth:`check`), so a mismatch writes nothing. Meta parameters are an error (materialise
        them first, e.g. ``module.to_empty(device=...)``)."""
        self.check(module)
        for name, p in module.named_parameters():
            if p.device.type == "meta":
                raise UserError(f"parameter {name} is on the meta device; call module.to_empty(device=...) "
                                 "before load_into_")
            if hasattr(p, "to_local"):
                from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
                shape, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
                local = p.to_local()
                if any(o != 0 for o in offset[1:]) or tuple(local.shape[1:]) != tuple(p.shape[1:]):
                    raise UserError(f"{name}: only dim-0 sharding is supported (placements {p.placements})")
                if local.numel() == 0:
                    continue
                vals = self.read_rows(name, offset[0], offset[0] + local.shape[0])
                local.copy_(vals.to(dtype=local.dtype).to(local.device))
            else:
                p.copy_(self.read_rows(name, 0, p.shape[0]).to(dtype=p.dtype).to(p.device))
        return module


def native_gap(path_or_dict) -> str | None:
    """Why the native Transformer cannot compute the HF model at ``path_or_dict`` (the one-line
    reason of :func:`config_from_hf`), or None when it can."""
    try:
        config_from_hf(path_or_dict)
    except ValueError as exc:
        return str(exc)
    return None


def from_hf(path: str | os.PathLike, device: torch.device | str = "cpu",
            dtype: torch.dtype | str | None = None, hf_native: bool | None = None, **overrides):
    """The model of the HF checkpoint at ``path`` with its weights, called the same way whatever
    the architecture: ``model(input_ids, positions, AttnContext.local(cu_seqlens))`` -> logits,
    ``labels=``/``pad_mask=`` -> ``(loss_sum, num_targets)``.

    ``hf_native``: None (automatic) gives the native :class:`flexsp.model.Transformer` when it
    covers the architecture (:func:`native_gap`), else the HF-native model
    (:class:`flexsp.model.hf_native.HFNativeModel`: transformers' modules with FlexSP's attention
    and loss); True forces HF-native; False forces native (ValueError when it does not cover it).
    ``dtype`` (torch dtype or "float32"/"bfloat16"): parameter dtype; None = the checkpoint's
    (bfloat16 stays bfloat16, anything else float32). ``overrides``: ModelConfig fields (native) or
    HFNativeConfig fields (``activation_checkpointing``)."""
    from flexsp.model.transformer import Transformer
    if hf_native or (hf_native is None and native_gap(checkpoint_dir(path, "path")) is not None):
        from flexsp.model.hf_native import load_hf_native
        return load_hf_native(path, device=device, dtype=dtype, **overrides)
    if dtype is not None:
        overrides["dtype"] = str(dtype).replace("torch.", "")
    cfg = config_from_hf(path, **overrides)
    reader = HFCheckpointReader(path)
    model = Transformer(cfg, device="meta")
    model.to_empty(device=device)
    reader.load_into_(model)
    return model


# ---------------------------------------------------------------------------------- writing
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                    "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json")


def _save_tokenizer(src, out: Path) -> dict:
    """Copy/save the tokenizer at ``src`` into ``out``; returns bos/eos ids found (for configs)."""
    src = Path(src)
    if src.is_dir():
        found = [f for f in _TOKENIZER_FILES if (src / f).is_file()]
        if not found:
            raise FileNotFoundError(f"{src} holds no tokenizer files ({', '.join(_TOKENIZER_FILES)})")
        for f in found:
            shutil.copy2(src / f, out / f)
    elif src.is_file() and src.suffix == ".json":
        from transformers import PreTrainedTokenizerFast
        tok = PreTrainedTokenizerFast(tokenizer_file=str(src))
        from flexsp.data.tokenizer import EOS_CANDIDATES
        vocab = tok.get_vocab()
        eos = next((t for t in EOS_CANDIDATES if t in vocab), None)
        if eos is not None:
            tok.eos_token = eos
        tok.save_pretrained(str(out))
    else:
        raise FileNotFoundError(f"tokenizer {src} is neither an HF directory nor a tokenizer.json")
    ids = {}
    try:
        from transformers import AutoTokenizer
        tok = AutoTokenizer.from_pretrained(str(out))
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            v = getattr(tok, key, None)
            if isinstance(v, int):
                ids[key] = v
    except Exception:  # a tokenizer transformers cannot load: files copied, no ids
        pass
    return ids


def _shard(tensors: dict[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    shards, cur, size = [], {}, 0
    for k, t in tensors.items():
        n = t.numel() * t.element_size()
        if cur and size + n > max_bytes:
            shards.append(cur)
            cur, size = {}, 0
        cur[k] = t
        size += n
    if cur or not shards:
        shards.append(cur)
    return shards


def to_hf(model_or_state_dict, path: str | os.PathLike, *, config: ModelConfig | None = None,
          architecture: str | None = None, dtype: torch.dtype | str = torch.bfloat16,
          max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, tokenizer_from=None) -> Path:
    """Write an HF model directory loadable by ``AutoModelForCausalLM.from_pretrained``.

    ``model_or_state_dict``: a Transformer (its config is used) or a state dict with our names
    (then ``config`` is required). Writes ``config.json`` (:func:`hf_config_from_model`,
    ``architecture`` default: LLaMA, or Qwen3/Qwen2/Mistral when the config needs it),
    ``model.safetensors`` or ``model-0000i-of-0000n.safetensors`` + ``model.safetensors.index.json``
    (shards of at most ``max_shard_bytes``), the tokenizer of ``tokenizer_from`` (an HF directory's
    tokenizer files are copied; a tokenizer.json is saved through ``PreTrainedTokenizerFast``) and
    then ``generation_config.json`` with its bos/eos ids. Tied embeddings write no lm_head."""
    from safetensors.torch import save_file
    if isinstance(model_or_state_dict, torch.nn.Module):
        config = config or model_or_state_dict.config
        sd = model_or_state_dict.state_dict()
    else:
        sd = dict(model_or_state_dict)
        if config is None:
            raise UserError("to_hf(state_dict, ...) needs config=ModelConfig(...)")
    if isinstance(config, Mapping):
        config = ModelConfig(**config)
    dt = getattr(torch, str(dtype).replace("torch.", "")) if not isinstance(dtype, torch.dtype) else dtype
    if dt not in (torch.bfloat16, torch.float32, torch.float16):
        raise UserError(f"to_hf dtype={dtype!r}; valid options: bfloat16, float32, float16")
    hf_cfg_check = hf_config_from_model(config, architecture, dtype=dt)   # validates early
    from flexsp.model.transformer import Transformer
    expected = {n: tuple(p.shape) for n, p in Transformer(config, device="meta").named_parameters()}
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(k for k in set(sd) - set(expected) if not (config.tie_embeddings and k == "lm_head.weight"))
    wrong = [f"{k}: {tuple(sd[k].shape)} vs {expected[k]}" for k in expected if k in sd and tuple(sd[k].shape) != expected[k]]
    if missing or unexpected or wrong:
        raise UserError(f"state dict does not match the config: missing {missing}, unexpected {unexpected}, "
                         f"shape mismatches {wrong}")
    tensors = {}
    for name in expected:
        t = sd[name]
        if hasattr(t, "full_tensor"):
            t = t.full_tensor()
        tensors[hf_name(name)] = t.detach().to(device="cpu", dtype=dt).contiguous().clone()
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    for old in list(out.glob("model*.safetensors")) + [out / "model.safetensors.index.json"]:
        if old.exists():
            old.unlink()
    shards = _shard(tensors, int(max_shard_bytes))
    if len(shards) == 1:
        save_file(shards[0], str(out / "model.safetensors"), metadata={"format": "pt"})
    else:
        weight_map, total = {}, 0
        for i, shard in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(out / fname), metadata={"format": "pt"})
            for k, t in shard.items():
                weight_map[k] = fname
                total += t.numel() * t.element_size()
        (out / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2, sort_keys=True))
    ids = _save_tokenizer(tokenizer_from, out) if tokenizer_from else {}
    hf_cfg = {**hf_cfg_check, **ids}
    (out / "config.json").write_text(json.dumps(hf_cfg, indent=2))
    if "bos_token_id" in ids or "eos_token_id" in ids:
        gen = {k: v for k, v in ids.items() if k in ("bos_token_id", "eos_token_id", "pad_token_id")}
        (out / "generation_config.json").write_text(json.dumps({"_from_model_config": True, **gen}, indent=2))
    return out
