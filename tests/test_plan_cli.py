"""The `flexsp-plan` command: outputs, formats, and one-line errors for bad input."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from solver.cli import main

LENGTHS = [4096, 800, 120000, 2500, 33000, 700, 9000, 15000]


def run_cli(*args, stdin=None):
    return subprocess.run([sys.executable, "-m", "solver.cli", *args], input=stdin, capture_output=True, text=True)


def test_text_file_to_json_and_plot(tmp_path, capsys):
    f = tmp_path / "lengths.txt"
    f.write_text("\n".join(map(str, LENGTHS)) + "\n")
    rc = main(["--lengths", str(f), "--preset", "paper-gpt7b-192k", "--json", str(tmp_path / "p.json"),
               "--plot", str(tmp_path / "p.png")])
    out = capsys.readouterr().out
    assert rc == 0
    assert "iteration time" in out and "lower bound" in out and "speedup" in out
    plan = json.loads((tmp_path / "p.json").read_text())
    assert plan["num_devices"] == 64
    ids = sorted(i for mb in plan["micro_batches"] for g in mb["groups"] for i in g["seq_ids"])
    assert ids == list(range(len(LENGTHS)))
    assert (tmp_path / "p.png").stat().st_size > 10_000
    assert "static SP=64" in plan["extra"]["baselines_ms"]


def test_npy_json_and_stdin_give_the_same_plan(tmp_path, capsys):
    np.save(tmp_path / "l.npy", np.array(LENGTHS))
    (tmp_path / "l.json").write_text(json.dumps(LENGTHS))
    plans = []
    for src in (str(tmp_path / "l.npy"), str(tmp_path / "l.json")):
        assert main(["--lengths", src, "--no-baselines", "--json", str(tmp_path / "o.json")]) == 0
        plans.append(json.loads((tmp_path / "o.json").read_text())["micro_batches"])
    proc = run_cli("--lengths", "-", "--no-baselines", "--json", str(tmp_path / "s.json"), stdin="\n".join(map(str, LENGTHS)))
    assert proc.returncode == 0, proc.stderr
    plans.append(json.loads((tmp_path / "s.json").read_text())["micro_batches"])
    assert plans[0] == plans[1] == plans[2]


@pytest.mark.parametrize("content,args,message", [
    ("", [], "empty"),
    ("12\nabc\n", [], "expected one integer per line"),
    ("[1, 2", [], "malformed JSON"),
    ("100\n999999999\n", [], "longer than the largest usable SP group"),
    ("100\n", ["--preset", "nope"], "unknown preset"),
    ("100\n", ["--num-devices", "48"], "power of two"),
    ("100\n", ["--memory-mb", "100"], "leave no room"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, content, args, message):
    f = tmp_path / "l.txt"
    f.write_text(content)
    proc = run_cli("--lengths", str(f), *args)
    assert proc.returncode == 2
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_missing_file_and_cost_model_file(tmp_path):
    proc = run_cli("--lengths", str(tmp_path / "missing.txt"))
    assert proc.returncode == 2 and "does not exist" in proc.stderr
    (tmp_path / "l.txt").write_text("100\n200\n")
    (tmp_path / "cm.json").write_text("{not json")
    proc = run_cli("--lengths", str(tmp_path / "l.txt"), "--cost-model", str(tmp_path / "cm.json"))
    assert proc.returncode == 2 and "not valid JSON" in proc.stderr
