"""Text corpora, tokenised, packed into fixed-length rows and cached on disk.

Documents are tokenised, joined into one stream with EOS between them, and cut into non-overlapping
rows of ``seq_len`` tokens (the remainder is dropped). The result is cached under ``cache_dir`` in a file
named by a hash of everything that decides it, so a second run (or a second ``setup``) only loads it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import warnings
from itertools import islice
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import torch
from torch import Tensor

from lightning_ddd.data.base import TokenDataModule, TokenTensorDataset
from lightning_ddd.data.tokenizers import ByteTokenizer, Tokenizer

log = logging.getLogger(__name__)

# Short names of common Hugging Face corpora -> (hub id, default config). Other names go to the hub as is.
HF_DATASETS: dict[str, tuple[str, str | None]] = {
    "openwebtext": ("Skylion007/openwebtext", None),
    "wikitext": ("Salesforce/wikitext", "wikitext-103-raw-v1"),
    "lm1b": ("dvruette/lm1b", None),
    "text8": ("afmck/text8", None),
}

# Bump when the cache file layout or the packing rule changes, so old caches are not reused.
_CACHE_VERSION = 1
# Documents tokenised per call, so batched tokenizers (HF) can use their fast path.
_ENCODE_BATCH = 256


def pydoc_documents() -> list[str]:
    """The documentation topics that ship with CPython (``pydoc_data``), one document each, key-sorted."""
    from pydoc_data.topics import topics

    return [topics[key] for key in sorted(topics)]


def read_text_files(paths: Sequence[str], text_field: str = "text") -> list[str]:
    """Documents of local files: a whole ``.txt`` (or any non-``.jsonl``) file is one document; each
    non-blank line of a ``.jsonl`` file is one, taken from its ``text_field``."""
    docs = []
    for path in paths:
        # errors="replace": one stray byte in a big file should not stop training.
        with open(path, encoding="utf-8", errors="replace") as f:
            if not path.endswith(".jsonl"):
                docs.append(f.read())
                continue
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    msg = f"line {lineno} of '{path}' is not valid JSON ({err.msg}); fix the file."
                    raise ValueError(msg) from None
                if not isinstance(record, dict) or text_field not in record:
                    raise ValueError(
                        f"line {lineno} of '{path}' has no '{text_field}' field; "
                        "set data.init_args.text_field."
                    )
                docs.append(str(record[text_field]))
    return docs


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

    Document i goes to the second (validation) stream when ``i in val_ids``, else to the first. Blank
    documents are skipped, so they add no stray EOS. int32 halves memory and disk next to int64.
    """
    parts: tuple[list[Tensor], list[Tensor]] = ([], [])
    eos = torch.tensor([tokenizer.eos_id], dtype=torch.int32)
    numbered = ((i, doc) for i, doc in enumerate(docs) if doc.strip())
    while batch := list(islice(numbered, _ENCODE_BATCH)):
        for (i, _), ids in zip(batch, tokenizer.encode_batch([doc for _, doc in batch])):
            dest = parts[1 if val_ids and i in val_ids else 0]
            if dest:
                dest.append(eos)
            dest.append(torch.tensor(ids, dtype=torch.int32))
    empty = torch.zeros(0, dtype=torch.int32)
    return tuple(torch.cat(p) if p else empty for p in parts)  # type: ignore[return-value]


def _capped(docs: Iterable[str], max_chars: int | None) -> Iterator[str]:
    """The documents, in order, until ``max_chars`` characters have been read (the last one cut short)."""
    if max_chars is None:
        yield from docs
        return
    left = max_chars
    for doc in docs:
        yield doc[:left]
        left -= len(doc)
        if left <= 0:  # stop before pulling another document, which may be a download
            return


class _HFColumn:
    """One text column of a Hugging Face dataset: ``len()`` and iteration, without loading it all."""

    def __init__(self, dataset, field: str, name: str) -> None:
        self.dataset, self.field, self.name = dataset, field, name

    def __len__(self) -> int:
        return len(self.dataset)

    def __iter__(self) -> Iterator[str]:
        for row in self.dataset:
            if self.field not in row:
                raise ValueError(
                    f"dataset '{self.name}' has no '{self.field}' column (it has {sorted(row)}); "
                    "set data.init_args.text_field."
                )
            yield row[self.field]


class TextDataModule(TokenDataModule):
    """A text corpus as (B, seq_len) token rows.

    Documents are tokenised, packed into one stream with EOS between documents and cut into rows of
    ``seq_len`` tokens. When the source has no validation split, whole documents are held out (a seeded
    random ``val_fraction`` of them), so no validation text appears in training; a single-document corpus
    holds out the end of its token stream instead. The packed rows are cached under ``cache_dir``:
    ``prepare_data`` writes them once, ``setup`` loads them.

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
        cache_dir: directory of the tokenised, packed cache files.
        max_chars: read at most this many characters (per split of the source; a local corpus is one
            split), to try out a big corpus quickly; with a Hugging Face dataset it also streams instead
            of downloading it all. None reads everything.
        batch_size: sequences per batch (per device).
        num_workers: DataLoader worker processes.
        seed: seed of the held-out documents and of the shuffling order.
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

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    @property
    def seq_len(self) -> int:
        return self._seq_len

    # ----- cache ---------------------------------------------------------------------------------------

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

    @property
    def cache_path(self) -> Path:
        """The cache file of this exact corpus, tokenizer, seq_len and split."""
        key = {
            "version": _CACHE_VERSION,
            "source": self._source_key(),
            "tokenizer": self.tokenizer.fingerprint(),
            "seq_len": self._seq_len,
            "val_fraction": self.val_fraction,
            "seed": self.seed,
            "max_chars": self.max_chars,
        }
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode("utf-8")).hexdigest()[:16]
        tag = "".join(c if c.isalnum() else "_" for c in self.dataset.split("/")[-1])
        return Path(self.cache_dir) / f"{tag}-L{self._seq_len}-{digest}.pt"

    # ----- reading and tokenising ----------------------------------------------------------------------

    def _read_source(self) -> tuple[Sequence[str], Iterable[str] | None]:
        """(documents, validation documents or None when the source has no validation split)."""
        if self.dataset not in ("pydoc", "files"):
            return self._read_hf()
        docs = pydoc_documents() if self.dataset == "pydoc" else read_text_files(self.files, self.text_field)
        # Blank documents are dropped before the split, so a blank one is never the whole val split.
        return [doc for doc in _capped(docs, self.max_chars) if doc.strip()], None

    def _read_hf(self) -> tuple[Sequence[str], Iterable[str] | None]:
        try:
            import datasets
        except ImportError as err:
            raise ImportError(
                f"dataset='{self.dataset}' is a Hugging Face dataset and needs the 'datasets' package; "
                "pip install datasets (or pip install 'lightning_ddd[text]'), or use dataset: pydoc / files"
            ) from err
        hub_id, config = self._hf_id()
        # With a character budget, stream: only the first max_chars characters are fetched.
        splits = datasets.load_dataset(hub_id, config, streaming=self.max_chars is not None)
        if "train" not in splits:
            raise ValueError(f"dataset '{hub_id}' has no 'train' split (it has {list(splits)}); use another.")
        val_split = next((s for s in ("validation", "test") if s in splits), None)
        train = _HFColumn(splits["train"], self.text_field, hub_id)
        val = _HFColumn(splits[val_split], self.text_field, hub_id) if val_split else None
        if self.max_chars is not None:
            # Streams have no len(), which the document split needs; the budget keeps the list small.
            docs = [doc for doc in _capped(train, self.max_chars) if doc.strip()]
            return docs, None if val is None else _capped(val, self.max_chars)
        return train, val

    def _tokenize(self) -> tuple[Tensor, Tensor]:
        """Train and validation rows, (N, seq_len) and (M, seq_len) int32."""
        docs, val_docs = self._read_source()
        if val_docs is not None:
            train_stream, _ = token_streams(docs, self.tokenizer)
            val_stream, _ = token_streams(val_docs, self.tokenizer)
        elif len(docs) >= 2:
            val_ids = split_documents(len(docs), self.val_fraction, self.seed)
            train_stream, val_stream = token_streams(docs, self.tokenizer, val_ids)
        else:
            # One document cannot be split by documents: hold out the end of its stream instead.
            stream, _ = token_streams(docs, self.tokenizer)
            num_val = min(max(self._seq_len, round(self.val_fraction * stream.numel())), stream.numel())
            train_stream, val_stream = stream[: stream.numel() - num_val], stream[stream.numel() - num_val :]
        total = train_stream.numel() + val_stream.numel()
        if total < 2 * self._seq_len:
            raise ValueError(
                f"corpus has {total} tokens, fewer than needed for seq_len={self._seq_len} "
                "(one train and one val row); lower seq_len or add text."
            )
        for split, stream in (("train", train_stream), ("val", val_stream)):
            if stream.numel() < self._seq_len:
                raise ValueError(
                    f"the {split} split has {stream.numel()} tokens, fewer than seq_len={self._seq_len}; "
                    "lower seq_len, change val_fraction or add text."
                )
        return pack_rows(train_stream, self._seq_len), pack_rows(val_stream, self._seq_len)

    # ----- LightningDataModule hooks -------------------------------------------------------------------

    def prepare_data(self) -> None:
        """Tokenise and pack the corpus into the cache file, unless it is already there."""
        path = self.cache_path
        if path.exists():
            return
        log.info("tokenising '%s' with %s into %s", self.dataset, self.tokenizer.name, path)
        train, val = self._tokenize()
        path.parent.mkdir(parents=True, exist_ok=True)
        # Write to a temporary file and rename, so a crash or a concurrent reader never sees half a file.
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
        os.close(fd)
        try:
            torch.save({"train": train, "val": val, "tokenizer": self.tokenizer.fingerprint()}, tmp)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        path = self.cache_path
        if not path.exists():  # setup() called on its own, outside a Trainer
            self.prepare_data()
        data = torch.load(path, weights_only=True)
        self.train_set = TokenTensorDataset(data["train"].long())
        self.val_set = TokenTensorDataset(data["val"].long())
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
