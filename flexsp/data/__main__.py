"""Build (or open from cache) a tokenized corpus ahead of training and print its length profile.

    python -m flexsp.data --stdlib --max-files 200 --vocab-size 8192 --cache-dir .cache/flexsp_data
    python -m flexsp.data --paths corpus/ more.jsonl --tokenizer tokenizer.json --max-doc-tokens 65536

Run it once (on one node or before launch) so training ranks only open the memory-mapped store.
"""
from __future__ import annotations

import argparse
import time

import numpy as np

from flexsp.data.config import LONG_DOC_POLICIES, CorpusConfig
from flexsp.data.corpus import build_corpus
from flexsp.data.stdlib import build_stdlib_corpus


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m flexsp.data", description=__doc__.splitlines()[0])
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--paths", nargs="+", help="files/directories of the corpus")
    src.add_argument("--stdlib", action="store_true", help="the CPython standard library .py files")
    ap.add_argument("--max-files", type=int, default=200, help="--stdlib: subset size (0 = all)")
    ap.add_argument("--seed", type=int, default=0, help="--stdlib: subset seed")
    ap.add_argument("--cache-dir", default=CorpusConfig.cache_dir)
    ap.add_argument("--tokenizer", default="bpe", help="bpe | byte | path to tokenizer.json")
    ap.add_argument("--vocab-size", type=int, default=CorpusConfig.vocab_size)
    ap.add_argument("--max-doc-tokens", type=int, default=CorpusConfig.max_doc_tokens)
    ap.add_argument("--long-doc-policy", choices=LONG_DOC_POLICIES, default="split")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    try:
        cfg = CorpusConfig(paths=args.paths or [], cache_dir=args.cache_dir, tokenizer=args.tokenizer,
                           vocab_size=args.vocab_size, max_doc_tokens=args.max_doc_tokens,
                           long_doc_policy=args.long_doc_policy)
        corpus = build_stdlib_corpus(cfg, args.max_files, args.seed) if args.stdlib else build_corpus(cfg)
    except ValueError as exc:
        ap.exit(2, f"error: {exc}\n")
    lengths = corpus.lengths
    p50, p90, p99 = np.percentile(lengths, [50, 90, 99])
    print(f"{corpus.directory}: {corpus.num_docs} documents, {corpus.num_tokens} tokens, vocab "
          f"{corpus.vocab_size}, lengths p50 {p50:.0f} p90 {p90:.0f} p99 {p99:.0f} max {lengths.max()}; "
          f"{corpus.meta['stats']}; {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
