"""Text corpora, tokenised, packed into fixed-length rows and kept in a memory-mapped token store.

Documents are tokenised, joined into one stream with EOS between them, and cut into non-overlapping
rows of ``seq_len`` tokens (the remainder is dropped). ``prepare_data`` writes the rows once into a token
store (``token_store.py``) under ``cache_dir``, in a file named by a hash of everything that decides
them; ``setup`` maps that file in every process and reads rows on demand, so memory does not grow with
the corpus.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import warnings
from itertools import islice
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
import torch
from torch import Tensor

from lightning_ddd.extras import require
from lightning_ddd.data.base import TokenDataModule
from lightning_ddd.data.encode import BATCH_DOCS, encode_documents, is_blank
from lightning_ddd.data.text_sources import (
    DecodeErrors,
    HFColumn,
    LocalDocuments,
    capped,
    first_invalid_utf8,
    invalid_utf8_error,
    pydoc_documents,
    read_text_files,
)
from lightning_ddd.data.token_store import TokenStore, TokenStoreDataset, TokenStoreError, TokenStoreWriter
from lightning_ddd.data.tokenizers import ByteTokenizer, Tokenizer

__all__ = [
    "HF_DATASETS", "TextDataModule", "pack_rows", "pydoc_documents", "read_text_files", "split_documents",
    "token_streams",
]

log = logging.getLogger(__name__)

# Short names of common Hugging Face corpora -> (hub id, default config). Other names go to the hub as is.
HF_DATASETS: dict[str, tuple[str, str | None]] = {
    "openwebtext": ("Skylion007/openwebtext", None),
    "wikitext": ("Salesforce/wikitext", "wikitext-103-raw-v1"),
    "lm1b": ("dvruette/lm1b", None),
    "text8": ("afmck/text8", None),
}

# Bump when the store layout or the packing rule changes, so old stores are not reused. Version 1 was
# a ``.pt`` file of int32 rows; such a cache is converted into a store once instead of re-tokenising.
_CACHE_VERSION = 2
_LEGACY_CACHE_VERSION = 1
# Rows per piece when an old .pt cache is copied into a store.
_CONVERT_TOKENS = 1 << 22


def split_documents(num_docs: int, val_fraction: float, seed: int) -> set[int]:
    """Indices of the documents that go to validation: a seeded random ``val_fraction`` of them, at
    least one and at most ``num_docs - 1``, so both splits get a document."""
    num_val = min(num_docs - 1, max(1, round(val_fraction * num_docs)))
    perm = torch.randperm(num_docs, generator=torch.Generator().manual_seed(seed))
    return set(perm[:num_val].tolist())


def pack_rows(stream: Tensor, seq_len: int) -> Tensor:
    """Cut a (L,) token stream into (L // seq_len, seq_len) rows, dropping the remainder."""
    num_rows = stream.numel() // seq_len
    return stream[: num_rows * seq_len].reshape(num_rows, seq_len)


def token_streams(
    docs: Iterable[str], tokenizer: Tokenizer, val_ids: set[int] | None = None
) -> tuple[Tensor, Tensor]:
    """Tokenise documents and join them into (L,) int32 streams with EOS between documents.

    The packing rule in memory, for small corpora and as the reference the store writer follows
    (``TextDataModule`` streams the same rule into its store). Document i goes to the second
    (validation) stream when ``i in val_ids``, else to the first. Blank documents are skipped, so they
    add no stray EOS.
    """
    parts: tuple[list[Tensor], list[Tensor]] = ([], [])
    eos = torch.tensor([tokenizer.eos_id], dtype=torch.int32)
    numbered = ((i, doc) for i, doc in enumerate(docs) if not is_blank(doc))
    while batch := list(islice(numbered, BATCH_DOCS)):
        for (i, _), ids in zip(batch, tokenizer.encode_batch([doc for _, doc in batch])):
            dest = parts[1 if val_ids and i in val_ids else 0]
            if dest:
                dest.append(eos)
            dest.append(torch.tensor(ids, dtype=torch.int32))
    empty = torch.zeros(0, dtype=torch.int32)
    return tuple(torch.cat(p) if p else empty for p in parts)  # type: ignore[return-value]


class _PackedWriter:
    """Streams documents' ids into a store's ``train`` and ``val`` streams with EOS between documents."""

    def __init__(self, writer: TokenStoreWriter, eos_id: int) -> None:
        self.writer = writer
        self.eos = np.array([eos_id], dtype=writer.dtype)

    def add(self, stream: str, ids: np.ndarray) -> None:
        if self.writer.sizes[stream]:
            self.writer.write(stream, self.eos)
        self.writer.write(stream, ids)


class TextDataModule(TokenDataModule):
    """A text corpus as (B, seq_len) token rows, memory-mapped from a token store.

    Documents are tokenised, packed into one stream with EOS between documents and cut into rows of
    ``seq_len`` tokens. When the source has no validation split, whole documents are held out (a seeded
    random ``val_fraction`` of them), so no validation text appears in training; a single-document corpus
    holds out the end of its token stream instead. ``prepare_data`` (one process per node under DDP)
    writes the rows once into a token store under ``cache_dir``: tokens in the smallest unsigned dtype
    that holds the vocabulary (uint16 for GPT-2), a header with a checksum, written to a temporary file
    and renamed, so an interrupted build leaves nothing behind. ``setup`` (every process) checks the
    header and size and maps the file: rows are read and widened to int64 per batch, so memory does not
    grow with the corpus. A cache of the older ``.pt`` format is converted once, without re-tokenising.

    Args:
        dataset: the corpus. ``pydoc``: CPython's own documentation topics (about 0.5 MB of English, no
            download; the default, for quick runs). ``files``: the local files in ``files``. Any other
            name is a Hugging Face dataset (needs ``pip install datasets``): ``openwebtext``,
            ``wikitext``, ``lm1b``, ``text8``, or a hub id such as ``user/corpus``; its ``validation``
            (else ``test``) split is used for validation when it has one.
        tokenizer: text -> ids; default ``ByteTokenizer`` (UTF-8 bytes, vocabulary 257).
        seq_len: tokens per row (>= 2).
        files: paths of local text files for ``dataset: files``. A ``.jsonl`` file gives one document per
            line (its ``text_field``); any other file is one document.
        hf_config: configuration name of a Hugging Face dataset (e.g. ``wikitext-2-raw-v1``); default
            ``wikitext-103-raw-v1`` for ``wikitext`` and none otherwise.
        text_field: field holding the text in ``.jsonl`` lines and Hugging Face rows.
        val_fraction: fraction of the documents held out for validation when the source has no
            validation split.
        cache_dir: directory of the token stores (one ``.tokens`` file per corpus, tokenizer and seq_len).
        max_chars: read at most this many characters (per split of the source; a local corpus is one
            split), to try out a big corpus quickly; with a Hugging Face dataset it also streams instead
            of downloading it all. None reads everything.
        batch_size: sequences per batch (per device).
        num_workers: DataLoader worker processes.
        seed: seed of the held-out documents and of the shuffling order.
        num_proc: processes that tokenise when the store is built (e.g. the number of CPU cores for a
            large corpus); 1 tokenises in the calling process. The result does not depend on it.
        decode_errors: what a byte that is not valid UTF-8 in a local file does. ``strict`` (default):
            stop with an error naming the file and the byte offset. ``replace``: read it as U+FFFD and
            log a warning naming the file and its first bad byte.
        rebuild: build the store again even if it exists (once per run; the old one stays in place
            until the new one is complete).
        verify_store: check the SHA-256 of every token byte when the store is opened (reads the whole
            file: about a second per GB). The header and the file size are always checked.
    """

    modality = "text"

    def __init__(
        self,
        dataset: str = "pydoc",
        tokenizer: Tokenizer | None = None,
        seq_len: int = 128,
        files: list[str] | None = None,
        hf_config: str | None = None,
        text_field: str = "text",
        val_fraction: float = 0.05,
        cache_dir: str = "data_cache/text",
        max_chars: int | None = None,
        batch_size: int = 64,
        num_workers: int = 0,
        seed: int = 0,
        num_proc: int = 1,
        decode_errors: DecodeErrors = "strict",
        rebuild: bool = False,
        verify_store: bool = False,
    ) -> None:
        super().__init__(batch_size=batch_size, num_workers=num_workers, seed=seed)
        name = type(self).__name__
        # Checked here, before the model is built or anything is read, so a bad config fails at once.
        if not dataset:
            raise ValueError(f"{name}: dataset is empty; use pydoc, files or a Hugging Face dataset name.")
        if seq_len < 2:
            raise ValueError(f"{name}: seq_len={seq_len} must be >= 2; set data.init_args.seq_len.")
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"{name}: val_fraction={val_fraction} must be in (0, 1); e.g. 0.05.")
        if max_chars is not None and max_chars < 1:
            raise ValueError(f"{name}: max_chars={max_chars} must be >= 1; or leave it unset to read all.")
        if num_proc < 1:
            raise ValueError(f"{name}: num_proc={num_proc} must be >= 1; e.g. the number of CPU cores.")
        if decode_errors not in ("strict", "replace"):
            raise ValueError(f"{name}: decode_errors='{decode_errors}' must be 'strict' or 'replace'.")
        if dataset == "files":
            if not files:
                raise ValueError(f"{name}: dataset='files' needs a path in files; set data.init_args.files.")
            for path in files:
                if not os.path.isfile(path):
                    raise FileNotFoundError(f"text file '{path}' not found; check data.init_args.files.")
        elif files:
            raise ValueError(f"{name}: files are only read with dataset='files' (got '{dataset}'); set it.")
        if hf_config is not None and dataset in ("pydoc", "files"):
            raise ValueError(f"{name}: hf_config is for Hugging Face datasets, not '{dataset}'; remove it.")
        self.dataset = dataset
        self.tokenizer = tokenizer if tokenizer is not None else ByteTokenizer()
        self._seq_len = seq_len
        self.files = list(files) if files else []
        self.hf_config = hf_config
        self.text_field = text_field
        self.val_fraction = val_fraction
        self.cache_dir = cache_dir
        self.max_chars = max_chars
        self.num_proc = num_proc
        self.decode_errors = decode_errors
        self.rebuild = rebuild
        self.verify_store = verify_store
        self._built = False  # set once this object has built (or converted) its store
        self.train_set: TokenStoreDataset | None = None
        self.val_set: TokenStoreDataset | None = None

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    @property
    def seq_len(self) -> int:
        return self._seq_len

    # ----- where the store lives -----------------------------------------------------------------------

    def _hf_id(self) -> tuple[str, str | None]:
        hub_id, default_config = HF_DATASETS.get(self.dataset, (self.dataset, None))
        return hub_id, self.hf_config if self.hf_config is not None else default_config

    def _source_key(self) -> dict:
        """What identifies the raw text (cheap: file stats, not file contents)."""
        if self.dataset == "pydoc":
            # The topics change between Python versions; hashing ~0.5 MB takes about a millisecond.
            return {"pydoc": hashlib.sha256("\0".join(pydoc_documents()).encode("utf-8")).hexdigest()}
        if self.dataset == "files":
            stats = [os.stat(p) for p in self.files]
            files = [[os.path.abspath(p), s.st_size, s.st_mtime_ns] for p, s in zip(self.files, stats)]
            return {"files": files, "text_field": self.text_field}
        hub_id, config = self._hf_id()
        return {"hf": hub_id, "config": config, "text_field": self.text_field}

    def _cache_key(self, version: int = _CACHE_VERSION) -> dict:
        key = {
            "version": version,
            "source": self._source_key(),
            "tokenizer": self.tokenizer.fingerprint(),
            "seq_len": self._seq_len,
            "val_fraction": self.val_fraction,
            "seed": self.seed,
            "max_chars": self.max_chars,
        }
        # Strict decoding either fails or reads what "replace" would, so only "replace" changes the text.
        if version >= 2 and self.dataset == "files" and self.decode_errors != "strict":
            key["decode_errors"] = self.decode_errors
        return key

    def _path(self, key: dict, suffix: str) -> Path:
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode("utf-8")).hexdigest()[:16]
        tag = "".join(c if c.isalnum() else "_" for c in self.dataset.split("/")[-1])
        return Path(self.cache_dir) / f"{tag}-L{self._seq_len}-{digest}{suffix}"

    @property
    def cache_path(self) -> Path:
        """The token store of this exact corpus, tokenizer, seq_len and split."""
        return self._path(self._cache_key(), ".tokens")

    @property
    def legacy_cache_path(self) -> Path:
        """Where the older ``.pt`` format kept the same rows (converted into a store when found)."""
        return self._path(self._cache_key(_LEGACY_CACHE_VERSION), ".pt")

    @property
    def _fix(self) -> str:
        return "delete it, or set data.init_args.rebuild=true, to rebuild it"

    # ----- reading and tokenising ----------------------------------------------------------------------

    def _read_source(self) -> tuple[Sequence[str], Iterable[str] | None]:
        """(documents, validation documents or None when the source has no validation split)."""
        if self.dataset == "pydoc":
            # Blank documents are dropped before the split, so a blank one is never the whole val split.
            return [doc for doc in capped(pydoc_documents(), self.max_chars) if not is_blank(doc)], None
        if self.dataset == "files":
            return LocalDocuments(self.files, self.text_field, self.decode_errors, self.max_chars), None
        return self._read_hf()

    def _read_hf(self) -> tuple[Sequence[str], Iterable[str] | None]:
        require("datasets", feature=f"dataset='{self.dataset}' (a Hugging Face dataset; offline, use dataset: pydoc or files)")
        import datasets

        hub_id, config = self._hf_id()
        # With a character budget, stream: only the first max_chars characters are fetched.
        splits = datasets.load_dataset(hub_id, config, streaming=self.max_chars is not None)
        if "train" not in splits:
            raise ValueError(f"dataset '{hub_id}' has no 'train' split (it has {list(splits)}); use another.")
        val_split = next((s for s in ("validation", "test") if s in splits), None)
        train = HFColumn(splits["train"], self.text_field, hub_id)
        val = HFColumn(splits[val_split], self.text_field, hub_id) if val_split else None
        if self.max_chars is not None:
            # Streams have no len(), which the document split needs; the budget keeps the list small.
            docs = [doc for doc in capped(train, self.max_chars) if not is_blank(doc)]
            return docs, None if val is None else capped(val, self.max_chars)
        return train, val

    def _build(self, path: Path) -> None:
        """Tokenise the source into a new store at ``path`` (streamed: documents in, tokens out)."""
        docs, val_docs = self._read_source()
        seq_len, desc = self._seq_len, f"tokenising {self.dataset}"
        metadata = {"tokenizer": self.tokenizer.fingerprint(), "key": self._cache_key()}
        with TokenStoreWriter(path, vocab_size=self.vocab_size, seq_len=seq_len, metadata=metadata) as writer:
            packed = _PackedWriter(writer, self.tokenizer.eos_id)

            def encode(docs: Iterable[str], desc: str) -> Iterator[tuple[int, np.ndarray]]:
                return encode_documents(docs, self.tokenizer, self.num_proc, desc)

            single = val_docs is None and len(docs) < 2
            if val_docs is not None:
                for _, ids in encode(docs, desc):
                    packed.add("train", ids)
                for _, ids in encode(val_docs, f"{desc} (validation)"):
                    packed.add("val", ids)
            elif not single:
                val_ids = split_documents(len(docs), self.val_fraction, self.seed)
                for i, ids in encode(docs, desc):
                    packed.add("val" if i in val_ids else "train", ids)
            else:
                # One document cannot be split by documents: hold out the end of its stream instead.
                for _, ids in encode(docs, desc):
                    packed.add("train", ids)
            total = writer.sizes["train"] + writer.sizes["val"]
            if single:
                num_val = min(max(seq_len, round(self.val_fraction * total)), total)
                lengths = {"train": total - num_val, "val": num_val}
                splits = {"train": ("train", 0, lengths["train"] // seq_len),
                          "val": ("train", total - num_val, num_val // seq_len)}
            else:
                lengths = dict(writer.sizes)
                splits = None  # each stream is its split
            self._check_sizes(total, lengths)
            writer.commit(splits)

    def _check_sizes(self, total: int, lengths: dict[str, int]) -> None:
        if total < 2 * self._seq_len:
            raise ValueError(
                f"corpus has {total} tokens, fewer than needed for seq_len={self._seq_len} "
                "(one train and one val row); lower seq_len or add text."
            )
        for split, length in lengths.items():
            if length < self._seq_len:
                raise ValueError(
                    f"the {split} split has {length} tokens, fewer than seq_len={self._seq_len}; "
                    "lower seq_len, change val_fraction or add text."
                )

    def _convert_legacy(self, legacy: Path, path: Path) -> None:
        """Copy the rows of an old ``.pt`` cache into a store (memory-mapped: a piece at a time)."""
        if self.dataset == "files" and self.decode_errors == "strict":
            # The old format read bad bytes as U+FFFD; under the strict policy they must not be there.
            for file in self.files:
                if first_invalid_utf8(file) is not None:
                    raise invalid_utf8_error(file)
        try:
            data = torch.load(legacy, weights_only=True, mmap=True)
            rows = {"train": data["train"], "val": data["val"]}
            if data.get("tokenizer") != self.tokenizer.fingerprint() or any(
                r.dim() != 2 or r.shape[1] != self._seq_len or r.dtype != torch.int32 for r in rows.values()
            ):
                raise ValueError("its rows or tokenizer do not match this configuration")
        except Exception as err:  # noqa: BLE001 - any failure to read it gets the same advice
            problem = (str(err).splitlines() or [type(err).__name__])[0]
            raise TokenStoreError(
                f"old cache '{legacy}' cannot be read ({problem}); delete it to tokenise the corpus again."
            ) from None
        metadata = {"tokenizer": self.tokenizer.fingerprint(), "key": self._cache_key(), "converted_from": legacy.name}
        with TokenStoreWriter(path, vocab_size=self.vocab_size, seq_len=self._seq_len, metadata=metadata) as writer:
            step = max(1, _CONVERT_TOKENS // self._seq_len)
            for name, split_rows in rows.items():
                for start in range(0, split_rows.shape[0], step):
                    writer.write(name, split_rows[start : start + step].reshape(-1).numpy())
            writer.commit()
        log.info("converted the old cache %s into the token store %s; the old file is no longer read", legacy, path)

    # ----- LightningDataModule hooks -------------------------------------------------------------------

    def prepare_data(self) -> None:
        """Write the token store, unless it is already there (or ``rebuild`` asks for a new one)."""
        path = self.cache_path
        if path.exists() and not (self.rebuild and not self._built):
            return
        legacy = self.legacy_cache_path
        if legacy.exists() and not self.rebuild:
            log.info("converting the old cache %s into the token store %s", legacy, path)
            self._convert_legacy(legacy, path)
        else:
            log.info(
                "tokenising '%s' with %s into %s (%d process%s)", self.dataset, self.tokenizer.name, path,
                self.num_proc, "es" if self.num_proc > 1 else "",
            )
            self._build(path)
        self._built = True

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        trainer = self.trainer
        if trainer is None or trainer.world_size == 1:
            # On its own (or in one process) do prepare_data's job; it returns at once if the store is
            # there. Under DDP a Trainer has run it on one process per node before any setup.
            self.prepare_data()
        path = self.cache_path
        if not path.exists():
            raise FileNotFoundError(
                f"token store '{path}' not found: prepare_data writes it (a Trainer runs it on one process "
                "per node); run TextDataModule.prepare_data once, or put cache_dir on a shared filesystem."
            )
        store = TokenStore.open(path, verify=self.verify_store, fix=self._fix)
        built_for = (store.metadata.get("tokenizer"), store.vocab_size, store.seq_len)
        wanted = (self.tokenizer.fingerprint(), self.vocab_size, self._seq_len)
        if built_for != wanted:
            raise TokenStoreError(
                f"token store '{path}' was built for (tokenizer, vocab_size, seq_len) = {built_for}, "
                f"not {wanted}; {self._fix}."
            )
        self.train_set = store.dataset("train")
        self.val_set = store.dataset("val")
        if len(self.train_set) < self.batch_size:
            # The train loader drops the last partial batch, so this would give zero training steps.
            warnings.warn(
                f"{type(self).__name__}: {len(self.train_set)} train rows < batch_size={self.batch_size}: "
                "the train loader will be empty; lower batch_size or seq_len.",
                stacklevel=2,
            )

    def decode(self, tokens: Tensor) -> list[str]:
        """The text of each of the (N, D) rows."""
        return [self.tokenizer.decode(row) for row in tokens]
