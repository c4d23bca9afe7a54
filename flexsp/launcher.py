"""``flexsp-train``: compose the config, then train in this process or launch the ranks.

    flexsp-train [hydra overrides]                          # one process (a 1-rank world), or a
                                                            # worker under torchrun / Ray
    flexsp-train --nproc-per-node 4 [torchrun options] [hydra overrides]
    flexsp-train --help                                     # config groups, keys and launcher options
    flexsp-train --cfg [hydra overrides]                    # print the resolved config and exit
    flexsp-train --log-ranks all|0,1 ...                    # which ranks log (default: rank 0)

With torchrun options (``--nproc-per-node``, ``--nnodes``, ``--rdzv-endpoint``, ``--max-restarts``,
...; torchrun's own parser reads them) this process is the launcher: the config is composed and
validated here first (a bad value is one line and exit status 2 before any rank starts), then
torchrun's elastic agent runs ``python -m flexsp.train`` on every rank, in-process, with its log
quieted: a rank that fails prints its own one line (flexsp.failure) and the launcher exits with its
status, without torchrun's summary. A rank that dies without reporting (killed by a signal, e.g. the
out-of-memory killer's SIGKILL, or exiting early) is one line from the launcher: rank, host, pid,
signal or status, the step, a hint, the checkpoint to resume from (flexsp.failure.dead_rank_line);
the other ranks' secondary errors ("Connection reset by peer") are not printed. Plain ``torchrun ...
-m flexsp.train`` works too (torchrun then adds its own summary of a failed rank).

Exit status: 0 done, 2 a user error (bad config value, missing or corrupt file, ...), 1 a bug (its
traceback is printed once), 3 a rank stopped because another rank failed, 130/143 interrupted by
SIGINT/SIGTERM after writing a checkpoint, 128 + N a rank killed by signal N (137: SIGKILL), or the
status of a rank that exited without reporting.
"""

from __future__ import annotations

import atexit
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Callable
from typing import NoReturn

import torch.distributed as dist

from flexsp.checkpoint import latest_checkpoint
from flexsp.config import RunConfig
from flexsp.config.compose import CONFIG_DIR, compose, compose_container, to_yaml
from flexsp.errors import UserError, print_error
from flexsp.failure import (
    ABORTED_EXIT_CODE,
    LAUNCHER_ENV,
    REPORTED_EXIT_CODES,
    dead_rank_line,
    is_peer_lost,
    last_logged_step,
    report,
)
from flexsp.log import LOG_RANKS_ENV, parse_log_ranks, setup_logging

PROG = "flexsp-train"
NO_VALUE_OPTIONS = {"--standalone", "--no-python", "--no_python", "--run-path", "--run_path"}
"""torchrun options that take no value."""


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def say(exc: BaseException | str, prog: str = PROG) -> int:
    """A user error: its one line on rank 0 (the other ranks hit the same one); exit status 2."""
    if _rank() == 0:
        return print_error(prog, exc)
    return 2


def split_args(argv: list[str]) -> tuple[list[str], list[str], set[str]]:
    """(torchrun options, hydra overrides, flexsp flags ``help`` / ``cfg``) of the command line;
    ``--log-ranks X`` is applied here (FLEXSP_LOG_RANKS for this process and every rank it starts)."""
    launcher, overrides, flags = [], [], set()
    i = 0
    while i < len(argv):
        a = argv[i]
        if a in ("-h", "--help"):
            flags.add("help")
        elif a == "--cfg":
            flags.add("cfg")
        elif a == "--log-ranks" or a.startswith("--log-ranks="):
            value = a.partition("=")[2] if "=" in a else (argv[i + 1] if i + 1 < len(argv) else "")
            i += 0 if "=" in a else 1
            parse_log_ranks(value)  # ValueError for a bad value (the caller reports it)
            os.environ[LOG_RANKS_ENV] = value
        elif a == "--":
            overrides += argv[i + 1 :]
            break
        elif a.startswith("--"):
            launcher.append(a)
            if (
                "=" not in a
                and a not in NO_VALUE_OPTIONS
                and i + 1 < len(argv)
                and not argv[i + 1].startswith("-")
                and not _is_override(argv[i + 1])
            ):
                launcher.append(argv[i + 1])
                i += 1
        else:
            overrides.append(a)
        i += 1
    return launcher, overrides, flags


def _is_override(a: str) -> bool:
    """Hydra overrides look like key=value, +key=value, ~key, group=option."""
    body = a.lstrip("+~")
    return "=" in body and not a.startswith("--")


def print_help(doc: str = __doc__) -> None:
    groups = {
        p.name: sorted(q.stem for q in p.glob("*.yaml"))
        for p in sorted(CONFIG_DIR.iterdir())
        if p.is_dir() and p.name not in ("costmodels", "dryrun", "bench", "profile")
    }
    print(doc)
    print("Config groups (group=option):")
    for g, opts in groups.items():
        print(f"  {g}: {', '.join(opts)}")
    print(
        "Keys: every field of flexsp.config.TrainConfig (train.*), ParallelConfig (parallel.*),\n"
        "SolverConfig (solver.*), flexsp.data.DataConfig (data.*), flexsp.model.ModelConfig\n"
        "(model.*) and output_dir; each is documented where it is defined. `--cfg` prints the resolved "
        "config."
    )


def exit_process(code: int) -> NoReturn:
    """End a command-line process (``flexsp-train``, ``flexsp-bench``, each rank they start) with
    ``code`` once its output is out: stdio flushed, logging shut down, the atexit hooks run (W&B,
    TensorBoard), then ``os._exit(code)``, skipping the interpreter's own teardown.

    Why: torch keeps the default process group alive after ``destroy_process_group`` while FSDP2 or
    DCP state still references it (10-11 references after one FSDP2 step or one DCP save, torch
    2.13), so its gloo and TCPStore threads are still running while the interpreter and the C++
    statics are torn down. A thread of torch's running past that teardown is the known source of
    "terminate called without an active exception" (SIGABRT), which CI saw once (2026-12-05): the
    resume-mismatch test printed its one line, then died with status -6 instead of 2; it did not
    reproduce on demand, so this is the likely cause, not a proven one. A process that has reported
    its result has nothing left to tear down, so it leaves directly, with its status."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe: nothing more can be said on it
            pass
    try:
        logging.shutdown()
        atexit._run_exitfuncs()  # what the interpreter would run at exit (trackers' final flush)
    finally:
        os._exit(code)


def main(
    argv: list[str],
    run_fn: Callable[[RunConfig], dict],
    validate_fn: Callable[[RunConfig, int | None], None],
    module: str = "flexsp.train",
    prog: str = PROG,
    doc: str = __doc__,
) -> int:
    """``flexsp-train``'s command line: compose and validate the config, then launch the ranks
    (torchrun options given, not a rank yet) or run ``run_fn`` here (one process, or a rank)."""
    try:
        launcher, overrides, flags = split_args(argv)
    except ValueError as exc:
        return say(exc, prog)
    setup_logging()
    if "help" in flags:
        print_help(doc)
        return 0
    try:
        if "cfg" in flags:
            print(to_yaml(compose_container(overrides)))
            return 0
        cfg = compose(overrides)  # typed and validated before anything starts
        if launcher and "RANK" not in os.environ:
            validate_fn(cfg, launched_world(launcher))
    except UserError as exc:
        return say(exc, prog)
    if launcher and "RANK" not in os.environ:
        return launch(launcher, overrides, cfg, module, prog)
    return run_here(cfg, run_fn, prog)


def run_here(cfg: RunConfig, run_fn: Callable[[RunConfig], dict], prog: str = PROG) -> int:
    """``run_fn(cfg)`` in this process; every failure becomes one report (prefixed ``prog``) and
    an exit status."""
    code = 0
    try:
        summary = run_fn(cfg)
        if summary.get("interrupted"):
            code = 143 if summary["interrupted"] == "SIGTERM" else 130
    except KeyboardInterrupt:
        if _rank() == 0:
            print(
                f"{prog}: interrupted before training started (no checkpoint written)",
                file=sys.stderr,
                flush=True,
            )
        code = 130
    except BaseException as exc:  # noqa: BLE001 - every failure becomes one report and a status
        first = getattr(exc, "flexsp_first", None)
        printer = first if first is not None else _rank() == 0
        if dist.is_initialized() and is_peer_lost(exc):
            # another rank vanished (the world had been formed): its death is the cause, this error is
            # secondary (no traceback); flexsp-train's launcher reports the dead rank, others get one line
            code = ABORTED_EXIT_CODE
            if printer and not os.environ.get(LAUNCHER_ENV):
                print_error(
                    prog,
                    f"rank {_rank()} lost its connection to another rank "
                    f"({type(exc).__name__}: {_first_line(exc)}): that rank died first; its launcher's "
                    f"report (torchrun: the failed rank's exitcode or signal) says which and why",
                )
        else:
            code = report(exc, prog, printer=printer)
        if first is not None:
            # failed inside the training loop: peers are being stopped, tearing the process group
            # down could wait for them; leave now with the status
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    finally:
        if dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:  # noqa: BLE001, S110 - a broken world is torn down best-effort
                pass
    return code


def _first_line(exc: BaseException) -> str:
    """The gist of a transport error: its first line, without gloo's source location prefix."""
    text = (str(exc).strip().splitlines() or [""])[0]
    return text.split("] ", 1)[-1].split(". This is typically")[0][:200]


def launched_world(launcher: list[str]) -> int | None:
    """nproc-per-node x nnodes of the torchrun options, when both are plain integers."""
    opts = {}
    for i, a in enumerate(launcher):
        key, eq, value = a.partition("=")
        if not eq and i + 1 < len(launcher):
            value = launcher[i + 1]
        opts[key.replace("_", "-")] = value
    try:
        return int(opts.get("--nproc-per-node", "1")) * int(opts.get("--nnodes", "1"))
    except ValueError:
        return None


def launch(
    launcher: list[str],
    overrides: list[str],
    cfg: RunConfig | None = None,
    module: str = "flexsp.train",
    prog: str = PROG,
) -> int:
    """torchrun's elastic agent in this process running ``python -m <module> <overrides>`` on every
    rank, its log quieted; the failed rank's status (messages prefixed ``prog``). ``cfg``: the
    config (its output_dir tells the step a dead rank reached and the checkpoint to resume from)."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError  # the launcher alone
    from torch.distributed.run import get_args_parser
    from torch.distributed.run import run as torchrun

    os.environ.setdefault("OMP_NUM_THREADS", "1")  # torchrun would warn and set it
    os.environ[LAUNCHER_ENV] = "1"  # the ranks leave a dead peer to us
    if not os.environ.get("FLEXSP_LAUNCHER_VERBOSE"):
        # torchrun's loggers each set their own level: quiet every one of them (the ranks report)
        for name, logger in list(logging.Logger.manager.loggerDict.items()):
            if name.startswith("torch.distributed") and isinstance(logger, logging.Logger):
                logger.setLevel(logging.CRITICAL)
    names = {a.partition("=")[0].replace("_", "-") for a in launcher}
    if not names & {
        "--nnodes",
        "--rdzv-endpoint",
        "--rdzv-backend",
        "--master-addr",
        "--master-port",
        "--standalone",
    }:
        launcher = ["--standalone", *launcher]  # one node: a free port, no fixed 29500
    try:
        args = get_args_parser().parse_args([*launcher, "-m", module, *overrides])
    except SystemExit as exc:
        return int(exc.code or 2)
    started = time.time()
    try:
        torchrun(args)
    except ChildFailedError as exc:
        return _report_failed_ranks(exc.failures, cfg, started, prog)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # torchrun's SignalException on SIGINT/SIGTERM of the launcher
        sig = getattr(exc, "sigval", None)
        if sig is not None:
            return 128 + int(sig)
        raise
    return 0


def _report_failed_ranks(failures: dict, cfg: RunConfig | None, started: float, prog: str = PROG) -> int:
    """The launcher's exit status for torchrun's failed ranks (``{global rank: ProcessFailure}``).

    The cause is, in order: a rank that died without reporting (a signal other than SIGTERM/SIGINT,
    or a status no flexsp rank exits with), which gets its one line here
    (flexsp.failure.dead_rank_line); else a rank that reported its own failure (its line or
    traceback is already printed); else a rank stopped because of another (exit status 3, or
    SIGTERM/SIGINT: how torchrun's agent stops the other ranks once one failed). Earliest first
    within each kind. A signal is reported here even as the last resort (nobody else did)."""

    def kind(f) -> int:
        if f.exitcode in (ABORTED_EXIT_CODE, -signal.SIGTERM, -signal.SIGINT):
            return 2
        return 0 if f.exitcode < 0 or f.exitcode not in REPORTED_EXIT_CODES else 1

    rank, failure = min(failures.items(), key=lambda kv: (kind(kv[1]), kv[1].timestamp))
    if kind(failure) and failure.exitcode > 0:
        return failure.exitcode
    checkpoint, done, steps = None, None, None
    if cfg is not None:
        out = cfg.output_dir
        try:
            checkpoint = latest_checkpoint(out / "checkpoints")
        except UserError:  # `latest` names an incomplete checkpoint
            checkpoint = None
        done, steps = last_logged_step(out / "metrics.jsonl", since=started), cfg.train.steps
    print_error(
        prog,
        dead_rank_line(rank, socket.gethostname(), failure.pid, failure.exitcode, done, steps, checkpoint),
    )
    return 128 - failure.exitcode if failure.exitcode < 0 else failure.exitcode
