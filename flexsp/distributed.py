"""Process-group start-up: NCCL on CUDA, gloo otherwise; device from LOCAL_RANK.

Nothing here hard-codes a backend or device: the backend follows CUDA availability (or the
caller), and the device index comes from the launcher's ``LOCAL_RANK``.
"""

from __future__ import annotations

import datetime
import os
import socket

import torch
import torch.distributed as dist

from flexsp.errors import UserError


def default_backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def _bound(device: torch.device) -> dict:
    """``device_id`` for a CUDA rank: NCCL binds its communicators to the device at init (eager
    init, communicator splitting for subgroups) and barriers use it instead of guessing."""
    return {"device_id": device} if device.type == "cuda" else {}


def init_distributed(backend: str | None = None, timeout_s: float = 600.0, *, single: bool = False):
    """Initialise the default process group from the env:// variables (RANK, WORLD_SIZE,
    MASTER_ADDR, MASTER_PORT, LOCAL_RANK) if not already done; ``single``: a 1-rank world on a free
    localhost port, without touching the environment (a plain ``python -m flexsp.train`` or a
    library call), so nothing leaks into subprocesses started later from this process.

    Returns ``(rank, world_size, device)``. Idempotent.
    """
    backend = backend or default_backend()
    valid = ("nccl", "gloo", "mpi", "ucc")
    if backend not in valid:
        raise UserError(f"backend must be one of {valid}, got {backend!r}")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if backend == "nccl":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        if single:
            with socket.socket() as sock:
                sock.bind(("127.0.0.1", 0))
                port = sock.getsockname()[1]
            dist.init_process_group(
                backend=backend,
                init_method=f"tcp://127.0.0.1:{port}",
                rank=0,
                world_size=1,
                timeout=datetime.timedelta(seconds=timeout_s),
                **_bound(device),
            )
        else:
            dist.init_process_group(
                backend=backend, timeout=datetime.timedelta(seconds=timeout_s), **_bound(device)
            )
    return dist.get_rank(), dist.get_world_size(), device
