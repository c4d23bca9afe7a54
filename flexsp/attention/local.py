"""Single-device attention over packed variable-length documents.

Two layers:

* ``attn_forward`` / ``attn_backward``: block kernels that return / consume the log-sum-exp
  (LSE). Ring attention needs them: it merges partial outputs with the LSE and runs each
  block's backward against the *merged* output and LSE (as ring-flash-attention does).
  q rows are split by ``cu_q``, k/v rows by ``cu_k`` (segment i of q attends segment i of k).
* ``varlen_attention``: the public, autograd-aware entry point for single-device attention.

Backends (``backend=None`` picks automatically, any name overrides):

* ``"sdpa"``  per-document causal SDPA loop. On CPU the LSE kernels call the ATen CPU flash
  kernel (``_scaled_dot_product_flash_attention_for_cpu`` and its backward) that SDPA itself
  dispatches to; measured the fastest exact option on CPU (see machine-notes).
* ``"flash"`` FlashAttention's varlen kernel (CUDA, when ``flash_attn`` is installed).
* ``"flex"``  ``flex_attention`` with a document mask (CUDA; it has no CPU backward).
  Its LSE kernels fall back to ``"math"``.
* ``"math"``  explicit softmax in fp32, per document; slow, the reference of last resort.

Auto choice: CPU -> sdpa; CUDA -> flash if importable, else flex, else sdpa (LSE kernels:
flash if importable, else math).

Shapes: q ``[Tq, H, D]``, k/v ``[Tk, Hkv, D]`` with ``H % Hkv == 0`` (GQA: kv heads are
expanded inside the kernel, gradients summed back). LSE: ``[H, Tq]`` float32.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

BACKENDS = ("sdpa", "flash", "flex", "math")


@functools.lru_cache(None)
def _have_flash() -> bool:
    try:
        import flash_attn  # noqa: F401
        return True
    except Exception:
        return False


@functools.lru_cache(None)
def _have_flex() -> bool:
    try:
        from torch.nn.attention.flex_attention import flex_attention  # noqa: F401
        return True
    except Exception:
        return False


def pick_backend(device: torch.device, backend: str | None = None, need_lse: bool = False) -> str:
    """Resolve ``backend`` (None = automatic) for tensors on ``device``."""
    if backend is not None:
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS} or None, got {backend!r}")
        if backend == "flex" and need_lse:
            return "math"
        if backend == "sdpa" and need_lse and device.type != "cpu":
            return "math"
        return backend
    if device.type != "cuda":
        return "sdpa" if (device.type == "cpu" or not need_lse) else "math"
    if _have_flash():
        return "flash"
    if need_lse:
        return "math"
    return "flex" if _have_flex() else "sdpa"


def _bounds(cu) -> list[tuple[int, int]]:
    cu = cu.tolist() if torch.is_tensor(cu) else list(cu)
    return list(zip(cu[:-1], cu[1:]))


def _check(q, k, v, cu_q, cu_k):
    if q.dim() != 3 or k.dim() != 3 or v.shape != k.shape:
        raise ValueError(f"expected q [T,H,D], k/v [T,Hkv,D]; got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"q heads ({q.shape[1]}) must be a multiple of kv heads ({k.shape[1]})")
    bq, bk = _bounds(cu_q), _bounds(cu_k)
    if len(bq) != len(bk) or bq[-1:] and (bq[-1][1] != q.shape[0] or bk[-1][1] != k.shape[0]):
        raise ValueError(f"cu_seqlens do not cover the inputs: q rows {q.shape[0]}, "
                         f"cu_q {cu_q}; k rows {k.shape[0]}, cu_k {cu_k}")
    return bq, bk


def _expand(x, groups):   # [L, Hkv, D] -> [1, H, L, D]
    return x.repeat_interleave(groups, dim=1).transpose(0, 1).unsqueeze(0) if groups > 1 \
        else x.transpose(0, 1).unsqueeze(0)


def _fold(dx, groups):    # [1, H, L, D] -> [L, Hkv, D], summing GQA replicas
    dx = dx[0].transpose(0, 1)
    if groups > 1:
        dx = dx.unflatten(1, (-1, groups)).sum(2)
    return dx


# ---------------------------------------------------------------- math (reference) kernels
def _math_scores(q, k, causal, scale):
    s = torch.einsum("hqd,hkd->hqk", q.float(), k.float()) * scale
    if causal:
        lq, lk = q.shape[1], k.shape[1]
        mask = torch.ones(lq, lk, dtype=torch.bool, device=q.device).tril(lk - lq)
        s = s.masked_fill(~mask, float("-inf"))
    return s


def _fwd_math_doc(q, k, v, causal, scale):   # [1,H,L,D] each
    s = _math_scores(q[0], k[0], causal, scale)
    lse = torch.logsumexp(s, -1)
    out = torch.einsum("hqk,hkd->hqd", torch.exp(s - lse[..., None]), v[0].float())
    return out.unsqueeze(0).to(q.dtype), lse.unsqueeze(0)


def _bwd_math_doc(do, q, k, v, o, lse, causal, scale):
    q0, k0, v0, do0 = q[0].float(), k[0].float(), v[0].float(), do[0].float()
    p = torch.exp(_math_scores(q[0], k[0], causal, scale) - lse[0][..., None])
    dv = torch.einsum("hqk,hqd->hkd", p, do0)
    dp = torch.einsum("hqd,hkd->hqk", do0, v0)
    delta = (do0 * o[0].float()).sum(-1, keepdim=True)
    ds = p * (dp - delta) * scale
    dq = torch.einsum("hqk,hkd->hqd", ds, k0)
    dk = torch.einsum("hqk,hqd->hkd", ds, q0)
    return tuple(t.unsqueeze(0).to(q.dtype) for t in (dq, dk, dv))


# ---------------------------------------------------------------- CPU flash (SDPA) kernels
def _fwd_sdpa_doc(q, k, v, causal, scale):
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q, k, v, 0.0, causal, scale=scale)


def _bwd_sdpa_doc(do, q, k, v, o, lse, causal, scale):
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        do, q, k, v, o, lse, 0.0, causal, scale=scale)


_DOC_FWD = {"sdpa": _fwd_sdpa_doc, "math": _fwd_math_doc}
_DOC_BWD = {"sdpa": _bwd_sdpa_doc, "math": _bwd_math_doc}


# ---------------------------------------------------------------- flash_attn (CUDA) kernels
def _flash_cu(cu, device):
    return torch.as_tensor(list(cu) if not torch.is_tensor(cu) else cu, dtype=torch.int32,
                           device=device)


def _fwd_flash(q, k, v, cu_q, cu_k, causal, scale):
    from flash_attn.flash_attn_interface import _flash_attn_varlen_forward
    bq, bk = _bounds(cu_q), _bounds(cu_k)
    mq, mk = max((e - s for s, e in bq), default=0), max((e - s for s, e in bk), default=0)
    res = _flash_attn_varlen_forward(q, k, v, _flash_cu(cu_q, q.device), _flash_cu(cu_k, q.device),
                                     mq, mk, 0.0, scale, causal=causal)
    return res[0], res[1]   # out, softmax_lse [H, Tq]


def _bwd_flash(do, q, k, v, o, lse, cu_q, cu_k, causal, scale):
    from flash_attn.flash_attn_interface import _flash_attn_varlen_backward
    bq, bk = _bounds(cu_q), _bounds(cu_k)
    mq, mk = max((e - s for s, e in bq), default=0), max((e - s for s, e in bk), default=0)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    _flash_attn_varlen_backward(do, q, k, v, o, lse.contiguous(), dq, dk, dv,
                                _flash_cu(cu_q, q.device), _flash_cu(cu_k, q.device),
                                mq, mk, 0.0, scale, causal)
    return dq, dk, dv


# ---------------------------------------------------------------- LSE block kernels
def attn_forward(q, k, v, cu_q, cu_k, causal=True, scale=None, backend=None):
    """Block forward. Returns ``(out [Tq,H,D] in q.dtype, lse [H,Tq] float32)``.

    Rows with no visible key get out 0 and lse -inf.
    """
    bq, bk = _check(q, k, v, cu_q, cu_k)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    backend = pick_backend(q.device, backend, need_lse=True)
    if backend == "flash":
        return _fwd_flash(q, k, v, cu_q, cu_k, causal, scale)
    g = q.shape[1] // k.shape[1]
    out = q.new_zeros(q.shape)
    lse = torch.full((q.shape[1], q.shape[0]), float("-inf"), dtype=torch.float32,
                     device=q.device)
    fwd = _DOC_FWD[backend]
    for (qs, qe), (ks, ke) in zip(bq, bk):
        if qe == qs or ke == ks:
            continue
        o, l = fwd(q[qs:qe].transpose(0, 1).unsqueeze(0), _expand(k[ks:ke], g),
                   _expand(v[ks:ke], g), causal, scale)
        out[qs:qe] = o[0].transpose(0, 1)
        lse[:, qs:qe] = l[0]
    return out, lse


def attn_backward(dout, q, k, v, out, lse, cu_q, cu_k, causal=True, scale=None, backend=None):
    """Block backward against the (possibly merged) ``out`` and ``lse``. Returns dq, dk, dv."""
    bq, bk = _check(q, k, v, cu_q, cu_k)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    backend = pick_backend(q.device, backend, need_lse=True)
    if backend == "flash":
        return _bwd_flash(dout, q, k, v, out, lse, cu_q, cu_k, causal, scale)
    g = q.shape[1] // k.shape[1]
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    bwd = _DOC_BWD[backend]
    t = lambda x: x.transpose(0, 1).unsqueeze(0)  # noqa: E731  [L,H,D] -> [1,H,L,D]
    for (qs, qe), (ks, ke) in zip(bq, bk):
        if qe == qs or ke == ks:
            continue
        gq, gk, gv = bwd(t(dout[qs:qe]), t(q[qs:qe]), _expand(k[ks:ke], g), _expand(v[ks:ke], g),
                         t(out[qs:qe]), lse[:, qs:qe].unsqueeze(0), causal, scale)
        dq[qs:qe] = gq[0].transpose(0, 1)
        dk[ks:ke] = _fold(gk, g)
        dv[ks:ke] = _fold(gv, g)
    return dq, dk, dv


class _VarlenAttention(torch.autograd.Function):
    """forward: attn_forward (out, lse) / backward: attn_backward (lse is not differentiable)."""

    @staticmethod
    def forward(ctx, q, k, v, cu_q, cu_k, causal, scale, backend):
        out, lse = attn_forward(q, k, v, cu_q, cu_k, causal, scale, backend)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.args = (cu_q, cu_k, causal, scale, backend)
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = attn_backward(dout.contiguous(), q, k, v, out, lse, *ctx.args)
        return dq, dk, dv, None, None, None, None, None


def _flex_attention(q, k, v, cu, causal, scale):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    T = q.shape[0]
    doc = torch.repeat_interleave(torch.arange(len(cu) - 1, device=q.device),
                                  torch.as_tensor(cu, device=q.device).diff())

    def mask_mod(b, h, qi, ki):
        m = doc[qi] == doc[ki]
        return m & (qi >= ki) if causal else m

    bm = create_block_mask(mask_mod, None, None, T, T, device=q.device)
    o = flex_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                       block_mask=bm, scale=scale, enable_gqa=q.shape[1] != k.shape[1])
    return o[0].transpose(0, 1)


def _sdpa_loop(q, k, v, cu_q, cu_k, causal, scale):
    outs, g = [], q.shape[1] // k.shape[1]
    for (qs, qe), (ks, ke) in zip(_bounds(cu_q), _bounds(cu_k)):
        if qe == qs:
            continue
        if ke == ks:
            outs.append(q.new_zeros(q[qs:qe].shape))
            continue
        o = F.scaled_dot_product_attention(q[qs:qe].transpose(0, 1)[None], _expand(k[ks:ke], g),
                                           _expand(v[ks:ke], g), is_causal=causal, scale=scale)
        outs.append(o[0].transpose(0, 1))
    return torch.cat(outs) if outs else q.new_zeros(q.shape)


def varlen_attention(q, k, v, cu_seqlens, causal=True, return_lse=False, backend=None, *,
                     cu_seqlens_k=None, scale=None):
    """Attention over packed documents, each attending only to itself (autograd-aware).

    q ``[T, H, D]``, k/v ``[T, Hkv, D]`` (GQA when ``Hkv < H``), ``cu_seqlens`` list or int
    tensor ``[0, l0, l0+l1, ..., T]``. ``cu_seqlens_k`` (default: ``cu_seqlens``) lets keys be
    segmented differently from queries (non-causal blocks only). Returns out ``[T, H, D]``,
    and with ``return_lse=True`` also the log-sum-exp ``[H, T]`` float32 (not differentiable).
    """
    cu_k = cu_seqlens if cu_seqlens_k is None else cu_seqlens_k
    cu_q = cu_seqlens.tolist() if torch.is_tensor(cu_seqlens) else list(cu_seqlens)
    cu_k = cu_k.tolist() if torch.is_tensor(cu_k) else list(cu_k)
    if causal and cu_q != cu_k:
        raise ValueError("causal attention needs cu_seqlens_k == cu_seqlens")
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    name = pick_backend(q.device, backend, need_lse=return_lse)
    if name == "flex" and not return_lse and cu_q == cu_k:
        return _flex_attention(q, k, v, cu_q, causal, scale)
    if name == "flex" or (name == "sdpa" and q.device.type != "cpu"):
        if return_lse or name == "flex":
            name = "math"
        else:   # autograd through per-document SDPA (its LSE kernel is CPU-only)
            return _sdpa_loop(q, k, v, cu_q, cu_k, causal, scale)
    out, lse = _VarlenAttention.apply(q, k, v, cu_q, cu_k, causal, scale, name)
    return (out, lse) if return_lse else out
