"""Failures of a multi-rank run: one clear line, printed once, and no rank left hanging.

Two problems this module solves:

1. **A user error is one line.** A bad value, a missing or corrupt file, a document longer than the
   cluster holds: :func:`flexsp.errors.is_user_error` tells these (a ``UserError``, raised where the
   bad value is known, or an OSError naming a file) from bugs (anything else: a ValueError of an
   internal check included), by type, and :func:`report` prints ``flexsp-train: error: <message>`` on one
   rank only (rank 0 for errors
   every rank hits at start-up; the first rank to fail inside the training loop), with no
   traceback. A bug still prints its traceback, once.

2. **One rank failing never leaves the others waiting for a collective timeout (600 s).** While
   the training loop runs, :class:`AbortWatch` keeps a second client connection to the launcher's
   TCP store (``MASTER_ADDR:MASTER_PORT``: torchrun's agent store, or rank 0's store under Ray or
   a plain spawn). The failing rank posts its message under a key of this run and attempt
   (``compare_set``: the first poster wins and is the one that prints); every other rank's watch
   thread polls that key every ``poll_s`` seconds and exits the process at once
   (``os._exit(ABORTED_EXIT_CODE)``), whatever collective it is blocked in. Its own exception, if
   any, is not printed: the message was printed once, by the first rank. A rank whose store
   vanished (rank 0 died while hosting it) exits the same way.

3. **A rank that dies is the one line, not its peers' errors.** A rank killed by a signal (the
   out-of-memory killer's SIGKILL) or exiting without reporting leaves the others with a secondary
   error in their next collective (gloo: "Connection reset by peer"; NCCL: a communicator abort).
   :func:`is_peer_lost` recognises it: such a rank prints no traceback and exits with
   ``ABORTED_EXIT_CODE`` (under ``flexsp-train``'s own launcher it prints nothing at all; under
   another launcher the first such rank prints one line saying a peer died). ``flexsp-train``'s
   launcher then prints :func:`dead_rank_line` for the rank that died: which rank, host and pid,
   the signal or exit status, the step it died in, a hint (SIGKILL: out of memory?), and the
   checkpoint the same command resumes from. The step needs no per-step reporting: every step
   ends in an all-reduce over all ranks, so the last step rank 0 logged to metrics.jsonl is the
   last step every rank, the dead one included, completed.
"""

from __future__ import annotations

import datetime
import json
import os
import re
import signal
import sys
import threading
import traceback
from pathlib import Path

import torch.distributed as dist

from flexsp.errors import BUG_EXIT_CODE, USER_ERROR_EXIT_CODE, is_user_error, print_error

ABORTED_EXIT_CODE = 3
"""Exit status of a rank stopped because another rank failed (or vanished)."""
REPORTED_EXIT_CODES = (1, 2, 3, 130, 143)
"""Exit statuses of a rank that reported its own end (a bug's traceback, a user error's line, stopped
by another rank's failure, interrupted); any other status or a signal is a rank that died silently."""
LAUNCHER_ENV = "FLEXSP_LAUNCHER"
"""Set (to "1") in the ranks' environment by flexsp-train's launcher, which reports a dead rank itself."""


def report(exc: BaseException, prog: str = "flexsp-train", *, printer: bool = True, stream=None) -> int:
    """Print ``exc`` if ``printer``: one line for a user error (flexsp.errors.is_user_error: a
    UserError, or an OSError naming a file), else its traceback (a bug, printed once). Returns the
    exit status to use (2 user error, 1 bug)."""
    stream = stream or sys.stderr
    user = is_user_error(exc)
    if printer:
        if user:
            print_error(prog, exc, stream)
        else:
            traceback.print_exception(exc, file=stream)
            stream.flush()
    return USER_ERROR_EXIT_CODE if user else BUG_EXIT_CODE


_PEER_LOST = re.compile(
    r"gloo/transport|Connection (reset|closed) by peer|Broken pipe|Connection refused|"
    r"NCCL communicator was aborted|remote process exited|"
    r"ProcessGroupNCCL.*(abort|[Tt]imeout)"
)


def is_peer_lost(exc: BaseException) -> bool:
    """True for the error a rank gets in a collective when another rank has vanished: a
    torch.distributed DistError (backend, network or store) or a RuntimeError of the gloo/NCCL
    transport ("Connection reset by peer", "Connection closed by peer", a communicator abort)."""
    names = {c.__name__ for c in type(exc).__mro__}
    if names & {"DistError", "DistBackendError", "DistNetworkError", "DistStoreError"}:
        return True
    return isinstance(exc, RuntimeError) and bool(_PEER_LOST.search(str(exc)))


def last_logged_step(metrics: Path, since: float) -> int | None:
    """The last step in ``metrics`` (rank 0's metrics.jsonl) if the file was written at or after
    ``since`` (time.time()), else None: the run logged no step (a file of an earlier run)."""
    try:
        if metrics.stat().st_mtime < since:
            return None
        lines = [ln for ln in metrics.read_text().splitlines() if ln.strip()]
        return int(json.loads(lines[-1])["step"]) if lines else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def dead_rank_line(
    rank: int,
    host: str,
    pid: int,
    exitcode: int,
    done_steps: int | None,
    total_steps: int,
    checkpoint: Path | None,
) -> str:
    """The one line for a rank that died without reporting (``exitcode`` < 0: killed by that
    signal). ``done_steps``: steps every rank completed (None: none in this run)."""
    if exitcode < 0:
        try:
            how = f"was killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            how = f"was killed by signal {-exitcode}"
    else:
        how = f"exited with status {exitcode} without reporting an error"
    if done_steps is None:
        when = "before its first step of this run"
    elif done_steps >= total_steps:
        when = f"after the last step ({done_steps}), while finishing"
    else:
        when = f"during step {done_steps + 1} ({done_steps} completed)"
    hint = ""
    if exitcode == -signal.SIGKILL:
        hint = (
            " -- out of memory? (the kernel's OOM killer sends SIGKILL: see `dmesg` or the job's memory "
            "limit)"
        )
    elif exitcode in (-signal.SIGSEGV, -signal.SIGBUS, -signal.SIGABRT):
        hint = " -- a crash in native code (a driver, a kernel, a library)"
    resume = (
        f"the same command resumes from {checkpoint} (train.resume=auto)"
        if checkpoint
        else "no checkpoint was written: the same command starts over"
    )
    return f"rank {rank} (host {host}, pid {pid}) {how} {when}{hint}; {resume}"


def _abort_key() -> str:
    run = os.environ.get("TORCHELASTIC_RUN_ID", "local")
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return f"flexsp/abort/{run}/{attempt}/{os.environ.get('FLEXSP_RUN_NONCE', '')}"


class AbortWatch:
    """Cross-rank abort through the launcher's TCP store (see the module docstring).

    ``with AbortWatch(rank, world):`` around the training loop; ``post(message)`` from a failing
    rank returns True if it is the first (the one that should print)."""

    def __init__(self, rank: int, world_size: int, poll_s: float = 1.0, tag: str = "", grace_s: float = 3.0):
        self.rank, self.world, self.poll_s, self.grace_s = rank, world_size, poll_s, grace_s
        self.key = _abort_key() + tag
        self._store = None
        self._stop = threading.Event()
        self._thread = None

    def __enter__(self) -> "AbortWatch":
        if self.world > 1 and os.environ.get("MASTER_ADDR") and os.environ.get("MASTER_PORT"):
            try:
                self._store = dist.TCPStore(
                    os.environ["MASTER_ADDR"],
                    int(os.environ["MASTER_PORT"]),
                    is_master=False,
                    timeout=datetime.timedelta(seconds=30),
                    wait_for_workers=False,
                )
            except Exception:  # no reachable store: no cross-rank abort (still correct)
                self._store = None
        if self._store is not None:
            self._thread = threading.Thread(target=self._watch, name="flexsp-abort-watch", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()

    def _watch(self) -> None:
        while not self._stop.wait(self.poll_s):
            try:
                aborted = self._store.check([self.key])
            except Exception:  # the store is gone: its host (rank 0) died
                aborted = not self._stop.is_set()
            if aborted and not self._stop.is_set():
                # let the failing rank finish its report and exit first (launchers report the
                # first rank to exit as the cause), then go
                self._stop.wait(self.grace_s)
                if self._stop.is_set():
                    return
                sys.stderr.flush()
                os._exit(ABORTED_EXIT_CODE)

    def post(self, message: str) -> bool:
        """Stop watching and announce this rank's failure; True if it was the first."""
        self._stop.set()
        if self._store is None:
            return self.rank == 0 or self.world == 1
        mine = f"rank {self.rank}: {message}"[:4000]
        try:
            got = self._store.compare_set(self.key, "", mine)
        except Exception:
            return True
        got = got.decode() if isinstance(got, bytes) else str(got)
        return got == mine
