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

from flexsp.config import Engine, param_dtype  # noqa: F401 (re-exported)
from flexsp.engines.common import HFWeights, RandomWeights, build_optimizer, build_scheduler, lr_lambda  # noqa: F401
from flexsp.engines.deepspeed import DeepSpeedEngine
from flexsp.engines.fsdp2 import FSDP2Engine
from flexsp.errors import UserError
from flexsp.parallelize import PRECISIONS, precision_dtypes  # noqa: F401 (re-exported)

ENGINES = tuple(Engine.values())


def build_engine(name: str, make_model, weights, train_cfg, parallel_cfg, world_size: int, device):
    """The engine ``name`` around a model built by ``make_model(device)`` (called on ``meta`` or
    under ``zero.Init``) whose local shards ``weights`` fills (see the module docstring)."""
    if name == "fsdp2":
        return FSDP2Engine(make_model, weights, train_cfg, parallel_cfg, world_size, device)
    if name == "deepspeed":
        return DeepSpeedEngine(make_model, weights, train_cfg, parallel_cfg, world_size, device)
    raise UserError(f"parallel.engine={name!r}; valid options: {list(ENGINES)}")
