"""The one user-error type and the one printer of every FlexSP command.

A *user error* is a bad input the user can fix: a config value, a file, a flag, a batch the cluster
cannot hold. It is raised where the bad value is known, as :class:`UserError` (a ``ValueError``)
with ONE line naming the field, the offending value and what is valid; the command prints that
line with :func:`print_error` (``<prog>: error: <message>``) and exits with status 2. Anything
else that escapes a command is a bug: it prints its traceback once and exits with status 1
(flexsp.failure.report). The classification is by type, never by where the error was raised.

This module lives in ``solver/`` because ``solver/`` never imports ``flexsp`` (it runs without
torch); ``flexsp.errors`` re-exports it for the runtime.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable

USER_ERROR_EXIT_CODE = 2
"""Exit status of a command stopped by a user error."""
BUG_EXIT_CODE = 1
"""Exit status of a command stopped by a bug (its traceback is printed)."""


class UserError(ValueError):
    """A bad input the user can fix; its message is one line naming the field, value and options.

    ``field`` (e.g. ``"train.precision"``) and ``options`` (the valid values, when they are a
    list) are kept for callers that want them; the message already says both."""

    def __init__(self, message: str, *, field: str | None = None, options: Iterable | None = None):
        super().__init__(message)
        self.field = field
        self.options = list(options) if options is not None else None

    @classmethod
    def choice(cls, field: str, value, options: Iterable) -> UserError:
        """``field=value`` is not one of ``options``: "<field>='x'; valid options: [...]"."""
        options = list(options)
        return cls(f"{field}={value!r}; valid options: {options}", field=field, options=options)


class PlanningError(UserError):
    """The batch cannot be planned on this cluster (e.g. a sequence longer than it can hold)."""


def is_user_error(exc: BaseException) -> bool:
    """A :class:`UserError`, or an ``OSError`` naming a file (missing, unreadable, not a directory)."""
    return isinstance(exc, UserError) or (isinstance(exc, OSError) and bool(getattr(exc, "filename", None)))


def one_line(exc: BaseException | str) -> str:
    """The user-facing line of a user error (an OSError names its file and what failed)."""
    if isinstance(exc, OSError) and getattr(exc, "filename", None):
        hint = getattr(exc, "flexsp_hint", "")
        return f"cannot use {exc.filename}: {exc.strerror or exc}" + (f" ({hint})" if hint else "")
    return " ".join(str(exc).split())


def print_error(prog: str, exc: BaseException | str, stream=None) -> int:
    """Print ``<prog>: error: <one line>`` on ``stream`` (default stderr); returns exit status 2."""
    print(f"{prog}: error: {one_line(exc)}", file=stream or sys.stderr, flush=True)
    return USER_ERROR_EXIT_CODE


def check_power_of_two(
    field: str, value, *, zero_ok: bool = False, at_most: int | None = None, at_most_name: str = ""
) -> int:
    """``value`` unchanged if it is an integer power of two >= 1 (or 0 with ``zero_ok``) and at most
    ``at_most``; UserError otherwise: "<field>=<value> must be a power of two >= 1" / "must be 0 or a
    power of two" (+ " <= <at_most_name or at_most>"). The one power-of-two check of the project."""
    ok = isinstance(value, int) and not isinstance(value, bool) and (value >= 1 or (zero_ok and value == 0))
    ok = ok and not (value & (value - 1)) and (at_most is None or value <= at_most)
    if not ok:
        what = "0 or a power of two" if zero_ok else "a power of two >= 1"
        if at_most is not None:
            what += f" <= {at_most_name or at_most}"
        raise UserError(f"{field}={value!r} must be {what}", field=field)
    return value
