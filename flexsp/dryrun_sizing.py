"""Sizing for ``flexsp-dryrun``: the memory a device keeps free (the reserve), the tokens per rank
left after it (C), and the smallest world size (or HSDP shard size) at which a model fits.

Units: ``GB`` is 10^9 bytes (an "80 GB" H100 has 80e9 bytes = 74.5 GiB), ``GiB`` 2^30.

The reserve is ``dryrun.reserve_gb`` (CUDA context, library workspaces, NCCL buffers, allocator
fragmentation: see :class:`flexsp.dryrun.DryRunConfig`) plus the loss's transient buffers, which
depend on the model and are computed here (:func:`loss_transient_bytes`).

A model *fits* at a world size when, on rank 0 (which holds the largest shards), model states +
unsharded buffers + reserve leave room for at least one token's activations (C >= 1). Per-rank model
states at another shard count are recomputed exactly from the parameter shapes
(:func:`state_bytes`: FSDP2 gives rank 0 ``ceil(rows / shards)`` rows of every parameter); the
unsharded buffers (gathered parameters and gradients of a unit, in full) and the activation bytes
per token do not depend on the shard count (up to the reduce-scatter buffer's padding to a
multiple of it, a few rows), so the values measured at the dry run's world size are reused.
"""

from __future__ import annotations

import math

from flexsp.ops.torch_ops import DEFAULT_CHUNK_ELEMENTS, default_chunk_size

GB = 10**9
MAX_WORLD_SIZE = 2**20
"""The search for a world size that fits stops here (about a million ranks)."""


def loss_transient_bytes(vocab: int, hidden: int, compute_bytes: int) -> dict:
    """Peak transient bytes of the chunked linear cross-entropy's backward (flexsp.ops torch path,
    the one the activation measurement uses) on a rank.

    The chunk is a full one, ``flexsp.ops.torch_ops.default_chunk_size`` for a micro-batch of at
    least that many tokens: ``2^25 // vocab`` tokens (2^25 float32 logits; a micro-batch of fewer
    tokens allocates less, the reserve budgets the most). Backward, per chunk, holds at its peak
    either (the buffers, as tests/test_dryrun_sizing.py tracks them)

    - ``logits``: the previous chunk's gradient in the compute dtype (its variable still refers to
      it while the next chunk's logits are formed), the chunk's float32 logits and their float32
      softmax: ``chunk x vocab x (compute + 4 + 4)`` bytes (bf16: the bf16 product is freed once its
      float32 copy exists; fp32: the product is the float32 logits);
    - ``weight_grad``: the chunk's gradient in the compute dtype, and the head-weight gradient of
      the chunk (``vocab x hidden`` in the compute dtype, plus its float32 copy under bf16) before it
      is added to the float32 accumulator (counted with the unsharded buffers):
      ``chunk x vocab x compute + vocab x hidden x (compute + 4)`` (fp32: ``+ vocab x hidden x 4``).

    liger's fused kernel (CUDA, when installed) chunks by tokens x hidden instead; this is the
    torch path's figure."""
    chunk = default_chunk_size(DEFAULT_CHUNK_ELEMENTS, vocab)
    upcast = 4 if compute_bytes != 4 else 0  # .float() of a float32 tensor is the tensor itself
    logits = chunk * vocab * (compute_bytes + 4 + 4)
    weight_grad = chunk * vocab * compute_bytes + vocab * hidden * (compute_bytes + upcast)
    return {
        "chunk_tokens": chunk,
        "vocab": vocab,
        "logits": logits,
        "weight_grad": weight_grad,
        "bytes": max(logits, weight_grad),
    }


def param_shapes(model) -> list[tuple[int, int, int]]:
    """``(rows, elements per row, element bytes)`` of every parameter of an unsharded (meta) model."""
    shapes = []
    for p in model.parameters():
        rows = p.shape[0] if p.dim() else 1
        shapes.append((int(rows), int(p.numel() // max(rows, 1)), p.element_size()))
    return shapes


def state_bytes(shapes: list[tuple[int, int, int]], shards: int) -> int:
    """Rank 0's params + grads + AdamW states (``4 x`` its parameter bytes: gradient and the two
    moments in the parameter's dtype) with every parameter sharded ``shards`` ways along dim 0."""
    local = sum(min(math.ceil(rows / shards), rows) * per_row * nbytes for rows, per_row, nbytes in shapes)
    return 4 * local


def capacity(free_bytes: float, act_bytes_per_token: float) -> int:
    """Tokens of activations that fit in ``free_bytes`` (0 when not even one does)."""
    return max(0, math.floor(free_bytes / act_bytes_per_token)) if act_bytes_per_token > 0 else 0


def smallest_fit(
    shapes, unsharded: int, act_bytes_per_token: float, usable_bytes: int, world_size: int, shard_size: int
) -> dict | None:
    """Where a model that does not fit at ``world_size`` (HSDP ``shard_size``, 0: all ranks) would:
    with HSDP, the smallest larger shard size at this world size; else (or if none) the smallest
    power-of-two world size with every rank sharding. ``usable_bytes``: the device minus the
    reserve. Returns ``{"world_size", "shard_size" (0: all ranks), "capacity_tokens"}`` or None
    (the unsharded buffers and the reserve alone overflow the device)."""

    def c_at(shards: int) -> int:
        return capacity(usable_bytes - unsharded - state_bytes(shapes, shards), act_bytes_per_token)

    if shard_size and shard_size < world_size:
        s = shard_size * 2
        while s < world_size:
            if c_at(s) >= 1:
                return {"world_size": world_size, "shard_size": s, "capacity_tokens": c_at(s)}
            s *= 2
    w = world_size
    while w <= MAX_WORLD_SIZE:
        if (w > world_size or shard_size) and c_at(w) >= 1:
            return {"world_size": w, "shard_size": 0, "capacity_tokens": c_at(w)}
        w *= 2
    return None
