"""Checkpoints: model + optimizer + scheduler (the engine's), sampler position, step and RNG.

Layout (``<output_dir>/checkpoints``)::

    step_000010/engine.pt | deepspeed/     the engine's state (FSDP2: full state on rank 0)
    step_000010/trainer.pt                  step, sampler state, config (rank 0)
    step_000010/rng_rank<r>.pt              python/numpy/torch RNG of every rank
    latest                                  "step_000010", written last

A checkpoint is written into ``step_N.tmp`` and renamed once every rank has finished writing, and
``latest`` is replaced atomically after that, so a rank killed mid-save never leaves a checkpoint
that ``latest`` points to but that is incomplete. The sampler state saved is the one from BEFORE
the next batch was drawn (the trainer draws step t+1's batch early to plan it), so a resumed run
draws exactly the batches the uninterrupted run would have. Checkpoints live on a filesystem every
rank can read (one node, or a shared filesystem for multi-node runs).
"""
from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist


def rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _barrier():
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def save_checkpoint(root: Path, step: int, engine, trainer_state: dict, keep: int = 2) -> Path:
    """Collective. ``step`` = number of completed steps. Returns the checkpoint directory."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    root = Path(root)
    name = f"step_{step:06d}"
    tmp, final = root / f"{name}.tmp", root / name
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    engine.save(tmp)
    torch.save(rng_state(), tmp / f"rng_rank{rank}.pt")
    if rank == 0:
        torch.save({"step": step, **trainer_state}, tmp / "trainer.pt")
    _barrier()
    if rank == 0:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        with open(root / "latest.tmp", "w") as fh:
            fh.write(name)
        os.replace(root / "latest.tmp", root / "latest")
        done = sorted(p for p in root.glob("step_*") if p.is_dir() and not p.name.endswith(".tmp"))
        for old in done[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def latest_checkpoint(root: Path) -> Path | None:
    p = Path(root) / "latest"
    if not p.is_file():
        return None
    d = Path(root) / p.read_text().strip()
    if not (d / "trainer.pt").is_file():
        raise ValueError(f"{p} points to {d}, which is not a complete checkpoint")
    return d


def load_checkpoint(directory: Path, engine) -> dict:
    """Collective. Restores the engine and this rank's RNG; returns the trainer state."""
    directory = Path(directory)
    if not (directory / "trainer.pt").is_file():
        raise ValueError(f"{directory} is not a checkpoint (no trainer.pt)")
    rank = dist.get_rank() if dist.is_initialized() else 0
    engine.load(directory)
    state = torch.load(directory / "trainer.pt", map_location="cpu", weights_only=False)
    rng = directory / f"rng_rank{rank}.pt"
    if rng.is_file():
        set_rng_state(torch.load(rng, map_location="cpu", weights_only=False))
    return state
