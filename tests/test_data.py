"""Corpus building: tokenizers, formats, long-document policy, cache, and clear errors on bad input."""

import json

import numpy as np
import pytest

from flexsp.data import (
    ByteTokenizer,
    CorpusConfig,
    DataConfig,
    TokenizedCorpus,
    build_corpus,
    build_source,
    build_stdlib_corpus,
    load_tokenizer,
    stdlib_files,
    train_bpe,
)

TEXTS = ["def add(a, b):\n    return a + b\n" * 3, "hello world, hello tokens\n" * 4, "x = 1\n"]


def _write_corpus(root):
    (root / "src").mkdir(parents=True)
    for i, t in enumerate(TEXTS):
        (root / "src" / f"f{i}.py").write_text(t)
    (root / "src" / "notes.bin.skip").write_text("ignored: unknown extension")
    (root / "data.jsonl").write_text(
        "\n".join(json.dumps({"text": t, "id": i}) for i, t in enumerate(TEXTS)) + "\n\n"
    )
    return root


def _cfg(tmp_path, paths, **kw):
    kw.setdefault("tokenizer", "byte")
    return CorpusConfig(paths=[str(p) for p in paths], cache_dir=str(tmp_path / "cache"), **kw)


def test_byte_tokenizer_roundtrip():
    tok = ByteTokenizer()
    ids = tok.encode_batch(["héllo"])[0]
    assert max(ids) < 256 and tok.decode(ids) == "héllo" and tok.vocab_size == 257


def test_bpe_train_save_load_roundtrip(tmp_path):
    tok = train_bpe(TEXTS * 5, vocab_size=300)
    assert 257 < tok.vocab_size <= 300 and tok.eos_id is not None
    ids = tok.encode_batch([TEXTS[0]])[0]
    assert tok.decode(ids) == TEXTS[0]
    assert len(ids) < len(TEXTS[0].encode())  # merges were learned
    tok.save(tmp_path / "tok.json")
    again = load_tokenizer(tmp_path / "tok.json")
    assert again.encode_batch([TEXTS[1]]) == tok.encode_batch([TEXTS[1]])
    assert again.fingerprint == tok.fingerprint
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="bad.json"):
        load_tokenizer(tmp_path / "bad.json")


def test_build_text_and_jsonl_corpus_with_bpe_and_cache(tmp_path):
    root = _write_corpus(tmp_path / "corpus")
    cfg = _cfg(tmp_path, [root], tokenizer="bpe", vocab_size=300)
    corpus = build_corpus(cfg)
    assert corpus.num_docs == 6  # 3 .py files + 3 JSONL lines; blank line and .skip ignored
    tok = corpus.tokenizer
    for i in range(corpus.num_docs):
        ids = corpus.tokens(i)
        assert ids[-1] == tok.eos_id  # append_eos
        assert tok.decode(ids[:-1]) in TEXTS
    assert corpus.lengths.sum() == corpus.num_tokens and corpus.vocab_size == tok.vocab_size
    cached = build_corpus(cfg)  # second build: opened from the cache, same store
    assert cached.directory == corpus.directory
    assert np.array_equal(cached.lengths, corpus.lengths)
    (root / "src" / "f9.py").write_text("new = 2\n")  # changed inputs -> new cache entry
    assert build_corpus(cfg).directory != corpus.directory
    with pytest.raises(IndexError):
        corpus.tokens(corpus.num_docs)


def test_loaded_tokenizer_json(tmp_path):
    root = _write_corpus(tmp_path / "corpus")
    train_bpe(TEXTS, vocab_size=280).save(tmp_path / "tokenizer.json")
    corpus = build_corpus(_cfg(tmp_path, [root], tokenizer=str(tmp_path / "tokenizer.json")))
    assert corpus.vocab_size == load_tokenizer(tmp_path / "tokenizer.json").vocab_size
    with pytest.raises(ValueError, match="missing.json"):
        build_corpus(_cfg(tmp_path, [root], tokenizer=str(tmp_path / "missing.json")))


def test_long_doc_policies(tmp_path):
    f = tmp_path / "long.txt"
    f.write_text("a" * 25)  # 25 bytes + EOS = 26 tokens
    split = build_corpus(_cfg(tmp_path, [f], max_doc_tokens=10, min_doc_tokens=2))
    assert split.lengths.tolist() == [10, 10, 6]
    assert split.meta["stats"]["split"] == 1
    tail = build_corpus(_cfg(tmp_path, [f], max_doc_tokens=10, min_doc_tokens=7))
    assert tail.lengths.tolist() == [10, 10]  # trailing chunk shorter than min_doc_tokens dropped
    (tmp_path / "short.txt").write_text("bb")
    drop = build_corpus(
        _cfg(tmp_path, [f, tmp_path / "short.txt"], max_doc_tokens=10, long_doc_policy="drop")
    )
    assert drop.lengths.tolist() == [3]
    with pytest.raises(ValueError, match="long.txt.*exceeds max_doc_tokens=10"):
        build_corpus(_cfg(tmp_path, [f], max_doc_tokens=10, long_doc_policy="error"))
    with pytest.raises(ValueError, match="valid options"):
        _cfg(tmp_path, [f], long_doc_policy="truncate")


def test_pretokenized_npy_and_bin(tmp_path):
    np.save(tmp_path / "one.npy", np.arange(5, dtype=np.int32))
    np.save(tmp_path / "rows.npy", np.ones((2, 4), dtype=np.int64))
    np.arange(7, dtype=np.uint16).tofile(tmp_path / "raw.bin")
    np.arange(6, dtype=np.uint16).tofile(tmp_path / "docs.bin")
    np.save(tmp_path / "docs.offsets.npy", np.array([0, 2, 6]))
    corpus = build_corpus(_cfg(tmp_path, [tmp_path], tokenizer="bpe"))
    assert corpus.tokenizer is None  # pre-tokenized only: no tokenizer trained
    # sorted: docs.bin (2 docs), one.npy, raw.bin, rows.npy (2 docs)
    assert corpus.lengths.tolist() == [2, 4, 5, 7, 4, 4]
    assert corpus.tokens(1).tolist() == [2, 3, 4, 5]
    assert corpus.vocab_size == 8192  # the declared vocabulary (corpus.vocab_size), not max id + 1
    small = build_corpus(_cfg(tmp_path, [tmp_path / "raw.bin"], tokenizer="bpe", vocab_size=300))
    assert small.vocab_size == 300 and small.dtype == np.uint16


def test_random_bytes_as_bin_rejected_beyond_declared_vocab(tmp_path):
    # A new user's mistake: arbitrary bytes named .bin read as uint16 ids up to 65535.
    (tmp_path / "random.bin").write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(
        ValueError,
        match=r"random.bin \(document 0\): token ids in \[\d+, \d+\] fall "
        r"outside the vocabulary \[0, 8192\) declared by corpus.vocab_size: set "
        r"data.corpus.vocab_size",
    ):
        build_corpus(_cfg(tmp_path, [tmp_path / "random.bin"], tokenizer="bpe"))
    (tmp_path / "t.txt").write_text("text")  # with a tokenizer, its vocabulary is the bound
    with pytest.raises(ValueError, match=r"outside the vocabulary \[0, 257\) of the tokenizer \(byte\)"):
        build_corpus(_cfg(tmp_path, [tmp_path / "t.txt", tmp_path / "random.bin"]))


@pytest.mark.parametrize(
    "name,content,match",
    [
        (
            "bad.jsonl",
            '{"text": "ok"}\n{"text": broken\n',
            r"bad.jsonl:2: corrupt JSONL line \(Expecting value at column 10\); each line must be one JSON "
            r"object with a string 'text' field$",
        ),
        (
            "notext.jsonl",
            '{"body": "x"}\n',
            r"notext.jsonl:1: expected a JSON object with a string 'text' field, got keys \['body'\]",
        ),
        ("bad.npy", b"\x93NUMPY garbage", r"bad.npy: not a valid .npy"),
        ("odd.bin", b"\x01\x02\x03", r"odd.bin: size 3 bytes is not a multiple of uint16"),
    ],
)
def test_corrupt_inputs_raise_naming_the_file(tmp_path, name, content, match):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(ValueError, match=match):
        build_corpus(_cfg(tmp_path, [path]))


def test_bad_npy_contents_and_offsets(tmp_path):
    np.save(tmp_path / "f.npy", np.zeros(3, dtype=np.float32))
    with pytest.raises(ValueError, match="f.npy: expected a 1-D or 2-D integer"):
        build_corpus(_cfg(tmp_path, [tmp_path / "f.npy"]))
    np.save(tmp_path / "neg.npy", np.array([1, -2, 3]))
    with pytest.raises(ValueError, match="neg.npy.*outside the vocabulary"):
        build_corpus(_cfg(tmp_path, [tmp_path / "neg.npy"]))
    np.array([300, 1], dtype=np.uint16).tofile(tmp_path / "big.bin")
    (tmp_path / "t.txt").write_text("text")
    with pytest.raises(ValueError, match="big.bin.*outside the vocabulary \\[0, 257\\)"):
        build_corpus(_cfg(tmp_path, [tmp_path / "t.txt", tmp_path / "big.bin"]))
    np.arange(4, dtype=np.uint16).tofile(tmp_path / "o.bin")
    np.save(tmp_path / "o.offsets.npy", np.array([0, 5]))
    with pytest.raises(ValueError, match="o.offsets.npy: offsets must"):
        build_corpus(_cfg(tmp_path, [tmp_path / "o.bin"]))


def test_empty_and_missing_corpus(tmp_path):
    with pytest.raises(
        ValueError,
        match=r"nope does not exist \(CorpusConfig.paths: existing files "
        r"or directories of text \(.txt, .md.*\), .jsonl, .npy or .bin files\)$",
    ):
        build_corpus(_cfg(tmp_path, [tmp_path / "nope"]))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="corpus is empty"):
        build_corpus(_cfg(tmp_path, [tmp_path / "empty"]))
    with pytest.raises(ValueError, match="paths is empty"):
        build_corpus(_cfg(tmp_path, []))
    (tmp_path / "blank.txt").write_text("")
    with pytest.raises(ValueError, match="no documents left"):
        build_corpus(_cfg(tmp_path, [tmp_path / "blank.txt"]))


def test_corrupt_cache_detected(tmp_path):
    (tmp_path / "a.txt").write_text("some text here")
    corpus = build_corpus(_cfg(tmp_path, [tmp_path / "a.txt"]))
    with open(corpus.directory / "tokens.bin", "ab") as fh:
        fh.write(b"\x00")
    with pytest.raises(ValueError, match="tokens.bin: expected"):
        TokenizedCorpus(corpus.directory)


def test_stdlib_corpus_subset(tmp_path):
    files = stdlib_files()
    assert len(files) > 500 and all(f.suffix == ".py" for f in files)
    assert not any("site-packages" in str(f) for f in files)
    subset = stdlib_files(max_files=8, seed=1, max_file_bytes=20000)
    assert subset == stdlib_files(max_files=8, seed=1, max_file_bytes=20000) and len(subset) == 8
    corpus = build_stdlib_corpus(
        CorpusConfig(cache_dir=str(tmp_path), vocab_size=400, max_doc_tokens=2048),
        max_files=8,
        max_file_bytes=20000,
    )
    assert corpus.num_docs >= 7 and corpus.lengths.max() <= 2048
    assert corpus.tokenizer.decode(corpus.tokens(0)[:-1]).strip()  # real source text back


def test_data_config_and_build_source(tmp_path):
    with pytest.raises(ValueError, match="valid options"):
        DataConfig(source="web")
    src = build_source(
        DataConfig(
            source="synthetic", distribution="stdlib", num_docs=50, corpus=CorpusConfig(max_doc_tokens=4096)
        )
    )
    assert src.num_docs == 50 and src.lengths.max() <= 4096
    (tmp_path / "a.txt").write_text("abc def")
    corpus = build_source(DataConfig(source="corpus", corpus=_cfg(tmp_path, [tmp_path / "a.txt"])))
    assert corpus.num_docs == 1


def test_cli_builds_and_reports(tmp_path, capsys):
    from flexsp.data.__main__ import main

    (tmp_path / "a.txt").write_text("one two three")
    main(["--paths", str(tmp_path / "a.txt"), "--tokenizer", "byte", "--cache-dir", str(tmp_path / "c")])
    assert "1 documents, 14 tokens, vocab 257" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["--paths", str(tmp_path / "missing")])
    assert "missing does not exist" in capsys.readouterr().err
