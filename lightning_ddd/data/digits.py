"""scikit-learn's 8x8 hand-written digits as token sequences: a small real image set with no download."""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_ddd.data.base import TokenDataModule, TokenTensorDataset

_SIDE = 8  # images are 8x8
_LEVELS = 17  # grey levels 0..16


class Digits(TokenDataModule):
    """The 1,797 scikit-learn digits, one token per pixel (grey level 0..16) in raster order.

    The data ships inside scikit-learn, so nothing is downloaded. Token index ``h * 8 + w`` is the pixel
    in row ``h``, column ``w``.

    Args:
        val_fraction: share of the images held out for validation, in (0, 1); the split is drawn with
            ``seed``.
        batch_size: sequences per batch (per device).
        num_workers: DataLoader worker processes.
        seed: seed of the train/val split and of the shuffling order.
    """

    modality = "image"

    def __init__(
        self,
        val_fraction: float = 0.1,
        batch_size: int = 64,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__(batch_size=batch_size, num_workers=num_workers, seed=seed)
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"Digits: val_fraction={val_fraction} must lie in (0, 1), e.g. 0.1.")
        self.val_fraction = val_fraction

    @property
    def vocab_size(self) -> int:
        return _LEVELS

    @property
    def seq_len(self) -> int:
        return _SIDE * _SIDE

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return  # Lightning calls setup once per stage; the split never changes.
        from sklearn.datasets import load_digits  # lazy: sklearn is slow to import

        # load_digits gives float64 grey levels that are exactly the integers 0..16.
        tokens = torch.from_numpy(load_digits().data).round().long()  # (1797, 64)
        num_val = max(1, round(self.val_fraction * len(tokens)))
        order = torch.randperm(len(tokens), generator=torch.Generator().manual_seed(self.seed))
        # Sorting keeps each split in the file's order, which makes the splits easy to inspect.
        self.val_set = TokenTensorDataset(tokens[order[:num_val].sort().values])
        self.train_set = TokenTensorDataset(tokens[order[num_val:].sort().values])

    def decode(self, tokens: Tensor) -> Tensor:
        """(N, 64) token ids -> (N, 1, 8, 8) float images in [0, 1]."""
        # Clamping shows a leftover mask id (17) as white instead of an out-of-range value.
        images = tokens.reshape(-1, 1, _SIDE, _SIDE).float() / (_LEVELS - 1)
        return images.clamp(0.0, 1.0)
