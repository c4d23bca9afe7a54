"""The baselines FlexSP is compared with (benchmarks, flexsp-plan, flexsp-bench) and the runtime's
fallback planners, by name. Their implementations live in :mod:`solver.schedules` (which the
planner also uses as safety nets; the planner never imports this module):

- ``static``: :func:`solver.schedules.static_plan` (DeepSpeed-Ulysses-like, one SP degree);
- ``best-homogeneous``: :func:`solver.schedules.best_homogeneous_plan` (the official code's BatchAda);
- ``greedy-hybrid-cp``: :func:`solver.schedules.greedy_hybrid_cp_plan` (the runtime's fast fallback).
"""

from __future__ import annotations

from .schedules import (  # noqa: F401 (re-exported)
    STATIC_FILL,
    BaselineTimeout,
    best_fit_decreasing,
    best_homogeneous_plan,
    check_lengths,
    greedy_hybrid_cp_plan,
    static_plan,
    usable_degrees,
)

BASELINES = {
    "static": static_plan,
    "best-homogeneous": best_homogeneous_plan,
    "greedy-hybrid-cp": greedy_hybrid_cp_plan,
}
"""Baseline planners by name: ``fn(lengths, cm) -> Plan``."""
