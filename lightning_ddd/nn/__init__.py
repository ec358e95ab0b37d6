"""Plain nn.Modules: the bidirectional transformer backbone."""

from lightning_ddd.nn.transformer import DenoisingTransformer

__all__ = ["DenoisingTransformer"]
