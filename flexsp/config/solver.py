"""Section ``solver``: how the trainer plans every step (flexsp.planning)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from flexsp.config.fields import Choice
from flexsp.errors import UserError
from solver.baselines import BASELINES
from solver.milp import MILP_BACKENDS


class BackgroundMode(Choice):
    """``solver.background``: where rank 0 plans step t+1 while step t trains."""

    process = "process"
    thread = "thread"
    off = "off"


class MilpBackend(Choice):
    """``solver.milp_backend``."""

    highs = "highs"
    pulp = "pulp"


assert MilpBackend.values() == list(MILP_BACKENDS), "solver.milp.MILP_BACKENDS and MilpBackend disagree"


@dataclass
class SolverConfig:
    cost_model: str = "auto"
    """auto (CPU: the cpu-gloo-tiny preset; CUDA: an analytic ESTIMATE for this GPU and model, see
    flexsp.costmodels), a preset name (see solver.presets) or a path to a cost-model JSON
    (``CostModel.save``, e.g. from flexsp-profile). Its num_devices is adapted to the world size."""
    allow_foreign_cost_model: bool = False
    """Let a CUDA run plan with a cost model measured on another device type (e.g. CPU timings)."""
    time_limit: float = 0.2
    """Seconds the planner may spend on one global batch."""
    wait_s: float = 0.05
    """Extra seconds the trainer waits at the step boundary for a late plan before falling back."""
    fallback: str = "greedy-hybrid-cp"
    """Fast planner used when the solve is late: one of solver.baselines.BASELINES."""
    background: BackgroundMode | bool = BackgroundMode.process
    """Where rank 0 plans step t+1 while step t trains: process (a planner subprocess) | thread |
    off (synchronously at the step boundary); true/false (older configs) mean process/off."""
    milp_backend: MilpBackend = MilpBackend.highs
    """MILP solver of the planner: highs (scipy/HiGHS) | pulp (CBC by default, or pulp_solver)."""
    pulp_solver: str | None = None
    """With milp_backend=pulp: the PuLP solver name (e.g. PULP_CBC_CMD, GUROBI_CMD, HiGHS_CMD);
    None = PuLP's bundled CBC."""

    def __post_init__(self) -> None:
        if isinstance(self.background, bool):  # older configs: true/false
            self.background = "process" if self.background else "off"
        self.background = BackgroundMode.parse("solver.background", self.background)
        self.milp_backend = MilpBackend.parse("solver.milp_backend", self.milp_backend)
        if self.fallback not in BASELINES:
            raise UserError.choice("solver.fallback", self.fallback, sorted(BASELINES))
        if not self.time_limit > 0 or not math.isfinite(self.time_limit) or not self.wait_s >= 0:
            raise UserError(
                f"solver.time_limit={self.time_limit} must be a finite number > 0 and "
                f"solver.wait_s={self.wait_s} >= 0",
                field="solver.time_limit",
            )
