"""Host-to-device copies that never stall the device: pinned memory + ``non_blocking=True``.

A copy from pageable host memory makes the host wait until the stream has drained (CUDA stages
it through a bounce buffer), so every ``torch.tensor(list, device="cuda")`` or ``x.to("cuda")`` of a
CPU tensor inside the step loop is a hidden host sync. Here the host tensor is first placed in
page-locked memory (PyTorch's caching host allocator, which also keeps the block alive until the
copy has finished) and the copy is queued asynchronously on the current stream. On the CPU, and
for tensors already on the device, these are no-ops.
"""

from __future__ import annotations

import torch


def to_device(t: torch.Tensor, device: torch.device | str | None) -> torch.Tensor:
    """``t`` on ``device`` without a host sync (asynchronous from pinned memory on CUDA)."""
    if device is None:
        return t
    device = torch.device(device)
    if t.device == device or device.type == "cpu" and t.device.type == "cpu":
        return t
    if device.type == "cuda" and t.device.type == "cpu":
        if not t.is_pinned():
            t = t.pin_memory()
        return t.to(device, non_blocking=True)
    return t.to(device)


def pin(t: torch.Tensor) -> torch.Tensor:
    """``t`` in page-locked memory when a CUDA device exists (for a later asynchronous copy);
    unchanged otherwise."""
    if t.device.type == "cpu" and torch.cuda.is_available() and not t.is_pinned():
        return t.pin_memory()
    return t


def read_to_host(t: torch.Tensor) -> list:
    """``t.tolist()`` as THE explicit host sync of a step: on CUDA an asynchronous copy into pinned
    memory and a wait on an event recorded after it (only this stream's work up to the copy, and
    invisible to ``torch.cuda.set_sync_debug_mode``, which guards everything else)."""
    if t.device.type != "cuda":
        return t.tolist()
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    host.copy_(t, non_blocking=True)
    done = torch.cuda.Event()
    done.record(torch.cuda.current_stream(t.device))
    done.synchronize()
    return host.tolist()
