"""``ray job submit`` of launch/ray_job.py to a Ray head of the test's own, as a cluster user runs it
(ray[default]: the dashboard holds the job server):

- 2 workers x 2 steps: the job SUCCEEDED and its per-step losses (metrics.jsonl) equal those of the
  same run under torchrun.
- a bad config, found on the driver or by the workers: the job is FAILED and ``ray job logs`` holds
  the one-line error once, no traceback.

The head is bound to 127.0.0.1 (single-machine mode) on free ports, with its own short --temp-dir
(Unix socket paths are limited to 107 characters), so parallel sessions on one machine neither share
nor stop each other's Ray. Teardown ends only the processes of the head's own session (``ray start
--block`` started with start_new_session; Ray's daemons and workers stay in that session) and any
left naming its temp dir; never ``ray stop``, which stops every Ray on the machine. Linux (/proc).
"""

import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
from train_cases import REPO, launch_env

pytest.importorskip("ray.dashboard.optional_deps", reason="ray[default] (Ray's job server) is not installed")

pytestmark = pytest.mark.slow

_RAY_SCRIPT = Path(sys.executable).with_name("ray")
RAY = [str(_RAY_SCRIPT)] if _RAY_SCRIPT.exists() else [sys.executable, "-m", "ray.scripts.scripts"]

DATA = [
    "data=synthetic",
    "data.num_docs=40",
    "data.corpus.max_doc_tokens=64",
    "train.global_batch=6",
    "train.progress=false",
    "solver.wait_s=60",  # never the fallback plan of a late solve: both launchers train the same plans
]

# Uploaded with --working-dir: the code and configs, not the venv, history or results (Ray's limit
# is 512 MiB; what is left is a few MB).
EXCLUDES = [".venv", ".git", "benchmarks/results", "outputs", "runs", "**/__pycache__", ".pytest_cache"]

_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _free_ports(n: int) -> list[int]:
    """``n`` distinct ports the kernel hands out as free (held together, so no duplicates)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("", port))
        except OSError:
            return False
    return True


def _free_range(count: int) -> tuple[int, int]:
    """A run of ``count`` free ports below Linux's ephemeral range (32768+), where the ports handed
    out by _free_ports and by other programs' port 0 binds never fall."""
    rng = random.Random()
    for _ in range(200):
        lo = rng.randrange(20000, 32768 - count)
        if all(_bindable(p) for p in range(lo, lo + count)):
            return lo, lo + count - 1
    raise RuntimeError(f"no {count} consecutive free ports in 20000-32767")


def _proc_pids(match) -> list[int]:
    """Live (not zombie) processes for which ``match(stat_fields, cmdline)`` holds."""
    pids = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        try:
            fields = (d / "stat").read_text().rsplit(")", 1)[1].split()  # state, ppid, pgrp, session, ...
            cmdline = (d / "cmdline").read_bytes()
        except (OSError, IndexError):
            continue
        if fields[0] != "Z" and match(fields, cmdline):
            pids.append(int(d.name))
    return pids


def _kill(pids, sig) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


class Head:
    """A Ray head (``ray start --head --block``) of this test: its job server URL and environment."""

    def __init__(self):
        self.tmp = Path(tempfile.mkdtemp(prefix="rj_", dir="/tmp" if Path("/tmp").is_dir() else None))
        gcs, dash, client, agent, agent_grpc, env_agent, metrics, node_mgr, obj_mgr = _free_ports(9)
        lo, hi = _free_range(64)
        self.url = f"http://127.0.0.1:{dash}"
        env = launch_env()
        env.pop("PYTHONPATH", None)  # as on a cluster: the job imports the uploaded working dir
        env.update(
            RAY_AUTH_MODE="disabled",
            RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",  # single-machine mode: 127.0.0.1 stays loopback
            RAY_USAGE_STATS_ENABLED="0",
        )
        self.env = env
        # sessions/<id>/sockets/raylet under tmp must stay within the 107-character socket path limit
        assert len(str(self.tmp)) < 40, self.tmp
        self.log = open(self.tmp / "head.log", "w")  # noqa: SIM115 (closed in stop())
        self.proc = subprocess.Popen(
            [
                *RAY,
                "start",
                "--head",
                "--block",
                "--node-ip-address=127.0.0.1",
                f"--port={gcs}",
                "--dashboard-host=127.0.0.1",
                f"--dashboard-port={dash}",
                f"--ray-client-server-port={client}",
                f"--dashboard-agent-listen-port={agent}",
                f"--dashboard-agent-grpc-port={agent_grpc}",
                f"--runtime-env-agent-port={env_agent}",
                f"--metrics-export-port={metrics}",
                f"--node-manager-port={node_mgr}",
                f"--object-manager-port={obj_mgr}",
                f"--min-worker-port={lo}",
                f"--max-worker-port={hi}",
                f"--temp-dir={self.tmp}",
                "--num-cpus=2",  # the 2 training workers (1 CPU each); the job's driver takes none
                "--object-store-memory=100000000",
                "--disable-usage-stats",
            ],
            cwd=self.tmp,
            env=env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def wait_ready(self, timeout: float = 180) -> None:
        """Until the job server answers (GET /api/jobs/), or fail with the head's log."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"ray start --head exited with {self.proc.returncode}:\n{self.head_log()}")
            try:
                with urllib.request.urlopen(f"{self.url}/api/jobs/", timeout=5) as r:
                    if r.status == 200:
                        json.loads(r.read())
                        return
            except (OSError, ValueError):
                pass
            time.sleep(1)
        pytest.fail(f"Ray job server at {self.url} not up after {timeout}s:\n{self.head_log()}")

    def head_log(self) -> str:
        return (self.tmp / "head.log").read_text()[-3000:]

    def ray(self, *args, timeout: float) -> tuple[int, str]:
        """``ray <args>`` against this head; (exit status, stdout+stderr without colors)."""
        try:
            p = subprocess.run(
                [*RAY, *args],
                cwd=REPO,
                env=self.env,
                capture_output=True,
                text=True,
                timeout=timeout,
            )
        except subprocess.TimeoutExpired as exc:
            out = (
                (exc.stdout or b"").decode(errors="replace") if isinstance(exc.stdout, bytes) else exc.stdout
            )
            pytest.fail(f"ray {' '.join(args[:2])} timed out after {timeout}s:\n{(out or '')[-3000:]}")
        return p.returncode, _ANSI.sub("", p.stdout + p.stderr)

    def stop(self) -> None:
        """What ``ray stop`` does, for this head only: SIGTERM every process of its session (and any
        naming its temp dir), SIGKILL what is left after a grace period (5 s: nothing of the head is
        kept; ``ray start --block``, the raylet and the autoscaler monitor outlive even 20 s of
        SIGTERM); fails if a process survives."""
        sid = self.proc.pid  # start_new_session: the session id is the pid of ray start
        tag = str(self.tmp).encode()

        def ours():
            return _proc_pids(lambda f, cmd: int(f[3]) == sid or tag in cmd)

        _kill(ours(), signal.SIGTERM)
        deadline = time.monotonic() + 5
        while ours() and time.monotonic() < deadline:
            time.sleep(0.5)
        for _ in range(3):
            _kill(ours(), signal.SIGKILL)
            time.sleep(1)
        try:
            self.proc.wait(timeout=10)
        finally:
            self.log.close()
        left = ours()
        if not left:
            shutil.rmtree(self.tmp, ignore_errors=True)
        assert not left, f"processes of the Ray head in {self.tmp} survived SIGKILL: {left}"


@pytest.fixture(scope="module")
def head():
    h = Head()
    try:
        h.wait_ready()
        yield h
    finally:
        h.stop()


def _submit(head: Head, job_id: str, overrides: list[str], timeout: float = 420) -> tuple[int, dict, str]:
    """``ray job submit`` launch/ray_job.py (2 workers) as job ``job_id``, waiting for its end. Returns
    the CLI's exit status, the job server's record of the job (GET /api/jobs/<id>: status, message)
    and ``ray job logs``. The entrypoint names this interpreter: a job's ``python`` is the first on the
    PATH of the head, not necessarily the venv's."""
    rc, _ = head.ray(
        "job",
        "submit",
        f"--address={head.url}",
        f"--submission-id={job_id}",
        f"--working-dir={REPO}",
        f"--runtime-env-json={json.dumps({'excludes': EXCLUDES})}",
        "--",
        sys.executable,
        "launch/ray_job.py",
        "--num-workers",
        "2",
        "--",
        *overrides,
        timeout=timeout,
    )
    with urllib.request.urlopen(f"{head.url}/api/jobs/{job_id}", timeout=30) as r:
        info = json.loads(r.read())
    _, logs = head.ray("job", "logs", f"--address={head.url}", job_id, timeout=120)
    return rc, info, logs


def _losses(out: Path) -> list[dict]:
    return [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines() if ln.strip()]


def test_ray_job_submit_trains_as_torchrun(head, tmp_path):
    ref_out, job_out = tmp_path / "torchrun", tmp_path / "job"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    ref = subprocess.run(
        [*cmd, "-m", "flexsp.train", *DATA, "train.steps=2", f"output_dir={ref_out}"],
        cwd=REPO,
        env=launch_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert ref.returncode == 0, (ref.stdout + ref.stderr)[-4000:]

    rc, info, logs = _submit(head, "flexsp-test-ok", [*DATA, "train.steps=2", f"output_dir={job_out}"])
    assert rc == 0 and info["status"] == "SUCCEEDED", (info, logs[-4000:])
    assert "[ray_job] 2 steps logged" in logs, logs[-4000:]
    assert "Traceback" not in logs, logs[-4000:]

    got, want = _losses(job_out), _losses(ref_out)
    assert [r["step"] for r in got] == [1, 2]
    # same documents, same plans: the two launchers trained the same steps ...
    assert [(r["doc_ids"], r["plan"]) for r in got] == [(r["doc_ids"], r["plan"]) for r in want]
    # ... so the same float operations in the same order (same seed, 2 gloo ranks, one thread each):
    # the losses are bitwise equal (metrics.jsonl rounds them to 6 decimals). Any tolerance would
    # hide a launcher that trains something else (another config, world size or data order).
    assert [r["loss"] for r in got] == [r["loss"] for r in want]


@pytest.mark.parametrize(
    "case",
    ["driver", "workers"],
    ids=["bad-value-found-on-driver", "missing-corpus-found-by-workers"],
)
def test_ray_job_submit_bad_config_fails_with_one_line(head, tmp_path, case):
    if case == "driver":
        overrides = [*DATA, "train.steps=abc", f"output_dir={tmp_path / 'job'}"]
        line = "ray_job: error: train.steps='abc' must be an integer"
    else:
        missing = tmp_path / "missing"
        overrides = [
            "data=corpus",
            f"data.corpus.paths=[{missing}]",
            "train.progress=false",
            "train.steps=2",
            f"output_dir={tmp_path / 'job'}",
        ]
        line = f"flexsp-train: error: corpus path {missing} does not exist"
    job_id = f"flexsp-test-bad-{case}"
    rc, info, logs = _submit(head, job_id, overrides)
    # the entrypoint's exit status 2 (a user error) makes the job FAILED
    assert rc != 0 and info["status"] == "FAILED", (info, logs[-4000:])
    assert "exit code 2" in info["message"], info
    errors = [ln for ln in logs.splitlines() if ": error: " in ln]
    # printed once (by one worker: the other stays quiet), with Ray's "(RayTrainWorker pid=...)"
    # prefix when a worker printed it
    assert len(errors) == 1 and line in errors[0], logs[-4000:]
    assert "Traceback" not in logs, logs[-4000:]
