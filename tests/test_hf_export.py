"""flexsp-export: a DCP training checkpoint (made here with dcp.save, no process group) -> an HF
directory that transformers loads with logits equal to ours; clear one-line errors (exit 2)."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from flexsp.export import main  # noqa: E402
from flexsp.model import AttnContext, Transformer, model_config, positions_from_cu_seqlens  # noqa: E402

TOL = dict(rtol=1e-4, atol=1e-4)  # fp32 both sides, different summation order (see test_hf_parity)


def _tokenizer_json(path: Path) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel()
    tok.train_from_iterator(
        ["some text for a tiny tokenizer"] * 10,
        trainers.BpeTrainer(vocab_size=100, special_tokens=["<unk>", "<|endoftext|>"]),
    )
    tok.save(str(path))
    return path


def make_checkpoint(
    root: Path, model: Transformer, step: int = 7, tokenizer=None, hf_checkpoint=None, precision=None
) -> Path:
    """A trainer-style step_N checkpoint: dcp/ with {"model", "optim"} and trainer.pt (``precision``:
    the train.precision it records, None: none, as older checkpoints)."""
    import torch.distributed.checkpoint as dcp

    d = root / f"step_{step:06d}"
    d.mkdir(parents=True)
    state = {
        "model": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "optim": {"state": {"exp_avg": torch.randn(5)}, "param_groups": [{"lr": 1e-3}]},
    }
    dcp.save(state, checkpoint_id=str(d / "dcp"), no_dist=True)
    torch.save(
        {
            "step": step,
            "config": {"model": {"preset": "tiny", "hf_checkpoint": hf_checkpoint}},
            "model_config": dataclasses.asdict(model.config),
            "tokenizer": None if tokenizer is None else str(tokenizer),
            **({"precision": precision} if precision else {}),
        },
        d / "trainer.pt",
    )
    (root / "latest").write_text(d.name)
    return d


def _trained_model(**kw) -> Transformer:
    model = Transformer(model_config("tiny", vocab_size=100, **kw))
    model.init_weights(11)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith(("norm.weight", ".bias")):
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def _logits_equal(model, out_dir):
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(out_dir), dtype=torch.float32)
    ids = torch.randint(0, model.config.vocab_size, (19,), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = hf(input_ids=ids[None]).logits[0]
        ours = model(ids, positions_from_cu_seqlens([0, 19]), AttnContext.local([0, 19]))
    torch.testing.assert_close(ours, ref, **TOL)
    return hf


def test_export_dcp_checkpoint_loads_in_transformers(tmp_path, capsys):
    model = _trained_model()
    tok = _tokenizer_json(tmp_path / "tokenizer.json")
    ckpt = make_checkpoint(tmp_path / "checkpoints", model, tokenizer=tok)
    out = tmp_path / "hf"
    assert main([str(ckpt), str(out), "--dtype", "fp32"]) == 0
    assert "exported" in capsys.readouterr().err
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["torch_dtype"] == "float32"
    _logits_equal(model, out)
    assert transformers.AutoTokenizer.from_pretrained(str(out)).eos_token == "<|endoftext|>"
    # the checkpoints root (its `latest`) works too; bf16 on request, sharded on request
    out16 = tmp_path / "hf16"
    assert (
        main([str(tmp_path / "checkpoints"), str(out16), "--max-shard-size", "40000", "--dtype", "bf16"]) == 0
    )
    assert (out16 / "model.safetensors.index.json").is_file()
    hf16 = transformers.AutoModelForCausalLM.from_pretrained(str(out16))
    assert next(hf16.parameters()).dtype == torch.bfloat16


def test_export_writes_the_trained_dtype_by_default(tmp_path, capsys):
    """Without --dtype the weights keep the dtype the model was trained in, and the command says
    which: fp32 training -> fp32 weights equal to the trained ones bit for bit (a bf16 default
    changed the argmax of ~2% of tokens); bf16 mixed precision -> bf16; no record -> fp32."""
    from safetensors.torch import load_file

    from flexsp.model.hf import from_hf

    model = _trained_model()
    fp32 = make_checkpoint(tmp_path / "fp32", model, precision="fp32")
    assert main([str(fp32), str(tmp_path / "out32")]) == 0
    assert "weights in float32 (trained with train.precision=fp32)" in capsys.readouterr().err
    assert json.loads((tmp_path / "out32" / "config.json").read_text())["torch_dtype"] == "float32"
    assert {t.dtype for t in load_file(tmp_path / "out32" / "model.safetensors").values()} == {torch.float32}
    exported = from_hf(tmp_path / "out32", dtype=torch.float32).state_dict()
    trained = model.state_dict()
    assert exported.keys() == trained.keys()
    for name, tensor in trained.items():
        torch.testing.assert_close(exported[name], tensor, rtol=0, atol=0, msg=name)  # exact: no rounding
    bf16 = make_checkpoint(tmp_path / "bf16", model, precision="bf16")
    assert main([str(bf16), str(tmp_path / "out16")]) == 0
    assert "weights in bfloat16 (trained with train.precision=bf16)" in capsys.readouterr().err
    assert {t.dtype for t in load_file(tmp_path / "out16" / "model.safetensors").values()} == {torch.bfloat16}
    old = make_checkpoint(tmp_path / "old", model)
    assert main([str(old), str(tmp_path / "out_old")]) == 0
    assert "weights in float32 (the checkpoint records no train.precision)" in capsys.readouterr().err
    # --help says what the default is
    proc = subprocess.run(
        [sys.executable, "-m", "flexsp.export", "--help"], capture_output=True, text=True, timeout=120
    )
    assert "the dtype the model was trained in" in " ".join(proc.stdout.split())


def test_export_keeps_hf_origin_architecture_and_qwen3_default(tmp_path):
    from flexsp.model.hf import from_hf

    origin = tmp_path / "origin"
    hfm = transformers.Qwen2ForCausalLM(
        transformers.Qwen2Config(
            vocab_size=100,
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=96,
        )
    )
    hfm.save_pretrained(str(origin))
    model = from_hf(origin, dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)  # "training"
    ckpt = make_checkpoint(tmp_path / "a", model, hf_checkpoint=str(origin))
    assert main([str(ckpt), str(tmp_path / "out"), "--dtype", "fp32"]) == 0
    assert json.loads((tmp_path / "out" / "config.json").read_text())["architectures"] == ["Qwen2ForCausalLM"]
    _logits_equal(model, tmp_path / "out")
    # from scratch with q/k norms -> Qwen3; asking for LLaMA is a clear error
    q3 = _trained_model(qk_norm=True, head_dim=24)
    ck3 = make_checkpoint(tmp_path / "b", q3)
    assert main([str(ck3), str(tmp_path / "q3"), "--dtype", "fp32"]) == 0
    assert json.loads((tmp_path / "q3" / "config.json").read_text())["architectures"] == ["Qwen3ForCausalLM"]
    _logits_equal(q3, tmp_path / "q3")
    assert main([str(ck3), str(tmp_path / "bad"), "--architecture", "LlamaForCausalLM"]) == 2


def test_export_errors_are_one_line_exit_2(tmp_path, capsys):
    model = _trained_model()
    ckpt = make_checkpoint(tmp_path / "c", model)

    def err(argv):
        assert main(argv) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("flexsp-export: error:"), lines
        return lines[0]

    assert "does not exist" in err([str(tmp_path / "nope"), str(tmp_path / "o")])
    (tmp_path / "empty").mkdir()
    assert "trainer.pt" in err([str(tmp_path / "empty"), str(tmp_path / "o")])
    shard = sorted((ckpt / "dcp").glob("*.distcp"))[0]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 3])
    line = err([str(ckpt), str(tmp_path / "o")])
    assert shard.name in line and "truncated" in line
    shard.unlink()
    assert shard.name in err([str(ckpt), str(tmp_path / "o")])
    # as a process: exit status 2, no traceback
    proc = subprocess.run(
        [sys.executable, "-m", "flexsp.export", str(ckpt), str(tmp_path / "o")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and shard.name in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def _ds_body(rank, world_size, root):
    import deepspeed

    model = _trained_model(tie_embeddings=True)
    config = {
        "train_micro_batch_size_per_gpu": 1,
        "train_batch_size": world_size,
        "zero_optimization": {
            "stage": 3,
            "stage3_param_persistence_threshold": 0,
            "stage3_model_persistence_threshold": 0,
        },
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**12,
    }
    deepspeed.init_distributed(dist_backend="gloo")
    engine, *_ = deepspeed.initialize(
        model=model,
        model_parameters=list(model.parameters()),
        optimizer=lambda ps: torch.optim.AdamW(ps, lr=1e-3),
        config=config,
        dist_init_required=False,
    )
    step = Path(root) / "step_000003"
    engine.save_checkpoint(str(step / "deepspeed"), tag="engine", save_latest=False)
    if rank == 0:
        torch.save(
            {
                "step": 3,
                "config": {"model": {"preset": "tiny", "hf_checkpoint": None}},
                "model_config": dataclasses.asdict(model.config),
                "tokenizer": None,
            },
            step / "trainer.pt",
        )
    return True


@pytest.mark.slow
def test_export_deepspeed_zero3_checkpoint(tmp_path):
    pytest.importorskip("deepspeed")
    from dist_harness import run_distributed

    run_distributed(_ds_body, world_size=2, args=(str(tmp_path),), timeout=300, env={"DS_ACCELERATOR": "cpu"})
    assert main([str(tmp_path / "step_000003"), str(tmp_path / "hf"), "--dtype", "fp32"]) == 0
    _logits_equal(_trained_model(tie_embeddings=True), tmp_path / "hf")
