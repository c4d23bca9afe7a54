"""flexsp-bench: end to end on 2 gloo ranks (the real command, in a subprocess), its outputs' contents
(every method, ratios that follow from the times, stamps), bad input (one line, exit status 2), and
the pieces it is built from: every method's plan, predictions, the summary's rules. No speed is
asserted anywhere: timings on a shared machine are what they are."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from dataclasses import replace

import pytest
from train_cases import REPO, launch_env

from flexsp import bench
from flexsp.bench_report import merge_deepspeed, summarize
from solver.plan import Plan
from solver.presets import load_preset

TINY = [
    "data=synthetic",
    "data.num_docs=48",
    "data.corpus.max_doc_tokens=96",
    "train.global_batch=8",
    "train.progress=false",
    "bench.capacity_tokens=64",
    "bench.batches=1",
    "bench.warmup=1",
    "bench.repeats=1",
    "solver.time_limit=0.5",
]


def _bench(args, timeout):
    proc = subprocess.run(
        [sys.executable, "-m", "flexsp.bench", *args],
        cwd=REPO,
        env=launch_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return proc.returncode, proc.stdout, proc.stderr


@pytest.mark.slow
def test_two_ranks_end_to_end(tmp_path):
    from solver.build import price_plan, validate_plan
    from solver.costmodel import CostModel

    stem = tmp_path / "res" / "bench_t"
    rc, out, err = _bench(
        ["--nproc-per-node", "2", *TINY, f"bench.out={stem}", f"output_dir={tmp_path / 'run'}"], timeout=300
    )
    assert rc == 0, (out + err)[-4000:]
    res = json.loads(stem.with_suffix(".json").read_text())
    lengths = res["batches"][0]["lengths"]
    assert max(lengths) > 64, "the batch must need degree 2 for some document (C = 64)"
    cm = CostModel.from_dict(res["cost_model"]["model"])
    assert cm.capacity_tokens == 64 and res["cost_model"]["capacity_emulated"]
    rows = {r["method"]: r for r in res["rows"]}
    assert set(rows) == {"flexsp", "static-2", "best-homogeneous"}  # static-1 cannot hold the longest
    for m, r in rows.items():
        plan = Plan.from_dict(r["plan_json"])
        validate_plan(plan, lengths, cm)
        assert r["predicted_ms"] == pytest.approx(price_plan(plan, lengths, cm)), m
        assert len(r["times_ms"]) == 1 and r["min_ms"] <= r["median_ms"] <= r["max_ms"]
        assert all(math.isfinite(x) and x > 0 for x in r["losses"] + r["warmup_losses"]), m
        assert r["tokens"] == sum(lengths)
    # the very first step (batch 0, first method, warm-up) trains the seeded weights on random
    # tokens: a loss near ln(vocab) (the init's logits are small)
    assert res["first_loss"] == pytest.approx(math.log(res["model"]["vocab_size"]), rel=0.05)
    s = res["summary"]
    fx = rows["flexsp"]["median_ms"]
    best_static = rows["static-2"]["median_ms"]
    best_base = min(best_static, rows["best-homogeneous"]["median_ms"])
    assert s["speedups"]["best_static"]["measured"] == pytest.approx(best_static / fx)
    homog = rows["best-homogeneous"]["median_ms"]
    assert s["speedups"]["best-homogeneous"]["measured"] == pytest.approx(homog / fx)
    assert s["speedups"]["best_baseline"]["measured"] == pytest.approx(best_base / fx)
    assert s["methods"]["flexsp"]["tokens_per_s"] == pytest.approx(sum(lengths) / fx * 1e3)
    head = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    assert res["commit"] == head and isinstance(res["dirty"], list)  # the changed code files
    assert "--nproc-per-node 2" in res["command"] and "flexsp.bench" in res["command"]
    assert res["machine"]["world_size"] == 2 and res["machine"]["backend"] == "gloo"
    assert res["cost_model"]["name"] == "cpu-gloo-tiny" and len(res["loadavg_start"]) == 3
    md = stem.with_suffix(".md").read_text()
    for needle in (
        "| flexsp |",
        "| static-2 |",
        "| best-homogeneous |",
        "best static (static-2)",
        head,
        res["command"],
        "**Load**",
        "cpu-gloo-tiny",
        f"{s['speedups']['best_baseline']['measured']:.3f}x over the best baseline",
    ):
        assert needle in md, needle
    assert stem.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_input_is_one_line_and_exit_2_from_the_real_command(tmp_path):
    rc, out, err = _bench(["--nproc-per-node", "2", "bench.repeats=0", f"output_dir={tmp_path}"], timeout=120)
    assert rc == 2 and err.strip().splitlines() == ["flexsp-bench: error: bench.repeats=0 must be >= 1"], err
    assert "Traceback" not in out + err


@pytest.mark.parametrize(
    "override, needle",
    [
        ("bench.methods=[flexsp,nope]", "bench.methods=['flexsp', 'nope']: ['nope']; valid methods:"),
        ("bench.world=moon", "bench.world='moon'; valid options: ['main', 'deepspeed']"),
        ("bench.batches=abc", "bench.batches='abc' must be an integer"),
        ("bench.fast=1", "unknown config key 'bench.fast'"),
        ("solver.cost_model=/nonexistent/cm.json", "cost-model file /nonexistent/cm.json does not exist"),
        ("bench.out=/proc/no/such/stem", "bench.out=/proc/no/such cannot be created"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, override, needle):
    rc = bench.main(["--nproc-per-node", "2", override, f"output_dir={tmp_path}"])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1, err
    assert err.startswith("flexsp-bench: error: ") and needle in err, err


def test_help_lists_the_bench_keys(capsys):
    assert bench.main(["--help"]) == 0
    text = capsys.readouterr().out
    for key in (
        "bench.methods",
        "bench.warmup",
        "bench.repeats",
        "bench.batches",
        "bench.out",
        "--nproc-per-node",
    ):
        assert key in text


# -- the pieces ------------------------------------------------------------------------------------------
def _cm(**kw):
    return replace(load_preset("cpu-gloo-tiny"), capacity_override=256, **kw)


def test_every_method_plans_every_sequence_and_static_degrees_hold_the_longest():
    from flexsp.planning import SolverConfig
    from solver.build import price_plan

    lens = [500, 100, 60, 30, 30, 20, 8]
    cm = replace(_cm(per_sequence_ms=0.5, step_overhead_ms=40.0), num_devices=4)
    plans = bench.plan_methods(
        lens, cm, ["flexsp", "static", "best-homogeneous", "deepspeed-ulysses"], SolverConfig(time_limit=1.0)
    )
    assert set(plans) == {"flexsp", "static-2", "static-4", "best-homogeneous", "deepspeed-ulysses"}
    for name, plan in plans.items():
        ids = sorted(i for mb in plan.micro_batches for g in mb.groups for i in g.seq_ids)
        assert ids == list(range(len(lens))), name
        assert plan.predicted_ms == pytest.approx(price_plan(plan, lens, cm)), name
        assert plan.predicted_ms > 40.0, name  # the step overhead is in every prediction
    assert all(g.sp == 2 for mb in plans["static-2"].micro_batches for g in mb.groups)
    ds = plans["deepspeed-ulysses"]
    assert all(g.sp == 4 and g.attention == "ulysses" for mb in ds.micro_batches for g in mb.groups)


def _row(batch, method, median, predicted=None, tokens=1000):
    return {
        "batch": batch,
        "method": method,
        "tokens": tokens,
        "median_ms": median,
        "min_ms": median - 1,
        "max_ms": median + 1,
        "predicted_ms": predicted or median,
        "flops": 1.0,
    }


def test_summary_best_baseline_includes_best_homogeneous_and_picks_per_batch():
    """The defect of the old benchmarks/throughput.py: "best static" without best-homogeneous.
    Here best static is the fastest static degree of each batch and best baseline the faster of
    that and best-homogeneous, batch by batch; a degree that cannot hold a batch is just absent."""
    rows = [
        _row(0, "flexsp", 80),
        _row(0, "static-1", 90),
        _row(0, "static-2", 100),
        _row(0, "best-homogeneous", 85),
        _row(1, "flexsp", 50),
        _row(1, "static-2", 70),
        _row(1, "best-homogeneous", 75),
    ]
    s = summarize({"rows": rows, "world_size": 2})
    assert [p["best_static"]["method"] for p in s["per_batch"]] == ["static-1", "static-2"]
    assert [p["best_baseline"]["method"] for p in s["per_batch"]] == ["best-homogeneous", "static-2"]
    assert s["speedups"]["best_static"]["measured"] == pytest.approx((90 + 70) / 130)
    assert s["speedups"]["best_baseline"]["measured"] == pytest.approx((85 + 70) / 130)
    assert s["speedups"]["best-homogeneous"]["measured"] == pytest.approx((85 + 75) / 130)
    # load-robust cross-check: the same from each row's fastest repetition (median - 1 here)
    assert s["speedups"]["best_baseline"]["fastest"] == pytest.approx((84 + 69) / 128)
    assert "static-1" not in s["speedups"]  # ran one batch of two: no whole-run ratio
    assert s["methods"]["static-1"]["batches"] == 1
    assert s["methods"]["flexsp"]["tokens_per_s"] == pytest.approx(2000 / 130 * 1e3)


def test_predicted_speedups_and_errors_come_from_the_predictions():
    rows = [
        _row(0, "flexsp", 100, predicted=80),
        _row(0, "static-2", 120, predicted=60),
        _row(0, "best-homogeneous", 110, predicted=90),
    ]
    s = summarize({"rows": rows, "world_size": 2})
    assert s["speedups"]["best_baseline"]["predicted"] == pytest.approx(60 / 80)
    assert s["per_batch"][0]["best_baseline"]["predicted_method"] == "static-2"
    assert s["prediction_error"]["max_abs"] == pytest.approx(0.5)
    assert s["prediction_error"]["median_abs"] == pytest.approx(0.2)
    assert s["prediction_error"]["under_predicted"] == 3


def test_step_flops_convention():
    from flexsp.model import model_config

    m = model_config("tiny")
    params = m.num_params(include_embeddings=False) + m.vocab_size * m.hidden
    want = 6 * params * 30 + 6 * m.layers * m.heads * m.head_size * (10**2 + 20**2)
    assert bench.step_flops(m, [10, 20]) == pytest.approx(want)
    checkpointed = replace(m, activation_checkpointing=True)
    assert bench.step_flops(checkpointed, [10, 20]) == pytest.approx(want * 8 / 6)


def test_deepspeed_rows_merge_only_into_the_same_batches(tmp_path):
    stem = tmp_path / "b"
    main = {
        "batches": [{"index": 0, "doc_ids": [1], "lengths": [5]}],
        "world_size": 2,
        "rows": [_row(0, "flexsp", 10)],
    }
    ds = {
        "batches": main["batches"],
        "world_size": 2,
        "rows": [_row(0, "deepspeed-ulysses", 12)],
        "command": "c",
        "date": "d",
        "seconds": 1.0,
        "loadavg_start": [0, 0, 0],
        "loadavg_end": [0, 0, 0],
        "commit": "x",
        "dirty": [],
        "first_loss": 1.0,
    }
    with pytest.raises(ValueError, match="does not exist: run the main world first"):
        merge_deepspeed(stem, ds)
    stem.with_suffix(".json").write_text(json.dumps(main))
    merged = merge_deepspeed(stem, ds)
    assert [r["method"] for r in merged["rows"]] == ["flexsp", "deepspeed-ulysses"]
    with pytest.raises(ValueError, match="other batches"):
        merge_deepspeed(stem, {**ds, "batches": [{"index": 0, "doc_ids": [2], "lengths": [5]}]})


def _deepspeed_context_body(rank, world):
    import deepspeed
    import torch
    from attn_cases import FP32_TOL, make_inputs

    from flexsp.attention import shard
    from flexsp.attention.context import AttnContext

    deepspeed.init_distributed(dist_backend="gloo")  # reuses the harness' process group
    group = torch.distributed.new_group(list(range(world)))
    ds_ctx_cls = bench._deepspeed_classes()[0]
    for cu, heads, kvh in (([0, 64], 4, 4), ([0, 5, 6, 40, 61], 4, 2)):
        q, k, v, dout = make_inputs(cu, heads, kvh, 16, torch.float32, seed=len(cu) + kvh)
        ql, meta = shard(q, cu, group, "ulysses")
        kl, vl, dl = (shard(x, cu, group, "ulysses", meta=meta)[0] for x in (k, v, dout))
        outs, grads = [], []
        for ctx in (
            AttnContext(meta=meta, group=group, mode="ulysses"),
            ds_ctx_cls(meta=meta, group=group, mode="ulysses"),
        ):
            ins = [x.clone().requires_grad_() for x in (ql, kl, vl)]
            out = ctx.attention(*ins)
            out.backward(dl)
            outs.append(out)
            grads.append([x.grad for x in ins])
        # same layout and local kernel, only the all-to-alls differ: equal to fp32 rounding (FP32_TOL)
        torch.testing.assert_close(outs[1], outs[0], **FP32_TOL)
        for a, b in zip(grads[1], grads[0]):
            torch.testing.assert_close(a, b, **FP32_TOL)
    return True


@pytest.mark.slow
def test_the_deepspeed_context_equals_our_ulysses():
    """The deepspeed-ulysses baseline's AttnContext (DeepSpeed's DistributedAttention on our Ulysses
    layout, KV heads replicated when the degree does not divide them) computes what ours does."""
    import importlib.util
    import os

    from dist_harness import run_distributed

    if importlib.util.find_spec("deepspeed") is None:
        pytest.skip("deepspeed is not installed (pip install -e .[dist])")
    env = {
        "DS_ACCELERATOR": "cpu",
        "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", str(REPO / ".torch_extensions")),
    }
    assert run_distributed(_deepspeed_context_body, 2, timeout=240, env=env) == [True, True]
