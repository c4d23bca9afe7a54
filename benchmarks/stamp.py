#!/usr/bin/env python3
"""Provenance stamp of every file in ``benchmarks/results/``: commit, machine, command, date, load.

Every benchmark script calls :func:`start` before it measures anything and :func:`finish` when it is
done, then puts :func:`markdown_block` under its markdown title and :func:`to_json` under the key
``"stamp"`` of its JSON (:func:`png_metadata` goes into ``savefig(metadata=...)``). Planner scripts
add the cost models and the baselines exactly as they ran (``finish(cost_models=..., baselines=...)``).

Tools outside ``benchmarks/`` (``flexsp-profile``, ``flexsp-bench``) are wrapped instead::

    python benchmarks/stamp.py wrap --md OUT.md --json OUT.report.json --png OUT.png -- CMD ARGS...

runs ``CMD`` (its exit status is passed on), then inserts the same stamp under the markdown title,
adds ``"stamp"`` to each JSON object and a ``flexsp-stamp`` text chunk to each PNG.
``python benchmarks/stamp.py check FILE...`` exits 1 naming every file without a complete stamp
(``benchmarks/run_all.sh`` and ``tests/test_run_all.py`` use it).
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CODE_PATHS = ("solver", "flexsp", "configs", "benchmarks", "scripts", "pyproject.toml")
"""Paths whose uncommitted changes make a result "dirty" (``benchmarks/results/`` excluded)."""
MARK = "**Stamp**"
"""What starts the stamp block in markdown (``check`` looks for it)."""
PNG_KEY = "flexsp-stamp"
"""Text-chunk key of the stamp in a PNG."""
JSON_FIELDS = ("commit", "dirty", "machine", "command", "date", "loadavg_start", "loadavg_end")


@dataclasses.dataclass
class Stamp:
    """Where and how a result was produced."""

    commit: str
    """``git rev-parse --short HEAD`` of the checkout that ran ("?" outside git)."""
    dirty: list[str]
    """Uncommitted changes under CODE_PATHS when the run started (empty = the commit is the code)."""
    machine: str
    """Host name, platform string, CPU model and CPU count."""
    command: str
    """The command line, as one would type it from the repository root."""
    date: str
    """UTC start time, ISO 8601."""
    loadavg_start: list[float]
    """1/5/15-minute load averages when the run started."""
    loadavg_end: list[float] | None = None
    """The same when it ended (None until :func:`finish`)."""
    wall_s: float | None = None
    """Seconds from :func:`start` to :func:`finish`."""
    cost_models: dict[str, str] = dataclasses.field(default_factory=dict)
    """Cost model name -> where its numbers come from (planner results only)."""
    baselines: dict[str, str] = dataclasses.field(default_factory=dict)
    """Baseline label -> exactly what ran under it (function, settings)."""
    started_at: float = dataclasses.field(default=0.0, repr=False)
    """perf_counter() at start (not written out)."""


def _git(*args: str) -> str:
    """git's stdout without trailing newlines (leading blanks kept: porcelain status needs them)."""
    try:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True,
                              timeout=30).stdout.rstrip()
    except (OSError, subprocess.SubprocessError):
        return ""


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as info:
            return next(ln.split(":", 1)[1].strip() for ln in info if ln.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def machine() -> str:
    """``host, platform, CPU model, N CPUs``."""
    return f"{platform.node()}, {platform.platform()}, {_cpu_model()}, {os.cpu_count()} CPUs"


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else []


def _command(argv: list[str] | None) -> str:
    """``argv`` as typed from the repository root: a Python interpreter's path shown as ``python``."""
    if argv is None:
        script = Path(sys.argv[0]).resolve()
        shown = script.relative_to(REPO).as_posix() if script.is_relative_to(REPO) else sys.argv[0]
        argv = ["python", shown, *sys.argv[1:]]
    if argv and Path(argv[0]).name.startswith("python"):
        argv = ["python", *argv[1:]]
    return shlex.join(argv)


def start(argv: list[str] | None = None) -> Stamp:
    """A stamp for a run starting now; ``argv`` defaults to ``python <this script> <its args>``."""
    changed = [ln[3:] for ln in _git("status", "--porcelain", "--", *CODE_PATHS).splitlines()]
    return Stamp(commit=_git("rev-parse", "--short", "HEAD") or "?",
                 dirty=[f for f in changed if not f.startswith("benchmarks/results/")],
                 machine=machine(), command=_command(argv),
                 date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                 loadavg_start=loadavg(), started_at=time.perf_counter())


def finish(stamp: Stamp, cost_models: dict[str, str] | None = None,
           baselines: dict[str, str] | None = None) -> Stamp:
    """The stamp with the end load, the wall time and (planner results) cost models and baselines."""
    return dataclasses.replace(stamp, loadavg_end=loadavg(), wall_s=time.perf_counter() - stamp.started_at,
                               cost_models=dict(cost_models or stamp.cost_models),
                               baselines=dict(baselines or stamp.baselines))


def to_json(stamp: Stamp) -> dict:
    data = dataclasses.asdict(stamp)
    data.pop("started_at")
    return data


def _load(values: list[float] | None) -> str:
    return "/".join(f"{x:.2f}" for x in values) if values else "n/a"


def markdown_block(stamp: Stamp) -> str:
    """The stamp as markdown lines (a blockquote), to go right under the title."""
    state = "clean" if not stamp.dirty else f"DIRTY: uncommitted changes to {', '.join(stamp.dirty[:8])}"
    wall = f"; wall {stamp.wall_s:.0f} s" if stamp.wall_s is not None else ""
    lines = [f"> {MARK} (`benchmarks/stamp.py`): commit `{stamp.commit}` ({state}); "
             f"date {stamp.date}{wall}  ",
             f"> Machine: {stamp.machine}  ",
             f"> Load average (1/5/15 min): {_load(stamp.loadavg_start)} at start, "
             f"{_load(stamp.loadavg_end)} at end (a shared machine: other jobs may have run)  ",
             f"> Command: `{stamp.command}`  "]
    if stamp.cost_models:
        models = "; ".join(f"`{k}` ({v})" for k, v in stamp.cost_models.items())
        lines.append(f"> Cost models: {models}  ")
    if stamp.baselines:
        baselines = "; ".join(f"**{k}**: {v}" for k, v in stamp.baselines.items())
        lines.append(f"> Baselines as run: {baselines}  ")
    return "\n".join(lines) + "\n"


def png_metadata(stamp: Stamp) -> dict[str, str]:
    """``savefig(metadata=...)`` for a PNG: the stamp as JSON text."""
    return {PNG_KEY: json.dumps(to_json(stamp))}


def insert_markdown(text: str, stamp: Stamp) -> str:
    """``text`` with the stamp block after its first heading (or on top); an older stamp replaced."""
    lines = text.splitlines()
    lines = [ln for ln in lines if not (ln.startswith("> ") and (MARK in ln or _stamp_tail(ln)))]
    at = next((i + 1 for i, ln in enumerate(lines) if ln.startswith("# ")), 0)
    return "\n".join(lines[:at] + ["", markdown_block(stamp).rstrip("\n"), ""] + lines[at:]) + "\n"


def _stamp_tail(line: str) -> bool:
    return line.startswith(("> Machine: ", "> Load average (1/5/15 min)", "> Command: `", "> Cost models: ",
                            "> Baselines as run: "))


def stamp_files(stamp: Stamp, md: list[str] = (), js: list[str] = (), png: list[str] = ()) -> None:
    """Stamp files another tool wrote (see the module docstring)."""
    for path in map(Path, md):
        path.write_text(insert_markdown(path.read_text(), stamp))
    for path in map(Path, js):
        data = json.loads(path.read_text())
        if not isinstance(data, dict):
            raise ValueError(f"{path}: a stamp goes into a JSON object, this holds {type(data).__name__}")
        data["stamp"] = to_json(stamp)
        path.write_text(json.dumps(data, indent=1) + "\n")
    for path in map(Path, png):
        from PIL import Image, PngImagePlugin
        with Image.open(path) as img:
            img.load()
            info = PngImagePlugin.PngInfo()
            for key, value in (img.text or {}).items():
                if key != PNG_KEY:
                    info.add_text(key, value)
            info.add_text(PNG_KEY, png_metadata(stamp)[PNG_KEY])
            img.save(path, pnginfo=info)


def check(path: Path) -> str | None:
    """None when ``path`` carries a complete stamp, else what is missing."""
    if not path.is_file():
        return "missing"
    if path.suffix == ".md":
        text = path.read_text()
        need = [MARK, "> Machine: ", "> Load average", "> Command: `"]
        lost = [n for n in need if n not in text]
        return f"no stamp line(s) {lost}" if lost else None
    if path.suffix == ".json":
        data = json.loads(path.read_text())
        st = data.get("stamp") if isinstance(data, dict) else None
        lost = [k for k in JSON_FIELDS if not isinstance(st, dict) or k not in st]
        return f"no stamp field(s) {lost}" if lost else None
    if path.suffix == ".png":
        from PIL import Image
        with Image.open(path) as img:
            img.load()
            return None if PNG_KEY in (img.text or {}) else f"no {PNG_KEY} text chunk"
    return f"unknown kind of file {path.suffix!r} (valid: .md, .json, .png)"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="verb", required=True)
    wrap = sub.add_parser("wrap", help="run a command, then stamp the files it wrote")
    wrap.add_argument("--md", action="append", default=[], help="markdown file to stamp (repeatable)")
    wrap.add_argument("--json", action="append", default=[], help="JSON object file to stamp (repeatable)")
    wrap.add_argument("--png", action="append", default=[], help="PNG to stamp (repeatable)")
    wrap.add_argument("--cost-model", action="append", default=[], metavar="NAME=SOURCE")
    wrap.add_argument("cmd", nargs=argparse.REMAINDER, help="-- COMMAND ARGS...")
    chk = sub.add_parser("check", help="exit 1 unless every file carries a complete stamp")
    chk.add_argument("files", nargs="+")
    args = ap.parse_args(argv)
    if args.verb == "check":
        bad = [(f, why) for f in args.files if (why := check(Path(f)))]
        for f, why in bad:
            print(f"stamp check: {f}: {why}", file=sys.stderr)
        return 1 if bad else 0
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not cmd:
        ap.error("wrap needs a command after --")
    stamp = start(cmd)
    rc = subprocess.run(cmd).returncode
    if rc != 0:
        print(f"stamp wrap: command exited {rc}: {shlex.join(cmd)}", file=sys.stderr)
        return rc
    models = dict(kv.split("=", 1) for kv in args.cost_model)
    stamp_files(finish(stamp, cost_models=models), args.md, args.json, args.png)
    return 0


if __name__ == "__main__":
    sys.exit(main())
