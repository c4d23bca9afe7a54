"""benchmarks/run_all.sh --quick: every result file the repository publishes is re-created and stamped.

The quick run writes smoke-sized versions of every CPU-producible file of ``benchmarks/results/`` into a
temporary directory. The expected names come from the committed ``benchmarks/results/`` itself (not
from the script's own list), so a result file that no step produces fails here. Each file must carry
a complete stamp (``benchmarks/stamp.py check``) naming the commit that ran.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
sys.path.insert(0, str(REPO / "benchmarks"))

import stamp  # noqa: E402  (benchmarks/stamp.py)

QUICK_NAMES = {"simulate": "simulate_quick"}
"""Stems that ``--quick`` writes under another name (simulate_table.py --quick appends _quick)."""


def _expected() -> list[str]:
    """Every committed result file outside gpu/, with its quick-run name."""
    names = []
    for path in sorted(RESULTS.iterdir()):
        if path.is_file():
            stem, _, ext = path.name.partition(".")
            names.append(f"{QUICK_NAMES.get(stem, stem)}.{ext}")
    return names


def _is_cost_model(path: Path) -> bool:
    """A profile's cost-model JSON (strict schema: its stamp lives in the .md / .report.json beside it)."""
    return (
        path.suffix == ".json" and path.name.startswith("profile_") and not path.name.endswith(".report.json")
    )


@pytest.mark.slow
def test_run_all_quick_recreates_and_stamps_every_result(tmp_path):
    out = tmp_path / "results"
    env = dict(os.environ, PYTHON=sys.executable)
    proc = subprocess.run(
        ["bash", str(REPO / "benchmarks" / "run_all.sh"), "--quick", "--out", str(out)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert proc.returncode == 0, f"run_all.sh --quick failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    assert "[run_all] summary" in proc.stdout
    assert "regenerated only on a GPU: bash benchmarks/gpu_check.sh" in proc.stdout
    head = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
    ).stdout.strip()
    expected = _expected()
    assert expected, "benchmarks/results/ holds no result files"
    missing = [name for name in expected if not (out / name).is_file()]
    assert not missing, f"run_all.sh --quick did not write {missing}"
    for name in expected:
        path = out / name
        if _is_cost_model(path):
            json.loads(path.read_text())  # the cost model is there and parses
            continue
        assert stamp.check(path) is None, f"{name}: {stamp.check(path)}"
        if path.suffix == ".json":
            assert json.loads(path.read_text())["stamp"]["commit"] == head, name
        if path.suffix == ".md":
            assert f"commit `{head}`" in path.read_text(), name


def test_stamp_check_rejects_unstamped_files(tmp_path):
    """The stamp check is not vacuous: plain files fail it, stamped ones pass."""
    md, js = tmp_path / "a.md", tmp_path / "a.json"
    md.write_text("# title\n\nbody\n")
    js.write_text('{"x": 1}\n')
    assert stamp.check(md) is not None and stamp.check(js) is not None
    assert stamp.check(tmp_path / "absent.md") == "missing"
    st = stamp.finish(stamp.start(["python", "x.py"]), cost_models={"m": "src"}, baselines={"b": "ran"})
    stamp.stamp_files(st, md=[str(md)], js=[str(js)])
    assert stamp.check(md) is None and stamp.check(js) is None
    text = md.read_text()
    assert text.startswith("# title\n") and "Cost models: `m` (src)" in text and "**b**: ran" in text
    stamp.stamp_files(st, md=[str(md)])  # re-stamping replaces the block, never duplicates it
    assert md.read_text().count(stamp.MARK) == 1
    assert json.loads(js.read_text())["x"] == 1
