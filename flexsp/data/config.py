"""Data configuration dataclasses (plain str/int/float/bool/list fields, Hydra-friendly).

``CorpusConfig`` says how text becomes a tokenized, memory-mapped document store (tokenizer,
cache, long-document policy; shared by every text source); ``SamplerConfig`` how documents are
drawn into global batches; ``DataConfig`` picks the source (a local corpus, a Hugging Face
``datasets`` dataset or Parquet/JSONL/Arrow files, supervised fine-tuning conversations,
Megatron-LM indexed datasets, the CPython stdlib, or synthetic lengths) and holds the other two.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from flexsp.errors import UserError

LONG_DOC_POLICIES = ("split", "drop", "error")
SOURCES = ("corpus", "hf", "sft", "megatron", "stdlib", "synthetic")
SFT_FORMATS = ("auto", "messages", "prompt_completion")
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
    """'bpe' (train a byte-level BPE on the corpus itself), 'byte' (UTF-8 bytes, vocab 257), a
    path to a tokenizer.json, or a Hugging Face model directory (``save_pretrained`` output: a
    tokenizer.json, its EOS token from tokenizer_config.json). Used by every text source."""
    vocab_size: int = 8192
    """Target vocab size when training BPE (> 258: 256 bytes + EOS + a merge). A corpus of only
    pre-tokenized files (.npy/.bin) with
    tokenizer='bpe' takes it as its declared vocabulary: token ids must be below it."""
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
            raise UserError(
                f"CorpusConfig.long_doc_policy={self.long_doc_policy!r}; "
                f"valid options: {list(LONG_DOC_POLICIES)}"
            )
        if self.bin_dtype not in BIN_DTYPES:
            raise UserError(f"CorpusConfig.bin_dtype={self.bin_dtype!r}; valid options: {list(BIN_DTYPES)}")
        if self.min_doc_tokens < 1 or self.max_doc_tokens < self.min_doc_tokens:
            raise UserError(
                f"CorpusConfig needs 1 <= min_doc_tokens <= max_doc_tokens, got "
                f"min_doc_tokens={self.min_doc_tokens}, max_doc_tokens={self.max_doc_tokens}"
            )
        if self.vocab_size < 1:
            raise UserError(f"CorpusConfig.vocab_size={self.vocab_size} must be >= 1 (> 258 to train BPE)")
        if not self.tokenizer:
            raise UserError(
                "CorpusConfig.tokenizer is empty; valid options: 'bpe', 'byte', a "
                "tokenizer.json path or a Hugging Face model directory"
            )


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
            raise UserError(f"SamplerConfig.global_batch_tokens must be >= 1, got {self.global_batch_tokens}")
        if self.max_docs_per_batch < 0:
            raise UserError(f"SamplerConfig.max_docs_per_batch must be >= 0, got {self.max_docs_per_batch}")


def _as_list(value, name: str) -> list[str]:
    """A str or a list of str (Hydra gives either) as a list of non-empty str."""
    if value is None:
        return []
    items = [value] if isinstance(value, (str, bytes)) or hasattr(value, "__fspath__") else list(value)
    out = [str(v) for v in items]
    if any(not v for v in out):
        raise UserError(f"DataConfig.{name} has an empty entry: {out}")
    return out


@dataclass
class DataConfig:
    source: str = "synthetic"
    """'corpus' (``corpus.paths``), 'hf' (``hf_path``: a ``datasets.save_to_disk`` directory or
    local Parquet/JSONL/Arrow files), 'sft' (``sft_path``: chat conversations or prompt/completion
    pairs for supervised fine-tuning, loss on the answers only; see flexsp.data.sft), 'megatron'
    (``megatron_prefix``: Megatron-LM .bin/.idx indexed datasets), 'stdlib' (the CPython
    standard library .py files), or 'synthetic' (lengths from ``distribution``, random tokens)."""
    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    """Tokenization/caching/long-document options for 'corpus', 'hf' and 'stdlib' ('sft': the
    tokenizer, cache_dir, max_doc_tokens and append_eos); 'megatron'
    uses its max_doc_tokens, long_doc_policy and min_doc_tokens (and its tokenizer, when one is
    named, for the vocabulary)."""
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    """Global-batch sampling options."""
    hf_path: list[str] | str = field(default_factory=list)
    """'hf': a directory written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``, or
    .parquet / .jsonl / .json / .arrow files or directories of them (searched recursively, sorted),
    read through ``datasets`` locally (never the Hub). A str or a list; entries are concatenated
    in order."""
    hf_split: str = "train"
    """'hf' and 'sft': the split taken from a saved DatasetDict (a saved Dataset and data files
    have one)."""
    text_column: str | None = "text"
    """'hf': column of raw text, tokenized offline with ``corpus.tokenizer`` into the cached store.
    When the dataset has no such column, ``ids_column`` is used; null (or '') forces ids_column."""
    ids_column: str = "input_ids"
    """'hf': column of pre-tokenized documents (a list of integer token ids per row), used when
    there is no text column (or text_column is null). Needs a declared vocabulary (vocab_size)."""
    hf_batch_rows: int = 1000
    """'hf' and 'sft': rows read and tokenized per batch; memory while building the store is
    bounded by one batch (lower it for very long documents)."""
    sft_path: list[str] | str = field(default_factory=list)
    """'sft': the conversations: a ``datasets.save_to_disk`` directory, or .parquet / .jsonl /
    .json / .arrow files or directories of them (read like ``hf_path``). A str or a list;
    entries are concatenated in order. Rendered with the chat template of ``corpus.tokenizer``
    (a Hugging Face model directory; by default ``model.hf_checkpoint``'s)."""
    sft_format: str = "auto"
    """'sft': 'messages' (a column of chat messages, ``messages_column``), 'prompt_completion'
    (two string columns, ``prompt_column`` and ``completion_column``), or 'auto' (messages when
    the input has ``messages_column``, else prompt/completion)."""
    messages_column: str = "messages"
    """'sft': column of conversations: each row a non-empty list of ``{"role", "content"}``
    messages, roles system / user / assistant / tool, content a string; the loss trains only on
    the assistant turns (each must be non-empty), as the chat template renders them."""
    prompt_column: str = "prompt"
    """'sft', prompt/completion form: column of prompt strings (tokenized with the tokenizer's
    special tokens, e.g. BOS; not trained)."""
    completion_column: str = "completion"
    """'sft', prompt/completion form: column of completion strings (tokenized without special
    tokens, followed by EOS when ``corpus.append_eos``; the loss trains on them and the EOS)."""
    chat_template: str | None = None
    """'sft': a Jinja chat template file used instead of the tokenizer's own (null: the
    tokenizer's ``chat_template``). Write ``{% generation %}...{% endgeneration %}`` around what
    the loss trains; without those markers assistant turns are found by rendering prefixes."""
    truncate: bool = False
    """'sft': a conversation longer than the context (``corpus.max_doc_tokens``) or than the
    cluster holds (ranks x tokens per rank) is cut to that many tokens (False: it is dropped).
    Either way the count is logged; a conversation left without a trained token is dropped."""
    megatron_prefix: list[str] | str = field(default_factory=list)
    """'megatron': path prefix(es) of Megatron-LM indexed datasets (``<prefix>.bin`` +
    ``<prefix>.idx``, as tools/preprocess_data.py writes). A str or a list; concatenated in order."""
    vocab_size: int = 0
    """Vocabulary of pre-tokenized input ('megatron', 'hf' with an ids column): every token id must
    be below it, and the model's embedding follows it. 0 = the vocabulary of ``corpus.tokenizer``
    when that names a tokenizer ('byte', a tokenizer.json or a model directory); required otherwise."""
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
            raise UserError(f"DataConfig.source={self.source!r}; valid options: {list(SOURCES)}")
        if self.num_docs < 1 or self.synthetic_vocab_size < 1 or self.stdlib_max_files < 0:
            raise UserError(
                f"DataConfig: num_docs={self.num_docs}, synthetic_vocab_size="
                f"{self.synthetic_vocab_size} must be >= 1 and stdlib_max_files="
                f"{self.stdlib_max_files} >= 0"
            )
        self.hf_path = _as_list(self.hf_path, "hf_path")
        self.megatron_prefix = _as_list(self.megatron_prefix, "megatron_prefix")
        if self.text_column == "":
            self.text_column = None
        if self.hf_batch_rows < 1:
            raise UserError(f"DataConfig.hf_batch_rows={self.hf_batch_rows} must be >= 1")
        if self.vocab_size < 0:
            raise UserError(f"DataConfig.vocab_size={self.vocab_size} must be >= 0 (0 = the tokenizer's)")
        if not self.ids_column:
            raise UserError("DataConfig.ids_column is empty; give the name of a column of token-id lists")
        if not self.hf_split:
            raise UserError("DataConfig.hf_split is empty; give a split name such as 'train'")
        if self.source == "hf" and not self.hf_path:
            raise UserError(
                "data.source='hf' needs data.hf_path: a save_to_disk directory or "
                ".parquet/.jsonl/.json/.arrow files or directories"
            )
        self.sft_path = _as_list(self.sft_path, "sft_path")
        if self.sft_format not in SFT_FORMATS:
            raise UserError(f"DataConfig.sft_format={self.sft_format!r}; valid options: {list(SFT_FORMATS)}")
        for name in ("messages_column", "prompt_column", "completion_column"):
            if not getattr(self, name):
                raise UserError(f"DataConfig.{name} is empty; give the name of a column of the SFT data")
        if self.chat_template == "":
            self.chat_template = None
        if self.source == "sft" and not self.sft_path:
            raise UserError(
                "data.source='sft' needs data.sft_path: a save_to_disk directory or "
                ".parquet/.jsonl/.json/.arrow files or directories of conversations"
            )
        if self.source == "megatron" and not self.megatron_prefix:
            raise UserError(
                "data.source='megatron' needs data.megatron_prefix: the path prefix of "
                "<prefix>.bin and <prefix>.idx (one or a list)"
            )
