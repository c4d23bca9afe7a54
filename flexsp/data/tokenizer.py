"""Tokenizers for the offline corpus: a HF ``tokenizers`` wrapper (load a tokenizer.json, or train a
byte-level BPE on the corpus itself) and a dependency-free byte-level fallback.

Both expose the same small interface the corpus builder needs: ``vocab_size``, ``eos_id``,
``encode_batch(texts) -> list[list[int]]``, ``decode(ids)``, ``save(path)`` and a ``fingerprint``
that changes whenever the token mapping changes (it keys the on-disk cache).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Iterable, Iterator

EOS_TOKEN = "<|endoftext|>"


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

    def __init__(self, tok, source: str = "<memory>"):
        self._tok = tok
        self.source = source
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)
        self.eos_id = tok.token_to_id(EOS_TOKEN)
        self._json = tok.to_str()

    @property
    def fingerprint(self) -> str:
        return "hf-" + hashlib.sha256(self._json.encode()).hexdigest()[:16]

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode(list(ids))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self._json)


def load_tokenizer(path: str | Path) -> HFTokenizer | ByteTokenizer:
    """Load a tokenizer.json (HF ``tokenizers``) or a file written by ``ByteTokenizer.save``."""
    from tokenizers import Tokenizer

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"tokenizer file {path} does not exist")
    text = path.read_text(encoding="utf-8", errors="replace")
    try:
        if json.loads(text).get("flexsp_byte_tokenizer"):
            return ByteTokenizer()
        return HFTokenizer(Tokenizer.from_str(text), source=str(path))
    except Exception as exc:  # json / tokenizers raise many types on bad files
        raise ValueError(f"tokenizer file {path} is not a valid tokenizer.json: {exc}") from exc


def train_bpe(texts: Iterable[str], vocab_size: int, min_frequency: int = 2) -> HFTokenizer:
    """Train a byte-level BPE (GPT-2 style pre-tokenization, all 256 bytes in the base alphabet,
    so any text round-trips) with ``<|endoftext|>`` as the only special token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < 257 + 1:
        raise ValueError(f"BPE vocab_size={vocab_size} must be > 257 (256 bytes + EOS)")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                  special_tokens=[EOS_TOKEN], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_nonempty(texts), trainer=trainer)
    return HFTokenizer(tok, source="trained-bpe")


def _nonempty(texts: Iterable[str]) -> Iterator[str]:
    for t in texts:
        if t:
            yield t
