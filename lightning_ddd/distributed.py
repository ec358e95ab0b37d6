"""What several processes need beyond Lightning's loops: sharing a sampling job, and clipping sharded gradients.

:class:`Ranks` is a process's place in a data-parallel sampling or evaluation job: its share of N samples,
the seed of its noise stream, and the gathers that bring the shares together (on every rank, in rank order).
With one process every method is the identity, so a single-process run is exactly what it was before.

:func:`clip_grad_norm_` clips one optimiser's gradients by their global norm when the strategy shards them.
Lightning's FSDP precision plugin refuses norm clipping (``torch.nn.utils.clip_grad_norm_`` on the local shards
would clip by the norm of one shard); ``DiffusionModule.clip_gradients`` calls this instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch
import torch.distributed as dist
from torch import Tensor


def local_tensor(tensor: Tensor) -> Tensor:
    """The part of ``tensor`` this process holds: a DTensor's local shard (FSDP2), else the tensor itself."""
    to_local = getattr(tensor, "to_local", None)  # torch.distributed.tensor.DTensor
    return to_local() if callable(to_local) else tensor


def _collective_device() -> torch.device:
    """Where tensors must live for a collective of the default process group (NCCL: this rank's GPU)."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


@dataclass(frozen=True)
class Ranks:
    """This process's place among the ``world_size`` processes that share one sampling or evaluation job.

    Rank r draws ``share(N)`` = ceil(N / world_size) samples from the noise stream ``seed(s)``; ``gather``
    concatenates the shares in rank order on every rank and the caller keeps the first N rows, so the job
    draws N samples whatever the world size. Every rank draws the same number (the last one may draw a
    few that are dropped): under a sharded strategy every rank must run the same forward passes.

    Attributes:
        rank: this process's global rank.
        world_size: number of processes sharing the job (1: no collectives are ever called).
    """

    rank: int = 0
    world_size: int = 1

    @classmethod
    def of(cls, trainer) -> "Ranks":
        """The ranks of a Trainer (after its strategy has set up the processes)."""
        return cls(trainer.global_rank, trainer.world_size)

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"Ranks: rank={self.rank} must lie in [0, world_size={self.world_size}).")

    def share(self, num: int) -> int:
        """Rows this rank draws of ``num``."""
        return -(-num // self.world_size)

    def rows(self, num: int) -> slice:
        """Which of ``num`` gathered rows this rank scores with metrics whose states are summed over ranks."""
        per = self.share(num)
        return slice(min(self.rank * per, num), min((self.rank + 1) * per, num))

    def seed(self, seed: int) -> int:
        """The seed of this rank's noise stream: ``seed`` itself on rank 0 (one process draws what it always
        drew), a mix of (seed, rank) elsewhere, so no two ranks or settings share draws."""
        if self.rank == 0:
            return seed
        return ((seed * 1_000_003 + self.rank) * 1_000_033 + 7919) % (2**63)

    def gather(self, tensor: Tensor) -> Tensor:
        """Every rank's (n_r, ...) tensor concatenated in rank order, on every rank (on ``tensor``'s device).

        Shares may differ in their first dimension; the other dimensions and the dtype must agree.
        """
        if self.world_size == 1:
            return tensor
        device = _collective_device()
        sizes = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(self.world_size)]
        dist.all_gather(sizes, torch.tensor([tensor.shape[0]], device=device))
        longest = max(int(s) for s in sizes)
        padded = tensor.new_zeros((longest, *tensor.shape[1:]), device=device)
        padded[: tensor.shape[0]] = tensor.to(device)
        parts = [torch.empty_like(padded) for _ in range(self.world_size)]
        dist.all_gather(parts, padded)
        return torch.cat([part[: int(n)] for part, n in zip(parts, sizes)]).to(tensor.device)

    def max(self, value: float) -> float:
        """The largest ``value`` over ranks (e.g. the wall time of a job that ends with its slowest rank)."""
        if self.world_size == 1:
            return value
        out = torch.tensor([float(value)], dtype=torch.float64, device=_collective_device())
        dist.all_reduce(out, op=dist.ReduceOp.MAX)
        return out.item()

    def first(self):
        """Context manager: rank 0 runs the block first, then the others (e.g. filling a shared cache)."""
        return _RankZeroFirst(self)


class _RankZeroFirst:
    def __init__(self, ranks: Ranks) -> None:
        self.ranks = ranks

    def __enter__(self) -> None:
        if self._together() and self.ranks.rank != 0:
            dist.barrier()  # wait for rank 0's block

    def __exit__(self, *exc) -> None:
        if self._together() and self.ranks.rank == 0:
            dist.barrier()  # release the others

    def _together(self) -> bool:
        return self.ranks.world_size > 1 and dist.is_available() and dist.is_initialized()


def reshard(module: torch.nn.Module) -> None:
    """Put every FSDP2 unit of ``module`` back into its sharded form: a root unit keeps its gathered weights
    after a forward pass without backward (validation, sampling), and the sharded tensors are the ones
    registered as parameters only when resharded. A no-op without FSDP2."""
    from torch.distributed.fsdp import FSDPModule

    for sub in module.modules():
        if isinstance(sub, FSDPModule):
            sub.reshard()


def fully_shard_units(module: torch.nn.Module, mesh, unit_types: tuple[type, ...]) -> list[str]:
    """FSDP2: shard every submodule of one of ``unit_types`` over ``mesh``, innermost first (e.g. transformer
    blocks, then the backbone that holds them, whose remaining weights form one unit). A network called on
    its own (sampling calls the backbone directly) gathers its weights in its own forward hook. Modules
    sharded already are left alone, so this may run more than once. Returns the names sharded now."""
    from torch.distributed.fsdp import FSDPModule, fully_shard

    named = [(name, sub) for name, sub in module.named_modules() if isinstance(sub, unit_types)]
    sharded = []
    for name, sub in sorted(named, key=lambda item: -item[0].count(".")):  # deepest first
        if not isinstance(sub, FSDPModule):
            fully_shard(sub, mesh=mesh)
            sharded.append(name)
    return sharded


def sharded_gradients(strategy) -> bool:
    """Whether ``strategy`` shards gradients (FSDP), so that norm clipping needs :func:`clip_grad_norm_`."""
    from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy

    return isinstance(strategy, (FSDPStrategy, ModelParallelStrategy))


def gradient_replicas(strategy) -> int:
    """How many ranks hold each gradient element under ``strategy`` (FSDP1's plain-tensor shards).

    Raises:
        ValueError: for hybrid sharding (shards within a node, replicas across), which this does not reduce.
    """
    from torch.distributed.fsdp import ShardingStrategy

    sharding = getattr(strategy, "sharding_strategy", ShardingStrategy.FULL_SHARD)
    if sharding == ShardingStrategy.NO_SHARD:
        return strategy.world_size
    if sharding in (ShardingStrategy.FULL_SHARD, ShardingStrategy.SHARD_GRAD_OP):
        return 1
    raise ValueError(
        f"norm clipping under FSDP sharding_strategy={sharding.name} is not supported; use FULL_SHARD or "
        "SHARD_GRAD_OP, or gradient_clip_algorithm='value'."
    )


@torch.no_grad()
def clip_grad_norm_(parameters: Iterable[Tensor], max_norm: float, replicas: int = 1) -> Tensor:
    """Scale the gradients of ``parameters`` so that their global 2-norm is at most ``max_norm``; return the norm.

    Gradients may be sharded over the processes: DTensors (FSDP2) go to ``torch.nn.utils.clip_grad_norm_``,
    which reduces over their mesh; plain local tensors (FSDP1's ``use_orig_params`` views of the rank's
    shard) are reduced here: the squared norms of the local shards are summed over all ranks and divided by
    ``replicas``, the number of ranks that hold each element (1 under full sharding). The scale is torch's,
    ``min(1, max_norm / (norm + 1e-6))``.

    Args:
        parameters: the parameters of one optimiser (every rank passes its own, in the same order).
        max_norm: the largest allowed global norm.
        replicas: ranks holding each element (plain tensors in a process group only).
    """
    params = [p for p in parameters if p.grad is not None]
    if any(hasattr(p.grad, "to_local") for p in params):
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    device = params[0].grad.device if params else _collective_device()
    squared = torch.nn.utils.get_total_norm([p.grad for p in params]).float().square() if params else \
        torch.zeros((), device=device)
    if dist.is_available() and dist.is_initialized():
        squared = squared.to(_collective_device())
        dist.all_reduce(squared)
        squared = squared.to(device) / replicas
    norm = squared.sqrt()
    if params:
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
    return norm
