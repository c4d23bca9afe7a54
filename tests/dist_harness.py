"""Run a function on N real processes joined by a gloo process group, with a hard timeout.

Spawning ranks costs seconds, so put many cases into one call and loop inside ``fn``.

API::

    from dist_harness import run_distributed

    def body(rank, world_size, scale):       # module-level (picklable) function
        import torch, torch.distributed as dist
        t = torch.ones(1) * rank * scale
        dist.all_reduce(t)
        return t.item()                      # any picklable value

    results = run_distributed(body, world_size=2, args=(3,), timeout=60)
    # results == [3.0, 3.0]   (index = rank)

``run_distributed(fn, world_size, args=(), kwargs=None, timeout=120, backend="gloo",
threads_per_rank=1, env=None)``

- Each rank is a fresh ``spawn`` process with RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR /
  MASTER_PORT set (a free localhost port), ``torch.distributed`` initialised with ``backend``
  (default gloo), and ``torch.set_num_threads(threads_per_rank)``; then it calls
  ``fn(rank, world_size, *args, **kwargs)``. ``env`` adds environment variables.
- Returns the list of per-rank return values.
- If any rank raises, raises ``RankError`` carrying that rank's formatted traceback (the other
  ranks are terminated, they might be blocked in a collective with the failed one).
- If ranks have not all finished after ``timeout`` seconds, they are killed and
  ``TimeoutError`` is raised, so a deadlock never hangs the test suite.
- ``fn`` must be importable by the children: a module-level function in a module that is on
  ``sys.path`` (tests/ is, under pytest).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue as queue_mod
import socket
import time
import traceback


class RankError(RuntimeError):
    """A rank raised; the message holds its traceback."""


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child(fn, rank, world_size, port, backend, threads, env, args, kwargs, q):
    try:
        os.environ.update({k: str(v) for k, v in (env or {}).items()})
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        import torch
        import torch.distributed as dist

        torch.set_num_threads(threads)
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size,
                                init_method=f"tcp://127.0.0.1:{port}")
        try:
            result = fn(rank, world_size, *args, **kwargs)
        finally:
            try:
                dist.destroy_process_group()
            except Exception:
                pass
        q.put((rank, True, result))
    except BaseException:
        q.put((rank, False, traceback.format_exc()))


def run_distributed(fn, world_size, args=(), kwargs=None, timeout=120.0, backend="gloo",
                    threads_per_rank=1, env=None):
    """Run ``fn(rank, world_size, *args, **kwargs)`` on ``world_size`` spawned ranks.

    See the module docstring for the full contract.
    """
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_child, daemon=True,
                         args=(fn, r, world_size, port, backend, threads_per_rank, env,
                               tuple(args), dict(kwargs or {}), q))
             for r in range(world_size)]
    for p in procs:
        p.start()
    results, deadline = {}, time.monotonic() + timeout
    try:
        while len(results) < world_size:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"ranks {sorted(set(range(world_size)) - set(results))} "
                                   f"did not finish within {timeout}s (deadlock?)")
            try:
                rank, ok, value = q.get(timeout=min(left, 1.0))
            except queue_mod.Empty:
                dead = [r for r, p in enumerate(procs)
                        if r not in results and p.exitcode not in (None, 0)]
                if dead:
                    time.sleep(0.5)   # let a traceback already in flight arrive
                    if q.empty():
                        raise RankError(f"rank(s) {dead} died with exit codes "
                                        f"{[procs[r].exitcode for r in dead]} and no traceback")
                continue
            if not ok:
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
