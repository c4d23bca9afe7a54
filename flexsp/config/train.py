"""Sections ``train`` (the training loop) and ``parallel`` (how ranks share the work)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from flexsp.config.fields import Choice
from flexsp.errors import UserError, check_power_of_two

RESUME_HELP = "auto (latest checkpoint in output_dir, if any) | never | <checkpoint directory>"


class Precision(Choice):
    """``train.precision``."""

    auto = "auto"
    fp32 = "fp32"
    bf16 = "bf16"
    bf16_pure = "bf16-pure"


class TrainLogger(Choice):
    """``train.logger``: where step metrics go besides metrics.jsonl."""

    none = "none"
    tensorboard = "tensorboard"
    wandb = "wandb"


class ParallelMode(Choice):
    """``parallel.mode``."""

    adaptive = "adaptive"
    static = "static"


class Engine(Choice):
    """``parallel.engine``: how parameters are sharded and gradients summed over all ranks."""

    fsdp2 = "fsdp2"
    deepspeed = "deepspeed"


class Backend(Choice):
    """``parallel.backend``: the torch.distributed backend (null: nccl with CUDA, gloo otherwise)."""

    nccl = "nccl"
    gloo = "gloo"
    mpi = "mpi"
    ucc = "ucc"


def param_dtype(precision: str) -> str:
    """ModelConfig.dtype of the parameters an engine builds for ``precision`` (resolved: not auto)."""
    return "bfloat16" if precision == Precision.bf16_pure else "float32"


def resolve_precision(precision: str, model_dtype: str, engine: str) -> Precision:
    """``train.precision`` with ``auto`` resolved from the model's dtype (bfloat16 -> bf16, else fp32);
    UserError for bf16-pure on an engine other than fsdp2."""
    precision = Precision.parse("train.precision", precision)
    if precision == Precision.auto:
        precision = Precision.bf16 if model_dtype == "bfloat16" else Precision.fp32
    if precision == Precision.bf16_pure and engine != Engine.fsdp2:
        raise UserError(
            "train.precision=bf16-pure needs parallel.engine=fsdp2; valid with deepspeed: fp32, bf16",
            field="train.precision",
            options=["auto", "fp32", "bf16"],
        )
    return precision


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
    precision: Precision = Precision.auto
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
    logger: TrainLogger = TrainLogger.none
    """Where step metrics go besides metrics.jsonl: none | tensorboard | wandb (offline works
    without network: WANDB_MODE=offline)."""
    plot_plan_every: int = 0
    """Save the plan timeline picture every this many steps under <output_dir>/plans/ (0: never)."""
    wandb_project: str = "flexsp"
    """W&B project name (train.logger=wandb)."""

    def __post_init__(self) -> None:
        self.precision = Precision.parse("train.precision", self.precision)
        self.logger = TrainLogger.parse("train.logger", self.logger)
        for name in ("steps", "global_batch"):
            if getattr(self, name) < 1:
                raise UserError(
                    f"train.{name} must be >= 1, got {getattr(self, name)!r}", field=f"train.{name}"
                )
        for name in (
            "checkpoint_every",
            "warmup_steps",
            "grad_clip",
            "weight_decay",
            "keep_checkpoints",
            "plot_plan_every",
        ):
            if getattr(self, name) < 0:
                raise UserError(
                    f"train.{name} must be >= 0, got {getattr(self, name)!r}", field=f"train.{name}"
                )
        if not self.lr > 0:
            raise UserError(f"train.lr must be > 0, got {self.lr}", field="train.lr")
        if not 0 <= self.min_lr_ratio <= 1:
            raise UserError(
                f"train.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}", field="train.min_lr_ratio"
            )
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1 and self.eps > 0):
            raise UserError(
                f"train.beta1={self.beta1}, beta2={self.beta2} must be in [0, 1) and eps={self.eps} > 0",
                field="train.beta1",
            )
        if self.resume not in ("auto", "never") and not self.resume.strip():
            raise UserError(f"train.resume is empty; valid: {RESUME_HELP}", field="train.resume")


@dataclass
class ParallelConfig:
    mode: ParallelMode = ParallelMode.adaptive
    """adaptive (FlexSP planner each step) | static (one SP degree for every sequence)."""
    static_degree: int = 0
    """Static mode: the SP degree, a power of two <= world size (0 = all ranks)."""
    engine: Engine = Engine.fsdp2
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
    backend: Backend | None = None
    """torch.distributed backend (None: nccl with CUDA, gloo otherwise)."""
    devices_per_node: int = 0
    """Ranks per node (0: LOCAL_WORLD_SIZE from the launcher, else the world size)."""

    def __post_init__(self) -> None:
        self.mode = ParallelMode.parse("parallel.mode", self.mode)
        self.engine = Engine.parse("parallel.engine", self.engine)
        if self.backend is not None:
            if self.backend not in Backend.values():
                raise UserError(
                    f"parallel.backend={self.backend!r}; valid options: [null, nccl, gloo, mpi, ucc]",
                    field="parallel.backend",
                    options=[None, *Backend.values()],
                )
            self.backend = Backend(self.backend)
        for name in ("world_size", "static_degree", "shard_size", "devices_per_node"):
            check_power_of_two(f"parallel.{name}", getattr(self, name), zero_ok=True)
        if self.shard_size and self.engine != Engine.fsdp2:
            raise UserError(
                f"parallel.shard_size={self.shard_size} (HSDP) needs parallel.engine=fsdp2",
                field="parallel.shard_size",
            )


def check_output_dir(out: Path, field: str = "output_dir") -> None:
    """UserError unless ``out`` can be created and written (checked before any work)."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".flexsp-write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise UserError(
            f"{field}={out} cannot be created or written ({exc.strerror or exc}); give a writable directory",
            field=field,
        ) from None
