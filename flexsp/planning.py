"""Per-step planning for the trainer: rank 0 plans step t+1 while step t trains, OUT of its own
interpreter (a planner subprocess, so the solve's Python work never holds the GIL of the rank that
every world collective waits for); every rank receives the plan as ONE object (a broadcast of
``plan.to_dict()``).

Time box: ``plan_batch`` gets ``time_limit`` seconds. When the trainer asks for the plan of step
t+1 (right after step t finished), rank 0 waits at most ``wait_s`` more for the solve; if it is
still running, rank 0 uses a fast fallback plan instead (``fallback``: the greedy hybrid-CP
baseline, a few ms, computed in-process) and the late solve is discarded (the subprocess is
restarted if it is still busy when the next batch arrives). A late plan therefore never stalls
training by more than ``wait_s``. The broadcast happens on the main thread at the step boundary,
so it is ordered with every other world collective identically on all ranks.

``background``: ``process`` (default, a spawned planner process), ``thread`` (a thread of rank 0:
shares its GIL) or ``off`` (solve synchronously at the step boundary). Static mode
(``mode="static"``) uses ``solver.baselines.static_plan`` (one SP degree for every sequence,
DeepSpeed-Ulysses-like) synchronously: it takes milliseconds.
"""

from __future__ import annotations

import inspect
import os
import pickle
import queue
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import torch.distributed as dist

from flexsp.config import ParallelMode, SolverConfig
from flexsp.costmodels import check_device, gpu_estimate
from flexsp.errors import UserError
from solver.baselines import BASELINES, static_plan
from solver.costmodel import CostModel
from solver.plan import Plan
from solver.planner import PlanningError, check_lengths, plan_batch
from solver.presets import PRESETS, load_preset

PARALLEL_MODES = tuple(ParallelMode.values())


def solve_plan(
    lengths, cm: CostModel, time_limit: float, milp_backend: str = "highs", pulp_solver: str | None = None
) -> Plan:
    """The planner call the trainer makes (``plan_batch`` with the configured backend)."""
    kwargs = {}
    params = inspect.signature(plan_batch).parameters
    if "milp_backend" in params:
        kwargs["milp_backend"] = milp_backend
    if "pulp_solver" in params and pulp_solver:
        kwargs["pulp_solver"] = pulp_solver
    return plan_batch(lengths, cm, time_limit=time_limit, **kwargs)


class PlannerProcess:
    """The planner subprocess (flexsp.planner_worker) of rank 0: jobs are solved one at a time in
    submission order, answers read by a thread into a queue (so waiting for one has a timeout).

    A late job is not killed: its solve is time-boxed, so the next job just queues behind it for
    at most the rest of that box (cheaper than restarting the process, which re-imports the
    solver). Only a job still running ``stuck_s`` after submission is treated as stuck: the
    process is then replaced. It runs in its own session, so a terminal's Ctrl-C does not reach
    it (the trainer decides how to stop), and it exits when its input closes (the trainer died)."""

    def __init__(self, solve_fn, cm: CostModel, stuck_s: float = 30.0):
        self.target = f"{solve_fn.__module__}:{solve_fn.__qualname__}"
        self.cm, self.stuck_s = cm, stuck_s
        self.outstanding: dict[int, float] = {}
        self._start()

    @property
    def busy(self) -> bool:
        return bool(self.outstanding)

    def _start(self) -> None:
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "flexsp.planner_worker", self.target],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
            start_new_session=True,
        )
        self.replies = queue.Queue()
        pickle.dump(self.cm.to_dict(), self.proc.stdin)
        self.proc.stdin.flush()

        def read(stream, replies):
            while True:
                try:
                    replies.put(pickle.load(stream))
                except Exception:  # end of stream: the process exited
                    replies.put(None)
                    return

        threading.Thread(
            target=read, args=(self.proc.stdout, self.replies), daemon=True, name="flexsp-planner-reader"
        ).start()

    def submit(self, job_id: int, lengths: tuple, kwargs: dict) -> None:
        now = time.monotonic()
        if any(now - t > self.stuck_s for t in self.outstanding.values()):
            self.close()  # a stuck solve: start afresh rather than queue behind it
            self._start()
        try:
            pickle.dump((job_id, lengths, kwargs), self.proc.stdin)
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            pass  # reported by result(): the process died
        self.outstanding[job_id] = now

    def result(self, job_id: int, timeout: float):
        """``(ok, payload)`` of ``job_id`` within ``timeout`` seconds, or None (still running)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                reply = self.replies.get(timeout=max(deadline - time.monotonic(), 0.0))
            except queue.Empty:
                return None
            if reply is None:
                self.outstanding.clear()
                return False, f"the planner process died (exit code {self.proc.wait()})"
            jid, ok, payload = reply
            self.outstanding.pop(jid, None)
            if jid == job_id:
                return ok, payload

    def close(self) -> None:
        busy = self.busy
        try:
            if not busy:
                pickle.dump(None, self.proc.stdin)
            self.proc.stdin.close()
        except (BrokenPipeError, OSError, ValueError):
            pass
        try:
            self.proc.wait(timeout=0.5 if not busy else 0.0)
        except Exception:
            pass
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=5)
        self.outstanding.clear()


def load_cost_model(
    spec: str,
    world_size: int,
    shape=None,
    shard_size: int = 0,
    *,
    device=None,
    devices_per_node: int | None = None,
    allow_foreign: bool = False,
    profile_hint: tuple[str, str] | None = None,
) -> CostModel:
    """The cost model ``spec`` (preset name, JSON path or ``auto``) for ``world_size`` devices.

    ``device`` (default CPU) is where the run trains: ``auto`` means ``cpu-gloo-tiny`` on the CPU
    and an analytic estimate for the GPU and the model ``shape`` on CUDA (flexsp.costmodels); a
    CUDA run refuses a cost model measured on another device type unless ``allow_foreign``.

    ``shard_size`` (HSDP, parallel.shard_size): model states sharded within groups of that many
    ranks, the once-per-step gradient all-reduce across the replicas priced at the cost model's
    ``replicate_gbps`` (or, when it has none, its slowest measured link: an estimate, noted in
    ``source``).

    ``shape`` (an object with layers, hidden, heads, kv_heads: the ModelConfig to train) is checked
    against the shape the cost model was built for BEFORE it is resized to the world, so a cost
    model of another model fails with that mismatch, not with whatever it implies at this size.
    ``profile_hint``: (the flexsp-profile command that profiles the model, the file it writes),
    named by that error (flexsp.modelspec.profile_command)."""

    device = torch.device("cpu") if device is None else torch.device(device)
    if spec == "auto" and device.type == "cuda":
        if shape is None:
            raise UserError(
                "solver.cost_model=auto on CUDA estimates the model being trained: give its shape"
            )
        return gpu_estimate(
            shape,
            torch.cuda.get_device_name(device),
            torch.cuda.get_device_properties(device).total_memory,
            world_size,
            devices_per_node or world_size,
            shard_size,
        )
    spec_in = spec
    if spec == "auto":
        spec = "cpu-gloo-tiny"
    if spec in PRESETS:
        cm = load_preset(spec)
    elif Path(spec).suffix == ".json" or Path(spec).exists():
        if Path(spec).is_dir():
            raise UserError(
                f"solver.cost_model={spec} is a directory; give a cost-model JSON file or a preset "
                f"({', '.join(sorted(PRESETS))})"
            )
        cm = CostModel.load(spec)
    else:
        raise UserError(
            f"solver.cost_model={spec!r} is neither a preset ({', '.join(sorted(PRESETS))}) "
            f"nor an existing cost-model JSON file"
        )
    check_device(cm, spec_in, device, allow_foreign)
    if shape is not None and hasattr(cm, "check_model_shape"):
        try:
            cm.check_model_shape(shape.layers, shape.hidden, shape.heads, shape.kv_heads)
        except UserError as exc:
            text = str(exc)
            if profile_hint is not None:
                command, path = profile_hint
                text = text.replace(
                    "profile this model (flexsp-profile) or pick a matching cost model",
                    f"profile this model with `{command}`, then set solver.cost_model={path} "
                    f"(or pick a cost model of this shape)",
                )
            raise UserError(f"solver.cost_model={spec}: {text}", field="solver.cost_model") from None
    if cm.num_devices != world_size:
        try:
            cm = replace(cm, num_devices=world_size, devices_per_node=min(cm.devices_per_node, world_size))
        except ValueError as exc:
            raise UserError(f"solver.cost_model={spec} on {world_size} rank(s): {exc}") from None
    if shard_size and shard_size < world_size and cm.shard_size != shard_size:
        gbps, note = cm.replicate_gbps, ""
        if not gbps > 0:
            links = [*cm.bandwidth_gbps.values(), *cm.p2p_bandwidth_gbps.values()]
            gbps = min(links) if links else 1.0
            note = f"; HSDP all-reduce priced at {gbps:g} GB/s (its slowest link: no replicate_gbps measured)"
        try:
            cm = replace(cm, shard_size=shard_size, replicate_gbps=gbps, source=cm.source + note)
        except ValueError as exc:
            raise UserError(
                f"solver.cost_model={spec} with parallel.shard_size={shard_size}: {exc}"
            ) from None
    return cm


@dataclass
class _Job:
    step: int
    lengths: tuple
    thread: threading.Thread | None = None
    result: dict = field(default_factory=dict)


class StepPlanner:
    """Produces the plan of every step; the same object on every rank (only rank 0 solves)."""

    def __init__(
        self,
        cfg: SolverConfig,
        cm: CostModel,
        rank: int,
        world_size: int,
        mode: str = "adaptive",
        static_degree: int = 0,
        group=None,
        solve_fn=solve_plan,
    ):
        """``group``: the process group the plan is broadcast on (a gloo group under NCCL, so the
        handoff never touches the device; None = the default group). ``solve_fn``: what the planner
        process / thread calls (``fn(lengths, cm, time_limit, milp_backend, pulp_solver) -> Plan``, a
        module-level function: the subprocess imports it as ``module:name``)."""
        mode = ParallelMode.parse("parallel.mode", mode)
        if mode == ParallelMode.static:
            degree = static_degree or world_size
            valid = [1 << k for k in range(world_size.bit_length())]
            if degree not in valid:
                raise UserError(
                    f"parallel.static_degree={static_degree} needs a power of two <= the "
                    f"{world_size} ranks that exist; valid options: {valid} (0 = all ranks)",
                    field="parallel.static_degree",
                    options=valid,
                )
            static_degree = degree
        self.cfg, self.cm, self.rank, self.world_size = cfg, cm, rank, world_size
        self.mode, self.static_degree, self.group = mode, static_degree, group
        self._job: _Job | None = None
        self._proc: PlannerProcess | None = None
        self.solve_fn = solve_fn
        self.late = 0
        if rank == 0 and mode == "adaptive" and cfg.background == "process":
            self._proc = PlannerProcess(solve_fn, cm)  # starts now: its imports overlap the set-up

    def use_solver(self, solve_fn) -> None:
        """Plan with ``solve_fn`` from now on (the planner process, if any, is restarted with it)."""
        self.solve_fn = solve_fn
        if self._proc is not None:
            self._proc.close()
            self._proc = PlannerProcess(solve_fn, self.cm)

    @property
    def _kwargs(self) -> dict:
        return {
            "time_limit": self.cfg.time_limit,
            "milp_backend": self.cfg.milp_backend,
            "pulp_solver": self.cfg.pulp_solver,
        }

    # -- solving (rank 0) -----------------------------------------------------------------------
    def _solve(self, lengths) -> Plan:
        if self.mode == "static":
            return static_plan(lengths, self.cm, self.static_degree)
        return self.solve_fn(lengths, self.cm, **self._kwargs)

    def _fallback(self, lengths) -> Plan:
        plan = BASELINES[self.cfg.fallback](lengths, self.cm)
        return replace(plan, status="fallback", method=f"{plan.method} (fallback)")

    def submit(self, step: int, lengths) -> None:
        """Start planning ``step`` (rank 0; a no-op elsewhere). Returns at once."""
        if self.rank != 0:
            return
        job = _Job(step, tuple(int(x) for x in lengths))
        background = self.cfg.background if self.mode == "adaptive" else "off"
        if background == "process":
            if self._proc is None:
                self._proc = PlannerProcess(self.solve_fn, self.cm)
            self._proc.submit(step, job.lengths, self._kwargs)
        elif background == "thread":

            def work():
                try:
                    job.result["plan"] = self._solve(job.lengths)
                except BaseException as exc:  # reported on the main thread
                    job.result["error"] = exc

            job.thread = threading.Thread(target=work, name=f"flexsp-plan-{step}", daemon=True)
            job.thread.start()
        else:
            try:
                job.result["plan"] = self._solve(job.lengths)
            except ValueError as exc:
                job.result["error"] = exc
        self._job = job

    def _collect(self, job: _Job, timeout: float):
        """Rank 0: the payload of ``job`` (plan dict or error dict), or None if still running."""
        if self._proc is not None and job.thread is None and not job.result:
            got = self._proc.result(job.step, timeout)
            if got is None:
                return None
            ok, payload = got
            return payload if ok else {"error": payload}
        if job.thread is not None:
            job.thread.join(timeout=timeout)
        if "error" in job.result:
            err = job.result["error"]
            return {"error": f"{type(err).__name__}: {err}"}
        if "plan" in job.result:
            return job.result["plan"].to_dict()
        return None

    def get(self, step: int, lengths, first: bool = False) -> tuple[Plan, float]:
        """The plan of ``step`` on every rank (collective) and rank 0's wait in ms at the boundary.

        Rank 0 takes the submitted job's plan if it is ready within ``wait_s``, else the fallback;
        then broadcasts ``plan.to_dict()`` as one object.
        """

        payload = [None]
        wait_ms = 0.0
        if self.rank == 0:
            t0 = time.perf_counter()
            job = self._job
            if job is None or job.step != step or job.lengths != tuple(int(x) for x in lengths):
                self.submit(step, lengths)
                job = self._job
            # the first plan of a run has no training step to hide behind: give it its time box
            # (and the planner process its start-up)
            grace = self.cfg.time_limit * 1.5 + (5.0 if self._proc is not None else 0.0) if first else 0.0
            payload[0] = self._collect(job, self.cfg.wait_s + grace)
            if payload[0] is None:  # late: never stall training
                self.late += 1
                try:
                    payload[0] = self._fallback(job.lengths).to_dict()
                except ValueError as exc:
                    payload[0] = {"error": f"{type(exc).__name__}: {exc}"}
            self._job = None
            wait_ms = (time.perf_counter() - t0) * 1e3
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.broadcast_object_list(payload, src=0, group=self.group)
        if "error" in payload[0]:
            raise PlanningError(f"step {step}: {payload[0]['error']}")
        return Plan.from_dict(payload[0]), wait_ms

    def close(self) -> None:
        """Stop the planner process (rank 0)."""
        if self._proc is not None:
            self._proc.close()
            self._proc = None


def check_fits(lengths, cm: CostModel) -> None:
    """PlanningError naming the documents no plan can place on this cluster."""
    check_lengths(lengths, cm)
