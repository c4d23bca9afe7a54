"""Bring your own model and data, end to end: a local Hugging Face checkpoint (a tiny random
Qwen3ForCausalLM made here: q/k norms, GQA, explicit head_dim, sharded safetensors, its own
tokenizer) + a local JSONL dataset read through ``datasets`` (data=hf, tokenized with the
checkpoint's tokenizer) -> 2 FlexSP training steps on 2 gloo ranks (meta init, each rank reading
only its own rows of the safetensors) -> ``flexsp-export`` -> ``transformers`` loads it.

Checked: step 1's loss equals the loss transformers computes with the original checkpoint on the
same documents (each document alone); the exported model's logits equal our final trained
weights'; the exported tokenizer loads and the model generates; TensorBoard got the scalars.

Tolerance: fp32 everywhere; ours packs the documents and sums the loss in another order
(sharded over 2 ranks), so step 1 differs by rounding: rtol 1e-5. Logits after export: both
sides fp32, rtol/atol 1e-4 (as tests/test_hf_parity.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from dist_harness import run_distributed
from train_cases import compose

transformers = pytest.importorskip("transformers")
pytest.importorskip("datasets")
pytestmark = pytest.mark.slow

TEXTS = [("def f(x):\n    return x * %d\n" % i) * (1 + i % 7) for i in range(40)]


def make_hf_checkpoint(d: Path) -> Path:
    """A tiny random Qwen3 with a BPE tokenizer, saved like a hub download (sharded)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        TEXTS,
        trainers.BpeTrainer(
            vocab_size=300,
            special_tokens=["<|endoftext|>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")
    fast.save_pretrained(d)
    cfg = transformers.Qwen3Config(
        vocab_size=len(fast),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        eos_token_id=fast.eos_token_id,
    )
    torch.manual_seed(0)
    model = transformers.Qwen3ForCausalLM(cfg).float()
    model.save_pretrained(d, max_shard_size="60KB")
    return d


def _body(rank, world, cfg):
    from flexsp.train import run

    s = run(cfg, return_state=True)
    return {
        "losses": s["losses"],
        "state": {k: v.numpy().copy() for k, v in s["state_dict"].items()} if rank == 0 else None,
    }


def _hf_loss(model_dir, source, doc_ids):
    """transformers' summed next-token loss over the documents (each alone) / their targets."""
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    total, count = 0.0, 0
    with torch.no_grad():
        for i in doc_ids:
            ids = torch.as_tensor(source.tokens(int(i)).astype("int64"))[None]
            logits = hf(input_ids=ids).logits[0, :-1].float()
            total += float(torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum"))
            count += ids.shape[1] - 1
    return total / count


def test_hf_checkpoint_trains_exports_and_reloads(tmp_path):
    from flexsp.data import build_source
    from flexsp.export import main as export_main
    from flexsp.model import AttnContext, Transformer, positions_from_cu_seqlens
    from flexsp.model.hf import config_from_hf
    from solver.presets import load_preset

    ckpt = make_hf_checkpoint(tmp_path / "qwen3")
    assert len(list(ckpt.glob("model-*.safetensors"))) > 1, "expected a sharded checkpoint"
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    # a cost model of this model's shape (2 layers, hidden 64, 4 heads, 2 kv heads), as a profile would write
    from dataclasses import replace

    cm = replace(load_preset("cpu-gloo-tiny"), name="tiny-qwen3", capacity_override=512)
    cm.save(tmp_path / "cm.json")
    out = tmp_path / "run"
    cfg = compose(
        [
            f"model.hf_checkpoint={ckpt}",
            "data=hf",
            f"data.hf_path=[{data / 'train.jsonl'}]",
            f"data.corpus.cache_dir={tmp_path / 'cache'}",
            "data.corpus.max_doc_tokens=400",
            "train.steps=2",
            "train.global_batch=6",
            "train.lr=1e-3",
            "train.warmup_steps=1",
            "train.progress=false",
            "train.checkpoint_every=0",
            "train.logger=tensorboard",
            f"solver.cost_model={tmp_path / 'cm.json'}",
            f"output_dir={out}",
        ]
    )
    results = run_distributed(_body, world_size=2, args=(cfg,), timeout=240)

    # step 1 trained the checkpoint's own weights, on its own tokenizer's tokens
    c = cfg
    source = build_source(replace(c.data, corpus=replace(c.data.corpus, tokenizer=str(ckpt))))
    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    ref = _hf_loss(ckpt, source, rows[0]["doc_ids"])
    assert results[0]["losses"][0] == pytest.approx(ref, rel=1e-5)
    assert results[1]["losses"] == results[0]["losses"]

    # export -> transformers: logits equal our final weights
    hf_out = tmp_path / "exported"
    assert export_main([str(out / "checkpoints"), str(hf_out), "--dtype", "fp32"]) == 0
    exported = json.loads((hf_out / "config.json").read_text())
    assert exported["architectures"] == ["Qwen3ForCausalLM"]
    ours = Transformer(config_from_hf(ckpt))
    ours.load_state_dict({k: torch.from_numpy(v) for k, v in results[0]["state"].items()})
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(hf_out), dtype=torch.float32)
    ids = torch.as_tensor(source.tokens(0).astype("int64"))[:50]
    with torch.no_grad():
        mine = ours(
            ids, positions_from_cu_seqlens(torch.tensor([0, len(ids)])), AttnContext.local([0, len(ids)])
        )
        theirs = hf(input_ids=ids[None]).logits[0]
    torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-4)
    before = transformers.AutoModelForCausalLM.from_pretrained(str(ckpt), dtype=torch.float32)
    assert not torch.allclose(before(input_ids=ids[None]).logits[0], theirs), "training changed nothing"

    tok = transformers.AutoTokenizer.from_pretrained(str(hf_out))
    prompt = tok("def f(x):", return_tensors="pt")
    gen = hf.generate(**prompt, max_new_tokens=5, do_sample=False)
    assert gen.shape[1] == prompt["input_ids"].shape[1] + 5 and isinstance(tok.decode(gen[0]), str)

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    loss = [e.value for e in acc.Scalars("train/loss")]
    assert loss == pytest.approx([rows[0]["loss"], rows[1]["loss"]], rel=1e-5)
