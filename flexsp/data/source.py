"""The interface every document source offers the sampler and the packer: ``lengths`` (tokens
per document, one entry per document) and ``tokens(i)``. Shared by the tokenized corpus and the
synthetic source.

Supervised fine-tuning sources (flexsp.data.sft) also set ``target_counts`` (trained target tokens
per document) and implement ``target_mask(i)`` (True on the tokens the loss trains); for every
other source ``target_counts`` is None: a document of L tokens trains all its L - 1 next tokens."""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np


class DocumentSource(ABC):
    """Base of document sources; subclasses set ``self.lengths`` and implement ``_read(index)``."""

    lengths: np.ndarray
    target_counts: np.ndarray | None = None
    """int64 ``[num_docs]`` trained target tokens per document (SFT), or None: L - 1 each."""

    @property
    def num_docs(self) -> int:
        return len(self.lengths)

    def __len__(self) -> int:
        return self.num_docs

    @property
    def num_tokens(self) -> int:
        return int(self.lengths.sum())

    def tokens(self, index: int) -> np.ndarray:
        """Document ``index``'s token ids (IndexError outside [0, num_docs))."""
        if not 0 <= index < self.num_docs:
            raise IndexError(f"document {index} out of range [0, {self.num_docs})")
        return self._read(int(index))

    def target_mask(self, index: int) -> np.ndarray | None:
        """bool ``[L]``: True on document ``index``'s tokens that are trained targets (None: all)."""
        return None

    @abstractmethod
    def _read(self, index: int) -> np.ndarray:
        """Tokens of document ``index`` (already bounds-checked)."""
