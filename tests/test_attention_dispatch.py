"""Compiled attention that stays compiled, and the CUDA flash kernels built into torch.

CPU: :class:`flexsp.attention.flex.FlexKernels` driven through more than dynamo's default
recompile limit (8) of distinct kernel variants, with dynamo's ``eager`` backend (the real
guards, cache and recompile limit, without inductor's code generation): every variant runs
compiled, none falls back; a variant pushed past its own budget is retired with one warning and
its calls take the per-document SDPA loop, still exact.

GPU (``@pytest.mark.gpu``): torch's built-in FlashAttention-2 varlen kernels (``aten_flash``)
against the fp32 reference, forward and backward, with GQA, empty documents and a sliding window;
and the automatic choice on a bf16 CUDA input.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from attn_cases import BF16_TOL, FP32_TOL, make_inputs, reference_grads

from flexsp.attention import flex as FX
from flexsp.attention import local as L

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
CU = (0, 5, 5, 21, 40)


def _variants():
    """12 distinct (dtype, head dim, GQA, LSE) variants: more than dynamo's default limit of 8."""
    for dtype in (torch.float32, torch.bfloat16):
        for dim in (16, 32, 64):
            for kv_heads in (4, 2):
                yield dtype, dim, kv_heads


def _run(kernels, dtype, dim, kv_heads, cu=CU, return_lse=False):
    q, k, v, _ = make_inputs(list(cu), 4, kv_heads, dim, dtype, seed=dim)
    with torch.no_grad():
        return q, k, v, FX.flex_forward(q, k, v, cu, cu, True, dim**-0.5, return_lse, kernels=kernels)


def test_more_variants_than_dynamo_limit_all_stay_compiled():
    torch._dynamo.reset()
    kernels = FX.FlexKernels(compile=True, backend="eager")
    seen = 0
    for dtype, dim, kv_heads in _variants():
        for cu in (CU, (0, 7, 30), (0, 64)):  # new lengths for every variant
            q, k, v, out = _run(kernels, dtype, dim, kv_heads, cu)
            ref, _ = reference_grads(q, k, v, torch.zeros_like(q), list(cu))
            tol = FP32_TOL if dtype == torch.float32 else BF16_TOL
            torch.testing.assert_close(out.float(), ref, **tol)
        seen += 1
    assert seen > 8
    paths = {key: path for (key, path) in kernels.paths}
    assert len(paths) == seen and set(paths.values()) == {"compiled"}, kernels.paths
    assert not kernels.retired


def test_variant_past_its_budget_is_retired_loudly_and_falls_back_exactly(monkeypatch):
    torch._dynamo.reset()
    # no dynamic shapes: every new length is a recompile, so a budget of 2 is passed at once
    monkeypatch.setattr(FX, "_mark_dynamic", lambda *a: None)
    kernels = FX.FlexKernels(compile=True, backend="eager", recompile_budget=2)
    monkeypatch.setattr(FX, "KERNELS", kernels)
    outs = []
    with (
        warnings.catch_warnings(record=True) as caught,
        torch._dynamo.config.patch(automatic_dynamic_shapes=False),
    ):
        warnings.simplefilter("always")
        for n in (16, 24, 40, 56):
            cu = (0, n // 2, n)
            q, k, v, dout = make_inputs(list(cu), 4, 2, 16, torch.float32, seed=n)
            with torch.no_grad():
                out = L.varlen_attention(q, k, v, cu, backend="flex")
            ref, _ = reference_grads(q, k, v, dout, list(cu))
            torch.testing.assert_close(out, ref, **FP32_TOL)
            outs.append(out)
    retired = [w for w in caught if "retired" in str(w.message)]
    assert len(retired) == 1, [str(w.message) for w in caught]
    counts = {path: n for (_, path), n in kernels.paths.items()}
    assert counts == {"compiled": 2, "fallback": 2}, kernels.paths


# ------------------------------------------------------------------ real CUDA
def _cuda_vs_reference(backend, cu, heads=8, kv_heads=2, dim=128, window=None):
    q, k, v, dout = make_inputs(list(cu), heads, kv_heads, dim, torch.bfloat16, seed=len(cu))
    if window:
        ref_out, ref_grads = _window_reference(q, k, v, dout, list(cu), window)
    else:
        ref_out, ref_grads = reference_grads(q, k, v, dout, list(cu))
    q, k, v = (x.cuda().requires_grad_() for x in (q, k, v))
    out = L.varlen_attention(q, k, v, list(cu), backend=backend, window=window)
    grads = torch.autograd.grad(out, (q, k, v), dout.cuda())
    # bf16 inputs, fp32 reference: a few bf16 ulps (see attn_cases.BF16_TOL)
    torch.testing.assert_close(out.float().cpu(), ref_out, **BF16_TOL)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g.float().cpu(), r, **BF16_TOL)


def _window_reference(q, k, v, dout, cu, window):
    from flexsp.model.layers import varlen_attention_ref

    q, k, v = (x.detach().float().requires_grad_() for x in (q, k, v))
    out = varlen_attention_ref(q, k, v, cu, causal=True, window=window)
    return out.detach(), torch.autograd.grad(out, (q, k, v), dout.float())


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize(
    "cu,kv_heads", [((0, 100, 100, 1000, 1027), 2), ((0, 4096), 8), ((0, 1, 2, 3000), 1)]
)
def test_aten_flash_on_cuda_matches_reference(cu, kv_heads):
    _cuda_vs_reference("aten_flash", cu, kv_heads=kv_heads)


@pytest.mark.gpu
@needs_cuda
def test_aten_flash_sliding_window_on_cuda_matches_reference():
    _cuda_vs_reference("aten_flash", (0, 300, 1500), window=256)


@pytest.mark.gpu
@needs_cuda
def test_auto_backend_on_cuda_bf16_is_a_flash_kernel():
    dev = torch.device("cuda")
    got = L.pick_backend(dev, None, dtype=torch.bfloat16, head_dim=128, gqa=True)
    assert got in ("flash", "aten_flash"), got


@pytest.mark.parametrize("window", [None, 5])
def test_hybrid_long_documents_per_call_short_ones_packed(monkeypatch, window):
    # a low threshold so a CPU-sized batch mixes both paths; the short documents' packed call goes
    # to the math kernel, so the gather/scatter is checked against an independent reference
    monkeypatch.setattr(L, "HYBRID_LONG_TOKENS", 16)
    real_pick = L._pick
    monkeypatch.setattr(
        L,
        "_pick",
        lambda q, k, b, need_lse: "math" if b is None and not need_lse else real_pick(q, k, b, need_lse),
    )
    cu = [0, 3, 20, 20, 27, 60, 61]  # docs of 3, 17 (long), 0, 7, 33 (long), 1 tokens
    q, k, v, dout = make_inputs(cu, 4, 2, 16, torch.float32, seed=7)
    if window:
        ref_out, ref_grads = _window_reference(q, k, v, dout, cu, window)
    else:
        ref_out, ref_grads = reference_grads(q, k, v, dout, cu)
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    out = L.varlen_attention(q, k, v, cu, backend="hybrid", window=window)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    torch.testing.assert_close(out, ref_out, **FP32_TOL)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, **FP32_TOL)
    # LSE requests take the automatic whole-buffer kernel
    assert L.pick_backend(torch.device("cpu"), "hybrid", need_lse=True) == "sdpa"


def test_sdpa_loop_backward_is_linear_in_documents():
    # many documents: the per-document views are torch.split views, whose backward concatenates the
    # gradients once (slices would each allocate a full-size gradient)
    cu = list(range(0, 401, 4))
    q, k, v, dout = make_inputs(cu, 2, 1, 8, torch.float32, seed=1)
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    out = L._sdpa_loop(q, k, v, cu, cu, True, 8**-0.5)
    names, seen = set(), set()
    stack = [out.grad_fn]
    while stack:
        fn = stack.pop()
        if fn is None or id(fn) in seen:
            continue
        seen.add(id(fn))
        names.add(type(fn).__name__)
        stack += [f for f, _ in fn.next_functions]
    assert "SliceBackward0" not in names and any(n.startswith("SplitWithSizes") for n in names), names
    ref_out, ref_grads = reference_grads(q.detach(), k.detach(), v.detach(), dout, cu)
    torch.testing.assert_close(out, ref_out, **FP32_TOL)
    for g, r in zip(torch.autograd.grad(out, (q, k, v), dout), ref_grads):
        torch.testing.assert_close(g, r, **FP32_TOL)


@pytest.mark.gpu
@needs_cuda
def test_hybrid_on_cuda_matches_reference(monkeypatch):
    monkeypatch.setattr(L, "HYBRID_LONG_TOKENS", 1024)
    _cuda_vs_reference("hybrid", (0, 100, 2100, 2101, 2900, 5000))
