"""Build the evaluator models that generative perplexity and the gradient moment score samples with.

This is evaluation code, above the module layer: it loads an ``ARLanguageModel`` checkpoint or a Hugging
Face LM and hands the evaluator to the metrics, which never load models themselves.
"""

from __future__ import annotations

import os

import torch

from lightning_ddd.checkpoints import CheckpointError, checkpoint_class, validate_checkpoint
from lightning_ddd.metrics.perplexity import ARModelEvaluator, Evaluator, HFCausalLMEvaluator, OracleEvaluator
from lightning_ddd.modules.autoregressive import ARLanguageModel


def load_ar_evaluator(ckpt_path: str, device: str | torch.device = "cpu", batch_size: int = 64) -> ARModelEvaluator:
    """An ``ARLanguageModel`` checkpoint (written by ``fit`` with ``configs/quickstart/ar_evaluator.yaml``),
    frozen, as an evaluator on ``device``."""
    found = checkpoint_class(validate_checkpoint(ckpt_path))
    if found is not None and not issubclass(found, ARLanguageModel):
        raise CheckpointError(
            f"evaluator checkpoint '{ckpt_path}' holds a {found.__name__}, not an ARLanguageModel; train one "
            "with configs/quickstart/ar_evaluator.yaml."
        )
    model = ARLanguageModel.load_from_checkpoint(ckpt_path, map_location="cpu").to(device).eval()
    return ARModelEvaluator(model, name=ckpt_path, batch_size=batch_size)


_EVALUATORS: dict[tuple, Evaluator] = {}


def load_evaluator(spec: str, datamodule=None, device: str | torch.device = "cpu", batch_size: int = 16) -> Evaluator:
    """Build (once per process) the evaluator that ``spec`` names.

    Args:
        spec: ``"oracle"`` (the data's exact density), the path of an ``ARLanguageModel`` checkpoint file, or a
            Hugging Face model name or folder (e.g. ``"gpt2-large"``).
        datamodule: the data (needed by ``"oracle"``).
        device: where to run a model evaluator.
        batch_size: sequences per forward pass.
    """
    if spec == "oracle":
        if datamodule is None:
            raise ValueError("the oracle evaluator needs the DataModule.")
        return OracleEvaluator(datamodule)
    device = torch.device(device)
    if os.path.isfile(spec):
        stat = os.stat(spec)
        key = ("ar", os.path.abspath(spec), stat.st_mtime_ns, str(device), batch_size)
        if key not in _EVALUATORS:
            _EVALUATORS[key] = load_ar_evaluator(spec, device, batch_size)
    elif spec.endswith(".ckpt"):
        raise FileNotFoundError(f"evaluator checkpoint '{spec}' does not exist; check the path.")
    else:
        key = ("hf", spec, str(device), batch_size)
        if key not in _EVALUATORS:
            _EVALUATORS[key] = HFCausalLMEvaluator(spec, device, batch_size)
    return _EVALUATORS[key]
