"""Local corpus -> tokenized, memory-mapped document store (built once, cached on disk).

Why: every rank must be able to fetch the tokens of exactly the documents its SP group runs, without
loading or re-tokenizing the corpus. The builder tokenizes offline and writes

    <cache_dir>/<fingerprint>/tokens.bin    all documents' tokens back to back (uint16/uint32)
                              offsets.npy   int64 [num_docs + 1] document boundaries
                              tokenizer.json  the tokenizer used (trained BPE, loaded, or byte)
                              meta.json     counts, dtype, vocab, input files, config
                              target_mask.bin, target_counts.npy   supervised fine-tuning only:
                                            uint8 per token (1: a trained target), int64 per document

``TokenizedCorpus`` opens that directory with a memmap: ``lengths`` for the sampler/planner and
``tokens(i)`` (a zero-copy view) for the ranks. Build on one rank (or before launch) and barrier;
the cache is written to a temporary directory and renamed into place, so a reader never sees a
half-written store.

The same store is written by the Hugging Face ``datasets`` source (flexsp.data.hf) and the
supervised fine-tuning source (flexsp.data.sft, with a target mask) through :func:`write_store`.

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
from flexsp.data.tokenizer import ByteTokenizer, load_tokenizer, tokenizer_files, train_bpe
from flexsp.errors import UserError

PRETOKENIZED = (".npy", ".bin")
FORMAT_VERSION = 2  # 2: pre-tokenized-only corpora take the declared vocabulary, not max id + 1


def collect_files(cfg: CorpusConfig) -> list[Path]:
    """The corpus files in a stable order: explicit files as given, directories scanned recursively
    (sorted) for text extensions, .jsonl, .npy and .bin (``*.offsets.npy`` belong to their .bin)."""
    if not cfg.paths:
        raise UserError("CorpusConfig.paths is empty: give at least one file or directory")
    wanted = {e.lower() for e in cfg.text_extensions} | {".jsonl", *PRETOKENIZED}
    files: list[Path] = []
    for p in map(Path, cfg.paths):
        if not p.exists():
            raise UserError(
                f"corpus path {p} does not exist (CorpusConfig.paths: existing files or "
                f"directories of text ({', '.join(cfg.text_extensions)}), .jsonl, .npy "
                f"or .bin files)"
            )
        if p.is_file():
            files.append(p)
            continue
        for f in sorted(p.rglob("*")):
            if f.is_file() and f.suffix.lower() in wanted and not f.name.endswith(".offsets.npy"):
                files.append(f)
    if not files:
        raise UserError(f"corpus is empty: no files with extensions {sorted(wanted)} under {cfg.paths}")
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
                raise UserError(
                    f"{path}:{lineno}: corrupt JSONL line ({exc.msg} at column "
                    f"{exc.colno}); each line must be one JSON object with a string "
                    f"'text' field"
                ) from exc
            if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                got = f"keys {sorted(obj)[:8]}" if isinstance(obj, dict) else type(obj).__name__
                raise UserError(
                    f"{path}:{lineno}: expected a JSON object with a string 'text' field, got {got}"
                )
            yield obj["text"]


def _iter_token_arrays(path: Path, cfg: CorpusConfig) -> Iterator[np.ndarray]:
    """Documents of a pre-tokenized .npy or .bin file, validated."""
    if path.suffix.lower() == ".npy":
        try:
            arr = np.load(path, mmap_mode="r", allow_pickle=False)
        except Exception as exc:
            raise UserError(f"{path}: not a valid .npy file ({exc})") from exc
        if arr.dtype.kind not in "iu" or arr.ndim not in (1, 2):
            raise UserError(
                f"{path}: expected a 1-D or 2-D integer token array, got dtype={arr.dtype} shape={arr.shape}"
            )
        yield from ([arr] if arr.ndim == 1 else list(arr))
        return
    dtype = np.dtype(cfg.bin_dtype)
    size = path.stat().st_size
    if size % dtype.itemsize:
        raise UserError(
            f"{path}: size {size} bytes is not a multiple of {cfg.bin_dtype} "
            f"({dtype.itemsize} bytes): truncated file or wrong bin_dtype"
        )
    n = size // dtype.itemsize
    tokens = np.memmap(path, dtype=dtype, mode="r") if n else np.zeros(0, dtype)
    off_path = path.with_name(path.name[:-4] + ".offsets.npy")
    offsets = np.array([0, n], dtype=np.int64)
    if off_path.exists():
        try:
            offsets = np.load(off_path, allow_pickle=False)
        except Exception as exc:
            raise UserError(f"{off_path}: not a valid .npy file ({exc})") from exc
        if (
            offsets.ndim != 1
            or offsets.dtype.kind not in "iu"
            or len(offsets) < 1
            or offsets[0] != 0
            or offsets[-1] != n
            or np.any(np.diff(offsets) < 0)
        ):
            raise UserError(
                f"{off_path}: offsets must be a non-decreasing integer array from 0 to "
                f"{n} (the token count of {path.name})"
            )
    for s, e in zip(offsets[:-1], offsets[1:]):
        yield tokens[int(s) : int(e)]


def tokenizer_digest(cfg: CorpusConfig) -> str:
    """What identifies ``cfg.tokenizer`` in a cache key: 'bpe'/'byte', or a hash of the tokenizer
    file (or of the tokenizer files of a model directory)."""
    if cfg.tokenizer in ("bpe", "byte"):
        return cfg.tokenizer
    p = Path(cfg.tokenizer)
    if not p.exists():
        raise UserError(
            f"tokenizer {cfg.tokenizer} does not exist (CorpusConfig.tokenizer: 'bpe', "
            f"'byte', a tokenizer.json path or a Hugging Face model directory)"
        )
    h = hashlib.sha256()
    for f in tokenizer_files(p):
        h.update(f.name.encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()


def options_fingerprint(cfg: CorpusConfig, inputs: list[Path], extra: dict | None = None) -> str:
    """Cache key of a store: the input files (path, size, mtime), the token-changing options of
    ``cfg`` and ``extra`` (source-specific options)."""
    h = hashlib.sha256(f"v{FORMAT_VERSION}".encode())
    for f in inputs:
        st = f.stat()
        h.update(f"{f.resolve()}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    opts = asdict(cfg)
    for k in ("paths", "cache_dir", "text_extensions"):
        opts.pop(k)
    opts["tokenizer"] = tokenizer_digest(cfg)
    h.update(json.dumps({**opts, **(extra or {})}, sort_keys=True).encode())
    return h.hexdigest()[:20]


def _fingerprint(files: list[Path], cfg: CorpusConfig) -> str:
    return options_fingerprint(cfg, files)


def named_tokenizer(cfg: CorpusConfig):
    """The tokenizer ``cfg.tokenizer`` names ('byte', a file or a model directory); None for 'bpe'
    (trained on the data by the builder)."""
    if cfg.tokenizer == "byte":
        return ByteTokenizer()
    if cfg.tokenizer == "bpe":
        return None
    return load_tokenizer(cfg.tokenizer)


def train_bpe_on(texts: Iterator[str], cfg: CorpusConfig):
    """A byte-level BPE of ``cfg.vocab_size`` trained on the first ``cfg.bpe_train_chars``
    characters of ``texts``."""
    if cfg.vocab_size <= 258:
        raise UserError(
            f"CorpusConfig.vocab_size={cfg.vocab_size} must be > 258 to train BPE "
            f"(tokenizer='bpe'); or use tokenizer='byte', a tokenizer.json or a model directory"
        )

    def budgeted():
        budget = cfg.bpe_train_chars
        for t in texts:
            yield t[:budget]
            budget -= len(t)
            if budget <= 0:
                return

    return train_bpe(budgeted(), cfg.vocab_size)


def _make_tokenizer(files: list[Path], cfg: CorpusConfig):
    if cfg.tokenizer != "bpe":
        return named_tokenizer(cfg)
    text_files = [f for f in files if f.suffix.lower() not in PRETOKENIZED]
    if not text_files:
        return None  # pre-tokenized only: nothing to train on, nothing to encode
    return train_bpe_on((t for f in text_files for t in _iter_texts(f)), cfg)


class _Writer:
    """Appends documents to tokens.bin, applying the long-document policy."""

    def __init__(
        self, directory: Path, dtype: np.dtype, vocab_size: int, cfg: CorpusConfig, vocab_origin: str = ""
    ):
        self.fh = open(directory / "tokens.bin", "wb")
        self.dtype, self.vocab_size, self.cfg, self.vocab_origin = dtype, vocab_size, cfg, vocab_origin
        self.offsets, self.doc_file = [0], []
        self.stats = {"dropped_short": 0, "dropped_long": 0, "split": 0}
        self.directory = directory
        self.mask_fh = None
        self.target_counts: list[int] = []

    def _check_ids(self, ids: np.ndarray, name: str) -> None:
        if ids.size and (int(ids.min()) < 0 or int(ids.max()) >= self.vocab_size):
            raise UserError(
                f"{name}: token ids in [{int(ids.min())}, {int(ids.max())}] fall outside "
                f"the vocabulary [0, {self.vocab_size}){self.vocab_origin}"
            )
        if ids.size and int(ids.max()) > np.iinfo(self.dtype).max:
            raise UserError(f"{name}: token id {int(ids.max())} does not fit {self.dtype}")

    def add_masked(self, ids: np.ndarray, target_mask: np.ndarray, file_index: int, name: str) -> None:
        """Add one whole document with its target mask (True: a trained target token), as
        supervised fine-tuning does; no length policy (the source applies its own). A store
        holds either only masked or only plain documents."""
        assert ids.shape == target_mask.shape and ids.ndim == 1, "a target mask must match its document"
        assert len(self.offsets) - 1 == len(self.target_counts), "masked and plain documents mixed"
        self._check_ids(ids, name)
        if self.mask_fh is None:
            self.mask_fh = open(self.directory / "target_mask.bin", "wb")
        self.fh.write(np.ascontiguousarray(ids, dtype=self.dtype).tobytes())
        self.mask_fh.write(np.ascontiguousarray(target_mask, dtype=np.uint8).tobytes())
        self.offsets.append(self.offsets[-1] + int(ids.size))
        self.doc_file.append(file_index)
        self.target_counts.append(int(np.count_nonzero(target_mask[1:])))

    def close(self) -> None:
        self.fh.close()
        if self.mask_fh is not None:
            self.mask_fh.close()

    def add(self, ids: np.ndarray, file_index: int, name: str) -> None:
        cfg = self.cfg
        assert not self.target_counts, "masked and plain documents mixed"
        self._check_ids(ids, name)
        chunks = [ids]
        if ids.size > cfg.max_doc_tokens:
            if cfg.long_doc_policy == "error":
                raise UserError(
                    f"{name}: document of {ids.size} tokens exceeds max_doc_tokens="
                    f"{cfg.max_doc_tokens} (long_doc_policy='error')"
                )
            if cfg.long_doc_policy == "drop":
                self.stats["dropped_long"] += 1
                return
            self.stats["split"] += 1
            chunks = [ids[i : i + cfg.max_doc_tokens] for i in range(0, ids.size, cfg.max_doc_tokens)]
        for c in chunks:
            if c.size < cfg.min_doc_tokens:
                self.stats["dropped_short"] += 1
                continue
            self.fh.write(np.ascontiguousarray(c, dtype=self.dtype).tobytes())
            self.offsets.append(self.offsets[-1] + int(c.size))
            self.doc_file.append(file_index)

    def add_texts(self, tok, texts: list[str], file_index: int, name: str) -> None:
        """Tokenize one bounded batch of texts (appending EOS when configured) and add them."""
        eos = [tok.eos_id] if self.cfg.append_eos and tok.eos_id is not None else []
        for ids in tok.encode_batch(texts):
            self.add(np.asarray(ids + eos, dtype=np.int64), file_index, name)


def write_store(
    out: Path,
    cfg: CorpusConfig,
    tok,
    vocab_size: int,
    fill,
    inputs: list[str],
    what: str,
    vocab_origin: str = "",
    extra_meta: dict | None = None,
) -> "TokenizedCorpus":
    """Write a store into a temporary sibling of ``out`` and rename it into place. ``fill(writer)``
    adds the documents (``writer.add`` / ``writer.add_texts``); ``tok`` (or None) is saved with it;
    ``vocab_size`` is the vocabulary every token id must be below (``vocab_origin`` says where it
    was declared, for the error message); ``what`` names the input in errors."""
    dtype = np.dtype(np.uint16 if vocab_size <= 65536 else np.uint32)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".tmp", dir=out.parent))
    try:
        w = _Writer(tmp, dtype, vocab_size, cfg, vocab_origin)
        try:
            fill(w)
        finally:
            w.close()
        if len(w.offsets) == 1:
            raise UserError(
                f"{what} has no documents left after tokenization "
                f"(min_doc_tokens={cfg.min_doc_tokens}, long_doc_policy="
                f"{cfg.long_doc_policy!r}, stats {w.stats})"
            )
        np.save(tmp / "offsets.npy", np.asarray(w.offsets, dtype=np.int64))
        np.save(tmp / "doc_file.npy", np.asarray(w.doc_file, dtype=np.int32))
        if w.mask_fh is not None:
            np.save(tmp / "target_counts.npy", np.asarray(w.target_counts, dtype=np.int64))
        if tok is not None:
            tok.save(tmp / "tokenizer.json")
        meta = dict(
            version=FORMAT_VERSION,
            num_docs=len(w.offsets) - 1,
            num_tokens=w.offsets[-1],
            dtype=dtype.name,
            vocab_size=int(vocab_size),
            tokenizer="tokenizer.json" if tok is not None else None,
            eos_token=getattr(tok, "eos_token", None),
            files=list(inputs),
            stats=w.stats,
            config=asdict(cfg),
            target_mask="target_mask.bin" if w.mask_fh is not None else None,
            **(extra_meta or {}),
        )
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


def build_corpus(cfg: CorpusConfig, batch_docs: int = 64) -> "TokenizedCorpus":
    """Tokenize the corpus described by ``cfg`` (or reuse its cache) and open it."""
    files = collect_files(cfg)
    out = Path(cfg.cache_dir) / _fingerprint(files, cfg)
    if (out / "meta.json").exists():
        return TokenizedCorpus(out)
    tok = _make_tokenizer(files, cfg)
    if tok is not None:
        vocab, origin = tok.vocab_size, f" of the tokenizer ({cfg.tokenizer})"
    else:  # pre-tokenized only, tokenizer='bpe': the declared vocabulary
        vocab, origin = (
            cfg.vocab_size,
            (
                " declared by corpus.vocab_size: set data.corpus.vocab_size (or data.corpus.tokenizer) "
                "to the vocabulary the ids come from, or check corpus.bin_dtype"
            ),
        )

    def fill(w: _Writer) -> None:
        for fi, f in enumerate(files):
            if f.suffix.lower() in PRETOKENIZED:
                for di, ids in enumerate(_iter_token_arrays(f, cfg)):
                    w.add(np.asarray(ids), fi, f"{f} (document {di})")
                continue
            if tok is None:
                raise UserError(f"{f}: text file needs a tokenizer")
            texts = _iter_texts(f)
            while batch := [t for _, t in zip(range(batch_docs), texts)]:
                w.add_texts(tok, batch, fi, str(f))

    return write_store(out, cfg, tok, vocab, fill, [str(f) for f in files], f"corpus {cfg.paths}", origin)


class TokenizedCorpus(DocumentSource):
    """A built document store, memory-mapped. ``lengths[i]`` and ``tokens(i)`` for any document;
    ``target_counts`` and ``target_mask(i)`` when the store has a target mask (SFT)."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        meta_path = self.directory / "meta.json"
        try:
            self.meta = json.loads(meta_path.read_text())
            self.offsets = np.load(self.directory / "offsets.npy", allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise UserError(f"{self.directory}: not a valid tokenized corpus ({exc})") from exc
        self.dtype = np.dtype(self.meta["dtype"])
        tokens_path = self.directory / "tokens.bin"
        expected = int(self.offsets[-1]) * self.dtype.itemsize
        if not tokens_path.exists() or tokens_path.stat().st_size != expected:
            raise UserError(
                f"{tokens_path}: expected {expected} bytes for {int(self.offsets[-1])} "
                f"{self.dtype} tokens (corrupt or truncated cache; delete the directory)"
            )
        self._tokens = np.memmap(tokens_path, dtype=self.dtype, mode="r")
        self.lengths = np.diff(self.offsets)
        self._mask = None
        if self.meta.get("target_mask"):
            mask_path = self.directory / self.meta["target_mask"]
            if not mask_path.exists() or mask_path.stat().st_size != int(self.offsets[-1]):
                raise UserError(
                    f"{mask_path}: expected {int(self.offsets[-1])} bytes, one per token "
                    f"(corrupt or truncated cache; delete the directory)"
                )
            self._mask = np.memmap(mask_path, dtype=np.uint8, mode="r")
            self.target_counts = np.load(self.directory / "target_counts.npy", allow_pickle=False)
        self.vocab_size = int(self.meta["vocab_size"])
        self._tokenizer = None

    def _read(self, index: int) -> np.ndarray:
        """Zero-copy view of document ``index``'s tokens."""
        return self._tokens[self.offsets[index] : self.offsets[index + 1]]

    def target_mask(self, index: int) -> np.ndarray | None:
        """bool ``[L]``: True on document ``index``'s trained target tokens (None: no mask, all)."""
        if self._mask is None:
            return None
        if not 0 <= index < self.num_docs:
            raise IndexError(f"document {index} out of range [0, {self.num_docs})")
        return self._mask[self.offsets[index] : self.offsets[index + 1]].view(np.bool_)

    @property
    def tokenizer(self):
        """The tokenizer the corpus was built with (None for pre-tokenized-only corpora)."""
        if self._tokenizer is None and self.meta.get("tokenizer"):
            self._tokenizer = load_tokenizer(
                self.directory / self.meta["tokenizer"], eos_token=self.meta.get("eos_token")
            )
        return self._tokenizer


def declared_vocabulary(data_cfg, what: str):
    """The vocabulary pre-tokenized input ('megatron', an 'hf' ids column) must stay below:
    ``(vocab_size, where it was declared (for messages), the named tokenizer or None)``.
    ``data.vocab_size`` when set, else the vocabulary of ``data.corpus.tokenizer`` when that names
    one ('byte', a tokenizer.json, a model directory); a ValueError otherwise."""
    tok = named_tokenizer(data_cfg.corpus)
    if data_cfg.vocab_size:
        return int(data_cfg.vocab_size), " declared by data.vocab_size", tok
    if tok is not None:
        return int(tok.vocab_size), f" of data.corpus.tokenizer ({data_cfg.corpus.tokenizer})", tok
    raise UserError(
        f"{what} is pre-tokenized: declare its vocabulary with data.vocab_size=N, or name "
        f"its tokenizer with data.corpus.tokenizer=/path/to/hf_model_dir (or a "
        f"tokenizer.json); data.corpus.tokenizer={data_cfg.corpus.tokenizer!r} names none"
    )
