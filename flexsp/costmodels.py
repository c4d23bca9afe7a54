"""Which cost model a run plans with: the configured one, or an honest default for the device.

``solver.cost_model=auto`` (the default) picks, for a CPU run, the ``cpu-gloo-tiny`` preset and,
for a CUDA run, an ANALYTIC ESTIMATE for the model being trained on the GPU found
(:func:`gpu_estimate`: datasheet FLOP/s at a stated MFU, datasheet link speeds scaled by the
efficiency the FlexSP paper measured on its cluster, activation bytes per token measured on the
meta device, 90% of the device's memory) -- never CPU timings, and the run's first line says it
is an estimate. A CUDA run given a cost model measured on another device type (``cpu``, or one
that does not record its device) is refused unless ``solver.allow_foreign_cost_model=true``.
Profile the real thing with ``flexsp-profile``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from flexsp.errors import UserError
from flexsp.memory import activation_bytes_per_token
from solver.costmodel import CostModel
from solver.presets import analytic_cost_model


@dataclass(frozen=True)
class GpuSpec:
    """Public datasheet figures of one GPU kind (per GPU, SXM parts)."""

    name: str
    """Short name matched against ``torch.cuda.get_device_name`` (e.g. "H100")."""
    bf16_tflops: float
    """Dense bf16 tensor-core peak, TFLOP/s."""
    nvlink_gbps: float
    """NVLink bandwidth per direction, GB/s (NVLink 4: 900 GB/s bidirectional)."""
    network_gbps: float
    """Inter-node bandwidth per GPU per direction, GB/s (one 400 Gb/s InfiniBand NIC per GPU)."""


GPU_SPECS = (
    GpuSpec("H200", bf16_tflops=989.0, nvlink_gbps=450.0, network_gbps=50.0),
    GpuSpec("H100", bf16_tflops=989.0, nvlink_gbps=450.0, network_gbps=50.0),
    GpuSpec("A100", bf16_tflops=312.0, nvlink_gbps=300.0, network_gbps=25.0),
)
ESTIMATE_MFU = 0.4
"""Model FLOPs utilisation the estimate assumes (long-context training reports ~0.38-0.5)."""
# The paper's measured all-to-all bandwidth (A100, NVLink 3 = 300 GB/s per direction; 2 x 200 Gb/s
# IB per 8-GPU node = 6.25 GB/s per GPU) relative to those links: ~0.35 inside a node at SP 8, ~1.6
# at SP 16 falling ~0.75x per doubling beyond (shared/reference/flexsp-paper.md).
INTRA_EFFICIENCY, INTER_EFFICIENCY, INTER_DECAY = 0.35, 1.6, 0.75


def gpu_spec(device_name: str) -> GpuSpec | None:
    return next((s for s in GPU_SPECS if s.name in device_name.upper()), None)


def estimate_bandwidth(spec: GpuSpec, num_devices: int, devices_per_node: int) -> dict[int, float]:
    """All-to-all GB/s per SP degree: NVLink inside a node, the per-GPU network share across."""
    table = {}
    for sp in (1 << k for k in range(1, num_devices.bit_length())):
        if sp <= devices_per_node:
            table[sp] = INTRA_EFFICIENCY * spec.nvlink_gbps
        else:  # 2 nodes: decay^0, 4 nodes: decay^1, ...
            table[sp] = (
                INTER_EFFICIENCY
                * spec.network_gbps
                * INTER_DECAY ** ((sp // devices_per_node).bit_length() - 2)
            )
    return table


def gpu_estimate(
    mcfg, name: str, memory_bytes: int, num_devices: int, devices_per_node: int, shard_size: int = 0
) -> CostModel:
    """An analytic cost model of ``mcfg`` on ``num_devices`` GPUs named ``name`` with
    ``memory_bytes`` each (see the module docstring)."""
    spec = gpu_spec(name)
    if spec is None:
        known = ", ".join(s.name for s in GPU_SPECS)
        raise UserError(
            f"solver.cost_model=auto: no datasheet figures for {name!r} (known: {known}); "
            f"profile it with flexsp-profile and pass solver.cost_model=<the JSON>"
        )
    act = activation_bytes_per_token(mcfg, torch.bfloat16)["bytes_per_token"]
    memory_mb = 0.9 * memory_bytes / 2**20
    dpn = min(devices_per_node, num_devices)
    table = estimate_bandwidth(spec, num_devices, dpn)
    cm = analytic_cost_model(
        f"estimate-{spec.name.lower()}-{num_devices}",
        layers=mcfg.layers,
        hidden=mcfg.hidden,
        heads=mcfg.heads,
        kv_heads=mcfg.kv_heads,
        params=float(mcfg.num_params()),
        num_devices=num_devices,
        devices_per_node=dpn,
        memory_mb=memory_mb,
        act_mb_per_token=act / 2**20,
        peak_tflops=spec.bf16_tflops,
        mfu=ESTIMATE_MFU,
        zero_gbps=table.get(num_devices, table.get(2, 100.0)),
        bandwidth_gbps=table,
        activation_checkpointing=bool(mcfg.activation_checkpointing),
        shard_size=shard_size if shard_size < num_devices else 0,
        replicate_gbps=min(table.values(), default=50.0) if shard_size else 0.0,
        device=f"cuda:{name}",
    )
    return replace(
        cm,
        source=(
            f"ESTIMATE for {name} (no profile given): datasheet {spec.bf16_tflops:g} TFLOP/s "
            f"bf16 at MFU {ESTIMATE_MFU}, NVLink {spec.nvlink_gbps:g} GB/s and network "
            f"{spec.network_gbps:g} GB/s per GPU scaled by the efficiency the FlexSP paper "
            f"measured, activations measured on meta; run flexsp-profile for real numbers"
        ),
    )


def check_device(cm: CostModel, spec: str, device: torch.device, allow_foreign: bool) -> None:
    """A CUDA run refuses a cost model of another device type unless allowed."""
    if device.type != "cuda" or allow_foreign or cm.device.startswith("cuda"):
        return
    where = f"on {cm.device!r}" if cm.device else "without recording its device"
    raise UserError(
        f"solver.cost_model={spec} was measured {where}, but this run trains on CUDA: its times "
        f"would plan the GPUs with CPU timings. Use solver.cost_model=auto (an estimate for this "
        f"GPU), a flexsp-profile JSON measured on it, or solver.allow_foreign_cost_model=true"
    )
