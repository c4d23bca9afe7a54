"""Raw profile measurements -> a :class:`solver.costmodel.CostModel` (and the fits, for the report).

Volumes are analytic (what the runtime sends per token), bandwidths are *effective*: the value that
makes ``volume / sp / bw`` equal the measured communication cost per token (see fit.py).
"""

from __future__ import annotations

import os
from dataclasses import replace

import torch

from flexsp.profile.config import ProfileConfig
from flexsp.profile.fit import fit_depth, fit_link
from solver.costmodel import CostModel
from solver.presets import PAPER_BANDWIDTH

UNMEASURED_GBPS = 1e6
"""Effective bandwidth written when the measured communication cost is ~0 (no degree penalty)."""


def volumes_mb_per_token(mc: dict, layers: int | None = None) -> tuple[float, float]:
    """(Ulysses all-to-all MB per token, ring KV MB per token) for a model config dict, ``layers``
    layers deep (default: ``mc["layers"]``).

    Ulysses: per layer, q, k, v and the output go through an all-to-all forward and their gradients
    backward. Ring: per layer, k and v travel forward; k, v, dk, dv backward. With activation
    checkpointing every block's forward runs twice (forward + recompute in backward), so its
    forward collectives are issued twice: Ulysses 3 x (2q + 2kv) instead of 2 x, ring 8 kv instead
    of 6 kv. Elements are in the compute dtype (bf16 under bf16 mixed precision).
    """
    dt = mc.get("compute_dtype", mc["dtype"])
    elem = 2 if dt == "bfloat16" else 4
    d = mc.get("head_size") or mc["hidden"] // mc["heads"]
    q, kv = mc["heads"] * d, mc["kv_heads"] * d
    n = mc["layers"] if layers is None else int(layers)
    fwd = 2 if mc.get("activation_checkpointing") else 1
    a2a = elem * n * (fwd + 1) * (2 * q + 2 * kv) / 2**20
    ring = elem * n * (fwd * 2 * kv + 4 * kv) / 2**20
    return a2a, ring


def _device_kind(device: str) -> str:
    """``cpu`` or ``cuda:<GPU name>`` for the CostModel's ``device`` field."""
    if device.startswith("cuda"):
        return f"cuda:{torch.cuda.get_device_name(torch.device(device))}"
    return device.split(":")[0]


def default_memory_mb(device: str, world: int) -> tuple[float, str]:
    if device.startswith("cuda"):
        total = torch.cuda.get_device_properties(torch.device(device)).total_memory / 2**20
        return 0.9 * total, "90% of the CUDA device's total memory"
    try:
        with open("/proc/meminfo") as fh:
            avail = next(int(ln.split()[1]) for ln in fh if ln.startswith("MemAvailable")) / 1024
    except (OSError, StopIteration):
        avail = 4096.0 * world
    return avail / world, f"CPU: MemAvailable / {world} ranks (no device memory limit)"


def _rows(rows, depth: int) -> list:
    """Timed rows as (lengths, ms, layers); rows of two items ran at ``depth``."""
    return [(list(r[0]), float(r[1]), int(r[2]) if len(r) > 2 else depth) for r in rows]


def depth_fit(cfg: ProfileConfig, raw: dict):
    """The :class:`DepthFit` of ``raw``'s timings (per-layer and fixed parts when two depths ran)."""
    deep = int(raw.get("profile_depths", [raw["model_config"]["layers"]])[-1])
    comm = {k: _rows(v, deep) for k, v in raw.get("comm", {}).items()}
    return fit_depth(
        _rows(raw["compute"], deep),
        comm,
        per_sequence=cfg.fit_per_sequence,
        group_latency=cfg.fit_group_latency and cfg.joint_fit,
        key_docs=cfg.fit_per_sequence_comm and cfg.joint_fit,
        joint=cfg.joint_fit or not comm,
    )


def params_at(raw: dict, depth: int) -> float:
    """Parameters of the model at ``depth`` layers (fixed part + depth x per layer)."""
    if "params_per_layer" in raw:
        return float(raw["params_fixed"]) + depth * float(raw["params_per_layer"])
    return float(raw["num_params"])


def optimizer_ms_at(raw: dict, depth: int) -> tuple[float, str]:
    """The optimizer step at ``depth`` layers: timed at each profiled depth, then linear in the
    number of parameters (grad norm, AdamW and zero_grad touch every parameter once). The slope is
    clamped between 0 (a constant step) and time / parameters of the deeper build (no fixed part), so
    timing noise between two close depths never extrapolates beyond proportional scaling."""
    opt = raw.get("optimizer")
    if not opt:
        return float(raw["optimizer_ms"]), "timed"
    pts = sorted((float(p), float(ms)) for _, p, ms in opt)
    p = params_at(raw, depth)
    (p0, t0), (p1, t1) = pts[0], pts[-1]
    if len(pts) == 1 or p1 == p0:
        return t1 * p / p1, ("timed" if p == p1 else "timed, scaled with the parameter count")
    slope = min(max(0.0, (t1 - t0) / (p1 - p0)), t1 / p1)
    return t1 + slope * (p - p1), (
        "linear in the parameter count through the two timed depths (slope clamped to [0, time / parameters])"
    )


def activation_at(raw: dict, depth: int) -> float:
    """Activation bytes per token at ``depth`` layers (fixed part + depth x per layer)."""
    act = raw["activation"]
    if "per_layer_bytes_per_token" in act:
        return float(act["fixed_bytes_per_token"]) + depth * float(act["per_layer_bytes_per_token"])
    return float(act["bytes_per_token"])


def build_cost_model(
    cfg: ProfileConfig, raw: dict, topo=None, depth: int | None = None, profiled_world: bool = False
) -> CostModel:
    """Fit every term and return the CostModel of the model at ``depth`` layers (default: the FULL
    model of ``raw["model_config"]``: what is written) for ``cfg.num_devices`` devices; the fits are
    stored in ``raw['fit']`` (always at the full depth). ``depth`` = a profiled depth and
    ``profiled_world`` give the model that plans and prices the timed held-out batches (the
    profiled world, not num_devices)."""
    world = int(raw["world_size"])
    mc = raw["model_config"]
    full = int(mc["layers"])
    depth = full if depth is None else int(depth)
    depths = [int(n) for n in raw.get("profile_depths", [full])]
    dfit = depth_fit(cfg, raw)
    comp = dfit.compute_at(depth)
    comm_fit = dfit.comm_at(depth) if raw.get("comm") else {}
    a2a_mb, ring_mb = volumes_mb_per_token(mc, depth)
    step_ms, step_how = optimizer_ms_at(raw, depth)
    fit = {
        "compute": {
            "a1": comp.a1,
            "a2": comp.a2,
            "per_seq": comp.per_seq,
            "b": comp.b,
            "stderr": comp.stderr,
            "median_abs_rel_err": comp.median_abs_rel,
            "max_abs_rel_err": comp.max_abs_rel,
            "rel_errors": comp.rel_errors,
        },
        "depth": depth,
        "profile_depths": depths,
        "per_layer": dfit.layer_terms(),
        "fixed": dfit.fixed_terms(),
        "step_overhead_ms": step_ms,
        "step_overhead_how": step_how,
        "step_overhead_spread_ms": raw.get("optimizer_spread_ms"),
        "comm": {},
        "links": {},
    }
    bw, p2p, lat_by_key, doc_by_key = {}, {}, {}, {}
    for key, rec in comm_fit.items():
        mode, d = key.split(":")
        d = int(d)
        c, errs = rec["ms_per_token"], rec["rel_errors"]
        vol = a2a_mb / d if mode == "ulysses" else ring_mb * (d - 1) / d
        eff = vol / c if c > 0 else UNMEASURED_GBPS
        (bw if mode == "ulysses" else p2p)[d] = eff
        lat_by_key[(mode, d)] = rec.get("latency_ms", 0.0)
        doc_by_key[(mode, d)] = rec.get("extra_doc_ms", 0.0)
        fit["comm"][key] = {
            "ms_per_token": c,
            "effective_gbps": eff,
            "rel_errors": errs,
            "stderr": rec.get("stderr"),
            "latency_ms": lat_by_key[(mode, d)],
            "latency_stderr": rec.get("latency_stderr"),
            "max_abs_rel_err": max((abs(e) for e in errs), default=0.0),
        }
        if "extra_doc_ms" in rec:
            fit["comm"][key].update(
                per_sequence_comm_ms=rec["extra_doc_ms"], per_sequence_comm_stderr=rec.get("extra_doc_stderr")
            )
    for key, rows in raw.get("links", {}).items():
        lat, gbps = fit_link([s for s, _ in rows], [t for _, t in rows])
        fit["links"][key] = {"latency_ms": lat, "gbps": gbps}
    defaults_used = False
    if world == 1 or not bw:  # one device: nothing to measure; documented defaults
        bw = dict(PAPER_BANDWIDTH)
        defaults_used = True
    n_dev = world if profiled_world else int(cfg.num_devices or world)
    memory_mb, mem_note = (
        (cfg.memory_mb, "configured") if cfg.memory_mb else default_memory_mb(raw["device"], world)
    )
    act = activation_at(raw, depth) / 2**20
    ac = bool(mc.get("activation_checkpointing", False))
    state_bytes = 8.0 if mc.get("precision") == "bf16-pure" else 16.0
    dpn = int(raw.get("devices_per_node") or os.environ.get("LOCAL_WORLD_SIZE", world))
    scaled = depth != depths[-1]
    depth_note = (
        f"timed on {' and '.join(str(n) for n in depths)}-layer builds of the {full}-layer model "
        f"(sharded like training), per-layer and fixed (embedding/head/loss) parts fitted jointly, "
        f"scaled to {depth} layers"
        if scaled or len(depths) > 1
        else f"timed on the {depth}-layer model"
    )
    source = (
        f"flexsp-profile on {raw['device']} ({raw['backend']}), {world} rank(s) all busy while timing, "
        f"{raw['threads_per_rank']} thread(s)/rank, engine {raw.get('engine', 'fsdp2')}, model "
        f"{raw.get('model')} "
        f"({mc.get('precision', mc['dtype'])}, activation checkpointing {'on' if ac else 'off'}); "
        f"{depth_note}; "
        + (
            "a1/a2/per_sequence_ms/b, comm per token"
            + (" and group_latency_ms" if cfg.fit_group_latency else "")
            + (" and per_sequence_comm_ms" if cfg.fit_per_sequence_comm else "")
            + (" per mode:degree" if cfg.fit_group_latency or cfg.fit_per_sequence_comm else "")
            + ": one joint NNLS on relative error of "
            f"{len(raw['compute'])} packed micro-batches at degree 1 and "
            f"{sum(len(v) for v in raw.get('comm', {}).values())} at degree > 1"
            if cfg.joint_fit
            else f"a1/a2/per_sequence_ms/b: NNLS on relative error of {len(raw['compute'])} packed "
            "micro-batches at "
            f"degree 1"
        )
        + f" (degree-1 max rel err {comp.max_abs_rel:.1%}); step_overhead_ms: the timed optimizer step "
        f"(engine.step: grad norm, AdamW, zero_grad; {step_how}); every time the fastest of {cfg.repeats} "
        f"runs; bandwidths: effective, from timed SP micro-batches"
        + (
            " (volumes count the forward collectives twice: activation checkpointing re-issues them)"
            if ac
            else ""
        )
        + (" -- NOT MEASURED (one device): paper defaults" if defaults_used else "")
        + (f"; written for {n_dev} devices (profiled on {world})" if n_dev != world else "")
        + f"; activation: {raw['activation']['method']}; memory: {mem_note}"
        + (f"; {raw['model_note']}" if raw.get("model_note") else "")
    )
    cm = CostModel(
        name=cfg.name,
        num_devices=n_dev,
        devices_per_node=min(dpn, n_dev),
        memory_mb=float(memory_mb),
        a1=comp.a1,
        a2=comp.a2,
        b=comp.b,
        per_sequence_ms=comp.per_seq,
        step_overhead_ms=step_ms,
        a2a_mb_per_token=a2a_mb,
        bandwidth_gbps=bw,
        act_mb_per_token=max(act, 1e-9),
        params_gi=params_at(raw, depth) / 2**30,
        state_bytes_per_param=state_bytes,
        zero_stage=3,
        heads=mc["heads"],
        kv_heads=mc["kv_heads"],
        layers=depth,
        hidden=mc["hidden"],
        activation_checkpointing=ac,
        ring_mb_per_token=ring_mb if p2p else 0.0,
        p2p_bandwidth_gbps=p2p,
        capacity_override=int(cfg.capacity_tokens),
        source=source,
        device=_device_kind(raw["device"]),
    )
    # latency and per-document communication of every profiled mode, keyed "mode:degree" (the
    # CostModel prices each group with the mode it runs); hybrid at a degree equal to its Ulysses
    # width is pure Ulysses, otherwise it pays the dearer of the two
    group_lat, seq_comm = {}, {}
    for table, by_key in ((group_lat, lat_by_key), (seq_comm, doc_by_key)):
        for (mode, d), v in sorted(by_key.items()):
            if v > 0:
                table[f"{mode}:{d}"] = v
        for d in sorted({d for _, d in by_key}):
            if d not in cm.degrees or "hybrid" not in cm.attention_modes(d):
                continue
            u, r = by_key.get(("ulysses", d), 0.0), by_key.get(("ring", d), 0.0)
            v = u if cm.ulysses_width(d) == d else max(u, r)
            if v > 0:
                table[f"hybrid:{d}"] = v
    fit["group_latency_ms"] = group_lat
    fit["per_sequence_comm_ms"] = seq_comm
    if depth == full and not profiled_world:
        raw["fit"] = fit
    return replace(cm, group_latency_ms=group_lat, per_sequence_comm_ms=seq_comm)
