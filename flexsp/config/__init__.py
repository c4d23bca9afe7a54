"""The configuration tree of FlexSP's Hydra tools (flexsp-train, flexsp-profile, flexsp-dryrun,
flexsp-bench): one dataclass per area, a docstring under each field, choices as enums, validated in
one place (:func:`load_config`) before any rank starts. ``flexsp-plan`` and ``flexsp-simulate``
(argparse) share the checks of :mod:`solver.errors` and :mod:`solver.inputs`.

- ``model``: :class:`ModelSection` (flexsp.config.model)
- ``data``: :class:`flexsp.data.config.DataConfig` (with ``corpus`` and ``sampler``)
- ``parallel``: :class:`ParallelConfig`, ``train``: :class:`TrainConfig` (flexsp.config.train)
- ``solver``: :class:`SolverConfig` (flexsp.config.solver)
- ``profile`` / ``dryrun`` / ``bench``: :class:`ProfileConfig`, :class:`DryRunConfig`,
  :class:`BenchConfig` (one tool each)
"""

from flexsp.config.bench import BenchConfig
from flexsp.config.dryrun import DryRunConfig
from flexsp.config.fields import Choice, matches_type, plain, type_name, typed_section, typed_value
from flexsp.config.model import ModelSection
from flexsp.config.profile import ProfileConfig
from flexsp.config.solver import BackgroundMode, MilpBackend, SolverConfig
from flexsp.config.train import (
    RESUME_HELP,
    Backend,
    Engine,
    ParallelConfig,
    ParallelMode,
    Precision,
    TrainConfig,
    TrainLogger,
    check_output_dir,
    param_dtype,
    resolve_precision,
)
from flexsp.config.tree import RunConfig, load_config

__all__ = [
    "RESUME_HELP",
    "BackgroundMode",
    "Backend",
    "BenchConfig",
    "Choice",
    "DryRunConfig",
    "Engine",
    "MilpBackend",
    "ModelSection",
    "ParallelConfig",
    "ParallelMode",
    "Precision",
    "ProfileConfig",
    "RunConfig",
    "SolverConfig",
    "TrainConfig",
    "TrainLogger",
    "check_output_dir",
    "load_config",
    "matches_type",
    "param_dtype",
    "plain",
    "resolve_precision",
    "type_name",
    "typed_section",
    "typed_value",
]
