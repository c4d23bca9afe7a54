"""flexsp-dryrun: a fake 64-rank world in one process, the model sharded on meta as training does.

Full dry runs go through subprocesses (fresh interpreter: the fake default process group and the
peak RSS are the run's own): the tiny preset (configured cost model), the 7b preset (bf16 mixed
precision: params + grads + AdamW = 16 B x parameters / 64 per rank; peak RSS far below the 7B's
fp32 size, so nothing was materialised; device memory in 10^9 bytes, C sized after the reserve),
HSDP on the tiny preset, a model that does not fit (exit status 4, the smallest world / HSDP shard
size that fits, checked by dry runs at that size and at half of it), an HF checkpoint (named by
its architecture, a neutral cost-model line), an HF-native model (Gemma 3: transformers' decoder
layers as the FSDP2 units), and bad dryrun fields (one error line, exit status 2).
The activation measurement is cross-checked in-process against the bytes autograd saves in a real
CPU forward of the whole tiny model, native and HF-native (OLMo 2, Llama, Qwen3-MoE).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
KEYS = {
    "world_size",
    "model_params",
    "per_rank_bytes",
    "device_memory_bytes",
    "fits",
    "plan",
    "capacity_tokens",
    "unsharded_parts",
    "activation",
    "cost_model",
    "batch",
    "wall_seconds",
    "peak_rss_bytes",
    "sharding",
    "precision",
}
BYTES_KEYS = {"params", "grads", "optimizer", "activations", "unsharded", "reserve", "total"}


def _dryrun(tmp_path, *overrides, timeout=240):
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-m", "flexsp.dryrun", *overrides, f"output_dir={tmp_path}"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return proc


def _report(tmp_path, *overrides):
    proc = _dryrun(tmp_path, *overrides)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    r = json.loads((tmp_path / "dryrun.json").read_text())
    assert KEYS <= set(r), KEYS - set(r)
    assert BYTES_KEYS == set(r["per_rank_bytes"]), r["per_rank_bytes"]
    b = r["per_rank_bytes"]
    assert b["total"] == sum(b[k] for k in BYTES_KEYS - {"total"})
    parts = {k: v for k, v in r["unsharded_parts"].items() if k != "phase"}
    assert b["unsharded"] == sum(parts.values()) > 0, r["unsharded_parts"]
    assert r["fits"] == (r["capacity_tokens"] >= 1 and b["total"] <= r["device_memory_bytes"])
    assert "dry run:" in proc.stdout and "per rank:" in proc.stdout, proc.stdout
    return r


def test_tiny_at_64_ranks_uses_the_configured_cost_model(tmp_path):
    r = _report(tmp_path, "dryrun.world_size=64", "dryrun.num_sequences=64")
    assert r["world_size"] == 64 and r["sharding"]["mesh"] == [64]
    assert r["cost_model"]["choice"] == "configured" and r["cost_model"]["name"] == "cpu-gloo-tiny"
    # fp32: params + grads + AdamW = 16 B per parameter, sharded over 64 ranks (tiny shards pad a little)
    b = r["per_rank_bytes"]
    assert b["params"] == b["grads"] == b["optimizer"] / 2
    assert (
        16 * r["model_params"] / 64
        <= b["params"] + b["grads"] + b["optimizer"]
        <= 1.1 * 16 * r["model_params"] / 64
    )
    assert b["activations"] == int(r["capacity_tokens"] * r["activation"]["bytes_per_token"])
    assert r["plan"]["plan"]["num_devices"] == 64 and r["plan"]["predicted_ms"] > 0
    assert sum(len(g["seq_ids"]) for mb in r["plan"]["plan"]["micro_batches"] for g in mb["groups"]) == 64


@pytest.mark.slow
def test_7b_at_64_ranks_bf16_nothing_materialised(tmp_path):
    r = _report(tmp_path, "model=7b", "dryrun.world_size=64", "dryrun.device_memory_gb=80")
    p, b = r["model_params"], r["per_rank_bytes"]
    assert r["precision"] == "bf16" and r["sharding"]["param_dtype"] == "float32"
    assert r["sharding"]["compute_dtype"] == "bfloat16"
    # fp32 master (4) + fp32 grads (4) + AdamW exp_avg/exp_avg_sq (8) = 16 B per parameter / 64 ranks
    states = b["params"] + b["grads"] + b["optimizer"]
    assert abs(states - 16 * p / 64) <= 0.1 * 16 * p / 64, (states, 16 * p / 64)
    # unsharded: a block (the largest unit) gathered in bf16, the next prefetched, its bf16 grads, fp32 RS
    # input
    block = next(u for u in r["units"] if u["unit"].startswith("blocks."))
    u = r["unsharded_parts"]
    assert (
        u["phase"].startswith("blocks.")
        and u["gathered_params"] == u["prefetched_params"] == 2 * block["numel"]
    )
    assert (
        u["unsharded_grads"] == 2 * block["numel"] and u["reduce_scatter_input"] == 4 * block["padded_numel"]
    )
    assert r["activation"]["activation_checkpointing"] and r["activation"]["method"].startswith("measured")
    assert r["cost_model"]["choice"] == "analytic" and "ANALYTIC" in r["cost_model"]["source"]
    assert r["capacity_tokens"] > 1000 and r["fits"]
    assert b["total"] <= r["device_memory_bytes"]
    # "80 GB" is 80e9 bytes; the reserve (6 GB + the loss's chunk, computed from the model) is set
    # aside before C: the torch path's backward holds, per chunk of 2^25 // vocab tokens, the last
    # chunk's bf16 gradient + fp32 logits + fp32 softmax (10 B each) or, later, the chunk's bf16
    # gradient and the head's weight gradient in bf16 and its fp32 copy (6 B per vocab x hidden);
    # tests/test_dryrun_sizing.py checks these against a tracked backward
    assert r["device_memory_bytes"] == 80 * 10**9 and r["reserve"]["fixed"] == 6 * 10**9
    vocab, hidden = r["model"]["vocab_size"], r["model"]["hidden"]
    chunk = 2**25 // vocab
    assert r["reserve"]["loss_chunk"] == max(chunk * vocab * 10, chunk * vocab * 2 + vocab * hidden * 6)
    resident = states + b["unsharded"]
    per_token = r["activation"]["bytes_per_token"]
    assert r["capacity_tokens_no_reserve"] == int((80 * 10**9 - resident) // per_token)
    assert r["capacity_tokens"] == int((80 * 10**9 - r["reserve"]["total"] - resident) // per_token)
    assert b["total"] == resident + b["activations"] + r["reserve"]["total"]
    assert "error" not in r["plan"] and r["plan"]["predicted_ms"] > 0
    # a 7B model in fp32 is 25 GiB; the dry run's whole process stays far below it
    assert r["peak_rss_bytes"] < 3 * 2**30, r["peak_rss_bytes"]


@pytest.mark.slow
def test_hsdp_shards_within_groups(tmp_path):
    r = _report(tmp_path, "parallel.shard_size=8", "train.precision=bf16", "dryrun.num_sequences=32")
    assert r["sharding"]["mesh"] == [8, 8] and r["sharding"]["replicas"] == 8
    b, p = r["per_rank_bytes"], r["model_params"]
    assert abs(b["params"] - 4 * p / 8) <= 0.1 * 4 * p / 8
    assert r["cost_model"]["choice"] == "analytic"  # cpu-gloo-tiny is not an HSDP model


@pytest.mark.parametrize(
    "override, message",
    [
        ("dryrun.world_size=48", "dryrun.world_size=48 must be a power of two"),
        ("dryrun.device_memory_gb=abc", "dryrun.device_memory_gb='abc' must be a number"),
        ("dryrun.workload=nope", "dryrun.workload='nope'; valid options"),
        ("dryrun.nope=1", "unknown config key 'dryrun.nope'"),
        ("parallel.shard_size=128", "parallel.shard_size=128 must divide dryrun.world_size=64"),
        (
            "dryrun.reserve_gb=80",
            "dryrun.reserve_gb=80.0 must be >= 0 and below dryrun.device_memory_gb=80.0",
        ),
    ],
)
def test_bad_dryrun_field_is_one_line_and_exit_2(tmp_path, override, message):
    proc = _dryrun(tmp_path, override, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("flexsp-dryrun: error: ") and message in lines[0], (
        proc.stderr
    )
    assert not (tmp_path / "dryrun.json").exists()


def test_dryrun_config_validation_in_process():
    from flexsp.dryrun import DryRunConfig

    assert DryRunConfig().world_size == 64
    for bad in (
        dict(world_size=0),
        dict(devices_per_node=3),
        dict(mfu=0.0),
        dict(num_sequences=0),
        dict(context_tokens=0),
        dict(time_limit=float("inf")),
        dict(seed=-1),
    ):
        with pytest.raises(ValueError, match="dryrun."):
            DryRunConfig(**bad)


def _saved_bytes(fn) -> int:
    """Bytes of distinct non-parameter storages autograd saves while ``fn`` runs (real CPU tensors)."""
    seen, keep = {}, []

    def pack(t):
        s = t.untyped_storage()
        keep.append(t)
        seen[s.data_ptr()] = max(seen.get(s.data_ptr(), 0), s.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    return seen


def test_measured_activations_match_a_real_cpu_forward_of_the_whole_model():
    """stem + layers x block + head (measured on meta) == what a real forward of the tiny model
    (no activation checkpointing, the CPU path of the same attention Function) saves, per token."""
    from flexsp.attention.context import AttnContext
    from flexsp.dryrun import activation_bytes_per_token
    from flexsp.model import Transformer, model_config
    from flexsp.model.layers import positions_from_cu_seqlens

    cfg = model_config("tiny", layers=3)
    measured = activation_bytes_per_token(cfg, torch.float32)
    assert measured["method"].startswith("measured") and not measured["activation_checkpointing"]
    model = Transformer(cfg)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def real(T):
        cu = [0, T // 2, T]
        ids = torch.randint(0, cfg.vocab_size, (T,))
        pos = positions_from_cu_seqlens(cu)
        seen = _saved_bytes(lambda: model(ids, pos, AttnContext.local(cu), labels=ids))
        return sum(v for k, v in seen.items() if k not in params)

    per_token = (real(512) - real(256)) / 256
    assert abs(per_token - measured["bytes_per_token"]) <= 0.01 * per_token, (per_token, measured)


def test_in_process_run_destroys_the_fake_world(tmp_path):
    import torch.distributed as dist

    from flexsp.dryrun import compose, run

    assert not dist.is_initialized()
    r = run(compose(["dryrun.num_sequences=16", "dryrun.world_size=16", f"output_dir={tmp_path}"]))
    assert r["world_size"] == 16 and r["sharding"]["mesh"] == [16]
    assert not dist.is_initialized()  # the fake default group is gone
    assert json.loads((tmp_path / "dryrun.json").read_text())["per_rank_bytes"] == r["per_rank_bytes"]


def test_activation_fallback_formula_is_labelled(monkeypatch):
    import flexsp.memory as memory
    from flexsp.dryrun import activation_bytes_per_token
    from flexsp.model import model_config

    def broken(*a, **k):
        raise NotImplementedError("no meta kernel")

    monkeypatch.setattr(memory, "varlen_attention", broken)
    r = activation_bytes_per_token(model_config("7b"), torch.bfloat16)
    assert r["method"].startswith("FALLBACK FORMULA") and "no meta kernel" in r["method"]
    assert r["bytes_per_token"] > 32 * 4096 * 2  # at least every block's bf16 input


def test_bad_cost_model_is_an_error_before_any_work(tmp_path):
    proc = _dryrun(tmp_path, "solver.cost_model=/nonexistent/cm.json", timeout=120)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert "flexsp-dryrun: error: cost-model file /nonexistent/cm.json does not exist" in proc.stderr


SMALL_DEVICE = (
    "model=7b",
    "dryrun.device_memory_gb=12",
    "dryrun.reserve_gb=2",
    "dryrun.num_sequences=32",
    "dryrun.time_limit=0.5",
)


def _does_not_fit(tmp_path, *overrides):
    proc = _dryrun(tmp_path, *SMALL_DEVICE, *overrides)
    assert proc.returncode == 4, proc.stdout + proc.stderr  # DOES_NOT_FIT_EXIT_CODE
    line = [ln for ln in proc.stdout.splitlines() if "DOES NOT FIT on" in ln]
    assert len(line) == 1 and "Traceback" not in proc.stderr, proc.stdout + proc.stderr
    r = json.loads((tmp_path / "dryrun.json").read_text())
    assert not r["fits"] and r["fit_suggestion"], r["fit_suggestion"]
    return line[0], r["fit_suggestion"]


@pytest.mark.slow
def test_does_not_fit_exits_4_and_names_the_smallest_world_that_fits(tmp_path):
    """7B on 8 devices of 12 GB: exit 4, the smallest world size that fits is named; a dry run there
    fits with the C it predicted, and one at half of it does not (it is the smallest)."""
    line, s = _does_not_fit(tmp_path / "8", "dryrun.world_size=8")
    world = s["world_size"]
    assert world > 8 and s["shard_size"] == 0, s
    assert (
        f"DOES NOT FIT on 8 x 12 GB (11.18 GiB): the smallest world size that fits is {world} ranks "
        f"(dryrun.world_size={world}: C = {s['capacity_tokens']:,} tokens/rank)"
    ) in line, line
    there = _report(tmp_path / "there", *SMALL_DEVICE, f"dryrun.world_size={world}")
    assert there["fits"] and there["capacity_tokens"] == s["capacity_tokens"], (there["capacity_tokens"], s)
    _does_not_fit(tmp_path / "half", f"dryrun.world_size={world // 2}")


@pytest.mark.slow
def test_hsdp_that_does_not_fit_names_the_shard_size_that_does(tmp_path):
    line, s = _does_not_fit(tmp_path / "s2", "dryrun.world_size=64", "parallel.shard_size=2")
    shard = s["shard_size"]
    assert s["world_size"] == 64 and 2 < shard < 64, s
    assert f"it fits with parallel.shard_size={shard} on these 64 ranks (C = {s['capacity_tokens']:,}" in line
    there = _report(tmp_path / "there", *SMALL_DEVICE, "dryrun.world_size=64", f"parallel.shard_size={shard}")
    assert there["fits"] and there["capacity_tokens"] == s["capacity_tokens"]
    if shard // 2 > 2:
        _does_not_fit(tmp_path / "half", "dryrun.world_size=64", f"parallel.shard_size={shard // 2}")


def test_hf_checkpoint_is_named_and_the_cost_model_line_reads_as_no_error(tmp_path):
    """An HF model's report says its architecture; the configured cost model (cpu-gloo-tiny, built
    for hidden=64) does not match this 96-wide model: the printed line says so in neutral words,
    the full reason stays in dryrun.json."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.Qwen3Config(
        vocab_size=300,
        hidden_size=96,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=24,
        max_position_embeddings=512,
    )
    transformers.Qwen3ForCausalLM(cfg).save_pretrained(tmp_path / "my-qwen3")
    proc = _dryrun(
        tmp_path / "out",
        f"model.hf_checkpoint={tmp_path / 'my-qwen3'}",
        "dryrun.num_sequences=16",
        "dryrun.context_tokens=4096",
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    head, *rest = proc.stdout.splitlines()
    assert head.startswith("flexsp-dryrun: Qwen3ForCausalLM (my-qwen3) (") and " tiny " not in head, head
    cm_line = next(ln for ln in rest if ln.startswith("  cost model:"))
    assert cm_line == (
        "  cost model: analytic-my-qwen3-64 (solver.cost_model=auto is for another "
        "model shape: an analytic roofline with the memory measured here is used)"
    ), cm_line
    r = json.loads((tmp_path / "out" / "dryrun.json").read_text())
    assert "was built for hidden=64 but the model has hidden=96" in r["cost_model"]["why"]
    assert r["model"]["name"] == "Qwen3ForCausalLM (my-qwen3)"


# -- HF-native models (transformers' modules) --------------------------------------------------------
@pytest.mark.parametrize(
    "case, dtype",
    [("olmo2", torch.float32), ("llama", torch.float32), ("qwen3-moe", torch.bfloat16)],
)
def test_hf_native_activations_match_a_real_cpu_forward(tmp_path, case, dtype):
    """The HF-native measurement (a whole meta forward, saved storages attributed to decoder layers)
    == the bytes autograd saves in a real CPU forward of the same transformers modules through the
    same attention Function, per token (slope between two token counts). OLMo 2: q/k norms and
    post-norms; Qwen3-MoE in bf16: routed experts (grouped_mm, the kernel meta runs in bf16)."""
    pytest.importorskip("transformers")
    from test_hf_native import make_hf

    from flexsp.attention.context import AttnContext
    from flexsp.memory import activation_bytes_per_token
    from flexsp.model.hf_native_weights import load_hf_native
    from flexsp.model.layers import positions_from_cu_seqlens

    make_hf(case, tmp_path / case)
    model = load_hf_native(tmp_path / case, dtype=dtype)
    measured = activation_bytes_per_token(model.config, dtype)
    assert measured["method"].startswith("measured"), measured["method"]
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def real(T):
        cu = [0, T // 2, T]
        ids = torch.randint(3, model.config.vocab_size, (T,))
        pos = positions_from_cu_seqlens(cu)
        seen = _saved_bytes(lambda: model(ids, pos, AttnContext.local(cu), labels=ids))
        return sum(v for k, v in seen.items() if k not in params)

    per_token = (real(512) - real(256)) / 256
    # 1%: the same modules and Function on both sides; only allocator-shared storages could differ
    assert abs(per_token - measured["bytes_per_token"]) <= 0.01 * per_token, (per_token, measured)
    per = measured["parts_per_token"]
    assert per["blocks"] == pytest.approx(model.config.layers * per["block"])  # equal layers here


def test_hf_native_activation_fallback_is_labelled(tmp_path, monkeypatch):
    """An HF-native forward that cannot run on meta falls back to the formula of its LLaMA-equivalent
    shape, saying so in ``method`` (printed by the report)."""
    pytest.importorskip("transformers")
    from test_hf_native import make_hf

    import flexsp.memory as memory
    from flexsp.model.hf_native import hf_native_config

    def broken(*a, **k):
        raise NotImplementedError("no meta kernel")

    make_hf("olmo2", tmp_path / "olmo2")
    monkeypatch.setattr(memory, "varlen_attention", broken)
    r = memory.activation_bytes_per_token(hf_native_config(tmp_path / "olmo2"), torch.bfloat16)
    assert r["method"].startswith("FALLBACK FORMULA (meta forward of Olmo2ForCausalLM failed"), r["method"]
    assert r["bytes_per_token"] > 2 * 64 * 2  # at least every layer's bf16 input


def test_hf_native_model_is_sharded_and_sized(tmp_path):
    """A Gemma 3 checkpoint (sliding-window layers, not a native family) dry-runs HF-native: its
    decoder layers are FSDP2 units, rank 0 holds 1/8 of every parameter (fp32: params + grads +
    AdamW = 16 B per parameter / 8 ranks, plus FSDP2's padding), activations are measured."""
    pytest.importorskip("transformers")
    from test_hf_native import make_hf

    hf = make_hf("gemma3-window", tmp_path / "gemma3")
    numel = sum(p.numel() for p in hf.parameters())
    r = _report(
        tmp_path / "out",
        f"model.hf_checkpoint={tmp_path / 'gemma3'}",
        "dryrun.world_size=8",
        "dryrun.num_sequences=16",
        "dryrun.context_tokens=4096",
    )
    assert r["model"]["name"] == "Gemma3ForCausalLM (gemma3)" and r["model"]["hf_native"] is True
    assert r["model_params"] == numel
    assert r["sharding"]["mesh"] == [8] and r["precision"] == "fp32"
    assert [u["unit"] for u in r["units"]] == ["blocks.0-1", "root"], r["units"]  # tied: embed in root
    assert r["units"][0]["count"] == 2
    b = r["per_rank_bytes"]
    # FSDP2 shards dim 0 in chunks of ceil(rows / 8): rank 0 holds the first (full) chunk of each
    rank0 = sum(min(-(-p.shape[0] // 8), p.shape[0]) * (p.numel() // p.shape[0]) * 4 for p in hf.parameters())
    assert b["params"] == rank0 and numel * 4 / 8 <= rank0, (b["params"], rank0)
    assert b["optimizer"] == 2 * b["params"] and b["grads"] == b["params"]
    assert r["activation"]["method"].startswith("measured: saved_tensors_hooks on meta tensors over a whole")
    assert r["fits"] and "error" not in r["plan"], r["plan"]
