"""Raw profile measurements -> a :class:`solver.costmodel.CostModel` (and the fits, for the report).

Volumes are analytic (what the runtime sends per token), bandwidths are *effective*: the value that
makes ``volume / sp / bw`` equal the measured communication cost per token (see fit.py).
"""
from __future__ import annotations

import os
from dataclasses import replace

from solver.costmodel import CostModel
from solver.presets import PAPER_BANDWIDTH

from flexsp.profile.config import ProfileConfig
from flexsp.profile.fit import fit_comm_per_token, fit_compute, fit_joint, fit_link

UNMEASURED_GBPS = 1e6
"""Effective bandwidth written when the measured communication cost is ~0 (no degree penalty)."""


def volumes_mb_per_token(mc: dict) -> tuple[float, float]:
    """(Ulysses all-to-all MB per token, ring KV MB per token) for a model config dict.

    Ulysses: per layer, q, k, v and the output go through an all-to-all forward and their gradients
    backward. Ring: per layer, k and v travel forward; k, v, dk, dv backward.
    """
    elem = 2 if mc["dtype"] == "bfloat16" else 4
    d = mc["hidden"] // mc["heads"]
    q, kv = mc["heads"] * d, mc["kv_heads"] * d
    a2a = elem * mc["layers"] * 2 * (2 * q + 2 * kv) / 2**20
    ring = elem * mc["layers"] * 3 * (2 * kv) / 2**20
    return a2a, ring


def default_memory_mb(device: str, world: int) -> tuple[float, str]:
    if device.startswith("cuda"):
        import torch
        total = torch.cuda.get_device_properties(torch.device(device)).total_memory / 2**20
        return 0.9 * total, "90% of the CUDA device's total memory"
    try:
        with open("/proc/meminfo") as fh:
            avail = next(int(ln.split()[1]) for ln in fh if ln.startswith("MemAvailable")) / 1024
    except (OSError, StopIteration):
        avail = 4096.0 * world
    return avail / world, f"CPU: MemAvailable / {world} ranks (no device memory limit)"


def build_cost_model(cfg: ProfileConfig, raw: dict, topo=None) -> CostModel:
    """Fit every term and return the CostModel; the fits are stored in ``raw['fit']``."""
    world = int(raw["world_size"])
    mc = raw["model_config"]
    comm_rows = {k: [(L, ms) for L, ms in rows] for k, rows in raw.get("comm", {}).items()}
    joint = None
    if cfg.joint_fit and comm_rows:
        comp, joint = fit_joint([(L, ms) for L, ms in raw["compute"]], comm_rows, per_sequence=cfg.fit_per_sequence,
                                group_latency=cfg.fit_group_latency, key_docs=cfg.fit_per_sequence_comm)
    else:
        comp = fit_compute([(L, ms) for L, ms in raw["compute"]], per_sequence=cfg.fit_per_sequence)
    a2a_mb, ring_mb = volumes_mb_per_token(mc)
    step_ms = float(raw["optimizer_ms"])
    fit = {"compute": {"a1": comp.a1, "a2": comp.a2, "per_seq": comp.per_seq, "b": comp.b,
                       "stderr": comp.stderr,
                       "median_abs_rel_err": comp.median_abs_rel, "max_abs_rel_err": comp.max_abs_rel,
                       "rel_errors": comp.rel_errors},
           "step_overhead_ms": step_ms,
           "step_overhead_spread_ms": raw.get("optimizer_spread_ms"),
           "comm": {}, "links": {}}
    bw, p2p, lat_by_key, doc_by_key = {}, {}, {}, {}
    for key, rows in raw.get("comm", {}).items():
        mode, d = key.split(":")
        d = int(d)
        if joint is not None:
            c, errs = joint[key]["ms_per_token"], joint[key]["rel_errors"]
        else:
            c, errs = fit_comm_per_token(rows, comp, d)
        vol = a2a_mb / d if mode == "ulysses" else ring_mb * (d - 1) / d
        eff = vol / c if c > 0 else UNMEASURED_GBPS
        (bw if mode == "ulysses" else p2p)[d] = eff
        lat = joint[key].get("latency_ms", 0.0) if joint is not None else 0.0
        lat_by_key[(mode, d)] = lat
        doc = joint[key].get("extra_doc_ms", 0.0) if joint is not None else 0.0
        doc_by_key[(mode, d)] = doc
        fit["comm"][key] = {"ms_per_token": c, "effective_gbps": eff, "rel_errors": errs,
                            "stderr": joint[key]["stderr"] if joint is not None else None,
                            "latency_ms": lat,
                            "latency_stderr": joint[key].get("latency_stderr") if joint is not None else None,
                            "max_abs_rel_err": max(abs(e) for e in errs)}
        if joint is not None and "extra_doc_ms" in joint[key]:
            fit["comm"][key].update(per_sequence_comm_ms=doc, per_sequence_comm_stderr=joint[key]["extra_doc_stderr"])
    for key, rows in raw.get("links", {}).items():
        lat, gbps = fit_link([s for s, _ in rows], [t for _, t in rows])
        fit["links"][key] = {"latency_ms": lat, "gbps": gbps}
    defaults_used = False
    if world == 1 or not bw:  # one device: nothing to measure; documented defaults
        bw = dict(PAPER_BANDWIDTH)
        defaults_used = True
    memory_mb, mem_note = (cfg.memory_mb, "configured") if cfg.memory_mb else default_memory_mb(raw["device"], world)
    act = raw["activation"]["bytes_per_token"] / 2**20
    elem = 2 if mc["dtype"] == "bfloat16" else 4
    dpn = cfg.devices_per_node or int(os.environ.get("LOCAL_WORLD_SIZE", world))
    source = (f"flexsp-profile on {raw['device']} ({raw['backend']}), {world} rank(s) all busy while timing, "
              f"{raw['threads_per_rank']} thread(s)/rank, engine {cfg.engine}, model {cfg.model}; "
              + (f"a1/a2/per_sequence_ms/b, comm per token"
                 + (" and group_latency_ms" if cfg.fit_group_latency else "")
                 + (" and per_sequence_comm_ms" if cfg.fit_per_sequence_comm else "")
                 + (" per mode:degree" if cfg.fit_group_latency or cfg.fit_per_sequence_comm else "")
                 + ": one joint NNLS on relative error of "
                 f"{len(raw['compute'])} packed micro-batches at degree 1 and "
                 f"{sum(len(v) for v in comm_rows.values())} at degree > 1" if joint is not None else
                 f"a1/a2/per_sequence_ms/b: NNLS on relative error of {len(raw['compute'])} packed micro-batches at "
                 f"degree 1")
              + f" (degree-1 max rel err {comp.max_abs_rel:.1%}); step_overhead_ms: the timed optimizer step "
              f"(engine.step: grad norm, AdamW, zero_grad); every time the fastest of {cfg.repeats} runs; bandwidths: effective, from timed SP micro-batches"
              + (" -- NOT MEASURED (one device): paper defaults" if defaults_used else "")
              + f"; activation: {raw['activation']['method']}; memory: {mem_note}")
    cm = CostModel(
        name=cfg.name, num_devices=world, devices_per_node=min(dpn, world), memory_mb=float(memory_mb),
        a1=comp.a1, a2=comp.a2, b=comp.b, per_sequence_ms=comp.per_seq, step_overhead_ms=step_ms,
        a2a_mb_per_token=a2a_mb, bandwidth_gbps=bw,
        act_mb_per_token=max(act, 1e-9), params_gi=raw["num_params"] / 2**30,
        state_bytes_per_param=4.0 * elem, zero_stage=3, heads=mc["heads"], kv_heads=mc["kv_heads"],
        ring_mb_per_token=ring_mb if p2p else 0.0, p2p_bandwidth_gbps=p2p,
        capacity_override=int(cfg.capacity_tokens), source=source)
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
    raw["fit"] = fit
    return replace(cm, group_latency_ms=group_lat, per_sequence_comm_ms=seq_comm)
