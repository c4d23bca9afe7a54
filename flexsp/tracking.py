"""Experiment tracking for training runs: TensorBoard or Weights & Biases, plus plan pictures.

Why: ``metrics.jsonl`` is the record of a run, but watching loss, throughput, cost-model error and
the planner's choices (how many SP groups of each degree) live, and comparing runs, wants a tracker.
FlexSP's distinctive state is the per-step plan, so besides the scalars the tracker can save the
plan timeline (:func:`solver.plot.plot_plan`) every few steps and log it as an image.

Usage (only rank 0 creates a Tracker; the class never touches ``torch.distributed``)::

    with Tracker("tensorboard", out, run_name="run1", config=raw_cfg, plot_plan_every=10) as tr:
        for step in ...:
            tr.log_step(step, {"loss": loss, "lr": lr, "measured_ms": dt * 1e3, ...}, plan=plan)

Kinds (:data:`TRACKERS`):

- ``none``: logs nothing, but plan pictures are still saved when ``plot_plan_every > 0``.
- ``tensorboard``: ``SummaryWriter(log_dir=<output_dir>/tensorboard)``; the config is logged once
  as text (tag ``config``).
- ``wandb``: ``wandb.init(project, name=run_name, dir=output_dir, config, mode)`` with mode
  ``wandb_mode`` or ``$WANDB_MODE`` or ``online``; ``offline`` needs no network (files under
  ``<output_dir>/wandb``, upload later with ``wandb sync``).

Tags: a scalar key is mapped through :data:`TAGS` (``loss`` -> ``train/loss``, ``tokens_per_s`` ->
``perf/tokens_per_s``, ``planner_ms`` -> ``plan/solve_ms``...); a key that already holds a ``/`` is
used as is; any other key goes under ``train/``. Non-numeric values (plan summary strings, doc id
lists) are skipped, so a ``metrics.jsonl`` record can be passed whole. With both ``measured_ms`` and
``predicted_ms``, ``perf/prediction_error`` = measured / predicted - 1 is added. A plan adds
:func:`plan_scalars`; explicitly passed scalars win over plan-derived ones with the same tag.

Plan pictures: with ``plot_plan_every = N > 0``, at every step with ``step % N == 0`` (steps are the
trainer's 0-based steps: 0, N, 2N, ...) and also at the first step this Tracker receives a plan (so
a run resumed at step 13 gets a picture of step 13 at once). The PNG goes to
``<output_dir>/plans/step_XXXXXX.png`` (6-digit step) and is logged as the image ``plan/timeline``.
Drawing costs a few hundred ms on a CPU (matplotlib, Agg backend), so pick N accordingly. A failed
picture prints one warning line on stderr and training goes on.
"""

from __future__ import annotations

import json
import math
import numbers
import os
import sys
from pathlib import Path

from flexsp.errors import UserError

TRACKERS = ("none", "tensorboard", "wandb")

TAGS = {
    # optimisation
    "loss": "train/loss",
    "lr": "train/lr",
    "grad_norm": "train/grad_norm",
    "epoch": "train/epoch",
    "tokens": "train/tokens",
    "targets": "train/targets",
    "docs": "train/docs",
    # speed and memory
    "tokens_per_s": "perf/tokens_per_s",
    "measured_ms": "perf/measured_ms",
    "step_s": "perf/step_s",
    "memory_mb": "perf/memory_mb",
    # planner
    "predicted_ms": "plan/predicted_ms",
    "planner_ms": "plan/solve_ms",
    "solve_ms": "plan/solve_ms",
    "plan_wait_ms": "plan/wait_ms",
    "late_plans": "plan/late_plans",
}
"""Stable tag of each scalar the trainer passes (other keys: see the module docstring)."""

PLAN_IMAGE_TAG = "plan/timeline"


def tag_of(key: str) -> str:
    """The tag a scalar key is logged under."""
    if key in TAGS:
        return TAGS[key]
    return key if "/" in key else f"train/{key}"


def plan_scalars(plan) -> dict[str, float]:
    """Scalars describing a :class:`solver.plan.Plan`.

    ``plan/micro_batches``, ``plan/groups`` (all micro-batches together), ``plan/groups_sp{d}`` for
    every power of two ``d`` up to ``num_devices`` (0 when unused, so every run has the same tags;
    summed over micro-batches), ``plan/max_sp``, ``plan/sequences``, ``plan/tokens``,
    ``plan/predicted_ms``, ``plan/solve_ms``, ``plan/idle_frac`` (predicted idle device-time / total
    device-time) and, when the plan has a lower bound, ``plan/lower_bound_ms`` and ``plan/gap``.
    """
    counts: dict[int, int] = {}
    d = 1
    while d <= max(1, plan.num_devices):
        counts[d] = 0
        d *= 2
    groups = sequences = tokens = 0
    busy = 0.0
    max_sp = 0
    for mb in plan.micro_batches:
        for g in mb.groups:
            counts[g.sp] = counts.get(g.sp, 0) + 1
            groups += 1
            sequences += len(g.seq_ids)
            tokens += g.tokens
            busy += g.sp * g.predicted_ms
            max_sp = max(max_sp, g.sp)
    out = {"plan/micro_batches": float(len(plan.micro_batches)), "plan/groups": float(groups)}
    out.update({f"plan/groups_sp{sp}": float(n) for sp, n in sorted(counts.items())})
    out.update(
        {
            "plan/max_sp": float(max_sp),
            "plan/sequences": float(sequences),
            "plan/tokens": float(tokens),
            "plan/predicted_ms": float(plan.predicted_ms),
            "plan/solve_ms": float(plan.solve_seconds) * 1e3,
        }
    )
    total = sum(mb.predicted_ms for mb in plan.micro_batches) * plan.num_devices
    if total > 0:
        out["plan/idle_frac"] = max(0.0, 1.0 - busy / total)
    if plan.lower_bound_ms > 0:
        out["plan/lower_bound_ms"] = float(plan.lower_bound_ms)
        out["plan/gap"] = float(plan.gap)
    return out


def _number(value) -> float | None:
    """float(value) for Python / NumPy numbers and 0-d tensors; None for anything else."""
    if isinstance(value, numbers.Real):
        return float(value)
    if hasattr(value, "item") and getattr(value, "ndim", None) == 0:
        try:
            return float(value.item())
        except (TypeError, ValueError):
            return None
    return None


def _jsonable(config: dict) -> dict:
    return json.loads(json.dumps(dict(config or {}), default=str))


class Tracker:
    """One run's tracker (create it on rank 0 only). See the module docstring."""

    def __init__(
        self,
        kind: str,
        output_dir: str | Path,
        *,
        run_name: str,
        config: dict,
        plot_plan_every: int = 0,
        wandb_project: str = "flexsp",
        wandb_mode: str | None = None,
    ):
        kind = "none" if kind is None else str(kind)
        if kind not in TRACKERS:
            raise UserError(f"train.logger={kind!r}; valid options: {list(TRACKERS)}")
        if int(plot_plan_every) < 0:
            raise UserError(f"plot_plan_every={plot_plan_every!r} must be >= 0 (0: no plan pictures)")
        self.kind = kind
        self.output_dir = Path(output_dir)
        self.run_name = run_name
        self.plot_plan_every = int(plot_plan_every)
        self.plans_dir = self.output_dir / "plans"
        self._writer = None  # TensorBoard SummaryWriter
        self._run = None  # wandb Run
        self._wandb = None
        self._seen_plan = False
        self._closed = False
        config = _jsonable(config)
        if kind == "tensorboard":
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as exc:
                raise UserError(
                    f"train.logger=tensorboard needs the 'tensorboard' package "
                    f"(pip install tensorboard): {exc}"
                ) from exc
            self._writer = SummaryWriter(log_dir=str(self.output_dir / "tensorboard"), flush_secs=30)
            self._writer.add_text(
                "config", "```\n" + json.dumps(config, indent=2, sort_keys=True) + "\n```", 0
            )
        elif kind == "wandb":
            try:
                import wandb
            except ImportError as exc:
                raise UserError(
                    f"train.logger=wandb needs the 'wandb' package (pip install wandb): {exc}"
                ) from exc
            self.output_dir.mkdir(parents=True, exist_ok=True)
            self._wandb = wandb
            mode = wandb_mode or os.environ.get("WANDB_MODE") or "online"
            self._run = wandb.init(
                project=wandb_project, name=run_name, dir=str(self.output_dir), config=config, mode=mode
            )

    # -- logging -------------------------------------------------------------------------------
    def wants_picture(self, step: int) -> bool:
        """Whether ``log_step(step, ..., plan)`` saves a plan picture (first plan or step % N == 0)."""
        n = self.plot_plan_every
        return n > 0 and (not self._seen_plan or step % n == 0)

    def picture_path(self, step: int) -> Path:
        return self.plans_dir / f"step_{int(step):06d}.png"

    def log_step(self, step: int, scalars: dict[str, float], plan=None) -> None:
        """Log one step's scalars (and the plan's scalars / picture) at ``step``."""
        if self._closed:
            raise RuntimeError("Tracker.log_step after close()")
        step = int(step)
        values = plan_scalars(plan) if plan is not None else {}
        for key, value in (scalars or {}).items():
            v = _number(value)
            if v is not None:
                values[tag_of(key)] = v
        measured, predicted = values.get("perf/measured_ms"), values.get("plan/predicted_ms")
        if measured is not None and predicted and math.isfinite(predicted) and predicted > 0:
            values["perf/prediction_error"] = measured / predicted - 1.0
        picture = None
        if plan is not None:
            if self.wants_picture(step):
                picture = self._draw(step, plan, values)
            self._seen_plan = True
        if self._writer is not None:
            for tag, v in values.items():
                self._writer.add_scalar(tag, v, step)
            if picture is not None:
                try:
                    import matplotlib.image

                    img = matplotlib.image.imread(str(picture))
                    self._writer.add_image(PLAN_IMAGE_TAG, img[..., :3], step, dataformats="HWC")
                except Exception as exc:  # noqa: BLE001 - a picture never stops training
                    _warn(f"could not log plan picture {picture}: {exc!r}")
        elif self._run is not None:
            data: dict = dict(values)
            if picture is not None:
                data[PLAN_IMAGE_TAG] = self._wandb.Image(str(picture), caption=f"step {step}")
            self._run.log(data, step=step)

    def _draw(self, step: int, plan, values: dict) -> Path | None:
        path = self.picture_path(step)
        try:
            from solver.plot import plot_plan  # draws with the Agg backend

            predicted = values.get("plan/predicted_ms", plan.predicted_ms)
            measured = values.get("perf/measured_ms")
            times = f"predicted {predicted:.0f} ms" + (
                f", measured {measured:.0f} ms" if measured is not None else ""
            )
            title = f"step {step}: {plan.summary()[:80]}\n{times}"
            self.plans_dir.mkdir(parents=True, exist_ok=True)
            plot_plan(plan, str(path), title=title)
            return path
        except Exception as exc:  # noqa: BLE001 - a picture never stops training
            _warn(f"plan picture for step {step} failed: {exc!r}")
            return None

    # -- closing -------------------------------------------------------------------------------
    def close(self, exit_code: int = 0) -> None:
        """Flush and close the backend (idempotent)."""
        if self._closed:
            return
        self._closed = True
        if self._writer is not None:
            self._writer.flush()
            self._writer.close()
        if self._run is not None:
            self._run.finish(exit_code=exit_code)

    def __enter__(self) -> "Tracker":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(exit_code=0 if exc_type is None else 1)


def _warn(msg: str) -> None:
    print(f"[flexsp] tracking: {msg}", file=sys.stderr, flush=True)
