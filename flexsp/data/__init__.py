"""FlexSP data: offline-tokenized local corpora, synthetic length-distribution sources, and the
deterministic, resumable global-batch sampler that feeds the planner and the ranks.

A *source* is anything with ``lengths`` (np.int64 ``[num_docs]``), ``num_docs``, ``vocab_size`` and
``tokens(i) -> np.ndarray``: :class:`TokenizedCorpus` (memmap) or :class:`SyntheticSource`.
"""
from flexsp.data.config import CorpusConfig, DataConfig, SamplerConfig
from flexsp.data.corpus import TokenizedCorpus, build_corpus, collect_files
from flexsp.data.sampler import GlobalBatch, GlobalBatchSampler, PackedBatch, pack_documents
from flexsp.data.stdlib import build_stdlib_corpus, stdlib_corpus_config, stdlib_files
from flexsp.data.synthetic import DISTRIBUTIONS, SyntheticSource, sample_lengths
from flexsp.data.tokenizer import ByteTokenizer, HFTokenizer, load_tokenizer, train_bpe


def build_source(cfg: DataConfig):
    """The document source ``cfg.source`` names (corpus, stdlib or synthetic)."""
    if cfg.source == "synthetic":
        return SyntheticSource.from_distribution(cfg.distribution, cfg.num_docs, cfg.synthetic_vocab_size,
                                                 cfg.seed, min_len=2, max_len=cfg.corpus.max_doc_tokens)
    if cfg.source == "stdlib":
        return build_stdlib_corpus(cfg.corpus, cfg.stdlib_max_files, cfg.seed)
    return build_corpus(cfg.corpus)


def build_sampler(cfg: DataConfig, source) -> GlobalBatchSampler:
    return GlobalBatchSampler(source.lengths, cfg.sampler)


__all__ = [
    "ByteTokenizer", "CorpusConfig", "DISTRIBUTIONS", "DataConfig", "GlobalBatch", "GlobalBatchSampler",
    "HFTokenizer", "PackedBatch", "SamplerConfig", "SyntheticSource", "TokenizedCorpus", "build_corpus",
    "build_sampler", "build_source", "build_stdlib_corpus", "collect_files", "load_tokenizer",
    "pack_documents", "sample_lengths", "stdlib_corpus_config", "stdlib_files", "train_bpe",
]
