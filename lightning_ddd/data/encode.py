"""Tokenising a stream of documents, in order, in parallel worker processes, with bounded memory.

The parent reads the documents and writes the tokens; ``num_proc`` workers encode batches of
documents. At most ``2 * num_proc`` batches are in flight, so a corpus of any size is streamed rather
than queued whole (``Pool.imap`` would read its entire input ahead). Workers send back ids already in the
store's dtype (uint16 for GPT-2: a quarter of int64's bytes through the pipes).
"""

from __future__ import annotations

import multiprocessing
from collections import deque
from itertools import islice
from typing import Iterable, Iterator

import numpy as np

from lightning_ddd.data.token_store import check_ids, token_dtype
from lightning_ddd.data.tokenizers import Tokenizer

# Documents tokenised per call, so batched tokenizers (HF) can use their fast path.
BATCH_DOCS = 256

_worker_tokenizer: Tokenizer | None = None


def is_blank(doc: str) -> bool:
    """True for an empty or all-whitespace document (the same test as ``not doc.strip()``, no copy)."""
    return not doc or doc.isspace()


def encode_texts(tokenizer: Tokenizer, texts: list[str]) -> list[np.ndarray]:
    """Ids of each text as a 1-D array of the store dtype, checked to lie inside the vocabulary."""
    vocab_size = tokenizer.vocab_size
    dtype = token_dtype(vocab_size)
    arrays = tokenizer.encode_arrays(texts)
    for ids in arrays:
        check_ids(ids, vocab_size, tokenizer.name)
    return [ids.astype(dtype, copy=False) for ids in arrays]


def _init_worker(tokenizer: Tokenizer) -> None:
    global _worker_tokenizer
    _worker_tokenizer = tokenizer


def _encode_in_worker(texts: list[str]) -> list[np.ndarray]:
    assert _worker_tokenizer is not None
    return encode_texts(_worker_tokenizer, texts)


def _batches(docs: Iterable[str]) -> Iterator[tuple[list[int], list[str], int]]:
    """(indices, texts) of the non-blank documents, BATCH_DOCS documents read per batch, and how many
    documents (blank ones included) that batch read."""
    numbered = enumerate(docs)
    while chunk := list(islice(numbered, BATCH_DOCS)):
        kept = [(i, doc) for i, doc in chunk if not is_blank(doc)]
        yield [i for i, _ in kept], [doc for _, doc in kept], len(chunk)


def encode_documents(
    docs: Iterable[str], tokenizer: Tokenizer, num_proc: int = 1, desc: str = "tokenising"
) -> Iterator[tuple[int, np.ndarray]]:
    """``(index, ids)`` of every non-blank document, in document order; ``index`` counts blank ones too.

    Args:
        docs: the documents (an iterable; ``len()`` is used for the progress bar when it has one).
        tokenizer: text -> ids; with ``num_proc > 1`` it goes to each worker once (a forked worker
            inherits it; other start methods pickle it).
        num_proc: worker processes; 1 encodes in this process.
        desc: label of the progress bar.
    """
    from tqdm.auto import tqdm

    total = len(docs) if hasattr(docs, "__len__") else None  # type: ignore[arg-type]
    with tqdm(total=total, desc=desc, unit=" docs", mininterval=2.0) as bar:
        if num_proc <= 1:
            for indices, texts, read in _batches(docs):
                yield from zip(indices, encode_texts(tokenizer, texts))
                bar.update(read)
            return
        # The platform's default start method (or the one the user set) for the workers.
        context = multiprocessing.get_context()
        with context.Pool(num_proc, initializer=_init_worker, initargs=(tokenizer,)) as pool:
            pending: deque = deque()
            for indices, texts, read in _batches(docs):
                pending.append((indices, read, pool.apply_async(_encode_in_worker, (texts,))))
                if len(pending) >= 2 * num_proc:  # back-pressure: wait for the oldest batch
                    indices, read, result = pending.popleft()
                    yield from zip(indices, result.get())
                    bar.update(read)
            while pending:
                indices, read, result = pending.popleft()
                yield from zip(indices, result.get())
                bar.update(read)
