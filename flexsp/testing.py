"""Fault injection for the test suite: an environment variable, read once per run, installs hooks.

The product code has ONE neutral hook point: :func:`flexsp.train.run` calls :func:`install` with
its run state after the model is built. Without ``FLEXSP_FAULTS`` in the environment it does
nothing. With it, each fault (``;``-separated, ``kind:key=value:...``) wraps an object of the run
(the executor's ``run``, the engine's ``backward``, the planner's solve function); the training
loop and the configuration know nothing about them.

- ``kill:rank=R:step=S`` -- rank R exits with status 13 when step S (0-based) starts its
  micro-batches, on the first attempt only (``TORCHELASTIC_RESTART_COUNT`` 0 or unset): a rank that
  dies without reporting (elastic restarts, the launcher's dead-rank report). Prints
  ``[flexsp] rank R: simulated failure at step S``.
- ``raise:rank=R:step=S`` -- rank R raises ``RuntimeError("simulated failure inside a micro-batch of
  step S+1 on rank R")`` after the forward of its first micro-batch of step S, while its peers are
  inside the micro-batch's collectives (the cross-rank abort path).
- ``bug:rank=R:step=S`` -- the same place raises ``ValueError("injected internal error ...")``: an
  internal bug (not a :class:`flexsp.errors.UserError`), which must print its traceback once.
- ``planner:hang`` -- every solve of the planner (in its subprocess) blocks forever, so every step
  trains on the fallback plan (the late-plan path).

Used through subprocesses (``FLEXSP_FAULTS=... python -m flexsp.train ...``) or spawned ranks (set
``os.environ`` before :func:`flexsp.train.run`).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

from flexsp.log import get_logger

FAULTS_ENV = "FLEXSP_FAULTS"
"""The environment variable that lists the faults to inject (unset: none)."""
KILL_EXIT_CODE = 13
"""Exit status of a rank killed by a ``kill`` fault."""
KINDS = ("kill", "raise", "bug", "planner")

log = get_logger(__name__)


@dataclass(frozen=True)
class Fault:
    kind: str
    """kill | raise | bug | planner."""
    params: dict = field(default_factory=dict)
    """The fault's ``key=value`` parameters (rank, step: integers; planner: hang)."""

    def at(self, rank: int, step: int) -> bool:
        return int(self.params.get("rank", 0)) == rank and int(self.params.get("step", -1)) == step


def parse_faults(text: str | None) -> list[Fault]:
    """``FLEXSP_FAULTS``' value -> the faults; ValueError naming a malformed entry."""
    faults = []
    for entry in filter(None, (e.strip() for e in (text or "").split(";"))):
        kind, *parts = entry.split(":")
        if kind not in KINDS:
            raise ValueError(f"{FAULTS_ENV}: unknown fault {kind!r} in {entry!r}; valid: {list(KINDS)}")
        params = {}
        for p in parts:
            key, eq, value = p.partition("=")
            params[key] = value if eq else True
        faults.append(Fault(kind, params))
    return faults


def hanging_solve(lengths, cm, **kwargs):
    """A planner solve that never returns (run in the planner subprocess, killed at the end)."""
    time.sleep(10**6)


def install(st) -> None:
    """Install the faults of ``FLEXSP_FAULTS`` on the run state ``st`` (flexsp.train.RunState):
    a no-op without the variable."""
    faults = parse_faults(os.environ.get(FAULTS_ENV))
    if not faults:
        return
    current = {"step": -1}
    executor, engine = st.executor, st.engine
    run, backward = executor.run, engine.backward

    def run_step(plan, batch):
        current["step"] = batch.step
        for f in faults:
            if (
                f.kind == "kill"
                and f.at(st.rank, batch.step)
                and int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) == 0
            ):
                log.error(f"rank {st.rank}: simulated failure at step {batch.step}")
                os._exit(KILL_EXIT_CODE)
        return run(plan, batch)

    def backward_once(loss):
        step = current["step"]
        for f in faults:
            if f.kind == "raise" and f.at(st.rank, step):
                raise RuntimeError(
                    f"simulated failure inside a micro-batch of step {step + 1} on rank {st.rank}"
                )
            if f.kind == "bug" and f.at(st.rank, step):
                raise ValueError(
                    f"injected internal error inside a micro-batch of step {step + 1} on rank {st.rank}"
                )
        return backward(loss)

    executor.run, engine.backward = run_step, backward_once
    if any(f.kind == "planner" for f in faults):
        st.planner.use_solver(hanging_solve)
