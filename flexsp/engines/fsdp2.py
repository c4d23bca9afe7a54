"""FSDP2 engine: build on ``meta`` -> parallelize -> materialise -> fill only local shards.

``flexsp.parallelize`` applies activation checkpointing, optional ``torch.compile`` of the blocks
and the FSDP2 units (each its own all-gather / reduce-scatter): the token embedding, every
transformer block, and the final norm + LM head together; the root holds nothing else (tied
embeddings: embedding and head share a weight, so they stay in the root unit together). Sharding is over
all ranks (ZeRO-3), or
HSDP with ``parallel.shard_size = s``: shard within aligned groups of ``s`` ranks, replicate across
them (2-D mesh ``(replicate, shard)``); the gradient all-reduce across replicas runs once per step,
on the last micro-batch (``set_requires_all_reduce``), which the cost model prices.

Precision (``train.precision``): ``fp32``; ``bf16`` = fp32 master parameters and AdamW states, bf16
compute (``MixedPrecisionPolicy(param_dtype=bf16)``), fp32 gradient reduction
(``reduce_dtype=fp32``); ``bf16-pure`` = bf16 parameters, gradients and AdamW states (kept for
comparison only: late small updates round away).

Gradients are summed over ranks (``set_gradient_divide_factor(1.0)`` and sum-only reductions, since
gloo has no PREMUL_SUM/AVG reduce-scatter): each rank's loss is already divided by the global
number of target tokens. See flexsp.executor for why all ranks stay in lockstep.

Checkpoints: ``torch.distributed.checkpoint`` (flexsp.checkpoint): every rank writes its own shards.
"""

from __future__ import annotations

import torch
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh

from flexsp.engines.common import build_optimizer, build_scheduler
from flexsp.model.init import fill_local_shards
from flexsp.parallelize import ParallelizeConfig, parallelize, shard_units


def data_parallel_mesh(device_type: str, world_size: int, shard_size: int):
    """1-D mesh of all ranks, or the HSDP mesh ``(replicate, shard)`` when 0 < shard_size < world."""
    if not shard_size or shard_size >= world_size:
        return init_device_mesh(device_type, (world_size,), mesh_dim_names=("shard",))
    return init_device_mesh(
        device_type, (world_size // shard_size, shard_size), mesh_dim_names=("replicate", "shard")
    )


def parallelize_config(model, train_cfg) -> "ParallelizeConfig":
    """What flexsp.parallelize applies to ``model`` for this training config."""
    return ParallelizeConfig(
        activation_checkpointing=bool(getattr(model.config, "activation_checkpointing", False)),
        compile=bool(getattr(train_cfg, "compile", False)),
        precision=train_cfg.precision,
    )


def shard_model(model, mesh, precision: str, reshard_after_forward: bool = True) -> list:
    """The FSDP2 units alone (no checkpointing or compile), as training shards them."""
    return shard_units(
        model, mesh, ParallelizeConfig(precision=precision, reshard_after_forward=reshard_after_forward)
    )


class FSDP2Engine:
    name = "fsdp2"

    def __init__(self, make_model, weights, train_cfg, parallel_cfg, world_size: int, device: torch.device):
        """``make_model(device)`` builds the (unsharded) Transformer; it is called with ``meta``.
        ``weights.fill_(dest, name, numel, start)`` fills a parameter's flat element range."""
        self.cfg, self.device = train_cfg, device
        self.precision = train_cfg.precision
        shard_size = getattr(parallel_cfg, "shard_size", 0)
        self.mesh = data_parallel_mesh(device.type, world_size, shard_size)
        self.hsdp = self.mesh.ndim == 2
        with torch.device("meta"):
            model = make_model(torch.device("meta"))
        self.units = parallelize(model, self.mesh, parallelize_config(model, train_cfg))
        model.to_empty(device=device)
        fill_local_shards(model, weights)
        self.module = model
        self.optimizer = build_optimizer(model.parameters(), train_cfg)
        self.scheduler = build_scheduler(self.optimizer, train_cfg)

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def begin_micro_batch(self, last: bool) -> None:
        """HSDP: all-reduce gradients across replicas only with the step's last micro-batch."""
        if self.hsdp:
            self.module.set_requires_all_reduce(last)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> torch.Tensor:
        """Clip, AdamW, schedule, zero grads; returns the pre-clip global gradient norm as a device
        tensor (no host sync here: the caller reads it once per step)."""
        params = [p for p in self.module.parameters() if p.grad is not None]
        if self.cfg.grad_clip > 0:
            norm = torch.nn.utils.clip_grad_norm_(params, self.cfg.grad_clip)
        else:
            norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        if hasattr(norm, "full_tensor"):
            norm = norm.full_tensor()
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm.detach()

    # -- state --------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Sharded (DTensor) model + optimizer state for ``torch.distributed.checkpoint``."""
        return {
            "model": get_model_state_dict(self.module),
            "optim": get_optimizer_state_dict(self.module, self.optimizer),
        }

    def load_state_dict(self, state: dict) -> None:
        set_model_state_dict(self.module, state["model"])
        set_optimizer_state_dict(self.module, self.optimizer, state["optim"])

    def full_state_dict(self) -> dict:
        """Unsharded fp32 parameters on every rank's CPU (collective; tests and exports)."""
        return get_model_state_dict(
            self.module,
            options=StateDictOptions(full_state_dict=True, cpu_offload=True, broadcast_from_rank0=False),
        )
