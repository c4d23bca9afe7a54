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

from flexsp.spawn import RankError, spawn_ranks

__all__ = ["RankError", "run_distributed"]


def _init_and_call(rank, world_size, fn, backend, args, kwargs):
    import torch.distributed as dist

    dist.init_process_group(backend=backend, rank=rank, world_size=world_size)  # env:// from spawn_ranks
    return fn(rank, world_size, *args, **kwargs)


def run_distributed(
    fn, world_size, args=(), kwargs=None, timeout=120.0, backend="gloo", threads_per_rank=1, env=None
):
    """Run ``fn(rank, world_size, *args, **kwargs)`` on ``world_size`` spawned ranks with a
    ``backend`` process group (``flexsp.spawn.spawn_ranks`` does the spawning and the timeout).

    See the module docstring for the full contract.
    """
    return spawn_ranks(
        _init_and_call,
        world_size,
        args=(fn, backend, tuple(args), dict(kwargs or {})),
        timeout=timeout,
        threads_per_rank=threads_per_rank,
        env=env,
    )
