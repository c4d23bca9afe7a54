"""User errors of the runtime: :class:`solver.errors.UserError` and its printer, re-exported (one
type for ``solver/`` and ``flexsp/``; ``solver/`` cannot import ``flexsp``)."""

from solver.errors import (
    BUG_EXIT_CODE,
    USER_ERROR_EXIT_CODE,
    PlanningError,
    UserError,
    check_power_of_two,
    is_user_error,
    one_line,
    print_error,
)

__all__ = [
    "BUG_EXIT_CODE",
    "PlanningError",
    "USER_ERROR_EXIT_CODE",
    "UserError",
    "check_power_of_two",
    "is_user_error",
    "one_line",
    "print_error",
]
