"""Fixed-seed samples in TensorBoard at every validation: an image grid, decoded text, or token ids."""

from __future__ import annotations

import lightning.pytorch as pl
from torch import Tensor

from lightning_ddd.distributed import Ranks
from lightning_ddd.evaluation import SamplingSettings, generate
from lightning_ddd.extras import require

from ._logging import log_image_grid, log_markdown, log_text, warn_without_tensorboard
from ._sampling import check_strategy, sampling_context


class SampleLogger(pl.Callback):
    """Draws the same-seed samples after every validation and shows them in TensorBoard.

    Image data (``modality: image``): one grid, ``sample/images`` (``add_image``). Text: the decoded
    samples, ``sample/text`` (``add_text``). Other data: the token ids as strings, ``sample/tokens``. The seed
    is fixed, so successive validations show how the same noise turns into better samples.

    Runs in ``on_validation_end`` (every validation, not the sanity check; every rank draws its share,
    rank 0 logs), with the EMA weights
    swapped in explicitly when EMA is on: by that hook the EMA callback has swapped its weights out again.

    Args:
        sampling: how the samples are drawn (``num_samples`` of them per validation).
        max_chars: text samples are cut to this many characters (TensorBoard slows down on long texts).
    """

    def __init__(self, *, sampling: SamplingSettings = SamplingSettings(), max_chars: int = 2000) -> None:
        self.sampling = sampling
        self.max_chars = max_chars

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        check_strategy(trainer, self, [self.sampling])
        warn_without_tensorboard(trainer, self)
        if getattr(trainer.datamodule, "modality", None) == "image":
            require("torchvision", feature="SampleLogger's image grids")

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        with sampling_context(trainer, pl_module):  # every rank draws its share
            tokens, _, _ = generate(pl_module, self.sampling, ranks=Ranks.of(trainer))  # (N, D)
        if not trainer.is_global_zero:
            return
        datamodule = trainer.datamodule
        decoded = datamodule.decode(tokens) if datamodule is not None else None
        if isinstance(decoded, Tensor):  # (N, C, H, W) in [0, 1]
            log_image_grid(trainer, "sample/images", decoded)
        elif getattr(datamodule, "modality", None) == "text":
            log_text(trainer, "sample/text", [text[: self.max_chars] for text in decoded])
        else:
            rows = "\n".join(" ".join(map(str, row.tolist())) for row in tokens)  # one sample per line
            log_markdown(trainer, "sample/tokens", f"```\n{rows}\n```")
