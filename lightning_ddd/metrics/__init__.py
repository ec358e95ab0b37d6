"""torchmetrics Metric subclasses with summed states (correct under DDP).

Metrics load none of the project's models: evaluator LMs are built by the evaluation code
(``lightning_ddd.evaluation.load_evaluator``) and handed in, so this package imports nothing above it.

torch-fidelity and transformers are imported only when a metric needs them; the ``digits-cnn`` feature
extractor lives in ``lightning_ddd.metrics.digits_classifier`` (importing it registers it).
"""

from lightning_ddd.metrics.entropy import SampleEntropy, unigram_entropy
from lightning_ddd.metrics.fid import ImageFidelity, ReferenceStats, dataset_reference, frechet_distance
from lightning_ddd.metrics.gradient_moment import GradientMoment
from lightning_ddd.metrics.likelihood import NLLMetric
from lightning_ddd.metrics.perplexity import (
    ARModelEvaluator,
    Evaluator,
    GenerativePerplexity,
    HFCausalLMEvaluator,
    OracleEvaluator,
    TorchEvaluator,
)

__all__ = [
    "ARModelEvaluator",
    "Evaluator",
    "GenerativePerplexity",
    "GradientMoment",
    "HFCausalLMEvaluator",
    "ImageFidelity",
    "NLLMetric",
    "OracleEvaluator",
    "ReferenceStats",
    "SampleEntropy",
    "TorchEvaluator",
    "dataset_reference",
    "frechet_distance",
    "unigram_entropy",
]
