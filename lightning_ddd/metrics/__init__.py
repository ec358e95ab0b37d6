"""torchmetrics Metric subclasses with summed states (correct under DDP)."""

from lightning_ddd.metrics.likelihood import NLLMetric

__all__ = ["NLLMetric"]
