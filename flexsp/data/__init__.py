"""FlexSP data: offline-tokenized local corpora and Hugging Face ``datasets`` input, Megatron-LM
indexed datasets, synthetic length-distribution sources, and the deterministic, resumable
global-batch sampler that feeds the planner and the ranks.

A *source* is anything with ``lengths`` (np.int64 ``[num_docs]``), ``num_docs``, ``vocab_size`` and
``tokens(i) -> np.ndarray``: :class:`TokenizedCorpus` (memmap; text files, JSONL, .npy/.bin and
``datasets`` input), :class:`SFTSource` (supervised fine-tuning conversations, with
``target_counts`` and ``target_mask(i)``: the loss trains only the answers), :class:`MegatronSource`
(memmap of .bin/.idx) or :class:`SyntheticSource`.
"""

from flexsp.data.config import CorpusConfig, DataConfig, SamplerConfig
from flexsp.data.corpus import TokenizedCorpus, build_corpus, collect_files
from flexsp.data.hf import build_hf_corpus
from flexsp.data.megatron import MegatronSource, build_megatron_source, read_index
from flexsp.data.sampler import GlobalBatch, GlobalBatchSampler, PackedBatch, pack_documents
from flexsp.data.sft import SFTSource, build_sft_source
from flexsp.data.stdlib import build_stdlib_corpus, stdlib_corpus_config, stdlib_files
from flexsp.data.synthetic import DISTRIBUTIONS, SyntheticSource, sample_lengths
from flexsp.data.tokenizer import (
    ByteTokenizer,
    HFTokenizer,
    load_hf_model_tokenizer,
    load_tokenizer,
    train_bpe,
)


def build_source(cfg: DataConfig):
    """The document source ``cfg.source`` names (corpus, hf, sft, megatron, stdlib or synthetic)."""
    if cfg.source == "hf":
        return build_hf_corpus(cfg)
    if cfg.source == "sft":
        return build_sft_source(cfg)
    if cfg.source == "megatron":
        return build_megatron_source(cfg)
    if cfg.source == "synthetic":
        return SyntheticSource.from_distribution(
            cfg.distribution,
            cfg.num_docs,
            cfg.synthetic_vocab_size,
            cfg.seed,
            min_len=2,
            max_len=cfg.corpus.max_doc_tokens,
        )
    if cfg.source == "stdlib":
        return build_stdlib_corpus(cfg.corpus, cfg.stdlib_max_files, cfg.seed)
    return build_corpus(cfg.corpus)


def build_sampler(cfg: DataConfig, source) -> GlobalBatchSampler:
    return GlobalBatchSampler(source.lengths, cfg.sampler, targets=source.target_counts)


__all__ = [
    "ByteTokenizer",
    "CorpusConfig",
    "DISTRIBUTIONS",
    "DataConfig",
    "GlobalBatch",
    "GlobalBatchSampler",
    "HFTokenizer",
    "MegatronSource",
    "PackedBatch",
    "SFTSource",
    "SamplerConfig",
    "SyntheticSource",
    "TokenizedCorpus",
    "build_corpus",
    "build_hf_corpus",
    "build_megatron_source",
    "build_sampler",
    "build_sft_source",
    "build_source",
    "build_stdlib_corpus",
    "collect_files",
    "load_hf_model_tokenizer",
    "load_tokenizer",
    "pack_documents",
    "read_index",
    "sample_lengths",
    "stdlib_corpus_config",
    "stdlib_files",
    "train_bpe",
]
