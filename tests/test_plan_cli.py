"""The `flexsp-plan` command: outputs, formats, and one-line errors for bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from solver.cli import main
from solver.plan import Plan

LENGTHS = [4096, 800, 120000, 2500, 33000, 700, 9000, 15000]


def run_cli(*args, stdin=None):
    return subprocess.run(
        [sys.executable, "-m", "solver.cli", *args], input=stdin, capture_output=True, text=True
    )


def test_text_file_to_json_and_plot(tmp_path, capsys):
    f = tmp_path / "lengths.txt"
    f.write_text("\n".join(map(str, LENGTHS)) + "\n")
    rc = main(
        [
            "--lengths",
            str(f),
            "--preset",
            "paper-gpt7b-192k",
            "--json",
            str(tmp_path / "p.json"),
            "--plot",
            str(tmp_path / "p.png"),
        ]
    )
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
    proc = run_cli(
        "--lengths",
        "-",
        "--no-baselines",
        "--json",
        str(tmp_path / "s.json"),
        stdin="\n".join(map(str, LENGTHS)),
    )
    assert proc.returncode == 0, proc.stderr
    plans.append(json.loads((tmp_path / "s.json").read_text())["micro_batches"])
    assert plans[0] == plans[1] == plans[2]


@pytest.mark.parametrize(
    "content,args,message",
    [
        ("", [], "empty"),
        ("12\nabc\n", [], "expected one integer per line"),
        ("[1, 2", [], "malformed JSON"),
        ("100\n999999999\n", [], "longer than the largest usable SP group"),
        ("100\n", ["--preset", "nope"], "unknown preset"),
        ("100\n", ["--num-devices", "48"], "power of two"),
        ("100\n", ["--memory-mb", "100"], "leave no room"),
    ],
)
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


def _one_line_error(proc, *needles):
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert proc.stderr.startswith("flexsp-plan: error: ")
    for needle in needles:
        assert needle in proc.stderr, proc.stderr
    assert proc.stdout == ""


@pytest.mark.parametrize(
    "args,needles",
    [
        (["--num-devices", "0"], ["--num-devices", "power of two", "got 0"]),
        (["--memory-mb", "0"], ["--memory-mb", "finite number > 0", "'0'"]),
        (["--memory-mb", "inf"], ["--memory-mb", "'inf'"]),
        (["--time-limit", "nan"], ["--time-limit", "'nan'"]),
        (["--time-limit", "-1"], ["--time-limit", "'-1'"]),
        (["--plot", "x.txt"], ["--plot x.txt", ".png, .svg, .pdf"]),
        (["--plot", "/nonexistent-dir/p.png"], ["--plot", "folder /nonexistent-dir does not exist"]),
        (["--json", "/nonexistent-dir/p.json"], ["--json", "does not exist"]),
        (["--milp-backend", "cplex"], ["--milp-backend", "invalid choice"]),
        (["--milp-backend", "pulp", "--pulp-solver", "NOPE_CMD"], ["NOPE_CMD", "available", "PULP_CBC_CMD"]),
        (["--pulp-solver", "PULP_CBC_CMD"], ["needs milp_backend='pulp'"]),
    ],
)
def test_bad_options_are_one_line_before_solving(tmp_path, args, needles):
    f = tmp_path / "l.txt"
    f.write_text("100\n200\n")
    _one_line_error(run_cli("--lengths", str(f), *args), *needles)


def test_bad_files_are_named(tmp_path):
    (tmp_path / "l.txt").write_text("100\n200\n")
    _one_line_error(run_cli("--lengths", str(tmp_path)), "--lengths", "is a directory")
    _one_line_error(
        run_cli("--lengths", str(tmp_path / "l.txt"), "--cost-model", str(tmp_path)),
        str(tmp_path),
        "is a directory",
    )
    np.save(tmp_path / "two.npy", np.ones((2, 3), dtype=np.int64))
    _one_line_error(run_cli("--lengths", str(tmp_path / "two.npy")), "two.npy", "1-D", "(2, 3)")
    (tmp_path / "bin.json").write_bytes(b"\xff\xfe\x00\x01")
    _one_line_error(
        run_cli("--lengths", str(tmp_path / "l.txt"), "--cost-model", str(tmp_path / "bin.json")),
        "bin.json",
        "not UTF-8",
    )
    from solver.presets import load_preset

    data = load_preset("paper-gpt7b-192k").to_dict()
    data["a2"] = "fast"
    (tmp_path / "typed.json").write_text(json.dumps(data))
    _one_line_error(
        run_cli("--lengths", str(tmp_path / "l.txt"), "--cost-model", str(tmp_path / "typed.json")),
        "typed.json",
        "field a2 must be a finite number, got 'fast'",
    )
    del data["a2"]
    (tmp_path / "part.json").write_text(json.dumps(data))
    _one_line_error(
        run_cli("--lengths", str(tmp_path / "l.txt"), "--cost-model", str(tmp_path / "part.json")),
        "part.json",
        "missing required fields ['a2']",
    )


def test_big_plan_output_is_compact_and_full_prints_all(tmp_path, capsys):
    from solver.workloads import sample_lengths

    lengths = sample_lengths("cpython", 3000, 0, 191872)
    f = tmp_path / "l.txt"
    f.write_text("\n".join(map(str, lengths)) + "\n")
    assert main(["--lengths", str(f), "--no-baselines", "--progress", "--time-limit", "2"]) == 0
    out, err = capsys.readouterr()
    summary = next(line for line in out.splitlines() if line.startswith("plan: "))
    assert len(summary) <= 210
    assert "more groups in" in out and "--full" in out
    assert err.startswith("flexsp-plan: planning 3000 sequences")  # progress on stderr, stdout clean
    assert (
        main(
            [
                "--lengths",
                str(f),
                "--no-baselines",
                "--full",
                "--time-limit",
                "2",
                "--json",
                str(tmp_path / "p.json"),
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    plan = json.loads((tmp_path / "p.json").read_text())
    rows = [line for line in out.splitlines() if line[:3].strip().isdigit()]
    assert len(rows) == sum(len(mb["groups"]) for mb in plan["micro_batches"])


def test_plot_svg_and_title_fits(tmp_path):
    f = tmp_path / "l.txt"
    f.write_text("\n".join(map(str, LENGTHS)) + "\n")
    assert (
        main(
            [
                "--lengths",
                str(f),
                "--no-baselines",
                "--plot",
                str(tmp_path / "p.svg"),
                "--num-devices",
                "1024",
            ]
        )
        == 0
    )
    assert (tmp_path / "p.svg").read_text().lstrip().startswith("<?xml")
    from solver.plan import GroupPlan, MicroBatchPlan, Plan
    from solver.plot import plot_title

    mbs = tuple(
        MicroBatchPlan(groups=(GroupPlan(sp=1, ranks=(r,), seq_ids=(i * 1024 + r,)),) * 1, predicted_ms=1.0)
        for i in range(300)
        for r in (0,)
    )
    plan = Plan(num_devices=1024, micro_batches=mbs, predicted_ms=300.0, num_sequences=300)
    title = plot_title(plan)
    assert all(len(line) <= 110 for line in title.splitlines()) and len(title.splitlines()) <= 4
    assert "300 mb: 300x(1x1)" in title


def test_baselines_respect_their_time_box(tmp_path, capsys):
    from solver.cli import run_baselines
    from solver.presets import load_preset
    from solver.workloads import sample_lengths

    cm = load_preset("paper-gpt7b-192k")
    lengths = sample_lengths("cpython", 20000, 0, 191872).tolist()
    import time

    t0 = time.perf_counter()
    out = run_baselines(lengths, cm, budget_s=0.3)
    assert time.perf_counter() - t0 < 0.3 + 3.0  # one static BFD pass plus one deadline check interval
    err = capsys.readouterr().err
    assert "static SP=64" in out
    assert "skipped" in err and "time box" in err


def test_flexsp_plan_as_a_whole_finishes_near_its_time_limit(tmp_path):
    """50,000 sequences on 1,024 devices with the baselines: planner box 1 s, baselines box 0.5 s;
    generous bound for start-up, reading, O(n) pricing and printing on a shared machine."""
    import time

    from solver.workloads import sample_lengths

    f = tmp_path / "l.txt"
    f.write_text("\n".join(map(str, sample_lengths("cpython", 50_000, 0, 191872))) + "\n")
    t0 = time.perf_counter()
    proc = run_cli("--lengths", str(f), "--num-devices", "1024", "--time-limit", "1")
    wall = time.perf_counter() - t0
    assert proc.returncode == 0, proc.stderr
    assert wall < 1.0 + 0.5 + 12.0
    summary = next(line for line in proc.stdout.splitlines() if line.startswith("plan: "))
    assert len(summary) <= 210
    assert len(proc.stdout) < 20_000  # the table is truncated, not 50,000 rows
    assert "flexsp-plan: planning 50000 sequences" in proc.stderr  # a long run shows progress


def test_text_says_cost_model_devices_memory_and_idle_devices(tmp_path, capsys):
    """Issue 18: which preset / file, device count and memory were used, and how many devices the
    plan leaves idle, in the full table and in --quiet."""
    f = tmp_path / "l.txt"
    f.write_text("\n".join(map(str, LENGTHS)) + "\n")
    assert (
        main(
            [
                "--lengths",
                str(f),
                "--no-baselines",
                "--num-devices",
                "1024",
                "--json",
                str(tmp_path / "p.json"),
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    # C = floor((30720 - 7.1174 * 16 * 1024 / 1024) / 4.4804) = 6831 tokens (states sharded over 1,024)
    assert out.splitlines()[0] == (
        "cost model paper-gpt7b-192k (preset) | 1024 devices, 8 per node | "
        "memory 30720 MB per device, C = 6831 tokens per device"
    )
    plan = Plan.from_json((tmp_path / "p.json").read_text())
    idle = [
        1024 - sum(g["sp"] for g in mb["groups"])
        for mb in json.loads((tmp_path / "p.json").read_text())["micro_batches"]
    ]
    assert plan.idle_devices() == idle and max(idle) > 0  # 8 sequences cannot fill 1,024 devices
    assert (
        f"idle devices: {min(idle)}-{max(idle)} of 1024 per micro-batch" in out
        or f"idle devices: {max(idle)} of 1024 per micro-batch" in out
    )
    assert f"of 1024 devices in groups ({idle[0]} idle)" in out
    from solver.presets import load_preset

    model_file = tmp_path / "cm.json"
    load_preset("paper-gpt7b-192k").save(model_file)
    assert main(["--lengths", str(f), "--no-baselines", "--quiet", "--cost-model", str(model_file)]) == 0
    quiet = capsys.readouterr().out.splitlines()
    assert quiet[0].startswith(f"cost model paper-gpt7b-192k (file {model_file}) | 64 devices")
    assert quiet[1].startswith("plan: ") and quiet[3].startswith("idle devices: ") and len(quiet) == 4


def test_idle_device_fraction_by_hand():
    from solver.plan import GroupPlan, MicroBatchPlan

    mbs = (
        MicroBatchPlan(groups=(GroupPlan(sp=4, ranks=(0, 1, 2, 3), seq_ids=(0,)),), predicted_ms=10.0),
        MicroBatchPlan(groups=(GroupPlan(sp=8, ranks=tuple(range(8)), seq_ids=(1,)),), predicted_ms=30.0),
    )
    plan = Plan(num_devices=8, micro_batches=mbs, predicted_ms=40.0)
    assert plan.idle_devices() == [4, 0]
    assert plan.idle_device_fraction == pytest.approx(4 * 10 / (8 * 40))


def test_plot_labels_micro_batches():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from solver.plot import MAX_MB_LABELS, label_micro_batches

    for count, expect in ((3, ["mb 0", "mb 1", "mb 2"]), (100, None)):
        fig, ax = plt.subplots()
        starts = [float(i) for i in range(count + 1)]
        ax.set_xlim(0, count)
        label_micro_batches(ax, starts)
        top = [c for c in ax.child_axes if c is not ax][0]
        labels = [t.get_text() for t in top.get_xticklabels()]
        if expect:
            assert labels == expect and [t for t in top.get_xticks()] == [0.5, 1.5, 2.5]
        else:
            assert len(labels) <= MAX_MB_LABELS and labels[:2] == ["mb 0", "mb 3"]
        plt.close(fig)


def test_workloads_prints_a_one_line_summary(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "solver.workloads", "cpython", "10", "-o", str(tmp_path / "l.txt")],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0 and proc.stderr == ""
    assert proc.stdout.startswith("wrote 10 lengths of cpython (seed 0): min ")
    assert proc.stdout.count("\n") == 1
    assert len((tmp_path / "l.txt").read_text().split()) == 10
    proc = subprocess.run(
        [sys.executable, "-m", "solver.workloads", "wikipedia", "5"], capture_output=True, text=True
    )
    assert len(proc.stdout.split()) == 5  # stdout stays lengths only
    assert proc.stderr.startswith("drew 5 lengths of wikipedia (seed 0)") and proc.stderr.count("\n") == 1
