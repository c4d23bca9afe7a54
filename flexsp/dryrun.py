"""``flexsp-dryrun``: will this model train on N devices, and what would one step look like?

    flexsp-dryrun model.preset=70b dryrun.world_size=64 dryrun.device_memory_gb=80
    python -m flexsp.dryrun model=7b parallel.shard_size=8 output_dir=outputs/dry7b
    flexsp-dryrun --help | --cfg [overrides]

Composes the training config exactly as ``flexsp-train`` does (``configs/``, Hydra overrides from
the command line) plus the ``dryrun`` section (:class:`DryRunConfig`, ``configs/dryrun/default.yaml``),
then, in ONE process:

1. starts a fake ``dryrun.world_size``-rank world (``torch.testing._internal.distributed.fake_pg``:
   ``FakeStore`` + ``init_process_group(backend="fake")``; every collective is a no-op) as rank 0;
2. builds the model on ``meta`` (the native Transformer, or transformers' modules for an HF-native
   checkpoint) and shards it exactly as training does
   (:func:`flexsp.engines.fsdp2.data_parallel_mesh` + :func:`flexsp.engines.fsdp2.shard_model`
   with ``train.precision`` and ``parallel.shard_size``): nothing is materialised, a 70B dry run
   peaks at a few hundred MB of host memory;
3. counts rank 0's bytes (:func:`model_state_bytes`, :func:`unsharded_bytes`) and measures the
   activation bytes per token (:func:`activation_bytes_per_token`: one block and the head run
   forward on meta tensors under ``saved_tensors_hooks``);
4. sets the reserve aside: ``dryrun.reserve_gb`` (CUDA context, NCCL buffers, allocator
   fragmentation) plus the loss's transient logits/gradient chunk computed from the model
   (:func:`flexsp.dryrun_sizing.loss_transient_bytes`); C, the tokens per rank, is what is left
   after it (the report also gives C before the reserve);
5. picks the cost model: ``solver.cost_model`` when it was built for this model shape (and HSDP
   layout), else an ANALYTIC one (:func:`solver.presets.analytic_cost_model`) whose memory side is
   the measured bytes (model states + unsharded buffers, activation bytes per token) on the device
   minus the reserve;
6. plans one sampled global batch (``dryrun.workload``, ``num_sequences``, ``context_tokens``) at that
   scale with the trainer's planner;
7. prints a summary and writes ``<output_dir>/dryrun.json`` (keys: ``world_size``, ``model_params``,
   ``per_rank_bytes`` {params, grads, optimizer, activations, unsharded, reserve, total},
   ``device_memory_bytes``, ``reserve``, ``capacity_tokens`` (after the reserve),
   ``capacity_tokens_no_reserve``, ``fits``, ``fit_suggestion``, ``plan``, ... and the dry run's own
   ``wall_seconds`` and ``peak_rss_bytes``). When the model does not fit, the summary names the
   smallest world size (with HSDP: the smallest shard size) at which it would
   (:func:`flexsp.dryrun_sizing.smallest_fit`).

Units: ``dryrun.device_memory_gb`` and ``dryrun.reserve_gb`` are GB, 10^9 bytes (an "80 GB" H100 has
80e9 bytes = 74.5 GiB); the device is printed in both GB and GiB, per-rank parts in GiB (2^30).

Exit status: 0 the model fits, 4 (``DOES_NOT_FIT_EXIT_CODE``) it does not (the report is still
printed and written), 2 a user error (one line ``flexsp-dryrun: error: ...``), 1 a bug (traceback).
"""

from __future__ import annotations

import json
import math
import os
import resource
import sys
import time
from dataclasses import asdict, fields, replace
from pathlib import Path

import torch
import torch.distributed as dist

from flexsp import dryrun_sizing as sizing
from flexsp.config import DryRunConfig, RunConfig, check_output_dir
from flexsp.config.compose import compose as compose_tree
from flexsp.config.compose import compose_container, to_yaml
from flexsp.dryrun_report import PROG, format_report
from flexsp.dryrun_sizing import param_shapes
from flexsp.engines import precision_dtypes
from flexsp.engines.fsdp2 import data_parallel_mesh, shard_model
from flexsp.errors import UserError, print_error
from flexsp.log import setup_logging
from flexsp.memory import activation_bytes_per_token  # noqa: F401 (re-exported)
from flexsp.model import Transformer
from flexsp.model.hf_native import HFNativeModel
from flexsp.modelspec import model_config_of
from flexsp.parallelize import blocks_of
from flexsp.planning import load_cost_model, solve_plan
from solver.planner import PlanningError
from solver.presets import analytic_cost_model
from solver.workloads import sample_lengths

_T_START = time.perf_counter()  # the command's wall time counts from this module's import
GIB = 2**30
MIB = 2**20
GB = 10**9
DOES_NOT_FIT_EXIT_CODE = 4
"""Exit status of a dry run whose model does not fit the devices (its report is still written)."""


# -- config ------------------------------------------------------------------------------------------
def check(cfg: RunConfig) -> DryRunConfig:
    """The ``dryrun`` section of ``cfg`` after the checks the dry run adds to the tree's (FSDP2, a shard
    size dividing the fake world, a readable cost model): UserError before any work."""
    d = cfg.dryrun if cfg.dryrun is not None else DryRunConfig()
    if cfg.parallel.engine != "fsdp2":
        raise UserError(
            f"parallel.engine={str(cfg.parallel.engine)!r}: flexsp-dryrun shards with FSDP2 as "
            f"training does with parallel.engine=fsdp2; valid: fsdp2",
            field="parallel.engine",
        )
    s = cfg.parallel.shard_size
    if s and (s > d.world_size or d.world_size % s):
        raise UserError(f"parallel.shard_size={s} must divide dryrun.world_size={d.world_size}")
    load_cost_model(cfg.solver.cost_model, d.world_size)  # a missing/bad cost model: before any work
    return d


# -- fake world + sharded meta model -----------------------------------------------------------------
class FakeWorld:
    """Rank 0 of a fake ``world_size``-rank default process group (collectives are no-ops);
    destroyed on exit."""

    def __init__(self, world_size: int):
        self.world_size = world_size

    def __enter__(self):
        from torch.testing._internal.distributed.fake_pg import FakeStore

        if dist.is_initialized():
            raise RuntimeError("a default process group already exists; run the dry run in a fresh process")
        dist.init_process_group(backend="fake", rank=0, world_size=self.world_size, store=FakeStore())
        return self

    def __exit__(self, *exc):
        if dist.is_initialized():
            dist.destroy_process_group()


def build_meta(mcfg):
    """The model training builds, on meta: the native Transformer, or an HF-native model
    (transformers' modules) for an :class:`flexsp.model.hf_native.HFNativeConfig`."""
    meta = torch.device("meta")
    with meta:
        if getattr(mcfg, "hf_native", False):
            return HFNativeModel(mcfg, device=meta)
        return Transformer(mcfg, device=meta)


def build_sharded(mcfg, precision: str, world_size: int, shard_size: int):
    """The model built on meta and sharded as FSDP2Engine does; (model, units, mesh)."""

    mesh = data_parallel_mesh("cpu", world_size, shard_size)
    model = build_meta(mcfg)
    units = shard_model(model, mesh, precision)
    return model, units, mesh


def _dtype_bytes(dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def model_state_bytes(model, precision: str) -> dict:
    """Rank 0's sharded model states, from the real sharded (meta) parameters.

    - ``params``: sum over parameters of the local shard's numel x its element size (the fp32
      master copy for ``bf16`` mixed precision; bf16 for ``bf16-pure``);
    - ``grads``: the same (FSDP2 keeps the reduced gradient sharded, in the parameter's dtype);
    - ``optimizer``: AdamW ``exp_avg`` + ``exp_avg_sq``, 2 x local numel x the parameter's element
      size (4 B with an fp32 master, 2 B with bf16-pure); the scalar ``step`` tensors are ignored.
    Rank 0 holds the largest shards (FSDP2 gives the padding to the last ranks)."""
    numel = nbytes = 0
    for p in model.parameters():
        local = p.to_local() if hasattr(p, "to_local") else p
        numel += local.numel()
        nbytes += local.numel() * local.element_size()
    return {"local_numel": numel, "params": nbytes, "grads": nbytes, "optimizer": 2 * nbytes}


def _unit_table(model, units) -> list[dict]:
    """Every FSDP2 unit in forward order: name, full numel, padded numel (reduce-scatter input).
    Reads FSDP2's own bookkeeping (torch 2.13: ``FSDPState._fsdp_param_groups``, ``FSDPParam.
    _orig_size`` / ``padded_sharded_param_size`` / ``mesh_info`` / ``_module_info``), so the units
    are exactly the ones shard_model made."""
    embed, norm, head = model.input_embedding(), model.final_norm(), model.output_head()
    tied = head.weight is None or head.weight is embed.weight
    head_modules = (head, embed) if tied else (head,)  # tied: the embedding matrix is the head's weight
    names = {id(embed): "embed", id(norm): "norm+lm_head", id(model): "root"}
    for i, b in enumerate(blocks_of(model)):
        names[id(b)] = f"blocks.{i}"
    table = []
    for u in units:
        full = padded = 0
        holds_head = False
        for group in u._get_fsdp_state()._fsdp_param_groups:
            for fp in group.fsdp_params:
                n = math.prod(fp._orig_size)
                full += n
                shards = fp.mesh_info.shard_mesh_size
                padded += math.prod(fp.padded_sharded_param_size) * shards
                info = fp._module_info
                if info.param_name == "weight" and any(info.module is m for m in head_modules):
                    holds_head = True
        table.append(
            {
                "unit": names.get(id(u), type(u).__name__),
                "numel": full,
                "padded_numel": padded,
                "holds_head": holds_head,
            }
        )
    return table


def unsharded_bytes(model, units, precision: str) -> dict:
    """Peak bytes FSDP2 holds unsharded at once (rank 0), the worst backward phase.

    Accounting (torch 2.13 FSDP2, ``reshard_after_forward=True`` for embed and blocks, False for
    [norm, lm_head]; one reduce-scatter input buffer in flight, FSDP2's default): while unit ``u``
    runs backward (order: norm+lm_head, blocks L-1..0, embed) the rank holds

    - ``gathered_params``: ``u``'s full parameters in the compute dtype (bf16 under mixed
      precision: FSDP2 all-gathers in ``param_dtype``);
    - ``prefetched_params``: the next unit's full parameters (FSDP2's implicit backward prefetch);
    - ``unsharded_grads``: ``u``'s full gradients in the compute dtype, before reduce-scatter;
    - ``reduce_scatter_input``: the copy-in buffer of the reduce-scatter, padded, in the reduce
      dtype (fp32 under bf16 mixed precision);
    - ``root_params``: the root unit's parameters (tied embeddings: embedding + head), which stay
      gathered from forward to the end of backward;
    - ``head_grad_fp32``: for the unit that holds the LM head weight, the fp32 weight-gradient
      accumulator of the chunked linear cross-entropy (flexsp.ops, torch path).

    The forward holds at most gathered + prefetched (no gradients), so the backward bounds it.
    Returns the worst phase's parts, its unit, the total, and the unit sizes."""
    mp_param, mp_reduce = precision_dtypes(precision)
    param_dtype = next(model.parameters()).dtype
    cb = _dtype_bytes(mp_param or param_dtype)
    rb = _dtype_bytes(mp_reduce or param_dtype)
    table = _unit_table(model, units)
    root = next((u for u in table if u["unit"] == "root"), None)
    order = [u for u in reversed(table) if u["unit"] != "root" and u["numel"]]
    root_resident = root["numel"] * cb if root and root["numel"] else 0
    head_weight = model.output_head().weight
    if head_weight is None:  # the native model's tied head: the embedding matrix
        head_weight = model.input_embedding().weight
    head_numel = math.prod(head_weight.shape)
    phases = []
    for k, u in enumerate(order + ([root] if root_resident else [])):
        is_root = u is root
        nxt = order[k + 1] if not is_root and k + 1 < len(order) else None
        parts = {
            "gathered_params": u["numel"] * cb if not is_root else 0,
            "prefetched_params": nxt["numel"] * cb if nxt else 0,
            "unsharded_grads": u["numel"] * cb,
            "reduce_scatter_input": u["padded_numel"] * rb,
            "root_params": root_resident,
            "head_grad_fp32": head_numel * 4 if u["holds_head"] else 0,
        }
        phases.append({"unit": u["unit"], "parts": parts, "total": sum(parts.values())})
    worst = max(phases, key=lambda p: p["total"]) if phases else {"unit": None, "parts": {}, "total": 0}
    return {
        "phase": worst["unit"],
        "parts": worst["parts"],
        "total": worst["total"],
        "compute_dtype_bytes": cb,
        "reduce_dtype_bytes": rb,
        "units": _compress_units(table),
    }


def _compress_units(table: list[dict]) -> list[dict]:
    """Consecutive equal-sized blocks as one row (``blocks.0-31`` x 32)."""
    rows: list[dict] = []
    for u in table:
        row = {"unit": u["unit"], "count": 1, "numel": u["numel"], "padded_numel": u["padded_numel"]}
        last = rows[-1] if rows else None
        if (
            last
            and last["unit"].startswith("blocks.")
            and row["unit"].startswith("blocks.")
            and (last["numel"], last["padded_numel"]) == (row["numel"], row["padded_numel"])
        ):
            last["count"] += 1
            last["unit"] = f"{last['unit'].split('-')[0]}-{row['unit'].split('.')[1]}"
        else:
            rows.append(row)
    return rows


# -- cost model --------------------------------------------------------------------------------------
def model_name(cfg: RunConfig) -> str:
    """The model as the user knows it: the preset, or the HF checkpoint's architecture and directory."""
    hf = cfg.model.hf_checkpoint
    if not hf:
        return cfg.model.preset
    try:
        arch = (json.loads((Path(hf) / "config.json").read_text()).get("architectures") or ["?"])[0]
    except (OSError, ValueError):
        arch = "?"
    return f"{arch} ({Path(hf).name})"


def pick_cost_model(
    cfg: RunConfig, d: DryRunConfig, mcfg, states_bytes: int, act_bytes_per_token: float, reserve_bytes: int
):
    """(cost model, how it was chosen): the configured ``solver.cost_model`` if it was built for this
    model's shape and HSDP layout, else an analytic one whose memory side is the measured bytes on
    the device minus ``reserve_bytes``. The choice's ``note`` says it in a few neutral words (the
    full reason is in ``why``)."""
    spec, world = cfg.solver.cost_model, d.world_size
    shard_size = cfg.parallel.shard_size if cfg.parallel.shard_size < world else 0
    cm = load_cost_model(spec, world)
    reason = note = None
    try:
        cm.check_model_shape(mcfg.layers, mcfg.hidden, mcfg.heads, mcfg.kv_heads)
    except ValueError as exc:
        reason, note = str(exc).split(": profile")[0], "is for another model shape"
    if reason is None and not (cm.layers and cm.hidden):
        reason = f"cost model {cm.name} does not record the model shape it was built for"
        note = "records no model shape"
    if reason is None and (cm.shard_size if cm.shard_size < world else 0) != shard_size:
        reason = (
            f"cost model {cm.name} has shard_size={cm.shard_size}, the run parallel.shard_size={shard_size}"
        )
        note = "is for another HSDP layout"
    if reason is None:
        return cm, {"choice": "configured", "spec": spec, "note": "built for this model shape"}
    free = d.device_memory_bytes - reserve_bytes - states_bytes
    if free < act_bytes_per_token:
        return None, {
            "choice": "none",
            "spec": spec,
            "note": f"solver.cost_model={spec} {note}, and no token fits for an analytic one",
            "why": f"solver.cost_model={spec}: {reason}; and no analytic model either: model states + "
            f"unsharded buffers ({states_bytes / GIB:.2f} GiB) and the reserve "
            f"({reserve_bytes / GIB:.2f} GiB) leave no room for one token's activations in "
            f"{d.device_memory_gb:g} GB ({d.device_memory_bytes / GIB:.2f} GiB)",
        }
    note = f"solver.cost_model={spec} {note}: an analytic roofline with the memory measured here is used"
    params = mcfg.num_params()
    sbpp = states_bytes * (shard_size or world) / params  # so that model_states_mb == measured
    short = Path(cfg.model.hf_checkpoint).name if cfg.model.hf_checkpoint else cfg.model.preset
    cm = analytic_cost_model(
        f"analytic-{short}-{world}",
        layers=mcfg.layers,
        hidden=mcfg.hidden,
        heads=mcfg.heads,
        kv_heads=mcfg.kv_heads,
        params=float(params),
        num_devices=world,
        devices_per_node=min(d.devices_per_node, world),
        memory_mb=(d.device_memory_bytes - reserve_bytes) / MIB,
        act_mb_per_token=act_bytes_per_token / MIB,
        peak_tflops=d.peak_tflops,
        mfu=d.mfu,
        bytes_per_element=2 if cfg.train.precision != "fp32" else 4,
        zero_gbps=d.zero_gbps,
        activation_checkpointing=bool(mcfg.activation_checkpointing),
        shard_size=shard_size,
        replicate_gbps=d.replicate_gbps if shard_size else 0.0,
    )
    cm = replace(
        cm,
        state_bytes_per_param=sbpp,
        source=cm.source + "; memory: flexsp-dryrun's measured model "
        "states + unsharded buffers and activation bytes per token, on the device minus the reserve",
    )
    return cm, {
        "choice": "analytic",
        "spec": spec,
        "note": note,
        "why": f"solver.cost_model={spec}: {reason}",
    }


# -- the dry run -------------------------------------------------------------------------------------
def run(cfg: RunConfig, t0: float | None = None) -> dict:
    """The dry run of ``cfg`` (flexsp.config.compose(..., "dryrun")); returns the report written to
    dryrun.json.
    ``wall_seconds`` counts from ``t0`` (``time.perf_counter()``; default: this call)."""
    t0 = time.perf_counter() if t0 is None else t0

    d = check(cfg)
    out = cfg.output_dir
    check_output_dir(out)
    mcfg, precision = model_config_of(cfg, cfg.model.overrides.get("vocab_size"))
    cfg = replace(cfg, train=replace(cfg.train, precision=precision))
    shard_size = cfg.parallel.shard_size
    shapes = param_shapes(build_meta(mcfg))
    with FakeWorld(d.world_size):
        model, units, mesh = build_sharded(mcfg, precision, d.world_size, shard_size)
        states = model_state_bytes(model, precision)
        unsh = unsharded_bytes(model, units, precision)
        mesh_shape = list(mesh.shape)
        del model, units, mesh
    compute = precision_dtypes(precision)[0] or mcfg.torch_dtype
    act = activation_bytes_per_token(mcfg, compute)
    per_token = act["bytes_per_token"]
    model_states = states["params"] + states["grads"] + states["optimizer"]
    resident = model_states + unsh["total"]
    capacity_no_reserve = sizing.capacity(d.device_memory_bytes - resident, per_token)
    loss = sizing.loss_transient_bytes(mcfg.vocab_size, mcfg.hidden, _dtype_bytes(compute))
    reserve = {
        "fixed": d.reserve_bytes,
        "loss_chunk": loss["bytes"],
        "total": d.reserve_bytes + loss["bytes"],
        "loss": loss,
    }
    cm, cm_choice = pick_cost_model(cfg, d, mcfg, resident, per_token, reserve["total"])
    measured_capacity = sizing.capacity(d.device_memory_bytes - reserve["total"] - resident, per_token)
    capacity = cm.capacity_tokens if cm is not None else 0
    activations = int(capacity * per_token)
    total = resident + activations + reserve["total"]
    fits = capacity >= 1 and total <= d.device_memory_bytes
    suggestion = (
        None
        if fits
        else sizing.smallest_fit(
            shapes,
            unsh["total"],
            per_token,
            d.device_memory_bytes - reserve["total"],
            d.world_size,
            shard_size if shard_size < d.world_size else 0,
        )
    )
    lengths = sample_lengths(d.workload, d.num_sequences, d.seed, context_limit=d.context_tokens)
    batch = {
        "workload": d.workload,
        "num_sequences": int(lengths.size),
        "seed": d.seed,
        "context_tokens": d.context_tokens,
        "tokens": int(lengths.sum()),
        "longest": int(lengths.max()),
        "mean": round(float(lengths.mean()), 1),
    }
    plan_out = None
    try:
        if cm is None:
            raise PlanningError(f"nothing to plan: {cm_choice['why'].split('either: ')[-1]}")
        plan = solve_plan(lengths, cm, d.time_limit, cfg.solver.milp_backend, cfg.solver.pulp_solver)
        plan_out = {
            "summary": plan.summary(),
            "micro_batches": len(plan.micro_batches),
            "groups": sum(len(mb.groups) for mb in plan.micro_batches),
            "predicted_ms": round(plan.predicted_ms, 3),
            "lower_bound_ms": round(plan.lower_bound_ms, 3),
            "gap": round(plan.gap, 4),
            "status": plan.status,
            "solve_seconds": plan.solve_seconds,
            "degrees": sorted({g.sp for mb in plan.micro_batches for g in mb.groups}),
            "max_group_memory_mb": round(max(g.memory_mb for mb in plan.micro_batches for g in mb.groups), 1),
        }
        try:
            from solver.baselines import static_plan

            plan_out["static_sp_ms"] = round(static_plan(lengths, cm).predicted_ms, 3)
            plan_out["speedup_over_static"] = round(plan_out["static_sp_ms"] / plan.predicted_ms, 3)
        except (ValueError, PlanningError):
            pass
        plan_out["plan"] = plan.to_dict()
    except PlanningError as exc:
        plan_out = {"error": " ".join(str(exc).split())}
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    peak_rss = rss * 1024 if sys.platform != "darwin" else rss
    report = {
        "world_size": d.world_size,
        "devices_per_node": min(d.devices_per_node, d.world_size),
        "model": {
            "name": model_name(cfg),
            "preset": None if cfg.model.hf_checkpoint else cfg.model.preset,
            "hf_checkpoint": cfg.model.hf_checkpoint,
            "hf_native": bool(getattr(mcfg, "hf_native", False)),
            "layers": mcfg.layers,
            "hidden": mcfg.hidden,
            "heads": mcfg.heads,
            "kv_heads": mcfg.kv_heads,
            "intermediate": mcfg.intermediate,
            "vocab_size": mcfg.vocab_size,
            "tie_embeddings": mcfg.tie_embeddings,
            "activation_checkpointing": mcfg.activation_checkpointing,
        },
        "model_params": mcfg.num_params(),
        "precision": precision,
        "sharding": {
            "engine": "fsdp2",
            "mesh": mesh_shape,
            "shard_size": shard_size or d.world_size,
            "replicas": d.world_size // (shard_size or d.world_size),
            "local_numel": states["local_numel"],
            "param_dtype": str(mcfg.torch_dtype).replace("torch.", ""),
            "compute_dtype": str(compute).replace("torch.", ""),
        },
        "per_rank_bytes": {
            "params": states["params"],
            "grads": states["grads"],
            "optimizer": states["optimizer"],
            "activations": activations,
            "unsharded": unsh["total"],
            "reserve": reserve["total"],
            "total": total,
        },
        "unsharded_parts": {"phase": unsh["phase"], **unsh["parts"]},
        "units": unsh["units"],
        "activation": act,
        "device_memory_bytes": d.device_memory_bytes,
        "reserve": reserve,
        "capacity_tokens": capacity,
        "capacity_tokens_measured": measured_capacity,
        "capacity_tokens_no_reserve": capacity_no_reserve,
        "fits": bool(fits),
        "fit_suggestion": suggestion,
        "cost_model": {
            **cm_choice,
            **(
                {
                    "name": cm.name,
                    "source": cm.source,
                    "memory_mb": cm.memory_mb,
                    "model_states_mb": round(cm.model_states_mb, 1),
                    "act_mb_per_token": cm.act_mb_per_token,
                    "capacity_tokens": cm.capacity_tokens,
                    "a1": cm.a1,
                    "a2": cm.a2,
                    "b": cm.b,
                }
                if cm is not None
                else {"name": None}
            ),
        },
        "batch": batch,
        "plan": plan_out,
        "dryrun": asdict(d),
        "wall_seconds": 0.0,
        "peak_rss_bytes": int(peak_rss),
        "torch": torch.__version__,
    }
    report["wall_seconds"] = round(time.perf_counter() - t0, 3)
    path = out / "dryrun.json"
    path.write_text(json.dumps(report, indent=1) + "\n")
    report["path"] = str(path)
    return report


def compose(overrides: list[str]) -> RunConfig:
    """The dry run's tree: the training config + the ``dryrun`` section, with ``overrides``."""
    return compose_tree(overrides, "dryrun")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    setup_logging()
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        print("dryrun.* keys (flexsp.config.DryRunConfig):")
        for f in fields(DryRunConfig):
            print(f"  dryrun.{f.name} (default {f.default!r})")
        print(
            "Every training key works too (model=..., train.precision=..., parallel.shard_size=..., "
            "solver.cost_model=..., output_dir=...); see flexsp-train --help."
        )
        return 0
    show_cfg = "--cfg" in argv
    overrides = [a for a in argv if a != "--cfg"]
    bad = [a for a in overrides if a.startswith("-")]
    try:
        if bad:
            raise UserError(
                f"unknown option {bad[0]!r}; options: --help, --cfg; everything else is a "
                f"Hydra override (key=value)"
            )
        if show_cfg:
            print(to_yaml(compose_container(overrides, "dryrun")))
            return 0
        cfg = compose(overrides)
        check(cfg)  # every field validated before any work
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        report = run(cfg, t0=_T_START)
    except UserError as exc:
        return print_error(PROG, exc)
    try:
        print(format_report(report), flush=True)
    except BrokenPipeError:  # e.g. `flexsp-dryrun ... | head -1`
        sys.stdout = open(os.devnull, "w")
    return 0 if report["fits"] else DOES_NOT_FIT_EXIT_CODE


if __name__ == "__main__":
    sys.exit(main())
