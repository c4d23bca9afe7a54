"""Cross-check against Megatron-LM itself: files written by megatron-core's IndexedDatasetBuilder read
back identically here, and the test writer's files read identically in megatron-core.

Skipped unless ``megatron.core`` is importable (it is not a FlexSP dependency); run it with an
environment that has megatron-core installed, e.g.
``python -m venv /tmp/mc && /tmp/mc/bin/pip install --no-deps megatron-core`` plus a .pth line
naming the project's site-packages, then ``/tmp/mc/bin/python -m pytest tests/test_data_megatron_core.py``.
"""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
indexed = pytest.importorskip("megatron.core.datasets.indexed_dataset")

from test_data_formats import write_megatron  # noqa: E402

from flexsp.data import CorpusConfig, MegatronSource, read_index  # noqa: E402

DOCS = [[[5, 6, 7], [8]], [[9] * 40], [[1, 2]], [[3], [], [4, 4, 4]]]


def _megatron_documents(prefix, multimodal=False):
    ds = indexed.IndexedDataset(str(prefix), multimodal=multimodal)
    di = ds.document_indices
    out = []
    for k in range(len(di) - 1):
        parts = [ds[j][0] if multimodal else ds[j] for j in range(int(di[k]), int(di[k + 1]))]
        out.append(np.concatenate(parts).tolist() if parts else [])
    return out


def _ours(prefix, tmp_path, vocab=100_000, **kw):
    cfg = CorpusConfig(cache_dir=str(tmp_path / "cache"), min_doc_tokens=1, max_doc_tokens=1 << 20, **kw)
    src = MegatronSource([str(prefix)], cfg, vocab)
    return [src.tokens(i).tolist() for i in range(src.num_docs)]


@pytest.mark.parametrize("dtype", [np.uint16, np.int32])
def test_builder_files_read_identically(tmp_path, dtype):
    prefix = tmp_path / "mc_text_document"
    builder = indexed.IndexedDatasetBuilder(f"{prefix}.bin", dtype=dtype)
    for doc in DOCS:  # one document per sentence list, as preprocess_data.py --split-sentences does
        for sentence in doc:
            builder.add_item(torch.tensor(sentence, dtype=torch.int64))
        builder.end_document()
    builder.add_document(torch.tensor([5000, 11]), [1, 1])  # add_document path too
    builder.finalize(f"{prefix}.idx")
    reference = [d for d in _megatron_documents(prefix) if d]
    assert _ours(prefix, tmp_path) == reference
    ix = read_index(f"{prefix}.idx")
    mc = indexed.IndexedDataset(str(prefix))
    assert ix.dtype == np.dtype(dtype)
    assert np.array_equal(ix.document_indices, mc.document_indices)
    assert np.array_equal(ix.sequence_lengths, mc.sequence_lengths)
    assert np.array_equal(ix.sequence_pointers, mc.index.sequence_pointers)


def test_merged_and_multimodal_builder_files(tmp_path):
    for name in ("a", "b"):
        b = indexed.IndexedDatasetBuilder(str(tmp_path / f"{name}.bin"), dtype=np.uint16)
        for doc in DOCS:
            b.add_document(torch.tensor([t for s in doc for t in s]), [len(s) for s in doc])
        b.finalize(str(tmp_path / f"{name}.idx"))
    merged = indexed.IndexedDatasetBuilder(str(tmp_path / "m.bin"), dtype=np.uint16)
    merged.add_index(str(tmp_path / "a"))
    merged.add_index(str(tmp_path / "b"))
    merged.finalize(str(tmp_path / "m.idx"))
    assert _ours(tmp_path / "m", tmp_path) == [d for d in _megatron_documents(tmp_path / "m") if d]
    mm = indexed.IndexedDatasetBuilder(str(tmp_path / "mm.bin"), dtype=np.uint16, multimodal=True)
    mm.add_item(torch.tensor([1, 2, 3]), mode=0)
    mm.add_item(torch.tensor([4]), mode=0)
    mm.end_document()
    mm.finalize(str(tmp_path / "mm.idx"))
    assert read_index(tmp_path / "mm.idx").sequence_modes.tolist() == [0, 0]
    assert _ours(tmp_path / "mm", tmp_path) == _megatron_documents(tmp_path / "mm", multimodal=True)


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.int32, np.int64])
def test_test_writer_files_read_identically_in_megatron(tmp_path, dtype):
    prefix = write_megatron(tmp_path / "w", DOCS, dtype=dtype)
    assert _megatron_documents(prefix) == [[t for s in d for t in s] for d in DOCS]
    assert _ours(prefix, tmp_path) == [d for d in _megatron_documents(prefix) if d]
