"""Bring-your-own-model traps (issue 18), each through the command a user types (``python -m
flexsp.train``, what ``flexsp-train`` runs, as a subprocess with a hard timeout), asserting the exit
status and the one line:

- resuming over another model's checkpoint (``train.resume=auto`` in a reused output_dir): one
  line listing the differing fields (old -> new) and the two ways out, exit 2, nothing loaded;
  ``train.resume=never`` then trains; a checkpoint that records no model config (an older one) of
  another shape: one line naming the checkpoint and the first mismatching tensor, exit 2;
- a Qwen3 directory without tokenizer files (transformers builds a 1-token tokenizer from it):
  refused naming the directory and the files it lacks, exit 2; a tokenizer far smaller than the
  model's embedding (the byte tokenizer for a 1024-row model): refused, exit 2;
- ``model.hf_checkpoint`` naming a file, or nothing: "must be a directory", exit 2;
- a rank killed by SIGKILL (what the out-of-memory killer sends) in a 2-rank run through
  ``--nproc-per-node 2``: the one line says which rank, host, pid, signal, step, the OOM hint and
  the checkpoint to resume from; exit status 137; no traceback, no "Connection reset by peer";
  a rank exiting without reporting (the kill fault of flexsp.testing) likewise with its status; ranks
  started by
  hand (no flexsp launcher): the survivor prints one line instead of the gloo traceback.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from train_cases import REPO, launch_env

from flexsp.testing import FAULTS_ENV

SMALL = [
    "data=synthetic",
    "data.num_docs=64",
    "data.corpus.max_doc_tokens=60",
    "train.global_batch=4",
    "train.progress=false",
    "solver.time_limit=0.2",
]


def _train(args, timeout=300, faults=None):
    env = launch_env() if faults is None else {**launch_env(), FAULTS_ENV: faults}
    proc = subprocess.run(
        [sys.executable, "-m", "flexsp.train", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return proc.returncode, proc.stdout + proc.stderr


def _error_line(rc, out, status=2):
    """The one ``flexsp-train: error:`` line of a run that must exit with ``status``; no traceback,
    no torchrun summary, no gloo error anywhere else in the output."""
    errors = [ln for ln in out.splitlines() if "flexsp-train: error:" in ln]
    assert rc == status, (rc, out[-3000:])
    assert len(errors) == 1, out[-3000:]
    rest = out.replace(errors[0], "")
    for bad in ("Traceback", "ChildFailedError", "Connection reset by peer", "pair.cc"):
        assert bad not in rest, out[-3000:]
    return errors[0]


def _steps(out_dir: Path) -> list[int]:
    return [json.loads(ln)["step"] for ln in (out_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_resume_over_another_models_checkpoint_is_one_line(tmp_path):
    import torch

    out = tmp_path / "run"
    rc, log = _train([*SMALL, "train.steps=2", f"output_dir={out}"])
    assert rc == 0, log[-3000:]
    ckpt = out / "checkpoints" / "step_000002"
    old_style = tmp_path / "old"  # a copy whose trainer.pt predates the recorded fields
    shutil.copytree(out, old_style)

    # equal shapes, another model: refused before anything is loaded (the run's log is untouched)
    rc, log = _train(
        [*SMALL, "train.steps=4", "model.rope_theta=1e6", "model.norm_eps=1e-6", f"output_dir={out}"]
    )
    line = _error_line(rc, log)
    assert f"output_dir holds checkpoint {ckpt} (train.resume=auto) of another model" in line, line
    assert "model.rope_theta 10000.0 -> 1000000.0; model.norm_eps 1e-05 -> 1e-06" in line, line
    assert "train with another output_dir, or set train.resume=never" in line, line
    assert "resumed from" not in log and _steps(out) == [1, 2]
    # another precision is another setup, also refused
    rc, log = _train([*SMALL, "train.steps=4", "train.precision=bf16", f"output_dir={out}"])
    assert "train.precision fp32 -> bf16" in _error_line(rc, log)
    # the second way out works
    rc, log = _train(
        [*SMALL, "train.steps=2", "model.rope_theta=1e6", "train.resume=never", f"output_dir={out}"]
    )
    assert rc == 0 and "resumed from" not in log, log[-3000:]

    # an older checkpoint (no model_config/engine/precision recorded) of another shape: the DCP
    # load's failure is one line naming the checkpoint and the first mismatching tensor
    old_ckpt = old_style / "checkpoints" / "step_000002"
    state = torch.load(old_ckpt / "trainer.pt", weights_only=False)
    for key in ("model_config", "engine", "precision"):
        state.pop(key)
    torch.save(state, old_ckpt / "trainer.pt")
    rc, log = _train([*SMALL, "train.steps=4", "model.intermediate=96", f"output_dir={old_style}"])
    line = _error_line(rc, log)
    assert (
        f"cannot load checkpoint {old_ckpt}: tensor model.blocks.0.mlp.w_gate.weight has shape "
        f"(192, 64) in the checkpoint and (96, 64) in this run"
    ) in line, line
    assert "records no engine, precision, model_config" in log  # the warning that nothing could be compared


def _qwen3_without_tokenizer(d: Path, vocab: int, hidden: int = 64) -> Path:
    """A tiny random Qwen3 saved like a hub download whose tokenizer files were not copied."""
    import torch

    transformers = pytest.importorskip("transformers")
    cfg = transformers.Qwen3Config(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=512,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    transformers.Qwen3ForCausalLM(cfg).float().save_pretrained(d)
    return d


def test_hf_directory_without_a_usable_tokenizer_is_refused(tmp_path):
    model_dir = _qwen3_without_tokenizer(tmp_path / "qwen3", vocab=1024)
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.jsonl").write_text(
        "".join(json.dumps({"text": f"def f(x):\n    return x * {i}\n"}) + "\n" for i in range(20))
    )
    data = [
        "data=corpus",
        f"data.corpus.paths=[{docs}]",
        f"data.corpus.cache_dir={tmp_path / 'cache'}",
        "train.steps=1",
        "train.progress=false",
        f"output_dir={tmp_path / 'out'}",
        f"model.hf_checkpoint={model_dir}",
    ]
    line = _error_line(*_train(data))
    assert f"model directory {model_dir} has no usable tokenizer" in line, line
    assert "to no token ids (a vocabulary of 1)" in line and "it lacks tokenizer.json" in line, line
    assert "has no tokenizer files at all" in line, line
    # a real tokenizer, but far smaller than the model's 1024 embedding rows: not the model's
    line = _error_line(*_train([*data, "data.corpus.tokenizer=byte"]))
    assert f"tokenizer byte has a vocabulary of 257 but the model {model_dir} has 1024 embedding rows" in line


def test_hf_checkpoint_must_be_a_directory(tmp_path):
    model_dir = _qwen3_without_tokenizer(tmp_path / "qwen3", vocab=300)
    hint = (
        f"is a file; it must be a directory: a Hugging Face model directory holding config.json, "
        f"*.safetensors and the tokenizer files (e.g. model.hf_checkpoint={model_dir})"
    )
    for path, what in (
        (model_dir / "model.safetensors", hint),
        (model_dir / "config.json", "is a file; it must be a directory"),
        (tmp_path / "nope", "does not exist; it must be a directory"),
    ):
        line = _error_line(*_train([*SMALL, f"model.hf_checkpoint={path}", f"output_dir={tmp_path / 'out'}"]))
        assert f"model.hf_checkpoint={path} {what}" in line, line


# -- a rank that dies ------------------------------------------------------------------------------
TWO_RANKS = [
    "data=synthetic",
    "data.num_docs=200",
    "data.corpus.max_doc_tokens=120",
    "train.global_batch=6",
    "train.progress=false",
    "solver.time_limit=0.2",
    "train.checkpoint_every=2",
]


def _rank_pids(launcher_pid: int) -> dict[int, int]:
    """{RANK: pid} of the launcher's child processes (read from /proc)."""
    pids = {}
    children = Path(f"/proc/{launcher_pid}/task/{launcher_pid}/children").read_text().split()
    for pid in map(int, children):
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        rank = next((int(e[5:]) for e in env if e.startswith(b"RANK=")), None)
        if rank is not None:
            pids[rank] = pid
    return pids


def _wait_for_steps(proc, metrics: Path, steps: int, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= steps:
            return
        time.sleep(0.1)
    pytest.fail(f"the run did not reach step {steps} (exit status {proc.poll()})")


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="finds the rank's pid through /proc")
def test_rank_killed_by_sigkill_is_one_line(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "flexsp.train",
            "--nproc-per-node",
            "2",
            *TWO_RANKS,
            "train.steps=200",
            f"output_dir={out}",
        ],
        cwd=REPO,
        env=launch_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        _wait_for_steps(proc, out / "metrics.jsonl", 3)
        pid = _rank_pids(proc.pid)[1]
        os.kill(pid, signal.SIGKILL)  # what the out-of-memory killer does
        log = proc.communicate(timeout=120)[0]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    line = _error_line(proc.returncode, log, status=128 + signal.SIGKILL)
    done = _steps(out)[-1]
    # the newest COMPLETE checkpoint: a step's metrics line is written before its checkpoint, so the
    # kill can land between the two (then the one before it is the one to resume from)
    from flexsp.checkpoint import latest_checkpoint

    ckpt = latest_checkpoint(out / "checkpoints")
    assert ckpt is not None and done - 2 <= int(ckpt.name.split("_")[1]) <= done, (ckpt, done)
    assert (
        f"rank 1 (host {socket.gethostname()}, pid {pid}) was killed by SIGKILL during step {done + 1} "
        f"({done} completed) -- out of memory?"
    ) in line, (line, done)
    assert line.endswith(f"the same command resumes from {ckpt} (train.resume=auto)"), line
    assert ckpt.is_dir()


@pytest.mark.slow
def test_rank_exiting_without_reporting_is_one_line(tmp_path):
    out = tmp_path / "run"
    rc, log = _train(
        ["--nproc-per-node", "2", *TWO_RANKS, "train.steps=6", f"output_dir={out}"],
        faults="kill:rank=1:step=3",
    )
    line = _error_line(rc, log, status=13)
    assert (
        "rank 1 (host " in line
        and "exited with status 13 without reporting an error during step 4 "
        "(3 completed); the same command resumes from "
        in line
    ), line
    assert line.endswith(f"{out / 'checkpoints' / 'step_000002'} (train.resume=auto)"), line


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_survivor_of_a_killed_rank_prints_one_line_without_flexsp_launcher(tmp_path):
    """Ranks started by hand (as a scheduler or plain torchrun would): nobody reports the dead rank
    for us, so the survivor says in one line that a peer died, instead of the gloo traceback."""
    out, port = tmp_path / "run", _free_port()
    procs = []
    for rank in range(2):
        env = dict(
            launch_env(),
            RANK=str(rank),
            WORLD_SIZE="2",
            LOCAL_RANK=str(rank),
            LOCAL_WORLD_SIZE="2",
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
        )
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "flexsp.train", *TWO_RANKS, "train.steps=200", f"output_dir={out}"],
                cwd=REPO,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    try:
        _wait_for_steps(procs[0], out / "metrics.jsonl", 3)
        procs[1].kill()
        log = procs[0].communicate(timeout=120)[0]
        procs[1].communicate(timeout=60)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    line = _error_line(procs[0].returncode, log, status=3)
    assert "rank 0 lost its connection to another rank" in line and "that rank died first" in line, line


# -- profile your own model -------------------------------------------------------------------------
@pytest.mark.slow
def test_profile_your_own_checkpoint_with_the_command_the_error_names(tmp_path):
    """Issue 18, trap 1, as a user meets it: a local Qwen3 directory trained with the default cost
    model fails the shape check; the one line names the flexsp-profile command (the same tree:
    model.hf_checkpoint=DIR) and the file it writes; that command, run as printed (plus settings
    that only make it short), profiles the checkpoint's model; training with the file it wrote
    passes the shape check and trains."""
    import shlex

    from solver.costmodel import CostModel

    model_dir = _qwen3_without_tokenizer(tmp_path / "qwen3", vocab=300, hidden=96)  # cpu-gloo-tiny: 64
    out = tmp_path / "run"
    data = [
        "data=synthetic",
        "data.num_docs=16",
        "data.corpus.max_doc_tokens=48",
        "data.synthetic_vocab_size=300",
        "train.global_batch=4",
        "train.progress=false",
        "solver.time_limit=0.2",
        f"output_dir={out}",
    ]
    line = _error_line(*_train([f"model.hf_checkpoint={model_dir}", *data]))
    assert (
        "solver.cost_model=cpu-gloo-tiny: cost model cpu-gloo-tiny was built for hidden=64 but the model has "
        "hidden=96: profile this model with `flexsp-profile" in line
    ), line
    command = line.split("profile this model with `", 1)[1].split("`", 1)[0]
    written = line.split("then set solver.cost_model=", 1)[1].split(" ", 1)[0]
    argv = shlex.split(command)
    assert argv[0] == "flexsp-profile" and f"model.hf_checkpoint={model_dir}" in argv, command
    fast = [
        "profile.repeats=1",
        "profile.validate_batches=0",
        "profile.max_len=64",
        "profile.progress=false",
        "profile.plot=false",
    ]
    proc = subprocess.run(
        [sys.executable, "-m", "flexsp.profile", *argv[1:], *fast],
        cwd=REPO,
        env=launch_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    cm = CostModel.load(written)
    assert (cm.layers, cm.hidden, cm.heads, cm.kv_heads) == (2, 96, 4, 2), cm
    assert f"model {model_dir}" in cm.source
    rc, log = _train(
        [f"model.hf_checkpoint={model_dir}", *data, f"solver.cost_model={written}", "train.steps=1"]
    )
    assert rc == 0 and "step    1/1" in log, log[-3000:]
