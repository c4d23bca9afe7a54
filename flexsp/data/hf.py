"""Hugging Face ``datasets`` input -> the tokenized, memory-mapped document store of flexsp.data.corpus.

``data.hf_path`` entries (concatenated in order) are

* a directory written by ``Dataset.save_to_disk`` (used as is) or ``DatasetDict.save_to_disk``
  (``data.hf_split`` is taken), opened with ``datasets.load_from_disk`` (memory-mapped Arrow);
* ``.parquet`` / ``.jsonl`` / ``.json`` / ``.arrow`` files, or directories searched recursively
  (sorted) for ``.parquet`` / ``.jsonl`` / ``.arrow``, read with
  ``datasets.load_dataset("parquet" | "json" | "arrow", data_files=..., streaming=True)``.

Everything is local: HF_DATASETS_OFFLINE / HF_HUB_OFFLINE are set before ``datasets`` is
imported, and data files are streamed (no Arrow copy in the HF cache). Rows are read in batches
of ``data.hf_batch_rows`` (only the one column used), tokenized batch by batch and appended to
``tokens.bin``, so memory is bounded by the batch, not the corpus. The store lives under
``corpus.cache_dir/<fingerprint of the input files, the columns and every token-changing option>``;
later runs and other ranks only open the memmap.

Documents come from ``data.text_column`` (strings, tokenized with ``corpus.tokenizer``, EOS
appended when ``corpus.append_eos``) or, when the dataset has no such column or text_column is
null, ``data.ids_column`` (lists of integer token ids, checked against the declared vocabulary).
Null rows are skipped and counted in ``meta["stats"]["null_rows"]``. The long-document policy is
the text-file path's.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from flexsp.data.corpus import (
    TokenizedCorpus,
    declared_vocabulary,
    named_tokenizer,
    options_fingerprint,
    train_bpe_on,
    write_store,
)
from flexsp.errors import UserError

FILE_FORMATS = {".parquet": "parquet", ".jsonl": "json", ".json": "json", ".arrow": "arrow"}
SCANNED = (".parquet", ".jsonl", ".arrow")  # what a directory scan picks up (.json is metadata there)


@dataclass
class HFInput:
    """One readable unit of ``data.hf_path``: a save_to_disk directory or same-format data files."""

    kind: str
    """'disk' (load_from_disk) or a load_dataset builder name: 'parquet', 'json', 'arrow'."""
    paths: list[Path]
    """The directory (disk) or the data files."""
    entry: str
    """The hf_path entry it came from (for messages)."""

    @property
    def name(self) -> str:
        return (
            str(self.paths[0])
            if len(self.paths) == 1
            else f"{self.entry} ({len(self.paths)} {self.kind} files)"
        )

    def files(self, split: str) -> list[Path]:
        """Every file whose contents define the data (they key the cache): the data files, a saved
        Dataset's directory, or a saved DatasetDict's manifest and ``split`` directory."""
        if self.kind != "disk":
            return list(self.paths)
        root = self.paths[0]
        if (root / "dataset_dict.json").is_file():
            return [root / "dataset_dict.json", *sorted(f for f in (root / split).rglob("*") if f.is_file())]
        return sorted(f for f in root.rglob("*") if f.is_file())


def resolve_inputs(entries: list[str]) -> list[HFInput]:
    """``data.hf_path`` entries as readable inputs, in order (ValueError naming a bad entry)."""
    if not entries:
        raise UserError(
            "data.hf_path is empty: give a save_to_disk directory or .parquet/.jsonl/"
            ".json/.arrow files or directories"
        )
    inputs: list[HFInput] = []
    for entry in entries:
        p = Path(entry)
        if not p.exists():
            raise UserError(
                f"data.hf_path entry {p} does not exist (valid: a directory written by "
                f"save_to_disk, or .parquet/.jsonl/.json/.arrow files or directories of them)"
            )
        if p.is_dir() and ((p / "dataset_dict.json").is_file() or (p / "state.json").is_file()):
            inputs.append(HFInput("disk", [p], entry))
            continue
        if p.is_file():
            fmt = FILE_FORMATS.get(p.suffix.lower())
            if fmt is None:
                raise UserError(
                    f"data.hf_path entry {p}: unsupported file type {p.suffix!r}; valid: "
                    f"{sorted(FILE_FORMATS)} or a save_to_disk directory"
                )
            files = [p]
        else:
            files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in SCANNED)
            if not files:
                raise UserError(
                    f"data.hf_path entry {p}: a directory with no {list(SCANNED)} files "
                    f"and not a save_to_disk directory (no dataset_dict.json/state.json)"
                )
        for f in files:  # group consecutive files of one format into one load_dataset call
            fmt = FILE_FORMATS[f.suffix.lower()]
            if inputs and inputs[-1].kind == fmt and inputs[-1].entry == entry:
                inputs[-1].paths.append(f)
            else:
                inputs.append(HFInput(fmt, [f], entry))
    return inputs


def _import_datasets():
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import datasets
    except ImportError as exc:
        raise UserError(
            f"data.source='hf' needs the datasets package ({exc}); install it with pip install datasets"
        ) from exc
    datasets.disable_progress_bars()
    return datasets


def open_input(inp: HFInput, split: str, cache_dir: str):
    """The ``datasets`` Dataset / IterableDataset of one input."""
    datasets = _import_datasets()
    directory = inp.paths[0]
    if inp.kind == "disk" and (directory / "dataset_dict.json").is_file():
        # A saved DatasetDict: open only the wanted split's directory (not every split).
        try:
            splits = list(json.loads((directory / "dataset_dict.json").read_text())["splits"])
        except (ValueError, KeyError, TypeError) as exc:
            raise UserError(
                f"{directory / 'dataset_dict.json'}: not a valid DatasetDict manifest ({exc})"
            ) from exc
        if split not in splits:
            raise UserError(
                f"{inp.name}: DatasetDict has no split {split!r} (data.hf_split); its "
                f"splits: {sorted(splits)}"
            )
        directory = directory / split
    if inp.kind == "disk" and _saved_without_data(directory):
        raise UserError(f"{directory}: empty dataset (0 rows)")
    files = [str(f) for f in inp.paths]
    if inp.kind == "parquet":  # datasets fails on zero-row Parquet files: leave them out
        files = [f for f in files if _parquet_rows(Path(f)) > 0]
    elif inp.kind == "json":  # ... and on empty JSON files
        files = [f for f in files if Path(f).stat().st_size > 0]
    if not files:
        raise UserError(f"{inp.name}: empty dataset (0 rows)")
    try:
        if inp.kind == "disk":
            ds = datasets.load_from_disk(str(directory), keep_in_memory=False)
        else:
            ds = datasets.load_dataset(
                inp.kind,
                data_files=files,
                split="train",
                streaming=True,
                cache_dir=str(Path(cache_dir) / "hf_datasets"),
            )
    except Exception as exc:  # datasets/pyarrow/fsspec raise many types on unreadable input
        raise UserError(
            f"{inp.name}: could not be read as {inp.kind!r} by datasets "
            f"({type(exc).__name__}: {_first_line(exc)})"
        ) from exc
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise UserError(
                f"{inp.name}: DatasetDict has no split {split!r} (data.hf_split); its splits: {sorted(ds)}"
            )
        ds = ds[split]
    return ds


def _parquet_rows(path: Path) -> int:
    """Row count from a Parquet footer (ValueError naming the file when it is not Parquet)."""
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(path).metadata.num_rows
    except Exception as exc:  # pyarrow raises ArrowInvalid/OSError on non-Parquet bytes
        raise UserError(
            f"{path}: not a valid Parquet file ({type(exc).__name__}: {_first_line(exc)})"
        ) from exc


def _saved_without_data(directory: Path) -> bool:
    """A save_to_disk Dataset with no rows has no .arrow files (and datasets cannot load it)."""
    try:
        state = json.loads((directory / "state.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(state, dict) and state.get("_data_files") == []


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else ""


def _column_names(ds, inp: HFInput) -> list[str]:
    names = ds.column_names
    if names is None:  # a streamed file whose schema is only known from its rows
        first = next(iter(_batches(ds, inp, 1)), None)
        names = first.column_names if first is not None else []
    return list(names)


def choose_column(ds, inp: HFInput, text_column: str | None, ids_column: str) -> tuple[str, str]:
    """``('text' | 'ids', column name)`` for one input, or a ValueError listing its columns."""
    names = _column_names(ds, inp)
    if text_column and text_column in names:
        return "text", text_column
    if ids_column in names:
        return "ids", ids_column
    wanted = (
        f"a text column {text_column!r} (data.text_column) or " if text_column else ""
    ) + f"a token-id column {ids_column!r} (data.ids_column)"
    raise UserError(
        f"{inp.name}: no column {text_column or ids_column!r}; expected {wanted}; its columns: {names}"
    )


def _batches(ds, inp: HFInput, batch_rows: int, column: str | None = None):
    """Arrow tables of at most ``batch_rows`` rows (only ``column`` when given)."""
    if column is not None:
        ds = ds.select_columns([column])
    it = iter(ds.with_format("arrow").iter(batch_size=batch_rows))
    while True:
        try:
            batch = next(it)
        except StopIteration:
            return
        except Exception as exc:  # corrupt file discovered while streaming
            raise UserError(
                f"{inp.name}: could not be read as {inp.kind!r} by datasets "
                f"({type(exc).__name__}: {_first_line(exc)})"
            ) from exc
        yield batch


def _texts(table, column: str, inp: HFInput) -> list:
    import pyarrow as pa

    col = table.column(column)
    if not (
        pa.types.is_string(col.type)
        or pa.types.is_large_string(col.type)
        or pa.types.is_string_view(col.type)
    ):
        raise UserError(
            f"{inp.name}: column {column!r} has type {col.type} (not all values are "
            f"strings), expected strings "
            f"(data.text_column); for token ids set data.text_column=null and "
            f"data.ids_column={column!r}"
        )
    return col.to_pylist()


def _id_rows(table, column: str, inp: HFInput) -> Iterator[np.ndarray | None]:
    """Row token arrays (None for null rows) of an Arrow list<int> column, without Python lists."""
    import pyarrow as pa
    import pyarrow.compute as pc

    col = table.column(column).combine_chunks()
    typ = col.type
    if pa.types.is_fixed_size_list(typ):
        col = col.cast(pa.list_(typ.value_type))
        typ = col.type
    if not ((pa.types.is_list(typ) or pa.types.is_large_list(typ)) and pa.types.is_integer(typ.value_type)):
        raise UserError(
            f"{inp.name}: column {column!r} has type {typ}, expected lists of integer "
            f"token ids (data.ids_column), e.g. list<int32>"
        )
    flat = col.flatten()  # the values of the non-null rows, in order
    if flat.null_count:
        raise UserError(f"{inp.name}: column {column!r} holds null token ids")
    values = flat.to_numpy(zero_copy_only=False)
    offsets = np.concatenate([[0], np.cumsum(pc.list_value_length(col).fill_null(0).to_numpy())])
    valid = col.is_valid().to_numpy(zero_copy_only=False)
    for i in range(len(col)):
        yield values[offsets[i] : offsets[i + 1]] if valid[i] else None


def build_hf_corpus(data_cfg, batch_rows: int | None = None) -> TokenizedCorpus:
    """Tokenize (or reuse the cached store of) the ``datasets`` input ``data_cfg`` (a DataConfig)
    describes and open it memory-mapped."""
    cfg = data_cfg.corpus
    batch_rows = int(batch_rows or data_cfg.hf_batch_rows)
    inputs = resolve_inputs(data_cfg.hf_path)
    # The cache key depends on the configuration and the input files only, so a later run (or
    # another rank) opens the store without importing datasets or reading a row.
    key = dict(
        source="hf",
        hf_split=data_cfg.hf_split,
        text_column=data_cfg.text_column,
        ids_column=data_cfg.ids_column,
        vocab_size=data_cfg.vocab_size,
        hf_inputs=[(i.kind, i.entry) for i in inputs],
    )
    files = [f for inp in inputs for f in inp.files(data_cfg.hf_split)]
    out = Path(cfg.cache_dir) / options_fingerprint(cfg, files, key)
    if (out / "meta.json").exists():
        return TokenizedCorpus(out)
    opened = [(inp, open_input(inp, data_cfg.hf_split, cfg.cache_dir)) for inp in inputs]
    chosen = [choose_column(ds, inp, data_cfg.text_column, data_cfg.ids_column) for inp, ds in opened]
    kinds = {k for k, _ in chosen}
    if len(kinds) > 1:
        mix = [f"{inp.name}: {k} column {c!r}" for (inp, _), (k, c) in zip(opened, chosen)]
        raise UserError(f"data.hf_path mixes text and token-id inputs ({'; '.join(mix)}); use one kind")
    kind = kinds.pop()
    if kind == "ids":
        vocab, origin, tok = declared_vocabulary(data_cfg, f"data.hf_path column {data_cfg.ids_column!r}")
        tok = None  # ids are used as they are; the tokenizer only declared the vocabulary
    else:
        tok = named_tokenizer(cfg)
    extra = dict(key, kind=kind, columns=[c for _, c in chosen])
    if kind == "text" and tok is None:  # corpus.tokenizer='bpe': train on the dataset's texts
        tok = train_bpe_on(
            (
                t
                for (inp, ds), (_, c) in zip(opened, chosen)
                for b in _batches(ds, inp, batch_rows, c)
                for t in _texts(b, c, inp)
                if t
            ),
            cfg,
        )
    if kind == "text":
        vocab, origin = tok.vocab_size, f" of the tokenizer ({cfg.tokenizer})"

    def fill(w) -> None:
        w.stats.update(rows=0, null_rows=0, batches=0, max_batch_rows=0)
        for fi, ((inp, ds), (_, column)) in enumerate(zip(opened, chosen)):
            rows_before = w.stats["rows"]
            for table in _batches(ds, inp, batch_rows, column):
                w.stats["batches"] += 1
                w.stats["rows"] += table.num_rows
                w.stats["max_batch_rows"] = max(w.stats["max_batch_rows"], table.num_rows)
                if kind == "text":
                    texts = _texts(table, column, inp)
                    batch = [t for t in texts if t is not None]
                    w.stats["null_rows"] += len(texts) - len(batch)
                    w.add_texts(tok, batch, fi, inp.name)
                    continue
                for r, ids in enumerate(_id_rows(table, column, inp)):
                    if ids is None:
                        w.stats["null_rows"] += 1
                    else:
                        w.add(
                            ids, fi, f"{inp.name} (row {w.stats['rows'] - table.num_rows + r - rows_before})"
                        )
            if w.stats["rows"] == rows_before:
                raise UserError(f"{inp.name}: empty dataset (0 rows)")

    return write_store(
        out,
        cfg,
        tok,
        vocab,
        fill,
        [str(f) for f in files],
        f"data.hf_path {data_cfg.hf_path}",
        origin,
        extra_meta={"hf": extra},
    )
