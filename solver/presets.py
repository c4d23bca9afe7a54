"""Named cost models.

``paper-<model>-<limit>`` reproduce the official FlexSP planner's cost model exactly: 64 GPUs with
8 per node, 30 GB each, ZeRO-3, Ulysses only, the coefficients, all-to-all bandwidths and capacity
formula of ``shared/reference/flexsp-paper.md`` (read from the official code). Plans made with them
are priced exactly as ``shared/tools/check_plan.py`` prices them.

``cpu-gloo-tiny`` is a rough model of this repository's CPU demo (tiny LLaMA on 4 gloo ranks); the
profiler (``flexsp-profile``) measures a real one.
"""
from __future__ import annotations

from .costmodel import CostModel

# SP degree -> all-to-all GB/s on the paper's cluster ("4k seq, 2 IB").
PAPER_BANDWIDTH = {2: 119.54, 4: 104.07, 8: 96.5, 16: 10.33, 32: 5.94, 64: 4.87}

# model -> (layers, hidden, a1, a2, b, act_mb_per_token, {context limit K: params in 2^30})
PAPER_MODELS = {
    "gpt7b": (32, 4096, 5.128e-6, 0.1839576, 629.3563, 4.480441895,
              {192: 7.1174468994140625, 384: 7.8498687744140625}),
    "gpt13b": (40, 5120, 9.2852e-6, 0.3060189, 1132.5632, 4.220, {192: 13.116, 384: 14.032}),
    "gpt30b": (60, 6656, 15.4262e-6, 0.8035742, 2789.3644, 3.417381836,
               {192: 31.525, 384: 32.71532440185547}),
}


def _paper(model: str, limit_k: int) -> CostModel:
    layers, hidden, a1, a2, b, act, params = PAPER_MODELS[model]
    return CostModel(
        name=f"paper-{model}-{limit_k}k",
        num_devices=64,
        devices_per_node=8,
        memory_mb=30 * 1024,
        a1=a1, a2=a2, b=b,
        a2a_mb_per_token=16 * layers * hidden / 2**20,
        bandwidth_gbps=dict(PAPER_BANDWIDTH),
        act_mb_per_token=act,
        params_gi=params[limit_k],
        state_bytes_per_param=16.0,
        zero_stage=3,
        heads=64,  # the paper patches its GPTs to 64 heads so Ulysses reaches SP=64
        source="FlexSP (ASPLOS'25) official planner constants, shared/reference/flexsp-paper.md",
    )


def _cpu_tiny() -> CostModel:
    return CostModel(
        name="cpu-gloo-tiny",
        num_devices=4, devices_per_node=4, memory_mb=2048,
        a1=2.0e-6, a2=0.05, b=20.0,
        a2a_mb_per_token=0.002, bandwidth_gbps={2: 1.0, 4: 0.6},
        act_mb_per_token=0.05, params_gi=0.0001, zero_stage=3, heads=4, kv_heads=2,
        ring_mb_per_token=0.001, p2p_bandwidth_gbps={2: 1.0, 4: 0.8},
        source="hand estimate for the CPU demo; run flexsp-profile for a measured model",
    )


PRESETS = {f"paper-{m}-{k}k": (lambda m=m, k=k: _paper(m, k)) for m in PAPER_MODELS for k in (192, 384)}
PRESETS["cpu-gloo-tiny"] = _cpu_tiny


def load_preset(name: str) -> CostModel:
    """The named preset's cost model; ValueError listing the valid names otherwise."""
    try:
        return PRESETS[name]()
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; valid presets: {', '.join(sorted(PRESETS))}") from None


def context_limit(name: str) -> int | None:
    """The context limit in tokens a paper preset implies (192K -> 192000 - 128), else None."""
    if name.startswith("paper-"):
        k = int(name.rsplit("-", 1)[1].rstrip("k"))
        return k * 1000 - 128
    return None
