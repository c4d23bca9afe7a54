"""The per-rank part of ``flexsp-profile``: time real micro-batches, links and activations.

Every measurement runs the way training runs, on every rank at once (so on a CPU box whose ranks
share the cores each rank computes at the speed it will have in training):

- compute: a one-micro-batch plan whose every group has degree 1 and the same packed documents,
  run by :class:`flexsp.executor.StepExecutor` under the training engine (FSDP2: its per-layer
  all-gathers / reduce-scatters are part of every micro-batch, so they land in ``b``);
- communication: the same through groups of degree d = 2, 4, ... in Ulysses and ring mode;
- links: ``all_to_all_single`` and a ring ``batch_isend_irecv`` on every aligned group of each
  degree concurrently (as the groups of one micro-batch run);
- the optimizer step (``engine.step``): the CostModel's ``step_overhead_ms``;
- activation memory per token: CUDA allocator peak (``max_memory_allocated``) or, on CPU, the
  bytes of the tensors autograd saves for backward (``saved_tensors_hooks``), an estimate;
- validation: held-out long-tailed global batches planned (``plan_batch`` and static full-degree
  SP) with a provisional fit of the warm-up pass; every micro-batch alone and the whole step timed.

Noise control: after one warm-up pass, every item -- fit shapes, the optimizer step, held-out
micro-batches and steps -- is timed in the same ``repeats`` passes (order reversed every other
pass), so load drift on a shared machine hits the fit and the validation alike; each figure is the
fastest of the ``repeats`` runs (other jobs only ever add time). The held-out predictions are
re-priced with the final fit. Load averages are recorded at the start, after warm-up, after every
pass and at the end. Each timed region is fenced by barriers (rank 0's wall time is the slowest
rank's).
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
    n_fit = len(compute_ids) + len(comm_ids) * len(degrees) * len(modes) + 1
    bar = None
    if rank == 0 and cfg.progress:
        from tqdm import tqdm
        bar = tqdm(total=n_fit + n_links + 1, desc="profile", unit="run", dynamic_ncols=True)

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

    def run_mb(plan, batch):
        """One forward/backward of ``plan`` (gradients dropped, untimed)."""
        def f():
            ms = timed(lambda: executor.run(plan, batch))
            engine.optimizer.zero_grad(set_to_none=True)
            return ms
        return f

    def run_step(plan, batch):
        """A whole training step: every micro-batch + the optimizer step (engine.step zeroes grads)."""
        def body():
            executor.run(plan, batch)
            engine.step()
        return lambda: timed(body)

    opt_plan, opt_batch = one_mb_plan(world, 1, len(compute_ids[0]), "local"), shapes.batch(compute_ids[0])

    def run_opt():
        executor.run(opt_plan, opt_batch)  # untimed: gradients for the step to apply
        return timed(engine.step)

    def passes(items: dict, repeats: int, times: dict, loads: list | None = None) -> None:
        """``repeats`` passes over every item, order reversed on odd passes (drift hits all alike)."""
        keys = list(items)
        for r in range(repeats):
            for k in (keys if r % 2 == 0 else keys[::-1]):
                times.setdefault(k, []).append(items[k]())
                tick()
            if loads is not None:
                loads.append(list(os.getloadavg()))

    out: dict = {"world_size": world, "device": str(device), "backend": dist.get_backend(),
                 "model": cfg.model, "model_config": {k: getattr(mcfg, k) for k in
                                                      ("vocab_size", "hidden", "layers", "heads", "kv_heads",
                                                       "intermediate", "dtype")},
                 "num_params": mcfg.num_params(), "threads_per_rank": torch.get_num_threads(),
                 "cpu_count": os.cpu_count(), "loadavg_start": list(os.getloadavg()), "repeats": cfg.repeats,
                 "statistic": f"fastest of {cfg.repeats} runs per item after one warm-up; fit and validation "
                              f"items interleaved in the same passes (order reversed every other pass)"}
    # -- fit items: compute at degree 1, SP groups per degree and mode, the optimizer step -------
    fit_items: dict = {}
    for j, ids in enumerate(compute_ids):
        fit_items[("compute", j)] = run_mb(one_mb_plan(world, 1, len(ids), "local"), shapes.batch(ids))
    for d in degrees:
        for mode in modes:
            for j, ids in enumerate(comm_ids):
                fit_items[(f"{mode}:{d}", j)] = run_mb(one_mb_plan(world, d, len(ids), mode), shapes.batch(ids))
    fit_items[("optimizer", 0)] = run_opt
    warm: dict = {}
    passes(fit_items, 1, warm)  # warm-up; also the provisional fit that plans the held-out batches
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
                # bytes each rank sends: all-to-all keeps 1/d locally
                sent = n * 4 * ((d - 1) / d if kind == "all_to_all" else 1)
                rows.append((sent, min(ts)))
                tick()
            links[f"{kind}:{d}"] = rows
    out["links"] = links
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
    from flexsp.profile.build import build_cost_model
    from solver.plan import Plan

    def collect(times: dict) -> None:
        out["compute"] = [(list(shapes.batch(ids).lengths), min(times[("compute", j)]))
                          for j, ids in enumerate(compute_ids)]
        comm: dict = {}
        for (key, j), ts in times.items():
            if key not in ("compute", "optimizer") and not isinstance(key, tuple) and key.count(":") == 1:
                comm.setdefault(key, []).append((list(shapes.batch(comm_ids[j]).lengths), min(ts)))
        out["comm"] = comm
        ts = times[("optimizer", 0)]
        out["optimizer_ms"] = min(ts)
        out["optimizer_spread_ms"] = [min(ts), statistics.median(ts), max(ts)]

    # -- held-out plans from a provisional fit of the warm-up times (rank 0) ---------------------
    box = [None]
    if rank == 0 and held_ids:
        collect(warm)
        provisional = build_cost_model(cfg, dict(out), topo)
        box[0] = plan_heldout(provisional, [shapes.batch(ids).lengths for ids in held_ids])
    if world > 1:
        dist.broadcast_object_list(box, src=0)
    held_plans = [{m: Plan.from_dict(p) for m, p in d.items()} for d in (box[0] or [])]
    val_items: dict = {}
    for k, (ids, plans) in enumerate(zip(held_ids, held_plans)):
        batch = shapes.batch(ids)
        for m, plan in plans.items():
            for i in range(len(plan.micro_batches)):
                val_items[("val-mb", k, m, i)] = run_mb(sub_plan(plan, i), batch)
            val_items[("val-step", k, m, -1)] = run_step(plan, batch)
    if bar is not None:
        bar.total += len(val_items) * (cfg.repeats + 1) + n_fit * cfg.repeats
        bar.refresh()
    scratch: dict = {}
    passes(val_items, 1, scratch)  # warm-up of the held-out plans
    out["loadavg_after_warmup"] = list(os.getloadavg())
    # -- the measurement: fit and validation items interleaved in every pass ---------------------
    times: dict = {}
    loads: list = []
    passes({**fit_items, **val_items}, cfg.repeats, times, loads)
    out["loadavg_per_pass"] = loads
    out["loadavg_end"] = list(os.getloadavg())
    if bar is not None:
        bar.close()
    if rank != 0:
        return None
    collect({k: v for k, v in times.items() if k[0] not in ("val-mb", "val-step")})
    cm = build_cost_model(cfg, out, topo)
    out["cost_model"] = cm.to_dict()
    out["validation"] = validation_rows(cm, held_ids, held_plans, shapes, times)
    out["heldout"] = [{"lengths": list(shapes.batch(ids).lengths), "plans": plans}
                      for ids, plans in zip(held_ids, box[0] or [])]  # to re-price with another model
    return out


def plan_heldout(cm, batches) -> list[dict]:
    """FlexSP and static full-degree plans of each held-out batch (as dicts, to broadcast)."""
    from solver.baselines import static_plan
    from solver.planner import plan_batch
    return [{"flexsp": plan_batch(lens, cm, time_limit=1.0).to_dict(), "static": static_plan(lens, cm).to_dict()}
            for lens in batches]


def validation_rows(cm, held_ids, held_plans, shapes, times) -> list:
    """Predicted (final fitted model, re-priced) vs measured (fastest of the interleaved runs) for every
    held-out micro-batch timed alone and every whole step (micro-batches + optimizer)."""
    from solver.build import price_plan
    rows = []
    for k, (ids, plans) in enumerate(zip(held_ids, held_plans)):
        lengths = shapes.batch(ids).lengths
        for method, plan in plans.items():
            for i, mb in enumerate(plan.micro_batches):
                ts = times[("val-mb", k, method, i)]
                pred = max(cm.group_time_ms([lengths[j] for j in g.seq_ids], g.sp,
                                             g.attention if g.attention in cm.attention_modes(g.sp) else None)
                           for g in mb.groups)
                rows.append({"batch": k, "method": method, "kind": "micro-batch", "index": i,
                             "groups": " + ".join(f"{g.sp}" for g in mb.groups),
                             "docs": sum(len(g.seq_ids) for g in mb.groups),
                             "predicted_ms": pred, "measured_ms": min(ts), "all_ms": ts})
            ts = times[("val-step", k, method, -1)]
            rows.append({"batch": k, "method": method, "kind": "step", "index": -1, "groups": plan.summary(),
                         "tokens": int(sum(lengths)), "docs": len(lengths),
                         "predicted_ms": price_plan(plan, lengths, cm), "measured_ms": min(ts), "all_ms": ts})
    return rows
