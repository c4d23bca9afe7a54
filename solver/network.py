"""Network topology form of a cost model, and machine presets built from public figures.

A cost model's source of truth for communication is its per-SP-degree bandwidth tables
(``bandwidth_gbps`` for the Ulysses all-to-all, ``p2p_bandwidth_gbps`` for ring attention). A
``Topology`` (GPUs per node, intra- and inter-node GB/s per GPU) fills them for clusters nobody
has measured yet:

- all-to-all among sp devices, each holding D bytes: (min(sp, g) - 1) / sp of D crosses the node's
  links and max(0, sp - g) / sp of D the network, concurrently; the cost model charges
  ``D / bw[sp]``, so ``bw[sp] = efficiency / max(intra share / intra GB/s, inter share / inter GB/s)``
  (g = GPUs per node).
- ring: each device passes its KV block to the next; a ring over more than one node waits for the
  network hop, so ``p2p[sp] = efficiency * (intra GB/s if sp <= g else min(intra, inter) GB/s)``.
- ZeRO-3 gathers and reduce-scatters over all N devices at ``efficiency * inter`` GB/s (N > g) or
  ``efficiency * intra`` (one node).

``efficiency`` (achieved / nominal link bandwidth in NCCL collectives) is an ASSUMPTION (0.7);
measure the tables with a profile to replace the estimate.

In a cost-model JSON file the form is ``"topology": {"gpus_per_node": 8, "intra_node_gbps": 450,
"inter_node_gbps": 50}`` (optionally ``"efficiency"``): it fills every degree the file's tables
leave out (entries the file gives win) and ``devices_per_node`` if absent; the loaded model carries
the filled tables, not the form.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from .errors import UserError

MAX_DEVICES = 1 << 14
"""Tables are filled up to this many devices, so a preset resized by --num-devices keeps one."""


@dataclass(frozen=True)
class Topology:
    gpus_per_node: int
    """GPUs that share the fast intra-node link (NVLink)."""
    intra_node_gbps: float
    """Intra-node bandwidth per GPU, one direction, GB/s (NVLink 4: 900 GB/s bidirectional = 450)."""
    inter_node_gbps: float
    """Inter-node bandwidth per GPU, one direction, GB/s (a node's NICs / gpus_per_node; 8 x 400 Gb/s
    InfiniBand for 8 GPUs = 50)."""
    efficiency: float = 0.7
    """Achieved fraction of the nominal bandwidth in collectives (an assumption until profiled)."""

    def __post_init__(self):
        g = self.gpus_per_node
        if isinstance(g, bool) or not isinstance(g, int) or g < 1 or g & (g - 1):
            raise UserError(f"topology gpus_per_node must be a power of two >= 1, got {g!r}")
        for name in ("intra_node_gbps", "inter_node_gbps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
                raise UserError(f"topology {name} must be a finite number > 0 (GB/s), got {value!r}")
        if (
            isinstance(self.efficiency, bool)
            or not isinstance(self.efficiency, (int, float))
            or not 0 < self.efficiency <= 1
        ):
            raise UserError(f"topology efficiency must be in (0, 1], got {self.efficiency!r}")

    def all_to_all_gbps(self, sp: int) -> float:
        """Effective all-to-all bandwidth of an sp-device group, in the cost model's units."""
        g = self.gpus_per_node
        intra = (min(sp, g) - 1) / sp / self.intra_node_gbps
        inter = max(0, sp - g) / sp / self.inter_node_gbps
        return self.efficiency / max(intra, inter)

    def p2p_gbps(self, sp: int) -> float:
        """Ring (neighbour send) bandwidth of an sp-device group."""
        link = self.intra_node_gbps
        if sp > self.gpus_per_node:
            link = min(self.intra_node_gbps, self.inter_node_gbps)
        return self.efficiency * link

    def collective_gbps(self, num_devices: int) -> float:
        """Bandwidth of ZeRO's all-gather / reduce-scatter over ``num_devices`` devices."""
        link = self.intra_node_gbps if num_devices <= self.gpus_per_node else self.inter_node_gbps
        return self.efficiency * link

    def tables(self, max_devices: int = MAX_DEVICES) -> tuple[dict[int, float], dict[int, float]]:
        """(all-to-all, p2p) GB/s for every power-of-two degree 2..max_devices."""
        degrees = [1 << k for k in range(1, max_devices.bit_length())]
        return (
            {sp: round(self.all_to_all_gbps(sp), 4) for sp in degrees},
            {sp: round(self.p2p_gbps(sp), 4) for sp in degrees},
        )


def apply_topology(data: dict) -> dict:
    """A cost-model dict with its ``"topology"`` form (if any) turned into bandwidth tables:
    missing degrees filled, given entries kept. ValueError naming a bad form."""
    if "topology" not in data:
        return data
    form = data["topology"]
    known = [f.name for f in fields(Topology)]
    if (
        not isinstance(form, dict)
        or set(form) - set(known)
        or {"gpus_per_node", "intra_node_gbps", "inter_node_gbps"} - set(form)
    ):
        raise UserError(
            f"topology must be an object with gpus_per_node, intra_node_gbps, inter_node_gbps "
            f"(optional efficiency), got {form!r}"
        )
    topo = Topology(**form)
    a2a, p2p = topo.tables()
    out = {k: v for k, v in data.items() if k != "topology"}
    out["bandwidth_gbps"] = {**a2a, **{int(k): v for k, v in dict(data.get("bandwidth_gbps") or {}).items()}}
    if data.get("ring_mb_per_token", 0) or "p2p_bandwidth_gbps" in data:
        given = dict(data.get("p2p_bandwidth_gbps") or {})
        out["p2p_bandwidth_gbps"] = {**p2p, **{int(k): v for k, v in given.items()}}
    out.setdefault("devices_per_node", topo.gpus_per_node)
    return out


@dataclass(frozen=True)
class Machine:
    """A GPU server from public datasheet figures."""

    name: str
    """Short name used in preset names (e.g. h100)."""
    description: str
    """What it is, with the figures' sources."""
    peak_tflops: float
    """Dense bf16 peak per GPU, TFLOP/s."""
    memory_gb: float
    """Device memory, GB (10^9 bytes)."""
    topology: Topology
    """Node size and links."""


NVLINK4_IB8X400 = Topology(gpus_per_node=8, intra_node_gbps=450.0, inter_node_gbps=50.0)
"""8 GPUs on NVLink 4 (900 GB/s bidirectional per GPU), 8 x 400 Gb/s InfiniBand NDR per node."""

MACHINES = {
    "h100": Machine(
        "h100",
        "NVIDIA H100 SXM5 80 GB: 989 TFLOP/s dense bf16, NVLink 4 900 GB/s, "
        "8 x 400 Gb/s InfiniBand per 8-GPU node (NVIDIA datasheet / DGX H100)",
        989.0,
        80.0,
        NVLINK4_IB8X400,
    ),
    "h200": Machine(
        "h200",
        "NVIDIA H200 SXM 141 GB: 989 TFLOP/s dense bf16, NVLink 4 900 GB/s, "
        "8 x 400 Gb/s InfiniBand per 8-GPU node (NVIDIA datasheet / DGX H200)",
        989.0,
        141.0,
        NVLINK4_IB8X400,
    ),
}

ESTIMATE_MFU = 0.4
"""Model FLOPs utilisation assumed for the analytic compute terms (long-context training reports
~38%: Llama 3 405B at 128K on H100, shared/reference/peers.md)."""
RESERVE_GB = 8.0
"""Device memory kept back from the planner (CUDA context, NCCL buffers, fragmentation), GB."""


def machine_preset_name(machine: str, model: str) -> str:
    """``h100-nvlink4-ib8x400-gpt7b-estimate``: machine, links, model, and that it is an estimate."""
    return f"{machine}-nvlink4-ib8x400-{model}-estimate"
