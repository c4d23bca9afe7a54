"""Training configuration: dataclasses with a docstring under every field, typed and validated when
the config is parsed (before any process group, data or model work), so a bad value is one line
naming the field, the value and what is valid.

Hydra composes ``configs/config.yaml`` (+ overrides) into a plain dict; :func:`parse_config` turns
it into these dataclasses. Every section rejects unknown keys (listing the valid ones) and every
field is checked against its annotation (``train.steps=abc`` -> "train.steps='abc' must be an
integer").
"""
from __future__ import annotations

import math
import types
import typing
from dataclasses import dataclass, fields
from pathlib import Path
from flexsp.errors import UserError

RESUME_HELP = "auto (latest checkpoint in output_dir, if any) | never | <checkpoint directory>"
TRAIN_PRECISIONS = ("auto", "fp32", "bf16", "bf16-pure")
LOGGERS = ("none", "tensorboard", "wandb")


@dataclass
class TrainConfig:
    steps: int = 10
    """Optimizer steps to train (total, counting steps of a resumed run)."""
    seed: int = 0
    """Seed of the model init, the sampler and the synthetic data."""
    global_batch: int = 8
    """Sequences (documents) per step (fewer when data.sampler.global_batch_tokens is hit first)."""
    lr: float = 3e-3
    """Peak learning rate (AdamW)."""
    min_lr_ratio: float = 0.1
    """Cosine decay ends at lr * min_lr_ratio at the last step."""
    warmup_steps: int = 2
    """Linear warmup steps."""
    weight_decay: float = 0.01
    """AdamW decoupled weight decay."""
    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.95
    """AdamW beta2."""
    eps: float = 1e-8
    """AdamW epsilon."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this (0: no clipping)."""
    precision: str = "auto"
    """auto (the model preset's / checkpoint's dtype: bfloat16 -> bf16, else fp32) | fp32 | bf16
    (fp32 master parameters and AdamW states, bf16 compute, fp32 gradient reduction) | bf16-pure
    (bf16 parameters and optimizer states; FSDP2 only, for comparison: small updates round away)."""
    compile: bool = False
    """``torch.compile`` every transformer block (flexsp.parallelize; the attention kernels stay
    opaque to it). Off by default: the first steps pay the compile time."""
    checkpoint_every: int = 10
    """Checkpoint every this many steps (0: only at the end)."""
    keep_checkpoints: int = 2
    """How many checkpoints to keep (older ones are deleted)."""
    async_checkpoint: bool = False
    """Write FSDP2 checkpoints in the background (torch.distributed.checkpoint.async_save)."""
    resume: str = "auto"
    """auto (latest checkpoint in output_dir, if any) | never | <checkpoint directory>."""
    progress: bool = True
    """Show a tqdm progress bar on rank 0 (only when stderr is a terminal)."""
    logger: str = "none"
    """Where step metrics go besides metrics.jsonl: none | tensorboard | wandb (offline works
    without network: WANDB_MODE=offline)."""
    plot_plan_every: int = 0
    """Save the plan timeline picture every this many steps under <output_dir>/plans/ (0: never)."""
    wandb_project: str = "flexsp"
    """W&B project name (train.logger=wandb)."""
    log_doc_ids: bool = True
    """Write each step's document ids into metrics.jsonl (lets tests check no sample is lost/repeated)."""
    kill_at_step: int = -1
    """Testing elastic restarts: rank ``kill_rank`` exits (code 13) before this step, first attempt only."""
    kill_rank: int = 0
    """See kill_at_step."""
    fail_at_step: int = -1
    """Testing the abort path: rank ``kill_rank`` raises inside a micro-batch of this step."""

    def __post_init__(self) -> None:
        for name in ("steps", "global_batch"):
            if getattr(self, name) < 1:
                raise UserError(f"train.{name} must be >= 1, got {getattr(self, name)!r}")
        for name in ("checkpoint_every", "warmup_steps", "grad_clip", "weight_decay", "keep_checkpoints",
                     "plot_plan_every"):
            if getattr(self, name) < 0:
                raise UserError(f"train.{name} must be >= 0, got {getattr(self, name)!r}")
        if not self.lr > 0:
            raise UserError(f"train.lr must be > 0, got {self.lr}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise UserError(f"train.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1 and self.eps > 0):
            raise UserError(f"train.beta1={self.beta1}, beta2={self.beta2} must be in [0, 1) and "
                             f"eps={self.eps} > 0")
        if self.precision not in TRAIN_PRECISIONS:
            raise UserError(f"train.precision={self.precision!r}; valid options: {list(TRAIN_PRECISIONS)}")
        if self.logger not in LOGGERS:
            raise UserError(f"train.logger={self.logger!r}; valid options: {list(LOGGERS)}")
        if self.resume not in ("auto", "never") and not self.resume.strip():
            raise UserError(f"train.resume is empty; valid: {RESUME_HELP}")


@dataclass
class ParallelConfig:
    mode: str = "adaptive"
    """adaptive (FlexSP planner each step) | static (one SP degree for every sequence)."""
    static_degree: int = 0
    """Static mode: the SP degree, a power of two <= world size (0 = all ranks)."""
    engine: str = "fsdp2"
    """How parameters are sharded and gradients summed over all ranks: fsdp2 | deepspeed (ZeRO-3;
    DeepSpeed's accelerator must match the device: it picks cpu on a machine without CUDA, and
    DS_ACCELERATOR=cpu forces it)."""
    shard_size: int = 0
    """FSDP2 HSDP: shard parameters within aligned groups of this many ranks and replicate across
    them (e.g. the ranks of one node); 0 = shard over all ranks. A power of two dividing the world."""
    deepspeed_persistence_threshold: int | None = None
    """DeepSpeed: parameters with fewer elements stay unpartitioned (None = DeepSpeed's default;
    0 partitions everything, as the tiny test models need)."""
    world_size: int = 0
    """Expected number of ranks; a mismatch with the launcher is an error (0 = accept any)."""
    backend: str | None = None
    """torch.distributed backend (None: nccl with CUDA, gloo otherwise)."""
    devices_per_node: int = 0
    """Ranks per node (0: LOCAL_WORLD_SIZE from the launcher, else the world size)."""

    def __post_init__(self) -> None:
        from flexsp.engines import ENGINES
        from flexsp.planning import PARALLEL_MODES
        if self.mode not in PARALLEL_MODES:
            raise UserError(f"parallel.mode={self.mode!r}; valid options: {list(PARALLEL_MODES)}")
        if self.engine not in ENGINES:
            raise UserError(f"parallel.engine={self.engine!r}; valid options: {list(ENGINES)}")
        for name in ("world_size", "static_degree", "shard_size", "devices_per_node"):
            value = getattr(self, name)
            if value < 0 or (value and value & (value - 1)):
                raise UserError(f"parallel.{name}={value} must be 0 or a power of two")
        if self.backend not in (None, "nccl", "gloo", "mpi", "ucc"):
            raise UserError(f"parallel.backend={self.backend!r}; valid options: [null, nccl, gloo, mpi, ucc]")
        if self.shard_size and self.engine != "fsdp2":
            raise UserError(f"parallel.shard_size={self.shard_size} (HSDP) needs parallel.engine=fsdp2")


def check_output_dir(out: Path, field: str = "output_dir") -> None:
    """ValueError unless ``out`` can be created and written (checked before any work)."""
    import os
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".flexsp-write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise UserError(f"{field}={out} cannot be created or written ({exc.strerror or exc}); "
                         f"give a writable directory") from None


# -- typed sections ----------------------------------------------------------------------------------
def type_name(tp) -> str:
    """How an annotation reads in an error message ("an integer", "a string or null", ...)."""
    names = {int: "an integer", float: "a number", bool: "true or false", str: "a string", list: "a list",
             dict: "a mapping", type(None): "null"}
    args = typing.get_args(tp)
    if args and typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " or ".join(type_name(a) for a in args)
    return names.get(typing.get_origin(tp) or tp, getattr(tp, "__name__", str(tp)))


def matches_type(tp, value) -> bool:
    """Whether ``value`` (from YAML / the command line) fits annotation ``tp`` (finite floats only)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return any(matches_type(a, value) for a in typing.get_args(tp))
    tp = origin or tp
    if tp is type(None):
        return value is None
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if tp in (list, tuple):
        return isinstance(value, (list, tuple))
    if isinstance(tp, type):
        return isinstance(value, tp)
    return True


def typed_section(cls, data, name: str, skip=()):
    """``cls(**data)`` after checking keys and value types against ``cls``'s annotations; ValueError
    naming ``<name>.<field>``, the value and the expected type otherwise."""
    data = dict(data or {})
    valid = {f.name for f in fields(cls)}
    bad = sorted(set(data) - valid)
    if bad:
        raise UserError(f"unknown {name} keys {bad}; valid keys: {sorted(valid)}")
    hints = typing.get_type_hints(cls)
    for key, value in data.items():
        if key in skip:
            continue
        tp = hints[key]
        if tp is float and isinstance(value, int) and not isinstance(value, bool):
            data[key] = float(value)
            continue
        if not matches_type(tp, value):
            extra = " (finite)" if tp is float and isinstance(value, float) else ""
            raise UserError(f"{name}.{key}={value!r} must be {type_name(tp)}{extra}")
    return cls(**data)


def parse_config(cfg) -> dict:
    """Hydra/OmegaConf config (or plain dict) -> validated dataclasses."""
    from flexsp.data import CorpusConfig, DataConfig, SamplerConfig
    from flexsp.planning import SolverConfig

    if isinstance(cfg, dict):
        raw = cfg
    else:
        from omegaconf import OmegaConf
        raw = OmegaConf.to_container(cfg, resolve=True)
    for key in ("model", "data", "parallel", "solver", "train", "output_dir"):
        if key not in raw:
            raise UserError(f"config has no '{key}' section; expected model, data, parallel, solver, train, output_dir")
    train = typed_section(TrainConfig, raw["train"], "train")
    parallel = typed_section(ParallelConfig, raw["parallel"], "parallel")
    solver = typed_section(SolverConfig, raw["solver"], "solver")
    d = dict(raw["data"])
    corpus = typed_section(CorpusConfig, d.pop("corpus", {}), "data.corpus")
    sampler_raw = dict(d.pop("sampler", {}))
    sampler_raw["max_docs_per_batch"] = train.global_batch
    sampler = typed_section(SamplerConfig, sampler_raw, "data.sampler")
    data = typed_section(DataConfig, {**d, "corpus": corpus, "sampler": sampler}, "data",
                         skip=("corpus", "sampler"))
    model = dict(raw["model"])
    preset = model.pop("preset", "tiny")
    hf_checkpoint = model.pop("hf_checkpoint", None)
    hf_native = model.pop("hf_native", False)
    if not isinstance(preset, str):
        raise UserError(f"model.preset={preset!r} must be a string")
    if hf_checkpoint is not None and not isinstance(hf_checkpoint, str):
        raise UserError(f"model.hf_checkpoint={hf_checkpoint!r} must be a path to a Hugging Face model directory")
    if not isinstance(hf_native, bool):
        raise UserError(f"model.hf_native={hf_native!r} must be true or false")
    if hf_native and hf_checkpoint is None:
        raise UserError("model.hf_native=true needs model.hf_checkpoint (the Hugging Face model directory "
                         "to train through transformers' modules)")
    model = {k: v for k, v in model.items() if v is not None}
    out = raw["output_dir"]
    if not isinstance(out, str) or not out.strip():
        raise UserError(f"output_dir={out!r} must be a directory path")
    return dict(train=train, parallel=parallel, solver=solver, data=data, model_preset=preset,
                model_overrides=model, hf_checkpoint=hf_checkpoint, hf_native=hf_native, output_dir=Path(out),
                raw=raw)
