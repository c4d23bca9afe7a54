#!/usr/bin/env bash
# The README's worked example, runnable without downloads: a local Hugging Face model directory +
# a local dataset -> a few FlexSP steps on 2 CPU ranks -> export -> load in transformers, generate.
# With your own model and data, skip make_tiny_hf.py and point model.hf_checkpoint / data.hf_path
# at them (and solver.cost_model at a cost model profiled for your model: flexsp-profile).
set -euo pipefail
cd "$(dirname "$0")/.."
[ "${SKIP_SETUP:-0}" = 1 ] || bash scripts/setup.sh
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
EX=${OUT:-outputs/hf_example}
.venv/bin/python scripts/make_tiny_hf.py "$EX"
.venv/bin/flexsp-train --nproc-per-node 2 model.hf_checkpoint="$EX/model" \
    data=hf data.hf_path="[$EX/data.jsonl]" data.corpus.max_doc_tokens=4096 \
    solver.cost_model=cpu-gloo-tiny train.steps=4 train.global_batch=8 train.lr=1e-3 \
    train.resume=never output_dir="$EX/run"
.venv/bin/flexsp-export "$EX/run/checkpoints" "$EX/exported"
.venv/bin/python - "$EX/exported" <<'PY'
import sys
from transformers import AutoModelForCausalLM, AutoTokenizer
path = sys.argv[1]
tok, model = AutoTokenizer.from_pretrained(path), AutoModelForCausalLM.from_pretrained(path)
ids = tok("def main(", return_tensors="pt")
out = model.generate(**ids, max_new_tokens=8, do_sample=False)
print(f"transformers loaded {path} ({type(model).__name__}); generated: {tok.decode(out[0])!r}")
PY
