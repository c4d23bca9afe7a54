"""Causal ring attention over packed documents (head/tail load-balanced layout).

Each of the ``r`` ring ranks holds, for every document, chunk ``j`` and chunk ``2r-1-j`` of
its ``2r`` equal chunks (see sharding.py). K and V travel around the ring (one tensor,
``batch_isend_irecv``, the next block's transfer overlapping this block's compute). At step
``s`` rank ``j`` holds the KV of rank ``src = (j - s) mod r``, and for every document:

* ``s == 0``: its own two chunks, plain causal attention over [head | tail];
* ``src < j``: all local queries see the source's *head* chunk fully (its tail is later
  than both local chunks);
* ``src > j``: only the local *tail* chunk sees anything, and it sees both source chunks.

So every rank does the same work every step. Partial results are merged with the
log-sum-exp (online softmax, float32). The backward is written by hand like
ring-flash-attention: each block's gradients are computed against the merged output and
LSE; dq stays local, and the dk/dv accumulator travels around the ring with the KV block
it belongs to, arriving back at its owner after ``r`` hops.

``u > 1`` (hybrid): ring ranks are ``u`` apart in the group; this module only sees its own
ring (peers are given as global ranks).

Overlap of communication with compute. Every step first *issues* the transfer of the next
block (``ring_send_recv``: ``batch_isend_irecv``, which returns at once with async work
handles), then launches this step's attention kernel on the block already held, and only
then waits. On NCCL the P2P ops run on the process group's internal NCCL stream, ordered
after the work already queued on the current stream (so the send buffer is ready), and
``work.wait()`` does not block the host: it makes the *current* stream wait for the NCCL
stream. So the transfer of block ``s+1`` runs concurrently with block ``s``'s kernel, and the
first dependency on the received buffer is the next step's kernel. Nothing in the loop
synchronises the host with the device (no ``.item()``, ``.tolist()``, ``synchronize`` or
``barrier``; cu_seqlens are Python ints, flex block masks are cached per cu_seqlens). A
buffer still in flight is not recycled by the caching allocator: the process group keeps its
tensors alive until the work is waited on (record_stream or stashing, depending on
``TORCH_NCCL_AVOID_RECORD_STREAMS``), and every request here is waited on before its buffers
are dropped. In the backward the same holds for the dk/dv accumulator: it is
sent right after its block's gradients are added, and received (waited for) only after the
next block's backward kernel has been launched. On gloo the same code overlaps through
gloo's background threads (``wait`` blocks the host, after the compute was done).

Precision. Partial outputs and the LSE are merged in float32, and the dk/dv accumulator that
travels around the ring is float32 even for bf16 inputs: it sums ``r`` block contributions
(one per ring step) for the same rows, and rounding it to bf16 at every hop would add ``r``
roundings of 2^-8 relative error to gradients that single-device attention rounds once.
The cost is twice the bytes of a bf16 accumulator on the dk/dv hops only (the KV hops stay in
the input dtype); the result is cast to the input dtype once, at its owner.
"""

from __future__ import annotations

import torch

from flexsp.hostcopy import to_device

from .comm import ring_send_recv, wait
from .local import attn_backward, attn_forward

_KV_TAG, _DKV_TAG = 11, 12


def make_plan(chunk_lens, device):
    """Index sets and cu_seqlens for full pieces (2c per doc) and halves (c per doc). Built once
    per micro-batch (``ShardMeta.ring_plan`` caches it): every layer's forward and backward reuse
    it."""
    cu_full, cu_half, head, tail, off = [0], [0], [], [], 0
    for c in chunk_lens:
        cu_full.append(cu_full[-1] + 2 * c)
        cu_half.append(cu_half[-1] + c)
        head.append(torch.arange(off, off + c))
        tail.append(torch.arange(off + c, off + 2 * c))
        off += 2 * c
    cat = lambda xs: to_device(torch.cat(xs) if xs else torch.zeros(0, dtype=torch.long), device)  # noqa: E731
    return cu_full, cu_half, cat(head), cat(tail)


def _merge(out, lse, o, l, rows=None):
    """Online-softmax merge of a block result (o, l) into (out, lse), in place."""
    if rows is None:
        new = torch.logaddexp(lse, l)
        out.mul_(torch.exp(lse - new).t().unsqueeze(-1)).add_(
            o.float() * torch.exp(l - new).t().unsqueeze(-1)
        )
        lse.copy_(new)
    else:
        sub_out, sub_lse = out[rows], lse[:, rows]
        _merge(sub_out, sub_lse, o, l)
        out[rows], lse[:, rows] = sub_out, sub_lse


class RingAttention(torch.autograd.Function):
    """forward: ring KV rotation + block attention + LSE merge /
    backward: ring KV rotation + block backward, dk/dv accumulators rotated home."""

    @staticmethod
    def forward(ctx, q, k, v, plan, ring, causal, scale, backend):
        group, j, r, nxt, prv = ring
        cu_full, cu_half, head, tail = plan
        T, H, D = q.shape
        hk = k.shape[1]
        out = torch.zeros(T, H, D, dtype=torch.float32, device=q.device)
        lse = torch.full((H, T), float("-inf"), dtype=torch.float32, device=q.device)
        kv = torch.cat([k, v], dim=1)
        for s in range(r):
            if s + 1 < r:
                nxt_kv, reqs = ring_send_recv(kv, nxt, prv, group, _KV_TAG)
            ks, vs = kv[:, :hk], kv[:, hk:]
            src = (j - s) % r
            if s == 0 or not causal:
                o, l = attn_forward(q, ks, vs, cu_full, cu_full, causal and s == 0, scale, backend)
                _merge(out, lse, o, l)
            elif src < j:
                o, l = attn_forward(q, ks[head], vs[head], cu_full, cu_half, False, scale, backend)
                _merge(out, lse, o, l)
            else:
                o, l = attn_forward(q[tail], ks, vs, cu_half, cu_full, False, scale, backend)
                _merge(out, lse, o, l, tail)
            if s + 1 < r:
                wait(reqs)
                kv = nxt_kv
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.args = (plan, ring, causal, scale, backend)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        plan, (group, j, r, nxt, prv), causal, scale, backend = ctx.args
        cu_full, cu_half, head, tail = plan
        dout, hk = dout.contiguous(), k.shape[1]
        dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        kv = torch.cat([k, v], dim=1)
        dkv, dkv_reqs = None, None
        for s in range(r):
            if s + 1 < r:
                nxt_kv, reqs = ring_send_recv(kv, nxt, prv, group, _KV_TAG)
            ks, vs = kv[:, :hk], kv[:, hk:]
            src = (j - s) % r
            bdkv = torch.zeros(kv.shape, dtype=torch.float32, device=q.device)
            if s == 0 or not causal:
                gq, gk, gv = attn_backward(
                    dout, q, ks, vs, out, lse, cu_full, cu_full, causal and s == 0, scale, backend
                )
                dq += gq
                bdkv[:, :hk], bdkv[:, hk:] = gk, gv
            elif src < j:
                gq, gk, gv = attn_backward(
                    dout, q, ks[head], vs[head], out, lse, cu_full, cu_half, False, scale, backend
                )
                dq += gq
                bdkv[head, :hk], bdkv[head, hk:] = gk.float(), gv.float()
            else:
                gq, gk, gv = attn_backward(
                    dout[tail],
                    q[tail],
                    ks,
                    vs,
                    out[tail],
                    lse[:, tail],
                    cu_half,
                    cu_full,
                    False,
                    scale,
                    backend,
                )
                dq[tail] += gq.float()
                bdkv[:, :hk], bdkv[:, hk:] = gk, gv
            if dkv_reqs is not None:
                wait(dkv_reqs)
                bdkv += dkv
            if s + 1 < r:
                wait(reqs)
                kv = nxt_kv
            if r > 1:  # pass the accumulator on (float32, see the module docstring): after
                # r hops it is back at its owner
                dkv, dkv_reqs = ring_send_recv(bdkv, nxt, prv, group, _DKV_TAG)
            else:
                dkv = bdkv
        if dkv_reqs is not None:
            wait(dkv_reqs)
        return (
            dq.to(q.dtype),
            dkv[:, :hk].to(k.dtype),
            dkv[:, hk:].to(v.dtype),
            None,
            None,
            None,
            None,
            None,
        )


def ring_attention(
    q,
    k,
    v,
    chunk_lens,
    group,
    ring_index,
    ring_size,
    next_rank,
    prev_rank,
    causal=True,
    scale=None,
    backend=None,
    plan=None,
):
    """Ring attention over the ring ``group``-ranks; ``next_rank``/``prev_rank`` are global.

    q ``[T, H, D]``, k/v ``[T, Hkv, D]`` in the head/tail layout with per-document chunk
    lengths ``chunk_lens`` (each document occupies ``2 * c`` consecutive rows). ``plan``: the
    precomputed :func:`make_plan` of ``chunk_lens`` (built here when not given).
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    ring = (group, ring_index, ring_size, next_rank, prev_rank)
    plan = make_plan(tuple(chunk_lens), q.device) if plan is None else plan
    return RingAttention.apply(q, k, v, plan, ring, causal, scale, backend)
