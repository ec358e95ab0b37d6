"""The token store: dtype choice, round trip, lazy memory-mapped rows, atomic writes and every way a
store file can be damaged."""

from __future__ import annotations

import os
import pickle
import zipfile

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from lightning_ddd.data.token_store import (
    FORMAT_VERSION,
    MAGIC,
    TokenStore,
    TokenStoreDataset,
    TokenStoreError,
    TokenStoreWriter,
    _encode_header,
    token_dtype,
)


def _write_store(path, streams: dict[str, np.ndarray], vocab_size: int, seq_len: int, pieces: int = 3):
    """A store of the given streams, each written in a few pieces (as a tokeniser would)."""
    with TokenStoreWriter(path, vocab_size=vocab_size, seq_len=seq_len, streams=list(streams),
                          metadata={"test": True}) as writer:
        for name, ids in streams.items():
            for piece in np.array_split(ids, pieces):
                writer.write(name, piece)
        writer.commit()
    return path


def _rows(ids: np.ndarray, seq_len: int) -> np.ndarray:
    n = len(ids) // seq_len
    return ids[: n * seq_len].reshape(n, seq_len)


@pytest.mark.parametrize(
    "vocab_size, dtype",
    [(2, "uint8"), (102, "uint8"), (256, "uint8"), (257, "uint16"), (50_257, "uint16"), (65_536, "uint16"),
     (65_537, "uint32"), (2**32, "uint32")],
)
def test_smallest_dtype_that_holds_the_vocabulary(vocab_size, dtype):
    assert token_dtype(vocab_size) == np.dtype(dtype)
    assert np.iinfo(dtype).max >= vocab_size - 1  # the largest id fits


def test_vocabulary_beyond_uint32_is_refused():
    with pytest.raises(ValueError, match="does not fit in uint32"):
        token_dtype(2**32 + 1)


@pytest.mark.parametrize("vocab_size", [100, 50_257, 70_000])
def test_round_trip_gives_the_same_ids_as_int64(tmp_path, vocab_size):
    rng = np.random.default_rng(vocab_size)
    seq_len = 16
    train = rng.integers(0, vocab_size, size=16 * 37 + 5)  # a partial last row, dropped
    val = rng.integers(0, vocab_size, size=16 * 4)
    train[0], val[-1] = vocab_size - 1, 0  # the extremes of the vocabulary
    path = _write_store(tmp_path / "s.tokens", {"train": train, "val": val}, vocab_size, seq_len)

    store = TokenStore.open(path, verify=True)
    dtype = token_dtype(vocab_size)
    assert store.dtype == dtype and store.num_tokens == len(train) + len(val)
    assert os.path.getsize(path) == store.data_offset + store.num_tokens * dtype.itemsize
    assert store.data_offset % 4096 == 0 and store.metadata == {"test": True}
    for name, ids in (("train", train), ("val", val)):
        ds = store.dataset(name)
        expected = torch.from_numpy(_rows(ids, seq_len))
        assert len(ds) == expected.shape[0]
        assert torch.equal(ds.rows(), expected) and ds.rows().dtype == torch.long
        assert torch.equal(ds[3], expected[3]) and ds[3].dtype == torch.long
        assert torch.equal(ds[-1], expected[-1])
        picked = ds.__getitems__([2, 0, 2])  # what a DataLoader with a batch sampler calls
        assert all(torch.equal(row, expected[i]) for row, i in zip(picked, [2, 0, 2]))
        assert ds.array.dtype == dtype  # the map itself stays narrow
        with pytest.raises(IndexError):
            ds[len(ds)]

    batch = next(iter(DataLoader(store.dataset("train"), batch_size=5)))
    assert batch.shape == (5, seq_len) and batch.dtype == torch.long
    assert torch.equal(batch, torch.from_numpy(_rows(train, seq_len)[:5]))


def test_splits_can_share_a_stream(tmp_path):
    ids = np.arange(100) % 50
    with TokenStoreWriter(tmp_path / "s.tokens", vocab_size=50, seq_len=8, streams=["train"]) as writer:
        writer.write("train", ids)
        writer.commit({"train": ("train", 0, 9), "val": ("train", 80, 2)})
    store = TokenStore.open(tmp_path / "s.tokens")
    assert store.dataset("train").rows().flatten().tolist() == ids[:72].tolist()
    assert store.dataset("val").rows().flatten().tolist() == ids[80:96].tolist()
    with pytest.raises(TokenStoreError, match="has no split 'test'"):
        store.dataset("test")


def test_dataset_holds_a_map_not_a_copy_and_pickles_small(tmp_path):
    ids = np.arange(64 * 500) % 257
    path = _write_store(tmp_path / "s.tokens", {"train": ids, "val": ids[:64]}, 257, 64)
    ds = TokenStore.open(path).dataset("train")
    first = ds[7]
    assert isinstance(ds.array, np.memmap) and not ds.array.flags.owndata and not ds.array.flags.writeable
    owned = [k for k, v in vars(ds).items() if isinstance(v, np.ndarray) and v.flags.owndata]
    assert owned == []  # no array of its own: every row is read from the map on demand
    blob = pickle.dumps(ds)  # what a spawned DataLoader worker or DDP process receives
    assert len(blob) < 2000 < ids.nbytes
    clone = pickle.loads(blob)
    assert clone._array is None and torch.equal(clone[7], first) and len(clone) == 500


def test_a_huge_store_opens_without_reading_it(tmp_path):
    # A sparse 4 GiB file (2**31 uint16 tokens): opening and indexing must touch only the header and
    # the rows asked for. Reading it whole would add 4 GiB (or 16 GiB as int64) to the process.
    seq_len, num_tokens = 1024, 2**31
    rows = num_tokens // seq_len
    header = {"dtype": "uint16", "vocab_size": 50_257, "seq_len": seq_len, "num_tokens": num_tokens,
              "splits": {"train": {"start": 0, "rows": rows}}, "sha256": "0" * 64, "metadata": {}}
    path = tmp_path / "huge.tokens"
    with open(path, "wb") as f:
        f.write(_encode_header(header, 4096))
        f.truncate(4096 + 2 * num_tokens)

    def rss_mib() -> float:
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:")) / 1024

    if not os.path.exists("/proc/self/status"):
        pytest.skip("needs /proc to read the resident memory")
    before = rss_mib()
    ds = TokenStore.open(path).dataset("train")
    assert len(ds) == rows == 2**21
    assert torch.equal(ds[rows - 1], torch.zeros(seq_len, dtype=torch.long))
    batch = ds.__getitems__([0, rows // 2, rows - 1])
    assert len(batch) == 3 and all(int(row.sum()) == 0 for row in batch)
    assert rss_mib() - before < 64


# ----- atomic writing --------------------------------------------------------------------------------


def test_a_failed_write_leaves_nothing_behind(tmp_path):
    target = tmp_path / "new" / "deeper" / "s.tokens"
    with pytest.raises(RuntimeError, match="interrupted"):
        with TokenStoreWriter(target, vocab_size=10, seq_len=4) as writer:
            writer.write("train", np.arange(10) % 10)
            writer.write("val", np.arange(8) % 10)
            raise RuntimeError("interrupted")
    assert not (tmp_path / "new").exists()  # temporary files and the folders it made are gone

    existing = tmp_path / "kept.tokens"
    _write_store(existing, {"train": np.zeros(8, int), "val": np.zeros(8, int)}, 10, 4)
    before = existing.read_bytes()
    with pytest.raises(ValueError, match="outside the vocabulary"):
        with TokenStoreWriter(existing, vocab_size=10, seq_len=4) as writer:
            writer.write("train", np.array([1, 2, 10]))  # 10 is not an id of a 10-word vocabulary
    assert existing.read_bytes() == before and os.listdir(tmp_path) == ["kept.tokens"]

    with pytest.raises(ValueError, match="outside the vocabulary"):
        with TokenStoreWriter(existing, vocab_size=10, seq_len=4) as writer:
            writer.write("train", np.array([-1, 2]))


def test_commit_replaces_an_existing_store(tmp_path):
    path = _write_store(tmp_path / "s.tokens", {"train": np.zeros(16, int), "val": np.zeros(8, int)}, 5, 4)
    _write_store(path, {"train": np.full(12, 4), "val": np.full(8, 3)}, 5, 4)
    store = TokenStore.open(path, verify=True)
    assert store.dataset("train").rows().unique().tolist() == [4] and len(store.dataset("train")) == 3
    assert os.listdir(tmp_path) == ["s.tokens"]


# ----- damaged files ---------------------------------------------------------------------------------


def _damage(path, how: str) -> None:
    data = bytearray(path.read_bytes())
    if how == "truncated":
        data = data[:-1]
    elif how == "trailing bytes":
        data += b"\0\0"
    elif how == "header only":
        data = data[:4096]
    elif how == "empty":
        data = bytearray()
    elif how == "wrong magic":
        data[:8] = b"NOTASTOR"
    elif how == "wrong version":
        data[8:12] = (FORMAT_VERSION + 98).to_bytes(4, "little")
    elif how == "flipped header byte":
        data[60] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    "how, message",
    [
        ("truncated", r"is truncated: \d+ bytes, its header says \d+"),
        ("header only", r"is truncated: 4096 bytes"),
        ("trailing bytes", "has trailing bytes"),
        ("empty", "is truncated .0 bytes, shorter than any header"),
        ("wrong magic", "is not a token store: its first bytes are b'NOTASTOR'"),
        ("wrong version", f"has format version {FORMAT_VERSION + 98}; this version of lightning_ddd reads"),
        ("flipped header byte", r"has a corrupt header \(its SHA-256 does not match\)"),
    ],
)
def test_damaged_stores_are_refused_with_one_line_that_says_how_to_rebuild(tmp_path, how, message):
    path = _write_store(tmp_path / "s.tokens", {"train": np.arange(64) % 7, "val": np.arange(32) % 7}, 7, 8)
    _damage(path, how)
    with pytest.raises(TokenStoreError, match=message) as err:
        TokenStore.open(path, fix="rebuild it like so")
    assert "\n" not in str(err.value) and str(err.value).endswith("; rebuild it like so.")
    assert str(path) in str(err.value)


def test_a_flipped_token_byte_is_found_by_the_checksum(tmp_path):
    path = _write_store(tmp_path / "s.tokens", {"train": np.arange(64) % 7, "val": np.arange(32) % 7}, 7, 8)
    store = TokenStore.open(path)
    data = bytearray(path.read_bytes())
    data[store.data_offset + 10] ^= 0x01  # 10 % 7 = 3 -> 2: still an id of the vocabulary
    path.write_bytes(bytes(data))
    TokenStore.open(path)  # header and size are fine: the checksum is verified on demand
    with pytest.raises(TokenStoreError, match="token bytes do not match their SHA-256; delete it to rebuild it"):
        TokenStore.open(path, verify=True)


def test_an_id_outside_the_vocabulary_is_never_returned(tmp_path):
    path = _write_store(tmp_path / "s.tokens", {"train": np.arange(64) % 300, "val": np.arange(32)}, 300, 8)
    store = TokenStore.open(path)
    data = bytearray(path.read_bytes())
    data[store.data_offset + 2 * 9 : store.data_offset + 2 * 10] = b"\xff\xff"  # token 9 (row 1) = 65535
    path.write_bytes(bytes(data))
    ds = TokenStore.open(path).dataset("train")
    assert torch.equal(ds[0], torch.arange(8))
    for read in (lambda: ds[1], lambda: ds.__getitems__([0, 1]), lambda: ds.rows()):
        with pytest.raises(TokenStoreError, match="holds id 65535, outside the vocabulary of 300"):
            read()


def test_a_pt_file_and_a_missing_file_get_their_own_message(tmp_path):
    old = tmp_path / "old.tokens"
    torch.save({"train": torch.zeros(2, 4, dtype=torch.int32)}, old)
    assert zipfile.is_zipfile(old)
    with pytest.raises(TokenStoreError, match=r"is an old \.pt cache \(a zip file\)"):
        TokenStore.open(old)
    with pytest.raises(TokenStoreError, match="does not exist; delete it"):
        TokenStore.open(tmp_path / "missing.tokens")
    assert MAGIC[:2] != b"PK"


def test_dataset_constructed_directly_reads_the_same_rows(tmp_path):
    ids = np.arange(40) % 11
    path = _write_store(tmp_path / "s.tokens", {"train": ids, "val": ids[:8]}, 11, 4)
    store = TokenStore.open(path)
    ds = TokenStoreDataset(path, offset=store.data_offset + 4 * 1, dtype="uint8", rows=2, seq_len=4, vocab_size=11)
    assert ds.rows().tolist() == [[4, 5, 6, 7], [8, 9, 10, 0]]
