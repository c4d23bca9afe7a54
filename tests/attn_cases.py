"""Shared helpers for the attention tests: inputs, the single-process reference, checks.

The reference is deliberately independent of flexsp: one ``F.scaled_dot_product_attention``
call per document with kv heads expanded, in float32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from flexsp.attention import shard, sp_attention, unshard

# Tolerances.
# fp32: the distributed result differs from the reference only by summation order (online
#   softmax merging across ring steps, per-block kernels), a few fp32 ulps on O(1) values;
#   1e-5 absolute/relative leaves headroom over the ~1e-6 seen, and would catch any masking
#   or indexing bug (those are O(0.1) errors).
FP32_TOL = dict(atol=1e-5, rtol=1e-5)
# bf16: inputs are bf16 (8-bit mantissa, relative rounding 2^-8 ~ 3.9e-3); the distributed
#   path rounds partial outputs / gradients to bf16 at different points than the fp32
#   reference computed from the same bf16 inputs, so errors of a few bf16 ulps on O(1)
#   values are expected: 3e-2 absolute and relative.
BF16_TOL = dict(atol=3e-2, rtol=3e-2)


def make_inputs(cu, heads, kv_heads, dim, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    T = cu[-1]
    q, k, v = (torch.randn(T, h, dim, generator=g).to(dtype) for h in (heads, kv_heads, kv_heads))
    dout = torch.randn(T, heads, dim, generator=g).to(dtype)
    return q, k, v, dout


def reference(q, k, v, cu, causal=True):
    """Per-document attention in float32; returns out."""
    H, Hk = q.shape[1], k.shape[1]
    outs = []
    for a, b in zip(cu[:-1], cu[1:]):
        if a == b:
            continue
        t = lambda x, rep: x[a:b].float().repeat_interleave(rep, 1).transpose(0, 1)  # noqa
        o = F.scaled_dot_product_attention(t(q, 1), t(k, H // Hk), t(v, H // Hk), is_causal=causal)
        outs.append(o.transpose(0, 1))
    return torch.cat(outs)


def reference_grads(q, k, v, dout, cu, causal=True):
    q, k, v = (x.detach().float().requires_grad_() for x in (q, k, v))
    out = reference(q, k, v, cu, causal)
    grads = torch.autograd.grad(out, (q, k, v), dout.float())
    return out.detach(), grads


def check_case(group, mode, cu, nheads, kv_heads, dtype, dim=16, seed=0, causal=True, **kw):
    """Run one distributed case on this rank and assert it matches the reference."""
    q, k, v, dout = make_inputs(cu, nheads, kv_heads, dim, dtype, seed)
    ref_out, ref_grads = reference_grads(q, k, v, dout, cu, causal)
    ql, meta = shard(q, cu, group, mode, **kw)
    kl, _ = shard(k, cu, group, mode, meta=meta)
    vl, _ = shard(v, cu, group, mode, meta=meta)
    ql, kl, vl = (x.detach().requires_grad_() for x in (ql, kl, vl))
    out = sp_attention(ql, kl, vl, meta, group, mode, causal=causal)
    full = unshard(out, meta, group)
    (full.float() * dout.float()).sum().backward()
    tol = FP32_TOL if dtype == torch.float32 else BF16_TOL
    torch.testing.assert_close(full.float(), ref_out, **tol)
    for name, got, want in zip("qkv", (ql.grad, kl.grad, vl.grad), ref_grads):
        want_local, _ = shard(want, cu, group, mode, meta=meta)
        torch.testing.assert_close(got.float(), want_local, **tol, msg=lambda m, n=name: f"d{n}: {m}")
    return meta
