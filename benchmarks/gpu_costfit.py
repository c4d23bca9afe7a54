"""Section profile of the GPU check (also standalone): a lean compute profile of a LLaMA-3-8B-shaped
model on ONE device, written as a cost model the planner and the simulator read.

    python benchmarks/gpu_costfit.py --out DIR [--budget-s 90] [--smoke]

Why not ``flexsp-profile`` (benchmarks/gpu_profile.py): its 8B run times 11 shapes of up to 128K
tokens at two depths in 3 passes, an optimizer step and held-out plans through FSDP2 -- minutes on
an H200. This one keeps what the compute terms need and fits in ~90 s:

- 1- and 2-layer builds of the 8B shape (hidden 4096, 32/8 heads, SwiGLU 14336, vocab 128256),
  built on meta and filled on the device with flexsp.model.init's per-name rule (no CPU init of
  1.5B parameters), bf16, activation checkpointing ON (as the 8B preset trains), called directly
  (one device: no FSDP2, no process group);
- warm-up of two token counts per depth (the flex compile and its one dynamic-shape recompile);
- packed batches up to 128K tokens (priority order, stopped before the budget runs out), each timed
  twice at both depths, forward + backward including the LM head and the loss; the fastest kept;
- ``time = n * (a1 sum L^2 + a2 sum L + b) + (a2_f sum L + b_f)`` for n layers, fitted jointly by
  ``flexsp.profile.fit.fit_depth`` (NNLS on relative error), scaled to 32 layers and turned into a
  ``solver.costmodel.CostModel`` by ``flexsp.profile.build.build_cost_model`` (communication terms:
  one device measures none; its ``source`` says which bandwidth table it uses);
- a held-out long-tailed batch at 2 layers, timed once three shapes allow a fit: measured vs the
  prediction of the final fit;
- activation bytes per token from the CUDA allocator peak (slope over token counts, per layer from
  the two depths); on CPU (smoke) an analytic placeholder, labelled as such.

The cost model is (re)written after every shape once a fit is possible, so a kill keeps the last.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import sys
import time
from dataclasses import replace
from pathlib import Path

HERE = Path(__file__).resolve().parent
for _p in (str(HERE.parent), str(HERE)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

from gpu_common import (Deadline, SectionResult, fmt_tokens, free_memory, long_tailed_lengths,  # noqa: E402
                        short_error, sync, table)

FIT_RESERVE_S = 3.0
"""Seconds kept free at the end for the fit and the writes."""
K = 1024


def costfit_config(smoke: bool) -> dict:
    from gpu_profile import LLAMA3_8B
    if smoke:
        return dict(model="tiny", overrides={"layers": 4, "activation_checkpointing": True}, precision="fp32",
                    depths=[1, 2], warmup=[[64, 64]], shapes=[[256], [64] * 4, [512], "heldout"],
                    heldout=(384, 16, 3),
                    name="smoke-cpu-tiny", file="costmodel_smoke_cpu_tiny.json", num_devices=8)
    return dict(model="7b", overrides=dict(LLAMA3_8B), precision="bf16", depths=[1, 2],
                warmup=[[4 * K] * 2, [16 * K]],
                shapes=[[32 * K], [8 * K] * 4, [128 * K], "heldout", [32 * K] * 4, [64 * K], [16 * K] * 8],
                heldout=(96 * K, 256, 7), name="h200-llama3-8b", file="costmodel_h200_llama8b.json",
                num_devices=8)


def build_model(mcfg, device):
    """The Transformer of ``mcfg`` on ``device``: built on meta, materialised, filled on the device
    with flexsp.model.init's per-name rule (norms 1, output projections scaled) -- fast, not the
    world-size-independent seeded init (times do not depend on the values)."""
    import torch

    from flexsp.model import Transformer
    from flexsp.model.init import init_rule
    from flexsp.parallelize import ParallelizeConfig, parallelize
    model = Transformer(mcfg, device="meta")
    # activation checkpointing is applied from outside, as training applies it (no sharding here)
    parallelize(model, None, ParallelizeConfig(activation_checkpointing=bool(mcfg.activation_checkpointing)))
    model = model.to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            kind, value = init_rule(name, mcfg.init_std, mcfg.layers)
            if kind == "const":
                p.fill_(value)
            else:
                p.normal_(0.0, value, generator=gen)
    return model


class Runner:
    """Times fwd+bwd (incl. the loss) of packed batches on the built depths."""

    def __init__(self, models: dict, vocab: int, device):
        self.models, self.vocab, self.device = models, vocab, device

    def inputs(self, lengths):
        import numpy as np
        import torch

        from flexsp.model import shard_inputs
        T = int(sum(lengths))
        gen = torch.Generator(device=self.device).manual_seed(T)
        ids = torch.randint(0, self.vocab, (T,), generator=gen, device=self.device)
        cu = torch.tensor([0, *np.cumsum(lengths).tolist()], dtype=torch.int32)
        return shard_inputs(ids, cu)

    def run(self, depth: int, inputs) -> tuple[float, int | None]:
        """(seconds, peak extra bytes on CUDA else None) of one forward + backward."""
        import torch
        model = self.models[depth]
        model.zero_grad(set_to_none=True)
        cuda = self.device.type == "cuda"
        sync(self.device)
        if cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
            base = torch.cuda.memory_allocated(self.device)
        t0 = time.perf_counter()
        loss, _count = inputs.loss(model)
        loss.backward()
        sync(self.device)
        seconds = time.perf_counter() - t0
        peak = torch.cuda.max_memory_allocated(self.device) - base if cuda else None
        model.zero_grad(set_to_none=True)
        return seconds, peak


def _slope(points) -> float:
    """Least-squares slope of bytes over tokens (constant buffers cancel)."""
    import numpy as np
    x = np.array([p[0] for p in points], dtype=float)
    y = np.array([p[1] for p in points], dtype=float)
    return float(np.polyfit(x, y, 1)[0]) if len(set(x)) >= 2 else 0.0


def activation_record(peaks: dict, mcfg, depths: list) -> dict:
    """raw["activation"] for build_cost_model: per-layer and fixed bytes per token."""
    lo, hi = depths
    if all(len({t for t, _ in peaks.get(n, [])}) >= 2 for n in depths):
        per_layer = max(0.0, (_slope(peaks[hi]) - _slope(peaks[lo])) / (hi - lo))
        fixed = max(0.0, _slope(peaks[hi]) - hi * per_layer)
        method = ("CUDA max_memory_allocated growth over forward + backward (with activation checkpointing: "
                  "the recompute peak included), slope over token counts; per layer from the 1- and 2-layer "
                  "builds")
    else:  # CPU: no allocator statistics
        elem = 2 if mcfg.dtype == "bfloat16" else 4
        per_layer = float(mcfg.hidden * elem)
        fixed = float((6 * mcfg.hidden + 3 * mcfg.intermediate) * elem)
        method = ("CPU smoke: analytic placeholder (block input per layer + one block's recompute), "
                  "NOT measured")
    return {"method": method, "per_layer_bytes_per_token": per_layer, "fixed_bytes_per_token": fixed,
            "bytes_per_token": fixed + hi * per_layer, "depth": hi,
            "points": {str(n): v for n, v in peaks.items()}}


def _profile_run(c: dict, memory_mb: float = 0.0):
    """The profile run (a flexsp.config.RunConfig with its ``profile`` section) the cost model is
    built from; the engine and devices per node go into the raw measurements (``raw["engine"]``)."""
    from flexsp.profile.config import from_flat
    return from_flat(dict(name=c["name"], model=c["model"], model_overrides=dict(c["overrides"]),
                          precision=c["precision"], profile_layers=max(c["depths"]), world_size=1,
                          fit_per_sequence=False, fit_group_latency=False, fit_per_sequence_comm=False,
                          num_devices=c["num_devices"], devices_per_node=c["num_devices"], repeats=2,
                          validate_batches=0, plot=False, progress=False, memory_mb=memory_mb))


def _profile_config(c: dict, memory_mb: float = 0.0):
    return _profile_run(c, memory_mb).profile


def section_profile(cfg: dict, res: SectionResult, deadline: Deadline) -> None:
    import numpy as np
    import torch

    from solver.costmodel import CostModel
    device, smoke = cfg["device"], cfg["smoke"]
    c = costfit_config(smoke)
    from flexsp.profile.config import profiled_model
    full, _precision, _ = profiled_model(_profile_run(c))
    full = replace(full, dtype="bfloat16" if c["precision"] == "bf16" else "float32")
    t0 = time.monotonic()
    models = {n: build_model(replace(full, layers=n), device) for n in c["depths"]}
    runner = Runner(models, full.vocab_size, device)
    one, two = (replace(full, layers=n).num_params() for n in (1, 2))
    mc = {k: getattr(full, k) for k in ("vocab_size", "hidden", "layers", "heads", "kv_heads", "intermediate",
                                        "dtype", "activation_checkpointing", "max_position_embeddings")}
    mc.update(head_size=full.head_size, precision=c["precision"], compute_dtype=full.dtype)
    raw = {"world_size": 1, "device": str(device), "backend": "none",
           "threads_per_rank": torch.get_num_threads(), "model": c["model"], "model_config": mc,
           "engine": "fsdp2", "devices_per_node": c["num_devices"],
           "profile_depths": c["depths"], "num_params": full.num_params(), "params_per_layer": two - one,
           "params_fixed": 2 * one - two, "compute": [], "comm": {}, "optimizer_ms": 0.0}
    fit = CostFit(c, cfg, raw, full, res)
    res.data.update(build_s=time.monotonic() - t0, model_config=mc, samples=[], warmup=[])
    res.flush()
    try:
        _warm_up(c, runner, res)
    except Exception as exc:  # noqa: BLE001 - checkpointing + compiled flex never ran on a GPU before
        if not full.activation_checkpointing:
            raise
        # Without activation checkpointing the times lack the recompute, but the fit still runs; the
        # cost model records activation_checkpointing=false and its source says why.
        res.data["ac_error"] = short_error(exc, 300)
        print(f"[profile] warm-up with activation checkpointing failed ({res.data['ac_error']}); "
              "retrying without", flush=True)
        full = fit.full = replace(full, activation_checkpointing=False)
        mc["activation_checkpointing"] = False
        from flexsp.parallelize import set_activation_checkpointing
        for model in runner.models.values():
            model.config = replace(model.config, activation_checkpointing=False)
            set_activation_checkpointing(model, False)
        free_memory(device)
        _warm_up(c, runner, res)
    held = None
    for lengths in c["shapes"]:
        if lengths == "heldout":  # once a fit is possible: a long-tailed batch the fit never saw
            if fit.possible():
                held = _heldout(c, runner, res, deadline)
            continue
        need = sum(2 * _estimate(res.data["samples"], n, lengths) for n in c["depths"]) + FIT_RESERVE_S
        if deadline.left() < need:
            res.data.setdefault("not_measured", []).append(_shape(lengths))
            continue
        try:
            inp = runner.inputs(lengths)
            for n in c["depths"]:
                runs = [runner.run(n, inp) for _ in range(2)]
                raw["compute"].append((list(lengths), min(s for s, _ in runs) * 1e3, n))
                if runs[1][1] is not None:  # the warm run's allocator peak
                    fit.peaks.setdefault(n, []).append((sum(lengths), runs[1][1]))
                res.data["samples"].append({"lengths": list(lengths), "layers": n,
                                            "ms": [s * 1e3 for s, _ in runs], "peak_bytes": runs[1][1]})
        except Exception as exc:  # noqa: BLE001 - e.g. out of memory: the other shapes still count
            res.data.setdefault("errors", []).append(f"{_shape(lengths)}: {short_error(exc)}")
            raw["compute"] = [r for r in raw["compute"] if r[0] != list(lengths)]
            res.data["samples"] = [r for r in res.data["samples"] if r["lengths"] != list(lengths)]
            free_memory(device)
        inp = None
        if fit.possible():
            fit.write(held)
    if not fit.possible():
        fit.render_samples(None)
        raise RuntimeError(f"only {len(raw['compute'])} timed (shape, depth) samples before the budget ran "
                           "out: too few for a fit, no cost model written")
    cm = fit.write(held)
    CostModel.load(Path(cfg["out_dir"]) / c["file"])  # what was written must load
    res.data["cost_model"] = cm.to_dict()


def _warm_up(c: dict, runner, res: SectionResult) -> None:
    """Untimed runs of two token counts at every depth: the flex compile and its dynamic-shape recompile."""
    for lengths in c["warmup"]:
        inp = runner.inputs(lengths)
        for n in c["depths"]:
            s, _ = runner.run(n, inp)
            res.data["warmup"].append({"tokens": sum(lengths), "layers": n, "seconds": s})
            res.flush()


def _heldout(c: dict, runner, res: SectionResult, deadline: Deadline) -> dict | None:
    """Time the held-out long-tailed batch (2 runs, the fastest) at the deepest build, if time allows."""
    import numpy as np
    total, min_doc, seed = c["heldout"]
    lengths = long_tailed_lengths(total, np.random.default_rng(seed), min_doc)
    n = max(c["depths"])
    if deadline.left() < 2 * _estimate(res.data["samples"], n, lengths) + FIT_RESERVE_S:
        res.data.setdefault("not_measured", []).append("held-out batch")
        return None
    try:
        inp = runner.inputs(lengths)
        ms = min(runner.run(n, inp)[0] for _ in range(2)) * 1e3
        return {"lengths": lengths, "layers": n, "measured_ms": ms}
    except Exception as exc:  # noqa: BLE001
        res.data.setdefault("errors", []).append(f"held-out batch: {short_error(exc)}")
        free_memory(runner.device)
        return None


def _estimate(samples: list, layers: int, lengths) -> float:
    """Seconds one run of ``lengths`` should take at ``layers`` layers, from the samples so far:
    ``alpha * tokens + beta * sum L^2`` fitted (non-negative) to two or more, the last one scaled by the
    larger of the two ratios with one, 0 with none (the kill at the budget is the backstop)."""
    import numpy as np
    pts = [(sum(s["lengths"]), float(sum(x * x for x in s["lengths"])), min(s["ms"]) / 1e3)
           for s in samples if s["layers"] == layers]
    T, sq = sum(lengths), float(sum(x * x for x in lengths))
    if not pts:
        return 0.0
    if len(pts) >= 2:
        A = np.array([[p[0], p[1]] for p in pts])
        scale = A.max(axis=0)
        y = np.array([p[2] for p in pts])
        coef = np.clip(np.linalg.lstsq(A / scale, y, rcond=None)[0], 0.0, None) / scale
        est = float(coef @ np.array([T, sq]))
        if est > 0:
            return 1.2 * est
    t0, s0, sec = pts[-1]
    return sec * max(T / t0, sq / s0, 1.0)


def _work(lengths) -> float:
    return sum(lengths) + sum(x * x for x in lengths) / 1024


def _shape(lengths) -> str:
    if len(set(lengths)) == 1:
        return f"{len(lengths)} x {fmt_tokens(lengths[0])}" if len(lengths) > 1 else fmt_tokens(lengths[0])
    return f"{len(lengths)} docs, max {fmt_tokens(max(lengths))}"


class CostFit:
    """The fit of the timed samples, the cost-model file and the section's report lines."""

    def __init__(self, c: dict, cfg: dict, raw: dict, full, res: SectionResult):
        self.c, self.cfg, self.raw, self.full, self.res = c, cfg, raw, full, res
        self.peaks: dict = {}
        """layers -> [(tokens, peak extra bytes)] (CUDA only)."""

    def possible(self) -> bool:
        shapes = {tuple(L) for L, _, _ in self.raw["compute"]}
        depths = {n for _, _, n in self.raw["compute"]}
        return len(shapes) >= 3 and depths == set(self.c["depths"])

    def render_samples(self, rel_errors) -> None:
        rows = []
        for i, s in enumerate(self.res.data["samples"]):
            L = s["lengths"]
            peak = "" if s["peak_bytes"] is None else f"{s['peak_bytes'] / 2**30:.2f}"
            rows.append((_shape(L), s["layers"], sum(L), f"{float(sum(x * x for x in L)):.3g}",
                         "/".join(f"{ms:.1f}" for ms in s["ms"]), peak,
                         f"{rel_errors[i]:+.1%}" if rel_errors else ""))
        self.res.lines = table(["shape", "layers", "tokens", "sum L^2", "ms (2 runs)", "peak extra GiB",
                                "fit error"], rows)

    def write(self, held: dict | None):
        """Fit, write the cost-model file, render the report lines; returns the CostModel."""
        from flexsp.profile.build import build_cost_model, depth_fit
        c, raw, res = self.c, self.raw, self.res
        pcfg = _profile_config(c)
        raw["activation"] = activation_record(self.peaks, self.full, c["depths"])
        raw["max_len"] = max(max(L) for L, _, _ in raw["compute"])
        cm = build_cost_model(pcfg, raw)
        fit = raw["fit"]
        deep = max(c["depths"])
        held_line = "held-out check: not run (budget)"
        if held is not None:
            pred = depth_fit(pcfg, raw).compute_at(deep).predict(held["lengths"])
            measured = held["measured_ms"]
            held.update(predicted_ms=pred, rel_err=(pred - measured) / measured)
            L = held["lengths"]
            held_line = (f"held-out long-tailed batch ({len(L)} docs, {sum(L)} tokens, max {max(L)}) at "
                         f"{deep} layers: measured {measured:.1f} ms, predicted {pred:.1f} ms "
                         f"({held['rel_err']:+.1%})")
        source = self.source(cm, fit, held_line)
        cm = replace(cm, name=c["name"], source=source)
        out = Path(self.cfg["out_dir"])
        out.mkdir(parents=True, exist_ok=True)
        cm.save(out / c["file"])
        self.render_samples(fit["compute"]["rel_errors"])
        res.lines += self.summary_lines(cm, fit, held_line) + ["", f"source: {source}"]
        res.data.update(fit={k: fit[k] for k in ("per_layer", "fixed", "compute")}, heldout=held,
                        activation=raw["activation"], file=c["file"])
        pl = fit["per_layer"]
        held_key = f", held-out {held['rel_err']:+.1%}" if held else ""
        res.key = (f"{c['file']}: per layer a1 {pl['a1']:.3e}, a2 {pl['a2']:.3e}, b {pl['b']:.2f} ms; fit "
                   f"max err {fit['compute']['max_abs_rel_err']:.1%}{held_key}")
        res.flush()
        return cm

    def summary_lines(self, cm, fit, held_line: str) -> list[str]:
        full, data = self.full, self.res.data
        pl, fx = fit["per_layer"], fit["fixed"]
        ac = full.activation_checkpointing
        # FLOPs per token and layer: fwd 2P (+ recompute 2P) + bwd 4P; per token^2: causal fwd 2HD x
        # (1 (+1 recompute) + 2.5 bwd)
        flops_lin = (8 if ac else 6) * self.raw["params_per_layer"]
        flops_att = (9 if ac else 7) * full.heads * full.head_size
        derived = ""
        if pl["a1"] > 0 and pl["a2"] > 0:
            derived = (f" Derived: the linear part of a layer runs at {flops_lin / pl['a2'] / 1e9:.0f} "
                       f"TFLOP/s, its attention at {flops_att / pl['a1'] / 1e9:.0f} TFLOP/s.")
        warm = ", ".join(f"{w['tokens']} tokens x {w['layers']} layers {w['seconds']:.1f} s"
                         for w in data["warmup"])
        one_doc_s = cm.group_time_ms([128 * K], 1) / 1e3
        return [
            "", f"Per layer: a1 = {pl['a1']:.4e} ms/token^2, a2 = {pl['a2']:.4e} ms/token, b = "
            f"{pl['b']:.3f} ms; fixed (embedding, head, loss): a2 = {fx['a2']:.4e} ms/token, b = "
            f"{fx['b']:.3f} ms.{derived}",
            f"At {full.layers} layers: a1 = {cm.a1:.4e}, a2 = {cm.a2:.4e}, b = {cm.b:.2f} ms; predicted "
            f"fwd+bwd of one 128K document on one device {one_doc_s:.2f} s; activation "
            f"{cm.act_mb_per_token * 1024:.1f} KiB/token -> capacity {cm.capacity_tokens} tokens per device.",
            "",
            f"- {held_line}", f"- warm-up (compile) runs: {warm}",
            f"- not measured (budget): {data.get('not_measured') or 'nothing'}",
            f"- errors: {data.get('errors') or 'none'}",
            f"- written: `{self.c['file']}` (a CostModel JSON: `flexsp-plan --cost-model FILE`, "
            "`solver.cost_model=FILE`)"]

    def ac_note(self) -> str:
        if self.full.activation_checkpointing:
            return "activation checkpointing on"
        if "ac_error" in self.res.data:
            return (f"activation checkpointing OFF: with it the warm-up failed ({self.res.data['ac_error']}"
                    "), so these times LACK the recompute the 8B preset trains with")
        return "activation checkpointing off"

    def source(self, cm, fit, held_line: str) -> str:
        full, raw = self.full, self.raw
        is_cuda = self.cfg["device"].type == "cuda"
        bw = ", ".join(f"{k}: {v:g}" for k, v in sorted(cm.bandwidth_gbps.items()))
        shape = "LLaMA-3-8B" if self.c["model"] == "7b" else self.c["model"]
        commit = self.cfg.get("ctx", {}).get("commit", "?")
        return (
            f"benchmarks/gpu_costfit.py (gpu_check section profile), {_dt.date.today().isoformat()}, commit "
            f"{commit}. MEASURED on one {_device_name(self.cfg['device'])}: forward+backward time incl. LM "
            f"head and loss ({full.dtype}, {self.ac_note()}, model called directly: no FSDP2, no process "
            f"group) of {len(raw['compute'])} packed micro-batches on 1- and 2-layer builds of a {shape} "
            f"shape (hidden {full.hidden}, {full.heads}/{full.kv_heads} heads, SwiGLU {full.intermediate}, "
            f"vocab {full.vocab_size}), documents up to {raw['max_len']} tokens, fastest of 2 runs; "
            f"per-layer a1/a2/b and a fixed (embedding/head/loss) a2/b fitted jointly "
            f"(flexsp.profile.fit.fit_depth, NNLS on relative error, max error "
            f"{fit['compute']['max_abs_rel_err']:.1%}), scaled to {full.layers} layers; {held_line}; "
            f"activation: {raw['activation']['method']}. NOT MEASURED (one device): communication -- "
            f"all-to-all bandwidths are the FlexSP paper's A100-cluster table "
            f"(solver.presets.PAPER_BANDWIDTH, GB/s per SP degree {{{bw}}}), an ESTIMATE, not this machine's "
            f"NVLink/IB; volumes analytic (flexsp.profile.build.volumes_mb_per_token); ring attention off "
            f"(no p2p bandwidth); ZeRO-3 parameter/gradient traffic not in b; optimizer step not timed "
            f"(step_overhead_ms = 0); memory_mb {'90% of this device' if is_cuda else 'CPU MemAvailable'}; "
            f"written for {cm.num_devices} devices (one node), model states ZeRO-3 sharded over them."
            + ("" if is_cuda else " SMOKE RUN on CPU: the numbers mean nothing."))


def _device_name(device) -> str:
    import torch
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"


def main(argv=None) -> int:
    import json
    import tempfile
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--budget-s", type=float, default=90.0)
    p.add_argument("--smoke", action="store_true", help="CPU, tiny model, seconds")
    a = p.parse_args(argv)
    if a.budget_s <= 0:
        raise SystemExit(f"--budget-s must be > 0, got {a.budget_s}")
    import torch
    if not a.smoke and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --smoke for the CPU smoke mode")
    device = torch.device("cpu") if a.smoke else torch.device("cuda", 0)
    res = SectionResult(Path(tempfile.mkstemp(suffix=".json")[1]))
    try:
        cfg = {"device": device, "smoke": a.smoke, "out_dir": a.out, "ctx": {}}
        section_profile(cfg, res, Deadline(a.budget_s))
    except Exception as exc:  # noqa: BLE001
        print(f"[gpu_costfit] error: {short_error(exc)}", flush=True)
        return 1
    finally:
        print("\n".join(res.lines), flush=True)
    print(json.dumps({"key": res.key}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
