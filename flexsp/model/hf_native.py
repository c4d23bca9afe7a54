"""HF-native models: a Hugging Face causal LM trained through transformers' own modules.

The native path (flexsp.model.transformer) re-implements four decoder families; everything else
trains here. :class:`HFNativeModel` holds the base model of ``AutoModelForCausalLM.from_config``
(built on ``meta``) and a head of its own, and is called exactly like the native model::

    model(input_ids, positions, attn)                          # logits [T, vocab]
    model(input_ids, positions, attn, labels=..., pad_mask=...)  # (loss_sum, num_targets)

so the planner, executor, checkpoints, tracking and ``flexsp-export`` see no difference.

How a packed micro-batch runs through transformers' modules:

- the local tokens go in as ONE row (``input_ids[None]``) with ``position_ids`` = each token's
  position inside its document, so RoPE (computed by the model's own rotary module from
  ``position_ids``) restarts per document;
- attention is FlexSP's: the function :func:`flexsp_attention` is registered with
  ``transformers.AttentionInterface`` under :data:`ATTENTION` and selected through
  ``attn_implementation``. The injected attention (``flexsp.attention.AttnContext``: varlen, or
  Ulysses/ring/hybrid over the SP group) travels with the forward's kwargs (transformers forwards
  them to every attention call), never through a global. transformers builds no mask for an
  implementation it has no mask function for, so no ``[T, T]`` mask exists;
- the loss is the chunked linear cross-entropy of flexsp.model.loss over the base model's final
  hidden states and the ``lm_head`` weight: ``[T, vocab]`` logits never exist in training.

What is honoured and what is refused (at start-up, one line naming the field or module):

- per-call attention arguments: ``scaling`` (e.g. Gemma's ``query_pre_attn_scalar``, Granite's
  ``attention_multiplier``) and ``sliding_window`` (per layer, e.g. Gemma 3's local layers) are
  passed to the attention; soft-capped attention, attention sinks, position biases, attention
  dropout and non-causal attention are refused;
- the head: transformers' ``XForCausalLM.forward`` is read (its source) for every config field
  and attribute it uses after the decoder; Granite's ``logits_scaling`` and Cohere's
  ``logit_scale`` are honoured (they scale the logits), ``final_logit_softcapping`` is refused
  when set, ``output_router_logits=True`` (a load-balancing loss) is refused, and any other field
  is refused because its effect is unknown;
- layers that mix tokens outside attention (Mamba/SSM, convolutions, linear attention, token
  shift, recurrences: ``layer_types`` entries other than full/sliding attention, or modules of
  such kinds) are refused: a token shard cannot compute them;
- RoPE whose frequencies depend on the batch (``dynamic``, ``longrope``: transformers picks them
  from the largest position in the row, which a token shard does not see) is refused;
- once, at the first forward, the number of attention calls is checked against the decoder
  layers, so an attention that bypasses the interface cannot go unnoticed.

Weights: parameter names are exactly transformers' (``model.layers.0.self_attn.q_proj.weight``),
so FSDP2 shards and DeepSpeed partitions are filled straight from the safetensors slices
(flexsp.model.hf_native_weights, which also applies transformers' own checkpoint conversions,
e.g. per-expert MoE weights stacked into v5's fused expert tensors). Buffers (RoPE inverse
frequencies, embedding scales) are computed after materialisation the way transformers'
``from_pretrained`` does: its ``_init_weights`` with every parameter marked initialised.
"""

from __future__ import annotations

import copy
import functools
import inspect
import re
from dataclasses import dataclass

import torch
from torch import nn

from flexsp.errors import UserError
from flexsp.model.config import ModelConfig
from flexsp.model.hf_files import _load_config_dict
from flexsp.model.loss import lm_loss

ATTENTION = "flexsp"
"""The name FlexSP's attention is registered under in ``transformers.AttentionInterface``."""
ATTN_KWARG = "flexsp_attention"
"""The forward kwarg that carries the injected attention to every attention call."""
ATTENTION_LAYER_TYPES = ("full_attention", "sliding_attention")
"""``layer_types`` entries that are token-local outside attention."""
BATCH_DEPENDENT_ROPE = ("dynamic", "longrope")

# fields/attributes XForCausalLM.forward reads after the decoder that do not change the logits
_HEAD_INERT = {
    "vocab_size",
    "return_dict",
    "use_return_dict",
    "output_attentions",
    "output_hidden_states",
    "use_cache",
    "lm_head",
    "loss_function",
    "training",
    "config",
}
_ROUTER = {"output_router_logits", "num_experts", "num_experts_per_tok", "router_aux_loss_coef"}
_HEAD_SCALES = {"logits_scaling": "divides", "logit_scale": "multiplies"}
_HEAD_REFUSED_WHEN_SET = {"final_logit_softcapping": "soft-capped logits"}
_TOKEN_MIXING_TYPES = (
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.RNNBase,
    nn.ZeroPad1d,
    nn.ZeroPad2d,
    nn.ConstantPad1d,
    nn.ConstantPad2d,
)
_TOKEN_MIXING_NAMES = re.compile(
    r"Mixer$|SSM|Ssm|RWKV|Rwkv|DeltaNet|LinearAttention|LinearAttn|ShortConv|"
    r"Recurrent|Retention|TimeMix|TokenShift|Lightning|Hyena|Conv"
)
_FINAL_NORM_NAMES = ("norm", "final_layernorm", "ln_f", "final_norm", "norm_f")


@dataclass
class HFNativeConfig:
    """What an HF-native model is: the checkpoint's ``config.json`` plus FlexSP's two knobs.
    Plain data (checkpoints store ``dataclasses.asdict`` of it). Shape attributes for the planner
    and logs (``layers``, ``hidden``, ``heads``, ...) are read from ``hf_config``."""

    hf_config: dict
    """The architecture's own config (config.json contents, transformers' field names)."""
    dtype: str = "float32"
    """Parameter dtype: float32 or bfloat16."""
    activation_checkpointing: bool = False
    """Recompute each decoder layer in backward (applied from outside by flexsp.parallelize)."""
    hf_native: bool = True
    """Marks the model config of a checkpoint as HF-native (read by flexsp-export and resume)."""

    def __post_init__(self) -> None:
        if self.dtype not in ("float32", "bfloat16"):
            raise UserError(f"model.dtype={self.dtype!r}; valid options: ['bfloat16', 'float32']")
        if not isinstance(self.activation_checkpointing, bool):
            raise UserError(
                f"model.activation_checkpointing must be a bool, got {self.activation_checkpointing!r}"
            )

    def transformers_config(self):
        """A fresh transformers ``PretrainedConfig`` of :attr:`hf_config`."""
        from transformers import AutoConfig

        d = copy.deepcopy(self.hf_config)
        if "model_type" not in d:
            raise UserError("config.json has no model_type: transformers cannot tell the architecture")
        try:
            return AutoConfig.for_model(**d)
        except (ValueError, KeyError) as exc:
            raise UserError(f"transformers cannot build model_type {d['model_type']!r}: {exc}") from None

    @functools.cached_property
    def _text(self):
        return self.transformers_config().get_text_config()

    @property
    def architecture(self) -> str:
        return (self.hf_config.get("architectures") or [self.hf_config.get("model_type", "?")])[0]

    @property
    def vocab_size(self) -> int:
        return int(self._text.vocab_size)

    @property
    def hidden(self) -> int:
        return int(self._text.hidden_size)

    @property
    def layers(self) -> int:
        return int(self._text.num_hidden_layers)

    @property
    def heads(self) -> int:
        return int(self._text.num_attention_heads)

    @property
    def kv_heads(self) -> int:
        return int(getattr(self._text, "num_key_value_heads", None) or self.heads)

    @property
    def head_size(self) -> int:
        return int(getattr(self._text, "head_dim", None) or self.hidden // self.heads)

    @property
    def intermediate(self) -> int:
        return int(getattr(self._text, "intermediate_size", None) or 4 * self.hidden)

    @property
    def tie_embeddings(self) -> bool:
        return bool(getattr(self._text, "tie_word_embeddings", False))

    @property
    def max_position_embeddings(self) -> int:
        return int(getattr(self._text, "max_position_embeddings", None) or 4096)

    @property
    def torch_dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.dtype == "bfloat16" else torch.float32

    def num_params(self, include_embeddings: bool = True) -> int:
        """Exact parameter count of the model (counted on ``meta``; tied weights once)."""
        model = build_causal_lm(self)
        n = sum(p.numel() for p in model.parameters())
        if not include_embeddings:
            n -= sum(
                p.numel()
                for p in {
                    id(p): p
                    for p in (model.get_input_embeddings().weight, model.get_output_embeddings().weight)
                }.values()
            )
        return n

    def planning_shape(self):
        """A LLaMA-equivalent :class:`flexsp.model.ModelConfig` of this shape for what models the
        native blocks (the cost-model shape check, the CUDA cost-model estimate): an approximation
        (e.g. an MoE counts as a dense MLP of ``intermediate_size``)."""
        head_dim = self.head_size if self.head_size * self.heads != self.hidden else 0
        return ModelConfig(
            vocab_size=self.vocab_size,
            hidden=self.hidden,
            layers=self.layers,
            heads=self.heads,
            kv_heads=self.kv_heads,
            intermediate=self.intermediate,
            head_dim=head_dim,
            tie_embeddings=self.tie_embeddings,
            dtype=self.dtype,
            activation_checkpointing=self.activation_checkpointing,
            max_position_embeddings=self.max_position_embeddings,
        )


# ---------------------------------------------------------------------------------- attention
def flexsp_attention(
    module,
    query,
    key,
    value,
    attention_mask,
    dropout=0.0,
    scaling=None,
    sliding_window=None,
    softcap=None,
    s_aux=None,
    sinks=None,
    is_causal=None,
    position_bias=None,
    **kwargs,
):
    """transformers attention function (``AttentionInterface``): q ``[1, H, T, D]``, k/v
    ``[1, Hkv, T, D]`` -> ``([1, T, H, D], None)`` through the injected attention of the forward."""
    attn = kwargs.get(ATTN_KWARG)
    name = type(module).__name__
    if attn is None:
        raise RuntimeError(
            f"{name} called FlexSP's attention without {ATTN_KWARG}: the model must be run "
            "through flexsp.model.hf_native.HFNativeModel"
        )
    bad = []
    if attention_mask is not None:
        bad.append("an attention mask (FlexSP attention is causal per document)")
    if dropout:
        bad.append(f"attention dropout {dropout}")
    if softcap is not None:
        bad.append(f"soft-capped scores (softcap={softcap})")
    if s_aux is not None or sinks is not None:
        bad.append("attention sinks")
    if position_bias is not None:
        bad.append("a position bias")
    if is_causal is False or getattr(module, "is_causal", True) is False:
        bad.append("non-causal attention")
    if query.shape[0] != 1 or value.shape[-1] != query.shape[-1]:
        bad.append(f"q {tuple(query.shape)} / v {tuple(value.shape)} (one packed row, same q/v head size)")
    if bad:
        raise UserError(f"{name}: FlexSP's attention does not support {', '.join(bad)}")
    q, k, v = (t[0].transpose(0, 1).contiguous() for t in (query, key, value))
    out = attn(q, k, v, window=int(sliding_window) if sliding_window else None, scale=scaling)
    return out.unsqueeze(0), None


def register_attention() -> None:
    """Register :func:`flexsp_attention` with transformers (idempotent)."""
    from transformers import AttentionInterface

    if AttentionInterface._global_mapping.get(ATTENTION) is not flexsp_attention:
        AttentionInterface.register(ATTENTION, flexsp_attention)


class _CountingAttention:
    """The injected attention, counting its calls (the first forward's check)."""

    def __init__(self, attn):
        self.attn, self.calls = attn, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.attn(*args, **kwargs)


# ---------------------------------------------------------------------------------- building
def build_causal_lm(cfg: HFNativeConfig, device=None, attn_implementation: str | None = ATTENTION):
    """``AutoModelForCausalLM.from_config`` of ``cfg`` on ``device`` (default ``meta``), with
    FlexSP's attention selected (``attn_implementation=None``: transformers' default)."""
    from transformers import AutoModelForCausalLM

    hf_cfg = cfg.transformers_config()
    kw = {"dtype": cfg.torch_dtype}
    if attn_implementation == ATTENTION:
        register_attention()
    if attn_implementation is not None:
        kw["attn_implementation"] = attn_implementation
    with torch.device("meta" if device is None else device):
        try:
            return AutoModelForCausalLM.from_config(hf_cfg, **kw)
        except ValueError as exc:
            raise UserError(
                f"{cfg.architecture}: transformers cannot build it as a causal LM "
                f"({str(exc).splitlines()[0]})"
            ) from None


def _rope_dicts(hf_cfg) -> list[tuple[str, dict]]:
    out = []
    for field in ("rope_parameters", "rope_scaling"):
        value = getattr(hf_cfg, field, None)
        if isinstance(value, dict):
            nested = [(f"{field}[{k!r}]", v) for k, v in value.items() if isinstance(v, dict)]
            out += nested or [(field, value)]
    return out


def _config_problems(hf_cfg) -> list[str]:
    bad = []
    if getattr(hf_cfg, "is_encoder_decoder", False):
        bad.append("is_encoder_decoder=True (only decoder-only causal LMs)")
    if getattr(hf_cfg, "use_bidirectional_attention", False):
        bad.append("use_bidirectional_attention=True (FlexSP attention is causal)")
    for i, kind in enumerate(getattr(hf_cfg, "layer_types", None) or []):
        if kind not in ATTENTION_LAYER_TYPES:
            bad.append(
                f"layer_types[{i}]={kind!r} mixes tokens outside attention (token-local kinds: "
                f"{list(ATTENTION_LAYER_TYPES)})"
            )
            break
    if float(getattr(hf_cfg, "attention_dropout", 0.0) or 0.0):
        bad.append(
            f"attention_dropout={hf_cfg.attention_dropout} (FlexSP's attention has no dropout; set 0.0)"
        )
    for key, value in hf_cfg.to_dict().items():
        if "softcap" in key and value is not None and key not in _HEAD_REFUSED_WHEN_SET:
            bad.append(f"{key}={value} (soft-capped attention scores are not supported)")
    for where, rope in _rope_dicts(hf_cfg):
        kind = rope.get("rope_type", rope.get("type"))
        if kind in BATCH_DEPENDENT_ROPE:
            bad.append(
                f"{where}['rope_type']={kind!r} (its frequencies depend on the longest position of "
                "the batch, which a token shard does not see)"
            )
            break
    return bad


def _head_problems(model, hf_cfg) -> tuple[list[str], float]:
    """Problems of ``XForCausalLM.forward``'s head, and the logit scale to honour."""
    cls = type(model)
    try:
        src = inspect.getsource(cls.forward)
    except (OSError, TypeError):
        return [
            f"{cls.__name__}.forward has no readable source (cannot tell what it does to the logits)"
        ], 1.0
    body = src.split('"""')[-1]
    prefix = model.base_model_prefix
    used = set(re.findall(r"config\.(\w+)", body)) | set(re.findall(r"self\.(\w+)", body))
    bad, scale = [], 1.0
    for name in sorted(used - _HEAD_INERT - {prefix}):
        value = getattr(model, name, getattr(hf_cfg, name, None))
        if name in _ROUTER:
            if name == "output_router_logits" and value:
                bad.append(
                    "output_router_logits=True (transformers then adds its router load-balancing "
                    "loss, which FlexSP does not compute; set it false)"
                )
        elif name in _HEAD_SCALES:
            factor = float(getattr(hf_cfg, name, None) or getattr(model, name, 1.0) or 1.0)
            scale = scale / factor if _HEAD_SCALES[name] == "divides" else scale * factor
        elif name in _HEAD_REFUSED_WHEN_SET:
            if value is not None:
                bad.append(f"{name}={value} ({_HEAD_REFUSED_WHEN_SET[name]} are not supported)")
        else:
            bad.append(
                f"{name} (read by {cls.__name__}.forward after the decoder; FlexSP computes the "
                "logits itself and does not know what it does)"
            )
    return bad, scale


def _module_problems(model, prefix: str) -> tuple[list[str], list[str]]:
    """(problems, decoder-layer paths) of the module tree."""
    bad = []
    named = dict(model.named_modules())
    typed = [n for n, m in named.items() if isinstance(m, _TOKEN_MIXING_TYPES)]
    by_name = [n for n, m in named.items() if n and _TOKEN_MIXING_NAMES.search(type(m).__name__)]
    if typed:  # a convolution / recurrence / shift over the sequence: name the layer that owns it
        owner = typed[0].rpartition(".")[0]
        bad.append(
            f"module {owner} ({type(named[owner]).__name__}) mixes tokens outside attention (its "
            f"{typed[0].rpartition('.')[2]} is a {type(named[typed[0]]).__name__})"
        )
    elif by_name:
        bad.append(f"module {by_name[0]} ({type(named[by_name[0]]).__name__}) mixes tokens outside attention")
    for name, child in model.named_children():
        if (
            name not in (prefix,)
            and child is not model.get_output_embeddings()
            and any(True for _ in child.parameters())
        ):
            bad.append(f"module {name} ({type(child).__name__}) is outside the decoder and the head")
    head = model.get_output_embeddings()
    if head is None or getattr(head, "weight", None) is None:
        bad.append("no lm_head weight (get_output_embeddings)")
    elif getattr(head, "bias", None) is not None:
        bad.append("lm_head.bias (the fused loss has no output bias)")
    kinds = set(getattr(model, "_no_split_modules", None) or [])
    blocks = [n for n, m in model.named_modules() if type(m).__name__ in kinds]
    if not blocks:
        bad.append(f"no decoder layer of _no_split_modules {sorted(kinds)} found")
    return bad, blocks


def inspect_architecture(model, src: str = "") -> dict:
    """Refuse (one ValueError naming every field/module) what cannot train HF-native; return the
    pieces the wrapper needs: ``prefix``, ``blocks`` (paths), ``norm`` (path), ``head_scale``."""
    hf_cfg = model.config
    prefix = model.base_model_prefix
    base = getattr(model, prefix, None)
    bad = _config_problems(hf_cfg)
    head_bad, scale = _head_problems(model, hf_cfg)
    mod_bad, blocks = (
        ([f"no base model at {type(model).__name__}.{prefix}"], [])
        if base is None
        else _module_problems(model, prefix)
    )
    bad += head_bad + mod_bad
    norm = next(
        (f"{prefix}.{n}" for n in _FINAL_NORM_NAMES if isinstance(getattr(base, n, None), nn.Module)), None
    )
    if base is not None and norm is None:  # else the last norm-like child of the base model
        norms = [n for n, m in base.named_children() if "Norm" in type(m).__name__]
        norm = f"{prefix}.{norms[-1]}" if norms else None
    if base is not None and norm is None:
        bad.append(
            f"no final norm found on {type(base).__name__} (looked for {list(_FINAL_NORM_NAMES)} or a "
            "child whose class is a norm)"
        )
    if bad:
        where = f"{src}: " if src else ""
        raise UserError(f"{where}{type(model).__name__} cannot train HF-native: " + "; ".join(bad))
    return {"prefix": prefix, "blocks": blocks, "norm": norm, "head_scale": scale}


# ---------------------------------------------------------------------------------- the model
class OutputHead(nn.Module):
    """The LM head as a module of its own (a sharding unit sees it run), sharing the causal LM's
    ``lm_head.weight`` (the embedding matrix when tied): ``forward(h)`` -> logits,
    ``forward(h, labels, pad_mask)`` -> ``(loss_sum, num_targets)`` through the fused linear
    cross-entropy. ``scale`` multiplies the logits (Granite's 1 / logits_scaling, Cohere's
    logit_scale), applied to ``h`` (the same product)."""

    def __init__(self, weight: nn.Parameter, scale: float = 1.0):
        super().__init__()
        self.weight = weight
        self.scale = float(scale)

    def forward(self, h, labels=None, pad_mask=None):
        if self.scale != 1.0:
            h = h * self.scale
        if labels is not None:
            return lm_loss(h, self.weight, labels, pad_mask)
        return h @ self.weight.t()


class HFNativeModel(nn.Module):
    """A transformers causal LM called the FlexSP way (see the module docstring). Build with
    ``HFNativeModel(cfg)`` (on ``meta``), materialise with ``to_empty(device=...)`` (which also
    computes the buffers), fill the parameters from a weight source."""

    def __init__(self, config: HFNativeConfig, device: torch.device | str | None = None):
        super().__init__()
        self.config = config
        dev = None if device is None or torch.device(device).type == "meta" else device
        hf = build_causal_lm(config, dev)
        spec = inspect_architecture(hf, config.architecture)
        self.base_model_prefix = spec["prefix"]
        self.add_module(spec["prefix"], getattr(hf, spec["prefix"]))
        self.lm_head = OutputHead(hf.get_output_embeddings().weight, spec["head_scale"])
        self._tied = self.lm_head.weight is self.input_embedding().weight
        self._block_paths = spec["blocks"]
        self._norm_path = spec["norm"]
        self._hf_class = type(hf)
        self._attention_checked = False

    # -- what flexsp.parallelize shards ---------------------------------------------------------
    def base_model(self) -> nn.Module:
        return getattr(self, self.base_model_prefix)

    def decoder_blocks(self) -> list[nn.Module]:
        return [self.get_submodule(p) for p in self._block_paths]

    def input_embedding(self) -> nn.Module:
        return self.base_model().get_input_embeddings()

    def final_norm(self) -> nn.Module:
        return self.get_submodule(self._norm_path)

    def output_head(self) -> nn.Module:
        return self.lm_head

    def weight_conversions(self) -> list:
        """transformers' checkpoint conversions of this architecture (renamings, e.g. MoE experts
        stacked into fused tensors), computed on a fresh ``meta`` copy of the causal LM."""
        from transformers.conversion_mapping import get_model_conversion_mapping

        return get_model_conversion_mapping(build_causal_lm(self.config))

    # -- materialisation ---------------------------------------------------------------------------
    def to_empty(self, *, device, recurse: bool = True):
        """Materialise on ``device``: parameters uninitialised (a weight source fills them), tied
        embedding and head one parameter again (``_apply`` gives each module its own), buffers
        computed (:meth:`init_buffers_`)."""
        super().to_empty(device=device, recurse=recurse)
        if self._tied:
            self.lm_head.weight = self.input_embedding().weight
        self.init_buffers_()
        return self

    @torch.no_grad()
    def init_buffers_(self) -> None:
        """Compute the buffers as transformers' ``from_pretrained`` does after building on meta:
        ``initialize_weights`` with every parameter marked initialised, so its ``_init_weights``
        writes only buffers (parameters are the weight source's)."""
        base = self.base_model()
        for p in self.parameters():
            p._is_hf_initialized = True
        for m in base.modules():
            m._is_hf_initialized = False
        base.initialize_weights()

    # -- forward -------------------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        attn_ctx,
        labels: torch.Tensor | None = None,
        pad_mask: torch.Tensor | None = None,
        return_hidden: bool = False,
    ):
        """Same contract as ``flexsp.model.Transformer.forward``: ``[T_local]`` ids and positions,
        the injected attention; returns logits, the final hidden, or ``(loss_sum, num_targets)``."""
        if input_ids.dim() != 1 or positions.shape != input_ids.shape:
            raise UserError(
                f"input_ids and positions must both be [tokens]; got "
                f"{tuple(input_ids.shape)} and {tuple(positions.shape)}"
            )
        attn = attn_ctx if self._attention_checked else _CountingAttention(attn_ctx)
        out = self.base_model()(
            input_ids=input_ids[None], position_ids=positions[None], use_cache=False, **{ATTN_KWARG: attn}
        )
        if not self._attention_checked:
            expected = len(self._block_paths)
            if attn.calls != expected:
                raise UserError(
                    f"{self._hf_class.__name__}: {expected} decoder layers made {attn.calls} "
                    "FlexSP attention calls; its attention does not go through transformers' "
                    "AttentionInterface once per layer, so it cannot be sharded"
                )
            self._attention_checked = True
        h = out[0][0]
        if return_hidden and labels is None:
            return h
        return self.lm_head(h, labels, pad_mask)


def hf_native_config(path, **overrides) -> HFNativeConfig:
    """The :class:`HFNativeConfig` of the HF model directory ``path`` (config.json), checked:
    the model is built on ``meta`` and every refusal is raised here, at start-up."""
    d, src = _load_config_dict(path)
    cfg = HFNativeConfig(hf_config=d, **overrides)
    inspect_architecture(build_causal_lm(cfg), src)
    return cfg
