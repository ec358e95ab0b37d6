"""torchmetrics Metric subclasses with summed states (correct under DDP)."""

from lightning_ddd.metrics.entropy import SampleEntropy, unigram_entropy
from lightning_ddd.metrics.likelihood import NLLMetric

__all__ = ["NLLMetric", "SampleEntropy", "unigram_entropy"]
