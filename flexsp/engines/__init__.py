"""Training engines: how gradients are synchronised across ALL ranks whatever the SP grouping.

An engine wraps the model and owns the optimizer and LR schedule. Interface used by the trainer and
the executor:

- ``module``: the wrapped model to call forward on;
- ``backward(loss)``: accumulate gradients of ``loss`` (already scaled by 1 / global targets);
- ``step() -> grad_norm``: sum gradients over all ranks (already done by the wrapper's hooks),
  clip, optimizer step, scheduler step, zero grads;
- ``lr``; ``save(dir)`` / ``load(dir)`` (collective: every rank calls them);
- ``full_state_dict()``: the unsharded fp32 parameters (collective; tests compare them).

Gradients are SUMMED over ranks (not averaged): each rank's loss is already divided by the number
of target tokens of the whole global batch, so the sum is the single-device gradient.

Engines: ``fsdp2`` (``torch.distributed.fsdp.fully_shard`` per block + root) and ``deepspeed``
(DeepSpeed ZeRO-3 over all ranks, flexsp.engines.deepspeed: loss x world size against ZeRO-3's
averaging, no 1/gas, ``step()`` as the accumulation boundary of a varying number of micro-batches,
DeepSpeed's partitioned checkpoints). Both give the same gradients, optimizer update and schedule.
"""
from __future__ import annotations

import math

import torch

ENGINES = ("fsdp2", "deepspeed")
PLANNED_ENGINES: tuple[str, ...] = ()


def lr_lambda(warmup_steps: int, total_steps: int, min_ratio: float):
    """Linear warmup to 1 over ``warmup_steps``, then cosine decay to ``min_ratio`` at ``total_steps``."""
    def f(step: int) -> float:
        if warmup_steps > 0 and step < warmup_steps:
            return (step + 1) / warmup_steps
        span = max(1, total_steps - warmup_steps)
        progress = min(1.0, (step - warmup_steps) / span)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return f


def build_optimizer(params, cfg) -> torch.optim.Optimizer:
    """AdamW from a TrainConfig (lr, betas, eps, weight_decay)."""
    return torch.optim.AdamW(params, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                             weight_decay=cfg.weight_decay)


def build_scheduler(optimizer, cfg):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg.warmup_steps, cfg.steps, cfg.min_lr_ratio))


def build_engine(name: str, model, train_cfg, world_size: int, device):
    if name == "fsdp2":
        from flexsp.engines.fsdp2 import FSDP2Engine
        return FSDP2Engine(model, train_cfg, world_size, device)
    if name == "deepspeed":
        from flexsp.engines.deepspeed import DeepSpeedEngine
        return DeepSpeedEngine(model, train_cfg, world_size, device)
    if name in PLANNED_ENGINES:
        raise ValueError(f"parallel.engine={name!r} is not implemented yet; valid options: {list(ENGINES)}")
    raise ValueError(f"parallel.engine={name!r}; valid options: {list(ENGINES)}")
