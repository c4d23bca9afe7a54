"""Honest cost-model defaults per device (flexsp.costmodels): a CUDA run never plans with CPU
timings unless told to, and ``auto`` on CUDA is an analytic estimate labelled as such."""

from __future__ import annotations

import pytest
import torch

from flexsp.costmodels import ESTIMATE_MFU, GPU_SPECS, estimate_bandwidth, gpu_estimate
from flexsp.model import model_config
from flexsp.planning import load_cost_model

CUDA = torch.device("cuda")


def test_cuda_run_refuses_a_cpu_cost_model_unless_allowed():
    with pytest.raises(
        ValueError,
        match=r"solver.cost_model=cpu-gloo-tiny was measured on 'cpu'.*"
        r"solver.allow_foreign_cost_model=true",
    ):
        load_cost_model("cpu-gloo-tiny", 4, device=CUDA)
    assert load_cost_model("cpu-gloo-tiny", 4, device=CUDA, allow_foreign=True).device == "cpu"
    # a GPU cost model (the paper's cluster) is fine on CUDA; anything is fine on the CPU
    assert load_cost_model("paper-gpt7b-192k", 64, device=CUDA).device.startswith("cuda")
    assert load_cost_model("cpu-gloo-tiny", 4).name == "cpu-gloo-tiny"


def test_cost_model_without_a_recorded_device_is_foreign_on_cuda(tmp_path):
    from dataclasses import replace

    from solver.presets import load_preset

    path = tmp_path / "old.json"
    replace(load_preset("cpu-gloo-tiny"), device="").save(path)
    with pytest.raises(ValueError, match="without recording its device"):
        load_cost_model(str(path), 4, device=CUDA)


def test_auto_is_the_cpu_preset_on_cpu():
    assert load_cost_model("auto", 2).name == "cpu-gloo-tiny"


def test_gpu_estimate_is_labelled_and_follows_the_datasheet():
    mcfg = model_config("7b")
    cm = gpu_estimate(mcfg, "NVIDIA H200", 141 * 10**9, 64, 8)
    assert cm.source.startswith("ESTIMATE for NVIDIA H200") and cm.device == "cuda:NVIDIA H200"
    h200 = next(s for s in GPU_SPECS if s.name == "H200")
    # a2: 6 * params FLOPs per token (x 8/6 with activation checkpointing, on in the 7b preset)
    flops_per_ms = ESTIMATE_MFU * h200.bf16_tflops * 1e9
    want = 6 * mcfg.num_params() * (8 / 6 if mcfg.activation_checkpointing else 1) / flops_per_ms
    assert cm.a2 == pytest.approx(want, rel=1e-9)
    assert cm.memory_mb == pytest.approx(0.9 * 141e9 / 2**20)
    assert cm.bandwidth_gbps[8] > cm.bandwidth_gbps[16] > cm.bandwidth_gbps[64] > 0
    assert (cm.layers, cm.hidden, cm.heads, cm.kv_heads) == (
        mcfg.layers,
        mcfg.hidden,
        mcfg.heads,
        mcfg.kv_heads,
    )
    with pytest.raises(ValueError, match="no datasheet figures for 'Mystery GPU'"):
        gpu_estimate(mcfg, "Mystery GPU", 10**10, 8, 8)


def test_estimate_bandwidth_shape():
    h100 = next(s for s in GPU_SPECS if s.name == "H100")
    table = estimate_bandwidth(h100, 64, 8)
    assert sorted(table) == [2, 4, 8, 16, 32, 64]
    assert table[2] == table[8] and table[16] > table[32] > table[64]
