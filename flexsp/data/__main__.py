"""Build (or open from cache) a document source ahead of training and print its length profile.

    python -m flexsp.data --stdlib --max-files 200 --vocab-size 8192 --cache-dir .cache/flexsp_data
    python -m flexsp.data --paths corpus/ more.jsonl --tokenizer tokenizer.json --max-doc-tokens 65536
    python -m flexsp.data --hf /data/saved_dataset --split train --tokenizer /models/llama3
    python -m flexsp.data --megatron /data/a_text_document /data/b_text_document --vocab-size 128256

Run it once (on one node or before launch) so training ranks only open the memory-mapped store.
Errors are one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

from flexsp.data.config import LONG_DOC_POLICIES, CorpusConfig, DataConfig
from flexsp.errors import UserError, print_error


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, not usage + error
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def main(argv: list[str] | None = None) -> None:
    ap = _Parser(prog="python -m flexsp.data", description=__doc__.splitlines()[0])
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--paths", nargs="+", help="files/directories of the corpus")
    src.add_argument("--stdlib", action="store_true", help="the CPython standard library .py files")
    src.add_argument(
        "--hf",
        nargs="+",
        metavar="PATH",
        help="save_to_disk directory or .parquet/.jsonl/.json/.arrow files or directories",
    )
    src.add_argument("--megatron", nargs="+", metavar="PREFIX", help="Megatron-LM <prefix>.bin/.idx datasets")
    ap.add_argument("--max-files", type=int, default=200, help="--stdlib: subset size (0 = all)")
    ap.add_argument("--seed", type=int, default=0, help="--stdlib: subset seed")
    ap.add_argument("--split", default=DataConfig.hf_split, help="--hf: split of a saved DatasetDict")
    ap.add_argument(
        "--text-column", default=DataConfig.text_column, help="--hf: text column ('' = use --ids-column)"
    )
    ap.add_argument("--ids-column", default=DataConfig.ids_column, help="--hf: pre-tokenized column")
    ap.add_argument("--batch-rows", type=int, default=DataConfig.hf_batch_rows, help="--hf: rows per batch")
    ap.add_argument("--cache-dir", default=CorpusConfig.cache_dir)
    ap.add_argument(
        "--tokenizer",
        default="bpe",
        help="bpe | byte | path to tokenizer.json | Hugging Face model directory",
    )
    ap.add_argument(
        "--vocab-size",
        type=int,
        default=None,
        help=f"BPE target size (default {CorpusConfig.vocab_size}); for --megatron and a "
        f"pre-tokenized --hf column: the vocabulary of the token ids",
    )
    ap.add_argument("--max-doc-tokens", type=int, default=CorpusConfig.max_doc_tokens)
    ap.add_argument("--min-doc-tokens", type=int, default=CorpusConfig.min_doc_tokens)
    ap.add_argument("--long-doc-policy", choices=LONG_DOC_POLICIES, default="split")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    try:
        from flexsp.data import build_source

        corpus_cfg = CorpusConfig(
            paths=args.paths or [],
            cache_dir=args.cache_dir,
            tokenizer=args.tokenizer,
            vocab_size=args.vocab_size or CorpusConfig.vocab_size,
            max_doc_tokens=args.max_doc_tokens,
            min_doc_tokens=args.min_doc_tokens,
            long_doc_policy=args.long_doc_policy,
        )
        source = "corpus" if args.paths else "stdlib" if args.stdlib else "hf" if args.hf else "megatron"
        cfg = DataConfig(
            source=source,
            corpus=corpus_cfg,
            hf_path=args.hf or [],
            hf_split=args.split,
            text_column=args.text_column or None,
            ids_column=args.ids_column,
            hf_batch_rows=args.batch_rows,
            megatron_prefix=args.megatron or [],
            vocab_size=args.vocab_size if source in ("hf", "megatron") and args.vocab_size else 0,
            stdlib_max_files=args.max_files,
            seed=args.seed,
        )
        corpus = build_source(cfg)
    except (UserError, OSError) as exc:
        ap.exit(print_error(ap.prog, exc))
    lengths = corpus.lengths
    p50, p90, p99 = np.percentile(lengths, [50, 90, 99])
    print(
        f"{corpus.directory}: {corpus.num_docs} documents, {corpus.num_tokens} tokens, vocab "
        f"{corpus.vocab_size}, lengths p50 {p50:.0f} p90 {p90:.0f} p99 {p99:.0f} max {lengths.max()}; "
        f"{corpus.meta['stats']}; {time.perf_counter() - t0:.1f} s"
    )
    sys.stdout.flush()


if __name__ == "__main__":
    main()
