"""Measured training throughput: FlexSP adaptive SP vs static SP baselines, side by side.

The same global batches (document lengths from a published long-tailed distribution of
``solver.workloads``, scaled down so the longest fits what this machine can run; random tokens)
are trained on the same ranks with (every method but DeepSpeed's in one world; DeepSpeed's baseline
in a second, freshly spawned world afterwards, so the main run never imports or initialises
DeepSpeed, which was measured to slow every method in the same process):

- ``ulysses-full``: static Ulysses at the full degree N (DeepSpeed-Ulysses-like; the official
  FlexSP "static" packing: best-fit-decreasing into bins of 0.9 * C * N tokens);
- ``static-d``: the same packing at every smaller degree d that holds the longest document; the
  best *measured* static degree is reported as ``best static``;
- ``deepspeed-ulysses``: the ulysses-full plan, but attention through DeepSpeed's own
  ``DistributedAttention`` (KV heads expanded when the degree does not divide them), in its own world;
- ``best-homogeneous``: the official code's BatchAda (best single degree, time-balanced packing);
- ``flexsp``: the FlexSP planner (``solver.planner.plan_batch``), degrees mixed per micro-batch.

Every step = ``StepExecutor.run(plan)`` (all micro-batches, FSDP2) + the optimizer step, fenced by
barriers; each method runs every batch ``--repeats`` times, methods interleaved per repetition
(order reversed every other repetition, so load drift hits all alike), the fastest kept (other
jobs on a shared machine only add time). Static plans are built with ``attention="ulysses"`` (the
mode they run). Predicted step time = ``price_plan`` of the plan each method ran (each group priced
with its own attention mode), from the CostModel alone (its per-group terms plus ``step_overhead_ms``, which the profiler sets from
the timed optimizer step); the optimizer step is also timed here, for information only. The cost
model is a ``flexsp-profile`` file; the memory budget C (tokens per rank) is an emulated one
(``--capacity``), stated in the results, because a CPU's RAM would let any degree hold
everything and static SP would degenerate to one micro-batch.

Primary configuration on a 2-core CPU box: 2 ranks x 1 thread (no oversubscription)::

    flexsp-profile world_size=2 capacity_tokens=1024 name=profile_cpu2 output_dir=benchmarks/results
    python benchmarks/throughput.py --cost-model benchmarks/results/profile_cpu2.json \
        --world-size 2 --batches 2 --tokens 4096 --repeats 5 --capacity 1024 --out benchmarks/results/throughput_cpu2

Secondary: the same with world_size=4 / ``--world-size 4`` (4 ranks share 2 cores: a rank idle in a
micro-batch frees CPU for the others, which the per-group cost model cannot express).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

METHODS = ("ulysses-full", "static", "deepspeed-ulysses", "best-homogeneous", "flexsp")


def scaled_batches(name: str, num: int, tokens: int, max_len: int, ref_len: int, seed: int) -> list[list[int]]:
    """``num`` global batches of ~``tokens`` tokens: lengths of workload ``name`` with documents
    over ``ref_len`` dropped (the paper's context limit), then scaled by max_len / ref_len."""
    from solver.workloads import sample_lengths
    out = []
    for k in range(num):
        raw = sample_lengths(name, 4096, seed=seed + k, context_limit=ref_len)
        lens = np.clip(np.ceil(raw * max_len / ref_len), 8, max_len).astype(int)
        batch, total = [], 0
        for n in lens:
            if total >= tokens:
                break
            batch.append(int(n))
            total += int(n)
        out.append(batch)
    return out


def as_mode(plan, lengths, cm, mode: str):
    """``plan``'s groups rebuilt under the full cost model with every degree > 1 group forced to
    ``mode`` (solver.build.build_plan(attention=...)): what the static baselines run, priced so."""
    from solver.build import build_plan
    mbs = [[(g.sp, g.seq_ids) for g in mb.groups] for mb in plan.micro_batches]
    return build_plan(mbs, lengths, cm, method=plan.method, solve_seconds=plan.solve_seconds,
                      status=plan.status, extra=plan.extra, attention=mode)


def plans_for(lengths, cm, world: int) -> dict:
    """Every method's plan for one batch (rank 0). Static plans are packed with a Ulysses-only model,
    then rebuilt under the full model with attention="ulysses" on every SP group (the mode they run,
    and the mode their predicted_ms prices); flexsp's groups keep the planner's modes."""
    from solver.baselines import best_homogeneous_plan, static_plan, usable_degrees
    from solver.planner import plan_batch
    cm_u = replace(cm, ring_mb_per_token=0.0, p2p_bandwidth_gbps={})
    plans = {"ulysses-full": static_plan(lengths, cm_u, world)}
    for d in usable_degrees(cm_u):
        if d < world and max(lengths) <= d * cm.capacity_tokens:
            plans[f"static-{d}"] = static_plan(lengths, cm_u, d)
    plans["best-homogeneous"] = best_homogeneous_plan(lengths, cm_u)
    plans = {k: as_mode(p, lengths, cm, "ulysses") for k, p in plans.items()}
    plans["deepspeed-ulysses"] = plans["ulysses-full"]
    plans["flexsp"] = plan_batch(lengths, cm, time_limit=2.0)
    return {k: p.to_dict() for k, p in plans.items()}


class _DSContext:
    """AttnContext stand-in whose attention is DeepSpeed's DistributedAttention (Ulysses)."""

    _cache: dict = {}

    def __init__(self, inner):
        self.inner = inner

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def attention(self, q, k, v):
        import torch.distributed as dist
        from deepspeed.sequence.layer import DistributedAttention

        from flexsp.attention.local import varlen_attention
        ctx = self.inner
        if ctx.meta is None:
            return ctx.attention(q, k, v)
        sp = dist.get_world_size(ctx.group)
        if k.shape[1] % sp:  # DeepSpeed splits kv heads evenly: replicate them as the original does
            rep = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
        cu = [0, *np.cumsum(ctx.meta.padded_seqlens).tolist()]

        def local_attn(qq, kk, vv, *args, **kw):  # DeepSpeed layout [s, b, h, d], b = 1
            return varlen_attention(qq[:, 0], kk[:, 0], vv[:, 0], cu, causal=True)[:, None]

        ds = DistributedAttention(local_attn, ctx.group, scatter_idx=2, gather_idx=0)
        return ds(q[:, None], k[:, None], v[:, None], 1)[:, 0]


def _ds_shard_inputs(real):
    def wrapped(*args, **kwargs):
        inputs = real(*args, **kwargs)
        if inputs.attn_ctx.meta is not None:
            inputs.attn_ctx = _DSContext(inputs.attn_ctx)
        return inputs
    return wrapped


def rank_body(args: dict):
    import torch
    import torch.distributed as dist

    import flexsp.executor as ex
    from flexsp.data import GlobalBatch, SyntheticSource
    from flexsp.distributed import init_distributed
    from flexsp.config import ParallelConfig
    from flexsp.engines import RandomWeights, build_engine
    from flexsp.executor import StepExecutor
    from flexsp.model import Transformer, model_config
    from flexsp.planning import load_cost_model
    from flexsp.topology import SPTopology
    from flexsp.train import TrainConfig
    from solver.build import price_plan
    from solver.plan import Plan

    rank, world, device = init_distributed(None)
    use_ds = bool(args.get("ds_only"))  # DeepSpeed only in its own world (own processes), never the main one
    if use_ds:
        import deepspeed
        deepspeed.init_distributed(dist_backend=dist.get_backend())
    topo = SPTopology(world).build()
    cm = replace(load_cost_model(args["cost_model"], world), capacity_override=args["capacity"])
    mcfg = model_config(args["model"])
    torch.manual_seed(0)
    engine = build_engine("fsdp2", lambda dev: Transformer(mcfg, device=dev), RandomWeights(0, mcfg.init_std, mcfg.layers),
                          TrainConfig(steps=10**6, warmup_steps=0, lr=1e-4, precision="fp32"), ParallelConfig(), world,
                          device)
    dists = {d: scaled_batches(d, args["batches"], args["tokens"], args["max_len"], args["ref_len"], args["seed"])
             for d in args["distributions"]}
    all_lens = [n for bs in dists.values() for b in bs for n in b]
    source = SyntheticSource(all_lens, mcfg.vocab_size, 0)
    executor = StepExecutor(engine, source, topo, rank, device, mcfg.heads)
    real_shard = ex.shard_inputs

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def timed(fn):
        sync()
        dist.barrier()
        t0 = time.perf_counter()
        fn()
        sync()
        dist.barrier()
        return (time.perf_counter() - t0) * 1e3

    def run_step(plan, batch, ds: bool):
        ex.shard_inputs = _ds_shard_inputs(real_shard) if ds else real_shard
        try:
            executor.run(plan, batch)
            engine.step()
        finally:
            ex.shard_inputs = real_shard

    # optimizer step alone: for information (the predictions use the cost model's step_overhead_ms)
    b0 = GlobalBatch(0, 0, (0,), (all_lens[0],))
    p0 = Plan.from_dict(plans_for([all_lens[0]], cm, world)["flexsp"]) if rank == 0 else None
    box = [p0.to_dict() if p0 else None]
    dist.broadcast_object_list(box, src=0)
    p0 = Plan.from_dict(box[0])
    opt = []
    for _ in range(3):
        executor.run(p0, b0)
        opt.append(timed(engine.step))
    optimizer_ms = min(opt)

    rows, start, doc = [], time.perf_counter(), 0
    for dname, batches in dists.items():
        for k, lens in enumerate(batches):
            ids = tuple(range(doc, doc + len(lens)))
            doc += len(lens)
            batch = GlobalBatch(k, 0, ids, tuple(lens))
            box = [plans_for(lens, cm, world) if rank == 0 else None]
            dist.broadcast_object_list(box, src=0)
            plans = {m: Plan.from_dict(p) for m, p in box[0].items()}
            if use_ds:
                plans = {"deepspeed-ulysses": plans["deepspeed-ulysses"]}
            else:
                plans.pop("deepspeed-ulysses")
            for m, plan in plans.items():  # warm-up every plan once
                timed(lambda: run_step(plan, batch, m == "deepspeed-ulysses"))
            times = {m: [] for m in plans}
            for r in range(args["repeats"]):
                order = list(plans) if r % 2 == 0 else list(reversed(plans))
                for m in order:
                    times[m].append(timed(lambda: run_step(plans[m], batch, m == "deepspeed-ulysses")))
            for m, plan in plans.items():
                pred = price_plan(plan, lens, cm)  # the plan it runs, each group priced with its mode
                assert abs(pred - plan.predicted_ms) <= 1e-6 * max(1.0, pred), (m, pred, plan.predicted_ms)
                rows.append({"distribution": dname, "batch": k, "method": m, "tokens": sum(lens),
                             "docs": len(lens), "max_len": max(lens), "plan": plan.summary(),
                             "predicted_ms": pred, "process": "deepspeed world" if use_ds else "main",
                             "modes": sorted({g.attention for mb in plan.micro_batches for g in mb.groups}),
                             "measured_ms": min(times[m]), "all_ms": times[m],
                             "loadavg": list(os.getloadavg())})
            if rank == 0:
                print(f"[throughput] {dname} batch {k}: " + ", ".join(
                    f"{m} {min(t):.0f} ms" for m, t in times.items()), flush=True)
    if rank != 0:
        return None
    return {"rows": rows, "optimizer_ms": optimizer_ms, "cost_model": cm.to_dict(), "world_size": world,
            "device": str(device), "backend": dist.get_backend(), "seconds": time.perf_counter() - start,
            "model": args["model"], "threads_per_rank": torch.get_num_threads()}


def _load_range(rows) -> str:
    """'; 1-min load after each batch A-B' from the per-row load averages (absent in old results)."""
    one = [r["loadavg"][0] for r in rows if r.get("loadavg")]
    return f"; 1-min load after each batch {min(one):.2f}-{max(one):.2f}" if one else ""


def summarize(res: dict) -> tuple[list[str], dict]:
    """Markdown lines and per-distribution aggregates (sum of tokens / sum of step times)."""
    rows = res["rows"]
    agg: dict = {}
    for r in rows:
        a = agg.setdefault(r["distribution"], {}).setdefault(r["method"], {"tokens": 0, "ms": 0.0, "pred": 0.0, "n": 0})
        a["tokens"] += r["tokens"]
        a["ms"] += r["measured_ms"]
        a["pred"] += r["predicted_ms"]
        a["n"] += 1
    lines = []
    for dname, methods in agg.items():
        nb = max(a["n"] for a in methods.values())
        # a static degree that cannot hold some batch's longest document (memory) is not a valid
        # static choice for the distribution: only degrees that ran every batch compete
        statics = {m: a for m, a in methods.items()
                   if (m.startswith("static-") or m == "ulysses-full") and a["n"] == nb}
        best_static = min(statics, key=lambda m: statics[m]["ms"])
        full = methods["ulysses-full"]
        lines += [f"### {dname}", "",
                  "| method | batches | step ms (mean) | tokens/s | vs ulysses-full (measured) | predicted step ms | "
                  "predicted speedup | pred. error |", "|---|---|---|---|---|---|---|---|"]
        for m, a in methods.items():
            step, pred = a["ms"] / a["n"], a["pred"] / a["n"]
            tag = " (best static)" if m == best_static else ""
            if a["n"] < nb:
                tag = " (only batches whose longest document fits)"
                lines.append(f"| {m}{tag} | {a['n']}/{nb} | {step:.0f} | {a['tokens'] / a['ms'] * 1e3:.0f} | n/a | "
                             f"{pred:.0f} | n/a | {(a['pred'] - a['ms']) / a['ms']:+.1%} |")
                continue
            lines.append(f"| {m}{tag} | {a['n']}/{nb} | {step:.0f} | {a['tokens'] / a['ms'] * 1e3:.0f} | "
                         f"{full['ms'] / a['ms']:.3f}x | {pred:.0f} | {full['pred'] / a['pred']:.3f}x | "
                         f"{(a['pred'] - a['ms']) / a['ms']:+.1%} |")
        fx = methods["flexsp"]
        lines += ["", f"FlexSP vs best static ({best_static}): {statics[best_static]['ms'] / fx['ms']:.3f}x measured, "
                  f"{statics[best_static]['pred'] / fx['pred']:.3f}x predicted; vs ulysses-full: "
                  f"{full['ms'] / fx['ms']:.3f}x measured, {full['pred'] / fx['pred']:.3f}x predicted.", ""]
        methods["_best_static"] = best_static
    errs = [abs(r["predicted_ms"] - r["measured_ms"]) / r["measured_ms"] for r in rows]
    lines += [f"Predicted vs measured step time over all {len(errs)} (batch, method) steps: median |error| "
              f"{np.median(errs):.1%}, max {np.max(errs):.1%}.", ""]
    return lines, agg


def plot(res: dict, agg: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    dnames = list(agg)
    methods = list(dict.fromkeys(m for d in dnames for m in agg[d] if not m.startswith("_")))
    w = 0.8 / len(methods)
    for j, m in enumerate(methods):
        vals = [agg[d][m]["tokens"] / agg[d][m]["ms"] * 1e3 if isinstance(agg[d].get(m), dict) else 0 for d in dnames]
        axes[0].bar(np.arange(len(dnames)) + j * w, vals, w, label=m)
    axes[0].set_xticks(np.arange(len(dnames)) + 0.4 - w / 2, dnames)
    axes[0].set_ylabel("tokens/s (measured)")
    axes[0].legend(fontsize=7)
    axes[0].set_title(f"{res['world_size']} ranks, {res['device']} ({res['backend']})")
    ax = axes[1]
    for m in methods:
        pts = [(r["measured_ms"], r["predicted_ms"]) for r in res["rows"] if r["method"] == m]
        ax.scatter(*zip(*pts), label=m, s=14)
    hi = max(max(r["measured_ms"], r["predicted_ms"]) for r in res["rows"]) * 1.05
    ax.plot([0, hi], [0, hi], "k--", lw=0.8)
    ax.set_xlabel("measured step ms")
    ax.set_ylabel("predicted step ms")
    ax.set_title("predicted vs measured step time")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cost-model", required=True, help="cost-model JSON from flexsp-profile (same model, machine)")
    p.add_argument("--world-size", type=int, default=4)
    p.add_argument("--model", default="tiny")
    p.add_argument("--distributions", nargs="+", default=["wikipedia", "github", "cpython"])
    p.add_argument("--batches", type=int, default=3, help="global batches per distribution")
    p.add_argument("--tokens", type=int, default=8192, help="tokens per global batch (approx.)")
    p.add_argument("--max-len", type=int, default=2048, help="longest document after scaling")
    p.add_argument("--ref-len", type=int, default=32768, help="context limit of the unscaled distribution")
    p.add_argument("--capacity", type=int, default=1024, help="emulated memory budget: tokens per rank")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads-per-rank", type=int, default=1)
    p.add_argument("--no-deepspeed", action="store_true", help="skip the DeepSpeed DistributedAttention baseline")
    p.add_argument("--timeout-s", type=float, default=1800)
    p.add_argument("--note", default="", help="a paragraph written under the header of STEM.md (e.g. why this setup)")
    p.add_argument("--summarize", default=None, metavar="JSON",
                   help="only rewrite STEM.md/STEM.png of --out from a saved STEM.json (no runs)")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "throughput_cpu"),
                   help="output stem: writes STEM.md, STEM.json, STEM.png")
    a = p.parse_args(argv)
    for name in ("world_size", "batches", "tokens", "max_len", "capacity", "repeats"):
        if getattr(a, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= 1, got {getattr(a, name)}")
    if not a.summarize and a.max_len > a.world_size * a.capacity:
        raise SystemExit(f"--max-len {a.max_len} exceeds what {a.world_size} ranks x --capacity {a.capacity} hold")
    import torch
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".torch_extensions"))
    from flexsp.profile.launch import run_ranks
    if a.summarize:
        res = json.loads(Path(a.summarize).read_text())
        a = argparse.Namespace(**res["args"])
        cmd, load0 = res["command"], res["loadavg_start"]
    else:
        cmd = "python benchmarks/throughput.py " + " ".join(sys.argv[1:] if argv is None else argv)
        load0 = os.getloadavg()
        res = run_ranks(rank_body, a.world_size, {**vars(a), "ds_only": False}, a.threads_per_rank, a.timeout_s)[0]
        if res is None:
            return 0
        if not a.no_deepspeed:  # DeepSpeed's baseline in a fresh world of its own, after the others
            ds = run_ranks(rank_body, a.world_size, {**vars(a), "ds_only": True}, a.threads_per_rank, a.timeout_s)[0]
            order = {(r["distribution"], r["batch"]): i for i, r in enumerate(res["rows"])}
            res["rows"] = sorted(res["rows"] + ds["rows"], key=lambda r: order[(r["distribution"], r["batch"])])
            res["deepspeed_process"] = {"optimizer_ms": ds["optimizer_ms"], "seconds": ds["seconds"]}
        res.update(command=cmd, date=_dt.datetime.now().isoformat(timespec="seconds"), args=vars(a),
                   machine=f"{platform.node()} {platform.machine()}, {os.cpu_count()} CPUs",
                   loadavg_start=list(load0), loadavg_end=list(os.getloadavg()))
    lines, agg = summarize(res)
    from solver.costmodel import CostModel
    cmd_cm = CostModel.from_dict(res["cost_model"])
    head = [f"# Throughput: FlexSP adaptive vs static SP ({res['world_size']} ranks, {res['device']})", "",
            f"Command: `{cmd}`", "",
            f"Machine: {res['machine']}; {res['device']} ({res['backend']}), {res['world_size']} ranks x "
            f"{res['threads_per_rank']} thread(s); date {res['date']}; load average at start {load0[0]:.1f} / end "
            f"{res['loadavg_end'][0]:.1f}" + _load_range(res["rows"])
            + " (other jobs on the machine inflate and scatter timings).", "",
            f"Model {a.model}; cost model {a.cost_model} with an emulated memory budget of C = {a.capacity} tokens "
            f"per rank; batches of ~{a.tokens} tokens, document lengths of each distribution (solver.workloads, "
            f"documents over {a.ref_len} dropped) scaled by {a.max_len}/{a.ref_len}; random tokens. Step = all "
            f"micro-batches (FSDP2) + optimizer step; fastest of {a.repeats} runs per (batch, method), methods "
            f"interleaved (order reversed every other run). Totals are over {a.batches} batches.", "",
            f"Predicted = the plan's CostModel time alone: per-group terms (a1, a2, b, per_sequence_ms = "
            f"{cmd_cm.per_sequence_ms:.3f} ms/document, communication per token, group_latency_ms = "
            f"{ {d: round(v, 2) for d, v in cmd_cm.group_latency_ms.items()} } ms per group and per_sequence_comm_ms = "
            f"{ {d: round(v, 3) for d, v in cmd_cm.per_sequence_comm_ms.items()} } ms per document of a group, "
            f"keyed mode:degree) + step_overhead_ms = "
            f"{cmd_cm.step_overhead_ms:.1f} ms per step (from the profile). For information, the optimizer step "
            f"timed here: {res['optimizer_ms']:.1f} ms (not used in predictions). Every prediction is "
            f"solver.build.price_plan of the plan the method ran, each group priced with the attention mode it "
            f"ran: static baselines are built with attention=\"ulysses\" (build_plan), flexsp keeps the "
            f"planner's per-group modes.", "",
            ("DeepSpeed: the deepspeed-ulysses baseline ran in a separate world (fresh spawned processes, after "
             "the other methods); the main run never imports or initialises DeepSpeed."
             if res.get("deepspeed_process") else "DeepSpeed baseline not run (--no-deepspeed)."), ""]
    if getattr(a, "note", None):
        head += [a.note, ""]
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    detail = ["", "## Every step", "", "| dist | batch | method | tokens | plan | predicted ms | measured ms | error |",
              "|---|---|---|---|---|---|---|---|"]
    detail += [f"| {r['distribution']} | {r['batch']} | {r['method']} | {r['tokens']} | {r['plan']} | "
               f"{r['predicted_ms']:.0f} | {r['measured_ms']:.0f} | {(r['predicted_ms'] - r['measured_ms']) / r['measured_ms']:+.1%} |"
               for r in res["rows"]]
    Path(f"{out}.md").write_text("\n".join(head + lines + detail) + "\n")
    Path(f"{out}.json").write_text(json.dumps(res, indent=1) + "\n")
    plot(res, agg, Path(f"{out}.png"))
    print("\n".join(head + lines), flush=True)
    print(f"[throughput] wrote {out}.md, {out}.json, {out}.png", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
