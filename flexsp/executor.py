"""Step executor: a Plan plus the step's GlobalBatch -> this rank's forward/backward work.

For every micro-batch of the plan, in order, each rank looks up its group
(``MicroBatchPlan.group_of_rank``). A rank in a group packs the group's documents into one varlen
buffer (every rank of the group packs the same buffer), shards it across the group with the group's
attention mode (``shard_inputs``) and runs forward/backward. The loss of every micro-batch is
``sum of token losses / T`` where ``T`` is the number of target tokens of the WHOLE global batch,
known on every rank from the batch (``GlobalBatch.num_targets``: a document of L tokens has L-1
targets; for supervised fine-tuning, the source's count of its trained tokens). Summed over
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

import time
from dataclasses import dataclass

import torch

from flexsp.data import GlobalBatch
from flexsp.pipeline import InputPipeline
from solver.plan import Plan


def num_targets(lengths) -> int:
    """Target tokens of a pre-training global batch: every document of L tokens predicts L-1 of
    them (:attr:`GlobalBatch.num_targets` also covers SFT batches)."""
    return int(sum(int(n) - 1 for n in lengths))


@dataclass
class StepResult:
    loss_sum: torch.Tensor
    """This rank's summed token loss over the step (all micro-batches), fp32 on the device."""
    targets: int
    """This rank's target tokens over the step (known on the host from the layout)."""
    tokens: int
    """Tokens this rank processed (its shards, real tokens only; known on the host)."""
    idle_passes: int
    """Micro-batches this rank ran the zero-weight pass in."""
    seconds: float
    """Host time of the loop (the device may still be running: nothing here synchronises)."""


class StepExecutor:
    """Runs one plan on this rank. ``engine`` provides ``module`` (forward), ``backward(loss)`` and
    ``begin_micro_batch(last)``.

    No host synchronisation in the step: every micro-batch's inputs, boundaries and counts are
    prepared on the host by :class:`flexsp.pipeline.InputPipeline` (a background thread) and copied
    asynchronously; the loss accumulates on the device, and the trainer reads it once per step."""

    def __init__(self, engine, source, topology, rank: int, device: torch.device, heads: int):
        self.engine, self.topo, self.rank, self.device = engine, topology, rank, device
        self.pipeline = InputPipeline(source, topology, rank, device, heads)

    @property
    def source(self):
        """Where the documents' tokens are read from (TokenizedCorpus, SyntheticSource, ...)."""
        return self.pipeline.source

    @source.setter
    def source(self, source) -> None:
        self.pipeline.source = source

    def run(self, plan: Plan, batch: GlobalBatch) -> StepResult:
        """Forward/backward of every micro-batch of ``plan`` on this rank (gradients accumulate)."""
        t0 = time.perf_counter()
        if plan.num_devices != self.topo.world_size:
            raise ValueError(f"plan is for {plan.num_devices} ranks, the world has {self.topo.world_size}")
        total_targets = batch.num_targets
        if total_targets < 1:
            raise ValueError(f"global batch {batch.step} has no target tokens (lengths {batch.lengths[:8]})")
        scale = 1.0 / total_targets
        model, pipe = self.engine.module, self.pipeline
        loss_sum = torch.zeros((), dtype=torch.float32, device=self.device)
        targets = tokens = idle = 0
        futures = pipe.submit(plan, batch)
        last = len(plan.micro_batches) - 1
        ready = pipe.copy(futures[0]) if futures else None
        for index in range(len(plan.micro_batches)):
            current = ready
            if index < last:  # queue the next copy before this micro-batch's compute
                ready = pipe.copy(futures[index + 1])
            self.engine.begin_micro_batch(index == last)
            inputs = pipe.wait(current)
            if inputs is None:
                # zero-weight pass: keeps the world collectives of FSDP/ZeRO-3 in lockstep
                ls, _ = pipe.idle_inputs().loss(model)
                self.engine.backward(ls * 0.0)
                idle += 1
                continue
            ls, _ = inputs.loss(model)
            self.engine.backward(ls * scale)
            loss_sum += ls.detach().float()
            targets += current.host.num_targets
            tokens += current.host.num_tokens
        return StepResult(loss_sum, targets, tokens, idle, time.perf_counter() - t0)

    def close(self) -> None:
        self.pipeline.close()
