"""Tests of the GPU check (benchmarks/gpu_check.py and its sections) that run on CPU: the --smoke
mode end to end through the per-section subprocesses -- with an injected hanging section that must
be killed at its budget (children included) while the next sections still run, and the report
rewritten after every section -- the cost-model file it writes, and the helpers whose mistakes would
silently skew the GPU numbers (FLOP count, batch generator, activation slope, backend list)."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
BENCH = REPO_ROOT / "benchmarks"
SCRIPT = BENCH / "gpu_check.py"
HANG_S = 4


def _load(name):
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # dataclasses resolve their module's annotations through sys.modules
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def gc():
    return _load("gpu_check")


@pytest.fixture(scope="module")
def common():
    return _load("gpu_common")


def _alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie awaiting its reaper counts as dead)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    """One --smoke run with a hanging section after env; the report as it was while the hang ran."""
    out = tmp_path_factory.mktemp("gpu_check") / "out"
    env = dict(
        os.environ,
        FLEXSP_GPU_CHECK_TEST_HANG=str(HANG_S),
        PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])),
    )
    t0 = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, str(SCRIPT), str(out), "--smoke"],
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    during = None
    while proc.poll() is None and during is None:
        try:
            data = json.loads((out / "results.json").read_text())
        except (OSError, ValueError):
            data = {}
        if data.get("sections", {}).get("hang", {}).get("status") == "running":
            during = (data, (out / "report.md").read_text())
        time.sleep(0.2)
    stdout, _ = proc.communicate(timeout=600)
    return {
        "out": out,
        "rc": proc.returncode,
        "stdout": stdout,
        "during": during,
        "seconds": time.monotonic() - t0,
        "results": json.loads((out / "results.json").read_text()),
        "report": (out / "report.md").read_text(),
    }


@pytest.mark.slow
def test_report_is_rewritten_after_each_section(smoke_run):
    assert smoke_run["during"] is not None, smoke_run["stdout"][-3000:]
    data, report = smoke_run["during"]
    # while the hang section runs, env's finished result is already in both files
    assert data["sections"]["env"]["status"] == "ok"
    assert "| 0 | env | ok |" in report and "| 1 | hang | running |" in report
    assert "| 2 | tests | not started |" in report


@pytest.mark.slow
def test_hanging_section_is_killed_at_its_budget_and_the_next_sections_run(smoke_run):
    sections = smoke_run["results"]["sections"]
    hang = sections["hang"]
    assert hang["status"].startswith(f"timeout: killed at its {HANG_S} s budget"), hang
    assert hang["elapsed_s"] <= HANG_S + 1.5, hang
    # the section's child process (same process group) went down with it
    assert not _alive(hang["data"]["child_pid"])
    for name in ("env", "tests", "train", "attention", "profile", "fused_ops"):
        sec = sections[name]
        assert sec["status"] == "ok", (name, sec.get("status"), sec.get("log_tail"))
    assert smoke_run["rc"] == 1  # the hang section did not pass


@pytest.mark.slow
def test_report_layout_and_files(smoke_run):
    report = smoke_run["report"]
    assert report.startswith("# FlexSP GPU check (SMOKE")
    summary = report.split("## Summary", 1)[1].split("## 0.", 1)[0]
    order = ["env", "hang", "tests", "train", "attention", "profile", "fused_ops"]
    where = [summary.index(f"| {name} |") for name in order]
    assert where == sorted(where)
    assert "seconds (budget)" in summary and "key numbers" in summary
    files = sorted(p.name for p in smoke_run["out"].iterdir())
    assert files == ["costmodel_smoke_cpu_tiny.json", "report.md", "results.json"], files
    # the summary is the last thing printed (what a truncated console tail still shows)
    assert smoke_run["stdout"].rstrip().splitlines()[-1].startswith("| 6 | fused_ops | ok |")


@pytest.mark.slow
def test_sections_report_their_numbers(smoke_run):
    s = smoke_run["results"]["sections"]
    env = s["env"]["data"]
    assert env["export"]["peak_tflops"] > 0 and env["packages"]["torch"]["origin"] == "image"
    train = s["train"]["data"]
    assert train["ok"] and train["resume_max_rel_diff"] == 0.0 and len(train["step_s"]) == train["steps"]
    assert train["first_step_s"] > 0 and train["steady_tokens_per_s"] > 0
    rows = s["attention"]["data"]["rows"]
    impls = {r["impl"] for r in rows}
    from flexsp.attention.local import BACKENDS

    for name in BACKENDS:  # every backend has a row: measured or "unavailable: reason"
        assert any(f"backend={name!r}" in i for i in impls), (name, impls)
    ours = [r for r in rows if r["impl"].startswith("ours")]
    assert ours and all(r["fwd"]["tflops"] > 0 and r["fwd+bwd"]["runs"] >= 1 for r in ours)
    assert any("FLASH_ATTENTION" in i for i in impls)
    assert s["tests"]["data"]["returncode"] in (0, 5)


@pytest.mark.slow
def test_smoke_cost_model_loads_and_says_what_was_measured(smoke_run):
    from solver.costmodel import CostModel

    cm = CostModel.load(smoke_run["out"] / "costmodel_smoke_cpu_tiny.json")
    prof = smoke_run["results"]["sections"]["profile"]["data"]
    assert cm.layers == 4 and cm.activation_checkpointing and cm.num_devices == 8  # tiny, 4 layers, AC on
    assert cm.to_dict() == CostModel.from_dict(prof["cost_model"]).to_dict()
    assert "MEASURED on one CPU" in cm.source and "NOT MEASURED" in cm.source
    assert "PAPER_BANDWIDTH" in cm.source and "ESTIMATE" in cm.source
    assert min(cm.a1, cm.a2, cm.b) >= 0 and cm.capacity_tokens > 0
    # scaled from the 1- and 2-layer builds to the model's 4 layers: 4 x per layer + the fixed part
    # (CPU timings under load are noise, so only the bookkeeping is checked, not the values)
    layer, fixed = prof["fit"]["per_layer"], prof["fit"]["fixed"]
    assert math.isclose(cm.a1, 4 * layer["a1"], rel_tol=1e-9, abs_tol=1e-15)
    assert math.isclose(cm.a2, 4 * layer["a2"] + fixed["a2"], rel_tol=1e-9, abs_tol=1e-15)
    assert math.isclose(cm.b, 4 * layer["b"] + fixed["b"], rel_tol=1e-9, abs_tol=1e-12)
    assert len(prof["samples"]) == 6 and {s["layers"] for s in prof["samples"]} == {1, 2}
    held = prof["heldout"]
    assert held["layers"] == 2 and held["measured_ms"] > 0 and "held-out" in cm.source


def test_gpu_budgets_fit(gc):
    """The sections' GPU budgets add up to the 420 s total, under gpu_check.sh's hard 440 s."""
    assert sum(s.budget_s for s in gc.SECTIONS) <= gc.TOTAL_BUDGET_S == 420
    assert [s.name for s in gc.SECTIONS] == ["env", "tests", "train", "attention", "profile", "fused_ops"]
    sh = (BENCH / "gpu_check.sh").read_text()
    assert "GPU_CHECK_TIMEOUT_S:-440" in sh and "--no-deps" in sh and "console.log" in sh


def test_section_budgets_grow_only_with_time_left_by_earlier_sections(gc):
    assert gc.section_budget(120, False, 300, 115) == 120
    assert gc.section_budget(120, False, 50, 0) == 50  # never beyond the total
    # env/tests/train used 112 s of 420: attention may use 1.5x, profile + fused_ops keep 115 s
    assert gc.section_budget(120, True, 308, 115) == 180
    assert gc.section_budget(120, True, 200, 115) == 120  # only 85 s spare: its own budget stands
    assert gc.section_budget(90, True, 128, 25) == 103  # profile: what attention left, minus fused_ops


def test_bad_command_lines_get_one_line_and_exit_2(tmp_path):
    for args, msg in (
        (["--budget-s", "0"], "--budget-s must be > 0, got 0.0"),
        (["--section-budget", "tests=abc"], "--section-budget 'tests=abc': expected NAME=SECONDS"),
        (["--only", "nope"], "invalid choice: 'nope'"),
    ):
        proc = subprocess.run(
            [sys.executable, str(SCRIPT), str(tmp_path), *args], capture_output=True, text=True, timeout=60
        )
        assert proc.returncode == 2 and msg in proc.stderr, (args, proc.stderr)
        assert "Traceback" not in proc.stderr


def test_section_result_is_written_atomically(common, tmp_path):
    res = common.SectionResult(tmp_path / "r.json")
    res.lines.append("row 1")
    res.data["x"] = float("nan")
    res.flush()
    got = common.read_result(tmp_path / "r.json")
    assert got["status"] == "running" and got["lines"] == ["row 1"] and math.isnan(got["data"]["x"])
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]
    assert common.read_result(tmp_path / "missing.json") is None


def test_long_tailed_lengths(common):
    rng = np.random.default_rng(0)
    for total in (8 * 1024, 128 * 1024):
        lengths = common.long_tailed_lengths(total, rng, 128)
        assert sum(lengths) == total and min(lengths) >= 128
        assert len(lengths) > 3 and max(lengths) > 8 * np.median(lengths)  # long-tailed
    with pytest.raises(ValueError, match="need total >= min_len >= 1, got total=10, min_len=128"):
        common.long_tailed_lengths(10, rng, 128)


def test_causal_attention_flops(common):
    # one 4-token doc, 1 head, dim 2: QK^T and PV are 2 * L * L * D FLOPs each, half masked: 2 * H * D * L^2
    assert common.causal_attn_flops([4], 1, 2) == 2 * 1 * 2 * 16
    assert common.causal_attn_flops([4, 4], 3, 2) == 2 * common.causal_attn_flops([4], 3, 2)
    assert math.isclose(common.causal_attn_flops([32768], 32, 128), 2 * 32 * 128 * 32768**2)
    assert common.FWD_BWD_FLOP_FACTOR == 3.5


def test_math_backend_is_skipped_where_it_would_be_dense():
    import torch

    attn = _load("gpu_attention")
    cfg = attn.attention_config(smoke=False)
    long = attn._implementations([128 * 1024], [0, 128 * 1024], torch.device("cpu"), cfg)
    by = {label: reason for label, _fn, _exp, reason in long}
    math_row = next(r for label, r in by.items() if "backend='math'" in label)
    assert math_row.startswith("skipped: materialises [H, L, L] fp32 scores, 2048.0 GiB")
    short = attn._implementations([256, 256], [0, 256, 512], torch.device("cpu"), cfg)
    assert all(r is None for label, _f, _e, r in short if "backend=" in label)
    assert [label.split(" (")[0] for label, *_ in short][:4] == [
        "ours, dispatched",
        "SDPA per-doc loop [FLASH_ATTENTION]",
        "SDPA per-doc loop [CUDNN_ATTENTION]",
        "SDPA per-doc loop [EFFICIENT_ATTENTION]",
    ]


def test_activation_slope_splits_per_layer_and_fixed():
    fit = _load("gpu_costfit")
    from flexsp.model import model_config

    # bytes = const + tokens * (fixed + layers * per_layer): constants cancel in the slope
    fixed, per_layer = 3000.0, 500.0
    peaks = {
        n: [(t, 7e9 + n * 1e8 + t * (fixed + n * per_layer)) for t in (32768, 65536, 131072)] for n in (1, 2)
    }
    rec = fit.activation_record(peaks, model_config("tiny"), [1, 2])
    assert math.isclose(rec["per_layer_bytes_per_token"], per_layer, rel_tol=1e-6)
    assert math.isclose(rec["fixed_bytes_per_token"], fixed, rel_tol=1e-6)
    assert "CUDA max_memory_allocated" in rec["method"]
    cpu = fit.activation_record({}, model_config("tiny"), [1, 2])
    assert "NOT measured" in cpu["method"]


def test_run_time_estimate_of_a_profile_shape():
    fit = _load("gpu_costfit")

    # t = 1e-5 s/token + 2e-10 s/token^2: two samples pin both terms (estimate has a 1.2x margin)
    def sample(lengths, layers=2):
        t = 1e-5 * sum(lengths) + 2e-10 * sum(x * x for x in lengths)
        return {"lengths": lengths, "layers": layers, "ms": [t * 1e3 * 1.5, t * 1e3]}

    samples = [sample([32768]), sample([8192] * 4), sample([100], layers=1)]
    want = 1e-5 * 131072 + 2e-10 * 131072**2
    assert math.isclose(fit._estimate(samples, 2, [131072]), 1.2 * want, rel_tol=1e-6)
    # one sample: scaled by the larger ratio (tokens or sum L^2), never below its own time
    one = 1e-5 * 100 + 2e-10 * 100**2
    assert math.isclose(fit._estimate(samples, 1, [400]), 16 * one, rel_tol=1e-6)
    assert fit._estimate(samples, 3, [10]) == 0.0


def test_best_sdpa_row_of_a_batch():
    attn = _load("gpu_attention")
    rows = [
        {
            "batch": "b",
            "impl": "SDPA per-doc loop [FLASH_ATTENTION]",
            "fwd": {"pct_peak": 70.0},
            "fwd+bwd": {"pct_peak": float("nan")},
        },
        {
            "batch": "b",
            "impl": "SDPA per-doc loop [CUDNN_ATTENTION]",
            "fwd": {"pct_peak": 60.0},
            "fwd+bwd": {"pct_peak": 65.0},
        },
        {"batch": "b", "impl": "SDPA per-doc loop [EFFICIENT_ATTENTION]", "unavailable": "no kernel"},
        {"batch": "b", "impl": "ours, dispatched", "fwd": {"pct_peak": 99.0}, "fwd+bwd": {"pct_peak": 99.0}},
        {"batch": "c", "impl": "SDPA per-doc loop [FLASH_ATTENTION]", "fwd": {"pct_peak": 90.0}},
    ]
    assert attn._best_sdpa(rows, "b") == (70.0, 65.0)
    assert attn._best_sdpa(rows, "d") is None


@pytest.mark.slow
def test_profile_drops_checkpointing_when_its_warm_up_fails(tmp_path, monkeypatch):
    """Compiled flex under activation checkpointing never ran on a GPU before: if the warm-up fails
    with it, the profile runs without it and the cost model says so (flag and source)."""
    import torch

    from solver.costmodel import CostModel

    fit, common = _load("gpu_costfit"), _load("gpu_common")
    real, seen = fit._warm_up, []

    def flaky(c, runner, res):
        seen.append(runner.models[1].config.activation_checkpointing)
        if seen[-1]:
            raise RuntimeError("injected: checkpoint + compiled flex")
        real(c, runner, res)

    monkeypatch.setattr(fit, "_warm_up", flaky)
    res = common.SectionResult(tmp_path / "r.json")
    cfg = {"device": torch.device("cpu"), "smoke": True, "out_dir": tmp_path, "ctx": {"commit": "abc1234"}}
    fit.section_profile(cfg, res, common.Deadline(300))
    assert seen == [True, False]
    cm = CostModel.load(tmp_path / "costmodel_smoke_cpu_tiny.json")
    assert not cm.activation_checkpointing and cm.layers == 4
    assert "activation checkpointing OFF" in cm.source and "injected: checkpoint" in cm.source
    assert "commit abc1234" in cm.source and res.data["ac_error"].startswith("RuntimeError: injected")


def test_tests_section_reports_each_outcome_and_the_failure(tmp_path):
    """The tests section streams pytest -m gpu: per-test outcomes, the failure's message, FAIL status."""
    sections, common = _load("gpu_sections"), _load("gpu_common")
    case = tmp_path / "test_fake_gpu.py"
    case.write_text(
        "import pytest\n\n\n@pytest.mark.gpu\ndef test_ok():\n    pass\n\n\n@pytest.mark.gpu\n"
        "def test_bad():\n    assert 1 == 2, 'kaboom 42'\n\n\ndef test_not_gpu():\n    pass\n"
    )
    res = common.SectionResult(tmp_path / "r.json")
    sections.section_tests({"pytest_targets": [str(case)]}, res, common.Deadline(60))
    assert res.status == "FAIL: pytest exited 1"
    assert res.data["counts"] == {"failed": 1, "passed": 1} and res.key == "1 failed, 1 passed"
    text = "\n".join(res.lines)
    assert "test_fake_gpu.py::test_bad | FAILED" in text and "kaboom 42" in text
    assert "test_not_gpu" not in text  # not marked gpu: deselected
    assert common.read_result(tmp_path / "r.json")["key"] == "1 failed, 1 passed"
