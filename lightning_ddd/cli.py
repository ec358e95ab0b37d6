"""``python -m lightning_ddd``: a LightningCLI in subclass mode over every module and DataModule.

Vocabulary size and sequence length flow from the DataModule into the model by argument links, so a
config never states them twice. Configs are read in jsonargparse's ``omegaconf+`` mode: a value may
interpolate another, e.g. ``total_steps: ${trainer.max_steps}`` for an LR schedule, and the interpolation
is resolved on the final config, after command-line overrides (so ``--trainer.max_steps 100`` shortens the
schedule too).

Errors end in one line (:mod:`lightning_ddd.errors`): the parser's own (an unknown class or key, with the
closest valid names) here, in :class:`DDDArgumentParser`; everything raised while the run is built, in
``__main__``. With ``--ckpt_path`` the model is built from the checkpoint's hyperparameters: a value given
on the command line that contradicts them is refused, and the values the checkpoint changed are listed.
A run that fails before its first optimiser step leaves no run folder behind (:mod:`lightning_ddd.run_files`);
a finished ``fit`` ends with one summary line (:mod:`lightning_ddd.fit_report`).
"""

from __future__ import annotations

import inspect
import os
import sys
from contextvars import ContextVar
from typing import Any

from jsonargparse import ArgumentError, Namespace, set_parsing_settings
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities.rank_zero import rank_zero_info

import lightning_ddd.data  # noqa: F401  (registers the DataModules for short class names)
import lightning_ddd.diffusion.losses  # noqa: F401  (registers the losses)
import lightning_ddd.optim  # noqa: F401
import lightning_ddd.released  # noqa: F401  (released networks, for class_path resolution)
from lightning_ddd.checkpoints import (
    CheckpointError,
    check_class,
    check_state_dict,
    checkpoint_origin,
    read_checkpoint,
)
from lightning_ddd.compat import turn_off_default_hp_metric
from lightning_ddd.data import TokenDataModule
from lightning_ddd.errors import HINT, explain_parser_error, import_path, traceback_requested
from lightning_ddd.fit_report import FitReport
from lightning_ddd.modules import DiffusionModule
from lightning_ddd.run_files import RunConfigSaver, RunFolders
from lightning_ddd.trainer import DDDTrainer

# `${trainer.max_steps}` in a config file means the file's own `trainer:` block. The subcommand (`fit`) is a
# level above the file's root, so absolute paths are rewritten relative to where they appear when a file is
# loaded; set before any parser exists, since jsonargparse picks its loader once.
set_parsing_settings(omegaconf_absolute_to_relative_paths=True)

#: the command line being parsed (for the error messages: which config files, which options were given)
_COMMAND_LINE: ContextVar[list[str]] = ContextVar("lightning_ddd_command_line", default=[])
#: subcommands that run the Trainer (and so a run folder, a checkpoint to restore, a fit to report)
_TRAINER_SUBCOMMANDS = ("fit", "validate", "test", "predict")
#: model arguments filled in by the data, never a contradiction of a checkpoint
_LINKED = ("vocab_size", "seq_len")


class DDDArgumentParser(LightningArgumentParser):
    """The CLI's parser: an error is one ``error:`` line naming the key, the bad value and the closest
    valid names, not the usage text and jsonargparse's tree of alternatives (those come back with
    ``LIGHTNING_DDD_TRACEBACK=1``). Option names must be written in full (no argparse abbreviations, so a
    truncated key is an error rather than a silent match)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def option_keys(self) -> list[str]:
        """The option strings of this parser, ``--`` included, without the help options."""
        return [s for a in self._actions for s in a.option_strings
                if s.startswith("--") and "help" not in s and s not in ("--print_shtab", "--print_config")]

    def error(self, message: str, ex: Exception | None = None):
        if not self.exit_on_error or traceback_requested():
            try:
                super().error(message, ex)  # nested parsers raise; the outermost one reports
            except ArgumentError as err:
                # the keys this (nested) parser accepts: the outer parser suggests the closest one
                err.lightning_ddd_keys = [k.removeprefix("--") for k in self.option_keys()]
                raise
        line = explain_parser_error(message, ex, self.option_keys(), _config_files(_COMMAND_LINE.get()))
        sys.stderr.write(f"error: {line}  {HINT}\n")
        self.exit(2)


class LightningDDDCLI(LightningCLI):
    """LightningCLI with the project's links, early checks, one-line errors and run report."""

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
        command_line = list(sys.argv[1:] if args is None else args) if not isinstance(args, (dict, Namespace)) else []
        token = _COMMAND_LINE.set(command_line)
        try:
            super().parse_arguments(parser, args)
        finally:
            _COMMAND_LINE.reset(token)
        self._command_line = command_line
        # LightningCLI reads the checkpoint's hyperparameters next: fail first with a clear message.
        self._checkpoint = read_checkpoint(self._ckpt_path()) if self._ckpt_path() else None

    def _parse_ckpt_path(self) -> None:
        """Build the model from the checkpoint's hyperparameters (as LightningCLI does), but refuse a checkpoint
        of another model class, refuse command-line values that contradict it, and say what it changed."""
        if self._checkpoint is None:
            return
        path, subcommand = self._ckpt_path(), self.config.subcommand
        hparams = dict(self._checkpoint.get("hyper_parameters", {}))
        hparams.pop("_instantiator", None)
        if not hparams:
            return
        model = self.config[subcommand].get("model")
        # a checkpoint of another class would replace the config's class: a teacher config resumed from a
        # student checkpoint would build the student with the teacher's trainer settings
        wanted = import_path(model.get("class_path") or "") if model is not None else None
        check_class(self._checkpoint, path, wanted if isinstance(wanted, type) else None)
        _check_hparams_fit_class(self._checkpoint, path, hparams)
        if "_class_path" in hparams:
            hparams = {"class_path": hparams.pop("_class_path"), "dict_kwargs": hparams}
        before = _flatten(model)
        exit_on_error, self.parser.exit_on_error = self.parser.exit_on_error, False
        try:
            self.config = self.parser.parse_object({subcommand: {"model": hparams}}, self.config)
        except ArgumentError as err:
            line = explain_parser_error(str(err), err.__cause__)
            raise CheckpointError(
                f"the hyperparameters of checkpoint '{path}' ({checkpoint_origin(self._checkpoint, path)}) do not "
                f"fit this version of the code ({line})."
            ) from err
        finally:
            self.parser.exit_on_error = exit_on_error
        after = _flatten(self.config[subcommand].get("model"))
        changed = {k: (before.get(k), v) for k, v in after.items()
                   if before.get(k) != v and k.split(".")[-1] not in _LINKED}
        given = _model_options(self._command_line)
        contradictions = [f"--model.{_short(k)}={old!r} (checkpoint: {new!r})" for k, (old, new) in changed.items()
                          if any(_short(k) == g or _short(k).startswith(g + ".") for g in given)]
        if contradictions:
            raise CheckpointError(
                f"{', '.join(contradictions)} contradicts checkpoint '{path}': the model is built from the "
                "checkpoint's hyperparameters; drop the option, or train a new model to change it."
            )
        shown = [f"{_short(k)}={new!r} (config: {old!r})" for k, (old, new) in changed.items() if old is not None]
        if shown:
            rank_zero_info(f"model hyperparameters from checkpoint '{path}': {', '.join(shown)}")

    def instantiate_classes(self) -> None:
        super().instantiate_classes()
        # Every model checks the data before any work: vocabulary and row length (and a release its tokenizer).
        check = getattr(self.model, "check_datamodule", None)
        if callable(check) and self.datamodule is not None:
            check(self.datamodule)

    def instantiate_trainer(self, **kwargs: Any):
        trainer = super().instantiate_trainer(**kwargs)
        trainer_config = self.config.get(str(self.subcommand), self.config).get("trainer") or {}
        if trainer_config.get("logger") in (None, True):
            # Lightning's default TensorBoard logger: no hp_metric pinned at -1 (configs set default_hp_metric)
            for logger in trainer.loggers:
                if isinstance(logger, TensorBoardLogger):
                    turn_off_default_hp_metric(logger)
        return trainer

    def after_instantiate_classes(self) -> None:
        checkpoint, self._checkpoint = self._checkpoint, None  # the subcommand reads the file itself
        if self.subcommand not in _TRAINER_SUBCOMMANDS:
            return  # sample and evaluate check the checkpoint when they load it
        if checkpoint is not None:  # before any folder exists or any work starts
            check_class(checkpoint, self._ckpt_path(), type(self.model))
            check_state_dict(self.model, checkpoint, self._ckpt_path())
        report = _fit_report(self.trainer)
        if report is not None:
            report.folders = RunFolders(self.trainer)  # removed by main() if the run fails before training

    def after_fit(self) -> None:
        report = _fit_report(self.trainer)
        if report is not None:
            rank_zero_info(report.summary(self.trainer))

    def before_sample(self) -> None:
        self.datamodule.setup("predict")  # decode/score samples with the data's own tokenizer and density

    before_evaluate = before_sample


def _fit_report(trainer) -> FitReport | None:
    return next((cb for cb in trainer.callbacks if isinstance(cb, FitReport)), None)


def _check_hparams_fit_class(ckpt: dict[str, Any], path: str, hparams: dict[str, Any]) -> None:
    """Refuse hyperparameters that the checkpoint's class no longer takes (written by another version)."""
    cls = import_path(hparams.get("_class_path") or "")
    if not isinstance(cls, type):
        return
    parameters = inspect.signature(cls.__init__).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return
    unknown = [k for k in hparams if k != "_class_path" and k not in parameters]
    if unknown:
        raise CheckpointError(
            f"the hyperparameters of checkpoint '{path}' ({checkpoint_origin(ckpt, path)}) name arguments that "
            f"{cls.__name__} does not take ({', '.join(unknown)}), so the model cannot be built from them; use the "
            "version of the code that wrote it."
        )


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """Nested namespaces and dicts as {"a.b.c": leaf}."""
    if isinstance(value, Namespace):
        value = value.as_dict()
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, item in value.items():
            if key != "__path__":
                out.update(_flatten(item, f"{prefix}{key}."))
        return out
    return {prefix.rstrip("."): value}


def _short(key: str) -> str:
    """A model key without its ``init_args`` levels: the form both ``--model.a.b`` spellings share."""
    return ".".join(part for part in key.split(".") if part != "init_args")


def _model_options(command_line: list[str]) -> list[str]:
    """The model keys set on the command line by ``--model.<key>`` options (short form)."""
    keys = []
    for arg in command_line:
        if arg.startswith("--model."):
            key = arg.removeprefix("--model.").split("=", 1)[0]
            if key not in ("class_path", "help") and not key.endswith(".help"):
                keys.append(_short(key))
    return keys


def _config_files(command_line: list[str]) -> list[str]:
    """The config files named on a command line: after ``-c``/``--config`` and as values of other options."""
    files = []
    for i, arg in enumerate(command_line):
        value = arg.split("=", 1)[1] if arg.startswith("--") and "=" in arg else arg
        after_flag = i > 0 and command_line[i - 1] in ("-c", "--config")
        if after_flag or (value.endswith((".yaml", ".yml", ".json")) and os.path.isfile(value)):
            files.append(value)
    return files


def main(args: list[str] | None = None) -> LightningDDDCLI:
    """Entry point of ``python -m lightning_ddd`` (``args=None`` reads ``sys.argv``)."""
    report = FitReport()
    try:
        return _cli(args, report)
    except BaseException:
        report.remove_folders_if_untrained()  # a run that failed before its first step leaves nothing
        raise


def _cli(args: list[str] | None, report: FitReport) -> LightningDDDCLI:
    return LightningDDDCLI(
        DiffusionModule,
        TokenDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_callback=RunConfigSaver,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"parser_mode": "omegaconf+"},
        parser_class=DDDArgumentParser,
        trainer_class=DDDTrainer,
        trainer_defaults={"callbacks": [report]},
        auto_configure_optimizers=False,
        args=args,
    )
