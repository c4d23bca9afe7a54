"""The input pipeline of a step: host preparation in a background thread, asynchronous copies.

Everything about a micro-batch's inputs is known on the host: which documents the rank's group
trains (from the plan), their tokens (from the memory-mapped source), the boundaries, positions,
labels, the SP shard layout and the counts of targets and real tokens. A single worker thread
prepares every micro-batch of the step in order (:func:`flexsp.model.inputs.host_inputs`, into
pinned memory when a GPU exists) while the main thread trains the earlier ones. The main thread
queues the copy of micro-batch ``i + 1`` (on a side stream on CUDA, so it overlaps the compute of
micro-batch ``i``) before it launches micro-batch ``i``, and makes the compute stream wait for a
copy only where its tensors are first used. No value is ever read back from the device here.
"""

from __future__ import annotations

import itertools
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch

from flexsp.data import GlobalBatch, pack_documents
from flexsp.model.inputs import HostInputs, ModelInputs, host_inputs
from solver.plan import Plan


@dataclass
class Ready:
    """A micro-batch's inputs on the device, and the copy the compute stream must wait for."""

    inputs: ModelInputs | None
    """None: this rank has no group in the micro-batch (it runs the zero-weight pass)."""
    host: HostInputs | None
    """What the inputs were copied from (its counts are the host-side truth)."""
    copied: torch.cuda.Event | None = None
    """Recorded on the copy stream after the copies (CUDA only)."""


class InputPipeline:
    """Prepares and copies one rank's micro-batch inputs (see the module docstring)."""

    def __init__(self, source, topology, rank: int, device: torch.device, heads: int):
        self.source, self.topo, self.rank, self.device, self.heads = source, topology, rank, device, heads
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="flexsp-inputs")
        self._stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self._idle: ModelInputs | None = None

    def _group(self, g):
        return None if g.sp == 1 else self.topo.group(g.sp, g.ranks[0] // g.sp)

    def _prepare(self, g, batch: GlobalBatch) -> HostInputs:
        """Worker thread: pack the group's documents on the host and lay out this rank's share."""
        packed = pack_documents(self.source, batch.select(g.seq_ids))
        cu = [0, *itertools.accumulate(int(batch.lengths[i]) for i in g.seq_ids)]
        mode = "ulysses" if g.attention == "local" else g.attention
        return host_inputs(packed.input_ids, cu, self._group(g), mode, labels=packed.labels, heads=self.heads)

    def submit(self, plan: Plan, batch: GlobalBatch) -> list[Future | None]:
        """Queue the host preparation of every micro-batch this rank trains in ``plan``."""
        futures = []
        for mb in plan.micro_batches:
            g = mb.group_of_rank(self.rank)
            futures.append(None if g is None else self._pool.submit(self._prepare, g, batch))
        return futures

    def copy(self, future: Future | None) -> Ready:
        """Wait for the host preparation (not the device) and queue the copies."""
        if future is None:
            return Ready(None, None)
        host = future.result()
        if self._stream is None:
            return Ready(host.to_device(self.device), host)
        main = torch.cuda.current_stream(self.device)
        self._stream.wait_stream(main)  # the copy may reuse memory the compute stream freed
        with torch.cuda.stream(self._stream):
            inputs = host.to_device(self.device)
            event = torch.cuda.Event()
            event.record(self._stream)
        for t in (inputs.input_ids, inputs.positions, inputs.labels, inputs.pad_mask):
            if t is not None:
                t.record_stream(main)  # freed only after the compute stream is done with it
        return Ready(inputs, host, event)

    def wait(self, ready: Ready) -> ModelInputs | None:
        """Make the compute stream wait for the copies of ``ready`` (no host wait)."""
        if ready.copied is not None:
            torch.cuda.current_stream(self.device).wait_event(ready.copied)
        return ready.inputs

    def idle_inputs(self) -> ModelInputs:
        """The zero-weight pass's 2-token inputs, prepared once and kept on the device."""
        if self._idle is None:
            host = host_inputs(torch.zeros(2, dtype=torch.long), [0, 2])
            self._idle = host.to_device(self.device)
        return self._idle

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
