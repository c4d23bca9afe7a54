"""Logging of the runtime: one logger per module, rank-aware formatting, rank 0 by default.

Every module logs through ``log = get_logger(__name__)`` (a child of the ``flexsp`` logger).
:func:`setup_logging` (called once per process by each entry point) gives the ``flexsp`` logger one
handler on stdout whose records read ``[flexsp] <message>``, exactly as the runtime's lines always
read; records logged with ``extra=PLAIN`` (the step lines) are written as they are. Only the ranks
in ``FLEXSP_LOG_RANKS`` emit (default ``0``; ``all``, or a list ``0,3``): the launchers' ``--log-ranks``
sets it for every rank, and a rank other than 0 then prefixes its rank: ``[flexsp rank 3] ...``.
Errors are not logged here: a user error is one line on stderr (flexsp.errors.print_error), a bug its
traceback (flexsp.failure.report).
"""

from __future__ import annotations

import logging
import os
import sys

LOG_RANKS_ENV = "FLEXSP_LOG_RANKS"
"""Environment variable naming the ranks that log: ``0`` (default), ``all``, or ``0,2,5``."""
PLAIN = {"plain": True}
"""``log.info(line, extra=PLAIN)``: the line exactly as given (no prefix): the step lines."""
ROOT = "flexsp"


def get_logger(name: str) -> logging.Logger:
    """The logger of module ``name`` (``flexsp.x.y`` -> a child of ``flexsp``; others under it)."""
    return logging.getLogger(name if name == ROOT or name.startswith(ROOT + ".") else f"{ROOT}.{name}")


def parse_log_ranks(text: str | None) -> set[int] | None:
    """``--log-ranks`` / FLEXSP_LOG_RANKS -> the set of ranks that log (None: every rank); ValueError
    for anything but ``all`` or comma-separated integers >= 0."""
    text = (text or "0").strip()
    if text == "all":
        return None
    try:
        ranks = {int(x) for x in text.split(",") if x.strip()}
    except ValueError:
        ranks = set()
    if not ranks or min(ranks) < 0:
        raise ValueError(f"--log-ranks {text!r}: give 'all' or rank numbers separated by commas (e.g. 0,1)")
    return ranks


class _RankFormatter(logging.Formatter):
    def __init__(self, rank: int, tagged: bool):
        super().__init__()
        self.prefix = f"[flexsp rank {rank}] " if tagged else "[flexsp] "

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        return message if getattr(record, "plain", False) else self.prefix + message


def setup_logging(rank: int | None = None) -> None:
    """Configure the ``flexsp`` logger of this process for ``rank`` (default: RANK from the
    environment): INFO on stdout when the rank is one of FLEXSP_LOG_RANKS, else only errors.
    Idempotent: a second call replaces the handler (e.g. once the rank is known)."""
    rank = int(os.environ.get("RANK", "0")) if rank is None else rank
    try:
        ranks = parse_log_ranks(os.environ.get(LOG_RANKS_ENV))
    except ValueError:
        ranks = {0}
    logger = logging.getLogger(ROOT)
    for h in list(logger.handlers):
        if getattr(h, "_flexsp", False):
            logger.removeHandler(h)
    handler = logging.StreamHandler(_Stdout())
    handler._flexsp = True
    handler.setFormatter(_RankFormatter(rank, tagged=ranks != {0}))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO if ranks is None or rank in ranks else logging.ERROR)
    logger.propagate = False


class _Stdout:
    """sys.stdout looked up at every write (tests and tools redirect it), flushed each line."""

    def write(self, text: str) -> int:
        n = sys.stdout.write(text)
        sys.stdout.flush()
        return n

    def flush(self) -> None:
        sys.stdout.flush()
