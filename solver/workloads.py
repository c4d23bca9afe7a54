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
- ``stdlib-8k``: REAL lengths: the same files as the demo's corpus (``data=stdlib``) cut as its
  ``data.corpus.max_doc_tokens=8192`` cuts them (``long_doc_policy=split``: consecutive chunks of
  8,192 tokens, a last chunk under 2 tokens dropped), token counts estimated as for ``cpython``.
- ``prolong-64k`` / ``prolong-512k``: ProLong's continued-training mixes (Gao, Wettig, Yen, Chen,
  "How to Train Long-Context Language Models (Effectively)", arXiv 2410.02660, 2024; the domain
  token shares of ``train_64K.sh`` / ``train_512K.sh`` in github.com/princeton-nlp/ProLong). Long
  domains (code repositories concatenated by repo, books) are documents of at least the stage's
  length cut into sequences of exactly 64K (65,536) or 512K (524,288) tokens: 64K stage 30% code +
  30% books at 64K; 512K stage 15% code + 5% books at 512K, 15% code + 25% books at 64K. The
  remaining 40% of tokens are short documents (FineWeb-Edu 10%, FineWeb 10%, StackExchange 4%,
  Wikipedia 4%, Tulu-v2 3%, ArXiv 3%, OpenWebMath 3%, textbooks 3%), each its own sequence (ProLong
  masks attention across documents); their lengths follow Dataset Decomposition's Wikipedia shares
  (Wikipedia) and DCLM-Baseline shares (the rest: our assumption, no per-domain histogram is
  published for them).

The histogram samplers pick an octave-like bin by its sample share and draw log-uniformly inside
it; published token shares are turned into sample shares by dividing by the bin's mean length.
Sampling is deterministic per (name, seed). Lengths are >= 1, optionally padded up to a multiple of
``pad_to`` (the paper pads to 2N = 128). Sequences longer than ``context_limit`` (after padding)
are dropped and redrawn, as the paper drops them from the dataset (``overflow="drop"``), or cut to
the limit (``overflow="clip"``).
"""

from __future__ import annotations

import functools
import os
import sys
import sysconfig
import zlib
from pathlib import Path

import numpy as np
from scipy.optimize import brentq

from .errors import UserError
from .inputs import OneLineParser, int_at_least

K = 1024
OCTAVES = [64 * 2**i for i in range(16)]  # 64 .. 2M

# Dataset Decomposition token share per chunk (256 .. 8K): chunk 2^i holds lengths (2^(i-1), 2^i],
# the first one everything from 64 up.
DD_EDGES = [64, 256, 512, 1 * K, 2 * K, 4 * K, 8 * K]
DD_SHARES = {"wikipedia": [15.3, 21.5, 23.0, 19.1, 13.1, 8.0], "dclm": [10.8, 18.2, 22.5, 19.2, 15.7, 13.7]}


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
    return [(lo, hi, c * (1 - tail_frac)) for lo, hi, c in body] + [
        (lo, hi, float(c)) for lo, hi, c in zip(edges, edges[1:], w)
    ]


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
    big = 0.443 * mu - 0.0005 * M(*top)  # tokens/sample in 128K..1.8M
    m1, m2 = M(128 * K, 256 * K), M(256 * K, top[0])
    p2 = (big - 0.0095 * m1) / (m2 - m1)
    p1 = 0.0095 - p2
    mid = mu - 0.80 * M(64, 4 * K) - 0.443 * mu  # tokens/sample in 4K..128K
    n1, n2 = M(4 * K, 32 * K), M(32 * K, 128 * K)
    q2 = (mid - 0.19 * n1) / (n2 - n1)
    q1 = 0.19 - q2
    return [
        (64, 4 * K, 0.80),
        (4 * K, 32 * K, q1),
        (32 * K, 128 * K, q2),
        (128 * K, 256 * K, p1),
        (256 * K, top[0], p2),
        (top[0], top[1], 0.0005),
    ]


def _olmo_bins():
    tokens_b = [144, 118, 139, 96, 61, 35, 21.5, 26.9]  # B tokens, 8-16K .. 1M+ (1M+ as 1-2M)
    return _from_token_shares([8 * K * 2**i for i in range(9)], tokens_b)


HISTOGRAMS = {
    "wikipedia": lambda: _with_tail(
        _from_token_shares(DD_EDGES, DD_SHARES["wikipedia"]), 0.035, 0.4, 512 * K
    ),
    "commoncrawl": lambda: _with_tail(_from_token_shares(DD_EDGES, DD_SHARES["dclm"]), 0.05, 0.5, 1024 * K),
    "github": _github_bins,
    "bytescale": _bytescale_bins,
    "olmo-long": _olmo_bins,
}
HISTOGRAMS["dclm"] = HISTOGRAMS["commoncrawl"]

# ProLong stages: (token share, length) of the long sequences, then the short domains' token shares.
PROLONG_LONG = {
    "prolong-64k": [(0.30 + 0.30, 64 * K)],
    "prolong-512k": [(0.15 + 0.05, 512 * K), (0.15 + 0.25, 64 * K)],
}
PROLONG_SHORT = {"wikipedia": 0.04, "dclm": 0.10 + 0.10 + 0.04 + 0.03 + 0.03 + 0.03 + 0.03}
"""Short domains' token shares by the Dataset Decomposition histogram that stands in for them
(wikipedia: dolmawiki; dclm: fineweb-edu, fineweb, stackexchange, tulu-v2, arxiv, openwebmath,
textbooks)."""


def _bins_mean(bins) -> float:
    p = np.array([b[2] for b in bins])
    return float((p / p.sum() * np.array([_mean_loguniform(lo, hi) for lo, hi, _ in bins])).sum())


def _prolong_components(name: str):
    """[(sample share, fixed length or bins)]: token shares divided by mean lengths."""
    parts = [(share / length, length) for share, length in PROLONG_LONG[name]]
    for hist, share in PROLONG_SHORT.items():
        bins = _from_token_shares(DD_EDGES, DD_SHARES[hist])
        parts.append((share / _bins_mean(bins), bins))
    total = sum(p for p, _ in parts)
    return [(p / total, what) for p, what in parts]


def _draw_bins(bins, size: int, rng: np.random.Generator) -> np.ndarray:
    """``size`` lengths: a bin by its sample share, then log-uniform inside it."""
    lo = np.array([b[0] for b in bins], dtype=np.float64)
    hi = np.array([b[1] for b in bins], dtype=np.float64)
    p = np.array([b[2] for b in bins])
    p /= p.sum()
    k = rng.choice(len(bins), size=size, p=p)
    u = rng.random(size)
    return np.ceil(np.exp(np.log(lo[k]) + u * np.log(hi[k] / lo[k]))).astype(np.int64)


# Llama 3 SFT: (share of examples %, mean tokens, log-normal sigma)
LLAMA3_SFT = [
    (52.66, 974, 0.8),
    (14.89, 753, 0.8),
    (3.01, 521, 0.8),
    (8.14, 298, 0.8),
    (21.19, 662, 0.8),
    (0.11, 38136, 0.3),
]

CPYTHON_P50_TOKENS = 3100
"""Median GPT-2 tokens of a CPython stdlib .py file (length-distributions.md)."""

NAMES = sorted([*HISTOGRAMS, *PROLONG_LONG, "llama3-sft", "cpython", "stdlib-8k"])
DEMO_MAX_DOC_TOKENS = 8192
"""``scripts/demo.sh``'s ``data.corpus.max_doc_tokens``."""


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
        raise UserError(f"found only {sizes.size} .py files under {root}; is the stdlib installed?")
    ratio = np.median(sizes) / CPYTHON_P50_TOKENS
    return np.maximum(1, np.round(sizes / ratio)).astype(np.int64)


@functools.lru_cache(maxsize=1)
def stdlib_chunk_lengths(max_doc_tokens: int = DEMO_MAX_DOC_TOKENS) -> np.ndarray:
    """``cpython_lengths`` split as the data pipeline splits long documents: each file becomes
    ``L // max`` chunks of ``max`` tokens plus its remainder (kept if >= 2 tokens)."""
    out = []
    for length in cpython_lengths().tolist():
        full, rest = divmod(length, max_doc_tokens)
        out += [max_doc_tokens] * full + ([rest] if rest >= 2 else [])
    return np.array(out, dtype=np.int64)


def _draw(name: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """``size`` raw lengths (no limit, no padding)."""
    if name in HISTOGRAMS:
        return _draw_bins(HISTOGRAMS[name](), size, rng)
    if name in PROLONG_LONG:
        parts = _prolong_components(name)
        k = rng.choice(len(parts), size=size, p=[p for p, _ in parts])
        out = np.empty(size, dtype=np.int64)
        for j, (_, what) in enumerate(parts):
            sel = np.flatnonzero(k == j)
            out[sel] = what if isinstance(what, int) else _draw_bins(what, sel.size, rng)
        return out
    if name == "llama3-sft":
        share = np.array([c[0] for c in LLAMA3_SFT])
        share /= share.sum()
        k = rng.choice(len(LLAMA3_SFT), size=size, p=share)
        mean = np.array([c[1] for c in LLAMA3_SFT], dtype=np.float64)[k]
        sigma = np.array([c[2] for c in LLAMA3_SFT])[k]
        return np.maximum(1, np.round(rng.lognormal(np.log(mean) - sigma**2 / 2, sigma))).astype(np.int64)
    if name in ("cpython", "stdlib-8k"):
        pool = cpython_lengths() if name == "cpython" else stdlib_chunk_lengths()
        return pool[rng.integers(0, pool.size, size=size)]
    raise UserError(f"unknown workload {name!r}; valid: {', '.join(NAMES)}")


def sample_lengths(
    name: str,
    n: int,
    seed: int = 0,
    context_limit: int | None = None,
    *,
    pad_to: int = 1,
    overflow: str = "drop",
) -> np.ndarray:
    """n sequence lengths of workload ``name`` (deterministic per name and seed).

    pad_to: round every length up to a multiple of it (the paper: 2N = 128).
    overflow: what happens to lengths above ``context_limit`` after padding: "drop" (redraw, as
    the paper drops them from the dataset) or "clip" (cut to the largest multiple of pad_to
    within the limit).
    """
    if n < 0 or pad_to < 1:
        raise UserError(f"need n >= 0 and pad_to >= 1, got n={n}, pad_to={pad_to}")
    if overflow not in ("drop", "clip"):
        raise UserError(f"overflow must be 'drop' or 'clip', got {overflow!r}")
    if context_limit is not None and context_limit < pad_to:
        raise UserError(f"context_limit {context_limit} is below pad_to {pad_to}")
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
            raise UserError(f"workload {name!r} has almost no lengths within context_limit={context_limit}")
    return np.concatenate(out)[:n].astype(np.int64) if n else np.zeros(0, dtype=np.int64)


def save_lengths(path: str | Path, lengths) -> None:
    """Write lengths one integer per line (the format check_plan.py reads)."""
    Path(path).write_text("".join(f"{int(L)}\n" for L in lengths))


def load_lengths(path: str | Path) -> np.ndarray:
    return np.array([int(x) for x in Path(path).read_text().split()], dtype=np.int64)


def describe(name: str, lengths: np.ndarray, seed: int) -> str:
    """One line about a drawn batch: how many, from what, and its spread."""
    L = np.asarray(lengths)
    return (
        f"{L.size} lengths of {name} (seed {seed}): min {int(L.min())}, median {int(np.median(L))}, "
        f"p99 {int(np.percentile(L, 99))}, max {int(L.max())}, {int(L.sum()):,} tokens"
    )


def main(argv=None) -> int:
    ap = OneLineParser(
        prog="python -m solver.workloads",
        description="Sample a global batch of sequence lengths (one integer per line).",
    )
    ap.add_argument("name", choices=NAMES, help="length distribution: " + ", ".join(NAMES))
    ap.add_argument("n", type=int_at_least(1), help="number of sequences to draw (>= 1)")
    ap.add_argument("--seed", type=int, default=0, help="random seed (default 0); same seed, same lengths")
    ap.add_argument(
        "--context-limit",
        type=int_at_least(1),
        default=None,
        help="longest allowed length in tokens (after padding); longer draws are dropped "
        "or clipped (--overflow); default: no limit",
    )
    ap.add_argument(
        "--pad-to",
        type=int_at_least(1),
        default=1,
        help="round every length up to a multiple of this (the paper: 128); default 1",
    )
    ap.add_argument(
        "--overflow",
        choices=("drop", "clip"),
        default="drop",
        help="lengths above --context-limit: drop and redraw (default) or clip to the limit",
    )
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
        print(f"wrote {describe(a.name, L, a.seed)} to {a.output}")
    else:
        print("\n".join(str(int(x)) for x in L))
        # the lengths own stdout (pipes): the summary goes to stderr
        print(f"drew {describe(a.name, L, a.seed)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
