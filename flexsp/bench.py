"""``flexsp-bench``: measured training throughput of FlexSP against static sequence parallelism,
side by side in one run.

    flexsp-bench --nproc-per-node 2 [torchrun options] [overrides] [bench.* overrides]
    torchrun --nproc_per_node 2 -m flexsp.bench [overrides]          # the same, torchrun's own way
    flexsp-bench --help | --cfg [overrides]

The ranks are launched exactly as ``flexsp-train --nproc-per-node N`` launches training
(flexsp.launcher: torchrun's elastic agent in this process, the config composed and validated
first), and every rank builds what a training run builds (flexsp.train's set-up, data and build
phases: topology, cost model ``solver.cost_model``, sampler, engine, executor), from the same
config tree and Hydra overrides (``model=... data=... solver.cost_model=... parallel.engine=...``)
plus the ``bench`` section (:class:`BenchConfig`, ``configs/bench/default.yaml``).

The first ``bench.batches`` global batches the configured sampler deals are then trained by every
method (``bench.methods``), each with its own plan of the same batch:

- ``flexsp``: what ``parallel.mode=adaptive`` trains: the FlexSP planner
  (:func:`flexsp.planning.solve_plan`, ``solver.time_limit``; never the late-plan fallback);
- ``static-d``: what ``parallel.mode=static parallel.static_degree=d`` trains
  (:func:`solver.baselines.static_plan`), for every degree d that holds the batch's longest
  document (method name ``static`` in ``bench.methods``);
- ``best-homogeneous``: :func:`solver.baselines.best_homogeneous_plan` (one degree per batch,
  time-balanced packing; the official FlexSP code's "BatchAda");
- ``deepspeed-ulysses`` (optional; needs DeepSpeed): the static plan at the largest Ulysses degree,
  attention through DeepSpeed's ``DistributedAttention``, in a second world of its own after the
  main one (``bench.world=deepspeed``; DeepSpeed is never imported by the main world).

A step is what ``flexsp-train`` times: ``StepExecutor.run`` (every micro-batch) + ``engine.step()``
+ the step's one host sync (loss summed over ranks), fenced by barriers. Every (batch, method) runs
``bench.warmup`` untimed steps, then ``bench.repeats`` timed ones, methods interleaved with the
order reversed every other repetition (load drift on a shared machine hits every method alike).
Rank 0 writes ``STEM.json``, ``STEM.md`` and ``STEM.png`` (flexsp.bench_report): per method
tokens/s, step-time median and spread, the cost model's predicted step time
(:func:`solver.build.price_plan` of the plan it ran) against the measured one, FlexSP's speedups
over the best static degree, over best-homogeneous and over the better of the two, and on CUDA
the FLOPs utilisation against the bf16 matmul peak measured in the same run; every file is stamped
with the commit, machine, command, cost model and the baselines as run.

Exit status: 0 done, 2 a user error (one line ``flexsp-bench: error: ...``), 1 a bug (traceback).
"""

from __future__ import annotations

import importlib.util
import math
import os
import platform
import shlex
import subprocess
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import NoReturn

import numpy as np
import torch
import torch.distributed as dist

from flexsp.attention.context import AttnContext
from flexsp.attention.local import varlen_attention
from flexsp.bench_report import merge_deepspeed, write_outputs
from flexsp.config import BackgroundMode, BenchConfig, ParallelMode, RunConfig, check_output_dir
from flexsp.config.bench import METHODS, WORLDS  # noqa: F401 (re-exported)
from flexsp.config.compose import CONFIG_DIR, compose_container, to_yaml
from flexsp.config.compose import compose as compose_tree
from flexsp.errors import UserError
from flexsp.executor import StepExecutor
from flexsp.failure import AbortWatch
from flexsp.hostcopy import read_to_host, to_device
from flexsp.launcher import exit_process, launch, launched_world, run_here, say, split_args
from flexsp.log import setup_logging
from flexsp.pipeline import InputPipeline
from flexsp.planning import solve_plan
from flexsp.train import build, prepare_data, setup, validate
from solver.baselines import best_homogeneous_plan, static_plan, usable_degrees
from solver.build import build_plan, price_plan, validate_plan
from solver.plan import Plan

PROG = "flexsp-bench"


# -- config --------------------------------------------------------------------------------------------
def compose(overrides: list[str]) -> RunConfig:
    """The bench's tree: the training config + the ``bench`` section, with ``overrides``."""
    return compose_tree(overrides, "bench")


def check(cfg: RunConfig) -> BenchConfig:
    """The ``bench`` section of ``cfg`` after the checks the bench adds (DeepSpeed installed when
    deepspeed-ulysses is listed)."""
    bench = cfg.bench if cfg.bench is not None else BenchConfig()
    if "deepspeed-ulysses" in bench.methods and importlib.util.find_spec("deepspeed") is None:
        raise UserError(
            "bench.methods lists deepspeed-ulysses but DeepSpeed is not installed "
            "(pip install -e .[dist]); drop it from bench.methods",
            field="bench.methods",
        )
    return bench


def out_stem(cfg: RunConfig, bench: BenchConfig) -> Path:
    return Path(bench.out) if bench.out else cfg.output_dir / "bench"


def _train_cfg(cfg: RunConfig, max_steps: int) -> RunConfig:
    """The training config every rank sets up: adaptive mode (the plans come from here, never from a
    background planner or its fallback) and a schedule long enough for every step the bench takes."""
    return replace(
        cfg,
        parallel=replace(cfg.parallel, mode=ParallelMode.adaptive),
        solver=replace(cfg.solver, background=BackgroundMode.off),
        train=replace(cfg.train, steps=max(cfg.train.steps, max_steps), resume="never"),
    )


# -- plans ---------------------------------------------------------------------------------------------
def as_mode(plan, lengths, cm, mode: str):
    """``plan``'s groups rebuilt with every degree > 1 group forced to attention ``mode``."""
    mbs = [[(g.sp, g.seq_ids) for g in mb.groups] for mb in plan.micro_batches]
    return build_plan(
        mbs,
        lengths,
        cm,
        method=plan.method,
        solve_seconds=plan.solve_seconds,
        status=plan.status,
        extra=plan.extra,
        attention=mode,
    )


def plan_methods(lengths, cm, methods, solver) -> dict:
    """Every method's Plan for one batch (``methods`` as in bench.methods; ``solver`` a
    SolverConfig), each checked by solver.build.validate_plan."""

    lengths = [int(n) for n in lengths]
    longest, plans = max(lengths), {}
    if "flexsp" in methods:
        plans["flexsp"] = solve_plan(lengths, cm, solver.time_limit, solver.milp_backend, solver.pulp_solver)
    if "static" in methods:
        for d in usable_degrees(cm):
            if longest <= d * cm.capacity_tokens:
                plans[f"static-{d}"] = static_plan(lengths, cm, d)
    if "best-homogeneous" in methods:
        plans["best-homogeneous"] = best_homogeneous_plan(lengths, cm)
    if "deepspeed-ulysses" in methods:
        ulysses = replace(cm, ring_mb_per_token=0.0, p2p_bandwidth_gbps={})
        degree = max(usable_degrees(ulysses))
        if longest <= degree * cm.capacity_tokens:
            plan = as_mode(static_plan(lengths, ulysses, degree), lengths, cm, "ulysses")
            plans["deepspeed-ulysses"] = replace(plan, method=f"deepspeed-ulysses-{degree}")
    for name, plan in plans.items():
        validate_plan(plan, lengths, cm)
    return plans


# -- DeepSpeed's DistributedAttention, for the deepspeed-ulysses baseline -----------------------------
def _deepspeed_classes():
    """(AttnContext subclass, InputPipeline subclass, StepExecutor subclass) running attention
    through DeepSpeed's DistributedAttention; defined on first use (DeepSpeed's world only)."""

    class DeepSpeedAttnContext(AttnContext):
        """Ulysses layout of flexsp.attention.shard, all-to-alls by DeepSpeed-Ulysses."""

        def attention(self, q, k, v, window=None):
            from deepspeed.sequence.layer import DistributedAttention

            if window:
                raise UserError("deepspeed-ulysses: sliding-window models are not supported")
            sp = dist.get_world_size(self.group)
            if k.shape[1] % sp:  # DeepSpeed splits KV heads evenly: replicate them as the original does
                rep = q.shape[1] // k.shape[1]
                k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
            cu = [0, *np.cumsum(self.meta.padded_seqlens).tolist()]

            def local_attn(qq, kk, vv, *args, **kw):  # DeepSpeed's layout [s, b, h, d], b = 1
                return varlen_attention(qq[:, 0], kk[:, 0], vv[:, 0], cu, causal=True)[:, None]

            ds = DistributedAttention(local_attn, self.group, scatter_idx=2, gather_idx=0)
            return ds(q[:, None], k[:, None], v[:, None], 1)[:, 0]

    class DeepSpeedInputPipeline(InputPipeline):
        """InputPipeline whose SP micro-batches attend through DeepSpeedAttnContext."""

        def copy(self, future):
            ready = super().copy(future)
            ctx = None if ready.inputs is None else ready.inputs.attn_ctx
            if ctx is not None and ctx.meta is not None:
                ready.inputs.attn_ctx = DeepSpeedAttnContext(meta=ctx.meta, group=ctx.group, mode=ctx.mode)
            return ready

    class DeepSpeedExecutor(StepExecutor):
        def __init__(self, engine, source, topology, rank, device, heads):
            super().__init__(engine, source, topology, rank, device, heads)
            self.pipeline.close()
            self.pipeline = DeepSpeedInputPipeline(source, topology, rank, device, heads)

    return DeepSpeedAttnContext, DeepSpeedInputPipeline, DeepSpeedExecutor


# -- FLOPs -----------------------------------------------------------------------------------------------
FLOPS_CONVENTION = (
    "model FLOPs of a step = 6 x P x tokens + 6 x layers x (heads x head_dim) x sum(L^2) (forward "
    "+ backward of the matmuls and of causal attention, each document of L tokens attending to "
    "itself), x 8/6 with activation checkpointing (the recomputed forward counted: hardware FLOPs); "
    "P = parameters without the input embedding (a lookup) but with the output head (vocab x hidden)"
)


def step_flops(mcfg, lengths) -> float:
    """FLOPs of one training step on documents of ``lengths`` tokens (see FLOPS_CONVENTION)."""
    params = mcfg.num_params(include_embeddings=False) + mcfg.vocab_size * mcfg.hidden
    tokens = sum(int(n) for n in lengths)
    attn = 6.0 * mcfg.layers * mcfg.heads * mcfg.head_size * sum(float(n) ** 2 for n in lengths)
    total = 6.0 * params * tokens + attn
    return total * 8 / 6 if mcfg.activation_checkpointing else total


def matmul_peak_flops(device, n: int, reps: int = 5, iters: int = 10) -> float:
    """Measured bf16 matmul FLOP/s of ``device`` (CUDA): the fastest of ``reps`` timings of ``iters``
    n x n x n products."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    c = torch.empty(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        torch.mm(a, b, out=c)
    best = math.inf
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            torch.mm(a, b, out=c)
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) / 1e3 / iters)
    return 2.0 * n**3 / best


# -- stamps ----------------------------------------------------------------------------------------------
REPO = Path(__file__).resolve().parent.parent


CODE_PATHS = ("flexsp", "solver", "configs", "launch", "benchmarks/*.py", "pyproject.toml")
"""Paths whose uncommitted changes make a measurement "dirty" (results and prose do not)."""


def git_stamp() -> dict:
    """Commit of the code that ran and the code files (CODE_PATHS) that differed from it."""
    try:
        commit = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout.strip()
        changed = subprocess.run(
            ["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no", "--", *CODE_PATHS],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout.splitlines()
    except (OSError, subprocess.SubprocessError):
        return {"commit": "unknown (not a git checkout)", "dirty": None}
    return {"commit": commit, "dirty": [line[3:] for line in changed]}


def machine_stamp(device, world: int) -> dict:

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return {
        "host": platform.node(),
        "os": platform.platform(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "device": str(device.type),
        "device_name": name,
        "backend": dist.get_backend(),
        "world_size": world,
        "threads_per_rank": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }


def invocation(argv: list[str]) -> str:
    """How this command was typed (the launcher passes it to its ranks in FLEXSP_BENCH_COMMAND)."""
    prog = "python -m flexsp.bench" if sys.argv[0].endswith(".py") else Path(sys.argv[0]).name
    return " ".join([prog, *map(shlex.quote, argv)])


def _rank_command() -> str:
    """The launching command as seen from a rank: the launcher's, else torchrun's (the parent
    process), else this process's own."""
    given = os.environ.get("FLEXSP_BENCH_COMMAND")
    if given:
        return given
    if "RANK" in os.environ:
        try:
            parent = Path(f"/proc/{os.getppid()}/cmdline").read_bytes().split(b"\0")
            return " ".join(shlex.quote(a.decode()) for a in parent if a)
        except OSError:
            pass
    return invocation(sys.argv[1:])


# -- the measurement ---------------------------------------------------------------------------------------
def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_step(st, executor, plan, batch) -> tuple[float, float]:
    """(milliseconds, loss) of one training step as flexsp-train runs it, fenced by barriers."""

    _sync(st.device)
    dist.barrier()
    t0 = time.perf_counter()
    res = executor.run(plan, batch)
    st.engine.step()
    stats = torch.cat(
        [
            res.loss_sum.double().reshape(1),
            to_device(torch.tensor([float(res.targets)], dtype=torch.float64), st.device),
        ]
    )
    if st.world > 1:
        dist.all_reduce(stats)
    loss_sum, targets = read_to_host(stats)
    _sync(st.device)
    dist.barrier()
    return (time.perf_counter() - t0) * 1e3, loss_sum / max(targets, 1.0)


def _broadcast(obj, st):
    box = [obj]
    if st.world > 1:
        dist.broadcast_object_list(box, src=0, group=st.topo.host_group)
    return box[0]


def _measure_batch(st, executor, bench, k, batch, methods) -> list[dict]:
    """Warm-up and timed steps of every method on one batch; the rows of rank 0."""

    plans = None
    if st.rank == 0:
        plans = plan_methods(batch.lengths, st.cm, methods, st.cfg.solver)
        plans = {m: p.to_dict() for m, p in plans.items()}
    plans = {m: Plan.from_dict(p) for m, p in _broadcast(plans, st).items()}
    names = list(plans)
    warm = {m: [] for m in names}
    for w in range(bench.warmup):
        for m in names if w % 2 == 0 else names[::-1]:
            warm[m].append(timed_step(st, executor, plans[m], batch)[1])
    times = {m: [] for m in names}
    losses = {m: [] for m in names}
    for r in range(bench.repeats):
        for m in names if r % 2 == 0 else names[::-1]:
            ms, loss = timed_step(st, executor, plans[m], batch)
            times[m].append(ms)
            losses[m].append(loss)
    lengths = [int(n) for n in batch.lengths]
    rows = []
    for m, plan in plans.items():
        t = np.asarray(times[m])
        rows.append(
            {
                "batch": k,
                "method": m,
                "world": bench.world,
                "docs": len(lengths),
                "tokens": sum(lengths),
                "longest": max(lengths),
                "plan": plan.summary(),
                "plan_method": plan.method,
                "solve_seconds": plan.solve_seconds,
                "predicted_ms": price_plan(plan, lengths, st.cm),
                "times_ms": t.tolist(),
                "median_ms": float(np.median(t)),
                "min_ms": float(t.min()),
                "max_ms": float(t.max()),
                "q1_ms": float(np.percentile(t, 25)),
                "q3_ms": float(np.percentile(t, 75)),
                "losses": losses[m],
                "warmup_losses": warm[m],
                "flops": step_flops(st.mcfg, lengths),
                "modes": sorted({g.attention for mb in plan.micro_batches for g in mb.groups}),
                "plan_json": plan.to_dict(),
                "loadavg": list(os.getloadavg()),
            }
        )
    if st.rank == 0:
        print(
            f"[bench] batch {k} ({len(lengths)} docs, {sum(lengths)} tokens, longest {max(lengths)}): "
            + ", ".join(
                f"{r['method']} {r['median_ms']:.0f} ms (pred {r['predicted_ms']:.0f})" for r in rows
            ),
            flush=True,
        )
    return rows


def run(cfg: RunConfig) -> dict:
    """Every rank: set up as flexsp-train does, measure, and (rank 0) write the outputs. Returns the
    result dict on rank 0, {} elsewhere."""

    bench = check(cfg)
    methods = bench.world_methods()
    max_steps = bench.batches * (len(methods) + 16) * (bench.warmup + bench.repeats) + 1
    if bench.world == "deepspeed":
        os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
        os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".torch_extensions"))
    load_start = list(os.getloadavg())
    st = setup(_train_cfg(cfg, max_steps))
    try:
        if "deepspeed-ulysses" in bench.methods and st.world < 2:
            raise UserError(
                f"bench.methods lists deepspeed-ulysses, which needs >= 2 ranks; {st.world} launched"
            )
        if bench.capacity_tokens:
            st.cm = replace(st.cm, capacity_override=bench.capacity_tokens)
        prepare_data(st)
        build(st)
        if bench.world == "deepspeed":
            import deepspeed

            deepspeed.init_distributed(dist_backend=dist.get_backend())
            st.executor.close()
            executor_cls = _deepspeed_classes()[2]
            st.executor = executor_cls(st.engine, st.source, st.topo, st.rank, st.device, st.mcfg.heads)
        batches = [next(st.sampler) for _ in range(bench.batches)]
        peak = None
        if st.device.type == "cuda":
            peak_t = torch.tensor([matmul_peak_flops(st.device, bench.matmul_size)], device=st.device)
            dist.all_reduce(peak_t, op=dist.ReduceOp.MIN)
            peak = float(peak_t.item())
        rows, t0 = [], time.perf_counter()
        with AbortWatch(st.rank, st.world, tag="/bench") as watch:
            try:
                for k, batch in enumerate(batches):
                    rows += _measure_batch(st, st.executor, bench, k, batch, methods)
            except BaseException as exc:
                exc.flexsp_first = watch.post(f"{type(exc).__name__}: {exc}")
                raise
        seconds = time.perf_counter() - t0
    finally:
        st.planner.close()
        if st.executor is not None:
            st.executor.close()
    if st.rank != 0:
        return {}
    res = _result(st, bench, batches, rows, peak, seconds, load_start)
    stem = out_stem(cfg, bench)
    if bench.world == "deepspeed":
        res = merge_deepspeed(stem, res)
    paths = write_outputs(res, stem)
    print(f"[bench] wrote {', '.join(map(str, paths))}", flush=True)
    return res


def _first_loss(rows, bench) -> float:
    """Loss of the world's first step (batch 0, its first method): every world starts from the same
    seeded weights, so this must agree between the main world and DeepSpeed's."""
    return rows[0]["warmup_losses"][0] if bench.warmup else rows[0]["losses"][0]


def _result(st, bench, batches, rows, peak, seconds, load_start) -> dict:
    """Rank 0's record of the run: rows plus every stamp the outputs carry."""
    cfg, mcfg, cm = st.cfg, st.mcfg, st.cm
    data = cfg.data
    return {
        "tool": "flexsp-bench",
        **git_stamp(),
        "machine": machine_stamp(st.device, st.world),
        "command": _rank_command(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "world_size": st.world,
        "device": st.device.type,
        "bench": asdict(bench),
        "model": {
            "preset": cfg.model.preset,
            "params": mcfg.num_params(),
            "layers": mcfg.layers,
            "hidden": mcfg.hidden,
            "heads": mcfg.heads,
            "kv_heads": mcfg.kv_heads,
            "vocab_size": mcfg.vocab_size,
            "activation_checkpointing": mcfg.activation_checkpointing,
            "precision": str(cfg.train.precision),
            "engine": str(cfg.parallel.engine),
        },
        "data": {
            "source": data.source,
            "distribution": data.distribution if data.source == "synthetic" else None,
            "max_doc_tokens": data.corpus.max_doc_tokens,
            "global_batch": cfg.train.global_batch,
            "global_batch_tokens": data.sampler.global_batch_tokens,
            "seed": data.seed,
        },
        "solver": {
            "time_limit": cfg.solver.time_limit,
            "milp_backend": str(cfg.solver.milp_backend),
            "pulp_solver": cfg.solver.pulp_solver,
        },
        "cost_model": {
            "spec": cfg.solver.cost_model,
            "name": cm.name,
            "source": cm.source,
            "capacity_tokens": cm.capacity_tokens,
            "capacity_emulated": bool(bench.capacity_tokens),
            "model": cm.to_dict(),
        },
        "batches": [
            {"index": k, "doc_ids": list(b.doc_ids), "lengths": [int(n) for n in b.lengths]}
            for k, b in enumerate(batches)
        ],
        "rows": rows,
        "first_loss": _first_loss(rows, bench),
        "matmul_peak_flops": peak,
        "flops_convention": FLOPS_CONVENTION,
        "seconds": seconds,
        "loadavg_start": load_start,
        "loadavg_end": list(os.getloadavg()),
    }


# -- command line ------------------------------------------------------------------------------------------
def print_help() -> None:
    print(__doc__)
    print("bench.* keys (flexsp.bench.BenchConfig; configs/bench/default.yaml):")
    for line in (CONFIG_DIR / "bench" / "default.yaml").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            print(f"  bench.{line}")
    print(
        "\nEvery training key works too (model=..., data=..., solver.cost_model=..., parallel.engine=...,\n"
        "train.global_batch=..., output_dir=...); see flexsp-train --help. parallel.mode is ignored:\n"
        "bench.methods decides what runs. Launcher options (--nproc-per-node N, ...) as flexsp-train's."
    )


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        launcher, overrides, flags = split_args(argv)
    except ValueError as exc:
        return say(exc, PROG)
    setup_logging()
    if "help" in flags:
        print_help()
        return 0
    try:
        if "cfg" in flags:
            print(to_yaml(compose_container(overrides, "bench")))
            return 0
        cfg = compose(overrides)  # typed and validated before anything starts
        bench = check(cfg)
    except UserError as exc:
        return say(exc, PROG)
    if not launcher or "RANK" in os.environ:
        return run_here(cfg, run, PROG)
    world = launched_world(launcher)
    try:
        validate(cfg, world)
        check_output_dir(out_stem(cfg, bench).parent, "bench.out")
        if "deepspeed-ulysses" in bench.methods and world is not None and world < 2:
            raise UserError(
                f"bench.methods lists deepspeed-ulysses, which needs >= 2 ranks; {world} launched",
                field="bench.methods",
            )
    except UserError as exc:
        return say(exc, PROG)
    os.environ["FLEXSP_BENCH_COMMAND"] = invocation(argv)
    rc = launch(launcher, overrides, cfg, module="flexsp.bench", prog=PROG)
    if rc == 0 and bench.world == "main" and "deepspeed-ulysses" in bench.methods:
        kept = [o for o in overrides if o.split("=", 1)[0].lstrip("+") != "bench.world"]
        rc = launch(launcher, [*kept, "bench.world=deepspeed"], cfg, module="flexsp.bench", prog=PROG)
    return rc


def cli() -> NoReturn:
    """The ``flexsp-bench`` command and ``python -m flexsp.bench`` (every rank): :func:`main`, then
    :func:`flexsp.launcher.exit_process` with its status."""
    exit_process(main())


if __name__ == "__main__":
    cli()
