"""Run a function on N local processes, one per rank, with a hard timeout.

Each rank is a fresh ``spawn`` process with RANK / WORLD_SIZE / LOCAL_RANK / LOCAL_WORLD_SIZE /
MASTER_ADDR / MASTER_PORT set (a free localhost port, so ``init_process_group`` with the default
``env://`` works) and ``torch.set_num_threads(threads_per_rank)``; it calls
``fn(rank, world_size, *args, **kwargs)`` and destroys any process group ``fn`` left initialised.

A rank that raises a :class:`flexsp.errors.UserError` fails the run with that error (its one line);
a rank that raises anything else fails it with a ``RankError`` carrying its traceback (the others
are killed: they may be blocked in a collective with it); ranks still running after ``timeout``
seconds are killed and ``TimeoutError`` is raised, so a deadlock never hangs the caller. Used by
``flexsp-profile`` and by the test suite's ``dist_harness``.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue as queue_mod
import socket
import time
import traceback

import torch
import torch.distributed as dist

from flexsp.errors import UserError


class RankError(RuntimeError):
    """A rank raised or died; the message holds its traceback or exit code."""


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child(fn, rank, world_size, port, threads, env, args, kwargs, q):
    try:
        os.environ.update({k: str(v) for k, v in (env or {}).items()})
        os.environ.update(
            RANK=str(rank),
            WORLD_SIZE=str(world_size),
            LOCAL_RANK=str(rank),
            LOCAL_WORLD_SIZE=str(world_size),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
        )
        torch.set_num_threads(threads)
        try:
            result = fn(rank, world_size, *args, **kwargs)
        finally:
            if dist.is_initialized():
                try:
                    dist.destroy_process_group()
                except Exception:
                    pass
        q.put((rank, True, result))
    except UserError as exc:  # the user's input: one line, not a traceback
        q.put((rank, False, UserError(str(exc))))
    except BaseException:
        q.put((rank, False, traceback.format_exc()))


def spawn_ranks(
    fn,
    world_size: int,
    args=(),
    kwargs=None,
    *,
    timeout: float = 120.0,
    threads_per_rank: int = 1,
    env: dict | None = None,
) -> list:
    """``fn(rank, world_size, *args, **kwargs)`` on ``world_size`` spawned ranks; the per-rank
    return values (index = rank). ``fn`` must be a picklable module-level function."""
    ctx = mp.get_context("spawn")
    q, port = ctx.Queue(), _free_port()
    procs = [
        ctx.Process(
            target=_child,
            daemon=True,
            args=(fn, r, world_size, port, threads_per_rank, env, tuple(args), dict(kwargs or {}), q),
        )
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    results, deadline = {}, time.monotonic() + timeout
    try:
        while len(results) < world_size:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(
                    f"ranks {sorted(set(range(world_size)) - set(results))} "
                    f"did not finish within {timeout}s (deadlock?)"
                )
            try:
                rank, ok, value = q.get(timeout=min(left, 1.0))
            except queue_mod.Empty:
                dead = [r for r, p in enumerate(procs) if r not in results and p.exitcode not in (None, 0)]
                if dead:
                    time.sleep(0.5)  # let a traceback already in flight arrive
                    if q.empty():
                        raise RankError(
                            f"rank(s) {dead} died with exit codes "
                            f"{[procs[r].exitcode for r in dead]} and no traceback"
                        )
                continue
            if not ok:
                if isinstance(value, UserError):
                    raise value
                raise RankError(f"rank {rank} of {world_size} raised:\n{value}")
            results[rank] = value
    finally:
        for p in procs:
            if p.is_alive():
                p.join(timeout=2 if len(results) == world_size else 0)
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
    return [results[r] for r in range(world_size)]
