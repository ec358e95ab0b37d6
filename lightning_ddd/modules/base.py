"""The shared base of every LightningModule in lightning_ddd: process, backbone, optimiser, seeded noise."""

from __future__ import annotations

from typing import Any, Callable

import lightning.pytorch as pl
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn

from lightning_ddd.diffusion.processes import DiscreteProcess, MaskedProcess
from lightning_ddd.diffusion.sampling import SampleOutput, sample
from lightning_ddd.nn import DenoisingTransformer

#: builds a process from the vocabulary size: ``process(vocab_size)``
ProcessFactory = Callable[[int], DiscreteProcess]
#: builds a backbone: ``backbone(num_input_tokens, vocab_size, seq_len)``
BackboneFactory = Callable[[int, int, int], nn.Module]


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


class DiffusionModule(pl.LightningModule):
    """Base class: owns the forward process and the denoising backbone, and the optimiser set-up.

    Subclasses implement ``training_step``/``validation_step``. All training noise is drawn from a
    generator seeded by (seed, step, rank), so a resumed run draws exactly the noise an uninterrupted
    run would.

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

    # ---- the denoiser -------------------------------------------------------------------------------
    def denoise(self, z_t: Tensor, t: Tensor | None = None, cond: Tensor | None = None) -> Tensor:
        """log p_theta(x | z_t): (B, D) noisy ids [, (B,) times, conditioning] → (B, D, V) fp32 log-probs."""
        if not getattr(self.backbone, "time_conditioning", False):
            t = None  # RADD: the masked teacher's network has no time input
        elif t is None:
            raise ValueError("this backbone is time-conditioned but the loss gave no time; use TimeDCE or UniformELBO.")
        logits = self.backbone(z_t, t, cond) if cond is not None else self.backbone(z_t, t)
        return self.process.x0_log_probs(logits, z_t)  # fp32 even under bf16 autocast

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
    def noise_generator(self, stream: int, index: int) -> torch.Generator:
        """A generator seeded by (seed, stream, index, rank): the same numbers on a resumed run."""
        seed = ((self.seed * 1_000_003 + stream) * 1_000_033 + index) * 1031 + self.global_rank
        return torch.Generator(device=self.device).manual_seed(seed % (2**63))

    # ---- checks that fail early with a clear message ------------------------------------------------
    def setup(self, stage: str) -> None:
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if dm is None:
            return
        for name in ("vocab_size", "seq_len"):
            data_value, model_value = getattr(dm, name, None), getattr(self, name)
            if data_value is not None and data_value != model_value:
                raise ValueError(
                    f"{name} mismatch: the data has {name}={data_value} but the model was built with "
                    f"{model_value}; let the CLI link it from the data or use a checkpoint trained on this data."
                )

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

    def configure_optimizers(self):
        optimizer = self.optimizer_factory(self.trainable_parameters())
        if self.lr_scheduler_factory is None:
            return optimizer
        scheduler = self.lr_scheduler_factory(optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
