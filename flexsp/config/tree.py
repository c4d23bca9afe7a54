"""The configuration tree of every Hydra tool, typed and validated in one place.

Hydra composes ``configs/config.yaml`` (+ the tool's group: ``profile``, ``dryrun``, ``bench``, + the
command line's overrides) into a mapping (flexsp.config.compose); :func:`load_config` turns it into a
:class:`RunConfig` -- every section a dataclass with a docstring under each field, every value
checked against its annotation (flexsp.config.fields), choices as enums -- before any rank, process
group, data or model work starts. A bad key or value is one :class:`flexsp.errors.UserError` naming
``<section>.<field>``, the value and what is valid. Nothing downstream receives the mapping.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from flexsp.config.bench import BenchConfig
from flexsp.config.dryrun import DryRunConfig
from flexsp.config.fields import plain, typed_section
from flexsp.config.model import ModelSection
from flexsp.config.profile import ProfileConfig
from flexsp.config.solver import SolverConfig
from flexsp.config.train import Engine, ParallelConfig, Precision, TrainConfig
from flexsp.data.config import DataConfig
from flexsp.errors import UserError

SECTIONS = ("model", "data", "parallel", "solver", "train", "output_dir")
"""The sections every tool's tree has."""
TOOL_SECTIONS = {"profile": ProfileConfig, "dryrun": DryRunConfig, "bench": BenchConfig}
"""The sections one tool adds (``configs/<tool>/default.yaml``)."""


@dataclass
class RunConfig:
    """The whole configuration of one run of a FlexSP tool."""

    model: ModelSection
    """Which model: a preset with field overrides, or a Hugging Face checkpoint (flexsp.config.model)."""
    data: DataConfig
    """The documents and how global batches are drawn (flexsp.data.config)."""
    parallel: ParallelConfig
    """Engine, SP mode, HSDP, backend, expected world size (flexsp.config.train)."""
    solver: SolverConfig
    """The planner and its cost model (flexsp.config.solver)."""
    train: TrainConfig
    """The training loop (flexsp.config.train)."""
    output_dir: Path
    """Run directory: metrics.jsonl, config.yaml, checkpoints/ (and the tools' outputs)."""
    profile: ProfileConfig | None = None
    """flexsp-profile's section (None for the other tools)."""
    dryrun: DryRunConfig | None = None
    """flexsp-dryrun's section (None for the other tools)."""
    bench: BenchConfig | None = None
    """flexsp-bench's section (None for the other tools)."""

    def __post_init__(self) -> None:
        if self.train.precision == Precision.bf16_pure and self.parallel.engine != Engine.fsdp2:
            raise UserError(
                "train.precision=bf16-pure needs parallel.engine=fsdp2; valid with deepspeed: fp32, bf16",
                field="train.precision",
                options=["auto", "fp32", "bf16"],
            )

    def to_container(self) -> dict:
        """The tree as plain YAML/JSON data, in the shape Hydra composes (config.yaml, checkpoints)."""
        out = {"model": self.model.to_container(), **{k: plain(getattr(self, k)) for k in SECTIONS[1:]}}
        for name in TOOL_SECTIONS:
            if getattr(self, name) is not None:
                out[name] = plain(getattr(self, name))
        return out


def load_config(raw: Mapping) -> RunConfig:
    """A composed config (what Hydra gives, or the same mapping written by :meth:`RunConfig.to_container`)
    -> the typed, validated :class:`RunConfig`; UserError (one line) for the first bad key or value."""
    if not isinstance(raw, Mapping):
        raise UserError(f"a config is a mapping of {list(SECTIONS)}, got {type(raw).__name__}")
    missing = [k for k in SECTIONS if k not in raw]
    if missing:
        raise UserError(f"config has no {missing} section; expected {', '.join(SECTIONS)}")
    unknown = sorted(set(raw) - set(SECTIONS) - set(TOOL_SECTIONS) - {"hydra"})
    if unknown:
        raise UserError(f"unknown config sections {unknown}; valid: {[*SECTIONS, *TOOL_SECTIONS]}")
    train = typed_section(TrainConfig, raw["train"], "train")
    data = dict(raw["data"] or {})
    # the sampler deals at most train.global_batch documents per step (the planner's problem size)
    data["sampler"] = {**dict(data.get("sampler") or {}), "max_docs_per_batch": train.global_batch}
    out = raw["output_dir"]
    if not isinstance(out, (str, Path)) or not str(out).strip():
        raise UserError(f"output_dir={out!r} must be a directory path", field="output_dir")
    tools = {
        name: typed_section(cls, raw[name], name)
        for name, cls in TOOL_SECTIONS.items()
        if raw.get(name) is not None
    }
    return RunConfig(
        model=ModelSection.from_container(raw["model"]),
        data=typed_section(DataConfig, data, "data"),
        parallel=typed_section(ParallelConfig, raw["parallel"], "parallel"),
        solver=typed_section(SolverConfig, raw["solver"], "solver"),
        train=train,
        output_dir=Path(out),
        **tools,
    )
