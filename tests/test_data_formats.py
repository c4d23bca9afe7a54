"""Hugging Face datasets (save_to_disk, Parquet, JSONL, Arrow, pre-tokenized columns), Megatron-LM
indexed datasets and Hugging Face model-directory tokenizers: each gives the same token stream and
document boundaries as the text-file / pre-tokenized-file path, and bad input is one clear error."""

import json
import os
import struct
from pathlib import Path

import numpy as np
import pytest

from flexsp.data import (
    CorpusConfig,
    DataConfig,
    GlobalBatchSampler,
    HFTokenizer,
    TokenizedCorpus,
    build_corpus,
    build_source,
    load_tokenizer,
    pack_documents,
    read_index,
)

datasets = pytest.importorskip("datasets")
pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")
datasets.disable_progress_bars()

EOT = "<|end_of_text|>"
TEXTS = [
    "def add(a, b):\n    return a + b\n",
    "hello world, hello tokens\n" * 6,
    "x = 1\n",
    "a long document " * 20,
    "",
    "naïve café ünïcode\n",
]
MAX_DOC = 24  # small enough that documents 1 and 3 are split


# ---------------------------------------------------------------------------------------------
# helpers: a local Hugging Face tokenizer directory, reference stores, a Megatron writer
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    """A tiny byte-level BPE saved as a Hugging Face model directory (save_pretrained)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=[EOT, "<pad>"],
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator([t for t in TEXTS if t] * 3, trainer=trainer)
    d = tmp_path_factory.mktemp("hf_model")
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOT, pad_token="<pad>").save_pretrained(d)
    return d


def _corpus_cfg(tmp_path, tokenizer, **kw):
    kw.setdefault("max_doc_tokens", MAX_DOC)
    return CorpusConfig(cache_dir=str(tmp_path / "cache"), tokenizer=str(tokenizer), **kw)


def _hf(tmp_path, path, tokenizer, corpus=None, **kw):
    return DataConfig(source="hf", hf_path=path, corpus=corpus or _corpus_cfg(tmp_path, tokenizer), **kw)


def _docs(source):
    return [source.tokens(i).tolist() for i in range(source.num_docs)]


def _text_reference(tmp_path, tokenizer, texts=TEXTS, **kw):
    """The text-file path on the same texts: one JSONL line per document."""
    f = tmp_path / "ref" / "texts.jsonl"
    f.parent.mkdir(exist_ok=True)
    f.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return build_corpus(CorpusConfig(**{**vars(_corpus_cfg(tmp_path, tokenizer, **kw)), "paths": [str(f)]}))


def _ids_reference(tmp_path, docs, vocab, name="ref_ids"):
    """The pre-tokenized-file path on the same ids: one .bin with a .offsets.npy."""
    d = tmp_path / name
    d.mkdir()
    np.concatenate([np.asarray(x, np.uint16) for x in docs]).tofile(d / "ids.bin")
    np.save(d / "ids.offsets.npy", np.concatenate([[0], np.cumsum([len(x) for x in docs])]))
    return build_corpus(
        CorpusConfig(
            **{**vars(_corpus_cfg(tmp_path, "bpe", vocab_size=vocab)), "paths": [str(d / "ids.bin")]}
        )
    )


MEGATRON_CODES = {
    np.uint8: 1,
    np.int8: 2,
    np.int16: 3,
    np.int32: 4,
    np.int64: 5,
    np.float64: 6,
    np.float32: 7,
    np.uint16: 8,
}


def write_megatron(prefix, documents, dtype=np.uint16, modes=None, order=None):
    """Write ``<prefix>.bin``/``.idx`` exactly as Megatron-LM's IndexedDatasetBuilder does:
    ``documents`` is a list of documents, each a list of sequences (lists of ids). ``modes`` (one
    int8 per sequence) makes it a multimodal index; ``order`` permutes where the sequences are
    stored in the .bin (the pointers follow), to exercise non-contiguous documents."""
    seqs = [np.asarray(s, dtype=dtype) for doc in documents for s in doc]
    doc_idx = np.concatenate([[0], np.cumsum([len(doc) for doc in documents])]).astype(np.int64)
    order = list(range(len(seqs))) if order is None else list(order)
    pointers = np.zeros(len(seqs), np.int64)
    with open(f"{prefix}.bin", "wb") as fh:
        pos = 0
        for j in order:
            pointers[j] = pos
            fh.write(seqs[j].tobytes(order="C"))
            pos += seqs[j].nbytes
    with open(f"{prefix}.idx", "wb") as fh:
        fh.write(b"MMIDIDX\x00\x00")
        fh.write(struct.pack("<Q", 1))
        fh.write(struct.pack("<B", MEGATRON_CODES[dtype]))
        fh.write(struct.pack("<Q", len(seqs)))
        fh.write(struct.pack("<Q", len(doc_idx)))
        fh.write(np.array([s.size for s in seqs], dtype=np.int32).tobytes(order="C"))
        fh.write(pointers.tobytes(order="C"))
        fh.write(doc_idx.tobytes(order="C"))
        if modes is not None:
            fh.write(np.asarray(modes, dtype=np.int8).tobytes(order="C"))
    return str(prefix)


def _mega(tmp_path, prefixes, **kw):
    corpus = kw.pop("corpus", None) or _corpus_cfg(tmp_path, kw.pop("tokenizer", "bpe"))
    kw.setdefault("vocab_size", 1000)
    return DataConfig(source="megatron", megatron_prefix=prefixes, corpus=corpus, **kw)


# ---------------------------------------------------------------------------------------------
# the Hugging Face model-directory tokenizer
# ---------------------------------------------------------------------------------------------


def test_model_directory_tokenizer_and_its_eos(tok_dir, tmp_path):
    from transformers import AutoTokenizer

    tok = load_tokenizer(tok_dir)
    ref = AutoTokenizer.from_pretrained(str(tok_dir), local_files_only=True)
    assert isinstance(tok, HFTokenizer) and tok.eos_token == EOT and tok.eos_id == ref.eos_token_id
    assert tok.vocab_size == len(ref)
    assert tok.encode_batch(TEXTS[:2]) == [ref(t, add_special_tokens=False)["input_ids"] for t in TEXTS[:2]]
    # The EOS spelling comes from tokenizer_config.json, whatever the model family calls it.
    conf = json.loads((tok_dir / "tokenizer_config.json").read_text())
    other = tmp_path / "other"
    other.mkdir()
    (other / "tokenizer.json").write_text((tok_dir / "tokenizer.json").read_text())
    (other / "tokenizer_config.json").write_text(json.dumps({**conf, "eos_token": {"content": "<pad>"}}))
    assert load_tokenizer(other).eos_token == "<pad>"
    (other / "tokenizer_config.json").write_text(json.dumps({**conf, "eos_token": "</s>"}))
    with pytest.raises(ValueError, match=r"EOS token '</s>' is not in its vocabulary"):
        load_tokenizer(other)
    (other / "tokenizer_config.json").unlink()  # no config: the first known EOS spelling it has
    assert load_tokenizer(other).eos_token == EOT
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"empty has no tokenizer.json and transformers could not load"):
        load_tokenizer(tmp_path / "empty")
    with pytest.raises(ValueError, match=r"tokenizer .*nowhere does not exist \(CorpusConfig.tokenizer"):
        build_corpus(_corpus_cfg(tmp_path, tmp_path / "nowhere", paths=[str(tok_dir / "tokenizer.json")]))


def test_text_corpus_with_model_directory_tokenizer(tok_dir, tmp_path):
    ref = _text_reference(tmp_path, tok_dir, max_doc_tokens=4096)
    tok = load_tokenizer(tok_dir)
    assert ref.vocab_size == tok.vocab_size and ref.meta["eos_token"] == EOT
    for text, ids in zip([t for t in TEXTS if t], _docs(ref)):  # "" is EOS alone: dropped
        assert ids[-1] == tok.eos_id and ref.tokenizer.decode(ids[:-1]) == text
    assert ref.tokenizer.eos_id == tok.eos_id  # the cached store reloads the same EOS


# ---------------------------------------------------------------------------------------------
# data.source=hf: every format gives the text-file path's documents
# ---------------------------------------------------------------------------------------------


def _make_format(kind, root, rows):
    """``rows`` (list of dicts) stored as ``kind``; returns the hf_path value."""
    table = pa.Table.from_pylist(rows)
    if kind == "save_to_disk":
        datasets.Dataset(table).save_to_disk(str(root / "ds"))
        return str(root / "ds")
    if kind == "save_to_disk_dict":
        d = datasets.Dataset(table)
        datasets.DatasetDict({"train": d.select([0]), "validation": d}).save_to_disk(str(root / "dd"))
        return str(root / "dd")
    if kind == "parquet":
        pq.write_table(table, root / "data.parquet")
        return str(root / "data.parquet")
    if kind == "parquet_dir":  # several shards in a directory tree, read in sorted order
        (root / "shards" / "b").mkdir(parents=True)
        pq.write_table(table.slice(0, 2), root / "shards" / "a-0.parquet")
        pq.write_table(table.slice(2), root / "shards" / "b" / "a-1.parquet")
        return [str(root / "shards")]
    if kind == "jsonl":
        (root / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        return str(root / "data.jsonl")
    if kind == "arrow":  # the .arrow files save_to_disk writes, given as files
        datasets.Dataset(table).save_to_disk(str(root / "arrow_src"), num_shards=2)
        return sorted(str(f) for f in (root / "arrow_src").glob("*.arrow"))
    raise AssertionError(kind)


FORMATS = ["save_to_disk", "save_to_disk_dict", "parquet", "parquet_dir", "jsonl", "arrow"]


@pytest.mark.parametrize("kind", FORMATS)
def test_hf_text_formats_match_the_text_file_path(kind, tok_dir, tmp_path):
    rows = [{"text": t, "meta": i} for i, t in enumerate(TEXTS)]
    path = _make_format(kind, tmp_path, rows)
    src = build_source(
        _hf(tmp_path, path, tok_dir, hf_split="validation" if kind.endswith("dict") else "train")
    )
    ref = _text_reference(tmp_path, tok_dir)
    assert isinstance(src, TokenizedCorpus) and src.directory != ref.directory
    assert src.lengths.tolist() == ref.lengths.tolist() and _docs(src) == _docs(ref)
    assert src.meta["stats"]["split"] == ref.meta["stats"]["split"] == 2
    assert src.lengths.max() == MAX_DOC and src.vocab_size == ref.vocab_size
    assert src.tokenizer.eos_id == load_tokenizer(tok_dir).eos_id


def test_hf_bpe_trained_on_the_dataset_and_long_doc_policies(tmp_path):
    path = _make_format("parquet", tmp_path, [{"text": t} for t in TEXTS])
    corpus = CorpusConfig(
        cache_dir=str(tmp_path / "cache"), tokenizer="bpe", vocab_size=300, max_doc_tokens=MAX_DOC
    )
    src = build_source(DataConfig(source="hf", hf_path=path, corpus=corpus))
    ref = _text_reference(tmp_path, "bpe", vocab_size=300)
    assert _docs(src) == _docs(ref) and src.tokenizer.vocab_size == ref.tokenizer.vocab_size
    for policy in ("drop", "split"):
        for min_doc in (2, 9):
            kw = dict(long_doc_policy=policy, min_doc_tokens=min_doc)
            a = build_source(_hf(tmp_path, path, "byte", _corpus_cfg(tmp_path, "byte", **kw)))
            b = _text_reference(tmp_path, "byte", **kw)
            assert (
                _docs(a) == _docs(b) and a.meta["stats"]["dropped_short"] == b.meta["stats"]["dropped_short"]
            )
    with pytest.raises(ValueError, match=r"data.parquet: document of \d+ tokens exceeds max_doc_tokens=24"):
        build_source(_hf(tmp_path, path, "byte", _corpus_cfg(tmp_path, "byte", long_doc_policy="error")))
    no_eos = build_source(_hf(tmp_path, path, "byte", _corpus_cfg(tmp_path, "byte", append_eos=False)))
    assert no_eos.tokens(0).tolist() == list(TEXTS[0].encode())[:MAX_DOC]


def test_hf_pretokenized_ids_column_matches_the_bin_path(tmp_path):
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 500, size=n).tolist() for n in (5, 60, 1, 30, 24, 25)]
    ref = _ids_reference(tmp_path, docs, vocab=500)
    for kind in ("save_to_disk", "parquet", "jsonl"):
        root = tmp_path / kind
        root.mkdir()
        path = _make_format(kind, root, [{"input_ids": d, "n": len(d)} for d in docs])
        src = build_source(_hf(tmp_path, path, "bpe", vocab_size=500))  # detected: no text column
        assert _docs(src) == _docs(ref) and src.vocab_size == ref.vocab_size == 500, kind
        assert src.tokenizer is None and src.meta["stats"]["split"] == 3  # 60, 30 and 25 tokens
    # Both columns present: text wins, text_column=null forces the ids.
    path = _make_format("parquet", tmp_path, [{"text": "zz", "tokens": d} for d in docs])
    forced = build_source(_hf(tmp_path, path, "bpe", text_column=None, ids_column="tokens", vocab_size=500))
    assert _docs(forced) == _docs(ref)
    texts = build_source(_hf(tmp_path, path, "byte", ids_column="tokens"))
    assert texts.tokens(0).tolist()[:2] == list(b"zz")
    # Without data.vocab_size the named tokenizer declares the vocabulary (ids up to 499 > 257 here).
    with pytest.raises(
        ValueError,
        match=r"\(row 0\): token ids in \[\d+, \d+\] fall outside the vocabulary "
        r"\[0, 257\) of data.corpus.tokenizer \(byte\)",
    ):
        build_source(_hf(tmp_path, path, "byte", text_column="", ids_column="tokens"))


def test_hf_null_rows_and_arrow_list_types(tmp_path):
    (tmp_path / "t.jsonl").write_text('{"text": "abc"}\n{"other": 1}\n{"text": null}\n{"text": "de"}\n')
    src = build_source(_hf(tmp_path, tmp_path / "t.jsonl", "byte"))
    assert _docs(src) == [[97, 98, 99, 256], [100, 101, 256]] and src.meta["stats"]["null_rows"] == 2
    for name, typ in [
        ("large", pa.large_list(pa.int64())),
        ("fixed", pa.list_(pa.uint16(), 3)),
        ("plain", pa.list_(pa.int8())),
    ]:
        rows = [[1, 2, 3], None, [4, 5, 6]]
        pq.write_table(pa.table({"input_ids": pa.array(rows, type=typ)}), tmp_path / f"{name}.parquet")
        ids = build_source(_hf(tmp_path, tmp_path / f"{name}.parquet", "bpe", vocab_size=10))
        assert _docs(ids) == [[1, 2, 3], [4, 5, 6]] and ids.meta["stats"]["null_rows"] == 1, name
    pq.write_table(
        pa.table({"input_ids": pa.array([[1, None]], type=pa.list_(pa.int32()))}), tmp_path / "n.parquet"
    )
    with pytest.raises(ValueError, match=r"n.parquet: column 'input_ids' holds null token ids"):
        build_source(_hf(tmp_path, tmp_path / "n.parquet", "bpe", vocab_size=10))


def test_hf_streams_bounded_batches_into_a_memmap_and_caches(tmp_path, monkeypatch):
    n, batch = 50, 7
    rows = [{"text": f"document number {i} " * (1 + i % 5)} for i in range(n)]
    path = _make_format("save_to_disk", tmp_path, rows)
    seen = []
    orig = HFTokenizer.encode_batch

    def recording(self, texts):
        seen.append(len(texts))
        return orig(self, texts)

    monkeypatch.setattr(HFTokenizer, "encode_batch", recording)
    cfg = _hf(
        tmp_path,
        path,
        "bpe",
        corpus=CorpusConfig(cache_dir=str(tmp_path / "c"), vocab_size=300),
        hf_batch_rows=batch,
    )
    src = build_source(cfg)
    stats = src.meta["stats"]
    assert stats["batches"] == -(-n // batch) and stats["max_batch_rows"] == batch and stats["rows"] == n
    assert max(seen) <= batch and sum(seen) == n  # the tokenizer only ever saw one batch
    assert isinstance(src._tokens, np.memmap) and isinstance(src.tokens(3), np.memmap)
    assert src.num_docs == n and (src.directory / "tokens.bin").stat().st_size == src.num_tokens * 2
    seen.clear()
    import flexsp.data.hf as hf

    def no_reading(*args):
        raise AssertionError("a cached store must open without reading the dataset")

    monkeypatch.setattr(hf, "open_input", no_reading)
    again = build_source(cfg)  # cached: opened, not re-tokenized, no row read
    assert again.directory == src.directory and seen == []
    assert isinstance(again.tokens(0), np.memmap)
    same = DataConfig(**{**vars(cfg), "hf_batch_rows": 3})
    assert build_source(same).directory == src.directory  # the batch size does not change the tokens
    monkeypatch.undo()
    (tmp_path / "ds" / "state.json").touch()  # changed input files: a new store
    assert build_source(cfg).directory != src.directory


def test_hf_bad_input_is_one_clear_error(tmp_path):
    def err(path, match, **kw):
        with pytest.raises(ValueError, match=match) as info:
            build_source(_hf(tmp_path, path, "byte", **kw))
        assert "\n" not in str(info.value)

    err(
        tmp_path / "missing",
        r"data.hf_path entry .*missing does not exist \(valid: a directory written by save_to_disk",
    )
    dd = _make_format("save_to_disk_dict", tmp_path, [{"text": "a b c"}])
    err(
        dd,
        r"dd: DatasetDict has no split 'test' \(data.hf_split\); its splits: \['train', 'validation'\]",
        hf_split="test",
    )
    pqf = _make_format("parquet", tmp_path, [{"body": "x", "n": 1}])
    err(
        pqf,
        r"data.parquet: no column 'text'; expected a text column 'text' \(data.text_column\) or a "
        r"token-id column 'input_ids' \(data.ids_column\); its columns: \['body', 'n'\]",
    )
    err(pqf, r"no column 'input_ids'; expected a token-id column", text_column=None)
    err(
        pqf,
        r"data.parquet: column 'n' has type int64 \(not all values are strings\), expected strings "
        r"\(data.text_column\)",
        text_column="n",
    )
    err(
        pqf,
        r"column 'body' has type string, expected lists of integer token ids",
        text_column=None,
        ids_column="body",
        vocab_size=10,
    )
    nested = tmp_path / "nested"
    nested.mkdir()
    pq.write_table(pa.Table.from_pylist([{"input_ids": [[1, 2]]}]), nested / "n.parquet")
    err(
        nested,
        r"n.parquet: column 'input_ids' has type list<element: list<element: int64>>, expected lists",
        vocab_size=10,
    )
    with pytest.raises(
        ValueError,
        match=r"data.hf_path column 'input_ids' is pre-tokenized: declare its "
        r"vocabulary with data.vocab_size=N, or name its tokenizer",
    ):
        build_source(_hf(tmp_path, nested, "bpe"))
    big = tmp_path / "big"
    big.mkdir()
    pq.write_table(pa.Table.from_pylist([{"input_ids": [1, 2]}, {"input_ids": [3, 900]}]), big / "b.parquet")
    err(
        big,
        r"b.parquet \(row 1\): token ids in \[3, 900\] fall outside the vocabulary \[0, 500\) declared "
        r"by data.vocab_size",
        vocab_size=500,
    )
    empty = tmp_path / "empty"
    datasets.Dataset.from_dict({"text": []}).save_to_disk(str(empty))
    err(empty, r"empty: empty dataset \(0 rows\)")
    pq.write_table(pa.table({"text": pa.array([], pa.string())}), tmp_path / "none.parquet")
    err(tmp_path / "none.parquet", r"none.parquet: empty dataset \(0 rows\)")
    (tmp_path / "none.jsonl").write_text("")
    err(tmp_path / "none.jsonl", r"none.jsonl: empty dataset \(0 rows\)")
    (tmp_path / "mixed.jsonl").write_text('{"text": "a"}\n{"text": 5}\n')
    err(tmp_path / "mixed.jsonl", r"mixed.jsonl: column 'text' has type .* \(not all values are strings\)")
    datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict({"text": []}),
            "test": datasets.Dataset.from_dict({"text": ["a b"]}),
        }
    ).save_to_disk(str(tmp_path / "ed"))
    err(tmp_path / "ed", r"ed/train: empty dataset \(0 rows\)")
    assert build_source(_hf(tmp_path, tmp_path / "ed", "byte", hf_split="test")).num_docs == 1
    (tmp_path / "notes.csv").write_text("a,b\n")
    err(
        tmp_path / "notes.csv",
        r"unsupported file type '.csv'; valid: \['.arrow', '.json', '.jsonl', '.parquet'\]",
    )
    (tmp_path / "nodata").mkdir()
    err(tmp_path / "nodata", r"nodata: a directory with no \['.parquet', '.jsonl', '.arrow'\] files")
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 not really parquet")
    err(tmp_path / "broken.parquet", r"broken.parquet: not a valid Parquet file \(ArrowInvalid")
    (tmp_path / "broken.jsonl").write_text('{"text": "ok"}\n{"text": bro\n')
    err(tmp_path / "broken.jsonl", r"broken.jsonl: could not be read as 'json' by datasets")
    (tmp_path / "idsdir").mkdir()
    ids = _make_format("jsonl", tmp_path / "idsdir", [{"input_ids": [1, 2, 3]}])
    err(
        [dd, ids],
        r"data.hf_path mixes text and token-id inputs \(.*dd: text column 'text'; .*data.jsonl: "
        r"ids column 'input_ids'\)",
        vocab_size=10,
    )
    with pytest.raises(ValueError, match=r"data.source='hf' needs data.hf_path"):
        DataConfig(source="hf")
    with pytest.raises(ValueError, match=r"DataConfig.hf_batch_rows=0 must be >= 1"):
        DataConfig(hf_batch_rows=0)


# ---------------------------------------------------------------------------------------------
# data.source=megatron
# ---------------------------------------------------------------------------------------------

MEGA_DOCS = [[[1, 2, 3]], [[4, 5], [6, 7, 8, 9]], [[10] * 30], [[11]], [], [[12, 13], [], [14, 15, 16]]]


def _flat(docs):
    return [[t for s in d for t in s] for d in docs]


def test_megatron_matches_the_pretokenized_path(tmp_path):
    prefix = write_megatron(tmp_path / "corpus_text_document", MEGA_DOCS)
    idx = read_index(prefix + ".idx")
    assert idx.dtype == np.uint16 and idx.document_indices.tolist() == [0, 1, 3, 4, 5, 5, 8]
    for policy, min_doc in (("split", 2), ("split", 5), ("drop", 2)):
        corpus = _corpus_cfg(
            tmp_path,
            "bpe",
            max_doc_tokens=MAX_DOC,
            long_doc_policy=policy,
            min_doc_tokens=min_doc,
            vocab_size=1000,
        )
        src = build_source(_mega(tmp_path, prefix, corpus=corpus))
        ref = build_corpus(CorpusConfig(**{**vars(corpus), "paths": [str(_bin_ref(tmp_path, MEGA_DOCS))]}))
        assert _docs(src) == _docs(ref) and src.lengths.tolist() == ref.lengths.tolist(), (policy, min_doc)
        assert src.meta["stats"] == ref.meta["stats"] and src.vocab_size == 1000
    src = build_source(_mega(tmp_path, [prefix]))
    assert src.lengths.tolist() == [3, 6, 24, 6, 5]  # the 30-token document split 24 + 6; [11] and [] dropped
    part = src._parts[0]
    for i in range(src.num_docs):  # zero-copy views of the .bin
        assert isinstance(src.tokens(i), np.memmap) and np.shares_memory(src.tokens(i), part.tokens)


def _bin_ref(tmp_path, docs, name="ref.bin"):
    flat = _flat(docs)
    d = tmp_path / "megaref"
    d.mkdir(exist_ok=True)
    np.array([t for x in flat for t in x], np.uint16).tofile(d / name)
    np.save(d / (name[:-4] + ".offsets.npy"), np.concatenate([[0], np.cumsum([len(x) for x in flat])]))
    return d / name


def test_megatron_multiple_prefixes_dtypes_noncontiguous_and_multimodal(tmp_path):
    a = write_megatron(tmp_path / "a", MEGA_DOCS[:3], dtype=np.int32)
    b = write_megatron(tmp_path / "b", MEGA_DOCS[3:], dtype=np.uint16, order=[3, 2, 1, 0])  # stored reversed
    c = write_megatron(tmp_path / "c", [[[700, 701], [702]]], dtype=np.int64, modes=[0, 0])
    src = build_source(_mega(tmp_path, [a, b + ".idx", c]))
    assert _docs(src) == [
        [1, 2, 3],
        [4, 5, 6, 7, 8, 9],
        [10] * 24,
        [10] * 6,
        [12, 13, 14, 15, 16],
        [700, 701, 702],
    ]
    assert [src.tokens(i).dtype for i in (0, 4, 5)] == [np.int32, np.uint16, np.int64]
    assert not src._parts[1].contiguous[2] and src.directory.count(", ") == 2
    sampler = GlobalBatchSampler(src.lengths, global_batch_tokens=64, seed=0)
    packed = pack_documents(src, next(sampler).doc_ids)
    assert packed.input_ids.numel() == packed.cu_seqlens[-1].item() <= 64
    write_megatron(tmp_path / "img", [[[1, 2], [3, 4]]], modes=[0, 1])
    with pytest.raises(ValueError, match=r"img.idx: multimodal dataset: sequence 1 has mode 1; only text"):
        build_source(_mega(tmp_path, str(tmp_path / "img")))


def test_megatron_vocabulary_and_scan_marker(tok_dir, tmp_path):
    prefix = write_megatron(tmp_path / "v", [[[1, 2, 3]], [[4, 300]]])
    with pytest.raises(
        ValueError,
        match=r"v.bin: token id 300 at token 4 is outside the vocabulary \[0, 300\) "
        r"declared by data.vocab_size",
    ):
        build_source(_mega(tmp_path, prefix, vocab_size=300))
    with pytest.raises(
        ValueError,
        match=r"is pre-tokenized: declare its vocabulary with data.vocab_size=N, or "
        r"name its tokenizer with data.corpus.tokenizer",
    ):
        build_source(_mega(tmp_path, prefix, vocab_size=0))
    src = build_source(_mega(tmp_path, prefix, vocab_size=0, tokenizer=tok_dir))  # the tokenizer's vocabulary
    assert src.vocab_size == load_tokenizer(tok_dir).vocab_size and src.tokenizer is not None
    markers = list((tmp_path / "cache" / "megatron_checked").glob("*.json"))
    assert len(markers) == 1  # scanned once; later opens (other ranks, runs) skip the scan
    assert json.loads(markers[0].read_text())["ok"] is True
    with pytest.raises(ValueError, match=r"v.bin: token id 300 .* of data.corpus.tokenizer \(byte\)"):
        build_source(_mega(tmp_path, prefix, vocab_size=0, corpus=_corpus_cfg(tmp_path, "byte")))


def test_megatron_bad_files_name_the_file(tmp_path):
    good = write_megatron(tmp_path / "g", MEGA_DOCS)
    idx_bytes = open(good + ".idx", "rb").read()

    def err(data_idx, match, bin_bytes=None, name="bad"):
        p = tmp_path / name
        if data_idx is not None:
            (tmp_path / f"{name}.idx").write_bytes(data_idx)
        if bin_bytes is not None:
            (tmp_path / f"{name}.bin").write_bytes(bin_bytes)
        with pytest.raises(ValueError, match=match) as info:
            build_source(_mega(tmp_path, str(p)))
        assert "\n" not in str(info.value)

    bin_bytes = open(good + ".bin", "rb").read()
    err(None, r"Megatron dataset file .*nobin.bin does not exist \(data.megatron_prefix=", name="nobin")
    (tmp_path / "noidx.bin").write_bytes(bin_bytes)
    err(None, r"noidx.idx does not exist", name="noidx")
    err(b"NOTMEGA!!" + idx_bytes[9:], r"bad.idx: bad header b'NOTMEGA!!', expected b'MMIDIDX", bin_bytes)
    err(idx_bytes[:9] + struct.pack("<Q", 2) + idx_bytes[17:], r"bad.idx: index version 2; only version 1")
    err(idx_bytes[:17] + b"\x09" + idx_bytes[18:], r"bad.idx: dtype code 9; valid codes: \{1: 'uint8'")
    err(idx_bytes[:17] + b"\x07" + idx_bytes[18:], r"token dtype float32 \(code 7\) holds no token ids")
    err(
        idx_bytes[:-5],
        r"bad.idx: \d+ bytes, but 8 sequences and 7 document indices need \d+ bytes .*truncated",
    )
    err(idx_bytes[:20], r"bad.idx: truncated")
    err(
        idx_bytes,
        r"bad.bin: sequence 7 of bad.idx spans bytes \[\d+, \d+\) beyond the file's \d+ bytes",
        bin_bytes[:-4],
    )
    err(idx_bytes, r"bad.bin: 89 bytes is not a multiple of the index's uint16 tokens", bin_bytes[:-1])
    docs = np.frombuffer(idx_bytes, np.int64, count=7, offset=len(idx_bytes) - 56).copy()
    docs[-1] = 3
    err(
        idx_bytes[:-56] + docs.tobytes(),
        r"bad.idx: document indices must rise from 0 to the sequence count 8",
        bin_bytes,
    )
    with pytest.raises(ValueError, match=r"data.source='megatron' needs data.megatron_prefix"):
        DataConfig(source="megatron")


# ---------------------------------------------------------------------------------------------
# configs and the command line
# ---------------------------------------------------------------------------------------------


def test_trainer_configs_compose(tmp_path):
    pytest.importorskip("hydra")
    from train_cases import compose

    def data_config(overrides):
        """The DataConfig the trainer builds from ``python -m flexsp.train <overrides>``."""
        return compose(overrides).data

    path = _make_format("parquet", tmp_path, [{"text": t} for t in TEXTS])
    cfg = data_config(
        [
            "data=hf",
            f"data.hf_path={path}",
            "data.corpus.tokenizer=byte",
            f"data.corpus.cache_dir={tmp_path / 'cache'}",
            "data.corpus.max_doc_tokens=24",
        ]
    )
    assert cfg.source == "hf" and cfg.hf_path == [path] and cfg.text_column == "text"
    assert _docs(build_source(cfg)) == _docs(_text_reference(tmp_path, "byte"))
    prefix = write_megatron(tmp_path / "m", MEGA_DOCS)
    cfg = data_config(
        [
            "data=megatron",
            f"data.megatron_prefix=[{prefix}]",
            "data.vocab_size=100",
            f"data.corpus.cache_dir={tmp_path / 'cache'}",
        ]
    )
    assert cfg.megatron_prefix == [prefix] and build_source(cfg).num_docs == 4 and cfg.vocab_size == 100


def test_cli_new_sources_and_one_line_errors(tmp_path, capsys):
    from flexsp.data.__main__ import main

    path = _make_format("jsonl", tmp_path, [{"text": t} for t in TEXTS])
    main(
        [
            "--hf",
            path,
            "--tokenizer",
            "byte",
            "--cache-dir",
            str(tmp_path / "c"),
            "--max-doc-tokens",
            "24",
            "--batch-rows",
            "2",
        ]
    )
    out = capsys.readouterr().out
    assert "documents" in out and "vocab 257" in out and "'batches': 3" in out
    prefix = write_megatron(tmp_path / "m", MEGA_DOCS)
    main(
        [
            "--megatron",
            prefix,
            "--vocab-size",
            "50",
            "--max-doc-tokens",
            "24",
            "--cache-dir",
            str(tmp_path / "c"),
        ]
    )
    assert "5 documents, 44 tokens, vocab 50" in capsys.readouterr().out
    for argv, match in [
        (
            ["--megatron", prefix, "--cache-dir", str(tmp_path / "c")],
            "declare its vocabulary with data.vocab_size",
        ),
        (["--hf", str(tmp_path / "nope")], "nope does not exist"),
        (
            ["--megatron", prefix, "--vocab-size", "5", "--cache-dir", str(tmp_path / "c")],
            "is outside the vocabulary [0, 5)",
        ),
        (["--paths", str(tmp_path / "missing")], "missing does not exist"),
        ([], "one of the arguments --paths --stdlib --hf --megatron is required"),
        (["--paths", "x", "--long-doc-policy", "cut"], "invalid choice: 'cut'"),
    ]:
        with pytest.raises(SystemExit) as info:
            main(argv)
        err = capsys.readouterr().err
        assert info.value.code == 2 and match in err, (argv, err)
        assert (
            err.count("\n") == 1
            and err.startswith("python -m flexsp.data: error: ")
            and "Traceback" not in err
        )


def test_cli_subprocess_exit_status(tmp_path):
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{oops\n')
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "flexsp.data",
            "--paths",
            str(tmp_path / "bad.jsonl"),
            "--tokenizer",
            "byte",
            "--cache-dir",
            str(tmp_path / "c"),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    assert "bad.jsonl:2: corrupt JSONL line" in r.stderr and "each line must be one JSON object" in r.stderr
