"""A shuffled training loader that resumes mid-epoch exactly: the epoch's order comes from (seed, epoch) alone,
and the loader's position in it is saved in Lightning checkpoints.

Lightning asks every training loader that has ``state_dict`` / ``load_state_dict`` for its state when it writes
a checkpoint and hands the state back on resume (its "resumable loader" protocol; without it a mid-epoch
resume replays the epoch from batch 0 and Lightning warns that the dataloader is not resumable). The position
is the number of batches this loader has handed out in the current epoch, counted in the main process where
Lightning receives them, so worker prefetching does not inflate it; Lightning itself does not prefetch from a
loader that has a length. On resume the sampler skips that many batches' worth of its permutation, so no data
is read to fast-forward: a memory-mapped text corpus resumes as fast as a small tensor.
"""

from __future__ import annotations

import signal
import warnings
from typing import Any, Callable, Iterator

import torch
from torch.utils.data import DataLoader, Sampler

#: indices handed out per chunk: the epoch's permutation is never turned into one Python list
_CHUNK = 1 << 16


class EpochSeededSampler(Sampler[int]):
    """Shuffles with a permutation that depends only on (seed, epoch), optionally from an offset into it.

    Lightning calls ``set_epoch`` on samplers that have it, so a resumed run sees exactly the batches an
    uninterrupted run would. ``start`` skips the permutation's first items (set by
    :class:`ResumableDataLoader` before each iteration: the batches already trained on when resuming, else 0); ``len`` stays the whole epoch, as Lightning counts
    batches from the epoch's start. Under DDP Lightning wraps it in a distributed sampler (see
    :class:`ResumableDataLoader` for what that means for resuming).

    Args:
        num_items: size of the dataset.
        seed: seed of the permutations.
    """

    def __init__(self, num_items: int, seed: int = 0) -> None:
        self.num_items = num_items
        self.seed = seed
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def permutation(self) -> torch.Tensor:
        """This epoch's order, (num_items,) int64."""
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return torch.randperm(self.num_items, generator=g)

    def __iter__(self) -> Iterator[int]:
        perm = self.permutation()[self.start:]
        for chunk in perm.split(_CHUNK):  # a list of 8.8M Python ints would cost ~300 MB
            yield from chunk.tolist()

    def __len__(self) -> int:
        return self.num_items


class ResumableDataLoader(DataLoader):
    """A DataLoader over an :class:`EpochSeededSampler` whose place in the epoch survives a checkpoint.

    ``state_dict()`` is ``{"epoch", "batches"}``: the sampler's epoch and the batches handed out in it. After
    ``load_state_dict``, the next iteration of that same epoch starts at batch ``batches``; an iteration of
    another epoch (the saved one had ended) starts at its beginning. Takes DataLoader's arguments; worker
    processes ignore Ctrl-C, so an interrupt reaches only the main process, which stops at a step boundary
    (see ``lightning_ddd.callbacks.ResumableCheckpoint``) instead of losing its workers mid-batch.

    Under DDP Lightning replaces the sampler by a distributed wrapper that cannot skip; a mid-epoch resume
    then warns and replays the epoch, as a plain DataLoader would.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        if kwargs.get("num_workers", 0) > 0:
            kwargs["worker_init_fn"] = _IgnoreInterrupt(kwargs.get("worker_init_fn"))
        super().__init__(*args, **kwargs)
        self._handed_out = 0  # batches of the current epoch handed to the consumer
        self._resume: dict[str, int] | None = None  # a loaded state not yet applied

    def __iter__(self) -> Iterator[Any]:
        # A generator: the body (and so the sampler's permutation) starts at the first batch, after Lightning
        # has called set_epoch, whichever comes first of iter() and set_epoch.
        start = self._start_batch()
        if isinstance(self.sampler, EpochSeededSampler):
            # Set for every iteration (0 unless resuming): the sampler reads it when the first index is drawn.
            self.sampler.start = start * self.batch_size
        self._handed_out = start
        for batch in super().__iter__():
            self._handed_out += 1  # counted when handed over: the state never includes a batch not yet trained on
            yield batch

    def _start_batch(self) -> int:
        """The batch to start the coming iteration at: the loaded position when it is this epoch's, else 0."""
        resume, self._resume = self._resume, None
        if resume is None:
            return 0
        epoch = getattr(self.sampler, "epoch", None)
        batches = int(resume.get("batches", 0))
        if epoch != resume.get("epoch") or not 0 < batches < len(self):
            return 0  # the saved epoch had ended (or nothing to skip): a new epoch starts at its beginning
        if not isinstance(self.sampler, EpochSeededSampler):
            warnings.warn(
                f"resuming in the middle of an epoch (batch {batches} of {len(self)}) with a "
                f"{type(self.sampler).__name__}, which cannot skip: this epoch is replayed from its first batch.",
                stacklevel=3,
            )
            return 0
        return batches

    def state_dict(self) -> dict[str, int]:
        return {"epoch": int(getattr(self.sampler, "epoch", 0)), "batches": self._handed_out}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        self._resume = dict(state_dict)


class _IgnoreInterrupt:
    """``worker_init_fn`` that makes a worker ignore SIGINT, then runs the user's own (picklable for spawn)."""

    def __init__(self, inner: Callable[[int], None] | None) -> None:
        self.inner = inner

    def __call__(self, worker_id: int) -> None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        if self.inner is not None:
            self.inner(worker_id)
