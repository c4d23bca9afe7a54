"""Parameter initialisation that is the same whatever the sharding: full or any shard.

Why: a model is built on the ``meta`` device, sharded (FSDP2 ``fully_shard``, DeepSpeed ZeRO-3),
materialised, and only then initialised -- each rank fills only its own shard, so no rank ever
draws (or holds) the full weights. The full weights must nevertheless be identical for every world
size, so that a 4-rank run equals 1-process training bit for bit at step 0.

How: a parameter is seen as its flattened (row-major) elements, cut into fixed chunks of
``CHUNK`` elements; chunk ``c`` of parameter ``name`` is drawn from its own CPU generator seeded by
``(seed, name, c)``. Any contiguous element range -- a full tensor, an FSDP2 dim-0 shard (rows
``[r0, r1)`` are elements ``[r0 * cols, r1 * cols)``), a DeepSpeed flat partition -- is then drawn
by generating only the chunks it overlaps (at most two partial chunks of waste). Values are drawn
in float32 on CPU, so they do not depend on the device either, and cast on copy.

Rules (:func:`init_rule`): ``*norm.weight`` -> 1 (RMSNorm gains, incl. per-head q/k norms),
``*.bias`` -> 0, output projections (``wo``, ``w_down``) -> N(0, init_std / sqrt(2 * layers)),
everything else -> N(0, init_std).
"""

from __future__ import annotations

import math
import zlib

import torch
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

CHUNK = 1 << 16
"""Elements per generator stream (a parameter of n elements uses ceil(n / CHUNK) streams)."""


def init_rule(name: str, init_std: float, layers: int) -> tuple[str, float]:
    """``("const", value)`` or ``("normal", std)`` for parameter ``name``."""
    if name.endswith("norm.weight"):
        return "const", 1.0
    if name.endswith(".bias"):
        return "const", 0.0
    if name.endswith(("wo.weight", "w_down.weight")):
        return "normal", init_std / math.sqrt(2 * layers)
    return "normal", init_std


def _chunk_seed(seed: int, name: str, chunk: int) -> int:
    return (int(seed) * 1_000_003 + zlib.crc32(name.encode()) * 7_919 + chunk) % (2**63 - 1)


def normal_elements(name: str, numel: int, start: int, stop: int, seed: int, std: float) -> torch.Tensor:
    """Flattened elements ``[start, stop)`` of parameter ``name`` (``numel`` elements in all) drawn
    from N(0, std), float32 on CPU; identical to the same slice of the full draw."""
    if not 0 <= start <= stop <= numel:
        raise ValueError(f"element range [{start}, {stop}) outside parameter {name} of {numel} elements")
    out = torch.empty(stop - start, dtype=torch.float32)
    pos = start
    while pos < stop:
        c = pos // CHUNK
        c_lo, c_hi = c * CHUNK, min((c + 1) * CHUNK, numel)
        gen = torch.Generator().manual_seed(_chunk_seed(seed, name, c))
        vals = torch.empty(c_hi - c_lo, dtype=torch.float32).normal_(0.0, std, generator=gen)
        hi = min(stop, c_hi)
        out[pos - start : hi - start] = vals[pos - c_lo : hi - c_lo]
        pos = hi
    return out


@torch.no_grad()
def fill_elements_(
    dest: torch.Tensor, name: str, numel: int, start: int, seed: int, init_std: float, layers: int
) -> None:
    """Fill ``dest`` (any shape, contiguous) with flattened elements ``[start, start + dest.numel())``
    of parameter ``name`` under :func:`init_rule`."""
    kind, value = init_rule(name, init_std, layers)
    if kind == "const":
        dest.fill_(value)
        return
    vals = normal_elements(name, numel, start, start + dest.numel(), seed, value)
    dest.copy_(vals.view(dest.shape).to(device=dest.device, dtype=dest.dtype))


@torch.no_grad()
def init_module_(module: torch.nn.Module, seed: int, init_std: float, layers: int) -> None:
    """Initialise every parameter of ``module`` (full tensors, or DTensors of any dim-0 sharding:
    only the local shard is drawn)."""
    for name, p in module.named_parameters():
        if p.device.type == "meta":
            continue
        if hasattr(p, "to_local"):  # DTensor (FSDP2 / HSDP): the local rows of a dim-0 shard
            shape, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
            local = p.to_local()
            if local.numel() == 0:
                continue
            row = math.prod(p.shape[1:])
            assert all(o == 0 for o in offset[1:]), f"{name}: only dim-0 sharding is supported"
            fill_elements_(local, name, p.numel(), offset[0] * row, seed, init_std, layers)
        else:
            fill_elements_(p.data, name, p.numel(), 0, seed, init_std, layers)


@torch.no_grad()
def fill_local_shards(model, weights) -> None:
    """Every parameter's local shard (a dim-0 row range of a DTensor, or a full tensor) filled by
    ``weights`` with exactly the elements it holds in the full tensor."""

    weights.check(model)
    for name, p in model.named_parameters():
        if hasattr(p, "to_local"):
            _, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
            local = p.to_local()
            if local.numel():
                weights.fill_(local, name, p.numel(), offset[0] * math.prod(p.shape[1:]))
        else:
            weights.fill_(p.data, name, p.numel(), 0)
