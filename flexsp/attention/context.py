"""The attention a model calls for one micro-batch: :class:`AttnContext`.

The runtime builds one per micro-batch (flexsp.model.inputs) and passes it to the model, which only
calls it: ``attn_ctx(q, k, v, window=None, scale=None)``. It closes over the document boundaries (host ints),
and for sequence parallelism over the group's shard layout (``ShardMeta``), the process group and
the mode (Ulysses/ring/hybrid). ``doc_lengths(device)`` serves dynamic RoPE scaling.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from flexsp.hostcopy import to_device
from flexsp.varlen import doc_lengths_from_cu_seqlens

from .local import varlen_attention
from .sp import sp_attention
from .ulysses import ulysses_attention


def _host_bounds(cu) -> list[int]:
    """Boundaries as Python ints. A list / CPU tensor costs nothing; a device tensor is copied to
    the host once (a sync): pass host-side boundaries to avoid it."""
    if torch.is_tensor(cu):
        return [int(c) for c in (cu if cu.device.type == "cpu" else cu.cpu()).tolist()]
    return [int(c) for c in cu]


@dataclass
class AttnContext:
    """How the attention of every layer runs for one forward pass.

    Boundaries are kept on the host (Python ints, computed once at construction), so the forward
    never syncs with the device for them: give ``cu_seqlens`` as a list or CPU tensor (a device
    tensor also works, copied to the host once here, outside the forward)."""

    cu_seqlens: torch.Tensor | list[int] | None = None
    """Document boundaries of the local buffer (local path only): ints ``[num_docs + 1]``."""
    meta: Any = None
    """Sharding meta returned by ``flexsp.attention.shard`` (SP path); None = local path."""
    group: Any = None
    """The SP process group (None or a 1-rank group: local attention)."""
    mode: str = "local"
    """SP attention mode passed to ``sp_attention``: local, ulysses, ring or hybrid."""

    def __post_init__(self) -> None:
        if self.meta is None and self.cu_seqlens is None:
            raise ValueError("AttnContext needs cu_seqlens (local attention) or meta (SP attention)")
        self._cu_list = None if self.cu_seqlens is None else _host_bounds(self.cu_seqlens)
        self._doc_len_cache: dict = {}

    @classmethod
    def local(cls, cu_seqlens) -> "AttnContext":
        return cls(cu_seqlens=cu_seqlens)

    def _global_bounds(self) -> list[int]:
        return self._cu_list if self.meta is None else [int(c) for c in self.meta.cu_seqlens]

    def max_doc_len(self) -> int:
        """Longest document of the (global) packed buffer, from host-side boundaries."""
        b = self._global_bounds()
        return max((e - s for s, e in zip(b[:-1], b[1:])), default=0)

    def doc_lengths(self, device) -> torch.Tensor:
        """int64 ``[T_local]``: the length of each local token's document (dynamic RoPE). Built
        from host boundaries and copied to ``device`` (no device->host sync); cached per device."""
        key = str(device)
        if key not in self._doc_len_cache:
            if self.meta is None:
                lens = doc_lengths_from_cu_seqlens(self._cu_list, device="cpu")
                self._doc_len_cache[key] = to_device(lens, device)
            else:
                b = self._global_bounds()
                table = torch.tensor([e - s for s, e in zip(b[:-1], b[1:])] + [1], dtype=torch.int64)
                ids = to_device(self.meta.doc_ids.to(torch.int64), device)
                table = to_device(table, device)
                self._doc_len_cache[key] = table[ids.clamp(max=table.numel() - 1)]
        return self._doc_len_cache[key]

    def __call__(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        window: int | None = None,
        scale: float | None = None,
    ) -> torch.Tensor:
        if scale is None:
            return self.attention(q, k, v, window)
        return self.attention(q, k, v, window, scale=scale)

    def attention(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        window: int | None = None,
        scale: float | None = None,
    ) -> torch.Tensor:
        """Causal attention of the local tokens; ``window`` = sliding window (None: full);
        ``scale`` = softmax scale of the scores (None: ``head_dim ** -0.5``).

        With a window, documents no longer than it are plain causal. Local and Ulysses attention
        run the window exactly; ring/hybrid need every document to fit in the window (else a
        ValueError: their block kernels have no window)."""
        if window and self.max_doc_len() <= window:
            window = None
        if self.meta is None:
            if window:
                return varlen_attention(q, k, v, self._cu_list, causal=True, scale=scale, window=window)
            return varlen_attention(q, k, v, self._cu_list, causal=True, scale=scale)
        if window:
            if self.meta.ring_degree == 1:
                if q.shape[0] != self.meta.tokens_local or k.shape[0] != self.meta.tokens_local:
                    raise ValueError(
                        f"q/k have {q.shape[0]}/{k.shape[0]} tokens, meta expects {self.meta.tokens_local}"
                    )
                return ulysses_attention(q, k, v, self.meta, self.group, True, scale=scale, window=window)
            raise ValueError(
                f"sliding_window={window} is not supported with mode={self.mode!r} (ring degree "
                f"{self.meta.ring_degree}) when a document is longer than the window (longest: "
                f"{self.max_doc_len()} tokens); use mode='ulysses', or documents of at most "
                f"{window} tokens (then attention is plain causal)"
            )
        return sp_attention(q, k, v, self.meta, self.group, self.mode, causal=True, scale=scale)
