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
import os
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import save_file

from flexsp.errors import UserError
from flexsp.model.config import ModelConfig, normalize_rope_scaling
from flexsp.model.hf_files import (  # noqa: F401 (re-exported)
    _ARCH_OF_TYPE,
    _BLOCK_INV,
    _BLOCK_MAP,
    _GLOBAL_INV,
    _GLOBAL_MAP,
    _IGNORED_HF,
    _MODEL_TYPE,
    _TOKENIZER_FILES,
    DEFAULT_MAX_SHARD_BYTES,
    SUPPORTED_ARCHITECTURES,
    HFCheckpointReader,
    _hf_dtype,
    _load_config_dict,
    _save_tokenizer,
    checkpoint_dir,
    hf_name,
    our_name,
)
from flexsp.model.hf_native_weights import load_hf_native
from flexsp.model.transformer import Transformer


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
        raise UserError(
            f"{src}: unsupported {what}; supported architectures: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    problems = []
    act = d.get("hidden_act", "silu")
    if act != "silu":
        problems.append(f"hidden_act={act!r} (only 'silu', SwiGLU)")
    if d.get("mlp_bias"):
        problems.append("mlp_bias=True")
    bias = arch == "Qwen2ForCausalLM"
    if arch != "Qwen2ForCausalLM" and d.get("attention_bias"):
        problems.append(
            f"attention_bias=True for {arch} (its o_proj has a bias too; only Qwen2-style "
            "q/k/v biases are supported)"
        )
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
            problems.append(
                f"layer_types mixing full and sliding attention ({sorted(kinds)}, e.g. "
                "max_window_layers < num_hidden_layers with use_sliding_window)"
            )
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
        vocab_size=int(d["vocab_size"]),
        hidden=hidden,
        layers=int(d["num_hidden_layers"]),
        heads=heads,
        kv_heads=int(d.get("num_key_value_heads") or heads),
        intermediate=int(d["intermediate_size"]),
        rope_theta=theta,
        norm_eps=float(d.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(d.get("tie_word_embeddings", False)),
        dtype=_hf_dtype(d),
        head_dim=head_dim,
        attention_bias=bias,
        qk_norm=arch == "Qwen3ForCausalLM",
        rope_scaling=scaling,
        sliding_window=int(window) if window else None,
        max_position_embeddings=max_pos,
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


def hf_config_from_model(
    cfg: ModelConfig, architecture: str | None = None, *, dtype: torch.dtype | str | None = None, **extra
) -> dict:
    """config.json contents for ``cfg`` as ``architecture`` (default :func:`default_architecture`).

    RoPE is written both ways (``rope_parameters`` for transformers >= 5, ``rope_theta`` +
    ``rope_scaling`` for 4.x). ``extra`` keys (e.g. bos/eos token ids) are added. ValueError if
    the architecture cannot express the config (e.g. q/k norms as LLaMA)."""
    arch = architecture or default_architecture(cfg)
    if arch not in SUPPORTED_ARCHITECTURES:
        raise UserError(
            f"unsupported architecture {arch!r}; supported architectures: "
            f"{', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    bad = []
    if cfg.qk_norm != (arch == "Qwen3ForCausalLM"):
        bad.append(f"qk_norm={cfg.qk_norm}")
    if cfg.attention_bias != (arch == "Qwen2ForCausalLM"):
        bad.append(f"attention_bias={cfg.attention_bias}")
    if cfg.window and arch == "LlamaForCausalLM":
        bad.append(f"sliding_window={cfg.window}")
    if bad:
        raise UserError(
            f"{arch} cannot express a model with {', '.join(bad)}; use architecture="
            f"{default_architecture(cfg)!r} (the default for this config)"
        )
    if dtype is None:
        dtype = cfg.dtype
    dt = str(dtype).replace("torch.", "")
    rope = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling is not None:
        rope = {**cfg.rope_scaling, "rope_theta": cfg.rope_theta}
    d = {
        "architectures": [arch],
        "model_type": _MODEL_TYPE[arch],
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden,
        "intermediate_size": cfg.intermediate,
        "num_hidden_layers": cfg.layers,
        "num_attention_heads": cfg.heads,
        "num_key_value_heads": cfg.kv_heads,
        "head_dim": cfg.head_size,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_position_embeddings,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": None if cfg.rope_scaling is None else dict(rope),
        "rope_parameters": rope,
        "tie_word_embeddings": cfg.tie_embeddings,
        "attention_dropout": 0.0,
        "initializer_range": cfg.init_std,
        "use_cache": True,
        "torch_dtype": dt,
        "dtype": dt,
    }
    if arch == "LlamaForCausalLM":
        d.update(attention_bias=False, mlp_bias=False, pretraining_tp=1)
    elif arch == "MistralForCausalLM":
        d.update(sliding_window=cfg.window)
    else:
        w = cfg.window
        d.update(
            use_sliding_window=bool(w),
            sliding_window=w,
            max_window_layers=0 if w else cfg.layers,
            layer_types=["sliding_attention" if w else "full_attention"] * cfg.layers,
        )
        if arch == "Qwen3ForCausalLM":
            d.update(attention_bias=False)
    d.update(extra)
    return d


# ---------------------------------------------------------------------------------- reading
def native_gap(path_or_dict) -> str | None:
    """Why the native Transformer cannot compute the HF model at ``path_or_dict`` (the one-line
    reason of :func:`config_from_hf`), or None when it can."""
    try:
        config_from_hf(path_or_dict)
    except ValueError as exc:
        return str(exc)
    return None


def from_hf(
    path: str | os.PathLike,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | str | None = None,
    hf_native: bool | None = None,
    **overrides,
):
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
    if hf_native or (hf_native is None and native_gap(checkpoint_dir(path, "path")) is not None):
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


def to_hf(
    model_or_state_dict,
    path: str | os.PathLike,
    *,
    config: ModelConfig | None = None,
    architecture: str | None = None,
    dtype: torch.dtype | str = torch.bfloat16,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    tokenizer_from=None,
) -> Path:
    """Write an HF model directory loadable by ``AutoModelForCausalLM.from_pretrained``.

    ``model_or_state_dict``: a Transformer (its config is used) or a state dict with our names
    (then ``config`` is required). Writes ``config.json`` (:func:`hf_config_from_model`,
    ``architecture`` default: LLaMA, or Qwen3/Qwen2/Mistral when the config needs it),
    ``model.safetensors`` or ``model-0000i-of-0000n.safetensors`` + ``model.safetensors.index.json``
    (shards of at most ``max_shard_bytes``), the tokenizer of ``tokenizer_from`` (an HF directory's
    tokenizer files are copied; a tokenizer.json is saved through ``PreTrainedTokenizerFast``) and
    then ``generation_config.json`` with its bos/eos ids. Tied embeddings write no lm_head."""
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
    hf_cfg_check = hf_config_from_model(config, architecture, dtype=dt)  # validates early
    expected = {n: tuple(p.shape) for n, p in Transformer(config, device="meta").named_parameters()}
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(
        k for k in set(sd) - set(expected) if not (config.tie_embeddings and k == "lm_head.weight")
    )
    wrong = [
        f"{k}: {tuple(sd[k].shape)} vs {expected[k]}"
        for k in expected
        if k in sd and tuple(sd[k].shape) != expected[k]
    ]
    if missing or unexpected or wrong:
        raise UserError(
            f"state dict does not match the config: missing {missing}, unexpected {unexpected}, "
            f"shape mismatches {wrong}"
        )
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
        (out / "model.safetensors.index.json").write_text(
            json.dumps(
                {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2, sort_keys=True
            )
        )
    ids = _save_tokenizer(tokenizer_from, out) if tokenizer_from else {}
    hf_cfg = {**hf_cfg_check, **ids}
    (out / "config.json").write_text(json.dumps(hf_cfg, indent=2))
    if "bos_token_id" in ids or "eos_token_id" in ids:
        gen = {k: v for k, v in ids.items() if k in ("bos_token_id", "eos_token_id", "pad_token_id")}
        (out / "generation_config.json").write_text(json.dumps({"_from_model_config": True, **gen}, indent=2))
    return out
