"""Synthetic documents for benchmarks: lengths from a named, published length distribution and
random tokens generated on demand (deterministic per document, so any rank can fetch any document
without shipping data).

Every distribution is a fit to figures in /work/shared/reference/length-distributions.md; the
source is cited next to each. Lengths are clipped to ``[min_len, max_len]`` when bounds are given,
which moves the tail mass onto ``max_len`` (the context limit), as a split/drop policy would.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np

from flexsp.data.source import DocumentSource
from flexsp.errors import UserError

K = 1024


def _buckets_by_token_share(rng, n, buckets: list[tuple[float, float, float]], log: bool = False):
    """Buckets (lo, hi, token_share): documents fall in a bucket with probability proportional to
    share / mean length in that bucket, then uniformly (or log-uniformly) inside it."""
    lo = np.array([b[0] for b in buckets], dtype=float)
    hi = np.array([b[1] for b in buckets], dtype=float)
    share = np.array([b[2] for b in buckets], dtype=float)
    mean = (hi - lo) / np.log(hi / lo) if log else (lo + hi) / 2
    p = share / mean
    idx = rng.choice(len(buckets), size=n, p=p / p.sum())
    u = rng.random(n)
    if log:
        return np.exp(np.log(lo[idx]) + u * np.log(hi[idx] / lo[idx]))
    return lo[idx] + u * (hi[idx] - lo[idx])


def _pow2_chunks(shares: list[float]):
    # Dataset Decomposition (Apple, arXiv 2405.13226): token share per power-of-two chunk
    # 256..8K; chunk 2^i taken as lengths in (2^(i-1), 2^i], the first as [64, 256].
    edges = [64, 256, 512, 1 * K, 2 * K, 4 * K, 8 * K]
    buckets = [(edges[i], edges[i + 1], s) for i, s in enumerate(shares)]
    return lambda rng, n: _buckets_by_token_share(rng, n, buckets)


def _mixture(parts: list[tuple[float, float, float]]):
    """Parts (weight = share of documents, lo, hi): log-uniform in [lo, hi] (lo == hi: a point)."""
    w = np.array([p[0] for p in parts])
    lo = np.array([p[1] for p in parts], dtype=float)
    hi = np.array([p[2] for p in parts], dtype=float)

    def sample(rng, n):
        idx = rng.choice(len(parts), size=n, p=w / w.sum())
        return np.exp(np.log(lo[idx]) + rng.random(n) * np.log(hi[idx] / lo[idx]))

    return sample


def _lognormal(median: float, sigma: float):
    return lambda rng, n: rng.lognormal(math.log(median), sigma, size=n)


def _categories(cats: list[tuple[float, float]], sigma: float = 0.7):
    """Categories (share of examples, mean tokens), each lognormal with that mean."""
    w = np.array([c[0] for c in cats])
    mu = np.log([c[1] for c in cats]) - sigma**2 / 2

    def sample(rng, n):
        idx = rng.choice(len(cats), size=n, p=w / w.sum())
        return rng.lognormal(mu[idx], sigma)

    return sample


DISTRIBUTIONS: dict[str, Callable] = {
    # Dataset Decomposition (arXiv 2405.13226), Wikipedia / DCLM-Baseline token shares per chunk.
    "wikipedia": _pow2_chunks([15.3, 21.5, 23.0, 19.1, 13.1, 8.0]),
    "dclm": _pow2_chunks([10.8, 18.2, 22.5, 19.2, 15.7, 13.7]),
    # ByteScale (arXiv 2502.21231): ~80% of samples <= 4K; 1% >= 128K carrying ~44% of tokens;
    # 0.05% at 2M carrying ~12%. Fit (log-uniform pieces): 80% [32, 4K], 19% [4K, 64K],
    # 0.95% [128K, 512K], 0.05% = 2M -> 43% of tokens >= 128K, 12% at 2M.
    "bytescale": _mixture(
        [(0.80, 32, 4 * K), (0.19, 4 * K, 64 * K), (0.0095, 128 * K, 512 * K), (0.0005, 2048 * K, 2048 * K)]
    ),
    # CPython stdlib .py files in GPT-2 tokens: p50 ~3.1K, p90 ~22K (lognormal sigma 1.53), max ~414K.
    "stdlib": lambda rng, n: np.minimum(_lognormal(3100, 1.53)(rng, n), 414 * K),
    # Llama 3 (arXiv 2407.21783) SFT mix: share of examples and mean tokens per category.
    "llama3-sft": _categories(
        [(52.66, 974), (14.89, 753), (3.01, 521), (8.14, 298), (21.19, 662), (0.11, 38136)]
    ),
    # OLMo 3 long-document pool: tokens per bucket 8-16K ... 1M+ (1M+ taken as [1M, 2M]).
    "olmo3-long": lambda rng, n: _buckets_by_token_share(
        rng,
        n,
        [
            (8 * K, 16 * K, 144),
            (16 * K, 32 * K, 118),
            (32 * K, 64 * K, 139),
            (64 * K, 128 * K, 96),
            (128 * K, 256 * K, 61),
            (256 * K, 512 * K, 35),
            (512 * K, 1024 * K, 21.5),
            (1024 * K, 2048 * K, 26.9),
        ],
        log=True,
    ),
    # PG19 test books (Llama-3 tokenizer): p50 68K, p90 206K (lognormal sigma 0.865), max 1.1M.
    "pg19": lambda rng, n: np.minimum(_lognormal(68 * K, 0.865)(rng, n), 1100 * K),
}
PARAMETRIC = ("uniform", "fixed")


def sample_lengths(
    name: str, n: int, seed: int = 0, min_len: int = 1, max_len: int | None = None
) -> np.ndarray:
    """``n`` document lengths (int64) from distribution ``name`` (see DISTRIBUTIONS), clipped to
    ``[min_len, max_len]``. ``uniform`` (integers in [min_len, max_len]) and ``fixed`` (all
    max_len) need ``max_len``."""
    if n < 0 or min_len < 1 or (max_len is not None and max_len < min_len):
        raise UserError(
            f"sample_lengths: need n >= 0 and 1 <= min_len <= max_len; got n={n}, "
            f"min_len={min_len}, max_len={max_len}"
        )
    rng = np.random.default_rng(seed)
    if name in PARAMETRIC:
        if max_len is None:
            raise UserError(f"distribution {name!r} needs max_len")
        if name == "fixed":
            return np.full(n, max_len, dtype=np.int64)
        return rng.integers(min_len, max_len + 1, size=n, dtype=np.int64)
    if name not in DISTRIBUTIONS:
        raise UserError(
            f"unknown length distribution {name!r}; valid options: {sorted(DISTRIBUTIONS) + list(PARAMETRIC)}"
        )
    lengths = np.rint(DISTRIBUTIONS[name](rng, n)).astype(np.int64)
    return np.clip(lengths, min_len, max_len if max_len is not None else None)


class SyntheticSource(DocumentSource):
    """Documents of given lengths with uniform random tokens in [0, vocab_size); document i's tokens
    depend only on (seed, i). Same interface as TokenizedCorpus: lengths, num_docs, tokens(i)."""

    def __init__(self, lengths, vocab_size: int, seed: int = 0):
        self.lengths = np.asarray(lengths, dtype=np.int64)
        if self.lengths.ndim != 1 or self.lengths.size == 0 or self.lengths.min() < 1:
            raise UserError(
                f"SyntheticSource needs a non-empty 1-D array of positive lengths, got "
                f"shape {self.lengths.shape}"
            )
        if vocab_size < 1:
            raise UserError(f"SyntheticSource vocab_size must be >= 1, got {vocab_size}")
        self.vocab_size, self.seed = int(vocab_size), int(seed)

    @classmethod
    def from_distribution(
        cls,
        name: str,
        num_docs: int,
        vocab_size: int,
        seed: int = 0,
        min_len: int = 2,
        max_len: int | None = None,
    ) -> "SyntheticSource":
        return cls(sample_lengths(name, num_docs, seed, min_len, max_len), vocab_size, seed)

    def _read(self, index: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, index])
        dtype = np.uint16 if self.vocab_size <= 65536 else np.uint32
        return rng.integers(0, self.vocab_size, size=int(self.lengths[index]), dtype=dtype)
