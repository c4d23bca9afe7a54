"""Tests of flexsp.ops on the pure PyTorch path (CPU), plus backend dispatch and input checks.

Each op is compared, forward and backward, with a plain textbook reference written here
independently of flexsp/ops/torch_ops.py. The liger-kernel path is compared with the PyTorch
path in tests/test_ops_liger.py.

Tolerances: float32 comparisons use rtol=atol=1e-5 -- both sides do the same math in float32
but in a different order (chunked logsumexp, fused expressions), so they differ by a few ulps
of values of order 1-100. bfloat16 comparisons use rtol=atol=2e-2 -- bf16 has an 8-bit
mantissa (relative step 2**-8 = 3.9e-3) and a few roundings of intermediate results compound.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import flexsp.ops as ops
from flexsp.ops import torch_ops

FP32_TOL = dict(rtol=1e-5, atol=1e-5)
BF16_TOL = dict(rtol=2e-2, atol=2e-2)


def _tol(dtype):
    return FP32_TOL if dtype == torch.float32 else BF16_TOL


def _leaf(t):
    return t.detach().clone().requires_grad_(True)


# ----------------------------------------------------------------------------- references


def ref_rms_norm(x, w, eps):
    xf = x.float()
    y = xf / torch.sqrt((xf * xf).mean(-1, keepdim=True) + eps)
    return (w * y.to(x.dtype)).to(x.dtype)


def ref_rope_one(x, pos, theta):
    """Rotate-half RoPE of one vector x [d] at integer position pos, element by element."""
    d = x.shape[-1]
    half = d // 2
    out = torch.empty_like(x)
    for i in range(half):
        ang = pos * theta ** (-2.0 * i / d)
        c, s = math.cos(ang), math.sin(ang)
        out[..., i] = x[..., i] * c - x[..., i + half] * s
        out[..., i + half] = x[..., i + half] * c + x[..., i] * s
    return out


def packed_positions(doc_lens, device=None):
    return torch.cat([torch.arange(n, device=device) for n in doc_lens])


# ----------------------------------------------------------------------------- rope_cos_sin


def test_rope_cos_sin_values_and_layout():
    pos = packed_positions([3, 5])
    cos, sin = ops.rope_cos_sin(pos, 8, theta=100.0)
    assert cos.shape == (8, 8) and cos.dtype == torch.float32
    for t, p in enumerate(pos.tolist()):
        for i in range(4):
            ang = p * 100.0 ** (-2.0 * i / 8)
            for j in (i, i + 4):  # cat(freqs, freqs) layout
                assert cos[t, j].item() == pytest.approx(math.cos(ang), abs=1e-6)
                assert sin[t, j].item() == pytest.approx(math.sin(ang), abs=1e-6)
    # positions restart per document: token 3 is position 0 of doc 2
    assert torch.equal(cos[3], cos[0]) and torch.equal(sin[3], sin[0])
    c16, _ = ops.rope_cos_sin(pos, 8, dtype=torch.bfloat16)
    assert c16.dtype == torch.bfloat16


# ----------------------------------------------------------------------------- apply_rope


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_apply_rope_matches_reference_fwd_bwd(dtype):
    torch.manual_seed(0)
    doc_lens, hq, hk, d, theta = [5, 1, 7], 4, 2, 16, 10000.0
    pos = packed_positions(doc_lens)
    tokens = pos.numel()
    q = torch.randn(tokens, hq, d, dtype=dtype)
    k = torch.randn(tokens, hk, d, dtype=dtype)
    cos, sin = ops.rope_cos_sin(pos, d, theta)
    gq, gk = torch.randn_like(q), torch.randn_like(k)

    q1, k1 = _leaf(q), _leaf(k)
    oq, ok = ops.apply_rope(q1, k1, cos, sin)
    (oq.float() * gq.float()).sum().add((ok.float() * gk.float()).sum()).backward()
    assert oq.dtype == dtype and ok.dtype == dtype
    assert torch.equal(q1, q) and torch.equal(k1, k)  # inputs not modified

    q2, k2 = _leaf(q.float()), _leaf(k.float())
    rq = torch.stack([ref_rope_one(q2[t], pos[t].item(), theta) for t in range(tokens)])
    rk = torch.stack([ref_rope_one(k2[t], pos[t].item(), theta) for t in range(tokens)])
    (rq * gq.float()).sum().add((rk * gk.float()).sum()).backward()

    torch.testing.assert_close(oq.float(), rq, **_tol(dtype))
    torch.testing.assert_close(ok.float(), rk, **_tol(dtype))
    torch.testing.assert_close(q1.grad.float(), q2.grad, **_tol(dtype))
    torch.testing.assert_close(k1.grad.float(), k2.grad, **_tol(dtype))


def test_apply_rope_scores_depend_on_relative_position_only():
    # The property RoPE exists for: <rope(q, m), rope(k, n)> depends on m - n only.
    torch.manual_seed(1)
    d = 32
    q = torch.randn(1, 1, d, dtype=torch.float64)
    k = torch.randn(1, 1, d, dtype=torch.float64)

    def score(m, n):
        cq, sq = ops.rope_cos_sin(torch.tensor([m]), d, dtype=torch.float64)
        ck, sk = ops.rope_cos_sin(torch.tensor([n]), d, dtype=torch.float64)
        rq, _ = ops.apply_rope(q, q, cq, sq)
        rk, _ = ops.apply_rope(k, k, ck, sk)
        return (rq * rk).sum().item()

    # rope_cos_sin computes angles in float32 (as HF does), so equality holds to ~1e-7 relative
    assert score(7, 3) == pytest.approx(score(104, 100), rel=1e-5)
    assert score(7, 3) != pytest.approx(score(7, 4), rel=1e-3)


# ----------------------------------------------------------------------------- rms_norm


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_matches_reference_fwd_bwd(dtype):
    torch.manual_seed(0)
    x = torch.randn(3, 11, 64, dtype=dtype) * 3
    w = torch.randn(64, dtype=dtype)
    g = torch.randn(3, 11, 64, dtype=dtype)
    x1, w1, x2, w2 = _leaf(x), _leaf(w), _leaf(x), _leaf(w)
    y1 = ops.rms_norm(x1, w1, eps=1e-5)
    y2 = ref_rms_norm(x2, w2, 1e-5)
    (y1 * g).sum().backward()
    (y2 * g).sum().backward()
    assert y1.dtype == dtype
    torch.testing.assert_close(y1, y2, **_tol(dtype))
    torch.testing.assert_close(x1.grad, x2.grad, **_tol(dtype))
    # dW sums over 33 rows; in bf16 that accumulates more rounding
    torch.testing.assert_close(
        w1.grad, w2.grad, **(FP32_TOL if dtype == torch.float32 else dict(rtol=5e-2, atol=5e-2))
    )


def test_rms_norm_output_keeps_input_dtype_with_fp32_weight():
    x = torch.randn(4, 8, dtype=torch.bfloat16)
    assert ops.rms_norm(x, torch.ones(8)).dtype == torch.bfloat16


# ----------------------------------------------------------------------------- swiglu


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swiglu_matches_reference_fwd_bwd(dtype):
    torch.manual_seed(0)
    a = torch.randn(9, 48, dtype=dtype) * 2
    b = torch.randn(9, 48, dtype=dtype)
    g = torch.randn(9, 48, dtype=dtype)
    a1, b1, a2, b2 = _leaf(a), _leaf(b), _leaf(a.float()), _leaf(b.float())
    y1 = ops.swiglu(a1, b1)
    y2 = a2 / (1 + torch.exp(-a2)) * b2
    (y1 * g).sum().backward()
    (y2 * g.float()).sum().backward()
    torch.testing.assert_close(y1.float(), y2, **_tol(dtype))
    torch.testing.assert_close(a1.grad.float(), a2.grad, **_tol(dtype))
    torch.testing.assert_close(b1.grad.float(), b2.grad, **_tol(dtype))


# ----------------------------------------------------------------------------- linear_cross_entropy


def _ce_inputs(tokens=37, hidden=24, vocab=101, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(tokens, hidden, generator=gen).to(dtype)
    w = (torch.randn(vocab, hidden, generator=gen) / math.sqrt(hidden)).to(dtype)
    y = torch.randint(0, vocab, (tokens,), generator=gen)
    y[::5] = -100  # ignored tokens (e.g. document boundaries / padding)
    return h, w, y


@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk_size", [None, 1, 8])
def test_linear_ce_matches_naive_fwd_bwd(reduction, dtype, chunk_size):
    h, w, y = _ce_inputs(dtype=dtype)
    h1, w1, h2, w2 = _leaf(h), _leaf(w), _leaf(h), _leaf(w)
    loss1 = ops.linear_cross_entropy(h1, w1, y, reduction=reduction, chunk_size=chunk_size)
    loss2 = F.cross_entropy((h2 @ w2.t()).float(), y, ignore_index=-100, reduction=reduction)
    (3.0 * loss1).backward()
    (3.0 * loss2).backward()
    assert loss1.dtype == torch.float32 and loss1.dim() == 0
    torch.testing.assert_close(loss1, loss2, **_tol(dtype))
    torch.testing.assert_close(h1.grad, h2.grad, **_tol(dtype))
    torch.testing.assert_close(w1.grad, w2.grad, **_tol(dtype))
    assert h1.grad.dtype == dtype and w1.grad.dtype == dtype


def test_linear_ce_chunk_size_does_not_change_result():
    h, w, y = _ce_inputs(tokens=41)
    results = []
    for chunk in (1, 3, 7, 16, 41, 1000):
        h1, w1 = _leaf(h), _leaf(w)
        per_token = torch_ops._ChunkedLinearCrossEntropy.apply(h1, w1, y, -100, chunk)
        per_token.sum().backward()
        results.append((chunk, per_token.detach(), h1.grad, w1.grad))
    _, ref_tok, ref_gh, ref_gw = results[0]
    for chunk, tok, gh, gw in results[1:]:
        # Every token's loss and input-grad row is computed by the same row-wise math whatever
        # the chunk; only BLAS blocking of the [chunk, H] x [H, V] product can differ, which is
        # at most a last-bit difference. dW sums over chunks in a different grouping.
        torch.testing.assert_close(tok, ref_tok, rtol=1e-6, atol=1e-6, msg=f"chunk {chunk}")
        torch.testing.assert_close(gh, ref_gh, rtol=1e-6, atol=1e-6, msg=f"chunk {chunk}")
        torch.testing.assert_close(gw, ref_gw, rtol=1e-5, atol=1e-6, msg=f"chunk {chunk}")
    assert (ref_tok[::5] == 0).all()  # ignored tokens contribute zero


def test_linear_ce_all_ignored():
    h, w, y = _ce_inputs(tokens=6)
    y[:] = -100
    h1, w1 = _leaf(h), _leaf(w)
    s = ops.linear_cross_entropy(h1, w1, y, reduction="sum")
    s.backward()
    assert s.item() == 0.0 and not h1.grad.any() and not w1.grad.any()
    assert math.isnan(ops.linear_cross_entropy(h, w, y, reduction="mean").item())


def test_linear_ce_custom_ignore_index_and_no_weight_grad():
    h, w, y = _ce_inputs(tokens=10, vocab=13)
    y[y == -100] = 5  # now use 5 as the ignore index
    h1 = _leaf(h)
    loss = ops.linear_cross_entropy(h1, w, y, ignore_index=5, reduction="sum", chunk_size=4)
    loss.backward()
    ref = F.cross_entropy(h @ w.t(), y, ignore_index=5, reduction="sum")
    torch.testing.assert_close(loss, ref, **FP32_TOL)
    assert w.grad is None


def test_linear_ce_default_chunk_is_bounded():
    assert torch_ops.default_chunk_size(1_000_000, 131072) == 2**25 // 131072  # 256 tokens
    assert torch_ops.default_chunk_size(10, 100) == 10
    assert torch_ops.default_chunk_size(10, 10**9) == 1


# ----------------------------------------------------------------------------- dispatch and validation


def test_dispatch_defaults_to_torch_on_cpu(monkeypatch):
    monkeypatch.delenv(ops.ENV_VAR, raising=False)
    x = torch.randn(2, 4)
    assert ops.resolve_backend(None, x) == "torch"
    assert ops.resolve_backend("auto", x) == "torch"
    assert ops.resolve_backend("TORCH", x) == "torch"


def test_dispatch_env_var_and_keyword_precedence(monkeypatch):
    x = torch.randn(2, 4)
    monkeypatch.setenv(ops.ENV_VAR, "torch")
    assert ops.resolve_backend(None, x) == "torch"
    monkeypatch.setenv(ops.ENV_VAR, "bogus")
    with pytest.raises(ValueError, match="bogus.*FLEXSP_OPS_BACKEND"):
        ops.resolve_backend(None, x)
    assert ops.resolve_backend("torch", x) == "torch"  # keyword wins over the env var


def test_dispatch_liger_on_cpu_is_rejected_outside_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    x = torch.randn(2, 4)
    with pytest.raises(ValueError, match="liger"):
        ops.resolve_backend("liger", x)
    with pytest.raises(ValueError, match="valid"):
        ops.swiglu(x, x, backend="cuda")


def test_dispatch_auto_picks_liger_only_on_cuda_and_only_where_the_op_allows(monkeypatch):
    from flexsp.ops import _dispatch

    monkeypatch.setattr(_dispatch, "liger_available", lambda: True)  # as on a CUDA machine with liger
    assert _dispatch.auto_backend(on_cuda=True) == "liger"
    assert _dispatch.auto_backend(on_cuda=True, auto_liger=False) == "torch"
    assert _dispatch.auto_backend(on_cuda=False) == "torch"
    monkeypatch.setattr(_dispatch, "liger_available", lambda: False)
    assert _dispatch.auto_backend(on_cuda=True) == "torch"


def test_linear_ce_opts_out_of_liger_under_auto_and_the_others_do_not(monkeypatch):
    # liger-kernel 0.8.0's fused linear CE syncs the host per step (flexsp/ops/liger_ops.py), so
    # "auto" keeps it on the torch path; RMSNorm/RoPE/SwiGLU take liger on CUDA. Records the
    # auto_liger each public op passes to the real resolve_backend.
    seen = {}
    real = ops.resolve_backend

    def recording(backend, *tensors, auto_liger=True):
        seen[len(seen)] = auto_liger
        return real(backend, *tensors, auto_liger=auto_liger)

    monkeypatch.setattr(ops, "resolve_backend", recording)
    x, w = torch.randn(4, 8), torch.randn(8)
    cos, sin = ops.rope_cos_sin(torch.arange(4), 8)
    ops.rms_norm(x, w)
    ops.apply_rope(x.view(4, 1, 8), x.view(4, 1, 8), cos, sin)
    ops.swiglu(x, x)
    ops.linear_cross_entropy(x, torch.randn(5, 8), torch.zeros(4, dtype=torch.long))
    assert list(seen.values()) == [True, True, True, False]


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: ops.rms_norm(torch.randn(2, 4), torch.ones(5)), "weight"),
        (lambda: ops.rms_norm(torch.randn(2, 4), torch.ones(4), eps=0.0), "eps"),
        (lambda: ops.rope_cos_sin(torch.arange(4), 7), "even"),
        (lambda: ops.rope_cos_sin(torch.zeros(2, 2), 8), "1-D"),
        (
            lambda: ops.apply_rope(
                torch.randn(4, 2, 8), torch.randn(4, 1, 8), torch.randn(4, 4), torch.randn(4, 4)
            ),
            "cos/sin",
        ),
        (
            lambda: ops.apply_rope(
                torch.randn(4, 8), torch.randn(4, 8), torch.randn(4, 8), torch.randn(4, 8)
            ),
            "tokens, heads",
        ),
        (
            lambda: ops.apply_rope(
                torch.randn(4, 2, 8), torch.randn(3, 1, 8), torch.randn(4, 8), torch.randn(4, 8)
            ),
            "does not match",
        ),
        (lambda: ops.swiglu(torch.randn(2, 4), torch.randn(2, 5)), "same shape"),
        (
            lambda: ops.linear_cross_entropy(
                torch.randn(3, 4), torch.randn(7, 4), torch.zeros(3, dtype=torch.long), reduction="avg"
            ),
            "reduction",
        ),
        (
            lambda: ops.linear_cross_entropy(
                torch.randn(3, 4), torch.randn(7, 5), torch.zeros(3, dtype=torch.long)
            ),
            "weight",
        ),
        (
            lambda: ops.linear_cross_entropy(
                torch.randn(3, 4), torch.randn(7, 4), torch.zeros(2, dtype=torch.long)
            ),
            "labels",
        ),
        (lambda: ops.linear_cross_entropy(torch.randn(3, 4), torch.randn(7, 4), torch.zeros(3)), "integer"),
        (
            lambda: ops.linear_cross_entropy(
                torch.randn(3, 4), torch.randn(7, 4), torch.zeros(3, dtype=torch.long), chunk_size=0
            ),
            "chunk_size",
        ),
    ],
)
def test_bad_input_raises_value_error(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# ----------------------------------------------------------------------------- RoPE scaling


def test_rope_scaling_tables():
    pos = packed_positions([5, 40])
    base_c, base_s = ops.rope_cos_sin(pos, 16, 10000.0)
    # linear: angles of position p / factor
    lc, _ = ops.rope_cos_sin(pos, 16, 10000.0, scaling={"rope_type": "linear", "factor": 4.0})
    ref, _ = ops.rope_cos_sin(pos.float() / 4.0, 16, 10000.0)
    torch.testing.assert_close(lc, ref, **FP32_TOL)
    # yarn: cos/sin carry the attention factor 0.1 ln(factor) + 1
    yc, ys = ops.rope_cos_sin(
        pos, 16, 10000.0, scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}
    )
    att = 0.1 * math.log(4.0) + 1.0
    torch.testing.assert_close(yc[0], torch.full((16,), att))
    torch.testing.assert_close((yc**2 + ys**2), torch.full_like(yc, att * att), **FP32_TOL)
    # dynamic: per-token document length; documents within max_position_embeddings = plain RoPE
    dyn = {"rope_type": "dynamic", "factor": 2.0}
    lens = torch.tensor([5] * 5 + [40] * 40)
    dc, _ = ops.rope_cos_sin(pos, 16, 10000.0, scaling=dyn, max_position_embeddings=16, seq_lens=lens)
    torch.testing.assert_close(dc[:5], base_c[:5], **FP32_TOL)
    alone, _ = ops.rope_cos_sin(
        pos[5:], 16, 10000.0, scaling=dyn, max_position_embeddings=16, seq_lens=torch.full((40,), 40)
    )
    torch.testing.assert_close(dc[5:], alone, rtol=0, atol=0)
    assert not torch.allclose(dc[5:], base_c[5:], atol=1e-3)
    with pytest.raises(ValueError, match="seq_lens"):
        ops.rope_cos_sin(pos, 16, scaling=dyn, max_position_embeddings=16, seq_lens=lens[:3])
    with pytest.raises(ValueError, match="longrope"):
        ops.rope_cos_sin(pos, 16, scaling={"rope_type": "longrope"})
    with pytest.raises(ValueError, match="max_position_embeddings"):
        ops.rope_cos_sin(pos, 16, scaling=dyn, seq_lens=lens)
