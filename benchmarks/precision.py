"""Loss curves of the tiny model under train.precision=fp32, bf16 (mixed) and bf16-pure, 30 steps.

One spawned 2-rank gloo world (tests/dist_harness.run_distributed) calls ``flexsp.train.run`` once per
precision with an otherwise identical config (same data, seed, sampler, planner settings; separate
output directories), plus a second fp32 run as the run-to-run noise floor and a 0-step run for the
initial weights. Reported per precision: max and mean |loss - fp32 loss| over the steps, the final
loss, and the final parameters' relative distance to fp32's (``return_state=True``: the full state
dict, compared in fp32), next to how far fp32's parameters moved from the initial ones.

    python benchmarks/precision.py --steps 30 --out benchmarks/results/precision_tiny
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
for p in (REPO, REPO / "tests"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import stamp as provenance  # noqa: E402  (benchmarks/stamp.py; benchmarks/ is the script's directory)

RUNS = ("fp32", "bf16", "bf16-pure", "fp32-repeat")


def overrides(a, out: Path, precision: str, steps: int) -> list[str]:
    return ["data=stdlib", f"data.stdlib_max_files={a.files}", f"data.corpus.max_doc_tokens={a.max_doc_tokens}",
            f"data.corpus.cache_dir={a.work}/cache", f"train.steps={steps}", f"train.global_batch={a.global_batch}",
            f"train.lr={a.lr}", f"train.warmup_steps={a.warmup}", f"train.min_lr_ratio={a.min_lr_ratio}",
            f"train.precision={precision}", f"train.seed={a.seed}", "train.checkpoint_every=0",
            "train.resume=never", "train.progress=false", "solver.cost_model=configs/costmodels/cpu-demo-1k.json",
            f"output_dir={out}"]


def compose(ov: list[str]) -> dict:
    from hydra import compose as h_compose, initialize_config_dir
    from omegaconf import OmegaConf
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        cfg = h_compose(config_name="config", overrides=ov)
    return OmegaConf.to_container(cfg, resolve=True)


def _np(state):
    return {k: v.detach().float().numpy().copy() for k, v in state.items()}


def body(rank, world_size, cfgs: dict):
    import time as _t

    from flexsp.train import run
    os.chdir(REPO)   # relative cost-model path
    out = {}
    for name, cfg in cfgs.items():
        t0 = _t.perf_counter()
        s = run(cfg, return_state=True)
        out[name] = {"losses": [s["losses"][k] for k in sorted(s["losses"])], "seconds": _t.perf_counter() - t0,
                     "state": _np(s["state_dict"]) if rank == 0 else None}
    return out


def rel_dist(a: dict, b: dict) -> float:
    import numpy as np
    num = sum(float(((a[k] - b[k]).astype(np.float64) ** 2).sum()) for k in b)
    den = sum(float((b[k].astype(np.float64) ** 2).sum()) for k in b)
    return (num / den) ** 0.5


def unchanged(final: dict, init: dict, pure: bool) -> dict:
    """Fraction of parameter elements still equal to their initial value (for bf16-pure: the initial
    value rounded to bf16, as it stores them): all parameters, the RMSNorm weights (start at 1.0,
    where bf16's spacing is 2^-7) and the rest."""
    import torch
    acc = {"all": [0, 0], "norm weights": [0, 0], "other": [0, 0]}
    for k, v in init.items():
        ref = torch.from_numpy(v).to(torch.bfloat16).float().numpy() if pure else v
        same, n = int((final[k] == ref).sum()), v.size
        kind = "norm weights" if "norm" in k else "other"
        for key in ("all", kind):
            acc[key][0] += same
            acc[key][1] += n
    out = {key: (s_ / n_ if n_ else float("nan")) for key, (s_, n_) in acc.items()}
    return out | {"norm_numel": acc["norm weights"][1], "numel": acc["all"][1]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--world-size", type=int, default=2)
    p.add_argument("--files", type=int, default=60, help="data.stdlib_max_files")
    p.add_argument("--max-doc-tokens", type=int, default=1024)
    p.add_argument("--global-batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--min-lr-ratio", type=float, default=0.02, help="cosine decay ends at lr * this")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", default="/tmp/flexsp_precision")
    p.add_argument("--timeout-s", type=float, default=900)
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "precision_tiny"))
    p.add_argument("--note", default="", help="a paragraph written under the table (what the numbers show)")
    p.add_argument("--summarize", default=None, metavar="JSON",
                   help="only rewrite STEM.md/STEM.png from a saved STEM.json (no runs); --note replaces its note")
    a = p.parse_args(argv)
    if a.summarize:
        s = json.loads(Path(a.summarize).read_text())
        if a.note:
            s["note"] = a.note
        write(s, Path(a.out))
        return 0
    cmdline = "python benchmarks/precision.py " + " ".join(sys.argv[1:] if argv is None else argv)
    stamp = provenance.start(cmdline.split(" "))
    from dist_harness import run_distributed
    work = Path(a.work)
    for name in (*RUNS, "init"):
        shutil.rmtree(work / name, ignore_errors=True)
    # the initial weights: train.steps must be >= 1 and lr > 0, so 1 step at lr 1e-30 (an update far
    # below fp32's resolution of weights ~init_std: the parameters stay the seeded initial ones)
    cfgs = {"init": compose([*overrides(a, work / "init", "fp32", 1), "train.lr=1e-30"])}
    cfgs |= {name: compose(overrides(a, work / name, name.replace("-repeat", ""), a.steps)) for name in RUNS}
    load0 = os.getloadavg()
    t0 = time.perf_counter()
    res = run_distributed(body, a.world_size, args=(cfgs,), timeout=a.timeout_s,
                          env={"OMP_NUM_THREADS": "1"})[0]
    wall = time.perf_counter() - t0
    load1 = os.getloadavg()
    plans = {}
    for name in RUNS:
        recs = [json.loads(ln) for ln in (work / name / "metrics.jsonl").read_text().splitlines() if ln.strip()]
        plans[name] = [r["plan"] for r in recs]
        res[name]["lr"] = [r["lr"] for r in recs]
        res[name]["doc_ids"] = [r.get("doc_ids") for r in recs]
        res[name]["step_s"] = [r["step_s"] for r in recs]
    ref = res["fp32"]
    init = res["init"]["state"]
    moved = rel_dist(ref["state"], init)
    rows = {}
    for name in RUNS:
        d = [abs(x - y) for x, y in zip(res[name]["losses"], ref["losses"])]
        rows[name] = {"max_abs_diff": max(d), "mean_abs_diff": statistics.fmean(d), "final_loss": res[name]["losses"][-1],
                      "abs_diff": d, "param_rel_dist": rel_dist(res[name]["state"], ref["state"]),
                      "param_rel_dist_to_init": rel_dist(res[name]["state"], init),
                      "unchanged": unchanged(res[name]["state"], init, name == "bf16-pure"),
                      "same_plans": plans[name] == plans["fp32"], "same_docs": res[name]["doc_ids"] == ref["doc_ids"],
                      "mean_step_s": statistics.fmean(res[name]["step_s"][2:])}
    summary = {"stamp": provenance.to_json(provenance.finish(stamp)), "command": cmdline, "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
               "machine": f"{platform.node()} {platform.machine()}, {os.cpu_count()} CPUs", "args": vars(a),
               "overrides": overrides(a, Path("<out>"), "<precision>", a.steps), "wall_s": wall,
               "loadavg_start": list(load0), "loadavg_end": list(load1), "fp32_moved_from_init": moved,
               "note": a.note, "rows": rows, "losses": {n: res[n]["losses"] for n in RUNS}, "lr": ref["lr"], "plans": plans}
    write(summary, Path(a.out))
    return 0


def write(s: dict, out: Path) -> None:
    a, rows = s["args"], s["rows"]
    L = [f"# Precision: {a['steps']} steps of the tiny model, fp32 vs bf16 (mixed) vs bf16-pure", "",
         *([provenance.markdown_block(provenance.Stamp(**s["stamp"]))] if "stamp" in s else []),
         "MEASURED losses and parameters (deterministic: load changes only the wall time). "
         f"Command: `{s['command']}` (date {s['date']}, {s['wall_s']:.0f} s wall for all runs).", "",
         f"Machine: {s['machine']}; {a['world_size']} gloo ranks x 1 thread, one spawned world "
         f"(tests/dist_harness.run_distributed) calling `flexsp.train.run(cfg, return_state=True)` for each "
         f"precision in turn. 1-minute load average {s['loadavg_start'][0]:.2f} at the start, "
         f"{s['loadavg_end'][0]:.2f} at the end; **the machine is shared, other agents' jobs may have been "
         f"running** (this changes only timings, not the numbers below).", "",
         f"Config (identical but for `train.precision`): `{' '.join(s['overrides'])}` (model tiny, AdamW, "
         f"cosine schedule from lr {a['lr']} after {a['warmup']} warm-up steps down to {a['lr'] * a['min_lr_ratio']:.1e} "
         f"at step {a['steps']}, so late updates are small). bf16 = fp32 master parameters and AdamW states, bf16 "
         f"compute, fp32 gradient reduction; bf16-pure = bf16 parameters and optimizer states.", "",
         "| precision | max abs(loss - fp32) | mean abs(loss - fp32) | final loss | final params: rel. distance to fp32 | same docs / plans as fp32 |",
         "|---|---|---|---|---|---|"]
    for name, r in rows.items():
        label = "fp32 (repeat: noise floor)" if name == "fp32-repeat" else name
        L.append(f"| {label} | {r['max_abs_diff']:.2e} | {r['mean_abs_diff']:.2e} | {r['final_loss']:.4f} | "
                 f"{r['param_rel_dist']:.2e} | {'yes' if r['same_docs'] else 'NO'} / {'yes' if r['same_plans'] else 'NO'} |")
    b, pb = rows["bf16"], rows["bf16-pure"]
    third = len(b["abs_diff"]) // 3
    L += ["", f"Relative parameter distance = ||theta - theta_fp32|| / ||theta_fp32|| over all parameters (compared "
          f"in fp32). For scale: fp32's parameters moved {s['fp32_moved_from_init']:.2e} (relative) from the initial "
          f"weights in {a['steps']} steps; bf16's own resolution is 2^-8 = 3.9e-3 relative.", "",
          "Parameter elements still exactly at their initial value after the run (bf16-pure: at the "
          "bf16-rounded initial value it starts from): " + "; ".join(
              f"{n} {r['unchanged']['all']:.1%} of all, {r['unchanged']['norm weights']:.1%} of the RMSNorm weights, "
              f"{r['unchanged']['other']:.1%} of the rest" for n, r in rows.items()
              if n != "fp32-repeat" and r.get("unchanged")) + ".", "",
          f"Mean abs(loss diff) over steps 1-{third} / last {third}: bf16 {statistics.fmean(b['abs_diff'][:third]):.2e} / "
          f"{statistics.fmean(b['abs_diff'][-third:]):.2e}; bf16-pure {statistics.fmean(pb['abs_diff'][:third]):.2e} / "
          f"{statistics.fmean(pb['abs_diff'][-third:]):.2e}.", "",
          *([s["note"], ""] if s.get("note") else []),
          "## Per step", "", "| step | lr | fp32 | bf16 | bf16-pure | fp32 repeat |", "|---|---|---|---|---|---|"]
    for k, lr in enumerate(s["lr"]):
        L.append(f"| {k + 1} | {lr:.2e} | " + " | ".join(f"{s['losses'][n][k]:.4f}" for n in RUNS) + " |")
    out.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{out}.md").write_text("\n".join(L) + "\n")
    Path(f"{out}.json").write_text(json.dumps(s, indent=1) + "\n")
    plot(s, Path(f"{out}.png"))
    print("\n".join(L[:20]), flush=True)
    print(f"[precision] wrote {out}.md, {out}.json, {out}.png", flush=True)


def plot(s: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4))
    steps = range(1, len(s["losses"]["fp32"]) + 1)
    for n, style in (("fp32", "k-"), ("bf16", "C0--"), ("bf16-pure", "C3:")):
        ax.plot(steps, s["losses"][n], style, label=n, lw=1.6)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(f"tiny model, {s['args']['world_size']} gloo ranks")
    ax.legend()
    for n, c in (("bf16", "C0"), ("bf16-pure", "C3"), ("fp32-repeat", "0.6")):
        d = [max(x, 1e-7) for x in s["rows"][n]["abs_diff"]]
        bx.semilogy(steps, d, color=c, marker=".", label=n if n != "fp32-repeat" else "fp32 repeat (1e-7 = 0)")
    bx.set_xlabel("step")
    bx.set_ylabel("|loss - fp32 loss|")
    bx.set_title("distance to fp32")
    bx.legend()
    fig.tight_layout()
    meta = provenance.png_metadata(provenance.Stamp(**s["stamp"])) if "stamp" in s else {}
    fig.savefig(path, dpi=110, metadata=meta)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
