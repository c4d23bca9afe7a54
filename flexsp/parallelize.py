"""Everything parallel applied to a model from outside, in one place (as torchtitan's
``parallelize_llama``): activation checkpointing, ``torch.compile`` of the blocks, and the
FSDP2 sharding units. The model classes know nothing of any of it.

Order (torchtitan's): checkpoint each block -> compile each block -> ``fully_shard`` unit by unit.
Activation checkpointing is ``torch.distributed._composable.checkpoint``: forward hooks, so module
structure and parameter names are unchanged (checkpoints, HF export and the sharded init see the
same names with and without it). Compile is ``nn.Module.compile`` (in place, names unchanged).

``blocks`` of a model: its ``decoder_blocks()`` if it has one (the HF-native path names its decoder
layers), else ``model.blocks``.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

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
        return None, None  # the parameters themselves are bf16
    raise ValueError(f"train.precision={precision!r}; valid options: {list(PRECISIONS)}")


@dataclass(frozen=True)
class ParallelizeConfig:
    """What :func:`parallelize` applies."""

    activation_checkpointing: bool = False
    """Recompute each block's activations in backward (keeps only the block inputs)."""
    compile: bool = False
    """``torch.compile`` each block (fullgraph not required; attention kernels stay opaque)."""
    precision: str = "fp32"
    """fp32 | bf16 (bf16 compute, fp32 gradient reduction) | bf16-pure: the FSDP2 mixed precision."""
    reshard_after_forward: bool = True
    """FSDP2: free the gathered parameters of a unit after its forward (re-gathered in backward)."""


def blocks_of(model) -> list[torch.nn.Module]:
    """The repeated decoder blocks of ``model`` (the units of checkpointing, compile and FSDP2)."""
    if hasattr(model, "decoder_blocks"):
        return list(model.decoder_blocks())
    return list(model.blocks)


def apply_activation_checkpointing(model) -> None:
    from torch.distributed._composable import checkpoint

    for block in blocks_of(model):
        checkpoint(block)


def set_activation_checkpointing(model, enabled: bool) -> None:
    """Switch the recompute of already checkpointed blocks on or off (no effect on others)."""
    from torch.distributed._composable import checkpoint

    for block in blocks_of(model):
        state = checkpoint.state(block)
        if state is not None:  # None: not checkpointed
            state.enable_hook = enabled


@contextmanager
def activation_checkpointing_disabled(model):
    """Run forward without the recompute (e.g. to measure what a block would save)."""
    from torch.distributed._composable import checkpoint

    states = []
    for block in blocks_of(model):
        try:
            state = checkpoint.state(block)
        except Exception:  # noqa: BLE001 -- not checkpointed
            continue
        if state is None:  # torch 2.13: a block that was never checkpointed has no state
            continue
        states.append((state, state.enable_hook))
        state.enable_hook = False
    try:
        yield
    finally:
        for state, enabled in states:
            state.enable_hook = enabled


def apply_compile(model) -> None:
    for block in blocks_of(model):
        block.compile()


def shard_units(model, mesh, cfg: ParallelizeConfig) -> list:
    """``fully_shard`` unit by unit: the token embedding, every block, final norm + head (kept
    gathered: they run right before backward starts), then the root. Tied embeddings: embedding
    and head share a weight, so both stay in the root unit. Returns the FSDP modules.

    Trade-off, measured: separate embedding and head units keep the vocabulary-sized weights
    sharded outside their own forward/backward (GiBs at real vocabularies, torchtitan's layout),
    at 2 all-gathers + 1 reduce-scatter more per micro-batch. On the tiny CPU preset, where
    collective latency dominates, that is the 5% of ``benchmarks/results/hot_path_cpu.md``."""
    param_dtype, reduce_dtype = precision_dtypes(cfg.precision)
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    kw = dict(mesh=mesh, mp_policy=mp)
    units = []
    embed, head, norm = model.input_embedding(), model.output_head(), model.final_norm()
    tied = getattr(head, "weight", None) is None or head.weight is embed.weight
    if not tied:
        units.append(fully_shard(embed, reshard_after_forward=cfg.reshard_after_forward, **kw))
    for block in blocks_of(model):
        units.append(fully_shard(block, reshard_after_forward=cfg.reshard_after_forward, **kw))
    if not tied:
        fully_shard([norm, head], reshard_after_forward=False, **kw)
        units.append(norm)
    fully_shard(model, reshard_after_forward=cfg.reshard_after_forward, **kw)
    units.append(model)
    for m in units:
        m.set_gradient_divide_factor(1.0)  # sums: each rank's loss is already / global targets
        m.set_force_sum_reduction_for_comms(True)  # gloo has no PREMUL_SUM/AVG reduce-scatter
    return units


def parallelize(model, mesh, cfg: ParallelizeConfig) -> list:
    """Checkpointing, compile and FSDP2 on ``model`` (built on ``meta``); returns the FSDP units.
    ``mesh=None``: no sharding (DeepSpeed shards under ``zero.Init`` itself)."""
    if cfg.activation_checkpointing:
        apply_activation_checkpointing(model)
    if cfg.compile:
        apply_compile(model)
    return [] if mesh is None else shard_units(model, mesh, cfg)
