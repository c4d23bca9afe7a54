"""HF-native models (flexsp.model.hf_native): transformers' modules with FlexSP's attention and loss.

Every model is a tiny random ``from_config`` model (weights perturbed so norms and biases are not
trivially 1 / 0) saved locally with ``save_pretrained``; nothing is downloaded.

Parity reference: transformers' eager implementation running EACH DOCUMENT ALONE (batch of one,
positions 0..n-1); its loss and gradients are the sums over the documents. That is what one packed
row with per-document positions and document-causal attention must give. Gemma 3's first layer
slides a window of 8 over documents of up to 40 tokens (so the window is exercised), with
``query_pre_attn_scalar`` != head_dim; Phi-3 has fused qkv/gate_up and partial rotary; OLMo 2
q/k norms over all heads and post-norms; Qwen3-MoE routed experts stored per expert on disk and
fused in v5's modules (the weight source applies transformers' conversion); Granite's logit, embedding,
residual and attention multipliers are honoured; Llama runs through the HF-native path too.

Tolerances: fp32 on both sides, the same modules, only attention (our varlen kernels vs eager
softmax per document) and the loss (our chunked linear cross-entropy vs a full logits CE) differ
in summation order. Measured (printed with -s): logits <= 9.5e-7, gradients <= 1.3e-5, summed
loss (~320 over 65 targets) <= 3.4e-5 absolute (1.1e-7 relative). Asserted: logits and gradients
within 1e-4 absolute + 1e-4 relative, loss within 1e-6 relative: about 10x the rounding, far below
what a missed window, scale, norm or expert causes (O(0.1-1) logit differences). 2-rank
Ulysses/ring against one process: the same bounds (sums over 2 ranks in another order); measured
logits <= 1.1e-6, gradients <= 8.2e-6, loss <= 1.7e-7 relative.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

from flexsp.model import AttnContext, lm_labels, positions_from_cu_seqlens  # noqa: E402

TOL = dict(rtol=1e-4, atol=1e-4)
BASE = dict(
    vocab_size=128,
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=96,
    max_position_embeddings=64,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)
LENGTHS = [5, 23, 40]
CASES = {
    "gemma3-window": (
        "Gemma3TextConfig",
        dict(
            head_dim=16,
            sliding_window=8,
            query_pre_attn_scalar=24,
            layer_types=["sliding_attention", "full_attention"],
        ),
    ),
    "phi3-partial-rope": ("Phi3Config", dict(partial_rotary_factor=0.5)),
    "olmo2": ("Olmo2Config", {}),
    "qwen3-moe": (
        "Qwen3MoeConfig",
        dict(moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2, head_dim=16),
    ),
    "llama": ("LlamaConfig", {}),
    "granite-multipliers": (
        "GraniteConfig",
        dict(logits_scaling=4.0, embedding_multiplier=2.0, residual_multiplier=0.5, attention_multiplier=0.2),
    ),
}


def make_hf(case: str, path, seed: int = 0, **kw):
    """A saved tiny random model of ``case``; returns transformers' eager model (fp32, eval)."""
    cls, extra = CASES[case]
    cfg = getattr(transformers, cls)(**{**BASE, **extra, **kw})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(copy.deepcopy(cfg), attn_implementation="eager")
    model = model.float()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(str(path))
    return model.eval()


def _docs(lengths, vocab=128, seed=1):
    g = torch.Generator().manual_seed(seed)
    docs = [torch.randint(3, vocab, (n,), generator=g) for n in lengths]
    cu = [0]
    for d in docs:
        cu.append(cu[-1] + len(d))
    return docs, torch.cat(docs), cu


def hf_reference(hf, docs):
    """transformers' logits (concatenated), summed loss and gradients, each document alone."""
    hf.zero_grad(set_to_none=True)
    logits, total = [], 0.0
    for d in docs:
        out = hf(input_ids=d[None]).logits[0]
        loss = F.cross_entropy(out[:-1].float(), d[1:], reduction="sum")
        loss.backward()
        total += loss.item()
        logits.append(out.detach())
    grads = {n: p.grad.clone() for n, p in hf.named_parameters() if p.grad is not None}
    hf.zero_grad(set_to_none=True)
    return torch.cat(logits), total, grads


def compare(model, hf, lengths, label=""):
    docs, ids, cu = _docs(lengths)
    ref_logits, ref_loss, ref_grads = hf_reference(hf, docs)
    model.zero_grad(set_to_none=True)
    ctx, pos = AttnContext.local(cu), positions_from_cu_seqlens(cu)
    loss, count = model(ids, pos, ctx, labels=lm_labels(ids, cu))
    loss.backward()
    with torch.no_grad():
        logits = model(ids, pos, ctx)
    assert int(count) == sum(n - 1 for n in lengths)
    torch.testing.assert_close(logits, ref_logits, **TOL)
    assert abs(loss.item() - ref_loss) <= 1e-6 * abs(ref_loss), (loss.item(), ref_loss)
    grads = dict(model.named_parameters())
    assert set(grads) == set(ref_grads)  # transformers' names, every parameter trained
    gerr = 0.0
    for name, p in grads.items():
        torch.testing.assert_close(p.grad, ref_grads[name], **TOL, msg=lambda m: f"{name}: {m}")
        gerr = max(gerr, (p.grad - ref_grads[name]).abs().max().item())
    print(
        f"hf-native parity {label} {lengths}: logits {(logits - ref_logits).abs().max().item():.1e} "
        f"loss {abs(loss.item() - ref_loss):.1e} grads {gerr:.1e}"
    )


@pytest.mark.parametrize("case", list(CASES))
def test_parity_with_transformers(case, tmp_path):
    from flexsp.model.hf import from_hf
    from flexsp.model.hf_native import HFNativeModel

    hf = make_hf(case, tmp_path)
    model = from_hf(tmp_path, dtype=torch.float32, hf_native=True)
    assert isinstance(model, HFNativeModel)
    compare(model, hf, LENGTHS, case)
    compare(model, hf, [33], case)  # a single document
    if case == "gemma3-window":
        assert model.lm_head.weight is model.input_embedding().weight  # tied, once
    if case == "llama":  # the native path of the same checkpoint agrees
        native = from_hf(tmp_path, dtype=torch.float32)
        assert type(native).__name__ == "Transformer"
        _, ids, cu = _docs(LENGTHS)
        with torch.no_grad():
            args = (ids, positions_from_cu_seqlens(cu), AttnContext.local(cu))
            torch.testing.assert_close(model(*args), native(*args), **TOL)


def test_automatic_routing_and_export_roundtrip(tmp_path):
    """from_hf picks HF-native for an architecture the native path lacks; save_hf_native writes
    save_pretrained files that reload bit-exact (tied Gemma 3, and Qwen3-MoE whose fused experts
    are written back per expert by transformers)."""
    from flexsp.model.hf import from_hf
    from flexsp.model.hf_native import HFNativeModel
    from flexsp.model.hf_native_weights import save_hf_native

    for case in ("gemma3-window", "qwen3-moe"):
        make_hf(case, tmp_path / case)
        model = from_hf(tmp_path / case, dtype=torch.float32)  # automatic
        assert isinstance(model, HFNativeModel)
        out = save_hf_native(model.config, model.state_dict(), tmp_path / f"{case}-out", dtype=torch.float32)
        back = transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
        sd = back.state_dict()
        for name, p in model.named_parameters():
            assert torch.equal(sd[name], p.detach()), name


# ------------------------------------------------------------------ refusals: one line naming field/module
REFUSED = {
    "lfm2-conv-layers": (
        "Lfm2Config",
        dict(num_hidden_layers=2, layer_types=["conv", "full_attention"]),
        r"layer_types\[0\]='conv'",
    ),
    "falcon-mamba-mixer": (
        "FalconMambaConfig",
        dict(num_hidden_layers=1, hidden_size=32, state_size=4, vocab_size=64),
        r"module backbone\.layers\.0\.mixer",
    ),
    "gemma3-final-softcap": (
        "Gemma3TextConfig",
        dict(BASE, head_dim=16, final_logit_softcapping=30.0),
        r"final_logit_softcapping=30\.0",
    ),
    "gemma2-attn-softcap": (
        "Gemma2Config",
        dict(BASE, head_dim=16, final_logit_softcapping=None),
        r"attn_logit_softcapping=50\.0",
    ),
    "phi3-longrope": (
        "Phi3Config",
        dict(
            BASE,
            rope_parameters={
                "rope_type": "longrope",
                "rope_theta": 1e4,
                "short_factor": [1.0] * 8,
                "long_factor": [2.0] * 8,
                "original_max_position_embeddings": 32,
            },
        ),
        r"rope_type'\]='longrope'",
    ),
    "qwen3-moe-router-loss": (
        "Qwen3MoeConfig",
        dict(BASE, num_experts=4, num_experts_per_tok=2, output_router_logits=True),
        r"output_router_logits=True",
    ),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_refusals_name_the_module_or_field(case, tmp_path):
    from flexsp.model.hf_native import hf_native_config

    cls, kw, pattern = REFUSED[case]
    getattr(transformers, cls)(**kw).save_pretrained(str(tmp_path))
    with pytest.raises(ValueError, match=pattern) as e:
        hf_native_config(tmp_path)
    assert "\n" not in str(e.value) and "cannot train HF-native" in str(e.value)


def test_trainer_config_refusals(tmp_path):
    from train_cases import compose

    from flexsp.modelspec import hf_native_reason
    from flexsp.train import validate

    transformers.Lfm2Config(**REFUSED["lfm2-conv-layers"][1]).save_pretrained(str(tmp_path / "lfm2"))
    out = f"output_dir={tmp_path / 'o'}"
    with pytest.raises(ValueError, match="layer_types.*conv"):
        validate(compose([f"model.hf_checkpoint={tmp_path / 'lfm2'}", out]))
    with pytest.raises(ValueError, match="model.hf_native=true needs model.hf_checkpoint"):
        compose(["model.hf_native=true", f"output_dir={tmp_path / 'o'}"])
    make_hf("olmo2", tmp_path / "olmo2")
    c = compose([f"model.hf_checkpoint={tmp_path / 'olmo2'}", f"output_dir={tmp_path / 'o'}"])
    assert "does not cover it" in hf_native_reason(c.model) and "Olmo2ForCausalLM" in hf_native_reason(
        c.model
    )


# ------------------------------------------------------------------ SP (2 gloo ranks) equals one process
def _sp_body(rank, world_size, paths):
    import torch.distributed as dist

    from flexsp.attention import unshard
    from flexsp.model import shard_inputs
    from flexsp.model.hf import from_hf

    out = {}
    _, ids, cu = _docs([9, 26, 5])
    cu_t = torch.tensor(cu)
    for name, path in paths.items():
        ref = from_hf(path, dtype=torch.float32, hf_native=True)
        ref_inputs = shard_inputs(ids, cu_t)
        ref_sum, _ = ref_inputs.loss(ref)
        ref_sum.backward()
        with torch.no_grad():
            ref_logits = ref_inputs.logits(ref)
        window = name.startswith("gemma3")
        for mode in ("ulysses",) if window else ("ulysses", "ring"):
            model = from_hf(path, dtype=torch.float32, hf_native=True)
            inputs = shard_inputs(ids, cu_t, dist.group.WORLD, mode)
            loss_sum, _ = inputs.loss(model)
            loss_sum.backward()
            tot = loss_sum.detach().clone()
            dist.all_reduce(tot)
            gerr = 0.0
            for (_, p), (_, rp) in zip(model.named_parameters(), ref.named_parameters()):
                g = p.grad.clone()
                dist.all_reduce(g)
                gerr = max(gerr, (g - rp.grad).abs().max().item())
            with torch.no_grad():
                logits = unshard(inputs.logits(model), inputs.attn_ctx.meta, dist.group.WORLD)
            out[f"{name}/{mode}"] = dict(
                loss=abs(tot.item() - ref_sum.item()) / abs(ref_sum.item()),
                grad=gerr,
                logits=(logits - ref_logits).abs().max().item(),
            )
        if window:  # window 8 < document 26: ring refuses in one line; documents within the window run
            try:
                shard_inputs(ids, cu_t, dist.group.WORLD, "ring").logits(model)
                out["ring-error"] = None
            except ValueError as exc:
                out["ring-error"] = str(exc)
            short = shard_inputs(ids[:13], torch.tensor([0, 8, 13]), dist.group.WORLD, "ring")
            with torch.no_grad():
                sl = unshard(short.logits(model), short.attn_ctx.meta, dist.group.WORLD)
                rl = shard_inputs(ids[:13], torch.tensor([0, 8, 13])).logits(ref)
            out[f"{name}/ring-short"] = dict(loss=0.0, grad=0.0, logits=(sl - rl).abs().max().item())
    return out


@pytest.mark.slow
def test_sp_two_ranks_equal_one_process(tmp_path):
    from dist_harness import run_distributed

    paths = {}
    for case in ("gemma3-window", "phi3-partial-rope", "olmo2", "qwen3-moe", "llama"):
        make_hf(case, tmp_path / case)
        paths[case] = str(tmp_path / case)
    results = run_distributed(_sp_body, world_size=2, args=(paths,), timeout=300)
    worst = {
        k: max(r[k] for res in results for key, r in res.items() if key != "ring-error")
        for k in ("loss", "grad", "logits")
    }
    print(f"hf-native 2 ranks vs 1 process, worst of {len(results[0]) - 1} cases: {worst}")
    for res in results:
        err = res.pop("ring-error")
        assert err is not None and "sliding_window=8" in err and "ulysses" in err and "\n" not in err
        assert len(res) == 2 + 2 * 4
        for key, r in res.items():
            assert r["loss"] < 1e-6 and r["grad"] < 1e-4 and r["logits"] < 1e-4, (key, r)


# ------------------------------------------------------------------ import -> train 2 ranks -> export
TEXTS = [("def f(x):\n    return x * %d\n" % i) * (1 + i % 7) for i in range(40)]


def make_moe_checkpoint(d: Path) -> Path:
    """A tiny random Qwen3-MoE (not covered by the native path) with a BPE tokenizer."""
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
    cfg = transformers.Qwen3MoeConfig(
        vocab_size=len(fast),
        hidden_size=64,
        intermediate_size=128,
        moe_intermediate_size=32,
        num_experts=4,
        num_experts_per_tok=2,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=512,
        eos_token_id=fast.eos_token_id,
        bos_token_id=None,
        pad_token_id=None,
    )
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(cfg).float().save_pretrained(d, max_shard_size="100KB")
    return d


def _train_body(rank, world, cfg):
    from flexsp.train import run

    s = run(cfg, return_state=True)
    return {
        "losses": s["losses"],
        "state": {k: v.numpy().copy() for k, v in s["state_dict"].items()} if rank == 0 else None,
    }


@pytest.mark.slow
def test_moe_imports_trains_on_two_ranks_exports_and_reloads(tmp_path):
    """Step 1's loss equals transformers' on the checkpoint (documents alone); the export is
    transformers' own format and from_pretrained gives exactly the trained fp32 weights."""
    from dataclasses import replace

    from dist_harness import run_distributed
    from train_cases import compose

    from flexsp.data import build_source
    from flexsp.export import main as export_main
    from solver.presets import load_preset

    ckpt = make_moe_checkpoint(tmp_path / "qwen3moe")
    assert len(list(ckpt.glob("model-*.safetensors"))) > 1
    (tmp_path / "train.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    replace(load_preset("cpu-gloo-tiny"), name="tiny-moe", capacity_override=512).save(tmp_path / "cm.json")
    out = tmp_path / "run"
    cfg = compose(
        [
            f"model.hf_checkpoint={ckpt}",
            "model.activation_checkpointing=true",
            "data=hf",
            f"data.hf_path=[{tmp_path / 'train.jsonl'}]",
            f"data.corpus.cache_dir={tmp_path / 'cache'}",
            "data.corpus.max_doc_tokens=400",
            "train.steps=2",
            "train.global_batch=6",
            "train.lr=1e-3",
            "train.warmup_steps=1",
            "train.progress=false",
            "train.checkpoint_every=0",
            f"solver.cost_model={tmp_path / 'cm.json'}",
            f"output_dir={out}",
        ]
    )
    results = run_distributed(_train_body, world_size=2, args=(cfg,), timeout=300)

    c = cfg
    source = build_source(replace(c.data, corpus=replace(c.data.corpus, tokenizer=str(ckpt))))
    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(ckpt), dtype=torch.float32)
    total, count = 0.0, 0
    with torch.no_grad():
        for i in rows[0]["doc_ids"]:
            ids = torch.as_tensor(source.tokens(int(i)).astype("int64"))[None]
            logits = hf(input_ids=ids).logits[0, :-1]
            total += float(F.cross_entropy(logits, ids[0, 1:], reduction="sum"))
            count += ids.shape[1] - 1
    # fp32; packed and sharded over 2 ranks, summed in another order: rounding only
    assert results[0]["losses"][0] == pytest.approx(total / count, rel=1e-5)
    assert results[1]["losses"] == results[0]["losses"]

    exported = tmp_path / "exported"
    assert export_main([str(out / "checkpoints"), str(exported)]) == 0  # trained fp32 -> fp32
    assert json.loads((exported / "config.json").read_text())["architectures"] == ["Qwen3MoeForCausalLM"]
    back = transformers.AutoModelForCausalLM.from_pretrained(str(exported), dtype=torch.float32)
    sd = back.state_dict()
    trained = results[0]["state"]
    assert set(trained) == set(sd)
    for name, value in trained.items():
        assert torch.equal(sd[name], torch.from_numpy(value)), name
    experts = "model.layers.0.mlp.experts.gate_up_proj"
    assert not torch.equal(sd[experts], hf.state_dict()[experts]), "training changed nothing"
    tok = transformers.AutoTokenizer.from_pretrained(str(exported))
    assert tok.eos_token == "<|endoftext|>"
