"""Hydra structured config of ``flexsp-profile`` (``configs/profile.yaml`` mirrors it)."""
from __future__ import annotations

from dataclasses import dataclass, field, fields


@dataclass
class ProfileConfig:
    name: str = "profile"
    """Run name: the cost model's ``name`` and the stem of the files written."""
    output_dir: str = "outputs/profile"
    """Where ``<name>.json`` (the CostModel), ``<name>.report.json``, ``<name>.md`` and
    ``<name>.png`` are written."""
    model: str = "tiny"
    """Model preset (flexsp.model.PRESETS) to profile; the same one training will run."""
    model_overrides: dict = field(default_factory=dict)
    """ModelConfig fields to override (e.g. {layers: 2, dtype: bfloat16})."""
    world_size: int = 2
    """Ranks to spawn (ignored when launched by torchrun: the launcher's world is used)."""
    threads_per_rank: int = 1
    """torch threads per spawned rank (torchrun sets OMP_NUM_THREADS=1; keep 1 to match training)."""
    backend: str | None = None
    """torch.distributed backend (None: nccl with CUDA, gloo otherwise)."""
    engine: str = "fsdp2"
    """Training engine the micro-batches run under (its per-micro-batch collectives land in b)."""
    compute_shapes: list = field(default_factory=lambda: [
        [128], [256], [512], [1024], [1536], [2048],
        [64] * 8, [32] * 32, [16] * 64, [128] * 8, [256] * 4, [512] * 2, [1024, 256, 128, 64, 32, 32],
        [2048, 512], [768, 768, 256], [512] + [16] * 32])
    """Packed batches (lists of document lengths) timed at degree 1 for the a1/a2/per_sequence/b fit
    (shapes with many short documents pin the per-document term)."""
    comm_shapes: list = field(default_factory=lambda: [[64], [128], [256], [16] * 8, [32] * 8,
                                                       [512], [1024], [1536], [2048], [256] * 4,
                                                       [1024, 512, 256, 128, 64, 64], [1024] + [32] * 16])
    """Packed batches timed at every degree >= 2 and attention mode for the communication fit: small
    groups (64-256 tokens) pin the fixed group latency, large ones the per-token cost."""
    fit_per_sequence: bool = True
    """Fit the per-document term (CostModel.per_sequence_ms); False keeps the paper's a1/a2/b form."""
    joint_fit: bool = True
    """Fit compute and communication terms in one NNLS over every timed shape (degree 1 and SP
    groups share a1/a2/per_sequence/b, as the CostModel does); False: compute first, then the
    communication residual per degree."""
    fit_group_latency: bool = True
    """Fit a fixed latency per group of each degree (CostModel.group_latency_ms) jointly with the
    per-token communication cost (needs joint_fit and comm shapes of several sizes)."""
    fit_per_sequence_comm: bool = True
    """Fit an extra time per document of each mode:degree's groups beyond per_sequence_ms
    (CostModel.per_sequence_comm_ms, e.g. per-document collectives of Ulysses) in the joint fit."""
    modes: list = field(default_factory=lambda: ["ulysses", "ring"])
    """Attention modes to profile at degrees >= 2 (ring fills ring_mb_per_token/p2p bandwidth)."""
    link_mb: list = field(default_factory=lambda: [0.25, 2.0, 8.0])
    """Per-rank message sizes (MB) of the all-to-all and ring p2p micro-benchmarks."""
    repeats: int = 5
    """Timed repetitions of every item (fit shapes, optimizer step, validation micro-batches and
    steps), interleaved round-robin after one warm-up; the fastest is kept."""
    memory_mb: float = 0.0
    """Usable memory per device, MB (0: CUDA total memory, or on CPU MemAvailable / ranks)."""
    capacity_tokens: int = 0
    """If > 0, tokens per device written as capacity_override (emulates a memory budget)."""
    devices_per_node: int = 0
    """Ranks per node (0: LOCAL_WORLD_SIZE from the launcher, else the world size)."""
    validate_batches: int = 3
    """Held-out long-tailed global batches to plan and run for predicted-vs-measured (0: skip).
    Their micro-batches and steps are timed interleaved with the fit shapes (same load drift)."""
    validate_distribution: str = "wikipedia"
    """solver.workloads distribution of the held-out batches (scaled to validate_max_len)."""
    validate_tokens: int = 6144
    """Tokens per held-out global batch (approximately)."""
    validate_max_len: int = 2048
    """Longest held-out document (lengths are scaled so the distribution's 8K maps to this)."""
    plot: bool = True
    """Write a plot of measured vs fitted times."""
    progress: bool = True
    """tqdm progress bar on rank 0."""
    seed: int = 0
    """Seed of the synthetic tokens and the held-out batches."""
    timeout_s: float = 900.0
    """Spawned ranks are killed after this many seconds (a hang never blocks forever)."""

    def __post_init__(self) -> None:
        if self.world_size < 1 or self.world_size & (self.world_size - 1):
            raise ValueError(f"profile world_size must be a power of two >= 1, got {self.world_size}")
        if self.repeats < 1 or self.threads_per_rank < 1:
            raise ValueError(f"repeats={self.repeats} and threads_per_rank={self.threads_per_rank} must be >= 1")
        for key in ("compute_shapes", "comm_shapes"):
            shapes = getattr(self, key)
            bad = [s for s in shapes if not isinstance(s, (list, tuple)) or not s
                   or any(int(x) < 2 for x in s)]
            if bad:
                raise ValueError(f"{key} must be lists of document lengths >= 2, got {bad[:3]}")
        if len(self.compute_shapes) < 3:
            raise ValueError(f"compute_shapes needs >= 3 shapes for a 3-term fit, got {len(self.compute_shapes)}")
        bad = [m for m in self.modes if m not in ("ulysses", "ring")]
        if bad:
            raise ValueError(f"modes {bad} are not profiled; valid options: ['ulysses', 'ring']")
        if len(self.link_mb) < 2 or min(self.link_mb) <= 0:
            raise ValueError(f"link_mb needs >= 2 positive sizes, got {self.link_mb}")
        if self.memory_mb < 0 or self.capacity_tokens < 0 or self.validate_batches < 0:
            raise ValueError(f"memory_mb={self.memory_mb}, capacity_tokens={self.capacity_tokens}, "
                             f"validate_batches={self.validate_batches} must be >= 0")

    @classmethod
    def from_dict(cls, data: dict) -> "ProfileConfig":
        valid = {f.name for f in fields(cls)}
        bad = sorted(set(data) - valid)
        if bad:
            raise ValueError(f"unknown profile config keys {bad}; valid keys: {sorted(valid)}")
        return cls(**data)
