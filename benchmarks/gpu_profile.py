"""GPU variant of ``flexsp-profile`` + a planning comparison, for ONE CUDA device, < 8 minutes.

NOT RUN YET: written and smoke-tested on CPU only (``--smoke``); the tasks that wrote it had no GPU.
It needs several minutes of a GPU; the bounded (~90 s) compute-only fit the GPU check runs is
``benchmarks/gpu_costfit.py`` (section "profile" of ``benchmarks/gpu_check.sh``), which reuses
``LLAMA3_8B`` below and flexsp.profile's fit and cost-model builder.
Its outputs (``benchmarks/results/profile_gpu_<date>_<device>.{json,report.json,md,png}`` and
``..._plan.md``) are kept with the date and the device name once it runs.

What it does on one device (``benchmarks/gpu_profile.sh`` wraps it in a hard timeout):

1. profile a LLaMA-3-8B-shaped model (32 layers, hidden 4096, 32/8 heads, SwiGLU 14336, vocab
   128256, context 128K; bf16 compute with fp32 master weights, activation checkpointing on) the way
   training builds it (FSDP2, on meta, local shards filled): only ``profile_layers=2`` -> 1- and
   2-layer builds are timed, the per-layer and the fixed embedding/head part fitted jointly and the
   cost model scaled to the 32 layers. Packed batches generated from ``max_len=131072``: single
   documents of 2K-128K, equal splits of 128K (same tokens, 1/k of the attention work), long-tailed
   mixes, many short documents -- so a1 is pinned at the lengths trained. Activation memory per
   token from the CUDA allocator peak over forward + backward (with the recompute). One device:
   no SP group exists, so **no communication is measured**; the bandwidth table is the documented
   default (``solver.presets.PAPER_BANDWIDTH``) and the ``source`` says so. The written model is
   for 8 devices (``num_devices=8``: the 8B model's states ZeRO-3 sharded over a node).
   Validation on held-out long-tailed batches at the timed depth (2 layers).
2. planning comparison with the calibrated compute terms on an emulated 8-GPU node (predicted
   only, clearly labelled): static Ulysses-8, the best static degree, FlexSP.

Self-limiting: the profile's ranks are killed after ``--budget-s`` (default 330 s); the shell
wrapper kills everything at 450 s. Needs numpy and torch; scipy (planner, validation) and
matplotlib (plot) are used when importable and skipped with a note otherwise.

    benchmarks/gpu_profile.sh            # on the GPU machine
    python benchmarks/gpu_profile.py --smoke --out /tmp/x   # CPU, seconds (tests)
"""
from __future__ import annotations

import argparse
import datetime as _dt
import importlib.util
import sys
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

K = 1024


LLAMA3_8B = dict(vocab_size=128256, hidden=4096, layers=32, heads=32, kv_heads=8, intermediate=14336,
                 rope_theta=500000.0, max_position_embeddings=128 * K, dtype="bfloat16",
                 activation_checkpointing=True)
"""ModelConfig overrides of the 7b preset: LLaMA-3-8B's shape (plain RoPE: the scaling costs nothing)."""


def config(smoke: bool, out: Path, name: str, budget_s: float) -> dict:
    have_scipy = importlib.util.find_spec("scipy") is not None
    plot = importlib.util.find_spec("matplotlib") is not None
    if smoke:  # the same code path on CPU: depth scaling (4-layer model, 1+2 layers timed) and AC
        return dict(name=name, output_dir=str(out), model="tiny",
                    model_overrides={"layers": 4, "activation_checkpointing": True}, profile_layers=2,
                    max_len=256, world_size=1, num_devices=8, repeats=1, progress=False,
                    compute_shapes=[[64], [128], [256], [64, 64, 128], [16] * 8], comm_shapes=[[64]],
                    validate_batches=1 if have_scipy else 0, validate_tokens=256, validate_max_len=256,
                    timeout_s=budget_s, plot=plot)
    # 11 of the generated shapes (flexsp.profile.config.default_compute_shapes(128K)), most of them
    # 128K tokens: ~2-4 s per 2-layer run (the 128K-vocab head alone ~1 s), x 2 depths x 3 passes
    M = 128 * K
    shapes = [[M], [M // 2], [M // 4], [M // 16], [M // 64], [M // 2] * 2, [M // 8] * 8, [M // 32] * 32, [16] * 64,
              [M // 2, M // 4, M // 8, M // 16, M // 32, M // 32], [M // 4] + [16] * 32]
    return dict(name=name, output_dir=str(out), model="7b", model_overrides=dict(LLAMA3_8B), profile_layers=2,
                max_len=M, compute_shapes=shapes, comm_shapes=[[1 * K]], world_size=1, repeats=2, progress=False,
                num_devices=8, validate_batches=1 if have_scipy else 0, validate_tokens=M,
                validate_max_len=M, timeout_s=min(budget_s, 330.0), plot=plot)


def plan_comparison(cm_path: Path, out: Path, devices: int = 8) -> list[str]:
    """Predicted step time of static Ulysses-N, the best static degree and FlexSP on N emulated
    devices with the calibrated compute terms (bandwidths: documented defaults)."""
    from solver.baselines import static_plan, usable_degrees
    from solver.costmodel import CostModel
    from solver.planner import plan_batch
    from solver.workloads import sample_lengths
    cm = CostModel.load(cm_path).with_devices(devices)
    cm = replace(cm, devices_per_node=devices)
    lines = [f"# Planning comparison on {devices} emulated devices (PREDICTED, not measured)", "",
             f"Cost model {cm_path.name}: measured a1/a2/b, default bandwidths; C = {cm.capacity_tokens} tokens/device.",
             "", "| distribution | ulysses-full ms | best static (degree) ms | flexsp ms | speedup vs full | vs best static |",
             "|---|---|---|---|---|---|"]
    limit = devices * cm.capacity_tokens
    for name in ("wikipedia", "github", "commoncrawl"):
        lens = [int(x) for x in sample_lengths(name, 256, seed=0, context_limit=limit)]
        full = static_plan(lens, cm, max(usable_degrees(cm)))
        statics = [static_plan(lens, cm, d) for d in usable_degrees(cm) if max(lens) <= d * cm.capacity_tokens]
        best = min(statics, key=lambda p: p.predicted_ms)
        fx = plan_batch(lens, cm, time_limit=2.0)
        lines.append(f"| {name} | {full.predicted_ms:.0f} | {best.predicted_ms:.0f} ({best.method}) | {fx.predicted_ms:.0f} | "
                     f"{full.predicted_ms / fx.predicted_ms:.3f}x | {best.predicted_ms / fx.predicted_ms:.3f}x |")
    out.write_text("\n".join(lines) + "\n")
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="CPU, tiny model, seconds")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    p.add_argument("--budget-s", type=float, default=330.0, help="profile ranks are killed after this")
    a = p.parse_args(argv)
    if a.budget_s <= 0:
        raise SystemExit(f"--budget-s must be > 0, got {a.budget_s}")
    import torch
    if not a.smoke and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --smoke for the CPU smoke mode")
    dev = "cpu" if a.smoke else torch.cuda.get_device_name(0).replace(" ", "-")
    name = f"profile_gpu_{_dt.date.today().isoformat()}_{dev}" if not a.smoke else "profile_gpu_smoke"
    from flexsp.profile import profile
    res = profile(config(a.smoke, a.out, name, a.budget_s), cmd="python benchmarks/gpu_profile.py " + " ".join(argv or sys.argv[1:]))
    if importlib.util.find_spec("scipy") is None:
        print("[gpu_profile] scipy missing: planning comparison skipped", flush=True)
        return 0
    lines = plan_comparison(res["paths"]["cost_model"], a.out / f"{name}_plan.md")
    print("\n".join(lines), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
