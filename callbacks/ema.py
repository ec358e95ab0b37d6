"""An exponential moving average of the weights that works whether the strategy replicates or shards them.

Why Lightning's ``EMAWeightAveraging`` fails with sharded models: its ``setup`` deep-copies the whole
LightningModule into an ``AveragedModel`` before the strategy wraps it, so every rank keeps a full unsharded
copy (the memory FSDP was meant to save), and after FSDP has sharded the module the two parameter lists no
longer line up: the update, the validation swap and ``on_train_end`` zip them and copy between tensors of
different shapes. Its checkpoint hook writes the copy's own ``state_dict`` rather than what the strategy
gathers. The deep copy also takes everything the module holds (the CLI's optimiser factories, which cannot
be pickled under DDP), and the update runs one parameter at a time.

:class:`EMA` keeps Lightning's arguments, update rule, schedule (``should_update``) and checkpoint layout and
replaces only the average itself: one tensor per parameter shaped like what the module holds on this rank,
created after the strategy has set the module up (so sharded exactly as the weights are), updated with one
fused lerp, and written through the strategy's own state-dict hook.
"""

from __future__ import annotations

import os
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import EMAWeightAveraging
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy
from lightning.pytorch.trainer.states import TrainerFn
from torch import Tensor
from torch.distributed.fsdp import FSDPModule

from lightning_ddd.compat import foreach_lerp_, load_full_state_dict
from lightning_ddd.distributed import local_tensor, reshard


def averaged_tensors(module: torch.nn.Module, use_buffers: bool = True) -> list[Tensor]:
    """What the average follows, as this rank holds it: every parameter and, with ``use_buffers``, every
    floating-point buffer; DTensors (FSDP2) as their local shards, FSDP1 parameters as the views of the
    rank's shard that ``use_orig_params`` gives. In module order, detached."""
    return [local_tensor(t.detach()) for t in _sources(module, use_buffers)]


def _sources(module: torch.nn.Module, use_buffers: bool) -> list[Tensor]:
    reshard(module)  # FSDP2 registers the sharded parameters only when resharded
    tensors = list(module.parameters())
    if use_buffers:
        tensors += [b for b in module.buffers() if b.is_floating_point()]
    return tensors


class ShardedAverage:
    """The average: one tensor per entry of :func:`averaged_tensors`, same shape, on ``device`` (None: the
    module's). ``update_parameters`` is the method Lightning's ``WeightAveraging`` hooks call.

    Args:
        module: the module as the strategy holds it now.
        decay: weight of the old average in ``average = decay * average + (1 - decay) * weights``.
        use_buffers: also average floating-point buffers.
        device: where the average lives (e.g. "cpu" to save accelerator memory, at a copy per update).
    """

    def __init__(self, module: torch.nn.Module, decay: float, use_buffers: bool = True,
                 device: torch.device | None = None) -> None:
        self.decay, self.use_buffers, self.device = decay, use_buffers, device
        self.tensors = [t.to(device or t.device, copy=True) for t in averaged_tensors(module, use_buffers)]
        self.n_averaged = 0  # updates so far; the first one copies (as torch's AveragedModel does)
        # The parameter objects stay the same through fit, except under FSDP2, which swaps sharded and
        # gathered ones: elsewhere they are looked up once (walking the module tree costs more than the lerp).
        self._fixed = None if any(isinstance(m, FSDPModule) for m in module.modules()) else \
            (module, _sources(module, use_buffers))

    def current(self, module: torch.nn.Module) -> list[Tensor]:
        """The module's tensors, checked against the average's shapes (a mismatch means a re-wrapped module)."""
        if self._fixed is not None and self._fixed[0] is module:
            tensors = [local_tensor(t.detach()) for t in self._fixed[1]]
        else:
            tensors = averaged_tensors(module, self.use_buffers)
        if len(tensors) != len(self.tensors) or any(a.shape != t.shape for a, t in zip(self.tensors, tensors)):
            raise RuntimeError("EMA: the module's parameters changed shape or number since the average was created.")
        return tensors

    def to_module_devices(self, module: torch.nn.Module) -> None:
        """Follow the module to its devices (after the strategy moved it), unless a device was given."""
        if self.device is None:
            self.tensors = [a.to(t.device) for a, t in zip(self.tensors, self.current(module))]

    @torch.no_grad()
    def update_parameters(self, module: torch.nn.Module) -> None:
        current = self.current(module)
        if self.device is not None:
            current = [t.to(self.device, non_blocking=True) for t in current]
        if self.n_averaged == 0:
            for average, tensor in zip(self.tensors, current):
                average.copy_(tensor)
        else:
            foreach_lerp_(self.tensors, current, 1.0 - self.decay)  # decay * average + (1 - decay) * weights
        self.n_averaged += 1

    @torch.no_grad()
    def swap(self, module: torch.nn.Module) -> None:
        """Exchange the module's values with the average's (its own inverse), one tensor at a time."""
        for average, current in zip(self.tensors, self.current(module)):
            held = current.clone()
            current.copy_(average)
            average.copy_(held)

    @torch.no_grad()
    def copy_to(self, module: torch.nn.Module) -> None:
        for average, current in zip(self.tensors, self.current(module)):
            current.copy_(average)


class EMA(EMAWeightAveraging):
    """Exponential moving average of the weights under a single device, DDP or FSDP (full-state checkpoints).

    A drop-in for Lightning's ``EMAWeightAveraging`` (same arguments and update schedule, same checkpoint
    layout, so checkpoints move between the two), whose average is sharded like the weights:

    - The average is created in ``on_fit_start``, after the strategy has wrapped and sharded the module:
      each rank averages the tensors it holds (whole under DDP, its shard under FSDP), and FSDP's memory
      saving carries over to the average. It is updated after each optimiser step with one fused lerp.
    - Validation runs on the average (swapped in for the validation epoch), so does every sampling callback
      of this package, and at the end of training the module keeps the average.
    - A checkpoint's ``state_dict`` holds the consolidated average: the strategy's own state-dict hook is run
      with the average swapped in (under FSDP it gathers the full tensors to rank 0, as it does for the
      training weights, which go to ``current_model_state``). Resuming restores both exactly.
    - Export the average alone with :func:`export_weights` (a small checkpoint that every loader reads).

    FSDP checkpoints must be full files: ``FSDPStrategy(state_dict_type="full")`` (Lightning's default) or
    ``ModelParallelStrategy(save_distributed_checkpoint=False)``; sharded ones are refused at set-up.

    Args:
        decay: weight of the old average: ``average = decay * average + (1 - decay) * weights``.
        update_every_n_steps: update after every this many optimiser steps.
        update_starting_at_step: first (zero-based) optimiser step to update after (None: the first).
        update_starting_at_epoch: also update at the end of every epoch from this one on (None: never).
        use_buffers: also average floating-point buffers.
        device: where the average lives (None: with the weights; "cpu" saves accelerator memory).
    """

    def __init__(
        self,
        decay: float = 0.999,
        update_every_n_steps: int = 1,
        update_starting_at_step: int | None = None,
        update_starting_at_epoch: int | None = None,
        use_buffers: bool = True,
        device: str | None = None,
    ) -> None:
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA: decay={decay} must lie in [0, 1].")
        super().__init__(device=device, use_buffers=use_buffers, decay=decay, update_every_n_steps=update_every_n_steps,
                         update_starting_at_step=update_starting_at_step,
                         update_starting_at_epoch=update_starting_at_epoch)
        self.decay = decay
        self._average_model: ShardedAverage | None = None

    # ---- set-up ------------------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # Not Lightning's: no AveragedModel here (the strategy has not wrapped the module yet).
        if stage == TrainerFn.FITTING:
            check_strategy(trainer.strategy)
            self._average_model = None  # each fit builds its own (on_fit_start, or on_load_checkpoint before it)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # After strategy.setup. Under DDP and on one device a resumed average exists already (restored before
        # the module moved to its device): it follows the module; otherwise it starts as a copy.
        if self._average_model is None:
            self._average_model = self._new_average(pl_module)
        else:
            self._average_model.to_module_devices(pl_module)

    def _new_average(self, pl_module: pl.LightningModule) -> ShardedAverage:
        return ShardedAverage(pl_module, self.decay, self._use_buffers, self._device)

    # ---- what the inherited hooks call -------------------------------------------------------------
    def _swap_models(self, pl_module: pl.LightningModule) -> None:
        self._average_model.swap(pl_module)

    def _copy_average_to_current(self, pl_module: pl.LightningModule) -> None:
        self._average_model.copy_to(pl_module)

    # ---- checkpoints -------------------------------------------------------------------------------
    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        if self._average_model is None:
            return super().on_save_checkpoint(trainer, pl_module, checkpoint)  # outside fit: Lightning's note
        # Every rank runs this: under FSDP the strategy's hook gathers the full tensors to rank 0.
        held = {local_tensor(t).untyped_storage().data_ptr() for t in (*pl_module.parameters(), *pl_module.buffers())}
        self._swap_models(pl_module)
        try:
            # Unsharded strategies return views of the module's own tensors, which hold the weights again
            # after the swap back: copy those (to the CPU) now.
            average = {name: value.detach().to("cpu", copy=True)
                       if isinstance(value, Tensor) and value.untyped_storage().data_ptr() in held else value
                       for name, value in trainer.strategy.lightning_module_state_dict().items()}
        finally:
            self._swap_models(pl_module)
        checkpoint["current_model_state"] = checkpoint["state_dict"]
        checkpoint["state_dict"] = average
        checkpoint["averaging_state"] = {"n_averaged": torch.tensor(self._average_model.n_averaged, dtype=torch.long)}

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        if trainer.state.fn != TrainerFn.FITTING:
            return  # validate/test/predict: the module holds state_dict, the average, which is what they want
        # The strategy has loaded checkpoint["state_dict"] (the average) into the module.
        if self._average_model is None:  # restored before strategy.setup (one device, DDP)
            self._average_model = self._new_average(pl_module)
        else:  # restored after strategy.setup (FSDP): the average holds the initial weights
            self._swap_models(pl_module)
        if "current_model_state" in checkpoint and "averaging_state" in checkpoint:
            load_full_state_dict(trainer.strategy, pl_module, checkpoint["current_model_state"], pl_module.strict_loading)
            self._average_model.n_averaged = int(checkpoint["averaging_state"].get("n_averaged", 1))
        else:  # a checkpoint without an average: both start from its weights (as Lightning's callback does)
            self._copy_average_to_current(pl_module)
            self._average_model.n_averaged = 1


def check_strategy(strategy) -> None:
    """Refuse strategies whose checkpoints cannot carry the average (sharded checkpoint folders, DeepSpeed)."""
    name = type(strategy).__name__
    if isinstance(strategy, DeepSpeedStrategy):
        raise ValueError(f"EMA does not support {name}; use DDP or FSDP.")
    if isinstance(strategy, FSDPStrategy) and getattr(strategy, "_state_dict_type", "full") != "full":
        raise ValueError("EMA needs full checkpoints under FSDP: use FSDPStrategy(state_dict_type='full').")
    if isinstance(strategy, ModelParallelStrategy) and getattr(strategy, "_save_distributed_checkpoint", False):
        raise ValueError("EMA needs full checkpoints: use ModelParallelStrategy(save_distributed_checkpoint=False).")


#: checkpoint entries that only resuming needs
TRAINING_STATE = ("current_model_state", "averaging_state", "optimizer_states", "lr_schedulers", "callbacks", "loops")


def export_weights(checkpoint_path: str, output_path: str) -> str:
    """Write the consolidated EMA weights of a checkpoint as a small checkpoint of their own.

    The output keeps ``state_dict`` (the average when EMA was on) and what loaders read (hyperparameters,
    the model class, a student's teacher path and hash), and drops the training weights, optimiser states
    and loop state: ``evaluate --ckpt_path``, ``teacher_ckpt`` and ``Module.load_from_checkpoint`` read it.
    Returns ``output_path``.
    """
    checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=False)
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise ValueError(f"'{checkpoint_path}' is not a Lightning checkpoint file (no state_dict).")
    if "current_model_state" not in checkpoint:
        raise ValueError(f"'{checkpoint_path}' holds no EMA average (it was written without an EMA callback).")
    kept = {key: value for key, value in checkpoint.items() if key not in TRAINING_STATE}
    os.makedirs(os.path.dirname(os.path.abspath(output_path)), exist_ok=True)
    torch.save(kept, output_path)
    return output_path
