"""FlexSP training entry point: ``python -m flexsp.train [hydra overrides]`` / ``flexsp-train``.

Launch with torchrun (``torchrun --nproc_per_node 4 -m flexsp.train``), Ray (``launch/ray_job.py``)
or alone (one process: a 1-rank world on gloo). Every step:

1. the plan of this step, computed by rank 0 while the previous step trained, arrives on every rank
   as one object (flexsp.planning);
2. each rank runs its share of every micro-batch (flexsp.executor), loss = sum of token losses /
   target tokens of the whole global batch;
3. the engine (FSDP2 or DeepSpeed ZeRO-3) has summed the gradients over all ranks; clip, AdamW,
   LR schedule;
4. rank 0 prints a line (step, loss, tokens/s, plan summary, planner ms, memory), advances the
   progress bar and appends one JSON line to ``<output_dir>/metrics.jsonl``;
5. every ``train.checkpoint_every`` steps: a checkpoint (flexsp.checkpoint).

The plan is applied at exactly one place: ``StepExecutor.run(plan, batch)``.
"""
from __future__ import annotations

import json
import os
import resource
import sys
import time
from dataclasses import dataclass, fields
from pathlib import Path

import torch
import torch.distributed as dist

RESUME_HELP = "auto (latest checkpoint in output_dir, if any) | never | <checkpoint directory>"


@dataclass
class TrainConfig:
    steps: int = 10
    """Optimizer steps to train (total, counting steps of a resumed run)."""
    seed: int = 0
    """Seed of the model init, the sampler and the synthetic data."""
    global_batch: int = 8
    """Sequences (documents) per step (fewer when data.sampler.global_batch_tokens is hit first)."""
    lr: float = 3e-3
    """Peak learning rate (AdamW)."""
    min_lr_ratio: float = 0.1
    """Cosine decay ends at lr * min_lr_ratio at the last step."""
    warmup_steps: int = 2
    """Linear warmup steps."""
    weight_decay: float = 0.01
    """AdamW decoupled weight decay."""
    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.95
    """AdamW beta2."""
    eps: float = 1e-8
    """AdamW epsilon."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this (0: no clipping)."""
    checkpoint_every: int = 10
    """Checkpoint every this many steps (0: only at the end)."""
    keep_checkpoints: int = 2
    """How many checkpoints to keep (older ones are deleted)."""
    resume: str = "auto"
    """auto (latest checkpoint in output_dir, if any) | never | <checkpoint directory>."""
    progress: bool = True
    """Show a tqdm progress bar on rank 0."""
    log_doc_ids: bool = True
    """Write each step's document ids into metrics.jsonl (lets tests check no sample is lost/repeated)."""
    kill_at_step: int = -1
    """Testing elastic restarts: rank ``kill_rank`` exits (code 13) before this step, first attempt only."""
    kill_rank: int = 0
    """See kill_at_step."""

    def __post_init__(self) -> None:
        for name in ("steps", "global_batch"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"train.{name} must be >= 1, got {getattr(self, name)!r}")
        if self.checkpoint_every < 0 or self.warmup_steps < 0 or self.grad_clip < 0:
            raise ValueError(f"train.checkpoint_every={self.checkpoint_every}, warmup_steps={self.warmup_steps}, "
                             f"grad_clip={self.grad_clip} must be >= 0")
        if not self.lr > 0:
            raise ValueError(f"train.lr must be > 0, got {self.lr}")


@dataclass
class ParallelConfig:
    mode: str = "adaptive"
    """adaptive (FlexSP planner each step) | static (one SP degree for every sequence)."""
    static_degree: int = 0
    """Static mode: the SP degree, a power of two <= world size (0 = all ranks)."""
    engine: str = "fsdp2"
    """How parameters are sharded and gradients summed over all ranks: fsdp2 | deepspeed (ZeRO-3;
    DeepSpeed's accelerator must match the device: it picks cpu on a machine without CUDA, and
    DS_ACCELERATOR=cpu forces it)."""
    world_size: int = 0
    """Expected number of ranks; a mismatch with the launcher is an error (0 = accept any)."""
    backend: str | None = None
    """torch.distributed backend (None: nccl with CUDA, gloo otherwise)."""
    devices_per_node: int = 0
    """Ranks per node (0: LOCAL_WORLD_SIZE from the launcher, else the world size)."""

    def __post_init__(self) -> None:
        from flexsp.engines import ENGINES, PLANNED_ENGINES
        if self.engine in PLANNED_ENGINES:
            raise ValueError(f"parallel.engine={self.engine!r} is not implemented yet; valid options: {list(ENGINES)}")
        from flexsp.planning import PARALLEL_MODES
        if self.mode not in PARALLEL_MODES:
            raise ValueError(f"parallel.mode={self.mode!r}; valid options: {list(PARALLEL_MODES)}")
        if self.engine not in ENGINES:
            raise ValueError(f"parallel.engine={self.engine!r}; valid options: {list(ENGINES)}")
        if self.world_size < 0 or self.static_degree < 0:
            raise ValueError(f"parallel.world_size={self.world_size} and static_degree={self.static_degree} must be >= 0")


def _section(cls, data, name):
    data = dict(data or {})
    valid = {f.name for f in fields(cls)}
    bad = sorted(set(data) - valid)
    if bad:
        raise ValueError(f"unknown {name} keys {bad}; valid keys: {sorted(valid)}")
    return cls(**data)


def parse_config(cfg) -> dict:
    """Hydra/OmegaConf config (or plain dict) -> validated dataclasses."""
    from omegaconf import OmegaConf

    from flexsp.data import CorpusConfig, DataConfig, SamplerConfig
    from flexsp.planning import SolverConfig

    raw = OmegaConf.to_container(cfg, resolve=True) if not isinstance(cfg, dict) else cfg
    for key in ("model", "data", "parallel", "solver", "train", "output_dir"):
        if key not in raw:
            raise ValueError(f"config has no '{key}' section; expected model, data, parallel, solver, train, output_dir")
    train = _section(TrainConfig, raw["train"], "train")
    parallel = _section(ParallelConfig, raw["parallel"], "parallel")
    solver = _section(SolverConfig, raw["solver"], "solver")
    d = dict(raw["data"])
    corpus = _section(CorpusConfig, d.pop("corpus", {}), "data.corpus")
    sampler_raw = dict(d.pop("sampler", {}))
    sampler_raw["max_docs_per_batch"] = train.global_batch
    sampler = _section(SamplerConfig, sampler_raw, "data.sampler")
    data = _section(DataConfig, {**d, "corpus": corpus, "sampler": sampler}, "data")
    model = dict(raw["model"])
    preset = model.pop("preset", "tiny")
    model = {k: v for k, v in model.items() if v is not None}
    return dict(train=train, parallel=parallel, solver=solver, data=data, model_preset=preset,
                model_overrides=model, output_dir=Path(str(raw["output_dir"])), raw=raw)


def _memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 1024 if sys.platform != "darwin" else rss / 2**20


def _init_world(parallel: ParallelConfig):
    """Initialise torch.distributed; a plain `python -m flexsp.train` becomes a 1-rank world."""
    from flexsp.distributed import init_distributed
    if not dist.is_initialized() and "RANK" not in os.environ:
        import socket
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if restart is not None and not dist.is_initialized():
        _init_elastic(parallel.backend, int(restart))
    rank, world, device = init_distributed(parallel.backend)
    if parallel.world_size and parallel.world_size != world:
        raise ValueError(f"parallel.world_size={parallel.world_size} but the launcher started {world} "
                         f"ranks; start {parallel.world_size} ranks (e.g. torchrun --nproc_per_node "
                         f"{parallel.world_size}) or set parallel.world_size=0")
    return rank, world, device


def _init_elastic(backend: str | None, attempt: int) -> None:
    """Default group under torchrun, keyed by the restart attempt.

    Measured with torch 2.13 + gloo: after an elastic restart the workers reuse the agent's store,
    and the gloo rendezvous of the new attempt read the dead attempt's addresses ("Connection
    refused" in connectFullMesh). Prefixing every key with the attempt number isolates attempts.
    """
    import datetime

    from flexsp.distributed import default_backend
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    timeout = datetime.timedelta(seconds=600)
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world,
                          is_master=(not agent_store and rank == 0), timeout=timeout,
                          multi_tenant=not agent_store)
    store = dist.PrefixStore(f"flexsp/attempt_{attempt}", store)
    if os.environ.get("LOCAL_RANK") is not None and (backend or default_backend()) == "nccl":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group(backend=backend or default_backend(), store=store, rank=rank,
                            world_size=world, timeout=timeout)


def _build_source(data_cfg, rank: int):
    """Rank 0 builds (tokenizes, caches) the corpus first; the others then open the cache."""
    from flexsp.data import build_source
    if rank == 0 or data_cfg.source == "synthetic":
        err = None
        try:
            src = build_source(data_cfg)
        except ValueError as exc:
            err, src = str(exc), None
        if dist.get_world_size() > 1 and data_cfg.source != "synthetic":
            box = [err]
            dist.broadcast_object_list(box, src=0)
        if err:
            raise ValueError(err)
        return src
    box = [None]
    dist.broadcast_object_list(box, src=0)
    if box[0]:
        raise ValueError(box[0])
    return build_source(data_cfg)


def run(cfg, return_state: bool = False) -> dict:
    """Train as ``cfg`` says (an OmegaConf config from Hydra/compose, or a plain dict). Returns the
    summary dict on every rank (losses per step, final step, ...); ``return_state`` adds the full
    final model state dict under "state_dict" (collective; rank 0 holds the tensors)."""
    from omegaconf import OmegaConf

    from flexsp.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
    from flexsp.data import GlobalBatchSampler
    from flexsp.engines import build_engine
    from flexsp.executor import StepExecutor
    from flexsp.model import Transformer, model_config
    from flexsp.planning import StepPlanner, load_cost_model
    from flexsp.topology import SPTopology
    from solver.planner import PlanningError, check_lengths

    c = parse_config(cfg)
    train, parallel, solver = c["train"], c["parallel"], c["solver"]
    rank, world, device = _init_world(parallel)
    out = c["output_dir"]
    ckpt_root = out / "checkpoints"
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(c["raw"])))

    # -- topology, cost model, planner (validated before any data work) ------------------------
    dpn = parallel.devices_per_node or int(os.environ.get("LOCAL_WORLD_SIZE", world))
    topo = SPTopology(world, min(dpn, world)).build()
    cm = load_cost_model(solver.cost_model, world)
    planner = StepPlanner(solver, cm, rank, world, parallel.mode, parallel.static_degree)

    # -- data -----------------------------------------------------------------------------------
    source = _build_source(c["data"], rank)
    limit = cm.num_devices * cm.capacity_tokens
    if parallel.mode == "static":
        limit = planner.static_degree * cm.capacity_tokens
    too_long = (source.lengths > limit).nonzero()[0]
    if too_long.size:
        i = int(too_long[0])
        raise PlanningError(
            f"{too_long.size} document(s) are longer than the cluster can hold ({limit} tokens = "
            f"{planner.static_degree if parallel.mode == 'static' else world} ranks x {cm.capacity_tokens} "
            f"tokens per rank under cost model {cm.name}), e.g. document {i} with {int(source.lengths[i])} "
            f"tokens. Policy: they are never silently dropped; lower data.corpus.max_doc_tokens (long "
            f"documents are then split, data.corpus.long_doc_policy=split) or add ranks/memory")
    sampler = GlobalBatchSampler(source.lengths, c["data"].sampler)

    # -- model + engine -------------------------------------------------------------------------
    overrides = dict(c["model_overrides"])
    vocab = overrides.pop("vocab_size", None) or source.vocab_size
    if vocab < source.vocab_size:
        raise ValueError(f"model.vocab_size={vocab} is smaller than the data's vocabulary "
                         f"({source.vocab_size}); set model.vocab_size=null to follow the data")
    mcfg = model_config(c["model_preset"], vocab_size=int(vocab), **overrides)
    torch.manual_seed(train.seed)
    model = Transformer(mcfg, device=device)
    model.init_weights(train.seed)
    engine = build_engine(parallel.engine, model, train, world, device)
    executor = StepExecutor(engine, source, topo, rank, device, mcfg.heads)

    # -- resume ---------------------------------------------------------------------------------
    start = 0
    if train.resume != "never":
        ck = latest_checkpoint(ckpt_root) if train.resume == "auto" else Path(train.resume)
        if ck is not None:
            state = load_checkpoint(ck, engine)
            sampler.load_state_dict(state["sampler"])
            start = int(state["step"])
            if rank == 0:
                _truncate_metrics(out / "metrics.jsonl", start)
                print(f"[flexsp] resumed from {ck} at step {start}", flush=True)
    elif rank == 0:
        (out / "metrics.jsonl").unlink(missing_ok=True)

    if rank == 0:
        nparams = mcfg.num_params()
        print(f"[flexsp] {world} rank(s) on {device.type} ({dist.get_backend()}), engine {parallel.engine}, "
              f"mode {parallel.mode}, model {c['model_preset']} {nparams / 1e6:.2f}M params, "
              f"data {c['data'].source}: {source.num_docs} docs / {int(source.lengths.sum())} tokens, "
              f"cost model {cm.name} (C={cm.capacity_tokens} tokens/rank), output {out}", flush=True)

    bar = None
    if rank == 0 and train.progress and start < train.steps:
        from tqdm import tqdm
        bar = tqdm(total=train.steps, initial=start, desc="train", unit="step", dynamic_ncols=True,
                   file=sys.stderr)
    losses, history = {}, []
    t_run = time.perf_counter()
    tokens_run = 0
    batch = next(sampler) if start < train.steps else None
    if batch is not None:
        check_lengths(batch.lengths, cm)
        planner.submit(start, batch.lengths)
    metrics_fh = open(out / "metrics.jsonl", "a") if rank == 0 else None
    try:
        for step in range(start, train.steps):
            if (train.kill_at_step == step and rank == train.kill_rank
                    and int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) == 0):
                print(f"[flexsp] rank {rank}: simulated failure at step {step}", flush=True)
                os._exit(13)
            t0 = time.perf_counter()
            plan, wait_ms = planner.get(step, batch.lengths, first=(step == start))
            # draw (and start planning) the next batch now: it is planned while this step trains
            sampler_state = sampler.state_dict()
            nxt = None
            if step + 1 < train.steps:
                nxt = next(sampler)
                planner.submit(step + 1, nxt.lengths)
            res = executor.run(plan, batch)
            gnorm = engine.step()
            stats = torch.tensor([res.loss_sum, res.targets, res.tokens], dtype=torch.float64)
            if world > 1:
                dist.all_reduce(stats)
            loss = float(stats[0] / stats[1])
            dt = time.perf_counter() - t0
            ntok = batch.num_tokens
            tokens_run += ntok
            losses[step] = loss
            if rank == 0:
                rec = {"step": step, "loss": round(loss, 6), "tokens": ntok, "targets": int(stats[1]),
                       "docs": len(batch.doc_ids), "plan": plan.summary(), "method": plan.method,
                       "status": plan.status, "planner_ms": round(plan.solve_seconds * 1e3, 2),
                       "plan_wait_ms": round(wait_ms, 2), "predicted_ms": plan.predicted_ms,
                       "step_s": round(dt, 4), "tokens_per_s": round(ntok / dt, 1),
                       "grad_norm": round(gnorm, 6), "lr": engine.lr, "memory_mb": round(_memory_mb(device), 1),
                       "epoch": batch.epoch}
                if train.log_doc_ids:
                    rec["doc_ids"] = list(batch.doc_ids)
                metrics_fh.write(json.dumps(rec) + "\n")
                metrics_fh.flush()
                history.append(rec)
                line = (f"step {step + 1:>4}/{train.steps} | loss {loss:7.4f} | {ntok / dt:8.0f} tok/s | "
                        f"plan {plan.summary()} [{plan.method}] | planner {rec['planner_ms']:.0f} ms "
                        f"(wait {wait_ms:.0f} ms) | mem {rec['memory_mb']:.0f} MB")
                (bar.write(line) if bar is not None else print(line, flush=True))
                if bar is not None:
                    bar.update(1)
            done = step + 1
            if (train.checkpoint_every and done % train.checkpoint_every == 0) or done == train.steps:
                save_checkpoint(ckpt_root, done, engine,
                                {"sampler": sampler_state, "config": c["raw"]}, keep=train.keep_checkpoints)
            batch = nxt
    finally:
        if bar is not None:
            bar.close()
        if metrics_fh is not None:
            metrics_fh.close()
    elapsed = time.perf_counter() - t_run
    summary = {"start_step": start, "steps": train.steps, "losses": losses, "seconds": elapsed,
               "tokens": tokens_run, "late_plans": planner.late, "world_size": world}
    if return_state:
        summary["state_dict"] = {k: v.detach().clone() for k, v in engine.full_state_dict().items()}
    if rank == 0 and history:
        first, last = history[0]["loss"], history[-1]["loss"]
        print(f"[flexsp] done: steps {start + 1}-{train.steps} in {elapsed:.1f} s, "
              f"{tokens_run / max(elapsed, 1e-9):.0f} tok/s, loss {first:.4f} -> {last:.4f}, "
              f"late plans {planner.late}, metrics {out / 'metrics.jsonl'}, checkpoints {ckpt_root}", flush=True)
        (out / "summary.json").write_text(json.dumps({k: v for k, v in summary.items() if k not in ("losses", "state_dict")}
                                                      | {"first_loss": first, "last_loss": last}, indent=2))
    return summary


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop metric lines of steps >= ``step`` (written after the checkpoint we resume from)."""
    if not path.is_file():
        return
    keep = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] < step]
    path.write_text("".join(ln + "\n" for ln in keep))


def main() -> None:
    import hydra

    config_dir = str(Path(__file__).resolve().parent.parent / "configs")

    @hydra.main(config_path=config_dir, config_name="config", version_base="1.3")
    def _app(cfg):
        try:
            run(cfg)
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()

    _app()


if __name__ == "__main__":
    main()
