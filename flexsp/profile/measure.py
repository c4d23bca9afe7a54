"""The per-rank part of ``flexsp-profile``: time real micro-batches, links and activations.

Every measurement runs the way training runs, on every rank at once (so on a CPU box whose ranks
share the cores each rank computes at the speed it will have in training):

- the model: built by the training engine (``flexsp.engines.build_engine``: on meta, sharded,
  local shards filled by ``RandomWeights``) at ``profile_layers`` layers and at half that (the
  first layers of the full model, its init), with the model's activation-checkpointing setting;
  no rank ever holds an unsharded copy;
- compute: a one-micro-batch plan whose every group has degree 1 and the same packed documents,
  run by :class:`flexsp.executor.StepExecutor` under the training engine on both depths (FSDP2: its
  per-layer all-gathers / reduce-scatters are part of every micro-batch, so they land in ``b``,
  per layer);
- communication: the same through groups of degree d = 2, 4, ... in Ulysses and ring mode, on
  the deeper build (every SP collective is per layer);
- links: ``all_to_all_single`` and a ring ``batch_isend_irecv`` on every aligned group of each
  degree concurrently (as the groups of one micro-batch run);
- the optimizer step (``engine.step``) on both depths: the CostModel's ``step_overhead_ms``;
- activation memory per token on the sharded modules, all ranks at once: CUDA allocator peak
  over forward + backward (``max_memory_allocated``; with activation checkpointing the recompute
  peak) or, on CPU, the bytes of the tensors autograd saves for backward (``saved_tensors_hooks``),
  an estimate;
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
from dataclasses import replace

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from flexsp.config import ParallelConfig, ProfileConfig, RunConfig, TrainConfig
from flexsp.data import GlobalBatch, SyntheticSource
from flexsp.distributed import init_distributed
from flexsp.engines import RandomWeights, build_engine
from flexsp.executor import StepExecutor
from flexsp.model import Transformer, shard_inputs
from flexsp.parallelize import activation_checkpointing_disabled
from flexsp.profile.build import build_cost_model
from flexsp.profile.config import profiled_model
from flexsp.topology import SPTopology
from solver.baselines import static_plan
from solver.build import price_plan
from solver.plan import GroupPlan, MicroBatchPlan, Plan
from solver.planner import plan_batch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def one_mb_plan(world: int, sp: int, n_seq: int, mode: str):
    """A one-micro-batch plan: every aligned group of degree ``sp`` runs all ``n_seq`` sequences."""
    groups = tuple(
        GroupPlan(
            sp=sp,
            ranks=tuple(range(k * sp, (k + 1) * sp)),
            seq_ids=tuple(range(n_seq)),
            attention="local" if sp == 1 else mode,
        )
        for k in range(world // sp)
    )
    return Plan(num_devices=world, micro_batches=(MicroBatchPlan(groups),), predicted_ms=0.0)


def sub_plan(plan, index: int):
    """Micro-batch ``index`` of ``plan`` alone, as a plan (to time it by itself)."""
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
        return GlobalBatch(
            step=0, epoch=0, doc_ids=tuple(doc_ids), lengths=tuple(self.lengths[i] for i in doc_ids)
        )

    @property
    def source(self):
        if self._source is None:
            self._source = SyntheticSource(self.lengths, self.vocab, self.seed)
        return self._source


def heldout_batches(cfg: ProfileConfig, mcfg, world: int = 1) -> list[list[int]]:
    """Long-tailed global batches from a published distribution, scaled so 8K maps to the longest
    held-out document (validate_max_len, default max_len)."""
    vmax, vtok = cfg.validation_lengths(mcfg, world)
    try:
        from solver.workloads import sample_lengths
    except ImportError:  # no scipy (e.g. a bare GPU image): the data package's samplers
        from flexsp.data.synthetic import sample_lengths
    out = []
    for k in range(cfg.validate_batches):
        raw = sample_lengths(cfg.validate_distribution, 512, seed=cfg.seed + 1000 + k)
        scaled = np.clip(np.rint(raw * vmax / 8192), 8, vmax).astype(int)
        batch, total = [], 0
        for n in scaled:
            if total >= vtok:
                break
            batch.append(int(n))
            total += int(n)
        out.append(batch)
    return out


def _inputs(lengths, vocab: int, device):
    T = int(sum(lengths))
    g = torch.Generator().manual_seed(T)
    ids = torch.randint(0, vocab, (T,), generator=g).to(device)
    cu = torch.tensor([0, *np.cumsum(lengths).tolist()], dtype=torch.int32)
    return shard_inputs(ids, cu)


def activation_bytes(engine, lengths, device) -> dict:
    """Activation bytes of one degree-1 forward/backward of ``lengths`` on the SHARDED training
    module (every rank at once: the engine's all-gathers are collectives), with the model's own
    activation-checkpointing setting.

    CUDA: the allocator's peak growth over forward + backward (``max_memory_allocated``: with
    activation checkpointing that peak is in backward, while a block is recomputed). Returns
    ``{"total": bytes}``.

    CPU (an estimate): the distinct storages autograd saves for backward (``saved_tensors_hooks``,
    parameters excluded), attributed to inside / outside the transformer blocks, with checkpointing
    switched off for the measurement, and every block's input. Returns ``{"outside", "blocks",
    "inputs"}`` (bytes; ``blocks``: all blocks together, ``inputs``: all blocks' inputs)."""
    model = engine.module
    vocab = model.config.vocab_size
    inputs = _inputs(lengths, vocab, device)
    if device.type == "cuda":
        sync(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        loss, _ = inputs.loss(model)
        engine.backward(loss * 0.0)
        sync(device)
        peak = torch.cuda.max_memory_allocated(device) - base
        engine.optimizer.zero_grad(set_to_none=True)
        return {"total": int(peak)}
    seen: dict[int, tuple[str, int]] = {}
    where = ["outside"]
    block_inputs: dict[int, int] = {}

    def key_size(t):
        try:
            st = t.untyped_storage()
            return st.data_ptr(), st.nbytes()
        except Exception:  # tensors without storage (e.g. wrapped subclasses)
            return id(t), t.numel() * t.element_size()

    def pack(t):
        if isinstance(t, torch.nn.Parameter) or isinstance(getattr(t, "_base", None), torch.nn.Parameter):
            return t
        key, size = key_size(t)
        if key not in seen:
            seen[key] = (where[0], size)
        return t

    def pre(mod, args):
        where[0] = "blocks"
        x = args[0]
        key, _ = key_size(x)
        block_inputs.setdefault(key, x.numel() * x.element_size())

    def post(mod, args, out):
        where[0] = "outside"

    hooks = []
    for blk in model.blocks:
        hooks += [blk.register_forward_pre_hook(pre), blk.register_forward_hook(post)]
    try:
        with (
            activation_checkpointing_disabled(model),
            torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t),
        ):
            loss, _ = inputs.loss(model)
    finally:
        for h in hooks:
            h.remove()
    engine.backward(loss * 0.0)
    engine.optimizer.zero_grad(set_to_none=True)
    out = {"outside": 0, "blocks": 0}
    for kind, size in seen.values():
        out[kind] += size
    out["inputs"] = int(sum(block_inputs.values()))
    return out


def activation_profile(engines: dict, ac: bool, max_len: int, device) -> dict:
    """Activation bytes per token: measured at two token counts (the slope: parameters, gathered
    shards and other fixed buffers cancel) on each built depth, split into a fixed part (embedding,
    head, loss) and a per-layer part, so the cost model gets ``fixed + layers * per_layer`` at the
    full depth. With activation checkpointing a block keeps only its input; one block at a time is
    recomputed in backward (depth-independent: in the fixed part)."""
    doc = max(8, min(1024 if device.type == "cuda" else 256, max_len // 8))
    sizes = [[doc] * 4, [doc] * 12]
    dT = sum(sizes[1]) - sum(sizes[0])
    points = {n: [(int(sum(s)), activation_bytes(e, s, device)) for s in sizes] for n, e in engines.items()}

    def slope(n, key):
        (_, a), (_, b) = points[n]
        return (b[key] - a[key]) / dT

    depths = sorted(engines)
    if device.type == "cuda":
        method = "CUDA max_memory_allocated growth over forward + backward of the sharded model" + (
            " (activation checkpointing on: the recompute peak included)" if ac else ""
        )
        if len(depths) == 1:
            n = depths[0]
            return {"method": method, "points": points, "bytes_per_token": slope(n, "total"), "depth": n}
        lo, hi = depths
        per_layer = max(0.0, (slope(hi, "total") - slope(lo, "total")) / (hi - lo))
        fixed = max(0.0, slope(hi, "total") - hi * per_layer)
    else:
        n = depths[-1]
        outside, blocks, kept = slope(n, "outside"), slope(n, "blocks") / n, slope(n, "inputs") / n
        if ac:
            per_layer, fixed = kept, outside + blocks
        else:
            per_layer, fixed = blocks, outside
        method = (
            "CPU estimate: bytes of tensors saved for backward (saved_tensors_hooks, params excluded) on "
            "the sharded model"
            + (
                ", with activation checkpointing: each block's kept input per layer "
                "+ one block's saved tensors (its recompute)"
                if ac
                else ""
            )
        )
    return {
        "method": method,
        "points": points,
        "per_layer_bytes_per_token": per_layer,
        "fixed_bytes_per_token": fixed,
        "bytes_per_token": fixed + max(depths) * per_layer,
        "depth": max(depths),
    }


def rank_body(run: RunConfig) -> dict | None:
    """Run every measurement on this rank; rank 0 returns the raw results (others None)."""
    cfg = run.profile
    full, precision, model_note = profiled_model(run)
    depths = cfg.depths(full.layers)
    deep = depths[-1]
    compute_shapes, comm_shapes = cfg.shapes(full)
    engine_name, backend = run.parallel.engine, run.parallel.backend
    rank, world, device = init_distributed(backend)
    dpn = run.parallel.devices_per_node or int(os.environ.get("LOCAL_WORLD_SIZE", world))
    topo = SPTopology(world, min(dpn, world)).build()
    train_cfg = TrainConfig(steps=10**6, warmup_steps=0, precision=precision, seed=cfg.seed)
    parallel = ParallelConfig(engine=engine_name, backend=backend)
    # the first n layers of the full model, its init (scale of the output projections included)
    weights = RandomWeights(cfg.seed, full.init_std, full.layers)
    torch.manual_seed(cfg.seed)
    engines, executors = {}, {}
    shapes = Shapes(full.vocab_size, cfg.seed)
    for n in depths:
        mcfg = replace(full, layers=n)
        engines[n] = build_engine(
            engine_name,
            lambda dev, m=mcfg: Transformer(m, device=dev),
            weights,
            train_cfg,
            parallel,
            world,
            device,
        )
        executors[n] = StepExecutor(engines[n], None, topo, rank, device, full.heads)

    degrees = [d for d in topo.degrees if d > 1]
    modes = [m for m in cfg.modes]
    compute_ids = [shapes.add(s) for s in compute_shapes]
    comm_ids = [shapes.add(s) for s in comm_shapes]
    held = heldout_batches(cfg, full, world) if cfg.validate_batches else []
    held_ids = [shapes.add(b) for b in held]
    for ex in executors.values():
        ex.source = shapes.source

    n_links = len(degrees) * 2 * len(cfg.link_mb)
    n_fit = len(compute_ids) * len(depths) + len(comm_ids) * len(degrees) * len(modes) + len(depths)
    bar = None
    if rank == 0 and cfg.progress:
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

    def run_mb(n, plan, batch):
        """One forward/backward of ``plan`` on the ``n``-layer build (gradients dropped, untimed)."""

        def f():
            ms = timed(lambda: executors[n].run(plan, batch))
            engines[n].optimizer.zero_grad(set_to_none=True)
            return ms

        return f

    def run_step(n, plan, batch):
        """A whole training step: every micro-batch + the optimizer step (engine.step zeroes grads)."""

        def body():
            executors[n].run(plan, batch)
            engines[n].step()

        return lambda: timed(body)

    opt_plan, opt_batch = one_mb_plan(world, 1, len(compute_ids[0]), "local"), shapes.batch(compute_ids[0])

    def run_opt(n):
        def f():
            executors[n].run(opt_plan, opt_batch)  # untimed: gradients for the step to apply
            return timed(engines[n].step)

        return f

    def passes(items: dict, repeats: int, times: dict, loads: list | None = None) -> None:
        """``repeats`` passes over every item, order reversed on odd passes (drift hits all alike)."""
        keys = list(items)
        for r in range(repeats):
            for k in keys if r % 2 == 0 else keys[::-1]:
                times.setdefault(k, []).append(items[k]())
                tick()
            if loads is not None:
                loads.append(list(os.getloadavg()))

    def layers_params(n):
        return replace(full, layers=n).num_params()

    one, two = replace(full, layers=1).num_params(), replace(full, layers=2).num_params()
    mc = {
        k: getattr(full, k)
        for k in (
            "vocab_size",
            "hidden",
            "layers",
            "heads",
            "kv_heads",
            "intermediate",
            "dtype",
            "activation_checkpointing",
            "max_position_embeddings",
        )
    }
    mc.update(
        head_size=full.head_size,
        precision=str(precision),
        compute_dtype="bfloat16" if precision in ("bf16", "bf16-pure") else "float32",
    )
    out: dict = {
        "world_size": world,
        "device": str(device),
        "backend": dist.get_backend(),
        "model": run.model.name,
        "model_config": mc,
        "profile_depths": depths,
        "model_note": model_note,
        "engine": str(engine_name),
        "devices_per_node": min(dpn, world),
        "max_len": cfg.resolved_max_len(full),
        "num_params": full.num_params(),
        "params_per_layer": two - one,
        "params_fixed": 2 * one - two,
        "threads_per_rank": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "loadavg_start": list(os.getloadavg()),
        "repeats": cfg.repeats,
        "statistic": f"fastest of {cfg.repeats} runs per item after one warm-up; fit and validation "
        f"items interleaved in the same passes (order reversed every other pass)",
    }
    out["params_by_depth"] = {n: layers_params(n) for n in depths}
    # -- fit items: compute at degree 1 (every depth), SP groups per degree and mode (deepest), the
    #    optimizer step (every depth) ---------------------------------------------------------------
    fit_items: dict = {}
    for n in depths:
        for j, ids in enumerate(compute_ids):
            fit_items[("compute", n, j)] = run_mb(
                n, one_mb_plan(world, 1, len(ids), "local"), shapes.batch(ids)
            )
    for d in degrees:
        for mode in modes:
            for j, ids in enumerate(comm_ids):
                fit_items[(f"{mode}:{d}", deep, j)] = run_mb(
                    deep, one_mb_plan(world, d, len(ids), mode), shapes.batch(ids)
                )
    for n in depths:
        fit_items[("optimizer", n, 0)] = run_opt(n)
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
                        reqs = dist.batch_isend_irecv(
                            [dist.P2POp(dist.isend, x, nxt, g), dist.P2POp(dist.irecv, y, prv, g)]
                        )
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
    # -- activation memory: the sharded training modules, every rank at once --------------------
    out["activation"] = activation_profile(engines, full.activation_checkpointing, out["max_len"], device)
    tick()
    dist.barrier()

    def collect(times: dict) -> None:
        out["compute"] = [
            (list(shapes.batch(ids).lengths), min(times[("compute", n, j)]), n)
            for n in depths
            for j, ids in enumerate(compute_ids)
        ]
        comm: dict = {}
        for (key, n, j), ts in times.items():
            if key not in ("compute", "optimizer") and key.count(":") == 1:
                comm.setdefault(key, []).append((list(shapes.batch(comm_ids[j]).lengths), min(ts), n))
        out["comm"] = comm
        out["optimizer"] = [(n, layers_params(n), min(times[("optimizer", n, 0)])) for n in depths]
        ts = times[("optimizer", deep, 0)]
        out["optimizer_ms"] = min(ts)
        out["optimizer_spread_ms"] = [min(ts), statistics.median(ts), max(ts)]

    # -- held-out plans from a provisional fit of the warm-up times (rank 0), at the timed depth ---
    box = [None]
    if rank == 0 and held_ids:
        collect(warm)
        provisional = build_cost_model(cfg, dict(out), topo, depth=deep, profiled_world=True)
        box[0] = plan_heldout(provisional, [shapes.batch(ids).lengths for ids in held_ids])
    if world > 1:
        dist.broadcast_object_list(box, src=0)
    held_plans = [{m: Plan.from_dict(p) for m, p in d.items()} for d in (box[0] or [])]
    val_items: dict = {}
    for k, (ids, plans) in enumerate(zip(held_ids, held_plans)):
        batch = shapes.batch(ids)
        for m, plan in plans.items():
            for i in range(len(plan.micro_batches)):
                val_items[("val-mb", k, m, i)] = run_mb(deep, sub_plan(plan, i), batch)
            val_items[("val-step", k, m, -1)] = run_step(deep, plan, batch)
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
    at_depth = build_cost_model(cfg, dict(out), topo, depth=deep, profiled_world=True)
    out["validation_depth"] = deep
    out["validation"] = validation_rows(at_depth, held_ids, held_plans, shapes, times)
    out["heldout"] = [
        {"lengths": list(shapes.batch(ids).lengths), "plans": plans}
        for ids, plans in zip(held_ids, box[0] or [])
    ]  # to re-price with another model
    return out


def plan_heldout(cm, batches) -> list[dict]:
    """FlexSP and static full-degree plans of each held-out batch (as dicts, to broadcast)."""
    return [
        {"flexsp": plan_batch(lens, cm, time_limit=1.0).to_dict(), "static": static_plan(lens, cm).to_dict()}
        for lens in batches
    ]


def validation_rows(cm, held_ids, held_plans, shapes, times) -> list:
    """Predicted (final fitted model, re-priced) vs measured (fastest of the interleaved runs) for every
    held-out micro-batch timed alone and every whole step (micro-batches + optimizer)."""
    rows = []
    for k, (ids, plans) in enumerate(zip(held_ids, held_plans)):
        lengths = shapes.batch(ids).lengths
        for method, plan in plans.items():
            for i, mb in enumerate(plan.micro_batches):
                ts = times[("val-mb", k, method, i)]
                pred = max(
                    cm.group_time_ms(
                        [lengths[j] for j in g.seq_ids],
                        g.sp,
                        g.attention if g.attention in cm.attention_modes(g.sp) else None,
                    )
                    for g in mb.groups
                )
                rows.append(
                    {
                        "batch": k,
                        "method": method,
                        "kind": "micro-batch",
                        "index": i,
                        "groups": " + ".join(f"{g.sp}" for g in mb.groups),
                        "docs": sum(len(g.seq_ids) for g in mb.groups),
                        "predicted_ms": pred,
                        "measured_ms": min(ts),
                        "all_ms": ts,
                    }
                )
            ts = times[("val-step", k, method, -1)]
            rows.append(
                {
                    "batch": k,
                    "method": method,
                    "kind": "step",
                    "index": -1,
                    "groups": plan.summary(),
                    "tokens": int(sum(lengths)),
                    "docs": len(lengths),
                    "predicted_ms": price_plan(plan, lengths, cm),
                    "measured_ms": min(ts),
                    "all_ms": ts,
                }
            )
    return rows
