"""Start the profiler's ranks: reuse a torchrun world, or spawn ``world_size`` local processes.

Spawned ranks get RANK/WORLD_SIZE/LOCAL_RANK/MASTER_* on a free localhost port and
``threads_per_rank`` torch threads; a rank that raises fails the whole run with its traceback,
and ranks still running after ``timeout_s`` are killed (no hang).
"""
from __future__ import annotations

import multiprocessing as mp
import os
import queue as queue_mod
import socket
import time
import traceback


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child(fn, rank, world, port, threads, arg, q):
    try:
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                          LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                          OMP_NUM_THREADS=str(threads))
        import torch
        import torch.distributed as dist
        torch.set_num_threads(threads)
        try:
            result = fn(arg)
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()
        q.put((rank, True, result))
    except BaseException:
        q.put((rank, False, traceback.format_exc()))


def run_ranks(fn, world: int, arg, threads: int = 1, timeout_s: float = 900.0):
    """``fn(arg)`` on every rank; returns the per-rank results (index = rank)."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # launched by torchrun: we are a rank
        return [fn(arg)]
    ctx = mp.get_context("spawn")
    q, port = ctx.Queue(), _free_port()
    procs = [ctx.Process(target=_child, args=(fn, r, world, port, threads, arg, q), daemon=True)
             for r in range(world)]
    for p in procs:
        p.start()
    results, deadline = {}, time.monotonic() + timeout_s
    try:
        while len(results) < world:
            if time.monotonic() > deadline:
                raise TimeoutError(f"profile ranks {sorted(set(range(world)) - set(results))} did not "
                                   f"finish within timeout_s={timeout_s}")
            try:
                rank, ok, value = q.get(timeout=1.0)
            except queue_mod.Empty:
                dead = [r for r, p in enumerate(procs) if r not in results and p.exitcode not in (None, 0)]
                if dead and q.empty():
                    time.sleep(0.5)
                    if q.empty():
                        raise RuntimeError(f"profile rank(s) {dead} died with exit codes "
                                           f"{[procs[r].exitcode for r in dead]}")
                continue
            if not ok:
                raise RuntimeError(f"profile rank {rank} of {world} raised:\n{value}")
            results[rank] = value
    finally:
        for p in procs:
            p.join(timeout=2 if len(results) == world else 0)
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
    return [results[r] for r in range(world)]
