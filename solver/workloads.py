"""Sequence-length samplers for the benchmarks, fitted to published length distributions.

``sample_lengths(name, n, seed, context_limit)`` draws a global batch of n document lengths
(tokens). Sources: ``shared/reference/length-distributions.md`` (which cites each paper):

- ``wikipedia``: Dataset Decomposition (Apple, arXiv 2405.13226) token share per power-of-two chunk
  up to 8K, plus a thin tail (3.5% of sequences, x0.4 per octave up to 512K) so that ~96.5% stay
  below 8K (FlexSP: "over 96% of sequences below 8K").
- ``commoncrawl`` / ``dclm``: the DCLM-Baseline shares of the same table, with a heavier tail
  (5% over 8K, halving per octave; FlexSP: CommonCrawl has far more sequences over 32K than
  Wikipedia; the tail's size is our assumption).
- ``github``: the DCLM body with 15% of files over 8K and that tail's slope fitted so that 16.2%
  of tokens sit in sequences over 128K (ByteScale, arXiv 2502.21231, for GitHub), before the
  context limit.
- ``bytescale``: ByteScale's in-house long-context mix: 80% of samples <= 4K; 1% >= 128K carrying
  44.3% of tokens; 0.05% near 2M carrying 12.1% of tokens.
- ``llama3-sft``: the Llama 3 SFT mix (arXiv 2407.21783): category shares and mean lengths, each
  category log-normal (sigma is our assumption: 0.8, 0.3 for long context).
- ``olmo-long``: OLMo 3 long-document pool, tokens per octave bucket 8K..2M.
- ``cpython``: REAL lengths: the CPython standard library ``.py`` files of this interpreter.

The histogram samplers pick an octave-like bin by its sample share and draw log-uniformly inside
it; published token shares are turned into sample shares by dividing by the bin's mean length.
Sampling is deterministic per (name, seed). Lengths are >= 1, optionally padded up to a multiple of
``pad_to`` (the paper pads to 2N = 128). Sequences longer than ``context_limit`` (after padding)
are dropped and redrawn, as the paper drops them from the dataset (``overflow="drop"``), or cut to
the limit (``overflow="clip"``).
"""
from __future__ import annotations

import argparse
import functools
import os
import sysconfig
import zlib
from pathlib import Path

import numpy as np
from scipy.optimize import brentq

K = 1024
OCTAVES = [64 * 2**i for i in range(16)]          # 64 .. 2M

# Dataset Decomposition token share per chunk (256 .. 8K): chunk 2^i holds lengths (2^(i-1), 2^i],
# the first one everything from 64 up.
DD_EDGES = [64, 256, 512, 1 * K, 2 * K, 4 * K, 8 * K]
DD_SHARES = {"wikipedia": [15.3, 21.5, 23.0, 19.1, 13.1, 8.0],
             "dclm": [10.8, 18.2, 22.5, 19.2, 15.7, 13.7]}


def _mean_loguniform(lo: float, hi: float) -> float:
    return (hi - lo) / np.log(hi / lo)


def _from_token_shares(edges, shares):
    """Bins (lo, hi, sample share) from per-bin token shares."""
    counts = np.array([s / _mean_loguniform(lo, hi) for lo, hi, s in zip(edges, edges[1:], shares)])
    counts /= counts.sum()
    return [(lo, hi, float(c)) for lo, hi, c in zip(edges, edges[1:], counts)]


def _with_tail(body, tail_frac: float, ratio: float, top: int):
    """Body bins scaled to 1 - tail_frac, plus octaves 8K..top whose shares fall by ``ratio`` each."""
    edges = [e for e in OCTAVES if 8 * K <= e <= top]
    w = np.array([ratio**i for i in range(len(edges) - 1)])
    w = tail_frac * w / w.sum()
    return [(lo, hi, c * (1 - tail_frac)) for lo, hi, c in body] + \
        [(lo, hi, float(c)) for lo, hi, c in zip(edges, edges[1:], w)]


def token_share_above(bins, threshold: float) -> float:
    """Analytic share of tokens in sequences longer than ``threshold`` (bin edges at thresholds)."""
    tok = np.array([c * _mean_loguniform(lo, hi) for lo, hi, c in bins])
    above = np.array([lo >= threshold for lo, _, _ in bins])
    return float(tok[above].sum() / tok.sum())


def _github_bins():
    """DCLM body; 15% of files over 8K (code files run longer than web text; FlexSP: GitHub has far
    more sequences over 32K than Wikipedia), in octaves 8K..2M whose shares fall by a ratio r per
    octave, r solved so that 16.2% of tokens sit in sequences over 128K (ByteScale, GitHub)."""
    body = _from_token_shares(DD_EDGES, DD_SHARES["dclm"])
    r = brentq(lambda r: token_share_above(_with_tail(body, 0.15, r, 2048 * K), 128 * K) - 0.162, 0.05, 0.95)
    return _with_tail(body, 0.15, r, 2048 * K)


def _bytescale_bins():
    """ByteScale's published shares, solved for bin shares.

    Bins: (64, 4K] 80% of samples; (4K, 32K] q1 + (32K, 128K] q2 = 19%; (128K, 256K] p1 +
    (256K, 1.8M] p2 = 0.95%; (1.8M, 2M] 0.05% carrying 12.1% of tokens (this fixes the mean length
    mu); p1, p2 give >= 128K its 44.3% of tokens, q1, q2 the rest.
    """
    M = _mean_loguniform
    top = (1800 * K, 2048 * K)
    mu = 0.0005 * M(*top) / 0.121
    big = 0.443 * mu - 0.0005 * M(*top)                      # tokens/sample in 128K..1.8M
    m1, m2 = M(128 * K, 256 * K), M(256 * K, top[0])
    p2 = (big - 0.0095 * m1) / (m2 - m1); p1 = 0.0095 - p2
    mid = mu - 0.80 * M(64, 4 * K) - 0.443 * mu              # tokens/sample in 4K..128K
    n1, n2 = M(4 * K, 32 * K), M(32 * K, 128 * K)
    q2 = (mid - 0.19 * n1) / (n2 - n1); q1 = 0.19 - q2
    return [(64, 4 * K, 0.80), (4 * K, 32 * K, q1), (32 * K, 128 * K, q2), (128 * K, 256 * K, p1),
            (256 * K, top[0], p2), (top[0], top[1], 0.0005)]


def _olmo_bins():
    tokens_b = [144, 118, 139, 96, 61, 35, 21.5, 26.9]       # B tokens, 8-16K .. 1M+ (1M+ as 1-2M)
    return _from_token_shares([8 * K * 2**i for i in range(9)], tokens_b)


HISTOGRAMS = {
    "wikipedia": lambda: _with_tail(_from_token_shares(DD_EDGES, DD_SHARES["wikipedia"]), 0.035, 0.4, 512 * K),
    "commoncrawl": lambda: _with_tail(_from_token_shares(DD_EDGES, DD_SHARES["dclm"]), 0.05, 0.5, 1024 * K),
    "github": _github_bins,
    "bytescale": _bytescale_bins,
    "olmo-long": _olmo_bins,
}
HISTOGRAMS["dclm"] = HISTOGRAMS["commoncrawl"]

# Llama 3 SFT: (share of examples %, mean tokens, log-normal sigma)
LLAMA3_SFT = [(52.66, 974, 0.8), (14.89, 753, 0.8), (3.01, 521, 0.8), (8.14, 298, 0.8),
              (21.19, 662, 0.8), (0.11, 38136, 0.3)]

CPYTHON_P50_TOKENS = 3100
"""Median GPT-2 tokens of a CPython stdlib .py file (length-distributions.md)."""

NAMES = sorted([*HISTOGRAMS, "llama3-sft", "cpython"])


@functools.lru_cache(maxsize=1)
def cpython_lengths() -> np.ndarray:
    """Token estimates of every CPython standard-library .py file on this machine.

    Files: all ``*.py`` under ``sysconfig.get_paths()["stdlib"]``, recursively, skipping
    site-packages/dist-packages (third-party code), sorted by path. Tokens are estimated as
    bytes / R with R (bytes per GPT-2 token) calibrated so the median file is 3.1K tokens, as the
    reference measured (p90 ~22K, p99 ~83K, max ~414K there); we don't tokenize.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    sizes = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in ("site-packages", "dist-packages"))
        sizes += [os.path.getsize(os.path.join(dirpath, f)) for f in sorted(filenames) if f.endswith(".py")]
    sizes = np.array(sizes, dtype=np.float64)
    if sizes.size < 100:
        raise ValueError(f"found only {sizes.size} .py files under {root}; is the stdlib installed?")
    ratio = np.median(sizes) / CPYTHON_P50_TOKENS
    return np.maximum(1, np.round(sizes / ratio)).astype(np.int64)


def _draw(name: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """``size`` raw lengths (no limit, no padding)."""
    if name in HISTOGRAMS:
        bins = HISTOGRAMS[name]()
        lo = np.array([b[0] for b in bins], dtype=np.float64)
        hi = np.array([b[1] for b in bins], dtype=np.float64)
        p = np.array([b[2] for b in bins]); p /= p.sum()
        k = rng.choice(len(bins), size=size, p=p)
        u = rng.random(size)
        return np.ceil(np.exp(np.log(lo[k]) + u * np.log(hi[k] / lo[k]))).astype(np.int64)
    if name == "llama3-sft":
        share = np.array([c[0] for c in LLAMA3_SFT]); share /= share.sum()
        k = rng.choice(len(LLAMA3_SFT), size=size, p=share)
        mean = np.array([c[1] for c in LLAMA3_SFT], dtype=np.float64)[k]
        sigma = np.array([c[2] for c in LLAMA3_SFT])[k]
        return np.maximum(1, np.round(rng.lognormal(np.log(mean) - sigma**2 / 2, sigma))).astype(np.int64)
    if name == "cpython":
        pool = cpython_lengths()
        return pool[rng.integers(0, pool.size, size=size)]
    raise ValueError(f"unknown workload {name!r}; valid: {', '.join(NAMES)}")


def sample_lengths(name: str, n: int, seed: int = 0, context_limit: int | None = None, *,
                   pad_to: int = 1, overflow: str = "drop") -> np.ndarray:
    """n sequence lengths of workload ``name`` (deterministic per name and seed).

    pad_to: round every length up to a multiple of it (the paper: 2N = 128).
    overflow: what happens to lengths above ``context_limit`` after padding: "drop" (redraw, as
    the paper drops them from the dataset) or "clip" (cut to the largest multiple of pad_to
    within the limit).
    """
    if n < 0 or pad_to < 1:
        raise ValueError(f"need n >= 0 and pad_to >= 1, got n={n}, pad_to={pad_to}")
    if overflow not in ("drop", "clip"):
        raise ValueError(f"overflow must be 'drop' or 'clip', got {overflow!r}")
    if context_limit is not None and context_limit < pad_to:
        raise ValueError(f"context_limit {context_limit} is below pad_to {pad_to}")
    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    out, draws = [], 0
    while sum(len(o) for o in out) < n:
        raw = _draw(name, max(n, 64), rng)
        draws += raw.size
        L = -(-raw // pad_to) * pad_to
        if context_limit is not None:
            if overflow == "clip":
                L = np.minimum(L, context_limit // pad_to * pad_to)
            else:
                L = L[L <= context_limit]
        out.append(L)
        if draws > 1000 * max(n, 64):
            raise ValueError(f"workload {name!r} has almost no lengths within context_limit={context_limit}")
    return np.concatenate(out)[:n].astype(np.int64) if n else np.zeros(0, dtype=np.int64)


def save_lengths(path: str | Path, lengths) -> None:
    """Write lengths one integer per line (the format check_plan.py reads)."""
    Path(path).write_text("".join(f"{int(L)}\n" for L in lengths))


def load_lengths(path: str | Path) -> np.ndarray:
    return np.array([int(x) for x in Path(path).read_text().split()], dtype=np.int64)


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr and exit status 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def _int_at_least(low: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {value}")
        return value
    return parse


def main(argv=None) -> int:
    ap = _Parser(prog="python -m solver.workloads",
                 description="Sample a global batch of sequence lengths (one integer per line).")
    ap.add_argument("name", choices=NAMES, help="length distribution: " + ", ".join(NAMES))
    ap.add_argument("n", type=_int_at_least(1), help="number of sequences to draw (>= 1)")
    ap.add_argument("--seed", type=int, default=0, help="random seed (default 0); same seed, same lengths")
    ap.add_argument("--context-limit", type=_int_at_least(1), default=None,
                    help="longest allowed length in tokens (after padding); longer draws are dropped "
                         "or clipped (--overflow); default: no limit")
    ap.add_argument("--pad-to", type=_int_at_least(1), default=1,
                    help="round every length up to a multiple of this (the paper: 128); default 1")
    ap.add_argument("--overflow", choices=("drop", "clip"), default="drop",
                    help="lengths above --context-limit: drop and redraw (default) or clip to the limit")
    ap.add_argument("-o", "--output", help="file to write (default: stdout)")
    a = ap.parse_args(argv)
    if a.output:
        out = Path(a.output)
        parent = out.parent if str(out.parent) else Path(".")
        if out.is_dir():
            ap.error(f"argument -o/--output: {a.output} is a directory; give a file name")
        if not parent.is_dir():
            ap.error(f"argument -o/--output: folder {parent} does not exist")
    try:
        L = sample_lengths(a.name, a.n, a.seed, a.context_limit, pad_to=a.pad_to, overflow=a.overflow)
    except ValueError as exc:
        ap.error(str(exc))
    if a.output:
        try:
            save_lengths(a.output, L)
        except OSError as exc:
            ap.error(f"argument -o/--output: cannot write {a.output}: {exc.strerror or exc}")
    else:
        print("\n".join(str(int(x)) for x in L))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
