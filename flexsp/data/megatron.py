"""Megatron-LM indexed datasets (``<prefix>.bin`` + ``<prefix>.idx``) as a document source.

The format (Megatron-LM ``megatron/core/datasets/indexed_dataset.py``, "MMIDIDX"; all integers
little-endian) of ``<prefix>.idx``:

    9 bytes   header b"MMIDIDX\\x00\\x00"
    uint64    version, 1
    uint8     dtype code of the tokens in .bin: 1 uint8, 2 int8, 3 int16, 4 int32, 5 int64,
              6 float64, 7 float32, 8 uint16
    uint64    S, the sequence count
    uint64    D, the document-index count (documents + 1)
    int32[S]  tokens per sequence
    int64[S]  byte offset of each sequence in .bin
    int64[D]  document indices: document k is sequences [doc[k], doc[k+1]); doc[0] = 0, doc[-1] = S
    int8[S]   only in multimodal datasets: the mode of each sequence (0 = text)

``<prefix>.bin`` holds the tokens. A document here is its sequences concatenated (preprocess_data
writes one sequence per document, or one per sentence with --split-sentences; --append-eod ends
each document with EOD, so no EOS is added here). Tokens are read through ``np.memmap``: a
document whose sequences lie back to back is a zero-copy view (split chunks too); nothing is
copied or re-tokenized and no store is written. The only thing cached is the fact that a .bin was
scanned and its ids lie below the declared vocabulary (a small marker under
``corpus.cache_dir/megatron_checked``), so the scan runs once per file, not once per rank and run.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from flexsp.data.config import CorpusConfig
from flexsp.data.corpus import declared_vocabulary
from flexsp.data.source import DocumentSource
from flexsp.errors import UserError

INDEX_HEADER = b"MMIDIDX\x00\x00"
INDEX_VERSION = 1
FIXED_BYTES = 9 + 8 + 1 + 8 + 8  # header, version, dtype code, sequence count, document count
DTYPE_CODES = {
    1: np.uint8,
    2: np.int8,
    3: np.int16,
    4: np.int32,
    5: np.int64,
    6: np.float64,
    7: np.float32,
    8: np.uint16,
}
TEXT_MODE = 0
SCAN_CHUNK_TOKENS = 1 << 24  # vocabulary scan: 16M tokens (<= 128 MB) at a time


@dataclass
class MegatronIndex:
    """A parsed, validated ``.idx`` (arrays are read-only views of the memory-mapped file)."""

    path: Path
    dtype: np.dtype
    sequence_lengths: np.ndarray
    """int32 [S] tokens per sequence."""
    sequence_pointers: np.ndarray
    """int64 [S] byte offset of each sequence in the .bin."""
    document_indices: np.ndarray
    """int64 [documents + 1] first sequence of each document, then S."""
    sequence_modes: np.ndarray | None
    """int8 [S] per-sequence modes of a multimodal dataset, else None."""


def read_index(idx_path: str | Path) -> MegatronIndex:
    """Parse and validate a Megatron ``.idx`` file (ValueError naming the file on any problem)."""
    path = Path(idx_path)
    if not path.is_file():
        raise UserError(
            f"Megatron index {path} does not exist (data.megatron_prefix: the prefix of "
            f"<prefix>.bin and <prefix>.idx)"
        )
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(FIXED_BYTES)
    if head[:9] != INDEX_HEADER:
        raise UserError(
            f"{path}: bad header {head[:9]!r}, expected {INDEX_HEADER!r} (not a Megatron MMIDIDX index)"
        )
    if len(head) < FIXED_BYTES:
        raise UserError(f"{path}: truncated: {size} bytes, the fixed header alone is {FIXED_BYTES}")
    version = int.from_bytes(head[9:17], "little")
    if version != INDEX_VERSION:
        raise UserError(f"{path}: index version {version}; only version {INDEX_VERSION} exists")
    code = head[17]
    if code not in DTYPE_CODES:
        raise UserError(
            f"{path}: dtype code {code}; valid codes: "
            f"{ {k: np.dtype(v).name for k, v in DTYPE_CODES.items()} }"
        )
    dtype = np.dtype(DTYPE_CODES[code])
    if dtype.kind not in "iu":
        raise UserError(
            f"{path}: token dtype {dtype.name} (code {code}) holds no token ids; "
            f"a language-model dataset has an integer dtype (uint16, int32, ...)"
        )
    seqs = int.from_bytes(head[18:26], "little")
    docs = int.from_bytes(head[26:34], "little")
    plain = FIXED_BYTES + 12 * seqs + 8 * docs
    if size not in (plain, plain + seqs):
        raise UserError(
            f"{path}: {size} bytes, but {seqs} sequences and {docs} document indices need "
            f"{plain} bytes ({plain + seqs} with multimodal sequence modes): truncated or "
            f"corrupt index"
        )
    buf = np.memmap(path, dtype=np.uint8, mode="r")
    off = FIXED_BYTES
    lengths = np.frombuffer(buf, dtype="<i4", count=seqs, offset=off)
    pointers = np.frombuffer(buf, dtype="<i8", count=seqs, offset=off + 4 * seqs)
    doc_idx = np.frombuffer(buf, dtype="<i8", count=docs, offset=off + 12 * seqs)
    modes = (
        np.frombuffer(buf, dtype=np.int8, count=seqs, offset=plain) if size == plain + seqs and seqs else None
    )
    if docs < 1 or doc_idx[0] != 0 or doc_idx[-1] != seqs or np.any(np.diff(doc_idx) < 0):
        raise UserError(
            f"{path}: document indices must rise from 0 to the sequence count {seqs} "
            f"(got {docs} entries{', first ' + str(int(doc_idx[0])) if docs else ''}"
            f"{', last ' + str(int(doc_idx[-1])) if docs else ''}): corrupt index"
        )
    if seqs and int(lengths.min()) < 0:
        raise UserError(f"{path}: negative sequence length {int(lengths.min())}: corrupt index")
    if modes is not None and np.any(modes != TEXT_MODE):
        bad = int(np.flatnonzero(modes != TEXT_MODE)[0])
        raise UserError(
            f"{path}: multimodal dataset: sequence {bad} has mode {int(modes[bad])}; only "
            f"text sequences (mode {TEXT_MODE}) can be trained on"
        )
    return MegatronIndex(path, dtype, lengths, pointers, doc_idx, modes)


def _scan_marker(cache_dir: str, bin_path: Path, idx_path: Path, vocab: int) -> Path:
    h = hashlib.sha256()
    for f in (bin_path, idx_path):
        st = f.stat()
        h.update(f"{f.resolve()}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    h.update(f"vocab={vocab}".encode())
    return Path(cache_dir) / "megatron_checked" / f"{h.hexdigest()[:24]}.json"


def check_token_ids(tokens: np.ndarray, vocab: int, bin_path: Path, vocab_origin: str) -> None:
    """Every token of ``tokens`` (a memmap) in [0, vocab), scanned in bounded chunks."""
    for start in range(0, tokens.size, SCAN_CHUNK_TOKENS):
        chunk = tokens[start : start + SCAN_CHUNK_TOKENS]
        lo, hi = int(chunk.min()), int(chunk.max())
        if lo < 0 or hi >= vocab:
            at = start + int(np.flatnonzero((chunk < 0) | (chunk >= vocab))[0])
            raise UserError(
                f"{bin_path}: token id {int(tokens[at])} at token {at} is outside the "
                f"vocabulary [0, {vocab}){vocab_origin}; raise data.vocab_size to the "
                f"tokenizer's vocabulary, or this .bin does not belong to that tokenizer"
            )


class _Prefix:
    """One opened ``<prefix>.bin``/``.idx`` pair: its documents' lengths, start pointers and
    whether each document's sequences are contiguous in the .bin."""

    def __init__(self, prefix: str, vocab: int, vocab_origin: str, cache_dir: str):
        self.prefix = prefix
        self.bin_path, self.idx_path = Path(prefix + ".bin"), Path(prefix + ".idx")
        for p in (self.bin_path, self.idx_path):
            if not p.is_file():
                raise UserError(
                    f"Megatron dataset file {p} does not exist (data.megatron_prefix="
                    f"{prefix!r} needs {self.bin_path.name} and {self.idx_path.name})"
                )
        self.index = ix = read_index(self.idx_path)
        item = ix.dtype.itemsize
        bin_size = self.bin_path.stat().st_size
        if bin_size % item:
            raise UserError(
                f"{self.bin_path}: {bin_size} bytes is not a multiple of the index's "
                f"{ix.dtype.name} tokens ({item} bytes): truncated or not this index's .bin"
            )
        lengths = ix.sequence_lengths.astype(np.int64)
        ends = ix.sequence_pointers + lengths * item
        if lengths.size:
            bad = np.flatnonzero((ix.sequence_pointers < 0) | (ends > bin_size))
            if bad.size:
                j = int(bad[0])
                raise UserError(
                    f"{self.bin_path}: sequence {j} of {self.idx_path.name} spans bytes "
                    f"[{int(ix.sequence_pointers[j])}, {int(ends[j])}) beyond the file's "
                    f"{bin_size} bytes ({bad.size} such sequences): truncated .bin or "
                    f"mismatched .idx"
                )
            if np.any(ix.sequence_pointers % item):
                raise UserError(
                    f"{self.idx_path}: sequence pointers are not multiples of the "
                    f"{ix.dtype.name} size {item}: corrupt index"
                )
        self.tokens = (
            np.memmap(self.bin_path, dtype=ix.dtype.newbyteorder("<"), mode="r")
            if bin_size
            else np.zeros(0, ix.dtype)
        )
        marker = _scan_marker(cache_dir, self.bin_path, self.idx_path, vocab)
        if not marker.exists():
            check_token_ids(self.tokens, vocab, self.bin_path, vocab_origin)
            _write_marker(marker, self.bin_path, vocab)
        # Documents: token counts, first token, and whether their sequences lie back to back.
        d, n = ix.document_indices, lengths.size
        cum = np.concatenate([[0], np.cumsum(lengths)])
        self.doc_lengths = cum[d[1:]] - cum[d[:-1]]
        self.contiguous = np.ones(len(d) - 1, dtype=bool)
        self.doc_start = np.zeros(len(d) - 1, dtype=np.int64)
        if n:
            # breaks[k]: how many of the pairs (0, 1) .. (k-1, k) are not adjacent in the .bin
            breaks = np.concatenate([[0], np.cumsum(ix.sequence_pointers[1:] != ends[:-1])])
            first = np.minimum(d[:-1], n - 1)
            last = np.minimum(np.maximum(d[1:] - 1, d[:-1]), n - 1)
            self.contiguous = (d[1:] == d[:-1]) | (breaks[last] == breaks[first])
            self.doc_start = ix.sequence_pointers[first] // item

    def read(self, doc: int, start: int, length: int) -> np.ndarray:
        """Tokens [start, start + length) of document ``doc`` (a view when contiguous)."""
        if self.contiguous[doc]:
            s = int(self.doc_start[doc]) + start
            return self.tokens[s : s + length]
        ix, item = self.index, self.index.dtype.itemsize
        parts = [
            self.tokens[int(ix.sequence_pointers[j]) // item :][: int(ix.sequence_lengths[j])]
            for j in range(int(ix.document_indices[doc]), int(ix.document_indices[doc + 1]))
        ]
        return np.concatenate(parts)[start : start + length]


def _write_marker(marker: Path, bin_path: Path, vocab: int) -> None:
    try:
        marker.parent.mkdir(parents=True, exist_ok=True)
        tmp = marker.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps({"bin": str(bin_path.resolve()), "vocab_size": vocab, "ok": True}))
        os.replace(tmp, marker)
    except OSError:  # a read-only cache only costs a rescan next time
        pass


def split_documents(lengths: np.ndarray, cfg: CorpusConfig, name: str):
    """Apply the long-document policy to document ``lengths``: ``(doc, start, length, stats)`` of
    the kept documents/chunks in order. Same rules as the tokenized corpus: a document longer than
    max_doc_tokens is split into max_doc_tokens chunks (or dropped, or an error); documents and
    chunks shorter than min_doc_tokens are dropped."""
    lengths = np.asarray(lengths, dtype=np.int64)
    long = lengths > cfg.max_doc_tokens
    stats = {"dropped_short": 0, "dropped_long": 0, "split": 0}
    if long.any() and cfg.long_doc_policy == "error":
        i = int(np.flatnonzero(long)[0])
        raise UserError(
            f"{name} (document {i}): document of {int(lengths[i])} tokens exceeds "
            f"max_doc_tokens={cfg.max_doc_tokens} (long_doc_policy='error')"
        )
    if cfg.long_doc_policy == "drop":
        stats["dropped_long"] = int(long.sum())
        counts = (~long).astype(np.int64)
    else:
        stats["split"] = int(long.sum())
        counts = np.maximum(1, -(-lengths // cfg.max_doc_tokens))
    doc = np.repeat(np.arange(lengths.size, dtype=np.int64), counts)
    first_chunk = np.concatenate([[0], np.cumsum(counts)[:-1]])
    start = (np.arange(doc.size, dtype=np.int64) - np.repeat(first_chunk, counts)) * cfg.max_doc_tokens
    length = np.minimum(lengths[doc] - start, cfg.max_doc_tokens)
    keep = length >= cfg.min_doc_tokens
    stats["dropped_short"] = int((~keep).sum())
    return doc[keep], start[keep], length[keep], stats


class MegatronSource(DocumentSource):
    """Megatron-LM indexed datasets (one or more prefixes, concatenated in order), memory-mapped.

    ``lengths[i]`` / ``tokens(i)`` are the documents after the long-document policy; ``vocab_size``
    is the declared vocabulary every token was checked against."""

    def __init__(
        self, prefixes: list[str], cfg: CorpusConfig, vocab_size: int, vocab_origin: str = "", tokenizer=None
    ):
        if not prefixes:
            raise UserError("data.megatron_prefix is empty: give the prefix of <prefix>.bin/.idx")
        if vocab_size < 1:
            raise UserError(f"Megatron source needs a vocabulary size >= 1, got {vocab_size}")
        self.prefixes = [p[:-4] if p.endswith((".bin", ".idx")) else p for p in map(str, prefixes)]
        self.vocab_size, self.tokenizer = int(vocab_size), tokenizer
        self._parts = [_Prefix(p, self.vocab_size, vocab_origin, cfg.cache_dir) for p in self.prefixes]
        cols, stats = [], {"dropped_short": 0, "dropped_long": 0, "split": 0}
        for k, part in enumerate(self._parts):
            doc, start, length, st = split_documents(part.doc_lengths, cfg, str(part.bin_path))
            cols.append((np.full(doc.size, k, dtype=np.int32), doc, start, length))
            stats = {key: stats[key] + st[key] for key in stats}
        self._prefix, self._doc, self._start, self.lengths = (np.concatenate(c) for c in zip(*cols))
        if self.lengths.size == 0:
            raise UserError(
                f"Megatron datasets {self.prefixes} have no documents left (min_doc_tokens="
                f"{cfg.min_doc_tokens}, max_doc_tokens={cfg.max_doc_tokens}, long_doc_policy="
                f"{cfg.long_doc_policy!r}, stats {stats})"
            )
        self.meta = {
            "stats": stats,
            "files": [str(p.bin_path) for p in self._parts],
            "source_documents": int(sum(len(p.doc_lengths) for p in self._parts)),
        }

    @property
    def directory(self) -> str:
        return ", ".join(self.prefixes)

    def _read(self, index: int) -> np.ndarray:
        return self._parts[self._prefix[index]].read(
            int(self._doc[index]), int(self._start[index]), int(self.lengths[index])
        )


def build_megatron_source(data_cfg) -> MegatronSource:
    """The Megatron source ``data_cfg`` (a DataConfig) describes, checked against its vocabulary."""

    vocab, origin, tok = declared_vocabulary(data_cfg, f"data.source='megatron' ({data_cfg.megatron_prefix})")
    return MegatronSource(data_cfg.megatron_prefix, data_cfg.corpus, vocab, origin, tok)
