"""Communication primitives for sequence parallelism.

Each differentiable primitive is a tiny ``autograd.Function`` whose docstring says what it
does forward and backward. The process group is always an explicit argument: there is no
module-level group state, so groups of different sizes can run concurrently.

Ring attention's point-to-point traffic does not go through autograd: its backward is written
by hand (see ring.py) and uses :func:`ring_send_recv` directly.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def group_size(group) -> int:
    return 1 if group is None else dist.get_world_size(group)


def group_rank(group) -> int:
    return 0 if group is None else dist.get_rank(group)


def global_rank(group, rank_in_group: int) -> int:
    return dist.get_global_rank(group, rank_in_group)


class AllToAll(torch.autograd.Function):
    """forward: all_to_all_single of dim 0 with ``in_splits`` -> ``out_splits`` rows /
    backward: the inverse all_to_all_single (``out_splits`` -> ``in_splits``) of the gradient.

    Split sizes are in rows of dim 0; zero splits let a collective over the whole group move
    data only inside a sub-group (hybrid mode).
    """

    @staticmethod
    def forward(ctx, x, group, in_splits, out_splits):
        ctx.group, ctx.splits = group, (list(in_splits), list(out_splits))
        x = x.contiguous()
        out = x.new_empty((sum(out_splits),) + tuple(x.shape[1:]))
        dist.all_to_all_single(out, x, list(out_splits), list(in_splits), group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        in_splits, out_splits = ctx.splits
        grad = grad.contiguous()
        dx = grad.new_empty((sum(in_splits),) + tuple(grad.shape[1:]))
        dist.all_to_all_single(dx, grad, in_splits, out_splits, group=ctx.group)
        return dx, None, None, None


class AllGather(torch.autograd.Function):
    """forward: all-gather along dim 0 (equal shards, group-rank order) /
    backward: this rank's slice of the gradient.

    The backward assumes the gradient is replicated across the group, which holds when every
    rank computes the same function of the gathered tensor (unshard -> same loss everywhere).
    """

    @staticmethod
    def forward(ctx, x, group):
        n, r = group_size(group), group_rank(group)
        ctx.rows, ctx.rank = x.shape[0], r
        x = x.contiguous()
        out = x.new_empty((n * x.shape[0],) + tuple(x.shape[1:]))
        gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        gather(out, x, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        return grad[ctx.rank * ctx.rows : (ctx.rank + 1) * ctx.rows].contiguous(), None


def ring_send_recv(x, send_to: int, recv_from: int, group, tag: int = 0):
    """Start sending ``x`` to global rank ``send_to`` and receiving a tensor of the same shape
    from ``recv_from`` (``batch_isend_irecv``). Returns ``(recv_buffer, requests)``; call
    :func:`wait` on the requests before reading the buffer.

    Returns without waiting, on any backend. On NCCL the two ops are one grouped launch on
    the communicator's own stream (no send/recv ordering deadlock when ``send_to ==
    recv_from``), and :func:`wait` only orders the caller's current stream after them, so
    kernels launched between this call and :func:`wait` overlap the transfer.
    """
    x = x.contiguous()
    buf = torch.empty_like(x)
    ops = [dist.P2POp(dist.isend, x, send_to, group, tag), dist.P2POp(dist.irecv, buf, recv_from, group, tag)]
    return buf, dist.batch_isend_irecv(ops)


def wait(reqs) -> None:
    """Wait for :func:`ring_send_recv`'s requests (NCCL: a stream dependency, not a host
    block; gloo/MPI: blocks the host until the transfer is done)."""
    for r in reqs:
        r.wait()
