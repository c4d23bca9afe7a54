"""Training engines: how gradients are synchronised across ALL ranks whatever the SP grouping.

An engine builds the model sharded from the start (torchtitan's order: construct on ``meta`` or
under ``zero.Init`` -> shard -> materialise -> fill only the local shards from a weight source, so no
rank ever holds the full model), and owns the optimizer and LR schedule. Interface used by the
trainer and the executor:

- ``module``: the wrapped model to call forward on;
- ``begin_micro_batch(last)``: called before each micro-batch (HSDP syncs replicas on the last);
- ``backward(loss)``: accumulate gradients of ``loss`` (already scaled by 1 / global targets);
- ``step() -> grad_norm``: sum gradients over all ranks (already done by the wrapper's hooks),
  clip, optimizer step, scheduler step, zero grads; the norm is a device tensor (no host sync);
- ``lr``; ``state_dict()`` / ``load_state_dict()`` (FSDP2, for torch.distributed.checkpoint) or
  ``save(dir)`` / ``load(dir)`` (DeepSpeed's own format); collective: every rank calls them;
- ``full_state_dict()``: the unsharded fp32 parameters (collective; tests compare them).

Weight sources (``weights.fill_(dest, name, numel, start)``: fill ``dest`` with the flat elements
``[start, start + dest.numel())`` of parameter ``name``): :class:`RandomWeights` (the seeded,
world-size-independent init of flexsp.model.init) or :class:`HFWeights` (slices read lazily from a
Hugging Face checkpoint's safetensors files).

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

from flexsp.config import Engine, param_dtype  # noqa: F401 (param_dtype re-exported)
from flexsp.errors import UserError

ENGINES = tuple(Engine.values())
PRECISIONS = ("fp32", "bf16", "bf16-pure")
"""``train.precision``: fp32 | bf16 (fp32 master params and AdamW states, bf16 compute, fp32 gradient
reduction) | bf16-pure (bf16 parameters and optimizer states: for comparison, not recommended)."""


def precision_dtypes(precision: str) -> tuple[torch.dtype | None, torch.dtype | None]:
    """(compute/param dtype for the sharding wrapper's cast, gradient-reduction dtype)."""
    if precision == "fp32":
        return None, None
    if precision == "bf16":
        return torch.bfloat16, torch.float32
    if precision == "bf16-pure":
        return None, None      # the parameters themselves are bf16
    raise UserError(f"train.precision={precision!r}; valid options: {list(PRECISIONS)}")


class RandomWeights:
    """The seeded init of flexsp.model.init, for any element range of any parameter."""

    def __init__(self, seed: int, init_std: float, layers: int):
        self.seed, self.init_std, self.layers = int(seed), float(init_std), int(layers)

    def check(self, module) -> None:
        pass

    def fill_(self, dest: torch.Tensor, name: str, numel: int, start: int) -> None:
        from flexsp.model.init import fill_elements_
        fill_elements_(dest, name, numel, start, self.seed, self.init_std, self.layers)


class HFWeights:
    """Element ranges read lazily from a Hugging Face checkpoint (flexsp.model.hf.HFCheckpointReader)."""

    def __init__(self, reader):
        self.reader = reader

    def check(self, module) -> None:
        """Every parameter of ``module`` present with its shape, no checkpoint key left over (one
        error listing them all), before anything is filled."""
        self.reader.check(module)

    @torch.no_grad()
    def fill_(self, dest: torch.Tensor, name: str, numel: int, start: int) -> None:
        vals = self.reader.read_elements(name, start, start + dest.numel())
        dest.copy_(vals.reshape(dest.shape).to(device=dest.device, dtype=dest.dtype))


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


def build_engine(name: str, make_model, weights, train_cfg, parallel_cfg, world_size: int, device):
    """The engine ``name`` around a model built by ``make_model(device)`` (called on ``meta`` or
    under ``zero.Init``) whose local shards ``weights`` fills (see the module docstring)."""
    if name == "fsdp2":
        from flexsp.engines.fsdp2 import FSDP2Engine
        return FSDP2Engine(make_model, weights, train_cfg, parallel_cfg, world_size, device)
    if name == "deepspeed":
        from flexsp.engines.deepspeed import DeepSpeedEngine
        return DeepSpeedEngine(make_model, weights, train_cfg, parallel_cfg, world_size, device)
    raise UserError(f"parallel.engine={name!r}; valid options: {list(ENGINES)}")
