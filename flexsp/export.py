"""``flexsp-export``: a training checkpoint -> a Hugging Face model directory.

    flexsp-export CHECKPOINT_DIR OUT_DIR [--dtype bf16|fp32] [--architecture NAME]
                  [--max-shard-size BYTES] [--tokenizer PATH]

The weights are written in the dtype the model was trained in (:func:`trained_dtype`: fp32 for
``train.precision=fp32``, bf16 for ``bf16`` / ``bf16-pure``; fp32 for a checkpoint that does not
record its precision), and the dtype is printed; ``--dtype`` writes another one.

``CHECKPOINT_DIR`` is a ``step_N/`` directory written by the trainer at any world size (or a
checkpoints root / run directory, then its ``latest`` is used). It holds ``trainer.pt`` (``step``,
``config`` = the resolved Hydra config, ``model_config`` = ``dataclasses.asdict(ModelConfig)``,
``tokenizer`` = an HF dir / tokenizer.json / None) and either ``dcp/`` (FSDP2: a
torch.distributed.checkpoint directory of ``{"model": ..., "optim": ...}``) or
``deepspeed/engine/`` (DeepSpeed ZeRO-3). The model weights (fp32 masters) are read on this one
process, without a process group -- DCP: ``dcp.load({"model": sd}, no_dist=True)`` into a CPU
model's state dict (only the model entries are read); DeepSpeed: ``zero_to_fp32`` -- and written
with :func:`flexsp.model.hf.to_hf`: config.json, sharded safetensors + index, tokenizer files and
generation_config.json. A checkpoint of an HF-native model (flexsp.model.hf_native) is written
by transformers' own ``save_pretrained`` as its architecture (flexsp.model.hf_native_weights). The
architecture is the HF origin's (``model.hf_checkpoint``) when the
run started from one, else LLaMA (Qwen3 with q/k norms, Qwen2 with q/k/v biases, Mistral with a
sliding window), or ``--architecture``.

Errors (not a checkpoint, missing trainer.pt, missing or truncated shard, a config the
architecture cannot express) are one line on stderr naming the file, exit status 2, no traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp

from flexsp.checkpoint import read_trainer_state, verify_checkpoint
from flexsp.errors import UserError, print_error
from flexsp.model import ModelConfig, Transformer, model_config
from flexsp.model.hf import DEFAULT_MAX_SHARD_BYTES, SUPPORTED_ARCHITECTURES, to_hf
from flexsp.model.hf_native import HFNativeModel
from flexsp.model.hf_native_weights import save_hf_native

DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp32": torch.float32, "float32": torch.float32}


class ExportError(UserError):
    """A user-facing export failure (one line, exit 2)."""


def resolve_checkpoint(path) -> Path:
    """``path`` itself if it is a ``step_N`` checkpoint, else the one its ``latest`` names
    (``path/latest`` or ``path/checkpoints/latest``)."""
    p = Path(path)
    if not p.exists():
        raise ExportError(f"{p} does not exist")
    if (p / "trainer.pt").is_file() or not p.is_dir():
        return p
    for root in (p, p / "checkpoints"):
        if (root / "latest").is_file():
            return root / (root / "latest").read_text().strip()
    return p


def _verify(ckpt: Path) -> dict:
    try:
        verify_checkpoint(ckpt)
        return read_trainer_state(ckpt)
    except ValueError as exc:
        raise ExportError(str(exc)) from None


def _model_config(state: dict, ckpt: Path):
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    mc = state.get("model_config")
    try:
        if isinstance(mc, dict) and mc.get("hf_native"):
            from flexsp.model.hf_native import HFNativeConfig

            return HFNativeConfig(**mc)
        if mc is not None:
            if dataclasses.is_dataclass(mc):
                mc = dataclasses.asdict(mc)
            return ModelConfig(**{k: v for k, v in dict(mc).items() if k in fields})
        section = dict((state.get("config") or {}).get("model") or {})
        preset = section.pop("preset", None)
        if preset is None:
            raise ExportError(f"{ckpt / 'trainer.pt'} has neither model_config nor config.model.preset")
        over = {k: v for k, v in section.items() if k in fields and v is not None}
        return model_config(preset, **over)
    except (TypeError, ValueError) as exc:
        raise ExportError(f"{ckpt / 'trainer.pt'}: invalid model config ({exc})") from None


def _strip(name: str) -> str:
    for prefix in ("module.", "_orig_mod."):
        while name.startswith(prefix):
            name = name[len(prefix) :]
    return name.replace("._orig_mod.", ".").replace("._checkpoint_wrapped_module.", ".")


def load_model_state(ckpt: Path, cfg) -> dict[str, torch.Tensor]:
    """fp32 CPU state dict (our names) of the checkpoint ``ckpt``, read on this one process."""
    dcp_dir, ds_dir = ckpt / "dcp", ckpt / "deepspeed"
    if dcp_dir.is_dir():
        if getattr(cfg, "hf_native", False):
            model = HFNativeModel(dataclasses.replace(cfg, dtype="float32"))
        else:
            model = Transformer(dataclasses.replace(cfg, dtype="float32"), device="meta")
        model.to_empty(device="cpu")
        sd = model.state_dict()
        try:
            with warnings.catch_warnings():  # "no process group: loading in a single process" is the intent
                warnings.simplefilter("ignore", UserWarning)
                dcp.load({"model": sd}, checkpoint_id=str(dcp_dir), no_dist=True)
        except Exception as exc:  # DCP wraps reader failures in CheckpointException
            msg = " ".join(str(exc).split())[:400]
            raise ExportError(f"cannot read the model from {dcp_dir}: {type(exc).__name__}: {msg}") from None
        return sd
    if (ds_dir / "engine").is_dir():
        try:
            from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
        except ImportError:
            raise ExportError(f"{ds_dir} is a DeepSpeed checkpoint but deepspeed is not installed") from None
        try:
            raw = get_fp32_state_dict_from_zero_checkpoint(str(ds_dir), tag="engine")
        except Exception as exc:
            msg = " ".join(str(exc).split())[:400]
            raise ExportError(
                f"cannot read the DeepSpeed checkpoint {ds_dir / 'engine'}: {type(exc).__name__}: {msg}"
            ) from None
        return {_strip(k): v.float() for k, v in raw.items()}
    raise ExportError(f"{ckpt} holds no model weights: neither {dcp_dir} nor {ds_dir / 'engine'} exists")


TRAINED_DTYPE = {"fp32": "fp32", "bf16": "bf16", "bf16-pure": "bf16"}
"""Export dtype of each train.precision: fp32 training keeps fp32; bf16 mixed precision computed in
bf16 (its fp32 masters exist for the optimizer's small updates), bf16-pure kept bf16 throughout."""


def trained_dtype(state: dict) -> tuple[str, str]:
    """(export dtype, why) for a checkpoint's trainer state: its train.precision (trainer.pt's
    ``precision``, else the resolved ``config.train.precision``), else fp32 (never lossy)."""
    precision = state.get("precision") or ((state.get("config") or {}).get("train") or {}).get("precision")
    if precision in TRAINED_DTYPE:
        return TRAINED_DTYPE[precision], f"trained with train.precision={precision}"
    return "fp32", "the checkpoint records no train.precision"


def _origin(state: dict) -> Path | None:
    hf = ((state.get("config") or {}).get("model") or {}).get("hf_checkpoint")
    return Path(hf) if hf else None


def export(
    checkpoint,
    out_dir,
    *,
    dtype: str | None = None,
    architecture: str | None = None,
    max_shard_bytes: int | None = None,
    tokenizer=None,
    log=None,
) -> Path:
    """Export ``checkpoint`` to the HF directory ``out_dir``; raises :class:`ExportError`.
    ``dtype`` None: the dtype the model was trained in (:func:`trained_dtype`)."""
    if dtype is not None and dtype not in DTYPES:
        raise ExportError(f"--dtype {dtype!r}; valid options: bf16, fp32")
    ckpt = resolve_checkpoint(checkpoint)
    state = _verify(ckpt)
    dtype, why = (dtype, "--dtype") if dtype is not None else trained_dtype(state)
    cfg = _model_config(state, ckpt)
    origin = _origin(state)
    if getattr(cfg, "hf_native", False):
        return _export_hf_native(
            ckpt, state, cfg, out_dir, dtype, why, architecture, max_shard_bytes, tokenizer, origin, log
        )
    if architecture is None and origin is not None and (origin / "config.json").is_file():
        try:
            archs = json.loads((origin / "config.json").read_text()).get("architectures") or []
            if archs and archs[0] in SUPPORTED_ARCHITECTURES:
                architecture = archs[0]
        except (OSError, json.JSONDecodeError):
            pass
    if architecture is not None and architecture not in SUPPORTED_ARCHITECTURES:
        raise ExportError(f"--architecture {architecture!r}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
    tok = _tokenizer_source(state, tokenizer, origin, log)
    sd = load_model_state(ckpt, cfg)
    try:
        out = to_hf(
            sd,
            out_dir,
            config=cfg,
            architecture=architecture,
            dtype=DTYPES[dtype],
            max_shard_bytes=max_shard_bytes or DEFAULT_MAX_SHARD_BYTES,
            tokenizer_from=tok,
        )
    except (ValueError, FileNotFoundError) as exc:
        raise ExportError(str(exc)) from None
    if log:
        name = str(DTYPES[dtype]).replace("torch.", "")
        log(f"exported {ckpt} (step {state.get('step')}) -> {out}, weights in {name} ({why})")
    return out


def _tokenizer_source(state: dict, tokenizer, origin: Path | None, log):
    tok = tokenizer if tokenizer is not None else state.get("tokenizer")
    if tok is None and origin is not None and (origin / "tokenizer_config.json").is_file():
        tok = origin
    if tok is not None and not Path(tok).exists():
        if log:
            log(f"warning: tokenizer {tok} not found; exporting without tokenizer files")
        tok = None
    return tok


def _export_hf_native(
    ckpt: Path,
    state: dict,
    cfg,
    out_dir,
    dtype: str,
    why: str,
    architecture,
    max_shard_bytes,
    tokenizer,
    origin,
    log,
) -> Path:
    """An HF-native checkpoint -> transformers' ``save_pretrained`` files of its own architecture."""
    if architecture is not None and architecture != cfg.architecture:
        raise ExportError(
            f"--architecture {architecture!r}: this checkpoint trained {cfg.architecture} "
            "HF-native (transformers' modules); it exports as that architecture only"
        )
    tok = _tokenizer_source(state, tokenizer, origin, log)
    sd = load_model_state(ckpt, cfg)
    try:
        out = save_hf_native(
            cfg, sd, out_dir, dtype=DTYPES[dtype], max_shard_bytes=max_shard_bytes, tokenizer_from=tok
        )
    except (ValueError, FileNotFoundError) as exc:
        raise ExportError(str(exc)) from None
    if log:
        name = str(DTYPES[dtype]).replace("torch.", "")
        log(
            f"exported {ckpt} (step {state.get('step')}, {cfg.architecture}, HF-native) -> {out} with "
            f"save_pretrained, weights in {name} ({why})"
        )
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="flexsp-export", description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoint", help="a step_N checkpoint directory (or a checkpoints root with `latest`)")
    ap.add_argument("out_dir", help="the HF model directory to write")
    ap.add_argument(
        "--dtype",
        default=None,
        choices=["bf16", "fp32"],
        help="weights dtype on disk (default: the dtype the model was trained in: fp32 for "
        "train.precision=fp32, bf16 for bf16 / bf16-pure)",
    )
    ap.add_argument(
        "--architecture",
        default=None,
        help="HF architecture (default: the HF origin's, else LLaMA / Qwen3 / Qwen2 / Mistral as the "
        "config needs)",
    )
    ap.add_argument(
        "--max-shard-size", type=int, default=None, help="bytes per safetensors shard (default 5 GiB)"
    )
    ap.add_argument("--tokenizer", default=None, help="HF dir or tokenizer.json (default: the checkpoint's)")
    args = ap.parse_args(argv)
    try:
        export(
            args.checkpoint,
            args.out_dir,
            dtype=args.dtype,
            architecture=args.architecture,
            max_shard_bytes=args.max_shard_size,
            tokenizer=args.tokenizer,
            log=lambda m: print(m, file=sys.stderr),
        )
    except ExportError as exc:
        return print_error("flexsp-export", exc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
