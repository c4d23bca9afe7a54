#!/usr/bin/env bash
# The README main job: set everything up, then train a tiny LLaMA on 4 gloo CPU ranks on a real
# corpus (CPython standard library sources, BPE-tokenized once and cached), printing each step's
# SP plan and a falling loss. A few minutes on a laptop-class CPU.
#
#   scripts/demo.sh                  # 25 steps into outputs/demo (a fresh run each time)
#   STEPS=60 scripts/demo.sh model=small
#
# The cost model (configs/costmodels/cpu-demo-1k.json) gives every rank room for 1024 tokens, so
# documents of up to 4096 tokens need SP groups of 1, 2 or 4 ranks: the planner mixes them per
# micro-batch (e.g. "4 mb: 1x4 | 1x4 | 2x2 | 1x2 + 1x1"). Output: per-step lines on rank 0, a progress bar,
# outputs/demo/metrics.jsonl, config.yaml and checkpoints/.
set -euo pipefail
cd "$(dirname "$0")/.."
[ "${SKIP_SETUP:-0}" = 1 ] || bash scripts/setup.sh
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec .venv/bin/torchrun --standalone --nproc_per_node 4 -m flexsp.train \
    data=stdlib data.stdlib_max_files=60 data.corpus.max_doc_tokens=4096 data.corpus.vocab_size=2048 \
    solver.cost_model=configs/costmodels/cpu-demo-1k.json \
    train.steps="${STEPS:-25}" train.global_batch=6 train.lr=5e-3 train.warmup_steps=3 \
    train.checkpoint_every=10 train.resume=never output_dir="${OUT:-outputs/demo}" "$@"
