"""FlexSP training entry point: ``flexsp-train [launcher options] [hydra overrides]``.

Launch alone (one process: a 1-rank world), under torchrun (``torchrun --nproc_per_node 4 -m
flexsp.train ...``), through Ray (``launch/ray_job.py``), or let ``flexsp-train`` be the launcher
(``flexsp-train --nproc-per-node 4 ...``: torchrun's own elastic agent, in-process, with the config
validated before any rank starts and a failure reported as one line, without torchrun's summary).

``run(cfg)`` is a sequence of named phases:

1. ``setup``: typed config, process group, output directory, topology, cost model (its model
   shape checked against the model's), planner -- all before any data work;
2. ``prepare_data``: the document source (tokenized once, memory-mapped) and the global-batch sampler;
3. ``build``: the model built sharded (on ``meta`` / under ``zero.Init``), materialised, and only
   the local shards filled (seeded init or a Hugging Face checkpoint), in the configured precision;
4. ``_resume``: the latest (or given) checkpoint, resharded to this world size;
5. ``_loop``: every step the plan (computed by the planner process while the previous step
   trained) arrives on every rank as one object; each rank runs its share of every micro-batch
   (flexsp.executor: the plan is applied at exactly this one hook); the engine has summed the
   gradients over all ranks; clip, AdamW, schedule; one host sync per step; rank 0 logs
   (console, metrics.jsonl, TensorBoard/W&B, plan pictures); checkpoints; SIGINT/SIGTERM finish
   the step, checkpoint and stop;
6. ``_finish``: summary line and summary.json.
"""

from __future__ import annotations

import datetime
import itertools
import json
import os
import resource
import signal
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import NoReturn

import torch
import torch.distributed as dist
from tqdm import tqdm

from flexsp import launcher, testing
from flexsp.checkpoint import Checkpointer, latest_checkpoint, load_checkpoint, resume_identity
from flexsp.config import RunConfig, check_output_dir, load_config
from flexsp.data import GlobalBatch, GlobalBatchSampler, build_source
from flexsp.data.tokenizer import check_vocabulary
from flexsp.distributed import default_backend, init_distributed
from flexsp.engines import HFWeights, RandomWeights, build_engine
from flexsp.errors import UserError
from flexsp.executor import StepExecutor
from flexsp.failure import AbortWatch
from flexsp.hostcopy import read_to_host, to_device
from flexsp.log import PLAIN, get_logger, setup_logging
from flexsp.model import Transformer
from flexsp.model.hf import HFCheckpointReader
from flexsp.model.hf_native import HFNativeModel
from flexsp.model.hf_native_weights import HFNativeWeights
from flexsp.modelspec import hf_native_reason, model_config_of, planning_shape, profile_command
from flexsp.planning import StepPlanner, load_cost_model
from flexsp.topology import SPTopology
from flexsp.tracking import Tracker
from solver.costmodel import CostModel
from solver.planner import PlanningError, check_lengths

log = get_logger(__name__)
_RUNS = itertools.count()


@dataclass
class RunState:
    """What the phases hand each other."""

    cfg: RunConfig
    """The run's configuration (train.precision resolved: never auto)."""
    rank: int
    """This process's rank."""
    world: int
    """Ranks in the world."""
    device: torch.device
    """This rank's device."""
    out: Path
    """output_dir."""
    topo: SPTopology
    """Every aligned SP group of the world."""
    cm: CostModel
    """The cost model the planner plans with (resized to the world)."""
    planner: StepPlanner
    """The per-step planner (rank 0 solves; every rank receives the plan)."""
    mcfg: object = None
    """The model trained: a flexsp.model.ModelConfig, or an HFNativeConfig (set by build)."""
    source: object = None
    """The document source (TokenizedCorpus, SFTSource, MegatronSource, SyntheticSource; prepare_data)."""
    sampler: GlobalBatchSampler | None = None
    """The global-batch sampler (prepare_data)."""
    engine: object = None
    """The training engine (FSDP2Engine or DeepSpeedEngine; build)."""
    executor: StepExecutor | None = None
    """Runs this rank's share of every micro-batch (build)."""
    start: int = 0
    """First step of this run (the resumed checkpoint's step)."""
    losses: dict[int, float] = field(default_factory=dict)
    """Loss per step (0-based) of this run."""
    history: list[dict] = field(default_factory=list)
    """Rank 0: the metrics.jsonl records of this run."""
    tokens: int = 0
    """Tokens trained by this run."""
    seconds: float = 0.0
    """Wall time of the training loop."""
    interrupted: str = ""
    """The signal that stopped the run early (SIGINT/SIGTERM, or another rank's), else ""."""
    last_checkpoint: Path | None = None
    """The newest checkpoint this run wrote."""


# -- phase 1: setup ----------------------------------------------------------------------------------
def _memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 1024 if sys.platform != "darwin" else rss / 2**20


def _init_world(cfg: RunConfig):
    """Initialise torch.distributed; a plain `python -m flexsp.train` becomes a 1-rank world."""
    parallel = cfg.parallel
    single = not dist.is_initialized() and "RANK" not in os.environ  # a 1-rank world of its own
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if restart is not None and not dist.is_initialized():
        _init_elastic(parallel.backend, int(restart))
    rank, world, device = init_distributed(parallel.backend, single=single)
    if parallel.world_size and parallel.world_size != world:
        raise UserError(
            f"parallel.world_size={parallel.world_size} but the launcher started {world} "
            f"ranks; start {parallel.world_size} ranks (e.g. torchrun --nproc_per_node "
            f"{parallel.world_size}) or set parallel.world_size=0",
            field="parallel.world_size",
        )
    return rank, world, device


def _init_elastic(backend: str | None, attempt: int) -> None:
    """Default group under torchrun, keyed by the restart attempt.

    Measured with torch 2.13 + gloo: after an elastic restart the workers reuse the agent's store,
    and the gloo rendezvous of the new attempt read the dead attempt's addresses ("Connection
    refused" in connectFullMesh). Prefixing every key with the attempt number isolates attempts.
    """
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    timeout = datetime.timedelta(seconds=600)
    store = dist.TCPStore(
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
        world,
        is_master=(not agent_store and rank == 0),
        timeout=timeout,
        multi_tenant=not agent_store,
    )
    store = dist.PrefixStore(f"flexsp/attempt_{attempt}", store)
    bound = {}
    if (backend or default_backend()) == "nccl":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
        bound = {"device_id": device}  # eager NCCL init on this device; barriers use it
    dist.init_process_group(
        backend=backend or default_backend(),
        store=store,
        rank=rank,
        world_size=world,
        timeout=timeout,
        **bound,
    )


def validate(cfg: RunConfig, world_size: int | None = None) -> None:
    """The checks that need no process group, data or model (the launcher runs them before any
    rank starts): output directory, model config, precision, cost model and its model shape."""
    check_output_dir(cfg.output_dir)
    mcfg = planning_shape(model_config_of(cfg)[0])
    if world_size:
        try:
            SPTopology(world_size)
        except ValueError as exc:
            raise UserError(f"{world_size} ranks: {exc}") from None
        if cfg.parallel.world_size and cfg.parallel.world_size != world_size:
            raise UserError(
                f"parallel.world_size={cfg.parallel.world_size} but {world_size} ranks are launched",
                field="parallel.world_size",
            )
    device = torch.device("cuda" if (cfg.parallel.backend or default_backend()) == "nccl" else "cpu")
    if not (cfg.solver.cost_model == "auto" and device.type == "cuda"):  # the estimate is built per rank
        load_cost_model(
            cfg.solver.cost_model,
            world_size or 1,
            shape=mcfg,
            device=device,
            allow_foreign=cfg.solver.allow_foreign_cost_model,
            profile_hint=profile_command(cfg, world_size or 1),
        )


def setup(cfg: RunConfig) -> RunState:
    parallel, solver, out = cfg.parallel, cfg.solver, cfg.output_dir
    rank, world, device = _init_world(cfg)
    setup_logging(rank)  # rank 0 logs (--log-ranks: FLEXSP_LOG_RANKS)
    if rank == 0:
        check_output_dir(out)
    mcfg_shape, precision = model_config_of(cfg)
    reason = hf_native_reason(cfg.model)
    if rank == 0 and reason:
        log.info(
            f"model {mcfg_shape.architecture} from {cfg.model.hf_checkpoint} trains HF-native "
            f"(transformers' modules, FlexSP attention and loss): {reason}"
        )
    mcfg_shape = planning_shape(mcfg_shape)
    hint = profile_command(cfg, world)  # named by a cost model of another model's shape
    cfg = replace(cfg, train=replace(cfg.train, precision=precision))
    if parallel.shard_size and (parallel.shard_size > world or world % parallel.shard_size):
        raise UserError(
            f"parallel.shard_size={parallel.shard_size} must divide the {world} ranks",
            field="parallel.shard_size",
        )
    dpn = parallel.devices_per_node or int(os.environ.get("LOCAL_WORLD_SIZE", world))
    topo = SPTopology(world, min(dpn, world)).build()
    cm = load_cost_model(
        solver.cost_model,
        world,
        shape=mcfg_shape,
        shard_size=parallel.shard_size,
        device=device,
        devices_per_node=min(dpn, world),
        allow_foreign=solver.allow_foreign_cost_model,
        profile_hint=hint,
    )
    if rank == 0 and cm.source.startswith("ESTIMATE"):
        log.info(f"cost model {cm.name}: {cm.source}")
    if (
        rank == 0
        and getattr(cm, "layers", 0)
        and cm.activation_checkpointing != mcfg_shape.activation_checkpointing
    ):
        log.warning(
            f"warning: cost model {cm.name} was measured with activation_checkpointing="
            f"{cm.activation_checkpointing} but the model trains with {mcfg_shape.activation_checkpointing}: "
            f"its times and memory per token are off (re-profile with the model's setting)"
        )
    planner = StepPlanner(
        solver, cm, rank, world, parallel.mode, parallel.static_degree, group=topo.host_group
    )
    st = RunState(cfg=cfg, rank=rank, world=world, device=device, out=out, topo=topo, cm=cm, planner=planner)
    if rank == 0:
        _write_config(out, cfg)
    return st


def _write_config(out: Path, cfg: RunConfig) -> None:
    """<output_dir>/config.yaml: the run's typed configuration (config.json without PyYAML)."""
    try:
        import yaml

        (out / "config.yaml").write_text(yaml.safe_dump(cfg.to_container(), sort_keys=False))
    except ImportError:  # a machine without PyYAML (e.g. a bare GPU image)
        (out / "config.json").write_text(json.dumps(cfg.to_container(), indent=1))


# -- phase 2: data -----------------------------------------------------------------------------------
def _build_source(data_cfg, rank: int):
    """Rank 0 builds (tokenizes, caches) the corpus first; the others then open the cache."""
    if rank == 0 or data_cfg.source == "synthetic":
        err = None
        try:
            src = build_source(data_cfg)
        except UserError as exc:
            err, src = str(exc), None
        if dist.get_world_size() > 1 and data_cfg.source != "synthetic":
            box = [err]
            dist.broadcast_object_list(box, src=0)
        if err:
            raise UserError(err)
        return src
    box = [None]
    dist.broadcast_object_list(box, src=0)
    if box[0]:
        raise UserError(box[0])
    return build_source(data_cfg)


TOKENIZED_SOURCES = ("corpus", "stdlib", "hf", "sft")
"""Data sources that tokenize text (with the model's tokenizer when the model is a checkpoint)."""


def prepare_data(st: RunState) -> None:
    cfg, cm, planner = st.cfg, st.cm, st.planner
    data_cfg = cfg.data
    hf = cfg.model.hf_checkpoint
    if hf and data_cfg.corpus.tokenizer == "bpe" and data_cfg.source in TOKENIZED_SOURCES:
        # the tokenizer of the checkpoint, unless one is configured explicitly
        data_cfg = replace(data_cfg, corpus=replace(data_cfg.corpus, tokenizer=hf))
    source = _build_source(data_cfg, st.rank)
    static = cfg.parallel.mode == "static"
    ranks = planner.static_degree if static else st.world
    limit = ranks * cm.capacity_tokens
    if data_cfg.source == "sft":  # over-long conversations: dropped or cut (data.truncate), logged
        holds = f"the cluster holds {ranks} ranks x {cm.capacity_tokens} tokens under cost model {cm.name}"
        source = source.fit(limit, data_cfg.truncate, holds)
        if st.rank == 0:
            for line in [*source.report, source.summary()]:
                log.info(line)
    too_long = (source.lengths > limit).nonzero()[0]
    if too_long.size:
        i = int(too_long[0])
        raise PlanningError(
            f"{too_long.size} document(s) are longer than the cluster can hold ({limit} tokens = "
            f"{ranks} ranks x {cm.capacity_tokens} tokens per rank under cost model {cm.name}), e.g. "
            "document "
            f"{i} with {int(source.lengths[i])} tokens. Policy: they are never silently dropped; lower "
            f"data.corpus.max_doc_tokens (long documents are then split, data.corpus.long_doc_policy=split) "
            f"or add ranks/memory"
        )
    st.source = source
    st.sampler = GlobalBatchSampler(source.lengths, data_cfg.sampler, targets=source.target_counts)


# -- phase 3: model + engine -------------------------------------------------------------------------
def build(st: RunState) -> None:
    cfg = st.cfg
    hf = cfg.model.hf_checkpoint
    vocab = cfg.model.overrides.get("vocab_size") or st.source.vocab_size
    if hf:
        vocab = model_config_of(cfg)[0].vocab_size
        if cfg.data.source in TOKENIZED_SOURCES:  # the data's tokenizer must be the model's
            tok = cfg.data.corpus.tokenizer
            check_vocabulary(st.source.vocab_size, vocab, hf if tok == "bpe" else tok, hf)
    if vocab < st.source.vocab_size:
        raise UserError(
            f"model.vocab_size={vocab} is smaller than the data's vocabulary "
            f"({st.source.vocab_size}); set model.vocab_size=null to follow the data",
            field="model.vocab_size",
        )
    mcfg, _ = model_config_of(cfg, vocab)
    if getattr(mcfg, "hf_native", False):
        weights = HFNativeWeights(hf)

        def make_model(device):
            return HFNativeModel(mcfg, device=device)
    else:
        weights = (
            HFWeights(HFCheckpointReader(hf))
            if hf
            else RandomWeights(cfg.train.seed, mcfg.init_std, mcfg.layers)
        )

        def make_model(device):
            return Transformer(mcfg, device=device)

    torch.manual_seed(cfg.train.seed)
    st.mcfg = mcfg
    st.engine = build_engine(
        cfg.parallel.engine, make_model, weights, cfg.train, cfg.parallel, st.world, st.device
    )
    st.executor = StepExecutor(st.engine, st.source, st.topo, st.rank, st.device, mcfg.heads)


# -- phase 4: resume ---------------------------------------------------------------------------------
def _resume(st: RunState) -> None:
    train, out = st.cfg.train, st.out
    if train.resume == "never":
        if st.rank == 0:
            (out / "metrics.jsonl").unlink(missing_ok=True)
        return
    ck = latest_checkpoint(out / "checkpoints") if train.resume == "auto" else Path(train.resume)
    if ck is None:
        return
    expect = resume_identity(asdict(st.mcfg), str(st.cfg.parallel.engine), str(train.precision))
    state = load_checkpoint(ck, st.engine, st.world, expect=expect, auto=train.resume == "auto")
    st.sampler.load_state_dict(state["sampler"])
    st.start = int(state["step"])
    if st.rank == 0:
        _truncate_metrics(out / "metrics.jsonl", st.start)
        saved = state.get("world_size")
        note = f" (written by {saved} ranks, resharded to {st.world})" if saved and saved != st.world else ""
        log.info(f"resumed from {ck} at step {st.start}{note}")


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop metric lines of steps > ``step`` (written after the checkpoint we resume from)."""
    if not path.is_file():
        return
    keep = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= step]
    path.write_text("".join(ln + "\n" for ln in keep))


# -- phase 5: the loop -------------------------------------------------------------------------------
class _Interrupt:
    """SIGINT/SIGTERM during training: finish the step, checkpoint, stop. A second signal more than
    ``DUPLICATE_S`` later stops at once; one within it is the same interrupt delivered twice (a
    terminal's Ctrl-C reaches the rank directly and again through torchrun's agent)."""

    DUPLICATE_S = 2.0

    def __init__(self):
        self.signal = 0
        self._at = 0.0
        self._old = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signal:
            if time.monotonic() - self._at > self.DUPLICATE_S:
                os._exit(128 + signum)
            return
        self.signal, self._at = signum, time.monotonic()

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def _header(st: RunState) -> None:
    cfg, cm = st.cfg, st.cm
    nparams = st.mcfg.num_params()
    origin = f"from {cfg.model.hf_checkpoint}" if cfg.model.hf_checkpoint else f"{cfg.model.preset}"
    if getattr(st.mcfg, "hf_native", False):
        origin += f" ({st.mcfg.architecture}, HF-native)"
    hsdp = f" HSDP {cfg.parallel.shard_size}" if cfg.parallel.shard_size else ""
    log.info(
        f"{st.world} rank(s) on {st.device.type} ({dist.get_backend()}), engine {cfg.parallel.engine}"
        f"{hsdp}, precision {cfg.train.precision}, mode {cfg.parallel.mode}, model {origin} "
        f"{nparams / 1e6:.2f}M params, data {cfg.data.source}: {st.source.num_docs} docs / "
        f"{int(st.source.lengths.sum())} tokens, cost model {cm.name} (C={cm.capacity_tokens} tokens/rank), "
        f"output {st.out}"
    )


def _loop(st: RunState) -> None:
    train = st.cfg.train
    rank, planner, sampler = st.rank, st.planner, st.sampler
    if rank == 0:
        _header(st)
    ckpt = Checkpointer(
        st.out / "checkpoints", keep=train.keep_checkpoints, async_save=train.async_checkpoint
    )
    metrics = _RankZeroLog(st) if rank == 0 else None
    batch = next(sampler) if st.start < train.steps else None
    if batch is not None:
        check_lengths(batch.lengths, st.cm)
        planner.submit(st.start, batch.lengths)
    t_run = time.perf_counter()
    watch = AbortWatch(rank, st.world, tag=f"/{next(_RUNS)}")
    step = st.start
    try:
        with watch, _Interrupt() as interrupt:
            try:
                for step in range(st.start, train.steps):
                    batch = _one_step(st, step, batch, ckpt, metrics, interrupt)
                    if st.interrupted:
                        break
            except BaseException as exc:
                exc.flexsp_first = watch.post(f"step {step + 1}: {type(exc).__name__}: {exc}")
                raise
        ckpt.close()
    finally:
        planner.close()
        st.executor.close()
        if metrics is not None:
            metrics.close()
    st.seconds = time.perf_counter() - t_run


def _one_step(
    st: RunState, step: int, batch: GlobalBatch, ckpt: Checkpointer, metrics, interrupt: _Interrupt
):
    """Train ``step`` on ``batch``; returns the next batch (drawn and submitted to the planner
    before this step trains)."""
    cfg, train = st.cfg, st.cfg.train
    t0 = time.perf_counter()
    plan, wait_ms = st.planner.get(step, batch.lengths, first=(step == st.start))
    sampler_state = st.sampler.state_dict()  # before the next batch is drawn
    nxt = None
    if step + 1 < train.steps:
        nxt = next(st.sampler)
        st.planner.submit(step + 1, nxt.lengths)
    res = st.executor.run(plan, batch)
    gnorm = st.engine.step()
    # the step's one host sync: loss/targets/tokens summed over ranks, plus "stop" (any rank
    # signalled) so every rank stops after the same step
    counts = to_device(
        torch.tensor([res.targets, res.tokens, interrupt.signal], dtype=torch.float64), st.device
    )
    stats = torch.cat([res.loss_sum.double().reshape(1), counts])
    if st.world > 1:
        dist.all_reduce(stats)
    # the global grad norm is the same on every rank: read with the sums, in the same sync
    loss_sum, targets, _, stop, gnorm = read_to_host(
        torch.cat([stats, to_device(gnorm.detach().double().reshape(1), st.device)])
    )
    loss = loss_sum / targets
    dt = time.perf_counter() - t0
    st.tokens += batch.num_tokens
    st.losses[step] = loss
    done = step + 1
    if metrics is not None:
        metrics.step(done, loss, gnorm, int(targets), dt, plan, wait_ms, batch)
    if stop:
        st.interrupted = (
            signal.Signals(interrupt.signal).name if interrupt.signal else "a signal on another rank"
        )
    if (train.checkpoint_every and done % train.checkpoint_every == 0) or done == train.steps or stop:
        state = {
            "sampler": sampler_state,
            "config": cfg.to_container(),
            "world_size": st.world,
            "engine": str(cfg.parallel.engine),
            "precision": str(train.precision),
            "model_config": asdict(st.mcfg),
            "tokenizer": _tokenizer_of(st),
        }
        st.last_checkpoint = ckpt.save(done, st.engine, state)
    return nxt


def _tokenizer_of(st: RunState):
    """The tokenizer an export should ship: the HF checkpoint's, the configured file, or the corpus
    cache's tokenizer.json."""
    if st.cfg.model.hf_checkpoint:
        return str(st.cfg.model.hf_checkpoint)
    directory = getattr(st.source, "directory", None)
    if directory is not None and (Path(directory) / "tokenizer.json").is_file():
        return str(Path(directory) / "tokenizer.json")
    return None


class _RankZeroLog:
    """Rank 0's outputs per step: console line (a progress bar only on a terminal), metrics.jsonl
    (with the step's document ids: which documents every step trained, so a run can be audited for
    lost or repeated samples), the tracker (TensorBoard/W&B) and plan pictures."""

    def __init__(self, st: RunState):
        self.st, train = st, st.cfg.train
        self.fh = open(st.out / "metrics.jsonl", "a")
        self.bar = None
        if train.progress and sys.stderr.isatty() and st.start < train.steps:
            self.bar = tqdm(
                total=train.steps,
                initial=st.start,
                desc="train",
                unit="step",
                dynamic_ncols=True,
                file=sys.stderr,
            )
        self.tracker = Tracker(
            str(train.logger),
            st.out,
            run_name=st.out.name,
            config=st.cfg.to_container(),
            plot_plan_every=train.plot_plan_every,
            wandb_project=train.wandb_project,
        )

    def step(self, done, loss, gnorm, targets, dt, plan, wait_ms, batch) -> None:
        st, train = self.st, self.st.cfg.train
        ntok = batch.num_tokens
        rec = {
            "step": done,
            "loss": round(loss, 6),
            "tokens": ntok,
            "targets": targets,
            "docs": len(batch.doc_ids),
            "plan": plan.summary(),
            "method": plan.method,
            "status": plan.status,
            "planner_ms": round(plan.solve_seconds * 1e3, 2),
            "plan_wait_ms": round(wait_ms, 2),
            "predicted_ms": plan.predicted_ms,
            "step_s": round(dt, 4),
            "tokens_per_s": round(ntok / dt, 1),
            "grad_norm": round(gnorm, 6),
            "lr": st.engine.lr,
            "memory_mb": round(_memory_mb(st.device), 1),
            "epoch": batch.epoch,
            "late_plans": st.planner.late,
            "doc_ids": list(batch.doc_ids),
        }
        self.fh.write(json.dumps(rec) + "\n")
        self.fh.flush()
        st.history.append(rec)
        line = (
            f"step {done:>4}/{train.steps} | loss {loss:7.4f} | {ntok / dt:8.0f} tok/s | "
            f"plan {plan.summary()} [{plan.method}] | pred {plan.predicted_ms:.0f} ms, took "
            f"{dt * 1e3:.0f} ms | "
            f"planner {rec['planner_ms']:.0f} ms (wait {wait_ms:.0f} ms) | mem {rec['memory_mb']:.0f} MB"
        )
        if self.bar is not None:
            self.bar.write(line)
            self.bar.update(1)
        else:
            log.info(line, extra=PLAIN)
        self.tracker.log_step(done, {**rec, "measured_ms": dt * 1e3}, plan=plan)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        self.fh.close()
        self.tracker.close()


# -- phase 6: summary --------------------------------------------------------------------------------
def _finish(st: RunState, return_state: bool) -> dict:
    train = st.cfg.train
    last_step = max(st.losses) + 1 if st.losses else st.start
    summary = {
        "start_step": st.start,
        "steps": train.steps,
        "last_step": last_step,
        "losses": st.losses,
        "seconds": st.seconds,
        "tokens": st.tokens,
        "tokens_per_s": st.tokens / st.seconds if st.seconds > 0 else 0.0,
        "late_plans": st.planner.late,
        "world_size": st.world,
        "interrupted": st.interrupted,
        "checkpoint": str(st.last_checkpoint) if st.last_checkpoint else None,
    }
    if return_state:
        summary["state_dict"] = {k: v.detach().clone() for k, v in st.engine.full_state_dict().items()}
    if st.rank == 0 and st.interrupted:
        log.info(
            f"interrupted at step {last_step} ({st.interrupted}), checkpoint {st.last_checkpoint}; "
            f"run the same command again (train.resume=auto) to continue"
        )
    if st.rank == 0 and st.history:
        first, last = st.history[0]["loss"], st.history[-1]["loss"]
        log.info(
            f"done: steps {st.start + 1}-{last_step} in {st.seconds:.1f} s, "
            f"{summary['tokens_per_s']:.0f} tok/s, loss {first:.4f} -> {last:.4f}, "
            f"late plans {st.planner.late}, metrics {st.out / 'metrics.jsonl'}, "
            f"checkpoints {st.out / 'checkpoints'}"
        )
        keep = {k: v for k, v in summary.items() if k not in ("losses", "state_dict")}
        (st.out / "summary.json").write_text(
            json.dumps(keep | {"first_loss": first, "last_loss": last}, indent=2)
        )
    return summary


def run(cfg: RunConfig | Mapping, return_state: bool = False) -> dict:
    """Train as ``cfg`` says (flexsp.config.compose / load_config; a composed Hydra mapping, as
    scripts build it, is typed by load_config first). Returns the summary dict on every rank (losses
    per step, final step, ...); ``return_state`` adds the full final model state dict under
    "state_dict" (collective)."""
    if not isinstance(cfg, RunConfig):
        cfg = load_config(cfg)
    st = setup(cfg)
    prepare_data(st)
    build(st)
    testing.install(st)  # fault injection for the test suite: a no-op without FLEXSP_FAULTS
    _resume(st)
    _loop(st)
    return _finish(st, return_state)


# -- command line ------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    """``flexsp-train``'s work (flexsp.launcher: compose, validate, launch or run here); returns the
    exit status (an in-process call, as tests make)."""
    return launcher.main(sys.argv[1:] if argv is None else argv, run, validate)


def cli() -> NoReturn:
    """The ``flexsp-train`` command and ``python -m flexsp.train`` (what every rank runs): :func:`main`,
    then :func:`flexsp.launcher.exit_process` with its status."""
    launcher.exit_process(main())


if __name__ == "__main__":
    cli()
