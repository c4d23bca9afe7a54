"""Step executor: a Plan plus the step's GlobalBatch -> this rank's forward/backward work.

For every micro-batch of the plan, in order, each rank looks up its group
(``MicroBatchPlan.group_of_rank``). A rank in a group packs the group's documents into one varlen
buffer (every rank of the group packs the same buffer), shards it across the group with the group's
attention mode (``shard_inputs``) and runs forward/backward. The loss of every micro-batch is
``sum of token losses / T`` where ``T`` is the number of target tokens of the WHOLE global batch,
known on every rank from the batch's lengths (a document of L tokens has L-1 targets). Summed over
ranks and micro-batches the gradients are therefore exactly those of single-device training on the
global batch, whatever the plan. The engine (FSDP2 / DeepSpeed) sums gradients over all ranks.

Lockstep (why this cannot deadlock): FSDP2 and ZeRO-3 all-gather each layer's parameters on the
whole world in forward and reduce-scatter its gradients in backward, so every rank must run the
same number of forward/backward passes per step through the same modules. A rank with no group in
a micro-batch (idle) therefore runs a *zero-weight pass*: a 2-token local forward/backward whose
loss is multiplied by 0 (all gradients exactly 0, every parameter touched). Hence all ranks issue
the world collectives in one identical order (micro-batch, layer, forward/backward), and the SP
collectives of a group are issued in one identical order by the group's ranks; groups of one
micro-batch use disjoint communicators (aligned blocks, see flexsp.topology). Take the first
collective, in that global order, that has not completed: every participant has completed all of
its earlier collectives, so it reaches this one and it completes - by induction every collective
completes. A group that finishes its micro-batch early just waits in the next world all-gather.
"""
from __future__ import annotations

import itertools
import time
from dataclasses import dataclass

import torch

from flexsp.data import GlobalBatch, pack_documents
from flexsp.model import shard_inputs
from solver.plan import Plan


def num_targets(lengths) -> int:
    """Target tokens of a global batch: every document of L tokens predicts L-1 of them."""
    return int(sum(int(n) - 1 for n in lengths))


@dataclass
class StepResult:
    loss_sum: torch.Tensor
    """This rank's summed token loss over the step (all micro-batches), fp32 on the device."""
    targets: torch.Tensor
    """This rank's target tokens over the step, on the device."""
    tokens: torch.Tensor
    """Tokens this rank processed (its shards, real tokens only), on the device."""
    idle_passes: int
    """Micro-batches this rank ran the zero-weight pass in."""
    seconds: float
    """Host time of the loop (the device may still be running: nothing here synchronises)."""


class StepExecutor:
    """Runs one plan on this rank. ``engine`` provides ``module`` (forward), ``backward(loss)`` and
    ``begin_micro_batch(last)``.

    No host synchronisation inside the micro-batch loop: document boundaries are known on the host
    (from the batch's lengths), and loss, target and token counts accumulate on the device; the
    trainer reads them once per step."""

    def __init__(self, engine, source, topology, rank: int, device: torch.device, heads: int):
        self.engine, self.source, self.topo = engine, source, topology
        self.rank, self.device, self.heads = rank, device, heads
        self.fail_after_forward = ""
        """Testing the abort path (train.fail_at_step): raise this message after the forward of this
        rank's next micro-batch, while its peers are inside the micro-batch's collectives."""

    def _group(self, g):
        if g.sp == 1:
            return None
        return self.topo.group(g.sp, g.ranks[0] // g.sp)

    def run(self, plan: Plan, batch: GlobalBatch) -> StepResult:
        """Forward/backward of every micro-batch of ``plan`` on this rank (gradients accumulate)."""
        t0 = time.perf_counter()
        if plan.num_devices != self.topo.world_size:
            raise ValueError(f"plan is for {plan.num_devices} ranks, the world has {self.topo.world_size}")
        total_targets = num_targets(batch.lengths)
        if total_targets < 1:
            raise ValueError(f"global batch {batch.step} has no target tokens (lengths {batch.lengths[:8]})")
        scale = 1.0 / total_targets
        model = self.engine.module
        zero = torch.zeros((), dtype=torch.float32, device=self.device)
        loss_sum, targets, tokens, idle = zero.clone(), zero.clone(), zero.clone(), 0
        last = len(plan.micro_batches) - 1
        for index, mb in enumerate(plan.micro_batches):
            self.engine.begin_micro_batch(index == last)
            g = mb.group_of_rank(self.rank)
            if g is None:
                # zero-weight pass: keeps the world collectives of FSDP/ZeRO-3 in lockstep
                ids = torch.zeros(2, dtype=torch.long, device=self.device)
                inputs = shard_inputs(ids, torch.tensor([0, 2], dtype=torch.int32))
                ls, _ = inputs.loss(model)
                self.engine.backward(ls * 0.0)
                idle += 1
                continue
            packed = pack_documents(self.source, batch.select(g.seq_ids), device=self.device)
            # boundaries on the host (from the known lengths): sharding never reads the device
            lengths = [int(batch.lengths[i]) for i in g.seq_ids]
            cu_host = torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32)
            mode = "ulysses" if g.attention == "local" else g.attention
            inputs = shard_inputs(packed.input_ids, cu_host, self._group(g), mode,
                                  labels=packed.labels, heads=self.heads)
            ls, cnt = inputs.loss(model)
            if self.fail_after_forward:
                raise RuntimeError(self.fail_after_forward)
            self.engine.backward(ls * scale)
            loss_sum += ls.detach().float()
            targets += cnt
            n_local = inputs.input_ids.numel()
            tokens += n_local if inputs.pad_mask is None else (~inputs.pad_mask).sum()
        return StepResult(loss_sum, targets, tokens, idle, time.perf_counter() - t0)
