#!/usr/bin/env bash
# scripts/hf_example.sh with an architecture FlexSP does not re-implement: a local tiny random
# Qwen3-MoE (routed experts, q/k norms) trains HF-native -- transformers' own modules with FlexSP's
# attention (Ulysses/ring over the SP groups) and loss -- on 2 CPU ranks, then flexsp-export writes
# transformers' save_pretrained files, which AutoModelForCausalLM loads and generates from.
# No downloads. The first log line says the model trains HF-native and why (not a native family);
# model.hf_native=true would force the same path for a Llama/Mistral/Qwen2/Qwen3 checkpoint.
set -euo pipefail
cd "$(dirname "$0")/.."
[ "${SKIP_SETUP:-0}" = 1 ] || bash scripts/setup.sh
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
EX=${OUT:-outputs/hf_native_example}
.venv/bin/python scripts/make_tiny_hf.py "$EX" --arch qwen3_moe
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
