"""Data configuration dataclasses (plain str/int/float/bool/list fields, Hydra-friendly).

``CorpusConfig`` says how a local corpus becomes a tokenized, memory-mapped document store;
``SamplerConfig`` how documents are drawn into global batches; ``DataConfig`` picks the source
(a local corpus, the CPython stdlib, or synthetic lengths) and holds the other two.
"""
from __future__ import annotations

from dataclasses import dataclass, field

LONG_DOC_POLICIES = ("split", "drop", "error")
SOURCES = ("corpus", "stdlib", "synthetic")
BIN_DTYPES = ("uint16", "uint32", "int32", "int64")


@dataclass
class CorpusConfig:
    paths: list[str] = field(default_factory=list)
    """Files or directories (searched recursively, in sorted order). Text files (see
    ``text_extensions``) are one document each; ``.jsonl`` holds one document per line in a "text"
    field; ``.npy`` is pre-tokenized (1-D: one document, 2-D: one document per row); ``.bin`` is raw
    pre-tokenized tokens of ``bin_dtype`` with an optional sibling ``<name>.offsets.npy`` of
    document boundaries (without it the whole file is one document)."""
    cache_dir: str = ".cache/flexsp_data"
    """Where the trained tokenizer and the tokenized corpus are cached, keyed by a fingerprint of the
    input files (path, size, mtime) and of every option below that changes the tokens."""
    tokenizer: str = "bpe"
    """'bpe' (train a byte-level BPE on the corpus itself), 'byte' (UTF-8 bytes, vocab 257), or a
    path to a tokenizer.json."""
    vocab_size: int = 8192
    """Target vocab size when training BPE (ignored otherwise)."""
    bpe_train_chars: int = 20_000_000
    """At most this many characters of the corpus (in file order) are used to train BPE."""
    max_doc_tokens: int = 32768
    """Context limit: the longest document the sampler may hand out."""
    long_doc_policy: str = "split"
    """What to do with a document longer than max_doc_tokens: 'split' it into consecutive chunks of
    max_doc_tokens (each chunk becomes its own document with positions restarting at 0; a trailing
    chunk shorter than min_doc_tokens is dropped), 'drop' it, or raise ('error')."""
    min_doc_tokens: int = 2
    """Documents (and split chunks) shorter than this are dropped; 2 = at least one target token."""
    append_eos: bool = True
    """Append the tokenizer's EOS token to every tokenized text document (not to pre-tokenized)."""
    text_extensions: list[str] = field(default_factory=lambda: [".txt", ".md", ".py", ".rst", ".c", ".h"])
    """File suffixes read as plain text (UTF-8, undecodable bytes replaced) when a directory is
    scanned; an explicitly listed file is always read whatever its suffix."""
    bin_dtype: str = "uint16"
    """Token dtype of pre-tokenized ``.bin`` files."""

    def __post_init__(self) -> None:
        if self.long_doc_policy not in LONG_DOC_POLICIES:
            raise ValueError(f"CorpusConfig.long_doc_policy={self.long_doc_policy!r}; "
                             f"valid options: {list(LONG_DOC_POLICIES)}")
        if self.bin_dtype not in BIN_DTYPES:
            raise ValueError(f"CorpusConfig.bin_dtype={self.bin_dtype!r}; valid options: {list(BIN_DTYPES)}")
        if self.min_doc_tokens < 1 or self.max_doc_tokens < self.min_doc_tokens:
            raise ValueError(f"CorpusConfig needs 1 <= min_doc_tokens <= max_doc_tokens, got "
                             f"min_doc_tokens={self.min_doc_tokens}, max_doc_tokens={self.max_doc_tokens}")
        if self.tokenizer == "bpe" and self.vocab_size <= 258:
            raise ValueError(f"CorpusConfig.vocab_size={self.vocab_size} must be > 258 for BPE")


@dataclass
class SamplerConfig:
    global_batch_tokens: int = 65536
    """Token budget of one global batch: documents are added in shuffled order while they fit."""
    seed: int = 0
    """Seed of the per-epoch shuffles; the same seed gives the same batches on every rank."""
    shuffle: bool = True
    """Shuffle documents each epoch (False: corpus order)."""
    drop_last: bool = False
    """Drop the last, partially filled batch of each epoch."""
    max_docs_per_batch: int = 0
    """Cap on documents per global batch (0 = no cap; bounds the planner's problem size)."""

    def __post_init__(self) -> None:
        if self.global_batch_tokens < 1:
            raise ValueError(f"SamplerConfig.global_batch_tokens must be >= 1, got {self.global_batch_tokens}")
        if self.max_docs_per_batch < 0:
            raise ValueError(f"SamplerConfig.max_docs_per_batch must be >= 0, got {self.max_docs_per_batch}")


@dataclass
class DataConfig:
    source: str = "synthetic"
    """'corpus' (``corpus.paths``), 'stdlib' (the CPython standard library .py files), or
    'synthetic' (lengths from ``distribution``, random tokens)."""
    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    """Tokenization/caching options for 'corpus' and 'stdlib'."""
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    """Global-batch sampling options."""
    stdlib_max_files: int = 200
    """'stdlib': use a seeded subset of this many files (0 = all of them)."""
    distribution: str = "wikipedia"
    """'synthetic': name of the length distribution (see flexsp.data.synthetic.DISTRIBUTIONS)."""
    num_docs: int = 10000
    """'synthetic': number of documents."""
    synthetic_vocab_size: int = 32000
    """'synthetic': random tokens are drawn from [0, synthetic_vocab_size)."""
    seed: int = 0
    """Seed of the synthetic lengths/tokens and of the stdlib subset."""

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise ValueError(f"DataConfig.source={self.source!r}; valid options: {list(SOURCES)}")
        if self.num_docs < 1 or self.synthetic_vocab_size < 1 or self.stdlib_max_files < 0:
            raise ValueError(f"DataConfig: num_docs={self.num_docs}, synthetic_vocab_size="
                             f"{self.synthetic_vocab_size} must be >= 1 and stdlib_max_files="
                             f"{self.stdlib_max_files} >= 0")
