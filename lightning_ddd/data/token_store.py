"""A token store: packed token rows in one file, written once, memory-mapped by every process.

A corpus of billions of tokens does not fit in the RAM of every DDP process, so the rows are never
loaded: ``TokenStore.open`` checks the header and the file size, and each split's ``TokenStoreDataset``
slices rows out of a read-only ``numpy.memmap`` and converts only those rows to int64. Tokens are kept
in the smallest unsigned dtype that holds the vocabulary (uint8 up to 256 ids, uint16 up to 65,536,
e.g. GPT-2's 50,257, uint32 beyond).

File layout (little-endian)::

    bytes 0-7     magic b"LDDDTOK\\0"
    bytes 8-11    format version (uint32)
    bytes 12-15   length n of the JSON header (uint32)
    bytes 16-47   SHA-256 of the JSON header bytes
    bytes 48-...  JSON header, space-padded so that the tokens start at a multiple of 4096 bytes:
                  dtype, vocab_size, seq_len, num_tokens, splits {name: {start, rows}} (start in
                  tokens from the first token), sha256 of all token bytes, metadata
    then          num_tokens tokens of dtype

Opening always checks the magic, version, header hash and the exact file size; the SHA-256 of the token
bytes is computed while writing and checked on demand (``verify``: it reads the whole file).
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Sequence

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

MAGIC = b"LDDDTOK\x00"
FORMAT_VERSION = 1
_PREFIX = struct.Struct("<8sII32s")  # magic, version, JSON length, JSON SHA-256
_ALIGN = 4096  # tokens start on a page boundary
_CHUNK = 16 << 20  # bytes per read when copying or hashing, so memory stays flat
_DTYPES = ("uint8", "uint16", "uint32")
DEFAULT_FIX = "delete it to rebuild it"


class TokenStoreError(ValueError):
    """A store file that is missing, truncated, corrupt or of another format."""


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned dtype that holds the ids 0 .. vocab_size - 1."""
    for name in _DTYPES:
        if vocab_size - 1 <= np.iinfo(name).max:
            return np.dtype(name)
    raise ValueError(f"vocab_size={vocab_size} does not fit in uint32; a token store cannot hold it.")


def check_ids(ids: np.ndarray, vocab_size: int, what: str) -> None:
    """Raise unless every id of the integer array ``ids`` lies in [0, vocab_size)."""
    if not ids.size:
        return
    low, high = int(ids.min()), int(ids.max())
    if low < 0 or high >= vocab_size:
        raise ValueError(f"{what} gave id {low if low < 0 else high}, outside the vocabulary [0, {vocab_size}).")


class TokenStoreWriter:
    """Writes named token streams into a new store, atomically: nothing appears at ``path`` until
    ``commit`` renames the finished file there; an exception (or no commit) removes every temporary
    file, and the directories this writer created if they are still empty.

    The first stream is written straight after the header; the others go to temporary side files and
    are appended at ``commit`` (they are the small ones: validation). Use as a context manager::

        with TokenStoreWriter(path, vocab_size=257, seq_len=128) as writer:
            writer.write("train", ids)   # 1-D integer array, appended to the stream
            writer.commit()              # splits: each stream cut into full rows

    Args:
        path: the store file to create (replaced if it exists).
        vocab_size: ids are checked to lie in [0, vocab_size); decides the dtype.
        seq_len: tokens per row.
        streams: names of the streams, in file order.
        metadata: JSON-serialisable facts kept in the header (e.g. what built the store).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        vocab_size: int,
        seq_len: int,
        streams: Sequence[str] = ("train", "val"),
        metadata: dict[str, Any] | None = None,
    ) -> None:
        self.path = Path(path)
        self.vocab_size, self.seq_len = vocab_size, seq_len
        self.dtype = token_dtype(vocab_size)
        self.streams = list(streams)
        self.metadata = metadata or {}
        self.sizes = {name: 0 for name in self.streams}  # tokens written per stream
        # The header's final size is known now up to the numbers filled in at commit, so reserve it.
        self._reserved = _header_size(self._header(splits={}, sha256="0" * 64), slack=1024)
        self._created = _missing_parents(self.path.parent)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._files: dict[str, BinaryIO] = {}
        self._tmp: dict[str, str] = {}
        self._hash = hashlib.sha256()
        self._done = False
        try:
            for name in self.streams:
                fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f"{self.path.name}.{name}.", suffix=".tmp")
                self._tmp[name] = tmp
                self._files[name] = os.fdopen(fd, "w+b", buffering=1 << 20)
            self._files[self.streams[0]].write(b"\0" * self._reserved)
        except BaseException:
            self.abort()
            raise

    def __enter__(self) -> TokenStoreWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if not self._done:
            self.abort()

    def write(self, stream: str, ids: np.ndarray) -> None:
        """Append the 1-D integer array ``ids`` to ``stream``."""
        check_ids(ids, self.vocab_size, f"the ids written to stream '{stream}'")
        ids = np.ascontiguousarray(ids, dtype=self.dtype.newbyteorder("<"))
        self._files[stream].write(memoryview(ids).cast("B"))
        if stream == self.streams[0]:
            self._hash.update(memoryview(ids).cast("B"))
        self.sizes[stream] += ids.size

    def commit(self, splits: dict[str, tuple[str, int, int]] | None = None) -> Path:
        """Finish the file and rename it to ``path``.

        Args:
            splits: split name -> (stream, first token within that stream, number of rows); default:
                every stream is a split of its own name with all its full rows.
        """
        if splits is None:
            splits = {name: (name, 0, self.sizes[name] // self.seq_len) for name in self.streams}
        first = self._files[self.streams[0]]
        starts, offset = {}, 0
        for name in self.streams:  # append the side streams, hashing them in file order
            starts[name] = offset
            offset += self.sizes[name]
            if name == self.streams[0]:
                continue
            side = self._files[name]
            side.flush()
            side.seek(0)
            while block := side.read(_CHUNK):
                first.write(block)
                self._hash.update(block)
        table = {}
        for split, (stream, begin, rows) in splits.items():
            if begin < 0 or rows < 0 or begin + rows * self.seq_len > self.sizes[stream]:
                raise ValueError(f"split '{split}' ({rows} rows from token {begin}) exceeds stream '{stream}'.")
            table[split] = {"start": starts[stream] + begin, "rows": rows}
        header = self._header(table, self._hash.hexdigest())
        first.seek(0)
        first.write(_encode_header(header, self._reserved))
        first.flush()
        os.fsync(first.fileno())  # the data is on disk before the name is
        os.fchmod(first.fileno(), 0o644)  # mkstemp makes it private; other users may share a cache
        os.replace(self._tmp[self.streams[0]], self.path)
        del self._tmp[self.streams[0]]
        self._done = True
        self._close(remove_dirs=False)
        return self.path

    def abort(self) -> None:
        """Remove the temporary files (and the directories this writer created, if left empty)."""
        self._done = True
        self._close(remove_dirs=True)

    def _close(self, remove_dirs: bool) -> None:
        for f in self._files.values():
            f.close()
        for tmp in self._tmp.values():
            if os.path.exists(tmp):
                os.unlink(tmp)
        self._files, self._tmp = {}, {}
        if remove_dirs:
            for folder in self._created:  # deepest first
                try:
                    folder.rmdir()
                except OSError:  # not empty (another store) or already gone
                    break

    def _header(self, splits: dict, sha256: str) -> dict[str, Any]:
        return {
            "dtype": self.dtype.name,
            "vocab_size": self.vocab_size,
            "seq_len": self.seq_len,
            "num_tokens": sum(self.sizes.values()),
            "splits": splits,
            "sha256": sha256,
            "metadata": self.metadata,
        }


def _missing_parents(folder: Path) -> list[Path]:
    """The folders that mkdir(parents=True) would create, deepest first."""
    missing = []
    while not folder.exists():
        missing.append(folder)
        if folder.parent == folder:
            break
        folder = folder.parent
    return missing


def _json(header: dict) -> bytes:
    return json.dumps(header, sort_keys=True).encode("utf-8")


def _header_size(header: dict, slack: int = 0) -> int:
    need = _PREFIX.size + len(_json(header)) + slack
    return -(-need // _ALIGN) * _ALIGN


def _encode_header(header: dict, size: int) -> bytes:
    body = _json(header)
    if _PREFIX.size + len(body) > size:
        raise ValueError(f"token store header needs {len(body)} bytes, more than the {size} reserved.")
    body = body.ljust(size - _PREFIX.size, b" ")  # JSON allows trailing spaces
    return _PREFIX.pack(MAGIC, FORMAT_VERSION, len(body), hashlib.sha256(body).digest()) + body


class TokenStore:
    """An opened, checked store file. Open with ``TokenStore.open``; get rows with ``dataset(split)``.

    Attributes:
        path, dtype, vocab_size, seq_len, num_tokens, splits ({name: {"start", "rows"}}), sha256,
        metadata, data_offset (byte offset of the first token).
    """

    def __init__(self, path: Path, header: dict[str, Any], data_offset: int, fix: str) -> None:
        self.path = path
        self.dtype = np.dtype(header["dtype"])
        self.vocab_size: int = header["vocab_size"]
        self.seq_len: int = header["seq_len"]
        self.num_tokens: int = header["num_tokens"]
        self.splits: dict[str, dict[str, int]] = header["splits"]
        self.sha256: str = header["sha256"]
        self.metadata: dict[str, Any] = header["metadata"]
        self.data_offset = data_offset
        self._fix = fix

    @classmethod
    def open(cls, path: str | os.PathLike, *, verify: bool = False, fix: str = DEFAULT_FIX) -> TokenStore:
        """Check the header and size of the store at ``path`` (and with ``verify`` the checksum of every
        token byte); raise ``TokenStoreError`` with a one-line message ending in ``fix`` otherwise."""
        path = Path(path)

        def fail(problem: str) -> TokenStoreError:
            return TokenStoreError(f"token store '{path}' {problem}; {fix}.")

        if not path.is_file():
            raise fail("does not exist")
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            prefix = f.read(_PREFIX.size)
            if len(prefix) < _PREFIX.size:
                raise fail(f"is truncated ({size} bytes, shorter than any header)")
            magic, version, length, digest = _PREFIX.unpack(prefix)
            if magic != MAGIC:
                kind = "an old .pt cache (a zip file)" if magic.startswith(b"PK") else "not a token store"
                raise fail(f"is {kind}: its first bytes are {magic!r}, not {MAGIC!r}")
            if version != FORMAT_VERSION:
                raise fail(f"has format version {version}; this version of lightning_ddd reads {FORMAT_VERSION}")
            body = f.read(length)
        if len(body) < length:
            raise fail(f"is truncated ({size} bytes, inside its {length}-byte header)")
        if hashlib.sha256(body).digest() != digest:
            raise fail("has a corrupt header (its SHA-256 does not match)")
        try:
            header = json.loads(body)
            dtype = np.dtype(header["dtype"])
            fields = ("vocab_size", "seq_len", "num_tokens", "splits", "sha256", "metadata")
            missing = [k for k in fields if k not in header]
            if missing or header["dtype"] not in _DTYPES:
                raise ValueError(f"missing {missing}" if missing else f"dtype {header['dtype']}")
        except (ValueError, TypeError, KeyError) as err:  # a hash-consistent header we did not write
            raise fail(f"has an unreadable header ({err})") from None
        data_offset = _PREFIX.size + length
        expected = data_offset + header["num_tokens"] * dtype.itemsize
        if size != expected:
            state = "is truncated" if size < expected else "has trailing bytes"
            raise fail(f"{state}: {size} bytes, its header says {expected}")
        for name, split in header["splits"].items():
            if split["start"] + split["rows"] * header["seq_len"] > header["num_tokens"]:
                raise fail(f"has a split '{name}' that runs past its {header['num_tokens']} tokens")
        store = cls(path, header, data_offset, fix)
        if verify:
            store.verify()
        return store

    def verify(self) -> None:
        """Recompute the SHA-256 of the token bytes (reads the whole file once, in 16 MB pieces)."""
        digest, left = hashlib.sha256(), self.num_tokens * self.dtype.itemsize
        buffer = bytearray(min(_CHUNK, max(left, 1)))
        with open(self.path, "rb") as f:
            f.seek(self.data_offset)
            while left > 0:
                got = f.readinto(memoryview(buffer)[: min(left, len(buffer))])
                if not got:
                    break
                digest.update(memoryview(buffer)[:got])
                left -= got
        if left or digest.hexdigest() != self.sha256:
            raise TokenStoreError(
                f"token store '{self.path}' is corrupt: its token bytes do not match their SHA-256; {self._fix}."
            )

    def dataset(self, split: str) -> TokenStoreDataset:
        """The rows of ``split``, as a lazily indexed Dataset."""
        if split not in self.splits:
            raise TokenStoreError(f"token store '{self.path}' has no split '{split}' (it has {sorted(self.splits)}).")
        info = self.splits[split]
        return TokenStoreDataset(
            self.path,
            offset=self.data_offset + info["start"] * self.dtype.itemsize,
            dtype=self.dtype,
            rows=info["rows"],
            seq_len=self.seq_len,
            vocab_size=self.vocab_size,
            fix=self._fix,
        )


class TokenStoreDataset(Dataset):
    """(seq_len,) int64 rows read from a store on demand.

    The file is memory-mapped on first access in each process (a DataLoader worker or DDP process
    opens its own map; pickling sends only the path and offsets, never the tokens), and only the rows
    asked for are copied and widened to int64. A batch sampler's indices are read in one
    ``__getitems__`` call. Ids at or above ``vocab_size`` (a corrupt file) raise instead of reaching
    the model.

    Args:
        path: the store file.
        offset: byte offset of this split's first token.
        dtype: token dtype of the file.
        rows: number of rows.
        seq_len: tokens per row.
        vocab_size: ids must be below it.
        fix: how to rebuild, for error messages.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        offset: int,
        dtype: np.dtype | str,
        rows: int,
        seq_len: int,
        vocab_size: int,
        fix: str = DEFAULT_FIX,
    ) -> None:
        self.path = Path(path)
        self.offset, self.dtype = offset, np.dtype(dtype)
        self.num_rows, self.seq_len, self.vocab_size = rows, seq_len, vocab_size
        self.fix = fix
        self._array: np.ndarray | None = None  # opened lazily, per process

    @property
    def array(self) -> np.ndarray:
        """The (rows, seq_len) read-only memory map of this split (no copy; file pages load on access)."""
        if self._array is None:
            if self.num_rows == 0:
                self._array = np.empty((0, self.seq_len), dtype=self.dtype)
            else:
                self._array = np.memmap(
                    self.path, dtype=self.dtype.newbyteorder("<"), mode="r", offset=self.offset,
                    shape=(self.num_rows, self.seq_len),
                )
        return self._array

    def __len__(self) -> int:
        return self.num_rows

    def __getitem__(self, index: int) -> Tensor:
        return self._widen(self.array[index])  # (seq_len,); IndexError past the end ends iteration

    def __getitems__(self, indices: Sequence[int]) -> list[Tensor]:
        rows = self._widen(self.array[np.asarray(indices, dtype=np.int64)])  # (B, seq_len), one gather
        return list(rows.unbind(0))

    def rows(self, start: int = 0, stop: int | None = None) -> Tensor:
        """Rows ``start:stop`` as one (N, seq_len) int64 tensor (a copy: for small ranges)."""
        return self._widen(self.array[start:stop])

    def _widen(self, ids: np.ndarray) -> Tensor:
        if ids.size and int(ids.max()) >= self.vocab_size:
            raise TokenStoreError(
                f"token store '{self.path}' is corrupt: it holds id {int(ids.max())}, outside the "
                f"vocabulary of {self.vocab_size}; {self.fix}."
            )
        return torch.from_numpy(ids.astype(np.int64))

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_array"] = None  # a memmap would pickle as a full in-memory copy
        return state
