"""Cost model: predicted time and memory of one SP group running a set of sequences.

The form follows the FlexSP paper (see ``shared/reference/flexsp-paper.md``), generalised:

    time(group)  = sum_i (a1 * L_i^2 + a2 * L_i) / sp  +  b  +  comm(sp, attention) * sum_i L_i
                   (+ per_sequence_ms per sequence, + group_latency_ms[sp] per group;
                    a plan adds step_fixed_ms once = step_overhead_ms + the HSDP all-reduce;
                    all 0 in the paper's model)
    ulysses comm = a2a_mb_per_token / sp / bw[sp]        (0 when sp == 1; the paper's A2A term)
    ring comm    = ring_mb_per_token * (sp - 1) / sp / p2p_bw[sp]   (KV passes round the ring)
    memory(dev)  = model_states_mb + act_mb_per_token * sum_i L_i / sp     <= memory_mb
    model states = ZeRO-sharded over all devices, or over shard_size devices (HSDP)
    HSDP step    = 2 (R-1)/R * params * grad_bytes / shard_size / replicate_gbps, R = N / shard_size

``b`` is a fixed per-group overhead (paid once per group, concurrently). Bandwidths are in GB/s and
volumes in MB, so a volume / bandwidth ratio is in ms (the paper's units, kept exactly).

A cost model is plain data: it round-trips through JSON (``save`` / ``load``), which is how the
profiler hands a calibrated model to the planner and the trainer.
"""

from __future__ import annotations

import json
import math
from dataclasses import MISSING, asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from .errors import UserError, check_power_of_two
from .network import apply_topology

ZERO_STAGES = (0, 1, 2, 3)


def _mode_degree_table(name: str, table: dict) -> dict:
    """Normalise {degree or "mode:degree": ms} (JSON makes every key a string)."""
    out = {}
    for key, value in table.items():
        mode, _, deg = str(key).rpartition(":")
        if mode and mode not in ("ulysses", "ring", "hybrid"):
            raise UserError(f"{name} key {key!r}: mode must be ulysses, ring or hybrid")
        try:
            degree = int(deg)
        except ValueError:
            raise UserError(f"{name} key {key!r}: expected a degree or 'mode:degree'") from None
        if float(value) < 0:
            raise UserError(f"{name}[{key!r}] must be >= 0, got {value}")
        out[f"{mode}:{degree}" if mode else degree] = float(value)
    return out


@dataclass(frozen=True)
class CostModel:
    name: str
    """Human-readable name (a preset name, or the profiler's run name)."""
    num_devices: int
    """Devices in the cluster (a power of two)."""
    devices_per_node: int
    """Devices that share a fast intra-node link; groups up to this size stay in one node."""
    memory_mb: float
    """Usable memory per device, MB."""
    a1: float
    """Quadratic compute coefficient, ms per token^2 (attention), for the whole fwd+bwd."""
    a2: float
    """Linear compute coefficient, ms per token (GEMMs, elementwise)."""
    b: float
    """Fixed overhead per group and micro-batch, ms."""
    a2a_mb_per_token: float
    """All-to-all volume per token of a Ulysses group, MB (paper: 16 * layers * hidden / 2^20)."""
    bandwidth_gbps: dict[int, float]
    """All-to-all bandwidth per SP degree, GB/s."""
    act_mb_per_token: float
    """Activation memory per token held on a device, MB."""
    params_gi: float
    """Model parameters in units of 2^30."""
    state_bytes_per_param: float = 16.0
    """Bytes of model state per parameter (mixed-precision Adam: 2 + 2 + 12)."""
    zero_stage: int = 3
    """ZeRO stage of the data-parallel sharding across all devices (0-3)."""
    heads: int = 0
    """Attention heads (0 = unknown). Ulysses needs sp <= heads and sp | heads."""
    kv_heads: int = 0
    """Key/value heads (0 = same as heads)."""
    ring_mb_per_token: float = 0.0
    """Ring-attention KV volume per token, MB (0 disables ring attention in plans)."""
    p2p_bandwidth_gbps: dict[int, float] = field(default_factory=dict)
    """Ring (point-to-point) bandwidth per SP degree, GB/s."""
    capacity_override: int = 0
    """If > 0, tokens per device allowed (replaces the memory formula)."""
    per_sequence_ms: float = 0.0
    """Time each sequence adds to its group regardless of length or degree (e.g. a per-document
    kernel launch loop on CPU); 0 in the paper's model."""
    group_latency_ms: dict = field(default_factory=dict)
    """Fixed time a group pays on top of b (collective launch latency, e.g. the per-layer
    all-to-alls on gloo), keyed by SP degree (any mode) or "mode:degree" (that mode only, e.g.
    "ulysses:2"; takes precedence); {} in the paper's model. Missing entries pay 0."""
    per_sequence_comm_ms: dict = field(default_factory=dict)
    """Extra time per sequence in a group of degree > 1 (per-document collectives or kernels of
    the SP attention), keyed like ``group_latency_ms``; {} in the paper's model."""
    step_overhead_ms: float = 0.0
    """Fixed time per iteration whatever the plan (optimizer step, gradient sync tail); 0 in the
    paper's model. Added once to a plan's predicted iteration time (``step_fixed_ms``: this plus the
    HSDP gradient all-reduce)."""
    source: str = ""
    """Where the numbers come from (paper reference, profiler run...)."""
    device: str = ""
    """The device the compute terms were measured on or derived for: ``cpu``, ``cuda:<GPU name>``
    ('' = not recorded, e.g. files written before this field). A CUDA run refuses a cost model of
    another device type unless ``solver.allow_foreign_cost_model`` is set."""
    layers: int = 0
    """Transformer layers of the model the numbers were measured or derived for (0 = unknown)."""
    hidden: int = 0
    """Hidden size of that model (0 = unknown)."""
    activation_checkpointing: bool = False
    """Recorded, not modelled: the profile was measured with activation checkpointing (the
    coefficients already include the recomputation; a run without it is priced wrong)."""
    shard_size: int = 0
    """HSDP: ZeRO sharding within groups of this many devices (a power of two dividing
    num_devices), replicated across num_devices / shard_size groups; 0 = shard over all devices."""
    replicate_gbps: float = 0.0
    """HSDP: bus bandwidth, GB/s, of the once-per-step gradient all-reduce across the replicas;
    required > 0 when there is more than one replica."""
    grad_bytes_per_param: float = 4.0
    """Bytes per parameter of the gradients the HSDP all-reduce moves (fp32 reduction: 4)."""

    def __post_init__(self):
        _check_types(self)
        n = check_power_of_two("num_devices", self.num_devices)
        check_power_of_two("devices_per_node", self.devices_per_node)
        if self.zero_stage not in ZERO_STAGES:
            raise UserError(f"zero_stage must be one of {ZERO_STAGES}, got {self.zero_stage}")
        if (
            min(
                self.a1,
                self.a2,
                self.b,
                self.a2a_mb_per_token,
                self.act_mb_per_token,
                self.per_sequence_ms,
                self.step_overhead_ms,
            )
            < 0
        ):
            raise UserError(f"cost coefficients must be >= 0 (a1={self.a1}, a2={self.a2}, b={self.b})")
        if self.memory_mb <= 0:
            raise UserError(f"memory_mb must be > 0, got {self.memory_mb}")
        for name in ("layers", "hidden", "heads", "kv_heads"):
            if getattr(self, name) < 0:
                raise UserError(f"{name} must be >= 0 (0 = unknown), got {getattr(self, name)}")
        s = check_power_of_two(
            "shard_size", self.shard_size, zero_ok=True, at_most=n, at_most_name=f"num_devices={n}"
        )
        if self.replicate_gbps < 0 or self.grad_bytes_per_param < 0:
            raise UserError(
                f"replicate_gbps and grad_bytes_per_param must be >= 0, got "
                f"{self.replicate_gbps} and {self.grad_bytes_per_param}"
            )
        if self.replicas > 1 and self.replicate_gbps <= 0:
            raise UserError(
                f"shard_size={s} on num_devices={n} makes {self.replicas} replicas: "
                f"replicate_gbps (the gradient all-reduce bandwidth across them, GB/s) "
                f"must be > 0, got {self.replicate_gbps}"
            )
        if self.act_mb_per_token <= 0 and self.capacity_override <= 0:
            raise UserError(
                f"act_mb_per_token must be > 0 (or capacity_override set), got {self.act_mb_per_token}"
            )
        for name in ("bandwidth_gbps", "p2p_bandwidth_gbps"):
            bad = {k: v for k, v in getattr(self, name).items() if not v > 0}
            if bad:
                raise UserError(f"{name} entries must be > 0 GB/s, got {bad}")
        # JSON turns int keys into strings: normalise so loaded and built models compare equal.
        object.__setattr__(self, "bandwidth_gbps", {int(k): float(v) for k, v in self.bandwidth_gbps.items()})
        object.__setattr__(
            self, "p2p_bandwidth_gbps", {int(k): float(v) for k, v in self.p2p_bandwidth_gbps.items()}
        )
        for name in ("group_latency_ms", "per_sequence_comm_ms"):
            object.__setattr__(self, name, _mode_degree_table(name, getattr(self, name)))
        missing = [s for s in self.degrees if s > 1 and self._lookup(self.bandwidth_gbps, s) is None]
        if missing:
            raise UserError(
                f"bandwidth_gbps has no entry for SP degrees {missing}; have {sorted(self.bandwidth_gbps)}"
            )
        if self.capacity_tokens < 1:
            raise UserError(
                f"model states ({self.model_states_mb:.0f} MB) leave no room for activations in "
                f"{self.memory_mb:.0f} MB per device; add devices, memory or a higher ZeRO stage"
            )

    # -- topology ---------------------------------------------------------------------------
    @property
    def degrees(self) -> tuple[int, ...]:
        """Every power-of-two SP degree from 1 to num_devices."""
        return tuple(1 << k for k in range(self.num_devices.bit_length()))

    @staticmethod
    def _lookup(table: dict[int, float], sp: int) -> float | None:
        """Bandwidth for degree sp; degrees above the largest measured one reuse it (it only drops)."""
        if sp in table:
            return table[sp]
        larger = [k for k in table if k <= sp]
        return table[max(larger)] if larger else None

    # -- memory -----------------------------------------------------------------------------
    @property
    def shard_devices(self) -> int:
        """Devices the ZeRO-sharded states are split over: shard_size, or all devices."""
        return self.shard_size or self.num_devices

    @property
    def replicas(self) -> int:
        """HSDP replicas of the sharded model states (1 without HSDP)."""
        return self.num_devices // self.shard_devices

    @property
    def model_states_mb(self) -> float:
        """Per-device model-state memory under the ZeRO stage (params + grads + optimizer); the
        sharded part is split over ``shard_devices`` (HSDP: shard_size, else all devices)."""
        total = self.params_gi * self.state_bytes_per_param * 1024  # MB: P * 2^30 * bytes / 2^20
        n = self.shard_devices
        if self.zero_stage == 3:
            return total / n
        per = self.state_bytes_per_param
        if self.zero_stage == 2:  # params replicated (2 B), grads + optimizer sharded
            return self.params_gi * 1024 * (2 + (per - 2) / n)
        if self.zero_stage == 1:  # params + grads replicated (4 B), optimizer sharded
            return self.params_gi * 1024 * (4 + (per - 4) / n)
        return total

    @property
    def capacity_tokens(self) -> int:
        """Tokens one device can hold in a micro-batch: C = floor((mem - states) / act)."""
        if self.capacity_override > 0:
            return int(self.capacity_override)
        return math.floor((self.memory_mb - self.model_states_mb) / self.act_mb_per_token)

    def memory_mb_for(self, tokens: int, sp: int) -> float:
        return self.model_states_mb + self.act_mb_per_token * tokens / sp

    def min_degree(self, length: int) -> int:
        """Smallest SP degree whose devices can hold a sequence of ``length`` tokens (0: none)."""
        for sp in self.degrees:
            if length <= sp * self.capacity_tokens:
                return sp
        return 0

    # -- time -------------------------------------------------------------------------------
    @property
    def replicate_allreduce_ms(self) -> float:
        """HSDP, once per step: all-reduce of each rank's gradient shard across the R replicas,
        ``2 (R-1)/R * params * grad_bytes / shard_size / replicate_gbps`` (MB / GB/s = ms); 0
        without replicas."""
        r = self.replicas
        if r <= 1:
            return 0.0
        shard_mb = self.params_gi * 1024 * self.grad_bytes_per_param / self.shard_devices
        return 2 * (r - 1) / r * shard_mb / self.replicate_gbps

    @property
    def step_fixed_ms(self) -> float:
        """Time every plan pays once per iteration: step_overhead_ms + the HSDP all-reduce."""
        return self.step_overhead_ms + self.replicate_allreduce_ms

    def check_model_shape(
        self,
        layers: int | None = None,
        hidden: int | None = None,
        heads: int | None = None,
        kv_heads: int | None = None,
    ) -> None:
        """Raise ValueError naming every field where the model being run differs from the one this
        cost model was built for (fields that are 0 here, or None in the call, are not checked)."""
        bad = []
        for name, value in (("layers", layers), ("hidden", hidden), ("heads", heads), ("kv_heads", kv_heads)):
            mine = getattr(self, name)
            if value is not None and mine and int(value) != mine:
                bad.append(f"{name}={mine} but the model has {name}={int(value)}")
        if bad:
            raise UserError(
                f"cost model {self.name} was built for "
                + "; ".join(bad)
                + ": profile this model (flexsp-profile) or pick a matching cost model"
            )

    def attention_modes(self, sp: int) -> tuple[str, ...]:
        """Attention modes the runtime can use for a group of degree ``sp`` under this model."""
        if sp == 1:
            return ("local",)
        modes = []
        if self.heads <= 0 or (sp <= self.heads and self.heads % sp == 0):
            modes.append("ulysses")
        if self.ring_mb_per_token > 0:
            modes.append("ring")
            if self.heads > 1:
                modes.append("hybrid")
        return tuple(modes)

    def comm_ms_per_token(self, sp: int, mode: str | None = None) -> float:
        """Communication time per token of the group (already divided by sp), ms."""
        if sp == 1:
            return 0.0
        mode = mode or self.best_mode(sp)
        if mode == "ulysses":
            return self.a2a_mb_per_token / sp / self._lookup(self.bandwidth_gbps, sp)
        if mode == "ring":
            bw = self._lookup(self.p2p_bandwidth_gbps, sp) or self._lookup(self.bandwidth_gbps, sp)
            return self.ring_mb_per_token * (sp - 1) / sp / bw
        if mode == "hybrid":
            u = self.ulysses_width(sp)
            inner = self.a2a_mb_per_token / sp / self._lookup(self.bandwidth_gbps, u)
            bw = self._lookup(self.p2p_bandwidth_gbps, sp) or self._lookup(self.bandwidth_gbps, sp)
            return inner + self.ring_mb_per_token * (sp // u - 1) / sp / bw
        raise UserError(f"unknown attention mode {mode!r}; valid: {self.attention_modes(sp)}")

    def ulysses_width(self, sp: int) -> int:
        """Ulysses sub-group size of a hybrid group: the largest power of two dividing heads, <= sp."""
        u = 1
        while u * 2 <= sp and self.heads > 0 and self.heads % (u * 2) == 0 and u * 2 <= self.devices_per_node:
            u *= 2
        return u

    def best_mode(self, sp: int) -> str:
        modes = self.attention_modes(sp)
        if not modes:
            raise UserError(f"no attention mode can run SP degree {sp} (heads={self.heads}, ring disabled)")
        return min(modes, key=lambda m: (self.comm_ms_per_token(sp, m), m))

    def _mode_term(self, table: dict, sp: int, mode: str | None) -> float:
        if sp == 1 or not table:
            return 0.0
        mode = mode or self.best_mode(sp)
        return table.get(f"{mode}:{sp}", table.get(sp, 0.0))

    def seq_time_ms(self, length: float, sp: int, mode: str | None = None) -> float:
        """Time one sequence adds to a group of degree sp running ``mode`` (default: the best
        mode), without the group's fixed overhead."""
        return (
            (self.a1 * length * length + self.a2 * length) / sp
            + self.comm_ms_per_token(sp, mode) * length
            + self.per_sequence_ms
            + self._mode_term(self.per_sequence_comm_ms, sp, mode)
        )

    def group_time_ms(self, lengths, sp: int, mode: str | None = None) -> float:
        """Predicted time of a group: per-sequence times + its fixed overhead (0 when empty)."""
        L = np.asarray(list(lengths) if not isinstance(lengths, np.ndarray) else lengths, dtype=np.float64)
        if not L.size:
            return 0.0
        return float(self.seq_time_ms(L, sp, mode).sum()) + self.group_overhead_ms(sp, mode)

    def group_overhead_ms(self, sp: int, mode: str | None = None) -> float:
        """Fixed time of a non-empty group of degree sp: b plus its latency."""
        return self.b + self._mode_term(self.group_latency_ms, sp, mode)

    # -- persistence ------------------------------------------------------------------------
    def with_devices(self, num_devices: int | None = None, memory_mb: float | None = None) -> "CostModel":
        """The same model on another cluster size or memory budget (None keeps the current one;
        0 or a negative value is an error, not "keep")."""
        for name, value in (("num_devices", num_devices), ("memory_mb", memory_mb)):
            if value is not None and not value > 0:
                raise UserError(f"{name} must be > 0, got {value}")
        return replace(
            self,
            num_devices=self.num_devices if num_devices is None else int(num_devices),
            memory_mb=self.memory_mb if memory_mb is None else float(memory_mb),
        )

    def to_dict(self) -> dict:
        return asdict(self)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def from_dict(cls, data: dict) -> "CostModel":
        """A cost model from plain data; ValueError naming unknown, missing or mistyped fields."""
        if not isinstance(data, dict):
            raise UserError(f"a cost model must be a JSON object, got {type(data).__name__}")
        data = apply_topology(data)  # the "topology" form fills the bandwidth tables
        known = set(cls.__dataclass_fields__)
        unknown = set(data) - known
        if unknown:
            raise UserError(f"unknown cost-model keys {sorted(unknown)}; valid keys: {sorted(known)}")
        missing = [
            k
            for k, f in cls.__dataclass_fields__.items()
            if k not in data and f.default is MISSING and f.default_factory is MISSING
        ]
        if missing:
            raise UserError(f"incomplete cost model: missing required fields {missing}")
        return cls(**data)

    @classmethod
    def load(cls, path: str | Path) -> "CostModel":
        """Read a cost-model JSON file; ValueError naming the file (and the field) otherwise."""
        p = Path(path)
        try:
            data = json.loads(p.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise UserError(f"cost-model file {path} does not exist") from None
        except IsADirectoryError:
            raise UserError(f"cost-model file {path} is a directory, expected a JSON file") from None
        except PermissionError:
            raise UserError(f"cost-model file {path} is not readable (permission denied)") from None
        except UnicodeDecodeError as exc:
            raise UserError(
                f"cost-model file {path} is not UTF-8 text (byte {exc.start}): expected JSON"
            ) from None
        except OSError as exc:
            raise UserError(f"cost-model file {path} cannot be read: {exc.strerror or exc}") from None
        except json.JSONDecodeError as exc:
            raise UserError(f"cost-model file {path} is not valid JSON: {exc}") from None
        if not isinstance(data, dict):
            raise UserError(f"cost-model file {path} must hold a JSON object, got {type(data).__name__}")
        try:
            return cls.from_dict(data)
        except ValueError as exc:
            raise UserError(f"cost-model file {path}: {exc}") from None


def _check_types(cm: "CostModel") -> None:
    """Field types as the dataclass declares them (JSON can hold anything): ValueError naming the
    field, its value and the expected type. Numbers must be finite; tables map keys to numbers."""
    for name, f in cm.__dataclass_fields__.items():
        value, kind = getattr(cm, name), f.type
        if kind == "str":
            if not isinstance(value, str):
                raise UserError(f"field {name} must be a string, got {value!r}")
        elif kind == "bool":
            if not isinstance(value, bool):
                raise UserError(f"field {name} must be true or false, got {value!r}")
        elif kind == "int":
            ok = isinstance(value, int) or (isinstance(value, float) and value.is_integer())
            if isinstance(value, bool) or not ok:
                raise UserError(f"field {name} must be an integer, got {value!r}")
            object.__setattr__(cm, name, int(value))
        elif kind == "float":
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise UserError(f"field {name} must be a finite number, got {value!r}")
            object.__setattr__(cm, name, float(value))
        elif kind.startswith("dict"):
            if not isinstance(value, dict):
                raise UserError(f"field {name} must be an object of degree -> number, got {value!r}")
            for k, v in value.items():
                if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                    raise UserError(f"field {name}[{k!r}] must be a finite number, got {v!r}")
