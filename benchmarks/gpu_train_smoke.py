"""1-GPU NCCL training smoke run of the scale path (called by benchmarks/gpu_check.py, section
"train"; also runnable alone: ``python benchmarks/gpu_train_smoke.py OUT_DIR``).

One rank on CUDA with NCCL: the tiny model (and a few steps) built on meta, sharded by FSDP2,
materialised on the GPU, trained in bf16 mixed precision (fp32 master weights), a DCP checkpoint
after step 2, and a resume from it whose step 3 must equal the uninterrupted run's step 3. Uses a
plain-dict config (no Hydra needed) and synthetic data (no tokenizer needed), so it runs on a GPU
image that has only torch, numpy and scipy. Prints one JSON line with the losses and the verdict.
"""
from __future__ import annotations

import json
import os
import socket
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def config(out: Path, resume: str = "never", steps: int = 3) -> dict:
    return {
        "model": {"preset": "tiny", "hf_checkpoint": None},
        "data": {"source": "synthetic", "distribution": "uniform", "num_docs": 200, "synthetic_vocab_size": 512,
                 "seed": 0, "corpus": {"max_doc_tokens": 2048}, "sampler": {"global_batch_tokens": 16384, "seed": 0}},
        "parallel": {"mode": "adaptive", "engine": "fsdp2"},
        "solver": {"cost_model": "cpu-gloo-tiny", "time_limit": 0.5, "wait_s": 5.0},
        "train": {"steps": steps, "global_batch": 16, "precision": "bf16", "checkpoint_every": 2, "resume": resume,
                  "progress": False, "lr": 3e-3, "warmup_steps": 1},
        "output_dir": str(out),
    }


def main(argv: list[str]) -> int:
    import torch
    out = Path(argv[0] if argv else "/tmp/flexsp_gpu_train")
    if not torch.cuda.is_available():
        print(json.dumps({"ok": False, "reason": "no CUDA device"}))
        return 2
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    import torch.distributed as dist

    from flexsp.train import run
    full = run(config(out / "full"))
    assert dist.get_backend() == "nccl", dist.get_backend()
    resumed = run(config(out / "resumed", resume=str(out / "full" / "checkpoints" / "step_000002")))
    dist.destroy_process_group()
    a, b = full["losses"][2], resumed["losses"][2]
    ok = abs(a - b) <= 1e-5 * abs(a) and full["start_step"] == 0 and resumed["start_step"] == 2
    print(json.dumps({"ok": ok, "backend": "nccl", "losses": full["losses"], "resumed_step3": b,
                      "peak_mem_mb": torch.cuda.max_memory_allocated() / 2**20, "tokens_per_s": full["tokens_per_s"]}))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
