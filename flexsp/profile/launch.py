"""Start the profiler's ranks: reuse a torchrun world, or spawn ``world_size`` local processes
(``flexsp.spawn.spawn_ranks``: env for ``init_process_group``, ``threads_per_rank`` torch threads,
a rank that raises fails the run with its traceback, ranks still running after ``timeout_s`` are
killed).
"""

from __future__ import annotations

import os

from flexsp.spawn import spawn_ranks


def _call(rank, world_size, fn, arg):
    return fn(arg)


def run_ranks(fn, world: int, arg, threads: int = 1, timeout_s: float = 900.0):
    """``fn(arg)`` on every rank; returns the per-rank results (index = rank)."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # launched by torchrun: we are a rank
        return [fn(arg)]
    return spawn_ranks(
        _call,
        world,
        args=(fn, arg),
        timeout=timeout_s,
        threads_per_rank=threads,
        env={"OMP_NUM_THREADS": threads},
    )
