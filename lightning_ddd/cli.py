"""``python -m lightning_ddd``: a LightningCLI in subclass mode over every module and DataModule.

Vocabulary size and sequence length flow from the DataModule into the model by argument links, so a
config never states them twice. Configs are read in jsonargparse's ``omegaconf+`` mode: a value may
interpolate another, e.g. ``total_steps: ${trainer.max_steps}`` for an LR schedule, and the interpolation
is resolved on the final config, after command-line overrides (so ``--trainer.max_steps 100`` shortens the
schedule too).
"""

from __future__ import annotations

from jsonargparse import set_parsing_settings
from lightning.pytorch.cli import LightningCLI

import lightning_ddd.data  # noqa: F401  (registers the DataModules for short class names)
import lightning_ddd.diffusion.losses  # noqa: F401  (registers the losses)
import lightning_ddd.optim  # noqa: F401
import lightning_ddd.released  # noqa: F401  (registers ReleasedTeacher)
from lightning_ddd.checkpoints import read_checkpoint, validate_checkpoint
from lightning_ddd.data import TokenDataModule
from lightning_ddd.modules import DiffusionModule
from lightning_ddd.trainer import DDDTrainer

# `${trainer.max_steps}` in a config file means the file's own `trainer:` block. The subcommand (`fit`) is a
# level above the file's root, so absolute paths are rewritten relative to where they appear when a file is
# loaded; set before any parser exists, since jsonargparse picks its loader once.
set_parsing_settings(omegaconf_absolute_to_relative_paths=True)


class LightningDDDCLI(LightningCLI):
    """LightningCLI with the project's links and early checks."""

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        """fit, validate (the NLL bound of the validation split), sample and evaluate.

        Lightning's ``test`` and ``predict`` are left out: no shipped DataModule has a test split apart from
        its validation split (CIFAR-10's is the official test batch), so ``test`` would repeat ``validate``,
        and drawing samples is ``sample`` (files and metrics) and ``evaluate`` (sweeps).
        """
        lightning = LightningCLI.subcommands()
        return {
            "fit": lightning["fit"],
            "validate": lightning["validate"],
            "sample": {"model", "datamodule"},
            "evaluate": {"model", "datamodule"},
        }

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("data.vocab_size", "model.init_args.vocab_size", apply_on="instantiate")
        parser.link_arguments("data.seq_len", "model.init_args.seq_len", apply_on="instantiate")

    def _ckpt_path(self) -> str | None:
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        return ckpt_path if ckpt_path not in (None, "last", "best", "hpc", "registry") else None

    def parse_arguments(self, parser, args) -> None:
        super().parse_arguments(parser, args)
        # LightningCLI reads the checkpoint's hyperparameters next: fail first with a clear message.
        if self._ckpt_path():
            read_checkpoint(self._ckpt_path())

    def instantiate_classes(self) -> None:
        super().instantiate_classes()
        # Models whose vocabulary and tokenizer are fixed by a release check the data before any work.
        check = getattr(self.model, "check_datamodule", None)
        if callable(check) and self.datamodule is not None:
            check(self.datamodule)

    def before_fit(self) -> None:
        if self._ckpt_path():
            validate_checkpoint(self._ckpt_path(), type(self.model))

    def before_sample(self) -> None:
        self.datamodule.setup("predict")  # decode/score samples with the data's own tokenizer and density

    before_evaluate = before_sample


def main(args: list[str] | None = None) -> LightningDDDCLI:
    """Entry point of ``python -m lightning_ddd`` (``args=None`` reads ``sys.argv``)."""
    return LightningDDDCLI(
        DiffusionModule,
        TokenDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"parser_mode": "omegaconf+"},
        trainer_class=DDDTrainer,
        auto_configure_optimizers=False,
        args=args,
    )
