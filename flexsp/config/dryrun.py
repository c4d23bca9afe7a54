"""Section ``dryrun`` of ``flexsp-dryrun`` (``configs/dryrun/default.yaml``)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from flexsp.errors import UserError, check_power_of_two
from solver.workloads import NAMES as WORKLOADS

GB = 10**9
"""``dryrun.device_memory_gb`` and ``dryrun.reserve_gb`` are GB: 10^9 bytes."""


@dataclass
class DryRunConfig:
    world_size: int = 64
    """Ranks of the fake world (a power of two)."""
    devices_per_node: int = 8
    """Ranks per node (a power of two; capped at world_size)."""
    device_memory_gb: float = 80.0
    """Memory per device, GB (10^9 bytes: an "80 GB" H100 has 80e9 bytes = 74.5 GiB; an H200 141 GB)."""
    reserve_gb: float = 6.0
    """Memory per device kept free, GB (10^9 bytes), besides the loss's transient chunk (computed
    from the model and added on top): the CUDA context and library workspaces (~1 GB: 0.75 GiB of
    non-PyTorch memory was measured in one process on the H200, benchmarks/results/gpu/
    gpu_check_2026-12-04a.md), NCCL buffers of the FSDP and SP communicators (~2 GB: up to a few
    hundred MB per communicator at NCCL's 4 MiB per channel and peer, a rank being in one per SP
    degree), and the caching allocator's fragmentation (~3 GB, ~4% of an 80 GB device)."""
    workload: str = "github"
    """Length distribution of the sampled batch: a solver.workloads name (cpython = real lengths)."""
    num_sequences: int = 512
    """Sequences in the sampled global batch."""
    context_tokens: int = 131072
    """Longest sequence of the sampled batch, tokens (longer draws are redrawn, as the paper drops them)."""
    seed: int = 0
    """Seed of the sampled batch."""
    time_limit: float = 2.0
    """Planner time box for the sampled batch, seconds."""
    peak_tflops: float = 312.0
    """Analytic cost model: dense peak per device, TFLOP/s."""
    mfu: float = 0.5
    """Analytic cost model: model FLOPs utilisation, in (0, 1]."""
    zero_gbps: float = 50.0
    """Analytic cost model: FSDP all-gather / reduce-scatter bandwidth, GB/s."""
    replicate_gbps: float = 25.0
    """Analytic cost model, HSDP: gradient all-reduce bandwidth across replicas, GB/s."""

    def __post_init__(self) -> None:
        for name in ("world_size", "devices_per_node"):
            check_power_of_two(f"dryrun.{name}", getattr(self, name))
        for name in ("device_memory_gb", "time_limit", "peak_tflops", "zero_gbps", "replicate_gbps"):
            v = getattr(self, name)
            if not (v > 0 and math.isfinite(v)):
                raise UserError(f"dryrun.{name}={v} must be a finite number > 0")
        if not (0 <= self.reserve_gb < self.device_memory_gb and math.isfinite(self.reserve_gb)):
            raise UserError(
                f"dryrun.reserve_gb={self.reserve_gb} must be >= 0 and below "
                f"dryrun.device_memory_gb={self.device_memory_gb}"
            )
        if not 0 < self.mfu <= 1:
            raise UserError(f"dryrun.mfu={self.mfu} must be in (0, 1]")
        if self.workload not in WORKLOADS:
            raise UserError.choice("dryrun.workload", self.workload, WORKLOADS)
        if self.num_sequences < 1:
            raise UserError(f"dryrun.num_sequences={self.num_sequences} must be >= 1")
        if self.context_tokens < 1:
            raise UserError(f"dryrun.context_tokens={self.context_tokens} must be >= 1")
        if self.seed < 0:
            raise UserError(f"dryrun.seed={self.seed} must be >= 0")

    @property
    def device_memory_bytes(self) -> int:
        return round(self.device_memory_gb * GB)

    @property
    def reserve_bytes(self) -> int:
        return round(self.reserve_gb * GB)
