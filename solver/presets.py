"""Named cost models.

``paper-<model>-<limit>`` reproduce the official FlexSP planner's cost model exactly: 64 GPUs with
8 per node, 30 GB each, ZeRO-3, Ulysses only, the coefficients, all-to-all bandwidths and capacity
formula of ``shared/reference/flexsp-paper.md`` (read from the official code). Plans made with them
are priced exactly as ``shared/tools/check_plan.py`` prices them.

``analytic_cost_model`` derives a roofline-style model for any model shape and cluster size (a dry
run before any profile exists); its ``source`` says it is analytic.

``<machine>-nvlink4-ib8x400-<model>-estimate`` (machine h100 or h200, model a paper GPT) are
ESTIMATES from public machine figures (``network.machine_cost_model``): analytic compute at a stated
MFU, bandwidths from the topology form; nothing in them is measured.

``cpu-gloo-tiny`` is a rough model of this repository's CPU demo (tiny LLaMA on 4 gloo ranks); the
profiler (``flexsp-profile``) measures a real one.
"""

from __future__ import annotations

from dataclasses import replace

from .costmodel import CostModel
from .errors import UserError
from .network import ESTIMATE_MFU, MACHINES, RESERVE_GB, machine_preset_name

# SP degree -> all-to-all GB/s on the paper's cluster ("4k seq, 2 IB").
PAPER_BANDWIDTH = {2: 119.54, 4: 104.07, 8: 96.5, 16: 10.33, 32: 5.94, 64: 4.87}

# model -> (layers, hidden, a1, a2, b, act_mb_per_token, {context limit K: params in 2^30})
PAPER_MODELS = {
    "gpt7b": (
        32,
        4096,
        5.128e-6,
        0.1839576,
        629.3563,
        4.480441895,
        {192: 7.1174468994140625, 384: 7.8498687744140625},
    ),
    "gpt13b": (40, 5120, 9.2852e-6, 0.3060189, 1132.5632, 4.220, {192: 13.116, 384: 14.032}),
    "gpt30b": (
        60,
        6656,
        15.4262e-6,
        0.8035742,
        2789.3644,
        3.417381836,
        {192: 31.525, 384: 32.71532440185547},
    ),
}


def _paper(model: str, limit_k: int) -> CostModel:
    layers, hidden, a1, a2, b, act, params = PAPER_MODELS[model]
    return CostModel(
        name=f"paper-{model}-{limit_k}k",
        num_devices=64,
        devices_per_node=8,
        memory_mb=30 * 1024,
        a1=a1,
        a2=a2,
        b=b,
        a2a_mb_per_token=16 * layers * hidden / 2**20,
        bandwidth_gbps=dict(PAPER_BANDWIDTH),
        act_mb_per_token=act,
        params_gi=params[limit_k],
        state_bytes_per_param=16.0,
        zero_stage=3,
        heads=64,  # the paper patches its GPTs to 64 heads so Ulysses reaches SP=64
        kv_heads=64,
        layers=layers,
        hidden=hidden,
        source="FlexSP (ASPLOS'25) official planner constants, shared/reference/flexsp-paper.md",
        device="cuda:the FlexSP paper's 64-GPU cluster",
    )


def _cpu_tiny() -> CostModel:
    return CostModel(
        name="cpu-gloo-tiny",
        num_devices=4,
        devices_per_node=4,
        memory_mb=2048,
        a1=2.0e-6,
        a2=0.05,
        b=20.0,
        a2a_mb_per_token=0.002,
        bandwidth_gbps={2: 1.0, 4: 0.6},
        act_mb_per_token=0.05,
        params_gi=0.0001,
        zero_stage=3,
        heads=4,
        kv_heads=2,
        layers=2,
        hidden=64,
        ring_mb_per_token=0.001,
        p2p_bandwidth_gbps={2: 1.0, 4: 0.8},
        source="hand estimate for the CPU demo; run flexsp-profile for a measured model",
        device="cpu",
    )


PRESETS = {f"paper-{m}-{k}k": (lambda m=m, k=k: _paper(m, k)) for m in PAPER_MODELS for k in (192, 384)}
PRESETS["cpu-gloo-tiny"] = _cpu_tiny
# ESTIMATES from public machine figures (solver/network.py), e.g. h100-nvlink4-ib8x400-gpt7b-estimate
PRESETS.update(
    {
        machine_preset_name(machine, model): (
            lambda machine=machine, model=model: machine_cost_model(machine, model)
        )
        for machine in MACHINES
        for model in PAPER_MODELS
    }
)


def load_preset(name: str) -> CostModel:
    """The named preset's cost model; ValueError listing the valid names otherwise."""
    try:
        return PRESETS[name]()
    except KeyError:
        raise UserError(f"unknown preset {name!r}; valid presets: {', '.join(sorted(PRESETS))}") from None


def context_limit(name: str) -> int | None:
    """The context limit in tokens a paper preset implies (192K -> 192000 - 128), else None."""
    if name.startswith("paper-"):
        k = int(name.rsplit("-", 1)[1].rstrip("k"))
        return k * 1000 - 128
    return None


def _paper_like_bandwidth(num_devices: int, devices_per_node: int) -> dict[int, float]:
    """The paper's all-to-all bandwidth shape re-keyed to another node size: degrees within a node
    take the paper's intra-node values (2, 4, 8; larger nodes reuse the SP=8 value), degree
    ``devices_per_node * 2^k`` takes the paper's ``8 * 2^k`` value (beyond SP=64: the SP=64 one)."""
    table = {}
    for sp in (1 << k for k in range(1, num_devices.bit_length())):
        if sp <= devices_per_node:
            table[sp] = PAPER_BANDWIDTH[min(sp, 8)]
        else:
            table[sp] = PAPER_BANDWIDTH[min(8 * sp // devices_per_node, 64)]
    return table


def analytic_cost_model(
    name: str,
    *,
    layers: int,
    hidden: int,
    heads: int,
    kv_heads: int,
    params: float,
    num_devices: int,
    devices_per_node: int = 8,
    memory_mb: float,
    act_mb_per_token: float,
    peak_tflops: float = 312.0,
    mfu: float = 0.5,
    bytes_per_element: int = 2,
    zero_gbps: float = 50.0,
    bandwidth_gbps: dict | None = None,
    p2p_bandwidth_gbps: dict | None = None,
    ring: bool = True,
    activation_checkpointing: bool = False,
    shard_size: int = 0,
    replicate_gbps: float = 0.0,
    device: str = "",
) -> CostModel:
    """A roofline-style cost model for an arbitrary model shape at cluster scale (a dry run of the
    planner before anything was profiled). ANALYTIC: no measurement; profile for real numbers.

    - a2 (ms/token): 6 * params FLOPs per token fwd+bwd (8 with activation checkpointing, the
      forward recomputed) at ``mfu`` of ``peak_tflops``.
    - a1 (ms/token^2): causal attention, 6 * layers * hidden FLOPs per token^2 fwd+bwd (8 with
      checkpointing), same MFU (with the paper's A100 numbers this gives its gpt-7b a1 within 2%).
    - b (ms per group and micro-batch): ZeRO-3 traffic, parameters gathered for the forward and the
      backward (2 x params x bytes_per_element) and gradients reduce-scattered (params x 4 bytes),
      at ``zero_gbps``.
    - Ulysses all-to-all volume per token: 4 all-to-alls per layer (q, k, v, out) forward and
      backward, ``2 * 2 * (hidden + kv_dim) * bytes_per_element * layers`` bytes (x1.5 with
      checkpointing); kv_dim = hidden * kv_heads / heads. With kv_heads = heads this is the paper's
      16 * layers * hidden bytes.
    - Ring: K and V passed round the ring forward, K, V and their gradients backward:
      ``6 * kv_dim * bytes_per_element * layers`` bytes per token (0 with ring=False).
    - Bandwidths: given tables, or the paper's table re-keyed to ``devices_per_node``.
    params: parameter count (e.g. 7.1e9). act_mb_per_token: activation MB per token held on a
    device (measure it, or take the paper presets' value for a similar model).
    """
    for key, value in (("layers", layers), ("hidden", hidden), ("heads", heads), ("kv_heads", kv_heads)):
        if not isinstance(value, int) or value < 1:
            raise UserError(f"{key} must be a positive integer, got {value!r}")
    if hidden % heads or heads % kv_heads:
        raise UserError(
            f"need heads | hidden and kv_heads | heads, got hidden={hidden}, heads={heads}, "
            f"kv_heads={kv_heads}"
        )
    for key, value in (
        ("params", params),
        ("peak_tflops", peak_tflops),
        ("zero_gbps", zero_gbps),
        ("act_mb_per_token", act_mb_per_token),
        ("memory_mb", memory_mb),
    ):
        if not value > 0 or value == float("inf"):
            raise UserError(f"{key} must be a finite number > 0, got {value!r}")
    if not 0 < mfu <= 1:
        raise UserError(f"mfu must be in (0, 1], got {mfu}")
    flops_ms = mfu * peak_tflops * 1e12 / 1e3  # FLOPs per ms
    recompute = 8 / 6 if activation_checkpointing else 1.0
    kv_dim = hidden * kv_heads // heads
    a2a = 4 * (hidden + kv_dim) * bytes_per_element * layers * (1.5 if activation_checkpointing else 1.0)
    ring_bytes = 6 * kv_dim * bytes_per_element * layers if ring else 0.0
    params_gi = params / 2**30
    b = (2 * bytes_per_element + 4) * params_gi * 1024 / zero_gbps
    table = bandwidth_gbps or _paper_like_bandwidth(num_devices, devices_per_node)
    return CostModel(
        name=name,
        num_devices=num_devices,
        devices_per_node=devices_per_node,
        memory_mb=memory_mb,
        a1=6 * layers * hidden * recompute / flops_ms,
        a2=6 * params * recompute / flops_ms,
        b=b,
        a2a_mb_per_token=a2a / 2**20,
        bandwidth_gbps=table,
        act_mb_per_token=act_mb_per_token,
        params_gi=params_gi,
        heads=heads,
        kv_heads=kv_heads,
        layers=layers,
        hidden=hidden,
        ring_mb_per_token=ring_bytes / 2**20,
        p2p_bandwidth_gbps=p2p_bandwidth_gbps or dict(table),
        activation_checkpointing=activation_checkpointing,
        shard_size=shard_size,
        replicate_gbps=replicate_gbps,
        device=device,
        source=(
            f"ANALYTIC roofline estimate (no measurement): {peak_tflops:g} TFLOP/s peak at MFU {mfu:g}, "
            f"ZeRO traffic at {zero_gbps:g} GB/s, paper-like all-to-all bandwidths; profile for real numbers"
        ),
    )


def machine_cost_model(machine: str, model: str, num_devices: int = 64):
    """An ESTIMATED cost model of a paper GPT (``presets.PAPER_MODELS``: layers, hidden, parameters
    and activation MB per token of the paper's cost model) on ``MACHINES[machine]``: compute from
    ``presets.analytic_cost_model`` at ``ESTIMATE_MFU`` of the bf16 peak, bandwidths from the
    machine's topology, memory = device GB - ``RESERVE_GB``, heads = hidden / 128 (ring attention
    on, so every degree runs). Replace it with a profile of the real cluster."""
    if machine not in MACHINES or model not in PAPER_MODELS:
        raise UserError(
            f"machine must be one of {sorted(MACHINES)} and model one of "
            f"{sorted(PAPER_MODELS)}, got {machine!r}, {model!r}"
        )
    spec = MACHINES[machine]
    layers, hidden, _, _, _, act, params = PAPER_MODELS[model]
    a2a, p2p = spec.topology.tables()
    heads = hidden // 128
    cm = analytic_cost_model(
        machine_preset_name(machine, model),
        layers=layers,
        hidden=hidden,
        heads=heads,
        kv_heads=heads,
        params=params[192] * 2**30,
        num_devices=num_devices,
        devices_per_node=spec.topology.gpus_per_node,
        memory_mb=(spec.memory_gb - RESERVE_GB) * 1e9 / 2**20,
        act_mb_per_token=act,
        peak_tflops=spec.peak_tflops,
        mfu=ESTIMATE_MFU,
        zero_gbps=spec.topology.collective_gbps(num_devices),
        bandwidth_gbps=a2a,
        p2p_bandwidth_gbps=p2p,
    )
    t = spec.topology
    return replace(
        cm,
        source=(
            f"ESTIMATE, not measured: {spec.description}; compute at MFU {ESTIMATE_MFU:g} of the bf16 peak; "
            f"all-to-all/ring bandwidths from the topology form (g={t.gpus_per_node}, "
            f"intra {t.intra_node_gbps:g} GB/s, inter {t.inter_node_gbps:g} GB/s per GPU, efficiency "
            f"{t.efficiency:g}); memory {spec.memory_gb:g} GB - {RESERVE_GB:g} GB reserve; activation "
            f"MB/token of the paper's {model}. Replace with flexsp-profile."
        ),
    )
