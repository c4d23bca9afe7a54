"""Per-step planning for the trainer: rank 0 plans step t+1 in a background thread while step t
trains; every rank receives the plan as ONE object (a broadcast of ``plan.to_dict()``).

Time box: ``plan_batch`` gets ``time_limit`` seconds. When the trainer asks for the plan of step
t+1 (right after step t finished), rank 0 waits at most ``wait_s`` more for the background solve;
if it is still running, rank 0 uses a fast fallback plan instead (``fallback``: the greedy
hybrid-CP baseline, a few ms) and the late solve is discarded. A late plan therefore never stalls
training by more than ``wait_s``. The broadcast happens on the main thread at the step boundary,
so it is ordered with every other world collective identically on all ranks.

Static mode (``mode="static"``) uses ``solver.baselines.static_plan`` with one SP degree for
every sequence (DeepSpeed-Ulysses-like) and needs no background thread.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field, replace

from solver.baselines import BASELINES, static_plan
from solver.costmodel import CostModel
from solver.plan import Plan
from solver.planner import PlanningError, check_lengths, plan_batch

PARALLEL_MODES = ("adaptive", "static")


@dataclass
class SolverConfig:
    cost_model: str = "cpu-gloo-tiny"
    """A preset name (see solver.presets) or a path to a cost-model JSON (``CostModel.save``). Its
    num_devices is adapted to the world size when they differ."""
    time_limit: float = 0.2
    """Seconds the planner may spend on one global batch."""
    wait_s: float = 0.05
    """Extra seconds the trainer waits at the step boundary for a late plan before falling back."""
    fallback: str = "greedy-hybrid-cp"
    """Fast planner used when the solve is late: one of solver.baselines.BASELINES."""
    background: bool = True
    """Plan step t+1 in a thread while step t trains (False: plan synchronously at the boundary)."""

    def __post_init__(self) -> None:
        if self.fallback not in BASELINES:
            raise ValueError(f"solver.fallback={self.fallback!r}; valid options: {sorted(BASELINES)}")
        if not self.time_limit > 0 or self.wait_s < 0:
            raise ValueError(f"solver.time_limit={self.time_limit} must be > 0 and solver.wait_s="
                             f"{self.wait_s} >= 0")


def load_cost_model(spec: str, world_size: int) -> CostModel:
    """The cost model ``spec`` (preset name or JSON path) for ``world_size`` devices."""
    from pathlib import Path

    from solver.presets import PRESETS, load_preset
    if spec in PRESETS:
        cm = load_preset(spec)
    elif Path(spec).suffix == ".json" or Path(spec).exists():
        cm = CostModel.load(spec)
    else:
        raise ValueError(f"solver.cost_model={spec!r} is neither a preset ({', '.join(sorted(PRESETS))}) "
                         f"nor an existing cost-model JSON file")
    if cm.num_devices != world_size:
        cm = replace(cm, num_devices=world_size,
                     devices_per_node=min(cm.devices_per_node, world_size))
    return cm


@dataclass
class _Job:
    step: int
    lengths: tuple
    thread: threading.Thread | None = None
    result: dict = field(default_factory=dict)


class StepPlanner:
    """Produces the plan of every step; the same object on every rank (only rank 0 solves)."""

    def __init__(self, cfg: SolverConfig, cm: CostModel, rank: int, world_size: int,
                 mode: str = "adaptive", static_degree: int = 0):
        if mode not in PARALLEL_MODES:
            raise ValueError(f"parallel.mode={mode!r}; valid options: {list(PARALLEL_MODES)}")
        if mode == "static":
            degree = static_degree or world_size
            valid = [1 << k for k in range(world_size.bit_length())]
            if degree not in valid:
                raise ValueError(f"parallel.static_degree={static_degree} needs a power of two <= the "
                                 f"{world_size} ranks that exist; valid options: {valid} (0 = all ranks)")
            static_degree = degree
        self.cfg, self.cm, self.rank, self.world_size = cfg, cm, rank, world_size
        self.mode, self.static_degree = mode, static_degree
        self._job: _Job | None = None
        self.late = 0

    # -- solving (rank 0) -----------------------------------------------------------------------
    def _solve(self, lengths) -> Plan:
        if self.mode == "static":
            return static_plan(lengths, self.cm, self.static_degree)
        return plan_batch(lengths, self.cm, time_limit=self.cfg.time_limit)

    def _fallback(self, lengths) -> Plan:
        plan = BASELINES[self.cfg.fallback](lengths, self.cm)
        return replace(plan, status="fallback", method=f"{plan.method} (fallback)")

    def submit(self, step: int, lengths) -> None:
        """Start planning ``step`` (rank 0; a no-op elsewhere). Returns at once."""
        if self.rank != 0:
            return
        job = _Job(step, tuple(int(x) for x in lengths))

        def work():
            try:
                job.result["plan"] = self._solve(job.lengths)
            except BaseException as exc:  # reported on the main thread
                job.result["error"] = exc

        if self.cfg.background and self.mode == "adaptive":
            job.thread = threading.Thread(target=work, name=f"flexsp-plan-{step}", daemon=True)
            job.thread.start()
        else:
            work()
        self._job = job

    def get(self, step: int, lengths, first: bool = False) -> tuple[Plan, float]:
        """The plan of ``step`` on every rank (collective) and rank 0's wait in ms at the boundary.

        Rank 0 takes the submitted job's plan if it is ready within ``wait_s``, else the fallback;
        then broadcasts ``plan.to_dict()`` as one object.
        """
        import torch.distributed as dist

        payload = [None]
        wait_ms = 0.0
        if self.rank == 0:
            t0 = time.perf_counter()
            job = self._job
            if job is None or job.step != step or job.lengths != tuple(int(x) for x in lengths):
                self.submit(step, lengths)
                job = self._job
            if job.thread is not None:
                # the first plan of a run has no training step to hide behind: give it its time box
                grace = self.cfg.time_limit * 1.5 if first else 0.0
                job.thread.join(timeout=self.cfg.wait_s + grace)
            if "error" in job.result:
                err = job.result["error"]
                payload[0] = {"error": f"{type(err).__name__}: {err}"}
            elif "plan" in job.result:
                payload[0] = job.result["plan"].to_dict()
            else:  # late: never stall training
                self.late += 1
                try:
                    payload[0] = self._fallback(job.lengths).to_dict()
                except ValueError as exc:
                    payload[0] = {"error": f"{type(exc).__name__}: {exc}"}
            self._job = None
            wait_ms = (time.perf_counter() - t0) * 1e3
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.broadcast_object_list(payload, src=0)
        if "error" in payload[0]:
            raise PlanningError(f"step {step}: {payload[0]['error']}")
        return Plan.from_dict(payload[0]), wait_ms


def check_fits(lengths, cm: CostModel) -> None:
    """PlanningError naming the documents no plan can place on this cluster."""
    check_lengths(lengths, cm)
