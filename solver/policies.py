"""The policies ``flexsp-simulate`` compares: one function per policy, each a plan for one global
batch under one cost model, built and priced by ``build.build_plan`` like every plan here.

Names (the simulator's JSON keys, a contract): ``flexsp``, ``flexsp-official``, ``megatron-dcp``,
``best-static``, ``best-homogeneous`` and ``static-D`` for each power-of-two degree D. No policy
drops, pads or reorders lengths: a length that fits no group raises ValueError.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .baselines import best_homogeneous_plan, static_plan, usable_degrees
from .costmodel import CostModel
from .errors import UserError
from .megatron_dcp import megatron_dcp_plan
from .official import official_flexsp_plan
from .plan import Plan
from .planner import plan_batch

PAPER_MILP_SECONDS = 10.0
"""The official FlexSP planner's time limit per MILP (SCIP), as published."""


@dataclass(frozen=True)
class PolicySettings:
    """Knobs of the policies that have any."""

    time_limit: float = 1.0
    """flexsp: the planner's time box per plan, seconds."""
    official_milp_s: float = PAPER_MILP_SECONDS
    """flexsp-official: time limit per MILP, seconds (the paper's code: 10 s)."""
    milp_backend: str = "highs"
    """flexsp: MILP backend (highs or pulp)."""

    def official_label(self) -> str:
        """How flexsp-official ran, said in every output: the paper's setting or a shorter one."""
        if self.official_milp_s >= PAPER_MILP_SECONDS:
            return f"{self.official_milp_s:g} s per MILP (the paper's setting)"
        return f"{self.official_milp_s:g} s per MILP, SHORTER than the paper's {PAPER_MILP_SECONDS:g} s"


def flexsp_policy(lengths: Sequence[int], cm: CostModel, settings: PolicySettings) -> Plan:
    """Ours: ``solver.planner.plan_batch`` within ``settings.time_limit`` seconds (never slower
    than best-static: the best static plan is one of its safety nets)."""
    return plan_batch(lengths, cm, time_limit=settings.time_limit, milp_backend=settings.milp_backend)


def flexsp_official_policy(lengths: Sequence[int], cm: CostModel, settings: PolicySettings) -> Plan:
    """The FlexSP paper's planner (PKU-DAIR/Hetu-Galvatron ``flexsp`` branch) as re-implemented in
    ``solver.official.official_flexsp_plan``: contiguous length-sorted micro-batch split for each
    of m..m+4 micro-batches, 16 DP buckets, one MILP per micro-batch at ``official_milp_s`` s
    (HiGHS instead of SCIP; see that module for every difference)."""
    return official_flexsp_plan(lengths, cm, time_limit_per_milp=settings.official_milp_s)


def megatron_dcp_policy(lengths: Sequence[int], cm: CostModel, settings: PolicySettings) -> Plan:
    """Megatron-Core dynamic context parallelism (``DefaultDynamicCPScheduler`` /
    ``next_hdp_group_packing_aware``, NVIDIA/Megatron-LM dev), reproduced in
    ``solver.megatron_dcp.megatron_dcp_plan`` with ``max_seqlen_per_dp_cp_rank`` = C."""
    return megatron_dcp_plan(lengths, cm)


def best_homogeneous_policy(lengths: Sequence[int], cm: CostModel, settings: PolicySettings) -> Plan:
    """The official FlexSP code's "BatchAda" baseline: the best single SP degree for the whole
    batch, packed well (``solver.baselines.best_homogeneous_plan``)."""
    return best_homogeneous_plan(lengths, cm)


def static_degrees(cm: CostModel, longest: int) -> list[int]:
    """Power-of-two degrees a static policy can use here: runnable under ``cm`` and holding the
    longest sequence (``longest <= D * C``)."""
    return [d for d in usable_degrees(cm) if d * cm.capacity_tokens >= longest]


def static_policy(degree: int):
    """``static-D``: DeepSpeed-Ulysses-like static SP, every sequence at degree D, packed as the
    official FlexSP code's static baseline (best-fit-decreasing into bins of 0.9 x C x D tokens,
    ``solver.baselines.static_plan``)."""

    def run(lengths: Sequence[int], cm: CostModel, settings: PolicySettings) -> Plan:
        return static_plan(lengths, cm, degree)

    run.__doc__ = static_policy.__doc__
    return run


def best_static_policy(lengths: Sequence[int], cm: CostModel, settings: PolicySettings) -> Plan:
    """``best-static``: the fastest ``static-D`` for this batch (the single degree a user tuning
    static SP per batch would pick), over every D that holds the batch's longest sequence."""
    degrees = static_degrees(cm, max(int(x) for x in lengths))
    if not degrees:
        raise UserError(f"no static degree holds a sequence of {max(lengths)} tokens on {cm.name}")
    plans = [static_plan(lengths, cm, d) for d in degrees]
    best = min(plans, key=lambda p: p.predicted_ms)
    return Plan(
        **{
            **best.__dict__,
            "method": "best-static",
            "extra": {
                **best.extra,
                "static_ms": {f"static-{d}": p.predicted_ms for d, p in zip(degrees, plans)},
            },
        }
    )


NAMED = {
    "flexsp": flexsp_policy,
    "flexsp-official": flexsp_official_policy,
    "megatron-dcp": megatron_dcp_policy,
    "best-static": best_static_policy,
    "best-homogeneous": best_homogeneous_policy,
}
"""Policies with a fixed name; ``static-D`` is added per degree."""


def default_policies(cm: CostModel, longest: int) -> list[str]:
    """Every policy that applies: the named ones (flexsp-official needs N >= 2) and ``static-D``
    for every degree that holds ``longest``."""
    names = [n for n in NAMED if n != "flexsp-official" or cm.num_devices >= 2]
    return names + [f"static-{d}" for d in static_degrees(cm, longest)]


def parse_policies(text: str | None, cm: CostModel, longest: int) -> list[str]:
    """The ``--policies`` list (comma-separated; None: every applicable one), checked: ValueError
    naming an unknown policy, or a static degree that cannot run or cannot hold the longest
    sequence, with what is valid."""
    if text is None:
        return default_policies(cm, longest)
    names = [t.strip() for t in text.split(",") if t.strip()]
    if not names:
        raise UserError(f"--policies {text!r} names no policy; valid: {', '.join(NAMED)}, static-D")
    degrees = static_degrees(cm, longest)
    for name in names:
        if name.startswith("static-"):
            tail = name[len("static-") :]
            d = int(tail) if tail.isdigit() else -1
            if d not in degrees:
                valid = ", ".join(f"static-{x}" for x in degrees) or "none"
                raise UserError(
                    f"--policies: {name} cannot run this input on {cm.name} with "
                    f"{cm.num_devices} devices (longest sequence {longest} tokens, "
                    f"C = {cm.capacity_tokens}); valid static degrees: {valid}"
                )
        elif name not in NAMED:
            raise UserError(
                f"--policies: unknown policy {name!r}; valid: {', '.join(NAMED)}, "
                f"{', '.join(f'static-{x}' for x in degrees)}"
            )
        elif name == "flexsp-official" and cm.num_devices < 2:
            raise UserError("--policies: flexsp-official uses SP sizes 2..N and needs --num-devices >= 2")
    if len(set(names)) != len(names):
        raise UserError(f"--policies {text!r} names a policy twice")
    return names


def run_policy(name: str, lengths: Sequence[int], cm: CostModel, settings: PolicySettings) -> Plan:
    """The plan policy ``name`` makes for ``lengths`` under ``cm``."""
    fn = static_policy(int(name[len("static-") :])) if name.startswith("static-") else NAMED[name]
    return fn(lengths, cm, settings)
