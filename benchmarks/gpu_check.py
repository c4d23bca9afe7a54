"""One-shot GPU check of FlexSP on one device, bounded: every section in its own process with a hard
timeout, the report rewritten after every section.

Why: GPU time comes in single runs of a few minutes. A cold inductor compile cannot be interrupted
from inside a Python process, so each section runs in a subprocess (its own process group and
session) that is killed -- with its compile workers and children -- at its budget; the next section
still runs, and the rows a killed section flushed before the kill stay in the report.

Sections, in priority order (GPU budgets in seconds, each including its interpreter/CUDA start):

0. env (20): device, versions of torch/triton/liger/pytest/transformers/numpy..., which packages
   came from the carried wheels, the bf16 matmul peak (8192^3) -- the yardstick of every % of peak;
a. tests (105): ``pytest -m gpu`` (correctness on the device);
b. train (60): one-GPU training smoke (gpu_train_smoke.py): bf16, meta init, FSDP2, DCP resume equal
   to the uninterrupted run, first-step (compile) vs steady step time, tokens/s;
c. attention (120): varlen causal attention TFLOP/s fwd and fwd+bwd at 32K/128K/8K, single documents
   and long-tailed mixes, ours vs every backend vs SDPA's per-document loop (gpu_attention.py);
d. profile (90): 1- and 2-layer LLaMA-3-8B-shaped builds up to 128K tokens, fitted and written as the
   cost model ``costmodel_h200_llama8b.json`` (gpu_costfit.py);
e. fused_ops (25): liger-kernel vs eager (gpu_fused.py).

Budgets add up to 420 s; attention and profile may grow to 1.5x theirs with time earlier sections
left unused (never with later sections' time). gpu_check.sh adds the wheel install and a hard 440 s
limit. Output (OUT):
report.md (summary table first), results.json, the cost model, console.log (from gpu_check.sh).

    python benchmarks/gpu_check.py OUT [--smoke] [--budget-s 420] [--only S ...] [--skip S ...]
                                      [--section-budget NAME=SECONDS ...]

``--smoke``: CPU, tiny shapes, the same code paths in seconds (the test suite runs it). The commit is
read with git; where the tree has no .git (a copied checkout), set ``FLEXSP_COMMIT=<sha>``.
Test only: ``FLEXSP_GPU_CHECK_TEST_HANG=SECONDS`` inserts a section "hang" after env with that budget,
whose process starts a child and sleeps (the kill at the budget is tested with it).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from gpu_common import Deadline, read_result, table  # noqa: E402


@dataclass(frozen=True)
class Section:
    name: str
    """Section name (gpu_sections.py runs it)."""
    budget_s: float
    """Hard limit on one GPU, seconds, including the subprocess's interpreter and CUDA start."""
    smoke_budget_s: float
    """Hard limit in --smoke mode (CPU)."""
    what: str
    """One line for the report."""
    extendable: bool = False
    """May also use what earlier sections left unused (up to EXTEND_FACTOR x its budget), as long as
    every later section keeps its own budget."""


SECTIONS = (
    Section("env", 30, 30, "device, package versions and origins, bf16 matmul peak"),
    Section("tests", 105, 60, "pytest -m gpu: correctness on the device"),
    Section("train", 60, 60, "one-GPU training smoke: bf16, meta init, FSDP2, DCP save + resume"),
    Section("attention", 110, 40, "varlen causal attention TFLOP/s vs SDPA loops and the other backends",
            extendable=True),
    Section("profile", 90, 60, "1+2-layer LLaMA-3-8B-shaped profile -> cost model JSON", extendable=True),
    Section("fused_ops", 25, 30, "liger-kernel vs eager fused ops"),
)
EXTEND_FACTOR = 1.5
"""An extendable section's budget grows to at most this multiple with time earlier sections left."""
TOTAL_BUDGET_S = 420.0
"""Default total; the budgets above add up to it."""
SMOKE_BUDGET_S = 150.0
KILL_GRACE_S = 2.0
"""SIGTERM to the section's process group, then SIGKILL this many seconds later."""
MIN_SECTION_S = 5.0
"""A section is not started with less time left than this."""
HANG_ENV = "FLEXSP_GPU_CHECK_TEST_HANG"
LOG_TAIL_LINES = 30


# ------------------------------------------------------------------------------------ processes
def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (Linux /proc; [] elsewhere), to kill children that left the group."""
    children: dict[int, list[int]] = {}
    try:
        entries = os.listdir("/proc")
    except OSError:
        return []
    for d in entries:
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as fh:
                ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(d))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def _signal(pgid: int, pids: list[int], sig) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass
    for pid in pids:
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def kill_tree(proc: subprocess.Popen, grace_s: float = KILL_GRACE_S) -> None:
    """SIGTERM the process group of ``proc`` (and descendants that left it), SIGKILL after ``grace_s``."""
    pids = descendants(proc.pid)
    _signal(proc.pid, pids, signal.SIGTERM)
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        pass
    _signal(proc.pid, pids + descendants(proc.pid), signal.SIGKILL)
    proc.wait()


def run_section(sec: Section, budget: float, smoke: bool, out_dir: Path, work: Path, ctx_file: Path) -> dict:
    """Run one section in its own process group, killed at ``budget`` seconds; its result dict."""
    result, log = work / f"{sec.name}.json", work / f"{sec.name}.log"
    end = time.time() + budget - KILL_GRACE_S
    cmd = [sys.executable, str(HERE / "gpu_sections.py"), sec.name, "--result", str(result),
           "--ctx", str(ctx_file), "--out", str(out_dir), "--end-time", f"{end:.3f}"]
    cmd += ["--smoke"] if smoke else []
    t0 = time.monotonic()
    timed_out = False
    with open(log, "w") as fh:
        env = dict(os.environ, PYTHONUNBUFFERED="1")  # a killed section's output is in the log up to the kill
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True,
                                env=env)
        try:
            proc.wait(timeout=max(end - time.time(), 0.1))
        except subprocess.TimeoutExpired:
            timed_out = True
            kill_tree(proc)
        except BaseException:  # SIGTERM from the hard limit (Terminated), Ctrl-C: take the section down too
            kill_tree(proc, grace_s=0.5)
            raise
        finally:
            _signal(proc.pid, [], signal.SIGKILL)  # leftovers of a finished section (compile workers)
    elapsed = time.monotonic() - t0
    res = read_result(result) or {"status": "error: the section wrote no result", "key": "", "lines": [],
                                  "data": {}}
    rc = proc.returncode
    if timed_out:
        partial = " (rows flushed before the kill are below)" if res.get("lines") else ""
        res["status"] = f"timeout: killed at its {budget:.0f} s budget{partial}"
    elif rc != 0 and res.get("status") in ("running", "ok"):
        res["status"] = f"error: exit status {rc}"
        if rc < 0:
            res["status"] += " (killed by a signal, e.g. out of host memory)"
    text = log.read_text(errors="replace") if log.exists() else ""
    res.update(elapsed_s=round(elapsed, 1), budget_s=round(budget, 1), returncode=rc,
               log_tail=text.splitlines()[-LOG_TAIL_LINES:])
    print(f"----- [gpu_check] section {sec.name}: {res['status']} ({elapsed:.1f} s of {budget:.0f} s) -----\n"
          f"{text}", flush=True)
    return res


# ------------------------------------------------------------------------------------- report
def git_commit() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                             text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        sha, dirty = "", ""
    # a copied checkout may carry a stale .git: the caller's FLEXSP_COMMIT wins
    sha = os.environ.get("FLEXSP_COMMIT") or sha or "unknown"
    if os.environ.get("FLEXSP_COMMIT"):
        dirty = ""
    return sha + (" (with uncommitted changes)" if dirty else "")


class Report:
    """report.md (summary table first) and results.json, rewritten after every change."""

    def __init__(self, out_dir: Path, args, sections, ctx: dict):
        self.out_dir, self.args, self.sections, self.ctx = out_dir, args, sections, ctx
        self.results: dict[str, dict] = {}
        self.t0 = time.monotonic()

    def set(self, name: str, res: dict) -> None:
        self.results[name] = res
        self.write()

    def summary(self) -> list[str]:
        rows = []
        for i, sec in enumerate(self.sections):
            r = self.results.get(sec.name, {"status": "not started"})
            secs = f"{r['elapsed_s']:.0f} ({r['budget_s']:.0f})" if "elapsed_s" in r else "-"
            rows.append((i, sec.name, r["status"].split(" (")[0][:80], secs, r.get("key", "") or "-"))
        return table(["#", "section", "status", "seconds (budget)", "key numbers"], rows)

    def write(self) -> None:
        env = self.results.get("env", {}).get("data", {})
        total = time.monotonic() - self.t0
        smoke = " (SMOKE: CPU, tiny shapes; numbers mean nothing)" if self.args.smoke else ""
        md = [f"# FlexSP GPU check{smoke}", "",
              f"- date: {self.ctx['date']}; commit: {self.ctx['commit']}",
              f"- machine: {env.get('device_name', '?')}; host {platform.node()}",
              f"- command: `{self.ctx['command']}`",
              f"- elapsed: {total:.0f} s of the {self.args.budget_s:.0f} s budget "
              "(sections in priority order, each in its own process, killed at its budget)",
              "", "## Summary", "", *self.summary(), ""]
        for i, sec in enumerate(self.sections):
            r = self.results.get(sec.name)
            if r is None:
                continue
            md += [f"## {i}. {sec.name}: {sec.what}", "", f"status: **{r['status']}**"
                   + (f" ({r['elapsed_s']} s of {r['budget_s']} s)" if "elapsed_s" in r else ""), ""]
            md += r.get("lines", [])
            failed = r["status"] not in ("ok", "running") and not r["status"].startswith("skipped")
            if failed and r.get("log_tail"):
                tail = r["log_tail"]
                md += ["", f"last {len(tail)} lines of its output:", "", "```", *tail, "```"]
            md.append("")
        self.out_dir.mkdir(parents=True, exist_ok=True)
        _write_atomic(self.out_dir / "report.md", "\n".join(md) + "\n")
        sections = {k: {kk: vv for kk, vv in v.items() if kk != "lines"} for k, v in self.results.items()}
        doc = {**self.ctx, "smoke": self.args.smoke, "budget_s": self.args.budget_s,
               "elapsed_s": round(total, 1), "sections": sections}
        _write_atomic(self.out_dir / "results.json", json.dumps(doc, indent=1, default=str) + "\n")


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------- main
def parse_args(argv):
    names = [s.name for s in SECTIONS]
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out_dir", type=Path, help="where report.md, results.json and the cost model go")
    p.add_argument("--smoke", action="store_true", help="CPU, tiny shapes, seconds (the test suite)")
    p.add_argument("--budget-s", type=float, default=None,
                   help=f"total seconds (default {TOTAL_BUDGET_S:.0f}, smoke {SMOKE_BUDGET_S:.0f})")
    p.add_argument("--only", nargs="+", default=None, choices=names, metavar="SECTION", help=f"from {names}")
    p.add_argument("--skip", nargs="+", default=[], choices=names, metavar="SECTION", help="sections to skip")
    p.add_argument("--section-budget", nargs="+", default=[], metavar="NAME=SECONDS", help="override budgets")
    a = p.parse_args(argv)
    a.budget_s = a.budget_s if a.budget_s is not None else (SMOKE_BUDGET_S if a.smoke else TOTAL_BUDGET_S)
    if not a.budget_s > 0:
        p.error(f"--budget-s must be > 0, got {a.budget_s}")
    a.budgets = {}
    for item in a.section_budget:
        name, _, value = item.partition("=")
        try:
            seconds = float(value)
        except ValueError:
            seconds = -1.0
        if name not in names or not seconds > 0:
            p.error(f"--section-budget {item!r}: expected NAME=SECONDS with NAME in {names} and SECONDS > 0")
        a.budgets[name] = seconds
    return a


def section_budget(own: float, extendable: bool, left: float, later: float) -> float:
    """Seconds a section gets: its own budget within the time ``left``; an extendable one also what
    earlier sections left unused (``left - later``: later sections keep their own ``later`` seconds),
    up to EXTEND_FACTOR x its own."""
    budget = min(own, left)
    if extendable:
        budget = max(budget, min(EXTEND_FACTOR * own, left - later))
    return budget


class Terminated(Exception):
    """SIGTERM (gpu_check.sh's hard limit): the running section is killed and the report written."""


def _on_sigterm(signum, frame):
    raise Terminated()


def main(argv=None) -> int:
    a = parse_args(argv)
    signal.signal(signal.SIGTERM, _on_sigterm)
    sections = list(SECTIONS)
    hang = os.environ.get(HANG_ENV)
    if hang:  # test only: a section that never ends, after env
        sections.insert(1, Section("hang", float(hang), float(hang), "test only: a child, then sleep"))
    ctx = {"date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"), "commit": git_commit(),
           "command": " ".join([Path(sys.executable).name, *sys.argv]) if argv is None
           else "gpu_check.py " + " ".join(map(str, argv))}
    deadline = Deadline(a.budget_s)
    rep = Report(a.out_dir, a, sections, ctx)
    work = Path(tempfile.mkdtemp(prefix="flexsp_gpu_check_"))
    ctx_file = work / "ctx.json"
    def own_budget(sec):
        return a.budgets.get(sec.name, sec.smoke_budget_s if a.smoke else sec.budget_s)
    chosen = [s for s in sections
              if not ((a.only and s.name not in a.only and s.name != "hang") or s.name in a.skip)]
    for i, sec in enumerate(sections):
        if sec not in chosen:
            rep.set(sec.name, {"status": "skipped (--only/--skip)", "lines": []})
            continue
        own = own_budget(sec)
        later = sum(own_budget(s) for s in chosen if sections.index(s) > i)
        budget = section_budget(own, sec.extendable, deadline.left(), later)
        if budget < min(own, MIN_SECTION_S):
            rep.set(sec.name, {"status": f"skipped: total budget spent ({deadline.left():.0f} s left)",
                               "lines": []})
            continue
        ctx_file.write_text(json.dumps(ctx))
        rep.set(sec.name, {"status": "running", "lines": [], "budget_s": round(budget, 1)})
        try:
            res = run_section(sec, budget, a.smoke, a.out_dir, work, ctx_file)
        except (Terminated, KeyboardInterrupt) as exc:
            partial = read_result(work / f"{sec.name}.json") or {"lines": [], "data": {}, "key": ""}
            rep.set(sec.name, {**partial, "budget_s": round(budget, 1),
                               "status": f"killed: {type(exc).__name__} (hard total limit) while running"})
            print(f"[gpu_check] {type(exc).__name__}: stopped in section {sec.name}", flush=True)
            return 124
        ctx.update(res.get("data", {}).get("export", {}))
        rep.set(sec.name, res)
    summary = rep.summary()
    print("\n".join(["", f"[gpu_check] report: {a.out_dir / 'report.md'}", *summary]), flush=True)
    bad = [n for n, r in rep.results.items() if r["status"] != "ok" and not r["status"].startswith("skipped")]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
