"""Tokenizers that turn text into token ids for ``TextDataModule``.

Every tokenizer knows its vocabulary size at construction, because LightningCLI links the DataModule's
``vocab_size`` into the model before any text is read. ``fingerprint()`` names everything that decides
the text -> ids mapping, so a cached tokenisation is reused only by an identical tokenizer.
"""

from __future__ import annotations

import hashlib
import json
import string
from abc import ABC, abstractmethod
from typing import Sequence

import numpy as np
from torch import Tensor

from lightning_ddd.extras import require

# Shown in decoded text where an id has no character (unknown chars, ids outside the vocabulary such
# as a leftover mask token); the same mark UTF-8 decoding uses for broken bytes.
REPLACEMENT_CHAR = "\ufffd"


def _as_int_list(ids: Sequence[int] | Tensor) -> list[int]:
    return ids.flatten().tolist() if isinstance(ids, Tensor) else [int(i) for i in ids]


class Tokenizer(ABC):
    """Base class: maps text to ids in ``[0, vocab_size)`` and back. ``eos_id`` separates documents."""

    @property
    @abstractmethod
    def vocab_size(self) -> int:
        """Number of ids, EOS (and any unknown id) included."""

    @property
    @abstractmethod
    def eos_id(self) -> int:
        """Id put between documents when they are packed into one stream."""

    @abstractmethod
    def encode(self, text: str) -> list[int]:
        """Ids of ``text``, without EOS."""

    @abstractmethod
    def decode(self, ids: Sequence[int] | Tensor) -> str:
        """Text of ``ids``; EOS is dropped and ids without a character show as U+FFFD."""

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Ids of several texts; subclasses with a faster batched path override this."""
        return [self.encode(text) for text in texts]

    def encode_arrays(self, texts: Sequence[str]) -> list[np.ndarray]:
        """Ids of several texts as 1-D integer arrays (what the token store writes); by default
        ``encode_batch`` converted, so a subclass that overrides ``encode`` or ``encode_batch`` is used."""
        return [np.asarray(ids, dtype=np.int64) for ids in self.encode_batch(texts)]

    @property
    def name(self) -> str:
        """Short human-readable name, used in log lines and cache file names."""
        return type(self).__name__

    def fingerprint(self) -> str:
        """String that changes whenever the text -> ids mapping would change (a cache key part)."""
        return self.name


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes: ids 0..255 are the bytes, 256 is EOS (vocabulary of 257).

    Needs no training and no download, and can spell any text.
    """

    @property
    def vocab_size(self) -> int:
        return 257

    @property
    def eos_id(self) -> int:
        return 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_arrays(self, texts: Sequence[str]) -> list[np.ndarray]:
        cls = type(self)
        if cls.encode is not ByteTokenizer.encode or cls.encode_batch is not Tokenizer.encode_batch:
            return super().encode_arrays(texts)  # a subclass's own encoding decides
        # The bytes are the ids: no Python int per byte (about 15x faster than via list(bytes)).
        return [np.frombuffer(text.encode("utf-8"), dtype=np.uint8) for text in texts]

    def decode(self, ids: Sequence[int] | Tensor) -> str:
        out = bytearray()
        replacement = REPLACEMENT_CHAR.encode("utf-8")
        for i in _as_int_list(ids):
            if 0 <= i < 256:
                out.append(i)
            elif i != self.eos_id:
                out += replacement
        # A model may emit byte runs that are not valid UTF-8; show them rather than fail.
        return out.decode("utf-8", errors="replace")

    def fingerprint(self) -> str:
        return "ByteTokenizer(utf-8, eos=256)"


class CharTokenizer(Tokenizer):
    """A fixed character set: one id per character, then an unknown-character id, then EOS.

    Args:
        alphabet: the characters, each once; id i is ``alphabet[i]``. Default: printable ASCII
            (``string.printable``, 100 characters, whitespace included), giving a vocabulary of 102.
            Characters outside the alphabet encode to the unknown id.
    """

    def __init__(self, alphabet: str | None = None) -> None:
        alphabet = string.printable if alphabet is None else alphabet
        if not alphabet:
            raise ValueError("CharTokenizer: alphabet is empty; give some characters or leave it unset.")
        repeated = sorted({c for c in alphabet if alphabet.count(c) > 1})
        if repeated:
            raise ValueError(f"CharTokenizer: alphabet repeats {repeated!r}; list each character once.")
        self.alphabet = alphabet
        self._ids = {c: i for i, c in enumerate(alphabet)}
        self.unk_id = len(alphabet)

    @property
    def vocab_size(self) -> int:
        return len(self.alphabet) + 2

    @property
    def eos_id(self) -> int:
        return len(self.alphabet) + 1

    def encode(self, text: str) -> list[int]:
        get, unk = self._ids.get, self.unk_id
        return [get(c, unk) for c in text]

    def decode(self, ids: Sequence[int] | Tensor) -> str:
        n, eos = len(self.alphabet), self.eos_id
        chars = (self.alphabet[i] if 0 <= i < n else REPLACEMENT_CHAR for i in _as_int_list(ids) if i != eos)
        return "".join(chars)

    def fingerprint(self) -> str:
        digest = hashlib.sha256(self.alphabet.encode("utf-8")).hexdigest()[:16]
        return f"CharTokenizer(alphabet={digest})"


class HFTokenizer(Tokenizer):
    """A Hugging Face tokenizer (``transformers.AutoTokenizer``), e.g. GPT-2's BPE.

    The tokenizer is loaded at construction, because its vocabulary size must be known then. A local
    directory (one written by ``save_pretrained``) works offline; a hub name is downloaded once into the
    Hugging Face cache. Needs the optional ``transformers`` package (``pip install transformers``, or the
    project's ``text`` extra).

    Args:
        name_or_path: hub name (e.g. ``gpt2``) or local directory of the tokenizer.
    """

    def __init__(self, name_or_path: str = "gpt2") -> None:
        require("transformers", feature=f"HFTokenizer('{name_or_path}')")
        from transformers import AutoTokenizer

        self.name_or_path = name_or_path
        self._tok = AutoTokenizer.from_pretrained(name_or_path)
        # Tokenizers without an EOS (BERT-like) still have a separator that can play its part.
        eos = self._tok.eos_token_id if self._tok.eos_token_id is not None else self._tok.sep_token_id
        if eos is None:
            raise ValueError(f"HFTokenizer: '{name_or_path}' has no EOS and no SEP token; use another one.")
        self._eos_id = int(eos)
        self._fingerprint: str | None = None

    @property
    def vocab_size(self) -> int:
        # len() counts added tokens too, which ``tokenizer.vocab_size`` leaves out.
        return len(self._tok)

    @property
    def eos_id(self) -> int:
        return self._eos_id

    @property
    def name(self) -> str:
        return f"HFTokenizer({self.name_or_path})"

    def encode(self, text: str) -> list[int]:
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        # verbose=False: whole documents are longer than the model's context, which is fine here.
        return self._tok(list(texts), add_special_tokens=False, verbose=False)["input_ids"]

    def decode(self, ids: Sequence[int] | Tensor) -> str:
        ids = _as_int_list(ids)
        n = self.vocab_size
        pieces, run = [], []
        for i in ids:
            if 0 <= i < n:
                run.append(i)
            else:  # e.g. a mask id the tokenizer has never heard of
                pieces.append(self._tok.decode(run, skip_special_tokens=True))
                pieces.append(REPLACEMENT_CHAR)
                run = []
        pieces.append(self._tok.decode(run, skip_special_tokens=True))
        return "".join(pieces)

    def fingerprint(self) -> str:
        if self._fingerprint is None:
            # The vocabulary itself, not just the name: a local path can be overwritten with another one.
            vocab = json.dumps(sorted(self._tok.get_vocab().items()), ensure_ascii=False)
            digest = hashlib.sha256(vocab.encode("utf-8")).hexdigest()[:16]
            self._fingerprint = f"HFTokenizer({type(self._tok).__name__}, vocab={digest}, eos={self._eos_id})"
        return self._fingerprint
