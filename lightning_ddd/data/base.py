"""The contract every DataModule of the registry follows.

A batch is a LongTensor of token ids, shape (B, D), values in [0, vocab_size). ``vocab_size`` and
``seq_len`` are known right after ``__init__`` (no download needed), because LightningCLI links them
into the model before any data is touched.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import lightning.pytorch as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from lightning_ddd.data.resumable import EpochSeededSampler, ResumableDataLoader

__all__ = ["EpochSeededSampler", "ResumableDataLoader", "TokenDataModule", "TokenTensorDataset"]


class TokenTensorDataset(Dataset):
    """Rows of a (N, D) LongTensor; each item is one (D,) sequence."""

    def __init__(self, tokens: Tensor) -> None:
        if tokens.dtype != torch.long or tokens.dim() != 2:
            raise ValueError(f"expected a (N, D) LongTensor, got {tuple(tokens.shape)} {tokens.dtype}")
        self.tokens = tokens

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def __getitem__(self, index: int) -> Tensor:
        return self.tokens[index]


class TokenDataModule(pl.LightningDataModule, ABC):
    """Base class of the DataModule registry.

    Subclasses set ``self.train_set`` / ``self.val_set`` (datasets of (D,) LongTensors) in ``setup`` and
    define ``vocab_size`` and ``seq_len``. ``modality`` tells sample writers how to show tokens.

    Args:
        batch_size: sequences per batch (per device).
        num_workers: DataLoader worker processes.
        seed: seed of the shuffling order (and of any synthetic data).
    """

    modality: str = "sequence"  # "sequence" | "text" | "image"

    def __init__(self, batch_size: int = 64, num_workers: int = 0, seed: int = 0) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"{type(self).__name__}: batch_size={batch_size} must be >= 1.")
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None

    @property
    @abstractmethod
    def vocab_size(self) -> int:
        """Number of real token ids (the masked process adds one more, the mask, with id ``vocab_size``)."""

    @property
    @abstractmethod
    def seq_len(self) -> int:
        """Number of dimensions D of one sample."""

    def decode(self, tokens: Tensor) -> list[str] | Tensor:
        """Turn (N, D) token ids into something a person can look at.

        Returns a list of N strings for text, a (N, C, H, W) float tensor in [0, 1] for images, and the
        ids as space-separated strings otherwise.
        """
        return [" ".join(str(int(v)) for v in row) for row in tokens]

    def oracle_log_likelihood(self, tokens: Tensor) -> Tensor | None:
        """Exact log p_data of (N, D) sequences, shape (N,), or None when the data has no known density."""
        return None

    def sample_statistics(self, tokens: Tensor) -> dict[str, float]:
        """Figures that compare (N, D) samples with the data's known structure (e.g. per-position marginal KL).

        Empty unless the data's law is known; ``lightning_ddd.evaluation.sample_metrics`` reports them next
        to the oracle NLL, and on real sequences they give the floor a perfect sampler reaches at the same N.
        """
        return {}

    def _loader(self, dataset: Dataset | None, shuffle: bool) -> DataLoader:
        if dataset is None:
            raise RuntimeError(f"{type(self).__name__}: call setup() before asking for a dataloader.")
        # The shuffled (training) loader saves its place in the epoch in checkpoints; evaluation loaders restart.
        if shuffle:
            loader_class, sampler = ResumableDataLoader, EpochSeededSampler(len(dataset), self.seed)
        else:
            loader_class, sampler = DataLoader, None
        return loader_class(
            dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            num_workers=self.num_workers,
            drop_last=shuffle,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, shuffle=False)
