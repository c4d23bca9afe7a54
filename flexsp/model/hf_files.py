"""Hugging Face model directories on disk: the directory and its config.json, parameter names
(ours <-> the checkpoint's), lazy safetensors reads (:class:`HFCheckpointReader`) and the tokenizer
files an export ships. The base of flexsp.model.hf (native models) and flexsp.model.hf_native*
(transformers' modules)."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import safe_open
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from flexsp.data.tokenizer import EOS_CANDIDATES
from flexsp.errors import UserError

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")

_MODEL_TYPE = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}
_ARCH_OF_TYPE = {v: k for k, v in _MODEL_TYPE.items()}

# ours <-> HF parameter names (per block, then global)
_BLOCK_MAP = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn.wq.weight": "self_attn.q_proj.weight",
    "attn.wq.bias": "self_attn.q_proj.bias",
    "attn.wk.weight": "self_attn.k_proj.weight",
    "attn.wk.bias": "self_attn.k_proj.bias",
    "attn.wv.weight": "self_attn.v_proj.weight",
    "attn.wv.bias": "self_attn.v_proj.bias",
    "attn.wo.weight": "self_attn.o_proj.weight",
    "attn.q_norm.weight": "self_attn.q_norm.weight",
    "attn.k_norm.weight": "self_attn.k_norm.weight",
    "mlp_norm.weight": "post_attention_layernorm.weight",
    "mlp.w_gate.weight": "mlp.gate_proj.weight",
    "mlp.w_up.weight": "mlp.up_proj.weight",
    "mlp.w_down.weight": "mlp.down_proj.weight",
}
_BLOCK_INV = {v: k for k, v in _BLOCK_MAP.items()}
_GLOBAL_MAP = {
    "embed.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "lm_head.weight": "lm_head.weight",
}
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
    raise UserError(
        f"{field}={path} {what}; it must be a directory: a Hugging Face model directory holding "
        f"config.json, *.safetensors and the tokenizer files{hint}"
    )


def _load_config_dict(path_or_dict) -> tuple[dict, str]:
    if isinstance(path_or_dict, Mapping):
        return dict(path_or_dict), "<dict>"
    if hasattr(path_or_dict, "to_dict"):  # a transformers PretrainedConfig
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
                    "(PyTorch .bin checkpoints are not supported: re-save with safe_serialization=True)"
                )
            for f in files:
                for k in self._keys_of(f):
                    key_file[k] = f
        self._key_file = key_file
        self._handles: dict[Path, object] = {}
        self.names: dict[str, str] = {}  # our name -> HF key
        self.unknown: list[str] = []  # HF keys that are not ours
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
        return block[start - r0 * row : stop - r0 * row]

    def check(self, module: torch.nn.Module) -> None:
        """ValueError naming every missing key, unexpected key and shape mismatch of the
        checkpoint against ``module``'s parameters (global shapes: also for meta tensors, FSDP2
        DTensors and DeepSpeed ZeRO-3 partitioned parameters, whose ``ds_shape`` is used). Call it
        before filling shards with :meth:`read_elements` / :meth:`read_rows`."""
        params = {n: tuple(getattr(p, "ds_shape", None) or p.shape) for n, p in module.named_parameters()}
        tied = "lm_head.weight" not in params and "embed.weight" in params
        missing = [n for n in params if n not in self.names]
        unexpected = [
            self.names[n] for n in self.names if n not in params and not (tied and n == "lm_head.weight")
        ] + self.unknown
        shapes = [
            f"{n}: checkpoint {self.shape(n)} vs model {shape}"
            for n, shape in params.items()
            if n in self.names and self.shape(n) != shape
        ]
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
                raise UserError(
                    f"parameter {name} is on the meta device; call module.to_empty(device=...) "
                    "before load_into_"
                )
            if hasattr(p, "to_local"):
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


_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
)


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
