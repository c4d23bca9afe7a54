"""``flex_attention`` over packed documents: block-sparse masks from cu_seqlens, and compiled
kernels that stay compiled.

* :func:`doc_block_mask` builds flex's ``BlockMask`` for packed documents (segment ``i`` of q sees
  segment ``i`` of k, bottom-right causal, optional sliding window) with tensor code from the
  per-row key intervals (:func:`row_intervals`), never a dense ``[Tq, Tk]`` mask; cached per
  boundaries, so every layer and ring step of a micro-batch shares it.
* :class:`FlexKernels` keeps ONE compiled callable per kernel variant (device, dtype, head dim,
  GQA, LSE, grad mode), each with its own code object: dynamo keys its cache and its recompile
  limit on the code object, so variants never compete for one limit (a single shared compiled
  ``flex_attention`` silently fell back to eager -- a dense score matrix -- once ring, hybrid,
  grad/no-grad and idle-pass variants passed dynamo's limit of 8). Each variant gets a recompile
  budget of our own (``recompile_budget``); a variant that would exceed it raises inside dynamo
  (``fail_on_recompile_limit_hit``) instead of running eager, is retired with one warning naming
  the reason, and the caller runs its fallback (never a dense ``[T, T]`` matrix). ``paths`` counts
  which path each variant took.
* :func:`flex_forward` / :func:`flex_block_backward`: out (+ LSE), and the gradients of one block
  against a *merged* out/LSE (ring attention) through flex's own backward.

Off CUDA flex runs eager (forward only: flex has no CPU backward); the eager path is a dense
reference, used on CPU by tests only.
"""

from __future__ import annotations

import functools
import types
import warnings
from collections import Counter

import torch
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from flexsp.hostcopy import to_device

FLEX_BLOCK = 128  # flex_attention's default (and tuned) block size
_BLOCK_CHUNK = 1 << 24  # max elements of the [q-block rows x kv blocks] scratch per step
RECOMPILE_BUDGET = 8
"""Compiles allowed per kernel variant: the first shape, the recompile that makes the token
dimension dynamic, and a few for idle passes and divisibility specialisations."""


def row_intervals(cu_q, cu_k, causal, rows=None, device=None, window=None):
    """For every query row, the key interval ``[lo, hi)`` it may see (int32 tensors).

    Segment ``i`` of q attends segment ``i`` of k; with ``causal`` the diagonal is aligned
    bottom-right (query ``p`` of a segment with ``lq`` queries and ``lk`` keys sees keys
    ``< p + lk - lq + 1``), as in flash_attn and the math kernel. Rows past ``cu_q[-1]`` (up
    to ``rows``) get empty intervals. Rows with nothing visible have ``lo == hi``. ``window``
    (causal only): a row sees at most its last ``window`` visible keys (``lo = max(lo, hi - w)``).
    Built on the host and copied once (asynchronously) when ``device`` is a GPU.
    """
    lng = dict(dtype=torch.long)
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
    lo, hi = torch.cat([lo, pad]).to(torch.int32), torch.cat([hi, pad]).to(torch.int32)
    return to_device(lo, device), to_device(hi, device)


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
        lo_s = lo[s * block_q : (s + step) * block_q].view(-1, block_q, 1)
        hi_s = hi[s * block_q : (s + step) * block_q].view(-1, block_q, 1)
        anys.append((torch.maximum(lo_s, c0) < torch.minimum(hi_s, c1)).any(1))
        fulls.append(((lo_s <= c0) & (hi_s >= c0 + block_k)).all(1))  # hi <= tk: no ragged tail
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


def interval_mask_mod(lo, hi):
    def doc_mask(b, h, q_idx, kv_idx):
        return (kv_idx >= lo[q_idx]) & (kv_idx < hi[q_idx])

    return doc_mask


@functools.lru_cache(maxsize=16)
def doc_block_mask(
    cu_q: tuple,
    cu_k: tuple,
    causal: bool,
    device: torch.device,
    block: int = FLEX_BLOCK,
    window: int | None = None,
):
    """flex_attention ``BlockMask`` for packed documents (segment i of q sees segment i of k,
    causally when ``causal``). Cached per arguments (tuples of ints): every layer and ring step
    of a batch reuses it. Built with tensor ops on ``device``, no ``[Tq, Tk]`` mask."""
    tq, tk = int(cu_q[-1]), int(cu_k[-1])
    rows = -(-max(tq, 1) // block) * block
    lo, hi = row_intervals(cu_q, cu_k, causal, rows, device, window)
    partial, full = block_sparsity(lo, hi, tk, block, block)
    kv_num, kv_idx = _ordered(partial)
    full_num, full_idx = _ordered(full)
    return BlockMask.from_kv_blocks(
        kv_num,
        kv_idx,
        full_num,
        full_idx,
        BLOCK_SIZE=block,
        mask_mod=interval_mask_mod(lo, hi),
        seq_lengths=(tq, tk),
    )


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


def _flex_entry(q, k, v, block_mask, scale, enable_gqa, extra):
    return flex_attention(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=enable_gqa, **extra)


def _limit_options(budget: int) -> dict:
    cfg = torch._dynamo.config
    opts = {"recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit": budget}
    if hasattr(cfg, "fail_on_recompile_limit_hit"):
        opts["fail_on_recompile_limit_hit"] = True
    return opts


class FlexKernels:
    """Compiled flex_attention per kernel variant, each within its own recompile budget.

    ``compile``: compile at all (default: on CUDA only, where inductor has flex's fused kernel
    with a backward). ``backend``: the ``torch.compile`` backend (tests use ``"eager"``: the real
    dynamo guards and recompile limit, without inductor's code generation).
    """

    def __init__(
        self, compile: bool | None = None, backend: str = "inductor", recompile_budget: int = RECOMPILE_BUDGET
    ):
        self.compile, self.backend, self.recompile_budget = compile, backend, recompile_budget
        self._fns: dict = {}
        self.retired: dict = {}
        """Variant key -> why it no longer runs compiled (its calls take the caller's fallback)."""
        self.paths: Counter = Counter()
        """(variant key, path) -> calls: path is 'compiled', 'eager' (off CUDA) or 'fallback'."""

    def _compiled(self, key: tuple):
        if key not in self._fns:
            name = "_flex_" + "_".join(str(p).replace("torch.", "").replace(".", "_") for p in key)
            code = _flex_entry.__code__.replace(co_name=name)
            fn = types.FunctionType(code, _flex_entry.__globals__, name)
            self._fns[key] = torch.compile(fn, backend=self.backend)
        return self._fns[key]

    def __call__(self, qh, kh, vh, bm, scale, gqa, return_lse):
        """flex on ``[1,H,T,D]`` inputs; None when this variant is retired (caller falls back)."""
        extra = _lse_request() if return_lse else {}
        compile_ = qh.device.type == "cuda" if self.compile is None else self.compile
        key = (qh.device.type, qh.dtype, qh.shape[-1], gqa, return_lse, torch.is_grad_enabled())
        if not compile_:
            self.paths[key, "eager"] += 1
            return flex_attention(qh, kh, vh, block_mask=bm, scale=scale, enable_gqa=gqa, **extra)
        if key in self.retired:
            self.paths[key, "fallback"] += 1
            return None
        fn = self._compiled(key)
        _mark_dynamic(qh, kh, vh, bm)
        try:
            with torch._dynamo.config.patch(**_limit_options(self.recompile_budget)):
                out = fn(qh, kh, vh, bm, scale, gqa, extra)
        except Exception as exc:  # noqa: BLE001 -- only the recompile-limit failure is ours
            if type(exc).__name__ not in ("FailOnRecompileLimitHit", "RecompileLimitExceeded"):
                raise
            self.retired[key] = (
                f"more than {self.recompile_budget} compiles of this variant (new shapes "
                f"keep arriving); running it eager would materialise the score matrix"
            )
            warnings.warn(
                f"flexsp attention: compiled flex_attention variant {key} retired: "
                f"{self.retired[key]}; its calls now use the per-document SDPA loop",
                stacklevel=3,
            )
            self.paths[key, "fallback"] += 1
            return None
        self.paths[key, "compiled"] += 1
        return out


@functools.lru_cache(None)
def _lse_request_obj():
    """``AuxRequest(lse=True)`` where flex has it (``return_lse`` is deprecated), else None."""
    try:
        from torch.nn.attention.flex_attention import AuxRequest

        return AuxRequest(lse=True)
    except ImportError:
        return None


def _lse_request() -> dict:
    aux = _lse_request_obj()
    return {"return_lse": True} if aux is None else {"return_aux": aux}


KERNELS = FlexKernels()
"""The process's compiled flex variants (the default ``kernels`` of the functions below)."""


def flex_forward(q, k, v, cu_q, cu_k, causal, scale, return_lse, window=None, kernels=None):
    """flex_attention over packed segments: q ``[Tq,H,D]`` -> out ``[Tq,H,D]`` (and lse ``[H,Tq]``
    float32 with ``return_lse``). None when the compiled variant is retired (caller falls back)."""
    kernels = KERNELS if kernels is None else kernels
    gqa = q.shape[1] != k.shape[1]
    if q.shape[0] == 0 or k.shape[0] == 0:  # nothing to attend: out 0, lse -inf
        out = q.new_zeros(q.shape) + 0 * (q.sum() + k.sum() + v.sum())  # keeps autograd
        lse = torch.full((q.shape[1], q.shape[0]), float("-inf"), device=q.device)
        return (out, lse) if return_lse else out
    bm = doc_block_mask(
        tuple(int(c) for c in cu_q),
        tuple(int(c) for c in cu_k),
        bool(causal),
        q.device,
        FLEX_BLOCK,
        window or None,
    )
    qh, kh, vh = (x.transpose(0, 1).unsqueeze(0) for x in (q, k, v))
    res = kernels(qh, kh, vh, bm, scale, gqa, return_lse)
    if res is None:
        return None
    if not return_lse:
        return res[0].transpose(0, 1)
    o, aux = res
    lse = aux if torch.is_tensor(aux) else aux.lse
    return o[0].transpose(0, 1), lse[0].float()


def flex_block_backward(do, q, k, v, o, lse, cu_q, cu_k, causal, scale, kernels=None):
    """Block gradients against the merged ``o``/``lse`` of several blocks, via flex's backward.

    With ``P = exp(S - lse)`` the wanted gradients are ``dV = P^T dO`` and
    ``dS = P * (dO V^T - delta)``, ``delta = rowsum(dO * o)``. Flex recomputes this block's
    ``o_b``, ``lse_b``; with ``c = exp(lse_b - lse)`` we have ``P = c * P_b``, and backprop of
    ``(o_b, lse_b)`` with gradients ``g = c * dO`` and ``g_lse = c * rowsum(dO * (o_b - o))``
    gives ``dS = P_b * (g V^T - rowsum(g * o_b) + g_lse) = P * (dO V^T - delta)`` and
    ``dV = P_b^T g = P^T dO``: exactly the block's share. (When ``o``, ``lse`` are this
    block's own, c = 1 and g_lse = 0: the plain flex backward.) None when retired.
    """
    if q.shape[0] == 0 or k.shape[0] == 0:
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    with torch.enable_grad():
        qq, kk, vv = (x.detach().requires_grad_() for x in (q, k, v))
        res = flex_forward(qq, kk, vv, cu_q, cu_k, causal, scale, True, kernels=kernels)
        if res is None:
            return None
        ob, lb = res
        c = torch.where(
            torch.isneginf(lse), torch.zeros_like(lse), torch.exp(lb.detach().float() - lse.float())
        )  # [H, Tq]
        ct = c.t().unsqueeze(-1)  # [Tq, H, 1]
        dof = do.float()
        g = (dof * ct).to(ob.dtype)
        g_lse = (ct[..., 0] * (dof * (ob.detach().float() - o.float())).sum(-1)).t()
        return torch.autograd.grad((ob, lb), (qq, kk, vv), (g, g_lse.to(lb.dtype)))
