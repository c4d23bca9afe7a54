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
  dispatches to; measured the fastest exact option on CPU (see machine-notes). Off CPU it has
  no LSE kernel (LSE requests go to ``"math"``).
* ``"flash"`` FlashAttention's varlen kernel (CUDA, when ``flash_attn`` is installed); its
  forward returns ``softmax_lse``, its backward takes the merged out/LSE (ring attention).
  Called by parameter name, so the private signatures of flash_attn 2.4+ all work.
* ``"flex"``  ``flex_attention`` with a block-sparse document(-causal) ``BlockMask`` built
  from cu_seqlens by tensor code (:func:`doc_block_mask`, never the dense ``[T, T]`` mask;
  cached per cu_seqlens, so all layers / ring steps of a batch share it). On CUDA the kernel
  is ``torch.compile``-d per (device, dtype, head dim, GQA, return_lse) with dynamic token
  dimension (one recompile at the first new batch length, none after; see ``_flex_fn``);
  uncompiled, flex falls back to a dense reference that materialises the full score
  matrix. Its LSE kernels ask flex for the LSE; the block backward against a *merged* out/LSE reuses flex's own
  backward through a rescaled output gradient plus an LSE gradient (see :func:`_bwd_flex`),
  at the cost of recomputing the block forward. Off CUDA flex runs eager (forward only: flex
  has no CPU backward).
* ``"math"``  explicit softmax in fp32, per document; slow, the reference of last resort.

Auto choice: CPU -> sdpa; CUDA -> flash if importable, else flex (compiled), else sdpa
(LSE kernels: flash, else flex, else math); other devices -> sdpa (LSE kernels: math).

Sliding window (``varlen_attention(..., window=w)``, causal, no LSE): query ``i`` of a document
sees keys ``i - w < j <= i`` (HF Mistral's mask). flash: ``window_size=(w - 1, 0)``; flex: the
band is folded into the per-row key intervals of the block mask; elsewhere a per-document SDPA
loop with a banded mask for documents longer than ``w`` (shorter ones are plain causal).

Shapes: q ``[Tq, H, D]``, k/v ``[Tk, Hkv, D]`` with ``H % Hkv == 0`` (GQA: kv heads are
expanded inside the kernel, gradients summed back). LSE: ``[H, Tq]`` float32.
"""

from __future__ import annotations

import functools

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
    """Resolve ``backend`` (None = automatic) for tensors on ``device``.

    ``need_lse``: the caller needs the LSE kernels (``attn_forward`` / ``attn_backward``).
    """
    if backend is not None:
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS} or None, got {backend!r}")
        if backend == "sdpa" and need_lse and device.type != "cpu":
            return "math"     # the SDPA LSE kernels are the ATen CPU ones
        return backend
    if device.type != "cuda":
        return "sdpa" if (device.type == "cpu" or not need_lse) else "math"
    if _have_flash():
        return "flash"
    if _have_flex():
        return "flex"
    return "math" if need_lse else "sdpa"


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
# Values for flash_attn parameters that some versions require and we do not use (no sliding
# window, softcap, ALiBi, dropout RNG state). Passed only where a version has no default.
_FLASH_FILL = {"window_size": (-1, -1), "window_size_left": -1, "window_size_right": -1,
               "softcap": 0.0, "alibi_slopes": None, "deterministic": False,
               "return_softmax": False, "rng_state": None, "block_table": None,
               "zero_tensors": False}


def _call_by_name(fn, **values):
    """Call a flash_attn internal with arguments matched to its parameter names.

    The private varlen forward/backward changed positional signatures across releases
    (``window_size`` tuple -> ``window_size_left/right``, ``softcap`` added, argument order in
    FA3); matching by name keeps every version working. Parameters we have no value for must
    have defaults, else this raises instead of guessing.
    """
    import inspect
    try:
        params = inspect.signature(getattr(fn, "_init_fn", fn)).parameters
    except (TypeError, ValueError):    # opaque callable: trust the 2.6+ names
        return fn(**values, window_size_left=-1, window_size_right=-1, softcap=0.0,
                  alibi_slopes=None, deterministic=False)
    args = {}
    for name, p in params.items():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        if name in values:
            args[name] = values[name]
        elif p.default is p.empty:
            if name not in _FLASH_FILL:
                raise TypeError(f"flash_attn {getattr(fn, '__name__', fn)} has a required "
                                f"parameter {name!r} this module does not know how to fill")
            args[name] = _FLASH_FILL[name]
    return fn(**args)


def _flash_cu(cu, device):
    return torch.as_tensor(list(cu) if not torch.is_tensor(cu) else cu, dtype=torch.int32,
                           device=device)


def _max_len(bounds):
    return max((e - s for s, e in bounds), default=0)


def _fwd_flash(q, k, v, cu_q, cu_k, causal, scale):
    from flash_attn.flash_attn_interface import _flash_attn_varlen_forward
    res = _call_by_name(_flash_attn_varlen_forward, q=q, k=k, v=v,
                        cu_seqlens_q=_flash_cu(cu_q, q.device),
                        cu_seqlens_k=_flash_cu(cu_k, q.device),
                        max_seqlen_q=_max_len(_bounds(cu_q)), max_seqlen_k=_max_len(_bounds(cu_k)),
                        dropout_p=0.0, softmax_scale=scale, causal=causal)
    # 2.6+/FA3: (out, softmax_lse, ...); <= 2.5: (out, q, k, v, out_padded, softmax_lse, ...)
    want = (q.shape[1], q.shape[0])
    lse = next((t for t in res[1:] if torch.is_tensor(t) and t.dtype == torch.float32
                and tuple(t.shape) == want), None)
    if lse is None:
        raise RuntimeError(f"flash_attn varlen forward returned no [H, Tq]={want} float32 LSE; "
                           "flash_attn >= 2.4 (unpadded softmax_lse) is needed")
    return res[0], lse


def _bwd_flash(do, q, k, v, o, lse, cu_q, cu_k, causal, scale):
    from flash_attn.flash_attn_interface import _flash_attn_varlen_backward
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    _call_by_name(_flash_attn_varlen_backward, dout=do, q=q, k=k, v=v, out=o,
                  softmax_lse=lse.contiguous(), dq=dq, dk=dk, dv=dv,
                  cu_seqlens_q=_flash_cu(cu_q, q.device), cu_seqlens_k=_flash_cu(cu_k, q.device),
                  max_seqlen_q=_max_len(_bounds(cu_q)), max_seqlen_k=_max_len(_bounds(cu_k)),
                  dropout_p=0.0, softmax_scale=scale, causal=causal)
    return dq, dk, dv


# ---------------------------------------------------------------- flex_attention kernels
FLEX_BLOCK = 128      # flex_attention's default (and tuned) block size
_BLOCK_CHUNK = 1 << 24  # max elements of the [q-block rows x kv blocks] scratch per step


def row_intervals(cu_q, cu_k, causal, rows=None, device=None, window=None):
    """For every query row, the key interval ``[lo, hi)`` it may see (int32 tensors).

    Segment ``i`` of q attends segment ``i`` of k; with ``causal`` the diagonal is aligned
    bottom-right (query ``p`` of a segment with ``lq`` queries and ``lk`` keys sees keys
    ``< p + lk - lq + 1``), as in flash_attn and the math kernel. Rows past ``cu_q[-1]`` (up
    to ``rows``) get empty intervals. Rows with nothing visible have ``lo == hi``. ``window``
    (causal only): a row sees at most its last ``window`` visible keys (``lo = max(lo, hi - w)``).
    """
    lng = dict(dtype=torch.long, device=device)
    cq, ck = torch.as_tensor(list(cu_q), **lng), torch.as_tensor(list(cu_k), **lng)
    lq, lk = cq.diff(), ck.diff()
    tq = int(cu_q[-1])
    rows = tq if rows is None else rows
    doc = torch.repeat_interleave(torch.arange(len(lq), **lng), lq, output_size=tq)
    lo, hi = ck[:-1][doc], ck[1:][doc]
    if causal:
        pos = torch.arange(tq, **lng) - cq[:-1][doc]
        hi = torch.minimum(hi, lo + pos + (lk - lq)[doc] + 1).clamp_min(lo)
        if window:
            lo = torch.maximum(lo, hi - window)
    pad = torch.zeros(rows - tq, **lng)
    return torch.cat([lo, pad]).to(torch.int32), torch.cat([hi, pad]).to(torch.int32)


def block_sparsity(lo, hi, tk, block_q=FLEX_BLOCK, block_k=FLEX_BLOCK):
    """Block-level view of the interval mask: ``(partial, full)`` bool ``[q blocks, kv blocks]``.

    ``lo``/``hi`` cover whole q blocks (``len % block_q == 0``). A block is *full* when every
    entry is visible (then flex skips mask_mod), *partial* when some but not all are. Same
    convention as ``create_block_mask`` (entries past the sequence ends count as masked),
    but computed from the intervals in ``O(Tq * kv_blocks)`` instead of ``O(Tq * Tk)``.
    """
    nq, nk = lo.shape[0] // block_q, -(-tk // block_k)
    c0 = torch.arange(nk, device=lo.device, dtype=torch.int32) * block_k
    c1 = (c0 + block_k).clamp_max(tk)
    anys, fulls = [], []
    step = max(1, _BLOCK_CHUNK // max(1, block_q * nk))
    for s in range(0, nq, step):
        l = lo[s * block_q:(s + step) * block_q].view(-1, block_q, 1)
        h = hi[s * block_q:(s + step) * block_q].view(-1, block_q, 1)
        anys.append((torch.maximum(l, c0) < torch.minimum(h, c1)).any(1))
        fulls.append(((l <= c0) & (h >= c0 + block_k)).all(1))   # h <= tk: no ragged tail
    if not anys:
        z = torch.zeros(0, nk, dtype=torch.bool, device=lo.device)
        return z, z
    anyb, full = torch.cat(anys), torch.cat(fulls)
    return anyb & ~full, full


def _ordered(dense):
    """[nq, nk] bool -> (count [1,1,nq], indices [1,1,nq,nk]) int32, set blocks first."""
    dense = dense.to(torch.int32)
    num = dense.sum(-1, dtype=torch.int32)
    idx = torch.argsort(dense, dim=-1, descending=True, stable=True).to(torch.int32)
    return num[None, None].contiguous(), idx[None, None].contiguous()


def _interval_mask_mod(lo, hi):
    def doc_mask(b, h, q_idx, kv_idx):
        return (kv_idx >= lo[q_idx]) & (kv_idx < hi[q_idx])
    return doc_mask


@functools.lru_cache(maxsize=16)
def doc_block_mask(cu_q: tuple, cu_k: tuple, causal: bool, device: torch.device,
                   block: int = FLEX_BLOCK, window: int | None = None):
    """flex_attention ``BlockMask`` for packed documents (segment i of q sees segment i of k,
    causally when ``causal``). Cached per arguments (tuples of ints): every layer and ring step
    of a batch reuses it. Built with tensor ops on ``device``, no ``[Tq, Tk]`` mask."""
    from torch.nn.attention.flex_attention import BlockMask
    tq, tk = int(cu_q[-1]), int(cu_k[-1])
    rows = -(-max(tq, 1) // block) * block
    lo, hi = row_intervals(cu_q, cu_k, causal, rows, device, window)
    partial, full = block_sparsity(lo, hi, tk, block, block)
    kv_num, kv_idx = _ordered(partial)
    full_num, full_idx = _ordered(full)
    return BlockMask.from_kv_blocks(kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=block,
                                    mask_mod=_interval_mask_mod(lo, hi), seq_lengths=(tq, tk))


def _compile_flex(device_type: str) -> bool:
    """Compile flex where inductor has its fused kernel with a backward (CUDA)."""
    return device_type == "cuda"


@functools.lru_cache(None)
def _flex_fn(device_type: str, dtype: torch.dtype, head_dim: int, gqa: bool, return_lse: bool):
    """flex_attention, compiled once per key on CUDA (eager elsewhere).

    Dynamo keys its code cache on the function, so the per-key entries are separate graphs
    of one compiled function (a handful per run, well under dynamo's recompile limit). The
    token dimension and the block mask's block counts are marked dynamic at call time; the
    mask's ``seq_lengths`` are Python ints, so the first *new* batch length recompiles once
    (dynamo's automatic dynamic shapes then make them symbolic) and later lengths reuse that
    graph (checked on CPU with inductor: lengths 300, 700, 1300 -> 2 graphs).
    """
    from torch.nn.attention.flex_attention import flex_attention
    if not _compile_flex(device_type):
        return flex_attention
    return torch.compile(flex_attention)


def _mark_dynamic(qh, kh, vh, bm):
    """Token dims of q/k/v ``[1,H,T,D]`` and the block counts of ``bm`` vary per batch."""
    mark = torch._dynamo.maybe_mark_dynamic
    for x in (qh, kh, vh):
        mark(x, 2)
    for name in ("kv_num_blocks", "full_kv_num_blocks", "q_num_blocks", "full_q_num_blocks"):
        t = getattr(bm, name, None)
        if t is not None:
            mark(t, t.dim() - 1)
    for name in ("kv_indices", "full_kv_indices", "q_indices", "full_q_indices"):
        t = getattr(bm, name, None)
        if t is not None:
            mark(t, t.dim() - 2)
            mark(t, t.dim() - 1)


def _flex(q, k, v, cu_q, cu_k, causal, scale, return_lse, window=None):
    """flex_attention over packed segments: q ``[Tq,H,D]`` -> out ``[Tq,H,D]``
    (and lse ``[H,Tq]`` with ``return_lse``)."""
    gqa = q.shape[1] != k.shape[1]
    if q.shape[0] == 0 or k.shape[0] == 0:   # nothing to attend: out 0, lse -inf
        out = q.new_zeros(q.shape) + 0 * (q.sum() + k.sum() + v.sum())   # keeps autograd
        lse = torch.full((q.shape[1], q.shape[0]), float("-inf"), device=q.device)
        return (out, lse) if return_lse else out
    bm = doc_block_mask(tuple(int(c) for c in cu_q), tuple(int(c) for c in cu_k), bool(causal),
                        q.device, FLEX_BLOCK, window or None)
    fn = _flex_fn(q.device.type, q.dtype, q.shape[-1], gqa, return_lse)
    qh, kh, vh = (x.transpose(0, 1).unsqueeze(0) for x in (q, k, v))
    if _compile_flex(q.device.type):
        _mark_dynamic(qh, kh, vh, bm)
    if not return_lse:
        return fn(qh, kh, vh, block_mask=bm, scale=scale, enable_gqa=gqa)[0].transpose(0, 1)
    aux = _flex_lse_request()
    if aux is None:        # torch without AuxRequest: the older return_lse flag
        o, lse = fn(qh, kh, vh, block_mask=bm, scale=scale, enable_gqa=gqa, return_lse=True)
    else:
        o, out_aux = fn(qh, kh, vh, block_mask=bm, scale=scale, enable_gqa=gqa, return_aux=aux)
        lse = out_aux.lse
    return o[0].transpose(0, 1), lse[0].float()


@functools.lru_cache(None)
def _flex_lse_request():
    """``AuxRequest(lse=True)`` where flex has it (``return_lse`` is deprecated), else None."""
    try:
        from torch.nn.attention.flex_attention import AuxRequest
        return AuxRequest(lse=True)
    except ImportError:
        return None


def _fwd_flex(q, k, v, cu_q, cu_k, causal, scale):
    return _flex(q, k, v, cu_q, cu_k, causal, scale, return_lse=True)


def _bwd_flex(do, q, k, v, o, lse, cu_q, cu_k, causal, scale):
    """Block gradients against the merged ``o``/``lse`` of several blocks, via flex's backward.

    With ``P = exp(S - lse)`` the wanted gradients are ``dV = P^T dO`` and
    ``dS = P * (dO V^T - delta)``, ``delta = rowsum(dO * o)``. Flex recomputes this block's
    ``o_b``, ``lse_b``; with ``c = exp(lse_b - lse)`` we have ``P = c * P_b``, and backprop of
    ``(o_b, lse_b)`` with gradients ``g = c * dO`` and ``g_lse = c * rowsum(dO * (o_b - o))``
    gives ``dS = P_b * (g V^T - rowsum(g * o_b) + g_lse) = P * (dO V^T - delta)`` and
    ``dV = P_b^T g = P^T dO``: exactly the block's share. (When ``o``, ``lse`` are this
    block's own, c = 1 and g_lse = 0: the plain flex backward.)
    """
    if q.shape[0] == 0 or k.shape[0] == 0:
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    with torch.enable_grad():
        qq, kk, vv = (x.detach().requires_grad_() for x in (q, k, v))
        ob, lb = _flex(qq, kk, vv, cu_q, cu_k, causal, scale, return_lse=True)
        c = torch.where(torch.isneginf(lse), torch.zeros_like(lse),
                        torch.exp(lb.detach().float() - lse.float()))      # [H, Tq]
        ct = c.t().unsqueeze(-1)                                           # [Tq, H, 1]
        dof = do.float()
        g = (dof * ct).to(ob.dtype)
        g_lse = (ct[..., 0] * (dof * (ob.detach().float() - o.float())).sum(-1)).t()
        return torch.autograd.grad((ob, lb), (qq, kk, vv), (g, g_lse.to(lb.dtype)))


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
    if backend == "flex":
        return _fwd_flex(q, k, v, cu_q, cu_k, causal, scale)
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
    if backend == "flex":
        return _bwd_flex(dout, q, k, v, out, lse, cu_q, cu_k, causal, scale)
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


def _sdpa_window_loop(q, k, v, bounds, scale, window):
    """Causal sliding-window attention per document by SDPA (autograd through SDPA): documents
    longer than ``window`` get a banded boolean mask (query i sees keys j, 0 <= i - j < window),
    the others plain causal."""
    outs, g = [], q.shape[1] // k.shape[1]
    for qs, qe in bounds:
        if qe == qs:
            continue
        qd, kd, vd = q[qs:qe].transpose(0, 1)[None], _expand(k[qs:qe], g), _expand(v[qs:qe], g)
        if qe - qs > window:
            i = torch.arange(qe - qs, device=q.device)
            diff = i[:, None] - i[None, :]
            o = F.scaled_dot_product_attention(qd, kd, vd, attn_mask=(diff >= 0) & (diff < window),
                                               scale=scale)
        else:
            o = F.scaled_dot_product_attention(qd, kd, vd, is_causal=True, scale=scale)
        outs.append(o[0].transpose(0, 1))
    return torch.cat(outs) if outs else q.new_zeros(q.shape)


def _flash_window(q, k, v, cu, scale, window):
    """flash_attn's varlen kernel with ``window_size=(window - 1, 0)`` (its own autograd)."""
    from flash_attn import flash_attn_varlen_func
    t = _flash_cu(cu, q.device)
    m = _max_len(_bounds(cu))
    return flash_attn_varlen_func(q, k, v, t, t, m, m, dropout_p=0.0, softmax_scale=scale,
                                  causal=True, window_size=(window - 1, 0))


def varlen_attention(q, k, v, cu_seqlens, causal=True, return_lse=False, backend=None, *,
                     cu_seqlens_k=None, scale=None, window=None):
    """Attention over packed documents, each attending only to itself (autograd-aware).

    q ``[T, H, D]``, k/v ``[T, Hkv, D]`` (GQA when ``Hkv < H``), ``cu_seqlens`` list or int
    tensor ``[0, l0, l0+l1, ..., T]``. ``cu_seqlens_k`` (default: ``cu_seqlens``) lets keys be
    segmented differently from queries (non-causal blocks only). Returns out ``[T, H, D]``,
    and with ``return_lse=True`` also the log-sum-exp ``[H, T]`` float32 (not differentiable).

    ``window`` (sliding-window attention, causal only; None/0 = full): query ``i`` of a document
    sees keys ``j`` with ``0 <= i - j < window`` (HF Mistral's mask; flash_attn
    ``window_size=(window - 1, 0)``). Documents no longer than the window are plain causal. Runs
    on flash (CUDA), flex (block mask with the band) or a per-document SDPA loop with a banded
    mask (CPU and elsewhere); no LSE output.
    """
    cu_k = cu_seqlens if cu_seqlens_k is None else cu_seqlens_k
    cu_q = cu_seqlens.tolist() if torch.is_tensor(cu_seqlens) else list(cu_seqlens)
    cu_k = cu_k.tolist() if torch.is_tensor(cu_k) else list(cu_k)
    if causal and cu_q != cu_k:
        raise ValueError("causal attention needs cu_seqlens_k == cu_seqlens")
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if window and max((e - s for s, e in zip(cu_q[:-1], cu_q[1:])), default=0) > window:
        if not causal or return_lse or cu_q != cu_k:
            raise ValueError("window needs causal=True, return_lse=False and cu_seqlens_k == cu_seqlens")
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        _check(q, k, v, cu_q, cu_k)
        name = pick_backend(q.device, backend)
        if name == "flash":
            return _flash_window(q, k, v, cu_q, scale, window)
        if name == "flex":
            return _flex(q, k, v, cu_q, cu_k, True, scale, False, window)
        return _sdpa_window_loop(q, k, v, _bounds(cu_q), scale, window)
    name = pick_backend(q.device, backend, need_lse=return_lse)
    if name == "flex":       # flex's own autograd (its backward kernel), no LSE gradient
        res = _flex(q, k, v, cu_q, cu_k, causal, scale, return_lse)
        return (res[0], res[1].detach()) if return_lse else res
    if name == "sdpa" and q.device.type != "cpu":
        # autograd through per-document SDPA (its LSE kernel is CPU-only; with return_lse
        # pick_backend already chose "math")
        return _sdpa_loop(q, k, v, cu_q, cu_k, causal, scale)
    out, lse = _VarlenAttention.apply(q, k, v, cu_q, cu_k, causal, scale, name)
    return (out, lse) if return_lse else out
