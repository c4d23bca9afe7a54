"""Make a local stand-in for "your Hugging Face model + your dataset" (no downloads): a tiny random
Llama-3-style checkpoint (LlamaForCausalLM, GQA, llama3 RoPE scaling, sharded safetensors) with its
own byte-level BPE tokenizer, and a JSONL dataset of CPython standard-library sources.

    python scripts/make_tiny_hf.py outputs/hf_example    # -> model/ and data.jsonl in that folder
    python scripts/make_tiny_hf.py outputs/moe --arch qwen3_moe   # a Qwen3-MoE instead (4 experts,
                                                                  # top-2): not a native family, it
                                                                  # trains HF-native

The model has the shape of the `tiny` preset (2 layers, hidden 64, 4 heads, 2 KV heads), so the
`cpu-gloo-tiny` cost model matches it; a real checkpoint needs a cost model profiled for its shape
(flexsp-profile).
"""
import json
import sys
from pathlib import Path


ARCHS = ("llama", "qwen3_moe")


def main(argv: list[str]) -> int:
    import argparse
    ap = argparse.ArgumentParser(prog="make_tiny_hf.py")
    ap.add_argument("out_dir")
    ap.add_argument("--arch", default="llama", choices=ARCHS,
                    help="llama (native path) | qwen3_moe (HF-native)")
    args = ap.parse_args(argv)
    import torch
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from flexsp.data.stdlib import stdlib_files
    out = Path(args.out_dir)
    (out / "model").mkdir(parents=True, exist_ok=True)
    texts = [f.read_text(errors="replace") for f in stdlib_files(max_files=80, seed=0, max_file_bytes=60_000)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=1024, special_tokens=["<|end_of_text|>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|end_of_text|>")
    fast.save_pretrained(out / "model")
    if args.arch == "llama":
        cfg = transformers.LlamaConfig(
            vocab_size=len(fast), hidden_size=64, intermediate_size=192, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=8192, rms_norm_eps=1e-5,
            tie_word_embeddings=False, rope_theta=500000.0, eos_token_id=fast.eos_token_id,
            rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                          "high_freq_factor": 4.0, "original_max_position_embeddings": 1024})
    else:   # same attention shape (the cpu-gloo-tiny cost model fits), routed experts in the MLP
        cfg = transformers.Qwen3MoeConfig(
            vocab_size=len(fast), hidden_size=64, intermediate_size=192, moe_intermediate_size=48,
            num_experts=4, num_experts_per_tok=2, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, max_position_embeddings=8192, tie_word_embeddings=False,
            eos_token_id=fast.eos_token_id, bos_token_id=None, pad_token_id=None)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    model.save_pretrained(out / "model", max_shard_size="200KB")
    with open(out / "data.jsonl", "w") as fh:
        for t in texts:
            fh.write(json.dumps({"text": t}) + "\n")
    print(f"wrote {out / 'model'} ({type(model).__name__}, {len(fast)} tokens) and {out / 'data.jsonl'} "
          f"({len(texts)} documents)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
