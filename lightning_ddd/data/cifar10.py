"""CIFAR-10 pixels as tokens: one token per colour channel of each pixel, values 0..255.

Token order is channel-major (C, H, W), the order of the official python batches: token index
``c * H * W + h * W + w`` is channel ``c`` (0 red, 1 green, 2 blue) of the pixel in row ``h``,
column ``w``. ``decode`` reshapes back to (N, 3, H, W).
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from lightning_ddd.data.base import TokenDataModule, TokenTensorDataset

URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
MD5 = "c58f30108f718f92721af3b95e74349a"
BATCHES_DIR = "cifar-10-batches-py"
TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
VAL_FILES = ("test_batch",)
_FULL_SIDE = 32
_CHANNELS = 3


class ByteTokenDataset(TokenTensorDataset):
    """Rows of a (N, D) uint8 tensor, returned as (D,) LongTensors.

    Full CIFAR-10 as int64 would take 1.2 GB; uint8 storage is 8x smaller and each row is widened only
    when it is fetched.
    """

    def __init__(self, tokens: Tensor) -> None:
        if tokens.dtype != torch.uint8 or tokens.dim() != 2:
            raise ValueError(f"expected a (N, D) uint8 tensor, got {tuple(tokens.shape)} {tokens.dtype}")
        self.tokens = tokens

    def __getitem__(self, index: int) -> Tensor:
        return self.tokens[index].long()


def find_batches_dir(root: str | Path) -> Path | None:
    """The folder holding all CIFAR-10 python batches: ``root/cifar-10-batches-py`` or ``root`` itself."""
    root = Path(root)
    for candidate in (root / BATCHES_DIR, root):
        if all((candidate / name).is_file() for name in TRAIN_FILES + VAL_FILES):
            return candidate
    return None


def load_batches(folder: Path, names: tuple[str, ...]) -> Tensor:
    """Concatenate the b"data" arrays of pickled batches; returns (N, 3072) uint8."""
    arrays = []
    for name in names:
        try:
            with open(folder / name, "rb") as f:
                # The official files were pickled by Python 2; "bytes" keeps their keys as b"data".
                batch = pickle.load(f, encoding="bytes")
            arrays.append(np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, _CHANNELS * _FULL_SIDE**2))
        except (pickle.UnpicklingError, EOFError, KeyError, IndexError, TypeError, ValueError, AttributeError) as err:
            raise ValueError(  # a truncated download, or another file under the official name
                f"CIFAR10Pixels: '{folder / name}' is not a readable CIFAR-10 python batch ({type(err).__name__}: "
                f"{err}); delete '{folder}' and download it again (download: true)."
            ) from err
    return torch.from_numpy(np.concatenate(arrays))


def downsample(images: Tensor, resolution: int) -> Tensor:
    """Average-pool (N, C, S, S) integer images to (N, C, r, r), rounding half up to integer levels."""
    n, c, side, _ = images.shape
    k = side // resolution
    if k == 1:
        return images
    # Integer sums keep the rounding exact: round(sum / k^2) = (sum + k^2 // 2) // k^2.
    sums = images.to(torch.int32).reshape(n, c, resolution, k, resolution, k).sum(dim=(3, 5))
    return ((sums + k * k // 2) // (k * k)).to(images.dtype)


def center_crop(images: Tensor, crop: int) -> Tensor:
    """Centre crop (N, C, S, S) -> (N, C, crop, crop); odd margins put the extra pixel at the end."""
    top = (images.shape[-1] - crop) // 2
    return images[..., top : top + crop, top : top + crop]


class CIFAR10Pixels(TokenDataModule):
    """CIFAR-10 images as sequences of 3 * H * W pixel tokens with 256 values.

    Train is ``data_batch_1..5`` (50,000 images), val is ``test_batch`` (10,000). Images are first
    average-pooled from 32x32 down to ``resolution`` (rounded to integer levels), then centre-cropped to
    ``crop``; H = W = ``crop`` if given, else ``resolution``. Tokens are in channel-major (C, H, W) order.

    Args:
        root: folder holding ``cifar-10-batches-py`` (or that folder itself).
        download: download and extract the official archive into ``root`` when the files are missing.
        resolution: side after average pooling; must divide 32 (32, 16, 8, 4, 2 or 1).
        crop: side of a centre crop taken after pooling, at most ``resolution``; None keeps the whole
            image.
        max_train: keep only this many training images (a seeded random subset) for quick runs; None
            keeps all 50,000.
        max_val: keep only the first this many validation images; None keeps all 10,000.
        batch_size: sequences per batch (per device).
        num_workers: DataLoader worker processes.
        seed: seed of the training subset and of the shuffling order.
    """

    modality = "image"

    def __init__(
        self,
        root: str = "data/cifar10",
        download: bool = False,
        resolution: int = 32,
        crop: int | None = None,
        max_train: int | None = None,
        max_val: int | None = None,
        batch_size: int = 64,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__(batch_size=batch_size, num_workers=num_workers, seed=seed)
        # Only values are checked here: the disk is not touched before prepare_data/setup.
        if resolution < 1 or _FULL_SIDE % resolution != 0:
            raise ValueError(f"CIFAR10Pixels: resolution={resolution} must divide 32; use 32, 16, 8 or 4.")
        if crop is not None and not 1 <= crop <= resolution:
            raise ValueError(f"CIFAR10Pixels: crop={crop} must lie in [1, {resolution}] (the resolution).")
        if max_train is not None and max_train < 1:
            raise ValueError(f"CIFAR10Pixels: max_train={max_train} must be >= 1; or use null for all.")
        if max_val is not None and max_val < 1:
            raise ValueError(f"CIFAR10Pixels: max_val={max_val} must be >= 1; or use null for all.")
        self.root = root
        self.download = download
        self.resolution = resolution
        self.crop = crop
        self.max_train = max_train
        self.max_val = max_val

    @property
    def side(self) -> int:
        """Height = width of the token images."""
        return self.crop if self.crop is not None else self.resolution

    @property
    def vocab_size(self) -> int:
        return 256

    @property
    def seq_len(self) -> int:
        return _CHANNELS * self.side * self.side

    def _require_files(self) -> Path:
        folder = find_batches_dir(self.root)
        if folder is None:
            missing = Path(self.root) / BATCHES_DIR
            raise FileNotFoundError(
                f"CIFAR10Pixels: no CIFAR-10 batches in {missing}; "
                "set download: true or point root at a folder holding cifar-10-batches-py."
            )
        return folder

    def prepare_data(self) -> None:
        """Download and extract the official archive when the batches are missing and download is on."""
        if find_batches_dir(self.root) is not None:
            return
        if not self.download:
            self._require_files()  # raises before anything is written
        from torchvision.datasets.utils import download_and_extract_archive  # lazy: heavy import

        download_and_extract_archive(URL, download_root=self.root, filename=URL.rsplit("/", 1)[-1], md5=MD5)
        self._require_files()  # the archive must have produced the batches

    def _to_tokens(self, flat: Tensor, chunk: int = 10_000) -> Tensor:
        """(N, 3072) uint8 in C,H,W order -> (N, 3 * side^2) uint8 after pooling and cropping."""
        out = []
        # Chunks bound the int32 copy that pooling makes (600 MB for the whole train set at once).
        for part in flat.split(chunk):
            images = part.reshape(-1, _CHANNELS, _FULL_SIDE, _FULL_SIDE)  # (n, 3, 32, 32)
            images = downsample(images, self.resolution)  # (n, 3, r, r)
            if self.crop is not None:
                images = center_crop(images, self.crop)  # (n, 3, crop, crop)
            out.append(images.reshape(images.shape[0], -1))
        return torch.cat(out)  # (N, 3 * side^2), a fresh contiguous tensor

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return  # Lightning calls setup once per stage; the data never changes.
        # Without a Trainer nobody calls prepare_data; under one, this is a no-op on files already there.
        self.prepare_data()
        folder = self._require_files()
        train = load_batches(folder, TRAIN_FILES)  # (50000, 3072) uint8
        if self.max_train is not None and self.max_train < len(train):
            g = torch.Generator().manual_seed(self.seed)
            train = train[torch.randperm(len(train), generator=g)[: self.max_train].sort().values]
        val = load_batches(folder, VAL_FILES)  # (10000, 3072) uint8
        if self.max_val is not None:
            # A fixed prefix, not a seeded subset, so val scores compare across seeds.
            val = val[: self.max_val]
        self.train_set = ByteTokenDataset(self._to_tokens(train))
        self.val_set = ByteTokenDataset(self._to_tokens(val))

    def decode(self, tokens: Tensor) -> Tensor:
        """(N, 3 * H * W) token ids -> (N, 3, H, W) float images in [0, 1]."""
        # Clamping shows a leftover mask id (256) as full intensity instead of an out-of-range value.
        images = tokens.reshape(-1, _CHANNELS, self.side, self.side).float() / 255.0
        return images.clamp(0.0, 1.0)
