"""One-GPU training smoke run of the scale path (section "train" of benchmarks/gpu_check.py; also
runnable alone: ``python benchmarks/gpu_train_smoke.py OUT_DIR``; on a machine without CUDA it runs
the same path on CPU with gloo, which the CPU test suite uses).

One rank: the tiny model built on meta, sharded by FSDP2, materialised on the device, trained in
bf16 mixed precision (fp32 master weights) for ``steps`` steps with a DCP checkpoint every 2 steps;
then a second run resumes from the step-2 checkpoint and must reproduce the uninterrupted run's
losses of steps 3..N. Reports the first step (compile / warm-up: the flex kernels are compiled
there) apart from the steady step time (median of steps 3..N) and the steady tokens/s. Plain-dict
config (no Hydra), synthetic data (no tokenizer): runs on an image with torch, numpy and scipy only.
Prints one JSON line with the numbers and the verdict.
"""
from __future__ import annotations

import json
import os
import socket
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

RESUME_AT = 2
"""The uninterrupted run checkpoints every RESUME_AT steps; the resumed run starts from this one."""
LOSS_RTOL = 1e-5
"""Relative tolerance of resumed vs uninterrupted losses: same data, weights, optimizer state and
kernels, so only a non-deterministic reduction could differ (none on one rank)."""


def config(out: Path, steps: int, resume: str = "never", batch_tokens: int = 16384,
           max_doc_tokens: int = 2048, planner: str = "process") -> dict:
    # auto: on CUDA the analytic estimate for this GPU and the tiny model (what a user gets by default)
    solver = {"cost_model": "auto", "time_limit": 0.5, "wait_s": 5.0, "background": planner}
    return {
        "model": {"preset": "tiny", "hf_checkpoint": None},
        "data": {"source": "synthetic", "distribution": "uniform", "num_docs": 200,
                 "synthetic_vocab_size": 512, "seed": 0, "corpus": {"max_doc_tokens": max_doc_tokens},
                 "sampler": {"global_batch_tokens": batch_tokens, "seed": 0}},
        "parallel": {"mode": "adaptive", "engine": "fsdp2"},
        "solver": solver,
        "train": {"steps": steps, "global_batch": 16, "precision": "bf16", "checkpoint_every": RESUME_AT,
                  "keep_checkpoints": steps, "resume": resume, "progress": False, "lr": 3e-3,
                  "warmup_steps": 1},
        "output_dir": str(out),
    }


def _metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def run_smoke(out: Path, steps: int = 8, batch_tokens: int = 16384, max_doc_tokens: int = 2048,
              planner: str = "process") -> dict:
    """The uninterrupted run, the resumed run, and the verdict (``ok``) with the timings.
    ``batch_tokens`` / ``max_doc_tokens``: tokens per step and longest document (smaller on CPU);
    ``planner``: solver.background (process as in training; thread saves a process start on CPU)."""
    if steps < RESUME_AT + 2:
        raise ValueError(f"steps must be >= {RESUME_AT + 2} (a checkpoint at step {RESUME_AT} and 2 steps "
                         f"after it), got {steps}")
    import torch
    import torch.distributed as dist
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    from flexsp.train import run
    shape = dict(batch_tokens=batch_tokens, max_doc_tokens=max_doc_tokens, planner=planner)
    full = run(config(out / "full", steps, **shape))
    backend = dist.get_backend()
    ckpt = out / "full" / "checkpoints" / f"step_{RESUME_AT:06d}"
    resumed = run(config(out / "resumed", steps, resume=str(ckpt), **shape))
    dist.destroy_process_group()
    recs = _metrics(out / "full")
    step_s = [r["step_s"] for r in recs]
    later = recs[RESUME_AT:]
    steady_s = statistics.median(r["step_s"] for r in later)
    steady_tok_s = sum(r["tokens"] for r in later) / sum(r["step_s"] for r in later)
    a = [full["losses"][i] for i in range(RESUME_AT, steps)]
    b = [resumed["losses"][i] for i in range(RESUME_AT, steps)]
    rel = max(abs(x - y) / max(abs(x), 1e-12) for x, y in zip(a, b))
    ok = rel <= LOSS_RTOL and full["start_step"] == 0 and resumed["start_step"] == RESUME_AT
    cuda = torch.cuda.is_available()
    return {"ok": ok, "backend": backend, "device": "cuda" if cuda else "cpu", "steps": steps,
            "losses": [full["losses"][i] for i in range(steps)], "resumed_losses": b,
            "resume_max_rel_diff": rel, "step_s": step_s, "first_step_s": step_s[0],
            "steady_step_s": steady_s, "steady_tokens_per_s": steady_tok_s,
            "tokens_per_step": statistics.median(r["tokens"] for r in recs),
            "run_tokens_per_s": full["tokens_per_s"],
            "peak_mem_mb": torch.cuda.max_memory_allocated() / 2**20 if cuda else None}


def main(argv: list[str]) -> int:
    out = Path(argv[0] if argv else "/tmp/flexsp_gpu_train")
    import torch
    res = run_smoke(out) if torch.cuda.is_available() else run_smoke(out, 4, 1024, 256, "thread")
    print(json.dumps(res))
    return 0 if res["ok"] else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
