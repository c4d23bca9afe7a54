"""Launchers, end to end on CPU/gloo (subprocesses with hard timeouts):

- torchrun elastic restart: 2 ranks, rank 1 kills itself at step 4 (index 3) on the first
  attempt (FLEXSP_FAULTS=kill:rank=1:step=3, flexsp.testing); torchrun (--max-restarts 1) restarts both
  ranks, which resume from the step-2 checkpoint.
  metrics.jsonl then holds every step exactly once, and the documents of every step are exactly
  those the sampler deals out in an uninterrupted run: no sample lost, none seen twice.
- Ray: launch/ray_job.py trains 2 steps on 2 CPU workers (TorchTrainer, Ray bound to 127.0.0.1).
"""

import json
import os
import subprocess
import sys

import pytest
from train_cases import REPO, compose, launch_env

pytestmark = pytest.mark.slow

DATA = [
    "data=synthetic",
    "data.num_docs=40",
    "data.corpus.max_doc_tokens=64",
    "train.global_batch=6",
    "train.progress=false",
]


def _env():
    return launch_env()


def _run(cmd, timeout, faults=None):
    """Run ``cmd`` in its own session; on timeout kill the whole process group (no stray ranks).
    ``faults``: FLEXSP_FAULTS for the run (flexsp.testing)."""
    import signal

    env = _env() if faults is None else {**_env(), "FLEXSP_FAULTS": faults}
    proc = subprocess.Popen(
        cmd,
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"{cmd[:3]} timed out after {timeout}s:\n{out[-3000:]}")
    return proc.returncode, out


def _torchrun():
    exe = REPO / ".venv" / "bin" / "torchrun"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "torch.distributed.run"]


def test_torchrun_elastic_restart_loses_and_repeats_no_sample(tmp_path):
    from flexsp.data import GlobalBatchSampler, build_source

    out = tmp_path / "run"
    overrides = [*DATA, "train.steps=5", "train.checkpoint_every=2", f"output_dir={out}"]
    rc, log = _run(
        [
            *_torchrun(),
            "--standalone",
            "--nproc_per_node",
            "2",
            "--max-restarts",
            "1",
            "-m",
            "flexsp.train",
            *overrides,
        ],
        timeout=180,
        faults="kill:rank=1:step=3",
    )
    assert rc == 0, log[-4000:]
    assert "simulated failure at step 3" in log and "resumed from" in log and "at step 2" in log, log[-3000:]
    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    c = compose(overrides)
    source = build_source(c.data)
    sampler = GlobalBatchSampler(source.lengths, c.data.sampler)
    expected = [list(next(sampler).doc_ids) for _ in range(5)]
    assert [r["doc_ids"] for r in rows] == expected
    seen = [d for r in rows if r["epoch"] == 0 for d in r["doc_ids"]]
    assert len(seen) == len(set(seen))


def test_ray_job_trains_two_steps_on_two_workers(tmp_path):
    out = tmp_path / "ray"
    rc, log = _run(
        [
            sys.executable,
            str(REPO / "launch" / "ray_job.py"),
            "--num-workers",
            "2",
            "--",
            *DATA,
            "train.steps=2",
            f"output_dir={out}",
        ],
        timeout=180,
    )
    assert rc == 0, log[-4000:]
    assert "local Ray node address: 127.0.0.1" in log, log[-3000:]
    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert all(r["plan"].startswith("1 mb") or " mb: " in r["plan"] for r in rows)


def test_ray_job_bad_config_is_one_line_before_ray_starts(tmp_path):
    rc, log = _run(
        [
            sys.executable,
            str(REPO / "launch" / "ray_job.py"),
            "--num-workers",
            "2",
            "--",
            *DATA,
            "train.steps=abc",
            f"output_dir={tmp_path / 'ray'}",
        ],
        timeout=120,
    )
    assert rc == 2, log[-3000:]
    assert log.strip().splitlines() == ["ray_job: error: train.steps='abc' must be an integer"], log[-3000:]
