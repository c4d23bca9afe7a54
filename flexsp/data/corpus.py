"""Local corpus -> tokenized, memory-mapped document store (built once, cached on disk).

Why: every rank must be able to fetch the tokens of exactly the documents its SP group runs, without
loading or re-tokenizing the corpus. The builder tokenizes offline and writes

    <cache_dir>/<fingerprint>/tokens.bin    all documents' tokens back to back (uint16/uint32)
                              offsets.npy   int64 [num_docs + 1] document boundaries
                              tokenizer.json  the tokenizer used (trained BPE, loaded, or byte)
                              meta.json     counts, dtype, vocab, input files, config

``TokenizedCorpus`` opens that directory with a memmap: ``lengths`` for the sampler/planner and
``tokens(i)`` (a zero-copy view) for the ranks. Build on one rank (or before launch) and barrier;
the cache is written to a temporary directory and renamed into place, so a reader never sees a
half-written store.

Bad input raises ValueError naming the file and the problem (missing path, empty corpus, corrupt
.npy/.bin/.jsonl, token ids outside the vocabulary).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Iterator

import numpy as np

from flexsp.data.config import CorpusConfig
from flexsp.data.source import DocumentSource
from flexsp.data.tokenizer import ByteTokenizer, load_tokenizer, train_bpe

PRETOKENIZED = (".npy", ".bin")
FORMAT_VERSION = 1


def collect_files(cfg: CorpusConfig) -> list[Path]:
    """The corpus files in a stable order: explicit files as given, directories scanned recursively
    (sorted) for text extensions, .jsonl, .npy and .bin (``*.offsets.npy`` belong to their .bin)."""
    if not cfg.paths:
        raise ValueError("CorpusConfig.paths is empty: give at least one file or directory")
    wanted = {e.lower() for e in cfg.text_extensions} | {".jsonl", *PRETOKENIZED}
    files: list[Path] = []
    for p in map(Path, cfg.paths):
        if not p.exists():
            raise ValueError(f"corpus path {p} does not exist")
        if p.is_file():
            files.append(p)
            continue
        for f in sorted(p.rglob("*")):
            if f.is_file() and f.suffix.lower() in wanted and not f.name.endswith(".offsets.npy"):
                files.append(f)
    if not files:
        raise ValueError(f"corpus is empty: no files with extensions {sorted(wanted)} under {cfg.paths}")
    return files


def _iter_texts(path: Path) -> Iterator[str]:
    """Documents of a text or JSONL file."""
    if path.suffix.lower() != ".jsonl":
        yield path.read_bytes().decode("utf-8", errors="replace")
        return
    with open(path, encoding="utf-8", errors="replace") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{lineno}: corrupt JSONL line ({exc.msg})") from exc
            if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                raise ValueError(f"{path}:{lineno}: expected a JSON object with a string 'text' field")
            yield obj["text"]


def _iter_token_arrays(path: Path, cfg: CorpusConfig) -> Iterator[np.ndarray]:
    """Documents of a pre-tokenized .npy or .bin file, validated."""
    if path.suffix.lower() == ".npy":
        try:
            arr = np.load(path, mmap_mode="r", allow_pickle=False)
        except Exception as exc:
            raise ValueError(f"{path}: not a valid .npy file ({exc})") from exc
        if arr.dtype.kind not in "iu" or arr.ndim not in (1, 2):
            raise ValueError(f"{path}: expected a 1-D or 2-D integer token array, got "
                             f"dtype={arr.dtype} shape={arr.shape}")
        yield from ([arr] if arr.ndim == 1 else list(arr))
        return
    dtype = np.dtype(cfg.bin_dtype)
    size = path.stat().st_size
    if size % dtype.itemsize:
        raise ValueError(f"{path}: size {size} bytes is not a multiple of {cfg.bin_dtype} "
                         f"({dtype.itemsize} bytes): truncated file or wrong bin_dtype")
    n = size // dtype.itemsize
    tokens = np.memmap(path, dtype=dtype, mode="r") if n else np.zeros(0, dtype)
    off_path = path.with_name(path.name[:-4] + ".offsets.npy")
    offsets = np.array([0, n], dtype=np.int64)
    if off_path.exists():
        try:
            offsets = np.load(off_path, allow_pickle=False)
        except Exception as exc:
            raise ValueError(f"{off_path}: not a valid .npy file ({exc})") from exc
        if (offsets.ndim != 1 or offsets.dtype.kind not in "iu" or len(offsets) < 1 or offsets[0] != 0
                or offsets[-1] != n or np.any(np.diff(offsets) < 0)):
            raise ValueError(f"{off_path}: offsets must be a non-decreasing integer array from 0 to "
                             f"{n} (the token count of {path.name})")
    for s, e in zip(offsets[:-1], offsets[1:]):
        yield tokens[int(s):int(e)]


def _fingerprint(files: list[Path], cfg: CorpusConfig) -> str:
    h = hashlib.sha256(f"v{FORMAT_VERSION}".encode())
    for f in files:
        st = f.stat()
        h.update(f"{f.resolve()}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    opts = asdict(cfg)
    for k in ("paths", "cache_dir", "text_extensions"):
        opts.pop(k)
    if cfg.tokenizer not in ("bpe", "byte"):
        if not Path(cfg.tokenizer).is_file():
            raise ValueError(f"tokenizer file {cfg.tokenizer} does not exist "
                             f"(CorpusConfig.tokenizer: 'bpe', 'byte' or a tokenizer.json path)")
        opts["tokenizer"] = hashlib.sha256(Path(cfg.tokenizer).read_bytes()).hexdigest()
    h.update(json.dumps(opts, sort_keys=True).encode())
    return h.hexdigest()[:20]


def _make_tokenizer(files: list[Path], cfg: CorpusConfig):
    if cfg.tokenizer == "byte":
        return ByteTokenizer()
    if cfg.tokenizer != "bpe":
        return load_tokenizer(cfg.tokenizer)
    text_files = [f for f in files if f.suffix.lower() not in PRETOKENIZED]
    if not text_files:
        return None  # pre-tokenized only: nothing to train on, nothing to encode

    def texts():
        budget = cfg.bpe_train_chars
        for f in text_files:
            for t in _iter_texts(f):
                yield t[:budget]
                budget -= len(t)
                if budget <= 0:
                    return
    return train_bpe(texts(), cfg.vocab_size)


class _Writer:
    """Appends documents to tokens.bin, applying the long-document policy."""

    def __init__(self, directory: Path, dtype: np.dtype, vocab_size: int | None, cfg: CorpusConfig):
        self.fh = open(directory / "tokens.bin", "wb")
        self.dtype, self.vocab_size, self.cfg = dtype, vocab_size, cfg
        self.offsets, self.doc_file = [0], []
        self.stats = {"dropped_short": 0, "dropped_long": 0, "split": 0}

    def add(self, ids: np.ndarray, file_index: int, name: str) -> None:
        cfg = self.cfg
        if ids.size and (int(ids.min()) < 0 or (self.vocab_size and int(ids.max()) >= self.vocab_size)):
            raise ValueError(f"{name}: token ids in [{int(ids.min())}, {int(ids.max())}] fall outside "
                             f"the vocabulary [0, {self.vocab_size})")
        if ids.size and int(ids.max()) > np.iinfo(self.dtype).max:
            raise ValueError(f"{name}: token id {int(ids.max())} does not fit {self.dtype}")
        chunks = [ids]
        if ids.size > cfg.max_doc_tokens:
            if cfg.long_doc_policy == "error":
                raise ValueError(f"{name}: document of {ids.size} tokens exceeds max_doc_tokens="
                                 f"{cfg.max_doc_tokens} (long_doc_policy='error')")
            if cfg.long_doc_policy == "drop":
                self.stats["dropped_long"] += 1
                return
            self.stats["split"] += 1
            chunks = [ids[i:i + cfg.max_doc_tokens] for i in range(0, ids.size, cfg.max_doc_tokens)]
        for c in chunks:
            if c.size < cfg.min_doc_tokens:
                self.stats["dropped_short"] += 1
                continue
            self.fh.write(np.ascontiguousarray(c, dtype=self.dtype).tobytes())
            self.offsets.append(self.offsets[-1] + int(c.size))
            self.doc_file.append(file_index)


def build_corpus(cfg: CorpusConfig, batch_docs: int = 64) -> "TokenizedCorpus":
    """Tokenize the corpus described by ``cfg`` (or reuse its cache) and open it."""
    files = collect_files(cfg)
    out = Path(cfg.cache_dir) / _fingerprint(files, cfg)
    if (out / "meta.json").exists():
        return TokenizedCorpus(out)
    tok = _make_tokenizer(files, cfg)
    vocab = tok.vocab_size if tok is not None else None
    dtype = np.dtype(np.uint16 if vocab is not None and vocab <= 65536 else np.uint32)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".tmp", dir=out.parent))
    try:
        w = _Writer(tmp, dtype, vocab, cfg)
        for fi, f in enumerate(files):
            if f.suffix.lower() in PRETOKENIZED:
                for di, ids in enumerate(_iter_token_arrays(f, cfg)):
                    w.add(np.asarray(ids), fi, f"{f} (document {di})")
                continue
            if tok is None:
                raise ValueError(f"{f}: text file needs a tokenizer")
            batch: list[str] = []
            texts = _iter_texts(f)
            while True:
                batch = [t for _, t in zip(range(batch_docs), texts)]
                if not batch:
                    break
                for ids in tok.encode_batch(batch):
                    if cfg.append_eos and tok.eos_id is not None:
                        ids = ids + [tok.eos_id]
                    w.add(np.asarray(ids, dtype=np.int64), fi, str(f))
        w.fh.close()
        if len(w.offsets) == 1:
            raise ValueError(f"corpus {cfg.paths} has no documents left after tokenization "
                             f"(min_doc_tokens={cfg.min_doc_tokens}, long_doc_policy="
                             f"{cfg.long_doc_policy!r}, stats {w.stats})")
        np.save(tmp / "offsets.npy", np.asarray(w.offsets, dtype=np.int64))
        np.save(tmp / "doc_file.npy", np.asarray(w.doc_file, dtype=np.int32))
        if tok is not None:
            tok.save(tmp / "tokenizer.json")
        meta = dict(version=FORMAT_VERSION, num_docs=len(w.offsets) - 1, num_tokens=w.offsets[-1],
                    dtype=dtype.name, vocab_size=vocab if vocab is not None else int(_max_token(tmp, dtype)) + 1,
                    tokenizer="tokenizer.json" if tok is not None else None,
                    files=[str(f) for f in files], stats=w.stats, config=asdict(cfg))
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        try:
            os.replace(tmp, out)
        except OSError:  # another process won the race: use its (identical) store
            if not (out / "meta.json").exists():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return TokenizedCorpus(out)


def _max_token(directory: Path, dtype: np.dtype) -> int:
    return int(np.memmap(directory / "tokens.bin", dtype=dtype, mode="r").max())


class TokenizedCorpus(DocumentSource):
    """A built document store, memory-mapped. ``lengths[i]`` and ``tokens(i)`` for any document."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        meta_path = self.directory / "meta.json"
        try:
            self.meta = json.loads(meta_path.read_text())
            self.offsets = np.load(self.directory / "offsets.npy", allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise ValueError(f"{self.directory}: not a valid tokenized corpus ({exc})") from exc
        self.dtype = np.dtype(self.meta["dtype"])
        tokens_path = self.directory / "tokens.bin"
        expected = int(self.offsets[-1]) * self.dtype.itemsize
        if not tokens_path.exists() or tokens_path.stat().st_size != expected:
            raise ValueError(f"{tokens_path}: expected {expected} bytes for {int(self.offsets[-1])} "
                             f"{self.dtype} tokens (corrupt or truncated cache; delete the directory)")
        self._tokens = np.memmap(tokens_path, dtype=self.dtype, mode="r")
        self.lengths = np.diff(self.offsets)
        self.vocab_size = int(self.meta["vocab_size"])
        self._tokenizer = None

    def _read(self, index: int) -> np.ndarray:
        """Zero-copy view of document ``index``'s tokens."""
        return self._tokens[self.offsets[index]:self.offsets[index + 1]]

    @property
    def tokenizer(self):
        """The tokenizer the corpus was built with (None for pre-tokenized-only corpora)."""
        if self._tokenizer is None and self.meta.get("tokenizer"):
            self._tokenizer = load_tokenizer(self.directory / self.meta["tokenizer"])
        return self._tokenizer
