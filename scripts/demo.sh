#!/usr/bin/env bash
# The README main job: set everything up, then train a tiny LLaMA on 4 gloo CPU ranks on a real,
# long-tailed corpus (the CPython standard library sources, BPE-tokenized once and cached), printing
# each step's SP plan and the loss -- first with FlexSP's adaptive plans, then with static SP=4
# (DeepSpeed-Ulysses-like) on exactly the same batches -- and end with one line comparing the two
# runs' measured tokens/s (the losses are the same: only the parallelisation differs).
#
#   scripts/demo.sh                    # 20 steps each into outputs/demo/{adaptive,static}
#   STEPS=40 scripts/demo.sh model=small
#
# Cost model: configs/costmodels/cpu-demo-2k.json, measured on this kind of machine
# (benchmarks/results/profile_cpu4.json) with room for 2048 tokens per rank, so documents of up to
# 8192 tokens need SP groups of 1, 2 or 4 ranks and the planner mixes them per micro-batch (e.g.
# "2 mb: 1x4 | 2x2"). Output per run: one line per step on rank 0, metrics.jsonl, config.yaml,
# checkpoints/ and summary.json. A few minutes on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
[ "${SKIP_SETUP:-0}" = 1 ] || bash scripts/setup.sh
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
OUT=${OUT:-outputs/demo}
COMMON=(data=stdlib data.stdlib_max_files=200 data.corpus.max_doc_tokens=8192 data.corpus.vocab_size=2048
        data.sampler.global_batch_tokens=16384 train.global_batch=64
        solver.cost_model=configs/costmodels/cpu-demo-2k.json
        train.steps="${STEPS:-20}" train.lr=5e-3 train.warmup_steps=3 train.checkpoint_every=10 train.resume=never)
echo "== FlexSP adaptive SP (plans mix SP degrees per micro-batch)"
.venv/bin/flexsp-train --nproc-per-node 4 "${COMMON[@]}" output_dir="$OUT/adaptive" "$@"
echo "== static SP=4 on the same batches"
.venv/bin/flexsp-train --nproc-per-node 4 "${COMMON[@]}" parallel=static output_dir="$OUT/static" "$@"
exec .venv/bin/python scripts/compare_runs.py "$OUT/adaptive" "$OUT/static"
