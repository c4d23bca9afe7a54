"""Global-batch sampling and per-group packing.

Every rank runs the same ``GlobalBatchSampler`` (same lengths, same seed) and so sees the same
``GlobalBatch`` each step without communication: the document ids and their lengths, which the
planner turns into SP groups, and the number of trained target tokens of each document (the
loss's denominator: L - 1 per document, fewer for supervised fine-tuning). Each rank then packs
only the documents of its own group (``pack_documents(source, batch.select(group.seq_ids))``),
reading their tokens from the memmap.

Batching: each epoch shuffles the document order with a generator seeded by (seed, epoch), then
cuts it greedily into batches of at most ``global_batch_tokens`` tokens (and at most
``max_docs_per_batch`` documents), keeping the order (a document that does not fit starts the next
batch). The position is (epoch, cursor into the epoch's order), which ``state_dict`` saves, so a
resumed run continues with exactly the batches an uninterrupted run would have produced.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import torch

from flexsp.data.config import SamplerConfig
from flexsp.errors import UserError
from flexsp.varlen import lm_labels, positions_from_cu_seqlens


@dataclass(frozen=True)
class GlobalBatch:
    """One step's documents: ``lengths[j]`` is the length of document ``doc_ids[j]``; the planner's
    ``seq_ids`` index into these lists."""

    step: int
    """Global step this batch belongs to (0-based, counts across epochs)."""
    epoch: int
    """Epoch the documents were drawn from."""
    doc_ids: tuple[int, ...]
    """Document indices into the source."""
    lengths: tuple[int, ...]
    """Token count of each document (the planner's input)."""
    targets: tuple[int, ...] | None = None
    """Trained target tokens of each document (SFT: its assistant / completion tokens after the
    first token); None: every document of L tokens trains L - 1 (pre-training)."""

    @property
    def num_tokens(self) -> int:
        return sum(self.lengths)

    @property
    def num_targets(self) -> int:
        """Trained target tokens of the whole global batch: the loss's denominator on every rank."""
        if self.targets is None:
            return int(sum(int(n) - 1 for n in self.lengths))
        return int(sum(self.targets))

    def select(self, seq_ids) -> list[int]:
        """Document ids of the plan's ``seq_ids`` (indices into this batch), in that order."""
        return [self.doc_ids[i] for i in seq_ids]


class GlobalBatchSampler:
    """Deterministic, epoch-aware, resumable iterator of :class:`GlobalBatch` (infinite: epochs roll
    over; stop by step count)."""

    def __init__(self, lengths, config: SamplerConfig | None = None, targets=None, **overrides):
        """``targets``: trained target tokens per document (a source's ``target_counts``; None:
        L - 1 each), carried into every :class:`GlobalBatch`."""
        self.config = config or SamplerConfig(**overrides)
        if config is not None and overrides:
            raise UserError(f"pass either a SamplerConfig or keyword options, not both ({sorted(overrides)})")
        self.lengths = np.asarray(lengths, dtype=np.int64)
        if self.lengths.ndim != 1 or self.lengths.size == 0:
            raise UserError(
                f"GlobalBatchSampler needs a non-empty 1-D list of lengths, got shape {self.lengths.shape}"
            )
        self.targets = None if targets is None else np.asarray(targets, dtype=np.int64)
        if self.targets is not None and (
            self.targets.shape != self.lengths.shape
            or np.any(self.targets < 0)
            or np.any(self.targets > self.lengths - 1)
        ):
            raise UserError(
                f"GlobalBatchSampler: targets (shape {self.targets.shape}) must give 0 <= "
                f"targets <= length - 1 for each of the {self.lengths.size} documents"
            )
        too_long = np.flatnonzero(self.lengths > self.config.global_batch_tokens)
        if too_long.size:
            i = int(too_long[0])
            raise UserError(
                f"document {i} has {int(self.lengths[i])} tokens > global_batch_tokens="
                f"{self.config.global_batch_tokens} ({too_long.size} such documents): raise "
                f"the budget or lower the corpus max_doc_tokens"
            )
        if self.config.drop_last and int(self.lengths.sum()) < self.config.global_batch_tokens:
            raise UserError(
                f"drop_last with {int(self.lengths.sum())} tokens in all documents < "
                f"global_batch_tokens={self.config.global_batch_tokens} would yield no batch"
            )
        self.epoch, self.cursor, self.step = 0, 0, 0
        self._order_epoch, self._order = -1, None

    def _epoch_order(self, epoch: int) -> np.ndarray:
        if self._order_epoch != epoch:
            n = len(self.lengths)
            self._order = (
                np.random.default_rng([self.config.seed, epoch]).permutation(n)
                if self.config.shuffle
                else np.arange(n)
            )
            self._order_epoch = epoch
        return self._order

    def __iter__(self):
        return self

    def __next__(self) -> GlobalBatch:
        cfg = self.config
        while True:
            order = self._epoch_order(self.epoch)
            ids, total = [], 0
            cap = cfg.max_docs_per_batch or len(order)
            i = self.cursor
            while (
                i < len(order)
                and len(ids) < cap
                and total + self.lengths[order[i]] <= cfg.global_batch_tokens
            ):
                ids.append(int(order[i]))
                total += int(self.lengths[order[i]])
                i += 1
            epoch, end_of_epoch = self.epoch, i >= len(order)
            if end_of_epoch:
                self.epoch, self.cursor = self.epoch + 1, 0
            else:
                self.cursor = i
            if ids and not (
                end_of_epoch
                and cfg.drop_last
                and total < cfg.global_batch_tokens
                and (not cfg.max_docs_per_batch or len(ids) < cfg.max_docs_per_batch)
            ):
                break
        targets = None if self.targets is None else tuple(int(self.targets[j]) for j in ids)
        batch = GlobalBatch(self.step, epoch, tuple(ids), tuple(int(self.lengths[j]) for j in ids), targets)
        self.step += 1
        return batch

    def _fingerprint(self) -> str:
        h = hashlib.sha256(self.lengths.tobytes())
        if self.targets is not None:  # SFT: the trained tokens are part of what the batches are
            h.update(self.targets.tobytes())
        return h.hexdigest()[:16]

    def state_dict(self) -> dict:
        """Position of the sampler (plain ints/str: safe in any checkpoint)."""
        return dict(
            epoch=self.epoch,
            cursor=self.cursor,
            step=self.step,
            seed=self.config.seed,
            num_docs=len(self.lengths),
            lengths_fingerprint=self._fingerprint(),
        )

    def load_state_dict(self, state: dict) -> None:
        """Resume from ``state_dict()``; refuses a state saved for other documents or another seed."""
        if (
            state.get("num_docs") != len(self.lengths)
            or state.get("lengths_fingerprint") != self._fingerprint()
        ):
            raise UserError(
                f"sampler state is for {state.get('num_docs')} documents with fingerprint "
                f"{state.get('lengths_fingerprint')}, this sampler has {len(self.lengths)} "
                f"documents with fingerprint {self._fingerprint()}"
            )
        if state.get("seed") != self.config.seed:
            raise UserError(
                f"sampler state has seed {state.get('seed')}, this sampler seed {self.config.seed}"
            )
        self.epoch, self.cursor, self.step = int(state["epoch"]), int(state["cursor"]), int(state["step"])


@dataclass
class PackedBatch:
    """Documents packed back to back into one buffer (no padding), as the model consumes them."""

    input_ids: torch.Tensor
    """int64 ``[T]`` tokens of all documents."""
    cu_seqlens: torch.Tensor
    """int32 ``[num_docs + 1]`` document boundaries."""
    positions: torch.Tensor
    """int64 ``[T]`` position of each token within its document."""
    labels: torch.Tensor
    """int64 ``[T]`` next token in the same document; -100 on each document's last token (and,
    for a source with target masks (SFT), wherever the next token is not a trained target)."""

    @property
    def num_targets(self) -> int:
        return int((self.labels != -100).sum())


def pack_documents(source, doc_ids, device: torch.device | str | None = None) -> PackedBatch:
    """Fetch the tokens of ``doc_ids`` from ``source`` (TokenizedCorpus, SyntheticSource, an SFT
    source, ...) and pack them. Only these documents are read. A source with ``target_counts``
    (SFT) also gives each document's target mask, and only its trained tokens get labels."""
    arrays = [np.asarray(source.tokens(int(i)), dtype=np.int64) for i in doc_ids]
    lengths = [a.size for a in arrays]
    ids = torch.from_numpy(np.concatenate(arrays) if arrays else np.zeros(0, np.int64)).to(device)
    cu = torch.tensor([0, *np.cumsum(lengths).tolist()], dtype=torch.int32, device=ids.device)
    mask = None
    if getattr(source, "target_counts", None) is not None:
        masks = [np.asarray(source.target_mask(int(i)), dtype=np.bool_) for i in doc_ids]
        assert [m.size for m in masks] == lengths, "a target mask does not match its document"
        mask = torch.from_numpy(np.concatenate(masks) if masks else np.zeros(0, np.bool_)).to(ids.device)
    return PackedBatch(ids, cu, positions_from_cu_seqlens(cu), lm_labels(ids, cu, mask))
