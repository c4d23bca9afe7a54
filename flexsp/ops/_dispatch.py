"""Backend selection for the fused ops in :mod:`flexsp.ops`.

Every op in this package has two implementations: a pure PyTorch one (runs everywhere, the
reference) and a liger-kernel (Triton) one (fused kernels for CUDA). This module decides which
one a call uses, in this order:

1. the ``backend=`` keyword of the call (``"auto"``/None, ``"torch"`` or ``"liger"``);
2. the environment variable ``FLEXSP_OPS_BACKEND`` (same values), read at every call so tests
   and launch scripts can switch without re-importing;
3. ``"auto"``: liger when every tensor is on CUDA and liger-kernel imports, else torch -- except
   for ops whose liger version costs more than it saves, which pass ``auto_liger=False`` and get
   torch under ``"auto"`` (today: linear + cross-entropy, whose liger 0.8.0 kernel syncs the host
   twice per step; see :mod:`flexsp.ops.liger_ops`). Forcing ``"liger"`` still selects it.

Forcing ``"liger"`` on tensors that are not on CUDA is accepted only under Triton's interpreter
(``TRITON_INTERPRET=1``), which is how the CPU equivalence tests run liger's kernels; anywhere
else it raises a ValueError rather than failing later inside a Triton launch.

The only module-level state is the cached import check (:func:`liger_available`).
"""

from __future__ import annotations

import functools
import os

import torch

from flexsp.errors import UserError

ENV_VAR = "FLEXSP_OPS_BACKEND"
VALID_BACKENDS = ("auto", "torch", "liger")


@functools.lru_cache(maxsize=None)
def liger_available() -> bool:
    """True when liger-kernel and triton import (checked once per process, then cached)."""
    try:
        import liger_kernel.ops  # noqa: F401
        import triton  # noqa: F401
    except Exception:  # ImportError, or a triton/torch mismatch raising at import time
        return False
    return True


def _triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def auto_backend(on_cuda: bool, auto_liger: bool = True) -> str:
    """What ``"auto"`` resolves to: liger for CUDA tensors when liger-kernel imports and the op
    allows it (``auto_liger``), else torch."""
    return "liger" if auto_liger and on_cuda and liger_available() else "torch"


def resolve_backend(backend: str | None, *tensors: torch.Tensor, auto_liger: bool = True) -> str:
    """Return ``"torch"`` or ``"liger"`` for a call on ``tensors`` (see the module docstring).

    ``auto_liger=False``: ``"auto"`` resolves to torch even on CUDA (the op's liger version is
    used only when forced)."""
    requested = backend
    source = "backend="
    if requested is None:
        requested = os.environ.get(ENV_VAR) or "auto"
        source = f"${ENV_VAR}"
    requested = requested.strip().lower()
    if requested not in VALID_BACKENDS:
        raise UserError(
            f"unknown flexsp.ops backend {requested!r} (from {source}); valid: {VALID_BACKENDS} or None"
        )
    on_cuda = all(t.is_cuda for t in tensors)
    if requested == "torch":
        return "torch"
    if requested == "auto":
        return auto_backend(on_cuda, auto_liger)
    # requested == "liger"
    if not liger_available():
        raise UserError(
            f"backend 'liger' requested (from {source}) but liger-kernel/triton do not import; "
            "install the gpu extra or use backend='torch'"
        )
    if not on_cuda and not _triton_interpret():
        devices = sorted({str(t.device) for t in tensors})
        raise UserError(
            f"backend 'liger' needs CUDA tensors (got devices {devices}); on CPU it runs only "
            "under TRITON_INTERPRET=1 (tests), otherwise use backend='torch' or 'auto'"
        )
    return "liger"
