"""CPU step time of the 4-rank demo before and after the hot-path changes, side by side in one run.

BEFORE = the trainer at commit ``--before`` (default a6ed5cd: model built on the device, per
micro-batch ``float(loss)`` / ``int(count)`` / ``int(pad_mask.sum())`` host reads, planner on a rank-0
thread), run from a git worktree of that commit (``--worktree``, created if missing, removed at the
end unless ``--keep-worktree``) with that tree first on PYTHONPATH and as the working directory.
AFTER = this checkout (meta-device init, loss stats accumulated on the device and read once per
step, planner in a subprocess, ring plan cached per micro-batch). Both run with the same venv python
under ``python -m torch.distributed.run --standalone --nproc_per_node 4 -m flexsp.train`` with the
demo's config (scripts/demo.sh) minus checkpoints and the progress bar; each version gets its own
corpus cache directory (the cache formats may differ), built by an untimed 1-step warm-up run per
version, and its own output directory per run. Runs are interleaved (before, after, before, after,
...). Per run: median ``step_s`` from metrics.jsonl excluding the first ``--skip`` steps, tokens/s over
the same steps, losses, planner wait; the after/before ratio of the medians of all runs and of the
fastest run per step, and a verdict that calls a difference only when both agree beyond 3%.

    python benchmarks/hot_path.py --steps 15 --repeats 2 --out benchmarks/results/hot_path_cpu
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
import stamp as provenance  # noqa: E402  (benchmarks/stamp.py)
PY = Path(sys.executable)
"""The interpreter of both versions (the venv that runs this script)."""

DEMO = ["data=stdlib", "data.stdlib_max_files=60", "data.corpus.max_doc_tokens=4096",
        "data.corpus.vocab_size=2048", "solver.cost_model=configs/costmodels/cpu-demo-1k.json",
        "train.global_batch=6", "train.lr=5e-3", "train.warmup_steps=3", "train.resume=never",
        "train.progress=false"]


def overrides(steps: int, out: Path, cache: Path, checkpoint_every: int) -> list[str]:
    return [*DEMO, f"train.steps={steps}", f"train.checkpoint_every={checkpoint_every}",
            f"data.corpus.cache_dir={cache}", f"output_dir={out}"]


def run_one(tree: Path, args: list[str], timeout: float, log: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": "1"}
    env.pop("PYTHONSTARTUP", None)
    cmd = [str(PY), "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "4",
           "-m", "flexsp.train", *args]
    load0 = os.getloadavg()[0]
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        p = subprocess.run(cmd, cwd=tree, env=env, stdout=fh, stderr=subprocess.STDOUT, timeout=timeout)
    wall = time.perf_counter() - t0
    if p.returncode:
        raise SystemExit(f"run failed (exit {p.returncode}) in {tree}; log {log}:\n" + log.read_text()[-3000:])
    return {"wall_s": wall, "load_before": load0, "load_after": os.getloadavg()[0], "log": str(log)}


def read_metrics(out: Path, skip: int) -> dict:
    recs = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    kept = recs[skip:]   # file order = step order (before: 0-based "step", after: 1-based)
    st = [r["step_s"] for r in kept]
    return {"steps": len(recs), "step_s": [r["step_s"] for r in recs],
            "median_step_s": statistics.median(st), "mean_step_s": statistics.fmean(st),
            "tokens_per_s": sum(r["tokens"] for r in kept) / sum(st),
            "losses": [r["loss"] for r in recs], "plans": [r["plan"] for r in recs],
            "doc_ids": [r.get("doc_ids") for r in recs], "tokens": [r["tokens"] for r in recs],
            "plan_wait_ms": [r["plan_wait_ms"] for r in recs], "planner_ms": [r["planner_ms"] for r in recs],
            "predicted_ms": [r["predicted_ms"] for r in recs], "memory_mb": recs[-1]["memory_mb"]}


def expand(summary: str) -> str:
    """A plan summary with run-length ``kx(...)`` micro-batches written out (the after version
    run-length encodes repeated micro-batches, the before version does not), so the two compare."""
    import re
    head, _, body = summary.partition(": ")
    items = []
    for it in body.split(" | "):
        m = re.fullmatch(r"(\d+)x\((.*)\)", it)
        items += [m.group(2)] * int(m.group(1)) if m else [it]
    return head + ": " + " | ".join(items)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--before", default="a6ed5cd", help="commit of the BEFORE trainer")
    p.add_argument("--worktree", default="/tmp/flexsp_before", help="where its exported tree lives")
    p.add_argument("--keep-worktree", action="store_true")
    p.add_argument("--work", default="/tmp/flexsp_hot_path", help="output + cache directories of the runs")
    p.add_argument("--steps", type=int, default=15)
    p.add_argument("--skip", type=int, default=2, help="first steps left out of the medians")
    p.add_argument("--repeats", type=int, default=2, help="runs per version (interleaved)")
    p.add_argument("--timeout-s", type=float, default=600)
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "hot_path_cpu"))
    p.add_argument("--note", default="", help="a paragraph written under the summary (what the numbers show)")
    p.add_argument("--summarize", default=None, metavar="JSON",
                   help="only rewrite STEM.md from a saved STEM.json (no runs); --note replaces its note")
    a = p.parse_args(argv)
    if a.summarize:
        res = json.loads(Path(a.summarize).read_text())
        if a.note:
            res["note"] = a.note
        write(res, Path(a.out))
        return 0
    cmdline = "python benchmarks/hot_path.py " + " ".join(sys.argv[1:] if argv is None else argv)
    stamp = provenance.start(cmdline.split(" "))
    before = Path(a.worktree)
    made = not (before / "flexsp" / "train.py").is_file()
    if made:
        before.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(["git", "-C", str(REPO), "archive", "--format=tar", a.before],
                                 capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(before)], input=archive, check=True)
    rev_before = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", a.before], capture_output=True,
                                text=True, check=True).stdout.strip()
    rev_after = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                               text=True, check=True).stdout.strip()
    dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--", "flexsp", "solver", "configs"],
                           capture_output=True, text=True).stdout.strip()
    work = Path(a.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    trees = {"before": before, "after": REPO}
    load_start = os.getloadavg()
    try:
        warm = {}
        for v, tree in trees.items():   # untimed: builds each version's corpus cache, compiles bytecode
            w = run_one(tree, overrides(1, work / f"warmup_{v}", work / f"cache_{v}", 0), a.timeout_s,
                        work / f"warmup_{v}.log")
            warm[v] = w
            print(f"[hot_path] warm-up {v}: {w['wall_s']:.1f} s", flush=True)
        runs = []
        for r in range(a.repeats):
            for v in ("before", "after"):
                out = work / f"run{r}_{v}"
                info = run_one(trees[v], overrides(a.steps, out, work / f"cache_{v}", 0), a.timeout_s,
                               work / f"run{r}_{v}.log")
                info.update(version=v, repeat=r, **read_metrics(out, a.skip))
                runs.append(info)
                print(f"[hot_path] {v} #{r}: median step {info['median_step_s'] * 1e3:.0f} ms, "
                      f"{info['tokens_per_s']:.0f} tok/s, loss {info['losses'][0]:.3f} -> {info['losses'][-1]:.3f}, "
                      f"wall {info['wall_s']:.0f} s, load {info['load_before']:.2f} -> {info['load_after']:.2f}",
                      flush=True)
    finally:
        if made and not a.keep_worktree:
            shutil.rmtree(before, ignore_errors=True)
    stamp = provenance.finish(stamp)
    res = {"stamp": provenance.to_json(stamp), "command": cmdline, "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
           "machine": f"{platform.node()} {platform.machine()}, {os.cpu_count()} CPUs",
           "before": rev_before, "after": rev_after, "after_dirty_files": dirty.splitlines(),
           "note": a.note, "args": vars(a), "overrides": overrides(a.steps, Path("<out>"), Path("<cache>"), 0),
           "loadavg_start": list(load_start), "loadavg_end": list(os.getloadavg()), "warmup": warm, "runs": runs}
    write(res, Path(a.out))
    return 0


def write(res: dict, out: Path) -> None:
    runs, a = res["runs"], res["args"]
    med = {v: statistics.median([r["median_step_s"] for r in runs if r["version"] == v]) for v in ("before", "after")}
    tps = {v: statistics.median([r["tokens_per_s"] for r in runs if r["version"] == v]) for v in ("before", "after")}
    wait = {v: statistics.median([w for r in runs if r["version"] == v for w in r["plan_wait_ms"][a["skip"]:]])
            for v in ("before", "after")}
    b0 = next(r for r in runs if r["version"] == "before")
    f0 = next(r for r in runs if r["version"] == "after")
    same_docs = b0["doc_ids"] == f0["doc_ids"]
    same_tokens = b0["tokens"] == f0["tokens"]
    same_plans = sum(expand(x) == expand(y) for x, y in zip(b0["plans"], f0["plans"]))
    loss_diff = [abs(x - y) for x, y in zip(b0["losses"], f0["losses"])]
    L = [f"# Hot path: CPU step time of the 4-rank demo, before ({res['before']}) vs after ({res['after']})", "",
         *([provenance.markdown_block(provenance.Stamp(**res["stamp"]))] if "stamp" in res else []),
         f"MEASURED. Command: `{res['command']}` (date {res['date']}).", "",
         f"Machine: {res['machine']}; 4 gloo ranks x 1 thread (OMP_NUM_THREADS=1) on 2 cores, so the ranks are "
         f"oversubscribed 2:1 as in the demo. 1-minute load average {res['loadavg_start'][0]:.2f} at the start and "
         f"{res['loadavg_end'][0]:.2f} at the end (per run below). **The machine is shared: other agents' jobs "
         f"may have been running during any of these runs**, which inflates and scatters the timings; runs "
         f"were interleaved (before, after, before, after, ...) so drift hits both alike.", "",
         f"Each run: `python -m torch.distributed.run --standalone --nproc_per_node 4 -m flexsp.train "
         f"{' '.join(res['overrides'])}` with the same venv python (torch {_torch_version()}); BEFORE from an "
         f"export of {res['before']} (`git archive`; that tree first on PYTHONPATH and as cwd; removed afterwards), AFTER from "
         f"this checkout{' (uncommitted changes to: ' + ', '.join(res['after_dirty_files']) + ')' if res['after_dirty_files'] else ''}. "
         f"Separate corpus caches per version, each built by an untimed 1-step warm-up run; separate output dirs. "
         f"Step time = metrics.jsonl `step_s` (planner wait + all micro-batches + optimizer step + the step's stats "
         f"all-reduce, as the trainer measures it); median over steps {a['skip'] + 1}-{a['steps']} (the first "
         f"{a['skip']} left out); tokens/s = tokens / step_s summed over the same steps.", "",
         "| run | version | median step ms | mean step ms | tokens/s | median plan wait ms | loss step 1 -> last | wall s (incl. start-up) | load 1-min before -> after |",
         "|---|---|---|---|---|---|---|---|---|"]
    for i, r in enumerate(runs):
        L.append(f"| {i + 1} | {r['version']} | {r['median_step_s'] * 1e3:.0f} | {r['mean_step_s'] * 1e3:.0f} | "
                 f"{r['tokens_per_s']:.0f} | {statistics.median(r['plan_wait_ms'][a['skip']:]):.1f} | "
                 f"{r['losses'][0]:.4f} -> {r['losses'][-1]:.4f} | {r['wall_s']:.0f} | "
                 f"{r['load_before']:.2f} -> {r['load_after']:.2f} |")
    # load-robust secondary estimate (as throughput.py keeps the fastest): every step index is the
    # same global batch in every run, so take each step's fastest time over the runs of a version
    fastest = {v: [min(r["step_s"][k] for r in runs if r["version"] == v) for k in range(a["skip"], a["steps"])]
               for v in ("before", "after")}
    per_step = [x / y for x, y in zip(fastest["after"], fastest["before"])]
    geo = statistics.geometric_mean(per_step)
    ratio_med, ratio_fast = med["after"] / med["before"], sum(fastest["after"]) / sum(fastest["before"])
    if ratio_med < 0.97 and ratio_fast < 0.97:
        verdict = "after is FASTER by both estimates"
    elif ratio_med > 1.03 and ratio_fast > 1.03:
        verdict = "after is SLOWER by both estimates"
    else:
        verdict = ("NO CLEAR DIFFERENCE: the two estimates disagree or are within 3% of 1 (load noise is "
                   "larger than the change on this CPU)")
    L += ["", f"**Verdict: {verdict}.** after / before: fastest-of-{a['repeats']} per step {ratio_fast:.3f} "
          f"(the least disturbed estimate), medians of the per-run medians {ratio_med:.3f}.", "",
          f"After / before, ratio of the medians of the per-run medians: {ratio_med:.3f} "
          f"({med['after'] * 1e3:.0f} ms vs {med['before'] * 1e3:.0f} ms per step; tokens/s "
          f"{tps['after']:.0f} vs {tps['before']:.0f}, {tps['after'] / tps['before']:.3f}x). Per-step planner wait "
          f"(median over kept steps of all runs): before {wait['before']:.1f} ms, after {wait['after']:.1f} ms.", "",
          f"Fastest-of-{a['repeats']} per step (each step index is the same global batch in every run; other jobs "
          f"only add time): sum over steps {a['skip'] + 1}-{a['steps']} after / before = "
          f"{sum(fastest['after']) / sum(fastest['before']):.3f}, geometric mean of the per-step ratios {geo:.3f} "
          f"(range {min(per_step):.2f}-{max(per_step):.2f}).", "",
          f"Same global batches in both versions: documents {'identical' if same_docs else 'DIFFERENT'}, "
          f"token counts {'identical' if same_tokens else 'DIFFERENT'}; identical plan summaries in "
          f"{same_plans}/{len(b0['plans'])} steps (the planner also changed in this range). Losses are close but "
          f"not identical: the initialisation changed after {res['before']} (seeded per-shard fill on meta-built modules instead "
          f"of Module init on the device), so the two versions start from different weights; "
          f"|loss_after - loss_before| per step: max {max(loss_diff):.4f}, mean {statistics.fmean(loss_diff):.4f}. "
          f"Repeated runs of one version: " + "; ".join(_repeat_note(runs, v) for v in ("before", "after")) + ".", "",
          *([res["note"], ""] if res.get("note") else []),
          "Host syncs (from the code; gloo on CPU, where a sync costs little since the device is the host): "
          "before, `StepExecutor.run` read `float(loss)`, `int(count)` and `int(pad_mask.sum())` on the host for "
          "every micro-batch a rank ran (3 reads per non-idle micro-batch), then the trainer read the stats and "
          "`float(gnorm)` once per step; after, loss/targets/tokens accumulate as device tensors and the trainer does "
          "one `stats.tolist()` (after an all-reduce that also carries the stop flag) plus `float(gnorm)` per step, "
          "with document boundaries taken from the host-side lengths. On a CPU run this mostly saves Python "
          "overhead, not device stalls; the GPU benefit is not measured here.", "",
          f"## Per step: fastest of the {a['repeats']} runs of each version", "",
          "| step | plan (before, run 1) | plan (after, run 1) | fastest before ms | fastest after ms | after / before |",
          "|---|---|---|---|---|---|"]
    for k in range(a["skip"], a["steps"]):
        fb, fa = fastest["before"][k - a["skip"]], fastest["after"][k - a["skip"]]
        L.append(f"| {k + 1} | {_cell(b0['plans'][k])} | {_cell(f0['plans'][k])} | {fb * 1e3:.0f} | {fa * 1e3:.0f} | {fa / fb:.2f} |")
    L += ["", "## Per step (run 1 of each version)", "",
          "| step | before ms | after ms | before loss | after loss | before plan | after plan | before wait ms | after wait ms |",
          "|---|---|---|---|---|---|---|---|---|"]
    for k in range(max(len(b0["losses"]), len(f0["losses"]))):
        g = lambda r, f, i=k: r[f][i] if i < len(r[f]) else None  # noqa: E731
        L.append(f"| {k + 1} | {g(b0, 'step_s') * 1e3:.0f} | {g(f0, 'step_s') * 1e3:.0f} | {g(b0, 'losses'):.4f} | "
                 f"{g(f0, 'losses'):.4f} | {_cell(g(b0, 'plans'))} | {_cell(g(f0, 'plans'))} | {g(b0, 'plan_wait_ms'):.1f} | "
                 f"{g(f0, 'plan_wait_ms'):.1f} |")
    out.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{out}.md").write_text("\n".join(L) + "\n")
    Path(f"{out}.json").write_text(json.dumps(res, indent=1) + "\n")
    print("\n".join(L[:14]), flush=True)
    print(f"[hot_path] wrote {out}.md, {out}.json", flush=True)


def _cell(text) -> str:
    return str(text).replace("|", "\\|")   # plan summaries separate micro-batches with "|"


def _repeat_note(runs: list, v: str) -> str:
    rs = [r for r in runs if r["version"] == v]
    diff = []
    for i, r in enumerate(rs[1:], 2):
        if r["losses"] != rs[0]["losses"] or r["plans"] != rs[0]["plans"]:
            steps = [k + 1 for k, (x, y) in enumerate(zip(r["plans"], rs[0]["plans"])) if x != y]
            dl = max(abs(x - y) for x, y in zip(r["losses"], rs[0]["losses"]))
            diff.append(f"its run {i} differs from run 1 (plans differ at step(s) {steps or 'none'}, max loss "
                        f"difference {dl:.1e})")
    return f"{v}: " + (", ".join(diff) if diff else f"all {len(rs)} runs give the same plans and bit-identical losses")


def _torch_version() -> str:
    try:
        import torch
        return torch.__version__
    except ImportError:
        return "?"


if __name__ == "__main__":
    sys.exit(main())
