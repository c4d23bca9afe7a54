"""GPU variant of ``flexsp-profile`` + a planning comparison, for ONE CUDA device, < 8 minutes.

NOT RUN YET: written and smoke-tested on CPU only (``--smoke``); the task that wrote it had no GPU.
Its outputs (``benchmarks/results/profile_gpu_<date>_<device>.{json,report.json,md,png}`` and
``..._plan.md``) are kept with the date and the device name once it runs.

What it does on one device (``benchmarks/gpu_profile.sh`` wraps it in a hard timeout):

1. profile at degree 1 (one device: no SP group exists, so **no communication is measured**; the
   cost model's bandwidth table is left at the documented defaults, the paper cluster's all-to-all
   bandwidths ``solver.presets.PAPER_BANDWIDTH``, and says so in its ``source``): fwd+bwd of a
   2-layer LLaMA-3.2-1B-shaped model (bf16) on packed batches of 1K-32K tokens under the real
   executor, NNLS fit of a1/a2/b with its error, activation bytes per token from the CUDA
   allocator; validation on held-out long-tailed batches (micro-batches and whole steps);
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


def config(smoke: bool, out: Path, name: str, budget_s: float) -> dict:
    have_scipy = importlib.util.find_spec("scipy") is not None
    if smoke:
        return dict(name=name, output_dir=str(out), model="tiny", world_size=1, repeats=1, progress=False,
                    compute_shapes=[[64], [128], [256], [64, 64, 128]], comm_shapes=[[64]],
                    validate_batches=1 if have_scipy else 0, validate_tokens=512, validate_max_len=256,
                    timeout_s=budget_s, plot=importlib.util.find_spec("matplotlib") is not None)
    return dict(name=name, output_dir=str(out), model="1b", model_overrides={"layers": 2}, world_size=1,
                repeats=3, progress=False,
                compute_shapes=[[1 * K], [2 * K], [4 * K], [8 * K], [16 * K], [32 * K], [512] * 16, [1 * K] * 16,
                                [2 * K] * 8, [4 * K] * 4, [8 * K, 4 * K, 2 * K, 1 * K, 512, 512],
                                [16 * K, 8 * K], [24 * K, 4 * K, 4 * K]],
                comm_shapes=[[1 * K]], validate_batches=3 if have_scipy else 0, validate_tokens=48 * K,
                validate_max_len=32 * K, timeout_s=budget_s,
                plot=importlib.util.find_spec("matplotlib") is not None)


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
