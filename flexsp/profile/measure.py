"""The per-rank part of ``flexsp-profile``: time real micro-batches, links and activations.

Every measurement runs the way training runs, on every rank at once (so on a CPU box whose ranks
share the cores each rank computes at the speed it will have in training):

- compute: a one-micro-batch plan whose every group has degree 1 and the same packed documents,
  run by :class:`flexsp.executor.StepExecutor` under the training engine (FSDP2: its per-layer
  all-gathers / reduce-scatters are part of every micro-batch, so they land in ``b``);
- communication: the same through groups of degree d = 2, 4, ... in Ulysses and ring mode;
- links: ``all_to_all_single`` and a ring ``batch_isend_irecv`` on every aligned group of each
  degree concurrently (as the groups of one micro-batch run);
- the optimizer step (a per-step cost outside the CostModel's per-group form);
- activation memory per token: CUDA allocator peak (``max_memory_allocated``) or, on CPU, the
  bytes of the tensors autograd saves for backward (``saved_tensors_hooks``), an estimate;
- validation: held-out long-tailed global batches planned with the fitted model
  (``plan_batch`` and static full-degree SP), every micro-batch and the whole step timed.

Each timed region is fenced by barriers; rank 0's wall time is the slowest rank's. Every figure
is the fastest of ``repeats`` runs: on a shared machine other jobs only add time.
"""
from __future__ import annotations

import os
import statistics
import time

import numpy as np
import torch
import torch.distributed as dist

from flexsp.profile.config import ProfileConfig


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def one_mb_plan(world: int, sp: int, n_seq: int, mode: str):
    """A one-micro-batch plan: every aligned group of degree ``sp`` runs all ``n_seq`` sequences."""
    from solver.plan import GroupPlan, MicroBatchPlan, Plan
    groups = tuple(GroupPlan(sp=sp, ranks=tuple(range(k * sp, (k + 1) * sp)), seq_ids=tuple(range(n_seq)),
                             attention="local" if sp == 1 else mode) for k in range(world // sp))
    return Plan(num_devices=world, micro_batches=(MicroBatchPlan(groups),), predicted_ms=0.0)


def sub_plan(plan, index: int):
    """Micro-batch ``index`` of ``plan`` alone, as a plan (to time it by itself)."""
    from dataclasses import replace
    mb = plan.micro_batches[index]
    return replace(plan, micro_batches=(mb,), predicted_ms=mb.predicted_ms)


class Shapes:
    """All profiled documents in one synthetic source; a shape is a list of lengths."""

    def __init__(self, vocab: int, seed: int):
        self.lengths: list[int] = []
        self.vocab, self.seed = vocab, seed
        self._source = None

    def add(self, lengths) -> tuple[int, ...]:
        start = len(self.lengths)
        self.lengths.extend(int(x) for x in lengths)
        return tuple(range(start, len(self.lengths)))

    def batch(self, doc_ids):
        from flexsp.data import GlobalBatch
        return GlobalBatch(step=0, epoch=0, doc_ids=tuple(doc_ids),
                           lengths=tuple(self.lengths[i] for i in doc_ids))

    @property
    def source(self):
        if self._source is None:
            from flexsp.data import SyntheticSource
            self._source = SyntheticSource(self.lengths, self.vocab, self.seed)
        return self._source


def heldout_batches(cfg: ProfileConfig) -> list[list[int]]:
    """Long-tailed global batches from a published distribution, scaled so 8K maps to max_len."""
    try:
        from solver.workloads import sample_lengths
    except ImportError:  # no scipy (e.g. a bare GPU image): the data package's samplers
        from flexsp.data.synthetic import sample_lengths
    out = []
    for k in range(cfg.validate_batches):
        raw = sample_lengths(cfg.validate_distribution, 512, seed=cfg.seed + 1000 + k)
        scaled = np.clip(np.rint(raw * cfg.validate_max_len / 8192), 8, cfg.validate_max_len).astype(int)
        batch, total = [], 0
        for n in scaled:
            if total >= cfg.validate_tokens:
                break
            batch.append(int(n))
            total += int(n)
        out.append(batch)
    return out


def activation_bytes(model, lengths, device) -> int:
    """Bytes of activations one forward keeps for backward: CUDA allocator peak growth, or on CPU
    the distinct storages autograd saves (parameters excluded)."""
    from flexsp.model import shard_inputs
    T = int(sum(lengths))
    ids = torch.randint(0, model.config.vocab_size, (T,), device=device)
    cu = torch.tensor([0, *np.cumsum(lengths).tolist()], dtype=torch.int32, device=device)
    inputs = shard_inputs(ids, cu)
    if device.type == "cuda":
        sync(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        loss, _ = inputs.loss(model)
        sync(device)
        peak = torch.cuda.max_memory_allocated(device) - base
        loss.backward()
        model.zero_grad(set_to_none=True)
        return int(peak)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        try:
            st = t.untyped_storage()
            key, size = st.data_ptr(), st.nbytes()
        except Exception:  # tensors without storage (e.g. wrapped subclasses)
            key, size = id(t), t.numel() * t.element_size()
        if key not in params and key not in seen:
            seen[key] = size
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss, _ = inputs.loss(model)
    del loss
    return int(sum(seen.values()))


def rank_body(cfg_dict: dict) -> dict | None:
    """Run every measurement on this rank; rank 0 returns the raw results (others None)."""
    from flexsp.distributed import init_distributed
    from flexsp.engines import build_engine
    from flexsp.executor import StepExecutor
    from flexsp.model import Transformer, model_config
    from flexsp.topology import SPTopology
    from flexsp.train import TrainConfig

    cfg = ProfileConfig.from_dict(cfg_dict)
    rank, world, device = init_distributed(cfg.backend)
    dpn = cfg.devices_per_node or int(os.environ.get("LOCAL_WORLD_SIZE", world))
    topo = SPTopology(world, min(dpn, world)).build()
    mcfg = model_config(cfg.model, **dict(cfg.model_overrides))
    torch.manual_seed(cfg.seed)
    model = Transformer(mcfg, device=device)
    engine = build_engine(cfg.engine, model, TrainConfig(steps=10**6, warmup_steps=0), world, device)
    executor = StepExecutor(engine, None, topo, rank, device, mcfg.heads)
    shapes = Shapes(mcfg.vocab_size, cfg.seed)

    degrees = [d for d in topo.degrees if d > 1]
    modes = [m for m in cfg.modes]
    compute_ids = [shapes.add(s) for s in cfg.compute_shapes]
    comm_ids = [shapes.add(s) for s in cfg.comm_shapes]
    held = heldout_batches(cfg) if cfg.validate_batches else []
    held_ids = [shapes.add(b) for b in held]
    executor.source = shapes.source

    n_links = len(degrees) * 2 * len(cfg.link_mb)
    total = (len(compute_ids) + len(comm_ids) * len(degrees) * len(modes)) * (cfg.repeats + 1) + n_links + 2
    bar = None
    if rank == 0 and cfg.progress:
        from tqdm import tqdm
        bar = tqdm(total=total, desc="profile", unit="run", dynamic_ncols=True)

    def tick(n=1):
        if bar is not None:
            bar.update(n)

    def timed(fn) -> float:
        sync(device)
        dist.barrier()
        t0 = time.perf_counter()
        fn()
        sync(device)
        dist.barrier()
        return (time.perf_counter() - t0) * 1e3

    def time_plans(items, repeats) -> list[float]:
        """Fastest of ``repeats`` runs (ms) of every (plan, batch), repetitions interleaved
        round-robin. The minimum, not the median: on a shared machine other jobs only ever add
        time, and the validation uses the same statistic."""
        for plan, batch in items:  # warm-up (allocator, kernels, first call)
            timed(lambda: executor.run(plan, batch))
            tick()
        ts = [[] for _ in items]
        for _ in range(repeats):
            for k, (plan, batch) in enumerate(items):
                ts[k].append(timed(lambda: executor.run(plan, batch)))
                engine.optimizer.zero_grad(set_to_none=True)
                tick()
        return [min(t) for t in ts]

    out: dict = {"world_size": world, "device": str(device), "backend": dist.get_backend(),
                 "model": cfg.model, "model_config": {k: getattr(mcfg, k) for k in
                                                      ("vocab_size", "hidden", "layers", "heads", "kv_heads",
                                                       "intermediate", "dtype")},
                 "num_params": mcfg.num_params(), "threads_per_rank": torch.get_num_threads(),
                 "cpu_count": os.cpu_count(), "loadavg_start": list(os.getloadavg())}
    # -- compute at degree 1 and SP groups per degree and mode, all ranks busy ------------------
    items, keys = [], []
    for ids in compute_ids:
        items.append((one_mb_plan(world, 1, len(ids), "local"), shapes.batch(ids)))
        keys.append(None)
    for d in degrees:
        for mode in modes:
            for ids in comm_ids:
                items.append((one_mb_plan(world, d, len(ids), mode), shapes.batch(ids)))
                keys.append(f"{mode}:{d}")
    times = time_plans(items, cfg.repeats)
    out["compute"] = [(list(b.lengths), ms) for (_, b), k, ms in zip(items, keys, times) if k is None]
    comm: dict = {}
    for (_, b), k, ms in zip(items, keys, times):
        if k is not None:
            comm.setdefault(k, []).append((list(b.lengths), ms))
    out["comm"] = comm
    # -- links ---------------------------------------------------------------------------------
    links = {}
    for d in degrees:
        g = topo.group_of(d, rank)
        me = dist.get_rank(g)
        nxt, prv = dist.get_global_rank(g, (me + 1) % d), dist.get_global_rank(g, (me - 1) % d)
        for kind in ("all_to_all", "p2p"):
            rows = []
            for mb in cfg.link_mb:
                n = max(d, int(mb * 1e6 / 4) // d * d)
                x = torch.ones(n, device=device)
                y = torch.empty_like(x)
                if kind == "all_to_all":
                    fn = lambda: dist.all_to_all_single(y, x, group=g)  # noqa: E731
                else:
                    def fn():
                        reqs = dist.batch_isend_irecv([dist.P2POp(dist.isend, x, nxt, g),
                                                       dist.P2POp(dist.irecv, y, prv, g)])
                        for r in reqs:
                            r.wait()
                timed(fn)
                ts = [timed(fn) for _ in range(cfg.repeats)]
                ts = [min(ts)]
                # bytes each rank sends: all-to-all keeps 1/d locally
                sent = n * 4 * ((d - 1) / d if kind == "all_to_all" else 1)
                rows.append((sent, statistics.median(ts)))
                tick()
            links[f"{kind}:{d}"] = rows
    out["links"] = links
    # -- optimizer step (per step, outside the per-group form) ---------------------------------
    batch = shapes.batch(compute_ids[0])
    executor.run(one_mb_plan(world, 1, len(compute_ids[0]), "local"), batch)
    ts = []
    for _ in range(cfg.repeats):
        ts.append(timed(engine.step))
        executor.run(one_mb_plan(world, 1, len(compute_ids[0]), "local"), batch)
    engine.optimizer.zero_grad(set_to_none=True)
    out["optimizer_ms"] = min(ts)
    tick()
    # -- activation memory (rank 0, a plain copy of the model: no collectives) -----------------
    if rank == 0:
        plain = Transformer(mcfg, device=device)
        sizes = [(1024, [256] * 4), (4096, [512] * 8)]
        mem = [(T, activation_bytes(plain, lens, device)) for T, lens in sizes]
        slope = (mem[1][1] - mem[0][1]) / (mem[1][0] - mem[0][0])
        out["activation"] = {"method": ("CUDA max_memory_allocated growth in forward" if device.type == "cuda"
                                        else "CPU estimate: bytes of tensors saved for backward "
                                             "(saved_tensors_hooks), params excluded"),
                             "points": mem, "bytes_per_token": slope}
        del plain
    tick()
    dist.barrier()
    # -- fit on rank 0, validate on everyone -----------------------------------------------------
    from flexsp.profile.build import build_cost_model
    payload = [None]
    if rank == 0:
        payload[0] = build_cost_model(cfg, out, topo).to_dict()
    if world > 1:
        dist.broadcast_object_list(payload, src=0)
    from solver.costmodel import CostModel
    cm = CostModel.from_dict(payload[0])
    out["cost_model"] = payload[0]
    out["loadavg_end_of_fit"] = list(os.getloadavg())
    if bar is not None:
        bar.close()
    out["validation"] = validate(cm, held_ids, shapes, executor, engine, timed, rank, world,
                                 out["optimizer_ms"], cfg.progress, cfg.repeats)
    return out if rank == 0 else None


def validate(cm, held_ids, shapes, executor, engine, timed, rank, world, optimizer_ms, progress=False,
             repeats: int = 3) -> list:
    """Plan each held-out batch (FlexSP and static full-degree SP), time every micro-batch alone
    and the whole step (executor + optimizer); rows of predicted vs measured ms (rank 0)."""
    from solver.baselines import static_plan
    from solver.plan import Plan
    from solver.planner import plan_batch

    rows = []
    for k, ids in enumerate(held_ids):
        batch = shapes.batch(ids)
        for method in ("flexsp", "static"):
            box = [None]
            if rank == 0:
                plan = (plan_batch(batch.lengths, cm, time_limit=1.0) if method == "flexsp"
                        else static_plan(batch.lengths, cm))
                box[0] = plan.to_dict()
            if world > 1:
                dist.broadcast_object_list(box, src=0)
            plan = Plan.from_dict(box[0])
            timed(lambda: executor.run(plan, batch))  # warm-up
            engine.optimizer.zero_grad(set_to_none=True)
            for i, mb in enumerate(plan.micro_batches):
                sub = sub_plan(plan, i)
                ms = min(timed(lambda: executor.run(sub, batch)) for _ in range(repeats))
                rows.append({"batch": k, "method": method, "kind": "micro-batch", "index": i,
                             "groups": " + ".join(f"{g.sp}" for g in mb.groups),
                             "predicted_ms": mb.predicted_ms, "measured_ms": ms})
            engine.optimizer.zero_grad(set_to_none=True)
            steps = []
            for _ in range(repeats):
                def step():
                    executor.run(plan, batch)
                    engine.step()
                steps.append(timed(step))
            rows.append({"batch": k, "method": method, "kind": "step", "index": -1, "groups": plan.summary(),
                         "tokens": batch.num_tokens, "predicted_ms": plan.predicted_ms + optimizer_ms,
                         "measured_ms": min(steps)})
            if rank == 0 and progress:
                print(f"[profile] validation batch {k} {method}: {plan.summary()} predicted "
                      f"{rows[-1]['predicted_ms']:.0f} ms, measured {rows[-1]['measured_ms']:.0f} ms", flush=True)
    return rows
