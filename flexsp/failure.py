"""Failures of a multi-rank run: one clear line, printed once, and no rank left hanging.

Two problems this module solves:

1. **A user error is one line.** A bad value, a missing or corrupt file, a document longer than the
   cluster holds: :func:`is_user_error` tells these (a ValueError raised by FlexSP's own code, or an
   OSError naming a file) from bugs (anything else, or a ValueError from deep inside a library),
   and :func:`report` prints ``flexsp-train: error: <message>`` on one rank only (rank 0 for errors
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
"""
from __future__ import annotations

import datetime
import os
import sys
import threading
import traceback
from pathlib import Path

ABORTED_EXIT_CODE = 3
"""Exit status of a rank stopped because another rank failed."""
USER_ERROR_EXIT_CODE = 2
BUG_EXIT_CODE = 1
_OUR_CODE = (str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parent.parent / "solver"))


def is_user_error(exc: BaseException) -> bool:
    """True for errors of the user's input: ValueErrors raised by FlexSP's own code (flexsp/,
    solver/) and OSErrors that name a file (missing, unreadable, not a directory, ...)."""
    if isinstance(exc, OSError) and getattr(exc, "filename", None):
        return True
    if not isinstance(exc, ValueError):
        return False
    tb = exc.__traceback__
    last = None
    while tb is not None:
        last = tb
        tb = tb.tb_next
    if last is None:
        return True
    return os.path.abspath(last.tb_frame.f_code.co_filename).startswith(_OUR_CODE)


def one_line(exc: BaseException) -> str:
    """The user-facing line of a user error (an OSError names its file and what failed)."""
    if isinstance(exc, OSError) and getattr(exc, "filename", None):
        hint = getattr(exc, "flexsp_hint", "")
        return f"cannot use {exc.filename}: {exc.strerror or exc}" + (f" ({hint})" if hint else "")
    return " ".join(str(exc).split("\n"))


def report(exc: BaseException, prog: str = "flexsp-train", *, printer: bool = True,
           stream=None) -> int:
    """Print ``exc`` (one line for a user error, else its traceback) if ``printer``; return the exit
    status to use (2 user error, 1 bug)."""
    stream = stream or sys.stderr
    user = is_user_error(exc)
    if printer:
        if user:
            print(f"{prog}: error: {one_line(exc)}", file=stream, flush=True)
        else:
            traceback.print_exception(exc, file=stream)
            stream.flush()
    return USER_ERROR_EXIT_CODE if user else BUG_EXIT_CODE


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
            import torch.distributed as dist
            try:
                self._store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                                            is_master=False, timeout=datetime.timedelta(seconds=30),
                                            wait_for_workers=False)
            except Exception:          # no reachable store: no cross-rank abort (still correct)
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
            except Exception:          # the store is gone: its host (rank 0) died
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
