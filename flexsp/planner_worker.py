"""The planner subprocess (``python -m flexsp.planner_worker MODULE:FUNCTION``): solves one job at a
time for rank 0, so the planner's Python work never holds the GIL of a training rank.

Protocol (pickles over stdin/stdout): the first message is the cost model as a dict; then jobs
``(job_id, lengths, kwargs)`` each answered by ``(job_id, ok, plan_dict | error text)``; ``None``
or end of input stops it. SIGINT is ignored: a Ctrl-C in the terminal reaches the whole process
group, and the trainer (not its planner) decides how to stop. Imports only ``solver`` (no torch).
"""

from __future__ import annotations

import importlib
import pickle
import signal
import sys

from solver.costmodel import CostModel


def main(argv: list[str]) -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    module, _, name = argv[0].partition(":")
    solve = getattr(importlib.import_module(module), name)
    inp, out = sys.stdin.buffer, sys.stdout.buffer
    try:
        cm = CostModel.from_dict(pickle.load(inp))
    except EOFError:
        return 0
    while True:
        try:
            job = pickle.load(inp)
        except EOFError:
            return 0
        if job is None:
            return 0
        job_id, lengths, kwargs = job
        try:
            reply = (job_id, True, solve(lengths, cm, **kwargs).to_dict())
        except Exception as exc:  # reported to the trainer, which names the step
            reply = (job_id, False, f"{type(exc).__name__}: {exc}")
        try:
            pickle.dump(reply, out)
            out.flush()
        except (BrokenPipeError, OSError):
            return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
