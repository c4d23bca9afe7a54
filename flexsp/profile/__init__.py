"""``flexsp-profile``: measure this machine and model, write a calibrated cost model.

Why: the planner is only as good as its cost model; hand constants (or the paper's GPU numbers)
say nothing about the hardware at hand. The profiler times real micro-batches of the training
code path (executor + engine, the model built on meta and sharded exactly as training builds it:
no unsharded copy anywhere) on every rank at once, fits the CostModel's terms (a1, a2, b,
per_sequence_ms by one joint NNLS on relative error; per mode:degree the effective Ulysses / ring
bandwidth, group_latency_ms and per_sequence_comm_ms), measures raw link latency and bandwidth and
activation memory per token (CUDA allocator peak, or an honest CPU estimate from the tensors saved
for backward), then validates the model on held-out long-tailed global batches (every micro-batch
and the whole step, predicted vs measured).

At scale: only ``profile_layers`` transformer layers are built (and ``profile_layers // 2``): the
two depths separate the per-layer work from the fixed embedding/head/loss part, and the written
cost model is scaled to the model's full depth (a1, a2, b, per_sequence_ms, every communication
term, the optimizer step, activations). Shapes are generated up to ``max_len`` (default the model's
context length: long single documents, equal splits, long-tailed mixes), so a1 is pinned where long
documents live. Activation checkpointing is profiled as configured: the timed work includes the
recompute and the SP collectives it re-issues, the activation memory is the checkpointed one, the
analytic volumes count the forward collectives twice, and the cost model records it (with the
model shape: layers, hidden, heads, kv_heads of the FULL model).

Outputs in ``output_dir``: ``<name>.json`` (a CostModel: ``flexsp-plan --cost-model FILE`` and
``solver.cost_model=FILE`` in training read it), ``<name>.report.json`` (raw timings, fits,
validation), ``<name>.md`` (summary tables) and ``<name>.png`` (measured vs fitted).

Usage::

    flexsp-profile                                   # 2 spawned gloo ranks, tiny model
    flexsp-profile model=small profile.world_size=4 profile.name=cpu4 output_dir=benchmarks/results
    flexsp-profile model.hf_checkpoint=/models/my-qwen3 profile.max_len=4096   # your own model
    flexsp-profile model=7b profile.profile_layers=2 profile.max_len=131072 profile.num_devices=64
    torchrun --nproc_per_node 8 -m flexsp.profile model=7b   # reuse a launcher's world
    flexsp-profile --help                            # every field, its default and meaning

Config: the training tree (``configs/config.yaml``: the model, ``train.precision``, ``parallel.engine``,
``parallel.backend``, ``parallel.devices_per_node``, ``output_dir``) plus the ``profile`` section
(``configs/profile/default.yaml``, fields documented in :class:`flexsp.config.ProfileConfig`), composed
by Hydra (see flexsp.profile.cli).
"""

from flexsp.config import ProfileConfig
from flexsp.profile.cli import main
from flexsp.profile.runner import profile

__all__ = ["ProfileConfig", "main", "profile"]
