"""FlexSP planner: per-step adaptive sequence-parallel plans (pure Python + NumPy/SciPy/HiGHS).

    from solver import load_preset, plan_batch
    plan = plan_batch(lengths, load_preset("paper-gpt7b-192k"))
    print(plan.summary(), plan.predicted_ms, plan.gap)

No torch and no torch.distributed here: ``flexsp`` imports ``solver``, never the reverse.
"""

from .build import build_plan, price_plan, validate_plan
from .costmodel import CostModel
from .plan import GroupPlan, MicroBatchPlan, Plan
from .planner import PlanningError, lower_bound_ms, plan_batch
from .presets import PRESETS, load_preset

__all__ = [
    "CostModel",
    "GroupPlan",
    "MicroBatchPlan",
    "Plan",
    "PlanningError",
    "PRESETS",
    "build_plan",
    "load_preset",
    "lower_bound_ms",
    "plan_batch",
    "price_plan",
    "validate_plan",
]
