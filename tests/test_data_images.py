"""Image DataModules: scikit-learn digits, and CIFAR-10 read from a tiny fake set in the real format."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from lightning_ddd.data.cifar10 import CIFAR10Pixels
from lightning_ddd.data.digits import Digits

PER_FILE = 4  # images in each fake batch file
TRAIN_FILES = [f"data_batch_{i}" for i in range(1, 6)]


# ----------------------------------------------------------------------------------------- digits


@pytest.fixture(scope="module")
def digits() -> Digits:
    dm = Digits(batch_size=32)
    dm.setup("fit")
    return dm


def test_digits_shapes_and_range(digits):
    assert (digits.vocab_size, digits.seq_len, digits.modality) == (17, 64, "image")
    train, val = digits.train_set.tokens, digits.val_set.tokens
    assert train.dtype == torch.long and train.shape[1] == 64
    assert len(train) + len(val) == 1797
    assert len(val) == round(0.1 * 1797)
    assert train.min() == 0 and train.max() == 16
    batch = next(iter(digits.train_dataloader()))
    assert batch.shape == (32, 64) and batch.dtype == torch.long


def test_digits_split_is_deterministic_and_disjoint(digits):
    again = Digits(batch_size=32)
    again.setup()
    assert torch.equal(again.val_set.tokens, digits.val_set.tokens)
    other = Digits(batch_size=32, seed=1)
    other.setup()
    assert not torch.equal(other.val_set.tokens, digits.val_set.tokens)
    # Every image lands in exactly one split: compare the sorted multisets of rows.
    from sklearn.datasets import load_digits

    everything = torch.from_numpy(load_digits().data).long()
    joined = torch.cat([digits.train_set.tokens, digits.val_set.tokens])
    assert torch.equal(joined.unique(dim=0), everything.unique(dim=0))


def test_digits_decode(digits):
    tokens = digits.val_set.tokens[:5]
    images = digits.decode(tokens)
    assert images.shape == (5, 1, 8, 8) and images.dtype == torch.float32
    assert images.min() >= 0 and images.max() <= 1
    torch.testing.assert_close(images.reshape(5, 64) * 16, tokens.float())


def test_digits_rejects_bad_val_fraction():
    with pytest.raises(ValueError, match="val_fraction"):
        Digits(val_fraction=1.0)


# ---------------------------------------------------------------------------------------- CIFAR-10


def write_fake_cifar(root: Path, images: dict[str, np.ndarray] | None = None) -> Path:
    """Write the five train batches and the test batch as the official pickles, (PER_FILE, 3072) each.

    Each image is filled with a distinct constant so rows can be traced back; ``images`` overrides
    whole files with given (n, 3, 32, 32) uint8 arrays.
    """
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    images = images or {}
    for i, name in enumerate(TRAIN_FILES + ["test_batch"]):
        if name in images:
            data = images[name].reshape(len(images[name]), 3072)
        else:
            values = np.arange(PER_FILE, dtype=np.uint8) + 10 * i
            data = np.repeat(values[:, None], 3072, axis=1).astype(np.uint8)
        batch = {b"batch_label": name.encode(), b"labels": [0] * len(data), b"data": data}
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f)
    return folder


def one_image(fill: int = 0) -> np.ndarray:
    return np.full((1, 3, 32, 32), fill, dtype=np.uint8)


def test_cifar_loads_fake_batches(tmp_path):
    write_fake_cifar(tmp_path)
    dm = CIFAR10Pixels(root=str(tmp_path), batch_size=4)
    assert (dm.vocab_size, dm.seq_len, dm.modality) == (256, 3072, "image")
    dm.setup("fit")
    train, val = dm.train_set.tokens, dm.val_set.tokens
    assert train.shape == (5 * PER_FILE, 3072) and val.shape == (PER_FILE, 3072)
    # Files are read in order data_batch_1..5, each image a constant 10 * file + row.
    expected = torch.tensor([10 * f + r for f in range(5) for r in range(PER_FILE)])
    assert torch.equal(train[:, 0].long(), expected)
    assert torch.equal(val[:, 0].long(), torch.arange(PER_FILE) + 50)
    batch = next(iter(dm.train_dataloader()))
    assert batch.shape == (4, 3072) and batch.dtype == torch.long
    assert batch.min() >= 0 and batch.max() < 256


def test_cifar_accepts_the_batches_folder_itself(tmp_path):
    folder = write_fake_cifar(tmp_path)
    dm = CIFAR10Pixels(root=str(folder), batch_size=4)
    dm.setup()
    assert len(dm.train_set) == 5 * PER_FILE


def test_cifar_token_order_is_channel_major(tmp_path):
    image = one_image()
    image[0, 1, 5, 7] = 200  # green channel, row 5, column 7
    write_fake_cifar(tmp_path, {"test_batch": image})
    dm = CIFAR10Pixels(root=str(tmp_path), batch_size=4)
    dm.setup()
    tokens = dm.val_set[0]
    assert tokens.dtype == torch.long
    assert tokens[1 * 1024 + 5 * 32 + 7] == 200
    assert tokens.sum() == 200
    assert dm.decode(tokens[None])[0, 1, 5, 7] == pytest.approx(200 / 255)


@pytest.mark.parametrize("resolution", [16, 8, 1])
def test_cifar_downsampling_keeps_constant_images(tmp_path, resolution):
    write_fake_cifar(tmp_path, {"test_batch": one_image(fill=137)})
    dm = CIFAR10Pixels(root=str(tmp_path), resolution=resolution, batch_size=4)
    assert dm.seq_len == 3 * resolution**2
    dm.setup()
    assert dm.val_set.tokens.shape == (1, 3 * resolution**2)
    assert (dm.val_set.tokens == 137).all()


def test_cifar_downsampling_averages_2x2_blocks(tmp_path):
    image = one_image()
    image[0, 0, 0:2, 0:2] = [[1, 2], [3, 4]]  # mean 2.5 rounds half up to 3
    image[0, 0, 0:2, 2:4] = [[0, 0], [0, 1]]  # mean 0.25 rounds to 0
    image[0, 2, 30:32, 30:32] = [[255, 254], [255, 254]]  # mean 254.5 rounds to 255, no overflow
    image[0, 1, 4:6, 6:8] = [[10, 11], [12, 13]]  # mean 11.5 rounds to 12
    write_fake_cifar(tmp_path, {"test_batch": image})
    dm = CIFAR10Pixels(root=str(tmp_path), resolution=16, batch_size=4)
    dm.setup()
    pooled = dm.decode(dm.val_set.tokens) * 255  # (1, 3, 16, 16)
    pooled = pooled.round().long()[0]
    assert pooled[0, 0, 0] == 3
    assert pooled[0, 0, 1] == 0
    assert pooled[2, 15, 15] == 255
    assert pooled[1, 2, 3] == 12
    assert pooled.sum() == 3 + 255 + 12


def test_cifar_center_crop(tmp_path):
    image = np.arange(32, dtype=np.uint8)[None, None, :, None] + np.zeros((1, 3, 32, 32), np.uint8)
    write_fake_cifar(tmp_path, {"test_batch": image})  # each row h holds the value h
    dm = CIFAR10Pixels(root=str(tmp_path), crop=4, batch_size=4)
    assert dm.seq_len == 3 * 16
    dm.setup()
    rows = dm.decode(dm.val_set.tokens)[0, 0, :, 0] * 255
    torch.testing.assert_close(rows, torch.tensor([14.0, 15.0, 16.0, 17.0]))


def test_cifar_pool_then_crop(tmp_path):
    dm = CIFAR10Pixels(root=str(tmp_path), resolution=16, crop=12, batch_size=4)
    assert dm.seq_len == 3 * 12 * 12
    write_fake_cifar(tmp_path)
    dm.setup()
    assert dm.train_set.tokens.shape == (5 * PER_FILE, 3 * 12 * 12)
    assert dm.decode(dm.train_set.tokens).shape == (5 * PER_FILE, 3, 12, 12)


def test_cifar_decode_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(PER_FILE, 3, 32, 32), dtype=np.uint8)
    write_fake_cifar(tmp_path, {"test_batch": images})
    dm = CIFAR10Pixels(root=str(tmp_path), batch_size=4)
    dm.setup()
    decoded = dm.decode(torch.stack([dm.val_set[i] for i in range(PER_FILE)]))
    assert decoded.shape == (PER_FILE, 3, 32, 32) and decoded.min() >= 0 and decoded.max() <= 1
    assert torch.equal((decoded * 255).round().to(torch.uint8), torch.from_numpy(images))


def test_cifar_max_train_and_max_val(tmp_path):
    write_fake_cifar(tmp_path)
    a = CIFAR10Pixels(root=str(tmp_path), max_train=7, max_val=2, batch_size=4)
    b = CIFAR10Pixels(root=str(tmp_path), max_train=7, max_val=2, batch_size=4)
    a.setup()
    b.setup()
    assert len(a.train_set) == 7 and len(a.val_set) == 2
    assert torch.equal(a.train_set.tokens, b.train_set.tokens)
    # The subset is made of real rows, each at most once.
    firsts = a.train_set.tokens[:, 0].long().tolist()
    assert len(set(firsts)) == 7 and all(v // 10 < 5 and v % 10 < PER_FILE for v in firsts)


@pytest.mark.parametrize("step", ["setup", "prepare_data"])
def test_cifar_missing_files_raise_before_writing(tmp_path, step):
    root = tmp_path / "nowhere"
    dm = CIFAR10Pixels(root=str(root))  # init must not touch the disk
    assert dm.seq_len == 3072
    with pytest.raises(FileNotFoundError) as info:
        getattr(dm, step)()
    message = str(info.value)
    assert "\n" not in message
    assert str(root / "cifar-10-batches-py") in message
    assert "download: true" in message
    assert not root.exists()


def test_cifar_download_path_without_network(tmp_path, monkeypatch):
    import torchvision.datasets.utils as tv_utils

    calls = []

    def fake_download(url, download_root, filename=None, md5=None, **kwargs):
        calls.append((url, md5))
        write_fake_cifar(Path(download_root))

    monkeypatch.setattr(tv_utils, "download_and_extract_archive", fake_download)
    dm = CIFAR10Pixels(root=str(tmp_path / "new"), download=True, batch_size=4)
    dm.prepare_data()
    dm.prepare_data()  # files present now: no second download
    dm.setup()
    assert len(calls) == 1 and calls[0][1] == "c58f30108f718f92721af3b95e74349a"
    assert len(dm.train_set) == 5 * PER_FILE


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(resolution=12), "resolution"),
        (dict(resolution=0), "resolution"),
        (dict(resolution=16, crop=20), "crop"),
        (dict(crop=0), "crop"),
        (dict(max_train=0), "max_train"),
        (dict(max_val=0), "max_val"),
    ],
)
def test_cifar_invalid_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        CIFAR10Pixels(**kwargs)
