"""Single-device tests of the decoder: shapes, per-document RoPE, GQA, tying, checkpointing, bf16."""
import pytest
import torch
import torch.nn.functional as F

from flexsp.model import (AttnContext, ModelConfig, Transformer, lm_labels, lm_loss, model_config,
                          positions_from_cu_seqlens)
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
    cos, sin = L.rope_cos_sin(positions_from_cu_seqlens(cu), cfg.head_dim, cfg.rope_theta, torch.float32)
    torch.testing.assert_close(cos[4:8], cos[0:4])
    torch.testing.assert_close(sin[4:8], sin[0:4])
    assert torch.equal(cos[0], torch.ones(cfg.head_dim))


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
        ref = F.scaled_dot_product_attention(q[s:e].transpose(0, 1), kr[s:e].transpose(0, 1),
                                             vr[s:e].transpose(0, 1), is_causal=True).transpose(0, 1)
        torch.testing.assert_close(out[s:e], ref)
    model = Transformer(cfg)
    assert model.blocks[0].attn.wk.weight.shape == (2 * cfg.head_dim, cfg.hidden)
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
    torch.testing.assert_close(L.linear_cross_entropy(x, weight, labels),
                               L.linear_cross_entropy_ref(x, weight, labels))
    cu = torch.tensor([0, 4, 10])
    torch.testing.assert_close(L.varlen_attention(q, k, k, cu), L.varlen_attention_ref(q, k, k, cu))


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
        pieces = [normal_elements("blocks.0.mlp.w_up.weight", numel, r * part, min(numel, (r + 1) * part), 5, 0.02)
                  for r in range(world)]
        assert torch.equal(torch.cat(pieces), full), world
    other = normal_elements("blocks.0.mlp.w_up.weight", numel, 0, numel, seed=6, std=0.02)
    assert not torch.equal(other, full)
    rows = torch.empty(4, 10)
    fill_elements_(rows, "x.weight", 100, 30, seed=1, init_std=0.02, layers=2)
    torch.testing.assert_close(rows.flatten(), normal_elements("x.weight", 100, 0, 100, 1, 0.02)[30:70], rtol=0, atol=0)
    fill_elements_(rows, "blocks.1.attn_norm.weight", 100, 0, 1, 0.02, 2)
    assert torch.equal(rows, torch.ones(4, 10))
