"""flexsp.launcher.exit_process: how every flexsp-train / flexsp-bench process ends. It must keep
what a normal exit keeps (buffered stdout, log records, the atexit hooks trackers register) and the
status, while skipping the interpreter teardown that races with torch's leftover process-group
threads (see its docstring)."""

import subprocess
import sys
import textwrap

from train_cases import REPO, launch_env

CHILD = textwrap.dedent(
    """
    import atexit, logging, sys, threading, time
    from flexsp.launcher import exit_process

    atexit.register(lambda: open(sys.argv[1], "w").write("hook ran"))
    logging.basicConfig(stream=sys.stderr, level=logging.INFO)
    logging.getLogger("flexsp.test").info("a log record")
    sys.stdout.write("buffered, no newline")  # a pipe: block-buffered until flushed
    # a non-daemon thread that never ends: a normal exit would wait for it forever
    threading.Thread(target=time.sleep, args=(3600,), daemon=False).start()
    exit_process(5)
    """
)


def test_exit_process_keeps_output_hooks_and_status(tmp_path):
    marker = tmp_path / "hook"
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, str(marker)],
        cwd=REPO,
        env=launch_env(),
        capture_output=True,
        text=True,
        timeout=60,  # a process that waited for its thread would be killed here and fail the test
    )
    assert proc.returncode == 5, proc.stderr
    assert proc.stdout == "buffered, no newline"
    assert "a log record" in proc.stderr
    assert marker.read_text() == "hook ran"


def test_train_entry_points_end_through_exit_process():
    """``flexsp-train``/``flexsp-bench`` and their ``python -m`` forms call the cli() that ends with
    exit_process; in-process callers (tests) keep main(), which returns the status."""
    import tomllib

    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["flexsp-train"] == "flexsp.train:cli"
    assert scripts["flexsp-bench"] == "flexsp.bench:cli"
    for module in ("flexsp/train.py", "flexsp/bench.py"):
        tail = (REPO / module).read_text().rstrip().splitlines()[-2:]
        assert tail == ['if __name__ == "__main__":', "    cli()"], (module, tail)
