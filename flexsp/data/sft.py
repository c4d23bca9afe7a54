"""Supervised fine-tuning data (``data=sft``): conversations or prompt/completion pairs -> the
memory-mapped document store with a per-token target mask, and the view the trainer packs from.

Input (``data.sft_path``) is read like ``data=hf`` (flexsp.data.hf: a ``save_to_disk`` directory
or local .parquet / .jsonl / .json / .arrow files, streamed in batches of ``data.hf_batch_rows``
rows). Each row is rendered by flexsp.data.chat (a chat template, or prompt + completion) into
token ids and a target mask, and written once into the store of flexsp.data.corpus
(``tokens.bin`` + ``target_mask.bin``, one byte per token, + ``target_counts.npy``) under
``corpus.cache_dir/<fingerprint of the files, the tokenizer, the template and the columns>``.
Rows are counted from 0 in error messages.

Every conversation is one document for the sampler and the planner (its length is its token
count); the label of a token is the next token only where that one is trained (flexsp.model.loss
``lm_labels`` with the mask), and the loss is divided by the trained tokens of the global batch
(``GlobalBatch.targets``, from ``target_counts``), so it is token-weighted and the same on any
number of ranks.

Length limits are applied by :class:`SFTSource` views, never silently: a conversation longer
than ``corpus.max_doc_tokens`` (when the source is built) or than the cluster holds (the trainer,
``flexsp.train._data``) is dropped, or cut to the limit with ``data.truncate=true``; each view
keeps a line per limit that applied (``report``), which the trainer logs.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from flexsp.data.chat import ChatRenderer, check_messages, load_chat_tokenizer, render_prompt_completion
from flexsp.data.config import CorpusConfig
from flexsp.data.corpus import TokenizedCorpus, options_fingerprint, write_store
from flexsp.data.hf import HFInput, _batches, _column_names, open_input, resolve_inputs
from flexsp.data.source import DocumentSource
from flexsp.errors import UserError

SFT_STORE_VERSION = 1


@dataclass
class _SavedTokenizer:
    """What write_store keeps of the tokenizer: its tokenizer.json and EOS spelling."""

    tok: object
    """The ``transformers`` tokenizer."""

    @property
    def eos_token(self) -> str | None:
        return self.tok.eos_token

    def save(self, path) -> None:
        Path(path).write_text(self.tok.backend_tokenizer.to_str())


def _single_files(inputs: list[HFInput]) -> list[HFInput]:
    """One input per data file, so a row number names a row of one file."""
    return [
        inp if inp.kind == "disk" else HFInput(inp.kind, [p], inp.entry) for inp in inputs for p in inp.paths
    ]


def choose_format(ds, inp: HFInput, data_cfg) -> tuple[str, list[str]]:
    """``('messages' | 'prompt_completion', its columns)`` for one input (ValueError listing the
    input's columns when it has neither)."""
    names = _column_names(ds, inp)
    pair = [data_cfg.prompt_column, data_cfg.completion_column]
    if data_cfg.sft_format in ("auto", "messages") and data_cfg.messages_column in names:
        return "messages", [data_cfg.messages_column]
    if data_cfg.sft_format in ("auto", "prompt_completion") and all(c in names for c in pair):
        return "prompt_completion", pair
    wanted = {
        "messages": f"a column {data_cfg.messages_column!r} (data.messages_column)",
        "prompt_completion": f"columns {pair} (data.prompt_column, data.completion_column)",
    }
    want = " or ".join(v for k, v in wanted.items() if data_cfg.sft_format in ("auto", k))
    raise UserError(f"{inp.name}: data.sft_format={data_cfg.sft_format!r} needs {want}; its columns: {names}")


def build_sft_store(data_cfg, batch_rows: int | None = None) -> TokenizedCorpus:
    """Render and tokenize (or reuse the cached store of) the SFT input ``data_cfg`` describes."""
    cfg = data_cfg.corpus
    batch_rows = int(batch_rows or data_cfg.hf_batch_rows)
    inputs = _single_files(resolve_inputs(data_cfg.sft_path))
    tok, template = load_chat_tokenizer(cfg.tokenizer, data_cfg.chat_template, need_template=False)
    key = dict(
        source="sft",
        version=SFT_STORE_VERSION,
        hf_split=data_cfg.hf_split,
        sft_format=data_cfg.sft_format,
        columns=[data_cfg.messages_column, data_cfg.prompt_column, data_cfg.completion_column],
        chat_template=hashlib.sha256((template or "").encode()).hexdigest(),
        hf_inputs=[(i.kind, i.entry) for i in inputs],
    )
    files = [f for inp in inputs for f in inp.files(data_cfg.hf_split)]
    # only the tokenizer and append_eos change an SFT store (length limits apply to views)
    key_cfg = CorpusConfig(tokenizer=cfg.tokenizer, append_eos=cfg.append_eos)
    out = Path(cfg.cache_dir) / options_fingerprint(key_cfg, files, key)
    if (out / "meta.json").exists():
        return TokenizedCorpus(out)
    opened = [(inp, open_input(inp, data_cfg.hf_split, cfg.cache_dir)) for inp in inputs]
    chosen = [choose_format(ds, inp, data_cfg) for inp, ds in opened]
    renderer = None
    if any(kind == "messages" for kind, _ in chosen):
        _, template = load_chat_tokenizer(cfg.tokenizer, data_cfg.chat_template, need_template=True)
        renderer = ChatRenderer(tok, template, cfg.tokenizer)

    def fill(w) -> None:
        w.stats.update(rows=0, batches=0)
        for fi, ((inp, ds), (kind, columns)) in enumerate(zip(opened, chosen)):
            row = 0
            for table in _batches(ds.select_columns(columns), inp, batch_rows):
                cols = [table.column(c).to_pylist() for c in columns]
                wheres = [f"{inp.name} row {row + r} ({columns[0]!r})" for r in range(table.num_rows)]
                if kind == "messages":
                    convs = [check_messages(m, where) for m, where in zip(cols[0], wheres)]
                    pairs = renderer.render(convs, wheres)
                else:
                    wheres = [f"{inp.name} row {row + r}" for r in range(table.num_rows)]
                    pairs = render_prompt_completion(tok, cols[0], cols[1], wheres, cfg.append_eos)
                for (ids, mask), where in zip(pairs, wheres):
                    w.add_masked(ids, mask, fi, where)
                row += table.num_rows
                w.stats["rows"] += table.num_rows
                w.stats["batches"] += 1
            if row == 0:
                raise UserError(f"{inp.name}: empty dataset (0 rows)")

    kinds = sorted({k for k, _ in chosen})
    meta = {"sft": dict(key, formats=kinds, mask_method=renderer.method if renderer else "completion")}
    return write_store(
        out,
        cfg,
        _SavedTokenizer(tok),
        len(tok),
        fill,
        [str(f) for f in files],
        f"data.sft_path {data_cfg.sft_path}",
        f" of the tokenizer ({cfg.tokenizer})",
        meta,
    )


class SFTSource(DocumentSource):
    """The conversations of an SFT store that training uses: a subset of its documents, some
    possibly cut short (:meth:`fit`), each with its target mask and trained-token count."""

    def __init__(self, store: TokenizedCorpus, index=None, lengths=None, target_counts=None, report=()):
        assert store.target_counts is not None, "an SFT store has a target mask"
        self.store = store
        self.index = np.arange(store.num_docs) if index is None else np.asarray(index, dtype=np.int64)
        self.lengths = store.lengths.copy() if lengths is None else np.asarray(lengths, dtype=np.int64)
        self.target_counts = (
            store.target_counts.copy() if target_counts is None else np.asarray(target_counts, dtype=np.int64)
        )
        self.report: list[str] = list(report)
        """One line per length limit that dropped or cut conversations (the trainer logs them)."""

    @property
    def vocab_size(self) -> int:
        return self.store.vocab_size

    @property
    def directory(self) -> Path:
        return self.store.directory

    @property
    def tokenizer(self):
        return self.store.tokenizer

    @property
    def mask_method(self) -> str:
        """'generation' or 'prefix' (chat template), or 'completion' (prompt/completion pairs)."""
        return self.store.meta["sft"]["mask_method"]

    def _read(self, index: int) -> np.ndarray:
        return self.store.tokens(int(self.index[index]))[: int(self.lengths[index])]

    def target_mask(self, index: int) -> np.ndarray:
        if not 0 <= index < self.num_docs:
            raise IndexError(f"document {index} out of range [0, {self.num_docs})")
        return self.store.target_mask(int(self.index[index]))[: int(self.lengths[index])]

    def summary(self) -> str:
        return (
            f"data sft: {self.num_docs} conversations, {self.num_tokens} tokens, "
            f"{int(self.target_counts.sum())} trained ({self.mask_method} mask)"
        )

    def fit(self, max_tokens: int, truncate: bool, why: str) -> "SFTSource":
        """This view without the conversations longer than ``max_tokens`` (``why``: the limit's
        origin, for the log), or with them cut to ``max_tokens`` when ``truncate`` (a cut one
        left without a trained token is dropped). ValueError if none would be left."""
        n = self.num_docs
        long = np.flatnonzero(self.lengths > max_tokens)
        if not long.size:
            return self
        keep = np.ones(n, dtype=np.bool_)
        lengths, targets = self.lengths.copy(), self.target_counts.copy()
        if truncate:
            lengths[long] = max_tokens
            for i in long:
                targets[i] = int(np.count_nonzero(self.target_mask(int(i))[1:max_tokens]))
            untrainable = int(np.count_nonzero(targets[long] == 0))
            keep[long[targets[long] == 0]] = False
            line = (
                f"data sft: truncated {long.size} of {n} conversation(s) longer than {max_tokens} "
                f"tokens ({why}) to {max_tokens} tokens; dropped {untrainable} of them left without a "
                f"trained token"
            )
        else:
            keep[long] = False
            line = (
                f"data sft: dropped {long.size} of {n} conversation(s) longer than {max_tokens} "
                f"tokens ({why}), the longest {int(self.lengths[long].max())}; data.truncate=true "
                f"cuts them instead"
            )
        if not keep.any():
            raise UserError(
                f"{line}: no conversation is left to train on; raise the limit or set data.truncate=true"
            )
        return SFTSource(self.store, self.index[keep], lengths[keep], targets[keep], [*self.report, line])


def build_sft_source(data_cfg) -> SFTSource:
    """The SFT store of ``data_cfg`` (built once, cached) as a view within ``corpus.max_doc_tokens``."""
    store = build_sft_store(data_cfg)
    limit = data_cfg.corpus.max_doc_tokens
    return SFTSource(store).fit(limit, data_cfg.truncate, f"data.corpus.max_doc_tokens={limit}")
