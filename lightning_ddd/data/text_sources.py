"""Where ``TextDataModule``'s documents come from: CPython's pydoc topics, local files, Hugging Face
datasets. Documents are streamed (a big local corpus is never held in memory whole), and the decoding of
local files is an explicit policy: invalid UTF-8 is an error naming the file and byte offset, unless
``decode_errors="replace"`` is chosen, which reads bad bytes as U+FFFD and logs where the first one is.
"""

from __future__ import annotations

import codecs
import json
import logging
from typing import Iterable, Iterator, Literal, Sequence

from lightning_ddd.data.encode import is_blank

log = logging.getLogger(__name__)

DecodeErrors = Literal["strict", "replace"]


def pydoc_documents() -> list[str]:
    """The documentation topics that ship with CPython (``pydoc_data``), one document each, key-sorted."""
    from pydoc_data.topics import topics

    return [topics[key] for key in sorted(topics)]


def first_invalid_utf8(path: str, chunk: int = 1 << 20) -> tuple[int, int] | None:
    """(byte offset, byte value) of the first byte of ``path`` that is not valid UTF-8, or None.

    Streams the file in ``chunk``-byte pieces, so any size is fine.
    """
    decoder = codecs.getincrementaldecoder("utf-8")("strict")
    consumed = 0  # bytes handed to the decoder so far
    with open(path, "rb") as f:
        while True:
            block = f.read(chunk)
            pending = len(decoder.getstate()[0])  # an incomplete sequence held over from the last block
            try:
                decoder.decode(block, final=not block)
            except UnicodeDecodeError as err:
                return consumed - pending + err.start, err.object[err.start]
            if not block:
                return None
            consumed += len(block)


def _describe_bad_byte(path: str) -> str:
    bad = first_invalid_utf8(path)
    return "an invalid byte" if bad is None else f"byte 0x{bad[1]:02x} at offset {bad[0]}"


def invalid_utf8_error(path: str) -> ValueError:
    """The one-line error of the strict decoding policy for ``path``."""
    return ValueError(
        f"'{path}' is not valid UTF-8 ({_describe_bad_byte(path)}); fix the file, or set "
        "data.init_args.decode_errors=replace to read bad bytes as U+FFFD."
    )


def iter_text_files(
    paths: Sequence[str], text_field: str = "text", decode_errors: DecodeErrors = "strict", warn: bool = True
) -> Iterator[str]:
    """Documents of local files, read lazily: a whole ``.txt`` (or any non-``.jsonl``) file is one
    document; each non-blank line of a ``.jsonl`` file is one, taken from its ``text_field``.

    Files are UTF-8. With ``decode_errors="strict"`` a byte that is not valid UTF-8 raises a ValueError
    naming the file and the byte's offset; with ``"replace"`` it reads as U+FFFD and (with ``warn``) a
    warning names the file and the offset of its first bad byte.
    """
    for path in paths:
        if decode_errors == "replace" and warn and first_invalid_utf8(path) is not None:
            log.warning(
                "'%s' is not valid UTF-8 (%s); its bad bytes read as U+FFFD (decode_errors=replace).",
                path, _describe_bad_byte(path),
            )
        try:
            yield from _read_one_file(path, text_field, decode_errors)
        except UnicodeDecodeError:
            raise invalid_utf8_error(path) from None


def _read_one_file(path: str, text_field: str, decode_errors: str) -> Iterator[str]:
    with open(path, encoding="utf-8", errors=decode_errors) as f:
        if not path.endswith(".jsonl"):
            yield f.read()
            return
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"line {lineno} of '{path}' is not valid JSON ({err.msg}); fix the file.") from None
            if not isinstance(record, dict) or text_field not in record:
                raise ValueError(
                    f"line {lineno} of '{path}' has no '{text_field}' field; set data.init_args.text_field."
                )
            yield str(record[text_field])


def read_text_files(
    paths: Sequence[str], text_field: str = "text", decode_errors: DecodeErrors = "strict"
) -> list[str]:
    """All documents of ``iter_text_files`` in a list (for small corpora)."""
    return list(iter_text_files(paths, text_field, decode_errors))


def capped(docs: Iterable[str], max_chars: int | None) -> Iterator[str]:
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


class LocalDocuments:
    """The non-blank documents of local files (within ``max_chars``), re-readable and never all in
    memory. ``len()`` reads the files once to count them (the document split needs the count) and checks
    their decoding, before any token is written."""

    def __init__(
        self, paths: Sequence[str], text_field: str, decode_errors: DecodeErrors, max_chars: int | None
    ) -> None:
        self.paths, self.text_field = list(paths), text_field
        self.decode_errors, self.max_chars = decode_errors, max_chars
        self._count: int | None = None

    def _documents(self, warn: bool) -> Iterator[str]:
        docs = iter_text_files(self.paths, self.text_field, self.decode_errors, warn=warn)
        return (doc for doc in capped(docs, self.max_chars) if not is_blank(doc))

    def __len__(self) -> int:
        if self._count is None:
            self._count = sum(1 for _ in self._documents(warn=True))
        return self._count

    def __iter__(self) -> Iterator[str]:
        return self._documents(warn=self._count is None)  # warn about bad bytes once


class HFColumn:
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
