"""The plan: the contract between the planner (`solver/`) and the runtime (`flexsp/`).

A plan for one global batch is a list of micro-batches run one after another (gradient
accumulation). Each micro-batch splits the devices into sequence-parallel groups that run
concurrently; a group of degree ``sp`` owns the aligned rank block ``[k*sp, (k+1)*sp)`` and runs the
sequences ``seq_ids`` (indices into the input lengths, in input order).

Plans are frozen dataclasses that round-trip through JSON. The JSON keys ``num_devices``,
``micro_batches[*].groups[*].{sp, ranks, seq_ids}``, ``predicted_ms`` and ``solve_seconds`` are the
public contract; everything else is informative.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field

from .errors import UserError

ATTENTION_MODES = ("local", "ulysses", "ring", "hybrid")


@dataclass(frozen=True)
class GroupPlan:
    sp: int
    """Sequence-parallel degree (a power of two)."""
    ranks: tuple[int, ...]
    """The aligned rank block this group owns: ``range(k*sp, (k+1)*sp)``."""
    seq_ids: tuple[int, ...]
    """Indices of the sequences this group runs, into the input lengths."""
    attention: str = "ulysses"
    """How the group runs attention: local (sp=1), ulysses, ring or hybrid."""
    tokens: int = 0
    """Total tokens of the group's sequences."""
    predicted_ms: float = 0.0
    """Predicted fwd+bwd time of the group, by the cost model."""
    memory_mb: float = 0.0
    """Predicted peak memory per device of the group (model states + activations)."""


@dataclass(frozen=True)
class MicroBatchPlan:
    groups: tuple[GroupPlan, ...]
    """Groups on disjoint rank blocks, run concurrently."""
    predicted_ms: float = 0.0
    """The slowest group's predicted time."""

    def group_of_rank(self, rank: int) -> GroupPlan | None:
        """The group that owns ``rank`` in this micro-batch (None: the rank idles)."""
        for group in self.groups:
            if group.ranks[0] <= rank <= group.ranks[-1]:
                return group
        return None


@dataclass(frozen=True)
class Plan:
    num_devices: int
    """Devices (ranks) the plan covers."""
    micro_batches: tuple[MicroBatchPlan, ...]
    """Micro-batches in execution order."""
    predicted_ms: float
    """Predicted iteration time: the sum of the micro-batch times."""
    solve_seconds: float = 0.0
    """Wall time the planner took."""
    lower_bound_ms: float = 0.0
    """A proven lower bound on the iteration time of any valid plan under the cost model."""
    method: str = ""
    """Which planner produced the plan (e.g. flexsp, static-64, greedy-hybrid-cp)."""
    status: str = ""
    """optimal (proven) | feasible (search ran to the end) | time_limit (cut short; ``extra["cut"]``
    says by what) | fallback (only the safety-net packing fitted in the time box)."""
    cost_model: str = ""
    """Name of the cost model the plan was priced with."""
    num_sequences: int = 0
    """How many input lengths the plan places."""
    extra: dict = field(default_factory=dict, compare=False)
    """Free-form diagnostics (baselines, per-phase times...)."""

    @property
    def gap(self) -> float:
        """Relative distance of predicted_ms above the lower bound (0.0 = proven optimal)."""
        if self.lower_bound_ms <= 0:
            return float("nan")
        return max(0.0, self.predicted_ms / self.lower_bound_ms - 1.0)

    def idle_devices(self) -> list[int]:
        """Per micro-batch, how many devices are in no group (they wait the whole micro-batch)."""
        return [self.num_devices - sum(g.sp for g in mb.groups) for mb in self.micro_batches]

    @property
    def idle_device_fraction(self) -> float:
        """Share of the plan's device-time (devices x micro-batch time) spent by devices that are
        in no group: sum_mb idle_mb * t_mb / (N * sum_mb t_mb); 0.0 for an empty plan."""
        total = sum(mb.predicted_ms for mb in self.micro_batches) * self.num_devices
        if total <= 0:
            return 0.0
        return sum(i * mb.predicted_ms for i, mb in zip(self.idle_devices(), self.micro_batches)) / total

    def summary(self, max_chars: int = 200) -> str:
        """Compact text such as ``3 mb: 8x8 | 2x(1x32 + 2x16)``: count x degree per micro-batch,
        consecutive identical micro-batches run-length encoded as ``kx(...)``. Longer than
        ``max_chars`` (0: no cap), it ends with ``| ... (+k more mb; G groups, S sequences)``."""
        runs: list[list] = []
        for mb in self.micro_batches:
            counts: dict[int, int] = {}
            for g in mb.groups:
                counts[g.sp] = counts.get(g.sp, 0) + 1
            pattern = " + ".join(f"{n}x{sp}" for sp, n in sorted(counts.items(), reverse=True))
            if runs and runs[-1][0] == pattern:
                runs[-1][1] += 1
            else:
                runs.append([pattern, 1])
        items = [(pat if k == 1 else f"{k}x({pat})", k) for pat, k in runs]
        head = f"{len(self.micro_batches)} mb: "
        text = head + " | ".join(i for i, _ in items)
        if not max_chars or len(text) <= max_chars:
            return text
        groups = sum(len(mb.groups) for mb in self.micro_batches)
        seqs = sum(len(g.seq_ids) for mb in self.micro_batches for g in mb.groups)
        kept, shown, length = [], 0, len(head)
        for item, k in items:
            tail = (
                f" | ... (+{len(self.micro_batches) - shown - k} more mb; {groups} groups, {seqs} sequences)"
            )
            if length + len(item) + 3 + len(tail) > max_chars and kept:
                break
            kept.append(item)
            shown += k
            length += len(item) + 3
        rest = len(self.micro_batches) - shown
        return head + " | ".join(kept) + f" | ... (+{rest} more mb; {groups} groups, {seqs} sequences)"

    def to_dict(self) -> dict:
        out = {k: getattr(self, k) for k in self.__dataclass_fields__ if k not in ("micro_batches", "extra")}
        out["micro_batches"] = [
            {
                "groups": [
                    {
                        "sp": g.sp,
                        "ranks": list(g.ranks),
                        "seq_ids": list(g.seq_ids),
                        "attention": g.attention,
                        "tokens": g.tokens,
                        "predicted_ms": g.predicted_ms,
                        "memory_mb": g.memory_mb,
                    }
                    for g in mb.groups
                ],
                "predicted_ms": mb.predicted_ms,
            }
            for mb in self.micro_batches
        ]
        out["extra"] = copy.deepcopy(self.extra)
        out["gap"] = None if self.lower_bound_ms <= 0 else self.gap
        return out

    def to_json(self, indent: int | None = None) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, data: dict) -> "Plan":
        try:
            mbs = tuple(
                MicroBatchPlan(
                    groups=tuple(
                        GroupPlan(
                            sp=int(g["sp"]),
                            ranks=tuple(int(r) for r in g["ranks"]),
                            seq_ids=tuple(int(i) for i in g["seq_ids"]),
                            attention=str(g.get("attention", "ulysses")),
                            tokens=int(g.get("tokens", 0)),
                            predicted_ms=float(g.get("predicted_ms", 0.0)),
                            memory_mb=float(g.get("memory_mb", 0.0)),
                        )
                        for g in mb["groups"]
                    ),
                    predicted_ms=float(mb.get("predicted_ms", 0.0)),
                )
                for mb in data["micro_batches"]
            )
            return cls(
                num_devices=int(data["num_devices"]),
                micro_batches=mbs,
                predicted_ms=float(data.get("predicted_ms", 0.0)),
                solve_seconds=float(data.get("solve_seconds", 0.0)),
                lower_bound_ms=float(data.get("lower_bound_ms", 0.0)),
                method=str(data.get("method", "")),
                status=str(data.get("status", "")),
                cost_model=str(data.get("cost_model", "")),
                num_sequences=int(data.get("num_sequences", 0)),
                extra=dict(data.get("extra", {})),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise UserError(
                f"malformed plan: {exc!r}; expected keys num_devices, "
                "micro_batches[*].groups[*].sp/ranks/seq_ids"
            ) from exc

    @classmethod
    def from_json(cls, text: str) -> "Plan":
        try:
            return cls.from_dict(json.loads(text))
        except json.JSONDecodeError as exc:
            raise UserError(f"plan is not valid JSON: {exc}") from exc
