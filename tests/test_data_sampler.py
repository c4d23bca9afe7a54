"""Global-batch sampler (determinism, epochs, budget, resume), packing, synthetic sources."""

import numpy as np
import pytest
import torch

from flexsp.data import (
    DISTRIBUTIONS,
    GlobalBatchSampler,
    SamplerConfig,
    SyntheticSource,
    pack_documents,
    sample_lengths,
)
from flexsp.model import lm_labels, positions_from_cu_seqlens


def _take(sampler, n):
    return [next(sampler) for _ in range(n)]


def test_batches_respect_budget_and_cover_each_epoch_once():
    lengths = np.random.default_rng(0).integers(1, 100, size=200)
    sampler = GlobalBatchSampler(lengths, global_batch_tokens=500, seed=3)
    seen, epoch0 = [], []
    while True:
        b = next(sampler)
        if b.epoch > 0:
            break
        assert b.num_tokens <= 500 and list(b.lengths) == [int(lengths[i]) for i in b.doc_ids]
        epoch0.append(b)
        seen += b.doc_ids
    assert sorted(seen) == list(range(200))  # every document exactly once per epoch
    assert [b.step for b in epoch0] == list(range(len(epoch0)))
    # Greedy fill: a batch only ends when the next document would not fit.
    for b, nxt in zip(epoch0[:-1], epoch0[1:]):
        assert b.num_tokens + nxt.lengths[0] > 500
    first_of_epoch1 = b.doc_ids
    assert first_of_epoch1 != epoch0[0].doc_ids  # a new shuffle each epoch


def test_deterministic_across_instances_and_seeds():
    lengths = np.arange(1, 60)
    a = _take(GlobalBatchSampler(lengths, global_batch_tokens=100, seed=7), 30)
    b = _take(GlobalBatchSampler(lengths, global_batch_tokens=100, seed=7), 30)
    c = _take(GlobalBatchSampler(lengths, global_batch_tokens=100, seed=8), 30)
    assert a == b and a != c
    ordered = next(GlobalBatchSampler(lengths, global_batch_tokens=59, shuffle=False))
    assert ordered.doc_ids == tuple(range(10))  # 1 + ... + 10 = 55 <= 59 < 55 + 11


def test_resume_from_state_dict_continues_identically():
    lengths = np.random.default_rng(1).integers(1, 50, size=40)
    full = _take(GlobalBatchSampler(lengths, global_batch_tokens=120, seed=2), 25)
    s = GlobalBatchSampler(lengths, global_batch_tokens=120, seed=2)
    _take(s, 11)
    state = s.state_dict()
    assert all(isinstance(v, (int, str)) for v in state.values())
    resumed = GlobalBatchSampler(lengths, global_batch_tokens=120, seed=2)
    resumed.load_state_dict(state)
    assert _take(resumed, 14) == full[11:]
    with pytest.raises(ValueError, match="documents"):
        GlobalBatchSampler(lengths[:-1], global_batch_tokens=120, seed=2).load_state_dict(state)
    with pytest.raises(ValueError, match="seed"):
        GlobalBatchSampler(lengths, global_batch_tokens=120, seed=3).load_state_dict(state)


def test_caps_drop_last_and_validation():
    lengths = [10] * 25
    s = GlobalBatchSampler(lengths, SamplerConfig(global_batch_tokens=100, max_docs_per_batch=4))
    assert all(len(b.doc_ids) == 4 for b in _take(s, 6))
    s = GlobalBatchSampler(lengths, global_batch_tokens=100, drop_last=True)
    assert [b.num_tokens for b in _take(s, 4)] == [100, 100, 100, 100]  # 50-token tails dropped
    assert [b.epoch for b in _take(GlobalBatchSampler(lengths, global_batch_tokens=100), 4)] == [0, 0, 0, 1]
    with pytest.raises(ValueError, match="document 1 has 300 tokens > global_batch_tokens=100"):
        GlobalBatchSampler([5, 300], global_batch_tokens=100)
    with pytest.raises(ValueError, match="would yield no batch"):
        GlobalBatchSampler([5, 5], global_batch_tokens=100, drop_last=True)
    with pytest.raises(ValueError, match="global_batch_tokens"):
        SamplerConfig(global_batch_tokens=0)


def test_pack_documents_for_a_group():
    src = SyntheticSource([5, 3, 8, 2], vocab_size=50, seed=4)
    sampler = GlobalBatchSampler(src.lengths, global_batch_tokens=100, seed=0)
    batch = next(sampler)
    seq_ids = [2, 0]  # a plan's group runs these entries of the batch
    docs = batch.select(seq_ids)
    packed = pack_documents(src, docs)
    lens = [batch.lengths[i] for i in seq_ids]
    assert packed.cu_seqlens.tolist() == [0, lens[0], sum(lens)]
    assert packed.cu_seqlens.dtype == torch.int32 and packed.input_ids.dtype == torch.int64
    assert torch.equal(packed.input_ids[: lens[0]], torch.from_numpy(src.tokens(docs[0]).astype(np.int64)))
    assert torch.equal(packed.positions, positions_from_cu_seqlens(packed.cu_seqlens))
    assert torch.equal(packed.labels, lm_labels(packed.input_ids, packed.cu_seqlens))
    assert packed.num_targets == sum(lens) - 2


def test_synthetic_source_deterministic_tokens():
    a = SyntheticSource.from_distribution("wikipedia", 100, vocab_size=1000, seed=5, max_len=2048)
    b = SyntheticSource.from_distribution("wikipedia", 100, vocab_size=1000, seed=5, max_len=2048)
    assert np.array_equal(a.lengths, b.lengths) and a.lengths.max() <= 2048
    assert np.array_equal(a.tokens(17), b.tokens(17)) and a.tokens(17).max() < 1000
    assert len(a.tokens(3)) == a.lengths[3]
    with pytest.raises(ValueError, match="positive lengths"):
        SyntheticSource([3, 0], vocab_size=10)


def test_length_distributions_match_published_figures():
    for name in DISTRIBUTIONS:
        lengths = sample_lengths(name, 2000, seed=0, max_len=1 << 22)
        assert lengths.min() >= 1 and lengths.dtype == np.int64, name
    n = 100_000
    bs = sample_lengths("bytescale", n, seed=0)
    assert abs((bs <= 4096).mean() - 0.80) < 0.01  # ByteScale: ~80% of samples <= 4K
    assert abs(bs[bs >= 131072].sum() / bs.sum() - 0.443) < 0.05  # 1% >= 128K hold ~44% of tokens
    std = sample_lengths("stdlib", n, seed=0)
    assert abs(np.median(std) - 3100) < 150 and abs(np.percentile(std, 90) - 22000) < 1500
    wiki = sample_lengths("wikipedia", n, seed=0)
    assert (wiki < 8192).mean() > 0.96  # FlexSP paper: >96% of Wikipedia sequences below 8K
    assert sample_lengths("fixed", 3, max_len=7).tolist() == [7, 7, 7]
    u = sample_lengths("uniform", 1000, min_len=4, max_len=9)
    assert u.min() == 4 and u.max() == 9
    assert sample_lengths("pg19", 10, max_len=1000).max() == 1000  # clipped to the context limit
    with pytest.raises(ValueError, match="valid options"):
        sample_lengths("zipf", 10)
    with pytest.raises(ValueError, match="needs max_len"):
        sample_lengths("uniform", 10)


def test_corpus_to_model_end_to_end(tmp_path):
    from flexsp.data import CorpusConfig, build_corpus
    from flexsp.model import Transformer, model_config, shard_inputs

    for i in range(6):
        (tmp_path / f"m{i}.py").write_text(f"def f{i}(x):\n    return x * {i}\n" * (i + 1))
    corpus = build_corpus(
        CorpusConfig(
            paths=[str(tmp_path)], cache_dir=str(tmp_path / "c"), tokenizer="byte", max_doc_tokens=64
        )
    )
    batch = next(GlobalBatchSampler(corpus.lengths, global_batch_tokens=256, seed=0))
    packed = pack_documents(corpus, batch.doc_ids)
    model = Transformer(model_config("tiny", vocab_size=corpus.vocab_size))
    loss_sum, count = shard_inputs(packed.input_ids, packed.cu_seqlens).loss(model)
    assert count.item() == packed.num_targets and torch.isfinite(loss_sum)
    assert abs(loss_sum.item() / count.item() - np.log(corpus.vocab_size)) < 0.5  # ~uniform at init
