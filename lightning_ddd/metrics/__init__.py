"""torchmetrics Metric subclasses with summed states (correct under DDP).

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
    load_evaluator,
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
    "load_evaluator",
    "unigram_entropy",
]
