"""Text data: tokenizers, packing, local and embedded corpora, the on-disk cache and the error messages."""

from __future__ import annotations

import json
import logging
import os
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from lightning_ddd.data.encode import BATCH_DOCS
from lightning_ddd.data.text import TextDataModule, pack_rows, pydoc_documents, split_documents, token_streams
from lightning_ddd.data.text_sources import first_invalid_utf8
from lightning_ddd.data.token_store import TokenStore, TokenStoreError
from lightning_ddd.data.tokenizers import ByteTokenizer, CharTokenizer, HFTokenizer

EOS = 256  # ByteTokenizer's EOS id


def _write(path, text: str) -> str:
    path.write_text(text, encoding="utf-8")
    return str(path)


def _bytes(text: str) -> list[int]:
    return list(text.encode("utf-8"))


def _files_dm(files, **kwargs) -> TextDataModule:
    """A DataModule of local files; small batches, since the test corpora are tiny."""
    kwargs.setdefault("batch_size", 2)
    return TextDataModule(dataset="files", files=files, **kwargs)


class CountingByteTokenizer(ByteTokenizer):
    """A ByteTokenizer that counts how many documents it has encoded."""

    def __init__(self) -> None:
        self.calls = 0

    def encode(self, text: str) -> list[int]:
        self.calls += 1
        return super().encode(text)


# ----- tokenizers ------------------------------------------------------------------------------------


def test_byte_tokenizer_round_trip_with_non_ascii():
    tok = ByteTokenizer()
    assert (tok.vocab_size, tok.eos_id) == (257, 256)
    text = "héllo wörld ✓ 日本語\n\ttabs"
    ids = tok.encode(text)
    assert all(0 <= i < 256 for i in ids)
    assert len(ids) == len(text.encode("utf-8"))
    assert tok.decode(ids) == text
    assert tok.decode(torch.tensor(ids)) == text  # tensors decode too


def test_byte_tokenizer_decode_drops_eos_and_replaces_bad_ids():
    tok = ByteTokenizer()
    assert tok.decode(_bytes("ab") + [EOS] + _bytes("cd")) == "abcd"
    assert tok.decode([0xFF, 0x61]) == "\ufffda"  # invalid UTF-8 byte
    assert tok.decode([0x61, 257]) == "a\ufffd"  # id outside the vocabulary, e.g. a mask token


def test_char_tokenizer_round_trip_and_unknown_chars():
    tok = CharTokenizer()
    assert tok.vocab_size == 102  # 100 printable ASCII + unknown + EOS
    assert (tok.unk_id, tok.eos_id) == (100, 101)
    text = "Hello, World!\n  x = [1, 2]  # ok"
    assert tok.decode(tok.encode(text)) == text
    ids = tok.encode("aé日b")
    assert ids[1] == ids[2] == tok.unk_id
    assert tok.decode(ids) == "a\ufffd\ufffdb"
    assert tok.decode(tok.encode("ab") + [tok.eos_id]) == "ab"


def test_char_tokenizer_custom_alphabet():
    tok = CharTokenizer(alphabet="abc ")
    assert tok.vocab_size == 6
    assert tok.encode("cab d") == [2, 0, 1, 3, 4]
    assert tok.fingerprint() != CharTokenizer(alphabet="abcd").fingerprint()
    with pytest.raises(ValueError, match="repeats"):
        CharTokenizer(alphabet="abca")


@pytest.mark.slow
def test_hf_tokenizer_gpt2_round_trip():
    pytest.importorskip("transformers")
    tok = HFTokenizer("gpt2")
    assert tok.vocab_size == 50257 and tok.eos_id == 50256
    text = "The quick brown fox."
    assert tok.decode(tok.encode(text) + [tok.eos_id]) == text


# ----- packing ---------------------------------------------------------------------------------------


def test_packing_puts_eos_between_documents_and_cuts_full_rows():
    tok = ByteTokenizer()
    docs = ["ab", "cde", "  ", "fgh"]  # the blank document adds nothing, not even an EOS
    train, val = token_streams(docs, tok)
    assert train.tolist() == [97, 98, EOS, 99, 100, 101, EOS, 102, 103, 104]
    assert val.numel() == 0
    rows = pack_rows(train, 3)
    assert rows.tolist() == [[97, 98, EOS], [99, 100, 101], [EOS, 102, 103]]  # the trailing 104 is dropped

    train, val = token_streams(docs, tok, val_ids={1})
    assert train.tolist() == [97, 98, EOS, 102, 103, 104]
    assert val.tolist() == [99, 100, 101]


def test_files_corpus_is_packed_as_computed_by_hand(tmp_path):
    texts = ["alpha one", "bravo two!", "charlie", "delta d"]
    files = [_write(tmp_path / f"doc{i}.txt", t) for i, t in enumerate(texts)]
    dm = _files_dm(files, seq_len=4, val_fraction=0.25, cache_dir=str(tmp_path / "c"))
    dm.setup()

    val_ids = split_documents(len(texts), 0.25, seed=0)
    assert len(val_ids) == 1

    def expected(ids):
        stream = []
        for i in sorted(ids):
            stream += ([EOS] if stream else []) + _bytes(texts[i])
        return [stream[k : k + 4] for k in range(0, len(stream) - 3, 4)]

    assert dm.train_set.rows().tolist() == expected(set(range(4)) - val_ids)
    assert dm.val_set.rows().tolist() == expected(val_ids)
    assert dm.train_set.rows().dtype == torch.long and dm.train_set.rows().shape[1] == 4

    batch = next(iter(dm.train_dataloader()))
    assert batch.shape == (2, 4) and batch.dtype == torch.long


def test_jsonl_gives_one_document_per_line(tmp_path):
    lines = [{"text": "first doc", "id": 1}, {"text": "second doc"}, {"text": "third doc"}]
    path = tmp_path / "corpus.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in lines[:2]) + "\n\n" + json.dumps(lines[2]) + "\n")
    dm = _files_dm([str(path)], seq_len=4, val_fraction=0.34, cache_dir=str(tmp_path))
    dm.setup()
    decoded = "".join(ByteTokenizer().decode(r) for r in dm.train_set.rows())
    held_out = "".join(ByteTokenizer().decode(r) for r in dm.val_set.rows())
    # Two of the three documents are in train, one in val, each row exactly 4 bytes.
    assert sum(t["text"][:4] in decoded for t in lines) == 2
    assert sum(t["text"][:4] in held_out for t in lines) == 1

    other = tmp_path / "other.jsonl"
    other.write_text(json.dumps({"body": "aaaa bbbb"}) + "\n" + json.dumps({"body": "cccc dddd"}) + "\n")
    dm = _files_dm([str(other)], text_field="body", seq_len=4, cache_dir=str(tmp_path))
    dm.setup()
    assert len(dm.train_set) == 2 and len(dm.val_set) == 2

    with pytest.raises(ValueError, match="has no 'text' field; set data.init_args.text_field"):
        _files_dm([str(other)], seq_len=4, cache_dir=str(tmp_path)).setup()


def test_single_document_holds_out_the_end_of_its_stream(tmp_path):
    text = "".join(chr(ord("a") + i % 26) for i in range(200))
    path = _write(tmp_path / "one.txt", text)
    dm = _files_dm([path], seq_len=8, val_fraction=0.1, cache_dir=str(tmp_path))
    dm.setup()
    # The last 10% (20 bytes) is held out: train is bytes 0..175 (22 full rows of the first 180), val
    # bytes 180..195 (2 full rows of the last 20), so no byte is in both.
    assert dm.train_set.rows().flatten().tolist() == _bytes(text)[:176]
    assert dm.val_set.rows().flatten().tolist() == _bytes(text)[180:196]


def test_max_chars_caps_the_text_read(tmp_path):
    files = [_write(tmp_path / f"{c}.txt", c * 100) for c in "abcd"]
    dm = _files_dm(files, seq_len=10, max_chars=250, cache_dir=str(tmp_path))
    dm.setup()
    # 250 characters are a * 100, b * 100 and the first half of c * 100; d is never read.
    text = "".join(dm.decode(torch.cat([dm.train_set.rows(), dm.val_set.rows()])))
    assert "d" not in text and 40 <= text.count("c") <= 50 and text.count("a") + text.count("b") >= 180


# ----- the embedded corpus ---------------------------------------------------------------------------


def test_pydoc_default_corpus_loads_and_reads_as_english(tmp_path):
    dm = TextDataModule(cache_dir=str(tmp_path))
    assert (dm.vocab_size, dm.seq_len, dm.modality) == (257, 128, "text")
    dm.prepare_data()
    dm.setup()
    assert dm.train_set.rows().shape[1] == 128 and len(dm.train_set) > 1000 and len(dm.val_set) > 10
    assert int(dm.train_set.rows().max()) < 257
    texts = dm.decode(dm.val_set.rows()[:20])
    assert len(texts) == 20 and all(isinstance(t, str) and len(t) > 0 for t in texts)
    joined = " ".join(texts)
    assert " the " in joined and " of " in joined
    assert sum(c.isascii() for c in joined) / len(joined) > 0.95


def test_char_tokenizer_on_pydoc(tmp_path):
    dm = TextDataModule(tokenizer=CharTokenizer(), seq_len=64, cache_dir=str(tmp_path))
    assert dm.vocab_size == 102
    dm.setup()
    assert int(dm.train_set.rows().max()) < 102
    assert " the " in " ".join(dm.decode(dm.train_set.rows()[:50]))


# ----- cache -----------------------------------------------------------------------------------------


def test_cache_is_reused_without_retokenising(tmp_path):
    files = [_write(tmp_path / f"d{i}.txt", f"document number {i} " * 20) for i in range(5)]
    cache = str(tmp_path / "cache")
    first = CountingByteTokenizer()
    dm = _files_dm(files, tokenizer=first, seq_len=16, cache_dir=cache)
    dm.prepare_data()
    dm.setup()
    assert first.calls == 5
    path = dm.cache_path
    mtime = path.stat().st_mtime_ns

    second = CountingByteTokenizer()
    again = _files_dm(files, tokenizer=second, seq_len=16, cache_dir=cache)
    again.prepare_data()
    again.setup()
    assert second.calls == 0
    assert again.cache_path == path and path.stat().st_mtime_ns == mtime
    assert torch.equal(again.train_set.rows(), dm.train_set.rows())
    assert not [p for p in os.listdir(cache) if p.endswith(".tmp")]  # no temporary files left behind


def test_cache_is_invalidated_by_seq_len_and_file_changes(tmp_path):
    files = [_write(tmp_path / f"d{i}.txt", f"document number {i} " * 20) for i in range(5)]
    cache = str(tmp_path / "cache")
    base = _files_dm(files, seq_len=16, cache_dir=cache)
    base.setup()
    base_path = base.cache_path  # the path follows the files, so keep the one from before the change

    tok = CountingByteTokenizer()
    longer = _files_dm(files, tokenizer=tok, seq_len=32, cache_dir=cache)
    assert longer.cache_path != base_path
    longer.setup()
    assert tok.calls == 5 and longer.train_set.rows().shape[1] == 32

    _write(tmp_path / "d0.txt", "changed text " * 30)
    tok = CountingByteTokenizer()
    changed = _files_dm(files, tokenizer=tok, seq_len=16, cache_dir=cache)
    assert changed.cache_path != base_path
    changed.setup()
    assert tok.calls == 5
    assert len(os.listdir(cache)) == 3

    other_tok = _files_dm(files, tokenizer=CharTokenizer(), seq_len=16, cache_dir=cache)
    assert other_tok.cache_path != changed.cache_path


# ----- train / val split -----------------------------------------------------------------------------


def test_train_and_val_documents_are_disjoint(tmp_path):
    # Document i is one repeated letter, so a row's letters tell which documents it came from.
    letters = "abcdefghijklmnopqrst"
    files = [_write(tmp_path / f"{c}.txt", c * 50) for c in letters]
    dm = _files_dm(files, seq_len=8, val_fraction=0.2, cache_dir=str(tmp_path / "c"))
    dm.setup()
    train_chars = set("".join(dm.decode(dm.train_set.rows())))
    val_chars = set("".join(dm.decode(dm.val_set.rows())))
    assert len(val_chars) == 4 and len(train_chars) == 16
    assert not train_chars & val_chars

    same = _files_dm(files, seq_len=8, val_fraction=0.2, cache_dir=str(tmp_path / "d"))
    same.setup()
    assert torch.equal(same.val_set.rows(), dm.val_set.rows())  # deterministic from the seed
    assert split_documents(20, 0.2, seed=1) != split_documents(20, 0.2, seed=0)


# ----- errors ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("files", [None, []])
def test_files_dataset_without_files(tmp_path, files):
    with pytest.raises(ValueError, match="set data.init_args.files"):
        _files_dm(files, cache_dir=str(tmp_path / "c"))
    assert not (tmp_path / "c").exists()


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"text file 'x\.txt' not found; check data.init_args.files"):
        _files_dm(["x.txt"], cache_dir=str(tmp_path / "c"))


@pytest.mark.parametrize("seq_len", [1, 0])
def test_seq_len_too_small(tmp_path, seq_len):
    with pytest.raises(ValueError, match=f"seq_len={seq_len} must be >= 2"):
        TextDataModule(seq_len=seq_len, cache_dir=str(tmp_path))


def test_files_without_files_dataset(tmp_path):
    path = _write(tmp_path / "a.txt", "text")
    with pytest.raises(ValueError, match="dataset='files'"):
        TextDataModule(files=[path], cache_dir=str(tmp_path))


def test_corpus_too_small(tmp_path):
    files = [_write(tmp_path / "a.txt", "tiny"), _write(tmp_path / "b.txt", "text")]
    dm = _files_dm(files, seq_len=64, cache_dir=str(tmp_path / "c"))
    # 8 = 4 + 4 bytes: the two documents land in different splits, so no EOS joins them.
    message = r"corpus has 8 tokens, fewer than needed for seq_len=64.*lower seq_len or add text"
    with pytest.raises(ValueError, match=message):
        dm.setup()
    assert not (tmp_path / "c").exists()  # nothing written


class _FakeDatasets:
    """Stands in for the ``datasets`` package: records the load_dataset call, returns lists of rows."""

    def __init__(self, splits: dict[str, list[dict]]) -> None:
        self.splits, self.calls = splits, []

    def load_dataset(self, path, name=None, streaming=False):
        self.calls.append((path, name, streaming))
        return self.splits


def test_hf_dataset_uses_its_validation_split(tmp_path, monkeypatch):
    train = [{"text": f"train sentence number {i}."} for i in range(40)]
    val = [{"text": f"held-out line {i}."} for i in range(10)]
    fake = _FakeDatasets({"train": train, "validation": val, "test": [{"text": "unused"}]})
    monkeypatch.setitem(sys.modules, "datasets", fake)
    dm = TextDataModule(dataset="wikitext", seq_len=16, cache_dir=str(tmp_path), batch_size=2)
    dm.setup()
    assert fake.calls == [("Salesforce/wikitext", "wikitext-103-raw-v1", False)]
    assert "train sentence" in "".join(dm.decode(dm.train_set.rows()))
    val_text = "".join(dm.decode(dm.val_set.rows()))
    assert "held-out" in val_text and "train" not in val_text and "unused" not in val_text


def test_hf_dataset_without_validation_split_holds_out_documents(tmp_path, monkeypatch):
    fake = _FakeDatasets({"train": [{"body": c * 40} for c in "abcdefghij"]})
    monkeypatch.setitem(sys.modules, "datasets", fake)
    dm = TextDataModule(
        dataset="user/corpus", text_field="body", seq_len=8, val_fraction=0.2, max_chars=300,
        cache_dir=str(tmp_path), batch_size=2,
    )
    dm.setup()
    assert fake.calls == [("user/corpus", None, True)]  # a character budget streams
    train_chars = set("".join(dm.decode(dm.train_set.rows())))
    val_chars = set("".join(dm.decode(dm.val_set.rows())))
    assert train_chars | val_chars <= set("abcdefgh") and not train_chars & val_chars  # 300 chars: a..g + 20 h


def test_hf_dataset_sizes_are_known_without_the_data(tmp_path):
    dm = TextDataModule(dataset="wikitext", cache_dir=str(tmp_path / "c"))
    assert dm.vocab_size == 257 and dm.seq_len == 128
    assert not (tmp_path / "c").exists()


# ----- the token store behind the DataModule ---------------------------------------------------------


def _old_rows(docs, tokenizer, seq_len, val_fraction, seed):
    """(train, val) int32 rows as the in-memory packing of the previous .pt cache computed them."""
    docs = [d for d in docs if d.strip()]
    train, val = token_streams(docs, tokenizer, split_documents(len(docs), val_fraction, seed))
    return pack_rows(train, seq_len), pack_rows(val, seq_len)


@pytest.mark.parametrize("tokenizer, dtype", [(ByteTokenizer(), np.uint16), (CharTokenizer(), np.uint8)])
def test_store_rows_equal_the_old_packing(tmp_path, tokenizer, dtype):
    dm = TextDataModule(tokenizer=tokenizer, seq_len=48, val_fraction=0.1, seed=3, cache_dir=str(tmp_path))
    dm.setup()
    train, val = _old_rows(pydoc_documents(), tokenizer, 48, 0.1, 3)
    assert torch.equal(dm.train_set.rows(), train.long()) and torch.equal(dm.val_set.rows(), val.long())
    store = TokenStore.open(dm.cache_path, verify=True)
    assert store.dtype == dtype and dm.train_set.array.dtype == dtype
    # Only the tokens (and the header) are on disk: 1 byte per token for 102 ids, 2 for 257.
    assert os.path.getsize(dm.cache_path) == store.data_offset + store.num_tokens * np.dtype(dtype).itemsize
    assert store.num_tokens < (train.numel() + val.numel() + 2 * 48)
    assert dm.cache_path.suffix == ".tokens"
    batch = next(iter(dm.train_dataloader()))
    assert batch.dtype == torch.long and batch.shape == (64, 48)


def _jsonl_corpus(tmp_path, num_docs: int) -> str:
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "  ", "\n"]
    lines = [json.dumps({"text": " ".join(rng.choice(words, size=rng.integers(0, 30)))}) for _ in range(num_docs)]
    path = tmp_path / "corpus.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


def test_parallel_tokenising_writes_the_same_store_as_serial(tmp_path):
    corpus = _jsonl_corpus(tmp_path, 3 * BATCH_DOCS + 17)  # several batches, some documents blank
    serial = _files_dm([corpus], seq_len=16, cache_dir=str(tmp_path / "one"))
    parallel = _files_dm([corpus], seq_len=16, cache_dir=str(tmp_path / "two"), num_proc=2)
    serial.prepare_data()
    parallel.prepare_data()
    assert parallel.cache_path.name == serial.cache_path.name  # num_proc does not change the result
    assert parallel.cache_path.read_bytes() == serial.cache_path.read_bytes()
    docs = [json.loads(line)["text"] for line in open(corpus)]
    train, val = _old_rows(docs, ByteTokenizer(), 16, 0.05, 0)
    parallel.setup()
    assert torch.equal(parallel.train_set.rows(), train.long()) and torch.equal(parallel.val_set.rows(), val.long())


def test_old_pt_cache_is_converted_without_retokenising(tmp_path):
    files = [_write(tmp_path / f"d{i}.txt", f"document number {i} " * 20) for i in range(5)]
    cache = tmp_path / "cache"
    reference = _files_dm(files, seq_len=16, cache_dir=str(cache / "ref"))
    train, val = _old_rows([(tmp_path / f"d{i}.txt").read_text() for i in range(5)], ByteTokenizer(), 16, 0.05, 0)

    tok = CountingByteTokenizer()
    dm = _files_dm(files, tokenizer=tok, seq_len=16, cache_dir=str(cache))
    old = dm.legacy_cache_path
    assert old.suffix == ".pt" and old.name != dm.cache_path.name
    old.parent.mkdir(parents=True)
    torch.save({"train": train, "val": val, "tokenizer": tok.fingerprint()}, old)  # the previous format
    dm.setup()
    assert tok.calls == 0 and dm.cache_path.exists()
    assert torch.equal(dm.train_set.rows(), train.long()) and torch.equal(dm.val_set.rows(), val.long())
    reference.setup()  # and it is what tokenising gives
    assert torch.equal(reference.train_set.rows(), dm.train_set.rows())


def test_unreadable_old_pt_cache_says_how_to_rebuild(tmp_path):
    path = _write(tmp_path / "a.txt", "some text " * 30)
    dm = _files_dm([path], seq_len=8, cache_dir=str(tmp_path / "c"))
    dm.legacy_cache_path.parent.mkdir(parents=True)
    dm.legacy_cache_path.write_bytes(b"PK\x03\x04 not really a zip")
    message = r"old cache '.*\.pt' cannot be read \(.*\); delete it to tokenise"
    with pytest.raises(TokenStoreError, match=message) as err:
        dm.setup()
    assert "\n" not in str(err.value) and not dm.cache_path.exists()
    _files_dm([path], seq_len=8, cache_dir=str(tmp_path / "c"), rebuild=True).setup()  # rebuild ignores it


def test_damaged_store_says_how_to_rebuild_and_rebuild_repairs_it(tmp_path):
    files = [_write(tmp_path / f"d{i}.txt", f"document number {i} " * 20) for i in range(5)]
    first = _files_dm(files, seq_len=16, cache_dir=str(tmp_path / "c"))
    first.setup()
    rows = first.train_set.rows()
    path = first.cache_path
    path.write_bytes(path.read_bytes()[:-3])  # an interrupted copy
    fix = "delete it, or set data.init_args.rebuild=true, to rebuild it"
    with pytest.raises(TokenStoreError, match=f"token store '.*' is truncated: .*; {fix}"):
        _files_dm(files, seq_len=16, cache_dir=str(tmp_path / "c")).setup()

    tok = CountingByteTokenizer()
    again = _files_dm(files, tokenizer=tok, seq_len=16, cache_dir=str(tmp_path / "c"), rebuild=True)
    again.setup()
    again.prepare_data()  # once per run: a second call does not tokenise again
    assert tok.calls == 5 and torch.equal(again.train_set.rows(), rows)
    assert os.listdir(tmp_path / "c") == [path.name]

    store = TokenStore.open(path)
    data = bytearray(path.read_bytes())
    data[store.data_offset + 5] ^= 0x01  # a flipped bit in the tokens: only the checksum sees it
    path.write_bytes(bytes(data))
    _files_dm(files, seq_len=16, cache_dir=str(tmp_path / "c")).setup()
    with pytest.raises(TokenStoreError, match=f"do not match their SHA-256; {fix}"):
        _files_dm(files, seq_len=16, cache_dir=str(tmp_path / "c"), verify_store=True).setup()


def test_store_of_another_tokenizer_is_refused(tmp_path):
    path = _write(tmp_path / "a.txt", "some text " * 30)
    chars = _files_dm([path], tokenizer=CharTokenizer(), seq_len=8, cache_dir=str(tmp_path / "c"))
    chars.prepare_data()
    dm = _files_dm([path], seq_len=8, cache_dir=str(tmp_path / "c"))
    os.replace(chars.cache_path, dm.cache_path)  # e.g. a file copied in by hand
    with pytest.raises(TokenStoreError, match=r"was built for \(tokenizer, vocab_size, seq_len\) = \('CharTokenizer"):
        dm.setup()


def test_store_missing_under_ddp_is_not_rebuilt_by_every_process(tmp_path):
    dm = _files_dm([_write(tmp_path / "a.txt", "some text " * 30)], seq_len=8, cache_dir=str(tmp_path / "c"))
    dm.trainer = SimpleNamespace(world_size=2)  # prepare_data ran elsewhere (or not at all)
    with pytest.raises(FileNotFoundError, match="not found: prepare_data writes it"):
        dm.setup()
    assert not (tmp_path / "c").exists()


def test_loader_workers_read_the_same_batches(tmp_path):
    files = [_write(tmp_path / f"d{i}.txt", f"document number {i} " * 40) for i in range(6)]
    batches = {}
    for workers in (0, 2):
        dm = _files_dm(files, seq_len=16, batch_size=4, num_workers=workers, cache_dir=str(tmp_path / "c"))
        dm.setup()
        batches[workers] = list(dm.train_dataloader())
    assert len(batches[0]) > 3 and all(torch.equal(a, b) for a, b in zip(batches[0], batches[2], strict=True))


# ----- decoding policy -------------------------------------------------------------------------------


def test_non_utf8_file_fails_with_file_and_offset(tmp_path):
    path = tmp_path / "bad.txt"
    path.write_bytes("café and more text ".encode() * 3 + b"\xff tail")
    good = _write(tmp_path / "good.txt", "fine text " * 10)
    dm = _files_dm([good, str(path)], seq_len=8, cache_dir=str(tmp_path / "c"))
    offset = len("café and more text ".encode()) * 3
    message = (rf"'{path}' is not valid UTF-8 \(byte 0xff at offset {offset}\); fix the file, "
               r"or set data.init_args.decode_errors=replace")
    with pytest.raises(ValueError, match=message) as err:
        dm.setup()
    assert "\n" not in str(err.value) and not (tmp_path / "c").exists()  # nothing written


def test_replace_policy_reads_bad_bytes_as_replacement_and_logs_where(tmp_path, caplog):
    path = tmp_path / "bad.jsonl"
    data = b'{"text": "first line ok"}\n{"text": "bad \xc3 byte here"}\n{"text": "third line"}\n'
    path.write_bytes(data)
    offset = data.index(b"\xc3")  # 40
    dm = _files_dm([str(path)], seq_len=4, cache_dir=str(tmp_path / "c"), decode_errors="replace")
    with caplog.at_level(logging.WARNING, logger="lightning_ddd.data.text_sources"):
        dm.setup()
    warnings = [r.getMessage() for r in caplog.records if "not valid UTF-8" in r.getMessage()]
    assert len(warnings) == 1 and f"'{path}'" in warnings[0] and f"byte 0xc3 at offset {offset}" in warnings[0]
    text = "".join(dm.decode(torch.cat([dm.train_set.rows(), dm.val_set.rows()])))
    assert "\ufffd" in text
    strict = _files_dm([str(path)], seq_len=4, cache_dir=str(tmp_path / "c"))
    assert strict.cache_path != dm.cache_path  # a store read with replacements is not reused as strict
    with pytest.raises(ValueError, match=f"offset {offset}"):
        strict.setup()


@pytest.mark.parametrize("chunk", [1, 2, 3, 5, 64])
def test_first_invalid_byte_offset_matches_whole_file_decoding(tmp_path, chunk):
    rng = np.random.default_rng(chunk)
    pieces = ["a", "é", "€", "𝄞", "\n"]
    for trial in range(30):
        data = "".join(rng.choice(pieces, size=20)).encode()
        if trial % 3:  # damage one byte (sometimes inside a multi-byte character), or cut the end
            cut = int(rng.integers(0, len(data)))
            data = data[:cut] + bytes([int(rng.integers(128, 256))]) + data[cut + 1 :]
        elif trial % 2:
            data = data[: int(rng.integers(1, len(data)))]
        path = tmp_path / "x.bin"
        path.write_bytes(data)
        try:
            data.decode("utf-8")
            expected = None
        except UnicodeDecodeError as err:
            expected = (err.start, data[err.start])
        assert first_invalid_utf8(str(path), chunk=chunk) == expected, data
