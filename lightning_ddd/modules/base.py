"""The shared base of every LightningModule in lightning_ddd: process, backbone, optimiser, seeded noise, and
the training/validation step skeleton (a template: subclasses fill in ``compute_losses``)."""

from __future__ import annotations

import enum
import inspect
from typing import Any, Callable

import lightning.pytorch as pl
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor

from lightning_ddd.diffusion.processes import DiscreteProcess, MaskedProcess
from lightning_ddd.diffusion.sampling import SampleOutput, sample
from lightning_ddd.distributed import clip_grad_norm_, fully_shard_units, gradient_replicas, sharded_gradients
from lightning_ddd.nn import Backbone, DenoisingTransformer
from lightning_ddd.nn.transformer import Block
from lightning_ddd.resume import settle_epoch_boundary

#: builds a process from the vocabulary size: ``process(vocab_size)``
ProcessFactory = Callable[[int], DiscreteProcess]
#: builds a backbone: ``backbone(num_input_tokens, vocab_size, seq_len)`` (a subclass of ``Backbone``, so
#: ``--model.help`` lists the project's networks, not every torch module)
BackboneFactory = Callable[[int, int, int], Backbone]


def backbone_logits(
    backbone: nn.Module, z: Tensor, t: Tensor | None, cond: Tensor | None = None, positions: Tensor | None = None
) -> Tensor:
    """``backbone(z, t[, cond])``: (B, D, V) logits, or with ``positions`` ((B, D) bool) the (N, V) rows there.

    A backbone whose ``forward`` takes ``positions`` runs its head on those rows only; any other is run in full
    and its output indexed. No ``cond`` argument is passed when ``cond`` is None (backbones without one).
    """
    args = (z, t, cond) if cond is not None else (z, t)
    if positions is None:
        return backbone(*args)
    if "positions" in inspect.signature(backbone.forward).parameters:
        return backbone(*args, positions=positions)  # (N, V)
    return backbone(*args)[positions]


class Shared:
    """Holds an object by reference through deep copies.

    Lightning's EMA callback deep-copies the whole module: it must neither duplicate a frozen teacher nor
    copy the CLI's optimiser factories (they reference the CLI and its trainer, which cannot be pickled
    under DDP).
    """

    def __init__(self, value: Any) -> None:
        self.value = value

    def __deepcopy__(self, memo: dict) -> "Shared":
        return self


class shared_attribute:
    """A module attribute stored in a :class:`Shared` holder (kept by reference in deep copies)."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.key = f"_shared_{name}"

    def __get__(self, obj: Any, owner: type | None = None) -> Any:
        return self if obj is None else obj.__dict__[self.key].value

    def __set__(self, obj: Any, value: Any) -> None:
        obj.__dict__[self.key] = Shared(value)


class NoiseStream(enum.IntEnum):
    """The seeded noise streams: training, validation and evaluation never share draws."""

    TRAIN = 0
    VAL = 1
    EVAL = 2


class DiffusionModule(pl.LightningModule):
    """Base class: owns the forward process, the denoising backbone, the optimiser set-up and the steps.

    A subclass implements ``compute_losses(batch, generator) -> dict`` (the key ``"loss"`` is optimised,
    every key is logged as ``train/<key>``); the base checks the first batch, draws the noise from a
    generator seeded by (seed, stream, step, rank), so a resumed run draws exactly the noise an
    uninterrupted run would, and logs. Validation logs ``validation_losses`` (by default the same dictionary
    on fixed noise) as ``val/<key>``, and ``val/nll``, ``val/ppl``, ``val/bpd`` when the module has a
    ``val_nll`` metric. Hyperparameters are the init arguments less ``hparams_ignore``.

    Args:
        vocab_size: real token ids V (linked from the data).
        seq_len: sequence length D (linked from the data).
        process: the forward process, built as ``process(vocab_size)``.
        backbone: the network, built as ``backbone(num_input_tokens, vocab_size, seq_len)``.
        optimizer: optimiser, built as ``optimizer(parameters)``.
        lr_scheduler: optional LR schedule, built as ``lr_scheduler(optimizer)`` and stepped every step.
        seed: seed of the training and validation noise.
    """

    optimizer_factory = shared_attribute()
    lr_scheduler_factory = shared_attribute()
    #: init arguments kept out of ``hparams`` (factories: not hyperparameters, and not copyable)
    hparams_ignore: tuple[str, ...] = ("optimizer", "lr_scheduler")
    #: keys of the loss dictionary shown in the progress bar
    progress_bar_keys: tuple[str, ...] = ("loss",)

    def __init__(
        self,
        vocab_size: int,
        seq_len: int,
        process: ProcessFactory = MaskedProcess,
        backbone: BackboneFactory = DenoisingTransformer,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: LRSchedulerCallable | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if vocab_size < 2 or seq_len < 1:
            raise ValueError(f"{type(self).__name__}: need vocab_size >= 2 and seq_len >= 1, got {vocab_size}, {seq_len}.")
        self.vocab_size = vocab_size
        self.seq_len = seq_len
        self.process: DiscreteProcess = process(vocab_size)
        self.backbone = backbone(self.process.num_input_tokens, vocab_size, seq_len)
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler
        self.seed = seed
        self._checked_stages: set[str] = set()
        # The init arguments of this frame and of every subclass's __init__ that called it (the outer one
        # wins); arguments of this base that the subclass does not take (a student's copied process and
        # backbone) are not its hyperparameters.
        own = inspect.signature(type(self).__init__).parameters
        base_only = [name for name in inspect.signature(DiffusionModule.__init__).parameters if name not in own]
        self.save_hyperparameters(ignore=[*self.hparams_ignore, *base_only], frame=inspect.currentframe())

    # ---- the denoiser -------------------------------------------------------------------------------
    def denoise(
        self, z_t: Tensor, t: Tensor | None = None, cond: Tensor | None = None, positions: Tensor | None = None
    ) -> Tensor:
        """log p_theta(x | z_t): (B, D) noisy ids [, (B,) times, conditioning] → (B, D, V) fp32 log-probs; with
        ``positions`` ((B, D) bool) only at those N positions, (N, V) in row-major order (losses over masked
        positions need no other row, and the backbone's head then runs on those rows only)."""
        if not getattr(self.backbone, "time_conditioning", False):
            t = None  # RADD: the masked teacher's network has no time input
        elif t is None:
            raise ValueError("this backbone is time-conditioned but the loss gave no time; use TimeDCE or UniformELBO.")
        logits = backbone_logits(self.backbone, z_t, t, cond, positions)  # (B, D, V) or (N, V)
        return self.process.x0_log_probs(logits, z_t if positions is None else z_t[positions])  # fp32 even under bf16

    # ---- sampling -----------------------------------------------------------------------------------
    def step_condition(self, num_samples: int, generator: torch.Generator | None) -> Any:
        """Per-step conditioning drawn by the sampler (students return a fresh lambda or noise); None: none."""
        return None

    @torch.no_grad()
    def generate(self, num_samples: int, num_steps: int, **kwargs: Any) -> SampleOutput:
        """Sample (num_samples, seq_len) tokens in ``num_steps`` steps; keyword arguments go to
        :func:`lightning_ddd.diffusion.sampling.sample` (temperature, top_p, top_k, precision, generator, cache,
        fixed, progress)."""
        conditioned = type(self).step_condition is not DiffusionModule.step_condition
        return sample(
            self.denoise, self.process, num_samples, self.seq_len, num_steps, device=self.device,
            step_condition=self.step_condition if conditioned else None, **kwargs,
        )

    # ---- seeded noise -------------------------------------------------------------------------------
    def noise_generator(self, stream: NoiseStream | int, index: int) -> torch.Generator:
        """A generator seeded by (seed, stream, index, rank): the same numbers on a resumed run."""
        seed = ((self.seed * 1_000_003 + int(stream)) * 1_000_033 + index) * 1031 + self.global_rank
        return torch.Generator(device=self.device).manual_seed(seed % (2**63))

    # ---- the steps ----------------------------------------------------------------------------------
    def compute_losses(self, batch: Tensor, generator: torch.Generator | None) -> dict[str, Tensor]:
        """The objective on a (B, D) batch of ids: ``{"loss": optimised scalar, other keys: logged scalars}``."""
        raise NotImplementedError(f"{type(self).__name__} must implement compute_losses(batch, generator).")

    def validation_losses(self, batch: Tensor, generator: torch.Generator | None) -> dict[str, Tensor]:
        """The scalars logged under ``val/``; by default ``compute_losses`` (the generator is fixed per batch)."""
        return self.compute_losses(batch, generator)

    def training_step(self, batch: Tensor, batch_idx: int) -> Tensor:
        self.check_first_batch(batch, "train")
        losses = self.compute_losses(batch, self.noise_generator(NoiseStream.TRAIN, self.global_step))
        self.log_losses("train", losses, batch.shape[0])
        return losses["loss"]

    def validation_step(self, batch: Tensor, batch_idx: int) -> None:
        self.check_first_batch(batch, "val")
        # Seeded by the batch index: the same draws at every validation.
        losses = self.validation_losses(batch, self.noise_generator(NoiseStream.VAL, batch_idx))
        self.log_losses("val", losses, batch.shape[0])

    def on_validation_epoch_end(self) -> None:
        metric = getattr(self, "val_nll", None)  # an NLLMetric filled by validation_losses
        if metric is not None:
            for name, value in metric.compute().items():
                self.log(f"val/{name}", value.float(), prog_bar=name == "nll")
            metric.reset()

    def log_losses(self, stage: str, losses: dict[str, Tensor], batch_size: int) -> None:
        """Log every entry as ``<stage>/<key>`` (validation values averaged over batches and devices)."""
        for name, value in losses.items():
            self.log(f"{stage}/{name}", value.detach().float(), prog_bar=name in self.progress_bar_keys,
                     sync_dist=stage != "train", batch_size=batch_size)

    # ---- checks that fail early with a clear message ------------------------------------------------
    def setup(self, stage: str) -> None:
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if dm is not None:
            self.check_datamodule(dm)

    def check_datamodule(self, datamodule: Any) -> None:
        """Raise one line unless the data's vocabulary and row length are the model's (subclasses add their
        own checks, e.g. a release's tokenizer); called by ``setup`` and, before any work, by the CLI."""
        for name in ("vocab_size", "seq_len"):
            data_value, model_value = getattr(datamodule, name, None), getattr(self, name)
            if data_value is not None and data_value != model_value:
                raise ValueError(
                    f"{name} mismatch: the data has {name}={data_value} but the model was built with "
                    f"{model_value}; let the CLI link it from the data or use a checkpoint trained on this data."
                )

    def check_first_batch(self, x: Tensor, stage: str) -> None:
        """``check_batch`` on the first batch of each stage in this process (one host sync, then free)."""
        if stage not in self._checked_stages:
            self.check_batch(x)
            self._checked_stages.add(stage)

    def check_batch(self, x: Tensor) -> None:
        """Raise if token ids fall outside [0, vocab_size) (cheap; called on the first batch)."""
        if x.dtype != torch.long or x.dim() != 2 or x.shape[1] > self.seq_len:
            raise ValueError(
                f"batches must be (B, D<={self.seq_len}) LongTensors of token ids, got {tuple(x.shape)} {x.dtype}."
            )
        lo, hi = int(x.min()), int(x.max())
        if lo < 0 or hi >= self.vocab_size:
            raise ValueError(
                f"token ids span [{lo}, {hi}] but the model's vocab_size is {self.vocab_size}; "
                "the data and the model disagree on the vocabulary."
            )

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["lightning_ddd_class"] = type(self).__name__  # lets loaders reject the wrong kind early

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        settle_epoch_boundary(checkpoint)  # Lightning restores the loops after this hook: see lightning_ddd.resume
        hp = checkpoint.get("hyper_parameters", {})
        for name in ("vocab_size", "seq_len"):
            if name in hp and hp[name] != getattr(self, name):
                raise ValueError(
                    f"checkpoint was trained with {name}={hp[name]} but this run has {name}={getattr(self, name)}; "
                    "resume with the data the checkpoint was trained on."
                )

    # ---- optimisation -------------------------------------------------------------------------------
    def trainable_parameters(self):
        """Parameters given to the optimiser (students override this to leave the teacher out)."""
        return self.parameters()

    def configure_model(self) -> None:
        """Under ``ModelParallelStrategy`` (FSDP2): shard every transformer block and backbone over the
        data-parallel mesh (a student's frozen teacher, outside the module tree, stays whole)."""
        if self.device_mesh is not None:
            fully_shard_units(self, self.device_mesh["data_parallel"], (Block, DenoisingTransformer))

    def clip_gradients(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        """Lightning's clipping, except norm clipping of FSDP-sharded gradients (which Lightning's FSDP plugin
        refuses): by the global norm of this optimiser's parameters (``lightning_ddd.distributed``)."""
        strategy = self.trainer.strategy
        if gradient_clip_val and gradient_clip_algorithm in (None, "norm") and sharded_gradients(strategy):
            optimizer = getattr(optimizer, "optimizer", optimizer)  # a LightningOptimizer wraps it
            params = [p for group in optimizer.param_groups for p in group["params"]]
            clip_grad_norm_(params, gradient_clip_val, gradient_replicas(strategy))
            return
        super().clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def configure_optimizers(self):
        optimizer = self.optimizer_factory(self.trainable_parameters())
        if self.lr_scheduler_factory is None:
            return optimizer
        scheduler = self.lr_scheduler_factory(optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
