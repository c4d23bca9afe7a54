"""Tokenizers for the offline corpus: a HF ``tokenizers`` wrapper (load a tokenizer.json or a Hugging
Face model directory, or train a byte-level BPE on the corpus itself) and a dependency-free
byte-level fallback.

Both expose the same small interface the corpus builder needs: ``vocab_size``, ``eos_id``,
``encode_batch(texts) -> list[list[int]]``, ``decode(ids)``, ``save(path)`` and a ``fingerprint``
that changes whenever the token mapping changes (it keys the on-disk cache).

A tokenizer loaded from a file or a model directory must encode a short probe text to at least one
id (:func:`check_encodes`): a model directory without tokenizer files makes ``transformers`` return
a tokenizer with a vocabulary of 1 that encodes everything to nothing, which would otherwise
surface later as "no documents left after tokenization". :func:`check_vocabulary` refuses a
tokenizer whose vocabulary is far smaller than the model's embedding (under half of its rows:
real checkpoints pad the embedding by well under that).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Iterable, Iterator

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from flexsp.errors import UserError

EOS_TOKEN = "<|endoftext|>"
# EOS spellings of common model families, tried in order when a tokenizer names none itself.
EOS_CANDIDATES = (EOS_TOKEN, "<|end_of_text|>", "</s>", "<|im_end|>", "<eos>", "<|eot_id|>")


PROBE_TEXT = "Hello, world! def f(x): return x + 1"
"""Text every usable tokenizer encodes to at least one id."""
MIN_VOCAB_FRACTION = 0.5
"""A tokenizer's vocabulary below this fraction of the model's embedding rows is refused."""
# files a Hugging Face tokenizer is built from: the fast file, or a slow tokenizer's vocabulary
_TOKENIZER_SOURCES = (
    "tokenizer.json",
    "vocab.json + merges.txt",
    "tokenizer.model",
    "vocab.txt",
    "*.tiktoken",
)


class ByteTokenizer:
    """UTF-8 bytes as tokens 0..255, plus EOS = 256 (vocab 257). Needs no training or files."""

    kind = "byte"
    vocab_size = 257
    eos_id = 256

    @property
    def fingerprint(self) -> str:
        return "byte-v1"

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [list(t.encode("utf-8", errors="replace")) for t in texts]

    def decode(self, ids: Iterable[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps({"flexsp_byte_tokenizer": 1}))


class HFTokenizer:
    """A ``tokenizers.Tokenizer`` (byte-level BPE or any tokenizer.json)."""

    kind = "hf"

    def __init__(self, tok, source: str = "<memory>", eos_token: str | None = None):
        self._tok = tok
        self.source = source
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)
        if eos_token is not None:
            self.eos_id = tok.token_to_id(eos_token)
            if self.eos_id is None:
                raise UserError(f"tokenizer {source}: EOS token {eos_token!r} is not in its vocabulary")
        else:  # the first known EOS spelling the vocabulary has
            eos_token = next((t for t in EOS_CANDIDATES if tok.token_to_id(t) is not None), None)
            self.eos_id = tok.token_to_id(eos_token) if eos_token else None
        self.eos_token = eos_token
        self._json = tok.to_str()

    @property
    def fingerprint(self) -> str:
        return "hf-" + hashlib.sha256(f"{self._json}|{self.eos_token}".encode()).hexdigest()[:16]

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode(list(ids))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self._json)


def load_tokenizer(path: str | Path, eos_token: str | None = None) -> HFTokenizer | ByteTokenizer:
    """Load a tokenizer.json (HF ``tokenizers``), a file written by ``ByteTokenizer.save``, or a
    Hugging Face model directory (see :func:`load_hf_model_tokenizer`). ``eos_token`` overrides the
    EOS spelling (default: the directory's tokenizer_config.json, else the first of EOS_CANDIDATES
    in the vocabulary)."""

    path = Path(path)
    if path.is_dir():
        return load_hf_model_tokenizer(path, eos_token)
    if not path.is_file():
        raise UserError(
            f"tokenizer {path} does not exist (valid: 'bpe', 'byte', a tokenizer.json "
            f"file or a Hugging Face model directory holding tokenizer.json)"
        )
    text = path.read_text(encoding="utf-8", errors="replace")
    try:
        if json.loads(text).get("flexsp_byte_tokenizer"):
            return ByteTokenizer()
        tok = Tokenizer.from_str(text)
    except Exception as exc:  # json / tokenizers raise many types on bad files
        raise UserError(f"tokenizer file {path} is not a valid tokenizer.json: {exc}") from exc
    if eos_token is None and path.name == "tokenizer.json":  # inside a model directory: its EOS
        eos_token = _config_eos(path.parent)
    return check_encodes(HFTokenizer(tok, source=str(path), eos_token=eos_token), path)


def _config_eos(directory: Path) -> str | None:
    """The EOS token a model directory declares (tokenizer_config.json, then special_tokens_map.json)."""
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        f = directory / name
        if not f.is_file():
            continue
        try:
            conf = json.loads(f.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise UserError(f"{f}: not valid JSON ({exc.msg} at line {exc.lineno})") from exc
        eos = conf.get("eos_token") if isinstance(conf, dict) else None
        if isinstance(eos, dict):  # {"content": "</s>", "lstrip": false, ...}
            eos = eos.get("content")
        if isinstance(eos, str) and eos:
            return eos
    return None


def load_hf_model_tokenizer(directory: str | Path, eos_token: str | None = None) -> HFTokenizer:
    """The tokenizer of a Hugging Face model directory (what ``save_pretrained`` writes): its
    tokenizer.json through ``tokenizers``; a directory without one (a slow tokenizer's vocab files)
    through ``transformers.AutoTokenizer(local_files_only=True)``, which converts it to a fast one.
    EOS comes from tokenizer_config.json / special_tokens_map.json ("<|end_of_text|>", "</s>",
    "<|endoftext|>", "<|im_end|>", ...), else the first of EOS_CANDIDATES the vocabulary has."""

    directory = Path(directory)
    eos = eos_token or _config_eos(directory)
    tj = directory / "tokenizer.json"
    if tj.is_file():
        try:
            tok = Tokenizer.from_file(str(tj))
        except Exception as exc:
            raise UserError(f"{tj} is not a valid tokenizer.json: {exc}") from exc
        return check_encodes(HFTokenizer(tok, source=str(directory), eos_token=eos), directory)
    try:
        from transformers import AutoTokenizer

        hf = AutoTokenizer.from_pretrained(str(directory), local_files_only=True, use_fast=True)
        tok = hf.backend_tokenizer
    except Exception as exc:  # transformers raises OSError/ValueError/KeyError/... on odd dirs
        raise UserError(
            f"tokenizer directory {directory} has no tokenizer.json and transformers "
            f"could not load a fast tokenizer from it ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}); expected a "
            f"save_pretrained directory with tokenizer.json and tokenizer_config.json"
        ) from exc
    eos = eos or getattr(hf, "eos_token", None)
    return check_encodes(HFTokenizer(tok, source=str(directory), eos_token=eos), directory)


def _missing_sources(directory: Path) -> str:
    """What a model directory lacks to define a tokenizer, and what tokenizer files it has."""
    have = [f.name for f in tokenizer_files(directory)]
    found = {
        "tokenizer.json": (directory / "tokenizer.json").is_file(),
        "vocab.json + merges.txt": all((directory / n).is_file() for n in ("vocab.json", "merges.txt")),
        "tokenizer.model": (directory / "tokenizer.model").is_file(),
        "vocab.txt": (directory / "vocab.txt").is_file(),
        "*.tiktoken": any(directory.glob("*.tiktoken")),
    }
    missing = [name for name in _TOKENIZER_SOURCES if not found[name]]
    return f"it lacks {', '.join(missing)} (a tokenizer is built from one of these) and has " + (
        f"only {', '.join(have)}" if have else "no tokenizer files at all"
    )


def check_encodes(tok: HFTokenizer, path: Path) -> HFTokenizer:
    """``tok`` if it encodes :data:`PROBE_TEXT` to at least one id, else a ValueError naming ``path``
    (a model directory: the tokenizer files it lacks)."""
    if tok.encode_batch([PROBE_TEXT])[0]:
        return tok
    empty = f"it encodes {PROBE_TEXT!r} to no token ids (a vocabulary of {tok.vocab_size})"
    if path.is_dir():
        raise UserError(
            f"model directory {path} has no usable tokenizer: {empty}; "
            f"{_missing_sources(path)}. Copy the model's tokenizer files (tokenizer.json, "
            f"tokenizer_config.json) into it, or set data.corpus.tokenizer=<a directory or "
            f"tokenizer.json that has them>"
        )
    raise UserError(
        f"tokenizer file {path} is not a usable tokenizer: {empty}; use the model's "
        f"tokenizer.json (data.corpus.tokenizer)"
    )


def check_vocabulary(tokenizer_vocab: int, model_vocab: int, tokenizer: str, model: str) -> None:
    """ValueError if the tokenizer's vocabulary is far smaller than the model's embedding needs
    (below :data:`MIN_VOCAB_FRACTION` of its rows): it is not the model's tokenizer."""
    if tokenizer_vocab < MIN_VOCAB_FRACTION * model_vocab:
        raise UserError(
            f"tokenizer {tokenizer} has a vocabulary of {tokenizer_vocab} but the model {model} "
            f"has {model_vocab} embedding rows: it is not this model's tokenizer (a model's "
            f"tokenizer covers at least {MIN_VOCAB_FRACTION:.0%} of them); set "
            f"data.corpus.tokenizer to the model's tokenizer (a directory with tokenizer.json, "
            f"or the file)"
        )


TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "tokenizer.model",
    "spiece.model",
)


def tokenizer_files(path: str | Path) -> list[Path]:
    """Files whose contents define the tokenizer at ``path`` (they key the corpus cache): the file
    itself, or a model directory's tokenizer files (not its weights or training state)."""
    path = Path(path)
    if path.is_dir():
        return sorted(
            f
            for f in path.iterdir()
            if f.is_file() and (f.name in TOKENIZER_FILES or f.suffix == ".tiktoken")
        )
    files = [path]
    if path.name == "tokenizer.json":  # its EOS may come from the sibling config
        files += [
            path.parent / n
            for n in ("tokenizer_config.json", "special_tokens_map.json")
            if (path.parent / n).is_file()
        ]
    return files


def train_bpe(texts: Iterable[str], vocab_size: int, min_frequency: int = 2) -> HFTokenizer:
    """Train a byte-level BPE (GPT-2 style pre-tokenization, all 256 bytes in the base alphabet,
    so any text round-trips) with ``<|endoftext|>`` as the only special token."""

    if vocab_size < 257 + 1:
        raise UserError(f"BPE vocab_size={vocab_size} must be > 257 (256 bytes + EOS)")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[EOS_TOKEN],
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(_nonempty(texts), trainer=trainer)
    return HFTokenizer(tok, source="trained-bpe")


def _nonempty(texts: Iterable[str]) -> Iterator[str]:
    for t in texts:
        if t:
            yield t
