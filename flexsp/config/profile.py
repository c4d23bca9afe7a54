"""Section ``profile`` of ``flexsp-profile`` (``configs/profile.yaml`` composes it with the training
tree: the model, precision, engine and backend profiled are the ones ``model.*``, ``train.precision``
and ``parallel.*`` give training)."""

from __future__ import annotations

from dataclasses import dataclass, field

from flexsp.errors import UserError, check_power_of_two

MODES = ("ulysses", "ring")
"""Attention modes the profiler times at degrees >= 2."""


@dataclass
class ProfileConfig:
    name: str = "profile"
    """Run name: the cost model's ``name`` and the stem of the files written."""
    profile_layers: int = 2
    """Transformer layers actually built and timed (0 or >= the model's layers: the full model).
    With fewer, the model is also built with ``profile_layers // 2`` layers (sharded like training,
    no unsharded copy anywhere); the two depths separate the per-layer work from the fixed
    embedding/head part, and the cost model is scaled to the full depth."""
    max_len: int = 0
    """Longest profiled document and most tokens of one profiled micro-batch (0: the model's
    max_position_embeddings). The generated shapes (long single documents, equal splits, long-tailed
    mixes, many short documents) are fractions of it, so a1 is pinned at the lengths trained."""
    world_size: int = 2
    """Ranks to spawn (ignored when launched by torchrun: the launcher's world is used)."""
    threads_per_rank: int = 1
    """torch threads per spawned rank (torchrun sets OMP_NUM_THREADS=1; keep 1 to match training)."""
    compute_shapes: list | None = None
    """Packed batches (lists of document lengths) timed at degree 1 for the a1/a2/per_sequence/b fit
    (null: generated from max_len)."""
    comm_shapes: list | None = None
    """Packed batches timed at every degree >= 2 and attention mode for the communication fit
    (null: generated from max_len; small groups pin the group latency, large ones the per-token cost)."""
    fit_per_sequence: bool = True
    """Fit the per-document term (CostModel.per_sequence_ms); False keeps the paper's a1/a2/b form."""
    joint_fit: bool = True
    """Fit compute and communication terms in one NNLS over every timed shape (degree 1 and SP
    groups share a1/a2/per_sequence/b, as the CostModel does); False: compute first, then the
    communication residual per degree (only with the full model: profile_layers=0)."""
    fit_group_latency: bool = True
    """Fit a fixed latency per group of each degree (CostModel.group_latency_ms) jointly with the
    per-token communication cost (needs joint_fit and comm shapes of several sizes)."""
    fit_per_sequence_comm: bool = True
    """Fit an extra time per document of each mode:degree's groups beyond per_sequence_ms
    (CostModel.per_sequence_comm_ms, e.g. per-document collectives of Ulysses) in the joint fit."""
    modes: list = field(default_factory=lambda: list(MODES))
    """Attention modes to profile at degrees >= 2 (ring fills ring_mb_per_token/p2p bandwidth)."""
    link_mb: list = field(default_factory=lambda: [0.25, 2.0, 8.0])
    """Per-rank message sizes (MB) of the all-to-all and ring p2p micro-benchmarks."""
    repeats: int = 5
    """Timed repetitions of every item (fit shapes, optimizer step, validation micro-batches and
    steps), interleaved round-robin after one warm-up; the fastest is kept."""
    memory_mb: float = 0.0
    """Usable memory per device, MB (0: 90% of the CUDA device's memory, or on CPU MemAvailable / ranks)."""
    capacity_tokens: int = 0
    """If > 0, tokens per device written as capacity_override (emulates a memory budget)."""
    num_devices: int = 0
    """Devices the written cost model describes (0: the profiled world size). Model states are
    ZeRO-3 sharded over them; degrees beyond the profiled ones reuse the largest measured bandwidth
    (one profiled device: the paper's defaults, said in the source)."""
    validate_batches: int = 3
    """Held-out long-tailed global batches to plan and run for predicted-vs-measured (0: skip).
    Run at the profiled depth and priced with the cost model at that depth."""
    validate_distribution: str = "wikipedia"
    """solver.workloads distribution of the held-out batches (scaled to validate_max_len)."""
    validate_tokens: int = 0
    """Tokens per held-out global batch, approximately (0: world size x validate_max_len, so a rank's
    share stays within the profiled token counts)."""
    validate_max_len: int = 0
    """Longest held-out document (0: max_len); lengths are scaled so the distribution's 8K maps to it."""
    plot: bool = True
    """Write a plot of measured vs fitted times."""
    progress: bool = True
    """tqdm progress bar on rank 0."""
    seed: int = 0
    """Seed of the synthetic tokens, the weights and the held-out batches."""
    timeout_s: float = 900.0
    """Spawned ranks are killed after this many seconds (a hang never blocks forever)."""

    def __post_init__(self) -> None:
        check_power_of_two("profile.world_size", self.world_size)
        for key in ("repeats", "threads_per_rank"):
            if getattr(self, key) < 1:
                raise UserError(f"profile.{key}={getattr(self, key)} must be >= 1")
        for key in (
            "profile_layers",
            "max_len",
            "capacity_tokens",
            "validate_batches",
            "validate_tokens",
            "validate_max_len",
            "num_devices",
        ):
            if getattr(self, key) < 0:
                raise UserError(f"profile.{key}={getattr(self, key)} must be >= 0 (0: {_ZERO[key]})")
        check_power_of_two("profile.num_devices", self.num_devices, zero_ok=True)
        if self.max_len and self.max_len < 16:
            raise UserError(
                f"profile.max_len={self.max_len} must be 0 (the model's max_position_embeddings) or >= 16"
            )
        if self.memory_mb < 0 or self.timeout_s <= 0:
            raise UserError(
                f"profile.memory_mb={self.memory_mb} must be >= 0 and profile.timeout_s={self.timeout_s} > 0"
            )
        for key in ("compute_shapes", "comm_shapes"):
            shapes = getattr(self, key)
            if shapes is None:
                continue
            bad = [
                s
                for s in shapes
                if not isinstance(s, (list, tuple))
                or not s
                or any(isinstance(x, bool) or not isinstance(x, int) or x < 2 for x in s)
            ]
            if bad:
                raise UserError(
                    f"profile.{key} must be null or lists of integer document lengths >= 2, got {bad[:3]}"
                )
        if self.compute_shapes is not None and len(self.compute_shapes) < 3:
            raise UserError(
                f"profile.compute_shapes needs >= 3 shapes for a 3-term fit, got {len(self.compute_shapes)}"
            )
        if self.comm_shapes is not None and not self.comm_shapes:
            raise UserError("profile.comm_shapes must be null (generated) or a non-empty list of shapes")
        bad = [m for m in self.modes if m not in MODES]
        if bad or not self.modes:
            raise UserError(
                f"profile.modes={self.modes} are not profiled; valid options: {list(MODES)} (one or both)"
            )
        if len(self.link_mb) < 2 or any(
            isinstance(x, bool) or not isinstance(x, (int, float)) or not x > 0 for x in self.link_mb
        ):
            raise UserError(f"profile.link_mb={self.link_mb} needs >= 2 positive sizes (MB)")
        if self.validate_distribution not in _DISTRIBUTIONS:
            raise UserError.choice(
                "profile.validate_distribution", self.validate_distribution, _DISTRIBUTIONS
            )

    def depths(self, layers: int) -> list[int]:
        """Depths built and timed for a model of ``layers`` layers: [layers] (full model), or
        [profile_layers // 2, profile_layers] (then scaled to ``layers``)."""
        n = self.profile_layers
        if not n or n >= layers:
            return [layers]
        if n < 2:
            raise UserError(
                f"profile.profile_layers={n} cannot separate the per-layer work from the fixed "
                f"embedding/head part (it builds profile_layers // 2 = 0 layers too); "
                f"valid: 0 (the full model, {layers} layers) or 2..{layers}"
            )
        return [n // 2, n]

    def resolved_max_len(self, mcfg) -> int:
        return self.max_len or int(mcfg.max_position_embeddings)

    def shapes(self, mcfg) -> tuple[list, list]:
        m = self.resolved_max_len(mcfg)
        comp = self.compute_shapes if self.compute_shapes is not None else default_compute_shapes(m)
        comm = self.comm_shapes if self.comm_shapes is not None else default_comm_shapes(m)
        return [[int(x) for x in s] for s in comp], [[int(x) for x in s] for s in comm]

    def validation_lengths(self, mcfg, world: int = 1) -> tuple[int, int]:
        """(longest held-out document, tokens per held-out batch) on ``world`` ranks."""
        vmax = self.validate_max_len or self.resolved_max_len(mcfg)
        return vmax, self.validate_tokens or world * vmax


_ZERO = {
    "profile_layers": "the full model",
    "max_len": "the model's max_position_embeddings",
    "capacity_tokens": "from memory_mb",
    "validate_batches": "no validation",
    "validate_tokens": "world size x validate_max_len",
    "validate_max_len": "max_len",
    "devices_per_node": "LOCAL_WORLD_SIZE or the world size",
    "num_devices": "the profiled world size",
}
_DISTRIBUTIONS = ("wikipedia", "github", "commoncrawl")


def _dedupe(shapes, max_len: int) -> list:
    """Shapes trimmed to at most ``max_len`` tokens (short documents dropped from the end), unique."""
    out, seen = [], set()
    for s in shapes:
        s = list(s)
        while len(s) > 1 and sum(s) > max_len:
            s.pop()
        s = [min(x, max_len) for x in s]
        key = tuple(s)
        if key not in seen:
            seen.add(key)
            out.append(list(s))
    return out


def default_compute_shapes(max_len: int) -> list:
    """Degree-1 fit shapes, every one at most ``max_len`` tokens: long single documents (M .. M/64:
    the a1 vs a2 split), equal splits of M (same tokens, 1/k of the sum of squares), many short
    documents (per_sequence_ms) and long-tailed mixes."""
    M = int(max_len)

    def f(k):
        return max(16, M // k)

    short = max(2, min(16, M // 16))
    singles = [[f(k)] for k in (1, 2, 4, 8, 16, 64)]
    splits = [[f(2)] * 2, [f(8)] * 8, [f(32)] * min(32, max(1, M // 16)), [short] * min(64, M // short)]
    mixes = [
        [f(2), f(4), f(8), f(16), f(32), f(32)],
        [f(2), f(8)],
        [3 * M // 8, 3 * M // 8, f(8)],
        [f(4)] + [short] * min(32, M // 2 // short),
    ]
    return _dedupe(singles + splits + mixes, M)


def default_comm_shapes(max_len: int) -> list:
    """Shapes timed at every degree >= 2 and mode: small groups (64-128 tokens, 8 short documents:
    group latency, per-document cost) and large ones up to ``max_len`` (per-token cost)."""
    M = int(max_len)

    def f(k):
        return max(16, M // k)

    small = [[min(64, M)], [min(128, M)], [16] * 8, [32] * 8]
    large = [
        [f(16)],
        [f(4)],
        [f(2)],
        [M],
        [f(16)] * 4,
        [f(4), f(8), f(16), f(32), f(64), f(64)],
        [f(4)] + [32] * 16,
    ]
    return _dedupe(small + large, M)
