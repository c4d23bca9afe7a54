"""Single-device attention over packed variable-length documents.

Two layers:

* ``attn_forward`` / ``attn_backward``: block kernels that return / consume the log-sum-exp
  (LSE). Ring attention needs them: it merges partial outputs with the LSE and runs each
  block's backward against the *merged* output and LSE (as ring-flash-attention does).
  q rows are split by ``cu_q``, k/v rows by ``cu_k`` (segment i of q attends segment i of k).
* ``varlen_attention``: the public, autograd-aware entry point for single-device attention.

Backends (``backend=None`` picks automatically, any name overrides):

* ``"aten_flash"`` (CUDA) the FlashAttention-2 varlen kernels built into PyTorch
  (``aten._flash_attention_forward/_backward``, see flash.py): one launch for all documents,
  LSE in and out, sliding window, GQA without copies. fp16/bf16, head dim a multiple of 8 up to
  256, compute capability 8.0+; probed once per variant, a failing probe warns and the next
  backend runs. Measured on an H200 (benchmarks/results/gpu/): the fastest exact option there.
* ``"flash"`` the ``flash_attn`` package's varlen kernels (CUDA, when installed).
* ``"flex"``  ``flex_attention`` with a block-sparse document(-causal) ``BlockMask`` built from
  cu_seqlens by tensor code (flex.py), compiled per kernel variant on CUDA within a recompile
  budget of its own; a variant past its budget is retired with a warning and its calls take
  the per-document SDPA loop (LSE requests: the math kernel), never an eager dense score matrix.
  Off CUDA flex runs eager (forward only: flex has no CPU backward).
* ``"sdpa"``  per-document causal SDPA loop. On CPU the LSE kernels call the ATen CPU flash
  kernel (``_scaled_dot_product_flash_attention_for_cpu`` and its backward) that SDPA itself
  dispatches to; measured the fastest exact option on CPU (see machine-notes). Off CPU it has
  no LSE kernel (LSE requests go to ``"math"``).
* ``"math"``  explicit softmax in fp32, per document; slow, the reference of last resort.
* ``"hybrid"`` documents of ``HYBRID_LONG_TOKENS`` or more by one SDPA call each (cuDNN on Hopper,
  1.7x torch's FlashAttention-2 on long documents on an H200), the shorter ones packed into one
  call of the automatic kernel; no LSE (LSE requests take the automatic kernel). Not automatic yet:
  its combined speed, and the cost of cuDNN plans for ever new document lengths, are unmeasured.

Auto choice: CPU -> sdpa; CUDA -> flash if importable, else aten_flash where it runs the
inputs, else flex (compiled), else sdpa (LSE kernels: math); other devices -> sdpa (LSE: math).

Sliding window (``varlen_attention(..., window=w)``, causal, no LSE): query ``i`` of a document
sees keys ``i - w < j <= i`` (HF Mistral's mask). flash/aten_flash: ``window_size=(w - 1, 0)``;
flex: the band is folded into the per-row key intervals of the block mask; elsewhere a
per-document SDPA loop with a banded mask for documents longer than ``w``.

Shapes: q ``[Tq, H, D]``, k/v ``[Tk, Hkv, D]`` with ``H % Hkv == 0`` (GQA: kv heads are
expanded inside the kernel, gradients summed back). LSE: ``[H, Tq]`` float32. Boundaries are
host-side ints (lists, tuples or CPU tensors): no kernel reads them back from the device.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from . import flash as FA
from . import flex as FX
from .flex import doc_block_mask, row_intervals  # noqa: F401 (re-exported)

BACKENDS = ("sdpa", "flash", "aten_flash", "flex", "math", "hybrid")
_LSE_BACKENDS = ("flash", "aten_flash", "flex", "math", "sdpa")


def _have_flash() -> bool:
    return FA.have_flash_attn()


@functools.lru_cache(None)
def _have_flex() -> bool:
    try:
        from torch.nn.attention.flex_attention import flex_attention  # noqa: F401

        return True
    except Exception:
        return False


def _aten_flash_ok(device, dtype, head_dim, gqa) -> bool:
    if dtype is None or head_dim is None:
        return False
    return FA.aten_flash_usable(torch.device(device), dtype, int(head_dim), bool(gqa))


def pick_backend(
    device: torch.device,
    backend: str | None = None,
    need_lse: bool = False,
    *,
    dtype: torch.dtype | None = None,
    head_dim: int | None = None,
    gqa: bool = False,
) -> str:
    """Resolve ``backend`` (None = automatic) for tensors on ``device``.

    ``need_lse``: the caller needs the LSE kernels (``attn_forward`` / ``attn_backward``).
    ``dtype``/``head_dim``/``gqa`` describe the inputs (torch's flash kernels are chosen only
    for inputs they run; without them they are not considered).
    """
    if backend == "hybrid" and need_lse:
        backend = None  # the LSE block kernels are whole-buffer kernels: the automatic one
    if backend is not None:
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS} or None, got {backend!r}")
        if backend == "sdpa" and need_lse and device.type != "cpu":
            return "math"  # the SDPA LSE kernels are the ATen CPU ones
        return backend
    if device.type != "cuda":
        return "sdpa" if (device.type == "cpu" or not need_lse) else "math"
    if _have_flash():
        return "flash"
    if _aten_flash_ok(device, dtype, head_dim, gqa):
        return "aten_flash"
    if _have_flex():
        return "flex"
    return "math" if need_lse else "sdpa"


def _pick(q, k, backend, need_lse):
    return pick_backend(
        q.device, backend, need_lse, dtype=q.dtype, head_dim=q.shape[-1], gqa=q.shape[1] != k.shape[1]
    )


def _bounds(cu) -> list[tuple[int, int]]:
    return FA.bounds(cu)


def _check(q, k, v, cu_q, cu_k):
    if q.dim() != 3 or k.dim() != 3 or v.shape != k.shape:
        raise ValueError(
            f"expected q [T,H,D], k/v [T,Hkv,D]; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"q heads ({q.shape[1]}) must be a multiple of kv heads ({k.shape[1]})")
    bq, bk = _bounds(cu_q), _bounds(cu_k)
    if len(bq) != len(bk) or bq[-1:] and (bq[-1][1] != q.shape[0] or bk[-1][1] != k.shape[0]):
        raise ValueError(
            f"cu_seqlens do not cover the inputs: q rows {q.shape[0]}, "
            f"cu_q {cu_q}; k rows {k.shape[0]}, cu_k {cu_k}"
        )
    return bq, bk


def _expand(x, groups):  # [L, Hkv, D] -> [1, H, L, D]
    return (
        x.repeat_interleave(groups, dim=1).transpose(0, 1).unsqueeze(0)
        if groups > 1
        else x.transpose(0, 1).unsqueeze(0)
    )


def _fold(dx, groups):  # [1, H, L, D] -> [L, Hkv, D], summing GQA replicas
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


def _fwd_math_doc(q, k, v, causal, scale):  # [1,H,L,D] each
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
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, scale=scale)


def _bwd_sdpa_doc(do, q, k, v, o, lse, causal, scale):
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        do, q, k, v, o, lse, 0.0, causal, scale=scale
    )


_DOC_FWD = {"sdpa": _fwd_sdpa_doc, "math": _fwd_math_doc}
_DOC_BWD = {"sdpa": _bwd_sdpa_doc, "math": _bwd_math_doc}


# ---------------------------------------------------------------- LSE block kernels
_FLASH_FWD = {"flash": FA.pkg_forward, "aten_flash": FA.aten_forward}
_FLASH_BWD = {"flash": FA.pkg_backward, "aten_flash": FA.aten_backward}


def attn_forward(q, k, v, cu_q, cu_k, causal=True, scale=None, backend=None, window=None):
    """Block forward. Returns ``(out [Tq,H,D] in q.dtype, lse [H,Tq] float32)``.

    Rows with no visible key get out 0 and lse -inf. ``window`` only on the flash backends.
    """
    bq, bk = _check(q, k, v, cu_q, cu_k)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    backend = _pick(q, k, backend, need_lse=True)
    if backend in _FLASH_FWD:
        return _FLASH_FWD[backend](q, k, v, cu_q, cu_k, causal, scale, window)
    if window:
        raise ValueError(f"window needs a flash backend for the LSE kernels, got {backend!r}")
    if backend == "flex":
        res = FX.flex_forward(q, k, v, cu_q, cu_k, causal, scale, True)
        if res is not None:
            return res
        backend = "math"  # variant retired (warned once): exact, per document
    g = q.shape[1] // k.shape[1]
    out = q.new_zeros(q.shape)
    lse = torch.full((q.shape[1], q.shape[0]), float("-inf"), dtype=torch.float32, device=q.device)
    fwd = _DOC_FWD[backend]
    for (qs, qe), (ks, ke) in zip(bq, bk):
        if qe == qs or ke == ks:
            continue
        o, l = fwd(
            q[qs:qe].transpose(0, 1).unsqueeze(0), _expand(k[ks:ke], g), _expand(v[ks:ke], g), causal, scale
        )
        out[qs:qe] = o[0].transpose(0, 1)
        lse[:, qs:qe] = l[0]
    return out, lse


def attn_backward(dout, q, k, v, out, lse, cu_q, cu_k, causal=True, scale=None, backend=None, window=None):
    """Block backward against the (possibly merged) ``out`` and ``lse``. Returns dq, dk, dv."""
    bq, bk = _check(q, k, v, cu_q, cu_k)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    backend = _pick(q, k, backend, need_lse=True)
    if backend in _FLASH_BWD:
        return _FLASH_BWD[backend](dout, q, k, v, out, lse, cu_q, cu_k, causal, scale, window)
    if backend == "flex":
        res = FX.flex_block_backward(dout, q, k, v, out, lse, cu_q, cu_k, causal, scale)
        if res is not None:
            return res
        backend = "math"
    g = q.shape[1] // k.shape[1]
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    bwd = _DOC_BWD[backend]
    t = lambda x: x.transpose(0, 1).unsqueeze(0)  # noqa: E731  [L,H,D] -> [1,H,L,D]
    for (qs, qe), (ks, ke) in zip(bq, bk):
        if qe == qs or ke == ks:
            continue
        gq, gk, gv = bwd(
            t(dout[qs:qe]),
            t(q[qs:qe]),
            _expand(k[ks:ke], g),
            _expand(v[ks:ke], g),
            t(out[qs:qe]),
            lse[:, qs:qe].unsqueeze(0),
            causal,
            scale,
        )
        dq[qs:qe] = gq[0].transpose(0, 1)
        dk[ks:ke] = _fold(gk, g)
        dv[ks:ke] = _fold(gv, g)
    return dq, dk, dv


class _VarlenAttention(torch.autograd.Function):
    """forward: attn_forward (out, lse) / backward: attn_backward (lse is not differentiable)."""

    @staticmethod
    def forward(ctx, q, k, v, cu_q, cu_k, causal, scale, backend, window=None):
        out, lse = attn_forward(q, k, v, cu_q, cu_k, causal, scale, backend, window)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.args = (cu_q, cu_k, causal, scale, backend, window)
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = attn_backward(dout.contiguous(), q, k, v, out, lse, *ctx.args)
        return dq, dk, dv, None, None, None, None, None, None


def _doc_attention(qd, kd, vd, causal, scale, window):
    """One document by SDPA, ``[L, H, D]`` in and out (GQA inside SDPA, no k/v copies)."""
    lq, lk = qd.shape[0], kd.shape[0]
    if lq == 0:
        return qd.new_zeros(qd.shape)
    if lk == 0:
        return qd.new_zeros(qd.shape) + 0 * (kd.sum() + vd.sum())  # keeps autograd
    gqa = qd.shape[1] != kd.shape[1]
    t = lambda x: x.transpose(0, 1)[None]  # noqa: E731   [L, H, D] -> [1, H, L, D]
    if window and causal and lq > window:
        i = torch.arange(lq, device=qd.device)
        diff = i[:, None] - i[None, :]
        o = F.scaled_dot_product_attention(
            t(qd), t(kd), t(vd), attn_mask=(diff >= 0) & (diff < window), scale=scale, enable_gqa=gqa
        )
    else:
        o = F.scaled_dot_product_attention(t(qd), t(kd), t(vd), is_causal=causal, scale=scale, enable_gqa=gqa)
    return o[0].transpose(0, 1)


def _sdpa_loop(q, k, v, cu_q, cu_k, causal, scale, window=None):
    """Autograd through one SDPA call per document. The documents are ``torch.split`` views (one
    concatenation of their gradients in backward, O(tokens); slicing would give every document a
    full-size gradient buffer, O(tokens x documents))."""
    lens_q = [e - s for s, e in _bounds(cu_q)]
    lens_k = [e - s for s, e in _bounds(cu_k)]
    qs = torch.split(q, lens_q)
    ks, vs = (
        (torch.split(k, lens_k), torch.split(v, lens_k))
        if cu_k != cu_q or k.shape[0] != q.shape[0]
        else (torch.split(k, lens_q), torch.split(v, lens_q))
    )
    outs = [_doc_attention(a, b, c, causal, scale, window) for a, b, c in zip(qs, ks, vs)]
    return torch.cat(outs) if outs else q.new_zeros(q.shape)


HYBRID_LONG_TOKENS = 8192
"""``backend="hybrid"``: documents of at least this many tokens run one SDPA call each (cuDNN on
Hopper: 565 vs 328 TFLOP/s forward+backward for torch's FlashAttention-2 at 32K and 128K tokens on
an H200, benchmarks/results/gpu/), the shorter ones one varlen kernel together. At 8K tokens a
document's attention takes milliseconds, so one call's overhead is a few percent."""


def _hybrid(q, k, v, cu, causal, scale, window, short_backend):
    """Long documents by per-document SDPA, the short ones packed into one varlen call."""
    lens = [e - s for s, e in _bounds(cu)]
    long_ = [n >= HYBRID_LONG_TOKENS for n in lens]
    if not any(long_):
        return varlen_attention(q, k, v, cu, causal, backend=short_backend, scale=scale, window=window)
    if all(long_):
        return _sdpa_loop(q, k, v, cu, cu, causal, scale, window)
    qs, ks, vs = (torch.split(x, lens) for x in (q, k, v))
    short = [i for i, is_long in enumerate(long_) if not is_long]
    cu_short = [0]
    for i in short:
        cu_short.append(cu_short[-1] + lens[i])
    packed = varlen_attention(
        torch.cat([qs[i] for i in short]),
        torch.cat([ks[i] for i in short]),
        torch.cat([vs[i] for i in short]),
        cu_short,
        causal,
        backend=short_backend,
        scale=scale,
        window=window,
    )
    short_out = iter(torch.split(packed, [lens[i] for i in short]))
    outs = [
        _doc_attention(qs[i], ks[i], vs[i], causal, scale, window) if is_long else next(short_out)
        for i, is_long in enumerate(long_)
    ]
    return torch.cat(outs)


def _host_list(cu) -> list[int]:
    if torch.is_tensor(cu):
        if cu.device.type != "cpu":
            raise ValueError(
                "cu_seqlens must be host-side (a list, tuple or CPU tensor): reading "
                f"boundaries back from {cu.device} would stall the device every call"
            )
        return [int(c) for c in cu.tolist()]
    return [int(c) for c in cu]


def varlen_attention(
    q,
    k,
    v,
    cu_seqlens,
    causal=True,
    return_lse=False,
    backend=None,
    *,
    cu_seqlens_k=None,
    scale=None,
    window=None,
):
    """Attention over packed documents, each attending only to itself (autograd-aware).

    q ``[T, H, D]``, k/v ``[T, Hkv, D]`` (GQA when ``Hkv < H``), ``cu_seqlens`` host-side ints
    (list, tuple or CPU tensor) ``[0, l0, l0+l1, ..., T]``. ``cu_seqlens_k`` (default:
    ``cu_seqlens``) lets keys be segmented differently from queries (non-causal blocks only).
    Returns out ``[T, H, D]``, and with ``return_lse=True`` also the log-sum-exp ``[H, T]``
    float32 (not differentiable).

    ``window`` (sliding-window attention, causal only; None/0 = full): query ``i`` of a document
    sees keys ``j`` with ``0 <= i - j < window`` (HF Mistral's mask; flash ``window_size=(window -
    1, 0)``). Documents no longer than the window are plain causal. No LSE output with a window.
    """
    cu_q = _host_list(cu_seqlens)
    cu_k = cu_q if cu_seqlens_k is None else _host_list(cu_seqlens_k)
    if causal and cu_q != cu_k:
        raise ValueError("causal attention needs cu_seqlens_k == cu_seqlens")
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if window and max((e - s for s, e in zip(cu_q[:-1], cu_q[1:])), default=0) <= window:
        window = None
    if window:
        if not causal or return_lse or cu_q != cu_k:
            raise ValueError("window needs causal=True, return_lse=False and cu_seqlens_k == cu_seqlens")
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        _check(q, k, v, cu_q, cu_k)
    name = _pick(q, k, backend, need_lse=return_lse)
    if name == "hybrid":
        if cu_q != cu_k:
            raise ValueError("backend='hybrid' needs cu_seqlens_k == cu_seqlens")
        return _hybrid(q, k, v, cu_q, causal, scale, window, short_backend=_pick(q, k, None, False))
    if name in _FLASH_FWD:
        out, lse = _VarlenAttention.apply(q, k, v, cu_q, cu_k, causal, scale, name, window)
        return (out, lse) if return_lse else out
    if window:
        if name == "flex":
            res = FX.flex_forward(q, k, v, cu_q, cu_k, True, scale, False, window)
            if res is not None:
                return res
        return _sdpa_loop(q, k, v, cu_q, cu_q, True, scale, window)
    if name == "flex":  # flex's own autograd (its backward kernel), no LSE gradient
        res = FX.flex_forward(q, k, v, cu_q, cu_k, causal, scale, return_lse)
        if res is not None:
            return (res[0], res[1].detach()) if return_lse else res
        name = "math" if return_lse else "sdpa"  # variant retired (warned once)
    if name == "sdpa" and q.device.type != "cpu":
        # autograd through per-document SDPA (its LSE kernel is CPU-only; with return_lse
        # the choice is already "math")
        return _sdpa_loop(q, k, v, cu_q, cu_k, causal, scale)
    out, lse = _VarlenAttention.apply(q, k, v, cu_q, cu_k, causal, scale, name)
    return (out, lse) if return_lse else out
