"""Local-kernel dispatch and the CUDA backends' CPU-checkable parts.

* backend choice (auto / explicit) with flash_attn / flex availability monkeypatched;
* the flex block mask built from cu_seqlens (row intervals, block sparsity) against a dense
  reference mask and against ``create_block_mask``;
* the flex kernels' math, run eagerly on CPU (flex refuses CPU backward only in its Python
  front end; the eager path is a dense reference), incl. the ring-style block backward
  against a merged out/LSE;
* the flash_attn call adapter against fake modules with the old and new signatures.

Real-CUDA checks (compiled flex, flash_attn when installed) are ``@pytest.mark.gpu``.
"""

from __future__ import annotations

import random
import sys
import types

import pytest
import torch
from attn_cases import BF16_TOL, FP32_TOL, make_inputs, reference_grads

from flexsp.attention import flash as FA
from flexsp.attention import flex as FX
from flexsp.attention import local as L

CPU, CUDA, XPU = torch.device("cpu"), torch.device("cuda"), torch.device("xpu")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


# ------------------------------------------------------------------ dispatch
@pytest.mark.parametrize(
    "flash,aten,flex,lse,want",
    [
        (True, True, True, False, "flash"),
        (True, True, True, True, "flash"),
        (False, True, True, False, "aten_flash"),
        (False, True, True, True, "aten_flash"),
        (False, False, True, False, "flex"),
        (False, False, True, True, "flex"),
        (False, False, False, False, "sdpa"),
        (False, False, False, True, "math"),
    ],
)
def test_auto_backend_on_cuda(monkeypatch, flash, aten, flex, lse, want):
    monkeypatch.setattr(L, "_have_flash", lambda: flash)
    monkeypatch.setattr(L, "_have_flex", lambda: flex)
    monkeypatch.setattr(FA, "aten_flash_usable", lambda device, dtype, dim, gqa: aten)
    assert L.pick_backend(CUDA, None, need_lse=lse, dtype=torch.bfloat16, head_dim=64) == want


def test_aten_flash_refuses_inputs_it_cannot_run():
    assert "not CUDA" in FA.aten_flash_shape_ok(CPU, torch.bfloat16, 64)
    assert not FA.aten_flash_usable(CPU, torch.bfloat16, 64, False)
    # without the input description the flash kernels are never picked
    assert not L._aten_flash_ok(CUDA, None, None, False)


def test_auto_backend_off_cuda_ignores_cuda_kernels(monkeypatch):
    monkeypatch.setattr(L, "_have_flash", lambda: True)
    monkeypatch.setattr(L, "_have_flex", lambda: True)
    assert L.pick_backend(CPU) == L.pick_backend(CPU, need_lse=True) == "sdpa"
    assert L.pick_backend(XPU) == "sdpa" and L.pick_backend(XPU, need_lse=True) == "math"


def test_explicit_backend():
    assert L.pick_backend(CUDA, "flex", need_lse=True) == "flex"  # flex has LSE kernels
    assert L.pick_backend(CUDA, "sdpa", need_lse=True) == "math"  # SDPA LSE is CPU-only
    assert L.pick_backend(CPU, "sdpa", need_lse=True) == "sdpa"
    assert L.pick_backend(CUDA, "flash") == "flash"
    with pytest.raises(ValueError, match="backend must be one of"):
        L.pick_backend(CUDA, "cudnn")


def test_flex_compiled_only_on_cuda_by_default():
    kernels = FX.FlexKernels()
    q = torch.randn(1, 2, 8, 16)
    bm = FX.doc_block_mask((0, 3, 8), (0, 3, 8), True, CPU)
    with torch.no_grad():
        kernels(q, q, q, bm, None, False, False)
    assert [path for (_, path) in kernels.paths] == ["eager"]


# ------------------------------------------------------------------ block mask
def _random_segments(rng, causal):
    n = rng.randint(1, 6)
    lq = [rng.choice([0, 1, rng.randint(1, 90), rng.randint(100, 300)]) for _ in range(n)]
    lk = lq if causal else [rng.choice([0, 1, rng.randint(1, 200)]) for _ in range(n)]
    cu = lambda ls: [sum(ls[:i]) for i in range(len(ls) + 1)]  # noqa: E731
    return cu(lq), cu(lk)


def _dense_mask(cu_q, cu_k, causal):
    """Segment i of q sees segment i of k (bottom-right causal), spelled out."""
    m = torch.zeros(cu_q[-1], cu_k[-1], dtype=torch.bool)
    for i in range(len(cu_q) - 1):
        lq, lk = cu_q[i + 1] - cu_q[i], cu_k[i + 1] - cu_k[i]
        for p in range(lq):
            hi = min(lk, p + lk - lq + 1) if causal else lk
            if hi > 0:
                m[cu_q[i] + p, cu_k[i] : cu_k[i] + hi] = True
    return m


@pytest.mark.parametrize("causal", [True, False])
def test_flex_block_mask_matches_dense_and_create_block_mask(causal):
    from torch.nn.attention.flex_attention import create_block_mask

    rng = random.Random(int(causal))
    for _ in range(15):
        cu_q, cu_k = _random_segments(rng, causal)
        if cu_q[-1] == 0 or cu_k[-1] == 0:
            continue
        want = _dense_mask(cu_q, cu_k, causal)
        lo, hi = L.row_intervals(cu_q, cu_k, causal)
        cols = torch.arange(cu_k[-1])
        got = (cols >= lo[:, None]) & (cols < hi[:, None])
        assert torch.equal(got, want), (cu_q, cu_k)
        for block in (16, 128):
            bm = L.doc_block_mask(tuple(cu_q), tuple(cu_k), causal, CPU, block)
            rows = -(-cu_q[-1] // block) * block
            mod = FX.interval_mask_mod(*L.row_intervals(cu_q, cu_k, causal, rows))
            ref = create_block_mask(mod, 1, 1, cu_q[-1], cu_k[-1], device=CPU, BLOCK_SIZE=block)
            assert torch.equal(bm.to_dense(), ref.to_dense()), (cu_q, cu_k, block)
            for name in ("kv_num_blocks", "full_kv_num_blocks", "q_num_blocks", "full_q_num_blocks"):
                assert torch.equal(getattr(bm, name), getattr(ref, name)), name
            # the mask_mod flex evaluates inside partial blocks is the dense mask
            mm = bm.mask_mod(0, 0, torch.arange(cu_q[-1])[:, None], cols[None])
            assert torch.equal(mm, want)


def test_flex_block_mask_cached_per_cu_seqlens():
    L.doc_block_mask.cache_clear()
    a = L.doc_block_mask((0, 5, 300), (0, 5, 300), True, CPU)
    assert L.doc_block_mask((0, 5, 300), (0, 5, 300), True, CPU) is a
    assert L.doc_block_mask((0, 6, 300), (0, 6, 300), True, CPU) is not a


# ------------------------------------------------------------------ flex kernels (eager, CPU)
@pytest.fixture
def flex_on_cpu(monkeypatch):
    """Let flex's eager (dense reference) path run a backward on CPU, so the kernels' math is
    checkable here; the fused kernels themselves are checked by the GPU tests."""
    import torch.nn.attention.flex_attention as fa

    monkeypatch.setattr(fa, "_validate_device", lambda *a, **k: None)


CU = [0, 1, 1, 9, 30, 31]


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("kv_heads", [1, 2, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_flex_varlen_matches_reference(flex_on_cpu, kv_heads, dtype):
    q, k, v, dout = make_inputs(CU, 4, kv_heads, 16, dtype, seed=kv_heads)
    ref_out, ref_grads = reference_grads(q, k, v, dout, CU)
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    out, lse = L.varlen_attention(q, k, v, CU, backend="flex", return_lse=True)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    tol = FP32_TOL if dtype == torch.float32 else BF16_TOL
    torch.testing.assert_close(out.float(), ref_out, **tol)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g.float(), r, **tol)
    _, want_lse = L.attn_forward(q.detach(), k.detach(), v.detach(), CU, CU, backend="math")
    torch.testing.assert_close(lse, want_lse, **tol)


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize(
    "cu_q,cu_k,causal",
    [
        ([0, 3, 3, 20, 40], [0, 3, 3, 20, 40], True),  # ring step 0: own chunks, causal
        ([0, 10, 40], [0, 5, 10], False),  # full q x head halves
        ([0, 0, 5, 40], [0, 7, 7, 10], False),  # empty segments: rows that see nothing
    ],
)
def test_flex_lse_kernels_match_math_against_merged_out(flex_on_cpu, cu_q, cu_k, causal):
    q, k, v, dout = make_inputs([0, 40], 4, 2, 16, torch.float32, seed=5)
    q, dout, k, v = q[: cu_q[-1]], dout[: cu_q[-1]], k[: cu_k[-1]], v[: cu_k[-1]]
    o_flex, l_flex = L.attn_forward(q, k, v, cu_q, cu_k, causal, backend="flex")
    o_math, l_math = L.attn_forward(q, k, v, cu_q, cu_k, causal, backend="math")
    torch.testing.assert_close(o_flex, o_math, **FP32_TOL)
    torch.testing.assert_close(l_flex, l_math, **FP32_TOL)  # -inf where nothing is seen
    # as in ring attention: out/lse merged with another block's contribution
    g = torch.Generator().manual_seed(1)
    lse = torch.logaddexp(l_math, torch.randn(l_math.shape, generator=g))
    out = o_math * torch.exp(l_math - lse).t().unsqueeze(-1) + 0.3 * torch.randn(o_math.shape, generator=g)
    for a, b in zip(
        L.attn_backward(dout, q, k, v, out, lse, cu_q, cu_k, causal, backend="flex"),
        L.attn_backward(dout, q, k, v, out, lse, cu_q, cu_k, causal, backend="math"),
    ):
        torch.testing.assert_close(a, b, **FP32_TOL)


# ------------------------------------------------------------------ flash_attn adapter
def _fake_flash(version):
    """A stand-in flash_attn.flash_attn_interface with ``version``'s private signatures,
    computing with the math kernels (checks the call adapter, not FlashAttention)."""

    def fwd_impl(q, k, v, cu_q, cu_k, scale, causal):
        return L.attn_forward(q, k, v, cu_q.tolist(), cu_k.tolist(), causal, scale, "math")

    def bwd_impl(dout, q, k, v, out, lse, dq, dk, dv, cu_q, cu_k, scale, causal):
        for dst, src in zip(
            (dq, dk, dv),
            L.attn_backward(dout, q, k, v, out, lse, cu_q.tolist(), cu_k.tolist(), causal, scale, "math"),
        ):
            dst.copy_(src)

    mod = types.ModuleType("flash_attn.flash_attn_interface")
    if version == "2.5":

        def _flash_attn_varlen_forward(
            q,
            k,
            v,
            cu_seqlens_q,
            cu_seqlens_k,
            max_seqlen_q,
            max_seqlen_k,
            dropout_p,
            softmax_scale,
            causal,
            window_size,
            alibi_slopes,
            return_softmax,
            block_table,
        ):
            assert window_size == (-1, -1) and not return_softmax
            o, lse = fwd_impl(q, k, v, cu_seqlens_q, cu_seqlens_k, softmax_scale, causal)
            return o, q, k, v, o, lse, None, None

        def _flash_attn_varlen_backward(
            dout,
            q,
            k,
            v,
            out,
            softmax_lse,
            dq,
            dk,
            dv,
            cu_seqlens_q,
            cu_seqlens_k,
            max_seqlen_q,
            max_seqlen_k,
            dropout_p,
            softmax_scale,
            causal,
            window_size,
            alibi_slopes,
            deterministic,
            rng_state=None,
        ):
            bwd_impl(
                dout, q, k, v, out, softmax_lse, dq, dk, dv, cu_seqlens_q, cu_seqlens_k, softmax_scale, causal
            )
    else:  # 2.6+: window_size_left/right and softcap, required positionals

        def _flash_attn_varlen_forward(
            q,
            k,
            v,
            cu_seqlens_q,
            cu_seqlens_k,
            max_seqlen_q,
            max_seqlen_k,
            dropout_p,
            softmax_scale,
            causal,
            window_size_left=-1,
            window_size_right=-1,
            softcap=0.0,
            alibi_slopes=None,
            return_softmax=False,
            block_table=None,
        ):
            o, lse = fwd_impl(q, k, v, cu_seqlens_q, cu_seqlens_k, softmax_scale, causal)
            return o, lse, None, None

        def _flash_attn_varlen_backward(
            dout,
            q,
            k,
            v,
            out,
            softmax_lse,
            dq,
            dk,
            dv,
            cu_seqlens_q,
            cu_seqlens_k,
            max_seqlen_q,
            max_seqlen_k,
            dropout_p,
            softmax_scale,
            causal,
            window_size_left,
            window_size_right,
            softcap,
            alibi_slopes,
            deterministic,
            rng_state=None,
            zero_tensors=False,
        ):
            assert (window_size_left, window_size_right, softcap) == (-1, -1, 0.0)
            bwd_impl(
                dout, q, k, v, out, softmax_lse, dq, dk, dv, cu_seqlens_q, cu_seqlens_k, softmax_scale, causal
            )

    mod._flash_attn_varlen_forward = _flash_attn_varlen_forward
    mod._flash_attn_varlen_backward = _flash_attn_varlen_backward
    return mod


@pytest.mark.parametrize("version", ["2.5", "2.6"])
def test_flash_adapter_handles_signatures(monkeypatch, version):
    pkg = types.ModuleType("flash_attn")
    pkg.flash_attn_interface = _fake_flash(version)
    monkeypatch.setitem(sys.modules, "flash_attn", pkg)
    monkeypatch.setitem(sys.modules, "flash_attn.flash_attn_interface", pkg.flash_attn_interface)
    q, k, v, dout = make_inputs(CU, 4, 2, 16, torch.float32, seed=3)
    ref_out, ref_grads = reference_grads(q, k, v, dout, CU)
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    out = L.varlen_attention(q, k, v, CU, backend="flash")
    grads = torch.autograd.grad(out, (q, k, v), dout)
    torch.testing.assert_close(out, ref_out, **FP32_TOL)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, **FP32_TOL)


def test_flash_adapter_refuses_unknown_required_parameter():
    def f(q, mystery):
        return q

    with pytest.raises(TypeError, match="mystery"):
        FA.call_by_name(f, q=1)


# ------------------------------------------------------------------ real CUDA
def _cuda_case(backend, dtype, cu, heads=8, kv_heads=2, dim=64):
    q, k, v, dout = make_inputs(cu, heads, kv_heads, dim, dtype, seed=0)
    ref_out, ref_grads = reference_grads(q, k, v, dout, cu)
    q, k, v, dout = (x.cuda().requires_grad_(x is not dout) for x in (q, k, v, dout))
    out = L.varlen_attention(q, k, v, cu, backend=backend)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    tol = FP32_TOL if dtype == torch.float32 else BF16_TOL
    torch.testing.assert_close(out.float().cpu(), ref_out, **tol)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g.float().cpu(), r, **tol)


@pytest.mark.gpu
@needs_cuda
def test_compiled_flex_on_cuda_matches_reference_without_recompiling():
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    cus = ([0, 100, 1000, 1027], [0, 3000, 3001, 5000], [0, 7, 2500, 2600, 8200], [0, 4096, 4097, 4099])
    for cu in cus[:2]:  # compile, then one recompile making lengths dynamic
        _cuda_case("flex", torch.bfloat16, cu)
    before = counters["stats"]["unique_graphs"]
    for cu in cus[2:]:  # new lengths: no new graphs
        _cuda_case("flex", torch.bfloat16, cu)
    assert counters["stats"]["unique_graphs"] == before


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("backend", ["aten_flash", "flex", "math"] + (["flash"] if L._have_flash() else []))
def test_lse_kernels_on_cuda_match_cpu_math(backend):
    cu_q, cu_k = [0, 300, 300, 1000], [0, 100, 100, 700]
    q, k, v, dout = make_inputs([0, 1000], 8, 2, 64, torch.bfloat16, seed=2)
    k, v = k[:700], v[:700]
    want = L.attn_forward(q.float(), k.float(), v.float(), cu_q, cu_k, False, backend="math")
    o, lse = L.attn_forward(q.cuda(), k.cuda(), v.cuda(), cu_q, cu_k, False, backend=backend)
    torch.testing.assert_close(o.float().cpu(), want[0], **BF16_TOL)
    torch.testing.assert_close(lse.cpu(), want[1], **BF16_TOL)
    gw = L.attn_backward(
        dout.float(), q.float(), k.float(), v.float(), want[0], want[1], cu_q, cu_k, False, backend="math"
    )
    gc = L.attn_backward(
        dout.cuda(),
        q.cuda(),
        k.cuda(),
        v.cuda(),
        want[0].to(q.dtype).cuda(),
        want[1].cuda(),
        cu_q,
        cu_k,
        False,
        backend=backend,
    )
    for a, b in zip(gc, gw):
        torch.testing.assert_close(a.float().cpu(), b, **BF16_TOL)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.skipif(not L._have_flash(), reason="needs flash_attn")
def test_flash_on_cuda_matches_reference():
    _cuda_case("flash", torch.bfloat16, [0, 100, 1000, 1027])
