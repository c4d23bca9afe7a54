"""Tests of benchmarks/gpu_check.py that run on CPU: the --smoke mode end to end, and the
helpers whose mistakes would silently skew the GPU numbers (FLOP count, batch generator, the
error isolation between sections)."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPT = REPO_ROOT / "benchmarks" / "gpu_check.py"


@pytest.fixture(scope="module")
def gc():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_smoke_run_writes_complete_report(tmp_path):
    out = tmp_path / "res"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), str(out), "--smoke", "--budget-s", "50"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = (out / "report.md").read_text()
    assert report.startswith("# FlexSP GPU check (smoke")
    assert "- date: " in report and "- device: CPU" in report
    data = json.loads((out / "results.json").read_text())
    sections = data["sections"]
    assert sections["tests"]["status"].startswith("skipped")  # no pytest recursion in smoke mode
    for name in ("env", "peak", "fused_ops", "attention", "profile"):
        assert f"## {name}" in report
        assert sections[name]["status"] == "ok", (name, sections[name])
    assert sections["peak"]["data"]["peak_tflops"] > 0
    attn = sections["attention"]["data"]
    assert any("SDPA per-doc loop" in row for row in attn.values())


def test_failing_section_is_recorded_and_run_continues(gc, tmp_path):
    args = types.SimpleNamespace(skip=[], smoke=True, budget_s=30)
    rep = gc.Report(tmp_path, args)
    deadline = gc.Deadline(30)

    def boom(entry, d):
        raise RuntimeError("kaboom 42")

    def fine(entry, d):
        entry["lines"].append("all good")

    rep.run("first", boom, 10, deadline)
    rep.run("second", fine, 10, deadline)
    assert rep.sections["first"]["status"] == "error: RuntimeError: kaboom 42"
    assert rep.sections["second"]["status"] == "ok"
    text = (tmp_path / "report.md").read_text()
    assert "kaboom 42" in text and "all good" in text


def test_spent_budget_skips_section(gc, tmp_path):
    args = types.SimpleNamespace(skip=[], smoke=True, budget_s=1)
    rep = gc.Report(tmp_path, args)
    rep.run("late", lambda e, d: None, 10, gc.Deadline(0.5))
    assert rep.sections["late"]["status"].startswith("skipped")


def test_long_tailed_lengths(gc):
    rng = np.random.default_rng(0)
    for total in (8 * 1024, 128 * 1024):
        lengths = gc.long_tailed_lengths(total, rng, 128)
        assert sum(lengths) == total and min(lengths) >= 128
        assert len(lengths) > 3 and max(lengths) > 8 * np.median(lengths)  # long-tailed


def test_causal_attention_flops(gc):
    # one 4-token doc, 1 head, dim 2: QK^T and PV each 2*L*L*D multiply-adds-as-2-flops, halved
    assert gc.causal_attn_flops([4], 1, 2) == 2 * 1 * 2 * 16
    assert gc.causal_attn_flops([4, 4], 3, 2) == 2 * gc.causal_attn_flops([4], 3, 2)
    assert math.isclose(gc.causal_attn_flops([32768], 32, 128), 2 * 32 * 128 * 32768**2)


def test_bad_budget_is_rejected(gc, tmp_path):
    with pytest.raises(SystemExit, match="--budget-s must be > 0, got 0.0"):
        gc.main([str(tmp_path), "--smoke", "--budget-s", "0"])
