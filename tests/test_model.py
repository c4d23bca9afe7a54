"""Single-device tests of the decoder: shapes, per-document RoPE, GQA, tying, checkpointing, bf16."""

import pytest
import torch
import torch.nn.functional as F

from flexsp.model import (
    AttnContext,
    ModelConfig,
    Transformer,
    lm_labels,
    lm_loss,
    model_config,
    positions_from_cu_seqlens,
)
from flexsp.model import layers as L


def _packed(lengths, vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    docs = [torch.randint(0, vocab, (n,), generator=g) for n in lengths]
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist())
    return docs, torch.cat(docs), cu


def _run(model, ids, cu, **kw):
    return model(ids, positions_from_cu_seqlens(cu), AttnContext.local(cu), **kw)


def test_config_validation_and_presets():
    with pytest.raises(ValueError, match="kv_heads"):
        ModelConfig(heads=4, kv_heads=3)
    with pytest.raises(ValueError, match="dtype"):
        ModelConfig(dtype="float16")
    with pytest.raises(ValueError, match="valid options"):
        model_config("3b")
    with pytest.raises(ValueError, match="unknown ModelConfig fields"):
        model_config("tiny", hiden=3)
    # Published parameter counts (never instantiated).
    assert abs(model_config("7b").num_params() / 1e9 - 6.74) < 0.01
    assert abs(model_config("70b").num_params() / 1e9 - 68.98) < 0.01
    assert model_config("llama-1b").tie_embeddings
    cfg = model_config("tiny")
    assert sum(p.numel() for p in Transformer(cfg).parameters()) == cfg.num_params()


def test_positions_restart_per_document():
    cu = torch.tensor([0, 3, 3, 7])
    assert positions_from_cu_seqlens(cu).tolist() == [0, 1, 2, 0, 1, 2, 3]
    assert positions_from_cu_seqlens(cu, total=9).tolist()[-2:] == [0, 1]


def test_shapes_and_hidden():
    cfg = model_config("tiny")
    model = Transformer(cfg)
    _, ids, cu = _packed([5, 9, 2], cfg.vocab_size)
    assert _run(model, ids, cu).shape == (16, cfg.vocab_size)
    assert _run(model, ids, cu, return_hidden=True).shape == (16, cfg.hidden)
    with pytest.raises(ValueError, match="tokens"):
        model(ids[None], positions_from_cu_seqlens(cu)[None], AttnContext.local(cu))


def test_packed_equals_each_document_alone():
    cfg = model_config("tiny")
    model = Transformer(cfg)
    docs, ids, cu = _packed([7, 13, 4], cfg.vocab_size)
    packed = _run(model, ids, cu)
    alone = torch.cat([_run(model, d, torch.tensor([0, len(d)])) for d in docs])
    torch.testing.assert_close(packed, alone, rtol=1e-5, atol=1e-5)
    # Attention leaking across documents (one big document) changes documents 2 and 3.
    leak = model(ids, positions_from_cu_seqlens(cu), AttnContext.local(torch.tensor([0, len(ids)])))
    assert not torch.allclose(leak[7:], alone[7:], atol=1e-4)


def test_rope_positions_are_per_document():
    # RoPE scores depend on position differences only, so a document's logits must not depend on
    # how far into the buffer it sits; the angles themselves restart with the positions.
    cfg = model_config("tiny")
    cu = torch.tensor([0, 4, 9])
    cos, sin = L.rope_cos_sin(positions_from_cu_seqlens(cu), cfg.head_size, cfg.rope_theta, torch.float32)
    torch.testing.assert_close(cos[4:8], cos[0:4])
    torch.testing.assert_close(sin[4:8], sin[0:4])
    assert torch.equal(cos[0], torch.ones(cfg.head_size))


def test_deterministic_init():
    cfg = model_config("tiny")
    a, b = Transformer(cfg), Transformer(cfg)
    a.init_weights(1234)
    b.init_weights(1234)
    for (na, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(pa, pb), na
    b.init_weights(1)
    assert not torch.equal(a.embed.weight, b.embed.weight)


def test_gqa_matches_repeated_kv_attention():
    cfg = model_config("tiny", heads=4, kv_heads=2)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(10, 4, 16, generator=g)
    k, v = torch.randn(10, 2, 16, generator=g), torch.randn(10, 2, 16, generator=g)
    cu = torch.tensor([0, 6, 10])
    out = L.varlen_attention_ref(q, k, v, cu)
    kr, vr = k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1)
    for s, e in [(0, 6), (6, 10)]:
        ref = F.scaled_dot_product_attention(
            q[s:e].transpose(0, 1), kr[s:e].transpose(0, 1), vr[s:e].transpose(0, 1), is_causal=True
        ).transpose(0, 1)
        torch.testing.assert_close(out[s:e], ref)
    model = Transformer(cfg)
    assert model.blocks[0].attn.wk.weight.shape == (2 * cfg.head_size, cfg.hidden)
    mha = Transformer(model_config("tiny", kv_heads=4))
    assert mha.blocks[0].attn.wk.weight.shape == (cfg.hidden, cfg.hidden)


def test_tied_embeddings():
    model = Transformer(model_config("tiny", tie_embeddings=True))
    assert model.lm_head.weight is None and model.output_weight is model.embed.weight
    _, ids, cu = _packed([6, 6], model.config.vocab_size)
    loss, _ = _run(model, ids, cu, labels=lm_labels(ids, cu))
    loss.backward()
    assert model.embed.weight.grad is not None
    untied = Transformer(model_config("tiny"))
    assert untied.lm_head.weight is not None and untied.output_weight is not untied.embed.weight


def test_labels_and_loss_sum_count():
    ids = torch.tensor([10, 11, 12, 20, 21, 30])
    cu = torch.tensor([0, 3, 5, 6])
    assert lm_labels(ids, cu).tolist() == [11, 12, -100, 21, -100, -100]
    cfg = model_config("tiny")
    model = Transformer(cfg)
    labels = lm_labels(ids, cu)
    loss_sum, count = _run(model, ids, cu, labels=labels)
    assert count.item() == 3
    logits = _run(model, ids, cu).float()
    ref = F.cross_entropy(logits, labels, ignore_index=-100, reduction="sum")
    torch.testing.assert_close(loss_sum, ref)
    # Padding tokens are excluded even when they carry a label.
    pad = torch.tensor([False, True, False, False, False, False])
    s2, c2 = lm_loss(_run(model, ids, cu, return_hidden=True), model.output_weight, labels, pad)
    assert c2.item() == 2
    torch.testing.assert_close(s2, F.cross_entropy(logits[[0, 3]], labels[[0, 3]], reduction="sum"))


def test_activation_checkpointing_identical_grads():
    cfg = model_config("tiny")
    _, ids, cu = _packed([9, 5, 11], cfg.vocab_size, seed=3)
    labels = lm_labels(ids, cu)
    grads = []
    for ckpt in (False, True):
        model = Transformer(model_config("tiny", activation_checkpointing=ckpt))
        model.init_weights(7)
        loss, _ = _run(model, ids, cu, labels=labels)
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=0, atol=0, msg=name)


def test_bf16_forward_backward():
    cfg = model_config("tiny", dtype="bfloat16")
    model = Transformer(cfg)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    _, ids, cu = _packed([12, 20], cfg.vocab_size)
    logits = _run(model, ids, cu)
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits.float()).all()
    loss, count = _run(model, ids, cu, labels=lm_labels(ids, cu))
    assert loss.dtype == torch.float32 and count.item() == 30
    loss.backward()
    assert all(torch.isfinite(p.grad.float()).all() for p in model.parameters())
    fp32 = Transformer(model_config("tiny"))
    ref, _ = _run(fp32, ids, cu, labels=lm_labels(ids, cu))
    assert abs(loss.item() - ref.item()) / ref.item() < 0.02


def test_training_reduces_loss():
    cfg = model_config("tiny")
    model = Transformer(cfg)
    _, ids, cu = _packed([16, 16], cfg.vocab_size)
    labels = lm_labels(ids, cu)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(15):
        loss, count = _run(model, ids, cu, labels=labels)
        (loss / count).backward()
        opt.step()
        opt.zero_grad()
        losses.append((loss / count).item())
    assert losses[-1] < 0.5 * losses[0]


def test_seam_ops_match_references():
    # The model calls flexsp.ops / flexsp.attention through layers.py; they must agree with the
    # plain-PyTorch references kept there.
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(10, 16, generator=g), torch.randn(16, generator=g)
    torch.testing.assert_close(L.rms_norm(x, w, 1e-5), L.rms_norm_ref(x, w, 1e-5))
    pos = positions_from_cu_seqlens(torch.tensor([0, 4, 10]))
    cos, sin = L.rope_cos_sin(pos, 8, 10000.0, torch.float32)
    torch.testing.assert_close((cos, sin), L.rope_cos_sin_ref(pos, 8, 10000.0, torch.float32))
    q, k = torch.randn(10, 4, 8, generator=g), torch.randn(10, 2, 8, generator=g)
    torch.testing.assert_close(L.apply_rope(q, k, cos, sin), L.apply_rope_ref(q, k, cos, sin))
    torch.testing.assert_close(L.swiglu(x, x.flip(0)), L.swiglu_ref(x, x.flip(0)))
    weight, labels = torch.randn(32, 16, generator=g), torch.randint(0, 32, (10,), generator=g)
    labels[3] = -100
    torch.testing.assert_close(
        L.linear_cross_entropy(x, weight, labels), L.linear_cross_entropy_ref(x, weight, labels)
    )
    cu = torch.tensor([0, 4, 10])
    from flexsp.attention.local import varlen_attention

    torch.testing.assert_close(varlen_attention(q, k, k, cu), L.varlen_attention_ref(q, k, k, cu))


def test_init_of_any_shard_equals_the_full_init():
    """flexsp.model.init: every element range (an FSDP2 row shard, a DeepSpeed flat partition)
    gets exactly the values of the same slice of the full draw, so the full weights do not
    depend on the world size; chunk boundaries (CHUNK elements) are crossed on purpose."""
    from flexsp.model.init import CHUNK, fill_elements_, normal_elements

    numel = 3 * CHUNK + 123
    full = normal_elements("blocks.0.mlp.w_up.weight", numel, 0, numel, seed=5, std=0.02)
    assert abs(full.std().item() - 0.02) < 1e-3
    for world in (2, 3, 4, 7, 64):
        part = -(-numel // world)
        pieces = [
            normal_elements("blocks.0.mlp.w_up.weight", numel, r * part, min(numel, (r + 1) * part), 5, 0.02)
            for r in range(world)
        ]
        assert torch.equal(torch.cat(pieces), full), world
    other = normal_elements("blocks.0.mlp.w_up.weight", numel, 0, numel, seed=6, std=0.02)
    assert not torch.equal(other, full)
    rows = torch.empty(4, 10)
    fill_elements_(rows, "x.weight", 100, 30, seed=1, init_std=0.02, layers=2)
    torch.testing.assert_close(
        rows.flatten(), normal_elements("x.weight", 100, 0, 100, 1, 0.02)[30:70], rtol=0, atol=0
    )
    fill_elements_(rows, "blocks.1.attn_norm.weight", 100, 0, 1, 0.02, 2)
    assert torch.equal(rows, torch.ones(4, 10))


# ------------------------------------------------------------------ architecture extensions


def test_new_config_fields_validation_and_presets():
    with pytest.raises(ValueError, match="rope_type.*valid options"):
        ModelConfig(rope_scaling={"rope_type": "longrope", "factor": 2.0})
    with pytest.raises(ValueError, match="needs keys"):
        ModelConfig(rope_scaling={"rope_type": "linear"})
    with pytest.raises(ValueError, match="head_dim"):
        ModelConfig(head_dim=7)
    with pytest.raises(ValueError, match="sliding_window"):
        ModelConfig(sliding_window=-1)
    with pytest.raises(ValueError, match="hidden=66"):
        ModelConfig(hidden=66, heads=4, kv_heads=2)
    assert ModelConfig(hidden=66, heads=4, kv_heads=2, head_dim=24).head_size == 24
    assert ModelConfig(rope_scaling={"type": "linear", "factor": 2.0}).rope_scaling == {
        "rope_type": "linear",
        "factor": 2.0,
    }
    assert ModelConfig(rope_scaling={"rope_type": "default", "rope_theta": 10000.0}).rope_scaling is None
    assert ModelConfig(sliding_window=0).window is None
    for name in ("1b", "7b", "13b", "30b", "70b"):
        cfg = model_config(name)
        assert cfg.activation_checkpointing and cfg.dtype == "bfloat16", name
    c30 = model_config("30b")
    assert (c30.layers, c30.hidden, c30.heads, c30.kv_heads, c30.vocab_size) == (60, 6656, 64, 64, 32000)
    assert c30.intermediate % 256 == 0 and abs(c30.intermediate - 8 * 6656 / 3) < 256
    # None overrides keep the preset (the yaml's nulls); a real override wins.
    assert model_config("7b", hidden=None, dtype=None).hidden == 4096
    assert model_config("7b", activation_checkpointing=False).activation_checkpointing is False
    # head_dim 0 follows hidden when hidden is overridden.
    assert model_config("tiny", hidden=128).head_size == 32


@pytest.mark.parametrize(
    "kw",
    [
        dict(attention_bias=True),
        dict(qk_norm=True, head_dim=24),
        dict(qk_norm=True, attention_bias=True, head_dim=8, tie_embeddings=True),
    ],
)
def test_num_params_exact_with_new_features(kw):
    cfg = model_config("tiny", **kw)
    model = Transformer(cfg)
    assert sum(p.numel() for p in model.parameters()) == cfg.num_params()
    if cfg.attention_bias:
        assert model.blocks[0].attn.wq.bias is not None and model.blocks[0].attn.wo.bias is None
        assert torch.equal(model.blocks[0].attn.wk.bias, torch.zeros_like(model.blocks[0].attn.wk.bias))
    if cfg.qk_norm:
        assert torch.equal(model.blocks[0].attn.q_norm.weight, torch.ones(cfg.head_size))
    _, ids, cu = _packed([5, 9], cfg.vocab_size)
    loss, _ = _run(model, ids, cu, labels=lm_labels(ids, cu))
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())


def test_flops_per_token_with_window_and_head_dim():
    cfg = model_config("tiny")
    dense = 6 * (cfg.num_params(include_embeddings=False) + cfg.vocab_size * cfg.hidden)
    assert cfg.flops_per_token(100) == dense + 12 * cfg.layers * cfg.hidden * 50
    win = model_config("tiny", sliding_window=10)
    assert win.flops_per_token(10) == cfg.flops_per_token(10)
    assert win.flops_per_token(100) == dense + 12 * cfg.layers * cfg.hidden * (50 + 90 * 10) / 100
    wide = model_config("tiny", head_dim=32)
    assert wide.flops_per_token(8) - 6 * (wide.num_params(False) + 512 * 64) == 12 * 2 * 4 * 32 * 4


def test_sliding_window_packed_equals_each_document_alone_and_reference():
    cfg = model_config("tiny", sliding_window=4)
    model = Transformer(cfg)
    docs, ids, cu = _packed([7, 3, 11], cfg.vocab_size)
    packed = _run(model, ids, cu)
    alone = torch.cat([_run(model, d, torch.tensor([0, len(d)])) for d in docs])
    torch.testing.assert_close(packed, alone, rtol=1e-5, atol=1e-5)
    full = Transformer(model_config("tiny"))
    # short document (3 <= window): plain causal; long ones differ from full attention
    torch.testing.assert_close(packed[7:10], _run(full, ids, cu)[7:10], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(packed[:7], _run(full, ids, cu)[:7], atol=1e-4)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(21, h, 16, generator=g, requires_grad=True) for h in (4, 2, 2))
    from flexsp.attention.local import varlen_attention

    out = varlen_attention(q, k, v, [0, 7, 10, 21], window=4)
    ref = L.varlen_attention_ref(q, k, v, [0, 7, 10, 21], window=4)
    torch.testing.assert_close(out, ref)
    # explicit per-query check of the band: query i sees keys i-3..i only
    kr, vr = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    i = 9  # 10th token of doc 3 (starts at 10) -> global 19
    s = (q[19] * kr[16:20]).sum(-1) / 4.0  # [keys, H]
    expect = (s.softmax(0)[..., None] * vr[16:20]).sum(0)
    torch.testing.assert_close(out[19], expect, rtol=1e-5, atol=1e-5)
    out.sum().backward()
    assert torch.isfinite(q.grad).all()
    del i


def test_sliding_window_flex_band_matches_sdpa_forward():
    pytest.importorskip("torch.nn.attention.flex_attention")
    from flexsp.attention.local import varlen_attention

    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(150, h, 16, generator=g) for h in (4, 2, 2))
    cu = [0, 130, 150]
    ref = varlen_attention(q, k, v, cu, window=33, backend="sdpa")
    flex = varlen_attention(q, k, v, cu, window=33, backend="flex")
    torch.testing.assert_close(flex, ref, rtol=1e-4, atol=1e-4)


def test_dynamic_rope_uses_each_documents_length():
    # dynamic NTK: a document's frequencies depend on its own length only (HF run alone).
    cfg = model_config(
        "tiny", max_position_embeddings=8, rope_scaling={"rope_type": "dynamic", "factor": 2.0}
    )
    model = Transformer(cfg)
    docs, ids, cu = _packed([12, 5, 20], cfg.vocab_size)
    packed = _run(model, ids, cu)
    alone = torch.cat([_run(model, d, torch.tensor([0, len(d)])) for d in docs])
    torch.testing.assert_close(packed, alone, rtol=1e-5, atol=1e-5)
    # the 5-token document (<= 8) uses plain RoPE, the longer ones do not
    plain = Transformer(model_config("tiny", max_position_embeddings=8))
    torch.testing.assert_close(packed[12:17], _run(plain, ids, cu)[12:17], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(packed[17:], _run(plain, ids, cu)[17:], atol=1e-4)


def test_forward_makes_no_host_sync(monkeypatch):
    # Host-side boundaries in, and no .item()/.tolist()/int()/bool()/float() on any tensor in the
    # forward + backward (on CUDA each would be a device sync).
    cfg = model_config(
        "tiny",
        qk_norm=True,
        attention_bias=True,
        sliding_window=4,
        max_position_embeddings=8,
        rope_scaling={"rope_type": "dynamic", "factor": 2.0},
    )
    model = Transformer(cfg)
    _, ids, cu = _packed([9, 3, 12], cfg.vocab_size)
    cu_list = cu.tolist()
    labels = lm_labels(ids, cu_list)
    torch.testing.assert_close(labels, lm_labels(ids, cu))
    pos = positions_from_cu_seqlens(cu_list)
    ctx = AttnContext.local(cu_list)

    def boom(*a, **k):
        raise AssertionError("host sync in the forward")

    for name in ("item", "tolist", "__int__", "__bool__", "__float__"):
        monkeypatch.setattr(torch.Tensor, name, boom)
    loss, count = model(ids, pos, ctx, labels=labels)
    loss.backward()
    logits = model(ids, pos, ctx)
    monkeypatch.undo()
    assert logits.shape == (24, cfg.vocab_size) and int(count) == 21


def test_lm_labels_and_positions_accept_lists_and_empty_documents():
    ids = torch.tensor([10, 11, 12, 20, 21, 30, 99])
    for cu in ([0, 0, 3, 3, 5, 6], torch.tensor([0, 0, 3, 3, 5, 6])):
        assert lm_labels(ids, cu).tolist() == [11, 12, -100, 21, -100, -100, -100]
        assert positions_from_cu_seqlens(cu, total=7).tolist() == [0, 1, 2, 0, 1, 0, 0]
    from flexsp.model import shard_inputs

    model = Transformer(model_config("tiny"))
    toks = torch.randint(0, 512, (12,), generator=torch.Generator().manual_seed(0))
    a, b = shard_inputs(toks, [0, 5, 12]), shard_inputs(toks, torch.tensor([0, 5, 12], dtype=torch.int32))
    assert torch.equal(a.labels, b.labels) and torch.equal(a.positions, b.positions)
    torch.testing.assert_close(a.logits(model), b.logits(model), rtol=0, atol=0)


def test_activation_checkpointing_applied_from_outside_keeps_names_and_gradients():
    # flexsp.parallelize checkpoints each block with composable hooks: same parameter names, and
    # the same loss and gradients (the recompute runs the identical fp32 ops: exact up to ~1 ulp)
    from flexsp.parallelize import ParallelizeConfig, activation_checkpointing_disabled, parallelize

    cfg = model_config("tiny", layers=3)
    plain, ckpt = Transformer(cfg), Transformer(cfg)
    ckpt.load_state_dict(plain.state_dict())
    parallelize(ckpt, None, ParallelizeConfig(activation_checkpointing=True))
    assert [n for n, _ in ckpt.named_parameters()] == [n for n, _ in plain.named_parameters()]
    _, ids, cu = _packed([9, 5, 12], cfg.vocab_size)
    labels, pos, ctx = lm_labels(ids, cu), positions_from_cu_seqlens(cu), AttnContext.local(cu.tolist())

    def count_saved(model):
        n = [0]

        def pack(t):
            n[0] += t.numel()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss, _ = model(ids, pos, ctx, labels=labels)
        loss.backward()
        return loss.detach(), n[0]

    (l0, n0), (l1, n1) = count_saved(plain), count_saved(ckpt)
    torch.testing.assert_close(l1, l0, rtol=1e-6, atol=1e-6)
    for (name, a), (_, b) in zip(plain.named_parameters(), ckpt.named_parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-5, atol=1e-7, msg=name)
    assert n1 < n0  # the blocks' internals are recomputed, not saved
    with activation_checkpointing_disabled(ckpt):
        assert count_saved(ckpt)[1] == n0
