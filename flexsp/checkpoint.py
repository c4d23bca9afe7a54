"""Checkpoints: sharded model + optimizer state, LR schedule, sampler position, step and RNG.

Layout (``<output_dir>/checkpoints``)::

    step_000010/dcp/               FSDP2: a torch.distributed.checkpoint directory; every rank wrote
                                   its own shards (``__<rank>_0.distcp``), rank 0 the ``.metadata``
    step_000010/deepspeed/engine/  DeepSpeed: its own partitioned format (one file per rank)
    step_000010/trainer.pt         step, sampler state, scheduler, config, model config, world size
    step_000010/rng_rank<r>.pt     python/numpy/torch RNG of every rank
    latest                         "step_000010", written last

No rank ever holds the full state: DCP writes each rank's DTensor shards and reshards them on load,
so a checkpoint written by 4 ranks resumes on 2 or on 1 (each rank reads just the pieces of its new
shards). A checkpoint is written into ``step_N.tmp`` and renamed once complete, and ``latest`` is
replaced atomically after that, so a rank killed mid-save never leaves a checkpoint that ``latest``
points to but that is incomplete. With ``async_save`` the DCP write runs in a background thread on
its own gloo process group (training continues); the rename happens when it has completed (at the
next checkpoint, or at the end of training).

Loading checks the checkpoint first (:func:`verify_checkpoint`): a missing ``trainer.pt`` or DCP
metadata, or a missing or truncated shard file, is a ValueError naming the file, not a traceback
from deep inside the reader. Before anything is loaded, the checkpoint's model config, engine and precision
are compared with the run's (:func:`check_resumable`; ``train.resume=auto`` resumes any checkpoint
an ``output_dir`` holds, which may be another model's): a difference is one ValueError listing the
differing fields (old -> new) and the two ways out. The vocabulary is the model config's
``vocab_size`` (the embedding rows, which follow the data's tokenizer). ``activation_checkpointing``
(no effect on the weights) and ``dtype`` (the precision's parameter dtype: compared as
``precision``) are not compared. A checkpoint written before these fields were recorded is resumed
with a warning naming what could not be checked; its tensors' shapes are still checked by the
load. A DCP load failure of any kind is one ValueError naming the checkpoint and the first tensor
whose name or shape does not match the run's (:func:`describe_dcp_mismatch`).

The sampler state saved is the one from BEFORE the next batch was
drawn (the trainer draws step t+1's batch early to plan it), so a resumed run draws exactly the
batches of the uninterrupted one. Checkpoints live on a filesystem every rank can read.
"""

from __future__ import annotations

import os
import pickle
import random
import shutil
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from flexsp.errors import UserError
from flexsp.failure import is_peer_lost
from flexsp.log import get_logger

DCP_SUBDIR = "dcp"

log = get_logger(__name__)


def rng_state() -> dict:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier():
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


class Checkpointer:
    """Writes checkpoints under ``root`` (collective: every rank calls :meth:`save` and :meth:`close`
    at the same steps)."""

    def __init__(self, root: Path, keep: int = 2, async_save: bool = False):
        self.root, self.keep, self.async_save = Path(root), int(keep), bool(async_save)
        self._pending = None  # (future, tmp, final) of an async DCP write
        self._pg = None
        if self.async_save and dist.is_initialized() and dist.get_world_size() > 1:
            # the background write's collectives must not interleave with training's
            self._pg = dist.new_group(backend="gloo")

    def save(self, step: int, engine, trainer_state: dict) -> Path:
        """Checkpoint after ``step`` completed steps; returns the final directory."""
        self.wait()
        name = f"step_{step:06d}"
        tmp, final = self.root / f"{name}.tmp", self.root / name
        if _rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        _barrier()
        torch.save(rng_state(), tmp / f"rng_rank{_rank()}.pt")
        extra = {}
        if hasattr(engine, "state_dict"):
            extra["scheduler"] = engine.scheduler.state_dict()
            if _rank() == 0:
                torch.save({"step": step, **trainer_state, **extra}, tmp / "trainer.pt")
            if self.async_save:
                self._pending = (
                    dcp.async_save(
                        engine.state_dict(), checkpoint_id=str(tmp / DCP_SUBDIR), process_group=self._pg
                    ),
                    tmp,
                    final,
                )
                return final
            dcp.save(engine.state_dict(), checkpoint_id=str(tmp / DCP_SUBDIR))
        else:
            engine.save(tmp)
            if _rank() == 0:
                torch.save({"step": step, **trainer_state}, tmp / "trainer.pt")
        _barrier()
        self._finalize(tmp, final)
        _barrier()
        return final

    def wait(self) -> None:
        """Complete a pending async write (this rank's part; rank 0 then publishes it)."""
        if self._pending is None:
            return
        future, tmp, final = self._pending
        self._pending = None
        result = future.upload_completion if hasattr(future, "upload_completion") else future
        result.result()
        _barrier()
        self._finalize(tmp, final)
        _barrier()

    close = wait

    def _finalize(self, tmp: Path, final: Path) -> None:
        if _rank() != 0:
            return
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        with open(self.root / "latest.tmp", "w") as fh:
            fh.write(final.name)
        os.replace(self.root / "latest.tmp", self.root / "latest")
        done = sorted(p for p in self.root.glob("step_*") if p.is_dir() and not p.name.endswith(".tmp"))
        for old in done[: -self.keep] if self.keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)


def latest_checkpoint(root: Path) -> Path | None:
    p = Path(root) / "latest"
    if not p.is_file():
        return None
    d = Path(root) / p.read_text().strip()
    if not (d / "trainer.pt").is_file():
        raise UserError(
            f"{p} points to {d}, which is not a complete checkpoint (no trainer.pt); "
            f"delete {p} to start over or set train.resume=<an older step_* directory>"
        )
    return d


def verify_checkpoint(directory: Path) -> None:
    """ValueError naming the first missing or truncated file of checkpoint ``directory``."""
    directory = Path(directory)
    if not directory.is_dir():
        raise UserError(
            f"checkpoint {directory} does not exist (train.resume expects a step_* directory or auto | never)"
        )
    if not (directory / "trainer.pt").is_file():
        raise UserError(f"{directory} is not a checkpoint: {directory / 'trainer.pt'} is missing")
    dcp_dir = directory / DCP_SUBDIR
    if not dcp_dir.is_dir():
        return  # a DeepSpeed checkpoint: DeepSpeed checks its own files
    meta_file = dcp_dir / ".metadata"
    if not meta_file.is_file():
        raise UserError(f"checkpoint {directory} is incomplete: {meta_file} is missing")
    try:
        metadata = FileSystemReader(str(dcp_dir)).read_metadata()
    except (pickle.UnpicklingError, EOFError, OSError, ValueError) as exc:
        raise UserError(f"checkpoint metadata {meta_file} is corrupt ({type(exc).__name__}: {exc})") from None
    need: dict[str, int] = {}
    for info in (metadata.storage_data or {}).values():
        need[info.relative_path] = max(need.get(info.relative_path, 0), int(info.offset) + int(info.length))
    for rel, size in sorted(need.items()):
        f = dcp_dir / rel
        if not f.is_file():
            raise UserError(f"checkpoint {directory} is incomplete: shard file {f} is missing")
        if f.stat().st_size < size:
            raise UserError(
                f"checkpoint shard file {f} is truncated: {f.stat().st_size} bytes, the metadata "
                f"needs at least {size}"
            )


def read_trainer_state(directory: Path) -> dict:
    try:
        return torch.load(Path(directory) / "trainer.pt", map_location="cpu", weights_only=False)
    except (pickle.UnpicklingError, EOFError, RuntimeError) as exc:
        raise UserError(
            f"{Path(directory) / 'trainer.pt'} is corrupt ({type(exc).__name__}: {exc})"
        ) from None


UNCOMPARED_MODEL_FIELDS = ("activation_checkpointing", "dtype")
"""Model config fields a resume may change: recomputation, and the parameter dtype (which follows
``precision``, compared on its own)."""


def resume_identity(model_config: dict, engine: str, precision: str) -> dict:
    """What a checkpoint must share with the run that resumes it (the keys trainer.pt stores)."""
    return {"model_config": dict(model_config), "engine": engine, "precision": precision}


def _differences(saved: dict, expect: dict) -> tuple[list[str], list[str]]:
    """(``field old -> new`` for every difference, the fields the checkpoint does not record)."""
    diffs, unknown = [], []
    for key, field in (("engine", "parallel.engine"), ("precision", "train.precision")):
        if saved.get(key) is None:
            unknown.append(key)
        elif saved[key] != expect[key]:
            diffs.append(f"{field} {saved[key]} -> {expect[key]}")
    old_model = saved.get("model_config")
    if old_model is None:
        unknown.append("model_config")
        return diffs, unknown
    if not isinstance(old_model, dict):  # a dataclass pickled by an older trainer
        old_model = asdict(old_model)
    new_model = expect["model_config"]
    for name in [*new_model, *(k for k in old_model if k not in new_model)]:
        old, new = old_model.get(name), new_model.get(name)
        if name not in UNCOMPARED_MODEL_FIELDS and old != new:
            diffs.append(f"model.{name} {old!r} -> {new!r}")
    return diffs, unknown


def check_resumable(directory: Path, state: dict, expect: dict, auto: bool) -> None:
    """ValueError (one line) if checkpoint ``directory`` (its trainer state ``state``) is of another
    model, engine or precision than ``expect`` (:func:`resume_identity`); ``auto``: found by
    ``train.resume=auto`` in the run's output_dir (else named by ``train.resume``). Fields the
    checkpoint does not record are skipped with a warning (printed by rank 0)."""
    diffs, unknown = _differences(state, expect)
    if diffs:
        where = (
            f"output_dir holds checkpoint {directory} (train.resume=auto)"
            if auto
            else f"train.resume={directory} is a checkpoint"
        )
        ways = (
            "train with another output_dir, or set train.resume=never to start over in this one "
            "(its checkpoints are then overwritten)"
            if auto
            else "point train.resume at a checkpoint of this model, or set train.resume=never to start over"
        )
        raise UserError(
            f"{where} of another model or setup (checkpoint -> this run: {'; '.join(diffs)}); "
            f"resuming would continue a changed model: {ways}"
        )
    if unknown and _rank() == 0:
        log.warning(
            f"warning: checkpoint {directory} records no {', '.join(unknown)} (written by an "
            f"older FlexSP): resuming without checking them against this run (tensor shapes are still "
            f"checked)"
        )


def describe_dcp_mismatch(dcp_dir: Path, state_dict: dict) -> str | None:
    """The first tensor of ``state_dict`` (in its order) that the DCP checkpoint ``dcp_dir`` lacks
    or holds with another shape, as ``name: why``; None when every tensor matches."""
    from torch.distributed.checkpoint._nested_dict import flatten_state_dict

    saved = FileSystemReader(str(dcp_dir)).read_metadata().state_dict_metadata
    flat, _ = flatten_state_dict(state_dict)
    bad = []
    for name, value in flat.items():
        if not isinstance(value, torch.Tensor):
            continue
        meta = saved.get(name)
        if meta is None:
            bad.append(f"tensor {name} is not in the checkpoint")
        elif isinstance(meta, TensorStorageMetadata) and tuple(meta.size) != tuple(value.shape):
            bad.append(
                f"tensor {name} has shape {tuple(meta.size)} in the checkpoint and "
                f"{tuple(value.shape)} in this run"
            )
    if not bad:
        return None
    return bad[0] + (f" (the first of {len(bad)} mismatching tensors)" if len(bad) > 1 else "")


def _dcp_load(directory: Path, sd: dict) -> None:
    """``dcp.load`` of ``sd``; any failure is one ValueError naming the checkpoint and the first
    mismatching tensor (a peer rank lost mid-load is left as it is: flexsp.failure handles it)."""

    dcp_dir = directory / DCP_SUBDIR
    try:
        dcp.load(sd, checkpoint_id=str(dcp_dir))
    except BaseException as exc:  # noqa: BLE001 - DCP's CheckpointException is a BaseException
        if isinstance(exc, (KeyboardInterrupt, SystemExit)) or is_peer_lost(exc):
            raise
        try:
            first = describe_dcp_mismatch(dcp_dir, sd)
        except Exception:  # noqa: BLE001 - the metadata itself is unreadable: say what DCP said
            first = None
        detail = first or f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"
        raise UserError(
            f"cannot load checkpoint {directory}: {detail}; it does not fit this run's model "
            f"(train with another output_dir, or set train.resume=never)"
        ) from None


def load_checkpoint(
    directory: Path, engine, world_size: int, expect: dict | None = None, auto: bool = False
) -> dict:
    """Collective. Restores the engine and this rank's RNG; returns the trainer state. ``expect``
    (:func:`resume_identity`): checked against the checkpoint before anything is loaded."""
    directory = Path(directory)
    verify_checkpoint(directory)
    state = read_trainer_state(directory)
    if expect is not None:
        check_resumable(directory, state, expect, auto)
    has_dcp = (directory / DCP_SUBDIR).is_dir()
    if hasattr(engine, "state_dict"):
        if not has_dcp:
            raise UserError(
                f"{directory} holds no FSDP2 state ({directory / DCP_SUBDIR} missing): it was "
                f"written with parallel.engine={state.get('engine', 'deepspeed')}; resume with that engine"
            )
        sd = engine.state_dict()
        _dcp_load(directory, sd)
        engine.load_state_dict(sd)
        engine.scheduler.load_state_dict(state["scheduler"])
    else:
        saved_world = state.get("world_size")
        if has_dcp:
            raise UserError(
                f"{directory} was written with parallel.engine=fsdp2 (a DCP checkpoint); resume it "
                f"with parallel.engine=fsdp2"
            )
        if saved_world is not None and saved_world != world_size:
            raise UserError(
                f"{directory} is a DeepSpeed ZeRO-3 checkpoint of {saved_world} ranks and this run has "
                f"{world_size}: "
                "DeepSpeed partitions resume only at their world size. Convert it with DeepSpeed's "
                "universal "
                f"checkpoint (python -m deepspeed.checkpoint.ds_to_universal --input_folder "
                f"{directory / 'deepspeed'} --output_folder <dir>), or restart with {saved_world} ranks, "
                "or train "
                f"with parallel.engine=fsdp2 (its checkpoints reshard to any world size)"
            )
        engine.load(directory)
    rng = directory / f"rng_rank{_rank()}.pt"
    if rng.is_file():
        set_rng_state(torch.load(rng, map_location="cpu", weights_only=False))
    return state
