"""The one module that touches private third-party APIs; ``tests/test_compat.py`` pins what is relied on.

Lightning's ``TensorBoardLogger`` takes ``default_hp_metric`` only at construction; the logger Lightning
builds by default keeps it on and logs ``hp_metric = -1``. :func:`turn_off_default_hp_metric` sets the
private attribute behind it. ``lightning_ddd.cli`` also overrides ``LightningCLI._parse_ckpt_path``, the
step of ``LightningCLI.__init__`` that merges a checkpoint's hyperparameters into the config (pinned too).

Lightning's ``WeightAveraging`` has no public way to put the averaged weights into the module outside its
own validation hooks. Its private ``_swap_models`` (exchange the module's parameters and buffers with the
average's; a swap is its own inverse) and ``_average_model`` (the ``AveragedModel``, None before ``setup``
and outside ``fit``) are what the sampling callbacks need to sample from the average at any hook.
``lightning_ddd.callbacks.EMA`` subclasses ``EMAWeightAveraging`` and keeps that protocol (``_average_model``
with ``update_parameters``, ``_swap_models``, ``_copy_average_to_current``), which its inherited hooks call.

Also here: loading a full state dict into a module the strategy may have sharded (Lightning's own loader,
private), whether ``nn.Module.compile`` ran on a module, torch's fused in-place lerp over a list of tensors (the EMA update), and the start time of
Lightning's ``ThroughputMonitor`` (shifted to leave the sampling callbacks' time out of training throughput).
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import WeightAveraging
from lightning.pytorch.utilities.rank_zero import rank_zero_warn


def weight_averages(trainer: pl.Trainer) -> list[WeightAveraging]:
    """The trainer's ``WeightAveraging`` callbacks that hold an average now (empty outside ``fit``)."""
    found = [cb for cb in trainer.callbacks
             if isinstance(cb, WeightAveraging) and getattr(cb, "_average_model", None) is not None]
    if found and not all(callable(getattr(cb, "_swap_models", None)) for cb in found):
        rank_zero_warn("this Lightning's WeightAveraging has no _swap_models: sampling uses the training weights.")
        return []
    return found


def swap_weights(callback: WeightAveraging, pl_module: pl.LightningModule) -> None:
    """Exchange ``pl_module``'s weights with ``callback``'s average (Lightning's own validation swap)."""
    callback._swap_models(pl_module)


def turn_off_default_hp_metric(logger) -> None:
    """Make a ``TensorBoardLogger`` log its hyperparameters without the placeholder ``hp_metric = -1``."""
    if hasattr(logger, "_default_hp_metric"):
        logger._default_hp_metric = False


def load_full_state_dict(strategy, pl_module: pl.LightningModule, state_dict: dict[str, Any], strict: bool = True) -> None:
    """Load a full (unsharded) state dict into ``pl_module`` as the strategy holds it now: sharded by FSDP
    (every rank passes the same dict), wrapped by DDP, or plain. Lightning's own loader for full checkpoints."""
    from lightning.fabric.strategies.model_parallel import _load_raw_module_state
    from lightning.pytorch.strategies import FSDPStrategy
    from torch.distributed.fsdp import FullyShardedDataParallel

    root = strategy.model if isinstance(strategy, FSDPStrategy) else None
    module = root if isinstance(root, FullyShardedDataParallel) else pl_module  # FSDP1 loads through its root
    _load_raw_module_state(state_dict, module=module, world_size=strategy.world_size, strict=strict)


def foreach_lerp_(targets: list[torch.Tensor], sources: list[torch.Tensor], weight: float) -> None:
    """``target += weight * (source - target)`` for every pair, in one fused call per device and dtype."""
    torch._foreach_lerp_(targets, sources, weight)


def compute_dtype(precision_plugin) -> torch.dtype:
    """The dtype a precision plugin computes matmuls in (what the peak FLOP/s of a device depends on)."""
    from lightning.pytorch.callbacks.throughput_monitor import _plugin_to_compute_dtype

    return _plugin_to_compute_dtype(precision_plugin)


def exclude_time(monitor, stage, seconds: float) -> None:
    """Leave ``seconds`` out of Lightning's ``ThroughputMonitor`` timing of ``stage`` (as it does for validation)."""
    if stage in monitor._t0s:
        monitor._t0s[stage] += seconds


def is_compiled(module: torch.nn.Module) -> bool:
    """Whether ``module.compile()`` has been called on this module (``nn.Module`` keeps the compiled call)."""
    return getattr(module, "_compiled_call_impl", None) is not None
