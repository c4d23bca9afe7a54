"""A real corpus present on every machine: the CPython standard library's ``.py`` files.

Used by demos and tests that need real, long-tailed documents without downloads (about 1.8K files;
in GPT-2 tokens p50 ~3.1K, p90 ~22K, max ~414K). ``site-packages`` is excluded so the corpus is the
same wherever the same Python version runs.
"""

from __future__ import annotations

import os
import sysconfig
from dataclasses import replace
from pathlib import Path

import numpy as np

from flexsp.data.config import CorpusConfig
from flexsp.data.corpus import build_corpus
from flexsp.errors import UserError


def stdlib_files(max_files: int = 0, seed: int = 0, max_file_bytes: int = 0) -> list[Path]:
    """The stdlib ``.py`` files in sorted order; ``max_files`` > 0 takes a seeded random subset
    (kept in sorted order), ``max_file_bytes`` > 0 skips larger files (for quick demos)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    if not root.is_dir():
        raise UserError(f"CPython stdlib directory {root} not found")
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in ("site-packages", "__pycache__")]
        for name in filenames:
            f = Path(dirpath) / name
            if name.endswith(".py") and (max_file_bytes <= 0 or f.stat().st_size <= max_file_bytes):
                files.append(f)
    files.sort()
    if not files:
        raise UserError(f"no .py files under {root}")
    if 0 < max_files < len(files):
        keep = np.sort(np.random.default_rng(seed).choice(len(files), size=max_files, replace=False))
        files = [files[i] for i in keep]
    return files


def stdlib_corpus_config(
    base: CorpusConfig | None = None, max_files: int = 200, seed: int = 0, max_file_bytes: int = 0
) -> CorpusConfig:
    """``base`` (tokenizer, cache, policy options) with ``paths`` set to the stdlib subset."""
    files = stdlib_files(max_files, seed, max_file_bytes)
    return replace(base or CorpusConfig(), paths=[str(f) for f in files])


def build_stdlib_corpus(
    base: CorpusConfig | None = None, max_files: int = 200, seed: int = 0, max_file_bytes: int = 0
):
    """Tokenize (or load from cache) the stdlib subset; returns a TokenizedCorpus."""
    return build_corpus(stdlib_corpus_config(base, max_files, seed, max_file_bytes))
