#!/usr/bin/env bash
# Supervised fine-tuning on conversations, runnable without downloads: a tiny random Llama checkpoint
# with a ChatML chat template (made here) + a JSONL of synthetic multi-turn conversations -> a few
# FlexSP steps on 2 CPU ranks, loss on the assistant turns only -> export -> transformers chats.
# With your own model and data, skip the first step and point model.hf_checkpoint / data.sft_path at
# them (and solver.cost_model at a cost model profiled for your model: flexsp-profile).
set -euo pipefail
cd "$(dirname "$0")/.."
[ "${SKIP_SETUP:-0}" = 1 ] || bash scripts/setup.sh
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
EX=${OUT:-outputs/sft_example}
mkdir -p "$EX"

# 1. a local "instruct model": random LlamaForCausalLM of the `tiny` preset's shape (so the
#    cpu-gloo-tiny cost model matches), a byte-level BPE with <|im_start|>/<|im_end|>, and the
#    ChatML template Qwen2 ships (no {% generation %} markers: FlexSP finds the assistant turns by
#    rendering prefixes); and 200 conversations, a few longer than data.corpus.max_doc_tokens below.
.venv/bin/python - "$EX" <<'PY'
import json, random, sys
from pathlib import Path
import torch, transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
out = Path(sys.argv[1])
rng = random.Random(0)
def conversation(i):
    msgs = [{"role": "system", "content": "You are a careful calculator."}]
    for _ in range(60 if i % 50 == 0 else rng.randint(1, 4)):   # every 50th one is very long
        a, b = rng.randint(1, 999), rng.randint(1, 999)
        msgs += [{"role": "user", "content": f"What is {a} + {b}?"},
                 {"role": "assistant", "content": f"{a} + {b} = {a + b}."}]
    return {"messages": msgs}
rows = [conversation(i) for i in range(200)]
(out / "chats.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
tok = Tokenizer(models.BPE())
tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
tok.decoder = decoders.ByteLevel()
texts = [m["content"] for r in rows for m in r["messages"]] + ["system user assistant"]
trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=["<|im_start|>", "<|im_end|>"],
                              show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
tok.train_from_iterator(texts, trainer)
fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>",
                                            pad_token="<|im_end|>")
fast.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                      "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
fast.save_pretrained(out / "model")
cfg = transformers.LlamaConfig(vocab_size=len(fast), hidden_size=64, intermediate_size=192,
                               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                               max_position_embeddings=8192, tie_word_embeddings=False,
                               eos_token_id=fast.eos_token_id)
torch.manual_seed(0)
transformers.LlamaForCausalLM(cfg).save_pretrained(out / "model")
print(f"wrote {out / 'model'} (LlamaForCausalLM, {len(fast)} tokens, ChatML template) and "
      f"{out / 'chats.jsonl'} ({len(rows)} conversations)")
PY

# 2. train: conversations are packed as documents and planned like any other; the log says how many
#    were dropped for length (data.truncate=true cuts them instead) and which mask method is used
.venv/bin/flexsp-train --nproc-per-node 2 model.hf_checkpoint="$EX/model" \
    data=sft data.sft_path="[$EX/chats.jsonl]" data.corpus.max_doc_tokens=1024 \
    data.corpus.cache_dir="$EX/cache" solver.cost_model=cpu-gloo-tiny \
    train.steps=6 train.global_batch=16 train.lr=2e-3 train.resume=never output_dir="$EX/run"

# 3. export and chat with it in transformers
.venv/bin/flexsp-export "$EX/run/checkpoints" "$EX/exported"
.venv/bin/python - "$EX/exported" <<'PY'
import sys
from transformers import AutoModelForCausalLM, AutoTokenizer
path = sys.argv[1]
tok, model = AutoTokenizer.from_pretrained(path), AutoModelForCausalLM.from_pretrained(path)
chat = [{"role": "user", "content": "What is 12 + 30?"}]
ids = tok.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt", return_dict=True)
out = model.generate(**ids, max_new_tokens=12, do_sample=False)
print(f"transformers loaded {path} ({type(model).__name__}); reply after 6 steps: "
      f"{tok.decode(out[0, ids['input_ids'].shape[1]:])!r}")
PY
